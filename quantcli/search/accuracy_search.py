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
3. **Run-time quantization, then float.** Quantized nodes are ordered by local SQNR (cheap: one pass,
   measured once per candidate and reused); the ``probe`` most suspicious ones are measured one by one
   (only that node in float), and nodes are then moved one notch in order of measured gain until the
   budget holds: a MatMul/Gemm with a constant weight first to run-time activation quantization
   (``Candidate.dynamic_nodes``: DynamicQuantizeMatMul, cost between integer and float), to float when
   that does not meet the budget; other nodes to float.
   **Regions.** When no run of single moves reaches the budget (``max_fallback`` nodes, or fewer when the
   first ``STALL_AFTER`` show that the rest cannot: ``_stage_fallback``), the first or
   last ``p`` compute nodes of the network go float together, ``p`` found by bisection from each end:
   error that accumulates through a whole backbone is repaired there, not by a few nodes. The compute
   nodes include the MatMul/Gemm a rule runs at run time; a region whose static rest misses tries that
   rest's MatMul/Gemm at run time; when neither end meets the budget, the first ``p`` and the last node
   float together (a sensitive stem and head). **3c:** when no region meets it, every MatMul/Gemm that
   can runs at run time with the other compute nodes float, then the last node float as well.
   ``max_fallback = 0`` skips the regions and 3c: no node returns to float.
4. **Pruning.** Each moved node is tried statically quantized again, most MACs first; it stays so if
   the budget still holds; a float MatMul/Gemm that must stay tries run-time quantization instead.
5. **The fastest model.** The trials that met the budget are ranked by cost (``quantcli.search.cost``:
   each compute node's MACs divided by its form's speed measured on this host, the constant
   ``FLOAT_MAC_COST``:``DYNAMIC_MAC_COST``:``INTEGER_MAC_COST`` without a measuring oracle), then the
   fewest float nodes: 8 float element-wise nodes beat 3 float MatMuls. The ``confirm`` cheapest are
   timed against FP32 at batch 1 (``SearchOptions.timer``, ``quantcli.search.confirm``) and the fastest
   is returned; without a timer the cheapest is.

Each trial records the metric, the output SQNR and the batch-1 speed-up over FP32 measured
interleaved on the host, so the report shows the accuracy/latency trade-off of every step. The
trials are deterministic: the same inputs give the same trials (a trial's own quick latency is
reported, never used to decide); the choice among the cheapest few follows their confirmation
timing when a timer is given (convert gives one), so it is as stable as that timing.

The budgeted metric (``max_accuracy_drop``) is top-1 against labels (per position for
batch x positions x classes outputs, negative labels unscored); without labels, or with
``SearchOptions.metric`` = ``AGREEMENT``, the share of samples whose top-1 changed against FP32,
an upper bound of the drop; or a user's task metric (``quantcli.compare.metrics``).

The parts live in their own modules: the budget and how a score meets it (``budget.py``), the
evaluator that scores candidates (``evaluator.py``), the batches a memory budget allows it and the
sensitivity ranking (``memory.py``: ``SearchOptions.max_memory``), the cost model (``cost.py``), the
confirmation timing (``confirm.py``); this module holds the candidates and the stages. With
``SearchOptions.ray`` the independent candidates of a stage are scored as Ray tasks at once
(``quantcli.distributed.score_on_ray``) and recorded in the stage's order: the same trials.

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

from quantcli.compare.evaluate import measure_latency
from quantcli.compare.gates import kind_gates
from quantcli.compare.layers import LayerError, per_layer_errors
from quantcli.compare.map_thresholds import MapThreshold
from quantcli.compare.metrics import MetricSpec
from quantcli.compare.output_kinds import DEFAULT_MAP_THRESHOLD, KindMetrics, OutputKind
from quantcli.core.errors import QuantCliError
from quantcli.core.host import ConstantSpeedOracle, SpeedOracle
from quantcli.core.options import DEFAULT_PERCENTILE, AlgorithmOptions, CalibrationMethod, QuantConfig
from quantcli.core.progress import Progress, no_progress
from quantcli.core.units import byte_text
from quantcli.data.datasets import Dataset, spread
from quantcli.graph.index import GraphIndex
from quantcli.graph.session import make_session
from quantcli.modes.dynamic import lower_dynamic_nodes
from quantcli.search.budget import (
    AGREEMENT,
    Budget,
    BudgetNotMetError,
    Score,
    key,
    meets,
    primary_target,
    required_share,
    standard_errors,
)
from quantcli.search.confirm import TIMING_NOISE, Timer, fastest
from quantcli.search.cost import (
    DYNAMIC_MAC_COST,
    FLOAT_MAC_COST,
    INTEGER_MAC_COST,
    CostTable,
    NodeCosts,
    as_cost_table,
    candidate_cost,
    cost_table,
)
from quantcli.search.evaluator import Evaluator
from quantcli.search.memory import SEARCH_BATCH, search_memory_budget
from quantcli.search.recipe import Recipe
from quantcli.static.bias_correction import BiasCorrectionReport, correct_biases
from quantcli.static.lowering import apply_plan
from quantcli.static.plan import QuantPlan
from quantcli.static.planning import ELEMENTWISE_OPS, MOVEMENT_OPS, make_plan
from quantcli.static.rules.dynamic import DYNAMIC_OPS, dynamic_problem
from quantcli.stats.calibration import CalibrationResult, TensorRange, activation_levels, ranges_for_levels, rechoose
from quantcli.stats.channel_stats import ChannelStats
from quantcli.verify.macs import compute_macs

