"""Relu/Clip folding: a Relu or Clip that is the only reader of a quantized output is removed.

The output range then starts at the clip minimum (0 for Relu) and ends at the clip maximum, so the
producer's QuantizeLinear saturates exactly where the Relu/Clip would have clipped:
``clip(x, lo, hi) = dequantize(quantize(x))`` on the grid of ``[lo, hi]`` when ``lo <= 0``.
It runs from ``PlanContext.quantize_output`` (compute and element-wise rules), not from the table.
A fold not made is recorded as ``Declined`` (rule ``fold``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from quantcli.core.qmath import QuantParams, dtype_bounds
from quantcli.core.selection import ExclusionKind
from quantcli.static.plan import FoldedActivation, Rejection, SkipCode

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["FOLDABLE_OPS", "FOLD_RULE", "Fold", "check_fold", "fold_output"]

FOLDABLE_OPS = ("Relu", "Clip")
#: name of the fold in ``QuantConfig.disabled_rules`` (``QuantConfig.fold_relu`` = False does the same)
FOLD_RULE = "fold"


@dataclass(frozen=True, slots=True)
class Fold:
    """The Relu/Clip ``node`` reading the producer's output, and its clip bounds."""

    node: onnx.NodeProto
    lo: float
    hi: float | None


def check_fold(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | Fold:
    """The Relu/Clip that may fold into ``node``'s output, or why none may."""
    if not ctx.config.fold_relu or not ctx.enabled(FOLD_RULE):
        return Rejection(SkipCode.RULE_DISABLED, FOLD_RULE)
    out = node.output[0]
    readers = ctx.index.consumers_of(out)
    if len(readers) != 1 or out in ctx.index.graph_outputs:
        return Rejection(SkipCode.NOT_APPLICABLE, "the output has other readers or is a graph output", out)
    relu = readers[0]
    if relu.op_type not in FOLDABLE_OPS:
        return Rejection(SkipCode.NOT_APPLICABLE, "the only reader is not a Relu/Clip", out)
    if relu.output[0] in ctx.index.graph_outputs:
        return Rejection(SkipCode.GRAPH_OUTPUT, tensor=relu.output[0])
    if relu.domain not in ("", "ai.onnx"):
        return Rejection(SkipCode.CUSTOM_DOMAIN, relu.domain)
    excluded = ctx.selector.explicit_exclusion(relu)
    if excluded is not None:
        code = SkipCode.OP_TYPE_EXCLUDED if excluded.kind == ExclusionKind.OP_TYPE_EXCLUDED else SkipCode.NODE_EXCLUDED
        return Rejection(code, excluded.matched)
    if ctx.reads_float_compute(relu.output[0]):
        # a float Conv/MatMul/Gemm reads the clipped float tensor: keep the Relu
        return Rejection(SkipCode.READ_BY_FLOAT_COMPUTE, tensor=relu.output[0])
    if relu.op_type == "Relu":
        return Fold(relu, 0.0, None)
    lo_hi = _clip_bounds(ctx, relu)
    if lo_hi is None:
        return Rejection(SkipCode.UNSUPPORTED_PARAMETER, "Clip bounds are not constants")
    lo, hi = lo_hi
    if lo is None or lo > 0:  # the grid must contain 0 and start at the clip minimum
        return Rejection(SkipCode.UNSUPPORTED_PARAMETER, "Clip minimum is missing or above 0")
    return Fold(relu, lo, hi)


def fold_output(ctx: PlanContext, node: onnx.NodeProto) -> bool:
    """Fold the lone Relu/Clip reader of ``node``'s output when it may; True when folded."""
    fold = check_fold(ctx, node)
    if isinstance(fold, Rejection):
        if fold.code != SkipCode.NOT_APPLICABLE:
            ctx.decline(node, FOLD_RULE, fold)
        return False
    params = ctx.act_params(fold.node.output[0], clip_min=fold.lo, clip_max=fold.hi)
    if params is None:
        return False
    if not _grid_clips_at(params, fold.lo):
        # symmetric activations centre the grid on 0: values below the clip minimum survive quantization
        why = Rejection(SkipCode.UNSUPPORTED_PARAMETER, "the activation grid does not start at the clip minimum")
        ctx.decline(node, FOLD_RULE, why)
        return False
    ctx.folded.append(FoldedActivation(fold.node.name, node.name, node.output[0], fold.node.output[0]))
    ctx.folded_names.add(fold.node.name)
    ctx.act[fold.node.output[0]] = params
    return True


def _grid_clips_at(params: QuantParams, lo: float) -> bool:
    """True when the lowest value of the grid is the clip minimum (within half a step): quantizing clips there."""
    qmin, _ = dtype_bounds(params.dtype)
    scale = float(np.max(params.scale))
    lowest = float(np.min((qmin - params.zero_point.astype(np.float64)) * params.scale))
    return lowest >= lo - 0.5 * scale


def _clip_bounds(ctx: PlanContext, clip: onnx.NodeProto) -> tuple[float | None, float | None] | None:
    lo: float | None = None
    hi: float | None = None
    for attr in clip.attribute:  # opset < 11
        if attr.name == "min":
            lo = attr.f
        if attr.name == "max":
            hi = attr.f
    for pos, name in enumerate(clip.input[1:3], start=1):
        if not name:
            continue
        if not ctx.index.is_constant(name):
            return None
        value = float(ctx.index.constant(name).reshape(-1)[0])
        if pos == 1:
            lo = value
        else:
            hi = value
    return lo, hi
