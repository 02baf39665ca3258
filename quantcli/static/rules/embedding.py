"""Embeddings: a Gather on a large constant float table reads an int8 table (weight-only).

The rows are gathered as int8 and multiplied by their row scale after the Gather; a
DequantizeLinear in front of the Gather would dequantize the whole table at every run (measured
350x slower on a 50k x 256 table). Any other Gather is passed on to ``movement``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from quantcli.core.options import QuantDType
from quantcli.core.qmath import QuantizedTensor, quantize_weight
from quantcli.static.plan import EmbeddingQuant, Rejection, SkipCode
from quantcli.static.rules._rule import Rule

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["EMBEDDING", "EMBEDDING_MIN_BYTES"]

#: a Gather on a constant float table at least this large gets an int8 table
EMBEDDING_MIN_BYTES = 1 << 20


def check_embedding(ctx: PlanContext, node: onnx.NodeProto) -> Rejection | str:
    """The table, or why this Gather is no embedding lookup worth an int8 table."""
    table, indices = node.input[0], node.input[1]
    if not ctx.index.is_constant(table) or ctx.index.elem_types.get(table) != onnx.TensorProto.FLOAT:
        return Rejection(SkipCode.NOT_APPLICABLE, "the table is not a float constant", table)
    init = ctx.index.initializers[table]
    size = int(np.prod(init.dims)) * 4 if init.dims else 4
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if len(init.dims) != 2 or axis != 0 or size < EMBEDDING_MIN_BYTES or ctx.is_float_activation(indices):
        return Rejection(SkipCode.NOT_APPLICABLE, "not a row lookup in a large 2-D table", table)
    if sum(1 for n in ctx.index.consumers_of(table) if n.op_type != "Gather") or ctx.index.graph_outputs.count(table):
        # the float table is needed elsewhere: an int8 copy would add, not save
        return Rejection(SkipCode.NOT_APPLICABLE, "the float table has other readers", table)
    return table


def apply_embedding(ctx: PlanContext, node: onnx.NodeProto, table: str) -> None:
    """Symmetric int8 rows, one scale per row (shared by every Gather of the table)."""
    q: QuantizedTensor | None = ctx.weight_cache.get((table, -1))
    if q is None:
        q = quantize_weight(ctx.index.constant(table), QuantDType.INT8, axis=0)
        ctx.weight_cache[(table, -1)] = q
    ctx.embeddings.append(EmbeddingQuant(node.name, table, q))
    ctx.mark_quantized(node, "Gather")


EMBEDDING: Rule[str] = Rule("embedding", frozenset({"Gather"}), check_embedding, apply_embedding, passes_on=True)
