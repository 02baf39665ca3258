"""Accuracy-driven quantization: the fastest model that meets an accuracy budget.

The user gives a budget (``max_accuracy_drop`` in points of top-1, and/or ``min_sqnr_db`` on the
outputs) and evaluation data. The search measures every step on that data and on this host:

1. **Calibration method, whole model.** Each method the calibration can provide (min-max, and from
   its histograms percentile, entropy and MSE) is tried; the best one is the base. With
   ``alternatives`` (e.g. the same model after CLE, SmoothQuant, bias correction and MSE weight
   clipping: ``SearchOptions.try_algorithms``), every method is tried on each alternative too, so
   the algorithms are chosen on the evaluation data like the methods are.
2. **Calibration method, per tensor.** For the tensors with the worst local error (from the same
   per-layer analysis ``compare --per-layer`` shows), each other method's range is tried for that
   tensor alone; a change is kept when the score improves.
3. **Fallback to float.** Quantized nodes are ordered by local SQNR (cheap: one pass); the
   ``probe`` most suspicious ones are measured one by one (only that node in float), and nodes are
   then returned to float in order of measured gain until the budget holds.
4. **Pruning.** Each node in float is tried quantized again, most MACs first; it stays quantized if
   the budget still holds.
5. **The cheapest model.** Among every trial that met the budget, the one of least MAC-weighted
   cost (``model_cost``: float MACs cost ``FLOAT_MAC_COST``, integer ones ``INTEGER_MAC_COST``) is
   returned, then the fewest float nodes: 8 float element-wise nodes beat 3 float MatMuls.

Each trial records the metric, the output SQNR and the batch-1 speed-up over FP32 measured
interleaved on the host, so the report shows the accuracy/latency trade-off of every step. The
search is deterministic: the same inputs give the same trials, the same choice and the same bytes
(latency is measured and reported but never used to decide, since it is noisy).

The budgeted metric (``max_accuracy_drop``) is top-1 against labels (per position for
batch x positions x classes outputs, negative labels unscored); without labels, or with
``SearchOptions.metric`` = ``AGREEMENT``, the share of samples whose top-1 changed against FP32,
an upper bound of the drop; or a user's task metric (``quantcli.compare.metrics``).

Algorithms the user asks for apply to every candidate: CLE and SmoothQuant have already changed the
FP32 graph the search starts from (``SearchBase.prepared``, calibrated after them), and bias
correction is redone for each candidate's plan (b' = b - E[x] E_W for the weights that candidate
quantizes), from per-channel input means collected once (``SearchBase.bias_stats``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnxruntime as ort

from quantcli.compare.evaluate import measure_latency
from quantcli.compare.gates import kind_gates
from quantcli.compare.layers import LayerError, per_layer_errors
from quantcli.compare.metrics import MetricSpec, evaluate_custom
from quantcli.compare.output_kinds import DEFAULT_MAP_THRESHOLD, KindMetrics, OutputKind, OutputKindObserver
from quantcli.core.errors import QuantCliError
from quantcli.core.options import DEFAULT_PERCENTILE, AlgorithmOptions, CalibrationMethod, QuantConfig
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import Dataset
from quantcli.graph.session import make_session
from quantcli.modes.dynamic import lower_dynamic_nodes
from quantcli.search.recipe import Recipe
from quantcli.static.bias_correction import BiasCorrectionReport, correct_biases
from quantcli.static.lowering import apply_plan
from quantcli.static.plan import QuantPlan
from quantcli.static.planning import ELEMENTWISE_OPS, MOVEMENT_OPS, make_plan
from quantcli.stats.calibration import CalibrationResult, TensorRange, activation_levels, ranges_for_levels, rechoose
from quantcli.stats.channel_stats import ChannelStats
from quantcli.verify.macs import compute_macs

__all__ = [
    "AGREEMENT",
    "FLOAT_MAC_COST",
    "INTEGER_MAC_COST",
    "Budget",
    "BudgetNotMetError",
    "Candidate",
    "SearchBase",
    "SearchOptions",
    "SearchResult",
    "Trial",
    "build_candidate",
    "cheapest",
    "closest_quantized",
    "describe_trial",
    "model_cost",
    "search_quantization",
]

HISTOGRAM_METHODS = (
    CalibrationMethod.MINMAX,
    CalibrationMethod.PERCENTILE,
    CalibrationMethod.ENTROPY,
    CalibrationMethod.MSE,
)
#: ``SearchOptions.metric`` name that decides on agreement with FP32 even when the data has labels
AGREEMENT = "agreement"
#: relative cost of a multiply-accumulate run in float, and in an integer kernel (the search's objective)
FLOAT_MAC_COST = 4.0
INTEGER_MAC_COST = 1.0
#: node types the search may return to float (others follow their neighbours)
FALLBACK_OPS = frozenset({"Conv", "MatMul", "Gemm"} | set(ELEMENTWISE_OPS))


class BudgetNotMetError(QuantCliError):
    """No configuration the search tried met the accuracy budget."""


@dataclass(frozen=True, slots=True)
class Budget:
    """The accuracy a quantized model must keep. ``None`` means the bound is not checked."""

    max_accuracy_drop: float | None = None  # points of top-1 (per scored position; agreement without labels)
    min_sqnr_db: float | None = None  # on every float output
    #: share of samples whose decision equals FP32's, on every classifier/sequence/binary output
    min_agreement: float | None = None
    min_cosine: float | None = None  # mean per-sample cosine, on every embedding output
    min_iou: float | None = None  # mean per-sample IoU of thresholded maps, on every map output

    def describe(self) -> str:
        """E.g. ``accuracy drop <= 0.5 points, SQNR >= 30 dB, agreement >= 0.99``."""
        parts = []
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop <= {self.max_accuracy_drop:g} points")
        if self.min_sqnr_db is not None:
            parts.append(f"SQNR >= {self.min_sqnr_db:g} dB")
        parts.extend(f"{name[4:]} >= {bound:g}" for name, bound in self.kind_bounds())
        return ", ".join(parts)

    def kind_bounds(self) -> list[tuple[str, float]]:
        """The task-level bounds given, by gate name (``quantcli.compare.gates.kind_gates``)."""
        named = (("min-agreement", self.min_agreement), ("min-cosine", self.min_cosine), ("min-iou", self.min_iou))
        return [(name, bound) for name, bound in named if bound is not None]

    def is_empty(self) -> bool:
        """No bound is checked."""
        return self.max_accuracy_drop is None and self.min_sqnr_db is None and not self.kind_bounds()

    def record(self) -> dict[str, float | None]:
        """The bounds for a recipe (the task-level ones only when given, so older recipes read the same)."""
        bounds: dict[str, float | None] = {
            "max_accuracy_drop": self.max_accuracy_drop,
            "min_sqnr_db": self.min_sqnr_db,
        }
        bounds.update((name.replace("-", "_"), bound) for name, bound in self.kind_bounds())
        return bounds


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """How hard the search tries."""

    budget: Budget
    methods: tuple[CalibrationMethod, ...] = HISTOGRAM_METHODS
    percentile: float = DEFAULT_PERCENTILE
    tensor_candidates: int = 4  # worst tensors whose method is tried alone
    probe: int = 8  # suspicious nodes measured one by one
    max_fallback: int = 24  # nodes the search may return to float
    latency_runs: int = 20  # interleaved batch-1 runs per trial (reported, never decisive)
    max_samples: int | None = 512  # evaluation samples used (None: all)
    try_algorithms: bool = False  # stage 1 also tries CLE + SmoothQuant + bias correction + MSE clipping
    #: a task metric (``quantcli.compare.metrics``: function of all outputs and labels, 0..1, higher is better)
    #: that ``max_accuracy_drop`` is measured on instead of top-1, or ``MetricSpec(AGREEMENT)``
    metric: MetricSpec | None = None
    #: output name -> kind, overriding the detection the task-level bounds are measured on
    output_kinds: Mapping[str, OutputKind] | None = None
    map_threshold: float = DEFAULT_MAP_THRESHOLD  # where a map is cut into a mask for ``min_iou``


@dataclass(frozen=True, slots=True)
class SearchBase:
    """Where candidates start from: the FP32 graph after CLE/SmoothQuant, its calibration and choices.

    ``bias_stats`` (input means of the Conv/Gemm/MatMul the plan may quantize) is required when
    ``algorithms.bias_correction`` is on. ``name`` tells trials of alternative bases apart ("" for
    the base the user asked for).
    """

    prepared: onnx.ModelProto = field(repr=False)
    calibration: CalibrationResult = field(repr=False)
    config: QuantConfig
    algorithms: AlgorithmOptions = field(default_factory=AlgorithmOptions)
    bias_stats: Mapping[str, ChannelStats] | None = field(default=None, repr=False)
    name: str = ""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One point of the search space."""

    method: CalibrationMethod
    tensor_methods: tuple[tuple[str, CalibrationMethod], ...] = ()
    float_nodes: tuple[str, ...] = ()
    base: str = ""  # SearchBase.name


