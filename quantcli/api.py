"""The three steps as plain functions: ``calibrate_model``, ``convert_model``, ``compare_models``.

The command line is a thin layer over these; tests and scripts call them directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.version_converter

from quantcli.core.errors import NotFasterError, QuantCliError, UnsupportedModelError
from quantcli.core.host import default_config
from quantcli.core.options import AlgorithmOptions, CalibrationMethod, QuantConfig, WeightClipping
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import DataFormat, model_input_specs, open_dataset, random_dataset
from quantcli.data.images import ImagePreprocess
from quantcli.graph.model import file_sha256, infer_shapes, known_shapes, load_model, model_opset, save_model
from quantcli.modes.common import ConvertMode, ModeReport, matching_nodes
from quantcli.passes.preprocess import PreprocessReport, preprocess
from quantcli.stats.artifact import read_calibration
from quantcli.stats.calibration import (
    CalibrationOptions,
    CalibrationResult,
    activation_levels,
    calibrate,
    make_session,
    ranges_for_levels,
    rechoose,
)

if TYPE_CHECKING:
    from quantcli.compare.evaluate import (
        LatencyComparison,
        OutputMetrics,
    )
    from quantcli.compare.layers import LayerError
    from quantcli.compare.metrics import MetricSpec, TaskMetric
    from quantcli.modes.dynamic import DynamicOptions
    from quantcli.modes.weight_only import WeightOnlyOptions
    from quantcli.passes.algorithms import TransformedModel
    from quantcli.passes.equalization import EqualizationReport
    from quantcli.passes.smoothquant import SmoothQuantReport
    from quantcli.search.accuracy_search import SearchBase, SearchOptions, SearchResult
    from quantcli.search.recipe import Recipe
    from quantcli.static.bias_correction import BiasCorrectionReport
    from quantcli.static.planning import QuantPlan
    from quantcli.verify.audit import FusionAudit
    from quantcli.verify.speedcheck import SpeedCheck

__all__ = [
    "AlgorithmInputs",
    "CalibrateRequest",
    "CompareResult",
    "ConvertResult",
    "calibrate_model",
    "compare_models",
    "convert_model",
]

_QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
    "DynamicQuantizeLinear", "QGemm", "QLinearAdd", "MatMulNBits",
}  # fmt: skip
MIN_OPSET = 13
#: what the search's algorithm stage tries (with MSE weight clipping): every algorithm on
ALL_ALGORITHMS = AlgorithmOptions(cle=True, smoothquant=0.5, bias_correction=True)


def _prepare_input(
    model: onnx.ModelProto, path: Path, *, upgrade_opset: bool, min_opset: int = MIN_OPSET
) -> onnx.ModelProto:
    """Refuse models quantcli must not quantize; upgrade an old opset when asked."""
    found = sorted({n.op_type for n in model.graph.node if n.op_type in _QUANTIZED_OPS})
    if found:
        raise UnsupportedModelError(
            f"{path}: model is already quantized (contains {', '.join(found)}); give quantcli the FP32 model"
        )
    weights = {
        name for node in model.graph.node if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
        for name in node.input[1:3]
    }  # fmt: skip
    for init in model.graph.initializer:
        try:
            values = onnx.numpy_helper.to_array(init)
        except Exception as exc:
            raise UnsupportedModelError(
                f"{path}: initializer '{init.name}' is malformed (its data does not fit its shape {list(init.dims)})"
            ) from exc
        # +-inf constants are legitimate elsewhere (masks, Clip bounds); in a weight they are damage
        if init.name in weights and values.dtype.kind == "f" and not np.all(np.isfinite(values)):
            raise UnsupportedModelError(
                f"{path}: weight '{init.name}' holds NaN or infinite values; the model is damaged"
            )
    opset = model_opset(model)
    if opset < min_opset:
        if not upgrade_opset:
            what = "per-channel QuantizeLinear/DequantizeLinear" if min_opset == MIN_OPSET else "this mode"
            raise UnsupportedModelError(
                f"{path}: opset {opset} is too old for {what} "
                f"(needs >= {min_opset}); pass --upgrade-opset to convert it with onnx's version converter"
            )
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            first = " ".join(str(exc).split())[:200]
            raise UnsupportedModelError(
                f"{path}: onnx's version converter cannot upgrade opset {opset}: {first}"
            ) from exc
    return model


@dataclass(frozen=True, slots=True)
class CalibrateRequest:
    """What ``calibrate_model`` does besides reading the model and data paths.

    ``calibration``: how ranges are collected and chosen; ``max_samples``: read at most this many
    samples; ``upgrade_opset``: convert an old opset instead of refusing it; ``random_samples`` (with
    no data path): calibrate on random inputs, for smoke tests only; ``fmt``: inputs not batched on
    axis 0 and how image folders become input (``quantcli.data.datasets.DataFormat``).
    """

    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    max_samples: int | None = None
    upgrade_opset: bool = False
    random_samples: int | None = None
    fmt: DataFormat = field(default_factory=DataFormat)

    @classmethod
    def of(cls, **fields: Any) -> CalibrateRequest:
        """A request from flat keyword fields: those of ``CalibrationOptions``, of this class, and
        ``batch_axes``/``images`` (``DataFormat``'s), as ``calibrate_model`` took them before.

        Raises:
            TypeError: a field no one knows.
        """
        own = {k: fields.pop(k) for k in ("max_samples", "upgrade_opset", "random_samples") if k in fields}
        fmt = DataFormat(fields.pop("batch_axes", None), fields.pop("images", None))
        return cls(CalibrationOptions(**fields), fmt=fmt, **own)


def calibrate_model(
    model_path: Path,
    data_path: Path | None,
    request: CalibrateRequest | None = None,
    *,
    progress: Progress = no_progress,
    **fields: Any,
) -> CalibrationResult:
    """Collect activation ranges of the model at ``model_path`` over the data at ``data_path``.

    ``request`` says how (default: min-max on every sample); flat keyword ``fields`` build one
    instead (``CalibrateRequest.of``: ``method=...``, ``max_samples=...``, ``batch_axes=...``).
    With ``data_path`` None, ``random_samples`` random inputs are used: for smoke tests only.
    """
    if request is None:
        request = CalibrateRequest.of(**fields)
    elif fields:
        raise TypeError("give calibrate_model either a CalibrateRequest or keyword fields, not both")
    model = _prepare_input(load_model(model_path), model_path, upgrade_opset=request.upgrade_opset)
    options = replace(request.calibration, source=str(model_path))
    if data_path is None:
        if not request.random_samples:
            raise QuantCliError("calibration needs --data PATH (or --random N for a smoke test)")
        dataset = random_dataset(model_input_specs(model), request.random_samples, seed=options.seed)
    else:
        dataset = request.fmt.open(data_path, model_input_specs(model), max_samples=request.max_samples)
    prepared, _ = preprocess(model)
    return calibrate(prepared, dataset, options, model_sha256=file_sha256(model_path), progress=progress)


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What ``convert_model`` did: the plan, the fusion audit of the written model, and sizes.

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


def _sample_feed(model: onnx.ModelProto, data_path: Path | None, fmt: DataFormat) -> dict[str, np.ndarray] | None:
    """One sample of the data, to resolve dynamic shapes in the MAC counts (None if unavailable)."""
    if data_path is None:
        return None
    try:
        return next(fmt.open(data_path, model_input_specs(model), max_samples=1).batches(1))
    except (QuantCliError, StopIteration):
        return None


def convert_model(
    model_path: Path,
    output_path: Path,
    *,
    calibration: CalibrationResult | Path | None = None,
    data_path: Path | None = None,
    config: QuantConfig | None = None,
    method: CalibrationMethod | None = None,
    percentile: float = 99.99,
    force: bool = False,
    require_fused: bool = False,
    require_speedup: bool = False,
    upgrade_opset: bool = False,
    timeout: float | None = None,
    search: SearchOptions | None = None,
    eval_data: Path | None = None,
    recipe: Recipe | Path | None = None,
    save_recipe: Path | None = None,
    algorithms: AlgorithmOptions | None = None,
    progress: Progress = no_progress,
    log: Callable[[str], None] = lambda _: None,
    mode: ConvertMode = ConvertMode.STATIC,
    mode_options: DynamicOptions | WeightOnlyOptions | None = None,
    batch_axes: Mapping[str, int | None] | None = None,
    images: ImagePreprocess | None = None,
) -> ConvertResult:
    """Quantize the model at ``model_path`` and write a QDQ model to ``output_path``.

    Give either a calibration (result or file) or ``data_path`` to calibrate on the fly. With a
    calibration and a ``method`` other than its own, ranges are re-chosen from its stored histograms.
    Other ``mode``s (dynamic, weight-only, fp16) need no calibration; ``mode_options`` holds their
    choices (``config.exclude_nodes`` applies to every mode).

    With ``search`` and ``eval_data``, an accuracy-driven search (``quantcli.search.accuracy_search``) picks the
    method, per-tensor methods and float nodes that meet ``search.budget``; ``save_recipe`` writes
    its decisions. With ``recipe``, saved decisions are replayed (same calibration, same bytes).

    With ``require_speedup``, both models are timed at batch 1 before anything is written (on the
    first sample of ``data_path`` or ``eval_data``, else on random inputs of the model's fixed shape)
    and nothing is written unless the quantized model is faster. A search (an accuracy budget) does
    the same unless ``force``: the honest answer for a model that no quantization improves.

    ``algorithms`` (CLE, SmoothQuant, bias correction) need ``data_path``: they change the FP32 graph
    or read per-channel statistics, so the transformed model is calibrated here.

    ``batch_axes`` names inputs not batched on axis 0 and ``images`` how image folders become input,
    for ``data_path`` and ``eval_data`` alike.

    Raises:
        QuantCliError: bad input, or ``require_fused`` and a quantized Conv/MatMul/Gemm stayed float.
        NotFasterError: ``require_speedup`` (or a search without ``force``) and the quantized model
            is not faster than FP32 at batch 1.
    """
    from quantcli.search.accuracy_search import Candidate, SearchBase, build_candidate, search_quantization
    from quantcli.search.recipe import read_recipe, write_recipe
    from quantcli.static.lowering import apply_plan
    from quantcli.static.planning import make_plan
    from quantcli.verify.audit import audit_fusion
    from quantcli.verify.speedcheck import check_speedup

    fmt = DataFormat(batch_axes, images)
    config = config or default_config()
    model_path, output_path = Path(model_path), Path(output_path)
    if output_path.exists() and output_path.resolve() == model_path.resolve():
        raise QuantCliError(f"{output_path}: output would overwrite the input model; choose another path")
    if search is not None and recipe is not None:
        raise QuantCliError("give either a budget to search for (--max-accuracy-drop/--min-sqnr) or --recipe, not both")
    if search is not None and eval_data is None:
        raise QuantCliError("the accuracy search needs --eval-data EVAL (held-out data, with labels for top-1)")
    if save_recipe is not None and search is None:
        raise QuantCliError("--save-recipe records a search's decisions: give --max-accuracy-drop or --min-sqnr")
    if save_recipe is not None and save_recipe.exists() and not force:
        raise QuantCliError(f"{save_recipe}: already exists; pass --force to overwrite it")
    if mode != ConvertMode.STATIC:
        if calibration is not None or data_path is not None:
            raise QuantCliError(f"--mode {mode} needs no calibration; drop --calibration/--data")
        if search is not None or recipe is not None:
            raise QuantCliError(f"--mode {mode} has no accuracy search or recipe; they are for the static mode")
        return _convert_mode(
            model_path, output_path, mode, mode_options, config,
            force=force, require_fused=require_fused, upgrade_opset=upgrade_opset,
        )  # fmt: skip
    model = _prepare_input(load_model(model_path), model_path, upgrade_opset=upgrade_opset)
    sha = file_sha256(model_path)
    if isinstance(recipe, (str, os.PathLike)):
        recipe = read_recipe(Path(recipe), expected_sha256=sha)
    elif recipe is not None and recipe.model_sha256 != sha:
        raise QuantCliError(f"{model_path}: the recipe was made for another model (sha256 differs)")
    algorithms = algorithms or AlgorithmOptions()
    if recipe is not None:
        if algorithms.needs_data and algorithms != recipe.algorithms:
            raise QuantCliError(
                "the recipe fixes the algorithms (--cle, --smoothquant, --bias-correction); drop them to replay it"
            )
        config, method, percentile = recipe.config, recipe.method, recipe.percentile
        algorithms = recipe.algorithms
    applied: tuple[EqualizationReport | SmoothQuantReport | BiasCorrectionReport, ...] = ()
    searched: SearchResult | None = None
    if algorithms.needs_data and search is None and recipe is None:
        _check_algorithm_inputs(algorithms, calibration, data_path, model_path)
        assert data_path is not None
        prepared, pre_report = preprocess(model)
        inputs = _algorithm_inputs(model_path, data_path, sha, fmt, method, percentile, timeout, progress)
        prepared, calibration, plan, applied = _convert_with_algorithms(prepared, config, algorithms, inputs)
        quantized = apply_plan(prepared, plan)
    else:
        prepared, pre_report = preprocess(model)
        base: SearchBase | None = None
        if algorithms.needs_data:  # with the search or a recipe: every candidate gets the algorithms
            _check_algorithm_inputs(algorithms, calibration, data_path, model_path)
            assert data_path is not None
            inputs = _algorithm_inputs(model_path, data_path, sha, fmt, method, percentile, timeout, progress)
            base, applied = _algorithm_base(prepared, config, algorithms, inputs)
            calibration = base.calibration
        elif isinstance(calibration, (str, os.PathLike)):
            calibration = read_calibration(Path(calibration), expected_sha256=sha)
        elif calibration is None:
            if data_path is None:
                raise QuantCliError("convert needs --calibration CALIB.json or --data PATH to calibrate on the fly")
            # the search and recipes re-choose methods per tensor: they need the histograms
            wants_histograms = search is not None or recipe is not None
            calibration = calibrate(  # the model loaded, checked and pre-processed above, not a second copy
                prepared,
                fmt.open(data_path, model_input_specs(model)),
                model_sha256=sha,
                method=CalibrationMethod.PERCENTILE if wants_histograms else method or CalibrationMethod.MINMAX,
                percentile=percentile,
                timeout=timeout,
                source=str(model_path),
                progress=progress,
            )
        elif calibration.model_sha256 != sha:
            raise QuantCliError(f"{model_path}: the calibration was made for another model (sha256 differs)")
        if search is None and recipe is None and method is not None and method != calibration.method:
            calibration = rechoose(calibration, method, percentile=percentile)
        if base is None:
            base = SearchBase(prepared, calibration, config)
        bias_report = None
        if recipe is not None:
            candidate = Candidate(recipe.method, recipe.tensor_methods, recipe.float_nodes)
            quantized, plan, bias_report = build_candidate(base, candidate, percentile=percentile)
        elif search is not None:
            assert eval_data is not None
            dataset = fmt.open(eval_data, model_input_specs(model))
            methods = (method, *search.methods) if method is not None else search.methods
            search = replace(search, methods=tuple(dict.fromkeys(methods)), percentile=percentile)
            alternatives: list[SearchBase] = []
            alt_reports: tuple[EqualizationReport | SmoothQuantReport, ...] = ()
            if search.try_algorithms and (algorithms, config.weight_clipping) != (ALL_ALGORITHMS, WeightClipping.MSE):
                if data_path is None:
                    raise QuantCliError(
                        f"{model_path}: the search's algorithm stage transforms and calibrates the model: give --data"
                    )
                inputs = _algorithm_inputs(model_path, data_path, sha, fmt, method, percentile, timeout, progress)
                mse = replace(config, weight_clipping=WeightClipping.MSE)
                alt, alt_reports = _algorithm_base(prepared, mse, ALL_ALGORITHMS, inputs)
                alternatives.append(replace(alt, name="all algorithms"))
            searched = search_quantization(
                base, dataset, search, alternatives=alternatives, reference=prepared, progress=progress, log=log
            )
            quantized, plan, bias_report = searched.model, searched.plan, searched.bias_correction
            if searched.base is not None and searched.base.name:  # the algorithm stage's base won
                applied, calibration = alt_reports, searched.base.calibration
        else:
            # entropy/MSE clips re-chosen from the histograms for the activation type's levels (16-bit)
            plan = make_plan(
                prepared, ranges_for_levels(calibration, activation_levels(config.activation_type)), config
            )
            quantized = apply_plan(prepared, plan)
        if bias_report is not None:
            applied = (*applied, bias_report)
    try:
        onnx.checker.check_model(quantized)
    except onnx.checker.ValidationError as exc:  # a bug in quantcli, not the user's fault
        raise RuntimeError(f"quantcli produced an invalid model: {exc}") from exc
    make_session(quantized, source=str(model_path))  # loads in onnxruntime before anything is written
    audit = audit_fusion(
        quantized,
        skipped={s.node: s.reason for s in plan.skipped},
        feed=_sample_feed(model, data_path, fmt),
    )
    if require_fused:
        planned = {name for name, op in plan.quantized_nodes if op in ("Conv", "MatMul", "Gemm")}
        left = [n for n in audit.float_nodes() if n.name in planned]
        if left:
            listed = "; ".join(f"{n.name} ({n.op_type}): {n.reason}" for n in left[:10])
            more = f"; and {len(left) - 10} more" if len(left) > 10 else ""
            raise QuantCliError(
                f"{model_path}: --require-fused: {len(left)} quantized Conv/MatMul/Gemm did not fuse into "
                f"integer kernels: {listed}{more}"
            )
    speed = None
    # with an accuracy budget the answer must also be faster than FP32, unless --force says write it anyway
    budgeted = searched is not None and not force
    if require_speedup or budgeted:
        feed_path = data_path if data_path is not None else eval_data
        speed = check_speedup(model, quantized, _batch1_feed(model, feed_path, fmt))
        if not speed.faster:
            met = "meets the accuracy budget but " if searched is not None else ""
            how = "drop --require-speedup" if require_speedup else "pass --force"
            raise NotFasterError(
                f"{model_path}: the quantized model {met}is not faster than FP32 at batch 1 "
                f"({speed.quantized_ms:.3f} ms vs {speed.fp32_ms:.3f} ms, x{speed.speedup:.2f}); nothing written. "
                f"Keep the FP32 model, or {how} to write it anyway"
            )
    inferred, shape_error = infer_shapes(prepared)
    known = known_shapes(inferred)
    unknown = tuple(a.tensor for a in plan.activations if a.tensor not in known)
    save_model(quantized, output_path, force=force)
    if searched is not None and save_recipe is not None:
        write_recipe(searched.recipe(sha, config, percentile), save_recipe, force=force)
    return ConvertResult(
        output_path=output_path,
        plan=plan,
        preprocess=pre_report,
        audit=audit,
        input_bytes=model_path.stat().st_size,
        output_bytes=output_path.stat().st_size,
        calibration=calibration,
        search=searched,
        recipe_path=save_recipe if searched is not None else None,
        speed=speed,
        unknown_shapes=unknown,
        shape_inference_error=shape_error,
        algorithms=applied,
    )


def _check_algorithm_inputs(
    algorithms: AlgorithmOptions, calibration: object, data_path: Path | None, model_path: Path
) -> None:
    """The data-driven algorithms calibrate the transformed model themselves: they need --data."""
    if algorithms.smoothquant is not None and not 0.0 <= algorithms.smoothquant <= 1.0:
        raise QuantCliError(f"SmoothQuant alpha {algorithms.smoothquant}: must be within [0, 1]")
    if data_path is not None and calibration is None:
        return
    graph_changing = [
        n for n, on in (("--cle", algorithms.cle), ("--smoothquant", algorithms.smoothquant is not None)) if on
    ]
    if graph_changing:
        verb = "change" if len(graph_changing) > 1 else "changes"
        raise QuantCliError(
            f"{model_path}: {' and '.join(graph_changing)} {verb} the FP32 graph, so a calibration file's ranges "
            "no longer fit it; give --data (the transformed model is calibrated on it) instead of --calibration"
        )
    raise QuantCliError(
        f"{model_path}: --bias-correction needs per-channel input means, which a calibration file does not hold; "
        "give --data instead of --calibration"
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


def _algorithm_inputs(
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


def _convert_with_algorithms(
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

    done = _transform_fp32(prepared, algorithms, inputs)
    prepared, calibration = done.model, done.calibration
    reports: list[EqualizationReport | SmoothQuantReport | BiasCorrectionReport] = list(done.reports)
    ranges = ranges_for_levels(calibration, activation_levels(config.activation_type))
    plan = make_plan(prepared, ranges, config)
    if algorithms.bias_correction:
        targets = bias_correction_targets(prepared, plan)
        stats = {t: done.input_stats[t] for t in targets if t in done.input_stats}
        prepared, bc_report = correct_biases(prepared, plan, stats)
        reports.append(bc_report)
        plan = make_plan(prepared, ranges, config)
    return prepared, calibration, plan, tuple(reports)


def _transform_fp32(
    prepared: onnx.ModelProto, algorithms: AlgorithmOptions, inputs: AlgorithmInputs
) -> TransformedModel:
    """CLE, then SmoothQuant (on statistics of the equalized graph), with the calibration and layer input
    statistics of the result, from one pass over ``inputs.data_path``: the FP32 function is unchanged."""
    from quantcli.passes.algorithms import transform_and_observe

    dataset = inputs.fmt.open(inputs.data_path, model_input_specs(prepared))
    return transform_and_observe(
        prepared, dataset, algorithms, inputs.calibration, model_sha256=inputs.model_sha256, progress=inputs.progress
    )


def _algorithm_base(
    prepared: onnx.ModelProto, config: QuantConfig, algorithms: AlgorithmOptions, inputs: AlgorithmInputs
) -> tuple[SearchBase, tuple[EqualizationReport | SmoothQuantReport, ...]]:
    """The search's (or a recipe's) starting point with ``algorithms``: transformed graph, its calibration
    (with histograms, for per-tensor methods) and, for bias correction, the input means of every layer
    the plan may quantize (each candidate corrects the biases of the weights it quantizes)."""
    from quantcli.search.accuracy_search import SearchBase
    from quantcli.static.bias_correction import bias_correction_targets
    from quantcli.static.planning import make_plan

    options = replace(inputs.calibration, method=CalibrationMethod.PERCENTILE)
    done = _transform_fp32(prepared, algorithms, replace(inputs, calibration=options))
    bias_stats = None
    if algorithms.bias_correction:
        targets = bias_correction_targets(done.model, make_plan(done.model, done.calibration.ranges, config))
        bias_stats = {t: done.input_stats[t] for t in targets if t in done.input_stats}
    return SearchBase(done.model, done.calibration, config, algorithms, bias_stats), done.reports


_MODE_MIN_OPSET = {ConvertMode.DYNAMIC: 11, ConvertMode.WEIGHT_ONLY: 7, ConvertMode.FP16: 7}
#: what each rewritten op must become in the optimized graph for --require-fused
_FUSED_KERNELS: dict[ConvertMode, dict[str, tuple[str, ...]]] = {
    ConvertMode.DYNAMIC: {
        "MatMulInteger": ("MatMulIntegerToFloat", "DynamicQuantizeMatMul"), "ConvInteger": ("ConvInteger",),
    },
    ConvertMode.WEIGHT_ONLY: {"MatMulNBits": ("MatMulNBits",)},
}  # fmt: skip


def _convert_mode(
    model_path: Path,
    output_path: Path,
    mode: ConvertMode,
    options: DynamicOptions | WeightOnlyOptions | None,
    config: QuantConfig,
    *,
    force: bool,
    require_fused: bool,
    upgrade_opset: bool,
) -> ConvertResult:
    """``convert_model`` for the modes that need no calibration (see ``quantcli.modes.common``)."""
    from quantcli.modes.dynamic import DynamicOptions, quantize_dynamic
    from quantcli.modes.dynamic import default_options as default_dynamic_options
    from quantcli.modes.fp16 import convert_fp16
    from quantcli.modes.weight_only import WeightOnlyOptions, quantize_weight_only
    from quantcli.verify.audit import audit_fusion

    model = _prepare_input(
        load_model(model_path), model_path, upgrade_opset=upgrade_opset, min_opset=_MODE_MIN_OPSET[mode]
    )
    prepared, pre_report = preprocess(model)
    excluded = matching_nodes(prepared, config.exclude_nodes)
    if mode == ConvertMode.DYNAMIC:
        opts = options if isinstance(options, DynamicOptions) else default_dynamic_options()
        converted, report = quantize_dynamic(prepared, replace(opts, exclude_nodes=opts.exclude_nodes | excluded))
    elif mode == ConvertMode.WEIGHT_ONLY:
        wopts = options if isinstance(options, WeightOnlyOptions) else WeightOnlyOptions()
        converted, report = quantize_weight_only(prepared, replace(wopts, exclude_nodes=wopts.exclude_nodes | excluded))
    else:
        converted, report = convert_fp16(prepared, exclude_nodes=excluded, exclude_op_types=config.exclude_op_types)
    try:
        onnx.checker.check_model(converted)
    except onnx.checker.ValidationError as exc:  # a bug in quantcli, not the user's fault
        raise RuntimeError(f"quantcli produced an invalid model: {exc}") from exc
    make_session(converted, source=str(model_path))
    audit = audit_fusion(converted)
    if require_fused and mode in _FUSED_KERNELS:
        counts = audit.integer_op_counts()
        for new_op, kernels in _FUSED_KERNELS[mode].items():
            wanted = sum(1 for _, _, new in report.converted if new == new_op)
            got = sum(counts.get(k, 0) for k in kernels)
            if got < wanted:
                raise QuantCliError(
                    f"{model_path}: {wanted - got} of {wanted} {new_op} did not fuse into {'/'.join(kernels)}; "
                    "see 'quantcli inspect' on the output"
                )
    save_model(converted, output_path, force=force)
    return ConvertResult(
        output_path=output_path,
        plan=None,
        preprocess=pre_report,
        audit=audit,
        input_bytes=model_path.stat().st_size,
        output_bytes=output_path.stat().st_size,
        calibration=None,
        mode=mode,
        mode_report=report,
    )


def _batch1_feed(model: onnx.ModelProto, data_path: Path | None, fmt: DataFormat) -> dict[str, np.ndarray]:
    """One sample to time on: the first of ``data_path``, else random (timing only, never accuracy)."""
    specs = model_input_specs(model)
    if data_path is not None:
        return next(fmt.open(data_path, specs, max_samples=1).batches(1))
    try:
        return next(random_dataset(specs, 1).batches(1))
    except QuantCliError as exc:
        raise QuantCliError(f"--require-speedup needs --data to time this model: {exc}") from exc


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

    @property
    def size_ratio(self) -> float:
        """Quantized file size over FP32 file size."""
        return self.candidate_bytes / self.reference_bytes if self.reference_bytes else float("nan")


def _check_signatures(ref: onnx.ModelProto, cand: onnx.ModelProto, ref_path: Path, cand_path: Path) -> None:
    def signature(model: onnx.ModelProto) -> list[str]:
        return [
            f"{s.name}:{s.dtype}[{','.join(str(d) if isinstance(d, int) else '?' for d in s.shape)}]"
            for s in model_input_specs(model)
        ]

    ref_in, cand_in = signature(ref), signature(cand)
    if ref_in != cand_in:
        raise QuantCliError(
            f"{cand_path}: inputs {', '.join(cand_in)} differ from {ref_path}'s {', '.join(ref_in)}; "
            "these models cannot be compared"
        )
    ref_out = [o.name for o in ref.graph.output]
    cand_out = [o.name for o in cand.graph.output]
    if ref_out != cand_out:
        raise QuantCliError(
            f"{cand_path}: outputs {cand_out} differ from {ref_path}'s {ref_out}; these models cannot be compared"
        )


def compare_models(
    reference_path: Path,
    candidate_path: Path,
    data_path: Path,
    *,
    batch_size: int = 32,
    max_samples: int | None = None,
    threads: int = 1,
    latency_batch_sizes: tuple[int, ...] = (1, 32),
    warmup: int = 10,
    runs: int = 50,
    per_layer: bool = False,
    metric: MetricSpec | None = None,
    time_budget_s: float | None = None,
    measure_memory: bool = False,
    progress: Progress = no_progress,
    batch_axes: Mapping[str, int | None] | None = None,
    images: ImagePreprocess | None = None,
) -> CompareResult:
    """Compare ``candidate_path`` (quantized) against ``reference_path`` (FP32) on the same data.

    ``batch_axes`` names inputs not batched on axis 0 (``quantcli.data.datasets.open_dataset``).
    """
    from quantcli.compare.evaluate import compare_outputs, measure_latency, session_peak_memory
    from quantcli.compare.layers import per_layer_errors
    from quantcli.compare.metrics import MetricSpec, TaskMetric, evaluate_custom
    from quantcli.verify.audit import audit_fusion

    ref_model = load_model(reference_path)
    cand_model = load_model(candidate_path)
    _check_signatures(ref_model, cand_model, reference_path, candidate_path)
    dataset = open_dataset(
        data_path, model_input_specs(ref_model), max_samples=max_samples, batch_axes=batch_axes, images=images
    )
    ref = make_session(ref_model, threads=threads, source=str(reference_path))
    cand = make_session(cand_model, threads=threads, source=str(candidate_path))
    metric = metric or MetricSpec("top1")
    collected: dict[str, list[list[np.ndarray]]] | None = {} if metric.function is not None else None
    outputs = compare_outputs(
        ref, cand, dataset, batch_size=batch_size, topk=metric.topk, collect=collected, progress=progress
    )
    task_metric = None
    if collected is not None:
        names = [o.name for o in ref.get_outputs()]
        task_metric = TaskMetric(
            metric.name,
            evaluate_custom(metric, collected["reference"], names, dataset.labels),
            evaluate_custom(metric, collected["candidate"], names, dataset.labels),
        )
        del collected
    latency = []
    for bs in latency_batch_sizes:
        size = dataset.effective_batch_size(bs)
        if size > dataset.num_samples:
            continue
        feed = next(dataset.batches(size))
        latency.append(
            measure_latency(ref, cand, feed, threads=threads, warmup=warmup, runs=runs, time_budget_s=time_budget_s)
        )
    ref_peak = cand_peak = None
    if measure_memory:
        feed = next(dataset.batches(dataset.effective_batch_size(max(latency_batch_sizes or (1,)))))
        ref_peak = session_peak_memory(str(reference_path), feed, threads=threads)
        cand_peak = session_peak_memory(str(candidate_path), feed, threads=threads)
    audit = audit_fusion(cand_model)
    layers = (
        per_layer_errors(ref_model, cand_model, dataset, batch_size=batch_size, progress=progress) if per_layer else []
    )
    return CompareResult(
        reference_path=Path(reference_path),
        candidate_path=Path(candidate_path),
        data_path=Path(data_path),
        num_samples=dataset.num_samples,
        outputs=outputs,
        latency=latency,
        reference_bytes=Path(reference_path).stat().st_size,
        candidate_bytes=Path(candidate_path).stat().st_size,
        integer_kernels=audit.integer_op_counts(),
        layers=layers,
        task_metric=task_metric,
        reference_peak_mb=ref_peak,
        candidate_peak_mb=cand_peak,
    )
