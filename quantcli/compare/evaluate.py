"""Run the FP32 and the quantized model on the same data and measure how far apart they are and
how fast each runs.

Metrics per output (over all samples):

* SQNR (dB) = 10 log10( sum(ref^2) / sum((ref - q)^2) )
* cosine similarity per sample, averaged; MSE; max |ref - q|
* top-1 agreement: share of samples whose argmax over the last axis is the same
* accuracy against labels, when the data has them and the output looks like class scores

Means over samples carry a 95% confidence interval (normal approximation; Wilson interval for
proportions), so a drop can be told from noise.

Latency: both sessions are timed in alternation on the same feed (warm-up first), so that machine
noise hits both; the speed-up is the median of the paired ratios, with its interquartile range.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from quantcli.compare.exact_sum import ordered_sum
from quantcli.core.errors import CalibrationDataError
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import Dataset

__all__ = [
    "Interval",
    "LatencyComparison",
    "LatencyStats",
    "OutputAccumulator",
    "OutputMetrics",
    "accumulate_outputs",
    "compare_outputs",
    "measure_latency",
    "ordered_sum",
    "sample_energies",
    "wilson_interval",
]


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate with a 95% confidence interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class OutputMetrics:
    """How the quantized model's output ``name`` differs from the FP32 one."""

    name: str
    num_samples: int
    sqnr_db: float
    cosine: Interval
    mse: float
    max_abs_error: float
    top1_agreement: Interval | None
    accuracy_fp32: Interval | None
    accuracy_quant: Interval | None


def _mean_interval(values: np.ndarray) -> Interval:
    n = values.size
    mean = float(values.mean()) if n else float("nan")
    half = 1.96 * float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return Interval(mean, mean - half, mean + half)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> Interval:
    """The share ``successes / n`` with Wilson's score interval (``z`` = 1.96: 95% two-sided; 1.645 puts
    95% on one side); NaN without samples."""
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def sample_energies(ref: np.ndarray, other: np.ndarray | None = None) -> list[float]:
    """Each sample's energy (samples on axis 0) of ``ref``, or of ``ref - other``, in float64: the same
    values whatever batch the samples came in, so ``math.fsum`` of them does not depend on the batching."""
    r64 = ref.astype(np.float64)
    diff = r64 if other is None else r64 - other
    if diff.ndim == 0:
        return [float(diff * diff)]
    return [float(np.sum(d * d)) for d in diff]


