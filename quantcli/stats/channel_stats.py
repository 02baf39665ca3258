"""Per-channel statistics of chosen tensors, collected in one streaming pass over the data.

For each requested tensor x and channel axis a, with n = number of elements per channel seen so far:

    mean[c]   = sum(x[..., c, ...]) / n          (accumulated in float64)
    min[c], max[c], absmax[c] = max(|min[c]|, |max[c]|)

The statistics collector (``quantcli.stats.collector.ChannelRequest``) does the work: the model is
copied with the tensors exposed, each batch is reduced to O(channels) numbers and dropped, and the
tensors are split into memory groups under ``max_memory``. The algorithms that need these numbers
(SmoothQuant: abs-max; bias correction: mean) ask for them here or through ``collect`` directly,
rather than through the calibration file, whose format stays as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import onnx

from quantcli.core.errors import CalibrationDataError
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import Dataset, FeedList
from quantcli.stats.collector import ChannelRequest, ChannelStats, Collected, CollectOptions, collect

__all__ = ["ChannelStats", "channel_results", "collect_channel_stats"]


def channel_results(
    collected: Collected, requests: Mapping[str, ChannelRequest], dataset: Dataset | FeedList
) -> dict[str, ChannelStats]:
    """The statistics of each requested tensor (name -> stats).

    Raises:
        CalibrationDataError: a tensor saw no element (an empty data set).
    """
    out: dict[str, ChannelStats] = {}
    for name, request in requests.items():
        stats = cast("ChannelStats | None", collected[request].result())  # type: ignore[attr-defined]
        if stats is None:
            raise CalibrationDataError(f"{dataset.path}: no samples to collect channel statistics from")
        out[name] = stats
    return out


def collect_channel_stats(
    model: onnx.ModelProto,
    dataset: Dataset,
    tensors: Mapping[str, int],
    *,
    batch_size: int = 32,
    threads: int = 0,
    max_memory: int | None = None,
    source: str = "model",
    progress: Progress = no_progress,
) -> dict[str, ChannelStats]:
    """Mean, min, max and abs-max per channel of each tensor in ``tensors`` (name -> channel axis).

    Raises:
        CalibrationDataError: onnxruntime failed on a batch, or the data set is empty.
    """
    if not tensors:
        return {}
    requests = {name: ChannelRequest(name, axis) for name, axis in tensors.items()}
    options = CollectOptions(
        batch_size=batch_size, threads=threads, max_memory=max_memory, source=source, desc="channel statistics"
    )
    collected = collect([model], dataset, list(requests.values()), options, progress=progress)
    return channel_results(collected, requests, dataset)
