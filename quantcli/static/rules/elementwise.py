"""Element-wise and pooling units (Add, Mul, Concat, AveragePool, GlobalAveragePool, Sigmoid, LeakyRelu, Softmax).

Quantized when one of their inputs already arrives quantized: the other float inputs get a Q/DQ
(constants an int8 initializer over their own range), the output a Q/DQ with its own range
(Softmax: the fixed range [0, 1]). A unit whose output only reaches graph outputs stays float
(check ``outputs-only``): no integer op reads it, so a QuantizeLinear would only round the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

from quantcli.core.qmath import QuantParams, params_from_range
from quantcli.static.plan import RangeDecision, Rejection, SkipCode, WeightQuant
from quantcli.static.rules._rule import Rule
from quantcli.static.rules.movement import MOVEMENT_OPS

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["ELEMENTWISE", "ELEMENTWISE_OPS", "OUTPUTS_ONLY_CHECK", "only_reaches_outputs"]

ELEMENTWISE_OPS = (
    "Add",
    "Mul",
    "Concat",
    "AveragePool",
    "GlobalAveragePool",
    "Sigmoid",
    "LeakyRelu",
    "Softmax",
)
#: name of the outputs-only check in ``QuantConfig.disabled_rules``
OUTPUTS_ONLY_CHECK = "outputs-only"


@dataclass(frozen=True, slots=True)
class ElementwiseMatch:
    """Parameters of the float activation inputs and positions of the constant inputs to quantize."""

    pending_act: dict[str, QuantParams]
    pending_const: list[tuple[int, str]]


def only_reaches_outputs(ctx: PlanContext, tensor: str) -> bool:
    """True when ``tensor`` is a graph output or flows only through data-movement ops into graph outputs."""
    readers = ctx.index.consumers_of(tensor)
    if not readers:
        return tensor in ctx.index.graph_outputs
    return all(r.op_type in MOVEMENT_OPS and all(only_reaches_outputs(ctx, o) for o in r.output if o) for r in readers)


def _check_inputs(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | ElementwiseMatch:
    inputs = [i for i in node.input if i]
    if node.op_type in ("Add", "Mul") and len(inputs) != 2:
        return Rejection(SkipCode.INPUT_COUNT, "two")
    if not any(ctx.is_quantized(i) for i in inputs):
        return Rejection(SkipCode.INPUT_NOT_QUANTIZED, "no input arrives quantized (nothing to gain)")
    locked = [i for i in inputs if i in ctx.float_locked]
    if locked:
        return Rejection(SkipCode.INPUT_FROM_FLOAT_COMPUTE, tensor=locked[0])
    match = ElementwiseMatch({}, [])
    for pos, name in enumerate(node.input):
        if not name or ctx.is_quantized(name):
            continue
        if ctx.index.is_constant(name) and ctx.index.elem_types.get(name) == onnx.TensorProto.FLOAT:
            match.pending_const.append((pos, name))
        elif ctx.is_float_activation(name):
            params = ctx.act_params(name)
            if params is None:
                return Rejection(SkipCode.NO_INPUT_RANGE, tensor=name)
            match.pending_act[name] = params
        else:
            return Rejection(SkipCode.INPUT_NOT_FLOAT, tensor=name)
    return match


def check_elementwise(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | ElementwiseMatch:
    """The inputs to quantize, or why the unit stays float (a float output records a range decision)."""
    match = _check_inputs(ctx, node)
    if isinstance(match, Rejection):
        return match
    out = node.output[0]
    if ctx.enabled(OUTPUTS_ONLY_CHECK) and only_reaches_outputs(ctx, out):
        r = ctx.ranges.get(out)
        if r is not None:
            decision = (
                f"kept in float with its {node.op_type}: it only reaches graph outputs, so no integer "
                "op reads it and a QuantizeLinear would only round the result (a sigmoid score of "
                "0.004 becomes 0 or 0.0039 on a [0, 1] grid)"
            )
            ctx.range_decisions.append(RangeDecision(out, r.observed_min, r.observed_max, decision))
        return Rejection(SkipCode.OUTPUTS_ONLY, tensor=out)
    return match


def apply_elementwise(ctx: PlanContext, node: onnx.NodeProto, m: ElementwiseMatch) -> Rejection | None:
    """Quantize the pending inputs and the output."""
    if node.op_type == "Softmax":
        out_params: QuantParams | None = params_from_range(0.0, 1.0, ctx.config.activation_type)
    else:
        out_params = ctx.act_params(node.output[0])
    if out_params is None:
        return Rejection(SkipCode.NO_OUTPUT_RANGE, tensor=node.output[0])
    ctx.act.update(m.pending_act)
    for pos, name in m.pending_const:
        ctx.weights.append(WeightQuant(node.name, pos, name, ctx.constant_as_activation(name)))
    ctx.mark_quantized(node)
    if node.op_type == "Softmax":
        ctx.act.setdefault(node.output[0], out_params)
    else:
        ctx.quantize_output(node)
    return None


ELEMENTWISE: Rule[ElementwiseMatch] = Rule(
    "elementwise", frozenset(ELEMENTWISE_OPS), check_elementwise, apply_elementwise
)