@dataclass(frozen=True, slots=True)
class Trial:
    """One measured candidate."""

    step: int
    stage: str  # "method", "tensor method", "probe", "fallback", "prune"
    action: str
    candidate: Candidate
    accuracy: float | None  # percent, when the data has labels
    accuracy_drop: float | None  # points (FP32 minus quantized; agreement-based without labels)
    sqnr_db: float  # lowest over float outputs
    speedup_b1: float  # FP32 latency / quantized latency at batch 1 (median of interleaved runs)
    meets_budget: bool
    kept: bool = False  # the step's change was kept
    #: each output's kind and task metric (measured when the budget has task-level bounds)
    kinds: tuple[KindMetrics, ...] = ()


@dataclass(frozen=True, slots=True)
class SearchResult:
    """The trials, the chosen candidate and its model."""

    trials: tuple[Trial, ...]
    chosen: Trial
    fp32_accuracy: float | None
    budget: Budget
    model: onnx.ModelProto = field(repr=False)
    plan: QuantPlan = field(repr=False)
    num_samples: int = 0
    base: SearchBase | None = field(default=None, repr=False)  # the chosen candidate's base
    metric: str = "top1"  # what accuracy and drop are measured on ("top1 agreement" without labels)
    bias_correction: BiasCorrectionReport | None = None  # of the chosen candidate

    def recipe(self, model_sha256: str, config: QuantConfig, percentile: float) -> Recipe:
        """The decisions as a replayable recipe (``config`` is the chosen base's when there is one)."""
        c = self.chosen
        return Recipe(
            model_sha256=model_sha256,
            config=self.base.config if self.base is not None else config,
            algorithms=self.base.algorithms if self.base is not None else AlgorithmOptions(),
            method=c.candidate.method,
            percentile=percentile,
            tensor_methods=c.candidate.tensor_methods,
            float_nodes=c.candidate.float_nodes,
            search={
                "budget": self.budget.record(),
                "evaluation_samples": self.num_samples,
                "metric": self.metric,
                "fp32_accuracy": _finite(self.fp32_accuracy),
                "accuracy": _finite(c.accuracy),
                "accuracy_drop": _finite(c.accuracy_drop),
                "sqnr_db": _finite(c.sqnr_db),
                "speedup_b1": _finite(c.speedup_b1),
                "trials": len(self.trials),
            },
        )


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


