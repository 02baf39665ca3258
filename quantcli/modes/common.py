"""Conversion modes other than static QDQ: what they share (the mode enum, the report, graph editing).

``static`` is the calibrated QDQ pipeline of ``planning``/``rewrite``. The other modes need no
calibration data and each lives in its own module:

* ``dynamic`` (``quantcli.modes.dynamic``): int8 weights, activations quantized at run time;
* ``weight-only`` (``quantcli.modes.weight_only``): block-quantized 4/8-bit weights in MatMulNBits;
* ``fp16`` (``quantcli.modes.fp16``): float16 weights and compute, float32 model inputs and outputs.

Each returns a new model (the input is never modified) and a ``ModeReport``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.options import StrEnum
from quantcli.core.selection import NodeSelector
from quantcli.graph.model import GraphIndex
from quantcli.graph.subgraphs import NameAllocator

if TYPE_CHECKING:
    from quantcli.static.planning import Skip

__all__ = [
    "ConvertMode",
    "GraphEdit",
    "ModeReport",
    "WeightOnlyType",
    "constant_weight_problem",
    "dense_weight_problem",
    "matching_nodes",
]


class ConvertMode(StrEnum):
    """What ``convert`` produces."""

    STATIC = "static"
    DYNAMIC = "dynamic"
    WEIGHT_ONLY = "weight-only"
    FP16 = "fp16"


class WeightOnlyType(StrEnum):
    """Weight formats of ``--mode weight-only``: ``int*`` symmetric per block, ``uint*`` with zero points."""

    INT4 = "int4"
    UINT4 = "uint4"
    INT8 = "int8"
    UINT8 = "uint8"

    @property
    def bits(self) -> int:
        """Bits per weight."""
        return 4 if self in (WeightOnlyType.INT4, WeightOnlyType.UINT4) else 8

    @property
    def symmetric(self) -> bool:
        """True when the zero point is fixed at 2^(bits-1) (no zero-point tensor is written)."""
        return self in (WeightOnlyType.INT4, WeightOnlyType.INT8)


@dataclass(frozen=True, slots=True)
class ModeReport:
    """What a non-static mode changed.

    Attributes:
        mode: the conversion mode.
        converted: (node name, original op type, what it became) per rewritten node.
        skipped: nodes the mode could have rewritten but left alone, and why.
        notes: facts worth one line each in the report (e.g. the weight format chosen).
    """

    mode: ConvertMode
    converted: tuple[tuple[str, str, str], ...] = ()
    skipped: tuple[Skip, ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self) -> dict[str, int]:
        """Counts per 'op -> replacement'."""
        counts: dict[str, int] = {}
        for _, op, new in self.converted:
            key = f"{op} -> {new}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))


@dataclass(slots=True)
class GraphEdit:
    """A functional rewrite of one graph: nodes replaced in place, initializers added, unused ones dropped.

    ``replace(node, new_nodes)`` puts ``new_nodes`` where ``node`` was, so a topologically sorted
    graph stays sorted as long as the new nodes only read tensors available at that point. Nodes are
    named by their position in ``nodes`` (protobuf hands out a new wrapper object on every access, so
    only the objects in ``nodes`` are valid arguments).
    """

    model: onnx.ModelProto
    names: NameAllocator = field(init=False)
    nodes: list[onnx.NodeProto] = field(init=False)
    _position: dict[int, int] = field(init=False)
    _replacements: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    _before: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    _initializers: list[onnx.TensorProto] = field(default_factory=list)
    _domains: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = NameAllocator.for_graph(self.model.graph)
        self.nodes = list(self.model.graph.node)
        self._position = {id(n): i for i, n in enumerate(self.nodes)}

    def add_initializer(self, base: str, values: np.ndarray) -> str:
        """Add a constant under a fresh name derived from ``base``; returns the name."""
        name = self.names.new(base)
        self._initializers.append(numpy_helper.from_array(np.ascontiguousarray(values), name))
        return name

    def replace(self, node: onnx.NodeProto, new_nodes: Iterable[onnx.NodeProto]) -> None:
        """Put ``new_nodes`` in place of ``node`` (one of ``self.nodes``)."""
        self._replacements[self._position[id(node)]] = list(new_nodes)

    def insert_before(self, node: onnx.NodeProto, new_nodes: Iterable[onnx.NodeProto]) -> None:
        """Emit ``new_nodes`` just before ``node`` (which stays unless also replaced)."""
        self._before.setdefault(self._position[id(node)], []).extend(new_nodes)

    def use_domain(self, domain: str, version: int) -> None:
        """Make sure the model imports ``domain`` (e.g. com.microsoft)."""
        self._domains[domain] = max(version, self._domains.get(domain, 0))

    def build(self) -> onnx.ModelProto:
        """The edited copy; initializers no node reads any more are dropped."""
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        nodes: list[onnx.NodeProto] = []
        for i, node in enumerate(self.nodes):
            nodes.extend(self._before.get(i, []))
            nodes.extend(self._replacements.get(i, [node]))
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        out.graph.initializer.extend(self._initializers)
        used = {name for n in out.graph.node for name in n.input} | {o.name for o in out.graph.output}
        used |= _subgraph_reads(out.graph)
        kept = [t for t in out.graph.initializer if t.name in used]
        del out.graph.initializer[:]
        out.graph.initializer.extend(kept)
        kept_names = {t.name for t in kept} | {n for node in nodes for n in node.output}
        # value_info of tensors that no longer exist, or whose type changed, would mislead shape inference
        vis = [v for v in out.graph.value_info if v.name in kept_names]
        del out.graph.value_info[:]
        out.graph.value_info.extend(vis)
        imported = {imp.domain: imp for imp in out.opset_import}
        for domain, version in sorted(self._domains.items()):
            if domain in imported:
                imported[domain].version = max(imported[domain].version, version)
            else:
                out.opset_import.append(onnx.helper.make_opsetid(domain, version))
        return out


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subs:
                for n in sub.node:
                    names.update(n.input)
                names |= _subgraph_reads(sub)
    return names


def constant_weight_problem(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    """Why ``node``'s second input is not a finite float32 constant read with a float input, or None."""
    if len(node.input) < 2 or not index.is_constant(node.input[1]):
        return "B is not a constant (activation x activation)"
    if not index.is_float(node.input[0]) or index.elem_types.get(node.input[1]) != TensorProto.FLOAT:
        return "not float32"
    if not np.all(np.isfinite(index.constant(node.input[1]))):
        return "weight holds NaN/inf"
    return None


