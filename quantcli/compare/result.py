"""What ``compare`` measured: ``CompareResult`` (re-exported by ``quantcli.api``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quantcli.compare.evaluate import LatencyComparison, OutputMetrics
    from quantcli.compare.layers import LayerError
    from quantcli.compare.metrics import TaskMetric
    from quantcli.compare.output_kinds import KindMetrics

__all__ = ["CompareResult"]


@dataclass(frozen=True, slots=True)
class CompareResult:
    """Accuracy and speed of a quantized model against its FP32 original."""

    reference_path: Path
    candidate_path: Path
    data_path: Path
    num_samples: int
    outputs: list[OutputMetrics]
    latency: list[LatencyComparison]
    reference_bytes: int
    candidate_bytes: int
    integer_kernels: dict[str, int]
    layers: list[LayerError] = field(default_factory=list)
    task_metric: TaskMetric | None = None
    reference_peak_mb: float | None = None
    candidate_peak_mb: float | None = None
    #: each output's kind (detected or given) and task-level metric (``quantcli.compare.output_kinds``)
    kinds: list[KindMetrics] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        """Quantized file size over FP32 file size."""
        return self.candidate_bytes / self.reference_bytes if self.reference_bytes else float("nan")
