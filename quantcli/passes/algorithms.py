"""CLE and SmoothQuant on the FP32 graph, with every statistic the rest needs from one pass over the data.

The data-driven algorithms need three kinds of numbers: SmoothQuant the per-channel abs-max of the
inputs of the MatMul/Gemm it smooths, calibration the ranges of every activation of the transformed
model, bias correction the per-channel means of the inputs of the layers the plan quantizes. All
come from one streaming pass (``quantcli.stats.collector``) over the equalized model (CLE is
data-free, so it runs first), because SmoothQuant changes the values of few tensors, and exactly:

* a tensor it folds 1/s into (the smoothed input and the tensors the fold walks back through), or
  the output of a Mul it inserts, equals a tensor of the equalized model divided by s along its last
  axis: its per-channel min, max, mean and abs-max are the equalized model's divided by s, and
  its min-max range is ``[min_c(min_c / s_c), max_c(max_c / s_c)]`` (s > 0);
* every other tensor holds the equalized model's values, up to float rounding (the smoothed
  MatMul computes (X / s)(s W) instead of X W).

Per-channel statistics do not give a histogram or a moving average of X / s, so for the
percentile, entropy, MSE and moving-average methods the divided tensors (only those) are observed
in a second pass over the smoothed model; min-max (the default) needs one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

import numpy as np
import onnx

from quantcli.core.options import AlgorithmOptions, CalibrationMethod
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import Dataset, FeedList
from quantcli.passes.equalization import EqualizationReport, equalize
from quantcli.passes.smoothquant import SmoothQuantReport, smooth_tracked, smoothing_chains
from quantcli.static.bias_correction import bias_correction_candidates
from quantcli.stats.calibration import (
    CalibrationOptions,
    CalibrationResult,
    Exposure,
    calibration_result,
    expose,
    range_request,
)
from quantcli.stats.collector import ChannelRequest, ChannelStats, CollectOptions, RangeStats, StatisticRequest, collect
from quantcli.stats.observers import MinMaxObserver

__all__ = ["TransformedModel", "transform_and_observe"]

Divided = dict[str, tuple[str, np.ndarray]]


@dataclass(frozen=True, slots=True)
class TransformedModel:
    """The FP32 model after CLE and SmoothQuant, its calibration, and per-channel input statistics
    of each of its Conv/Gemm/MatMul (for bias correction; empty unless asked)."""

    model: onnx.ModelProto
    calibration: CalibrationResult
    input_stats: dict[str, ChannelStats]
    reports: tuple[EqualizationReport | SmoothQuantReport, ...]
    #: full passes over the data (1 unless memory groups or a histogram method with SmoothQuant)
    passes: int


def transform_and_observe(
    prepared: onnx.ModelProto,
    dataset: Dataset | FeedList,
    algorithms: AlgorithmOptions,
    options: CalibrationOptions,
    *,
    model_sha256: str,
    progress: Progress = no_progress,
) -> TransformedModel:
    """CLE, then SmoothQuant (on statistics of the equalized graph), with the calibration of the
    result and, for bias correction, its layers' input statistics; the FP32 function is unchanged."""
    model = prepared
    reports: list[EqualizationReport | SmoothQuantReport] = []
    if algorithms.cle:
        model, cle_report = equalize(model)
        reports.append(cle_report)
    chains = smoothing_chains(model) if algorithms.smoothquant is not None else {}
    wanted = {(t, -1) for chain in chains.values() for t in chain} | {(t, -1) for t in chains}
    bias_axes = bias_correction_candidates(model) if algorithms.bias_correction else {}
    run = options.collect_options(options.deadline())  # one deadline for every pass
    exposure = expose(model, dataset, options)
    first = _observe(exposure, dataset, wanted | set(bias_axes.items()), options, run, progress)
    divided: Divided = {}
    if algorithms.smoothquant is not None:
        absmax = {t: first.channels[(t, -1)] for t in chains if (t, -1) in first.channels}
        done = smooth_tracked(model, absmax, alpha=algorithms.smoothquant)
        model, divided = done.model, done.divided
        reports.append(done.report)
    exposure, observed, again = _derive_divided(exposure, first, divided, options.method)
    passes = first.passes
    if again:  # histogram or moving-average methods: the divided tensors are observed on the smoothed model
        requests = {n: range_request(n, options) for n in again}
        collected = collect([model], dataset, list(requests.values()), run, progress=progress)
        observed.update((n, cast(RangeStats, collected[r])) for n, r in requests.items())
        passes += collected.passes
    calibration = calibration_result(exposure, observed, options, model_sha256, dataset.num_samples, passes)
    input_stats = _input_stats(bias_correction_candidates(model), first.channels, divided) if bias_axes else {}
    return TransformedModel(model, calibration, input_stats, tuple(reports), passes)


