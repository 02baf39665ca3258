"""Small batches gathered into chunks before the histogram update: the same bytes as batch by batch."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli.data.datasets import FeedList
from quantcli.stats.collector import RangeRequest, collect
from quantcli.stats.observers import GrowingHistogram, MinMaxObserver, RangeStats
from tests.test_minmax_summary import _identity_model


def _state(stats: RangeStats) -> tuple[object, ...]:
    h = stats.histogram
    assert h is not None
    mm = stats.minmax
    return (repr((mm.min, mm.max, mm.count, mm.last)), h.exponent, h.zeros, h.finite, h.counts.tobytes())


def _batches(rng: np.random.Generator, kind: str) -> list[np.ndarray]:
    """Small batches whose |x| bound grows now and then (the grid widens between them)."""
    out = [np.zeros(5, dtype=np.float32), np.full(3, -0.0, dtype=np.float32)]  # zeros before any grid
    for k in range(300):
        n = int(rng.integers(1, 200))
        scale = float(2.0 ** rng.integers(-8, 3)) * (1 + k // 60)
        out.append((rng.standard_normal(n) * scale).astype(np.float32))
        if k % 37 == 0:
            out.append(np.zeros(int(rng.integers(1, 9)), dtype=np.float32))
    # negative subnormals: on a wide grid their product with the scale underflows to -0.0, so they
    # land in another bin than on the narrow grid they met first (the runs keep that grid)
    out.insert(40, -np.full(4, 1e-42, dtype=np.float32))
    out.append(-np.full(4, 1e-42, dtype=np.float32))
    out.append(np.array([3e6], dtype=np.float32))
    out.append(-np.full(4, 1e-42, dtype=np.float32))
    if kind == "nan":
        out.insert(150, np.array([1.0, np.nan, 2.0], dtype=np.float32))
    if kind == "inf":
        out.insert(150, np.array([1.0, np.inf], dtype=np.float32))
    return out


@pytest.mark.parametrize("kind", ["finite", "nan", "inf"])
@pytest.mark.parametrize("chunk", [7, 64, 1 << 14])
def test_chunked_histogram_is_the_same_bytes_as_batch_by_batch(kind: str, chunk: int) -> None:
    batches = _batches(np.random.default_rng(7), kind)
    one_by_one = RangeStats(MinMaxObserver(), None, GrowingHistogram(bins=64))
    chunked = RangeStats(MinMaxObserver(), None, GrowingHistogram(bins=64), chunk)
    for batch in batches:
        one_by_one.update([batch])
        chunked.update([batch])
    assert chunked.pending or chunk == 7  # something was held back
    chunked.finish()
    assert _state(chunked) == _state(one_by_one)


def test_chunks_merge_like_the_batches() -> None:
    rng = np.random.default_rng(3)
    batches = _batches(rng, "finite")
    halves = [RangeStats(MinMaxObserver(), None, GrowingHistogram(bins=64), 1 << 14) for _ in range(2)]
    whole = RangeStats(MinMaxObserver(), None, GrowingHistogram(bins=64))
    for i, batch in enumerate(batches):
        halves[i * 2 // len(batches)].update([batch])
        whole.update([batch])
    halves[0].merge(halves[1])  # merge folds both sides' pending batches in first
    assert halves[0].histogram is not None and whole.histogram is not None
    assert halves[0].minmax.result() == whole.minmax.result()
    np.testing.assert_array_equal(halves[0].histogram.counts, whole.histogram.counts)


def test_the_collector_folds_tiny_batches_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model run one small sample at a time: far fewer histogram updates than runs, same state."""
    rng = np.random.default_rng(11)
    feeds = [{"x": rng.standard_normal(int(rng.integers(1, 50))).astype(np.float32)} for _ in range(120)]
    calls = {"n": 0}
    update = GrowingHistogram.update

    def counting(self: GrowingHistogram, array: np.ndarray, amax: float | None = None) -> None:
        calls["n"] += 1
        update(self, array, amax)

    monkeypatch.setattr(GrowingHistogram, "update", counting)
    request = RangeRequest("y", histogram_bins=128)
    got = collect([_identity_model()], FeedList(feeds), [request])[request]
    assert isinstance(got, RangeStats) and calls["n"] < 10
    ref = RangeStats(MinMaxObserver(), None, GrowingHistogram(bins=128))
    for feed in feeds:
        ref.update([feed["x"]])
    assert _state(got) == _state(ref)


