"""Streaming statistics with small fixed state, fed one batch at a time and never keeping raw data.

NaN values are left out one by one (not whole batches) by the range observers (min/max, moving
average, histograms), which count them (``MinMaxObserver.nans``): a tensor's range and histogram
do not depend on how the samples were batched, and calibration can say which tensors took NaN.

* ``MinMaxObserver``: running min and max, O(1).
* ``MovingAverageMinMaxObserver``: exponential moving average of per-batch min and max, O(1)
  (depends on batching by design; the other observers do not).
* ``GrowingHistogram``: counts over [-R, R] where R is the smallest power of two that covers every
  |x| seen so far, O(bins). When a batch exceeds R, R doubles (as often as needed) and each pair of
  bins merges into one: the edges of the wider grid are edges of the narrower one, so merging loses
  nothing and keeps no raw data. The final grid depends only on the largest |x| of the whole data,
  not on the order or batching, so the chosen clip ranges do not depend on the batch size; and one
  pass over the data suffices. ``result()`` gives a ``HistogramObserver``.
* ``HistogramObserver``: counts over a fixed range [lo, hi], O(bins) (also what the sidecar stores).

Composite observers fed by the statistics collector (``quantcli.stats.collector``), one per request,
each ``update``-d with the list of values its request reads:

* ``RangeStats``: min/max, and a moving average or a growing histogram when asked (calibration).
* ``ChannelObserver``: per-channel sum, min and max, O(channels); ``result()`` is a ``ChannelStats``.
* ``ErrorStats``: energy of a reference tensor and of a candidate's error, O(1), plus the first batch.

Clip-range choice from a histogram (``choose_range``):

* percentile: the values at ``100 - p`` and ``p`` percent of the cumulative counts.
* entropy: TensorRT's search. On the histogram of |x| (re-binned to at most 1,024 bins, exact
  zeros left out), for each of about 128 candidate thresholds t, fold the counts above t into the
  last bin, merge the kept bins into ``levels // 2`` quantized levels, expand back, and keep the t
  with the smallest KL(P || Q).
* mse: for clip ranges [min*a, max*a], a in (0, 1], the expected squared error of quantizing with
  ``levels`` levels: clipping error of the values outside plus scale^2 / 12 for those inside.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from quantcli.core.errors import CalibrationDataError
from quantcli.core.options import DEFAULT_PERCENTILE

__all__ = [
    "HISTOGRAM_CHUNK",
    "HISTOGRAM_METHODS",
    "MINMAX_CHUNK",
    "ChannelObserver",
    "ChannelStats",
    "ErrorStats",
    "GrowingHistogram",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "RangeStats",
    "choose_range",
    "without_nan",
]


@dataclass(slots=True)
class MinMaxObserver:
    """Exact running minimum and maximum."""

    min: float = float("inf")
    max: float = float("-inf")
    count: int = 0  # values folded in (NaN values are not)
    last: tuple[float, float] = (0.0, 0.0)  # (min, max) of the latest batch with a value that is not NaN
    nans: int = 0  # NaN values seen and left out

    def update(self, array: np.ndarray) -> None:
        """Fold one batch in (its NaN values left out, and counted)."""
        self.observe(array)

    def observe(self, array: np.ndarray) -> np.ndarray:
        """Fold one batch in, as ``update``; the batch's values without NaN (``array`` when it has none)."""
        if array.size == 0:
            return array
        lo, hi = float(np.min(array)), float(np.max(array))
        if math.isnan(lo) or math.isnan(hi):  # numpy's min/max are NaN when the batch holds one
            array, nans = without_nan(array)
            self.nans += nans
            if not array.size:
                return array
            lo, hi = float(np.min(array)), float(np.max(array))
        self.fold(lo, hi, int(array.size))
        return array

    def fold(self, lo: float, hi: float, size: int, nans: int = 0) -> None:
        """Fold in a batch of ``size`` values known by their min and max, and ``nans`` NaN values left out.

        A zero bound is recorded as +0.0: which of -0.0 and +0.0 a min or max returns depends on the
        order the values are compared in (numpy's SIMD lanes, onnxruntime's ReduceMin, the batching),
        and the sign of a zero bound changes no range. A NaN bound (a caller that did not leave its
        NaN values out) leaves the running range as it was (Python's ``min(x, nan)`` is x).
        """
        self.nans += nans
        if size == 0:
            return
        self.last = (lo + 0.0, hi + 0.0)  # -0.0 + 0.0 == +0.0; other values, NaN included, unchanged
        self.min = min(self.min, self.last[0])
        self.max = max(self.max, self.last[1])
        self.count += size

    def result(self) -> tuple[float, float]:
        """(min, max); (0, 0) if nothing was seen."""
        return (self.min, self.max) if self.count else (0.0, 0.0)

    def merge(self, other: MinMaxObserver) -> None:
        """Fold in another observer's state (as if its batches had been seen here; ``last`` is kept)."""
        self.nans += other.nans
        if other.count:
            self.min = min(self.min, other.min)
            self.max = max(self.max, other.max)
            self.count += other.count


