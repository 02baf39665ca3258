"""Mul/Div of a quantized tensor by a positive scalar constant: a new scale, no kernel.

``y = c * s * (q - z)``: the readers of ``y`` get a DequantizeLinear of the same integers with
scale ``c * s`` (``s / c`` for Div), so the node disappears (``Rescale``). Any other Mul is passed
on to ``elementwise``; any other Div stays float (rule ``div``: onnxruntime has no integer Div).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from quantcli.core.qmath import QuantParams
from quantcli.static.plan import Rejection, Rescale, SkipCode
from quantcli.static.rules._rule import Rule

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["DIV", "RESCALE", "RESCALE_OPS"]

#: element-wise ops with no integer kernel that a quantized input still keeps integer (by a new scale)
RESCALE_OPS = ("Div",)


@dataclass(frozen=True, slots=True)
class RescaleMatch:
    """The quantized tensor read and the factor its scale is multiplied by."""

    source: str
    factor: float


def _check_operands(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | tuple[str, str]:
    if len(node.input) != 2:
        return Rejection(SkipCode.INPUT_COUNT, "two")
    if ctx.in_subgraph:
        return Rejection(SkipCode.IN_SUBGRAPH, "only main-graph products and quotients rescale")
    x, c = node.input
    if node.op_type == "Mul" and ctx.index.is_constant(x) and not ctx.index.is_constant(c):
        x, c = c, x
    out = node.output[0]
    if not ctx.is_quantized(x):
        return Rejection(SkipCode.INPUT_NOT_QUANTIZED, "the input does not arrive quantized", x)
    if not ctx.index.is_constant(c) or ctx.index.elem_types.get(c) != onnx.TensorProto.FLOAT:
        return Rejection(SkipCode.UNSUPPORTED_PARAMETER, "the other operand is not a float constant", c)
    if x in ctx.float_locked:
        return Rejection(SkipCode.INPUT_FROM_FLOAT_COMPUTE, tensor=x)
    if out in ctx.index.graph_outputs:
        return Rejection(SkipCode.GRAPH_OUTPUT, tensor=out)
    if x not in ctx.index.producers and x not in ctx.index.graph_inputs:
        return Rejection(SkipCode.NOT_APPLICABLE, "the input is produced outside this graph", x)
    if ctx.reads_float_compute(out):  # a float Conv/MatMul/Gemm must read the float tensor itself
        return Rejection(SkipCode.READ_BY_FLOAT_COMPUTE, tensor=out)
    return x, c


def check_rescale(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | RescaleMatch:
    """The source and factor of a product/quotient by a positive scalar, or why it is not one."""
    operands = _check_operands(ctx, node)
    if isinstance(operands, Rejection):
        return operands
    x, c = operands
    value = ctx.index.constant(c)
    if value.size != 1 or not np.isfinite(value).all() or float(value.reshape(-1)[0]) <= 0:
        return Rejection(SkipCode.UNSUPPORTED_PARAMETER, "the constant is not one finite positive number", c)
    if value.ndim > len(ctx.index.shapes.get(x, ())) and ctx.index.shapes.get(x):
        # a [1,1,...] constant of higher rank would broadcast the output's shape
        return Rejection(SkipCode.UNSUPPORTED_PARAMETER, "the constant has a higher rank than the input", c)
    if ctx.act[x].scale.ndim:
        return Rejection(SkipCode.UNSUPPORTED_PARAMETER, "the input has per-axis scales", x)
    factor = float(value.reshape(-1)[0])
    return RescaleMatch(x, factor if node.op_type == "Mul" else 1.0 / factor)


def apply_rescale(ctx: PlanContext, node: onnx.NodeProto, m: RescaleMatch) -> None:
    """The output reads the source's integers with the scaled scale."""
    src = ctx.act[m.source]
    out = node.output[0]
    ctx.act[out] = QuantParams(
        scale=np.asarray(float(src.scale) * m.factor, dtype=np.float32),
        zero_point=src.zero_point,
        dtype=src.dtype,
        axis=None,
    )
    ctx.rescaled.append(Rescale(node.name, m.source, out))
    ctx.mark_quantized(node)


def check_div(ctx: PlanContext, node: onnx.NodeProto) -> Rejection:
    """Any Div the rescale rule passed on stays float."""
    return Rejection(
        SkipCode.NO_INTEGER_KERNEL,
        f"no integer {node.op_type} kernel in onnxruntime (only a quantized tensor divided by a positive "
        "scalar constant folds into its scale)",
    )


def _never(ctx: PlanContext, node: onnx.NodeProto, match: object) -> None:
    raise AssertionError("check_div always rejects")


RESCALE: Rule[RescaleMatch] = Rule("rescale", frozenset({"Mul", *RESCALE_OPS}), check_rescale, apply_rescale, True)
DIV: Rule[object] = Rule("div", frozenset(RESCALE_OPS), check_div, _never)
