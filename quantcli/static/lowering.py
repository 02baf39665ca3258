"""Apply a ``QuantPlan`` to a model: the only module that creates Q/DQ nodes and integer initializers.

The input model is never modified; a new ``ModelProto`` is returned. Nodes are emitted in the
original order with each weight's DequantizeLinear just before its reader and each activation's
QuantizeLinear/DequantizeLinear just after its producer, and names come from one allocator, so the
same plan always gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantcli.core.errors import UnsupportedModelError
from quantcli.core.options import QuantDType
from quantcli.core.qmath import QuantizedTensor, QuantParams
from quantcli.graph.model import model_opset
from quantcli.graph.subgraphs import NameAllocator, node_subgraphs, outer_references
from quantcli.static.planning import (
    FLOAT_READ_OPS,
    ActivationQuant,
    EmbeddingQuant,
    FoldedActivation,
    HardActivation,
    QuantPlan,
    RecurrentQuant,
    Rescale,
    WeightQuant,
)

__all__ = ["NameAllocator", "apply_plan", "required_opset"]

_ONNX_TYPES = {
    QuantDType.UINT8: onnx.TensorProto.UINT8,
    QuantDType.INT8: onnx.TensorProto.INT8,
    QuantDType.UINT16: onnx.TensorProto.UINT16,
    QuantDType.INT16: onnx.TensorProto.INT16,
    QuantDType.INT4: onnx.TensorProto.INT4,
    QuantDType.UINT4: onnx.TensorProto.UINT4,
    QuantDType.INT32: onnx.TensorProto.INT32,
}


def required_opset(plan: QuantPlan) -> int:
    """Lowest default-domain opset whose Q/DQ accept every type in ``plan``."""
    types = {a.params.dtype for a in plan.activations} | {w.quantized.params.dtype for w in plan.weights}
    if types & {QuantDType.INT4, QuantDType.UINT4, QuantDType.INT16, QuantDType.UINT16}:
        return 21
    return 13


def _tensor(values: np.ndarray, name: str, dtype: QuantDType) -> onnx.TensorProto:
    if dtype in (QuantDType.INT4, QuantDType.UINT4):
        flat = values.astype(np.int64).ravel().tolist()
        return helper.make_tensor(name, _ONNX_TYPES[dtype], list(values.shape), flat)
    return numpy_helper.from_array(np.array(values, order="C"), name)


@dataclass(slots=True)
class _Builder:
    names: NameAllocator
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    _param_cache: dict[tuple[bytes, bytes, str, str], tuple[str, str]] = field(default_factory=dict)
    _weight_cache: dict[int, str] = field(default_factory=dict)

    def params(self, base: str, params: QuantParams) -> tuple[str, str]:
        key = (params.scale.tobytes() + str(params.scale.shape).encode(), params.zero_point.tobytes(),
               str(params.dtype), base if params.scale.ndim else "")  # fmt: skip
        if key not in self._param_cache:
            scale_name = self.names.new(f"{base}_scale")
            zp_name = self.names.new(f"{base}_zero_point")
            self.initializers.append(numpy_helper.from_array(params.scale.astype(np.float32), scale_name))
            self.initializers.append(_tensor(params.zero_point, zp_name, params.dtype))
            self._param_cache[key] = (scale_name, zp_name)
        return self._param_cache[key]

    def quantized_initializer(self, base: str, q: QuantizedTensor) -> str:
        key = id(q)
        if key not in self._weight_cache:
            name = self.names.new(f"{base}_quantized")
            self.initializers.append(_tensor(q.values, name, q.params.dtype))
            self._weight_cache[key] = name
        return self._weight_cache[key]


def apply_plan(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """Return a new model with ``plan`` applied (``model`` is left untouched)."""
    opset = model_opset(model)
    need = required_opset(plan)
    if opset < need:
        raise UnsupportedModelError(
            f"model uses opset {opset}, but per-channel QuantizeLinear/DequantizeLinear need opset >= {need}; "
            "upgrade it first (onnx.version_converter.convert_version)"
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = NameAllocator.for_graph(out.graph)
    weights: dict[str, list[WeightQuant]] = {}
    for w in plan.weights:
        weights.setdefault(w.node, []).append(w)
    acts = {a.tensor: a for a in plan.activations}
    recurrent: dict[str, RecurrentQuant | EmbeddingQuant] = {r.node: r for r in plan.recurrent}
    recurrent.update({e.node: e for e in plan.embeddings})
    quantized_nodes = frozenset(name for name, _ in plan.quantized_nodes)
    integer_ops: dict[str, Rescale | HardActivation] = {r.node: r for r in plan.rescaled}
    integer_ops.update({h.node: h for h in plan.hard})
    _rewrite_graph(
        out.graph, acts, weights, {f.node: f for f in plan.folded}, names, {}, recurrent, quantized_nodes, integer_ops
    )
    if plan.recurrent and not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


def _int8_gather(node: onnx.NodeProto, e: EmbeddingQuant, builder: _Builder) -> list[onnx.NodeProto]:
    """Gather int8 rows and their scales, then rows * scale: the table is never dequantized whole.

    Returns the nodes to emit in place of ``node``; the last one writes ``node``'s output.
    """
    q_name = builder.quantized_initializer(e.table, e.quantized)
    scale = builder.names.new(f"{e.table}_row_scale")
    axes = builder.names.new(f"{e.table}_scale_axes")
    builder.initializers += [
        numpy_helper.from_array(e.quantized.params.scale.astype(np.float32), scale),
        numpy_helper.from_array(np.array([-1], np.int64), axes),
    ]
    out = node.output[0]
    rows, row_scale = builder.names.new(f"{out}_int8"), builder.names.new(f"{out}_scale")
    as_float, scale_b = builder.names.new(f"{out}_int8_float"), builder.names.new(f"{out}_scale_unsqueezed")
    base = node.name
    return [
        helper.make_node("Gather", [q_name, node.input[1]], [rows], name=base, axis=0),
        helper.make_node(
            "Gather", [scale, node.input[1]], [row_scale], name=builder.names.new(f"{base}_scale"), axis=0
        ),
        helper.make_node("Cast", [rows], [as_float], name=builder.names.new(f"{base}_cast"), to=onnx.TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [row_scale, axes], [scale_b], name=builder.names.new(f"{base}_unsqueeze")),
        helper.make_node("Mul", [as_float, scale_b], [out], name=builder.names.new(f"{base}_dequantize")),
    ]


def _dynamic_lstm(node: onnx.NodeProto, r: RecurrentQuant, builder: _Builder) -> None:
    """Turn an ONNX LSTM into com.microsoft DynamicQuantizeLSTM in place (same outputs, state stays float)."""
    extra: list[str] = []
    for base, q in ((node.input[1], r.w), (node.input[2], r.r)):
        q_name = builder.names.new(f"{base}_quantized")
        scale = builder.names.new(f"{base}_scale")
        zp = builder.names.new(f"{base}_zero_point")
        builder.initializers += [
            numpy_helper.from_array(q.values.astype(np.int8), q_name),
            numpy_helper.from_array(q.params.scale.astype(np.float32), scale),
            numpy_helper.from_array(q.params.zero_point.astype(np.int8), zp),
        ]
        extra += [q_name, scale, zp]
    inputs = [*node.input, *[""] * (8 - len(node.input))][:8]
    inputs[1], inputs[2] = extra[0], extra[3]
    del node.input[:]
    node.input.extend([*inputs, extra[1], extra[2], extra[4], extra[5]])
    keep = [a for a in node.attribute if a.name != "layout"]
    del node.attribute[:]
    node.attribute.extend(keep)
    node.op_type = "DynamicQuantizeLSTM"
    node.domain = "com.microsoft"


def _integer_op(
    node: onnx.NodeProto,
    op: Rescale | HardActivation,
    acts: dict[str, ActivationQuant],
    act_nodes: dict[str, tuple[onnx.NodeProto, onnx.NodeProto, str]],
    integers: dict[str, str],
    builder: _Builder,
) -> list[onnx.NodeProto]:
    """Nodes that replace a planned ``Rescale`` or ``HardActivation`` (see their docstrings).

    Registers the new DequantizeLinear outputs in ``act_nodes`` and ``integers`` so that readers
    are rewired to them; returns the nodes to emit in place of ``node``.
    """
    if isinstance(op, Rescale):
        scale, zp = builder.params(op.output, acts[op.output].params)
        dq = helper.make_node(
            "DequantizeLinear",
            [integers[op.source], scale, zp],
            [builder.names.new(f"{op.output}_dequantized")],
            name=builder.names.new(f"{node.name}_rescaled"),
        )
        act_nodes[op.output] = (dq, dq, dq.output[0])
        integers[op.output] = integers[op.source]
        return [dq]
    x = act_nodes[op.input][2]
    zero_q = builder.names.new(f"{node.name}_zero")
    dtype = op.quantize.dtype
    builder.initializers.append(_tensor(np.zeros((), op.quantize.zero_point.dtype), zero_q, dtype))
    one, zp0 = builder.params(
        f"{node.name}_zero", QuantParams(np.asarray(1.0, np.float32), np.zeros((), op.quantize.zero_point.dtype), dtype)
    )
    zero_f = builder.names.new(f"{node.name}_zero_dequantized")
    pre = builder.names.new(f"{node.name}_x_plus_zero")
    h_q = builder.names.new(f"{node.name}_hard_sigmoid_quantized")
    q_scale, q_zp = builder.params(f"{node.name}_hard_sigmoid_in", op.quantize)
    r_scale, r_zp = builder.params(f"{node.name}_hard_sigmoid", op.read)
    sigmoid_out = op.output if op.op_type == "HardSigmoid" else builder.names.new(f"{node.name}_hard_sigmoid")
    nodes = [
        helper.make_node("DequantizeLinear", [zero_q, one, zp0], [zero_f], name=builder.names.new(f"{zero_q}_dq")),
        helper.make_node("Add", [x, zero_f], [pre], name=builder.names.new(f"{node.name}_requantize")),
        helper.make_node("QuantizeLinear", [pre, q_scale, q_zp], [h_q], name=builder.names.new(f"{h_q}_q")),
        helper.make_node("DequantizeLinear", [h_q, r_scale, r_zp], [sigmoid_out], name=builder.names.new(f"{h_q}_dq")),
    ]
    if op.op_type == "HardSigmoid":
        act_nodes[op.output] = (nodes[-1], nodes[-1], op.output)
        integers[op.output] = h_q
        return nodes
    nodes.append(helper.make_node("Mul", [x, sigmoid_out], [op.output], name=node.name))
    if op.output in act_nodes:
        nodes.extend(act_nodes[op.output][:2])
    return nodes


def _drop_unread_dequantize(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` without the activation DequantizeLinear nodes whose output nobody reads."""
    read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    for node in nodes:
        for _, sub in node_subgraphs(node):
            read |= outer_references(sub)
    return [n for n in nodes if not (n.op_type == "DequantizeLinear" and n.output[0] not in read)]


