"""Run calibration data through onnxruntime and collect activation ranges, one batch at a time.

The model is copied and every float activation is exposed as an extra graph output (the input
model is not touched). Each batch's outputs go straight into small observers and are dropped, so
memory holds one batch of activations, whatever the number of samples. When one batch of all
activations would exceed the memory budget, the tensors are split into groups and the data is run
once per group. Histogram methods use the same single pass: their histograms grow by merging bins
on a power-of-two grid (``observers.GrowingHistogram``), so the result does not depend on the batch
size and no raw data is kept.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from quantcli.core.errors import (
    ArtifactMismatchError,
    CalibrationDataError,
    CalibrationTimeoutError,
    QuantCliError,
    UnsupportedModelError,
)
from quantcli.core.options import CalibrationMethod
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import Dataset, FeedList
from quantcli.graph.model import available_memory, infer_shapes
from quantcli.graph.subgraphs import elem_types, expose_subgraph_tensors, has_subgraphs
from quantcli.stats.observers import (
    HISTOGRAM_METHODS,
    GrowingHistogram,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    choose_range,
)

__all__ = [
    "PERMUTATION_OPS",
    "CalibrationResult",
    "TensorRange",
    "augmented",
    "calibrate",
    "make_session",
    "permutation_aliases",
    "rechoose",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TensorRange:
    """Clip range chosen for one tensor, with the exact observed min and max."""

    min: float
    max: float
    observed_min: float
    observed_max: float


@dataclass(frozen=True, slots=True)
class CalibrationResult:
    """Ranges for every float activation of a model, and how they were obtained."""

    model_sha256: str
    method: CalibrationMethod
    params: dict[str, float | int]
    num_samples: int
    ranges: dict[str, TensorRange]
    histograms: dict[str, HistogramObserver] = field(default_factory=dict)
    #: float tensors inside If/Loop/Scan subgraphs that never ran on the data (e.g. a branch never taken)
    unobserved: tuple[str, ...] = ()


def explain_load_failure(exc: BaseException, source: str) -> str:
    """One line saying why onnxruntime refused a model, and what to do."""
    text = " ".join(str(exc).split())
    newer = re.search(r"Opset (\d+) is under development.*?till opset (\d+)", text)
    if newer:
        return (
            f"{source}: opset {newer.group(1)} is newer than onnxruntime {ort.__version__} supports "
            f"(up to {newer.group(2)}); export with an older opset or upgrade onnxruntime"
        )
    custom = re.search(r"([\w.]+:\w+)\(-?\d+\) is not a registered function/op", text) or re.search(
        r"Could not find an implementation for (\w+\(\d+\)) node with name '([^']*)'", text
    )
    if custom:
        return (
            f"{source}: onnxruntime has no kernel for op {custom.group(1)}; register its custom-op library "
            "or replace the op before quantizing"
        )
    first = text[:300] if text else type(exc).__name__
    return f"{source}: onnxruntime cannot load the model: {first}"


def make_session(
    model: onnx.ModelProto, *, threads: int = 0, optimize: bool = True, source: str = "model"
) -> ort.InferenceSession:
    """An onnxruntime CPU session built from memory (no temporary file)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UnsupportedModelError(explain_load_failure(exc, source)) from exc


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


