"""Apply a ``QuantPlan`` to a model: the only module that creates Q/DQ nodes and integer initializers.

The input model is never modified; a new ``ModelProto`` is returned. Nodes are emitted in the
original order with each weight's DequantizeLinear just before its reader and each activation's
QuantizeLinear/DequantizeLinear just after its producer, and names come from one allocator, so the
same plan always gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from quantcli.core.errors import UnsupportedModelError
from quantcli.core.options import QuantDType
from quantcli.core.qmath import QuantizedTensor, QuantParams
from quantcli.graph.editor import GraphEditor, ModelEditor, make_node
from quantcli.graph.model_io import model_opset
from quantcli.graph.names import NameAllocator
from quantcli.graph.scopes import node_subgraphs, outer_references
from quantcli.static.plan import (
    ActivationQuant,
    EmbeddingQuant,
    FoldedActivation,
    HardActivation,
    QuantPlan,
    RecurrentQuant,
    Rescale,
    WeightQuant,
)
from quantcli.static.planning import FLOAT_READ_OPS

__all__ = ["DynamicLowering", "apply_plan", "opset_for_types", "required_opset"]

_ONNX_TYPES = {
    QuantDType.UINT8: onnx.TensorProto.UINT8,
    QuantDType.INT8: onnx.TensorProto.INT8,
    QuantDType.UINT16: onnx.TensorProto.UINT16,
    QuantDType.INT16: onnx.TensorProto.INT16,
    QuantDType.INT4: onnx.TensorProto.INT4,
    QuantDType.UINT4: onnx.TensorProto.UINT4,
    QuantDType.INT32: onnx.TensorProto.INT32,
}


#: types whose QuantizeLinear/DequantizeLinear need opset 21
_OPSET_21_TYPES = frozenset({QuantDType.INT4, QuantDType.UINT4, QuantDType.INT16, QuantDType.UINT16})


def opset_for_types(types: Iterable[QuantDType]) -> int:
    """Lowest default-domain opset whose Q/DQ accept every type in ``types``."""
    return 21 if _OPSET_21_TYPES.intersection(types) else 13


def required_opset(plan: QuantPlan) -> int:
    """Lowest default-domain opset whose Q/DQ accept every type in ``plan``."""
    types = {a.params.dtype for a in plan.activations} | {w.quantized.params.dtype for w in plan.weights}
    return opset_for_types(types)


#: rewrites a lowered model's run-time quantized MatMul/Gemm (``QuantPlan.dynamic_nodes``); the one in use
#: is ``quantcli.modes.dynamic.lower_dynamic_nodes`` (modes/ sits below static/, so callers pass it in)
DynamicLowering = Callable[[onnx.ModelProto, QuantPlan], onnx.ModelProto]

_PACKED = {QuantDType.INT4: onnx.TensorProto.INT4, QuantDType.UINT4: onnx.TensorProto.UINT4}

#: a quantized tensor's nodes: (QuantizeLinear or first node, DequantizeLinear, the dequantized tensor)
_ActNodes = tuple[onnx.NodeProto, onnx.NodeProto, str]


def _add_integers(graph: GraphEditor, base: str, values: np.ndarray, dtype: QuantDType) -> str:
    """An integer initializer of ``dtype`` (4-bit types written from a flat list of ints)."""
    if dtype in _PACKED:
        return graph.add_initializer(base, values, elem_type=_PACKED[dtype])
    return graph.add_initializer(base, np.array(values, order="C"))


@dataclass(slots=True)
class _Constants:
    """The scale/zero-point and quantized-weight initializers of one graph, each added once."""

    graph: GraphEditor
    _param_cache: dict[tuple[bytes, bytes, str, str], tuple[str, str]] = field(default_factory=dict)
    _weight_cache: dict[int, str] = field(default_factory=dict)

    @property
    def names(self) -> NameAllocator:
        return self.graph.names

    def params(self, base: str, params: QuantParams) -> tuple[str, str]:
        key = (params.scale.tobytes() + str(params.scale.shape).encode(), params.zero_point.tobytes(),
               str(params.dtype), base if params.scale.ndim else "")  # fmt: skip
        if key not in self._param_cache:
            scale_name = self.graph.add_initializer(f"{base}_scale", params.scale.astype(np.float32))
            zp_name = _add_integers(self.graph, f"{base}_zero_point", params.zero_point, params.dtype)
            self._param_cache[key] = (scale_name, zp_name)
        return self._param_cache[key]

    def quantized_initializer(self, base: str, q: QuantizedTensor) -> str:
        key = id(q)
        if key not in self._weight_cache:
            self._weight_cache[key] = _add_integers(self.graph, f"{base}_quantized", q.values, q.params.dtype)
        return self._weight_cache[key]


@dataclass(frozen=True, slots=True)
class _PlanIndex:
    """``QuantPlan`` entries keyed the way the rewrite looks them up."""

    acts: dict[str, ActivationQuant]
    weights: dict[str, list[WeightQuant]]
    folded: dict[str, FoldedActivation]
    recurrent: dict[str, RecurrentQuant | EmbeddingQuant]
    quantized_nodes: frozenset[str]
    integer_ops: dict[str, Rescale | HardActivation]

    @classmethod
    def of(cls, plan: QuantPlan) -> _PlanIndex:
        weights: dict[str, list[WeightQuant]] = {}
        for w in plan.weights:
            weights.setdefault(w.node, []).append(w)
        recurrent: dict[str, RecurrentQuant | EmbeddingQuant] = {r.node: r for r in plan.recurrent}
        recurrent.update({e.node: e for e in plan.embeddings})
        integer_ops: dict[str, Rescale | HardActivation] = {r.node: r for r in plan.rescaled}
        integer_ops.update({h.node: h for h in plan.hard})
        return cls(
            acts={a.tensor: a for a in plan.activations},
            weights=weights,
            folded={f.node: f for f in plan.folded},
            recurrent=recurrent,
            quantized_nodes=frozenset(name for name, _ in plan.quantized_nodes),
            integer_ops=integer_ops,
        )


def apply_plan(model: onnx.ModelProto, plan: QuantPlan, *, dynamic: DynamicLowering | None = None) -> onnx.ModelProto:
    """Return a new model with ``plan`` applied (``model`` is left untouched).

    ``dynamic`` rewrites the plan's ``dynamic_nodes`` after the Q/DQ are placed (they read float tensors
    until then); a plan with dynamic nodes and no ``dynamic`` is refused rather than left float.
    """
    if plan.dynamic_nodes and dynamic is None:
        raise ValueError(
            f"the plan runs {len(plan.dynamic_nodes)} MatMul/Gemm with run-time activation quantization; "
            "pass dynamic=quantcli.modes.dynamic.lower_dynamic_nodes"
        )
    opset = model_opset(model)
    need = required_opset(plan)
    if opset < need:
        raise UnsupportedModelError(
            f"model uses opset {opset}, but per-channel QuantizeLinear/DequantizeLinear need opset >= {need}; "
            "convert upgrades the input when its options ask for those types; else upgrade it first "
            "(onnx.version_converter.convert_version)"
        )
    editor = ModelEditor(model)
    _rewrite_graph(editor.graph, _PlanIndex.of(plan), {})
    if plan.recurrent:
        editor.use_domain("com.microsoft", 1)
    lowered = editor.build()
    return dynamic(lowered, plan) if dynamic is not None and plan.dynamic_nodes else lowered


def _int8_gather(node: onnx.NodeProto, e: EmbeddingQuant, indices: str, consts: _Constants) -> list[onnx.NodeProto]:
    """Gather int8 rows (at ``indices``) and their scales, then rows * scale: the table is never dequantized whole.

    Returns the nodes to emit in place of ``node``; the last one writes ``node``'s output.
    """
    graph, names = consts.graph, consts.names
    q_name = consts.quantized_initializer(e.table, e.quantized)
    scale = graph.add_initializer(f"{e.table}_row_scale", e.quantized.params.scale.astype(np.float32))
    axes = graph.add_initializer(f"{e.table}_scale_axes", np.array([-1], np.int64))
    out = node.output[0]
    rows, row_scale = names.new(f"{out}_int8"), names.new(f"{out}_scale")
    as_float, scale_b = names.new(f"{out}_int8_float"), names.new(f"{out}_scale_unsqueezed")
    base = node.name
    return [
        make_node("Gather", [q_name, indices], [rows], name=base, attrs={"axis": 0}),
        make_node("Gather", [scale, indices], [row_scale], name=names.new(f"{base}_scale"), attrs={"axis": 0}),
        make_node("Cast", [rows], [as_float], name=names.new(f"{base}_cast"), attrs={"to": onnx.TensorProto.FLOAT}),
        make_node("Unsqueeze", [row_scale, axes], [scale_b], name=names.new(f"{base}_unsqueeze")),
        make_node("Mul", [as_float, scale_b], [out], name=names.new(f"{base}_dequantize")),
    ]


def _dynamic_lstm(node: onnx.NodeProto, r: RecurrentQuant, graph: GraphEditor) -> None:
    """Turn an ONNX LSTM into com.microsoft DynamicQuantizeLSTM in place (same outputs, state stays float)."""
    extra: list[str] = []
    for base, q in ((node.input[1], r.w), (node.input[2], r.r)):
        extra += [
            graph.add_initializer(f"{base}_quantized", q.values.astype(np.int8)),
            graph.add_initializer(f"{base}_scale", q.params.scale.astype(np.float32)),
            graph.add_initializer(f"{base}_zero_point", q.params.zero_point.astype(np.int8)),
        ]
    inputs = [*node.input, *[""] * (8 - len(node.input))][:8]
    inputs[1], inputs[2] = extra[0], extra[3]
    graph.set_inputs(node, [*inputs, extra[1], extra[2], extra[4], extra[5]])
    graph.drop_attributes(node, {"layout"})
    graph.set_op(node, "DynamicQuantizeLSTM", "com.microsoft")


def _integer_op(
    node: onnx.NodeProto,
    op: Rescale | HardActivation,
    acts: dict[str, ActivationQuant],
    act_nodes: dict[str, _ActNodes],
    integers: dict[str, str],
    consts: _Constants,
) -> list[onnx.NodeProto]:
    """Nodes that replace a planned ``Rescale`` or ``HardActivation`` (see their docstrings).

    Registers the new DequantizeLinear outputs in ``act_nodes`` and ``integers`` so that readers
    are rewired to them; returns the nodes to emit in place of ``node``.
    """
    names = consts.names
    if isinstance(op, Rescale):
        scale, zp = consts.params(op.output, acts[op.output].params)
        dq = make_node(
            "DequantizeLinear",
            [integers[op.source], scale, zp],
            [names.new(f"{op.output}_dequantized")],
            name=names.new(f"{node.name}_rescaled"),
        )
        act_nodes[op.output] = (dq, dq, dq.output[0])
        integers[op.output] = integers[op.source]
        return [dq]
    x = act_nodes[op.input][2]
    dtype = op.quantize.dtype
    zero_q = _add_integers(consts.graph, f"{node.name}_zero", np.zeros((), op.quantize.zero_point.dtype), dtype)
    one, zp0 = consts.params(
        f"{node.name}_zero", QuantParams(np.asarray(1.0, np.float32), np.zeros((), op.quantize.zero_point.dtype), dtype)
    )
    zero_f = names.new(f"{node.name}_zero_dequantized")
    pre = names.new(f"{node.name}_x_plus_zero")
    h_q = names.new(f"{node.name}_hard_sigmoid_quantized")
    q_scale, q_zp = consts.params(f"{node.name}_hard_sigmoid_in", op.quantize)
    r_scale, r_zp = consts.params(f"{node.name}_hard_sigmoid", op.read)
    sigmoid_out = op.output if op.op_type == "HardSigmoid" else names.new(f"{node.name}_hard_sigmoid")
    nodes = [
        make_node("DequantizeLinear", [zero_q, one, zp0], [zero_f], name=names.new(f"{zero_q}_dq")),
        make_node("Add", [x, zero_f], [pre], name=names.new(f"{node.name}_requantize")),
        make_node("QuantizeLinear", [pre, q_scale, q_zp], [h_q], name=names.new(f"{h_q}_q")),
        make_node("DequantizeLinear", [h_q, r_scale, r_zp], [sigmoid_out], name=names.new(f"{h_q}_dq")),
    ]
    if op.op_type == "HardSigmoid":
        act_nodes[op.output] = (nodes[-1], nodes[-1], op.output)
        integers[op.output] = h_q
        return nodes
    nodes.append(make_node("Mul", [x, sigmoid_out], [op.output], name=node.name))
    if op.output in act_nodes:
        nodes.extend(act_nodes[op.output][:2])
    return nodes


def _unread_dequantizers(graph: GraphEditor) -> list[onnx.NodeProto]:
    """The pending DequantizeLinear nodes whose output nobody reads."""
    nodes = graph.pending_nodes()
    read = {i for n in nodes for i in n.input} | set(graph.output_names)
    for node in nodes:
        for _, sub in node_subgraphs(node):
            read |= outer_references(sub)
    return [n for n in nodes if n.op_type == "DequantizeLinear" and n.output[0] not in read]


def _activation_pairs(plan: _PlanIndex, consts: _Constants, tensors: set[str]) -> dict[str, _ActNodes]:
    """One QuantizeLinear -> DequantizeLinear pair per planned activation among ``tensors``."""
    act_nodes: dict[str, _ActNodes] = {}
    names = consts.names
    for a in (plan.acts[t] for t in plan.acts if t in tensors):
        base = a.tensor
        scale, zp = consts.params(base, a.params)
        q_out = names.new(f"{base}_quantized")
        dq_out = names.new(f"{base}_dequantized")
        q = make_node("QuantizeLinear", [a.tensor, scale, zp], [q_out], name=names.new(f"{base}_QuantizeLinear"))
        dq = make_node("DequantizeLinear", [q_out, scale, zp], [dq_out], name=names.new(f"{base}_DequantizeLinear"))
        act_nodes[a.tensor] = (q, dq, dq_out)
    return act_nodes


def _weight_dequantizers(
    graph: GraphEditor, plan: _PlanIndex, consts: _Constants
) -> dict[str, list[tuple[int, onnx.NodeProto]]]:
    """Per node name, (input index, DequantizeLinear of its quantized weight)."""
    weight_nodes: dict[str, list[tuple[int, onnx.NodeProto]]] = {}
    for node in graph.nodes:
        for w in plan.weights.get(node.name, []):
            q_name = consts.quantized_initializer(w.tensor, w.quantized)
            scale, zp = consts.params(w.tensor, w.quantized.params)
            dq_out = consts.names.new(f"{w.tensor}_dequantized")
            attrs = {"axis": w.quantized.params.axis} if w.quantized.params.scale.ndim == 1 else {}
            dq_name = consts.names.new(f"{w.tensor}_DequantizeLinear")
            dq = make_node("DequantizeLinear", [q_name, scale, zp], [dq_out], name=dq_name, attrs=attrs)
            weight_nodes.setdefault(w.node, []).append((w.input_index, dq))
    return weight_nodes


def _outer_dequantizers(
    graph: GraphEditor, plan: _PlanIndex, consts: _Constants, outer: dict[str, str], act_nodes: dict[str, _ActNodes]
) -> list[onnx.NodeProto]:
    """A DequantizeLinear, inside this subgraph, of each outer quantized tensor read here (registered in act_nodes)."""
    produced = set(graph.input_names) | {o for n in graph.nodes for o in n.output if o}
    read = {i for n in graph.nodes for i in n.input}
    new_nodes: list[onnx.NodeProto] = []
    for tensor in (t for t in outer if t in read and t not in produced):
        scale, zp = consts.params(tensor, plan.acts[tensor].params)
        dq_out = consts.names.new(f"{tensor}_dequantized")
        dq_name = consts.names.new(f"{tensor}_DequantizeLinear")
        dq = make_node("DequantizeLinear", [outer[tensor], scale, zp], [dq_out], name=dq_name)
        new_nodes.append(dq)
        act_nodes[tensor] = (dq, dq, dq_out)  # rewires local readers; emitted once, at the top
    return new_nodes


@dataclass(slots=True)
class _GraphRewrite:
    """The edits of one graph's nodes, each original node in turn (see ``_rewrite_graph``)."""

    graph: GraphEditor
    plan: _PlanIndex
    consts: _Constants
    act_nodes: dict[str, _ActNodes]
    weight_nodes: dict[str, list[tuple[int, onnx.NodeProto]]]
    local_ops: dict[str, Rescale | HardActivation]
    integers: dict[str, str] = field(default_factory=dict)  # tensor -> its integer tensor

    def visit(self, node: onnx.NodeProto) -> None:
        graph, plan, act_nodes = self.graph, self.plan, self.act_nodes
        if node.name in plan.folded:
            graph.remove(node)
            return
        if node.name in self.local_ops:
            op = self.local_ops[node.name]
            graph.replace(node, _integer_op(node, op, plan.acts, act_nodes, self.integers, self.consts))
            return
        special = plan.recurrent.get(node.name)
        if isinstance(special, EmbeddingQuant):
            indices = act_nodes[node.input[1]][2] if node.input[1] in act_nodes else node.input[1]
            replacement = _int8_gather(node, special, indices, self.consts)
            for out_name in node.output:
                if out_name in act_nodes:
                    replacement.extend(act_nodes[out_name][:2])
            graph.replace(node, replacement)
            return
        if isinstance(special, RecurrentQuant):
            _dynamic_lstm(node, special, graph)
        for pos, dq in self.weight_nodes.get(node.name, []):
            graph.set_input(node, pos, dq.output[0])
            graph.insert_before(node, [dq])
        # a Conv/MatMul/Gemm left in float reads the float tensor: fed from a DQ, onnxruntime would
        # quantize its weights itself (per tensor, with no say from the plan or the user)
        float_reader = node.op_type in FLOAT_READ_OPS and node.name not in plan.quantized_nodes
        folded_outputs = {f.output for f in plan.folded.values()}
        for pos, name in enumerate(list(node.input)):
            if name in act_nodes and not (float_reader and name not in folded_outputs):
                graph.set_input(node, pos, act_nodes[name][2])
        for out_name in node.output:
            if out_name in act_nodes:
                graph.insert_after(node, act_nodes[out_name][:2])