# ---- building ----------------------------------------------------------------------------------


class _Ranges:
    """Ranges per method, derived once from the calibration's histograms, for ``levels`` integer levels.

    ``levels`` is the number of levels of the activation type the candidates use (entropy and MSE
    clips depend on it: ``stats.calibration.ranges_for_levels``), 256 for 8-bit types.
    """

    def __init__(self, calibration: CalibrationResult, percentile: float, levels: int = 256) -> None:
        self.calibration = calibration
        self.percentile = percentile
        self.levels = levels
        self._cache: dict[CalibrationMethod, Mapping[str, TensorRange]] = {}

    def available(self, wanted: tuple[CalibrationMethod, ...]) -> tuple[CalibrationMethod, ...]:
        own = self.calibration.method
        if not self.calibration.histograms:
            return (own,)
        return tuple(dict.fromkeys([own, *(m for m in wanted if m != CalibrationMethod.MOVING_AVERAGE)]))

    def of(self, method: CalibrationMethod) -> Mapping[str, TensorRange]:
        if method not in self._cache:
            chosen = rechoose(self.calibration, method, percentile=self.percentile, levels=self.levels)
            self._cache[method] = ranges_for_levels(chosen, self.levels)
        return self._cache[method]

    def for_candidate(self, cand: Candidate) -> dict[str, TensorRange]:
        ranges = dict(self.of(cand.method))
        for tensor, method in cand.tensor_methods:
            if tensor in ranges:
                ranges[tensor] = self.of(method)[tensor]
        return ranges


_Built = tuple[onnx.ModelProto, QuantPlan, BiasCorrectionReport | None]


def build_candidate(base: SearchBase, candidate: Candidate, *, percentile: float = DEFAULT_PERCENTILE) -> _Built:
    """The quantized model of ``candidate`` on ``base`` (what ``convert --recipe`` replays).

    Returns the model, its plan and the bias-correction report (None when it is off).
    """
    return _build(base, _ranges(base, percentile), candidate)


