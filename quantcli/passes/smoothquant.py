"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights of MatMul/Gemm.

For Y = X W with a constant W [K, N] and an activation X [..., K] whose few outlier channels stretch
its per-tensor quantization range, any s > 0 per input channel j gives the same FP32 product:

    Y = (X diag(s)^-1) (diag(s) W)

With a_j = max |X[..., j]| over the calibration data and w_j = max |W[j, :]| (over every smoothed
reader of X, which share one s), SmoothQuant picks

    s_j = a_j^alpha / w_j^(1 - alpha)          (alpha = 0.5 by default; s_j = 1 where a_j or w_j is 0)

so both X / s and s W have channel ranges sqrt(a_j w_j) at alpha = 0.5. Rows of W (columns of B for
Gemm with transB=1) are multiplied by s. X / s costs nothing when it folds into X's producer, walked
back through single-reader Adds with a constant operand (whose constant is divided by s):

* LayerNormalization over the last axis: scale and bias divided by s;
* Mul by a constant (e.g. the 0.5 closing an exported Gelu): the constant becomes c / s;
* Mul of two activations: one factor, walked back the same way (a LayerNormalization decomposed
  into primitive ops ends in ``(x - mean) * (rsqrt(var + eps) * gamma) + beta``: gamma and beta fold);
