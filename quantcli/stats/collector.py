"""One statistics collector: statistic requests in, one streaming pass over the data per memory group.

A request is a value naming what to measure and on which tensor:

* ``RangeRequest(tensor, moving_average, histogram_bins, reduced, summary)``: exact min/max, plus a moving
  average of the per-batch min/max and a growing histogram when asked (calibration); ``reduced``: the
  output holds ``[min, max]`` pairs on its last axis (a Loop body's tensor reduced per iteration,
  ``quantcli.graph.subgraphs``), observed as the values they bound; ``summary``: the output is a
  batch's ``[min, max, nans, size]`` reduced in the graph (``quantcli.graph.reductions``);
* ``ChannelRequest(tensor, axis)``: per-channel mean, min, max (so abs-max) along ``axis``
  (SmoothQuant, bias correction);
* ``ErrorRequest(tensor, candidate)``: signal and noise energy of a candidate model's tensor against
  the reference model's (per-layer error), with the first batch of reference values kept.

``collect`` exposes every requested tensor as a graph output (the models are copied, not touched),
measures the bytes each exposed tensor takes for one sample, and chooses how to stream: with
``fit_batch`` (observers that do not depend on the batching) the batch shrinks, down to one sample,
until one batch of every exposed tensor fits ``max_memory``, and to ``batch_target`` bytes, beyond which
a larger batch runs no faster on a CPU (``plan_batch``; another pass would re-run the model); one sample
is never split into groups then, since measuring the sizes already held one sample of every tensor (more
passes would lower no peak). Otherwise what does not fit is split into groups (``plan_groups``). It then
streams the data once per group, feeding each batch to every observer of the group and dropping it
before the next batch: memory holds one batch of the group's tensors (two with ``overlap_updates``).

Observer updates (a histogram costs about as much CPU per value as the inference that produced it)
run on worker threads (``_Feeder``): numpy releases the GIL in most of its loops, so a batch's
observers are spread over the CPUs, and with ``overlap_updates`` the next batch is inferred while
they work, when two batches fit ``max_memory``; batches too small for a hand-off each (a model run
one small sample at a time) are handed over a few hundred KB at a time. Each observer still sees every
batch once, in order, in one thread at a time, so the results are the same bytes as updating them one
by one in the calling thread. Runs that move little (``ONE_THREAD_BYTES``: activations of a batch
plus weights) get one onnxruntime intra-op thread, whose pool costs more than it splits there.

Adding a statistic is one request class with an ``outputs`` and an ``observer`` (observers live in
``quantcli.stats.observers``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import onnx

from quantcli.core.errors import CalibrationDataError, CalibrationTimeoutError, QuantCliError
from quantcli.core.process import release_freed_memory
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import Dataset, FeedList
from quantcli.graph.model_io import available_memory
from quantcli.graph.session import Session, is_out_of_memory, make_session
from quantcli.stats.observers import (
    HISTOGRAM_CHUNK,
    MINMAX_CHUNK,
    ChannelObserver,
    ChannelStats,
    ErrorStats,
    GrowingHistogram,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    RangeStats,
)

__all__ = [
    "ChannelRequest",
    "ChannelStats",
    "CollectOptions",
    "Collected",
    "ErrorRequest",
    "ErrorStats",
    "RangeRequest",
    "RangeStats",
    "ReducedRangeStats",
    "StatisticObserver",
    "StatisticRequest",
    "SummaryRangeStats",
    "collect",
    "default_memory_budget",
    "plan_batch",
    "plan_groups",
    "runs_look_tiny",
]

#: which model a request's tensor belongs to
REFERENCE, CANDIDATE = 0, 1
#: most threads updating observers
MAX_UPDATE_THREADS = 4
#: below this many bytes of values a batch, observers are updated in one thread (a thread hand-off
#: per batch costs more than it saves): the calling one, or with ``overlap_updates`` a worker handed
#: ``GATHER_BYTES`` of batches at a time
PARALLEL_MIN_BYTES = 4 << 20
#: bytes of small batches a worker is handed at once, while the next ones are inferred (at most two
#: such hand-offs held: the one in flight and the one gathering). Silero VAD percentile, 256 samples,
#: 15 interleaved runs (load ~20), CPU s median and peak RSS: 256 KB 0.088 s 104 MB, 1 MB 0.085 s 106 MB
GATHER_BYTES = 1 << 18


class StatisticObserver(Protocol):
    """Folds one batch of the values its request named in, in the request's ``outputs`` order;
    ``finish`` folds in what it held back, after the last batch."""

    def update(self, values: Sequence[np.ndarray]) -> None: ...

    def finish(self) -> None: ...


class StatisticRequest(Protocol):
    """A statistic to collect: which (model, output) values it reads, and a fresh observer of them."""

    def outputs(self) -> tuple[tuple[int, str], ...]: ...

    def observer(self) -> StatisticObserver: ...


# ---- ranges ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RangeRequest:
    """Min/max of ``tensor`` (an output name of the reference model), with the extras asked for."""

    tensor: str
    moving_average: bool = False
    histogram_bins: int = 0  # 0: no histogram
    #: the output holds [min, max] pairs (last axis 2), not the values (no histogram then)
    reduced: bool = False
    #: the output is the batch's ``[min, max, nans, size]`` summary reduced inside the graph
    #: (``quantcli.graph.reductions``), not the values (min/max only)
    summary: bool = False

    def outputs(self) -> tuple[tuple[int, str], ...]:
        """(model, output name) pairs the observer reads, in order."""
        return ((REFERENCE, self.tensor),)

    def observer(self) -> RangeStats:
        """A fresh observer."""
        moving = MovingAverageMinMaxObserver() if self.moving_average else None
        if self.summary:
            if moving is not None or self.histogram_bins or self.reduced:
                raise ValueError("a min/max summary feeds min/max alone")
            return SummaryRangeStats(MinMaxObserver(), None, None)
        if self.reduced:
            return ReducedRangeStats(MinMaxObserver(), moving, None)
        # small batches gathered into chunks: the same bytes, fewer updates (a moving average takes
        # each batch as it comes)
        if self.histogram_bins:
            return RangeStats(MinMaxObserver(), moving, GrowingHistogram(bins=self.histogram_bins), HISTOGRAM_CHUNK)
        return RangeStats(MinMaxObserver(), moving, None, MINMAX_CHUNK)


class ReducedRangeStats(RangeStats):
    """``RangeStats`` fed ``[min, max]`` pairs: the pairs' mins and maxes stand for the values.

    The min of the kept values is the min of the mins (each pair has min <= max), likewise the max,
    so min/max and each batch's min/max (moving average) equal those of the values reduced. A pair
    ``[+inf, -inf]`` (an empty tensor reduced, or an If branch not taken) is dropped.
    """

    def update(self, values: Sequence[np.ndarray]) -> None:
        """Fold one batch of pairs in."""
        pairs = np.asarray(values[0]).reshape(-1, 2)
        empty = np.isposinf(pairs[:, 0]) & np.isneginf(pairs[:, 1])
        RangeStats.update(self, [pairs[~empty].reshape(-1)])


class SummaryRangeStats(RangeStats):
    """``RangeStats`` (min/max alone) fed each batch's ``[min, max, nans, size]`` summary.

    Folds the batch as ``MinMaxObserver.update`` folds its values: min and max of the values that are
    not NaN, the NaN values counted; an empty (or all-NaN) batch adds no value. So the state is the
    same bytes as observing the values.
    """

    def update(self, values: Sequence[np.ndarray]) -> None:
        """Fold one batch's summary in."""
        lo, hi, nans, size = (float(v) for v in np.asarray(values[0]).reshape(4))
        self.minmax.fold(lo, hi, int(size) - int(nans), int(nans))


