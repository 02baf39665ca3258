"""Activation floor: an input only gated activations read starts its grid where they all read 0.

Two gates read 0 below a floor ``L``, whatever ``x`` is:

* a quantized Sigmoid, whose output grid starts at 0 with step ``s`` (1/255 on [0, 1]), rounds every
  ``sigmoid(x) < s / 2`` to 0: ``L = logit(s / 2)`` (-6.23 for ``s`` = 1/255);
* ``Relu(x + b)`` or ``Clip(x + b, 0, hi)`` (a HardSwish written out, ``x * Clip(x + 3, 0, 6) / 6``)
  is 0 for ``x <= -b``: ``L = -b``.

When every reader of ``x`` is such a gate, or a ``Mul`` of ``x`` by a gate's output (SiLU
``x * Sigmoid(x)``, HardSwish), nothing the quantized model computes changes for ``x`` below ``L``:
each gate reads 0 and each ``Mul`` reads ``x * 0``. So the grid of ``x`` may start at ``L`` instead of
the observed minimum, and the steps above get finer. Min-max (quantcli's and onnxruntime's) spent
most of the grid on that dead range: ddddocr's YOLOX det has Conv outputs of [-23, 17] before its
SiLUs (step 0.16 -> 0.09), PicoDet's Conv outputs of [-86, 56] before its HardSwishes (0.56 -> 0.23).

It runs from ``PlanContext.quantize_output`` (like the Relu/Clip fold), not from the table, and
leaves a ``RangeDecision`` (rule ``activation-floor``) on each tensor it moves. A floor not set where
every reader is a gate is recorded as ``Declined``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from quantcli.core.qmath import QuantParams, dtype_bounds
from quantcli.static.plan import RangeDecision, Rejection, SkipCode
from quantcli.static.rules.elementwise import OUTPUTS_ONLY_CHECK, only_reaches_outputs

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["ACTIVATION_FLOOR_RULE", "Floor", "check_floor", "floor_params"]

#: name of the rule in ``QuantConfig.disabled_rules``
ACTIVATION_FLOOR_RULE = "activation-floor"


@dataclass(frozen=True, slots=True)
class Floor:
    """The lowest value worth a grid step (``lo``) and the gate that sets it."""

    lo: float
    gate: str


def _lowest(params: QuantParams) -> float:
    qmin, _ = dtype_bounds(params.dtype)
    return float((qmin - int(np.asarray(params.zero_point).reshape(-1)[0])) * float(np.max(params.scale)))


def _sigmoid_floor(ctx: PlanContext, sigmoid: onnx.NodeProto) -> Rejection | float:
    """``logit(s / 2)`` of ``sigmoid``'s output grid: below it the quantized Sigmoid writes 0."""
    if ctx.selector.exclusion(sigmoid) is not None or sigmoid.domain not in ("", "ai.onnx"):
        return Rejection(SkipCode.NOT_APPLICABLE, "a Sigmoid reading it stays float by the options", sigmoid.name)
    if sigmoid.name in ctx.keep_float:
        return Rejection(SkipCode.NOT_APPLICABLE, "a Sigmoid reading it stays float", sigmoid.name)
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


def _clip_min(ctx: PlanContext, clip: onnx.NodeProto) -> float | None:
    """The constant minimum of a Relu (0) or Clip, None when it has none."""
    if clip.op_type == "Relu":
        return 0.0
    for attr in clip.attribute:  # opset < 11
        if attr.name == "min":
            return float(attr.f)
    if len(clip.input) > 1 and clip.input[1] and ctx.index.is_constant(clip.input[1]):
        return float(ctx.index.constant(clip.input[1]).reshape(-1)[0])
    return None


