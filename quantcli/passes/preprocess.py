"""Graph clean-ups run before planning, each optional and reported.

BatchNormalization folded into the Conv before it, with s = gamma / sqrt(var + eps) per channel:

    W'[c] = W[c] * s[c]          b'[c] = (b[c] - mean[c]) * s[c] + beta[c]

A Mul or Add by a constant that is one value per output channel (or one value for all), reading a
Conv's output, is folded the same way (exporters write a BatchNorm or a learnable affine block after
a re-parameterized Conv so: PP-LCNetV3's ``Conv -> Mul(a) -> Add(b)``):

    (W * x + b) * a  ->  W' = W * a[c],  b' = b * a[c]          (W * x + b) + d  ->  b' = b + d[c]

Each fold removes a requantization point once quantized (the Conv's output range was measured
before the scale, the Mul's after it, the Add's after that: three roundings for one tensor).

Everything here works without shape inference: it only looks at node wiring and constants.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantcli.graph.index import GraphIndex
from quantcli.graph.subgraphs import node_subgraphs, rename_references, walk_graphs

__all__ = ["PreprocessReport", "preprocess"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PreprocessReport:
    """What the clean-up passes changed."""

    named_nodes: int
    constants_to_initializers: int
    removed_identities: int
    folded_batchnorms: int
    folded_constants: int = 0
    folded_affines: int = 0

    def lines(self) -> list[str]:
        """Human-readable summary, one line per pass that did something."""
        out = []
        if self.folded_batchnorms:
            out.append(f"folded {self.folded_batchnorms} BatchNormalization into Conv")
        if self.folded_affines:
            out.append(f"folded {self.folded_affines} per-channel Mul/Add by a constant into the Conv before it")
        if self.removed_identities:
            out.append(f"removed {self.removed_identities} Identity/Dropout")
        if self.folded_constants:
            out.append(f"folded {self.folded_constants} nodes with constant inputs into initializers")
        if self.constants_to_initializers:
            out.append(f"turned {self.constants_to_initializers} Constant nodes into initializers")
        if self.named_nodes:
            out.append(f"named {self.named_nodes} unnamed nodes")
        return out


def preprocess(
    model: onnx.ModelProto,
    *,
    fold_batchnorm: bool = True,
    remove_identity: bool = True,
    fold_constants: bool = True,
) -> tuple[onnx.ModelProto, PreprocessReport]:
    """Return a cleaned copy of ``model`` (the input is never modified) and what was done."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    named = _name_nodes(graph)
    counts = [0, 0, 0, 0, 0]
    _clean_graph(graph, list(out.opset_import), {}, counts, fold_batchnorm, remove_identity, fold_constants, graph)
    consts, folded_consts, removed, folded, affines = counts
    return out, PreprocessReport(named, consts, removed, folded, folded_consts, affines)


def _clean_graph(
    graph: onnx.GraphProto,
    opsets: list[onnx.OperatorSetIdProto],
    outer: dict[str, onnx.TensorProto],
    counts: list[int],
    fold_batchnorm: bool,
    remove_identity: bool,
    fold_constants: bool,
    root: onnx.GraphProto,
) -> None:
    """Run the passes on ``graph``, then on each subgraph (If/Loop/Scan bodies) with the constants it sees."""
    counts[0] += _constants_to_initializers(graph)
    shared: set[str] = set()
    if outer:  # outer constants read in several places: folding would copy them into this subgraph
        readers: dict[str, int] = {}
        for _, g in walk_graphs(root):
            for n in g.node:
                for i in set(n.input):
                    readers[i] = readers.get(i, 0) + 1
        shared = {name for name, t in outer.items() if readers.get(name, 0) > 1 and t.ByteSize() >= _SHARED_COPY_BYTES}
    counts[1] += _fold_constants(graph, opsets, outer, shared) if fold_constants else 0
    counts[2] += _remove_identities(graph) if remove_identity else 0
    counts[3] += _fold_batchnorms(graph, outer) if fold_batchnorm else 0
    counts[4] += _fold_conv_affines(graph, outer) if fold_batchnorm else 0
    if outer:  # a subgraph: Constant nodes no branch reads any more go away
        _drop_unused_initializers(graph)
    inputs = {i.name for i in graph.input}
    visible = {**outer, **{t.name: t for t in graph.initializer if t.name not in inputs}}
    for node in graph.node:
        for _, sub in node_subgraphs(node):
            _clean_graph(sub, opsets, visible, counts, fold_batchnorm, remove_identity, fold_constants, root)