def without_nan(array: np.ndarray) -> tuple[np.ndarray, int]:
    """The values of ``array`` that are not NaN (flattened), and how many were."""
    keep = ~np.isnan(array)
    kept = array[keep]
    return kept, int(array.size - kept.size)


@dataclass(slots=True)
class MovingAverageMinMaxObserver:
    """Exponential moving average of each batch's min and max."""

    momentum: float = 0.9
    min: float | None = None
    max: float | None = None

    def update(self, array: np.ndarray) -> None:
        """Fold one batch in."""
        if array.size == 0:
            return
        bmin, bmax = float(np.min(array)), float(np.max(array))
        if self.min is None or self.max is None:
            self.min, self.max = bmin, bmax
        else:
            self.min = self.momentum * self.min + (1 - self.momentum) * bmin
            self.max = self.momentum * self.max + (1 - self.momentum) * bmax

    def result(self) -> tuple[float, float]:
        """(min, max); (0, 0) if nothing was seen."""
        return (self.min or 0.0, self.max or 0.0)


HISTOGRAM_METHODS = ("percentile", "entropy", "mse")


@dataclass(slots=True)
class HistogramObserver:
    """Counts of values in ``bins`` equal bins over the fixed range [lo, hi]."""

    lo: float
    hi: float
    bins: int = 2048
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.bins, dtype=np.int64)

    @property
    def edges(self) -> np.ndarray:
        """Bin edges (float64, ``bins + 1`` values)."""
        hi = self.hi if self.hi > self.lo else self.lo + 1.0
        return np.linspace(self.lo, hi, self.bins + 1)

    def update(self, array: np.ndarray) -> None:
        """Fold one batch in; values outside [lo, hi] land in the end bins."""
        if array.size == 0:
            return
        hi = self.hi if self.hi > self.lo else self.lo + 1.0
        # float32 arithmetic in place: one temporary the size of the batch, no float64 copy. Each
        # value's bin depends on that value alone, so counts do not depend on the batching.
        pos = np.subtract(array.ravel(), np.float32(self.lo), dtype=np.float32)
        pos *= np.float32(self.bins / (hi - self.lo))
        np.clip(pos, 0, self.bins - 1, out=pos)  # outside [lo, hi]: the end bins; truncation = floor
        self.counts += np.bincount(pos.astype(np.intp), minlength=self.bins)


