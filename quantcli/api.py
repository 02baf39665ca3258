"""The three steps as plain functions: ``calibrate_model``, ``convert``, ``compare``.

The command line is a thin layer over these; tests and scripts call them directly. ``convert`` and
``compare`` take a request (``quantcli.pipeline.request``), checked once when it is built;
``convert_model`` is the keyword form of ``convert``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from quantcli.compare.result import CompareResult
from quantcli.core.errors import QuantCliError
from quantcli.core.options import DEFAULT_PERCENTILE, AlgorithmOptions, CalibrationMethod, QuantConfig
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import DataFormat, model_input_specs, open_dataset, random_dataset
from quantcli.data.images import ImagePreprocess
from quantcli.graph.model import file_sha256, load_model
from quantcli.modes.common import ConvertMode
from quantcli.passes.preprocess import preprocess
from quantcli.pipeline.context import need
from quantcli.pipeline.convert import run_convert
from quantcli.pipeline.inputs import prepare_input as _prepare_input
from quantcli.pipeline.request import CalibrateRequest, CompareRequest, ConvertRequest
from quantcli.pipeline.result import ConvertResult
from quantcli.pipeline.steps import ALL_ALGORITHMS
from quantcli.stats.calibration import CalibrationOptions, CalibrationResult, make_session
from quantcli.stats.calibration import calibrate as calibrate_prepared
from quantcli.stats.merge import MergedCalibration, merge_files
from quantcli.stats.shards import ShardSpec, ShardStats, collect_shard

if TYPE_CHECKING:
    from quantcli.compare.evaluate import LatencyComparison
    from quantcli.compare.metrics import MetricSpec, TaskMetric
    from quantcli.data.datasets import Dataset
    from quantcli.modes.dynamic import DynamicOptions
    from quantcli.modes.weight_only import WeightOnlyOptions
    from quantcli.search.accuracy_search import SearchOptions
    from quantcli.search.recipe import Recipe

__all__ = [
    "ALL_ALGORITHMS",
    "CalibrateRequest",
    "CompareRequest",
    "CompareResult",
    "ConvertRequest",
    "ConvertResult",
    "MergedCalibration",
    "ShardSpec",
    "ShardStats",
    "calibrate",
    "calibrate_model",
    "calibrate_shard",
    "compare_models",
    "convert",
    "convert_model",
    "merge_statistics",
]


def calibrate(request: CalibrateRequest, *, progress: Progress = no_progress) -> CalibrationResult:
    """Collect activation ranges of ``request.model_path`` over ``request.data_path``.

    With no data path, ``request.random_samples`` random inputs are used: for smoke tests only.
    ``request.batch_axes`` names inputs not batched on axis 0 (``quantcli.data.datasets.open_dataset``).
    """
    prepared, dataset, options = _calibration_inputs(request)
    return calibrate_prepared(
        prepared, dataset, options, model_sha256=file_sha256(request.model_path), progress=progress
    )


def _calibration_inputs(r: CalibrateRequest) -> tuple[onnx.ModelProto, Dataset, CalibrationOptions]:
    """The prepared model, the opened data and the calibration options of a request."""
    model = _prepare_input(load_model(r.model_path), r.model_path, upgrade_opset=r.upgrade_opset)
    options = CalibrationOptions(
        method=r.method,
        percentile=r.percentile,
        batch_size=r.batch_size,
        threads=r.threads,
        max_memory=r.max_memory,
        shuffle=r.shuffle,
        seed=r.seed,
        timeout=r.timeout,
        source=str(r.model_path),
    )
    specs = model_input_specs(model)
    if r.data_path is None:
        dataset = random_dataset(specs, need(r.random_samples, "the sample count"), seed=r.seed)
    else:
        dataset = DataFormat(r.batch_axes, r.images).open(r.data_path, specs, max_samples=r.max_samples)
    prepared, _ = preprocess(model)
    return prepared, dataset, options


def calibrate_shard(
    request: CalibrateRequest, shard: ShardSpec | str, *, progress: Progress = no_progress
) -> ShardStats:
    """Calibrate shard ``shard`` (``ShardSpec`` or ``"K/N"``) of the request's data: its observer states.

    Write them with ``quantcli.stats.shards.write_statistics``; ``merge_statistics`` over all N
    files gives the same calibration as ``calibrate`` over all the data (not for moving-average).

    Raises:
        InvalidOption: ``shard`` is not K/N with 1 <= K <= N, or the method is moving-average.
    """
    spec = ShardSpec.parse(shard) if isinstance(shard, str) else shard
    prepared, dataset, options = _calibration_inputs(request)
    return collect_shard(
        prepared,
        dataset,
        options,
        spec,
        model_sha256=file_sha256(request.model_path),
        model_name=request.model_path.name,
        progress=progress,
    )


def merge_statistics(paths: Sequence[Path]) -> MergedCalibration:
    """Merge the statistics files of shards 1..N (any order) into one calibration.

    ``result`` is the same as ``calibrate`` over all the data; write it with
    ``quantcli.stats.artifact.write_calibration(merged.result, path, model_path=merged.model_name)``.

    Raises:
        ArtifactMismatchError: one line naming the file at fault (another model, other options,
            a shard given twice or missing, moving-average statistics).
    """
    return merge_files([Path(p) for p in paths])


def calibrate_model(
    model_path: Path, data_path: Path | None = None, *, progress: Progress = no_progress, **fields: Any
) -> CalibrationResult:
    """``calibrate`` with the request's fields as keywords (``method=...``, ``max_samples=...``, ...).

    Raises:
        TypeError: a keyword that is no field of ``CalibrateRequest``.
    """
    return calibrate(CalibrateRequest(Path(model_path), data_path, **fields), progress=progress)


def convert(
    request: ConvertRequest, *, progress: Progress = no_progress, log: Callable[[str], None] | None = None
) -> ConvertResult:
    """Quantize ``request.model_path`` and write the result to ``request.output_path``.

    The request says how (``quantcli.pipeline.request.ConvertRequest``); the steps run are listed in
    ``quantcli.pipeline.convert``. ``progress`` wraps data loops; ``log`` receives one line per
    search step.

    Raises:
        QuantCliError: bad input, or ``require_fused`` and a quantized Conv/MatMul/Gemm stayed float.
        NotFasterError: ``require_speedup`` (or a search without ``force``) and the quantized model
            is not faster than FP32 at batch 1.
    """
    return run_convert(request, progress=progress, log=log)


def convert_model(
    model_path: Path,
    output_path: Path,
    *,
    calibration: CalibrationResult | Path | None = None,
    data_path: Path | None = None,
    config: QuantConfig | None = None,
    method: CalibrationMethod | None = None,
    percentile: float = DEFAULT_PERCENTILE,
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
    log: Callable[[str], None] | None = None,
    mode: ConvertMode = ConvertMode.STATIC,
    mode_options: DynamicOptions | WeightOnlyOptions | None = None,
    batch_axes: Mapping[str, int | None] | None = None,
    images: ImagePreprocess | None = None,
) -> ConvertResult:
    """``convert`` with the request's fields as keywords (the form scripts and tests call).

    Every keyword but ``progress`` and ``log`` is the ``ConvertRequest`` field of the same name.
    """
    request = ConvertRequest(
        model_path,
        output_path,
        calibration=calibration,
        data_path=data_path,
        config=config,
        method=method,
        percentile=percentile,
        force=force,
        require_fused=require_fused,
        require_speedup=require_speedup,
        upgrade_opset=upgrade_opset,
        timeout=timeout,
        search=search,
        eval_data=eval_data,
        recipe=recipe,
        save_recipe=save_recipe,
        algorithms=algorithms or AlgorithmOptions(),
        mode=mode,
        mode_options=mode_options,
        batch_axes=batch_axes,
        images=images,
    )
    return convert(request, progress=progress, log=log)


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


def compare_models(request: CompareRequest, *, progress: Progress = no_progress) -> CompareResult:
    """Compare ``request.candidate_path`` (quantized) against ``request.reference_path`` (FP32) on the same data."""
    from quantcli.compare.evaluate import compare_outputs
    from quantcli.compare.layers import per_layer_errors
    from quantcli.compare.metrics import MetricSpec
    from quantcli.verify.audit import audit_fusion

    r = request
    ref_model, cand_model = load_model(r.reference_path), load_model(r.candidate_path)
    _check_signatures(ref_model, cand_model, r.reference_path, r.candidate_path)
    dataset = open_dataset(
        r.data_path, model_input_specs(ref_model), max_samples=r.max_samples, batch_axes=r.batch_axes, images=r.images
    )
    ref = make_session(ref_model, threads=r.threads, source=str(r.reference_path))
    cand = make_session(cand_model, threads=r.threads, source=str(r.candidate_path))
    metric = r.metric or MetricSpec("top1")
    collected: dict[str, list[list[np.ndarray]]] | None = {} if metric.function is not None else None
    outputs = compare_outputs(
        ref, cand, dataset, batch_size=r.batch_size, topk=metric.topk, collect=collected, progress=progress
    )
    task_metric = _task_metric(metric, collected, [o.name for o in ref.get_outputs()], dataset)
    del collected
    latency = _latencies(r, ref, cand, dataset)
    ref_peak, cand_peak = _peak_memory(r, dataset) if r.measure_memory else (None, None)
    layers = (
        per_layer_errors(ref_model, cand_model, dataset, batch_size=r.batch_size, progress=progress)
        if r.per_layer
        else []
    )
    return CompareResult(
        reference_path=r.reference_path,
        candidate_path=r.candidate_path,
        data_path=r.data_path,
        num_samples=dataset.num_samples,
        outputs=outputs,
        latency=latency,
        reference_bytes=r.reference_path.stat().st_size,
        candidate_bytes=r.candidate_path.stat().st_size,
        integer_kernels=audit_fusion(cand_model).integer_op_counts(),
        layers=layers,
        task_metric=task_metric,
        reference_peak_mb=ref_peak,
        candidate_peak_mb=cand_peak,
    )


def _task_metric(
    metric: MetricSpec, collected: dict[str, list[list[np.ndarray]]] | None, names: list[str], dataset: Dataset
) -> TaskMetric | None:
    """A custom metric on all outputs of both models (None for top-k metrics)."""
    from quantcli.compare.metrics import TaskMetric, evaluate_custom

    if collected is None:
        return None
    return TaskMetric(
        metric.name,
        evaluate_custom(metric, collected["reference"], names, dataset.labels),
        evaluate_custom(metric, collected["candidate"], names, dataset.labels),
    )


def _latencies(r: CompareRequest, ref: Any, cand: Any, dataset: Dataset) -> list[LatencyComparison]:
    """Both models (onnxruntime sessions) timed at each batch size the data can fill."""
    from quantcli.compare.evaluate import measure_latency

    latency: list[LatencyComparison] = []
    for bs in r.latency_batch_sizes:
        size = dataset.effective_batch_size(bs)
        if size > dataset.num_samples:
            continue
        feed = next(dataset.batches(size))
        latency.append(
            measure_latency(
                ref, cand, feed, threads=r.threads, warmup=r.warmup, runs=r.runs, time_budget_s=r.time_budget_s
            )
        )
    return latency


def _peak_memory(r: CompareRequest, dataset: Dataset) -> tuple[float | None, float | None]:
    """Each model's session peak memory on a batch of the largest timed size."""
    from quantcli.compare.evaluate import session_peak_memory

    feed = next(dataset.batches(dataset.effective_batch_size(max(r.latency_batch_sizes or (1,)))))
    return (
        session_peak_memory(str(r.reference_path), feed, threads=r.threads),
        session_peak_memory(str(r.candidate_path), feed, threads=r.threads),
    )
