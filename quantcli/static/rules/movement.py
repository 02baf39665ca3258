"""Data-movement units (MaxPool, Reshape, Transpose, Flatten, Squeeze, Slice, Gather, Resize, Split, ...).

The output shares the input's scale and zero point, so onnxruntime drops the Q/DQ around the node
and moves int8 data directly. Only worth it when the data input already arrives quantized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from quantcli.core.qmath import QuantParams
from quantcli.static.plan import Rejection, SkipCode
from quantcli.static.rules._rule import Rule

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["DATA_INPUTS", "MOVEMENT", "MOVEMENT_OPS"]

MOVEMENT_OPS = (
    "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
    "Expand", "Tile", "Resize", "Split",
)  # fmt: skip
#: input positions that carry data (others are shapes, axes, indices...)
DATA_INPUTS: dict[str, tuple[int, ...]] = {
    "Gather": (0,), "Reshape": (0,), "Slice": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Expand": (0,),
    "Tile": (0,), "Resize": (0,), "Split": (0,), "MaxPool": (0,), "Transpose": (0,), "Flatten": (0,),
}  # fmt: skip


def check_movement(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | QuantParams:
    """The data input's parameters (shared by the outputs), or why the node stays float."""
    data = node.input[0]
    if not ctx.is_quantized(data):
        return Rejection(SkipCode.INPUT_NOT_QUANTIZED, "input does not arrive quantized (nothing to gain)", data)
    extra = [i for pos, i in enumerate(node.input) if pos not in DATA_INPUTS.get(node.op_type, (0,)) and i]
    if any(ctx.index.elem_types.get(i) == onnx.TensorProto.FLOAT and not ctx.index.is_constant(i) for i in extra):
        return Rejection(SkipCode.NON_DATA_FLOAT_INPUT)
    if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
        return Rejection(SkipCode.UNSUPPORTED_ATTRIBUTE, "MaxPool with indices output")
    return ctx.act[data]


def apply_movement(ctx: PlanContext, node: onnx.NodeProto, params: QuantParams) -> None:
    """Every calibrated output shares the input's parameters."""
    ctx.mark_quantized(node)
    for out in node.output:
        if out and out in ctx.ranges:
            ctx.act.setdefault(out, params)


MOVEMENT: Rule[QuantParams] = Rule("movement", frozenset(MOVEMENT_OPS), check_movement, apply_movement)
