"""Cross-layer equalization (CLE) of Conv -> (Relu | LeakyRelu | PRelu | none) -> Conv chains.

Data-free, after Nagel et al. 2019 ("Data-Free Quantization Through Weight Equalization and Bias
Correction", section 4.1). For a positive-homogeneous f (f(x / s) = f(x) / s for s > 0, true of
identity, Relu, LeakyRelu and PRelu, not of Clip(0, 6)/Relu6 whose bound would have to move too):

    y = W2 * f(W1 * x + b1)  =  (W2 S) * f(S^-1 W1 * x + S^-1 b1),    S = diag(s), s_i > 0

so output channel i of conv1 (weights and bias) is divided by s_i and input channel i of conv2 is
multiplied by s_i without changing the FP32 output. With r1_i = max|W1[i, ...]| (conv1's output
channel i) and r2_i = max|W2[:, i, ...]| (conv2's input channel i, over the output channels of its
group), the choice

    s_i = sqrt(r1_i * r2_i) / r2_i = sqrt(r1_i / r2_i)

gives both channels the same range sqrt(r1_i * r2_i): per-tensor or per-output-channel weight
scales of conv2 no longer waste levels on a few wide input channels, and conv1's output channels
(one per-tensor activation scale) get comparable ranges. Grouped convolutions are handled through
the group layout (depthwise: group == channels, input channel i feeds output channels
[i * m, (i + 1) * m) for channel multiplier m). Conv1's grouping does not matter (only its output
channels are scaled). Chains (conv1 -> conv2 -> conv3) share conv2, so the pairs are swept several
times until the scales settle. Bias absorption (the paper's section 4.1.2) is not done.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from quantcli.graph.editor import ModelEditor
from quantcli.graph.index import GraphIndex

__all__ = ["EqualizationReport", "equalize"]

#: activations f with f(x / s) = f(x) / s for s > 0
HOMOGENEOUS_OPS = ("Relu", "LeakyRelu", "PRelu")
#: bounded activations that break the identity unless the bound is scaled too
BOUNDED_OPS = ("Clip", "HardSigmoid", "HardSwish")
_SCALE_LIMIT = 1e4


@dataclass(frozen=True, slots=True)
class EqualizationReport:
    """What cross-layer equalization did."""

    pairs: int
    iterations: int
    skipped_bounded: int

    def lines(self) -> list[str]:
        """Human-readable summary."""
        out = [f"CLE: {self.pairs} conv pairs equalized ({self.iterations} sweeps)"]
        if self.skipped_bounded:
            out.append(
                f"CLE: {self.skipped_bounded} conv pairs skipped: a bounded activation (Clip/Relu6/HardSigmoid) "
                "between them is not positive-homogeneous"
            )
        return out


@dataclass(frozen=True, slots=True)
class _Pair:
    w1: str
    b1: str
    w2: str
    group2: int


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _single_reader(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    readers = index.consumers_of(tensor)
    if len(readers) != 1 or tensor in index.graph_outputs:
        return None
    return readers[0]


def _find_pairs(index: GraphIndex, nodes: list[onnx.NodeProto]) -> tuple[list[_Pair], int]:
    weight_uses: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            weight_uses[name] = weight_uses.get(name, 0) + 1

    def own_constant(name: str) -> bool:
        return (
            bool(name)
            and index.is_constant(name)
            and weight_uses.get(name, 0) == 1
            and index.constant(name).dtype == np.float32
        )

    pairs: list[_Pair] = []
    bounded = 0
    for conv1 in nodes:
        if conv1.op_type != "Conv" or conv1.domain not in ("", "ai.onnx") or len(conv1.input) < 2:
            continue
        b1 = conv1.input[2] if len(conv1.input) > 2 else ""
        if not own_constant(conv1.input[1]) or (b1 and not own_constant(b1)):
            continue
        reader = _single_reader(index, conv1.output[0])
        tensor = conv1.output[0]
        blocked = False
        while reader is not None and reader.op_type in HOMOGENEOUS_OPS + BOUNDED_OPS:
            if reader.op_type in BOUNDED_OPS:
                blocked = True
            if reader.op_type == "PRelu" and not index.is_constant(reader.input[1]):
                reader = None
                break
            tensor = reader.output[0]
            reader = _single_reader(index, tensor)
        if reader is None or reader.op_type != "Conv" or reader.input[0] != tensor:
            continue
        if not own_constant(reader.input[1]):
            continue
        w1 = index.constant(conv1.input[1])
        w2 = index.constant(reader.input[1])
        group2 = _attr(reader, "group", 1)
        if w1.ndim < 2 or w2.ndim < 2 or w2.shape[1] * group2 != w1.shape[0] or w2.shape[0] % group2:
            continue
        if blocked:
            bounded += 1
            continue
        pairs.append(_Pair(conv1.input[1], b1, reader.input[1], group2))
    return pairs, bounded


def _input_channel_ranges(w2: np.ndarray, group: int) -> np.ndarray:
    """max |W2[:, i]| per input channel i, over the output channels of i's group."""
    out_ch, per_group = w2.shape[0], w2.shape[1]
    grouped = np.abs(w2).reshape(group, out_ch // group, per_group, -1)
    return grouped.max(axis=(1, 3)).reshape(-1).astype(np.float64)


def _scale_input_channels(w2: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    out_ch, per_group = w2.shape[0], w2.shape[1]
    grouped = w2.astype(np.float64).reshape(group, out_ch // group, per_group, -1)
    return (grouped * s.reshape(group, 1, per_group, 1)).reshape(w2.shape)


def equalize(
    model: onnx.ModelProto, *, max_sweeps: int = 10, tolerance: float = 1e-4
) -> tuple[onnx.ModelProto, EqualizationReport]:
    """Return an equalized copy of ``model`` (pre-processed: BatchNormalization already folded)."""
    edit = ModelEditor(model)
    index = GraphIndex.build(edit.graph.proto)
    pairs, bounded = _find_pairs(index, list(edit.graph.nodes))
    arrays: dict[str, np.ndarray] = {}
    for p in pairs:
        for name in (p.w1, p.b1, p.w2):
            if name:
                arrays[name] = index.constant(name).astype(np.float64)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007 - the count is reported
        worst = 0.0
        for p in pairs:
            w1, w2 = arrays[p.w1], arrays[p.w2]
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
            r2 = _input_channel_ranges(w2, p.group2)
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / r2), 1.0)
            s = np.clip(s, 1.0 / _SCALE_LIMIT, _SCALE_LIMIT)
            arrays[p.w1] = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
            if p.b1:
                arrays[p.b1] = arrays[p.b1] / s
            arrays[p.w2] = _scale_input_channels(w2, s, p.group2)
            worst = max(worst, float(np.max(np.abs(np.log(s)))) if s.size else 0.0)
        if worst < tolerance:
            break
    if not pairs:
        sweeps = 0
    for name, a in arrays.items():
        edit.graph.set_initializer(name, a.astype(np.float32))
    return edit.build(), EqualizationReport(len(pairs), sweeps, bounded)