* MatMul/Gemm with a constant weight: its output columns (and Gemm's C) divided by s.

Otherwise (a graph input, Reshape, GlobalAveragePool...) a Mul by the constant 1/s is inserted in
front of the smoothed readers; it runs in float and costs time, so it is reported. Readers that
only look at X's shape (Shape, Size) do not block folding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from quantcli.graph.editor import GraphEditor, ModelEditor, make_node
from quantcli.graph.index import GraphIndex
from quantcli.stats.observers import ChannelStats

__all__ = ["SmoothQuantReport", "Smoothed", "smooth", "smooth_tracked", "smoothing_chains", "smoothquant_targets"]

_SHAPE_ONLY = ("Shape", "Size")
_SCALE_LIMIT = 1e5


@dataclass(frozen=True, slots=True)
class SmoothQuantReport:
    """What SmoothQuant did."""

    alpha: float
    smoothed_nodes: int
    inputs: int
    folded: dict[str, int] = field(default_factory=dict)
    inserted_muls: int = 0

    def lines(self) -> list[str]:
        """Human-readable summary."""
        folds = ", ".join(f"{n} folded into {op}" for op, n in sorted(self.folded.items()))
        line = f"SmoothQuant (alpha {self.alpha:g}): {self.smoothed_nodes} MatMul/Gemm smoothed on {self.inputs} inputs"
        out = [line + (f", {folds}" if folds else "")]
        if self.inserted_muls:
            out.append(
                f"SmoothQuant: {self.inserted_muls} inputs had no producer to fold 1/s into; "
                "a float Mul by 1/s was inserted before their readers (costs a little speed)"
            )
        return out


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@dataclass(slots=True)
class _Graph:
    index: GraphIndex
    uses: dict[str, int]

    def own_float_constant(self, name: str) -> bool:
        return (
            bool(name)
            and self.index.is_constant(name)
            and self.uses.get(name, 0) == 1
            and self.index.constant(name).dtype == np.float32
        )

    def single_reader(self, tensor: str) -> bool:
        return len(self.index.consumers_of(tensor)) == 1 and tensor not in self.index.graph_outputs


def _weight_rows(node: onnx.NodeProto, g: _Graph) -> tuple[int, int] | None:
    """(K, axis of K in the weight) when ``node`` is a MatMul/Gemm SmoothQuant can scale, else None."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    if not g.own_float_constant(node.input[1]) or g.index.is_constant(node.input[0]):
        return None
    w = g.index.constant(node.input[1])
    if w.ndim != 2:
        return None
    if node.op_type == "Gemm":
        attrs = _attrs(node)
        if attrs.get("transA", 0):
            return None
        axis = 1 if attrs.get("transB", 0) else 0
    else:
        axis = 0
    return w.shape[axis], axis


def smoothquant_targets(model: onnx.ModelProto) -> dict[str, int]:
    """Activations read by a smoothable MatMul/Gemm, each with its channel axis (-1), in graph order."""
    index = GraphIndex.build(model.graph)
    g = _Graph(index, _use_counts(model.graph))
    targets: dict[str, int] = {}
    for node in model.graph.node:
        if _weight_rows(node, g) is not None and index.elem_types.get(node.input[0], onnx.TensorProto.FLOAT) == 1:
            targets.setdefault(node.input[0], -1)
    return targets


def _use_counts(graph: onnx.GraphProto) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return uses


def _fold_plan(
    tensor: str, g: _Graph, k: int, *, strict: bool = False
) -> tuple[list[tuple[onnx.NodeProto, str]], str, list[str]] | None:
    """How to divide ``tensor`` by s inside its producers: [(node, what)], the terminal op type, and
    every tensor whose values the fold divides by s (``tensor`` first).

    A product of two activations is divided by dividing one factor (a LayerNormalization written as
    primitive ops ends in ``(x - mean) * (rsqrt(var + eps) * gamma) + beta``); inside a factor,
    ``strict`` requires constants of last dimension K, which proves the factor itself has K channels.
    """
    steps: list[tuple[onnx.NodeProto, str]] = []
    t = tensor
    visited = [tensor]
    while True:
        node = g.index.producers.get(t)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op in ("Add", "Mul") and len(node.input) == 2:
            consts = [i for i in node.input if g.own_float_constant(i)]
            if op == "Mul" and not consts and not any(g.index.is_constant(i) for i in node.input):
                for factor in reversed(node.input):
                    sub = _fold_plan(factor, g, k, strict=True) if g.single_reader(factor) else None
                    if sub is not None:
                        return steps + sub[0], sub[1], visited + sub[2]
                return None
            if len(consts) != 1:
                return None
            c = g.index.constant(consts[0])
            if (c.ndim and c.shape[-1] not in (1, k)) or (strict and c.shape[-1:] != (k,)):
                return None
            steps.append((node, consts[0]))
            if op == "Mul":
                return steps, "Mul", visited
            t = node.input[0] if node.input[1] == consts[0] else node.input[1]
            if not g.single_reader(t):
                return None
            visited.append(t)
            continue
        if op == "LayerNormalization":
            if int(_attrs(node).get("axis", -1)) != -1 or not g.own_float_constant(node.input[1]):
                return None
            if len(node.input) > 2 and node.input[2] and not g.own_float_constant(node.input[2]):
                return None
            if g.index.constant(node.input[1]).shape[-1:] != (k,):
                return None
            steps.append((node, "ln"))
            return steps, op, visited
        rows = _weight_rows(node, g)
        if rows is not None:
            w = g.index.constant(node.input[1])
            out_axis = 1 - rows[1]
            if w.shape[out_axis] != k:
                return None
            if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                if not g.own_float_constant(node.input[2]) or float(_attrs(node).get("beta", 1.0)) == 0.0:
                    return None
                c = g.index.constant(node.input[2])
                if c.ndim and c.shape[-1] not in (1, k):
                    return None
            steps.append((node, "weight"))
            return steps, op, visited
        return None


def _divide_last(c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """c / s along the last axis; a scalar or size-1 last axis becomes length K."""
    c64 = c.astype(np.float64)
    if c64.ndim == 0:
        return (c64 / s).astype(np.float32)
    return (c64 / s.reshape((1,) * (c64.ndim - 1) + (-1,))).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Smoothed:
    """A smoothed model, its report, and which of its tensors are an input tensor divided by s.

    ``divided`` maps a tensor of ``model`` to (the tensor of the input model it equals once divided
    by s along its last axis, s): the folded tensors keep their names, an inserted Mul's output is
    new. Every other tensor holds the input model's values (up to float rounding), so statistics of
    the input model carry over: per-channel ones of a divided tensor are the input's divided by s.
    """

    model: onnx.ModelProto
    report: SmoothQuantReport
    divided: dict[str, tuple[str, np.ndarray]]


def smoothing_chains(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Each SmoothQuant target, with the tensors smoothing it may divide by s (data-free).

    The target itself and the tensors its fold walks back through; a target whose 1/s cannot fold
    gets an inserted Mul instead, and no tensor of ``model`` changes (empty list).
    """
    index = GraphIndex.build(model.graph)
    g = _Graph(index, _use_counts(model.graph))
    chains: dict[str, list[str]] = {}
    for tensor in smoothquant_targets(model):
        readers = index.consumers_of(tensor)
        smooth_readers = [r for r in readers if r.input[0] == tensor and _weight_rows(r, g) is not None]
        if not smooth_readers:
            continue
        k = _weight_rows(smooth_readers[0], g)[0]  # type: ignore[index]
        smooth_readers = [r for r in smooth_readers if _weight_rows(r, g)[0] == k]  # type: ignore[index]
        others = [r for r in readers if r not in smooth_readers and r.op_type not in _SHAPE_ONLY]
        plan = None if others or tensor in index.graph_outputs else _fold_plan(tensor, g, k)
        chains[tensor] = plan[2] if plan is not None else []
    return chains


def smooth(
    model: onnx.ModelProto, stats: Mapping[str, ChannelStats], *, alpha: float = 0.5
) -> tuple[onnx.ModelProto, SmoothQuantReport]:
    """Return a smoothed copy of ``model``; ``stats`` holds abs-max per last-axis channel of its targets."""
    done = smooth_tracked(model, stats, alpha=alpha)
    return done.model, done.report


@dataclass(slots=True)
class _Edits:
    """Constants replaced, initializers and Muls added, and tensors divided, while smoothing."""

    index: GraphIndex
    updates: dict[str, np.ndarray] = field(default_factory=dict)
    new_inits: list[tuple[str, np.ndarray]] = field(default_factory=list)
    inserted: dict[str, onnx.NodeProto] = field(default_factory=dict)  # first smoothed reader -> Mul before it
    folded: dict[str, int] = field(default_factory=dict)
    divided: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)

    def current(self, name: str) -> np.ndarray:
        return self.updates[name] if name in self.updates else self.index.constant(name)