@dataclass(frozen=True, slots=True)
class _Observed:
    """What the pass over the equalized model gave: range observers and per-channel statistics."""

    ranges: dict[str, RangeStats]
    channels: dict[tuple[str, int], ChannelStats]
    passes: int


def _observe(
    exposure: Exposure,
    dataset: Dataset | FeedList,
    wanted: set[tuple[str, int]],
    options: CalibrationOptions,
    run: CollectOptions,
    progress: Progress,
) -> _Observed:
    """One pass: the calibration's range of every tracked tensor and the ``wanted`` (tensor, axis) statistics."""
    tracked = set(exposure.tracked)
    channels = {key: ChannelRequest(*key) for key in sorted(wanted) if key[0] in tracked}
    ranges = {n: range_request(n, options, reduced=n in exposure.reduced) for n in exposure.fetched}
    requests: list[StatisticRequest] = [*ranges.values(), *channels.values()]
    collected = collect([exposure.model], dataset, requests, run, sessions=[exposure.probe], progress=progress)
    stats: dict[tuple[str, int], ChannelStats] = {}
    for key, request in channels.items():
        result = collected[request].result()  # type: ignore[attr-defined]
        if result is not None:
            stats[key] = result
    return _Observed({n: cast(RangeStats, collected[r]) for n, r in ranges.items()}, stats, collected.passes)


def _divide(st: ChannelStats, s: np.ndarray) -> ChannelStats | None:
    """Statistics of x / s (s > 0 per channel) from those of x; None if the channels do not match."""
    if st.mean.shape != s.shape or st.min is None or st.max is None:
        return None
    return ChannelStats(st.axis, st.mean / s, st.absmax / s, st.count, st.min / s, st.max / s)


def _derive_divided(
    exposure: Exposure, first: _Observed, divided: Divided, method: CalibrationMethod
) -> tuple[Exposure, dict[str, RangeStats], list[str]]:
    """The exposure and range observers of the smoothed model, and the divided tensors to observe again.

    Min-max ranges of divided tensors are derived from per-channel statistics; other methods (or
    statistics that do not fit) need those tensors observed again, on the smoothed model.
    """
    observed = dict(first.ranges)
    if not divided:
        return exposure, observed, []
    tracked = list(exposure.tracked)
    for new, (src, _) in divided.items():
        if new not in tracked and src in tracked:
            tracked.insert(tracked.index(src) + 1, new)
    again: list[str] = []
    for new, (src, s) in divided.items():
        derived = _divide(first.channels[(src, -1)], s) if (src, -1) in first.channels else None
        if method != CalibrationMethod.MINMAX or derived is None or derived.min is None or derived.max is None:
            again.append(new)
            continue
        lo = float(np.float32(derived.min.min()))  # the value of x / s as the float32 tensor holds it
        hi = float(np.float32(derived.max.max()))
        count = observed[src].minmax.count if src in observed else derived.count
        observed[new] = RangeStats(MinMaxObserver(min=lo, max=hi, count=count, last=(lo, hi)))
    return replace(exposure, tracked=tracked), observed, again


def _input_stats(
    candidates: dict[str, int], stats: dict[tuple[str, int], ChannelStats], divided: Divided
) -> dict[str, ChannelStats]:
    """Per-channel statistics of each layer input of the smoothed model (name -> stats)."""
    out: dict[str, ChannelStats] = {}
    for tensor, axis in candidates.items():
        if tensor in divided and axis == -1:
            src, s = divided[tensor]
            derived = _divide(stats[(src, -1)], s) if (src, -1) in stats else None
            if derived is not None:
                out[tensor] = derived
        elif (tensor, axis) in stats:
            out[tensor] = stats[(tensor, axis)]
    return out
