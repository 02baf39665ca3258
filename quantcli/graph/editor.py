"""The one graph editor: every change quantcli makes to a model's protobuf goes through here.

Functional at the model boundary: ``ModelEditor(model)`` works on a private copy, so the caller's
model is never mutated, and ``build()`` hands the edited copy over (the editor is spent after it).
Inside, each graph of the copy (the main graph and every nested If/Loop/Scan body) has a
``GraphEditor``:

* node edits by position: ``replace``, ``insert_before``, ``insert_after``, ``remove``,
  ``prepend``, ``append`` are recorded against the nodes in ``GraphEditor.nodes`` (or nodes added
  by the edits) and applied in one go by ``commit()``, so the new node order is: the prepended
  nodes, then for each original node the nodes inserted before it, its replacement (itself by
  default) and the nodes inserted after it, then the appended nodes;
* in-place changes of a node of ``nodes``: ``set_input(s)``, ``set_output``, ``add_node_output``,
  ``set_op``, ``drop_attributes``, ``extend_ints_attribute``, ``rename_node``, and ``rename_reads``
  (every read of a tensor, subgraphs included);
* initializers: ``add_initializer`` (a fresh name from the model's ``NameAllocator``),
  ``put_initializer`` (an exact name), ``set_initializer`` (new values in place),
  ``prune_initializers`` (drop the ones nothing reads);
* value_info and graph outputs: ``add_output``, ``drop_value_info``, ``prune_value_info``,
  ``clear_value_info``, ``set_input_dim``;
* recursion: ``subgraphs()`` (editors of the nested graphs of the committed nodes),
  ``subgraphs_of(node)`` and ``walk()`` (every graph, depth first, with its path).

At model level: ``use_domain`` (import an opset domain, e.g. com.microsoft), ``names`` (one
allocator for the whole model, subgraphs included) and ``build()``.

New nodes and tensors are made with ``make_node`` and ``make_tensor`` from this module, which keep
onnx.helper's field layout exactly (attributes sorted by name, no domain field unless given), so
the same edits always give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantcli.graph.names import NameAllocator
from quantcli.graph.scopes import node_subgraphs, outer_references, rename_references, subgraph_reads

__all__ = [
    "GraphEditor",
    "ModelEditor",
    "NameAllocator",
    "make_node",
    "make_tensor",
    "single_node_model",
    "small_model",
    "submodel_extractor",
    "used_names",
]

#: element types numpy cannot hold natively; written from a flat list of ints
_PACKED_TYPES = frozenset({onnx.TensorProto.INT4, onnx.TensorProto.UINT4})


def make_node(
    op_type: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    name: str,
    domain: str | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> onnx.NodeProto:
    """A new node (not yet in any graph); ``attrs`` become ONNX attributes, sorted by name."""
    return helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain, **dict(attrs or {}))


def make_tensor(name: str, values: np.ndarray, *, elem_type: int | None = None) -> onnx.TensorProto:
    """A constant tensor named ``name``; ``elem_type`` only for types numpy lacks (INT4, UINT4)."""
    if elem_type in _PACKED_TYPES:
        flat = np.asarray(values).astype(np.int64).ravel().tolist()
        return helper.make_tensor(name, elem_type, list(np.shape(values)), flat)
    return numpy_helper.from_array(np.asarray(values), name)


def single_node_model(
    node: onnx.NodeProto, constants: Sequence[onnx.TensorProto], opsets: Sequence[onnx.OperatorSetIdProto]
) -> onnx.ModelProto:
    """A model of ``node`` alone, reading ``constants``, returning its non-empty outputs (to evaluate it)."""
    outputs = [onnx.ValueInfoProto(name=o) for o in node.output if o]
    return helper.make_model(helper.make_graph([node], "fold", [], outputs, list(constants)), opset_imports=opsets)


def small_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, np.dtype[Any], Sequence[int]]],
    outputs: Sequence[str],
    constants: Sequence[onnx.TensorProto],
    opsets: Mapping[str, int],
) -> onnx.ModelProto:
    """A new model of ``nodes`` with typed graph ``inputs`` (name, numpy dtype, shape) and untyped ``outputs``.

    For models built from nothing (a micro-benchmark's kernel); ``opsets`` maps domain to version.
    """
    graph_inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(shape))
        for name, dtype, shape in inputs
    ]
    graph = helper.make_graph(
        list(nodes), "small", graph_inputs, [onnx.ValueInfoProto(name=o) for o in outputs], list(constants)
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())])


def submodel_extractor(model: onnx.ModelProto) -> Callable[[Sequence[str], Sequence[str]], onnx.ModelProto]:
    """A function that cuts the part of ``model`` between tensors ``inputs`` and ``outputs`` out as a new model.

    ``model`` should carry shape inference's value_info (the cut model's inputs need types). The
    index of the model is built once, so cutting many pieces of one model stays cheap.
    """
    import onnx.utils  # loaded only when needed

    extractor = onnx.utils.Extractor(model)
    return lambda inputs, outputs: extractor.extract_model(list(inputs), list(outputs))


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Names an initializer of ``graph`` must keep: read by a node (at any depth), or a graph input or output."""
    used = {i for n in graph.node for i in n.input} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        for _, sub in node_subgraphs(node):
            used |= outer_references(sub)
    return used | subgraph_reads(graph)


