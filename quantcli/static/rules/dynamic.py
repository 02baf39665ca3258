"""MatMul/Gemm with run-time activation quantization inside a static plan, and the check that allows it.

A node marked dynamic keeps its float input in the static plan (its neighbours see it like a float
Conv/MatMul/Gemm, so no Q/DQ is placed for it) and is rewritten afterwards the way ``--mode dynamic``
rewrites a MatMul (``quantcli.modes.dynamic``), for ``Y = A @ W`` with a constant W [K, N]:

    a_q, s_a, z_a = DynamicQuantizeLinear(A)                     (uint8, range of this run's A)
    Y = float(MatMulInteger(a_q, W_q, z_a, z_w)) * (s_a * s_w)  [+ bias]

which onnxruntime's CPU provider fuses into DynamicQuantizeMatMul (or MatMulIntegerToFloat). The
activation's range is measured on every run, so no calibrated range can be wrong for it: the cost is
one pass over A per run to find its min and max. Gemm is the same with alpha folded into W and
beta * C into the bias, which needs ``transA = 0`` and a constant per-column C.

Nodes become dynamic in two ways: ``QuantConfig.dynamic_nodes`` patterns and ``make_plan``'s exact
``dynamic_nodes`` names (marked before any node is planned), or a planning rule that calls
``PlanContext.mark_dynamic`` on the node it is planning and returns the rejection it gets back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from quantcli.static.plan import Rejection, SkipCode

if TYPE_CHECKING:
    from quantcli.graph.index import GraphIndex

__all__ = ["DYNAMIC_DETAIL", "DYNAMIC_OPS", "dynamic_problem", "dynamic_rejection"]

#: op types that can take run-time activation quantization inside a static plan
DYNAMIC_OPS = frozenset({"MatMul", "Gemm"})
#: the detail of the decision line (``SkipCode.RUNTIME_ACTIVATION``)
DYNAMIC_DETAIL = "DynamicQuantizeLinear -> MatMulInteger, int8 weights"


def _gemm_problem(index: GraphIndex, node: onnx.NodeProto, w: np.ndarray) -> str | None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0):
        return "transA=1"
    if len(node.input) > 2 and node.input[2]:
        n = w.shape[0] if attrs.get("transB", 0) else w.shape[1]
        if not index.is_constant(node.input[2]):
            return "C is not a constant"
        c = index.constant(node.input[2])
        if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
            return "C is not a per-column bias"
        if n == 1:
            return "a single output column"
    return None


def dynamic_problem(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    """Why ``node`` cannot run with run-time activation quantization, or None (mirrors ``--mode dynamic``'s check)."""
    if node.op_type not in DYNAMIC_OPS:
        return f"{node.op_type} has no run-time quantized kernel (MatMul and Gemm only)"
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain '{node.domain}'"
    if len(node.input) < 2 or not index.is_constant(node.input[1]):
        return "B is not a constant (activation x activation)"
    w = index.constant(node.input[1])
    if w.dtype != np.float32:
        return "B is not float32"
    if w.ndim != 2:
        return f"B has rank {w.ndim}, not 2"
    if not np.isfinite(w).all():
        return "B holds NaN/inf"
    if node.input[0] in index.shapes and len(index.shapes[node.input[0]]) < 2:
        return "input has rank < 2"
    return _gemm_problem(index, node, w) if node.op_type == "Gemm" else None


def dynamic_rejection() -> Rejection:
    """The decision line of a node run with run-time activation quantization."""
    return Rejection(SkipCode.RUNTIME_ACTIVATION, DYNAMIC_DETAIL)
