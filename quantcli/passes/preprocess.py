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
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from quantcli.graph.editor import GraphEditor, ModelEditor, make_tensor, single_node_model
from quantcli.graph.index import GraphIndex
from quantcli.graph.model_io import in_memory, in_memory_size
from quantcli.graph.names import NameAllocator
from quantcli.graph.scopes import walk_graphs

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
    in_place: bool = False,
) -> tuple[onnx.ModelProto, PreprocessReport]:
    """Return a cleaned copy of ``model`` (the input is not modified) and what was done.

    ``in_place``: clean ``model`` itself and return it, for a caller that owns it (no second copy of
    its weights: ddddocr's OCR recognizer, 54 MB, upgraded from opset 12, held three while calibration
    prepared it, the file read, the upgraded model and this copy).
    """
    editor = ModelEditor(model, in_place=in_place)
    named = _name_nodes(editor.graph)
    cleaner = _Cleaner(editor.opset_imports, editor.graph.proto, fold_batchnorm, remove_identity, fold_constants)
    cleaner.clean(editor.graph, {})
    consts, folded_consts, removed, folded, affines = cleaner.counts
    return editor.build(), PreprocessReport(named, consts, removed, folded, folded_consts, affines)


@dataclass(slots=True)
class _Cleaner:
    """The passes asked for, run on each graph of one model, with their counts."""

    opsets: list[onnx.OperatorSetIdProto]
    root: onnx.GraphProto
    fold_batchnorm: bool
    remove_identity: bool
    fold_constants: bool
    #: Constant nodes turned into initializers, folded constants, removed identities, folded BNs, folded affines
    counts: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])

    def clean(self, graph: GraphEditor, outer: dict[str, onnx.TensorProto]) -> None:
        """Run the passes on ``graph``, then on each subgraph (If/Loop/Scan bodies) with the constants it sees."""
        counts = self.counts
        counts[0] += _constants_to_initializers(graph)
        shared = self._shared(outer)
        counts[1] += _fold_constants(graph, self.opsets, outer, shared) if self.fold_constants else 0
        counts[2] += _remove_identities(graph) if self.remove_identity else 0
        counts[3] += _fold_batchnorms(graph, outer) if self.fold_batchnorm else 0
        counts[4] += _fold_conv_affines(graph, outer) if self.fold_batchnorm else 0
        if outer:  # a subgraph: Constant nodes no branch reads any more go away
            graph.prune_initializers()
        inputs = set(graph.input_names)
        visible = {**outer, **{t.name: t for t in graph.proto.initializer if t.name not in inputs}}
        for _, _, sub in list(graph.subgraphs()):
            self.clean(sub, visible)

    def _shared(self, outer: dict[str, onnx.TensorProto]) -> set[str]:
        """Outer constants read in several places: folding would copy them into this subgraph."""
        if not outer:
            return set()
        readers: dict[str, int] = {}
        for _, g in walk_graphs(self.root):
            for n in g.node:
                for i in set(n.input):
                    readers[i] = readers.get(i, 0) + 1
        return {n for n, t in outer.items() if readers.get(n, 0) > 1 and in_memory_size(t) >= _SHARED_COPY_BYTES}


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
    graph: GraphEditor,
    opsets: list[onnx.OperatorSetIdProto],
    outer: dict[str, onnx.TensorProto],
    shared: set[str] | None = None,
) -> int:
    """Replace nodes whose inputs are all initializers (e.g. a Transpose of a weight) by their value.

    ``outer`` holds the constants of enclosing graphs, which a subgraph's nodes may read; nodes
    reading one of the ``shared`` outer constants are left alone (folding would duplicate it).
    """
    inputs = set(graph.input_names)
    values = {**outer, **{t.name: t for t in graph.proto.initializer if t.name not in inputs}}
    outputs = set(graph.output_names)
    folded = 0
    for node in graph.nodes:
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NOT_FOLDABLE
            and node.input
            and all(i in values for i in node.input if i)
            and not any(o in outputs for o in node.output)
            and sum(in_memory_size(values[i]) for i in node.input if i) < _FOLD_LIMIT_BYTES
            and not any(i in (shared or ()) for i in node.input)
        )
        if not foldable:
            continue
        from onnx.reference import ReferenceEvaluator  # ~11 MB: imported only when there is work

        try:
            consts = [in_memory(values[i]) for i in dict.fromkeys(i for i in node.input if i)]
            single = single_node_model(node, consts, opsets)
            results = ReferenceEvaluator(single).run(None, {})
        except Exception as exc:  # the reference runtime lacks the op, or the node is invalid
            log.info("not folding %s (%s): %s", node.name, node.op_type, exc)
            continue
        for name, value in zip([o for o in node.output if o], results, strict=True):
            values[name] = make_tensor(name, np.asarray(value))
            graph.put_initializer(name, values[name])
        graph.remove(node)
        folded += 1
    if folded:
        graph.commit()
        graph.prune_initializers()
    return folded