__all__ = [
    "AGREEMENT",
    "DYNAMIC_MAC_COST",
    "FLOAT_MAC_COST",
    "INTEGER_MAC_COST",
    "Budget",
    "BudgetNotMetError",
    "Candidate",
    "NodeCosts",
    "SearchBase",
    "SearchOptions",
    "SearchResult",
    "SecondFold",
    "Trial",
    "build_candidate",
    "cheapest",
    "closest_quantized",
    "describe_trial",
    "model_cost",
    "ranked",
    "search_quantization",
]

HISTOGRAM_METHODS = (
    CalibrationMethod.MINMAX,
    CalibrationMethod.PERCENTILE,
    CalibrationMethod.ENTROPY,
    CalibrationMethod.MSE,
)
#: node types the search may return to float (others follow their neighbours)
FALLBACK_OPS = frozenset({"Conv", "MatMul", "Gemm"} | set(ELEMENTWISE_OPS))
#: fallback moves made before the search judges whether the rest can reach the budget (``_stalled``)
STALL_AFTER = 6
#: node types a float region (stage 3b) is counted in
REGION_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """How hard the search tries."""

    budget: Budget
    methods: tuple[CalibrationMethod, ...] = HISTOGRAM_METHODS
    percentile: float = DEFAULT_PERCENTILE
    tensor_candidates: int = 4  # worst tensors whose method is tried alone
    probe: int = 8  # suspicious nodes measured one by one
    max_fallback: int = 24  # nodes the single moves may return to float (0: no stage floats a node)
    latency_runs: int = 20  # interleaved batch-1 runs per trial (reported, never decisive)
    max_samples: int | None = 512  # evaluation samples used (None: all)
    try_algorithms: bool = False  # stage 1 also tries CLE + SmoothQuant + bias correction + MSE clipping
    #: a task metric (``quantcli.compare.metrics``: function of all outputs and labels, 0..1, higher is better)
    #: that ``max_accuracy_drop`` is measured on instead of top-1, or ``MetricSpec(AGREEMENT)``
    metric: MetricSpec | None = None
    #: output name -> kind, overriding the detection the task-level bounds are measured on
    output_kinds: Mapping[str, OutputKind] | None = None
    #: where a map is cut into a mask for ``min_iou`` (every map's, or per output: ``MapThresholds``)
    map_threshold: MapThreshold = DEFAULT_MAP_THRESHOLD
    #: the cheapest candidates in the budget timed against FP32 before choosing (``quantcli.search.confirm``)
    confirm: int = 3
    #: how they are timed (None: not timed, the cost alone decides; convert passes a batch-1 timer)
    timer: Timer | None = None
    #: bytes a batch of activations may take while candidates are scored and ranked (``quantcli.search.memory``:
    #: the batches shrink to fit, down to 1; None: calibrate's default, 512 MiB)
    max_memory: int | None = None
    #: score independent candidates (the methods of stage 1, the probes of stage 3) as Ray tasks at once:
    #: "local" starts Ray on this machine, else a cluster address (``quantcli.distributed.score_on_ray``); the
    #: trials are the same as in one process
    ray: str | None = None


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
    #: kernel speeds on the target host: the plans' speed rules and the search's costs (None: constants)
    speed: SpeedOracle | None = field(default=None, repr=False)
    #: one sample's input shapes, at which the plans see dynamic input dims (``make_plan``'s ``input_shapes``)
    input_shapes: Mapping[str, tuple[int, ...]] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class SecondFold:
    """The search's bases calibrated again on the data without ``dataset``'s samples (``quantcli.pipeline.holdout``).

    Each candidate is built from these too and scored on ``dataset``, and its score is over both sets of
    samples: the budget is met on twice the samples no calibration of theirs read. A share chosen among
    many trials reads high by luck: ddddocr's recognizer met strings 0.95 on 64 held lines (63 read like
    FP32) and read 0.954 of all 197 calibration lines and 0.945 of 182 held-out ones.
    """

    #: the base and the alternatives, in ``search_quantization``'s order (their names are not read)
    bases: Sequence[SearchBase] = field(repr=False)
    dataset: Dataset = field(repr=False)
    #: samples neither fold scores: a trial that meets the budget on both must meet it on these too, as
    #: given (``Budget.margin`` 0), scored by the first fold's model (None: no such samples)
    confirmation: Dataset | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One point of the search space."""

    method: CalibrationMethod
    tensor_methods: tuple[tuple[str, CalibrationMethod], ...] = ()
    float_nodes: tuple[str, ...] = ()
    base: str = ""  # SearchBase.name
    #: MatMul/Gemm run with run-time activation quantization (``QuantPlan.dynamic_nodes``)
    dynamic_nodes: tuple[str, ...] = ()


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
    #: the score on the confirmation samples (``SecondFold.confirmation``), measured when the trial met the
    #: budget on the scored ones; ``meets_budget`` holds only when it meets it there too
    confirmation: Score | None = None
    sqnr_error_db: float = 0.0  # ``Score.sqnr_error_db``
    accuracy_error: float = 0.0  # ``Score.accuracy_error``

    def score(self) -> Score:
        """The score the trial was judged on."""
        return Score(
            self.accuracy,
            self.accuracy_drop,
            self.sqnr_db,
            self.kinds,
            sqnr_error_db=self.sqnr_error_db,
            accuracy_error=self.accuracy_error,
        )


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
            dynamic_nodes=c.candidate.dynamic_nodes,
            search={
                "budget": self.budget.record(),
                "evaluation_samples": self.num_samples,
                "metric": self.metric,
                "fp32_accuracy": _finite(self.fp32_accuracy),
                "accuracy": _finite(c.accuracy),
                "accuracy_drop": _finite(c.accuracy_drop),
                "accuracy_error": _finite(c.accuracy_error),
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

    def plan_of(model: onnx.ModelProto) -> QuantPlan:
        return make_plan(
            model,
            chosen,
            base.config,
            float_nodes=frozenset(cand.float_nodes),
            dynamic_nodes=frozenset(cand.dynamic_nodes),
            speed=base.speed or ConstantSpeedOracle(),
            input_shapes=base.input_shapes,
        )

    plan = plan_of(base.prepared)
    if not base.algorithms.bias_correction:
        return apply_plan(base.prepared, plan, dynamic=lower_dynamic_nodes), plan, None
    if base.bias_stats is None:
        raise ValueError("bias correction needs the base's bias_stats")
    # the ranges are the calibration's (taken before correction), as convert without a search does
    corrected, report = correct_biases(base.prepared, plan, base.bias_stats)
    plan = plan_of(corrected)
    return apply_plan(corrected, plan, dynamic=lower_dynamic_nodes), plan, report


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
    second_fold: SecondFold | None = None,
) -> SearchResult:
    """Find the cheapest candidate (fewest float MACs, ``model_cost``) that meets ``options.budget``.

    ``base`` holds the graph to quantize (after CLE/SmoothQuant when ``base.algorithms`` has them),
    its calibration and config; ``base.bias_stats`` is needed for ``algorithms.bias_correction``. Its
    name is ignored (the given base is ""). ``alternatives`` are other bases tried in stage 1 (named,
    each with its own graph and calibration). ``reference`` is the FP32 model scored against
    (default: ``base.prepared``). ``second_fold``: every candidate is scored on its samples as well,
    built from its bases (``SecondFold``).

    Raises:
        QuantCliError: the budget cannot be checked on this data (no labels or class scores for an
            accuracy budget).
        BudgetNotMetError: nothing tried met the budget (the message names the best attempt).
    """
    if options.ray is None:
        return _search_quantization(base, dataset, options, alternatives, reference, log, second_fold)
    if options.metric is not None and options.metric.function is not None:
        raise QuantCliError(
            "--ray scores candidates on Ray workers, which cannot call a custom --search-metric: "
            "use top1 or agreement, or leave out --ray"
        )
    from quantcli.distributed import ray_cluster

    with ray_cluster(options.ray):
        return _search_quantization(base, dataset, options, alternatives, reference, log, second_fold)


def _search_quantization(
    base: SearchBase,
    dataset: Dataset,
    options: SearchOptions,
    alternatives: Sequence[SearchBase],
    reference: onnx.ModelProto | None,
    log: Callable[[str], None],
    second_fold: SecondFold | None,
) -> SearchResult:
    """``search_quantization``, with Ray started when ``options.ray`` asks for it."""
    budget = options.budget
    if budget.is_empty():
        raise QuantCliError("the accuracy search needs a budget: $search", options=("search",))
    if second_fold is not None and len(second_fold.bases) != 1 + len(alternatives):
        raise ValueError("the second fold needs one base for the base and each alternative")
    parts, confirmation = _samples(dataset, second_fold, options.max_samples)
    dataset = parts[0]
    fp32 = reference if reference is not None else base.prepared
    ev, confirm = _evaluators(fp32, parts, confirmation, options, log)
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
    fold_bases = dict(zip(bases, second_fold.bases, strict=True)) if second_fold is not None else {}
    macs = _node_macs(base.prepared, ev.latency_feed)
    search = _Search(
        bases,
        ranges,
        ev,
        dataset,
        options,
        log,
        macs=macs,
        costs=cost_table(base.prepared, macs, base.speed),
        dynamic_ok=_dynamic_ok(base.prepared),
        reference=fp32,
        folds={name: (b, _ranges(b, options.percentile)) for name, b in fold_bases.items()},
        confirm=confirm,
    )
    best = _stage_methods(search)
    if not best.meets_budget:
        best = _stage_tensor_methods(search, best)
    # max_fallback 0: no node returns to float in any stage, not even in a probe (one that met the budget
    # would be among the trials the answer is chosen from)
    if not best.meets_budget and options.max_fallback > 0:
        best = _stage_fallback(search, best)
        if not best.meets_budget:
            best = _stage_regions(search, best)
    return search.result(_settle(search, best))


def _evaluators(
    fp32: onnx.ModelProto,
    parts: Sequence[Dataset],
    confirmation: Dataset | None,
    options: SearchOptions,
    log: Callable[[str], None],
) -> tuple[Evaluator, Evaluator | None]:
    """The evaluator of the scored samples (one part a fold) and the confirmation's (None without samples)."""
    kinds = (options.output_kinds or {}, options.map_threshold) if options.budget.kind_bounds() else None
    budget_bytes = search_memory_budget(options.max_memory)
    ev = Evaluator(fp32, parts[0], metric=options.metric, kinds=kinds, max_memory=budget_bytes, folds=parts[1:])
    if ev.batches.sensitivity < SEARCH_BATCH:
        log(
            f"{byte_text(ev.batches.per_sample)} of activations a sample: candidates scored at batch {ev.size}, "
            f"ranked at batch {ev.batches.sensitivity} (--max-memory {byte_text(budget_bytes)})"
        )
    confirm = None
    if confirmation is not None:
        confirm = Evaluator(fp32, confirmation, metric=options.metric, kinds=kinds, max_memory=budget_bytes)
    if len(parts) > 1:
        log(
            f"scoring each candidate on {parts[1].num_samples} more samples, built from a calibration that did "
            f"not read them: the budget is met on {ev.num_samples} samples"
            + (f", and confirmed on {confirm.num_samples} others" if confirm is not None else "")
        )
    return ev, confirm


