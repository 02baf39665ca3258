"""HardSigmoid/HardSwish of a quantized input: one QLinearAdd with a re-read output (+ a QLinearMul).

``HardSigmoid(x) = clip(alpha * x + beta, 0, 1)`` costs one QLinearAdd (``x + 0``) whose output
QuantizeLinear has scale ``S = 1 / (N * alpha)`` and zero point ``Z = round(N * beta)`` (+ the
type's minimum), ``N = 255``: its integers are then ``q = sat(round(N * (alpha * x + beta)))``, the
hard sigmoid on the grid of scale ``1 / N`` over [0, 1], read back with that scale.
``HardSwish(x) = x * HardSigmoid(x)`` adds a QLinearMul. Left float, onnxruntime would run them
between a DequantizeLinear and a QuantizeLinear, with layout Transposes around the float island.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from quantcli.core.options import QuantDType
from quantcli.core.qmath import QuantParams
from quantcli.static.plan import HardActivation, Rejection, SkipCode
from quantcli.static.rules._rule import Rule

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["HARD", "HARD_OPS"]

HARD_OPS = ("HardSigmoid", "HardSwish")
#: 255 steps over [0, 1] so that saturation gives exactly 0 and 1; a non-integer 255 * beta
#: (127.5 for beta = 0.5) is rounded: the result is off by at most one step (1/255)
_LEVELS = 255


@dataclass(frozen=True, slots=True)
class HardMatch:
    """The parameters of the QuantizeLinear after ``x + 0`` and of the DequantizeLinear reading it back."""

    quantize: QuantParams
    read: QuantParams


def _check_input(ctx: PlanContext, x: str) -> Rejection | None:
    if ctx.in_subgraph:
        return Rejection(SkipCode.IN_SUBGRAPH, "only main-graph hard activations run integer")
    if not ctx.is_quantized(x):
        return Rejection(
            SkipCode.INPUT_NOT_QUANTIZED,
            "input does not arrive quantized (float: onnxruntime fuses it into a float Conv)",
            x,
        )
    if x in ctx.float_locked:
        return Rejection(SkipCode.INPUT_FROM_FLOAT_COMPUTE, tensor=x)
    return None


def check_hard(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | HardMatch:
    """The grid of the hard sigmoid, or why it cannot run integer."""
    rejection = _check_input(ctx, node.input[0])
    if rejection is not None:
        return rejection
    attrs = {a.name: a.f for a in node.attribute}
    alpha = attrs.get("alpha", 1.0 / 6.0 if node.op_type == "HardSwish" else 0.2)
    beta = attrs.get("beta", 0.5)
    if alpha <= 0:
        return Rejection(SkipCode.UNSUPPORTED_PARAMETER, "HardSigmoid with alpha <= 0")
    dtype = ctx.config.activation_type
    qmin = -128 if dtype == QuantDType.INT8 else 0
    if dtype not in (QuantDType.INT8, QuantDType.UINT8):
        return Rejection(SkipCode.UNSUPPORTED_TYPE, "only 8-bit activations have a QLinearAdd kernel")
    zero = int(np.floor(_LEVELS * beta + 0.5)) + qmin
    if not qmin <= zero <= qmin + 255:
        return Rejection(SkipCode.UNSUPPORTED_PARAMETER, f"beta {beta} puts the zero point outside the 8-bit range")
    np_zp = np.int8 if dtype == QuantDType.INT8 else np.uint8
    quantize = QuantParams(np.asarray(1.0 / (_LEVELS * alpha), np.float32), np.asarray(zero, np_zp), dtype, None)
    read = QuantParams(np.asarray(1.0 / _LEVELS, np.float32), np.asarray(qmin, np_zp), dtype, None)
    return HardMatch(quantize, read)


def apply_hard(ctx: PlanContext, node: onnx.NodeProto, m: HardMatch) -> Rejection | None:
    """HardSwish: the output's own range; HardSigmoid: the output is read on the 1/N grid."""
    x, out = node.input[0], node.output[0]
    if node.op_type == "HardSwish":
        params = ctx.act_params(out)
        if params is None:
            return Rejection(SkipCode.NO_OUTPUT_RANGE, tensor=out)
        ctx.act.setdefault(out, params)
    elif out in ctx.index.graph_outputs:
        return Rejection(SkipCode.GRAPH_OUTPUT, tensor=out)
    elif ctx.reads_float_compute(out):
        return Rejection(SkipCode.READ_BY_FLOAT_COMPUTE, tensor=out)
    else:
        ctx.act[out] = m.read
    ctx.hard.append(HardActivation(node.name, node.op_type, x, out, m.quantize, m.read))
    ctx.mark_quantized(node)
    return None


HARD: Rule[HardMatch] = Rule("hard", frozenset(HARD_OPS), check_hard, apply_hard)
