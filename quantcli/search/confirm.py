"""The search's last word is a stopwatch: the cheapest few candidates in the budget, timed against FP32.

The cost model (``quantcli.search.cost``) ranks candidates from per-kernel speeds; a whole model also
pays for its Q/DQ, layout changes and fusions the ranking cannot see. So the ``confirm`` cheapest
candidates that meet the budget are each timed against FP32 at batch 1, in alternation with it in one
process (``quantcli.verify.speedcheck``), and the fastest wins; the cost order breaks ties, so a timer
that answers the same speed-up for every model (the tests' ``Timer``) leaves the cost's choice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

__all__ = ["Timed", "Timer", "fastest", "timed_speedup"]

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
    """Time ``models`` (in cost order) with ``timer``; the index of the fastest (earliest on a tie) and every timing."""
    timed = tuple(Timed(i, float(timer(reference, m, feed))) for i, m in enumerate(models))
    best = max(timed, key=lambda t: (round(t.speedup, 9), -t.rank))
    return best.rank, timed
