"""Unique names for the nodes, tensors and initializers a rewrite adds to a model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx

from quantcli.graph.scopes import walk_graphs

__all__ = ["NameAllocator"]


@dataclass(slots=True)
class NameAllocator:
    """Hands out names that collide with nothing in the graph nor with each other."""

    taken: set[str] = field(default_factory=set)

    @classmethod
    def for_graph(cls, graph: onnx.GraphProto) -> NameAllocator:
        """Reserve every node, tensor and initializer name of ``graph`` and of its subgraphs."""
        taken: set[str] = set()
        for _, g in walk_graphs(graph):
            taken |= {n.name for n in g.node} | {t.name for t in g.initializer}
            taken |= {v.name for v in [*g.input, *g.output, *g.value_info]}
            for node in g.node:
                taken |= set(node.input) | set(node.output)
        return cls(taken)

    @classmethod
    def reserving(cls, names: Iterable[str]) -> NameAllocator:
        """An allocator that avoids only ``names`` (for passes that name within a narrower scope)."""
        return cls(set(names))

    def new(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``... whichever is free."""
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name
