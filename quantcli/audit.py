"""Fusion audit: what onnxruntime actually runs after its graph optimizations.

The model is loaded in an onnxruntime CPU session with every optimization on, the optimized
graph is written to a temporary file and read back, and each node, in the main graph and in
every If/Loop/Scan subgraph (onnxruntime optimizes those too), is classified: an integer
kernel (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm, QLinearAdd, ...), a float compute
node that stayed float, or Q/DQ overhead left in the graph.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from quantcli.errors import UnsupportedModelError
from quantcli.subgraphs import walk_graphs

__all__ = ["INTEGER_KERNELS", "FusionAudit", "audit_fusion"]

#: op types that compute on integers in onnxruntime's CPU provider
INTEGER_KERNELS = frozenset(
    {
        "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearAdd", "QLinearMul",
        "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid",
        "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere", "QLinearReduceMean", "ConvInteger",
        "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits", "QAttention", "DynamicQuantizeLSTM",
        "QLinearConvTranspose", "QEmbedLayerNormalization", "QOrderedMatMul",
    }
)  # fmt: skip
#: float ops whose cost dominates a network; each one left float is worth a line in the report
FLOAT_COMPUTE = frozenset(
    {"Conv", "MatMul", "Gemm", "ConvTranspose", "FusedConv", "FusedMatMul", "FusedGemm", "NchwcConv"}
)
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


@dataclass(frozen=True, slots=True)
class FusionAudit:
    """Op histogram of the optimized graph and its split into integer, float and Q/DQ nodes."""

    op_counts: dict[str, int]
    integer_nodes: tuple[tuple[str, str], ...]
    float_compute_nodes: tuple[tuple[str, str], ...]
    quantize_nodes: int
    dequantize_nodes: int

    @property
    def integer_kernel_count(self) -> int:
        """Number of nodes running an integer kernel."""
        return len(self.integer_nodes)

    def integer_op_counts(self) -> dict[str, int]:
        """Integer kernels per op type."""
        return dict(sorted(Counter(op for _, op in self.integer_nodes).items()))


def _op_name(node: onnx.NodeProto) -> str:
    if node.domain == "com.microsoft.nchwc" and node.op_type == "Conv":
        return "NchwcConv"
    return node.op_type


def audit_fusion(model: onnx.ModelProto | Path, *, level: str = "all") -> FusionAudit:
    """Optimize ``model`` as onnxruntime would at run time and classify the resulting nodes."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[level]
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="quantcli-audit-") as tmp:
        optimized_path = Path(tmp) / "optimized.onnx"
        opts.optimized_model_filepath = str(optimized_path)
        source = str(model) if isinstance(model, Path) else model.SerializeToString()
        try:
            ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedModelError(f"onnxruntime cannot load the model: {first}") from exc
        optimized = onnx.load(str(optimized_path), load_external_data=False)
    nodes = [n for _, g in walk_graphs(optimized.graph) for n in g.node]  # subgraphs of If/Loop/Scan too
    ops = Counter(_op_name(n) for n in nodes)
    integer = tuple((n.name, n.op_type) for n in nodes if n.op_type in INTEGER_KERNELS)
    float_compute = tuple((n.name, _op_name(n)) for n in nodes if _op_name(n) in FLOAT_COMPUTE)
    return FusionAudit(
        op_counts=dict(sorted(ops.items())),
        integer_nodes=integer,
        float_compute_nodes=float_compute,
        quantize_nodes=ops.get("QuantizeLinear", 0),
        dequantize_nodes=ops.get("DequantizeLinear", 0),
    )