def _ranges(base: SearchBase, percentile: float) -> _Ranges:
    """The ranges of ``base``'s calibration, chosen for the levels of its activation type."""
    return _Ranges(base.calibration, percentile, activation_levels(base.config.activation_type))


def _build(base: SearchBase, ranges: _Ranges, cand: Candidate) -> _Built:
    # per-tensor methods are applied to the ranges; float nodes are handed to the plan by name
    chosen = ranges.for_candidate(cand)
    float_nodes = frozenset(cand.float_nodes)
    plan = make_plan(base.prepared, chosen, base.config, float_nodes=float_nodes)
    if not base.algorithms.bias_correction:
        return apply_plan(base.prepared, plan, dynamic=lower_dynamic_nodes), plan, None
    if base.bias_stats is None:
        raise ValueError("bias correction needs the base's bias_stats")
    # the ranges are the calibration's (taken before correction), as convert without a search does
    corrected, report = correct_biases(base.prepared, plan, base.bias_stats)
    plan = make_plan(corrected, chosen, base.config, float_nodes=float_nodes)
    return apply_plan(corrected, plan, dynamic=lower_dynamic_nodes), plan, report


# ---- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Score:
    accuracy: float | None
    accuracy_drop: float | None
    sqnr_db: float
    kinds: tuple[KindMetrics, ...] = ()


class _Evaluator:
    """FP32 outputs computed once; each candidate is scored against them."""

    def __init__(
        self,
        reference: onnx.ModelProto,
        dataset: Dataset,
        batch_size: int = 32,
        metric: MetricSpec | None = None,
        *,
        kinds: tuple[Mapping[str, OutputKind], float] | None = None,
    ) -> None:
        """``kinds`` (overrides, map threshold): measure each output's kind metric (task-level bounds)."""
        self.dataset = dataset
        self.kind_options = kinds
        self.metric = metric if metric is not None and metric.function is not None else None
        #: "agreement": labels ignored, the drop is the share of samples whose top-1 changed (an upper
        #: bound of the accuracy drop, and less noisy: a few hundred samples cannot resolve one point)
        agreement = metric is not None and metric.name == AGREEMENT
        self.session = make_session(reference)
        self.names = [o.name for o in self.session.get_outputs()]
        self.size = dataset.effective_batch_size(batch_size)
        self.feeds = list(dataset.batches(self.size))
        self.reference = [self.session.run(self.names, feed) for feed in self.feeds]
        self.counts = [dataset.batch_length(feed) for feed in self.feeds]
        #: each output's detected (or given) kind, FP32 against itself
        self.kinds = self._kinds(self.reference[:1]) if kinds is not None else ()
        self.labels = None if agreement else dataset.labels
        first = self.reference[0][0] if self.reference else np.zeros(0)
        scores = first.ndim >= 2 and first.shape[-1] > 1 and first.dtype.kind == "f"
        # batch x classes, or batch x positions... x classes with labels per position (token
        # classification, masked language models: negative labels are positions nobody scores)
        per_position = (
            self.labels is not None
            and np.asarray(self.labels).ndim == first.ndim - 1
            and np.asarray(self.labels).shape[1:] == first.shape[1:-1]
        )
        self.classifier = scores and (first.ndim == 2 or per_position)
        self.fp32_accuracy = self._accuracy([r[0] for r in self.reference]) if self.classifier else None
        if self.metric is not None:  # the user's metric decides, whatever the outputs look like
            self.classifier = True
            self.fp32_accuracy = 100.0 * evaluate_custom(self.metric, self.reference, self.names, self.labels)
        self.latency_feed = next(dataset.batches(1))

    def _accuracy(self, scores: list[np.ndarray]) -> float | None:
        if self.labels is None:
            return None
        pred = np.concatenate([s.argmax(-1) for s in scores])
        labels = np.asarray(self.labels)[: pred.shape[0]]
        if labels.shape != pred.shape:
            return None
        scored = labels >= 0
        if not scored.any():
            return None
        return 100.0 * float(np.mean(pred[scored] == labels[scored]))

    def _kinds(self, outputs: Sequence[Sequence[np.ndarray]]) -> tuple[KindMetrics, ...]:
        """The kind metrics of ``outputs`` (one list per feed) against the FP32 outputs."""
        overrides, threshold = self.kind_options or ({}, DEFAULT_MAP_THRESHOLD)
        observer = OutputKindObserver(overrides, map_threshold=threshold)
        for ref, out, n in zip(self.reference, outputs, self.counts, strict=False):
            observer(self.names, ref, out, n)
        return tuple(observer.results())

    def score(self, session: ort.InferenceSession) -> _Score:
        signal: dict[str, float] = dict.fromkeys(self.names, 0.0)
        noise: dict[str, float] = dict.fromkeys(self.names, 0.0)
        firsts: list[np.ndarray] = []
        everything: list[list[np.ndarray]] = []  # for a custom metric or kind metrics only
        for feed, ref in zip(self.feeds, self.reference, strict=True):
            out = session.run(self.names, feed)
            if self.metric is not None or self.kind_options is not None:
                everything.append(out)
            for name, r, q in zip(self.names, ref, out, strict=True):
                if r.dtype.kind != "f":
                    continue
                r64 = r.astype(np.float64)
                signal[name] += float(np.sum(r64 * r64))
                noise[name] += float(np.sum((r64 - q) ** 2))
            firsts.append(out[0])
        sqnrs = [
            (10 * math.log10(signal[n] / noise[n]) if noise[n] > 0 else math.inf)
            for n in self.names
            if signal[n] > 0 or noise[n] > 0
        ]
        sqnr = min(sqnrs) if sqnrs else math.inf
        accuracy = drop = None
        if self.metric is not None:
            accuracy = 100.0 * evaluate_custom(self.metric, everything, self.names, self.labels)
            drop = None if self.fp32_accuracy is None else self.fp32_accuracy - accuracy
        elif self.classifier:
            accuracy = self._accuracy(firsts)
            if accuracy is not None and self.fp32_accuracy is not None:
                drop = self.fp32_accuracy - accuracy
            else:  # no labels: the share of samples whose top-1 changed bounds the accuracy drop
                ref_top = np.concatenate([r[0].argmax(-1) for r in self.reference])
                q_top = np.concatenate([f.argmax(-1) for f in firsts])
                drop = 100.0 * float(np.mean(ref_top != q_top))
        kinds = self._kinds(everything) if self.kind_options is not None else ()
        return _Score(accuracy, drop, sqnr, kinds)


