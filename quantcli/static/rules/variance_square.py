"""A square summed for a variance, ``Mul(x, x) -> ReduceSum/ReduceMean``, stays float.

Decomposed LayerNorm and RMSNorm compute ``var = E[x²] - E[x]²`` (or ``E[x²]``) from element-wise
squares. Quantized, the square ``x²`` gets one grid over ``[0, max(x)²]``: every square below half a
step rounds to 0, so the small values that make up most of a normalised row vanish, and the
difference of the two means, two close numbers, loses every digit it had. The reduction and the
rest of the normalisation have no integer kernel (they run float anyway), so the quantized square
saves nothing but a QuantizeLinear: the rule keeps it float.

Measured (magika v3.3, a byte CNN with two decomposed LayerNorms, default convert, 370 held-out
samples): top-1 agreement with FP32 0.816 -> 0.965 with its LayerNorm squares float (SQNR 7.3 ->
16.4 dB). A ``Mul`` of two different tensors, or whose square feeds no reduction, is passed on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from quantcli.static.plan import Rejection, SkipCode
from quantcli.static.rules._rule import Rule
from quantcli.static.rules.movement import MOVEMENT_OPS

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["REDUCTIONS", "VARIANCE_SQUARE", "reduction_reading"]

#: reductions that turn a square into a variance (or a mean square)
REDUCTIONS = frozenset({"ReduceSum", "ReduceMean", "ReduceSumSquare"})
#: data-movement hops followed between the square and its reduction
_MAX_HOPS = 4


def reduction_reading(ctx: PlanContext, tensor: str, hops: int = _MAX_HOPS) -> onnx.NodeProto | None:
    """The reduction reading ``tensor`` directly or through at most ``hops`` data-movement ops (None if none)."""
    for reader in ctx.index.consumers_of(tensor):
        if reader.op_type in REDUCTIONS:
            return reader
        if reader.op_type in MOVEMENT_OPS and hops > 0 and reader.output:
            found = reduction_reading(ctx, reader.output[0], hops - 1)
            if found is not None:
                return found
    return None


def check_variance_square(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | str:
    """The description of a square summed for a variance, or why ``node`` is none."""
    if len(node.input) != 2 or node.input[0] != node.input[1]:
        return Rejection(SkipCode.NOT_APPLICABLE, "not the square of one tensor", node.input[0])
    reduction = reduction_reading(ctx, node.output[0])
    if reduction is None:
        return Rejection(SkipCode.NOT_APPLICABLE, "the square feeds no ReduceSum/ReduceMean", node.output[0])
    x = node.input[0]
    r = ctx.ranges.get(x)
    span = f" (x in [{r.min:.3g}, {r.max:.3g}], so x² on one grid over [0, {max(r.min**2, r.max**2):.3g}])" if r else ""
    return (
        f"squares '{x}' for the {reduction.op_type} of a variance{span}: quantized, the small squares round "
        "to 0 and E[x²] - E[x]² cancels; the reduction runs float anyway"
    )


def apply_variance_square(ctx: PlanContext, node: onnx.NodeProto, description: str) -> Rejection:
    """Keep the square float."""
    return Rejection(SkipCode.VARIANCE_SQUARE, description, node.output[0])


VARIANCE_SQUARE: Rule[str] = Rule(
    "variance-square", frozenset({"Mul"}), check_variance_square, apply_variance_square, passes_on=True
)
