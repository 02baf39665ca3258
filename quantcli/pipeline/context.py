"""The state ``convert``'s steps hand to each other: ``ConvertContext``.

A step reads the fields earlier steps filled and fills its own; ``need`` turns a field that is
still empty into a clear bug report instead of an ``AttributeError`` on None.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from quantcli.core.host import default_config
from quantcli.core.options import AlgorithmOptions, CalibrationMethod, QuantConfig
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import DataFormat
from quantcli.graph.atomic import release_scratch, scratch_directory
from quantcli.pipeline.request import ConvertRequest

if TYPE_CHECKING:
    import onnx

    from quantcli.data.datasets import Dataset
    from quantcli.modes.common import ModeReport
    from quantcli.passes.equalization import EqualizationReport
    from quantcli.passes.preprocess import PreprocessReport
    from quantcli.passes.smoothquant import SmoothQuantReport
    from quantcli.pipeline.verdict import Verdict
    from quantcli.search.accuracy_search import SearchBase, SearchResult
    from quantcli.search.recipe import Recipe
    from quantcli.static.bias_correction import BiasCorrectionReport
    from quantcli.static.plan import QuantPlan
    from quantcli.stats.calibration import CalibrationResult
    from quantcli.verify.audit import FusionAudit
    from quantcli.verify.speedcheck import SpeedCheck

    AlgorithmReport = EqualizationReport | SmoothQuantReport | BiasCorrectionReport

__all__ = ["ConvertContext", "Step", "need", "no_log", "remove_scratch", "scratch_folder"]

T = TypeVar("T")


def no_log(_: str) -> None:
    """The default ``log``: search steps are not shown."""


@dataclass(slots=True)
class ConvertContext:
    """One conversion in progress. The request's choices are copied where a recipe may replace them."""

    request: ConvertRequest
    progress: Progress = no_progress
    log: Callable[[str], None] = no_log
    fmt: DataFormat = field(init=False)
    #: effective choices (a recipe replaces the request's)
    config: QuantConfig = field(init=False)
    method: CalibrationMethod | None = field(init=False)
    percentile: float = field(init=False)
    algorithms: AlgorithmOptions = field(init=False)
    recipe: Recipe | None = None
    #: the input model, loaded and checked, and its file's sha256
    model: onnx.ModelProto | None = None
    sha256: str = ""
    #: one line when the input's opset was upgraded in memory
    opset_note: str | None = None
    #: the model quantization starts from (pre-processed, then transformed by the algorithms)
    prepared: onnx.ModelProto | None = None
    pre_report: PreprocessReport | None = None
    calibration: CalibrationResult | None = None
    base: SearchBase | None = None
    plan: QuantPlan | None = None
    quantized: onnx.ModelProto | None = None
    applied: tuple[AlgorithmReport, ...] = ()
    searched: SearchResult | None = None
    mode_report: ModeReport | None = None
    audit: FusionAudit | None = None
    speed: SpeedCheck | None = None
    unknown_shapes: tuple[str, ...] = ()
    shape_error: str | None = None
    #: the samples calibration reads when some are held back for the verdict (``verdict.hold_back``)
    calibration_data: Dataset | None = None
    #: the data and the first sample held back from calibration
    held_out: tuple[Dataset, int] | None = None
    #: the samples the search scores on when they are held back from ``data_path`` (``quantcli.pipeline.holdout``)
    search_data: Dataset | None = None
    #: the search's second fold (``quantcli.pipeline.holdout``): the samples its calibration reads, those it
    #: scores, and those neither fold scores (the confirmation's)
    fold_data: tuple[Dataset, Dataset, Dataset | None] | None = None
    #: the search base calibrated on ``fold_data``'s first part (``accuracy_search.SecondFold``)
    fold_base: SearchBase | None = None
    #: the search's ``eval_data`` is ``data_path`` with too few samples to hold back: calibration read them
    search_on_calibration: bool = False
    #: what the verdict could not check, decided before it runs
    verdict_unchecked: tuple[str, ...] = ()
    verdict: Verdict | None = None
    #: a temporary directory for the run's large files (``scratch_folder``), removed by ``run_convert``
    scratch: Path | None = None
    #: the descriptor holding the scratch directory's owner lock (``quantcli.graph.atomic``)
    scratch_lock: int = -1

    def __post_init__(self) -> None:
        r = self.request
        self.fmt = DataFormat(r.batch_axes, r.images)
        self.config = r.config or default_config()
        self.method, self.percentile, self.algorithms = r.method, r.percentile, r.algorithms

    @property
    def source(self) -> str:
        """The model path as text, for messages."""
        return str(self.request.model_path)


def scratch_folder(ctx: ConvertContext) -> Path:
    """The run's temporary directory (made on first use): beside the output, on the disk that will hold
    it, when that directory can be written; else the system's."""
    if ctx.scratch is None:
        parent = ctx.request.output_path.parent
        where = parent if parent.is_dir() and os.access(parent, os.W_OK) else None
        ctx.scratch, ctx.scratch_lock = scratch_directory(where)
    return ctx.scratch


def remove_scratch(ctx: ConvertContext) -> None:
    """Remove the run's temporary directory, if it made one."""
    if ctx.scratch is not None:
        release_scratch(ctx.scratch, ctx.scratch_lock)
        ctx.scratch, ctx.scratch_lock = None, -1


#: one step of a conversion: reads and fills the context
Step = Callable[[ConvertContext], None]


def need(value: T | None, what: str) -> T:
    """``value``, which an earlier step must have set (a missing one is a bug in a step list)."""
    if value is None:
        raise RuntimeError(f"convert step order: {what} is not set yet")
    return value
