"""What a quantization plan holds: the value types ``make_plan`` returns and ``apply_plan`` reads.

A ``QuantPlan`` says which tensors get a QuantizeLinear/DequantizeLinear pair, which weights become
integer initializers, which Relu/Clip fold into a producer, and which nodes stay in float and why.
A node left in float is a ``Skip``: a reason code (``SkipCode``), a detail and the tensor at fault,
the same ``Rejection`` a planning rule returned (``quantcli.static.rules``). Its ``reason`` renders
the sentence the report prints from the code's template, so the text lives in one table here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from quantcli.core.options import QuantConfig, StrEnum
from quantcli.core.qmath import QuantizedTensor, QuantParams

__all__ = [
    "ActivationQuant",
    "Declined",
    "EmbeddingQuant",
    "FoldedActivation",
    "HardActivation",
    "QuantPlan",
    "RangeDecision",
    "RecurrentQuant",
    "Rejection",
    "Rescale",
    "Skip",
    "SkipCode",
    "SubgraphPlan",
    "WeightQuant",
    "render_reason",
]


class SkipCode(StrEnum):
    """Why a node stays in float (or why a rule did not fire): one value per kind of reason."""

    # the options
    OP_TYPE_EXCLUDED = "op-type-excluded"
    OP_TYPE_NOT_SELECTED = "op-type-not-selected"
    NODE_EXCLUDED = "node-excluded"
    FLOAT_NODE = "float-node"
    CUSTOM_DOMAIN = "custom-domain"
    RULE_DISABLED = "rule-disabled"
    # the op and its kernels
    NO_INTEGER_KERNEL = "no-integer-kernel"
    SLOW_STEM = "slow-stem"
    SLOW_INTEGER_KERNEL = "slow-integer-kernel"
    SLOW_DEPTHWISE = "slow-depthwise"
    SLOW_POOLING = "slow-pooling"
    #: a speed rule that measured the integer form no slower (kept as a declined rule's data, never a Skip)
    MEASURED_NOT_SLOWER = "measured-not-slower"
    RECURRENT_FEED = "recurrent-feed"
    UNSUPPORTED_ATTRIBUTE = "unsupported-attribute"
    UNSUPPORTED_TYPE = "unsupported-type"
    UNSUPPORTED_PARAMETER = "unsupported-parameter"
    IN_SUBGRAPH = "in-subgraph"
    INPUT_COUNT = "input-count"
    # the inputs
    INPUT_NOT_RUN = "input-not-run"
    INPUT_NOT_CALIBRATED = "input-not-calibrated"
    INPUT_NOT_FLOAT = "input-not-float"
    INPUT_NOT_QUANTIZED = "input-not-quantized"
    INPUT_FROM_FLOAT_COMPUTE = "input-from-float-compute"
    WEIGHT_NOT_CONSTANT = "weight-not-constant"
    WEIGHT_NOT_CONSTANT_OR_ACTIVATION = "weight-not-constant-or-activation"
    BIAS_NOT_VECTOR = "bias-not-vector"
    NON_DATA_FLOAT_INPUT = "non-data-float-input"
    NO_INPUT_RANGE = "no-input-range"
    # the output
    NO_OUTPUT_RANGE = "no-output-range"
    GRAPH_OUTPUT = "graph-output"
    OUTPUTS_ONLY = "outputs-only"
    READ_BY_FLOAT_COMPUTE = "read-by-float-compute"
    # precision: tensors whose one grid loses what the next op needs
    VARIANCE_SQUARE = "variance-square"
    GELU_TANH_CUBIC = "gelu-tanh-cubic"
    LOG_MAGNITUDE = "log-magnitude"
    # MatMul/Gemm whose input is quantized at run time inside the static plan (``QuantPlan.dynamic_nodes``)
    RUNTIME_ACTIVATION = "runtime-activation"
    # transformer encoders (``quantcli.static.rules.residual``): an Add of the residual stream, a linear layer's bias
    RESIDUAL_STREAM = "residual-stream"
    LINEAR_BIAS_FLOAT = "linear-bias-float"
    # transformer encoders (``quantcli.static.rules.attention``): q.kT and softmax.v stay float
    ATTENTION_FLOAT = "attention-float"
    # the dynamic, weight-only and fp16 modes (``quantcli.modes``): the detail is the sentence
    MODE_UNSUPPORTED = "mode-unsupported"
    # rules that pass a node on to the next rule of the table (never a Skip on their own)
    NOT_APPLICABLE = "not-applicable"


#: the sentence of each code; ``{tensor}`` and ``{detail}`` are the skip's fields
_TEMPLATES: dict[SkipCode, str] = {
    SkipCode.OP_TYPE_EXCLUDED: "op type excluded (--exclude-op-types)",
    SkipCode.OP_TYPE_NOT_SELECTED: "op type not selected (--op-types)",
    SkipCode.NODE_EXCLUDED: "excluded by --exclude-nodes pattern '{detail}'",
    SkipCode.FLOAT_NODE: "kept in float by name (a float node of the accuracy search or the recipe)",
    SkipCode.CUSTOM_DOMAIN: "custom domain '{detail}'",
    SkipCode.RULE_DISABLED: "rule '{detail}' disabled by the configuration",
    SkipCode.NO_INTEGER_KERNEL: "{detail}",
    # e.g. "a 3x3 Conv over 3 input channel(s) reading the model input: QLinearConv measured 0.45x float on
    # this host for 1x3x224x224 -> 3x3x16" (``quantcli.static.rules.stem``, speed from the plan's oracle)
    SkipCode.SLOW_STEM: "{detail}",
    SkipCode.SLOW_INTEGER_KERNEL: "{detail}",
    # ``quantcli.static.rules.depthwise``: the measured A/B of the float island, transitions included
    SkipCode.SLOW_DEPTHWISE: "{detail}",
    # ``quantcli.static.rules.pooling``: the measured A/B of the pool's float island
    SkipCode.SLOW_POOLING: "{detail}",
    SkipCode.MEASURED_NOT_SLOWER: "{detail}",
    SkipCode.RECURRENT_FEED: "{detail}",
    SkipCode.UNSUPPORTED_ATTRIBUTE: "{detail}",
    SkipCode.UNSUPPORTED_TYPE: "{detail}",
    SkipCode.UNSUPPORTED_PARAMETER: "{detail}",
    SkipCode.IN_SUBGRAPH: "inside a subgraph ({detail})",
    SkipCode.INPUT_COUNT: "expects {detail} inputs",
    SkipCode.INPUT_NOT_RUN: "input '{tensor}' never ran during calibration (branch or loop not taken)",
    SkipCode.INPUT_NOT_CALIBRATED: "input '{tensor}' is not a calibrated float activation",
    SkipCode.INPUT_NOT_FLOAT: "input '{tensor}' is not a float tensor",
    SkipCode.INPUT_NOT_QUANTIZED: "{detail}",
    SkipCode.INPUT_FROM_FLOAT_COMPUTE: "input '{tensor}' comes from a Conv/MatMul/Gemm kept in float",
    SkipCode.WEIGHT_NOT_CONSTANT: "{detail} is not a constant initializer",
    SkipCode.WEIGHT_NOT_CONSTANT_OR_ACTIVATION: (
        "input '{tensor}' is neither a constant nor a calibrated float activation"
    ),
    SkipCode.BIAS_NOT_VECTOR: "bias C is not a constant [N] vector with beta=1",
    SkipCode.NON_DATA_FLOAT_INPUT: "a non-data input is a float activation",
    SkipCode.NO_INPUT_RANGE: "no calibration range for input '{tensor}'",
    SkipCode.NO_OUTPUT_RANGE: "no calibration range for the output",
    SkipCode.GRAPH_OUTPUT: "graph output (kept float)",
    SkipCode.OUTPUTS_ONLY: "its output only reaches graph outputs (no integer op reads it)",
    SkipCode.READ_BY_FLOAT_COMPUTE: "read by a Conv/MatMul/Gemm kept in float",
    # e.g. "squares 'h' for the ReduceSum of a variance (x in [-3, 9], so x² on one grid over [0, 81]): ..."
    # (``quantcli.static.rules.variance_square``)
    SkipCode.VARIANCE_SQUARE: "{detail}",
    # ``quantcli.static.rules.gelu_tanh``
    SkipCode.GELU_TANH_CUBIC: "{detail}",
    # ``quantcli.static.rules.log_magnitude``: a filter of a spectral front end (Conv ... magnitude ... Log)
    SkipCode.LOG_MAGNITUDE: "{detail}",
    SkipCode.RUNTIME_ACTIVATION: "run-time activation quantization ({detail})",
    # e.g. "transformer encoder: residual stream read by LayerNormalization (outlier channels)"
    # one sentence per code: the reports group nodes by code ("by reason")
    SkipCode.RESIDUAL_STREAM: "transformer encoder: residual-stream Add read by a LayerNorm (outlier channels)",
    SkipCode.LINEAR_BIAS_FLOAT: (
        "transformer encoder: bias Add of a linear layer, added in float to its float output (no second rounding)"
    ),
    SkipCode.ATTENTION_FLOAT: (
        "transformer encoder: attention MatMul of two activations (q.kT or softmax.v; the softmax's uint8 grid "
        "loses every weight below 1/255)"
    ),
    SkipCode.MODE_UNSUPPORTED: "{detail}",
    SkipCode.NOT_APPLICABLE: "{detail}",
}


def render_reason(code: SkipCode, detail: str = "", tensor: str | None = None) -> str:
    """The sentence for ``code`` with its ``detail`` and ``tensor`` filled in."""
    if code == SkipCode.NODE_EXCLUDED and not detail:  # the modes get names, not the pattern that matched
        return "excluded by --exclude-nodes"
    return _TEMPLATES[code].format(detail=detail, tensor=tensor)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a rule did not fire on a node: a code, a detail for the sentence, the tensor at fault."""

    code: SkipCode
    detail: str = ""
    tensor: str | None = None

    @property
    def reason(self) -> str:
        """The rejection as one sentence."""
        return render_reason(self.code, self.detail, self.tensor)


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
    """A node left in float, and why: a reason code, its detail and the tensor at fault.

    ``reason`` renders the sentence the report shows; group or test on ``code``.
    """

    node: str
    op_type: str
    code: SkipCode
    detail: str = ""
    tensor: str | None = None

    @classmethod
    def of(cls, node: onnx.NodeProto, rejection: Rejection) -> Skip:
        """The skip of ``node`` for ``rejection``."""
        return cls(node.name, node.op_type, rejection.code, rejection.detail, rejection.tensor)

    @property
    def reason(self) -> str:
        """The reason as one sentence (what the report prints)."""
        return render_reason(self.code, self.detail, self.tensor)


