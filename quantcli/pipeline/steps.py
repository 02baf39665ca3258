"""The steps of a static conversion, each a function of the context (``quantcli.pipeline.context``).

Steps are listed in ``quantcli.pipeline.convert``; each reads what earlier steps set and sets its
own fields. The data-driven algorithms (CLE, SmoothQuant, bias correction) run through
``quantcli.pipeline.algorithms``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from quantcli.core.errors import MissingInput, NotFasterError, QuantCliError
from quantcli.core.options import AlgorithmOptions, CalibrationMethod, WeightClipping
from quantcli.data.datasets import model_input_specs, random_dataset, sample_shapes
from quantcli.graph.model_io import (
    above_protobuf_limit,
    check_model,
    file_sha256,
    has_external_data,
    infer_shapes,
    known_shapes,
    load_model,
    save_model,
    spill_weights,
    split_weights,
)
from quantcli.graph.session import make_session
from quantcli.passes.preprocess import preprocess as preprocess_model
from quantcli.pipeline.algorithms import (
    AlgorithmInputs,
    algorithm_base,
    algorithm_inputs,
    check_algorithm_inputs,
    convert_with_algorithms,
)
from quantcli.pipeline.context import ConvertContext, need, scratch_folder
from quantcli.pipeline.inputs import opset_note, prepare_input
from quantcli.stats.artifact import read_calibration
from quantcli.stats.calibration import activation_levels, calibrate, ranges_for_levels, rechoose

if TYPE_CHECKING:
    from quantcli.data.datasets import Dataset
    from quantcli.passes.equalization import EqualizationReport
    from quantcli.passes.smoothquant import SmoothQuantReport
    from quantcli.search.accuracy_search import SearchBase, SecondFold
    from quantcli.stats.calibration import CalibrationResult

__all__ = [
    "ALL_ALGORITHMS",
    "audit",
    "calibrate_or_read",
    "check_algorithms",
    "check_outputs",
    "check_speedup",
    "data_sample_shapes",
    "load_and_check",
    "lower",
    "plan",
    "preprocess",
    "read_recipe",
    "rechoose_method",
    "replay_recipe",
    "require_fused",
    "save",
    "save_recipe",
    "search",
    "search_base",
    "shape_facts",
    "transform_calibrate_plan",
    "validate",
]

#: what the search's algorithm stage tries (with MSE weight clipping): every algorithm on
ALL_ALGORITHMS = AlgorithmOptions(cle=True, smoothquant=0.5, bias_correction=True)


def check_outputs(ctx: ConvertContext) -> None:
    """Refuse to overwrite the input model, or a recipe without ``force``."""
    r = ctx.request
    if r.output_path.exists() and r.output_path.resolve() == r.model_path.resolve():
        raise QuantCliError(f"{r.output_path}: output would overwrite the input model; choose another path")
    if r.save_recipe is not None and r.save_recipe.exists() and not r.force:
        raise QuantCliError(f"{r.save_recipe}: already exists; pass $force to overwrite it", options=("force",))


def load_and_check(ctx: ConvertContext) -> None:
    """Load the model, refuse what quantcli must not quantize, hash the file.

    Weights kept in external data stay in their files (``load_model(weights=False)``): each is read
    when a step needs its values, and ``save`` copies those left as they were from there, so the
    process never holds the model's FP32 weights, let alone a second copy of them.
    """
    from quantcli.static.lowering import opset_for_types

    r = ctx.request
    loaded = load_model(r.model_path, weights=False)
    # 16-bit or 4-bit types need opset 21 Q/DQ: upgrade to it up front, before planning names tensors
    types = (ctx.config.activation_type, ctx.config.weight_type)
    ctx.model = prepare_input(loaded, r.model_path, upgrade_opset=r.upgrade_opset, min_opset=opset_for_types(types))
    ctx.opset_note = opset_note(loaded, ctx.model)
    ctx.sha256 = file_sha256(r.model_path)


def read_recipe(ctx: ConvertContext) -> None:
    """Read the recipe (made for this model); its choices replace the request's."""
    from quantcli.search.recipe import read_recipe as read

    r = ctx.request
    recipe = r.recipe
    if isinstance(recipe, (str, os.PathLike)):
        recipe = read(Path(recipe), expected_sha256=ctx.sha256)
    elif recipe is not None and recipe.model_sha256 != ctx.sha256:
        raise QuantCliError(f"{r.model_path}: the recipe was made for another model (sha256 differs)")
    recipe = need(recipe, "the recipe")
    if ctx.algorithms.needs_data and ctx.algorithms != recipe.algorithms:
        raise QuantCliError(
            "the recipe fixes the algorithms ($cle, $smoothquant, $bias_correction); drop them to replay it",
            options=("cle", "smoothquant", "bias_correction"),
        )
    ctx.recipe = recipe
    ctx.config, ctx.method, ctx.percentile, ctx.algorithms = (
        recipe.config,
        recipe.method,
        recipe.percentile,
        recipe.algorithms,
    )