def augmented(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` with ``names`` added as graph outputs (so onnxruntime returns them)."""
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    existing = {o.name for o in aug.graph.output}
    for name in names:
        if name not in existing:
            vi = onnx.ValueInfoProto()
            vi.name = name
            aug.graph.output.append(vi)
    return aug


def _run(
    session: ort.InferenceSession,
    dataset: Dataset | FeedList,
    outputs: list[str],
    batch_size: int,
    progress: Progress,
    desc: str,
    shuffle: bool,
    seed: int,
    deadline: float | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    size = dataset.effective_batch_size(batch_size)
    total = -(-dataset.num_samples // size)
    for feed in progress(dataset.batches(size, shuffle=shuffle, seed=seed), total, desc, size):
        if deadline is not None and time.monotonic() > deadline:
            raise CalibrationTimeoutError(
                f"{dataset.path}: calibration did not finish within --timeout; use fewer samples "
                "(--max-samples), a larger --batch-size, or a longer timeout"
            )
        try:
            batch = dict(zip(outputs, session.run(outputs, feed), strict=True))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if is_out_of_memory(exc):
                raise QuantCliError(
                    f"{dataset.path}: ran out of memory running a batch of {size} samples with "
                    f"{len(outputs)} exposed activations ({first[:80]}); lower --max-memory (tensors are then "
                    "calibrated in several passes) or --batch-size"
                ) from exc
            raise CalibrationDataError(f"{dataset.path}: onnxruntime failed on a batch: {first}") from exc
        yield batch
        del batch  # before the next run: one batch of activations alive at a time, not two
        _release_freed_memory()


_OOM_MARKERS = ("bad_alloc", "bfc_arena", "failed to allocate", "out of memory", "memoryerror", "cannot allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception from onnxruntime or numpy is an allocation failure."""
    return isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in _OOM_MARKERS)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_malloc_tuned = False
_malloc_trim: Callable[[int], int] | None = None


def _stable_large_allocations() -> None:
    """Fix glibc's mmap threshold at 32 MiB and its trim threshold at 64 MiB (once per process).

    glibc raises its mmap threshold each time a large block is freed, so later batches' activations
    come from the heap, fragment it, and the peak RSS creeps up with the number of batches
    (magika: 1.86 GB at 64 samples, 2.26 GB at 256). With a fixed threshold, blocks above it are
    mapped and unmapped whole: 1.80 and 1.84 GB, at the same speed.

    Fixing the mmap threshold also freezes the trim threshold at its 128 KiB default, so every
    freed batch-sized temporary at the top of the heap went back to the OS and was faulted in again
    by the next observer update: calibration of the bundled CNN spent twice the CPU time (3.0 s
    against 1.5 s at 1,024 samples, same peak RSS). A 64 MiB trim threshold keeps those pages;
    ``_release_freed_memory`` still returns them every few batches, so the peak stays flat.
    No-op where the C library is not glibc.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        if name and "libc" in name:
            libc = ctypes.CDLL(name)
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
            global _malloc_trim
            _malloc_trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        pass


_TRIM_EVERY = 8
_batches_since_trim = 0


def _release_freed_memory() -> None:
    """Every few batches, give freed heap pages back to the OS (glibc ``malloc_trim``).

    Blocks below the mmap threshold come from the heap, whose freed pages glibc keeps and which
    fragments: without this the peak RSS crept up with the number of batches (bundled CNN: 115 MB
    at 64 samples, 136 MB at 1,024). Trimming after every batch made calibration about 2x slower
    (the pages are faulted in again), so it runs every ``_TRIM_EVERY`` batches.
    """
    global _batches_since_trim
    _batches_since_trim += 1
    if _malloc_trim is not None and _batches_since_trim >= _TRIM_EVERY:
        _batches_since_trim = 0
        _malloc_trim(0)


def default_memory_budget() -> int:
    """A quarter of the memory available now (Linux), else 4 GiB."""
    available = available_memory()
    return available // 4 if available else 4 << 30


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


def calibrate(
    model: onnx.ModelProto,
    dataset: Dataset | FeedList,
    *,
    model_sha256: str,
    method: CalibrationMethod = CalibrationMethod.MINMAX,
    percentile: float = 99.99,
    bins: int = 4096,
    levels: int = 256,
    batch_size: int = 32,
    threads: int = 0,
    max_memory: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    timeout: float | None = None,
    source: str = "model",
    progress: Progress = no_progress,
) -> CalibrationResult:
    """Collect a clip range for every float activation of ``model`` over ``dataset``.

    Args:
        model: the (pre-processed) model; it is not modified.
        dataset: validated calibration data.
        model_sha256: hash of the user's model file, recorded in the result.
        method: how clip ranges are chosen.
        percentile: for ``percentile``, the upper percentile kept (the lower is 100 - p).
        bins: histogram bins for percentile/entropy/mse.
        levels: number of integer levels the tensors will be quantized to (for entropy/mse).
        batch_size: samples per onnxruntime run.
        threads: onnxruntime intra-op threads (0: its default).
        max_memory: bytes one batch of exposed activations may take; above it the tensors are
            calibrated in groups over several passes (default: a quarter of available memory).
        shuffle: visit samples in a random order (``seed``); only moving-average depends on order.
        seed: seed of the shuffle.
        timeout: seconds after which calibration stops with an error (None: no limit).
        source: how error messages name the model (its path).
        progress: wraps the batch iterator (e.g. with tqdm).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    _stable_large_allocations()
    names = candidate_tensors(model)
    inner: dict[str, str] = {}  # exposed output name -> tensor name inside its subgraph
    first = next(iter(dataset.batches(1)))
    probe: ort.InferenceSession | None = None
    if has_subgraphs(model.graph):
        exposed = expose_subgraph_tensors(model, elem_types(infer_shapes(model)[0]))
        try:  # e.g. a loop tensor whose shape changes between iterations cannot be stacked
            with_inner = augmented(exposed.model, names + list(exposed.names))
            probe = make_session(with_inner, threads=threads, source=source)
            probe.run(list(exposed.names), first)
            model, inner = exposed.model, exposed.names
            names += list(inner)
        except Exception as exc:  # never block: the subgraphs stay float, the main graph is calibrated
            log.warning("cannot expose tensors inside If/Loop/Scan subgraphs (%s); they stay float", exc)
            probe = None
    if probe is None:
        probe = make_session(augmented(model, names), threads=threads, source=source)
    float_set = {o.name for o in probe.get_outputs() if o.type == "tensor(float)"}
    tracked = [n for n in names if n in float_set]
    if not tracked:
        raise UnsupportedModelError("model has no float activations to calibrate")
    # a Reshape/Transpose/... output holds its input's values rearranged: same range, same histogram
    aliases = permutation_aliases(model.graph, set(tracked))
    fetched = [n for n in tracked if n not in aliases]
    # bytes per sample of every fetched tensor, from one sample
    try:
        sample = probe.run(fetched, first)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise CalibrationDataError(f"{dataset.path}: onnxruntime failed on the first sample: {first_line}") from exc
    sizes = {n: int(a.nbytes) for n, a in zip(fetched, sample, strict=True)}
    del sample
    groups = plan_groups(sizes, dataset.effective_batch_size(batch_size), max_memory or default_memory_budget())

    def sessions() -> Iterator[tuple[ort.InferenceSession, list[str]]]:
        if len(groups) == 1:
            yield probe, groups[0]
            return
        for group in groups:  # one session alive at a time
            yield make_session(augmented(model, group), threads=threads, source=source), group

    minmax = {n: MinMaxObserver() for n in fetched}
    moving = {n: MovingAverageMinMaxObserver() for n in fetched} if method == CalibrationMethod.MOVING_AVERAGE else {}
    growing = {n: GrowingHistogram(bins=bins) for n in fetched} if method in HISTOGRAM_METHODS else {}
    for k, (session, group) in enumerate(sessions()):
        desc = "calibrating" if len(groups) == 1 else f"calibrating {k + 1}/{len(groups)}"
        for values in _run(session, dataset, group, batch_size, progress, desc, shuffle, seed, deadline):
            for name in group:
                value = values[name]
                minmax[name].update(value)
                if moving:
                    moving[name].update(value)
                if growing and value.size:
                    lo_hi = minmax[name].last
                    growing[name].update(value, max(abs(lo_hi[0]), abs(lo_hi[1])))
                del value
            del values
    for alias, root in aliases.items():  # the same observers: identical ranges by construction
        minmax[alias] = minmax[root]
        if moving:
            moving[alias] = moving[root]
        if growing:
            growing[alias] = growing[root]
    histograms: dict[str, HistogramObserver] = {n: h.result() for n, h in growing.items()}

    ranges: dict[str, TensorRange] = {}
    unobserved = tuple(inner[n] for n in tracked if n in inner and minmax[n].count == 0)
    for name in tracked:
        if name in inner and minmax[name].count == 0:
            continue
        lo, hi = minmax[name].result()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise CalibrationDataError(
                f"activation '{name}' took non-finite values (min {lo}, max {hi}) on the calibration data"
            )
        clip_lo, clip_hi = lo, hi
        if moving:
            clip_lo, clip_hi = moving[name].result()
        elif histograms:
            clip_lo, clip_hi = choose_range(histograms[name], str(method), percentile=percentile, levels=levels)
            clip_lo, clip_hi = max(clip_lo, lo), min(clip_hi, hi)  # grid edges lie up to a bin beyond
        ranges[inner.get(name, name)] = TensorRange(float(clip_lo), float(clip_hi), float(lo), float(hi))

    params: dict[str, float | int] = {"batch_size": batch_size, "passes": len(groups)}
    if shuffle:
        params["seed"] = seed
    if method == CalibrationMethod.PERCENTILE:
        params["percentile"] = percentile
    if histograms:
        params["bins"] = bins
    if method in (CalibrationMethod.ENTROPY, CalibrationMethod.MSE):
        params["levels"] = levels
    return CalibrationResult(
        model_sha256=model_sha256,
        method=method,
        params=params,
        num_samples=dataset.num_samples,
        ranges=ranges,
        histograms={inner.get(n, n): h for n, h in histograms.items() if inner.get(n, n) in ranges},
        unobserved=unobserved,
    )


def rechoose(result: CalibrationResult, method: CalibrationMethod, *, percentile: float = 99.99) -> CalibrationResult:
    """Ranges for another histogram method from stored histograms, without re-running the data.

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
        return CalibrationResult(result.model_sha256, method, {}, result.num_samples, ranges, result.histograms)
    if method == CalibrationMethod.MOVING_AVERAGE:
        raise ArtifactMismatchError(
            "moving-average ranges need the data: run 'quantcli calibrate --method moving-average'"
        )
    if not result.histograms:
        raise ArtifactMismatchError(
            f"cannot switch this calibration from {result.method} to {method} without its histograms; "
            "calibrate with --method percentile, entropy or mse (which write CALIB.json.hist.npz), or with this method"
        )
    levels = int(result.params.get("levels", 256))
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
    return CalibrationResult(result.model_sha256, method, params, result.num_samples, ranges, result.histograms)
