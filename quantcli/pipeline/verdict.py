"""Every ``convert`` ends with a verdict: fidelity on samples it did not calibrate on, and speed.

Where the samples come from:

* ``eval_data`` given: at most ``EVAL_MAX_SAMPLES`` of them (with a search, the search chose on them,
  and the verdict says so);
* a search whose ``eval_data`` is the same data as ``data_path`` (or its recipe replayed on that data):
  the share of it calibration did not read, which the search scored on (``quantcli.pipeline.holdout``),
  and the verdict says the search chose on them; with too few samples to hold back, all of it, and the
  verdict says calibration read them; with samples neither of the search's shares scores (its
  confirmation's), the verdict checks those too (at most ``EVAL_MAX_SAMPLES``, spread): the search never
  chose on them, so they show a figure the choice did not flatter, and a warning below a threshold there
  says so;
* otherwise, static mode with ``data_path``: ``hold_back`` keeps the last ``verdict_share`` of the data
  (at most ``VERDICT_MAX_SAMPLES``, at least ``MIN_HELD_OUT``) out of calibration;
* a calibration file, the data-driven algorithms (they calibrate on all of ``data_path``), a recipe or
  a mode without calibration, and no ``eval_data``: fidelity is not checked, and the verdict says what
  to give.

Each output's kind and task metric (``quantcli.compare.output_kinds``) is compared with the
documented thresholds ``THRESHOLDS`` (agreement 0.98, cosine 0.99, IoU 0.9). A search's own Python metric
(``--search-metric``) is measured too, FP32 and converted, and judged by its ``max_accuracy_drop``; it
stands for the raw outputs it reads (no SQNR warning for them). An output below its bound, or
a model not faster than FP32 at batch 1, gives a warning that names the option that would repair it
(as ``$field`` templates: the CLI writes them as flags). Speed is a quick batch-1 timing
(``verify.speedcheck.check_speedup``, one round), or the speed check already made for
``require_speedup`` or a budget.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from quantcli.compare.evaluate import wilson_interval
from quantcli.compare.map_thresholds import MapThreshold
from quantcli.compare.metrics import MetricSpec, TaskMetric, evaluate_custom
from quantcli.compare.output_kinds import AGREEMENT_KINDS, KindMetrics, OutputKind, OutputKindObserver, reads_like_ctc
from quantcli.core.errors import QuantCliError
from quantcli.data.datasets import Dataset, model_input_specs, random_dataset, spread
from quantcli.modes.common import ConvertMode
from quantcli.pipeline.context import ConvertContext, need

if TYPE_CHECKING:
    import onnx

    from quantcli.verify.speedcheck import SpeedCheck

__all__ = [
    "EVAL_MAX_SAMPLES",
    "MIN_HELD_OUT",
    "THRESHOLDS",
    "VERDICT_MAX_SAMPLES",
    "Verdict",
    "VerdictCheck",
    "hold_back",
    "timed_speed",
    "verdict",
]

#: at most this many calibration samples are held back for the verdict
VERDICT_MAX_SAMPLES = 64
#: fewer held-back samples than this say too little: calibrate on everything instead
MIN_HELD_OUT = 4
#: at most this many ``eval_data`` samples are checked
EVAL_MAX_SAMPLES = 256
#: the bounds below which the verdict warns (agreement: classifier, sequence, ctc and binary outputs;
#: sqnr: in dB, raw outputs of a model none of whose outputs has a task metric, e.g. detector heads)
THRESHOLDS: dict[str, float] = {"agreement": 0.98, "cosine": 0.99, "iou": 0.9, "sqnr": 20.0}


@dataclass(frozen=True, slots=True)
class VerdictCheck:
    """A second set of samples the verdict checked: after a search on its own data, those it confirmed on."""

    #: where they came from (a template naming options as ``$field``)
    source: str
    num_samples: int
    kinds: tuple[KindMetrics, ...]
    #: the search's Python metric on them (None: none given)
    metric: TaskMetric | None = None

    def line(self) -> str:
        """``verdict: also on 24 --data samples the search did not choose on ...: logits classifier ...``."""
        judged = [k for k in self.kinds if k.kind != OutputKind.RAW] or list(self.kinds[:3])
        parts = [_kind_text(k) for k in judged] + ([_metric_text(self.metric)] if self.metric else [])
        return f"verdict: also on {self.source}: {'; '.join(parts)}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """How close the converted model stays to FP32 on samples it did not calibrate on, and how fast it is.

    Text fields are templates naming options as ``$field`` (``render`` writes them).
    """

    #: where the samples came from ("" when fidelity was not checked)
    source: str
    num_samples: int
    kinds: tuple[KindMetrics, ...]
    speed: SpeedCheck | None
    #: one line per output below its threshold, or a model not faster than FP32, each naming a repair
    warnings: tuple[str, ...] = ()
    #: what could not be checked, and what to give to check it
    unchecked: tuple[str, ...] = ()
    #: the option fields the templates name
    options: tuple[str, ...] = ()
    #: the samples a search on its own data confirmed on (never chosen on), checked as well
    confirmation: VerdictCheck | None = None
    #: the search's Python metric (``--search-metric``), FP32 and converted (None: none given)
    metric: TaskMetric | None = None

    @property
    def passed(self) -> bool:
        """No warning (what was not checked does not count as passed or failed)."""
        return not self.warnings

    def render(self, name: Callable[[str], str] = str) -> list[str]:
        """The summary line, the confirmation's line (when checked), then each warning and each unchecked
        item, options written by ``name``."""
        also = () if self.confirmation is None else (self.confirmation.line(),)
        return [self.substitute(text, name) for text in (self.line(), *also, *self.warnings, *self.unchecked)]

    def substitute(self, text: str, name: Callable[[str], str] = str) -> str:
        """``text`` (one of this verdict's templates) with each option it names written as ``name(field)``."""
        return string.Template(text).safe_substitute({o: name(o) for o in self.options})

    @property
    def judged(self) -> bool:
        """A task metric judged the model: an output of a kind other than raw, or the search's metric (else
        its line says ``no task metric``, or ``fidelity not checked``)."""
        return self.metric is not None or any(k.kind != OutputKind.RAW for k in self.kinds)

    def line(self) -> str:
        """``verdict: ok on 19 held-back samples: logits classifier agreement 1.000 (SQNR 31.2 dB); 1.52x FP32 ...``."""
        judged = [k for k in self.kinds if k.kind != OutputKind.RAW]
        parts = [_kind_text(k) for k in judged or self.kinds[:3]]
        more = f"; {len(self.kinds) - 3} more raw outputs" if not judged and len(self.kinds) > 3 else ""
        if self.metric is not None:
            more += f"; {_metric_text(self.metric)}"
        speed = f"{self.speed.speedup:.2f}x FP32 at batch 1" if self.speed is not None else "speed not checked"
        if not self.kinds:
            return f"verdict: {'' if self.passed else 'WARNING: '}fidelity not checked; {speed}"
        status = ("ok" if self.judged else "no task metric") if self.passed else "WARNING"
        return f"verdict: {status} on {self.source}: {'; '.join(parts)}{more}; {speed}"


def _kind_text(k: KindMetrics) -> str:
    value = next(
        (
            f"{label} {v:.3f}"
            for label, v in (("agreement", k.agreement), ("cosine", k.cosine), ("IoU", k.iou))
            if v is not None
        ),
        "",
    )
    sqnr = "inf" if math.isinf(k.sqnr_db) else f"{k.sqnr_db:.1f}"
    return f"{k.name} {k.kind} {value} (SQNR {sqnr} dB)".replace("  ", " ")


def _metric_text(m: TaskMetric) -> str:
    return f"{m.name} {m.candidate:.3f} (FP32 {m.reference:.3f})"


def hold_back(ctx: ConvertContext) -> None:
    """Static mode with ``data_path`` and no ``eval_data``: keep the last ``verdict_share`` of the data
    out of calibration, for the verdict."""
    r = ctx.request
    if not r.verdict or r.data_path is None or r.eval_data is not None or r.verdict_share <= 0:
        return
    dataset = ctx.fmt.open(r.data_path, model_input_specs(need(ctx.model, "the model")))
    n, batch = dataset.num_samples, dataset.effective_batch_size(1)
    held = min(VERDICT_MAX_SAMPLES, int(n * r.verdict_share))
    held -= held % batch
    if held < MIN_HELD_OUT or held >= n:
        ctx.verdict_unchecked = (
            f"fidelity not checked: {n} samples of $data_path are too few to hold {MIN_HELD_OUT} back from "
            "calibration; give $eval_data to check",
        )
        return
    ctx.calibration_data = dataset.subset(n - held)
    ctx.held_out = (dataset, n - held)


def timed_speed(model: onnx.ModelProto, quantized: onnx.ModelProto, feed: dict[str, np.ndarray]) -> SpeedCheck:
    """A quick batch-1 timing (one round of 10 paired runs); tests replace it (``fixed_speedup``)."""
    from quantcli.verify import speedcheck

    return speedcheck.check_speedup(model, quantized, feed, rounds=1, runs=10, warmup=2)


def verdict(ctx: ConvertContext) -> None:
    """Measure the converted model against FP32 on samples it did not calibrate on, and its speed."""
    r = ctx.request
    if not r.verdict:
        return
    model, quantized = need(ctx.model, "the model"), need(ctx.quantized, "the converted model")
    source, feeds, labels, unchecked = _verdict_samples(ctx)
    kinds: list[KindMetrics] = []
    count, task = 0, None
    metric = _search_metric(ctx)
    if feeds is not None:
        kinds, count, task = _fidelity(model, quantized, feeds, (r.output_kinds, r.map_thresholds()), labels, metric)
        unchecked = (*unchecked, *(() if task else _raw_note(kinds)), *_few_samples(kinds))
    confirmation = _confirmation(ctx, model, quantized, metric)
    speed, speed_note = _speed(ctx, model, quantized)
    unchecked = (*unchecked, *((speed_note,) if speed_note else ()))
    warnings = tuple(_warnings(kinds, speed, ctx, task))
    if confirmation is not None:
        where = f" on the {confirmation.num_samples} samples the search did not choose on"
        warnings += tuple(_kind_warnings(list(confirmation.kinds), ctx, where, confirmation.metric))
    ctx.verdict = Verdict(source, count, tuple(kinds), speed, warnings, unchecked, _OPTIONS, confirmation, task)


def _search_metric(ctx: ConvertContext) -> MetricSpec | None:
    """The search's Python metric (``--search-metric module:function``), None without one."""
    search = ctx.request.search
    return search.metric if search is not None and search.metric and search.metric.function else None


def _confirmation(
    ctx: ConvertContext, model: onnx.ModelProto, quantized: onnx.ModelProto, metric: MetricSpec | None
) -> VerdictCheck | None:
    """After a search on its own data, the samples neither of its shares scored (its confirmation's): read by
    calibration, never chosen on. At most ``EVAL_MAX_SAMPLES`` of them, spread (data may be sorted by class)."""
    if ctx.search_data is None or ctx.fold_data is None or ctx.fold_data[2] is None:
        return None
    dataset = ctx.fold_data[2]
    if dataset.num_samples > EVAL_MAX_SAMPLES:
        dataset = dataset.select(spread(dataset.num_samples, EVAL_MAX_SAMPLES))
    thresholds = (ctx.request.output_kinds, ctx.request.map_thresholds())
    feeds = _feeds(dataset, 0)
    kinds, count, task = _fidelity(model, quantized, feeds, thresholds, dataset.yielded_labels(), metric)
    source = f"{count} $data_path samples the search did not choose on (calibration read them)"
    return VerdictCheck(source, count, tuple(kinds), task)


#: the option fields verdict texts may name
_OPTIONS = (
    "data_path",
    "eval_data",
    "output_kinds",
    "mode",
    "min_agreement",
    "min_cosine",
    "min_iou",
    "min_sqnr",
    "max_accuracy_drop",
    "search_metric",
    "verdict_share",
)


def _verdict_samples(
    ctx: ConvertContext,
) -> tuple[str, Iterator[tuple[dict[str, np.ndarray], int]] | None, np.ndarray | None, tuple[str, ...]]:
    """Where the verdict's samples come from: a description, the feeds with their counts, their labels
    (None without), what was not checked."""
    r = ctx.request
    specs = model_input_specs(need(ctx.model, "the model"))
    if ctx.search_data is not None:
        scored = ctx.search_data
        source = f"{scored.num_samples} $data_path samples calibration did not read (the search chose on them)"
        return source, _feeds(scored, 0), scored.yielded_labels(), ()
    if r.eval_data is not None:
        dataset = ctx.fmt.open(r.eval_data, specs, max_samples=EVAL_MAX_SAMPLES)
        chose = " (the search chose on them)" if r.search is not None else ""
        unchecked: tuple[str, ...] = ()
        if ctx.search_on_calibration:
            chose = " (calibration read them and the search chose on them)"
            unchecked = ("fidelity not checked on samples calibration did not read: give separate $eval_data",)
        labels = dataset.yielded_labels()
        return f"{dataset.num_samples} $eval_data samples{chose}", _feeds(dataset, 0), labels, unchecked
    if ctx.held_out is not None:
        dataset, start = ctx.held_out
        labels = dataset.yielded_labels()
        held = None if labels is None else labels[start:]
        return f"{dataset.num_samples - start} held-back $data_path samples", _feeds(dataset, start), held, ()
    if ctx.verdict_unchecked:
        return "", None, None, ctx.verdict_unchecked
    why = {
        True: "convert from a calibration file has no samples it did not calibrate on",
        False: "no data it did not calibrate on",
    }[r.calibration is not None]
    if r.data_path is not None and ctx.algorithms.needs_data:
        why = "the algorithms calibrate on all of $data_path"
    return "", None, None, (f"fidelity not checked: {why}; give $eval_data to check",)


def _feeds(dataset: Dataset, start: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """The feeds of ``dataset`` from sample ``start`` on, with their sample counts."""
    size = dataset.effective_batch_size(1 if start else 16)
    seen = 0
    for feed in dataset.batches(size):
        n = dataset.batch_length(feed)
        if seen >= start:
            yield feed, n
        seen += n


#: one-sided normal quantile of the confidence the verdict states an agreement at (95%)
CONFIDENCE_Z = 1.645


def agreement_lower_bound(agreeing: float, samples: int, z: float = CONFIDENCE_Z) -> float:
    """Wilson's lower confidence bound of a share from ``agreeing`` of ``samples`` (0 without samples)."""
    return wilson_interval(agreeing, samples, z).low if samples > 0 else 0.0


def samples_to_show(bound: float, z: float = CONFIDENCE_Z) -> int:
    """The fewest samples, all agreeing, whose Wilson lower bound reaches ``bound`` (``n / (n + z²)``)."""
    return math.ceil(z * z * bound / (1 - bound))


def _few_samples(kinds: list[KindMetrics]) -> tuple[str, ...]:
    """An agreement at or above its threshold that its samples are too few to show at 95% confidence.

    One sample in 40 that flipped is 0.975, below 0.98; 40 that all agree show only 0.937 (Wilson's
    lower bound), and it takes 133 to show 0.98: a small check says less than its figure.
    """
    bound = THRESHOLDS["agreement"]
    notes = []
    for k in kinds:
        if k.kind not in AGREEMENT_KINDS or k.agreement is None or k.agreement < bound:
            continue
        lower = agreement_lower_bound(k.agreement * k.num_samples, k.num_samples)
        if lower < bound:
            notes.append(
                f"few samples: {k.name} agreement {k.agreement:.3f} on {k.num_samples} samples shows at least "
                f"{lower:.3f} at 95% confidence, below {bound:g}; {samples_to_show(bound)} or more samples "
                "($eval_data) can show it"
            )
    return tuple(notes)


def _raw_note(kinds: list[KindMetrics]) -> tuple[str, ...]:
    """Outputs with no task metric, when no output has one: say how to name their kind."""
    if not kinds or any(k.kind != OutputKind.RAW for k in kinds):
        return ()
    names = ", ".join(k.name for k in kinds[:4]) + (" ..." if len(kinds) > 4 else "")
    return (
        f"not judged: {names} look like no classifier, sequence, binary, embedding or map output (SQNR only); "
        "$output_kinds NAME=KIND names their kind, or $search_metric FILE.py:FUNCTION with a 'reference' "
        "parameter scores them against FP32 (a detector: F1 of its boxes)",
    )


def _fidelity(
    model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    feeds: Iterator[tuple[dict[str, np.ndarray], int]],
    kinds: tuple[Mapping[str, OutputKind] | None, MapThreshold],
    labels: np.ndarray | None = None,
    metric: MetricSpec | None = None,
) -> tuple[list[KindMetrics], int, TaskMetric | None]:
    """Each output's kind metrics on ``feeds`` (``kinds``: the kinds given, the map thresholds), the
    sample count, and ``metric`` (a Python one) of both models (None without)."""
    from quantcli.graph.session import make_session

    ref, cand = make_session(model, source="FP32 model"), make_session(quantized, source="converted model")
    names = [o.name for o in ref.get_outputs()]
    observer = OutputKindObserver(kinds[0], map_threshold=kinds[1], labels=labels)
    count = 0
    kept: tuple[list[list[np.ndarray]], list[list[np.ndarray]]] = ([], [])
    for feed, n in feeds:
        outs = ref.run(names, feed), cand.run(names, feed)
        observer(names, *outs, n)
        count += n
        if metric is not None:
            kept[0].append(outs[0])
            kept[1].append(outs[1])
    task = None
    if metric is not None and count:
        fp32 = evaluate_custom(metric, kept[0], names, labels)
        task = TaskMetric(metric.name, fp32, evaluate_custom(metric, kept[1], names, labels, kept[0]))
    return observer.results(), count, task


def _speed(ctx: ConvertContext, model: onnx.ModelProto, quantized: onnx.ModelProto) -> tuple[SpeedCheck | None, str]:
    """The speed check made already, or a quick one on a sample (random when there is no data)."""
    if ctx.speed is not None:
        return ctx.speed, ""
    r = ctx.request
    specs = model_input_specs(model)
    path = r.eval_data if r.eval_data is not None else r.data_path
    try:
        dataset = ctx.fmt.open(path, specs, max_samples=1) if path is not None else random_dataset(specs, 1)
        feed = next(dataset.batches(1))
    except (QuantCliError, StopIteration) as exc:
        return None, f"speed not checked: no sample to time on ({exc}); give $eval_data"
    try:
        return timed_speed(model, quantized, feed), ""
    except Exception as exc:  # the verdict reports; it never fails a conversion that succeeded
        first = " ".join(str(exc).split())[:160]
        return (
            None,
            f"speed not checked: onnxruntime failed on {'random input' if path is None else 'a sample'}: {first}",
        )


def _warnings(
    kinds: list[KindMetrics], speed: SpeedCheck | None, ctx: ConvertContext, task: TaskMetric | None = None
) -> Iterator[str]:
    yield from _kind_warnings(kinds, ctx, "", task)
    if speed is not None and speed.speedup <= 1.0:
        yield (
            f"verdict: {speed.speedup:.2f}x FP32 at batch 1, not faster: keep the FP32 model, or see what stayed "
            "float ('quantcli inspect' on the output)"
        )


def _kind_warnings(
    kinds: list[KindMetrics], ctx: ConvertContext, where: str = "", task: TaskMetric | None = None
) -> Iterator[str]:
    """An output below its threshold, or the search's metric below its budget (``where``: on which
    samples, when not the verdict's main ones). The metric stands for the raw outputs' SQNR."""
    dynamic = ctx.request.mode == ConvertMode.DYNAMIC
    if task is None:
        yield from _raw_warnings(kinds, where)
    else:
        yield from _metric_warnings(task, ctx, where)
    for k in kinds:
        metric = "agreement" if k.kind in AGREEMENT_KINDS else "cosine" if k.kind == OutputKind.EMBEDDING else "iou"
        value = getattr(k, metric)
        if k.kind == OutputKind.RAW or value is None or value >= THRESHOLDS[metric]:
            continue
        repair = _repair(k.kind, dynamic)
        if reads_like_ctc(k):  # strict positions overstate a recognizer's loss: say how to judge its text
            repair = f"if it is a CTC recognizer, $output_kinds {k.name}=ctc judges its decoded strings; {repair}"
        yield f"verdict: {k.name} ({k.kind}) {metric} {value:.3f} < {THRESHOLDS[metric]:g}{where}: {repair}"


def _metric_warnings(task: TaskMetric, ctx: ConvertContext, where: str) -> Iterator[str]:
    """The search's metric dropped by more than its ``max_accuracy_drop`` (points of 100)."""
    search = ctx.request.search
    bound = search.budget.max_accuracy_drop if search is not None else None
    drop = 100.0 * (task.reference - task.candidate)
    if bound is not None and drop > bound + 1e-9:
        yield (
            f"verdict: {task.name} {task.candidate:.3f}, {drop:.2f} points below FP32's {task.reference:.3f}{where}, "
            f"more than $max_accuracy_drop {bound:g}: search on more $eval_data, or with a smaller $max_accuracy_drop"
        )


def _raw_warnings(kinds: list[KindMetrics], where: str = "") -> Iterator[str]:
    """A model whose outputs are all raw (detector heads, regressions) is judged by SQNR alone.

    Measured on three real detectors (``benchmarks/bench_table.py``): heads at 27 dB kept every
    detection, at 14.5 dB and 3.5 dB they lost 15% and 6% of them; below ``THRESHOLDS["sqnr"]`` the
    task metric may have moved. Above it, it may have too: NudeNet's heads read 29.0 dB on images of faces
    while the F1 of its boxes against FP32's read 0.817 (its detections sit near its 0.25 threshold). So
    such a verdict says "no task metric" and "not judged"; only the user's own metric can tell.
    """
    if any(k.kind != OutputKind.RAW for k in kinds):
        return
    bound = THRESHOLDS["sqnr"]
    for k in kinds:
        if k.sqnr_db < bound:
            yield (
                f"verdict: {k.name} (raw) SQNR {k.sqnr_db:.1f} dB < {bound:g} dB{where}: its task metric may "
                "have moved; measure it with 'quantcli compare' and your metric, or "
                f"$eval_data DATA $min_sqnr {bound:g} searches for the cheapest model that meets it"
            )


def _repair(kind: OutputKind, dynamic: bool) -> str:
    """The budgeted search (in the output's own terms) that would find the nodes to keep in float."""
    budget = {
        OutputKind.CLASSIFIER: "$min_agreement 0.98",
        OutputKind.SEQUENCE: "$min_agreement 0.95",
        OutputKind.CTC: "$min_agreement 0.95",
        OutputKind.BINARY: "$min_agreement 0.98",
        OutputKind.EMBEDDING: "$min_cosine 0.99",
        OutputKind.MAP: "$min_iou 0.9",
    }.get(kind, "$min_sqnr 25")
    search = f"$eval_data DATA {budget} searches for the cheapest model that meets it"
    if kind == OutputKind.EMBEDDING and not dynamic:
        return f"try $mode dynamic (activations quantized at run time suit encoders), or {search}"
    return search
