"""Per-channel statistics of chosen tensors, collected in one streaming pass over the data.

For each requested tensor x and channel axis a, with n = number of elements per channel seen so far:

    mean[c]   = sum(x[..., c, ...]) / n          (accumulated in float64)
    absmax[c] = max |x[..., c, ...]|

The model is copied with the tensors exposed as extra outputs (the input model is not touched);
each batch's values are reduced to O(channels) numbers and dropped, so memory holds one batch. The
algorithms that need these numbers (SmoothQuant: abs-max; bias correction: mean) ask for them here
rather than through the calibration file, whose format stays as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx

from quantcli.core.errors import CalibrationDataError
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import Dataset
from quantcli.stats.calibration import augmented, make_session

__all__ = ["ChannelStats", "collect_channel_stats"]


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """Mean and abs-max of one tensor per channel along ``axis`` (negative axes count from the end)."""

    axis: int
    mean: npt.NDArray[np.float64]
    absmax: npt.NDArray[np.float64]
    count: int


class _Accumulator:
    """Running sum, abs-max and element count per channel."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.total: npt.NDArray[np.float64] | None = None
        self.absmax: npt.NDArray[np.float64] | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        moved = np.moveaxis(np.asarray(x), self.axis, 0)
        flat = moved.reshape(moved.shape[0], -1)
        total = flat.sum(axis=1, dtype=np.float64)
        absmax = np.abs(flat).max(axis=1).astype(np.float64) if flat.shape[1] else np.zeros(flat.shape[0])
        if self.total is None or self.absmax is None:
            self.total, self.absmax = total, absmax
        elif self.total.shape != total.shape:
            raise CalibrationDataError(f"channel count changed between batches ({self.total.shape} vs {total.shape})")
        else:
            self.total += total
            self.absmax = np.maximum(self.absmax, absmax)
        self.count += flat.shape[1]

    def result(self) -> ChannelStats:
        assert self.total is not None and self.absmax is not None
        return ChannelStats(self.axis, self.total / max(self.count, 1), self.absmax, self.count)


def collect_channel_stats(
    model: onnx.ModelProto,
    dataset: Dataset,
    tensors: Mapping[str, int],
    *,
    batch_size: int = 32,
    threads: int = 0,
    source: str = "model",
    progress: Progress = no_progress,
) -> dict[str, ChannelStats]:
    """Mean and abs-max per channel of each tensor in ``tensors`` (name -> channel axis).

    Raises:
        CalibrationDataError: onnxruntime failed on a batch, or the data set is empty.
    """
    if not tensors:
        return {}
    names = list(tensors)
    session = make_session(augmented(model, names), threads=threads, source=source)
    acc = {name: _Accumulator(axis) for name, axis in tensors.items()}
    size = dataset.effective_batch_size(batch_size)
    total = -(-dataset.num_samples // size)
    for feed in progress(dataset.batches(size), total, "channel statistics", size):
        try:
            values = session.run(names, feed)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0]
            raise CalibrationDataError(f"{dataset.path}: onnxruntime failed on a batch: {first}") from exc
        for name, value in zip(names, values, strict=True):
            acc[name].update(value)
        del values
    if any(a.count == 0 for a in acc.values()):
        raise CalibrationDataError(f"{dataset.path}: no samples to collect channel statistics from")
    return {name: a.result() for name, a in acc.items()}
