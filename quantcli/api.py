"""The three steps as plain functions: ``calibrate_model``, ``convert_model``, ``compare_models``.

The command line is a thin layer over these; tests and scripts call them directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.version_converter

from quantcli.artifact import read_calibration
from quantcli.audit import FusionAudit, audit_fusion
from quantcli.calibration import CalibrationResult, calibrate, make_session, rechoose
from quantcli.data import model_input_specs, open_dataset, random_dataset
from quantcli.errors import QuantCliError, UnsupportedModelError
from quantcli.evaluate import (
    LatencyComparison,
    OutputMetrics,
    compare_outputs,
    measure_latency,
    session_peak_memory,
)
from quantcli.graph import file_sha256, load_model, model_opset, save_model
from quantcli.host import default_config
from quantcli.images import ImagePreprocess
from quantcli.layers import LayerError, per_layer_errors
from quantcli.metrics import MetricSpec, TaskMetric, evaluate_custom
from quantcli.options import CalibrationMethod, QuantConfig
from quantcli.planning import QuantPlan, make_plan
from quantcli.preprocess import PreprocessReport, preprocess
from quantcli.progress import Progress, no_progress
from quantcli.rewrite import apply_plan

__all__ = [
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


def _prepare_input(model: onnx.ModelProto, path: Path, *, upgrade_opset: bool) -> onnx.ModelProto:
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
    if opset < MIN_OPSET:
        if not upgrade_opset:
            raise UnsupportedModelError(
                f"{path}: opset {opset} is too old for per-channel QuantizeLinear/DequantizeLinear "
                f"(needs >= {MIN_OPSET}); pass --upgrade-opset to convert it with onnx's version converter"
            )
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            first = " ".join(str(exc).split())[:200]
            raise UnsupportedModelError(
                f"{path}: onnx's version converter cannot upgrade opset {opset}: {first}"
            ) from exc
    return model


def calibrate_model(
    model_path: Path,
    data_path: Path | None,
    *,
    method: CalibrationMethod = CalibrationMethod.MINMAX,
    percentile: float = 99.99,
    batch_size: int = 32,
    max_samples: int | None = None,
    threads: int = 0,
    max_memory: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    timeout: float | None = None,
    upgrade_opset: bool = False,
    images: ImagePreprocess | None = None,
    random_samples: int | None = None,
    progress: Progress = no_progress,
) -> CalibrationResult:
    """Collect activation ranges of the model at ``model_path`` over the data at ``data_path``.

    ``random_samples`` (with ``data_path`` None) calibrates on random inputs: for smoke tests only.
    """
    model = _prepare_input(load_model(model_path), model_path, upgrade_opset=upgrade_opset)
    if data_path is None:
        if not random_samples:
            raise QuantCliError("calibration needs --data PATH (or --random N for a smoke test)")
        dataset = random_dataset(model_input_specs(model), random_samples, seed=seed)
    else:
        dataset = open_dataset(data_path, model_input_specs(model), max_samples=max_samples, images=images)
    prepared, _ = preprocess(model)
    return calibrate(
        prepared,
        dataset,
        model_sha256=file_sha256(model_path),
        method=method,
        percentile=percentile,
        batch_size=batch_size,
        threads=threads,
        max_memory=max_memory,
        shuffle=shuffle,
        seed=seed,
        timeout=timeout,
        source=str(model_path),
        progress=progress,
    )


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What ``convert_model`` did: the plan, the fusion audit of the written model, and sizes."""

    output_path: Path
    plan: QuantPlan
    preprocess: PreprocessReport
    audit: FusionAudit
    input_bytes: int
    output_bytes: int
    calibration: CalibrationResult


def _sample_feed(model: onnx.ModelProto, data_path: Path | None) -> dict[str, np.ndarray] | None:
    """One sample of the data, to resolve dynamic shapes in the MAC counts (None if unavailable)."""
    if data_path is None:
        return None
    try:
        return next(open_dataset(data_path, model_input_specs(model), max_samples=1).batches(1))
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
    upgrade_opset: bool = False,
    timeout: float | None = None,
    progress: Progress = no_progress,
) -> ConvertResult:
    """Quantize the model at ``model_path`` and write a QDQ model to ``output_path``.

    Give either a calibration (result or file) or ``data_path`` to calibrate on the fly. With a
    calibration and a ``method`` other than its own, ranges are re-chosen from its stored histograms.

    Raises:
        QuantCliError: bad input, or ``require_fused`` and a quantized Conv/MatMul/Gemm stayed float.
    """
    config = config or default_config()
    model_path, output_path = Path(model_path), Path(output_path)
    if output_path.exists() and output_path.resolve() == model_path.resolve():
        raise QuantCliError(f"{output_path}: output would overwrite the input model; choose another path")
    model = _prepare_input(load_model(model_path), model_path, upgrade_opset=upgrade_opset)
    sha = file_sha256(model_path)
    if isinstance(calibration, (str, os.PathLike)):
        calibration = read_calibration(Path(calibration), expected_sha256=sha)
    elif calibration is None:
        if data_path is None:
            raise QuantCliError("convert needs --calibration CALIB.json or --data PATH to calibrate on the fly")
        calibration = calibrate_model(
            model_path,
            data_path,
            method=method or CalibrationMethod.MINMAX,
            percentile=percentile,
            timeout=timeout,
            upgrade_opset=upgrade_opset,
            progress=progress,
        )
    elif calibration.model_sha256 != sha:
        raise QuantCliError(f"{model_path}: the calibration was made for another model (sha256 differs)")
    if method is not None and method != calibration.method:
        calibration = rechoose(calibration, method, percentile=percentile)
    prepared, pre_report = preprocess(model)
    plan = make_plan(prepared, calibration.ranges, config)
    quantized = apply_plan(prepared, plan)
    try:
        onnx.checker.check_model(quantized)
    except onnx.checker.ValidationError as exc:  # a bug in quantcli, not the user's fault
        raise RuntimeError(f"quantcli produced an invalid model: {exc}") from exc
    make_session(quantized, source=str(model_path))  # loads in onnxruntime before anything is written
    audit = audit_fusion(
        quantized, skipped={s.node: s.reason for s in plan.skipped}, feed=_sample_feed(model, data_path)
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
    save_model(quantized, output_path, force=force)
    return ConvertResult(
        output_path=output_path,
        plan=plan,
        preprocess=pre_report,
        audit=audit,
        input_bytes=model_path.stat().st_size,
        output_bytes=output_path.stat().st_size,
        calibration=calibration,
    )


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
) -> CompareResult:
    """Compare ``candidate_path`` (quantized) against ``reference_path`` (FP32) on the same data."""
    ref_model = load_model(reference_path)
    cand_model = load_model(candidate_path)
    _check_signatures(ref_model, cand_model, reference_path, candidate_path)
    dataset = open_dataset(data_path, model_input_specs(ref_model), max_samples=max_samples)
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
