"""The four commands as plain functions: ``calibrate``, ``convert``, ``compare_models``, ``inspect_model``.

The command line is a thin layer over these; tests and scripts call them directly. ``calibrate``,
``convert`` and ``compare_models`` take a request (``quantcli.pipeline.request``), checked once when it
is built; ``calibrate_model``, ``convert_model`` and ``compare_paths`` are their keyword forms, whose
keywords are the request's fields (typed: ``CalibrateOptions``, ``ConvertOptions``, ``CompareOptions``).
The package's top level (``quantcli.calibrate`` ...) wraps these for notebooks.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import onnx

from quantcli.compare.result import CompareResult
from quantcli.core.errors import InvalidOption, QuantCliError
from quantcli.core.options import AlgorithmOptions, CalibrationMethod, QuantConfig
from quantcli.core.process import trim_heap
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import DataFormat, model_input_specs, open_dataset, random_dataset
from quantcli.data.images import ImagePreprocess
from quantcli.graph.atomic import release_scratch, scratch_directory
from quantcli.graph.model_io import file_sha256, graph_only, holds_spillable_weights, load_model, spill_weights
from quantcli.graph.scopes import walk_graphs
from quantcli.graph.session import make_session
from quantcli.modes.common import ConvertMode
from quantcli.passes.preprocess import preprocess
from quantcli.pipeline.context import need
from quantcli.pipeline.convert import run_convert
from quantcli.pipeline.inputs import opset_note as _opset_note
from quantcli.pipeline.inputs import prepare_input as _prepare_input
from quantcli.pipeline.request import CalibrateRequest, CompareRequest, ConvertRequest
from quantcli.pipeline.result import ConvertResult
from quantcli.pipeline.steps import ALL_ALGORITHMS
from quantcli.stats.calibration import CalibrationOptions, CalibrationResult
from quantcli.stats.calibration import calibrate as calibrate_prepared
from quantcli.stats.merge import MergedCalibration, merge_files
from quantcli.stats.shards import ShardSpec, ShardStats, collect_shard
from quantcli.verify.audit import FusionAudit, audit_fusion

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from quantcli.compare.evaluate import LatencyComparison
    from quantcli.compare.map_thresholds import MapThreshold
    from quantcli.compare.metrics import MetricSpec
    from quantcli.compare.output_kinds import OutputKind
    from quantcli.data.datasets import Dataset
    from quantcli.modes.dynamic import DynamicOptions
    from quantcli.modes.weight_only import WeightOnlyOptions
    from quantcli.search.accuracy_search import SearchOptions
    from quantcli.search.recipe import Recipe

__all__ = [
    "ALL_ALGORITHMS",
    "CalibrateOptions",
    "CalibrateRequest",
    "CompareOptions",
    "CompareRequest",
    "CompareResult",
    "ConvertOptions",
    "ConvertRequest",
    "ConvertResult",
    "MergedCalibration",
    "ModelSummary",
    "ShardSpec",
    "ShardStats",
    "calibrate",
    "calibrate_model",
    "calibrate_shard",
    "compare_models",
    "compare_paths",
    "convert",
    "convert_model",
    "inspect_model",
    "merge_statistics",
    "option_values",
]


class CalibrateOptions(TypedDict, total=False):
    """``CalibrateRequest``'s fields after the paths, as keywords (``calibrate_model``, ``quantcli.calibrate``)."""

    method: CalibrationMethod | str
    percentile: float
    batch_size: int
    max_samples: int | None
    threads: int
    max_memory: int | None
    shuffle: bool
    seed: int
    timeout: float | None
    upgrade_opset: bool
    images: ImagePreprocess | None
    random_samples: int | None
    batch_axes: Mapping[str, int | None] | None


class ConvertOptions(TypedDict, total=False):
    """``ConvertRequest``'s fields after the paths, as keywords (``convert_model``, ``quantcli.convert``)."""

    calibration: CalibrationResult | Path | str | None
    data_path: Path | str | None
    config: QuantConfig | None
    method: CalibrationMethod | str | None
    percentile: float
    force: bool
    require_fused: bool
    require_speedup: bool
    upgrade_opset: bool
    timeout: float | None
    search: SearchOptions | None
    eval_data: Path | str | None
    recipe: Recipe | Path | None
    save_recipe: Path | str | None
    algorithms: AlgorithmOptions
    mode: ConvertMode | str
    mode_options: DynamicOptions | WeightOnlyOptions | None
    batch_axes: Mapping[str, int | None] | None
    images: ImagePreprocess | None
    verdict: bool
    verdict_share: float
    output_kinds: Mapping[str, OutputKind] | None
    map_threshold: MapThreshold


