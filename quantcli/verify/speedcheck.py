"""An honest answer before writing: is the quantized model actually faster than FP32 at batch 1?

Both models run in alternation on the same batch-1 feed (``evaluate.measure_latency``), in several
rounds; the verdict uses the median over rounds of each round's median speed-up
``t_fp32 / t_quantized``. The model counts as faster when that median exceeds ``1 + margin``.

While the middle half of the rounds spans ``1 + margin`` (the answer is a coin toss), two more rounds
are added, up to ``MAX_ROUNDS``. An answer that must be *shown* faster (a search's model, written only
if faster) asks the lower quartile of the rounds to clear it too (``shown_faster``): PP-Layout's search
answer timed 1.00x at one thread on a quiet host, and one 5-round median had called it faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from quantcli.compare.evaluate import measure_latency
from quantcli.graph.session import make_session

__all__ = ["MAX_ROUNDS", "SpeedCheck", "check_speedup"]

#: rounds are added two at a time up to this many while their middle half spans the bar
MAX_ROUNDS = 9


@dataclass(frozen=True, slots=True)
class SpeedCheck:
    """Batch-1 latency of FP32 and quantized models, and whether the quantized one is faster."""

    fp32_ms: float
    quantized_ms: float
    speedup: float
    rounds: int
    margin: float
    #: the lower quartile of the rounds' speed-ups (None: not known, the median stands in)
    low: float | None = None

    @property
    def faster(self) -> bool:
        """True when the median speed-up clears ``1 + margin``."""
        return self.speedup > 1.0 + self.margin

    @property
    def shown_faster(self) -> bool:
        """True when the lower quartile of the rounds clears ``1 + margin`` too: faster in most rounds."""
        return self.faster and (self.low if self.low is not None else self.speedup) > 1.0 + self.margin

    def line(self) -> str:
        """One line for the report."""
        verdict = "faster" if self.faster else "NOT faster"
        return (
            f"batch-1 latency: FP32 {self.fp32_ms:.3f} ms, quantized {self.quantized_ms:.3f} ms "
            f"(x{self.speedup:.2f}, median of {self.rounds} interleaved rounds): {verdict}"
        )


def check_speedup(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feed: dict[str, np.ndarray],
    *,
    threads: int = 1,
    rounds: int = 5,
    runs: int = 30,
    warmup: int = 5,
    margin: float = 0.0,
) -> SpeedCheck:
    """Time ``candidate`` against ``reference`` on ``feed`` (batch 1), ``rounds`` times in alternation,
    and two more while the middle half of the rounds spans ``1 + margin`` (up to ``MAX_ROUNDS``)."""
    ref = make_session(reference, threads=threads, source="FP32 model")
    cand = make_session(candidate, threads=threads, source="quantized model")
    speedups: list[float] = []
    ref_ms: list[float] = []
    cand_ms: list[float] = []
    want = max(1, rounds)
    while len(speedups) < want:
        lat = measure_latency(ref, cand, feed, threads=threads, warmup=warmup, runs=runs)
        speedups.append(lat.speedup)
        ref_ms.append(lat.reference.median_ms)
        cand_ms.append(lat.candidate.median_ms)
        if len(speedups) == want and want < MAX_ROUNDS and _straddles(speedups, 1.0 + margin):
            want = min(MAX_ROUNDS, want + 2)
    return SpeedCheck(
        fp32_ms=float(np.median(ref_ms)),
        quantized_ms=float(np.median(cand_ms)),
        speedup=float(np.median(speedups)),
        rounds=len(speedups),
        margin=margin,
        low=float(np.percentile(speedups, 25)),
    )


def _straddles(speedups: list[float], bar: float) -> bool:
    """The middle half of the rounds lies on both sides of ``bar`` (more than one round)."""
    if len(speedups) < 2:
        return False
    low, high = np.percentile(speedups, [25, 75])
    return bool(low <= bar < high)
