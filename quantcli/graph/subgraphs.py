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

Nested subgraphs repeat this at each level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantcli.graph.names import NameAllocator
from quantcli.graph.scopes import (
    CONTROL_FLOW_OPS,
    elem_types,
    graph_of_nodes,
    has_subgraphs,
    node_subgraphs,
    outer_references,
    rename_references,
    subgraph_reads,
    walk_graphs,
)

__all__ = [
    # re-exported from quantcli.graph.scopes, where the graph walks live
    "CONTROL_FLOW_OPS",
    "ExposedModel",
    "elem_types",
    "expose_subgraph_tensors",
    "graph_of_nodes",
    "has_subgraphs",
    "node_subgraphs",
    "outer_references",
    "rename_references",
    "subgraph_reads",
    "walk_graphs",
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


def _value_info(name: str, elem_type: int) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto()
    vi.name = name
    if elem_type:
        vi.type.tensor_type.elem_type = elem_type
    return vi


@dataclass(slots=True)
class _Exposer:
    types: Mapping[str, int]
    names: NameAllocator
    skipped: list[tuple[str, str]]

    def local_tensors(self, graph: onnx.GraphProto, *, with_inputs: bool) -> list[tuple[str, int]]:
        """Float tensors produced in ``graph`` (and, for loop bodies, its inputs), graph order."""
        found: list[tuple[str, int]] = []
        if with_inputs:
            found += [(i.name, self.types.get(i.name, 0)) for i in graph.input]
        for node in graph.node:
            if node.op_type == "Constant":
                continue
            found += [(o, self.types.get(o, 0)) for o in node.output if o]
        return [(n, t) for n, t in found if t == onnx.TensorProto.FLOAT]

    def collect(self, graph: onnx.GraphProto, path: str, *, with_inputs: bool) -> list[tuple[str, str, int]]:
        """(name visible in ``graph``, inner tensor name, elem type) for ``graph`` and its subgraphs."""
        found = [(n, n, t) for n, t in self.local_tensors(graph, with_inputs=with_inputs)]
        for node in list(graph.node):
            found += self.expose_node(graph, node, f"{path}/{node.name}" if path else node.name)
        return found

    def expose_node(self, graph: onnx.GraphProto, node: onnx.NodeProto, path: str) -> list[tuple[str, str, int]]:
        if node.op_type == "If" and node.domain in ("", "ai.onnx"):
            return self._expose_if(node, path)
        if node.op_type in ("Loop", "Scan") and node.domain in ("", "ai.onnx"):
            return self._expose_loop(node, path)
        if node_subgraphs(node):
            self.skipped.append((path, f"op {node.op_type} holds a subgraph quantcli does not look into"))
        return []

    def _expose_if(self, node: onnx.NodeProto, path: str) -> list[tuple[str, str, int]]:
        branches = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        then_g, else_g = branches["then_branch"], branches["else_branch"]
        found: list[tuple[str, str, int]] = []
        for side, other in ((then_g, else_g), (else_g, then_g)):
            attr = "then_branch" if side is then_g else "else_branch"
            for visible, inner, elem in self.collect(side, f"{path}/{attr}", with_inputs=False):
                source = visible
                if any(o.name == visible for o in side.output):
                    source = self.names.new(f"{inner}_copy")
                    side.node.append(
                        helper.make_node("Identity", [visible], [source], name=self.names.new(f"{source}_Identity"))
                    )
                side.output.append(_value_info(source, elem))
                dummy = self.names.new(f"{inner}_not_taken")
                empty = numpy_helper.from_array(np.zeros((0,), dtype=helper.tensor_dtype_to_np_dtype(elem)), dummy)
                const = helper.make_node("Constant", [], [dummy], name=self.names.new(f"{dummy}_Constant"), value=empty)
                other.node.append(const)
                other.output.append(_value_info(dummy, elem))
                out = self.names.new(f"{inner}_exposed")
                node.output.append(out)
                found.append((out, inner, elem))
        return found

    def _expose_loop(self, node: onnx.NodeProto, path: str) -> list[tuple[str, str, int]]:
        body = next(a.g for a in node.attribute if a.name == "body")
        # Loop body inputs: (iteration, cond, states...); Scan body inputs: (states..., scan slices...)
        inputs = list(body.input[2:]) if node.op_type == "Loop" else list(body.input)
        found: list[tuple[str, str, int]] = []
        tensors = [(i.name, i.name, self.types.get(i.name, 0)) for i in inputs]
        tensors = [t for t in tensors if t[2] == onnx.TensorProto.FLOAT]
        tensors += self.collect(body, f"{path}/body", with_inputs=False)
        for visible, inner, elem in tensors:
            source = visible
            if any(i.name == visible for i in body.input) or any(o.name == visible for o in body.output):
                source = self.names.new(f"{inner}_copy")
                body.node.append(
                    helper.make_node("Identity", [visible], [source], name=self.names.new(f"{source}_Identity"))
                )
            body.output.append(_value_info(source, elem))
            out = self.names.new(f"{inner}_exposed")
            node.output.append(out)
            found.append((out, inner, elem))
        if node.op_type == "Scan" and found:
            for attr in node.attribute:
                if attr.name in ("scan_output_axes", "scan_output_directions"):
                    attr.ints.extend([0] * len(found))
        return found


def expose_subgraph_tensors(model: onnx.ModelProto, types: Mapping[str, int]) -> ExposedModel:
    """Copy ``model`` and carry every float tensor of its subgraphs out as a main-graph output.

    Args:
        model: the model (not modified).
        types: element type of each tensor (from shape inference); tensors of unknown type inside
            an If branch cannot get a matching dummy and stay unexposed.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    exposer = _Exposer(types, NameAllocator.for_graph(out.graph), [])
    exposed: list[tuple[str, str, int]] = []
    for node in list(out.graph.node):
        exposed += exposer.expose_node(out.graph, node, node.name)
    names: dict[str, str] = {}
    for visible, inner, elem in exposed:
        out.graph.output.append(_value_info(visible, elem))
        names[visible] = inner
    return ExposedModel(out, names, tuple(exposer.skipped))