#: never evaluated ahead of time: random, stateful, or with sub-graphs
_NOT_FOLDABLE = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan", "QuantizeLinear", "DequantizeLinear", "Constant",
}  # fmt: skip
_FOLD_LIMIT_BYTES = 64 << 20
#: an outer constant at least this large, read in several places, is not folded into a subgraph
#: (Silero VAD: folding the Unsqueeze of LSTM weights shared by two branches doubled the model)
_SHARED_COPY_BYTES = 64 << 10


def _fold_constants(
    graph: onnx.GraphProto,
    opsets: list[onnx.OperatorSetIdProto],
    outer: dict[str, onnx.TensorProto],
    shared: set[str] | None = None,
) -> int:
    """Replace nodes whose inputs are all initializers (e.g. a Transpose of a weight) by their value.

    ``outer`` holds the constants of enclosing graphs, which a subgraph's nodes may read; nodes
    reading one of the ``shared`` outer constants are left alone (folding would duplicate it).
    """
    inputs = {i.name for i in graph.input}
    values = {**outer, **{t.name: t for t in graph.initializer if t.name not in inputs}}
    outputs = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    folded = 0
    for node in graph.node:
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NOT_FOLDABLE
            and node.input
            and all(i in values for i in node.input if i)
            and not any(o in outputs for o in node.output)
            and sum(values[i].ByteSize() for i in node.input if i) < _FOLD_LIMIT_BYTES
            and not any(i in (shared or ()) for i in node.input)
        )
        if foldable:
            from onnx.reference import ReferenceEvaluator  # ~11 MB: imported only when there is work

            try:
                single = helper.make_model(
                    helper.make_graph(
                        [node], "fold", [], [onnx.ValueInfoProto(name=o) for o in node.output if o],
                        [values[i] for i in dict.fromkeys(i for i in node.input if i)],
                    ),
                    opset_imports=opsets,
                )  # fmt: skip
                results = ReferenceEvaluator(single).run(None, {})
            except Exception as exc:  # the reference runtime lacks the op, or the node is invalid
                log.info("not folding %s (%s): %s", node.name, node.op_type, exc)
                results = None
            if results is not None:
                for name, value in zip([o for o in node.output if o], results, strict=True):
                    tensor = numpy_helper.from_array(np.asarray(value), name)
                    values[name] = tensor
                    new_inits.append(tensor)
                folded += 1
                continue
        keep.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(new_inits)
        _drop_unused_initializers(graph)
    return folded


def _name_nodes(graph: onnx.GraphProto) -> int:
    """Name every unnamed node; in subgraphs also rename nodes whose name is already taken.

    Main-graph names become ``<op>_<i>``, subgraph names ``<path>_<op>_<i>`` (or the duplicated name
    with a suffix), so every node of the model has a unique name that plans and reports can use.
    """
    taken = {n.name for n in graph.node if n.name}
    count = 0
    for path, g in walk_graphs(graph):  # the main graph first, then nested subgraphs
        for i, node in enumerate(g.node):
            if node.name and (not path or node.name not in taken):
                taken.add(node.name)
                continue
            base = node.name or (f"{path.replace('/', '_')}_{node.op_type}_{i}" if path else f"{node.op_type}_{i}")
            name, k = base, 1
            while name in taken:
                name, k = f"{base}_{k}", k + 1
            node.name = name
            taken.add(name)
            count += 1
    return count


def _constants_to_initializers(graph: onnx.GraphProto) -> int:
    keep: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            tensor: onnx.TensorProto | None = None
            if attr.name == "value":
                tensor = onnx.TensorProto()
                tensor.CopyFrom(attr.t)
            elif attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
                value = helper.get_attribute_value(attr)
                dtype = np.float32 if "float" in attr.name else np.int64
                tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype))
            if tensor is not None and tensor.data_location != onnx.TensorProto.EXTERNAL:
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                count += 1
                continue
        keep.append(node)
    if count:
        del graph.node[:]
        graph.node.extend(keep)
    return count


def _remove_identities(graph: onnx.GraphProto) -> int:
    outputs = {o.name for o in graph.output}
    removed = 0
    keep: list[onnx.NodeProto] = []
    renames: dict[str, str] = {}
    for node in graph.node:
        droppable = node.op_type == "Identity" or (
            node.op_type == "Dropout" and (len(node.output) < 2 or not node.output[1])
        )
        if droppable and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            src = node.input[0]
            renames[node.output[0]] = renames.get(src, src)
            removed += 1
            continue
        keep.append(node)
    if removed:
        for node in keep:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
        del graph.node[:]
        graph.node.extend(keep)
        rename_references(graph, renames, outputs=True)
    return removed