_MANTISSA_ONE = 1 << 23  # float32 values in [2**23, 2**24) are the integers, one per mantissa step
_MANTISSA_ONE_BITS = 0x4B000000  # bit pattern of float32(2**23)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(slots=True)
class GrowingHistogram:
    """Counts over [-R, R], R a power of two that grows with the data (see the module docstring)."""

    bins: int = 4096
    counts: np.ndarray = field(init=False)
    exponent: int | None = None  # R = 2 ** exponent once a non-zero value has been seen
    zeros: int = 0  # exact zeros seen before any non-zero value
    finite: bool = True

    def __post_init__(self) -> None:
        if self.bins % 2 or not 2 <= self.bins <= 1 << 22:
            raise ValueError("GrowingHistogram needs an even number of bins, at most 2**22")
        self.counts = np.zeros(self.bins, dtype=np.int64)

    def _grow(self, exponent: int) -> None:
        assert self.exponent is not None
        factor_log2 = exponent - self.exponent
        half = self.bins // 2
        if factor_log2 >= half.bit_length() + 1:  # everything lands next to zero
            merged = np.zeros_like(self.counts)
            merged[half - 1] = self.counts[:half].sum()
            merged[half] = self.counts[half:].sum()
        else:
            f = 1 << factor_log2
            idx = (np.arange(self.bins, dtype=np.int64) + half * (f - 1)) // f
            merged = np.bincount(idx, weights=self.counts, minlength=self.bins).astype(np.int64)
        self.counts = merged
        self.exponent = exponent

    def update(self, array: np.ndarray, amax: float | None = None) -> None:
        """Fold one batch in, NaN values left out. ``amax`` (max |x| of the batch, which then holds no
        NaN) saves a pass when already known."""
        if array.size == 0 or not self.finite:
            return
        if amax is None:
            amax = float(max(abs(float(array.min())), abs(float(array.max()))))
            if math.isnan(amax):
                array = without_nan(array)[0]
                if not array.size:
                    return
                amax = float(max(abs(float(array.min())), abs(float(array.max()))))
        if not np.isfinite(amax):
            self.finite = False  # calibration reports the non-finite range; nothing to histogram
            return
        if amax == 0.0:
            if self.exponent is None:
                self.zeros += int(array.size)
            else:
                self.counts[self.bins // 2] += int(array.size)
            return
        needed = math.frexp(amax)[1]  # amax < 2 ** needed
        if self.exponent is None:
            self.exponent = needed
            self.counts[self.bins // 2] += self.zeros
            self.zeros = 0
        elif needed > self.exponent:
            self._grow(needed)
        half = self.bins // 2
        scale = math.ldexp(half, -self.exponent)
        if scale > _FLOAT32_MAX:  # every |x| below about 2**-116: the scale overflows float32
            index64 = np.floor(array.ravel().astype(np.float64) * scale).astype(np.intp) + half
            self.counts += np.bincount(index64, minlength=self.bins)
            return
        # x * (half / R) and its floor are exact (a power-of-two scale), so a value's bin on a
        # coarser grid is exactly its bin here merged: counts do not depend on when R grew.
        # |x| < R, so the floor lies in [-half, half - 1] without clipping. Adding 2**23 + half
        # (exact below 2**24) leaves the bin index in the low mantissa bits of the float32, read
        # through an int32 view: no float-to-int conversion pass (about 30% faster than astype).
        pos = np.multiply(array.ravel(), np.float32(scale), dtype=np.float32)
        np.floor(pos, out=pos)
        pos += np.float32(_MANTISSA_ONE + half)
        index = pos.view(np.int32)
        index -= _MANTISSA_ONE_BITS
        self.counts += np.bincount(index, minlength=self.bins)

    def merge(self, other: GrowingHistogram) -> None:
        """Fold in another histogram's counts, as if its values had been seen here.

        Both grids are brought to the larger R by merging bins (exact, as in ``update``), then the
        counts add: the result does not depend on the order of merges, and equals the histogram of
        one pass over both sets of values.

        Raises:
            ValueError: the histograms have different numbers of bins.
        """
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {other.bins} and {self.bins} bins")
        self.finite = self.finite and other.finite
        if not self.finite:
            return
        if other.exponent is None:
            if self.exponent is None:
                self.zeros += other.zeros
            else:
                self.counts[self.bins // 2] += other.zeros
            return
        counts = other.counts.copy()
        if self.exponent is None:
            self.counts, self.exponent = counts, other.exponent
            self.counts[self.bins // 2] += self.zeros
            self.zeros = 0
            return
        if other.exponent > self.exponent:
            self._grow(other.exponent)
        elif other.exponent < self.exponent:
            wider = GrowingHistogram(self.bins)
            wider.counts, wider.exponent = counts, other.exponent
            wider._grow(self.exponent)
            counts = wider.counts
        self.counts += counts

    def result(self) -> HistogramObserver:
        """The counts as a fixed-range histogram over [-R, R]."""
        r = math.ldexp(1.0, self.exponent) if self.exponent is not None else 1.0
        hist = HistogramObserver(-r, r, bins=self.bins)
        hist.counts = self.counts.copy()
        if self.exponent is None:
            hist.counts[self.bins // 2] += self.zeros
        return hist


def _trimmed(hist: HistogramObserver) -> HistogramObserver:
    """The same counts without the empty bins at either end (a no-op for a min/max-fitted grid)."""
    nonzero = np.flatnonzero(hist.counts)
    if nonzero.size == 0 or (nonzero[0] == 0 and nonzero[-1] == hist.bins - 1):
        return hist
    first, last = int(nonzero[0]), int(nonzero[-1])
    edges = hist.edges
    out = HistogramObserver(float(edges[first]), float(edges[last + 1]), bins=last - first + 1)
    out.counts = hist.counts[first : last + 1].copy()
    return out


def choose_range(
    hist: HistogramObserver, method: str, *, percentile: float = DEFAULT_PERCENTILE, levels: int = 256
) -> tuple[float, float]:
    """Clip range [lo, hi] chosen from a histogram by ``method`` (percentile, entropy or mse)."""
    hist = _trimmed(hist)
    total = int(hist.counts.sum())
    if total == 0 or hist.hi <= hist.lo:
        return hist.lo, hist.hi
    if method == "percentile":
        return _percentile_range(hist, percentile)
    if method == "entropy":
        return _entropy_range(hist, levels)
    if method == "mse":
        return _mse_range(hist, levels)
    raise ValueError(f"unknown histogram method {method!r}")


def _percentile_range(hist: HistogramObserver, percentile: float) -> tuple[float, float]:
    edges = hist.edges
    cdf = np.cumsum(hist.counts) / hist.counts.sum()
    upper_q = percentile / 100.0
    lower_q = 1.0 - upper_q
    hi_idx = int(np.searchsorted(cdf, upper_q, side="left"))
    lo_idx = int(np.searchsorted(cdf, lower_q, side="left"))
    lo = float(edges[lo_idx]) if hist.lo < 0 else hist.lo
    hi = float(edges[min(hi_idx + 1, hist.bins)])
    return max(lo, hist.lo), min(hi, hist.hi)


def _abs_histogram(hist: HistogramObserver, bins: int) -> tuple[np.ndarray, float]:
    """Re-bin counts by |x| into ``bins`` bins over [0, max|x|] (bin centres decide)."""
    edges = hist.edges
    centres = np.abs((edges[:-1] + edges[1:]) / 2)
    amax = max(abs(hist.lo), abs(hist.hi))
    idx = np.clip((centres / amax * bins).astype(np.int64), 0, bins - 1)
    return np.bincount(idx, weights=hist.counts, minlength=bins), amax


def _entropy_range(hist: HistogramObserver, levels: int) -> tuple[float, float]:
    nbins = min(hist.bins, 1024)
    counts, amax = _abs_histogram(hist, nbins)
    # the spike of exact zeros (half of every post-ReLU tensor) is represented exactly by any grid;
    # left in, it dominates the distribution and drives the search to absurdly small thresholds
    counts[0] = 0
    target = max(levels // 2, 2)
    candidates = np.arange(target, nbins + 1, max(1, nbins // 128))
    kl = kl_divergences(counts, candidates, target)
    best_i = int(candidates[int(np.argmin(kl))]) if np.isfinite(kl).any() else nbins
    threshold = best_i / nbins * amax
    return float(max(hist.lo, -threshold)), float(min(hist.hi, threshold))


def kl_divergences(counts: np.ndarray, candidates: np.ndarray, target: int) -> np.ndarray:
    """KL(P || Q) for each candidate threshold (a number of kept bins), all at once.

    For threshold i: P is the first i bins with everything above folded into bin i - 1; Q merges
    the first i bins into ``target`` groups (edges ``floor(j * i / target)``) and spreads each
    group's count evenly over its non-empty bins. Since Q is constant on a group's non-empty bins,
    sum(p log q) is a sum over groups, and prefix sums make every candidate O(target):

        KL = [L(i-1) - C(i-1) log T] / T - sum_g G_g log(q_g) / T + p_last log(p_last / q_last)

    with T the total count, C and L prefix sums of c and c log c, G_g the count of group g without
    the last bin, q_g its normalised per-bin mass. ``inf`` where the divergence is undefined.
    """
    c = np.asarray(counts, dtype=np.float64)
    total = float(c.sum())
    if total == 0:
        return np.full(len(candidates), np.inf)
    clogc = np.where(c > 0, c * np.log(np.where(c > 0, c, 1.0)), 0.0)
    csum = np.concatenate([[0.0], np.cumsum(c)])
    lsum = np.concatenate([[0.0], np.cumsum(clogc)])
    nzsum = np.concatenate([[0.0], np.cumsum(c > 0)])
    cand = np.asarray(candidates, dtype=np.int64)
    edges = (np.arange(target + 1, dtype=np.int64)[None, :] * cand[:, None]) // target  # [K, target + 1]
    sums = csum[edges[:, 1:]] - csum[edges[:, :-1]]
    nonzero = nzsum[edges[:, 1:]] - nzsum[edges[:, :-1]]
    qsum = csum[cand]
    per_bin = np.divide(sums, nonzero, out=np.zeros_like(sums), where=nonzero > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.where(per_bin > 0, np.log(np.where(per_bin > 0, per_bin, 1.0) / qsum[:, None]), 0.0)
    last = c[cand - 1]
    kept = sums.copy()
    kept[:, -1] -= last  # the last bin is scored separately (its P carries the folded tail)
    inner = (lsum[cand - 1] - csum[cand - 1] * np.log(total)) / total - np.sum(kept * log_q, axis=1) / total
    p_last = (last + (total - csum[cand])) / total
    q_last = np.where(last > 0, per_bin[:, -1] / np.where(qsum > 0, qsum, 1.0), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(p_last > 0, p_last * np.log(p_last / q_last), 0.0)
    kl = inner + tail
    kl[(qsum <= 0)] = np.inf
    return kl


def _mse_range(hist: HistogramObserver, levels: int) -> tuple[float, float]:
    edges = hist.edges
    centres = (edges[:-1] + edges[1:]) / 2
    weights = hist.counts.astype(np.float64)
    lo0, hi0 = min(hist.lo, 0.0), max(hist.hi, 0.0)
    best_err, best = np.inf, (hist.lo, hist.hi)
    for alpha in np.linspace(0.05, 1.0, 96):
        lo, hi = lo0 * alpha, hi0 * alpha
        scale = (hi - lo) / (levels - 1)
        if scale <= 0:
            continue
        clipped = np.clip(centres, lo, hi)
        clip_err = (centres - clipped) ** 2
        inside = clip_err == 0
        err = float(np.sum(weights * np.where(inside, scale**2 / 12.0, clip_err)))
        if err < best_err:
            best_err, best = err, (float(max(lo, hist.lo)), float(min(hi, hist.hi)))
    return best


#: values of small batches a histogram-keeping ``RangeStats`` holds before folding them in at once
HISTOGRAM_CHUNK = 1 << 14
#: the same for min/max alone, whose folding costs less a value (Silero VAD min-max, 256 samples,
#: 15 interleaved runs: 4K values 0.073 s CPU and 100 MB peak RSS, 16K 0.071 s and 102 MB)
MINMAX_CHUNK = 1 << 12


@dataclass(slots=True)
class RangeStats:
    """Observers of one tensor's range: exact min/max, and optionally moving average and histogram.

    With ``chunk`` (and no moving average), batches of fewer than ``chunk`` values are held until
    ``chunk`` values are pending, then folded in together (``finish``): a model run one small sample
    at a time (Silero VAD: ~25 tensors of 1-1,300 values a run) pays one histogram update (or one
    min/max pass) per chunk, not per batch. The state is the same bytes as updating batch by batch:
    each batch's min and max are still taken on their own (``np.minimum.reduceat``, numpy's ``min``
    per batch), and the pending batches are handed to the histogram in runs that share the grid they
    would have met one by one (a batch that would widen the grid starts a new run), so every value
    lands in the same bin and the grid grows at the same points. ``finish`` must run before the state is read (the
    collector calls it after its pass; ``merge`` calls it).
    """

    minmax: MinMaxObserver = field(default_factory=MinMaxObserver)
    moving: MovingAverageMinMaxObserver | None = None
    histogram: GrowingHistogram | None = None
    chunk: int = 0
    pending: list[np.ndarray] = field(default_factory=list)
    pending_size: int = 0

    def merge(self, other: RangeStats) -> None:
        """Fold in another observer's state (min/max and histogram; a moving average cannot merge).

        Raises:
            ValueError: either side has a moving average (it depends on the order of batches), or
                one has a histogram and the other not.
        """
        if self.moving is not None or other.moving is not None:
            raise ValueError("a moving average depends on the order of batches and cannot be merged")
        if (self.histogram is None) != (other.histogram is None):
            raise ValueError("cannot merge range statistics with and without a histogram")
        self.finish()
        other.finish()
        self.minmax.merge(other.minmax)
        if self.histogram is not None and other.histogram is not None:
            self.histogram.merge(other.histogram)

    def update(self, values: Sequence[np.ndarray]) -> None:
        """Fold one batch in (the histogram reuses the batch min/max as its |x| bound)."""
        value = values[0]
        if self.chunk and self.moving is None and 0 < value.size < self.chunk:
            self.pending.append(value)
            self.pending_size += int(value.size)
            if self.pending_size >= self.chunk:
                self.finish()
            return
        self.finish()
        value = self.minmax.observe(value)  # NaN values left out
        if not value.size:
            return
        if self.moving is not None:
            self.moving.update(value)
        if self.histogram is not None:
            lo, hi = self.minmax.last
            self.histogram.update(value, max(abs(lo), abs(hi)))

    def update_batches(self, batches: Sequence[np.ndarray]) -> None:
        """Fold several batches in, in order, as ``update([batch])`` one by one would (the same bytes).

        When every batch is below ``chunk`` they are held together, and folded in at once once
        ``chunk`` values are pending: one update of the observers for many batches, where a batch at a
        time would pay a Python call each (a gathered hand-off, ``quantcli.stats.collector``).
        """
        kept = [b for b in batches if b.size]  # an empty batch adds nothing (``update`` would only flush)
        if not self.chunk or self.moving is not None or any(b.size >= self.chunk for b in kept):
            for batch in batches:
                self.update([batch])
            return
        self.pending.extend(kept)
        self.pending_size += sum(int(b.size) for b in kept)
        if self.pending_size >= self.chunk:
            self.finish()

    def finish(self) -> None:
        """Fold the pending small batches in (see the class docstring)."""
        if not self.pending:
            return
        batches, self.pending, self.pending_size = self.pending, [], 0
        flat = np.concatenate([b.ravel() for b in batches])
        sizes = np.array([b.size for b in batches], dtype=np.int64)
        starts = np.cumsum(sizes) - sizes
        lows, highs = np.minimum.reduceat(flat, starts), np.maximum.reduceat(flat, starts)
        if np.isnan(lows).any() or np.isnan(highs).any():  # rare: leave the NaN values out, batch by batch
            kept = [without_nan(b) for b in batches]
            self.minmax.nans += sum(n for _, n in kept)
            batches = [b for b, _ in kept if b.size]
            if not batches:
                return
            flat = np.concatenate(batches)
            sizes = np.array([b.size for b in batches], dtype=np.int64)
            starts = np.cumsum(sizes) - sizes
            lows, highs = np.minimum.reduceat(flat, starts), np.maximum.reduceat(flat, starts)
        # as folding the batches one by one: a zero bound as +0.0, min/max of the batches' bounds
        # (their order does not matter: no NaN among them), the latest batch's bounds kept
        lows += 0.0
        highs += 0.0
        lo, hi = float(lows.min()), float(highs.max())
        self.minmax.fold(lo, hi, int(sizes.sum()))
        self.minmax.last = (float(lows[-1]), float(highs[-1]))
        if self.histogram is not None:
            bounds = np.maximum(np.abs(lows), np.abs(highs)).astype(np.float64)
            _histogram_runs(self.histogram, flat, np.append(starts, flat.size), bounds)


def _histogram_runs(hist: GrowingHistogram, flat: np.ndarray, offsets: np.ndarray, bounds: np.ndarray) -> None:
    """Update ``hist`` with batches (``flat[offsets[k]:offsets[k + 1]]``, |x| bounds ``bounds``) in runs
    that meet the same grid as one by one.

    One by one, batch k is binned on exponent E_k = max(E_{k-1}, its own), zeros aside; a run
    gathers consecutive batches with the same E_k, so its one update bins every value on that grid
    (the run's values are a slice of ``flat``: no copy). A non-finite bound ends the histogram
    (``GrowingHistogram.update``) after the runs before it.
    """
    infinite = np.flatnonzero(~np.isfinite(bounds))
    end = int(infinite[0]) if infinite.size else len(bounds)
    if end:
        none = -(1 << 20)  # the exponent before any non-zero value (below any float64 exponent)
        own = np.where(bounds[:end] != 0.0, np.frexp(bounds[:end])[1].astype(np.int64), none)
        start = none if hist.exponent is None else hist.exponent
        running = np.maximum.accumulate(np.concatenate([[start], own]))[1:]  # E_k
        cuts = [0, *(np.flatnonzero(np.diff(running)) + 1).tolist(), end]
        for a, b in itertools.pairwise(cuts):
            hist.update(flat[offsets[a] : offsets[b]], float(bounds[a:b].max()))
    if infinite.size:
        hist.update(flat[offsets[end] : offsets[end + 1]], float(bounds[end]))


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """Mean, abs-max, min and max of one tensor per channel along ``axis`` (negative: from the end)."""

    axis: int
    mean: npt.NDArray[np.float64]
    absmax: npt.NDArray[np.float64]
    count: int
    min: npt.NDArray[np.float64] | None = None
    max: npt.NDArray[np.float64] | None = None


class ChannelObserver:
    """Running sum, min, max and element count per channel."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.total: npt.NDArray[np.float64] | None = None
        self.low: npt.NDArray[np.float64] | None = None
        self.high: npt.NDArray[np.float64] | None = None
        self.count = 0

    def finish(self) -> None:
        """Nothing is held back."""

    def update(self, values: Sequence[np.ndarray]) -> None:
        moved = np.moveaxis(np.asarray(values[0]), self.axis, 0)
        flat = moved.reshape(moved.shape[0], -1)
        if not flat.shape[1]:
            return
        total = flat.sum(axis=1, dtype=np.float64)
        low, high = flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)
        if self.total is None or self.low is None or self.high is None:
            self.total, self.low, self.high = total, low, high
        elif self.total.shape != total.shape:
            raise CalibrationDataError(f"channel count changed between batches ({self.total.shape} vs {total.shape})")
        else:
            self.total += total
            np.minimum(self.low, low, out=self.low)
            np.maximum(self.high, high, out=self.high)
        self.count += flat.shape[1]

    def result(self) -> ChannelStats | None:
        """The statistics; None if no element was seen."""
        if self.total is None or self.low is None or self.high is None:
            return None
        absmax = np.maximum(np.abs(self.low), np.abs(self.high))
        return ChannelStats(self.axis, self.total / max(self.count, 1), absmax, self.count, self.low, self.high)


@dataclass(slots=True)
class ErrorStats:
    """Energy of the reference values and of the candidate's error, the reference's min and max, and
    the first batch of reference values (for hints and histograms)."""

    keep_first_empty: bool = True
    signal: float = 0.0
    noise: float = 0.0
    lo: float = float("inf")
    hi: float = float("-inf")
    first: np.ndarray | None = None
    batches: int = 0

    def finish(self) -> None:
        """Nothing is held back."""

    def update(self, values: Sequence[np.ndarray]) -> None:
        """Fold one batch in; a batch whose shapes differ (a branch that did not run) adds nothing."""
        ref, cand = values
        self.batches += 1
        if self.batches == 1 and self.keep_first_empty:
            self.first = ref
        if ref.size == 0 or ref.shape != cand.shape:
            return
        if self.first is None:
            self.first = ref
        r = ref.astype(np.float64)
        e = r - cand.astype(np.float64)
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum(e * e))
        self.lo = min(self.lo, float(r.min()))
        self.hi = max(self.hi, float(r.max()))