def _shift_gate(ctx: PlanContext, add: onnx.NodeProto, x: str) -> tuple[str, float] | None:
    """``Add(x, b) -> Relu/Clip(0, hi)``: the gate's output and ``-max(b)``, or None."""
    other = [i for i in add.input if i != x]
    if len(add.input) != 2 or len(other) != 1 or not ctx.index.is_constant(other[0]):
        return None
    shift = ctx.index.constant(other[0])
    readers = ctx.index.consumers_of(add.output[0])
    if shift.size == 0 or len(readers) != 1 or add.output[0] in ctx.index.graph_outputs:
        return None
    clip = readers[0]
    if clip.op_type not in ("Relu", "Clip") or _clip_min(ctx, clip) != 0.0:
        return None
    return clip.output[0], -float(np.max(shift))


def check_floor(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | Floor:
    """The floor of ``node``'s output, or why it keeps its observed minimum.

    Every reader must be a gate of the output (Sigmoid, ``Add(x, b) -> Relu/Clip(0, hi)``) or a
    Mul of the output by a gate's output.
    """
    if not ctx.enabled(ACTIVATION_FLOOR_RULE):
        return Rejection(SkipCode.RULE_DISABLED, ACTIVATION_FLOOR_RULE)
    out = node.output[0]
    readers = ctx.index.consumers_of(out)
    r = ctx.ranges.get(out)
    if r is None or not readers or out in ctx.index.graph_outputs:
        return Rejection(SkipCode.NOT_APPLICABLE, "no range, no readers or a graph output", out)
    floors: dict[str, tuple[float, str]] = {}  # gate output -> (floor, gate name)
    muls: list[onnx.NodeProto] = []
    for reader in readers:
        if reader.op_type == "Sigmoid" and list(reader.input) == [out]:
            lo = _sigmoid_floor(ctx, reader)
            if isinstance(lo, Rejection):
                return lo
            floors[reader.output[0]] = (lo, reader.name)
        elif reader.op_type == "Add" and (shift := _shift_gate(ctx, reader, out)) is not None:
            floors[shift[0]] = (shift[1], reader.name)
        elif reader.op_type == "Mul" and len(reader.input) == 2 and out in reader.input:
            muls.append(reader)
        else:
            return Rejection(SkipCode.NOT_APPLICABLE, f"read by {reader.op_type} '{reader.name}'", out)
    if not floors:
        return Rejection(SkipCode.NOT_APPLICABLE, "no gate reads it", out)
    for mul in muls:
        gate = [i for i in mul.input if i != out]
        if len(gate) != 1 or gate[0] not in floors:  # x * x, or x times something else
            return Rejection(SkipCode.NOT_APPLICABLE, f"Mul '{mul.name}' reads no gate of it", out)
    lo, name = min(floors.values())
    if r.min >= lo:
        return Rejection(SkipCode.NOT_APPLICABLE, "the range starts above the floor", out)
    return Floor(lo, name)


def floor_params(ctx: PlanContext, node: onnx.NodeProto) -> QuantParams | None:
    """The parameters of ``node``'s output with its floor, or None (keep the observed minimum).

    The grid's lowest value lands at or below the floor, so that rounding never lifts a value
    below it above the floor.
    """
    floor = check_floor(ctx, node)
    if isinstance(floor, Rejection):
        if floor.code != SkipCode.NOT_APPLICABLE:
            ctx.decline(node, ACTIVATION_FLOOR_RULE, floor)
        return None
    out = node.output[0]
    params = ctx.act_params(out, clip_min=floor.lo)
    if params is not None and _lowest(params) > floor.lo:
        params = ctx.act_params(out, clip_min=floor.lo - float(np.max(params.scale)))
    if params is None:
        return None
    r = ctx.ranges[out]
    decision = (
        f"grid starts at {_lowest(params):.3g}, not at the minimum: below {floor.lo:.3g} its gate '{floor.gate}' "
        "reads 0 (a Sigmoid's grid, or Relu/Clip of x + b), and so does x * gate, so only the steps above change"
    )
    ctx.range_decisions.append(RangeDecision(out, r.observed_min, r.observed_max, decision, ACTIVATION_FLOOR_RULE))
    return params
