"""Sigmoid floor: a tensor read only by Sigmoids (and SiLU's Mul) gets a grid that starts where they read 0.

A quantized Sigmoid writes its output on a grid starting at 0 with step ``s`` (``s`` = 1/255 on
[0, 1]), so every ``sigmoid(x) < s / 2`` rounds to 0: every ``x`` below ``L = logit(s / 2)``
(-6.23 for ``s`` = 1/255). Below ``L`` the quantized model reads a Sigmoid of 0 whatever ``x`` is,
and SiLU's ``Mul(x, Sigmoid(x))`` reads ``x * 0 = 0``. So the grid of ``x`` may start at ``L``
instead of the observed minimum: nothing the model computes changes below ``L``, and the steps
above get finer. The Conv outputs in front of a SiLU reach far below ``L`` (ddddocr's YOLOX det:
[-23, 17] and [-31, 16]; their steps drop from 0.16 and 0.19 to 0.09): min-max spent half its grid
on values the SiLU maps to 0. onnxruntime's quantizer keeps the observed minimum too.

The same holds for ``Relu/Clip(x + b, 0, hi)`` below ``-b`` (a HardSwish written out), but floored
there the PaddleOCR models (whose features sit at 6-10 dB SQNR for other reasons) moved the wrong way
on held-out data (ppocrv4_det text-mask IoU 0.547 -> 0.456): that gate is left out.

It runs from ``PlanContext.quantize_output`` (like the Relu/Clip fold), not from the table, and
leaves a ``RangeDecision`` (rule ``sigmoid-floor``) on each tensor it moves. A floor not set where
the pattern matched is recorded as ``Declined``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from quantcli.core.qmath import QuantParams, dtype_bounds
from quantcli.graph.gates import sigmoid_gates
from quantcli.static.plan import RangeDecision, Rejection, SkipCode
from quantcli.static.rules.elementwise import OUTPUTS_ONLY_CHECK, only_reaches_outputs

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["SIGMOID_FLOOR_RULE", "Floor", "check_floor", "floor_params"]

#: name of the rule in ``QuantConfig.disabled_rules``
SIGMOID_FLOOR_RULE = "sigmoid-floor"


@dataclass(frozen=True, slots=True)
class Floor:
    """The lowest value worth a grid step (``lo``) and the Sigmoid that sets it."""

    lo: float
    sigmoid: str


def _lowest(params: QuantParams) -> float:
    qmin, _ = dtype_bounds(params.dtype)
    return float((qmin - int(np.asarray(params.zero_point).reshape(-1)[0])) * float(np.max(params.scale)))


def _sigmoid_zero_below(ctx: PlanContext, sigmoid: onnx.NodeProto) -> Rejection | float:
    """``logit(s / 2)`` of ``sigmoid``'s output grid: below it the quantized Sigmoid writes 0."""
    excluded = ctx.selector.exclusion(sigmoid)
    if excluded is not None or sigmoid.domain not in ("", "ai.onnx") or sigmoid.name in ctx.keep_float:
        return Rejection(SkipCode.NOT_APPLICABLE, "a Sigmoid reading it stays float by the options", sigmoid.name)
    out = sigmoid.output[0]
    if ctx.enabled(OUTPUTS_ONLY_CHECK) and only_reaches_outputs(ctx, out):
        return Rejection(SkipCode.OUTPUTS_ONLY, tensor=out)
    params = ctx.act_params(out)
    if params is None:
        return Rejection(SkipCode.NO_OUTPUT_RANGE, tensor=out)
    half = 0.5 * float(np.max(params.scale))
    if _lowest(params) != 0.0 or not 0.0 < half < 0.5:
        return Rejection(SkipCode.UNSUPPORTED_PARAMETER, "the Sigmoid's grid does not start at 0", out)
    return math.log(half / (1.0 - half))


def check_floor(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | Floor:
    """The floor of ``node``'s output, or why it keeps its observed minimum.

    Every reader must be a Sigmoid of the output or a Mul of the output by such a Sigmoid (SiLU).
    """
    if not ctx.enabled(SIGMOID_FLOOR_RULE):
        return Rejection(SkipCode.RULE_DISABLED, SIGMOID_FLOOR_RULE)
    out = node.output[0]
    readers = ctx.index.consumers_of(out)
    r = ctx.ranges.get(out)
    if r is None or not readers or out in ctx.index.graph_outputs:
        return Rejection(SkipCode.NOT_APPLICABLE, "no range, no readers or a graph output", out)
    sigmoids, other = sigmoid_gates(out, readers)
    if other is not None:
        return Rejection(SkipCode.NOT_APPLICABLE, f"read by {other.op_type} '{other.name}'", out)
    if not sigmoids:
        return Rejection(SkipCode.NOT_APPLICABLE, "no Sigmoid reads it", out)
    floors: list[tuple[float, str]] = []
    for sigmoid in sigmoids:
        lo = _sigmoid_zero_below(ctx, sigmoid)
        if isinstance(lo, Rejection):
            return lo
        floors.append((lo, sigmoid.name))
    lo, name = min(floors)
    if r.min >= lo:
        return Rejection(SkipCode.NOT_APPLICABLE, "the range starts above the floor", out)
    return Floor(lo, name)


def floor_params(ctx: PlanContext, node: onnx.NodeProto) -> QuantParams | None:
    """The parameters of ``node``'s output with its floor, or None (keep the observed minimum).

    The grid's lowest value lands at or below the floor, so that rounding never lifts a value
    below it above ``logit(s / 2)``.
    """
    floor = check_floor(ctx, node)
    if isinstance(floor, Rejection):
        if floor.code != SkipCode.NOT_APPLICABLE:
            ctx.decline(node, SIGMOID_FLOOR_RULE, floor)
        return None
    out = node.output[0]
    params = ctx.act_params(out, clip_min=floor.lo)
    if params is None:
        return None
    if _lowest(params) > floor.lo:
        params = ctx.act_params(out, clip_min=floor.lo - float(np.max(params.scale)))
        if params is None:
            return None
    r = ctx.ranges[out]
    decision = (
        f"grid starts at {_lowest(params):.3g}, not at the minimum: below {floor.lo:.3g} the quantized Sigmoid "
        f"'{floor.sigmoid}' reads 0 (and a SiLU x * Sigmoid(x) is 0), so only the steps above change"
    )
    ctx.range_decisions.append(RangeDecision(out, r.observed_min, r.observed_max, decision, SIGMOID_FLOOR_RULE))
    return params
