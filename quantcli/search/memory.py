"""How many evaluation samples the accuracy search runs at once, within a memory budget.

The search runs every candidate over the evaluation data, and the sensitivity ranking runs the FP32
model and a candidate side by side with every quantized tensor exposed. At batch 32 a large input
does not fit: one 3x640x640 sample of PP-OCRv4 det exposes 531 MiB of activations, and the per-layer
pass over its 16 evaluation samples ran out of memory under a 10 GB address-space cap (8.2 GB resident).

``activation_bytes`` measures what one sample exposes (every main-graph node output of the FP32 model,
run on one sample, as the statistics collector measures its tensors), and ``plan_search_batches``
turns it into two batches under the budget (``quantcli.stats.collector.plan_batch``, at least 1):

* scoring: a candidate session holds at most every activation of a batch (ORT frees many earlier;
  this bound is safe);
* sensitivity: the per-layer pass holds a batch of the reference's and of the candidate's tensors, and
  keeps the reference's first batch for the errors in isolation: three times a sample's activations.

A budget below one sample still runs, at batch 1. The budget defaults to calibrate's (512 MiB, less
when memory is short: ``quantcli.stats.calibration.calibration_memory_budget``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from quantcli.core.options import CalibrationMethod
from quantcli.graph.session import make_session
from quantcli.stats.calibration import calibration_memory_budget
from quantcli.stats.collector import plan_batch

__all__ = ["SEARCH_BATCH", "SearchBatches", "activation_bytes", "plan_search_batches", "search_memory_budget"]

#: samples per run at most (what the search always used before it had a budget)
SEARCH_BATCH = 32
#: how many sets of a batch's activations the sensitivity pass holds (reference, candidate, first batch kept)
SENSITIVITY_COPIES = 3


@dataclass(frozen=True, slots=True)
class SearchBatches:
    """The search's batches under ``budget`` bytes, from ``per_sample`` bytes of activations a sample."""

    score: int  # samples per candidate run
    sensitivity: int  # samples per run of the per-layer pass
    per_sample: int
    budget: int

    @property
    def sensitivity_memory(self) -> int:
        """The per-layer pass's ``max_memory``: the budget, or what one batch needs when it does not fit
        (at batch 1 the collector's size probe already held one sample of every tensor: splitting the
        tensors into groups would re-run both models without lowering that peak)."""
        return max(self.budget, 2 * self.per_sample * self.sensitivity)


def search_memory_budget(max_memory: int | None) -> int:
    """``max_memory``, else calibrate's default (512 MiB, a quarter of the memory available if less)."""
    return calibration_memory_budget(max_memory, CalibrationMethod.MINMAX)


def activation_bytes(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> int:
    """Bytes of every main-graph node output of ``model`` run on ``feed`` (one sample: bytes a sample)."""
    names = list(dict.fromkeys(o for n in model.graph.node for o in n.output if o))
    session = make_session(model, outputs=names)
    outputs = session.run(None, dict(feed))
    del session
    return int(sum(getattr(a, "nbytes", 0) for a in outputs))


def plan_search_batches(per_sample: int, budget: int, batch_size: int = SEARCH_BATCH) -> SearchBatches:
    """The scoring and sensitivity batches (at most ``batch_size``, at least 1) that fit ``budget``."""
    score = plan_batch(per_sample, batch_size, budget)
    sensitivity = plan_batch(SENSITIVITY_COPIES * per_sample, batch_size, budget)
    return SearchBatches(score, sensitivity, per_sample, budget)