def _rewrite_graph(graph: GraphEditor, plan: _PlanIndex, outer: dict[str, str]) -> None:
    """Rewrite ``graph``, then its subgraphs.

    Each QuantizeLinear goes into the graph that produces its tensor. A reader in a nested subgraph
    gets its own DequantizeLinear of the outer QuantizeLinear output (``outer``: tensor -> Q output),
    inside the subgraph: onnxruntime fuses a Q/DQ node unit only when its DequantizeLinear nodes and
    their scale/zero-point initializers are in the same graph as the compute node.
    """
    consts = _Constants(graph)
    for f in plan.folded.values():
        for node in graph.nodes:
            if node.name == f.producer:
                graph.set_output(node, 0, f.output)
    produced = set(graph.input_names) | {o for n in graph.nodes for o in n.output if o}
    local_ops = {n.name: plan.integer_ops[n.name] for n in graph.nodes if n.name in plan.integer_ops}
    #: tensors whose integers come from another tensor's QuantizeLinear or from a HardSigmoid's
    no_pair = {op.output for op in local_ops.values() if isinstance(op, Rescale) or op.op_type == "HardSigmoid"}
    act_nodes = _activation_pairs(plan, consts, produced - no_pair)
    weight_nodes = _weight_dequantizers(graph, plan, consts)
    head = _outer_dequantizers(graph, plan, consts, outer, act_nodes)
    for name in graph.input_names:
        if name in act_nodes:
            head.extend(act_nodes[name][:2])
    graph.prepend(head)
    integers = {t: q.output[0] for t, (q, _, _) in act_nodes.items()}
    rewrite = _GraphRewrite(graph, plan, consts, act_nodes, weight_nodes, local_ops, integers)
    for node in graph.nodes:
        rewrite.visit(node)
    if local_ops:  # a tensor read only by a removed Mul/Div or a hard activation needs no DequantizeLinear
        for node in _unread_dequantizers(graph):
            graph.remove(node)
    # graph outputs keep their float tensors; consumers inside the graph read the DQ outputs
    graph.commit()
    inner_outer = {**outer, **{t: integers[t] for t in act_nodes if t in produced and t in integers}}
    for _, _, sub in list(graph.subgraphs()):
        _rewrite_graph(sub, plan, inner_outer)
    # what nothing reads: the scales and zero points of DequantizeLinear nodes removed above, among others
    graph.prune_initializers()
    folded_inputs = {f.input for f in plan.folded.values()}
    if folded_inputs:
        graph.drop_value_info(folded_inputs)