# ---- per-channel statistics -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelRequest:
    """Per-channel statistics of ``tensor`` along ``axis``."""

    tensor: str
    axis: int

    def outputs(self) -> tuple[tuple[int, str], ...]:
        """(model, output name) pairs the observer reads, in order."""
        return ((REFERENCE, self.tensor),)

    def observer(self) -> ChannelObserver:
        """A fresh observer."""
        return ChannelObserver(self.axis)


# ---- error of a candidate tensor against the reference ---------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorRequest:
    """Error of the candidate model's ``candidate`` output against the reference's ``tensor``.

    ``keep_first_empty``: keep the first batch's reference values even when empty (main-graph
    tensors); else the first batch in which the tensor was compared (tensors inside a branch).
    """

    tensor: str
    candidate: str
    keep_first_empty: bool = True

    def outputs(self) -> tuple[tuple[int, str], ...]:
        """(model, output name) pairs the observer reads, in order."""
        return ((REFERENCE, self.tensor), (CANDIDATE, self.candidate))

    def observer(self) -> ErrorStats:
        """A fresh observer."""
        return ErrorStats(self.keep_first_empty)


# ---- the pass --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CollectOptions:
    """How the data is streamed: batch size, threads, memory budget, order, time limit, naming."""

    batch_size: int = 32
    threads: int = 0
    #: bytes one batch of exposed tensors may take (None: a quarter of the memory available)
    max_memory: int | None = None
    #: shrink the batch (down to 1) instead of splitting into groups to fit ``max_memory``: only for
    #: observers whose result does not depend on the batching (not moving average, not first batches)
    fit_batch: bool = False
    #: with ``fit_batch``: bytes of exposed tensors a batch needs to run as fast per sample as a larger
    #: one (0: as large as ``max_memory`` allows)
    batch_target: int = 0
    shuffle: bool = False
    seed: int = 0
    #: ``time.monotonic()`` after which the pass stops with ``CalibrationTimeoutError``
    deadline: float | None = None
    source: str = "model"
    desc: str = "statistics"
    #: threads updating observers (0: ``threads`` if set, else one per CPU up to ``MAX_UPDATE_THREADS``;
    #: 1: in the calling thread, after each batch)
    update_threads: int = 0
    #: infer the next batch while the observers update this one, when two batches fit ``max_memory``:
    #: for observers that cost about what the inference does (histograms), not for cheap ones (min/max),
    #: whose second batch in memory would buy nothing
    overlap_updates: bool = False
    #: let onnxruntime optimize the models (False: they are already, ``quantcli.graph.session.pinned``)
    optimize: bool = True