class GraphEditor:
    """Edits one graph of a ``ModelEditor``'s copy (see the module docstring for the operations).

    Nodes are identified by object: pass the objects of ``nodes`` (protobuf hands out a new wrapper
    on every access of ``graph.node``) or nodes given to an earlier edit.
    """

    def __init__(self, graph: onnx.GraphProto, names: NameAllocator) -> None:
        self._graph = graph
        self.names = names
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self._position = {id(n): i for i, n in enumerate(self.nodes)}
        self._replacements: dict[int, list[onnx.NodeProto]] = {}
        self._before: dict[int, list[onnx.NodeProto]] = {}
        self._after: dict[int, list[onnx.NodeProto]] = {}
        self._head: list[onnx.NodeProto] = []
        self._tail: list[onnx.NodeProto] = []
        self._removed: dict[int, onnx.NodeProto] = {}
        self._children: list[GraphEditor] = []

    # -- read-only views ---------------------------------------------------------------------
    @property
    def proto(self) -> onnx.GraphProto:
        """The graph being edited, to read (build a ``GraphIndex``, walk it); edit it only through this editor."""
        return self._graph

    @property
    def input_names(self) -> list[str]:
        """Names of the graph inputs, in order."""
        return [i.name for i in self._graph.input]

    @property
    def output_names(self) -> list[str]:
        """Names of the graph outputs, in order."""
        return [o.name for o in self._graph.output]

    @property
    def pending(self) -> bool:
        """True when node edits are recorded but not yet committed."""
        return bool(self._replacements or self._before or self._after or self._head or self._tail or self._removed)

    def pending_nodes(self) -> list[onnx.NodeProto]:
        """The node list ``commit()`` would write."""
        nodes = list(self._head)
        for i, node in enumerate(self.nodes):
            nodes.extend(self._before.get(i, []))
            nodes.extend(self._replacements.get(i, [node]))
            nodes.extend(self._after.get(i, []))
        nodes.extend(self._tail)
        return [n for n in nodes if id(n) not in self._removed]

    # -- node edits by position (applied by commit) ------------------------------------------
    def _slot(self, node: onnx.NodeProto) -> int:
        try:
            return self._position[id(node)]
        except KeyError:
            raise KeyError(f"node '{node.name}' ({node.op_type}) is not one of this editor's nodes") from None

    def replace(self, node: onnx.NodeProto, new_nodes: Iterable[onnx.NodeProto]) -> None:
        """Put ``new_nodes`` where ``node`` (one of ``nodes``) was."""
        self._replacements[self._slot(node)] = list(new_nodes)

    def insert_before(self, node: onnx.NodeProto, new_nodes: Iterable[onnx.NodeProto]) -> None:
        """Emit ``new_nodes`` just before ``node`` (which stays unless also replaced)."""
        self._before.setdefault(self._slot(node), []).extend(new_nodes)

    def insert_after(self, node: onnx.NodeProto, new_nodes: Iterable[onnx.NodeProto]) -> None:
        """Emit ``new_nodes`` just after ``node`` (or after its replacement)."""
        self._after.setdefault(self._slot(node), []).extend(new_nodes)

    def prepend(self, new_nodes: Iterable[onnx.NodeProto]) -> None:
        """Emit ``new_nodes`` before every other node."""
        self._head.extend(new_nodes)

    def append(self, new_nodes: Iterable[onnx.NodeProto]) -> None:
        """Emit ``new_nodes`` after every other node."""
        self._tail.extend(new_nodes)

    def remove(self, node: onnx.NodeProto) -> None:
        """Drop ``node`` (one of ``nodes``, or a node given to an earlier edit) wherever it would be emitted."""
        self._removed[id(node)] = node  # kept alive, so that its id is not reused

    def commit(self) -> None:
        """Write the recorded node edits into the graph; ``nodes`` becomes the new node list."""
        if not self.pending:
            return
        nodes = self.pending_nodes()
        del self._graph.node[:]
        self._graph.node.extend(nodes)
        self.nodes = list(self._graph.node)
        self._position = {id(n): i for i, n in enumerate(self.nodes)}
        self._replacements, self._before, self._after = {}, {}, {}
        self._head, self._tail, self._removed = [], [], {}

    # -- in-place changes of one node --------------------------------------------------------
    def set_input(self, node: onnx.NodeProto, pos: int, name: str) -> None:
        """``node`` reads ``name`` at input ``pos``."""
        node.input[pos] = name

    def set_inputs(self, node: onnx.NodeProto, names: Sequence[str]) -> None:
        """``node`` reads exactly ``names``."""
        node.input[:] = list(names)

    def set_output(self, node: onnx.NodeProto, pos: int, name: str) -> None:
        """``node`` writes ``name`` at output ``pos``."""
        node.output[pos] = name

    def add_node_output(self, node: onnx.NodeProto, name: str) -> None:
        """``node`` gets one more output, ``name``."""
        node.output.append(name)

    def set_op(self, node: onnx.NodeProto, op_type: str, domain: str) -> None:
        """``node`` becomes ``domain``'s ``op_type`` (inputs and attributes kept)."""
        node.op_type = op_type
        node.domain = domain

    def drop_attributes(self, node: onnx.NodeProto, names: Collection[str]) -> None:
        """Remove ``node``'s attributes named in ``names`` (the others keep their order)."""
        keep = [a for a in node.attribute if a.name not in names]
        del node.attribute[:]
        node.attribute.extend(keep)

    def extend_ints_attribute(self, node: onnx.NodeProto, attr: str, values: Iterable[int]) -> None:
        """Append ``values`` to ``node``'s integer-list attribute ``attr`` (if it has one)."""
        for a in node.attribute:
            if a.name == attr:
                a.ints.extend(values)

    def rename_node(self, node: onnx.NodeProto, name: str) -> None:
        """``node`` is called ``name``."""
        node.name = name

    def rename_reads(self, renames: Mapping[str, str], *, subgraph_outputs: bool = False) -> None:
        """Every node of the pending node list, and every read in nested subgraphs, reads the new names.

        With ``subgraph_outputs``, a subgraph output naming an outer tensor directly is renamed too.
        """
        if not renames:
            return
        for node in self.pending_nodes():
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
        self.commit()
        rename_references(self._graph, renames, outputs=subgraph_outputs)

    # -- initializers ------------------------------------------------------------------------
    def add_initializer(self, base: str, values: np.ndarray, *, elem_type: int | None = None) -> str:
        """Add a constant under a fresh name derived from ``base`` (appended in call order); returns the name."""
        name = self.names.new(base)
        self.put_initializer(name, values, elem_type=elem_type)
        return name

    def put_initializer(
        self, name: str, values: np.ndarray | onnx.TensorProto, *, elem_type: int | None = None
    ) -> None:
        """Append a constant under exactly ``name`` (the caller owns the name); a TensorProto is copied."""
        if isinstance(values, onnx.TensorProto):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(values)
            tensor.name = name
        else:
            tensor = make_tensor(name, values, elem_type=elem_type)
        self._graph.initializer.append(tensor)

    def set_initializer(self, name: str, values: np.ndarray) -> None:
        """Give the existing initializer ``name`` new ``values`` (dtype and shape from the array), in place.

        Raises:
            KeyError: ``graph`` has no initializer ``name``.
        """
        for tensor in self._graph.initializer:
            if tensor.name == name:
                tensor.CopyFrom(make_tensor(name, values))
                return
        raise KeyError(f"no initializer '{name}' in graph '{self._graph.name}'")

    def prune_initializers(self) -> None:
        """Drop initializers nothing reads (``used_names``).

        Commit node edits first: the committed nodes are the readers.
        """
        used = used_names(self._graph)
        drop = [i for i, t in enumerate(self._graph.initializer) if t.name not in used]
        for i in reversed(drop):  # in place: re-adding the kept ones would copy each (a second int8 model)
            del self._graph.initializer[i]

    # -- value_info and graph outputs --------------------------------------------------------
    def add_output(self, name: str, elem_type: int = 0) -> None:
        """Make ``name`` a graph output (with its element type when known)."""
        vi = onnx.ValueInfoProto()
        vi.name = name
        if elem_type:
            vi.type.tensor_type.elem_type = elem_type
        self._graph.output.append(vi)

    def drop_value_info(self, names: Collection[str]) -> None:
        """Forget the recorded type/shape of ``names``."""
        keep = [v for v in self._graph.value_info if v.name not in names]
        if len(keep) != len(self._graph.value_info):
            del self._graph.value_info[:]
            self._graph.value_info.extend(keep)

    def prune_value_info(self) -> None:
        """Keep value_info only for tensors that still exist (initializers and node outputs)."""
        alive = {t.name for t in self._graph.initializer} | {o for n in self._graph.node for o in n.output}
        vis = [v for v in self._graph.value_info if v.name in alive]
        del self._graph.value_info[:]
        self._graph.value_info.extend(vis)

    def clear_value_info(self) -> None:
        """Forget every recorded type/shape of intermediate tensors (shape inference re-derives them)."""
        del self._graph.value_info[:]

    def set_input_dim(self, name: str, axis: int, value: int) -> None:
        """Graph input ``name`` gets the fixed size ``value`` on ``axis`` (its symbol is dropped)."""
        for vi in self._graph.input:
            if vi.name == name:
                dim = vi.type.tensor_type.shape.dim[axis]
                dim.Clear()
                dim.dim_value = value

    # -- recursion ---------------------------------------------------------------------------
    def subgraphs(self) -> Iterator[tuple[onnx.NodeProto, str, GraphEditor]]:
        """(node, attribute, editor) for each subgraph of the committed nodes, in node order.

        Each editor shares this model's name allocator; its edits are its own to commit.
        """
        if self.pending:
            raise RuntimeError("commit() the node edits before editing subgraphs")
        for node in self.nodes:
            for attr, sub in node_subgraphs(node):
                child = GraphEditor(sub, self.names)
                self._children.append(child)
                yield node, attr, child

    def subgraphs_of(self, node: onnx.NodeProto) -> dict[str, GraphEditor]:
        """Editors of ``node``'s subgraphs (``node`` one of ``nodes``), by attribute name.

        Allowed with edits pending: ``build()`` commits nested editors before their parents. Ask once
        per node: two editors of one graph would overwrite each other's node edits.
        """
        self._slot(node)
        found: dict[str, GraphEditor] = {}
        for attr, sub in node_subgraphs(node):
            found[attr] = GraphEditor(sub, self.names)
            self._children.append(found[attr])
        return found

    def walk(self, path: str = "") -> Iterator[tuple[str, GraphEditor]]:
        """This graph (path ``""``) and every nested subgraph, depth first, as (path, editor).

        Paths as ``scopes.walk_graphs``: ``<node name>/<attribute>``, joined with ``/``; a node's name
        is read when its subgraphs are reached, so renaming the nodes of a graph as it is yielded works.
        """
        yield path, self
        for node, attr, sub in self.subgraphs():
            yield from sub.walk(f"{path}/{node.name}/{attr}" if path else f"{node.name}/{attr}")

    def _commit_all(self) -> None:
        for child in self._children:
            child._commit_all()
        self.commit()