@pytest.mark.parametrize("kind", ["finite", "nan", "inf"])
@pytest.mark.parametrize("gathered", [3, 40])
def test_batches_handed_over_together_are_the_same_bytes_as_one_by_one(kind: str, gathered: int) -> None:
    """``update_batches`` (a gathered hand-off) against ``update`` a batch at a time, empty batches and a
    batch above the chunk included."""
    batches = _batches(np.random.default_rng(5), kind)
    batches.insert(90, np.zeros(0, dtype=np.float32))
    batches.insert(200, np.random.default_rng(1).standard_normal(300).astype(np.float32))  # above the chunk
    one_by_one = RangeStats(MinMaxObserver(), None, GrowingHistogram(bins=64))
    handed = RangeStats(MinMaxObserver(), None, GrowingHistogram(bins=64), 256)
    for batch in batches:
        one_by_one.update([batch])
    for start in range(0, len(batches), gathered):
        handed.update_batches(batches[start : start + gathered])
    handed.finish()
    assert _state(handed) == _state(one_by_one)


def test_the_collector_hands_tiny_batches_over_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Histograms of a model run one tiny sample at a time: the observers get the batches in a few
    hand-offs to a worker (not one call a batch), and the state is the same bytes."""
    from dataclasses import replace

    from quantcli.stats import collector
    from quantcli.stats.collector import CollectOptions

    rng = np.random.default_rng(13)
    feeds = [{"x": rng.standard_normal(int(rng.integers(1, 50))).astype(np.float32)} for _ in range(120)]
    calls = {"n": 0}
    update = RangeStats.update

    def counting(self: RangeStats, values: list[np.ndarray]) -> None:
        calls["n"] += 1
        update(self, values)

    monkeypatch.setattr(RangeStats, "update", counting)
    request = RangeRequest("y", histogram_bins=128)
    options = CollectOptions(max_memory=64 << 20, update_threads=2, overlap_updates=True)
    monkeypatch.setattr(collector, "GATHER_BYTES", 2048)  # about ten of these batches a hand-off
    got = collect([_identity_model()], FeedList(feeds), [request], options)[request]
    assert isinstance(got, RangeStats) and calls["n"] == 0  # every batch came through update_batches
    alone = collect([_identity_model()], FeedList(feeds), [request], replace(options, update_threads=1))[request]
    assert calls["n"] == len(feeds)  # one thread: a batch at a time, in the calling thread
    assert isinstance(alone, RangeStats) and _state(got) == _state(alone)


@pytest.mark.parametrize("kind", ["finite", "nan", "inf"])
def test_min_max_alone_folds_small_batches_in_chunks_to_the_same_bytes(kind: str) -> None:
    """Min-max calibration's observer (no histogram) holds small batches too: one min/max pass per
    chunk, not per batch, and the same state (bounds, -0.0 as +0.0, count, latest batch, NaN count)."""
    batches = _batches(np.random.default_rng(9), kind)
    one_by_one = RangeStats(MinMaxObserver(), None, None)
    chunked = RangeRequest("x").observer()
    assert chunked.chunk and chunked.histogram is None
    for batch in batches:
        one_by_one.update([batch])
        chunked.update([batch])
    assert chunked.pending  # something was held back
    chunked.finish()
    mm, ref = chunked.minmax, one_by_one.minmax
    assert repr((mm.min, mm.max, mm.count, mm.last, mm.nans)) == repr((ref.min, ref.max, ref.count, ref.last, ref.nans))