class CompareOptions(TypedDict, total=False):
    """``CompareRequest``'s fields after the paths, as keywords (``compare_paths``, ``quantcli.compare``)."""

    batch_size: int
    max_samples: int | None
    threads: int
    latency_batch_sizes: tuple[int, ...]
    warmup: int
    runs: int
    per_layer: bool
    metric: MetricSpec | None
    time_budget_s: float | None
    measure_memory: bool
    batch_axes: Mapping[str, int | None] | None
    images: ImagePreprocess | None
    output_kinds: Mapping[str, OutputKind] | None
    map_threshold: MapThreshold
    ray: str | None
    shards: int | None
    max_memory: int | None


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """What ``inspect`` reports about a model: size, parameters, op histogram, and what onnxruntime runs.

    Attributes:
        path: the model file.
        num_bytes: its size on disk.
        parameters: elements of all initializers and Constant values, If/Loop/Scan bodies included.
        num_nodes: nodes, bodies included.
        subgraphs: If/Loop/Scan bodies.
        op_counts: nodes per op type, most frequent first.
        audit: what onnxruntime runs after its optimizations (``quantcli.verify.audit``).
    """

    path: Path
    num_bytes: int
    parameters: int
    num_nodes: int
    subgraphs: int
    op_counts: dict[str, int]
    audit: FusionAudit


