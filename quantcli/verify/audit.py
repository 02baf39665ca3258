"""Fusion audit: what onnxruntime actually runs after its graph optimizations, and why.

The model is loaded in an onnxruntime CPU session with every optimization on, the optimized
graph is written to a temporary file and read back, and each node, in the main graph and in
every If/Loop/Scan subgraph (onnxruntime optimizes those too), is classified: an integer
kernel (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm, QLinearAdd, ...), a float compute
node that stayed float, or Q/DQ overhead left in the graph.

Each Conv/ConvTranspose/MatMul/Gemm of the model *as given* (before onnxruntime's optimizations)
then gets a verdict, a ``NodeAudit``: whether its work ended in an integer kernel and, if not, the
first reason found, checked in the order of onnxruntime's QDQ selectors
(``onnxruntime/core/optimizer/qdq_transformer/selectors_actions/qdq_selectors.cc``):

1. the quantization plan left it float (``convert`` passes the plan's skips: their reason, and their
   code, by which ``FusionAudit.float_groups`` groups the report's table);
2. no QDQ fusion exists for the op on the CPU provider (ConvTranspose, ...);
3. an activation input does not come from a DequantizeLinear;
4. types: 16-bit or 4-bit activations/weights, a non-int32 bias, or input and output types that
   differ (on ARM also int8 activations with uint8 weights; on x86 onnxruntime first turns int8
   activations into uint8, so that mix fuses);
5. the output: Conv needs every reader to be a QuantizeLinear (MatMul/Gemm may have only float
   readers: MatMulIntegerToFloat, QGemm with float output), no graph output, and a Relu/Clip in
   between must be made redundant by the QuantizeLinear's range;
6. Gemm with a bias needs beta = 1.

A node matches an optimized node by name (onnxruntime keeps it or appends ``_token_<n>``) or by its
weight initializer, which the fused kernel reads directly. The verdict comes from the optimized
graph; the reasons only explain it, and say so when none of the rules applies.
"""

from __future__ import annotations

import platform
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from quantcli.core.errors import UnsupportedModelError
from quantcli.graph.index import GraphIndex
from quantcli.graph.scopes import walk_graphs
from quantcli.graph.session import ort_model_bytes
from quantcli.static.plan import Skip, SkipCode
from quantcli.verify.macs import compute_macs, node_operands

