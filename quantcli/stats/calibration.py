"""Run calibration data through onnxruntime and collect activation ranges, one batch at a time.

Every float activation is observed through the statistics collector (``quantcli.stats.collector``): the
model is copied with the activations exposed as outputs (the input model is not touched), each batch's
values go straight into small observers and are dropped, so memory holds one batch of activations, whatever
the number of samples. The memory budget is small (512 MiB unless told): the batch shrinks (down to one
sample) until one batch of every activation fits it, and to about 8 MB of activations, above which a larger
batch runs no faster on a CPU (``BATCH_TARGET``; min-max, whose observers cost little: 4 MB,
``MINMAX_BATCH_TARGET``, which also keeps onnxruntime's working set small); measuring the sizes holds one
sample of every activation anyway, so one sample is not split further. A run that moves little (Silero VAD:
one sample of 33 KB a run) gets one onnxruntime thread, and a model whose batch is fixed at 1 with small
weights gets its probe on one thread from the start (``collector.runs_look_tiny``). The observers do not
depend on the batching, so neither do the ranges (a zero bound is recorded as +0.0, whichever sign of zero
a batch's min returned). NaN values an activation takes are left out of its range and histogram one by one,
not with their batch, and counted: the result lists them (``CalibrationResult.nans``) and ``calibrate``
warns; an activation that took nothing but NaN is an error. Moving average depends on the batching (it
averages per-batch ranges): it keeps the batch asked for, its budget is a quarter of the memory available,
and the tensors are split into groups over several passes above it. Tensors inside Loop/Scan bodies are
reduced to a ``[min, max]`` pair per iteration inside the body (``quantcli.graph.subgraphs``), so a
501-step decoder costs 2 values a step, not its tensors x steps x batch; histogram methods give such
tensors their min-max range (no values, no histogram). Histogram methods use the same single pass: their
histograms grow by merging bins on a power-of-two grid (``observers.GrowingHistogram``), so the result does
not depend on the batch size and no raw data is kept. The histograms stay in the result, so ranges can be
re-chosen for another method (``rechoose``) or another activation type (``ranges_for_levels``) without the
data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

import numpy as np
import onnx

from quantcli.core.errors import ArtifactMismatchError, CalibrationDataError, UnsupportedModelError
from quantcli.core.options import DEFAULT_PERCENTILE, CalibrationMethod, QuantDType
from quantcli.core.progress import Progress, no_progress
from quantcli.core.qmath import dtype_bounds
from quantcli.data.datasets import Dataset, FeedList, sample_shapes
from quantcli.graph.model_io import infer_shapes
from quantcli.graph.reductions import summarize_min_max
from quantcli.graph.scopes import elem_types, has_subgraphs
from quantcli.graph.session import Session, make_session
from quantcli.graph.subgraphs import expose_subgraph_tensors
from quantcli.stats.collector import (
    CollectOptions,
    RangeRequest,
    RangeStats,
    collect,
    default_memory_budget,
    plan_groups,
    runs_look_tiny,
)
from quantcli.stats.observers import HISTOGRAM_METHODS, HistogramObserver, choose_range
from quantcli.stats.ranges import CalibrationResult, TensorRange

__all__ = [
    "PERMUTATION_OPS",
    "CalibrationOptions",
    "CalibrationResult",
    "ExposedNames",
    "Exposure",
    "TensorRange",
    "activation_levels",
    "calibrate",
    "calibration_memory_budget",
    "calibration_result",
    "default_memory_budget",
    "expose",
    "exposure_requests",
    "permutation_aliases",
    "plan_groups",
    "range_request",
    "ranges_for_levels",
    "rechoose",
]

log = logging.getLogger(__name__)


def candidate_tensors(model: onnx.ModelProto) -> list[str]:
    """Every tensor produced by a node or fed as a graph input, in graph order (no constants)."""
    inits = {t.name for t in model.graph.initializer}
    names: list[str] = [i.name for i in model.graph.input if i.name not in inits]
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        names.extend(o for o in node.output if o)
    seen: set[str] = set()
    return [n for n in names if not (n in seen or seen.add(n))]  # type: ignore[func-returns-value]


#: ops whose output holds exactly the input's values, rearranged (so the same min, max and histogram)
PERMUTATION_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def permutation_aliases(graph: onnx.GraphProto, tracked: set[str]) -> dict[str, str]:
    """Tracked outputs of value-preserving ops in ``graph``, each mapped to the tracked tensor it rearranges.

    Such a tensor's min, max and histogram equal its source's whatever the data, so calibration
    observes the source once and copies the result (a transformer's Q/K/V Reshape/Transpose pairs:
    about a fifth of its activations). Chains resolve to their first tracked source.
    """
    aliases: dict[str, str] = {}
    for node in graph.node:  # topological order: a chain's source is resolved before its users
        if node.op_type in PERMUTATION_OPS and node.domain in ("", "ai.onnx") and node.input and node.output:
            src, out = node.input[0], node.output[0]
            if out in tracked and src in tracked and out != src:
                aliases[out] = aliases.get(src, src)
    return aliases


#: bytes one batch of exposed activations may take by default
CALIBRATION_BUDGET = 512 << 20
#: min-max: bytes of activations a batch holds, above which a larger batch calibrates no faster (its
#: observers are two numpy passes; onnxruntime's working set grows with the batch). Calibrate, min-max,
#: 256 samples, 2 shared cores, CPU s and peak RSS above the imports: digits CNN (600 KB a sample)
#: batch 4 0.28 s +17 MB, 8 0.28-0.32 s +20 MB, 28 0.28-0.31 s +39 MB; g2p BERT (1.2 MB) batch 4
#: 0.48-0.50 s +31 MB, 15 0.45-0.62 s +59 MB (onnxruntime's quantizer, batch 1: +23 and +83 MB)
MINMAX_BATCH_TARGET = 4 << 20
#: exposed bytes above which a larger batch calibrates no faster on a CPU (calibrate, min-max, 256
#: samples, batch 1 vs 32 on a shared 2-core machine: magika at 22 MB a sample 5.0 vs 8.9 s, ppocrv4_rec
#: at 192 MB 32 vs 41 s). 8 MB, not 16: with histograms two batches are in flight (overlapped updates),
#: so the peak follows it; calibrate percentile, 256 samples, 2 shared AVX-512 cores (load 5), median of
#: 5 interleaved runs, CPU s and peak RSS, 16 vs 8 MB: digits CNN 0.31 s 142 MB vs 0.29 s 129 MB, g2p
#: BERT 0.74 s 174 MB vs 0.73 s 147 MB (4 MB: 117 and 132 MB, but g2p up to 0.94 s)
BATCH_TARGET = 8 << 20


def calibration_memory_budget(max_memory: int | None, method: CalibrationMethod) -> int:
    """``max_memory``, else 512 MiB (a quarter of the memory available if less; moving average: that quarter)."""
    if max_memory:
        return max_memory
    if method == CalibrationMethod.MOVING_AVERAGE:  # its batch is fixed: a small budget means many passes
        return default_memory_budget()
    return min(CALIBRATION_BUDGET, default_memory_budget())


@dataclass(frozen=True, slots=True)
class CalibrationOptions:
    """How calibration observes the data and chooses ranges (every field has the CLI's default).

    ``method``: how clip ranges are chosen; ``percentile``: for percentile, the upper percentile kept
    (the lower is 100 - p); ``bins``: histogram bins for percentile/entropy/mse; ``levels``: integer
    levels entropy/mse choose the recorded ranges for (``ranges_for_levels`` re-chooses them for another
    activation type); ``batch_size``: samples per onnxruntime run, at most (fewer when activations are
    large); ``threads``: onnxruntime intra-op threads (0: its default, or one when a run moves little,
    ``collector.ONE_THREAD_BYTES``); ``max_memory``: bytes one batch
    of exposed activations may take: the batch shrinks to fit it (moving average: the tensors are
    calibrated in groups over several passes instead) (None: 512 MiB; moving average: a quarter of
    available memory); ``shuffle``/``seed``: visit samples in a random order (only moving-average
    depends on order); ``timeout``: seconds after which calibration stops with an error (None: no
    limit); ``source``: how error messages name the model (its path); ``reduce_in_graph``: min-max
    activations reduced inside the graph (off: measured slower, see the field).
    """

    method: CalibrationMethod = CalibrationMethod.MINMAX
    percentile: float = DEFAULT_PERCENTILE
    bins: int = 4096
    levels: int = 256
    batch_size: int = 32
    threads: int = 0
    max_memory: int | None = None
    shuffle: bool = False
    seed: int = 0
    timeout: float | None = None
    source: str = "model"
    #: min-max: reduce each activation to its min, max, NaN count and size inside the graph
    #: (``quantcli.graph.reductions``) instead of returning the values; the same ranges, but slower
    #: and larger on the models measured (onnxruntime keeps the activations in its arena and runs
    #: 7-11 more nodes a tensor: calibrate min-max, 2 shared AVX2 cores, CPU s / peak RSS above the
    #: imports, values vs in graph: digits CNN batch 32 0.31 / +41 MB vs 0.32-0.34 / +44 MB; g2p BERT
    #: batch 32 (15 run) 0.46 / +59 vs 0.79 / +65; PP-OCRv4 rec 64 samples 6.4 / +283 vs 11.6 / +459)
    reduce_in_graph: bool = False

    def collect_options(self, deadline: float | None) -> CollectOptions:
        """The collector's options for these."""
        return CollectOptions(
            batch_size=self.batch_size,
            threads=self.threads,
            max_memory=calibration_memory_budget(self.max_memory, self.method),
            fit_batch=self.method != CalibrationMethod.MOVING_AVERAGE,
            batch_target=MINMAX_BATCH_TARGET if self.method == CalibrationMethod.MINMAX else BATCH_TARGET,
            shuffle=self.shuffle,
            seed=self.seed,
            deadline=deadline,
            source=self.source,
            desc="calibrating",
            overlap_updates=self.method in HISTOGRAM_METHODS,
        )

    @property
    def summarizes(self) -> bool:
        """Whether activations are reduced inside the graph (min-max with ``reduce_in_graph``)."""
        return self.reduce_in_graph and self.method == CalibrationMethod.MINMAX

    def deadline(self) -> float | None:
        """``time.monotonic()`` at which calibration must stop, from now."""
        return None if self.timeout is None else time.monotonic() + self.timeout


@dataclass(slots=True)
class Exposure:
    """What calibration observes: the model (with subgraph tensors carried out when possible), the
    float tensors tracked, the permutation aliases among them, and a probe session exposing them."""

    model: onnx.ModelProto
    tracked: list[str]
    aliases: dict[str, str]
    #: exposed output name -> tensor name inside its subgraph
    inner: dict[str, str]
    probe: Session
    #: exposed outputs holding per-iteration [min, max] pairs of a Loop/Scan body tensor
    reduced: frozenset[str] = frozenset()
    #: tracked tensor -> output holding each batch's ``[min, max, nans, size]`` summary, reduced in
    #: the graph instead of returning the values (``expose(summarize=True)``)
    summaries: dict[str, str] = field(default_factory=dict)

    @property
    def fetched(self) -> list[str]:
        """Tracked tensors observed directly (aliases copy their source's observers)."""
        return [n for n in self.tracked if n not in self.aliases]


def expose(
    model: onnx.ModelProto, dataset: Dataset | FeedList, options: CalibrationOptions, *, summarize: bool = False
) -> Exposure:
    """Find the float activations of ``model`` to observe, carrying subgraph tensors out if they run.

    ``summarize`` (min/max alone): the main-graph activations are reduced inside the graph to a
    summary each (``quantcli.graph.reductions``) and the probe returns the summaries, not the values
    (the model's opset permitting; ``Exposure.summaries`` lists them).

    Raises:
        UnsupportedModelError: the model has no float activation.
    """
    names = candidate_tensors(model)
    # a model run one small sample at a time is calibrated on one onnxruntime thread: its probe too
    threads = 1 if runs_look_tiny(model, dataset, options.batch_size, options.threads) else options.threads
    inner: dict[str, str] = {}
    reduced: frozenset[str] = frozenset()
    probe: Session | None = None
    if has_subgraphs(model.graph):
        exposed = expose_subgraph_tensors(model, elem_types(infer_shapes(model)[0]), reduce_loops=True)
        try:  # e.g. a loop tensor whose shape changes between iterations cannot be stacked
            probe = make_session(
                exposed.model,
                threads=threads,
                source=options.source,
                spin=False,
                outputs=names + list(exposed.names),
            )
            probe.run(list(exposed.names), next(iter(dataset.batches(1))))
            model, inner, reduced = exposed.model, exposed.names, exposed.reduced
            names += list(inner)
        except Exception as exc:  # never block: the subgraphs stay float, the main graph is calibrated
            log.warning("cannot expose tensors inside If/Loop/Scan subgraphs (%s); they stay float", exc)
            probe = None
    if probe is None:
        probe = make_session(model, threads=threads, source=options.source, spin=False, outputs=names)
    float_set = {o.name for o in probe.get_outputs() if o.type == "tensor(float)"}
    tracked = [n for n in names if n in float_set]
    if not tracked:
        raise UnsupportedModelError("model has no float activations to calibrate")
    # a Reshape/Transpose/... output holds its input's values rearranged: same range, same histogram
    aliases = permutation_aliases(model.graph, set(tracked))
    fetched = [n for n in tracked if n not in aliases and n not in reduced]
    summarized = summarize_min_max(model, fetched) if summarize and fetched else None
    if summarized is None:
        return Exposure(model, tracked, aliases, inner, probe, reduced)
    del probe  # before the summarizing session is built: one session alive at a time
    probe = make_session(summarized.model, threads=threads, source=options.source, spin=False)
    return Exposure(summarized.model, tracked, aliases, inner, probe, reduced, summarized.outputs)


def range_request(tensor: str, options: CalibrationOptions, *, reduced: bool = False) -> RangeRequest:
    """What calibration asks the collector about one tensor for ``options.method``.

    ``reduced``: the tensor is exposed as per-iteration [min, max] pairs (no histogram possible).
    """
    bins = options.bins if options.method in HISTOGRAM_METHODS and not reduced else 0
    return RangeRequest(tensor, options.method == CalibrationMethod.MOVING_AVERAGE, bins, reduced)


def exposure_requests(exposure: Exposure, options: CalibrationOptions) -> dict[str, RangeRequest]:
    """The range request of every tensor ``exposure`` fetches: its summary's, its pairs' or its values'."""
    requests: dict[str, RangeRequest] = {}
    for name in exposure.fetched:
        if name in exposure.summaries:
            requests[name] = RangeRequest(exposure.summaries[name], summary=True)
        else:
            requests[name] = range_request(name, options, reduced=name in exposure.reduced)
    return requests


def calibrate(
    model: onnx.ModelProto,
    dataset: Dataset | FeedList,
    options: CalibrationOptions | None = None,
    *,
    model_sha256: str,
    progress: Progress = no_progress,
    **fields: Any,
) -> CalibrationResult:
    """Collect a clip range for every float activation of ``model`` (not modified) over ``dataset``.

    ``fields`` override fields of ``options`` (``calibrate(m, d, model_sha256=h, method=...)``).
    ``model_sha256`` (hash of the user's model file) is recorded in the result; ``progress`` wraps
    the batch iterator (e.g. with tqdm).
    """
    options = replace(options or CalibrationOptions(), **fields)
    exposure = expose(model, dataset, options, summarize=options.summarizes)
    requests = exposure_requests(exposure, options)
    if exposure.reduced and options.method in HISTOGRAM_METHODS:
        log.info(
            "%d tensors inside Loop/Scan bodies get min-max ranges (observed per iteration)", len(exposure.reduced)
        )
    collected = collect(
        [exposure.model],
        dataset,
        list(requests.values()),
        options.collect_options(options.deadline()),
        sessions=[exposure.probe],
        progress=progress,
    )
    observed = {n: cast(RangeStats, collected[r]) for n, r in requests.items()}
    result = calibration_result(exposure, observed, options, model_sha256, dataset.num_samples, collected.passes)
    return replace(result, input_shapes=sample_shapes(dataset))


class ExposedNames(Protocol):
    """The names ``calibration_result`` reads: an ``Exposure``, or the same lists from a statistics file."""

    @property
    def tracked(self) -> list[str]: ...

    @property
    def aliases(self) -> dict[str, str]: ...

    @property
    def inner(self) -> dict[str, str]: ...


def calibration_result(
    exposure: ExposedNames,
    observed: dict[str, RangeStats],
    options: CalibrationOptions,
    model_sha256: str,
    num_samples: int,
    passes: int,
) -> CalibrationResult:
    """Ranges of every tracked tensor from its observers (aliases share their source's)."""
    inner = exposure.inner
    observed = {**observed, **{alias: observed[root] for alias, root in exposure.aliases.items()}}
    histograms: dict[str, HistogramObserver] = {
        n: o.histogram.result() for n, o in observed.items() if o.histogram is not None
    }
    ranges: dict[str, TensorRange] = {}
    nans: dict[str, int] = {}
    chosen: dict[int, tuple[float, float]] = {}  # clip range by observers (id), before the bounds
    unseen = {n for n in exposure.tracked if n in inner and not (observed[n].minmax.count or observed[n].minmax.nans)}
    unobserved = tuple(inner[n] for n in exposure.tracked if n in unseen)
    for name in exposure.tracked:
        stats = observed[name]
        if name in unseen:
            continue
        if stats.minmax.nans:
            nans[inner.get(name, name)] = stats.minmax.nans
        if stats.minmax.nans and not stats.minmax.count:
            raise CalibrationDataError(
                f"activation '{inner.get(name, name)}' took only NaN values ({stats.minmax.nans}) on the "
                "calibration data: it has no range to quantize with"
            )
        lo, hi = stats.minmax.result()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise CalibrationDataError(
                f"activation '{name}' took non-finite values (min {lo}, max {hi}) on the calibration data"
            )
        clip_lo, clip_hi = lo, hi
        if stats.moving is not None:
            clip_lo, clip_hi = stats.moving.result()
        elif name in histograms:
            if id(stats) not in chosen:  # an alias shares its source's observers: the same choice
                chosen[id(stats)] = choose_range(
                    histograms[name], str(options.method), percentile=options.percentile, levels=options.levels
                )
            clip_lo, clip_hi = chosen[id(stats)]
            clip_lo, clip_hi = max(clip_lo, lo), min(clip_hi, hi)  # grid edges lie up to a bin beyond
        ranges[inner.get(name, name)] = TensorRange(float(clip_lo), float(clip_hi), float(lo), float(hi))
    return CalibrationResult(
        model_sha256=model_sha256,
        method=options.method,
        params=_params(options, passes, bool(histograms)),
        num_samples=num_samples,
        ranges=ranges,
        histograms={inner.get(n, n): h for n, h in histograms.items() if inner.get(n, n) in ranges},
        unobserved=unobserved,
        nans=nans,
    )


def _params(options: CalibrationOptions, passes: int, histograms: bool) -> dict[str, float | int]:
    params: dict[str, float | int] = {"batch_size": options.batch_size, "passes": passes}
    if options.shuffle:
        params["seed"] = options.seed
    if options.method == CalibrationMethod.PERCENTILE:
        params["percentile"] = options.percentile
    if histograms:
        params["bins"] = options.bins
    if options.method in (CalibrationMethod.ENTROPY, CalibrationMethod.MSE):
        params["levels"] = options.levels
    return params


def rechoose(
    result: CalibrationResult,
    method: CalibrationMethod,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    levels: int | None = None,
) -> CalibrationResult:
    """Ranges for another histogram method from stored histograms, without re-running the data.

    Entropy and MSE choose for ``levels`` integer levels (by default the calibration's own, 256
    unless recorded); the result records ``levels`` when given. The same ``method`` returns
    ``result`` as it is (``ranges_for_levels`` re-chooses it for other levels).

    Raises:
        ArtifactMismatchError: the calibration has no histograms, or ``method`` needs data (moving average).
    """
    if method == result.method:
        return result
    if method == CalibrationMethod.MINMAX:
        ranges = {
            n: TensorRange(r.observed_min, r.observed_max, r.observed_min, r.observed_max)
            for n, r in result.ranges.items()
        }
        return replace(result, method=method, params={}, ranges=ranges)
    if method == CalibrationMethod.MOVING_AVERAGE:
        raise ArtifactMismatchError(
            "moving-average ranges need the data: run 'quantcli calibrate --method moving-average'"
        )
    if not result.histograms:
        raise ArtifactMismatchError(
            f"cannot switch this calibration from {result.method} to {method} without its histograms; "
            "calibrate with --method percentile, entropy or mse (which write CALIB.json.hist.npz), or with this method"
        )
    recorded = levels is not None
    levels = int(result.params.get("levels", 256)) if levels is None else levels
    ranges = {}
    for name, r in result.ranges.items():
        hist = result.histograms.get(name)
        lo, hi = (
            (r.observed_min, r.observed_max)
            if hist is None
            else choose_range(hist, str(method), percentile=percentile, levels=levels)
        )
        lo, hi = max(lo, r.observed_min), min(hi, r.observed_max)
        ranges[name] = TensorRange(float(lo), float(hi), r.observed_min, r.observed_max)
    params: dict[str, float | int] = {"bins": next(iter(result.histograms.values())).bins}
    if method == CalibrationMethod.PERCENTILE:
        params["percentile"] = percentile
    if recorded:
        params["levels"] = levels
    return replace(result, method=method, params=params, ranges=ranges)


def activation_levels(dtype: QuantDType) -> int:
    """Number of integer levels of an activation type (256 for 8-bit types, 65,536 for 16-bit)."""
    qmin, qmax = dtype_bounds(dtype)
    return qmax - qmin + 1


def ranges_for_levels(result: CalibrationResult, levels: int) -> dict[str, TensorRange]:
    """Ranges of ``result`` chosen for ``levels`` integer levels (the activation type actually used).

    Entropy and MSE choose a clip range for a number of levels: a calibration records them for its
    own ``levels`` (256 unless told), so a 16-bit activation type would get 8-bit-optimal clips. With
    the histograms at hand they are re-chosen here for ``levels``; other methods (min-max, moving
    average, percentile) do not depend on the levels, and the recorded ranges are returned as they
    are, as they are for the recorded number of levels.
    """
    recorded = int(result.params.get("levels", 256))
    if result.method not in (CalibrationMethod.ENTROPY, CalibrationMethod.MSE) or levels == recorded:
        return result.ranges
    if not result.histograms:
        log.warning(
            "the %s ranges of this calibration were chosen for %d levels and its histograms are missing "
            "(the calibration file's .hist.npz sidecar), so they cannot be re-chosen for %d levels: "
            "they are used as they are",
            result.method,
            recorded,
            levels,
        )
        return result.ranges
    ranges = {}
    for name, r in result.ranges.items():
        hist = result.histograms.get(name)
        if hist is None:
            ranges[name] = r
            continue
        lo, hi = choose_range(hist, str(result.method), levels=levels)
        lo, hi = max(lo, r.observed_min), min(hi, r.observed_max)
        ranges[name] = TensorRange(float(lo), float(hi), r.observed_min, r.observed_max)
    return ranges