def check_algorithms(ctx: ConvertContext) -> None:
    """The data-driven algorithms calibrate the transformed model themselves: they need data."""
    r = ctx.request
    check_algorithm_inputs(ctx.algorithms, r.calibration, r.data_path, r.model_path)


def preprocess(ctx: ConvertContext) -> None:
    """Fold what quantization should not see (BatchNorm, constants, ...)."""
    ctx.prepared, ctx.pre_report = preprocess_model(need(ctx.model, "the model"))


def calibrate_or_read(ctx: ConvertContext) -> None:
    """The calibration: given, read from its file, or measured on the data (with histograms for a
    search or a recipe, which re-choose methods per tensor)."""
    r = ctx.request
    calibration = r.calibration
    if isinstance(calibration, (str, os.PathLike)):
        calibration = read_calibration(Path(calibration), expected_sha256=ctx.sha256)
    elif calibration is None:
        data_path = need(r.data_path, "the data path")
        dataset = ctx.calibration_data or ctx.fmt.open(data_path, model_input_specs(need(ctx.model, "the model")))
        calibration = _calibrate(ctx, dataset)
    elif calibration.model_sha256 != ctx.sha256:
        raise QuantCliError(f"{r.model_path}: the calibration was made for another model (sha256 differs)")
    ctx.calibration = calibration


def _calibrate(ctx: ConvertContext, dataset: Dataset) -> CalibrationResult:
    """The calibration of the pre-processed model on ``dataset`` (with histograms for a search or a recipe)."""
    r = ctx.request
    return calibrate(  # the model loaded, checked and pre-processed above, not a second copy
        need(ctx.prepared, "the pre-processed model"),
        dataset,
        model_sha256=ctx.sha256,
        method=CalibrationMethod.PERCENTILE if r.wants_histograms else ctx.method or CalibrationMethod.MINMAX,
        percentile=ctx.percentile,
        timeout=r.timeout,
        source=ctx.source,
        progress=ctx.progress,
    )


def rechoose_method(ctx: ConvertContext) -> None:
    """A method other than the calibration's: re-choose its ranges from the stored histograms."""
    calibration = need(ctx.calibration, "the calibration")
    if ctx.method is not None and ctx.method != calibration.method:
        ctx.calibration = rechoose(calibration, ctx.method, percentile=ctx.percentile)


def plan(ctx: ConvertContext) -> None:
    """Decide what to quantize and how."""
    from quantcli.static.planning import make_plan
    from quantcli.verify import kernel_speed

    # entropy/MSE clips re-chosen from the histograms for the activation type's levels (16-bit)
    levels = activation_levels(ctx.config.activation_type)
    ranges = ranges_for_levels(need(ctx.calibration, "the calibration"), levels)
    ctx.plan = make_plan(
        need(ctx.prepared, "the model"),
        ranges,
        ctx.config,
        speed=kernel_speed.host_oracle(),
        input_shapes=data_sample_shapes(ctx),
    )