def option_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword options with the strings a user types made into their types.

    ``method="percentile"`` becomes ``CalibrationMethod.PERCENTILE``, ``mode="dynamic"`` a ``ConvertMode``,
    a ``calibration`` given as a string a ``Path``.

    Raises:
        InvalidOption: a string that is none of the option's values.
    """
    values = dict(fields)
    for key, kind in (("method", CalibrationMethod), ("mode", ConvertMode)):
        value = values.get(key)
        if isinstance(value, str) and not isinstance(value, kind):
            if value not in {str(v) for v in kind}:
                raise InvalidOption(f"${key} {value!r} is not one of {', '.join(map(str, kind))}", option=key)
            values[key] = kind(value)
    if isinstance(values.get("calibration"), str):
        values["calibration"] = Path(values["calibration"])
    return values


def calibrate(
    request: CalibrateRequest, *, progress: Progress = no_progress, log: Callable[[str], None] | None = None
) -> CalibrationResult:
    """Collect activation ranges of ``request.model_path`` over ``request.data_path``.

    With no data path, ``request.random_samples`` random inputs are used: for smoke tests only.
    ``request.batch_axes`` names inputs not batched on axis 0 (``quantcli.data.datasets.open_dataset``).
    ``log`` receives one line when the model's opset is upgraded in memory.
    """
    prepared, dataset, options = _calibration_inputs(request, log)
    with contextlib.ExitStack() as stack:
        if holds_spillable_weights(prepared):
            # the weights wait in a file the sessions map, not in quantcli's model while onnxruntime
            # builds its copy from them (ddddocr OCR recognizer, 54 MB: peak RSS 282 -> 207 MB)
            folder, lock = scratch_directory(Path(tempfile.gettempdir()))
            stack.callback(release_scratch, folder, lock)
            prepared = spill_weights(prepared, folder)
        trim_heap()  # the models that held the weights are gone: before the session allocates
        return calibrate_prepared(
            prepared, dataset, options, model_sha256=file_sha256(request.model_path), progress=progress
        )


def _calibration_inputs(
    r: CalibrateRequest, log: Callable[[str], None] | None = None
) -> tuple[onnx.ModelProto, Dataset, CalibrationOptions]:
    """The prepared model, the opened data and the calibration options of a request (``log``: the opset note).

    Weights kept in external data stay in their files: onnxruntime reads them from there, so its
    session's copy is the only one (``load_model(weights=False)``). The model is this function's own
    (read here, or the opset converter's copy of it): it is cleaned in place, and the one read is
    dropped once upgraded, so no more than two copies of the weights are ever held.
    """
    loaded = load_model(r.model_path, weights=False)
    model = _prepare_input(loaded, r.model_path, upgrade_opset=r.upgrade_opset)
    note = _opset_note(loaded, model)
    del loaded  # the upgraded copy (if any) is all that is needed from here
    if note is not None and log is not None:
        log(note)
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
    prepared, _ = preprocess(model, in_place=True)
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
    model_path: Path,
    data_path: Path | None = None,
    *,
    progress: Progress = no_progress,
    **fields: Unpack[CalibrateOptions],
) -> CalibrationResult:
    """``calibrate`` with the request's fields as keywords (``method=...``, ``max_samples=...``, ...).

    Raises:
        TypeError: a keyword that is no field of ``CalibrateRequest``.
    """
    data = None if data_path is None else Path(data_path)
    return calibrate(CalibrateRequest(Path(model_path), data, **option_values(fields)), progress=progress)


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
    progress: Progress = no_progress,
    log: Callable[[str], None] | None = None,
    **fields: Unpack[ConvertOptions],
) -> ConvertResult:
    """``convert`` with the request's fields as keywords (the form scripts and tests call).

    Every keyword but ``progress`` and ``log`` is the ``ConvertRequest`` field of the same name.

    Raises:
        TypeError: a keyword that is no field of ``ConvertRequest``.
    """
    request = ConvertRequest(Path(model_path), Path(output_path), **option_values(fields))
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


def compare_models(
    request: CompareRequest, *, progress: Progress = no_progress, log: Callable[[str], None] | None = None
) -> CompareResult:
    """Compare ``request.candidate_path`` (quantized) against ``request.reference_path`` (FP32) on the same data.

    ``log`` receives one line when the per-layer pass runs at a smaller batch to fit ``request.max_memory``.

    With ``request.ray`` the accuracy part runs in shard tasks on Ray (``quantcli.distributed``), the
    same result; latency and memory are always measured here.
    """
    from quantcli.compare.accuracy import load_for_compare, measure_accuracy, open_compare_data

    r = request
    ref_model = load_for_compare(r.reference_path, per_layer=r.per_layer)
    cand_model = load_for_compare(r.candidate_path, per_layer=r.per_layer)
    _check_signatures(ref_model, cand_model, r.reference_path, r.candidate_path)
    dataset = open_compare_data(r, ref_model)
    integer_kernels = audit_fusion(r.candidate_path).integer_op_counts()  # from the file; before the sessions
    ref = make_session(ref_model, threads=r.threads, source=str(r.reference_path))
    cand = make_session(cand_model, threads=r.threads, source=str(r.candidate_path))
    if not r.per_layer:  # only per-layer errors read the models again: above 2 GB keep their graphs only
        ref_model, cand_model = graph_only(ref_model), graph_only(cand_model)
    if r.ray is not None:
        from quantcli.distributed import compare_accuracy_on_ray

        accuracy = compare_accuracy_on_ray(r, (ref_model, cand_model), ref, dataset)
    else:
        accuracy = measure_accuracy((ref_model, cand_model), (ref, cand), dataset, r, progress=progress, log=log)
    latency = _latencies(r, ref, cand, dataset)
    ref_peak, cand_peak = _peak_memory(r, dataset) if r.measure_memory else (None, None)
    return CompareResult(
        reference_path=r.reference_path,
        candidate_path=r.candidate_path,
        data_path=r.data_path,
        num_samples=dataset.num_samples,
        outputs=accuracy.outputs,
        latency=latency,
        reference_bytes=r.reference_path.stat().st_size,
        candidate_bytes=r.candidate_path.stat().st_size,
        integer_kernels=integer_kernels,
        layers=accuracy.layers,
        task_metric=accuracy.task_metric,
        reference_peak_mb=ref_peak,
        candidate_peak_mb=cand_peak,
        kinds=accuracy.kinds,
    )


def compare_paths(
    reference_path: Path,
    candidate_path: Path,
    data_path: Path,
    *,
    progress: Progress = no_progress,
    **fields: Unpack[CompareOptions],
) -> CompareResult:
    """``compare_models`` with the request's fields as keywords (``runs=...``, ``per_layer=True``, ...)."""
    request = CompareRequest(reference_path, candidate_path, data_path, **option_values(fields))
    return compare_models(request, progress=progress)


def inspect_model(
    model_path: Path, *, data_path: Path | None = None, batch_axes: Mapping[str, int | None] | None = None
) -> ModelSummary:
    """Size, parameters and op histogram of a model, and what onnxruntime runs for it.

    ``data_path`` gives one sample to run, to resolve dynamic shapes for the MAC counts.
    """
    path = Path(model_path)
    model = load_model(path)
    feed = None
    if data_path is not None:
        dataset = open_dataset(Path(data_path), model_input_specs(model), max_samples=1, batch_axes=batch_axes)
        feed = next(dataset.batches(1))
    graphs = [g for _, g in walk_graphs(model.graph)]
    params = sum(int(np.prod(t.dims)) for g in graphs for t in g.initializer)
    constants = [
        a.t for g in graphs for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    params += sum(int(np.prod(t.dims)) for t in constants)
    ops = Counter(n.op_type for g in graphs for n in g.node)
    return ModelSummary(
        path=path,
        num_bytes=path.stat().st_size,
        parameters=params,
        num_nodes=sum(ops.values()),
        subgraphs=len(graphs) - 1,
        op_counts=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        audit=audit_fusion(path, feed=feed),
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