def _fold_batchnorms(graph: onnx.GraphProto, outer: dict[str, onnx.TensorProto] | None = None) -> int:
    index = GraphIndex.build(graph, outer=outer)
    outputs = set(index.graph_outputs)
    folded = 0
    replaced: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    taken = set(index.initializers)
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or (len(bn.output) != 1 and any(bn.output[1:])):
            continue
        if any(a.name == "training_mode" and a.i for a in bn.attribute):
            continue
        conv = index.producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv":
            continue
        if len(index.consumers_of(conv.output[0])) != 1 or conv.output[0] in outputs:
            continue
        params = bn.input[1:5]
        if not all(index.is_constant(p) for p in params) or not index.is_constant(conv.input[1]):
            continue
        if len(conv.input) > 2 and conv.input[2] and not index.is_constant(conv.input[2]):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (index.constant(p).astype(np.float64) for p in params)
        weight = index.constant(conv.input[1]).astype(np.float64)
        bias = (
            index.constant(conv.input[2]).astype(np.float64)
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(weight.shape[0])
        )
        s = gamma / np.sqrt(var + eps)
        w_new = (weight * s.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32)
        b_new = ((bias - mean) * s + beta).astype(np.float32)
        w_name = _fresh(f"{conv.input[1]}_bnfolded", taken)
        b_name = _fresh(f"{conv.name}_bias_bnfolded", taken)
        new_inits += [numpy_helper.from_array(w_new, w_name), numpy_helper.from_array(b_new, b_name)]
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        conv.output[0] = bn.output[0]
        replaced.add(bn.name)
        folded += 1
    if folded:
        keep = [n for n in graph.node if not (n.op_type == "BatchNormalization" and n.name in replaced)]
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(new_inits)
        _drop_unused_initializers(graph)
    return folded


def _channel_vector(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``value`` as one number per channel of a [N, C, ...] tensor of ``rank``, if it broadcasts so."""
    if value.ndim > rank or value.size == 0:
        return None
    for pos, dim in enumerate(value.shape):
        axis = rank - value.ndim + pos
        if dim != 1 and (axis != 1 or dim != channels):
            return None
    return np.broadcast_to(value.reshape(-1), (channels,)) if value.size == 1 else value.reshape(-1)


def _fold_conv_affines(graph: onnx.GraphProto, outer: dict[str, onnx.TensorProto] | None = None) -> int:
    """Fold Mul/Add by a per-channel constant into the Conv whose only reader they are (chains too).

    One pass in graph order: a fold hands the Mul/Add output to the Conv, so the next Mul/Add in
    the chain finds that Conv as its producer.
    """
    index = GraphIndex.build(graph, outer=outer)
    outputs = set(index.graph_outputs)
    taken = set(index.initializers)
    producers = dict(index.producers)
    fresh: dict[str, np.ndarray] = {}  # initializers written by this pass

    def constant(name: str) -> np.ndarray | None:
        if name in fresh:
            return fresh[name]
        return index.constant(name) if name and index.is_constant(name) else None

    def add_initializer(base: str, value: np.ndarray) -> str:
        name = _fresh(base, taken)
        fresh[name] = value
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    removed: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in ("Mul", "Add") or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        for pos in (0, 1):
            conv = producers.get(node.input[pos])
            value = constant(node.input[1 - pos])
            if conv is None or conv.op_type != "Conv" or value is None or value.dtype != np.float32:
                continue
            if len(index.consumers_of(conv.output[0])) != 1 or conv.output[0] in outputs:
                continue
            weight = constant(conv.input[1])
            has_bias = len(conv.input) > 2 and bool(conv.input[2])
            bias = constant(conv.input[2]) if has_bias else None
            if weight is None or weight.dtype != np.float32 or (has_bias and bias is None):
                continue
            vec = _channel_vector(value.astype(np.float64), weight.ndim, weight.shape[0])
            if vec is None:
                continue
            b = bias.astype(np.float64) if bias is not None else np.zeros(weight.shape[0])
            w_name = conv.input[1]
            if node.op_type == "Mul":
                scaled = weight.astype(np.float64) * vec.reshape(-1, *([1] * (weight.ndim - 1)))
                w_name = add_initializer(f"{conv.input[1]}_scaled", scaled.astype(np.float32))
                b = b * vec
            else:
                b = b + vec
            b_name = add_initializer(f"{conv.name}_bias_folded", b.astype(np.float32))
            del conv.input[1:]
            conv.input.extend([w_name, b_name])
            conv.output[0] = node.output[0]
            producers[node.output[0]] = conv
            removed.append(node)
            break
    for node in removed:
        graph.node.remove(node)
    if removed:
        _drop_unused_initializers(graph)
    return len(removed)


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    used |= _subgraph_inputs(graph)
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                names |= {i for n in sub.node for i in n.input}
                names |= _subgraph_inputs(sub)
    return names
