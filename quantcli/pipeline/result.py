"""What ``convert`` did: ``ConvertResult`` (re-exported by ``quantcli.api``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quantcli.modes.common import ConvertMode, ModeReport

if TYPE_CHECKING:
    from quantcli.passes.equalization import EqualizationReport
    from quantcli.passes.preprocess import PreprocessReport
    from quantcli.passes.smoothquant import SmoothQuantReport
    from quantcli.pipeline.verdict import Verdict
    from quantcli.search.accuracy_search import SearchResult
    from quantcli.static.bias_correction import BiasCorrectionReport
    from quantcli.static.plan import QuantPlan
    from quantcli.stats.calibration import CalibrationResult
    from quantcli.verify.audit import FusionAudit
    from quantcli.verify.speedcheck import SpeedCheck

__all__ = ["ConvertResult"]


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What ``convert`` did: the plan, the fusion audit of the written model, and sizes.

    ``plan`` and ``calibration`` are None for modes other than static; ``mode_report`` says what
    those modes rewrote.
    """

    output_path: Path
    plan: QuantPlan | None
    preprocess: PreprocessReport
    audit: FusionAudit
    input_bytes: int
    output_bytes: int
    calibration: CalibrationResult | None
    mode: ConvertMode = ConvertMode.STATIC
    mode_report: ModeReport | None = None
    search: SearchResult | None = None
    recipe_path: Path | None = None
    #: batch-1 speed check (``require_speedup``), else None
    speed: SpeedCheck | None = None
    #: quantized activations whose shape onnx shape inference could not tell (quantization does not need it)
    unknown_shapes: tuple[str, ...] = ()
    #: why onnx shape inference failed on the model, if it did
    shape_inference_error: str | None = None
    algorithms: tuple[EqualizationReport | SmoothQuantReport | BiasCorrectionReport, ...] = ()
    #: one line when the input's opset was upgraded in memory (``upgrade_opset``), else None
    opset_note: str | None = None
    #: fidelity on samples convert did not calibrate on, and batch-1 speed (``quantcli.pipeline.verdict``)
    verdict: Verdict | None = None
