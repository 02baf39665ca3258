"""Conversion modes other than static QDQ: what they share (the mode enum, the report, weight checks).

``static`` is the calibrated QDQ pipeline of ``planning``/``rewrite``. The other modes need no
calibration data and each lives in its own module:

* ``dynamic`` (``quantcli.modes.dynamic``): int8 weights, activations quantized at run time;
* ``weight-only`` (``quantcli.modes.weight_only``): block-quantized 4/8-bit weights in MatMulNBits;
* ``fp16`` (``quantcli.modes.fp16``): float16 weights and compute, float32 model inputs and outputs.

Each returns a new model (the input is never modified) and a ``ModeReport``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

from quantcli.core.options import StrEnum
from quantcli.core.selection import NodeSelector
from quantcli.graph.editor import GraphEditor, ModelEditor
from quantcli.graph.index import GraphIndex

if TYPE_CHECKING:
    from quantcli.static.plan import Skip

__all__ = [
    "ConvertMode",
    "ModeReport",
    "WeightOnlyType",
    "add_constant",
    "constant_weight_problem",
    "dense_weight_problem",
    "finish",
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


def add_constant(graph: GraphEditor, base: str, values: np.ndarray) -> str:
    """Add a constant under a fresh name derived from ``base``; returns the name.

    Stored through ``np.ascontiguousarray``, which turns a scalar into a 1-element vector: the
    modes have always written their scalar zero points so (golden hashes pin it).
    """
    return graph.add_initializer(base, np.ascontiguousarray(values))


def finish(editor: ModelEditor) -> onnx.ModelProto:
    """The edited model: node edits committed, then initializers and value_info of tensors gone dropped."""
    editor.graph.commit()
    editor.graph.prune_initializers()
    # value_info of tensors that no longer exist, or whose type changed, would mislead shape inference
    editor.graph.prune_value_info()
    return editor.build()


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