@dataclass(slots=True)
class OutputAccumulator:
    """One output's running error statistics over batches, mergeable across shards of the data.

    Float energies are kept per batch (``signals``, ``noises``) and added in batch order only when
    the result is read, and cosines per sample; so shards over contiguous blocks of batches, merged
    in order (``merge``), give exactly the one-process result.
    """

    name: str
    signals: list[float] = field(default_factory=list)
    noises: list[float] = field(default_factory=list)
    count: int = 0
    elements: int = 0
    max_abs: float = 0.0
    cosines: list[np.ndarray] = field(default_factory=list)
    agree: int = 0
    classifier: bool = True
    correct_ref: int = 0
    correct_q: int = 0
    labelled: int = 0
    topk: int = 1

    def update(self, ref: np.ndarray, q: np.ndarray, labels: np.ndarray | None) -> None:
        """Fold in one batch of both models' values of this output (``labels`` for its samples)."""
        ref64, q64 = ref.astype(np.float64), q.astype(np.float64)
        err = ref64 - q64
        self.signals.append(float(np.sum(ref64 * ref64)))
        self.noises.append(float(np.sum(err * err)))
        self.elements += int(err.size)
        self.max_abs = max(self.max_abs, float(np.max(np.abs(err))) if err.size else 0.0)
        n = ref.shape[0] if ref.ndim else 1
        self.count += n
        flat_r = ref64.reshape(n, -1)
        flat_q = q64.reshape(n, -1)
        norms = np.linalg.norm(flat_r, axis=1) * np.linalg.norm(flat_q, axis=1)
        cos = np.where(norms > 0, np.sum(flat_r * flat_q, axis=1) / np.where(norms > 0, norms, 1), 1.0)
        self.cosines.append(cos)
        self.classifier = self.classifier and ref.ndim == 2 and ref.shape[-1] > 1
        if self.classifier:
            top_r, top_q = ref.argmax(-1), q.argmax(-1)
            self.agree += int(np.sum(top_r == top_q))
            if self.topk > 0 and labels is not None and labels.ndim == 1 and labels.shape[0] == n:
                k = min(self.topk, ref.shape[-1])
                best_r = np.argpartition(-ref, k - 1, axis=-1)[:, :k]
                best_q = np.argpartition(-q, k - 1, axis=-1)[:, :k]
                self.correct_ref += int(np.sum(np.any(best_r == labels[:, None], axis=1)))
                self.correct_q += int(np.sum(np.any(best_q == labels[:, None], axis=1)))
                self.labelled += n

    def merge(self, later: OutputAccumulator) -> None:
        """Append ``later``: the same output's statistics over the batches that follow these."""
        self.signals += later.signals
        self.noises += later.noises
        self.count += later.count
        self.elements += later.elements
        self.max_abs = max(self.max_abs, later.max_abs)
        self.cosines += later.cosines
        self.agree += later.agree
        self.classifier = self.classifier and later.classifier
        self.correct_ref += later.correct_ref
        self.correct_q += later.correct_q
        self.labelled += later.labelled

    def result(self) -> OutputMetrics:
        """The metrics over every batch folded in."""
        signal, noise = ordered_sum(self.signals), ordered_sum(self.noises)
        sqnr = 10 * math.log10(signal / noise) if noise > 0 else float("inf")
        cos = np.concatenate(self.cosines) if self.cosines else np.zeros(0)
        return OutputMetrics(
            name=self.name,
            num_samples=self.count,
            sqnr_db=sqnr,
            cosine=_mean_interval(cos),
            mse=noise / self.elements if self.elements else 0.0,
            max_abs_error=self.max_abs,
            top1_agreement=wilson_interval(self.agree, self.count) if self.classifier else None,
            accuracy_fp32=wilson_interval(self.correct_ref, self.labelled) if self.labelled else None,
            accuracy_quant=wilson_interval(self.correct_q, self.labelled) if self.labelled else None,
        )


def compare_outputs(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    topk: int = 1,
    collect: dict[str, list[list[np.ndarray]]] | None = None,
    progress: Progress = no_progress,
    observe: Callable[[list[str], list[np.ndarray], list[np.ndarray], int], None] | None = None,
) -> list[OutputMetrics]:
    """Metrics for every output of ``reference`` against the same output of ``candidate``.

    ``topk`` sets the accuracy metric against labels (0: none). When ``collect`` is given, every
    batch's outputs are appended to ``collect["reference"]`` and ``collect["candidate"]`` (for a
    custom metric that needs all outputs at once). ``observe(names, reference outputs, candidate
    outputs, samples)`` is called for every batch (``quantcli.compare.output_kinds``).
    """
    accs = accumulate_outputs(
        reference, candidate, dataset, batch_size=batch_size, topk=topk, collect=collect, progress=progress,
        observe=observe,
    )  # fmt: skip
    return [acc.result() for acc in accs if acc.count]