def data_sample_shapes(ctx: ConvertContext) -> dict[str, tuple[int, ...]]:
    """One sample's input shapes from the data convert was given (calibration data, else evaluation data,
    else those the calibration file recorded), at which planning sees the model's dynamic input dims;
    empty without any."""
    r = ctx.request
    if ctx.calibration_data is not None:
        return sample_shapes(ctx.calibration_data)
    path = r.data_path or r.eval_data
    if path is None:
        return dict(ctx.calibration.input_shapes) if ctx.calibration is not None else {}
    return sample_shapes(ctx.fmt.open(path, model_input_specs(need(ctx.model, "the model"))))


def lower(ctx: ConvertContext) -> None:
    """Rewrite the plan into a QDQ model."""
    from quantcli.modes.dynamic import lower_dynamic_nodes
    from quantcli.static.lowering import apply_plan

    prepared = need(ctx.prepared, "the model")
    ctx.quantized = apply_plan(prepared, need(ctx.plan, "the plan"), dynamic=lower_dynamic_nodes)
    if above_protobuf_limit(prepared):  # the tail reads only its graph: drop the second copy of the weights
        ctx.prepared = split_weights(prepared)[0]
        if has_external_data(ctx.request.model_path):  # written with external data (``save``): the quantized
            # weights wait in a file meanwhile; the sessions of the tail map them, ``save`` copies them
            ctx.quantized = spill_weights(ctx.quantized, scratch_folder(ctx))


def transform_calibrate_plan(ctx: ConvertContext) -> None:
    """CLE and SmoothQuant on the FP32 graph, calibration of the result, plan, bias correction."""
    r = ctx.request
    inputs = _inputs(ctx, need(r.data_path, "the data path"))
    ctx.prepared, ctx.calibration, ctx.plan, ctx.applied = convert_with_algorithms(
        need(ctx.prepared, "the model"), ctx.config, ctx.algorithms, inputs
    )


def _inputs(ctx: ConvertContext, data_path: Path) -> AlgorithmInputs:
    """What the algorithms read: the data (but the samples held back for a search), and how the transformed
    model is calibrated."""
    r = ctx.request
    inputs = algorithm_inputs(
        r.model_path, data_path, ctx.sha256, ctx.fmt, ctx.method, ctx.percentile, r.timeout, ctx.progress
    )
    return inputs if ctx.calibration_data is None else replace(inputs, samples=ctx.calibration_data)


def search_base(ctx: ConvertContext) -> None:
    """Where a search or a recipe starts: with algorithms, the transformed graph and its
    calibration; otherwise the pre-processed graph and the calibration given or measured."""
    from quantcli.search.accuracy_search import SearchBase
    from quantcli.verify import kernel_speed

    r = ctx.request
    prepared = need(ctx.prepared, "the model")
    if ctx.algorithms.needs_data:  # every candidate gets the algorithms
        check_algorithms(ctx)
        inputs = _inputs(ctx, need(r.data_path, "the data path"))
        ctx.base, ctx.applied = algorithm_base(prepared, ctx.config, ctx.algorithms, inputs)
        ctx.calibration = ctx.base.calibration
    else:
        calibrate_or_read(ctx)
        speed = kernel_speed.host_oracle()
        calibration = need(ctx.calibration, "the calibration")
        shapes = data_sample_shapes(ctx)
        ctx.base = SearchBase(prepared, calibration, ctx.config, speed=speed, input_shapes=shapes)
    if ctx.fold_data is not None:  # the second fold: calibrated without its samples
        ctx.log(f"calibrating a second fold on {ctx.fold_data[0].num_samples} samples")
        ctx.fold_base = (
            algorithm_base(prepared, ctx.config, ctx.algorithms, _fold_inputs(ctx))[0]
            if ctx.algorithms.needs_data
            else replace(ctx.base, calibration=_calibrate(ctx, ctx.fold_data[0]))
        )


def _fold_inputs(ctx: ConvertContext) -> AlgorithmInputs:
    """What the algorithms read for the second fold: the data without the fold's scored samples."""
    fold = need(ctx.fold_data, "the second fold")
    return replace(_inputs(ctx, need(ctx.request.data_path, "the data path")), samples=fold[0])


