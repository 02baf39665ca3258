"""A read-only index of one graph: producers, consumers, constants, element types and shapes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from quantcli.graph.model_io import tensor_array
from quantcli.graph.scopes import node_subgraphs, outer_references

__all__ = ["GraphIndex", "recorded_shapes"]

#: constants at least this large are not cached by ``GraphIndex.constant`` (bytes)
_CACHE_BELOW = 64 << 20


def recorded_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int | str | None, ...]]:
    """The shape ``graph`` records for each input, value_info and output (a dim: its value, symbol or None);
    the first record of a name wins."""
    shapes: dict[str, tuple[int | str | None, ...]] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)
            shapes.setdefault(vi.name, shape)
    return shapes


@dataclass(slots=True)
class GraphIndex:
    """Read-only lookups over one graph: who produces and who consumes each tensor, and constants."""

    graph: onnx.GraphProto
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    elem_types: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int | str | None, ...]] = field(default_factory=dict)
    graph_inputs: tuple[str, ...] = ()
    graph_outputs: tuple[str, ...] = ()
    _arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        graph: onnx.GraphProto,
        *,
        outer: dict[str, onnx.TensorProto] | None = None,
        shapes: Mapping[str, tuple[int | str | None, ...]] | None = None,
    ) -> GraphIndex:
        """Index ``graph`` (its value_info should come from shape inference where possible).

        ``outer`` holds constants of enclosing graphs that a subgraph may read. A node holding
        subgraphs (If, Loop, Scan) counts as a consumer of every outer value its subgraphs read.
        ``shapes`` win over the shapes ``graph`` records (planning's sizes for dynamic input dims,
        ``quantcli.graph.pinning``).
        """
        index = cls(graph=graph)
        for name, init in (outer or {}).items():
            index.initializers[name] = init
            index.elem_types[name] = init.data_type
            index.shapes[name] = tuple(init.dims)
        for init in graph.initializer:
            index.initializers[init.name] = init
            index.elem_types[init.name] = init.data_type
            index.shapes[init.name] = tuple(init.dims)
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                index.elem_types.setdefault(vi.name, vi.type.tensor_type.elem_type)
        for name, shape in recorded_shapes(graph).items():
            index.shapes.setdefault(name, shape)
        index.shapes.update(shapes or {})
        for node in graph.node:
            for out in node.output:
                if out:
                    index.producers[out] = node
            for inp in node.input:
                if inp:
                    index.consumers.setdefault(inp, []).append(node)
            implicit: set[str] = set()
            for _, sub in node_subgraphs(node):
                implicit |= outer_references(sub)
            for inp in sorted(implicit - set(node.input)):
                index.consumers.setdefault(inp, []).append(node)
        init_names = set(index.initializers)
        index.graph_inputs = tuple(i.name for i in graph.input if i.name not in init_names)
        index.graph_outputs = tuple(o.name for o in graph.output)
        return index

    def is_constant(self, name: str) -> bool:
        """True for initializers that are not overridable graph inputs."""
        return name in self.initializers and name not in self.graph_inputs

    def constant(self, name: str) -> np.ndarray:
        """The value of an initializer as a numpy array (cached, unless it is large: a model's big
        weights are read when asked, so that their float copies do not pile up while they are quantized)."""
        if name in self._arrays:
            return self._arrays[name]
        value = tensor_array(self.initializers[name])
        if value.nbytes < _CACHE_BELOW:
            self._arrays[name] = value
        return value

    def is_float(self, name: str) -> bool:
        """True when the tensor is known to be float32."""
        return self.elem_types.get(name) == onnx.TensorProto.FLOAT

    def consumers_of(self, name: str) -> list[onnx.NodeProto]:
        """Nodes reading ``name`` (empty if none)."""
        return self.consumers.get(name, [])