@dataclass(frozen=True, slots=True)
class Declined:
    """A rule that did not fire on ``node`` and passed it on (or a Relu/Clip fold not made), and why."""

    node: str
    rule: str
    rejection: Rejection


@dataclass(frozen=True, slots=True)
class RangeDecision:
    """A tensor whose calibrated range was judged unusable or was narrowed, and what was done about it."""

    tensor: str
    observed_min: float
    observed_max: float
    decision: str
    #: the planning rule that decided (its name in ``QuantConfig.disabled_rules``), when one did
    rule: str | None = None


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
    #: nodes kept in float by exact name (an accuracy search's or a recipe's choice)
    float_nodes: frozenset[str] = field(default_factory=frozenset)
    #: rules that did not fire on a node and passed it on, and Relu/Clip folds not made (why, as data)
    declined: tuple[Declined, ...] = ()
    #: MatMul/Gemm run with run-time activation quantization (DynamicQuantizeLinear, int8 weights): they
    #: read float tensors here, like a float compute node, and the lowering's dynamic hook rewrites them
    dynamic_nodes: tuple[str, ...] = ()

    def summary(self) -> dict[str, int]:
        """Counts per op type of quantized nodes."""
        counts: dict[str, int] = {}
        for _, op in self.quantized_nodes:
            counts[op] = counts.get(op, 0) + 1
        return dict(sorted(counts.items()))