def accumulate_outputs(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    topk: int = 1,
    collect: dict[str, list[list[np.ndarray]]] | None = None,
    progress: Progress = no_progress,
    observe: Callable[[list[str], list[np.ndarray], list[np.ndarray], int], None] | None = None,
) -> list[OutputAccumulator]:
    """``compare_outputs`` before the metrics are read: one accumulator per output, in output order,
    to merge with those of the following shards (``dataset`` may be a ``Dataset.window``: its labels
    are read from the window's first sample on)."""
    names = [o.name for o in reference.get_outputs()]
    accs = {n: OutputAccumulator(n, topk=topk) for n in names}
    size = dataset.effective_batch_size(batch_size)
    total = -(-dataset.num_samples // size)
    offset = dataset.kept[0] if dataset.kept is not None else 0
    for feed in progress(dataset.batches(size), total, "comparing", size):
        try:
            ref_out = reference.run(names, feed)
            q_out = candidate.run(names, feed)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CalibrationDataError(f"{dataset.path}: onnxruntime failed on a batch: {first}") from exc
        n = dataset.batch_length(feed)
        labels = None if dataset.labels is None else dataset.labels[offset : offset + n]
        offset += n
        for name, r, q in zip(names, ref_out, q_out, strict=True):
            if r.dtype.kind == "f":
                accs[name].update(r, q, labels)
        if observe is not None:
            observe(names, ref_out, q_out, n)
        if collect is not None:
            collect.setdefault("reference", []).append(ref_out)
            collect.setdefault("candidate", []).append(q_out)
    return list(accs.values())


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Timing of one session at one batch size, in milliseconds."""

    runs: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # samples per second at the median

    @classmethod
    def from_times(cls, times_s: np.ndarray, batch_size: int) -> LatencyStats:
        """Summarize per-run wall times in seconds."""
        ms = times_s * 1000.0
        median = float(np.median(ms))
        return cls(
            runs=int(ms.size),
            median_ms=median,
            p90_ms=float(np.percentile(ms, 90)),
            p99_ms=float(np.percentile(ms, 99)),
            mean_ms=float(ms.mean()),
            throughput=batch_size / (median / 1000.0) if median > 0 else float("inf"),
        )


@dataclass(frozen=True, slots=True)
class LatencyComparison:
    """FP32 and quantized latency measured in alternation, and the speed-up with its spread."""

    batch_size: int
    threads: int
    reference: LatencyStats
    candidate: LatencyStats
    speedup: float
    speedup_p25: float
    speedup_p75: float
    reference_times_ms: tuple[float, ...] = ()
    candidate_times_ms: tuple[float, ...] = ()


def measure_latency(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession,
    feed: dict[str, np.ndarray],
    *,
    threads: int,
    warmup: int = 10,
    runs: int = 50,
    time_budget_s: float | None = None,
) -> LatencyComparison:
    """Time both sessions in alternation on ``feed``; stop after ``runs`` pairs or the time budget."""
    for _ in range(warmup):
        reference.run(None, feed)
        candidate.run(None, feed)
    ref_t: list[float] = []
    cand_t: list[float] = []
    start = time.perf_counter()
    for i in range(max(runs, 1)):
        first, second = (reference, candidate) if i % 2 == 0 else (candidate, reference)
        t0 = time.perf_counter()
        first.run(None, feed)
        t1 = time.perf_counter()
        second.run(None, feed)
        t2 = time.perf_counter()
        if first is reference:
            ref_t.append(t1 - t0)
            cand_t.append(t2 - t1)
        else:
            cand_t.append(t1 - t0)
            ref_t.append(t2 - t1)
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s and i >= 4:
            break
    ref_a, cand_a = np.array(ref_t), np.array(cand_t)
    ratios = ref_a / np.maximum(cand_a, 1e-12)
    batch = next(iter(feed.values())).shape[0]
    return LatencyComparison(
        batch_size=batch,
        threads=threads,
        reference=LatencyStats.from_times(ref_a, batch),
        candidate=LatencyStats.from_times(cand_a, batch),
        speedup=float(np.median(ratios)),
        speedup_p25=float(np.percentile(ratios, 25)),
        speedup_p75=float(np.percentile(ratios, 75)),
        reference_times_ms=tuple(float(t) * 1000 for t in ref_a),
        candidate_times_ms=tuple(float(t) * 1000 for t in cand_a),
    )


_MEMORY_PROBE = """
import json, sys
import numpy as np, onnxruntime as ort

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(key))

opts = ort.SessionOptions(); opts.intra_op_num_threads = int(sys.argv[3]); opts.log_severity_level = 3
with np.load(sys.argv[2]) as npz:
    feed = {k: npz[k] for k in npz.files}
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as fh:  # resets the peak (VmHWM) to the current RSS
    fh.write("5")
sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
for _ in range(3):
    sess.run(None, feed)
print(json.dumps({"peak_mb": (status("VmHWM:") - base) / 1024}))
"""


def session_peak_memory(model_path: str, feed: dict[str, np.ndarray], *, threads: int) -> float | None:
    """Peak memory (MiB) a session adds while loading ``model_path`` and running ``feed``, measured in a
    child process so that nothing else in this process is counted (Linux /proc). None if it cannot."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="quantcli-mem-") as tmp:
        feed_path = Path(tmp) / "feed.npz"
        np.savez(feed_path, allow_pickle=False, **feed)  # the probe loads it without pickle too
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _MEMORY_PROBE, model_path, str(feed_path), str(threads)],
                capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return None
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])
