"""The faster histogramming keeps every byte: ``GrowingHistogram.update`` against a frozen copy of the
update it replaced (random and adversarial inputs: zeros, -0.0, inf, nan, denormals, huge ranges, a
growing range), and the collector's threaded, overlapped observer updates against updates in the
calling thread. Correctness only: no timing here (speed is measured by benchmarks/bench_calibration.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pytest

import quantcli.stats.collector as collector
from quantcli.passes.preprocess import preprocess
from quantcli.stats.collector import ChannelRequest, CollectOptions, RangeRequest, collect
from quantcli.stats.observers import GrowingHistogram
from tests import models
from tests.helpers import dataset


class ReferenceHistogram(GrowingHistogram):
    """``GrowingHistogram`` with the update of commit fc85901 (before the speed work), verbatim."""

    def update(self, array: np.ndarray, amax: float | None = None) -> None:
        if array.size == 0 or not self.finite:
            return
        if amax is None:
            amax = float(max(abs(float(array.min())), abs(float(array.max()))))
        if not np.isfinite(amax):
            self.finite = False
            return
        if amax == 0.0:
            if self.exponent is None:
                self.zeros += int(array.size)
            else:
                self.counts[self.bins // 2] += int(array.size)
            return
        needed = math.frexp(amax)[1]
        if self.exponent is None:
            self.exponent = needed
            self.counts[self.bins // 2] += self.zeros
            self.zeros = 0
        elif needed > self.exponent:
            self._grow(needed)
        half = self.bins // 2
        pos = np.multiply(array.ravel(), np.float32(math.ldexp(half, -self.exponent)), dtype=np.float32)
        np.floor(pos, out=pos)
        pos += np.float32((1 << 23) + half)
        index = pos.view(np.int32)
        index -= 0x4B000000
        self.counts += np.bincount(index, minlength=self.bins)


def exact_histogram(batches: Sequence[np.ndarray], bins: int) -> tuple[int | None, np.ndarray]:
    """(exponent, counts) of all values at once in float64 arithmetic: bin floor(x * half / R) + half."""
    values = np.concatenate([b.ravel() for b in batches]).astype(np.float64)
    amax = float(np.abs(values).max())
    half = bins // 2
    if amax == 0.0:
        counts = np.zeros(bins, dtype=np.int64)
        counts[half] = values.size
        return None, counts
    exponent = math.frexp(amax)[1]
    index = np.floor(values * math.ldexp(half, -exponent)).astype(np.int64) + half
    return exponent, np.bincount(index, minlength=bins)


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


TINY = float(np.finfo(np.float32).smallest_subnormal)
RNG = np.random.default_rng(14)
CASES: dict[str, list[np.ndarray]] = {
    "normal": [RNG.standard_normal(5000).astype(np.float32) for _ in range(3)],
    "growing 64x a batch": [(RNG.standard_normal(3000) * 64.0**k).astype(np.float32) for k in range(4)],
    "shrinking": [(RNG.standard_normal(3000) * 64.0**-k).astype(np.float32) for k in range(4)],
    "post-relu zeros": [np.maximum(RNG.standard_normal(4000), 0).astype(np.float32) for _ in range(2)],
    "zeros then values": [np.zeros(100, np.float32), _f32(-0.0, 0.0), _f32(0.25, -3.0, 0.0)],
    "negative zero": [_f32(-0.0, -0.0, 1.0, -1.0)],
    "exact powers of two and bin edges": [_f32(1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 1.5, -1.5, 2.0**-11, -(2.0**-11))],
    "denormals beside normals": [_f32(TINY, -TINY, 1e-40, -1e-40, 1e-38, 0.75)],
    "huge range": [_f32(3.4e38, -3.4e38, 1e-30, -1e-30, 1.0, TINY, -TINY)],
    "float32 extremes": [_f32(float(np.finfo(np.float32).max), -1.0), _f32(float(np.finfo(np.float32).tiny))],
    "one value": [_f32(-7.0)],
}


@pytest.mark.parametrize("bins", [2, 16, 4096])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("known_amax", [False, True])
def test_update_equals_the_old_update(name, bins, known_amax):
    new, old = GrowingHistogram(bins), ReferenceHistogram(bins)
    for batch in CASES[name]:
        amax = float(np.abs(batch).max()) if known_amax else None
        new.update(batch, amax)
        old.update(batch, amax)
    assert (new.exponent, new.zeros, new.finite) == (old.exponent, old.zeros, old.finite)
    assert new.counts.dtype == old.counts.dtype and new.counts.tobytes() == old.counts.tobytes()
    assert int(new.counts.sum()) + new.zeros == sum(b.size for b in CASES[name])


@pytest.mark.parametrize("bins", [16, 4096])
@pytest.mark.parametrize("name", ["normal", "growing 64x a batch", "zeros then values", "denormals beside normals"])
def test_update_equals_exact_arithmetic(name, bins):
    hist = GrowingHistogram(bins)
    for batch in CASES[name]:
        hist.update(batch)
    exponent, counts = exact_histogram(CASES[name], bins)
    assert hist.exponent == exponent
    np.testing.assert_array_equal(hist.result().counts, counts)


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_infinite_values_stop_the_histogram_as_before(bad):
    new, old = GrowingHistogram(16), ReferenceHistogram(16)
    for batch in (_f32(1.0, 2.0), _f32(0.5, bad), _f32(100.0)):
        new.update(batch)
        old.update(batch)
    assert not new.finite and new.exponent == old.exponent == 2
    assert new.counts.tobytes() == old.counts.tobytes()


def test_nan_values_are_left_out_not_their_batch():
    """Before, a NaN stopped the histogram like an inf; now only the NaN values are left out."""
    new, old = GrowingHistogram(16), ReferenceHistogram(16)
    for batch in (_f32(1.0, 2.0), _f32(0.5, np.nan, 3.0), _f32(100.0)):
        new.update(batch)
        old.update(batch[~np.isnan(batch)])
    assert new.finite and new.exponent == old.exponent == 7
    assert new.counts.tobytes() == old.counts.tobytes()


@pytest.mark.parametrize(
    "batches", [[_f32(1e-40, -2e-40, 0.0)], [_f32(TINY, -TINY)], [_f32(1e-36, -3e-37), _f32(TINY * 5)]]
)
def test_tiny_ranges_whose_scale_overflows_float32_are_binned_exactly(batches):
    """Before, every |x| below about 2**-116 made the float32 scale overflow and bincount fail."""
    old = ReferenceHistogram(4096)
    with pytest.raises(ValueError), np.errstate(all="ignore"):
        for batch in batches:
            old.update(batch)
    hist = GrowingHistogram(4096)
    for batch in batches:
        hist.update(batch)
    exponent, counts = exact_histogram(batches, 4096)
    assert hist.exponent == exponent
    np.testing.assert_array_equal(hist.counts, counts)


# ---- the collector's threaded updates ------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn():
    return preprocess(models.small_cnn())[0]


def _requests(model) -> list:
    tensors = [model.graph.input[0].name] + [n.output[0] for n in model.graph.node]
    ranges = [RangeRequest(t, histogram_bins=512) for t in tensors]
    return [*ranges, RangeRequest(tensors[1], moving_average=True), ChannelRequest(tensors[2], 1)]


def _state(observer) -> bytes:
    """Every number an observer holds, as bytes."""
    if hasattr(observer, "minmax"):
        parts = [repr((observer.minmax.min, observer.minmax.max, observer.minmax.count, observer.minmax.last))]
        if observer.moving is not None:
            parts.append(repr(observer.moving.result()))
        if observer.histogram is not None:
            h = observer.histogram
            parts.append(repr((h.exponent, h.zeros, h.finite)) + h.counts.tobytes().hex())
        return "|".join(parts).encode()
    stats = observer.result()
    return repr((stats.count, stats.mean.tolist(), stats.min.tolist(), stats.max.tolist())).encode()


@pytest.mark.parametrize(
    ("threads", "max_memory"),
    [(2, 1 << 30), (3, 1 << 30), (2, 96 * 1024)],  # the last: tensors split into memory groups
)
def test_threaded_updates_give_the_same_bytes(cnn, monkeypatch, threads, max_memory):
    monkeypatch.setattr(collector, "PARALLEL_MIN_BYTES", 0)
    ds = dataset(cnn, {"x": models.structured_images(40, seed=3)})
    requests = _requests(cnn)
    seen: list[tuple[int, bool]] = []
    real_init = collector._Feeder.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append((len(self.parts), self.overlap))

    monkeypatch.setattr(collector._Feeder, "__init__", spy)
    options = CollectOptions(batch_size=6, max_memory=max_memory, overlap_updates=True, update_threads=1)
    one = collect([cnn], ds, requests, options)
    many = collect([cnn], ds, requests, replace(options, update_threads=threads))
    assert all(s == (1, False) for s in seen[: len(seen) // 2]) and any(p > 1 for p, _ in seen[len(seen) // 2 :])
    assert any(overlap for _, overlap in seen[len(seen) // 2 :])  # two batches of a group fit the budget
    assert one.passes == many.passes
    for request in requests:
        assert _state(one[request]) == _state(many[request]), request


@dataclass(frozen=True)
class FailingRequest:
    """A request whose observer fails on its third batch."""

    tensor: str

    def outputs(self) -> tuple[tuple[int, str], ...]:
        return ((collector.REFERENCE, self.tensor),)

    def observer(self) -> FailingObserver:
        return FailingObserver()


class FailingObserver:
    def __init__(self) -> None:
        self.batches = 0

    def update(self, values: Sequence[np.ndarray]) -> None:
        self.batches += 1
        if self.batches == 3:
            raise ArithmeticError("third batch")


def test_an_error_in_a_worker_reaches_the_caller(cnn, monkeypatch):
    monkeypatch.setattr(collector, "PARALLEL_MIN_BYTES", 0)
    ds = dataset(cnn, {"x": models.structured_images(40, seed=3)})
    requests = [*_requests(cnn), FailingRequest(cnn.graph.node[0].output[0])]
    with pytest.raises(ArithmeticError, match="third batch"):
        options = CollectOptions(batch_size=4, max_memory=1 << 30, update_threads=2, overlap_updates=True)
        collect([cnn], ds, requests, options)