def dense_weight_problem(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    """Why a MatMul/Gemm cannot take a constant-weight rewrite (dynamic, weight-only), or None.

    Besides ``constant_weight_problem``: the weight must be 2-D and the input of rank >= 2; a Gemm
    must not transpose A, and its C must be a constant per-column bias.
    """
    problem = constant_weight_problem(index, node)
    if problem is not None:
        return problem
    w = index.constant(node.input[1])
    if w.ndim != 2:
        return f"weight has rank {w.ndim}, not 2"
    if node.input[0] in index.shapes and len(index.shapes[node.input[0]]) < 2:
        return "input has rank < 2"
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            return "transA=1"
        if len(node.input) > 2 and node.input[2]:
            if not index.is_constant(node.input[2]):
                return "C is not a constant"
            c = index.constant(node.input[2])
            cols = w.shape[0] if attrs.get("transB", 0) else w.shape[1]
            if c.size not in (1, cols) or (c.ndim == 2 and c.shape[0] != 1):
                return "C is not a per-column bias"
    return None


def matching_nodes(model: onnx.ModelProto, patterns: Iterable[str]) -> frozenset[str]:
    """Names of the nodes matched by ``--exclude-nodes`` patterns (glob, or ``re:`` + regex)."""
    return NodeSelector(patterns=tuple(patterns)).excluded_names(model.graph.node)
