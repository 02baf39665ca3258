"""An honest answer before writing: is the quantized model actually faster than FP32 at batch 1?

Both models run in alternation on the same batch-1 feed (``evaluate.measure_latency``), in several
rounds; the verdict uses the median over rounds of each round's median speed-up
``t_fp32 / t_quantized``. The model counts as faster when that median exceeds ``1 + margin``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from quantcli.compare.evaluate import measure_latency
from quantcli.graph.session import make_session

__all__ = ["SpeedCheck", "check_speedup"]


@dataclass(frozen=True, slots=True)
class SpeedCheck:
    """Batch-1 latency of FP32 and quantized models, and whether the quantized one is faster."""

    fp32_ms: float
    quantized_ms: float
    speedup: float
    rounds: int
    margin: float

    @property
    def faster(self) -> bool:
        """True when the median speed-up clears ``1 + margin``."""
        return self.speedup > 1.0 + self.margin

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
    """Time ``candidate`` against ``reference`` on ``feed`` (batch 1), ``rounds`` times in alternation."""
    ref = make_session(reference, threads=threads, source="FP32 model")
    cand = make_session(candidate, threads=threads, source="quantized model")
    speedups, ref_ms, cand_ms = [], [], []
    for _ in range(max(1, rounds)):
        lat = measure_latency(ref, cand, feed, threads=threads, warmup=warmup, runs=runs)
        speedups.append(lat.speedup)
        ref_ms.append(lat.reference.median_ms)
        cand_ms.append(lat.candidate.median_ms)
    return SpeedCheck(
        fp32_ms=float(np.median(ref_ms)),
        quantized_ms=float(np.median(cand_ms)),
        speedup=float(np.median(speedups)),
        rounds=len(speedups),
        margin=margin,
    )