def _kind_margin(kinds: Sequence[KindMetrics], budget: Budget) -> float | None:
    """The smallest margin (value - bound) over every task-level bound and output it applies to."""
    bounds = budget.kind_bounds()
    if not bounds:
        return None
    values = [g.value - g.bound for name, bound in bounds for g in kind_gates(name, list(kinds), bound)]
    return -math.inf if any(math.isnan(v) for v in values) else min(values)


def _meets(score: _Score, budget: Budget) -> bool:
    if budget.max_accuracy_drop is not None and (
        score.accuracy_drop is None or score.accuracy_drop > budget.max_accuracy_drop + 1e-9
    ):
        return False
    margin = _kind_margin(score.kinds, budget)
    if margin is not None and margin < -1e-12:
        return False
    return budget.min_sqnr_db is None or score.sqnr_db >= budget.min_sqnr_db


def _key(score: _Score, budget: Budget) -> tuple[float, float]:
    """Larger is better: the budgeted metric first (accuracy drop, else the task-level margin), then SQNR."""
    margin = _kind_margin(score.kinds, budget)
    if budget.max_accuracy_drop is not None:
        primary = -(score.accuracy_drop or 0.0)
    elif margin is not None:
        primary = margin
    else:
        primary = score.sqnr_db
    return (round(primary, 9), round(score.sqnr_db, 6))


# ---- the search --------------------------------------------------------------------------------