def smooth_tracked(model: onnx.ModelProto, stats: Mapping[str, ChannelStats], *, alpha: float = 0.5) -> Smoothed:
    """``smooth``, also telling which tensors were divided by s (``Smoothed.divided``)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("SmoothQuant alpha must be within [0, 1]")
    edit = ModelEditor(model)
    graph = edit.graph.proto
    index = GraphIndex.build(graph)
    g = _Graph(index, _use_counts(graph))
    names = edit.names
    edits = _Edits(index)
    smoothed = inputs = 0
    for tensor in smoothquant_targets(model):
        if tensor not in stats:
            continue
        readers = index.consumers_of(tensor)
        smooth_readers = [r for r in readers if r.input[0] == tensor and _weight_rows(r, g) is not None]
        k = _weight_rows(smooth_readers[0], g)[0] if smooth_readers else 0  # type: ignore[index]
        smooth_readers = [r for r in smooth_readers if _weight_rows(r, g)[0] == k]  # type: ignore[index]
        a = np.asarray(stats[tensor].absmax, dtype=np.float64)
        if not smooth_readers or a.shape != (k,):
            continue
        s = _scales(a, smooth_readers, g, edits, alpha)
        others = [r for r in readers if r not in smooth_readers and r.op_type not in _SHAPE_ONLY]
        plan = None if others or tensor in index.graph_outputs else _fold_plan(tensor, g, k)
        if plan is not None:
            _fold(plan, s, g, edits)
        else:
            inv = names.new(f"{tensor}_smooth_inv_scale")
            edits.new_inits.append((inv, (1.0 / s).astype(np.float32)))
            smoothed_out = names.new(f"{tensor}_smoothed")
            mul = make_node("Mul", [tensor, inv], [smoothed_out], name=names.new(f"{tensor}_SmoothQuant_Mul"))
            for r in smooth_readers:
                edit.graph.set_input(r, 0, smoothed_out)
            edits.inserted[smooth_readers[0].name] = mul
            edits.divided[smoothed_out] = (tensor, s)
        smoothed += len(smooth_readers)
        inputs += 1
    _write(edit.graph, edits)
    report = SmoothQuantReport(alpha, smoothed, inputs, dict(sorted(edits.folded.items())), len(edits.inserted))
    return Smoothed(edit.build(), report, edits.divided)


def _scales(a: np.ndarray, readers: list[onnx.NodeProto], g: _Graph, edits: _Edits, alpha: float) -> np.ndarray:
    """s_j = a_j^alpha / w_j^(1 - alpha) over every reader's weight rows; the rows are multiplied by s."""
    w_max = np.zeros(a.shape[0])
    for r in readers:
        _, axis = _weight_rows(r, g)  # type: ignore[misc]
        w = np.abs(edits.current(r.input[1]).astype(np.float64))
        w_max = np.maximum(w_max, w.max(axis=1 - axis))
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where((a > 0) & (w_max > 0), a**alpha / w_max ** (1.0 - alpha), 1.0)
    s = np.clip(s, 1.0 / _SCALE_LIMIT, _SCALE_LIMIT)
    for r in readers:
        _, axis = _weight_rows(r, g)  # type: ignore[misc]
        w = edits.current(r.input[1]).astype(np.float64)
        edits.updates[r.input[1]] = (w * (s[:, None] if axis == 0 else s[None, :])).astype(np.float32)
    return s


def _fold(
    plan: tuple[list[tuple[onnx.NodeProto, str]], str, list[str]], s: np.ndarray, g: _Graph, edits: _Edits
) -> None:
    """Divide the plan's constants by s: every tensor it visited is then divided by s."""
    steps, terminal, visited = plan
    for node, what in steps:
        if what == "ln":
            for name in node.input[1:3]:
                if name:
                    edits.updates[name] = _divide_last(edits.current(name), s)
        elif what == "weight":
            _, axis = _weight_rows(node, g)  # type: ignore[misc]
            w = edits.current(node.input[1]).astype(np.float64)
            edits.updates[node.input[1]] = (w / (s[None, :] if axis == 0 else s[:, None])).astype(np.float32)
            if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                edits.updates[node.input[2]] = _divide_last(edits.current(node.input[2]), s)
        else:
            edits.updates[what] = _divide_last(edits.current(what), s)
    edits.folded[terminal] = edits.folded.get(terminal, 0) + 1
    edits.divided.update((t, (t, s)) for t in visited)


def _write(graph: GraphEditor, edits: _Edits) -> None:
    """Replace the updated initializers, add the new ones, and place each inserted Mul before its reader."""
    for name, values in edits.updates.items():
        graph.set_initializer(name, values)
    for name, values in edits.new_inits:
        graph.put_initializer(name, values)
    for node in graph.nodes:
        if node.name in edits.inserted:
            graph.insert_before(node, [edits.inserted[node.name]])