def replay_recipe(ctx: ConvertContext) -> None:
    """Build the recipe's candidate (same calibration, same bytes as when it was saved)."""
    from quantcli.search.accuracy_search import Candidate, build_candidate

    recipe = need(ctx.recipe, "the recipe")
    candidate = Candidate(recipe.method, recipe.tensor_methods, recipe.float_nodes, dynamic_nodes=recipe.dynamic_nodes)
    ctx.quantized, ctx.plan, bias_report = build_candidate(
        need(ctx.base, "the search base"), candidate, percentile=ctx.percentile
    )
    if bias_report is not None:
        ctx.applied = (*ctx.applied, bias_report)


def search(ctx: ConvertContext) -> None:
    """The accuracy search: the cheapest model (fewest float MACs) that meets the budget."""
    from quantcli.search.accuracy_search import search_quantization

    r, base, prepared = ctx.request, need(ctx.base, "the search base"), need(ctx.prepared, "the model")
    options = need(r.search, "the search options")
    dataset = ctx.search_data or ctx.fmt.open(
        need(r.eval_data, "the evaluation data"), model_input_specs(need(ctx.model, "the model"))
    )
    methods = (ctx.method, *options.methods) if ctx.method is not None else options.methods
    kinds = options.output_kinds if options.output_kinds is not None else r.output_kinds
    options = replace(
        options,
        methods=tuple(dict.fromkeys(methods)),
        percentile=ctx.percentile,
        output_kinds=kinds,
        map_threshold=r.map_thresholds(),
    )
    if options.timer is None:  # the cheapest few in the budget are timed against FP32 before one is chosen
        options = replace(options, timer=_search_timer)
    alternatives, alt_reports = _algorithm_alternatives(ctx, options.try_algorithms)
    second = _second_fold(ctx, len(alternatives) > 0)
    searched = search_quantization(
        base,
        dataset,
        options,
        alternatives=alternatives,
        reference=prepared,
        progress=ctx.progress,
        log=ctx.log,
        second_fold=second,
    )
    ctx.searched, ctx.quantized, ctx.plan = searched, searched.model, searched.plan
    if searched.base is not None and searched.base.name:  # the algorithm stage's base won
        ctx.applied, ctx.calibration = alt_reports, searched.base.calibration
    if searched.bias_correction is not None:
        ctx.applied = (*ctx.applied, searched.bias_correction)


def _second_fold(ctx: ConvertContext, alternatives: bool) -> SecondFold | None:
    """The second fold's bases (the algorithm stage's too) and the samples they score (None without one)."""
    from quantcli.search.accuracy_search import SecondFold

    if ctx.fold_data is None or ctx.fold_base is None:
        return None
    bases = [ctx.fold_base, *([_all_algorithms(ctx, _fold_inputs(ctx))[0]] if alternatives else [])]
    return SecondFold(tuple(bases), ctx.fold_data[1], ctx.fold_data[2])


