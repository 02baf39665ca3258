"""Control-flow subgraphs (If, Loop, Scan): expose their tensors as main-graph outputs for calibration.

ONNX names are unique across a model and its subgraphs, so a tensor inside a branch keeps its own
name as the key of its calibration range. onnxruntime can only return main-graph outputs, so a
tensor ``t`` inside a subgraph is carried out through every enclosing control-flow node:

* ``If``: ``t`` becomes an extra output of its branch; the other branch gets an extra output of the
  same element type holding an empty tensor (shape ``[0]``), so the If node gains one output that
  carries ``t`` when its branch runs and nothing (zero elements, ignored by the observers) when not.
* ``Loop`` / ``Scan``: ``t`` becomes an extra scan output of the body, so the node returns ``t`` of
  every iteration stacked on a new first axis; observers reduce over all of them. (A tensor whose
  shape changes between iterations cannot be stacked: such bodies are left unexposed.)
  Stacking costs iterations x batch x the tensor: a 501-step decoder's attention tensors take
  gigabytes for one batch. With ``reduce_loops`` (calibration's min/max), the body instead reduces
  ``t`` to a *pair* ``[min(t), max(t)]`` and only the pair is stacked (2 values per iteration),
  whatever the tensor's size; its min and max over all pairs are the stacked tensor's. An empty
  ``t`` reduces to ``[+inf, -inf]`` (the identity of min and max), which the observer drops. A
  pair carried out of a nested Loop is reduced again column-wise (min of the mins, max of the maxes).

Nested subgraphs repeat this at each level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from quantcli.graph.editor import GraphEditor, ModelEditor, make_node, make_tensor
from quantcli.graph.names import NameAllocator
from quantcli.graph.scopes import node_subgraphs

__all__ = [
    "ExposedModel",
    "expose_subgraph_tensors",
]


@dataclass(frozen=True, slots=True)
class ExposedModel:
    """A copy of a model whose subgraph tensors are main-graph outputs.

    Attributes:
        model: the augmented copy.
        names: main-graph output name -> name of the tensor inside its subgraph.
        skipped: subgraph paths whose tensors could not be exposed, with the reason.
    """

    model: onnx.ModelProto
    names: dict[str, str]
    skipped: tuple[tuple[str, str], ...] = ()
    #: outputs holding per-iteration ``[min, max]`` pairs (last axis 2) instead of the values
    reduced: frozenset[str] = frozenset()


#: an exposed tensor: (name visible in the graph, inner tensor name, elem type, whether it holds min/max pairs)
_Found = tuple[str, str, int, bool]


@dataclass(slots=True)
class _Exposer:
    types: Mapping[str, int]
    names: NameAllocator
    skipped: list[tuple[str, str]]
    reduce_loops: bool = False

    def local_tensors(self, graph: GraphEditor, *, with_inputs: bool) -> list[tuple[str, int]]:
        """Float tensors produced in ``graph`` (and, for loop bodies, its inputs), graph order."""
        found: list[tuple[str, int]] = []
        if with_inputs:
            found += [(name, self.types.get(name, 0)) for name in graph.input_names]
        for node in graph.nodes:
            if node.op_type == "Constant":
                continue
            found += [(o, self.types.get(o, 0)) for o in node.output if o]
        return [(n, t) for n, t in found if t == onnx.TensorProto.FLOAT]

    def collect(self, graph: GraphEditor, path: str, *, with_inputs: bool) -> list[_Found]:
        """Tensors of ``graph`` and its subgraphs, as visible in ``graph``."""
        found: list[_Found] = [(n, n, t, False) for n, t in self.local_tensors(graph, with_inputs=with_inputs)]
        for node in graph.nodes:
            found += self.expose_node(graph, node, f"{path}/{node.name}" if path else node.name)
        return found

    def expose_node(self, graph: GraphEditor, node: onnx.NodeProto, path: str) -> list[_Found]:
        if node.op_type == "If" and node.domain in ("", "ai.onnx"):
            return self._expose_if(graph, node, path)
        if node.op_type in ("Loop", "Scan") and node.domain in ("", "ai.onnx"):
            return self._expose_loop(graph, node, path)
        if node_subgraphs(node):
            self.skipped.append((path, f"op {node.op_type} holds a subgraph quantcli does not look into"))
        return []

    def _copy_if_interface(self, graph: GraphEditor, visible: str, inner: str, *, inputs: bool) -> str:
        """``visible``, or an Identity copy of it when it already is an output (or, with ``inputs``, an input)."""
        if visible in graph.output_names or (inputs and visible in graph.input_names):
            source = self.names.new(f"{inner}_copy")
            graph.append([make_node("Identity", [visible], [source], name=self.names.new(f"{source}_Identity"))])
            return source
        return visible

    def _constant(self, graph: GraphEditor, base: str, values: np.ndarray) -> str:
        name = self.names.new(base)
        graph.append(
            [
                make_node(
                    "Constant",
                    [],
                    [name],
                    name=self.names.new(f"{name}_Constant"),
                    attrs={"value": make_tensor(name, values)},
                )
            ]
        )
        return name

    def _min_max_pair(self, body: GraphEditor, visible: str, inner: str, *, paired: bool) -> str:
        """A new body tensor ``[min, max]`` (shape [2]) of ``visible``; of its columns when it holds pairs."""
        new = self.names.new
        shape = self._constant(body, f"{inner}_pair_shape", np.array([-1, 2] if paired else [-1], dtype=np.int64))
        flat = new(f"{inner}_flat")
        nodes = [make_node("Reshape", [visible, shape], [flat], name=new(f"{flat}_Reshape"))]
        ends = []
        for col, op in enumerate(("ReduceMin", "ReduceMax")):
            source = flat
            if paired:
                index = self._constant(body, f"{inner}_col{col}", np.array(col, dtype=np.int64))
                source = new(f"{inner}_col{col}_values")
                nodes.append(
                    make_node("Gather", [flat, index], [source], name=new(f"{source}_Gather"), attrs={"axis": 1})
                )
            end = new(f"{inner}_{op[6:].lower()}")
            nodes.append(make_node(op, [source], [end], name=new(f"{end}_{op}"), attrs={"keepdims": 1}))
            ends.append(end)
        pair = new(f"{inner}_min_max")
        nodes.append(make_node("Concat", ends, [pair], name=new(f"{pair}_Concat"), attrs={"axis": 0}))
        body.append(nodes)
        return pair

    def _expose_if(self, graph: GraphEditor, node: onnx.NodeProto, path: str) -> list[_Found]:
        branches = graph.subgraphs_of(node)
        then_g, else_g = branches["then_branch"], branches["else_branch"]
        found: list[_Found] = []
        for attr, side, other in (("then_branch", then_g, else_g), ("else_branch", else_g, then_g)):
            for visible, inner, elem, paired in self.collect(side, f"{path}/{attr}", with_inputs=False):
                side.add_output(self._copy_if_interface(side, visible, inner, inputs=False), elem)
                dummy = self.names.new(f"{inner}_not_taken")
                empty = make_tensor(dummy, np.zeros((0,), dtype=helper.tensor_dtype_to_np_dtype(elem)))
                const = make_node(
                    "Constant", [], [dummy], name=self.names.new(f"{dummy}_Constant"), attrs={"value": empty}
                )
                other.append([const])
                other.add_output(dummy, elem)
                out = self.names.new(f"{inner}_exposed")
                graph.add_node_output(node, out)
                found.append((out, inner, elem, paired))
        return found

    def _expose_loop(self, graph: GraphEditor, node: onnx.NodeProto, path: str) -> list[_Found]:
        body = graph.subgraphs_of(node)["body"]
        # Loop body inputs: (iteration, cond, states...); Scan body inputs: (states..., scan slices...)
        inputs = body.input_names[2:] if node.op_type == "Loop" else body.input_names
        found: list[_Found] = []
        tensors: list[_Found] = [(name, name, self.types.get(name, 0), False) for name in inputs]
        tensors = [t for t in tensors if t[2] == onnx.TensorProto.FLOAT]
        tensors += self.collect(body, f"{path}/body", with_inputs=False)
        for visible, inner, elem, paired in tensors:
            if self.reduce_loops:
                body.add_output(self._min_max_pair(body, visible, inner, paired=paired), elem)
            else:
                body.add_output(self._copy_if_interface(body, visible, inner, inputs=True), elem)
            out = self.names.new(f"{inner}_exposed")
            graph.add_node_output(node, out)
            found.append((out, inner, elem, self.reduce_loops))
        if node.op_type == "Scan" and found:
            for attr in ("scan_output_axes", "scan_output_directions"):
                graph.extend_ints_attribute(node, attr, [0] * len(found))
        return found


def expose_subgraph_tensors(
    model: onnx.ModelProto, types: Mapping[str, int], *, reduce_loops: bool = False
) -> ExposedModel:
    """Copy ``model`` and carry every float tensor of its subgraphs out as a main-graph output.

    Args:
        model: the model (not modified).
        types: element type of each tensor (from shape inference); tensors of unknown type inside
            an If branch cannot get a matching dummy and stay unexposed.
        reduce_loops: carry Loop/Scan body tensors out as per-iteration ``[min, max]`` pairs
            (listed in ``ExposedModel.reduced``) instead of stacking their values.
    """
    editor = ModelEditor(model)
    exposer = _Exposer(types, editor.names, [], reduce_loops)
    exposed: list[_Found] = []
    for node in editor.graph.nodes:
        exposed += exposer.expose_node(editor.graph, node, node.name)
    names: dict[str, str] = {}
    for visible, inner, elem, _ in exposed:
        editor.graph.add_output(visible, elem)
        names[visible] = inner
    reduced = frozenset(visible for visible, _, _, paired in exposed if paired)
    return ExposedModel(editor.build(), names, tuple(exposer.skipped), reduced)
