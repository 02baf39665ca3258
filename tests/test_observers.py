"""Streaming observers: batching does not change results; each method clips where it should."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli.stats.observers import HistogramObserver, MinMaxObserver, choose_range


def test_minmax_k_batches_equal_one_batch(rng):
    data = rng.normal(size=(100, 7)).astype(np.float32)
    whole = MinMaxObserver()
    whole.update(data)
    parts = MinMaxObserver()
    for chunk in np.array_split(data, 9):
        parts.update(chunk)
    assert parts.result() == whole.result()


def test_histogram_counts_do_not_depend_on_batching(rng):
    data = rng.normal(size=5000).astype(np.float32)
    lo, hi = float(data.min()), float(data.max())
    whole = HistogramObserver(lo, hi, bins=256)
    whole.update(data)
    parts = HistogramObserver(lo, hi, bins=256)
    for chunk in np.array_split(data, 13):
        parts.update(chunk)
    np.testing.assert_array_equal(whole.counts, parts.counts)
    assert whole.counts.sum() == data.size


@pytest.fixture
def gaussian_with_outliers(rng):
    x = rng.normal(size=200_000).astype(np.float32)
    x[:6] = [40.0, -35.0, 55.0, 60.0, -45.0, 30.0]
    return x


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_methods_clip_outliers(gaussian_with_outliers, method):
    x = gaussian_with_outliers
    mm = MinMaxObserver()
    mm.update(x)
    lo, hi = mm.result()
    assert (lo, hi) == (-45.0, 60.0)  # min-max keeps the outliers
    hist = HistogramObserver(lo, hi, bins=2048)
    hist.update(x)
    clip_lo, clip_hi = choose_range(hist, method, percentile=99.99, levels=256)
    assert lo <= clip_lo < 0 < clip_hi <= hi
    assert clip_hi < hi and clip_lo > lo, f"{method} did not clip: {clip_lo}, {clip_hi}"


def test_percentile_covers_bulk_of_gaussian(gaussian_with_outliers):
    hist = HistogramObserver(-45.0, 60.0, bins=4096)
    hist.update(gaussian_with_outliers)
    lo, hi = choose_range(hist, "percentile", percentile=99.9)
    # the 99.9th percentile of N(0,1) is 3.09; allow one bin of width 105/4096
    assert 3.0 < hi < 3.25 and -3.25 < lo < -3.0


def test_growing_histogram_does_not_depend_on_batching_or_order():
    """Small values first, then ever larger ones: the grid grows several times while counting."""
    from quantcli.stats.observers import GrowingHistogram

    rng = np.random.default_rng(11)
    parts = [rng.normal(size=5000).astype(np.float32) * s for s in (0.01, 0.3, 7.0, 150.0)]
    parts.append(np.zeros(100, dtype=np.float32))
    whole = GrowingHistogram(bins=1024)
    whole.update(np.concatenate(parts))
    streamed = GrowingHistogram(bins=1024)
    for part in parts:  # grows from R = 2^-4-ish to 2^10
        streamed.update(part)
    reverse = GrowingHistogram(bins=1024)
    for part in reversed(parts):
        for chunk in np.array_split(part, 7):
            reverse.update(chunk)
    a, b, c = whole.result(), streamed.result(), reverse.result()
    assert a.lo == b.lo == c.lo and a.hi == b.hi == c.hi
    assert np.array_equal(a.counts, b.counts) and np.array_equal(a.counts, c.counts)
    assert a.counts.sum() == sum(p.size for p in parts)
    # the grid is the smallest power of two covering max |x|
    amax = max(float(np.abs(p).max()) for p in parts)
    assert a.hi >= amax > a.hi / 2
    # counts agree with numpy's histogram on the final grid
    ref, _ = np.histogram(np.concatenate(parts), bins=1024, range=(a.lo, a.hi))
    assert np.abs(ref - a.counts).sum() <= 2  # float32 rounding at bin edges only


def test_growing_histogram_zeros_before_any_value_land_at_zero():
    from quantcli.stats.observers import GrowingHistogram

    h = GrowingHistogram(bins=64)
    h.update(np.zeros(10, dtype=np.float32))
    h.update(np.array([0.5, -0.25], dtype=np.float32))
    r = h.result()
    assert (r.lo, r.hi) == (-1.0, 1.0)  # 0.5 < 2^0
    assert r.counts.sum() == 12 and r.counts[32] == 10  # the bin starting at 0
    assert r.counts[48] == 1 and r.counts[24] == 1  # 0.5 and -0.25 on a grid of width 1/32


def test_growing_histogram_bins_equal_floor_reference_on_edge_values():
    """Bin edges, -0.0, values just under R and tiny values: each lands in floor(x * half / R) + half."""
    from quantcli.stats.observers import GrowingHistogram

    rng = np.random.default_rng(5)
    bins, half = 256, 128
    r = 4.0  # max |x| below is 3.999..., so R = 2**2
    edges = np.arange(-half + 1, half, dtype=np.float64) * (r / half)  # every left edge above -R, exactly
    under_r = np.nextafter(np.float32(r), np.float32(0))
    x = np.concatenate([
        edges, [-0.0, 0.0, under_r, -under_r, 1e-30, -1e-30, np.float32(r / half) / 3],
        rng.uniform(-3.9, 3.9, size=5000),
    ]).astype(np.float32)  # fmt: skip
    h = GrowingHistogram(bins=bins)
    h.update(x)
    got = h.result()
    assert (got.lo, got.hi) == (-r, r)
    expected = np.bincount((np.floor(x.astype(np.float64) * (half / r)) + half).astype(np.int64), minlength=bins)
    assert np.array_equal(got.counts, expected)


def _loop_kl(counts: np.ndarray, candidates: np.ndarray, target: int) -> np.ndarray:
    """The TensorRT-style KL search written as the plain loop (the reference for the vectorised one)."""
    counts = counts.astype(np.float64)
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])
    out = []
    for i in candidates:
        src = counts[:i]
        ref = src.copy()
        ref[i - 1] += tail[i]
        starts = (np.arange(target) * i) // target
        sums = np.add.reduceat(src, starts)
        nonzero = np.add.reduceat((src > 0).astype(np.float64), starts)
        per_bin = np.divide(sums, nonzero, out=np.zeros_like(sums), where=nonzero > 0)
        group = np.repeat(np.arange(target), np.diff(np.append(starts, i)))
        q = np.where(src > 0, per_bin[group], 0.0)
        if ref.sum() == 0 or q.sum() == 0:
            out.append(np.inf)
            continue
        mask = ref > 0
        p = ref[mask] / ref.sum()
        qm = q[mask] / q.sum()
        out.append(float(np.sum(p * np.log(p / np.where(qm > 0, qm, 1e-12)))))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_kl_equals_the_loop(seed):
    from quantcli.stats.observers import kl_divergences

    rng = np.random.default_rng(seed)
    values = np.abs(np.concatenate([rng.normal(size=20000), rng.standard_t(2, size=500) * 3]))
    counts, _ = np.histogram(values, bins=1024, range=(0, values.max()))
    counts[rng.integers(0, 1024, size=100)] = 0  # empty bins inside the range
    counts[0] = 0
    candidates = np.arange(128, 1025, 8)
    fast = kl_divergences(counts, candidates, 128)
    slow = _loop_kl(counts, candidates, 128)
    assert np.array_equal(np.isinf(fast), np.isinf(slow))
    finite = np.isfinite(slow)
    np.testing.assert_allclose(fast[finite], slow[finite], rtol=1e-9, atol=1e-12)
    assert int(np.argmin(fast)) == int(np.argmin(slow))
