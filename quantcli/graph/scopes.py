"""Control-flow subgraph scopes (If, Loop, Scan): walk them, and find what they read from outside.

Read-only helpers over protobuf graphs, except ``rename_references`` (used by the graph editor).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import onnx

__all__ = [
    "CONTROL_FLOW_OPS",
    "elem_types",
    "graph_of_nodes",
    "has_subgraphs",
    "node_subgraphs",
    "outer_references",
    "rename_references",
    "subgraph_reads",
    "walk_graphs",
]

CONTROL_FLOW_OPS = ("If", "Loop", "Scan")


def node_subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """The graph attributes of ``node`` as (attribute name, graph)."""
    found: list[tuple[str, onnx.GraphProto]] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append((attr.name, attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend((f"{attr.name}[{i}]", g) for i, g in enumerate(attr.graphs))
    return found


def walk_graphs(graph: onnx.GraphProto, path: str = "") -> Iterator[tuple[str, onnx.GraphProto]]:
    """``graph`` (path ``""``) and every nested subgraph, depth first, as (path, graph).

    A subgraph's path is ``<node name>/<attribute>``, joined with ``/`` for nesting, e.g.
    ``If_0/then_branch/LSTM_if/else_branch``.
    """
    yield path, graph
    for node in graph.node:
        for attr, sub in node_subgraphs(node):
            yield from walk_graphs(sub, f"{path}/{node.name}/{attr}" if path else f"{node.name}/{attr}")


def has_subgraphs(graph: onnx.GraphProto) -> bool:
    """True if any node of ``graph`` holds a subgraph."""
    return any(node_subgraphs(n) for n in graph.node)


def _defined(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {o for n in graph.node for o in n.output if o}
    return names


def outer_references(graph: onnx.GraphProto) -> set[str]:
    """Names read inside ``graph`` (or deeper) that ``graph`` does not define: its implicit inputs."""
    defined = _defined(graph)
    used = {i for n in graph.node for i in n.input if i} | {o.name for o in graph.output}
    for node in graph.node:
        for _, sub in node_subgraphs(node):
            used |= outer_references(sub)
    return used - defined


def rename_references(graph: onnx.GraphProto, renames: Mapping[str, str], *, outputs: bool = False) -> None:
    """Rename every read of a name in ``renames`` inside ``graph``'s nested subgraphs (outer-scope reads).

    With ``outputs``, a subgraph output naming an outer value directly is renamed too.
    """
    if not renames:
        return
    for node in graph.node:
        for _, sub in node_subgraphs(node):
            local = _defined(sub)
            active = {k: v for k, v in renames.items() if k not in local}
            if not active:
                continue
            for inner in sub.node:
                for i, name in enumerate(inner.input):
                    if name in active:
                        inner.input[i] = active[name]
            if outputs:
                for out in sub.output:
                    if out.name in active:
                        out.name = active[out.name]
            rename_references(sub, active, outputs=outputs)


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every name a node inside ``graph``'s nested subgraphs (at any depth) reads."""
    names: set[str] = set()
    for node in graph.node:
        for _, sub in node_subgraphs(node):
            for n in sub.node:
                names.update(n.input)
            names |= subgraph_reads(sub)
    return names


def graph_of_nodes(graph: onnx.GraphProto) -> dict[str, str]:
    """Node name -> path of the graph holding it (``""`` for the main graph)."""
    return {n.name: path for path, g in walk_graphs(graph) for n in g.node}


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type ``model`` records, in any of its graphs."""
    types: dict[str, int] = {}
    for _, g in walk_graphs(model.graph):
        for t in g.initializer:
            types[t.name] = t.data_type
        for vi in [*g.input, *g.value_info, *g.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    return types
