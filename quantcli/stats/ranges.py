"""What calibration produces: a clip range per tensor, and the result of a calibration.

Plain values with no onnxruntime import, so planning and reporting can use them without loading
the runtime (``quantcli.stats.calibration`` re-exports both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantcli.core.options import CalibrationMethod
from quantcli.stats.observers import HistogramObserver

__all__ = ["CalibrationResult", "TensorRange"]


@dataclass(frozen=True, slots=True)
class TensorRange:
    """Clip range chosen for one tensor, with the exact observed min and max."""

    min: float
    max: float
    observed_min: float
    observed_max: float


@dataclass(frozen=True, slots=True)
class CalibrationResult:
    """Ranges for every float activation of a model, and how they were obtained."""

    model_sha256: str
    method: CalibrationMethod
    params: dict[str, float | int]
    num_samples: int
    ranges: dict[str, TensorRange]
    histograms: dict[str, HistogramObserver] = field(default_factory=dict)
    #: float tensors inside If/Loop/Scan subgraphs that never ran on the data (e.g. a branch never taken)
    unobserved: tuple[str, ...] = ()
    #: tensor -> NaN values it took on the calibration data, left out of its range (only tensors that took some)
    nans: dict[str, int] = field(default_factory=dict)
    #: one sample's shape per model input, as calibration read the data: ``convert`` from this file plans
    #: the model's dynamic input dims (and counts its MACs) at these, as it does with ``--data``
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