def _search_timer(reference: onnx.ModelProto, candidate: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> float:
    """The search's confirmation timer: the median of 3 of the verdict's batch-1 timings (``verdict.timed_speed``,
    which tests replace, so the search's choice there stays the cost's)."""
    from quantcli.pipeline import verdict as convert_verdict

    return float(np.median([convert_verdict.timed_speed(reference, candidate, dict(feed)).speedup for _ in range(3)]))


def _algorithm_alternatives(
    ctx: ConvertContext, try_algorithms: bool
) -> tuple[list[SearchBase], tuple[EqualizationReport | SmoothQuantReport, ...]]:
    """The search's algorithm stage: a second base with every algorithm and MSE weight clipping."""
    r = ctx.request
    if not try_algorithms or (ctx.algorithms, ctx.config.weight_clipping) == (ALL_ALGORITHMS, WeightClipping.MSE):
        return [], ()
    if r.data_path is None:
        raise MissingInput(
            f"{r.model_path}: the search's algorithm stage transforms and calibrates the model: give $data_path",
            option="data_path",
        )
    alt, alt_reports = _all_algorithms(ctx, _inputs(ctx, r.data_path))
    return [alt], alt_reports


def _all_algorithms(
    ctx: ConvertContext, inputs: AlgorithmInputs
) -> tuple[SearchBase, tuple[EqualizationReport | SmoothQuantReport, ...]]:
    """The algorithm stage's base: every algorithm and MSE weight clipping, on ``inputs``."""
    mse = replace(ctx.config, weight_clipping=WeightClipping.MSE)
    alt, reports = algorithm_base(need(ctx.prepared, "the model"), mse, ALL_ALGORITHMS, inputs)
    return replace(alt, name="all algorithms"), reports


def validate(ctx: ConvertContext) -> None:
    """The written model must pass onnx's checker and load in onnxruntime (before anything is written)."""
    quantized = need(ctx.quantized, "the converted model")
    try:
        check_model(quantized)
    except onnx.checker.ValidationError as exc:  # a bug in quantcli, not the user's fault
        raise RuntimeError(f"quantcli produced an invalid model: {exc}") from exc
    make_session(quantized, source=ctx.source)


def audit(ctx: ConvertContext) -> None:
    """What onnxruntime runs: integer kernels, float compute and why, MACs."""
    from quantcli.verify.audit import audit_fusion

    model, plan_ = need(ctx.model, "the model"), need(ctx.plan, "the plan")
    ctx.audit = audit_fusion(
        need(ctx.quantized, "the converted model"),
        skips=plan_.skipped,
        feed=_sample_feed(model, ctx.request.data_path, ctx),
    )
    _require_integer_macs(ctx)


def _require_integer_macs(ctx: ConvertContext) -> None:
    """A search's answer that runs no Conv/MatMul/Gemm in an integer kernel is no quantized model:
    nothing is written (unless ``force``, which writes it with a warning) and the closest candidate is named."""
    from quantcli.search.accuracy_search import BudgetNotMetError, closest_quantized, describe_trial

    searched, audited, r = ctx.searched, need(ctx.audit, "the audit"), ctx.request
    if searched is None or not audited.nodes or any(n.integer for n in audited.nodes):
        return
    closest = closest_quantized(searched, [n.name for n in audited.nodes]) or searched.chosen
    floats = ", ".join(closest.candidate.float_nodes) or "none"
    text = (
        f"{r.model_path}: the search's answer runs none of its {len(audited.nodes)} Conv/MatMul/Gemm in integer "
        f"kernels ({audited.macs():,} MACs per sample in float): not a quantized model. Closest quantized "
        f"candidate: {describe_trial(closest)}; float nodes: {floats}"
    )
    if r.force:
        ctx.log(f"warning: {text}; written anyway (forced)")
        return
    raise BudgetNotMetError(
        f"{text}. Nothing written: keep the FP32 model, loosen the budget, or pass $force to write it",
        options=("force",),
    )


def _sample_feed(model: onnx.ModelProto, data_path: Path | None, ctx: ConvertContext) -> dict[str, np.ndarray] | None:
    """One sample of the data, to resolve dynamic shapes in the MAC counts (zeros of the shapes the calibration
    file recorded when convert has no data: MACs do not depend on values; None if unavailable)."""
    if data_path is None:
        return _recorded_feed(model, ctx)
    try:
        return next(ctx.fmt.open(data_path, model_input_specs(model), max_samples=1).batches(1))
    except (QuantCliError, StopIteration):
        return None


def _recorded_feed(model: onnx.ModelProto, ctx: ConvertContext) -> dict[str, np.ndarray] | None:
    shapes = ctx.calibration.input_shapes if ctx.calibration is not None else {}
    specs = model_input_specs(model)
    if not shapes or any(spec.name not in shapes for spec in specs):
        return None
    return {spec.name: np.zeros(shapes[spec.name], dtype=spec.dtype) for spec in specs}


def require_fused(ctx: ConvertContext) -> None:
    """With ``require_fused``: every quantized Conv/MatMul/Gemm became an integer kernel."""
    if not ctx.request.require_fused:
        return
    planned = {name for name, op in need(ctx.plan, "the plan").quantized_nodes if op in ("Conv", "MatMul", "Gemm")}
    left = [n for n in need(ctx.audit, "the audit").float_nodes() if n.name in planned]
    if left:
        listed = "; ".join(f"{n.name} ({n.op_type}): {n.reason}" for n in left[:10])
        more = f"; and {len(left) - 10} more" if len(left) > 10 else ""
        raise QuantCliError(
            f"{ctx.request.model_path}: $require_fused: {len(left)} quantized Conv/MatMul/Gemm did not fuse into "
            f"integer kernels: {listed}{more}",
            options=("require_fused",),
        )


def check_speedup(ctx: ConvertContext) -> None:
    """Time both models at batch 1 when asked (or with an accuracy budget, unless ``force``):
    nothing is written unless the quantized model is faster."""
    from quantcli.search.accuracy_search import describe_trial
    from quantcli.verify.speedcheck import check_speedup as timed

    r, model = ctx.request, need(ctx.model, "the model")
    budgeted = ctx.searched is not None and not r.force  # the answer to a budget must also be faster
    if not (r.require_speedup or budgeted):
        return
    feed_path = r.data_path if r.data_path is not None else r.eval_data
    speed = ctx.speed = timed(model, need(ctx.quantized, "the converted model"), _batch1_feed(model, feed_path, ctx))
    # a search's answer must be faster in most rounds, not by a coin toss at 1.0x
    if not (speed.shown_faster if budgeted else speed.faster):
        met = "meets the accuracy budget but " if ctx.searched is not None else ""
        how = "drop $require_speedup" if r.require_speedup else "pass $force"
        spread = f", lower quartile x{speed.low:.2f}" if budgeted and speed.low is not None else ""
        chosen = f" The search's answer: {describe_trial(ctx.searched.chosen)}." if ctx.searched is not None else ""
        raise NotFasterError(
            f"{r.model_path}: the quantized model {met}is not faster than FP32 at batch 1 "
            f"({speed.quantized_ms:.3f} ms vs {speed.fp32_ms:.3f} ms, x{speed.speedup:.2f}{spread} over "
            f"{speed.rounds} rounds); nothing written.{chosen} Keep the FP32 model, or {how} to write it anyway",
            options=("require_speedup", "force"),
        )


def _batch1_feed(model: onnx.ModelProto, data_path: Path | None, ctx: ConvertContext) -> dict[str, np.ndarray]:
    """One sample to time on: the first of ``data_path``, else random (timing only, never accuracy)."""
    specs = model_input_specs(model)
    if data_path is not None:
        return next(ctx.fmt.open(data_path, specs, max_samples=1).batches(1))
    try:
        return next(random_dataset(specs, 1).batches(1))
    except QuantCliError as exc:
        raise MissingInput(
            f"$require_speedup needs $data_path to time this model: {exc}",
            option="data_path",
            options=("require_speedup",),
        ) from exc


def shape_facts(ctx: ConvertContext) -> None:
    """Quantized activations whose shape onnx shape inference cannot tell (reported, not needed)."""
    inferred, ctx.shape_error = infer_shapes(need(ctx.prepared, "the model"))
    known = known_shapes(inferred)
    ctx.unknown_shapes = tuple(a.tensor for a in need(ctx.plan, "the plan").activations if a.tensor not in known)


def save(ctx: ConvertContext) -> None:
    """Write the converted model (atomically; an existing file only with ``force``)."""
    r = ctx.request  # a model read with external data is written with it (else: only above 2 GB)
    external = True if has_external_data(r.model_path) else None
    save_model(need(ctx.quantized, "the converted model"), r.output_path, force=r.force, external_data=external)


def save_recipe(ctx: ConvertContext) -> None:
    """Write the search's decisions for a later replay."""
    from quantcli.search.recipe import write_recipe

    r = ctx.request
    if ctx.searched is not None and r.save_recipe is not None:
        recipe = ctx.searched.recipe(ctx.sha256, ctx.config, ctx.percentile)
        if ctx.search_data is not None and ctx.calibration_data is not None:  # held back: the replay holds the same
            scored = ctx.search_data.num_samples
            recipe = replace(recipe, held_back=(scored, scored + ctx.calibration_data.num_samples))
        write_recipe(recipe, r.save_recipe, force=r.force)
