"""Bias correction (Nagel et al. 2019, section 4.2, empirical variant): remove the mean output shift
that weight quantization adds to Conv, Gemm and MatMul.

With E = dequantize(quantize(W)) - W the weight error, the quantized layer computes
y_q = (W + E) x + b, whose expected error is E[y_q - y] = E E[x]: a constant per output channel
when x has a non-zero mean (post-Relu activations always do). Subtracting it from the bias
(before the bias is quantized to int32) makes the error zero-mean:

    b'_o = b_o - shift_o

* MatMul x[..., K] @ W[K, N]:  shift_n = sum_k mean_k E[k, n]; the bias lives in the single-reader
  Add with a constant [N] operand that follows (no such Add: the node is left alone and reported).
* Gemm alpha * A B + beta * C:  shift = alpha * mean_A E (E^T with transB); C' = C - shift / beta
  (a C is created when absent).
* Conv x[N, C, H, W] with W[O, C/g, kh, kw]:  shift_o = sum_c mean_c * sum_taps E[o, c, taps], where
  mean_c is x's mean over N, H, W and c runs over o's group. Approximation: every tap is assumed to
  see the channel mean, but taps on zero padding see 0, so output positions at the borders are
  over-corrected by the padded taps' share; the interior is exact. A bias is created when absent.

mean_c comes from the statistics collector (``ChannelRequest``) on the FP32 model (the input of the
layer, before its own activation quantization). Weight errors are taken from the plan, so they are exactly those that
``rewrite`` writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from quantcli.core.qmath import dequantize
from quantcli.graph.editor import ModelEditor
from quantcli.graph.index import GraphIndex
from quantcli.static.plan import QuantPlan
from quantcli.stats.observers import ChannelStats

__all__ = ["BiasCorrectionReport", "bias_correction_candidates", "bias_correction_targets", "correct_biases"]


@dataclass(frozen=True, slots=True)
class BiasCorrectionReport:
    """What bias correction did."""

    corrected: dict[str, int] = field(default_factory=dict)
    created: int = 0
    skipped: tuple[tuple[str, str], ...] = ()

    def lines(self) -> list[str]:
        """Human-readable summary."""
        per_op = ", ".join(f"{op} {n}" for op, n in sorted(self.corrected.items()))
        total = sum(self.corrected.values())
        line = f"bias correction: {total} biases corrected" + (f" ({per_op})" if per_op else "")
        if self.created:
            line += f", {self.created} of them created"
        out = [line]
        reasons: dict[str, int] = {}
        for _, reason in self.skipped:
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, n in sorted(reasons.items()):
            out.append(f"bias correction: {n} nodes left alone: {reason}")
        return out


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _weight_quants(model: onnx.ModelProto, plan: QuantPlan) -> list[tuple[onnx.NodeProto, np.ndarray]]:
    """(node, weight error E) for every Conv/Gemm/MatMul whose constant weight the plan quantizes."""
    nodes = {n.name: n for n in model.graph.node}
    index = GraphIndex.build(model.graph)
    out = []
    for w in plan.weights:
        node = nodes.get(w.node)
        if node is None or w.input_index != 1 or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        original = index.constant(w.tensor).astype(np.float64)
        error = dequantize(w.quantized.values, w.quantized.params).astype(np.float64) - original
        out.append((node, error))
    return out


def bias_correction_targets(model: onnx.ModelProto, plan: QuantPlan) -> dict[str, int]:
    """Inputs whose per-channel mean bias correction needs (name -> channel axis)."""
    targets: dict[str, int] = {}
    for node, _ in _weight_quants(model, plan):
        targets.setdefault(node.input[0], 1 if node.op_type == "Conv" else -1)
    return targets


def bias_correction_candidates(model: onnx.ModelProto) -> dict[str, int]:
    """Inputs of every Conv/Gemm/MatMul of the main graph with a constant float weight (name -> channel
    axis): a superset of ``bias_correction_targets`` for any plan, known before calibration."""
    index = GraphIndex.build(model.graph)
    targets: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or not node.input[0]:
            continue
        if index.is_constant(node.input[0]) or not index.is_constant(node.input[1]):
            continue
        if index.constant(node.input[1]).dtype != np.float32:
            continue
        targets.setdefault(node.input[0], 1 if node.op_type == "Conv" else -1)
    return targets


def _shift(node: onnx.NodeProto, error: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    if node.op_type == "Conv":
        group = int(_attrs(node).get("group", 1))
        out_ch, per_group = error.shape[0], error.shape[1]
        if mean.shape != (per_group * group,) or out_ch % group:
            return None
        taps = error.reshape(out_ch, per_group, -1).sum(axis=2)
        group_of = np.arange(out_ch) // (out_ch // group)
        return (taps * mean.reshape(group, per_group)[group_of]).sum(axis=1)
    if error.ndim != 2:
        return None
    if node.op_type == "Gemm":
        attrs = _attrs(node)
        e = error.T if attrs.get("transB", 0) else error
        if mean.shape != (e.shape[0],):
            return None
        return float(attrs.get("alpha", 1.0)) * (mean @ e)
    if mean.shape != (error.shape[0],):
        return None
    return mean @ error


def correct_biases(
    model: onnx.ModelProto, plan: QuantPlan, stats: Mapping[str, ChannelStats]
) -> tuple[onnx.ModelProto, BiasCorrectionReport]:
    """A copy of ``model`` with the biases of the plan's quantized Conv/Gemm/MatMul corrected."""
    edit = ModelEditor(model)
    graph = edit.graph.proto
    index = GraphIndex.build(graph)
    uses: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            uses[name] = uses.get(name, 0) + 1
    updates: dict[str, np.ndarray] = {}
    new_inits: list[tuple[str, np.ndarray]] = []
    corrected: dict[str, int] = {}
    created = 0
    skipped: list[tuple[str, str]] = []
    by_name = {n.name: n for n in graph.node}
    for src, error in _weight_quants(model, plan):
        node = by_name[src.name]
        st = stats.get(node.input[0])
        shift = None if st is None else _shift(node, error, np.asarray(st.mean, dtype=np.float64))
        if shift is None:
            skipped.append((node.name, "input statistics do not match the weight's shape"))
            continue
        if node.op_type == "MatMul":
            readers = index.consumers_of(node.output[0])
            add = readers[0] if len(readers) == 1 and node.output[0] not in index.graph_outputs else None
            const = None
            if add is not None and add.op_type == "Add":
                const = next((i for i in add.input if i != node.output[0]), None)
            if (
                const is None
                or not index.is_constant(const)
                or uses.get(const, 0) != 1
                or index.constant(const).size != shift.size
                or index.constant(const).shape[-1:] != shift.shape
            ):
                skipped.append((node.name, "MatMul without a following bias Add (adding one would cost speed)"))
                continue
            bias = index.constant(const).astype(np.float64)
            updates[const] = (bias - shift.reshape(bias.shape)).astype(np.float32)
        else:
            beta = 1.0
            if node.op_type == "Gemm":
                beta = float(_attrs(node).get("beta", 1.0))
                if beta == 0.0:
                    skipped.append((node.name, "Gemm with beta=0"))
                    continue
            name = node.input[2] if len(node.input) > 2 else ""
            if name:
                if not index.is_constant(name) or uses.get(name, 0) != 1 or index.constant(name).size != shift.size:
                    skipped.append((node.name, "bias is shared or not a constant vector"))
                    continue
                bias = index.constant(name).astype(np.float64).reshape(-1)
                updates[name] = (bias - shift / beta).astype(np.float32).reshape(index.constant(name).shape)
            else:
                new = edit.names.new(f"{node.name}_corrected_bias")
                new_inits.append((new, (-shift / beta).astype(np.float32)))
                if len(node.input) > 2:
                    edit.graph.set_input(node, 2, new)
                else:
                    edit.graph.set_inputs(node, [*node.input, new])
                created += 1
        corrected[node.op_type] = corrected.get(node.op_type, 0) + 1
    for name, values in updates.items():
        edit.graph.set_initializer(name, values)
    for name, values in new_inits:
        edit.graph.put_initializer(name, values)
    return edit.build(), BiasCorrectionReport(dict(sorted(corrected.items())), created, tuple(skipped))