def _rewrite_graph(
    graph: onnx.GraphProto,
    acts: dict[str, ActivationQuant],
    weights: dict[str, list[WeightQuant]],
    folded: dict[str, FoldedActivation],
    names: NameAllocator,
    outer: dict[str, str],
    recurrent: dict[str, RecurrentQuant | EmbeddingQuant],
    quantized_nodes: frozenset[str],
    integer_ops: dict[str, Rescale | HardActivation] | None = None,
) -> None:
    """Rewrite ``graph`` in place, then its subgraphs.

    Each QuantizeLinear goes into the graph that produces its tensor. A reader in a nested subgraph
    gets its own DequantizeLinear of the outer QuantizeLinear output (``outer``: tensor -> Q output),
    inside the subgraph: onnxruntime fuses a Q/DQ node unit only when its DequantizeLinear nodes and
    their scale/zero-point initializers are in the same graph as the compute node.
    """
    builder = _Builder(names)
    for f in folded.values():
        for node in graph.node:
            if node.name == f.producer:
                node.output[0] = f.output
    produced = {i.name for i in graph.input} | {o for n in graph.node for o in n.output if o}
    integer_ops = integer_ops or {}
    local_ops = {n.name: integer_ops[n.name] for n in graph.node if n.name in integer_ops}
    #: tensors whose integers come from another tensor's QuantizeLinear or from a HardSigmoid's
    no_pair = {op.output for op in local_ops.values() if isinstance(op, Rescale) or op.op_type == "HardSigmoid"}

    # activation Q/DQ pairs, keyed by the tensor they quantize
    act_nodes: dict[str, tuple[onnx.NodeProto, onnx.NodeProto, str]] = {}
    for a in (acts[t] for t in acts if t in produced and t not in no_pair):
        base = a.tensor
        scale, zp = builder.params(base, a.params)
        q_out = builder.names.new(f"{base}_quantized")
        dq_out = builder.names.new(f"{base}_dequantized")
        q = helper.make_node(
            "QuantizeLinear", [a.tensor, scale, zp], [q_out], name=builder.names.new(f"{base}_QuantizeLinear")
        )
        dq = helper.make_node(
            "DequantizeLinear",
            [q_out, scale, zp],
            [dq_out],
            name=builder.names.new(f"{base}_DequantizeLinear"),
        )
        act_nodes[a.tensor] = (q, dq, dq_out)

    # weight DQs, keyed by (node, input index)
    weight_nodes: dict[str, list[tuple[int, onnx.NodeProto]]] = {}
    for node in graph.node:
        for w in weights.get(node.name, []):
            q_name = builder.quantized_initializer(w.tensor, w.quantized)
            scale, zp = builder.params(w.tensor, w.quantized.params)
            dq_out = builder.names.new(f"{w.tensor}_dequantized")
            attrs = {"axis": w.quantized.params.axis} if w.quantized.params.scale.ndim == 1 else {}
            dq = helper.make_node(
                "DequantizeLinear",
                [q_name, scale, zp],
                [dq_out],
                name=builder.names.new(f"{w.tensor}_DequantizeLinear"),
                **attrs,
            )
            weight_nodes.setdefault(w.node, []).append((w.input_index, dq))

    # a Conv/MatMul/Gemm left in float reads the float tensor: fed from a DQ, onnxruntime would
    # quantize its weights itself (per tensor, with no say from the plan or the user)
    folded_outputs = {f.output for f in folded.values()}
    new_nodes: list[onnx.NodeProto] = []
    read = {i for n in graph.node for i in n.input}
    for tensor in (t for t in outer if t in read and t not in produced):
        scale, zp = builder.params(tensor, acts[tensor].params)
        dq_out = builder.names.new(f"{tensor}_dequantized")
        dq = helper.make_node(
            "DequantizeLinear",
            [outer[tensor], scale, zp],
            [dq_out],
            name=builder.names.new(f"{tensor}_DequantizeLinear"),
        )
        new_nodes.append(dq)
        act_nodes[tensor] = (dq, dq, dq_out)  # rewires local readers; emitted once, above
    for name in (i.name for i in graph.input):
        if name in act_nodes:
            new_nodes.extend(act_nodes[name][:2])
    integers = {t: q.output[0] for t, (q, _, _) in act_nodes.items()}  # tensor -> its integer tensor
    for node in graph.node:
        if node.name in folded:
            continue
        if node.name in local_ops:
            new_nodes.extend(_integer_op(node, local_ops[node.name], acts, act_nodes, integers, builder))
            continue
        special = recurrent.get(node.name)
        if isinstance(special, EmbeddingQuant):
            replacement = _int8_gather(node, special, builder)
            for pos, name in enumerate(replacement[0].input):
                if name in act_nodes:
                    replacement[0].input[pos] = act_nodes[name][2]
            new_nodes.extend(replacement)
            for out_name in node.output:
                if out_name in act_nodes:
                    new_nodes.extend(act_nodes[out_name][:2])
            continue
        if isinstance(special, RecurrentQuant):
            _dynamic_lstm(node, special, builder)
        for pos, dq in weight_nodes.get(node.name, []):
            node.input[pos] = dq.output[0]
            new_nodes.append(dq)
        float_reader = node.op_type in FLOAT_READ_OPS and node.name not in quantized_nodes
        for pos, name in enumerate(node.input):
            if name in act_nodes and not (float_reader and name not in folded_outputs):
                node.input[pos] = act_nodes[name][2]
        new_nodes.append(node)
        for out_name in node.output:
            if out_name in act_nodes:
                new_nodes.extend(act_nodes[out_name][:2])

    if local_ops:  # a tensor read only by a removed Mul/Div or a hard activation needs no DequantizeLinear
        new_nodes = _drop_unread_dequantize(graph, new_nodes)
    # graph outputs keep their float tensors; consumers inside the graph read the DQ outputs
    del graph.node[:]
    graph.node.extend(new_nodes)
    inner_outer = {**outer, **{t: integers[t] for t in act_nodes if t in produced and t in integers}}
    for node in graph.node:
        for _, sub in node_subgraphs(node):
            _rewrite_graph(sub, acts, weights, folded, names, inner_outer, recurrent, quantized_nodes, integer_ops)
    used = {i for n in graph.node for i in n.input} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        for _, sub in node_subgraphs(node):
            used |= outer_references(sub)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.initializer.extend(builder.initializers)
    folded_inputs = {f.input for f in folded.values()}
    if folded_inputs:
        vis = [v for v in graph.value_info if v.name not in folded_inputs]
        del graph.value_info[:]
        graph.value_info.extend(vis)