class ModelEditor:
    """A private copy of a model, edited through ``graph`` (the main graph's editor), then ``build()``.

    Args:
        model: the model to start from (never modified, unless ``in_place``).
        names: the name allocator; by default one reserving every name in the model.
        in_place: edit ``model`` itself, no copy (``build()`` returns it): for a caller that owns the
            model and drops it, so its weights are not held twice while the copy is edited.
    """

    def __init__(self, model: onnx.ModelProto, *, names: NameAllocator | None = None, in_place: bool = False) -> None:
        if in_place:
            self._model = model
        else:
            self._model = onnx.ModelProto()
            self._model.CopyFrom(model)
        self.names = names if names is not None else NameAllocator.for_graph(self._model.graph)
        self.graph = GraphEditor(self._model.graph, self.names)
        self._domains: dict[str, int] = {}
        self._built = False

    @property
    def opset_imports(self) -> list[onnx.OperatorSetIdProto]:
        """The model's opset imports (to read)."""
        return list(self._model.opset_import)

    def use_domain(self, domain: str, version: int) -> None:
        """Make sure the model imports ``domain`` at ``version`` or later (e.g. com.microsoft)."""
        self._domains[domain] = max(version, self._domains.get(domain, 0))

    def build(self) -> onnx.ModelProto:
        """Commit pending node edits (subgraphs first), add the domains asked for, and return the edited copy.

        The editor is spent afterwards: the model returned is the caller's.
        """
        if self._built:
            raise RuntimeError("ModelEditor.build() was already called")
        self._built = True
        self.graph._commit_all()
        imported = {imp.domain: imp for imp in self._model.opset_import}
        for domain, version in sorted(self._domains.items()):
            if domain in imported:
                imported[domain].version = max(imported[domain].version, version)
            else:
                self._model.opset_import.append(helper.make_opsetid(domain, version))
        return self._model
