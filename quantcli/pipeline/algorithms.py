"""The data-driven algorithms (CLE, SmoothQuant, bias correction) as convert runs them.

CLE and SmoothQuant change the FP32 graph (its function is unchanged), so the transformed graph is
what gets calibrated; bias correction needs the per-channel means of every layer's input. All of
them take their statistics from one pass over the data (``quantcli.passes.algorithms``).
Adding an algorithm: a pass module under ``quantcli/passes/``, a field in ``AlgorithmOptions``,
and one line in ``quantcli.passes.algorithms.transform_and_observe``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from quantcli.core.errors import InvalidOption, MissingInput
from quantcli.core.options import AlgorithmOptions, CalibrationMethod, QuantConfig
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import DataFormat, model_input_specs, sample_shapes
from quantcli.stats.calibration import CalibrationOptions, CalibrationResult, activation_levels, ranges_for_levels

if TYPE_CHECKING:
    from quantcli.data.datasets import Dataset
    from quantcli.passes.algorithms import TransformedModel
    from quantcli.passes.equalization import EqualizationReport
    from quantcli.passes.smoothquant import SmoothQuantReport
    from quantcli.search.accuracy_search import SearchBase
    from quantcli.static.bias_correction import BiasCorrectionReport
    from quantcli.static.plan import QuantPlan

__all__ = [
    "AlgorithmInputs",
    "algorithm_base",
    "algorithm_inputs",
    "check_algorithm_inputs",
    "convert_with_algorithms",
    "transform_fp32",
]


def check_algorithm_inputs(
    algorithms: AlgorithmOptions, calibration: object, data_path: Path | None, model_path: Path
) -> None:
    """The data-driven algorithms calibrate the transformed model themselves: they need the data."""
    if algorithms.smoothquant is not None and not 0.0 <= algorithms.smoothquant <= 1.0:
        raise InvalidOption(f"SmoothQuant alpha {algorithms.smoothquant}: must be within [0, 1]", option="smoothquant")
    if data_path is not None and calibration is None:
        return
    graph_changing = [
        n for n, on in (("cle", algorithms.cle), ("smoothquant", algorithms.smoothquant is not None)) if on
    ]
    if graph_changing:
        verb = "change" if len(graph_changing) > 1 else "changes"
        raise MissingInput(
            f"{model_path}: {' and '.join('$' + n for n in graph_changing)} {verb} the FP32 graph, so a calibration "
            "file's ranges no longer fit it; give $data_path (the transformed model is calibrated on it) instead of "
            "$calibration",
            option="data_path",
            options=(*graph_changing, "calibration"),
        )
    raise MissingInput(
        f"{model_path}: $bias_correction needs per-channel input means, which a calibration file does not hold; "
        "give $data_path instead of $calibration",
        option="data_path",
        options=("bias_correction", "calibration"),
    )


@dataclass(frozen=True, slots=True)
class AlgorithmInputs:
    """What the data-driven algorithms read and how they calibrate (``calibration.source``: the model's path)."""

    model_path: Path
    data_path: Path
    model_sha256: str
    fmt: DataFormat
    calibration: CalibrationOptions
    progress: Progress = no_progress
    #: the samples of ``data_path`` to read when some are held back for a search (None: all of them)
    samples: Dataset | None = None


def algorithm_inputs(
    model_path: Path,
    data_path: Path,
    sha: str,
    fmt: DataFormat,
    method: CalibrationMethod | None,
    percentile: float,
    timeout: float | None,
    progress: Progress,
) -> AlgorithmInputs:
    """``AlgorithmInputs`` from convert's arguments (min-max unless a method is given)."""
    options = CalibrationOptions(
        method=method or CalibrationMethod.MINMAX, percentile=percentile, timeout=timeout, source=str(model_path)
    )
    return AlgorithmInputs(model_path, data_path, sha, fmt, options, progress)


def convert_with_algorithms(
    prepared: onnx.ModelProto, config: QuantConfig, algorithms: AlgorithmOptions, inputs: AlgorithmInputs
) -> tuple[
    onnx.ModelProto,
    CalibrationResult,
    QuantPlan,
    tuple[EqualizationReport | SmoothQuantReport | BiasCorrectionReport, ...],
]:
    """CLE and SmoothQuant on the FP32 graph, calibration of the result, plan, bias correction: the
    statistics of all of them come from one pass over the data (``quantcli.passes.algorithms``)."""
    from quantcli.static.bias_correction import bias_correction_targets, correct_biases
    from quantcli.static.planning import make_plan
    from quantcli.verify import kernel_speed

    done = transform_fp32(prepared, algorithms, inputs)
    prepared, calibration = done.model, done.calibration
    reports: list[EqualizationReport | SmoothQuantReport | BiasCorrectionReport] = list(done.reports)
    ranges = ranges_for_levels(calibration, activation_levels(config.activation_type))
    speed, shapes = kernel_speed.host_oracle(), _sample_shapes(prepared, inputs)
    plan = make_plan(prepared, ranges, config, speed=speed, input_shapes=shapes)
    if algorithms.bias_correction:
        targets = bias_correction_targets(prepared, plan)
        stats = {t: done.input_stats[t] for t in targets if t in done.input_stats}
        prepared, bc_report = correct_biases(prepared, plan, stats)
        reports.append(bc_report)
        plan = make_plan(prepared, ranges, config, speed=speed, input_shapes=shapes)
    return prepared, calibration, plan, tuple(reports)


def transform_fp32(
    prepared: onnx.ModelProto, algorithms: AlgorithmOptions, inputs: AlgorithmInputs
) -> TransformedModel:
    """CLE, then SmoothQuant (on statistics of the equalized graph), with the calibration and layer input
    statistics of the result, from one pass over ``inputs.data_path``: the FP32 function is unchanged."""
    from quantcli.passes.algorithms import transform_and_observe

    dataset = inputs.samples or inputs.fmt.open(inputs.data_path, model_input_specs(prepared))
    return transform_and_observe(
        prepared, dataset, algorithms, inputs.calibration, model_sha256=inputs.model_sha256, progress=inputs.progress
    )


def algorithm_base(
    prepared: onnx.ModelProto, config: QuantConfig, algorithms: AlgorithmOptions, inputs: AlgorithmInputs
) -> tuple[SearchBase, tuple[EqualizationReport | SmoothQuantReport, ...]]:
    """The search's (or a recipe's) starting point with ``algorithms``: transformed graph, its calibration
    (with histograms, for per-tensor methods) and, for bias correction, the input means of every layer
    the plan may quantize (each candidate corrects the biases of the weights it quantizes)."""
    from quantcli.search.accuracy_search import SearchBase
    from quantcli.static.bias_correction import bias_correction_targets
    from quantcli.static.planning import make_plan
    from quantcli.verify import kernel_speed

    options = replace(inputs.calibration, method=CalibrationMethod.PERCENTILE)
    done = transform_fp32(prepared, algorithms, replace(inputs, calibration=options))
    bias_stats = None
    speed, shapes = kernel_speed.host_oracle(), _sample_shapes(prepared, inputs)
    if algorithms.bias_correction:
        plan = make_plan(done.model, done.calibration.ranges, config, speed=speed, input_shapes=shapes)
        targets = bias_correction_targets(done.model, plan)
        bias_stats = {t: done.input_stats[t] for t in targets if t in done.input_stats}
    base = SearchBase(done.model, done.calibration, config, algorithms, bias_stats, speed=speed, input_shapes=shapes)
    return base, done.reports


def _sample_shapes(prepared: onnx.ModelProto, inputs: AlgorithmInputs) -> dict[str, tuple[int, ...]]:
    """One sample's input shapes from the algorithms' data (planning's sizes for dynamic input dims)."""
    return sample_shapes(inputs.fmt.open(inputs.data_path, model_input_specs(prepared)))