def _samples(
    dataset: Dataset, second_fold: SecondFold | None, max_samples: int | None
) -> tuple[list[Dataset], Dataset | None]:
    """The scored samples, one part a fold (``max_samples`` shared by them), and the confirmation samples
    (at most ``max_samples``; None without a second fold or such samples)."""
    if second_fold is None:
        parts, confirmation = [dataset], None
    else:
        parts, confirmation = [dataset, second_fold.dataset], second_fold.confirmation
    if max_samples is None:
        return parts, confirmation
    limit = max(1, max_samples // len(parts))
    parts = [p.subset(limit) if p.num_samples > limit else p for p in parts]
    if confirmation is not None and confirmation.num_samples > max_samples:  # spread: data sorted by class
        confirmation = confirmation.select(spread(confirmation.num_samples, max_samples))
    return parts, confirmation


def model_cost(candidate: Candidate, costs: Mapping[str, int | None] | CostTable) -> float:
    """The per-sample cost of ``candidate`` (``quantcli.search.cost``): ``costs`` is a cost table, or MACs per
    compute node (unknown counted as 1) weighted ``FLOAT_MAC_COST``/``DYNAMIC_MAC_COST``/``INTEGER_MAC_COST``."""
    return candidate_cost(candidate.float_nodes, candidate.dynamic_nodes, as_cost_table(costs))


def ranked(
    trials: Sequence[Trial],
    costs: Mapping[str, int | None] | CostTable,
    rank: Callable[[Trial], tuple[float, ...]] = lambda t: (t.sqnr_db,),
) -> list[Trial]:
    """The trials that meet the budget, cheapest model first (``model_cost``), then the fewest float nodes,
    then the fewest run-time quantized ones, then the best ``rank`` (larger is better; default SQNR), then
    the earliest."""
    table = as_cost_table(costs)

    def order(t: Trial) -> tuple[float, ...]:
        c = t.candidate
        cost = candidate_cost(c.float_nodes, c.dynamic_nodes, table)
        return (cost, len(c.float_nodes), len(c.dynamic_nodes), *(-x for x in rank(t)), t.step)

    return sorted((t for t in trials if t.meets_budget), key=order)


def cheapest(
    trials: Sequence[Trial],
    costs: Mapping[str, int | None] | CostTable,
    rank: Callable[[Trial], tuple[float, ...]] = lambda t: (t.sqnr_db,),
) -> Trial | None:
    """The first of ``ranked`` (the cheapest model in the budget), None when no trial meets it."""
    met = ranked(trials, costs, rank)
    return met[0] if met else None


def _dynamic_ok(model: onnx.ModelProto) -> frozenset[str]:
    """The MatMul/Gemm of ``model`` that can run with run-time activation quantization."""
    index = GraphIndex.build(model.graph)
    return frozenset(
        n.name for n in model.graph.node if n.name and n.op_type in DYNAMIC_OPS and dynamic_problem(index, n) is None
    )


def _node_macs(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, int | None]:
    """MACs per sample of each named compute node of ``model``."""
    macs = compute_macs(model, feed=feed)
    return {model.graph.node[i].name: m for i, m in macs.items() if model.graph.node[i].name}


def _need(name: str, bound: float, samples: int, margin: float) -> str:
    """What a task-level bound asks of the scored samples once the margin is added, in words."""
    if name != "min-agreement":
        return f"{name[4:]} >= {bound:g} needs its mean less {standard_errors(margin)} of its samples"
    share = required_share(bound, samples, margin)
    if share >= 1.0:
        return f"agreement >= {bound:g} needs all {samples} to agree (too few to show it by the margin)"
    return f"agreement >= {bound:g} needs {share:.3f}"


def _check_kinds(ev: Evaluator, budget: Budget, log: Callable[[str], None]) -> None:
    """Say what each output was detected as; every task-level bound needs an output of its kind."""
    for k in ev.kinds:
        log(f"output {k.name}: {k.kind} ({k.reason})")
    if budget.has_margin():
        samples = sum(ev.counts)
        needs = [_need(name, bound, samples, budget.margin) for name, bound in budget.kind_bounds()]
        if budget.max_accuracy_drop is not None:
            needs.insert(
                0,
                f"accuracy drop <= {budget.max_accuracy_drop:g} points needs it plus {standard_errors(budget.margin)} "
                "of its samples",
            )
        if budget.min_sqnr_db is not None:
            needs.append(
                f"SQNR >= {budget.min_sqnr_db:g} dB needs it less {standard_errors(budget.margin)} of its samples"
            )
        log(
            f"the bounds must hold by {standard_errors(budget.margin)} on {samples} scored samples, so that "
            f"they hold on new data: {'; '.join(needs)} (--search-margin 0: the bounds as given)"
        )
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


#: a trial, its model (None once dropped: a model that missed the budget is rebuilt if needed), plan, report
_Cached = tuple[Trial, onnx.ModelProto | None, QuantPlan, BiasCorrectionReport | None]


@dataclass(slots=True)
class _Search:
    """One search: its bases, their ranges, the evaluator, and every trial made (cached by candidate)."""

    bases: dict[str, SearchBase]
    ranges: dict[str, _Ranges]
    ev: Evaluator
    dataset: Dataset
    options: SearchOptions
    log: Callable[[str], None]
    #: MACs per sample of each compute node, by name
    macs: dict[str, int | None] = field(default_factory=dict)
    #: each compute node's cost per form on the host (the objective, ``quantcli.search.cost``)
    costs: CostTable = field(default_factory=dict)
    #: MatMul/Gemm that can run with run-time activation quantization (the fallback's first move for them)
    dynamic_ok: frozenset[str] = frozenset()
    reference: onnx.ModelProto | None = field(default=None, repr=False)  # what the trials are timed against
    trials: list[Trial] = field(default_factory=list)
    cache: dict[Candidate, _Cached] = field(default_factory=dict)
    sensitivity: dict[Candidate, list[LayerError]] = field(default_factory=dict)
    #: candidates scored ahead as Ray tasks (``prefetch``), recorded when ``run`` reaches them
    ahead: dict[Candidate, tuple[_Built, Score]] = field(default_factory=dict)
    #: the second fold's base and ranges by base name (empty: no second fold, ``SecondFold``)
    folds: dict[str, tuple[SearchBase, _Ranges]] = field(default_factory=dict)
    #: scores a trial that met the budget on the samples nobody chose on (``SecondFold.confirmation``)
    confirm: Evaluator | None = None

    def fold_models(self, cand: Candidate) -> tuple[onnx.ModelProto, ...]:
        """``cand`` built from the second fold's calibration (none without a second fold)."""
        if not self.folds:
            return ()
        base, ranges = self.folds[cand.base]
        return (_build(base, ranges, cand)[0],)

    def prefetch(self, cands: Sequence[Candidate]) -> None:
        """With ``options.ray``: score the candidates not tried yet as Ray tasks at once. ``run`` records
        each when the stage reaches it, in the stage's order, so the trials are one process's; those a
        stage never reaches (a probe after one that met the budget) are dropped at the next prefetch."""
        if self.options.ray is None:
            return
        self.ahead.clear()
        todo = [c for c in dict.fromkeys(cands) if c not in self.cache]
        if len(todo) < 2:
            return
        from quantcli.distributed import score_on_ray

        built = [_build(self.bases[c.base], self.ranges[c.base], c) for c in todo]
        scores = score_on_ray(self.ev, [(b[0], *self.fold_models(c)) for b, c in zip(built, todo, strict=True)])
        self.ahead.update(zip(todo, zip(built, scores, strict=True), strict=True))

    def run(self, stage: str, action: str, cand: Candidate) -> Trial:
        """Build, score and time ``cand`` (once; a candidate seen before returns its trial)."""
        if cand in self.cache:
            return self.cache[cand][0]
        if cand.base:
            action = f"{action} (+ {cand.base})"
        ahead = self.ahead.pop(cand, None)
        model, plan, bc_report = (
            ahead[0] if ahead is not None else _build(self.bases[cand.base], self.ranges[cand.base], cand)
        )
        session = make_session(model)
        score = (
            ahead[1]
            if ahead is not None
            else self.ev.score(session, *(make_session(m) for m in self.fold_models(cand)))
        )
        lat = measure_latency(
            self.ev.session, session, self.ev.latency_feed, threads=1, warmup=3, runs=self.options.latency_runs
        )
        met = meets(score, self.options.budget)
        check = self.confirm.score(session) if met and self.confirm is not None else None
        if check is not None:  # as given: the margin was for the scored samples' chance, not these
            met = meets(check, replace(self.options.budget, margin=0.0))
        trial = Trial(
            step=len(self.trials) + 1,
            stage=stage,
            action=action,
            candidate=cand,
            accuracy=score.accuracy,
            accuracy_drop=score.accuracy_drop,
            sqnr_db=score.sqnr_db,
            speedup_b1=lat.speedup,
            meets_budget=met,
            kinds=score.kinds,
            confirmation=check,
            sqnr_error_db=score.sqnr_error_db,
            accuracy_error=score.accuracy_error,
        )
        self.trials.append(trial)
        # only a model that may be chosen stays in memory (a large model's copies add up over ~50 trials)
        self.cache[cand] = (trial, model if trial.meets_budget else None, plan, bc_report)
        self.log(_describe(trial))
        return trial

    def model(self, cand: Candidate) -> onnx.ModelProto:
        """The quantized model of a candidate tried (rebuilt when it was dropped: ``_build`` is deterministic)."""
        trial, model, plan, bc_report = self.cache[cand]
        if model is None:
            model = _build(self.bases[cand.base], self.ranges[cand.base], cand)[0]
            if trial.kept:  # the search goes on from it: its per-layer errors and probes need it again
                self.cache[cand] = (trial, model, plan, bc_report)
        return model

    def keep(self, trial: Trial) -> Trial:
        """Mark ``trial``'s change as kept."""
        kept = replace(trial, kept=True)
        self.trials[trial.step - 1] = kept
        self.cache[trial.candidate] = (kept, *self.cache[trial.candidate][1:])
        return kept

    def key(self, t: Trial) -> tuple[float, float]:
        """Larger is better (``_key``)."""
        return key(t.score(), self.options.budget)

    def layer_errors(self, cand: Candidate) -> list[LayerError]:
        """Per-layer error of a built candidate on a few samples (once per candidate), at the batch the
        memory budget allows (``quantcli.search.memory``); the errors in isolation, which order the tensors
        and nodes tried, on the first 32 samples streamed at that batch, so the order does not depend on it."""
        if cand not in self.sensitivity:
            probe = self.dataset.subset(min(self.dataset.num_samples, 64))
            base = self.bases[cand.base].prepared
            batches = self.ev.batches
            self.sensitivity[cand] = per_layer_errors(
                base,
                self.model(cand),
                probe,
                batch_size=batches.sensitivity,
                max_memory=batches.sensitivity_memory,
                local_samples=SEARCH_BATCH,  # as the first batch of 32 did, at any batch
            )
        return self.sensitivity[cand]

    def result(self, best: Trial) -> SearchResult:
        """The search's result with ``best`` chosen."""
        _, _, plan, bc_report = self.cache[best.candidate]
        model = self.model(best.candidate)
        ev = self.ev
        return SearchResult(
            trials=tuple(self.trials),
            chosen=best,
            fp32_accuracy=ev.fp32_accuracy,
            budget=self.options.budget,
            model=model,
            plan=plan,
            num_samples=ev.num_samples,
            base=self.bases[best.candidate.base],
            bias_correction=bc_report,
            metric=ev.metric.name if ev.metric is not None else "top1" if ev.labels is not None else "top1 agreement",
        )


def _stage_methods(search: _Search) -> Trial:
    """1. The method for the whole model, on each base; the best is kept."""
    cands = [Candidate(m, base=name) for name, r in search.ranges.items() for m in r.available(search.options.methods)]
    search.prefetch(cands)
    firsts = [search.run("method", f"all tensors: {c.method}", c) for c in cands]
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
    search.prefetch([replace(best.candidate, float_nodes=(name,)) for name in nodes[: search.options.probe]])
    for name in nodes[: search.options.probe]:
        alone = search.run("probe", f"float: {name}", replace(best.candidate, float_nodes=(name,)))
        gains[name] = search.key(alone)
        if alone.meets_budget:
            break
    return sorted(gains, key=lambda n: (tuple(-x for x in gains[n]), order[n])) + [n for n in nodes if n not in gains]


def _one_notch(search: _Search, best: Trial, name: str, floats: list[str], dynamic: list[str]) -> Trial:
    """Move ``name`` one notch towards float: run-time quantized first when it can be, float when that
    does not meet the budget (the better of the two stays when neither does)."""
    cand = best.candidate
    dyn: Trial | None = None
    if name in search.dynamic_ok:
        moved = replace(cand, float_nodes=tuple(sorted(floats)), dynamic_nodes=tuple(sorted([*dynamic, name])))
        dyn = search.run("fallback", f"+ dynamic: {name}", moved)
        if dyn.meets_budget:
            dynamic.append(name)
            return dyn
    moved = replace(cand, float_nodes=tuple(sorted([*floats, name])), dynamic_nodes=tuple(sorted(dynamic)))
    flo = search.run("fallback", f"+ float: {name}", moved)
    if dyn is not None and not flo.meets_budget and search.key(dyn) >= search.key(flo):
        dynamic.append(name)
        return dyn
    floats.append(name)
    return flo


def _stage_fallback(search: _Search, best: Trial) -> Trial:
    """3. Move nodes to run-time quantization or float until the budget holds; 4. undo the moves it does not need.

    The moves come most harmful first, so each gains less than the one before. After ``STALL_AFTER`` moves,
    when even their average gain, kept up for every move left, would not reach the budget, the rest are
    not tried: the error is spread, and the regions of stage 3b are where it is repaired.
    """
    floats: list[str] = []
    dynamic: list[str] = []
    moved: list[str] = []
    order = _fallback_order(search, best)[: search.options.max_fallback]
    start, target = search.key(best)[0], primary_target(search.options.budget)
    reached = start
    for name in order:
        moved.append(name)
        trial = _one_notch(search, best, name, floats, dynamic)
        if trial.meets_budget:
            best = search.keep(trial)
            break
        reached = max(reached, search.key(trial)[0])
        left = len(order) - len(moved)
        if len(moved) >= STALL_AFTER and left and _stalled(start, reached, target, len(moved), left):
            search.log(
                f"fallback stopped after {len(moved)} moves: they gained {reached - start:.3g} towards a gap of "
                f"{target - start:.3g}; at that rate the other {left} would not close it"
            )
            break
    if best.meets_budget:
        best = _prune(search, best, moved)
    return best


def _stalled(start: float, reached: float, target: float, done: int, left: int) -> bool:
    """Would ``left`` more moves at the average gain of the ``done`` so far still fall short of ``target``?"""
    if not all(math.isfinite(v) for v in (start, reached, target)):
        return False
    return reached + (reached - start) / done * left < target


def _stage_regions(search: _Search, best: Trial) -> Trial:
    """3b. When moving single nodes does not reach the budget: a float region at one end of the network.

    Error that accumulates through many layers (a re-parameterized backbone whose 8-bit activation noise
    grows block by block) is not fixed by any few nodes, but by keeping the first (or last) ``p`` compute
    nodes float. From each end where all but one compute node in float meets the budget, ``p`` is found by
    bisection (the budget is taken as monotone in ``p``), the cheaper answer is kept, and its ``probe``
    nodes with the most MACs are tried quantized again, or at run time for a MatMul/Gemm (4). Measured:
    PP-OCRv4 det's first 32 of 64 compute nodes float keep text-mask IoU 0.98 at 1.5x FP32, where its
    default is IoU 0.53 and no single node moves it.

    When neither end meets it, both ends may be sensitive: the first ``p`` and the last compute node
    float (the convention of keeping a network's first and last layers in higher precision). PP-OCRv4's
    recognizer reads 0.869 of its lines with all but its 6625-class head float, and 0.571 with all but
    its stem; its head float with the backbone's MatMuls at run time reads 0.988.
    """
    start = best.candidate
    plan = search.cache[start][2]
    compute = _region_nodes(search.bases[start.base].prepared, plan)
    if not compute:
        return best
    static_rest_ok = search.dynamic_ok - set(plan.dynamic_nodes)  # what the rest could newly run at run time

    def region(nodes: Sequence[str], action: str, rest_dynamic: bool) -> Trial:
        floats = set(nodes)
        dynamic = sorted(n for n in search.dynamic_ok if n not in floats) if rest_dynamic else []
        if dynamic:
            action = f"{action}, the other MatMul/Gemm at run time"
        moved = replace(start, float_nodes=tuple(sorted(floats)), dynamic_nodes=tuple(dynamic))
        return search.run("region", action, moved)

    found: list[tuple[Trial, str, int]] = []  # the trial that met the budget, its end and p
    for end in ("first", "last"):
        found.extend(_bisect_region(compute, end, region, static_rest_ok))
    if not found and len(compute) > 2:
        # both ends are sensitive (a stem and a classifier head): the first p and the last node float
        found.extend(_bisect_region(compute, BOTH_ENDS, region, static_rest_ok))
    if not found:
        return _runtime_matmuls(search, best, compute)
    met, end, count = min(found, key=lambda f: (model_cost(f[0].candidate, search.costs), f[0].step))
    best = search.keep(met)
    nodes = _end(compute, end, count)
    # the boundary node is needed (one node less missed the budget): last, so pruning only tries it at run time
    boundary = nodes[0] if end == "last" else nodes[count - 1]
    largest = sorted((n for n in nodes if n != boundary), key=lambda n: (-(search.macs.get(n) or 0), n))
    return _prune(search, best, [*largest[: search.options.probe], boundary])


def _runtime_matmuls(search: _Search, best: Trial, compute: Sequence[str]) -> Trial:
    """3c. No region met the budget: every MatMul/Gemm that can at run time, every other compute node
    float, then the last compute node float too (its run-time rounding flips near-tied classes). Integer
    MACs where they cost least fidelity; the ``probe`` float nodes with the most MACs are then tried
    quantized again (4). PP-OCRv4's recognizer: 0.988 of its calibration lines and every held-out line
    read like FP32 this way, at 1.07x FP32, where no region reached 0.95 faster than FP32.
    """
    runtime = [n for n in compute if n in search.dynamic_ok]
    if not runtime:
        return best
    rest = [n for n in compute if n not in search.dynamic_ok]
    start = best.candidate
    tries = [(rest, runtime, "")]
    if runtime[-1] == compute[-1] and len(runtime) > 1:  # the last compute node float as well
        tries.append(([*rest, compute[-1]], runtime[:-1], ", the last float"))
    for floats, dynamic, also in tries:
        moved = replace(start, float_nodes=tuple(sorted(floats)), dynamic_nodes=tuple(sorted(dynamic)))
        trial = search.run("region", f"run time: {len(dynamic)} MatMul/Gemm, {len(floats)} other float{also}", moved)
        if trial.meets_budget:
            best = search.keep(trial)
            if not floats:
                return best
            largest = sorted(rest, key=lambda n: (-(search.macs.get(n) or 0), n))[: search.options.probe]
            return _prune(search, best, [*(n for n in largest if n != floats[-1]), floats[-1]])
    return best


def _region_nodes(model: onnx.ModelProto, plan: QuantPlan) -> list[str]:
    """The compute nodes a region may keep float, in graph order: the statically quantized Conv/MatMul/Gemm
    and the MatMul/Gemm the plan runs with run-time activation quantization (a rule's choice, e.g. a
    recognizer's 6625-class head, whose run-time rounding flips near-tied characters)."""
    chosen = [name for name, op in plan.quantized_nodes if op in REGION_OPS] + list(plan.dynamic_nodes)
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    # nodes of If/Loop/Scan bodies are not in the main graph: after it, in the plan's order
    return sorted(dict.fromkeys(chosen), key=lambda name: order.get(name, len(order)))


#: the region end that keeps the first ``p`` compute nodes and the last one float
BOTH_ENDS = "first and the last"


def _bisect_region(
    compute: Sequence[str],
    end: str,
    region: Callable[[Sequence[str], str, bool], Trial],
    dynamic_ok: frozenset[str],
) -> list[tuple[Trial, str, int]]:
    """The smallest ``p`` whose region at ``end`` meets the budget, by bisection (``[]`` when the largest
    region that leaves one compute node quantized misses it).

    The nodes left quantized are as the plan has them; when the largest region misses that way and some
    of them are static MatMul/Gemm that can run at run time (``dynamic_ok``), it is tried once more with
    those at run time (activations quantized per call, near float fidelity), and the bisection keeps that
    choice.
    """
    # at most all but one: a model with every compute node float is no quantized model
    lo, hi = 0, len(compute) - (2 if end == BOTH_ENDS else 1)  # p = lo misses (the best so far); p = hi must meet
    if hi <= 0:
        return []

    def describe(count: int) -> str:
        if end == BOTH_ENDS:
            return f"float: the first {count} and the last of {len(compute)} compute nodes"
        return f"float: the {end} {count} of {len(compute)} compute nodes"

    largest = _end(compute, end, hi)
    met = region(largest, describe(hi), False)
    rest_dynamic = False
    if not met.meets_budget and any(n in dynamic_ok for n in compute if n not in largest):
        met, rest_dynamic = region(largest, describe(hi), True), True
    if not met.meets_budget:
        return []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        trial = region(_end(compute, end, mid), describe(mid), rest_dynamic)
        lo, hi, met = (lo, mid, trial) if trial.meets_budget else (mid, hi, met)
    return [(met, end, hi)]


def _end(nodes: Sequence[str], end: str, count: int) -> list[str]:
    """The ``first`` or ``last`` ``count`` of ``nodes``, or (``BOTH_ENDS``) the first ``count`` and the last."""
    if end == BOTH_ENDS:
        return [*nodes[:count], nodes[-1]]
    return list(nodes[:count]) if end == "first" else list(nodes[len(nodes) - count :])


def _prune(search: _Search, best: Trial, moved: list[str]) -> Trial:
    """Quantize statically again what the budget does not need, most MACs first (then latest); a float
    MatMul/Gemm that must stay tries run-time quantization. The last move is needed: it only tries the latter."""
    latest = {n: i for i, n in enumerate(moved)}
    for name in sorted(moved, key=lambda n: (-(search.macs.get(n) or 0), -latest[n])):
        c = best.candidate
        rest_f = tuple(n for n in c.float_nodes if n != name)
        rest_d = tuple(n for n in c.dynamic_nodes if n != name)
        tries: list[tuple[str, Candidate]] = []
        if name != moved[-1]:
            tries.append((f"- {'float' if name in c.float_nodes else 'dynamic'}: {name} (quantized again)",
                          replace(c, float_nodes=rest_f, dynamic_nodes=rest_d)))  # fmt: skip
        if name in c.float_nodes and name in search.dynamic_ok:
            to_dynamic = replace(c, float_nodes=rest_f, dynamic_nodes=tuple(sorted([*rest_d, name])))
            tries.append((f"float -> dynamic: {name}", to_dynamic))
        for action, cand in tries:
            trial = search.run("prune", action, cand)
            if trial.meets_budget:
                best = search.keep(trial)
                break
    return best


def _settle(search: _Search, best: Trial) -> Trial:
    """The cheapest trial that met the budget, confirmed by timing the cheapest few (``confirm.fastest``),
    or an error naming the closest one."""
    met = ranked(search.trials, search.costs, search.key)
    if met:
        chosen = _timed_choice(search, met)
        if chosen.step != best.step or not best.meets_budget:
            cost = model_cost(chosen.candidate, search.costs)
            search.log(f"cheapest in the budget: step {chosen.step} (cost {cost:,.0f})")
        return search.keep(chosen)
    closest = max(search.trials, key=search.key)
    raise BudgetNotMetError(
        f"no quantization met the budget ({search.options.budget.describe()}) after {len(search.trials)} trials; "
        f"best: {_describe(closest)}; loosen the budget or raise --search-max-fallback"
    )


def _timed_choice(search: _Search, met: list[Trial]) -> Trial:
    """The fastest at batch 1 of the ``options.confirm`` cheapest trials (the cheapest when not timed)."""
    top = met[: max(1, search.options.confirm)]
    timer = search.options.timer
    if timer is None or len(top) < 2 or search.reference is None:
        return top[0]
    models = [search.model(t.candidate) for t in top]
    index, timed = fastest(models, search.reference, search.ev.latency_feed, timer)
    times = ", ".join(f"step {top[t.rank].step} {t.speedup:.2f}x" for t in timed)
    search.log(
        f"timed the {len(top)} cheapest in the budget against FP32 at batch 1: {times} "
        f"(within {TIMING_NOISE:.0%} of the fastest, the cheaper wins)"
    )
    return top[index]


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
    return max(kept, key=lambda t: (key(t.score(), result.budget), -t.step))


def describe_trial(t: Trial) -> str:
    """One line: the trial's step, action, fidelity, speed and number of float nodes."""
    return _describe(t)


def _describe(t: Trial) -> str:
    parts = [f"step {t.step} {t.stage}: {t.action}"]
    if t.accuracy is not None:
        parts.append(f"top-1 {t.accuracy:.2f}%")
    if t.accuracy_drop is not None:
        error = f" (standard error {t.accuracy_error:.2f})" if t.accuracy_error else ""
        parts.append(f"drop {t.accuracy_drop:.2f}{error}")
    parts.append(f"SQNR {t.sqnr_db:.1f} dB")
    parts.extend(_kind_value(k) for k in _kind_values(t.kinds))
    parts.append(f"{t.speedup_b1:.2f}x FP32 at b1")
    parts.append(f"{len(t.candidate.float_nodes)} float")
    if t.candidate.dynamic_nodes:
        parts.append(f"{len(t.candidate.dynamic_nodes)} dynamic")
    if t.confirmation is not None:
        values = [_kind_value(k) for k in _kind_values(t.confirmation.kinds)] or [
            f"SQNR {t.confirmation.sqnr_db:.1f} dB"
        ]
        said = "confirmed" if t.meets_budget else "not confirmed"
        parts.append(f"{said} on the samples the search does not choose on ({', '.join(values)})")
    parts.append("meets budget" if t.meets_budget else "misses budget")
    return ", ".join(parts)


def _kind_values(kinds: Sequence[KindMetrics]) -> list[KindMetrics]:
    """The kinds with a task-level value (agreement, cosine or IoU)."""
    return [k for k in kinds if k.agreement is not None or k.cosine is not None or k.iou is not None]


def _kind_value(k: KindMetrics) -> str:
    """E.g. ``y agreement 0.969``."""
    label, value = next(
        (lbl, v) for lbl, v in (("agreement", k.agreement), ("cosine", k.cosine), ("IoU", k.iou)) if v is not None
    )
    return f"{k.name} {label} {value:.3f}"