def _name_nodes(graph: GraphEditor) -> int:
    """Name every unnamed node; in subgraphs also rename nodes whose name is already taken.

    Main-graph names become ``<op>_<i>``, subgraph names ``<path>_<op>_<i>`` (or the duplicated name
    with a suffix), so every node of the model has a unique name that plans and reports can use.
    """
    taken = {n.name for n in graph.nodes if n.name}
    count = 0
    for path, g in graph.walk():  # the main graph first, then nested subgraphs
        for i, node in enumerate(g.nodes):
            if node.name and (not path or node.name not in taken):
                taken.add(node.name)
                continue
            base = node.name or (f"{path.replace('/', '_')}_{node.op_type}_{i}" if path else f"{node.op_type}_{i}")
            name, k = base, 1
            while name in taken:
                name, k = f"{base}_{k}", k + 1
            g.rename_node(node, name)
            taken.add(name)
            count += 1
    return count


def _constants_to_initializers(graph: GraphEditor) -> int:
    count = 0
    for node in graph.nodes:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            tensor: onnx.TensorProto | np.ndarray | None = None
            if attr.name == "value" and attr.t.data_location != onnx.TensorProto.EXTERNAL:
                tensor = attr.t
            elif attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
                value = helper.get_attribute_value(attr)
                tensor = np.asarray(value, dtype=np.float32 if "float" in attr.name else np.int64)
            if tensor is not None:
                graph.put_initializer(node.output[0], tensor)
                graph.remove(node)
                count += 1
    graph.commit()
    return count


def _remove_identities(graph: GraphEditor) -> int:
    outputs = set(graph.output_names)
    removed = 0
    renames: dict[str, str] = {}
    for node in graph.nodes:
        droppable = node.op_type == "Identity" or (
            node.op_type == "Dropout" and (len(node.output) < 2 or not node.output[1])
        )
        if droppable and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            src = node.input[0]
            renames[node.output[0]] = renames.get(src, src)
            graph.remove(node)
            removed += 1
    if removed:
        graph.rename_reads(renames, subgraph_outputs=True)
    return removed


def _fold_batchnorms(graph: GraphEditor, outer: dict[str, onnx.TensorProto] | None = None) -> int:
    index = GraphIndex.build(graph.proto, outer=outer)
    outputs = set(index.graph_outputs)
    folded = 0
    names = NameAllocator.reserving(index.initializers)
    for bn in graph.nodes:
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
        w_name = names.new(f"{conv.input[1]}_bnfolded")
        b_name = names.new(f"{conv.name}_bias_bnfolded")
        graph.put_initializer(w_name, (weight * s.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32))
        graph.put_initializer(b_name, ((bias - mean) * s + beta).astype(np.float32))
        graph.set_inputs(conv, [conv.input[0], w_name, b_name])
        graph.set_output(conv, 0, bn.output[0])
        graph.remove(bn)
        folded += 1
    if folded:
        graph.commit()
        graph.prune_initializers()
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


def _fold_conv_affines(graph: GraphEditor, outer: dict[str, onnx.TensorProto] | None = None) -> int:
    """Fold Mul/Add by a per-channel constant into the Conv whose only reader they are (chains too).

    One pass in graph order: a fold hands the Mul/Add output to the Conv, so the next Mul/Add in
    the chain finds that Conv as its producer.
    """
    index = GraphIndex.build(graph.proto, outer=outer)
    outputs = set(index.graph_outputs)
    names = NameAllocator.reserving(index.initializers)
    producers = dict(index.producers)
    fresh: dict[str, np.ndarray] = {}  # initializers written by this pass

    def constant(name: str) -> np.ndarray | None:
        if name in fresh:
            return fresh[name]
        return index.constant(name) if name and index.is_constant(name) else None

    def add_initializer(base: str, value: np.ndarray) -> str:
        name = names.new(base)
        fresh[name] = value
        graph.put_initializer(name, value)
        return name

    removed = 0
    for node in graph.nodes:
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
            graph.set_inputs(conv, [conv.input[0], w_name, b_name])
            graph.set_output(conv, 0, node.output[0])
            producers[node.output[0]] = conv
            graph.remove(node)
            removed += 1
            break
    if removed:
        graph.commit()
        graph.prune_initializers()
    return removed