__all__ = [
    "AUDITED_OPS",
    "INTEGER_KERNELS",
    "FusionAudit",
    "NodeAudit",
    "audit_fusion",
    "explain_float",
]

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
#: op types of the model as given that get a per-node verdict (float ones and already-integer ones)
AUDITED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"}) | (
    INTEGER_KERNELS & {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                       "DynamicQuantizeMatMul", "QGemm"}
)  # fmt: skip
#: ops with a QDQ fusion on the CPU provider (qdq_selector_action_transformer.cc: ConvQDQRules, ...)
_FUSABLE = ("Conv", "MatMul", "Gemm")
_INPUT_ROLES = {"Conv": ("input", "weight", "bias"), "MatMul": ("A", "B"), "Gemm": ("A", "B", "C")}
_T = onnx.TensorProto
_SIXTEEN_BIT = {_T.INT16, _T.UINT16}
_FOUR_BIT = {_T.INT4, _T.UINT4}
_QRANGE: dict[int, tuple[int, int]] = {
    _T.UINT8: (0, 255), _T.INT8: (-128, 127), _T.UINT16: (0, 65535), _T.INT16: (-32768, 32767)
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class NodeAudit:
    """Verdict for one compute node of the model as given.

    Attributes:
        name: node name (``<op:output>`` for unnamed nodes).
        op_type: op type before optimization.
        integer: True if its work runs in an integer kernel.
        kernel: op type that runs it after optimization (e.g. ``QLinearConv``, ``FusedConv``, ``NchwcConv``).
        reason: why it stayed float ("" when integer).
        macs: multiply-accumulates per sample, None when shapes are unknown.
        code: the plan's reason code when the plan left it float (``Skip.code``), else None (the
            reason then comes from the audit's own checks of the optimized graph).
    """

    name: str
    op_type: str
    integer: bool
    kernel: str
    reason: str
    macs: int | None
    code: SkipCode | None = None

    @property
    def reason_kind(self) -> str:
        """The reason with quoted tensor and node names elided (the label of its group)."""
        return re.sub(r"it has \d+$", "it has more", re.sub(r"'[^']*'", "'…'", self.reason))

    @property
    def group(self) -> str:
        """What float nodes are grouped by: the plan's reason code, else the elided reason."""
        return f"plan:{self.code}" if self.code is not None else self.reason_kind

    @property
    def status(self) -> str:
        """``integer kernel`` or ``float, because <reason>``."""
        return "integer kernel" if self.integer else f"float, because {self.reason}"


@dataclass(frozen=True, slots=True)
class FusionAudit:
    """Op histogram of the optimized graph, its split into integer, float and Q/DQ nodes, and per-node verdicts."""

    op_counts: dict[str, int]
    integer_nodes: tuple[tuple[str, str], ...]
    float_compute_nodes: tuple[tuple[str, str], ...]
    quantize_nodes: int
    dequantize_nodes: int
    nodes: tuple[NodeAudit, ...] = ()

    @property
    def integer_kernel_count(self) -> int:
        """Number of nodes running an integer kernel."""
        return len(self.integer_nodes)

    def integer_op_counts(self) -> dict[str, int]:
        """Integer kernels per op type."""
        return dict(sorted(Counter(op for _, op in self.integer_nodes).items()))

    def float_nodes(self) -> tuple[NodeAudit, ...]:
        """Compute nodes of the model as given that run in float."""
        return tuple(n for n in self.nodes if not n.integer)

    def float_groups(self) -> dict[str, tuple[str, list[NodeAudit]]]:
        """Float nodes grouped by ``NodeAudit.group``: key -> (label, nodes), in model order.

        Nodes the plan left float group by reason code, whatever names their sentences quote; the
        label is the first node's ``reason_kind``.
        """
        groups: dict[str, tuple[str, list[NodeAudit]]] = {}
        for n in self.float_nodes():
            groups.setdefault(n.group, (n.reason_kind, []))[1].append(n)
        return groups

    def macs(self, *, integer: bool | None = None, eligible: bool = False) -> int:
        """Sum of known MACs per sample; ``integer`` filters by verdict; ``eligible`` drops ops with no kernel."""
        return sum(
            n.macs
            for n in self.nodes
            if n.macs is not None
            and (integer is None or n.integer == integer)
            and not (eligible and not n.integer and n.op_type not in _FUSABLE)
        )

    def integer_mac_share(self, *, eligible: bool = False) -> float | None:
        """Fraction of compute MACs (of nodes with known shapes) that run in integer kernels.

        With ``eligible``, only ops onnxruntime can run in integer are counted (ConvTranspose is not).
        """
        total = self.macs(eligible=eligible)
        return self.macs(integer=True, eligible=eligible) / total if total else None

    @property
    def unknown_mac_nodes(self) -> int:
        """Compute nodes whose MACs are unknown (dynamic shapes and no sample)."""
        return sum(1 for n in self.nodes if n.macs is None)


def _op_name(node: onnx.NodeProto) -> str:
    if node.domain == "com.microsoft.nchwc" and node.op_type == "Conv":
        return "NchwcConv"
    return node.op_type


def _display_name(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type}:{node.output[0] if node.output else '?'}>"


def _optimize(model: onnx.ModelProto | Path, level: str) -> onnx.ModelProto:
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
        # its weights beside it, never read back: the audit reads the optimized graph, values come from ``model``
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        source = str(model) if isinstance(model, Path) else ort_model_bytes(model, opts)
        try:
            ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedModelError(f"onnxruntime cannot load the model: {first}") from exc
        return onnx.load(str(optimized_path), load_external_data=False)


def _int8_allowed() -> bool:
    """onnxruntime fuses int8 activations as such only on ARM (QDQIsInt8Allowed)."""
    return platform.machine().lower() in ("arm64", "aarch64") or platform.machine().lower().startswith("arm")


def _dq_source(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    producer = index.producers.get(tensor)
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None


def _int_type(index: GraphIndex, node: onnx.NodeProto) -> int:
    """Integer type on the quantized side of a QuantizeLinear/DequantizeLinear (its zero point's; uint8 if none)."""
    quantized = node.output[0] if node.op_type == "QuantizeLinear" else node.input[0]
    if quantized in index.elem_types:
        return index.elem_types[quantized]
    zero_point = node.input[2] if len(node.input) > 2 else ""
    return index.elem_types.get(zero_point, _T.UINT8) if zero_point else _T.UINT8


def _is_constant(index: GraphIndex, name: str) -> bool:
    """An initializer or a Constant node's output (onnxruntime turns those into initializers at load)."""
    producer = index.producers.get(name)
    return index.is_constant(name) or (producer is not None and producer.op_type == "Constant")


def _int8_message(tensor: str, readers: int) -> str:
    return (
        f"int8 activation '{tensor}' stays int8, which x86 kernels lack: onnxruntime converts an int8 "
        f"QuantizeLinear/DequantizeLinear pair to uint8 only if it has a single reader, and it has {readers}"
    )


def _int8_kept(index: GraphIndex, dq: onnx.NodeProto) -> str:
    """Why an int8 activation DequantizeLinear stays int8 on x86 ("" if onnxruntime converts it to uint8).

    QDQS8ToU8Transformer converts a Q->DQ pair only when the Q has a single output edge; a DQ with
    several readers is first duplicated (EnsureUniqueDQForNodeUnit), so its Q then has several.
    """
    if _int_type(index, dq) != _T.INT8:
        return ""
    q = index.producers.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return ""
    dq_nodes = index.consumers_of(q.output[0])
    readers = [r for d in dq_nodes for r in index.consumers_of(d.output[0])]
    if len(dq_nodes) == 1 and len(readers) == 1:
        return ""
    return _int8_message(q.input[0], len(readers))


def _type_name(elem_type: int | None) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "unknown"


def _scalar(index: GraphIndex, name: str) -> float | None:
    if name and index.is_constant(name):
        value = index.constant(name)
        if value.size == 1:
            return float(value.reshape(-1)[0])
    return None


def _clip_redundant(index: GraphIndex, clip: onnx.NodeProto, q: onnx.NodeProto) -> bool:
    """True if the QuantizeLinear's representable range lies inside the Relu/Clip bounds."""
    scale = _scalar(index, q.input[1])
    zp_name = q.input[2] if len(q.input) > 2 else ""
    zp = _scalar(index, zp_name) if zp_name else 0.0
    qtype = index.elem_types.get(zp_name, _T.UINT8) if zp_name else _T.UINT8
    if scale is None or zp is None or qtype not in _QRANGE:
        return False
    qmin, qmax = _QRANGE[qtype]
    low, high = (qmin - zp) * scale, (qmax - zp) * scale
    if clip.op_type == "Relu":
        return low >= -1e-6 * abs(scale)
    lo = _scalar(index, clip.input[1]) if len(clip.input) > 1 and clip.input[1] else None
    hi = _scalar(index, clip.input[2]) if len(clip.input) > 2 and clip.input[2] else None
    for attr in clip.attribute:
        lo = attr.f if attr.name == "min" else lo
        hi = attr.f if attr.name == "max" else hi
    tol = 1e-6 * abs(scale) + 1e-9
    return (lo is None or low >= lo - tol) and (hi is None or high <= hi + tol)


def explain_float(index: GraphIndex, node: onnx.NodeProto, *, int8_allowed: bool | None = None) -> str:
    """The first onnxruntime QDQ-selector condition ``node`` (a Conv/MatMul/Gemm/...) fails, in words."""
    op = node.op_type
    if op not in _FUSABLE:
        return f"no integer kernel: onnxruntime's CPU provider has no QDQ fusion for {op}"
    int8_ok = _int8_allowed() if int8_allowed is None else int8_allowed
    roles = _INPUT_ROLES[op]
    inputs = [(roles[i], name) for i, name in enumerate(node.input[: len(roles)]) if name]
    dqs = {name: _dq_source(index, name) for _, name in inputs}
    if not any(dqs.values()):
        return "not quantized: no DequantizeLinear on its inputs"
    for role, name in inputs:
        # a float constant weight or bias is quantized by onnxruntime itself (WeightBiasQuantization)
        if dqs[name] is None and not _is_constant(index, name):
            return f"{role} '{name}' is float (not from a DequantizeLinear)"
    types = {role: _int_type(index, dq) for role, name in inputs if (dq := dqs[name]) is not None}
    x_type, w_type = types.get(roles[0]), types.get(roles[1])
    for role in roles[:2]:
        t = types.get(role)
        if t in _SIXTEEN_BIT or t in _FOUR_BIT:
            return f"{_type_name(t)} {role}: no {'16' if t in _SIXTEEN_BIT else '4'}-bit integer {op} kernel"
    if len(roles) == 3 and roles[2] in types and types[roles[2]] != _T.INT32:
        return f"{roles[2]} is dequantized from {_type_name(types[roles[2]])}; the fused kernel needs int32"
    if int8_ok and x_type == _T.INT8 and w_type is not None and w_type != _T.INT8:
        return f"type mismatch: int8 activations need int8 weights, got {_type_name(w_type)}"
    if not int8_ok:
        activations = [
            (name, dq) for _, name in inputs if (dq := dqs[name]) is not None and not _is_constant(index, name)
        ]
        for _, dq in activations[: 2 if op == "MatMul" else 1]:
            stuck = _int8_kept(index, dq)
            if stuck:
                return stuck
    out = node.output[0]
    readers = index.consumers_of(out)
    clip = None
    if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip") and out not in index.graph_outputs:
        after = readers[0].output[0]
        if len(index.consumers_of(after)) == 1 and after not in index.graph_outputs:
            clip = readers[0]
    tail = clip.output[0] if clip is not None else out
    tail_readers = index.consumers_of(tail)
    qs = [r for r in tail_readers if r.op_type == "QuantizeLinear"]
    floats = [r for r in tail_readers if r.op_type != "QuantizeLinear"]
    if clip is not None and qs and not _clip_redundant(index, clip, qs[0]):
        return (
            f"{clip.op_type} '{clip.name}' after it is not absorbed: the QuantizeLinear range "
            "does not start at the clip minimum"
        )
    if qs and not int8_ok and _int_type(index, qs[0]) == _T.INT8:
        readers = [r for dq in index.consumers_of(qs[0].output[0]) for r in [dq, *index.consumers_of(dq.output[0])]]
        dq_readers = [r for r in readers if r.op_type != "DequantizeLinear"]
        if len(index.consumers_of(qs[0].output[0])) != 1 or len(dq_readers) != 1:
            return _int8_message(tail, len(dq_readers))
    if qs and floats:
        names = ", ".join(f"'{r.name}' ({r.op_type})" for r in floats[:3])
        return f"output is read by a QuantizeLinear and by float node(s) {names}"
    if qs and tail in index.graph_outputs:
        return "output is also a graph output"
    if not qs and op == "Conv":
        if tail in index.graph_outputs and not floats:
            return "output is a graph output without QuantizeLinear (QLinearConv needs a quantized output)"
        names = ", ".join(f"'{r.name}' ({r.op_type})" for r in floats[:3])
        return f"output is not followed by a QuantizeLinear (float consumer {names})"
    if qs:
        y_type = _int_type(index, qs[0])
        if y_type is not None and x_type is not None and y_type != x_type:
            return f"type mismatch: {_type_name(x_type)} input but {_type_name(y_type)} output"
    if op == "Gemm" and len(inputs) == 3:
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        if beta != 1.0:
            return f"Gemm with a bias and beta={beta:g} (QGemm needs beta=1)"
    return "onnxruntime did not fuse it, and no known selector condition explains why"


def _node_verdicts(
    model: onnx.ModelProto,
    optimized: onnx.ModelProto,
    *,
    skipped: Mapping[str, Skip | str],
    feed: Mapping[str, np.ndarray] | None,
) -> tuple[NodeAudit, ...]:
    index = GraphIndex.build(model.graph)
    opt_nodes = list(optimized.graph.node)
    integer_names = [n.name for n in opt_nodes if n.op_type in INTEGER_KERNELS]
    integer_reads = Counter(name for n in opt_nodes if n.op_type in INTEGER_KERNELS for name in n.input)
    by_name = {n.name: _op_name(n) for n in opt_nodes}
    reads: dict[str, list[str]] = {}
    for n in opt_nodes:
        for name in n.input:
            reads.setdefault(name, []).append(_op_name(n))
    # weight initializers (behind their DequantizeLinear) read by exactly one audited node
    weight_of: dict[int, str] = {}
    for i, node in enumerate(model.graph.node):
        operands = node_operands(node)
        if node.op_type in AUDITED_OPS and operands is not None:
            dq = _dq_source(index, operands[1])
            source = dq.input[0] if dq is not None else operands[1]
            if index.is_constant(source):
                weight_of[i] = source
    weight_users = Counter(weight_of.values())
    macs = compute_macs(model, feed=feed)
    verdicts = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in AUDITED_OPS:
            continue
        name = _display_name(node)
        weight = weight_of.get(i)
        unique_weight = weight if weight is not None and weight_users[weight] == 1 else None
        if node.op_type in INTEGER_KERNELS:
            integer, kernel = True, node.op_type
        else:
            kernel = ""
            if node.name:
                kernel = next(
                    (by_name[n] for n in integer_names if n == node.name or n.startswith(node.name + "_token_")), ""
                )
            if not kernel and unique_weight is not None and integer_reads[unique_weight]:
                kernel = next(n.op_type for n in opt_nodes if n.op_type in INTEGER_KERNELS and unique_weight in n.input)
            integer = bool(kernel)
            if not integer:
                kernel = by_name.get(node.name, "") if node.name else ""
                if not kernel and unique_weight is not None and reads.get(unique_weight):
                    kernel = reads[unique_weight][0]
                kernel = kernel or node.op_type
        code: SkipCode | None = None
        if integer:
            reason = ""
        elif node.name in skipped:
            skip = skipped[node.name]
            reason = f"not quantized: {skip if isinstance(skip, str) else skip.reason}"
            code = None if isinstance(skip, str) else skip.code
        else:
            reason = explain_float(index, node)
        verdicts.append(NodeAudit(name, node.op_type, integer, kernel, reason, macs.get(i), code))
    return tuple(verdicts)


def audit_fusion(
    model: onnx.ModelProto | Path,
    *,
    level: str = "all",
    skipped: Mapping[str, str] | None = None,
    feed: Mapping[str, np.ndarray] | None = None,
    skips: Iterable[Skip] = (),
) -> FusionAudit:
    """Optimize ``model`` as onnxruntime would at run time and classify the resulting nodes.

    Args:
        model: the model as given (a path or a ModelProto).
        level: onnxruntime graph optimization level: all, extended or basic.
        skipped: node name -> why quantcli's plan left it float, as text (no reason code; use ``skips``).
        feed: one sample of inputs, used only to resolve dynamic shapes for the MAC counts.
        skips: the plan's skips (``QuantPlan.skipped``): their reason and code are shown instead of a
            selector reason (over ``skipped`` for the same node).
    """
    optimized = _optimize(model, level)
    source = onnx.load(str(model), load_external_data=False) if isinstance(model, Path) else model
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
        nodes=_node_verdicts(source, optimized, skipped={**(skipped or {}), **{s.node: s for s in skips}}, feed=feed),
    )
