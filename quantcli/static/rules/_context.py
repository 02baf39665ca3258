"""The state rules read and write while one graph is planned, and the helpers they share.

A ``PlanContext`` holds the graph index, the calibrated ranges, the configuration and what has been
decided so far (activation parameters, weights, folds, quantized and skipped nodes). Rules record
their decisions here; ``quantcli.static.planning`` turns the contexts of all graphs into a ``QuantPlan``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from quantcli.core.host import ConstantSpeedOracle, SpeedOracle
from quantcli.core.options import QuantConfig, WeightClipping
from quantcli.core.qmath import QuantizedTensor, QuantParams, params_from_range, quantize, quantize_weight
from quantcli.core.selection import NodeSelector
from quantcli.graph.index import GraphIndex
from quantcli.static.plan import (
    Declined,
    EmbeddingQuant,
    FoldedActivation,
    HardActivation,
    RangeDecision,
    RecurrentQuant,
    Rejection,
    Rescale,
    Skip,
    WeightQuant,
)
from quantcli.static.rules.dynamic import dynamic_problem, dynamic_rejection
from quantcli.static.rules.fold import fold_output
from quantcli.static.rules.score_top import score_top
from quantcli.static.rules.sigmoid_floor import floor_params
from quantcli.stats.ranges import TensorRange

__all__ = ["SENTINEL_CHECK", "SENTINEL_MAGNITUDE", "PlanContext"]

#: activations reaching this magnitude carry sentinels (masks, padding fills), not data
SENTINEL_MAGNITUDE = 1e9
#: name of the sentinel check in ``QuantConfig.disabled_rules``
SENTINEL_CHECK = "sentinel"
_SENTINEL_DECISION = (
    "kept in float: sentinel values (an attention mask or padding fill like -3.4e38) "
    "would stretch the range until every real value rounds to zero"
)


@dataclass(slots=True)
class PlanContext:
    """One graph being planned: its index, the inputs of planning and the decisions made so far."""

    index: GraphIndex
    ranges: Mapping[str, TensorRange]
    config: QuantConfig
    #: user patterns and the plan's float nodes (exact names)
    selector: NodeSelector = field(default_factory=NodeSelector)
    act: dict[str, QuantParams] = field(default_factory=dict)
    weights: list[WeightQuant] = field(default_factory=list)
    folded: list[FoldedActivation] = field(default_factory=list)
    folded_names: set[str] = field(default_factory=set)
    quantized: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    declined: list[Declined] = field(default_factory=list)
    float_out: set[str] = field(default_factory=set)  # MatMul/Gemm outputs that may stay float
    #: outputs of Conv/Gemm/MatMul kept in float; a Q right after them would make onnxruntime's
    #: WeightBiasQuantization quantize their weights anyway, so element-wise readers leave them alone
    float_locked: set[str] = field(default_factory=set)
    #: Conv/MatMul/Gemm kept in float by the options; they must read float tensors (see lowering)
    float_compute: set[str] = field(default_factory=set)
    range_decisions: list[RangeDecision] = field(default_factory=list)
    in_subgraph: bool = False
    recurrent: list[RecurrentQuant] = field(default_factory=list)
    #: node name -> why it stays float whatever the config says (``quantcli.static.recurrent``)
    keep_float: Mapping[str, str] = field(default_factory=dict)
    embeddings: list[EmbeddingQuant] = field(default_factory=list)
    rescaled: list[Rescale] = field(default_factory=list)
    hard: list[HardActivation] = field(default_factory=list)
    weight_cache: dict[tuple[str, int | None], QuantizedTensor] = field(default_factory=dict)
    #: how fast integer kernels run on the target host (rules that trade speed ask it)
    speed: SpeedOracle = field(default_factory=ConstantSpeedOracle)
    #: MatMul/Gemm run with run-time activation quantization (``rules.dynamic``); read like float compute
    dynamic: set[str] = field(default_factory=set)
    #: score tensors and their Sigmoid (``rules.score_top``), found on first use
    scores: dict[str, str] | None = None

    def enabled(self, name: str) -> bool:
        """False when rule or check ``name`` is in ``config.disabled_rules``."""
        return name not in self.config.disabled_rules

    # ---- parameters -------------------------------------------------------------------------
    def act_params(
        self, tensor: str, *, clip_min: float | None = None, clip_max: float | None = None
    ) -> QuantParams | None:
        """Activation parameters of ``tensor`` from its range (None: no range, or sentinel values)."""
        r = self.ranges.get(tensor)
        if r is None:
            return None
        if self.enabled(SENTINEL_CHECK) and max(abs(r.observed_min), abs(r.observed_max)) >= SENTINEL_MAGNITUDE:
            if tensor not in {d.tensor for d in self.range_decisions}:
                self.range_decisions.append(RangeDecision(tensor, r.observed_min, r.observed_max, _SENTINEL_DECISION))
            return None
        lo, hi = r.min, r.max
        top = score_top(self, tensor)  # a Sigmoid's score keeps its observed maximum (``rules.score_top``)
        if top is not None:
            hi = top
        if clip_min is not None:
            lo = max(lo, clip_min)
        if clip_max is not None:
            hi = min(hi, clip_max)
        return params_from_range(lo, hi, self.config.activation_type, symmetric=self.config.symmetric_activations)

    def weight(self, tensor: str, axis: int | None) -> QuantizedTensor:
        """The quantized constant ``tensor`` (per ``axis`` when per-channel), computed once."""
        key = (tensor, axis)
        if key not in self.weight_cache:
            self.weight_cache[key] = quantize_weight(
                self.index.constant(tensor),
                self.config.weight_type,
                axis=axis if self.config.per_channel else None,
                reduce_range=self.config.reduce_range,
                mse_clip=self.config.weight_clipping == WeightClipping.MSE,
            )
        return self.weight_cache[key]

    def constant_as_activation(self, tensor: str) -> QuantizedTensor:
        """A constant operand of an element-wise op, quantized like an activation over its own range."""
        value = self.index.constant(tensor).astype(np.float32)
        params = params_from_range(
            float(value.min()) if value.size else 0.0,
            float(value.max()) if value.size else 0.0,
            self.config.activation_type,
            symmetric=self.config.symmetric_activations,
        )
        return QuantizedTensor(quantize(value, params), params)

    def is_quantized(self, tensor: str) -> bool:
        """True when ``tensor`` already has activation parameters."""
        return tensor in self.act

    def is_float_activation(self, tensor: str) -> bool:
        """True when ``tensor`` was calibrated and is not a constant."""
        return tensor in self.ranges and not self.index.is_constant(tensor)

    def reads_float_compute(self, tensor: str) -> bool:
        """True when a Conv/MatMul/Gemm kept in float reads ``tensor`` (it must read the float tensor)."""
        return any(r.name in self.float_compute for r in self.index.consumers_of(tensor))

    # ---- records ----------------------------------------------------------------------------
    def reject(self, node: onnx.NodeProto, rejection: Rejection) -> None:
        """Leave ``node`` in float for ``rejection``."""
        self.skipped.append(Skip.of(node, rejection))

    def mark_dynamic(self, node: onnx.NodeProto) -> Rejection | None:
        """Run ``node`` with run-time activation quantization; the decision a rule returns, or None.

        None when ``node`` cannot (``rules.dynamic.dynamic_problem``): the caller plans it otherwise.
        The node reads float tensors from here on, like a float Conv/MatMul/Gemm; a producer planned
        earlier may keep a Q/DQ on its output, which the lowering does not give this node.
        """
        if self.in_subgraph or dynamic_problem(self.index, node) is not None:
            return None
        self.dynamic.add(node.name)
        self.float_compute.add(node.name)
        return dynamic_rejection()

    def decline(self, node: onnx.NodeProto, rule: str, rejection: Rejection) -> None:
        """Record that ``rule`` passed ``node`` on (kept as data, never a skip)."""
        self.declined.append(Declined(node.name, rule, rejection))

    def mark_quantized(self, node: onnx.NodeProto, op_type: str | None = None) -> None:
        """Record ``node`` as quantized (as ``op_type`` when given)."""
        self.quantized.append((node.name, op_type or node.op_type))

    def quantize_output(self, node: onnx.NodeProto, *, shared: QuantParams | None = None) -> None:
        """Give ``node``'s output its parameters; a lone Relu/Clip reader folds into them (``rules.fold``).

        An output only Sigmoids (or SiLUs) read starts its grid where they read 0 (``rules.sigmoid_floor``).
        """
        out = node.output[0]
        if shared is None and fold_output(self, node):
            return
        if shared is None and out not in self.act:
            shared = floor_params(self, node)
        params = shared if shared is not None else self.act_params(out)
        if params is not None:
            self.act.setdefault(out, params)