def search_quantization(
    base: SearchBase,
    dataset: Dataset,
    options: SearchOptions,
    *,
    alternatives: Sequence[SearchBase] = (),
    reference: onnx.ModelProto | None = None,
    progress: Progress = no_progress,
    log: Callable[[str], None] = lambda _: None,
) -> SearchResult:
    """Find the cheapest candidate (fewest float MACs, ``model_cost``) that meets ``options.budget``.

    ``base`` holds the graph to quantize (after CLE/SmoothQuant when ``base.algorithms`` has them),
    its calibration and config; ``base.bias_stats`` is needed for ``algorithms.bias_correction``. Its
    name is ignored (the given base is ""). ``alternatives`` are other bases tried in stage 1 (named,
    each with its own graph and calibration). ``reference`` is the FP32 model scored against
    (default: ``base.prepared``).

    Raises:
        QuantCliError: the budget cannot be checked on this data (no labels or class scores for an
            accuracy budget).
        BudgetNotMetError: nothing tried met the budget (the message names the best attempt).
    """
    budget = options.budget
    if budget.is_empty():
        raise QuantCliError("the accuracy search needs a budget: $search", options=("search",))
    if options.max_samples is not None and dataset.num_samples > options.max_samples:
        dataset = dataset.subset(options.max_samples)
    kinds = (options.output_kinds or {}, options.map_threshold) if budget.kind_bounds() else None
    ev = _Evaluator(reference if reference is not None else base.prepared, dataset, metric=options.metric, kinds=kinds)
    _check_kinds(ev, budget, log)
    if budget.max_accuracy_drop is not None and not ev.classifier:
        raise QuantCliError(
            f"{dataset.path}: --max-accuracy-drop needs a classifier output (batch x classes, or batch x "
            "positions x classes with labels per position); "
            "use --min-sqnr for this model"
        )
    bases = {b.name: b for b in (replace(base, name=""), *alternatives)}
    if len(bases) != 1 + len(alternatives):
        raise ValueError("search bases need distinct names (the given one is '')")
    ranges = {name: _ranges(b, options.percentile) for name, b in bases.items()}
    search = _Search(bases, ranges, ev, dataset, options, log, macs=_node_macs(base.prepared, ev.latency_feed))
    best = _stage_methods(search)
    if not best.meets_budget:
        best = _stage_tensor_methods(search, best)
    if not best.meets_budget:
        best = _stage_fallback(search, best)
    return search.result(_settle(search, best))


def model_cost(candidate: Candidate, macs: Mapping[str, int | None]) -> float:
    """The MAC-weighted cost of ``candidate`` per sample: the MACs of each compute node (``macs``: node
    name -> MACs, unknown counted as 1) at ``FLOAT_MAC_COST`` when it is in float, else ``INTEGER_MAC_COST``."""
    floats = set(candidate.float_nodes)
    return sum(
        (m if m is not None else 1) * (FLOAT_MAC_COST if name in floats else INTEGER_MAC_COST)
        for name, m in macs.items()
    )


def cheapest(
    trials: Sequence[Trial],
    macs: Mapping[str, int | None],
    rank: Callable[[Trial], tuple[float, ...]] = lambda t: (t.sqnr_db,),
) -> Trial | None:
    """Among the trials that meet the budget, the cheapest model (``model_cost``), then the fewest float
    nodes, then the best ``rank`` (larger is better; default SQNR), then the earliest; None when none
    meets it."""
    met = [t for t in trials if t.meets_budget]
    if not met:
        return None

    def order(t: Trial) -> tuple[float, ...]:
        return (model_cost(t.candidate, macs), len(t.candidate.float_nodes), *(-x for x in rank(t)), t.step)

    return min(met, key=order)


def _node_macs(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, int | None]:
    """MACs per sample of each named compute node of ``model``."""
    macs = compute_macs(model, feed=feed)
    return {model.graph.node[i].name: m for i, m in macs.items() if model.graph.node[i].name}


def _check_kinds(ev: _Evaluator, budget: Budget, log: Callable[[str], None]) -> None:
    """Say what each output was detected as; every task-level bound needs an output of its kind."""
    for k in ev.kinds:
        log(f"output {k.name}: {k.kind} ({k.reason})")
    for name, bound in budget.kind_bounds():
        gate = kind_gates(name, list(ev.kinds), bound)[0]
        if gate.output is None:
            field_name = name.replace("-", "_")
            detected = ", ".join(f"{k.name}: {k.kind}" for k in ev.kinds) or "none"
            article = "an" if str(gate.kind)[:1] in "aeiou" else "a"
            raise QuantCliError(
                f"${field_name} needs {article} {gate.kind} output; detected {detected}: name one with $output_kinds",
                options=(field_name, "output_kinds"),
            )


_Cached = tuple[Trial, onnx.ModelProto, QuantPlan, BiasCorrectionReport | None]


