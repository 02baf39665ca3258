"""Image stems: a Conv over 1-4 input channels reading the model input stays float.

onnxruntime's QLinearConv runs such a Conv slower than its float NCHWc kernel (measured, AVX2, 1
thread: 3->16 channels 3x3 at 224x224 784 us int8 vs 382 us float; 3->8 at 48x192 144 us vs 56 us),
and quantizing its input costs a QuantizeLinear on top. Any other Conv is passed on to ``compute``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from quantcli.static.plan import Rejection, SkipCode
from quantcli.static.rules._rule import Rule

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["STEM", "STEM_MAX_CHANNELS", "STEM_MIN_PIXELS"]

#: a Conv over at most this many input channels per group that reads a graph input stays float
STEM_MAX_CHANNELS = 4
#: ... on inputs of at least this many pixels, or of unknown size (bundled 16x16 CNN: no measurable gain)
STEM_MIN_PIXELS = 64 * 64


def check_stem(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | str:
    """The stem's description (``a 3x3 Conv over 3 input channel(s)``), or why it is not a slow stem."""
    x, w = node.input[0], node.input[1] if len(node.input) > 1 else ""
    if x not in ctx.index.graph_inputs or ctx.is_quantized(x) or not ctx.index.is_constant(w) or ctx.in_subgraph:
        return Rejection(SkipCode.NOT_APPLICABLE, "does not read the model input through a constant weight", x)
    shape = ctx.index.constant(w).shape
    if len(shape) != 4 or shape[1] > STEM_MAX_CHANNELS or shape[2] * shape[3] == 1:
        return Rejection(SkipCode.NOT_APPLICABLE, f"weight of shape {tuple(shape)} is no small-channel stem", w)
    dims = [d for d in ctx.index.shapes.get(x, ())[2:] if isinstance(d, int) and d > 0]
    if len(dims) == 2 and dims[0] * dims[1] < STEM_MIN_PIXELS:
        # a small image: the float stem saves about what the extra QuantizeLinear costs
        return Rejection(SkipCode.NOT_APPLICABLE, f"image of {dims[0]}x{dims[1]} pixels is small", x)
    return f"a {shape[2]}x{shape[3]} Conv over {shape[1]} input channel(s)"


def apply_stem(ctx: PlanContext, node: onnx.NodeProto, description: str) -> Rejection:
    """Keep the stem float; its readers must read the float tensor."""
    ctx.float_compute.add(node.name)
    return Rejection(SkipCode.SLOW_STEM, description)


STEM: Rule[str] = Rule("stem", frozenset({"Conv"}), check_stem, apply_stem, passes_on=True)
