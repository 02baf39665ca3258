"""Image stems: a Conv over 1-4 input channels reading the model input stays float when it is slower as int8.

Such a Conv does little work per pixel, so onnxruntime's QLinearConv (plus the QuantizeLinear of
the model input in front of it) can lose to its float NCHWc kernel (measured, AVX2, 1 thread: 3->16
channels 3x3 at 224x224 784 us int8 vs 382 us float; 3->8 at 48x192 144 us vs 56 us). Whether it
does is a fact of the host: the rule asks the planning's ``SpeedOracle`` (``quantcli.core.host``),
by default a micro-benchmark of the stem's shape on this CPU (``quantcli.verify.kernel_speed``):
the ratio ``t_float / t_int8`` of ``Conv -> QuantizeLinear`` against ``QuantizeLinear ->
QLinearConv``. The stem stays float only when that ratio is below ``1 - STEM_MARGIN``; any other
Conv, and a stem that is not slower, is passed on to ``compute``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from quantcli.core.host import ConstantSpeedOracle, KernelKind, KernelShape
from quantcli.static.plan import Rejection, SkipCode
from quantcli.static.rules._rule import Rule

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["STEM", "STEM_MARGIN", "STEM_MAX_CHANNELS", "STEM_MIN_PIXELS", "stem_shape"]

#: a Conv over at most this many input channels per group that reads a graph input may stay float
STEM_MAX_CHANNELS = 4
#: below this many pixels the constant oracle (``ConstantSpeedOracle``) keeps a stem integer
#: (bundled 16x16 CNN: no measurable gain on AVX2); the measuring oracle times the real size
STEM_MIN_PIXELS = ConstantSpeedOracle().stem_min_pixels
#: the stem stays float only when its integer form runs below ``1 - STEM_MARGIN`` times float speed
STEM_MARGIN = 0.1


def stem_shape(ctx: PlanContext, node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> KernelShape:
    """The stem's kernel shape at batch 1 (image sides 0 when unknown)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    strides = list(attrs.get("strides", [1, 1])) or [1, 1]
    sides = [d if isinstance(d, int) and d > 0 else 0 for d in ctx.index.shapes.get(node.input[0], ())[2:]]
    h, w = (sides[0], sides[1]) if len(sides) == 2 else (0, 0)
    c_out, c_in, kh, kw = (int(d) for d in weight_shape)
    return KernelShape(KernelKind.STEM_CONV, (c_in, c_out, kh, kw, int(strides[0]), h, w), int(strides[-1]))


def check_stem(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | str:
    """The slow stem's description with its measured speed, or why it is no stem or not slow here."""
    x, w = node.input[0], node.input[1] if len(node.input) > 1 else ""
    if x not in ctx.index.graph_inputs or ctx.is_quantized(x) or not ctx.index.is_constant(w) or ctx.in_subgraph:
        return Rejection(SkipCode.NOT_APPLICABLE, "does not read the model input through a constant weight", x)
    shape = ctx.index.constant(w).shape
    if len(shape) != 4 or shape[1] > STEM_MAX_CHANNELS or shape[2] * shape[3] == 1:
        return Rejection(SkipCode.NOT_APPLICABLE, f"weight of shape {tuple(shape)} is no small-channel stem", w)
    speed = ctx.speed.speed(stem_shape(ctx, node, tuple(shape)))
    if speed is None:
        return Rejection(SkipCode.NOT_APPLICABLE, "stem speed unknown on this host: kept integer", x)
    measured = speed.describe("QLinearConv")
    if not speed.slower(STEM_MARGIN):
        return Rejection(SkipCode.NOT_APPLICABLE, f"{measured}: not slower than float", x)
    return f"a {shape[2]}x{shape[3]} Conv over {shape[1]} input channel(s) reading the model input: {measured}"


def apply_stem(ctx: PlanContext, node: onnx.NodeProto, description: str) -> Rejection:
    """Keep the stem float; its readers must read the float tensor."""
    ctx.float_compute.add(node.name)
    return Rejection(SkipCode.SLOW_STEM, description)


STEM: Rule[str] = Rule("stem", frozenset({"Conv"}), check_stem, apply_stem, passes_on=True)
