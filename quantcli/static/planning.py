"""Decide what to quantize: a ``QuantPlan`` says which tensors get a QuantizeLinear/DequantizeLinear
pair, which weights become integer initializers, and which Relu/Clip fold into a producer, plus
every node left in float and why. Nothing here edits the graph (``rewrite.apply_plan`` does).

The plan follows onnxruntime's QDQ node units, so that its CPU provider turns each unit into an
integer kernel:

* compute units (Conv, MatMul, Gemm): DQ on every input (int8 per-channel weights, int32 bias with
  scale s_x * s_w), Q on the output; MatMul/Gemm may keep a float output (MatMulIntegerToFloat,
  QGemm), which is chosen when nothing downstream reads integers.
* element-wise and pooling units (Add, Mul, Concat, AveragePool, GlobalAveragePool, Sigmoid,
  LeakyRelu, Softmax): quantized when one of their inputs already arrives quantized; output Q with
  the tensor's own range.
* data-movement units (MaxPool, Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Slice, Gather,
  Expand, Tile, Resize, Split): output shares the input's scale and zero point, so onnxruntime drops
  the Q/DQ and moves int8 data directly.
* Relu/Clip that are the only reader of a quantized output are removed; the output range starts at
  the clip minimum (0 for Relu), so QuantizeLinear's saturation does the clipping.
* Mul/Div of a quantized tensor by a positive scalar constant c runs no kernel: y = c * s * (q - z),
  so readers get a DequantizeLinear of the same integers with scale c * s (or s / c) (``Rescale``).
* HardSigmoid(x) = clip(alpha * x + beta, 0, 1) of a quantized x costs one QLinearAdd (x + 0) whose
  output QuantizeLinear has scale S = 1 / (N * alpha) and zero point Z = round(N * beta) (+ the type's
  minimum), N = 255: its integers are then q = sat(round(N * (alpha * x + beta))), i.e. the hard sigmoid on
  the grid of scale 1 / N over [0, 1], read back with that scale. HardSwish(x) = x * HardSigmoid(x)
  adds a QLinearMul. Left float, onnxruntime would run them between a DequantizeLinear and a
  QuantizeLinear, with layout Transposes around the float island (``HardActivation``).
* a Conv over 1-4 input channels reading the model input (an image stem) stays float: onnxruntime's
  QLinearConv is slower than its float kernel there (``STEM_MAX_CHANNELS``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from quantcli.core.options import QuantConfig, QuantDType, WeightClipping
from quantcli.core.qmath import (
    QuantizedTensor,
    QuantParams,
    params_from_range,
    quantize,
    quantize_bias,
    quantize_weight,
)
from quantcli.graph.model import GraphIndex
from quantcli.graph.subgraphs import CONTROL_FLOW_OPS, node_subgraphs
from quantcli.static.recurrent import recurrent_input_producers
from quantcli.stats.calibration import TensorRange

__all__ = [
    "FLOAT_READ_OPS",
    "ActivationQuant",
    "EmbeddingQuant",
    "FoldedActivation",
    "HardActivation",
    "QuantPlan",
    "RangeDecision",
    "RecurrentQuant",
    "Rescale",
    "Skip",
    "SubgraphPlan",
    "WeightQuant",
    "make_plan",
]

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
#: ops that onnxruntime quantizes by itself when an input arrives from DequantizeLinear (its
#: weight/bias quantization pass turns DQ -> float-weight MatMul into an integer kernel), so a
#: node of these types that quantcli keeps in float must read the float tensor, not the DQ output
FLOAT_READ_OPS = frozenset({"Conv", "MatMul", "Gemm", "ConvTranspose"})
ELEMENTWISE_OPS = (
    "Add",
    "Mul",
    "Concat",
    "AveragePool",
    "GlobalAveragePool",
    "Sigmoid",
    "LeakyRelu",
    "Softmax",
)
MOVEMENT_OPS = (
    "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
    "Expand", "Tile", "Resize", "Split",
)  # fmt: skip
FOLDABLE_OPS = ("Relu", "Clip")
#: element-wise ops with no integer kernel that a quantized input still keeps integer: Mul/Div by a
#: positive scalar constant (a new scale, no kernel) and HardSigmoid/HardSwish (see ``HardActivation``)
RESCALE_OPS = ("Div",)
HARD_OPS = ("HardSigmoid", "HardSwish")
#: a Conv over at most this many input channels per group that reads a graph input (an image stem:
#: 1-3 channels) stays float: onnxruntime's QLinearConv runs it slower than its float NCHWc kernel
#: (measured, AVX2, 1 thread: 3->16 channels 3x3 at 224x224 784 us int8 vs 382 us float; 3->8 at
#: 48x192 144 us vs 56 us), and quantizing its input costs a QuantizeLinear on top
STEM_MAX_CHANNELS = 4
#: ... on inputs of at least this many pixels, or of unknown size (bundled 16x16 CNN: no measurable gain)
STEM_MIN_PIXELS = 64 * 64
#: recurrent layers with an integer kernel: LSTM -> com.microsoft DynamicQuantizeLSTM (weights int8,
#: input and state quantized on the fly by the kernel; no Q/DQ ever touches the state)
RECURRENT_OPS = ("LSTM",)
#: DynamicQuantizeLSTM pays from this hidden size (benchmarks/bench_lstm.py, AVX2, 1 thread, one step:
#: x1.06 at 128, x1.45 at 256, x2.6 at 512; 64 steps at 128: x2.1)
LSTM_MIN_HIDDEN = 256
#: a Gather on a constant float table at least this large gets an int8 table (weight-only): the rows
#: are gathered as int8 and scaled after the Gather (a DequantizeLinear in front of the Gather would
#: dequantize the whole table at every run: measured 350x slower on a 50k x 256 table)
EMBEDDING_MIN_BYTES = 1 << 20
#: activations reaching this magnitude carry sentinels (masks, padding fills), not data
SENTINEL_MAGNITUDE = 1e9
#: op types quantized unless the user chooses otherwise; Softmax is opt-in (it costs accuracy in attention)
DEFAULT_OP_TYPES = frozenset(COMPUTE_OPS + ELEMENTWISE_OPS + MOVEMENT_OPS + RECURRENT_OPS + RESCALE_OPS + HARD_OPS) - {
    "Softmax"
}
SUPPORTED_OP_TYPES = frozenset(COMPUTE_OPS + ELEMENTWISE_OPS + MOVEMENT_OPS + RECURRENT_OPS + RESCALE_OPS + HARD_OPS)

#: ops known to have no integer kernel in onnxruntime's CPU provider
_FLOAT_ONLY = {
    "LayerNormalization": "no integer LayerNormalization kernel in onnxruntime",
    "Erf": "no integer Erf kernel in onnxruntime",
    "Gelu": "no integer Gelu kernel in onnxruntime",
    "ReduceMean": "no integer ReduceMean kernel in onnxruntime",
    "Div": "no integer Div kernel in onnxruntime",
    "Sub": "no integer Sub kernel in onnxruntime",
    "Sqrt": "no integer Sqrt kernel in onnxruntime",
    "Pow": "no integer Pow kernel in onnxruntime",
    "Tanh": "no integer Tanh kernel in onnxruntime",
    "BatchNormalization": "BatchNormalization not after a Conv could not be folded",
}
#: input positions that carry data (others are shapes, axes, indices...)
_DATA_INPUTS: dict[str, tuple[int, ...]] = {
    "Gather": (0,), "Reshape": (0,), "Slice": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Expand": (0,),
    "Tile": (0,), "Resize": (0,), "Split": (0,), "MaxPool": (0,), "Transpose": (0,), "Flatten": (0,),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ActivationQuant:
    """A QuantizeLinear -> DequantizeLinear pair on ``tensor``; every reader gets the DQ output."""

    tensor: str
    params: QuantParams


@dataclass(frozen=True, slots=True)
class WeightQuant:
    """Input ``input_index`` of ``node`` reads a DequantizeLinear of an integer initializer."""

    node: str
    input_index: int
    tensor: str
    quantized: QuantizedTensor


@dataclass(frozen=True, slots=True)
class FoldedActivation:
    """``node`` (Relu/Clip) is removed; its producer writes ``output`` directly."""

    node: str
    producer: str
    input: str
    output: str


@dataclass(frozen=True, slots=True)
class Rescale:
    """``node`` (Mul/Div by a positive scalar) is removed; ``output`` is read as ``source``'s integers.

    Its readers get a DequantizeLinear of ``source``'s QuantizeLinear output with the scale of
    ``output`` (the plan's activation parameters of ``output``), which is ``source``'s times the factor.
    """

    node: str
    source: str
    output: str


@dataclass(frozen=True, slots=True)
class HardActivation:
    """HardSigmoid/HardSwish ``node`` on a quantized input, run as QLinearAdd (+ QLinearMul).

    ``quantize`` are the parameters of the QuantizeLinear after ``x + 0`` (scale 1 / (N * alpha),
    zero point N * beta + type minimum) and ``read`` those of the DequantizeLinear that reads the
    same integers back as the hard sigmoid (scale 1 / N, zero point the type minimum).
    """

    node: str
    op_type: str
    input: str
    output: str
    quantize: QuantParams
    read: QuantParams


@dataclass(frozen=True, slots=True)
class Skip:
    """A node left in float, and why."""

    node: str
    op_type: str
    reason: str


@dataclass(frozen=True, slots=True)
class RangeDecision:
    """A tensor whose calibrated range was judged unusable, and what was done about it."""

    tensor: str
    observed_min: float
    observed_max: float
    decision: str


@dataclass(frozen=True, slots=True)
class RecurrentQuant:
    """LSTM ``node`` becomes com.microsoft DynamicQuantizeLSTM.

    ``w`` and ``r`` hold int8 values already transposed to the kernel's layout [dirs, input, 4H]
    and [dirs, hidden, 4H], with symmetric per-gate-row scales of shape [dirs, 4H].
    """

    node: str
    w: QuantizedTensor
    r: QuantizedTensor


@dataclass(frozen=True, slots=True)
class EmbeddingQuant:
    """Gather ``node`` reads int8 rows of ``table`` and multiplies them by their row scale.

    ``quantized`` holds symmetric int8 values with one scale per row (axis 0).
    """

    node: str
    table: str
    quantized: QuantizedTensor


@dataclass(frozen=True, slots=True)
class SubgraphPlan:
    """Nodes quantized and left float inside one subgraph (path ``<node>/<attribute>/...``)."""

    path: str
    quantized_nodes: tuple[tuple[str, str], ...]
    skipped: tuple[Skip, ...]


@dataclass(frozen=True, slots=True)
class QuantPlan:
    """Everything ``rewrite.apply_plan`` needs, and nothing it has to decide."""

    activations: tuple[ActivationQuant, ...]
    weights: tuple[WeightQuant, ...]
    folded: tuple[FoldedActivation, ...]
    quantized_nodes: tuple[tuple[str, str], ...]
    skipped: tuple[Skip, ...]
    config: QuantConfig = field(default_factory=QuantConfig)
    range_decisions: tuple[RangeDecision, ...] = ()
    #: what was planned inside each If/Loop/Scan subgraph (also counted in the fields above)
    subgraphs: tuple[SubgraphPlan, ...] = ()
    recurrent: tuple[RecurrentQuant, ...] = ()
    embeddings: tuple[EmbeddingQuant, ...] = ()
    rescaled: tuple[Rescale, ...] = ()
    hard: tuple[HardActivation, ...] = ()

    def summary(self) -> dict[str, int]:
        """Counts per op type of quantized nodes."""
        counts: dict[str, int] = {}
        for _, op in self.quantized_nodes:
            counts[op] = counts.get(op, 0) + 1
        return dict(sorted(counts.items()))


def _node_selected(node: onnx.NodeProto, config: QuantConfig) -> str | None:
    """None if the node may be quantized, else the reason it may not."""
    op_types = config.op_types or DEFAULT_OP_TYPES
    if node.op_type in config.exclude_op_types:
        return "op type excluded (--exclude-op-types)"
    if node.op_type not in op_types:
        if node.op_type in SUPPORTED_OP_TYPES:
            return "op type not selected (--op-types)"
        return _FLOAT_ONLY.get(node.op_type, "no integer kernel for this op type")
    for pattern in config.exclude_nodes:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], node.name):
                return f"excluded by --exclude-nodes pattern '{pattern}'"
        elif fnmatch.fnmatchcase(node.name, pattern):
            return f"excluded by --exclude-nodes pattern '{pattern}'"
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain '{node.domain}'"
    return None


@dataclass(slots=True)
class _Planner:
    index: GraphIndex
    ranges: Mapping[str, TensorRange]
    config: QuantConfig
    act: dict[str, QuantParams] = field(default_factory=dict)
    weights: list[WeightQuant] = field(default_factory=list)
    folded: list[FoldedActivation] = field(default_factory=list)
    quantized: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    float_out: set[str] = field(default_factory=set)  # MatMul/Gemm outputs that may stay float
    #: outputs of Conv/Gemm/MatMul kept in float; a Q right after them would make onnxruntime's
    #: WeightBiasQuantization quantize their weights anyway, so element-wise readers leave them alone
    float_locked: set[str] = field(default_factory=set)
    #: Conv/MatMul/Gemm kept in float by the options; they must read float tensors (see rewrite)
    float_compute: set[str] = field(default_factory=set)
    range_decisions: list[RangeDecision] = field(default_factory=list)
    in_subgraph: bool = False
    recurrent: list[RecurrentQuant] = field(default_factory=list)
    #: node name -> why it stays float whatever the config says (``quantcli.static.recurrent``)
    keep_float: Mapping[str, str] = field(default_factory=dict)
    embeddings: list[EmbeddingQuant] = field(default_factory=list)
    rescaled: list[Rescale] = field(default_factory=list)
    hard: list[HardActivation] = field(default_factory=list)
    _weight_cache: dict[tuple[str, int | None], QuantizedTensor] = field(default_factory=dict)

    # ---- parameters -------------------------------------------------------------------------
    def act_params(
        self, tensor: str, *, clip_min: float | None = None, clip_max: float | None = None
    ) -> QuantParams | None:
        r = self.ranges.get(tensor)
        if r is None:
            return None
        if max(abs(r.observed_min), abs(r.observed_max)) >= SENTINEL_MAGNITUDE:
            if tensor not in {d.tensor for d in self.range_decisions}:
                self.range_decisions.append(
                    RangeDecision(
                        tensor,
                        r.observed_min,
                        r.observed_max,
                        "kept in float: sentinel values (an attention mask or padding fill like -3.4e38) "
                        "would stretch the range until every real value rounds to zero",
                    )
                )
            return None
        lo, hi = r.min, r.max
        if clip_min is not None:
            lo = max(lo, clip_min)
        if clip_max is not None:
            hi = min(hi, clip_max)
        return params_from_range(lo, hi, self.config.activation_type, symmetric=self.config.symmetric_activations)

    def weight(self, tensor: str, axis: int | None) -> QuantizedTensor:
        key = (tensor, axis)
        if key not in self._weight_cache:
            self._weight_cache[key] = quantize_weight(
                self.index.constant(tensor),
                self.config.weight_type,
                axis=axis if self.config.per_channel else None,
                reduce_range=self.config.reduce_range,
                mse_clip=self.config.weight_clipping == WeightClipping.MSE,
            )
        return self._weight_cache[key]

    def constant_as_activation(self, tensor: str) -> QuantizedTensor:
        value = self.index.constant(tensor).astype(np.float32)
        params = params_from_range(
            float(value.min()) if value.size else 0.0,
            float(value.max()) if value.size else 0.0,
            self.config.activation_type,
            symmetric=self.config.symmetric_activations,
        )
        return QuantizedTensor(quantize(value, params), params)

    def is_quantized(self, tensor: str) -> bool:
        return tensor in self.act

    def is_float_activation(self, tensor: str) -> bool:
        return tensor in self.ranges and not self.index.is_constant(tensor)

    def only_reaches_outputs(self, tensor: str) -> bool:
        """True when ``tensor`` is a graph output or flows only through data-movement ops into graph outputs."""
        readers = self.index.consumers_of(tensor)
        if not readers:
            return tensor in self.index.graph_outputs
        return all(
            r.op_type in MOVEMENT_OPS and all(self.only_reaches_outputs(o) for o in r.output if o) for r in readers
        )

    def skip(self, node: onnx.NodeProto, reason: str) -> None:
        self.skipped.append(Skip(node.name, node.op_type, reason))

    # ---- outputs ----------------------------------------------------------------------------
    def quantize_output(self, node: onnx.NodeProto, *, shared: QuantParams | None = None) -> None:
        out = node.output[0]
        fold = self._foldable(node) if shared is None else None
        if fold is not None:
            relu, lo, hi = fold
            params = self.act_params(relu.output[0], clip_min=lo, clip_max=hi)
            if params is not None:
                self.folded.append(FoldedActivation(relu.name, node.name, out, relu.output[0]))
                self.act[relu.output[0]] = params
                return
        params = shared if shared is not None else self.act_params(out)
        if params is not None:
            self.act.setdefault(out, params)

    def _foldable(self, node: onnx.NodeProto) -> tuple[onnx.NodeProto, float, float | None] | None:
        if not self.config.fold_relu:
            return None
        out = node.output[0]
        readers = self.index.consumers_of(out)
        if len(readers) != 1 or out in self.index.graph_outputs:
            return None
        relu = readers[0]
        if relu.op_type not in FOLDABLE_OPS or relu.output[0] in self.index.graph_outputs:
            return None
        if _node_selected(relu, QuantConfig(op_types=frozenset(FOLDABLE_OPS))) is not None:
            return None
        if any(fnmatch.fnmatchcase(relu.name, p) for p in self.config.exclude_nodes if not p.startswith("re:")):
            return None
        if any(r.name in self.float_compute for r in self.index.consumers_of(relu.output[0])):
            return None  # a float Conv/MatMul/Gemm reads the clipped float tensor: keep the Relu
        if relu.op_type == "Relu":
            return relu, 0.0, None
        lo_hi = self._clip_bounds(relu)
        if lo_hi is None:
            return None
        lo, hi = lo_hi
        if lo is None or lo > 0:
            return None  # the grid must contain 0 and start at the clip minimum
        return relu, lo, hi

    def _clip_bounds(self, clip: onnx.NodeProto) -> tuple[float | None, float | None] | None:
        lo: float | None = None
        hi: float | None = None
        for attr in clip.attribute:  # opset < 11
            if attr.name == "min":
                lo = attr.f
            if attr.name == "max":
                hi = attr.f
        for pos, name in enumerate(clip.input[1:3], start=1):
            if not name:
                continue
            if not self.index.is_constant(name):
                return None
            value = float(self.index.constant(name).reshape(-1)[0])
            if pos == 1:
                lo = value
            else:
                hi = value
        return lo, hi

    # ---- node kinds -------------------------------------------------------------------------
    def plan_compute(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        x = node.input[0]
        if not self.is_float_activation(x):
            if self.in_subgraph and not self.index.is_constant(x) and x not in self.ranges:
                self.skip(node, f"input '{x}' never ran during calibration (branch or loop not taken)")
            else:
                self.skip(node, f"input '{x}' is not a calibrated float activation")
            return
        w = node.input[1] if len(node.input) > 1 else ""
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        w_axis: int | None
        if op == "Conv":
            if not self.index.is_constant(w):
                self.skip(node, "weight is not a constant initializer")
                return
            w_axis = 0
        elif op == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if not self.index.is_constant(w):
                self.skip(node, "B is not a constant initializer")
                return
            if attrs.get("transA", 0):
                self.skip(node, "transA=1 is not supported by QGemm fusion")
                return
            w_axis = 0 if attrs.get("transB", 0) else 1
            if bias:
                n_out = self.index.constant(w).shape[w_axis]
                if (
                    not self.index.is_constant(bias)
                    or self.index.constant(bias).size not in (n_out,)
                    or float(attrs.get("beta", 1.0)) != 1.0
                ):
                    self.skip(node, "bias C is not a constant [N] vector with beta=1")
                    return
        else:  # MatMul
            if self.index.is_constant(w):
                # per-tensor on purpose: onnxruntime's fused MatMul kernels (QLinearMatMul,
                # MatMulIntegerToFloat) give wrong results with per-column weight scales
                # (measured: 22.9 dB fused vs 35.5 dB unfused on the same QDQ model, ORT 1.32)
                w_axis = None
            elif self.is_float_activation(w):
                w_axis = None
            else:
                self.skip(node, f"input '{w}' is neither a constant nor a calibrated float activation")
                return
        x_params = self.act.get(x) or self.act_params(x)
        if x_params is None:
            self.skip(node, f"no calibration range for input '{x}'")
            return
        self.act.setdefault(x, x_params)
        if self.index.is_constant(w):
            qw = self.weight(w, w_axis)
            self.weights.append(WeightQuant(node.name, 1, w, qw))
            if bias:
                qb = quantize_bias(self.index.constant(bias), float(x_params.scale), qw.params.scale)
                self.weights.append(WeightQuant(node.name, 2, bias, qb))
        else:
            w_params = self.act.get(w) or self.act_params(w)
            if w_params is None:
                self.skip(node, f"no calibration range for input '{w}'")
                return
            self.act.setdefault(w, w_params)
        self.quantized.append((node.name, op))
        if op in ("MatMul", "Gemm"):
            self.float_out.add(node.output[0])
        self.quantize_output(node)

    def slow_stem(self, node: onnx.NodeProto) -> str | None:
        """Why this Conv stays float as a slow integer stem (see ``STEM_MAX_CHANNELS``), or None."""
        x, w = node.input[0], node.input[1] if len(node.input) > 1 else ""
        if (
            x not in self.index.graph_inputs
            or self.is_quantized(x)
            or not self.index.is_constant(w)
            or self.in_subgraph
        ):
            return None
        shape = self.index.constant(w).shape
        if len(shape) != 4 or shape[1] > STEM_MAX_CHANNELS or shape[2] * shape[3] == 1:
            return None
        dims = [d for d in self.index.shapes.get(x, ())[2:] if isinstance(d, int) and d > 0]
        if len(dims) == 2 and dims[0] * dims[1] < STEM_MIN_PIXELS:
            return None  # a small image: the float stem saves about what the extra QuantizeLinear costs
        return (
            f"a {shape[2]}x{shape[3]} Conv over {shape[1]} input channel(s) reading the model input: slower as "
            "QLinearConv than float (measured 0.4-0.5x, AVX2)"
        )

    def plan_elementwise(self, node: onnx.NodeProto) -> None:
        inputs = [i for i in node.input if i]
        if node.op_type in ("Add", "Mul") and len(inputs) != 2:
            self.skip(node, "expects two inputs")
            return
        if not any(self.is_quantized(i) for i in inputs):
            self.skip(node, "no input arrives quantized (nothing to gain)")
            return
        locked = [i for i in inputs if i in self.float_locked]
        if locked:
            self.skip(node, f"input '{locked[0]}' comes from a Conv/MatMul/Gemm kept in float")
            return
        pending_act: dict[str, QuantParams] = {}
        pending_const: list[tuple[int, str]] = []
        for pos, name in enumerate(node.input):
            if not name or self.is_quantized(name):
                continue
            if self.index.is_constant(name) and self.index.elem_types.get(name) == onnx.TensorProto.FLOAT:
                pending_const.append((pos, name))
            elif self.is_float_activation(name):
                params = self.act_params(name)
                if params is None:
                    self.skip(node, f"no calibration range for input '{name}'")
                    return
                pending_act[name] = params
            else:
                self.skip(node, f"input '{name}' is not a float tensor")
                return
        if self.only_reaches_outputs(node.output[0]):
            r = self.ranges.get(node.output[0])
            if r is not None:
                self.range_decisions.append(
                    RangeDecision(
                        node.output[0],
                        r.observed_min,
                        r.observed_max,
                        f"kept in float with its {node.op_type}: it only reaches graph outputs, so no integer "
                        "op reads it and a QuantizeLinear would only round the result (a sigmoid score of "
                        "0.004 becomes 0 or 0.0039 on a [0, 1] grid)",
                    )
                )
            self.skip(node, "its output only reaches graph outputs (no integer op reads it)")
            return
        if node.op_type == "Softmax":
            out_params: QuantParams | None = params_from_range(0.0, 1.0, self.config.activation_type)
        else:
            out_params = self.act_params(node.output[0])
        if out_params is None:
            self.skip(node, "no calibration range for the output")
            return
        self.act.update(pending_act)
        for pos, name in pending_const:
            self.weights.append(WeightQuant(node.name, pos, name, self.constant_as_activation(name)))
        self.quantized.append((node.name, node.op_type))
        if node.op_type == "Softmax":
            self.act.setdefault(node.output[0], out_params)
        else:
            self.quantize_output(node)

    def plan_rescale(self, node: onnx.NodeProto) -> bool:
        """Mul/Div of a quantized tensor by a positive scalar constant: a new scale, no kernel.

        False (nothing planned) when the node is not such a product or quotient.
        """
        if node.op_type not in ("Mul", "Div") or len(node.input) != 2 or self.in_subgraph:
            return False
        x, c = node.input
        if node.op_type == "Mul" and self.index.is_constant(x) and not self.index.is_constant(c):
            x, c = c, x
        out = node.output[0]
        if not self.is_quantized(x) or not self.index.is_constant(c) or x in self.float_locked:
            return False
        if out in self.index.graph_outputs or (x not in self.index.producers and x not in self.index.graph_inputs):
            return False
        if self.index.elem_types.get(c) != onnx.TensorProto.FLOAT:
            return False
        if any(r.name in self.float_compute for r in self.index.consumers_of(out)):
            return False  # a float Conv/MatMul/Gemm must read the float tensor itself
        value = self.index.constant(c)
        if value.size != 1 or not np.isfinite(value).all() or float(value.reshape(-1)[0]) <= 0:
            return False
        if value.ndim > len(self.index.shapes.get(x, ())) and self.index.shapes.get(x):
            return False  # a [1,1,...] constant of higher rank would broadcast the output's shape
        factor = float(value.reshape(-1)[0])
        factor = factor if node.op_type == "Mul" else 1.0 / factor
        src = self.act[x]
        if src.scale.ndim:
            return False
        self.act[out] = QuantParams(
            scale=np.asarray(float(src.scale) * factor, dtype=np.float32),
            zero_point=src.zero_point,
            dtype=src.dtype,
            axis=None,
        )
        self.rescaled.append(Rescale(node.name, x, out))
        self.quantized.append((node.name, node.op_type))
        return True

    def plan_hard(self, node: onnx.NodeProto) -> None:
        """HardSigmoid/HardSwish of a quantized input: QLinearAdd with a re-read output (+ QLinearMul)."""
        x, out = node.input[0], node.output[0]
        if self.in_subgraph:
            self.skip(node, "inside a subgraph (only main-graph hard activations run integer)")
            return
        if not self.is_quantized(x):
            self.skip(node, "input does not arrive quantized (float: onnxruntime fuses it into a float Conv)")
            return
        if x in self.float_locked:
            self.skip(node, f"input '{x}' comes from a Conv/MatMul/Gemm kept in float")
            return
        attrs = {a.name: a.f for a in node.attribute}
        alpha = attrs.get("alpha", 1.0 / 6.0 if node.op_type == "HardSwish" else 0.2)
        beta = attrs.get("beta", 0.5)
        if alpha <= 0:
            self.skip(node, "HardSigmoid with alpha <= 0")
            return
        qmin = -128 if self.config.activation_type == QuantDType.INT8 else 0
        if self.config.activation_type not in (QuantDType.INT8, QuantDType.UINT8):
            self.skip(node, "only 8-bit activations have a QLinearAdd kernel")
            return
        # 255 steps over [0, 1] so that saturation gives exactly 0 and 1; a non-integer 255 * beta
        # (127.5 for beta = 0.5) is rounded: the result is off by at most one step (1/255)
        levels = 255
        zero = int(np.floor(levels * beta + 0.5)) + qmin
        if not qmin <= zero <= qmin + 255:
            self.skip(node, f"beta {beta} puts the zero point outside the 8-bit range")
            return
        dtype = self.config.activation_type
        np_zp = np.int8 if dtype == QuantDType.INT8 else np.uint8
        quantize_params = QuantParams(
            np.asarray(1.0 / (levels * alpha), np.float32), np.asarray(zero, np_zp), dtype, None
        )
        read = QuantParams(np.asarray(1.0 / levels, np.float32), np.asarray(qmin, np_zp), dtype, None)
        if node.op_type == "HardSwish":
            params = self.act_params(out)
            if params is None:
                self.skip(node, "no calibration range for the output")
                return
            self.act.setdefault(out, params)
        elif out in self.index.graph_outputs:
            self.skip(node, "graph output (kept float)")
            return
        elif any(r.name in self.float_compute for r in self.index.consumers_of(out)):
            self.skip(node, "read by a Conv/MatMul/Gemm kept in float")
            return
        else:
            self.act[out] = read
        self.hard.append(HardActivation(node.name, node.op_type, x, out, quantize_params, read))
        self.quantized.append((node.name, node.op_type))

    def plan_movement(self, node: onnx.NodeProto) -> None:
        data = node.input[0]
        if not self.is_quantized(data):
            self.skip(node, "input does not arrive quantized (nothing to gain)")
            return
        extra = [i for pos, i in enumerate(node.input) if pos not in _DATA_INPUTS.get(node.op_type, (0,)) and i]
        if any(self.index.elem_types.get(i) == onnx.TensorProto.FLOAT and not self.index.is_constant(i) for i in extra):
            self.skip(node, "a non-data input is a float activation")
            return
        params = self.act[data]
        if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
            self.skip(node, "MaxPool with indices output")
            return
        self.quantized.append((node.name, node.op_type))
        for out in node.output:
            if out and out in self.ranges:
                self.act.setdefault(out, params)

    def plan_embedding(self, node: onnx.NodeProto) -> bool:
        """Weight-only int8 for a Gather on a large constant float table; False if it does not apply."""
        table, indices = node.input[0], node.input[1]
        if not self.index.is_constant(table) or self.index.elem_types.get(table) != onnx.TensorProto.FLOAT:
            return False
        init = self.index.initializers[table]
        size = int(np.prod(init.dims)) * 4 if init.dims else 4
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if len(init.dims) != 2 or axis != 0 or size < EMBEDDING_MIN_BYTES or self.is_float_activation(indices):
            return False
        if sum(1 for n in self.index.consumers_of(table) if n.op_type != "Gather") or self.index.graph_outputs.count(
            table
        ):
            return False  # the float table is needed elsewhere: an int8 copy would add, not save
        q = self._weight_cache.get((table, -1))
        if q is None:
            q = quantize_weight(self.index.constant(table), QuantDType.INT8, axis=0)
            self._weight_cache[(table, -1)] = q
        self.embeddings.append(EmbeddingQuant(node.name, table, q))
        self.quantized.append((node.name, "Gather"))
        return True

    def plan_lstm(self, node: onnx.NodeProto) -> None:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w, r = node.input[1], node.input[2]
        if not (self.index.is_constant(w) and self.index.is_constant(r)):
            self.skip(node, "W or R is not a constant initializer")
            return
        if attrs.get("layout", 0):
            self.skip(node, "layout=1 is not supported by DynamicQuantizeLSTM")
            return
        if self.config.weight_type != QuantDType.INT8:
            self.skip(node, "DynamicQuantizeLSTM takes int8 weights only")
            return
        hidden = int(attrs.get("hidden_size", 0))
        if hidden < LSTM_MIN_HIDDEN:
            self.skip(
                node,
                f"float: no faster integer kernel at hidden size {hidden} (DynamicQuantizeLSTM pays from "
                f"{LSTM_MIN_HIDDEN}; measured x1.06 at 128)",
            )
            return
        self.recurrent.append(RecurrentQuant(node.name, self._gate_rows(w), self._gate_rows(r)))
        self.quantized.append((node.name, node.op_type))

    def _gate_rows(self, name: str) -> QuantizedTensor:
        """[dirs, 4H, n] float -> int8 [dirs, n, 4H] with one symmetric scale per gate row."""
        value = self.index.constant(name).astype(np.float32)
        dirs, rows, cols = value.shape
        q = quantize_weight(
            value.reshape(dirs * rows, cols), QuantDType.INT8, axis=0, reduce_range=self.config.reduce_range
        )
        params = QuantParams(
            scale=q.params.scale.reshape(dirs, rows),
            zero_point=q.params.zero_point.reshape(dirs, rows),
            dtype=QuantDType.INT8,
            axis=None,
        )
        return QuantizedTensor(q.values.reshape(dirs, rows, cols).transpose(0, 2, 1).copy(), params)

    # ---- clean-up ---------------------------------------------------------------------------
    def drop_unread_float_outputs(self) -> None:
        """MatMul/Gemm outputs nobody reads as integers stay float (no Q/DQ overhead)."""
        quantized_nodes = {name for name, _ in self.quantized}
        folded_inputs = {f.input for f in self.folded}
        for tensor in sorted(self.float_out):
            if tensor not in self.act or tensor in folded_inputs:
                continue
            readers = self.index.consumers_of(tensor)
            if not any(r.name in quantized_nodes for r in readers):
                del self.act[tensor]


def _plan_nodes(planner: _Planner, graph: onnx.GraphProto, config: QuantConfig) -> None:
    planner.float_compute = {
        n.name for n in graph.node if n.op_type in FLOAT_READ_OPS and _node_selected(n, config) is not None
    }
    folded_nodes: set[str] = set()
    for node in graph.node:
        if node.name in folded_nodes:
            continue
        if node.op_type in FOLDABLE_OPS and any(f.node == node.name for f in planner.folded):
            continue
        reason = _node_selected(node, config) or planner.keep_float.get(node.name)
        if reason is not None and node.op_type in COMPUTE_OPS:
            planner.float_locked.update(o for o in node.output if o)
        if reason is not None:
            if node.op_type not in ("Constant", "Shape", "Cast", "Relu", "Clip", "Identity", *CONTROL_FLOW_OPS):
                planner.skip(node, reason)
            continue
        if node.op_type in RECURRENT_OPS:
            planner.plan_lstm(node)
        elif node.op_type == "Conv" and (stem := planner.slow_stem(node)) is not None:
            planner.skip(node, stem)
            planner.float_compute.add(node.name)
            planner.float_locked.update(o for o in node.output if o)
        elif node.op_type in COMPUTE_OPS:
            planner.plan_compute(node)
            if node.name not in {name for name, _ in planner.quantized}:
                planner.float_locked.update(o for o in node.output if o)
        elif node.op_type in ("Mul", *RESCALE_OPS) and planner.plan_rescale(node):
            pass
        elif node.op_type in RESCALE_OPS:
            planner.skip(
                node,
                f"no integer {node.op_type} kernel in onnxruntime (only a quantized tensor divided by a positive "
                "scalar constant folds into its scale)",
            )
        elif node.op_type in HARD_OPS:
            planner.plan_hard(node)
        elif node.op_type in ELEMENTWISE_OPS:
            planner.plan_elementwise(node)
        elif node.op_type == "Gather" and planner.plan_embedding(node):
            pass
        elif node.op_type in MOVEMENT_OPS:
            planner.plan_movement(node)
        folded_nodes |= {f.node for f in planner.folded}
    planner.drop_unread_float_outputs()


def _plan_graph(
    graph: onnx.GraphProto,
    path: str,
    outer: dict[str, onnx.TensorProto],
    ranges: Mapping[str, TensorRange],
    config: QuantConfig,
    act: dict[str, QuantParams],
    done: list[tuple[str, _Planner]],
    keep_float: Mapping[str, str],
) -> None:
    """Plan ``graph``, then each subgraph of its nodes; ``act`` is shared, so a tensor is quantized once."""
    index = GraphIndex.build(graph, outer=outer)
    planner = _Planner(index, ranges, config, act=act, in_subgraph=bool(path), keep_float=keep_float)
    _plan_nodes(planner, graph, config)
    done.append((path, planner))
    inputs = {i.name for i in graph.input}
    visible = {**outer, **{t.name: t for t in graph.initializer if t.name not in inputs}}
    for node in graph.node:
        for attr, sub in node_subgraphs(node):
            sub_path = f"{path}/{node.name}/{attr}" if path else f"{node.name}/{attr}"
            _plan_graph(sub, sub_path, visible, ranges, config, act, done, keep_float)


def make_plan(model: onnx.ModelProto, ranges: Mapping[str, TensorRange], config: QuantConfig) -> QuantPlan:
    """Plan the quantization of ``model`` (already pre-processed) from calibrated ``ranges``.

    Subgraphs of If/Loop/Scan nodes are planned like the main graph, each with the constants of
    its enclosing graphs in view; tensors of a branch calibration never ran have no range and stay float.
    A Conv/MatMul/Gemm feeding a recurrent cell's input stays float (``quantcli.static.recurrent``).
    """
    act: dict[str, QuantParams] = {}
    done: list[tuple[str, _Planner]] = []
    _plan_graph(model.graph, "", {}, ranges, config, act, done, recurrent_input_producers(model))
    planners = [p for _, p in done]
    subgraphs = tuple(SubgraphPlan(path, tuple(p.quantized), tuple(p.skipped)) for path, p in done if path)
    return QuantPlan(
        activations=tuple(ActivationQuant(t, p) for t, p in act.items()),
        weights=tuple(w for p in planners for w in p.weights),
        folded=tuple(f for p in planners for f in p.folded),
        quantized_nodes=tuple(q for p in planners for q in p.quantized),
        skipped=tuple(s for p in planners for s in p.skipped),
        config=config,
        range_decisions=tuple(d for p in planners for d in p.range_decisions),
        subgraphs=subgraphs,
        recurrent=tuple(r for p in planners for r in p.recurrent),
        embeddings=tuple(e for p in planners for e in p.embeddings),
        rescaled=tuple(r for p in planners for r in p.rescaled),
        hard=tuple(h for p in planners for h in p.hard),
    )