@dataclass(slots=True)
class _Search:
    """One search: its bases, their ranges, the evaluator, and every trial made (cached by candidate)."""

    bases: dict[str, SearchBase]
    ranges: dict[str, _Ranges]
    ev: _Evaluator
    dataset: Dataset
    options: SearchOptions
    log: Callable[[str], None]
    #: MACs per sample of each compute node, by name (the objective's weights)
    macs: dict[str, int | None] = field(default_factory=dict)
    trials: list[Trial] = field(default_factory=list)
    cache: dict[Candidate, _Cached] = field(default_factory=dict)
    sensitivity: dict[Candidate, list[LayerError]] = field(default_factory=dict)

    def run(self, stage: str, action: str, cand: Candidate) -> Trial:
        """Build, score and time ``cand`` (once; a candidate seen before returns its trial)."""
        if cand in self.cache:
            return self.cache[cand][0]
        if cand.base:
            action = f"{action} (+ {cand.base})"
        model, plan, bc_report = _build(self.bases[cand.base], self.ranges[cand.base], cand)
        session = make_session(model)
        score = self.ev.score(session)
        lat = measure_latency(
            self.ev.session, session, self.ev.latency_feed, threads=1, warmup=3, runs=self.options.latency_runs
        )
        trial = Trial(
            step=len(self.trials) + 1,
            stage=stage,
            action=action,
            candidate=cand,
            accuracy=score.accuracy,
            accuracy_drop=score.accuracy_drop,
            sqnr_db=score.sqnr_db,
            speedup_b1=lat.speedup,
            meets_budget=_meets(score, self.options.budget),
            kinds=score.kinds,
        )
        self.trials.append(trial)
        self.cache[cand] = (trial, model, plan, bc_report)
        self.log(_describe(trial))
        return trial

    def keep(self, trial: Trial) -> Trial:
        """Mark ``trial``'s change as kept."""
        kept = replace(trial, kept=True)
        self.trials[trial.step - 1] = kept
        self.cache[trial.candidate] = (kept, *self.cache[trial.candidate][1:])
        return kept

    def key(self, t: Trial) -> tuple[float, float]:
        """Larger is better (``_key``)."""
        return _key(_Score(t.accuracy, t.accuracy_drop, t.sqnr_db, t.kinds), self.options.budget)

    def layer_errors(self, cand: Candidate) -> list[LayerError]:
        """Per-layer error of a built candidate on a few samples (once per candidate)."""
        if cand not in self.sensitivity:
            probe = self.dataset.subset(min(self.dataset.num_samples, 64))
            self.sensitivity[cand] = per_layer_errors(self.bases[cand.base].prepared, self.cache[cand][1], probe)
        return self.sensitivity[cand]

    def result(self, best: Trial) -> SearchResult:
        """The search's result with ``best`` chosen."""
        _, model, plan, bc_report = self.cache[best.candidate]
        ev = self.ev
        return SearchResult(
            trials=tuple(self.trials),
            chosen=best,
            fp32_accuracy=ev.fp32_accuracy,
            budget=self.options.budget,
            model=model,
            plan=plan,
            num_samples=self.dataset.num_samples,
            base=self.bases[best.candidate.base],
            bias_correction=bc_report,
            metric=ev.metric.name if ev.metric is not None else "top1" if ev.labels is not None else "top1 agreement",
        )


def _stage_methods(search: _Search) -> Trial:
    """1. The method for the whole model, on each base; the best is kept."""
    firsts = [
        search.run("method", f"all tensors: {m}", Candidate(m, base=name))
        for name, r in search.ranges.items()
        for m in r.available(search.options.methods)
    ]
    return search.keep(max(firsts, key=lambda t: (search.key(t), -t.step)))


def _stage_tensor_methods(search: _Search, best: Trial) -> Trial:
    """2. Per-tensor methods for the worst tensors; a change is kept when the score improves."""
    methods = search.ranges[best.candidate.base].available(search.options.methods)
    if len(methods) <= 1:
        return best
    errors = search.layer_errors(best.candidate)
    # data-movement outputs share their input's range: changing their method changes nothing
    own_range = [e for e in errors if e.op_type not in MOVEMENT_OPS]
    worst = sorted(own_range, key=lambda e: (_local(e), e.tensor))[: search.options.tensor_candidates]
    for err in worst:
        for m in methods:
            if m == best.candidate.method or best.meets_budget:
                continue
            overrides = dict(best.candidate.tensor_methods)
            overrides[err.tensor] = m
            cand = replace(best.candidate, tensor_methods=tuple(sorted(overrides.items())))
            trial = search.run("tensor method", f"'{err.tensor}': {m}", cand)
            if search.key(trial) > search.key(best):
                best = search.keep(trial)
    return best


