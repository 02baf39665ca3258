"""Run calibration data through onnxruntime and collect activation ranges, one batch at a time.

The model is copied and every float activation is exposed as an extra graph output (the input
model is not touched). Each batch's outputs go straight into small observers and are dropped, so
memory holds one batch of activations, whatever the number of samples. Histogram methods take a
second pass over the data with bins fixed at the exact min/max of the first, which makes their
result independent of the batch size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from quantcli.data import Dataset
from quantcli.errors import CalibrationDataError, UnsupportedModelError
from quantcli.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    choose_range,
)
from quantcli.options import CalibrationMethod

__all__ = [
    "CalibrationResult",
    "Progress",
    "TensorRange",
    "calibrate",
    "make_session",
]

log = logging.getLogger(__name__)

#: wraps an iterable of batches to show progress; identity by default
Progress = Callable[[Iterable[dict[str, np.ndarray]], int, str], Iterable[dict[str, np.ndarray]]]


def _no_progress(it: Iterable[dict[str, np.ndarray]], total: int, desc: str) -> Iterable[dict[str, np.ndarray]]:
    return it


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


def make_session(model: onnx.ModelProto, *, threads: int = 0, optimize: bool = True) -> ort.InferenceSession:
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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"onnxruntime cannot load the model: {first}") from exc


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


def _augmented(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
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
    dataset: Dataset,
    outputs: list[str],
    batch_size: int,
    progress: Progress,
    desc: str,
) -> Iterator[dict[str, np.ndarray]]:
    size = dataset.effective_batch_size(batch_size)
    total = -(-dataset.num_samples // size)
    for feed in progress(dataset.batches(size), total, desc):
        try:
            values = session.run(outputs, feed)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0]
            raise CalibrationDataError(f"{dataset.path}: onnxruntime failed on a batch: {first}") from exc
        yield dict(zip(outputs, values, strict=True))


def calibrate(
    model: onnx.ModelProto,
    dataset: Dataset,
    *,
    model_sha256: str,
    method: CalibrationMethod = CalibrationMethod.MINMAX,
    percentile: float = 99.99,
    bins: int = 2048,
    levels: int = 256,
    batch_size: int = 32,
    threads: int = 0,
    progress: Progress = _no_progress,
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
        progress: wraps the batch iterator (e.g. with tqdm).
    """
    names = candidate_tensors(model)
    session = make_session(_augmented(model, names), threads=threads)
    float_set = {o.name for o in session.get_outputs() if o.type == "tensor(float)"}
    tracked = [n for n in names if n in float_set]
    if not tracked:
        raise UnsupportedModelError("model has no float activations to calibrate")

    minmax = {n: MinMaxObserver() for n in tracked}
    moving = {n: MovingAverageMinMaxObserver() for n in tracked} if method == CalibrationMethod.MOVING_AVERAGE else {}
    for values in _run(session, dataset, tracked, batch_size, progress, "calibrating"):
        for name in tracked:
            minmax[name].update(values[name])
            if moving:
                moving[name].update(values[name])
        del values

    histograms: dict[str, HistogramObserver] = {}
    if method in (CalibrationMethod.PERCENTILE, CalibrationMethod.ENTROPY, CalibrationMethod.MSE):
        histograms = {n: HistogramObserver(*minmax[n].result(), bins=bins) for n in tracked}
        for values in _run(session, dataset, tracked, batch_size, progress, "histograms"):
            for name in tracked:
                histograms[name].update(values[name])
            del values

    ranges: dict[str, TensorRange] = {}
    for name in tracked:
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
        ranges[name] = TensorRange(float(clip_lo), float(clip_hi), float(lo), float(hi))

    params: dict[str, float | int] = {"batch_size": batch_size}
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
        histograms=histograms,
    )