@dataclass(frozen=True, slots=True)
class Collected:
    """Observers by request, the number of passes over the data (one per memory group), the batch used."""

    observers: dict[object, object]
    passes: int
    batch_size: int = 0

    def __getitem__(self, request: object) -> object:
        return self.observers[request]


def default_memory_budget() -> int:
    """A quarter of the memory available now (Linux), else 4 GiB."""
    available = available_memory()
    return available // 4 if available else 4 << 30


def plan_batch(per_sample: int, batch_size: int, budget: int, target: int = 0) -> int:
    """A batch up to ``batch_size`` whose exposed tensors (``per_sample`` bytes a sample) fit ``budget``.

    With ``target``, the fewest samples whose tensors reach ``target`` bytes (a larger batch runs no
    faster on a CPU once its activations are that large). At least 1: what one sample does not fit is
    left to ``plan_groups``.
    """
    per_sample = max(1, per_sample)
    fits = budget // per_sample
    if target:
        fits = min(fits, -(-target // per_sample))
    return max(1, min(batch_size, fits))


def plan_groups(sizes: dict[str, int], batch_size: int, budget: int) -> list[list[str]]:
    """Split tensors (bytes per sample each) into groups whose batch fits ``budget``; order kept."""
    per_group = max(1, budget // max(1, batch_size))
    groups: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if groups[-1] and used + nbytes > per_group:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    return groups


def _outputs(requests: Sequence[StatisticRequest], model: int) -> list[str]:
    return list(dict.fromkeys(name for r in requests for m, name in r.outputs() if m == model))


#: bytes a run moves (a batch of exposed tensors plus the weights), below which onnxruntime runs it
#: faster on one intra-op thread than on its default pool: the pool's hand-offs cost more than the
#: work they split. 2 shared AVX-512 cores (load 1-10), 256 runs exposing every activation, ms,
#: default pool vs one thread: Silero VAD v6 (33 KB + 1.2 MB) 90 vs 43; digits CNN batch 1 (0.6 +
#: 0.5 MB) 0.71 vs 0.56 a sample, batch 16 (9.4 MB) 0.64 vs 0.72
ONE_THREAD_BYTES = 2 << 20


def runs_look_tiny(model: onnx.ModelProto, dataset: Dataset | FeedList, batch_size: int, threads: int) -> bool:
    """Whether ``collect`` will likely run ``model`` on one thread (``ONE_THREAD_BYTES``), told before a
    probe session is built: no thread count asked, one sample a run (the model fixes its batch at 1)
    and small weights. A probe built on one thread then serves the pass (``collect`` builds the
    session again when the runs prove larger)."""
    return threads == 0 and dataset.effective_batch_size(batch_size) == 1 and _weight_bytes([model]) < ONE_THREAD_BYTES


def _intra_threads(session: Session | None, default: int) -> int:
    """The intra-op thread count ``session`` was built with (``default`` when it does not say)."""
    get_options = getattr(session, "get_session_options", None)
    return int(get_options().intra_op_num_threads) if get_options is not None else default


def _weight_bytes(models: Sequence[onnx.ModelProto]) -> int:
    """Bytes of the main graphs' initializers, from their shapes and types (wherever their bytes are).

    Not ``ByteSize()``: protobuf's upb serializes a message to size it, a transient copy of every
    weight (all-MiniLM-L6 min-max: peak RSS 407 -> 447-470 MB).
    """
    total = 0
    for model in models:
        for tensor in model.graph.initializer:
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            except (KeyError, ValueError, TypeError):  # an undefined or packed type: about a byte a value
                itemsize = 1
            total += math.prod(tensor.dims) * itemsize
    return total


#: bytes of a value of the float32 tensors min/max summaries stand for
SUMMARIZED_ITEMSIZE = 4


def _sizes(
    sessions: Sequence[Session | None],
    names: Sequence[list[str]],
    first: dict[str, np.ndarray],
    dataset: Dataset | FeedList,
    summaries: set[tuple[int, str]],
) -> dict[tuple[int, str], int]:
    """Bytes per sample of every exposed output, from one sample.

    A ``summaries`` output counts as the float32 tensor it summarizes: onnxruntime still computes that
    tensor for every sample of a batch, so the batch is planned as if its values were returned.
    """
    sizes: dict[tuple[int, str], int] = {}
    for model, (session, outs) in enumerate(zip(sessions, names, strict=True)):
        if session is None or not outs:
            continue
        try:
            sample = session.run(outs, first)
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CalibrationDataError(f"{dataset.path}: onnxruntime failed on the first sample: {first_line}") from exc
        for n, a in zip(outs, sample, strict=True):
            stands_for = int(np.asarray(a).reshape(4)[3]) * SUMMARIZED_ITEMSIZE if (model, n) in summaries else 0
            sizes[(model, n)] = max(int(a.nbytes), stands_for)
        del sample
    return sizes


def collect(
    models: Sequence[onnx.ModelProto],
    dataset: Dataset | FeedList,
    requests: Sequence[StatisticRequest],
    options: CollectOptions | None = None,
    *,
    sessions: Sequence[Session | None] = (),
    progress: Progress = no_progress,
) -> Collected:
    """Stream ``dataset`` through ``models`` (the reference, then a candidate if requests need one)
    once per memory group and feed every request's observer; the models are not modified.

    ``sessions`` may hold a session per model already exposing every requested output (the probe a
    caller built): it serves the size measurement and, when one group suffices (or the model already
    returns every requested tensor), the pass itself.

    Raises:
        CalibrationDataError: onnxruntime failed on the data.
        CalibrationTimeoutError: ``options.deadline`` passed.
        QuantCliError: a batch ran out of memory.
    """
    options = options or CollectOptions()
    requests = list(dict.fromkeys(requests))
    names = [_outputs(requests, m) for m in range(len(models))]
    given = list(sessions) + [None] * (len(models) - len(sessions))
    probes = [given[m] or _session(model, names[m], options) for m, model in enumerate(models)]
    first = next(iter(dataset.batches(1)), None)
    if first is None:
        raise CalibrationDataError(f"{dataset.path}: no samples to collect statistics from")
    summaries = {o for r in requests if isinstance(r, RangeRequest) and r.summary for o in r.outputs()}
    sizes = _sizes(probes, names, first, dataset, summaries)
    keyed = {str(i): sum(sizes[o] for o in r.outputs()) for i, r in enumerate(requests)}
    budget = options.max_memory or default_memory_budget()
    size = dataset.effective_batch_size(options.batch_size)
    if options.fit_batch:
        held = sum(sizes.values())  # what the size probe already held: one sample of every output
        size = dataset.effective_batch_size(plan_batch(held, size, budget, options.batch_target))
        options = replace(options, batch_size=size)
        budget = max(budget, held * size)  # passes below what the probe held lower no peak, they re-run the model
    split = plan_groups(keyed, size, budget)
    groups = [[requests[int(k)] for k in g] for g in split if g]
    # a run this small (Silero VAD: 33 KB a sample, its batch fixed at 1) is faster on one thread: a
    # probe on another thread count is built again (a few ms either way: the model is small, or its
    # runs are not) and let go; ``runs_look_tiny`` lets callers build their probes on one thread
    moved = sum(sizes.values()) * size
    one_thread = options.threads == 0 and moved < ONE_THREAD_BYTES and moved + _weight_bytes(models) < ONE_THREAD_BYTES
    wanted = 1 if one_thread else options.threads
    # a model that already returns every requested tensor (per-layer errors expose them all, for one
    # graph whatever the grouping) is run by its probe in every group: a session per group would be the
    # same model again; the other probes are let go before the groups run
    serves = [
        _intra_threads(probe, options.threads) == wanted
        and (len(groups) == 1 or set(names[m]) <= {o.name for o in model.graph.output})
        for m, (model, probe) in enumerate(zip(models, probes, strict=True))
    ]
    probes = [p if keep else None for p, keep in zip(probes, serves, strict=True)]
    observers: dict[object, object] = {}
    for k, group in enumerate(groups):
        desc = options.desc if len(groups) == 1 else f"{options.desc} {k + 1}/{len(groups)}"
        outs = [_outputs(group, m) for m in range(len(models))]
        built = replace(options, threads=wanted)
        runs = [probes[m] if serves[m] else _session(model, outs[m], built) for m, model in enumerate(models)]
        feeding = [(r.observer(), r.outputs()) for r in group]
        # what the observers read a batch (a summary: 32 bytes, not worth a thread hand-off)
        weights = [sum(sizes[o] for o in r.outputs() if o not in summaries) * size for r in group]
        overlap_budget = budget if options.overlap_updates else 0
        batch_bytes = sum(sizes[(m, n)] for m, names_m in enumerate(outs) for n in names_m) * size
        with _Feeder(feeding, weights, _update_threads(options), overlap_budget) as feeder:
            for values in _batches(runs, outs, dataset, options, progress, desc, batch_bytes):
                feeder.feed(values)
                del values
        for observer, _ in feeding:
            observer.finish()
        observers.update((r, obs) for r, (obs, _) in zip(group, feeding, strict=True))
        del runs  # one group's sessions alive at a time
    return Collected(observers, len(groups), size)


Feeding = list[tuple[StatisticObserver, tuple[tuple[int, str], ...]]]


def _update_threads(options: CollectOptions) -> int:
    """Threads updating observers: as asked, else ``options.threads`` or the CPUs this process may use."""
    if options.update_threads:
        return options.update_threads
    if options.threads:
        return min(options.threads, MAX_UPDATE_THREADS)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, MAX_UPDATE_THREADS))


def _balance(feeding: Feeding, weights: Sequence[int], parts: int) -> list[Feeding]:
    """``feeding`` split into at most ``parts`` lists of about equal weight (bytes a batch); order kept."""
    loads = [0] * parts
    owner = [0] * len(feeding)
    for i in sorted(range(len(feeding)), key=lambda i: -weights[i]):  # heaviest first, to the least loaded
        owner[i] = loads.index(min(loads))
        loads[owner[i]] += weights[i]
    split = [[f for f, o in zip(feeding, owner, strict=True) if o == k] for k in range(parts)]
    return [p for p in split if p]


def _update(feeding: Feeding, batches: Sequence[dict[tuple[int, str], np.ndarray]]) -> None:
    """Update each observer with ``batches``, in order (range observers: all at once)."""
    for observer, wanted in feeding:
        if len(batches) > 1 and isinstance(observer, RangeStats) and type(observer).update is RangeStats.update:
            observer.update_batches([values[wanted[0]] for values in batches])
            continue
        for values in batches:
            observer.update([values[o] for o in wanted])


class _Feeder:
    """Feeds each batch to the observers, spread over worker threads, overlapping the next inference.

    ``weights``: bytes of values each observer reads a batch. With several threads and enough bytes,
    the observers are split into one list per thread (each observer in one list, so it sees the
    batches in order, one at a time); ``feed`` returns once they are submitted when two batches fit
    ``budget`` (the next batch is inferred meanwhile), else once they are done. Batches too small to
    be worth a thread hand-off each (``PARALLEL_MIN_BYTES``) are held and handed to one worker
    ``gather`` at a time (``GATHER_BYTES``), when two such hand-offs fit ``budget``: a model run one
    small sample at a time (Silero VAD: 33 KB a run) has its observers updated while the next runs
    infer. A worker's error is raised by the next ``feed`` or on leaving the ``with`` block.
    """

    def __init__(self, feeding: Feeding, weights: Sequence[int], threads: int, budget: int) -> None:
        total = sum(weights)
        small = total < PARALLEL_MIN_BYTES
        gathers = small and threads > 1 and bool(feeding) and budget >= 2 * GATHER_BYTES
        self.gather = max(1, GATHER_BYTES // max(1, total)) if gathers else 1
        threads = 1 if small else threads
        self.parts = _balance(feeding, weights, threads) if feeding else []
        self.overlap = (threads > 1 and 2 * total <= budget) or self.gather > 1
        parallel = len(self.parts) > 1 or self.overlap
        self.pool = ThreadPoolExecutor(len(self.parts), thread_name_prefix="quantcli-observe") if parallel else None
        self.pending: list[Future[None]] = []
        self.held: list[dict[tuple[int, str], np.ndarray]] = []

    def __enter__(self) -> _Feeder:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self._hand_over()
                self.wait()
        finally:
            self.held = []
            if self.pool is not None:
                self.pool.shutdown(wait=True)  # never leave a worker reading a batch behind

    def feed(self, values: dict[tuple[int, str], np.ndarray]) -> None:
        """Update every observer with one batch (after the previous batch's updates are done)."""
        self.held.append(values)
        if len(self.held) >= self.gather:
            self._hand_over()

    def _hand_over(self) -> None:
        """Update the observers with the batches held, in order."""
        if not self.held:
            return
        self.wait()
        held, self.held = self.held, []
        if self.pool is None:
            for part in self.parts:
                _update(part, held)
            return
        self.pending = [self.pool.submit(_update, part, held) for part in self.parts]
        if not self.overlap:
            self.wait()

    def wait(self) -> None:
        """Wait for the updates in flight; raise the first worker error."""
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()


def _session(model: onnx.ModelProto, names: list[str], options: CollectOptions) -> Session | None:
    """A session returning ``names`` (None when the model has nothing to return); its threads sleep
    between runs rather than spin, since the observers work between runs (``make_session(spin=False)``)."""
    if not names:
        return None
    return make_session(
        model,
        outputs=names,
        threads=options.threads,
        optimize=options.optimize,
        source=options.source,
        spin=False,
    )


def _batches(
    sessions: Sequence[Session | None],
    outputs: Sequence[list[str]],
    dataset: Dataset | FeedList,
    options: CollectOptions,
    progress: Progress,
    desc: str,
    batch_bytes: int,
) -> Iterator[dict[tuple[int, str], np.ndarray]]:
    """Each batch's exposed outputs of every model, keyed by (model, name); one batch alive at a time.

    ``batch_bytes``: what a batch's activations take (planned), for ``release_freed_memory``.
    """
    size = dataset.effective_batch_size(options.batch_size)
    total = -(-dataset.num_samples // size)
    count = sum(len(o) for o in outputs)
    keys = [[(model, n) for n in outs] for model, outs in enumerate(outputs)]
    batches = dataset.batches(size, shuffle=options.shuffle, seed=options.seed)
    for feed in progress(batches, total, desc, size):
        if options.deadline is not None and time.monotonic() > options.deadline:
            raise CalibrationTimeoutError(
                f"{dataset.path}: calibration did not finish within --timeout; use fewer samples "
                "(--max-samples), a larger --batch-size, or a longer timeout"
            )
        values: dict[tuple[int, str], np.ndarray] = {}
        for model, (session, outs) in enumerate(zip(sessions, outputs, strict=True)):
            if session is None or not outs:
                continue
            try:
                values.update(zip(keys[model], session.run(outs, feed), strict=True))
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if is_out_of_memory(exc):
                    raise QuantCliError(
                        f"{dataset.path}: ran out of memory running a batch of {size} samples with "
                        f"{count} exposed activations ({first[:80]}); lower --max-memory (tensors are then "
                        "calibrated in several passes) or --batch-size"
                    ) from exc
                raise CalibrationDataError(f"{dataset.path}: onnxruntime failed on a batch: {first}") from exc
        yield values
        del values  # before the next run: one batch of activations alive at a time, not two
        release_freed_memory(batch_bytes)
