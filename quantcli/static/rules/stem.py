"""Image stems: a Conv over 1-4 input channels reading the model input stays float when it is slower as int8.

Such a Conv does little work per pixel, so onnxruntime's QLinearConv (plus the QuantizeLinear of
the model input in front of it) can lose to its float NCHWc kernel (measured, AVX2, 1 thread: 3->16
channels 3x3 at 224x224 784 us int8 vs 382 us float; 3->8 at 48x192 144 us vs 56 us). Whether it
does is a fact of the host: the rule asks the planning's ``SpeedOracle`` (``quantcli.core.host``),
by default a micro-benchmark of the stem's shape on this CPU (``quantcli.verify.kernel_speed``):
the ratio ``t_float / t_int8`` of ``Conv -> QuantizeLinear`` against ``QuantizeLinear ->
QLinearConv``. The stem stays float only when that ratio is below ``1 - STEM_MARGIN``; any other
Conv, and a stem that is not slower, is passed on to ``compute``.

A stem reads the model input directly or through data-movement ops and ``Pad`` (``STEM_PATH_OPS``: the
Conv1d of a raw-audio model, written by tf2onnx as ``Reshape -> Slice -> Pad -> Unsqueeze -> Conv``
over ``1 x 1 x samples``, or by PyTorch as ``Pad -> Unsqueeze -> Conv`` with a 3-D weight). A 1-D Conv
is measured as the 2-D kernel it is to onnxruntime (height 1). Measured (AVX512-VNNI EPYC, 1 thread),
Basic Pitch's 256-tap low-pass over 44100 samples at stride 2, one channel in and out: QLinearConv
0.30x float; its 36-filter constant-Q Convs 1.6-2.4x (those stay float for accuracy:
``log_magnitude``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from quantcli.core.host import ConstantSpeedOracle, KernelKind, KernelShape
from quantcli.static.plan import Rejection, SkipCode
from quantcli.static.rules._rule import Rule
from quantcli.static.rules.movement import DATA_INPUTS

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["STEM", "STEM_MARGIN", "STEM_MAX_CHANNELS", "STEM_MIN_PIXELS", "STEM_PATH_OPS", "stem_input", "stem_shape"]

#: a Conv over at most this many input channels per group that reads a graph input may stay float
STEM_MAX_CHANNELS = 4
#: below this many pixels the constant oracle (``ConstantSpeedOracle``) keeps a stem integer
#: (bundled 16x16 CNN: no measurable gain on AVX2); the measuring oracle times the real size
STEM_MIN_PIXELS = ConstantSpeedOracle().stem_min_pixels
#: the stem stays float only when its integer form runs below ``1 - STEM_MARGIN`` times float speed
STEM_MARGIN = 0.1
#: ops between the model input and a stem that only move or pad samples (their data input is input 0)
STEM_PATH_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Slice", "Pad", "Identity"})
#: at most this many of them
_MAX_PATH = 8


def stem_input(ctx: PlanContext, tensor: str) -> str | None:
    """The model input ``tensor`` is, directly or through at most ``_MAX_PATH`` float ``STEM_PATH_OPS``."""
    for _ in range(_MAX_PATH + 1):
        if tensor in ctx.index.graph_inputs:
            return tensor
        producer = ctx.index.producers.get(tensor)
        if producer is None or producer.op_type not in STEM_PATH_OPS or ctx.is_quantized(tensor):
            return None
        if DATA_INPUTS.get(producer.op_type, (0,)) != (0,) or not producer.input:
            return None
        tensor = producer.input[0]
    return None


def stem_shape(ctx: PlanContext, node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> KernelShape:
    """The stem's kernel shape at batch 1 (image sides 0 when unknown)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    strides = list(attrs.get("strides", [1, 1])) or [1, 1]
    sides = [d if isinstance(d, int) and d > 0 else 0 for d in ctx.index.shapes.get(node.input[0], ())[2:]]
    if len(weight_shape) == 3:  # Conv1d: the 2-D kernel of height 1 that onnxruntime runs
        c_out, c_in, kw = (int(d) for d in weight_shape)
        w = sides[0] if len(sides) == 1 else 0
        return KernelShape(KernelKind.STEM_CONV, (c_in, c_out, 1, kw, 1, 1, w), int(strides[-1]))
    h, w = (sides[0], sides[1]) if len(sides) == 2 else (0, 0)
    c_out, c_in, kh, kw = (int(d) for d in weight_shape)
    return KernelShape(KernelKind.STEM_CONV, (c_in, c_out, kh, kw, int(strides[0]), h, w), int(strides[-1]))


def check_stem(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | str:
    """The slow stem's description with its measured speed, or why it is no stem or not slow here."""
    x, w = node.input[0], node.input[1] if len(node.input) > 1 else ""
    if stem_input(ctx, x) is None or ctx.is_quantized(x) or not ctx.index.is_constant(w) or ctx.in_subgraph:
        return Rejection(SkipCode.NOT_APPLICABLE, "does not read the model input through a constant weight", x)
    shape = ctx.index.constant(w).shape
    if len(shape) not in (3, 4) or shape[1] > STEM_MAX_CHANNELS or int(np.prod(shape[2:])) == 1:
        return Rejection(SkipCode.NOT_APPLICABLE, f"weight of shape {tuple(shape)} is no small-channel stem", w)
    speed = ctx.speed.speed(stem_shape(ctx, node, tuple(shape)))
    if speed is None:
        return Rejection(SkipCode.NOT_APPLICABLE, "stem speed unknown on this host: kept integer", x)
    measured = speed.describe("QLinearConv")
    if not speed.slower(STEM_MARGIN):
        return Rejection(SkipCode.NOT_APPLICABLE, f"{measured}: not slower than float", x)
    kernel = "x".join(str(d) for d in shape[2:])
    return f"a {kernel} Conv over {shape[1]} input channel(s) reading the model input: {measured}"


def apply_stem(ctx: PlanContext, node: onnx.NodeProto, description: str) -> Rejection:
    """Keep the stem float; its readers must read the float tensor."""
    ctx.float_compute.add(node.name)
    return Rejection(SkipCode.SLOW_STEM, description)


STEM: Rule[str] = Rule("stem", frozenset({"Conv"}), check_stem, apply_stem, passes_on=True)