def _fallback_order(search: _Search, best: Trial) -> list[str]:
    """Nodes that may return to float, most harmful first: the probed ones by measured gain, then the rest."""
    base_plan = search.cache[best.candidate][2]
    local = {e.node: _local(e) for e in search.layer_errors(best.candidate)}
    order = {name: i for i, (name, _) in enumerate(base_plan.quantized_nodes)}
    nodes = [name for name, op in base_plan.quantized_nodes if op in FALLBACK_OPS]
    # unmeasured nodes (e.g. MatMul with a float output) come after the measured ones
    nodes.sort(key=lambda n: (local.get(n, math.inf), order[n]))
    gains: dict[str, tuple[float, float]] = {}
    for name in nodes[: search.options.probe]:
        alone = search.run("probe", f"float: {name}", replace(best.candidate, float_nodes=(name,)))
        gains[name] = search.key(alone)
        if alone.meets_budget:
            break
    return sorted(gains, key=lambda n: (tuple(-x for x in gains[n]), order[n])) + [n for n in nodes if n not in gains]


def _stage_fallback(search: _Search, best: Trial) -> Trial:
    """3. Return nodes to float until the budget holds; 4. re-quantize those it does not need."""
    floats: list[str] = []
    for name in _fallback_order(search, best)[: search.options.max_fallback]:
        floats.append(name)
        cand = replace(best.candidate, float_nodes=tuple(sorted(floats)))
        trial = search.run("fallback", f"+ float: {name}", cand)
        if trial.meets_budget:
            best = search.keep(trial)
            break
    if best.meets_budget:  # prune: re-quantize what the budget does not need, most MACs first (then latest)
        latest = {n: i for i, n in enumerate(floats)}
        for name in sorted(floats[:-1], key=lambda n: (-(search.macs.get(n) or 0), -latest[n])):
            rest = tuple(n for n in best.candidate.float_nodes if n != name)
            trial = search.run("prune", f"- float: {name} (quantized again)", replace(best.candidate, float_nodes=rest))
            if trial.meets_budget:
                best = search.keep(trial)
    return best


def _settle(search: _Search, best: Trial) -> Trial:
    """The cheapest trial that met the budget (``cheapest``), or an error naming the closest one."""
    chosen = cheapest(search.trials, search.macs, search.key)
    if chosen is not None:
        if chosen.step != best.step or not best.meets_budget:
            search.log(f"cheapest in the budget: step {chosen.step} ({model_cost(chosen.candidate, search.macs):,.0f})")
        return search.keep(chosen)
    closest = max(search.trials, key=search.key)
    raise BudgetNotMetError(
        f"no quantization met the budget ({search.options.budget.describe()}) after {len(search.trials)} trials; "
        f"best: {_describe(closest)}; loosen the budget or raise --search-max-fallback"
    )


def _local(err: LayerError) -> float:
    """The error a tensor adds by itself (its accumulated error when the local one is unknown)."""
    value = err.local_sqnr_db if err.local_sqnr_db is not None else err.sqnr_db
    return math.inf if math.isnan(value) else float(value)


def closest_quantized(result: SearchResult, compute_nodes: Sequence[str]) -> Trial | None:
    """The trial nearest the budget that left at least one of ``compute_nodes`` quantized (None if none did)."""
    wanted = set(compute_nodes)
    kept = [t for t in result.trials if not wanted <= set(t.candidate.float_nodes)]
    if not kept:
        return None
    return max(
        kept, key=lambda t: (_key(_Score(t.accuracy, t.accuracy_drop, t.sqnr_db, t.kinds), result.budget), -t.step)
    )


def describe_trial(t: Trial) -> str:
    """One line: the trial's step, action, fidelity, speed and number of float nodes."""
    return _describe(t)


def _describe(t: Trial) -> str:
    parts = [f"step {t.step} {t.stage}: {t.action}"]
    if t.accuracy is not None:
        parts.append(f"top-1 {t.accuracy:.2f}%")
    if t.accuracy_drop is not None:
        parts.append(f"drop {t.accuracy_drop:.2f}")
    parts.append(f"SQNR {t.sqnr_db:.1f} dB")
    parts.extend(
        _kind_value(k) for k in t.kinds if k.agreement is not None or k.cosine is not None or k.iou is not None
    )
    parts.append(f"{t.speedup_b1:.2f}x FP32 at b1")
    parts.append(f"{len(t.candidate.float_nodes)} float")
    parts.append("meets budget" if t.meets_budget else "misses budget")
    return ", ".join(parts)


def _kind_value(k: KindMetrics) -> str:
    """E.g. ``y agreement 0.969``."""
    label, value = next(
        (lbl, v) for lbl, v in (("agreement", k.agreement), ("cosine", k.cosine), ("IoU", k.iou)) if v is not None
    )
    return f"{k.name} {label} {value:.3f}"
