"""The accuracy part of ``compare`` (everything but latency and memory), in one process or in shards.

What is measured: each output's error metrics (``quantcli.compare.evaluate``), each output's kind and
task-level metric (``quantcli.compare.output_kinds``), a custom task metric (``quantcli.compare.metrics``)
and, if asked, the per-layer errors (``quantcli.compare.layers``).

**Shards.** Shard K of N (``quantcli.stats.shards.ShardSpec``) takes a contiguous block of the
batches one run over all the data makes: batches floor((K-1)·B/N) up to floor(K·B/N) - 1 of the B
batches of ``batch_size``. Each shard keeps mergeable state (``AccuracyShard``): float energies per
batch, cosines and IoUs per sample, integer counts, min/max, the first batch's values, and for a
custom metric the outputs themselves. The shards merged in order hold what one run holds, so the
metrics read from them (confidence intervals included, from the merged per-sample values) are the
one-process result to the bit. Output kinds are detected on the data's first batch by the caller
(``first_batch_plan``) and given to every shard, as one run detects them there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from quantcli.compare.evaluate import OutputAccumulator, OutputMetrics, accumulate_outputs
from quantcli.compare.layers import (
    LayerError,
    LayerModels,
    LayerStatistics,
    layer_errors,
    layer_memory_budget,
    layer_models,
    layer_statistics,
)
from quantcli.compare.metrics import MetricSpec, TaskMetric, evaluate_custom
from quantcli.compare.output_kinds import KindMetrics, KindPlan, OutputKindObserver
from quantcli.core.errors import CalibrationDataError
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import Dataset, model_input_specs, open_dataset
from quantcli.graph.model_io import load_model
from quantcli.graph.session import Session, make_session
from quantcli.stats.shards import ShardSpec

if TYPE_CHECKING:
    from quantcli.pipeline.request import CompareRequest

__all__ = [
    "Accuracy",
    "AccuracyShard",
    "accuracy_shard",
    "finish_accuracy",
    "first_batch_plan",
    "load_for_compare",
    "measure_accuracy",
    "open_compare_data",
    "run_accuracy_shard",
    "shard_window",
]


@dataclass(frozen=True, slots=True)
class Accuracy:
    """The accuracy part of a ``CompareResult``."""

    outputs: list[OutputMetrics]
    kinds: list[KindMetrics]
    task_metric: TaskMetric | None
    layers: list[LayerError]


@dataclass(slots=True)
class AccuracyShard:
    """The mergeable state of one shard (or of all the data); ``merge`` appends the next shard's."""

    names: list[str]
    outputs: list[OutputAccumulator]
    kinds: OutputKindObserver
    #: every batch's outputs of both models, for a custom metric (None: no custom metric)
    collected: dict[str, list[list[np.ndarray]]] | None
    layers: LayerStatistics | None

    def merge(self, later: AccuracyShard) -> None:
        """Append ``later``: the same comparison over the batches that follow these."""
        for acc, more in zip(self.outputs, later.outputs, strict=True):
            acc.merge(more)
        self.kinds.merge(later.kinds)
        if self.collected is not None and later.collected is not None:
            for key, batches in later.collected.items():
                self.collected.setdefault(key, []).extend(batches)
        if self.layers is not None and later.layers is not None:
            self.layers.merge(later.layers)


def load_for_compare(path: Path, *, per_layer: bool) -> onnx.ModelProto:
    """A model to compare: without per-layer errors, weights kept in external data stay in their files
    (onnxruntime reads them from there: its session holds the only copy; below 2 GB it prepacks them
    as when they are read whole, so latencies are the same); with per-layer errors, the whole model."""
    return load_model(path, weights=per_layer)


def open_compare_data(request: CompareRequest, reference: onnx.ModelProto) -> Dataset:
    """The evaluation data of ``request``, read for ``reference``'s inputs."""
    r = request
    return open_dataset(
        r.data_path, model_input_specs(reference), max_samples=r.max_samples, batch_axes=r.batch_axes, images=r.images
    )


def shard_window(dataset: Dataset, batch_size: int, shard: ShardSpec) -> Dataset:
    """Shard ``shard`` of ``dataset``: the contiguous block of its batches of ``batch_size``.

    Raises:
        CalibrationDataError: the shard would hold no batch (more shards than batches).
    """
    starts = dataset.batch_starts(batch_size)
    first, stop = shard.batch_range(len(starts) - 1)
    if first >= stop:
        raise CalibrationDataError(
            f"{dataset.path}: shard {shard} holds no batch: the data makes {len(starts) - 1} batch(es) of "
            f"{batch_size}; use at most {len(starts) - 1} shards or a smaller batch size"
        )
    return dataset.window(starts[first], starts[stop])


def first_batch_plan(reference: Session, dataset: Dataset, request: CompareRequest) -> dict[str, KindPlan]:
    """The output kinds one run detects on the data's first batch (``reference``: the FP32 session)."""
    names = [o.name for o in reference.get_outputs()]
    feed = next(dataset.batches(dataset.effective_batch_size(request.batch_size)))
    observer = OutputKindObserver(request.output_kinds, map_threshold=request.map_threshold)
    return observer.start(names, reference.run(names, feed), dataset.batch_length(feed))


def accuracy_shard(
    models: tuple[onnx.ModelProto, onnx.ModelProto],
    sessions: tuple[Session, Session],
    dataset: Dataset,
    request: CompareRequest,
    *,
    plan: dict[str, KindPlan] | None = None,
    progress: Progress = no_progress,
    layers: LayerModels | None = None,
    log: Callable[[str], None] | None = None,
) -> AccuracyShard:
    """The mergeable accuracy state of (FP32, quantized) ``models`` on ``dataset`` (all, or a ``shard_window``).

    ``plan``: the output kinds from the data's first batch (None: detected here, on ``dataset``'s first).
    The per-layer pass's exposed tensors may take ``request.max_memory`` bytes (None: its default); it
    decides only the batch or how many passes that takes, never the result. ``layers``: the
    per-layer models if already built (``layer_models``; else built here when ``request.per_layer``).
    ``log``: the per-layer pass's line when it shrinks the batch to fit the budget.
    """
    r = request
    metric = r.metric or MetricSpec("top1")
    collected: dict[str, list[list[np.ndarray]]] | None = {} if metric.function is not None else None
    labels = dataset.yielded_labels()
    kinds = OutputKindObserver(r.output_kinds, map_threshold=r.map_threshold, plan=plan, labels=labels)
    outputs = accumulate_outputs(
        sessions[0], sessions[1], dataset, batch_size=r.batch_size, topk=metric.topk, collect=collected,
        progress=progress, observe=kinds,
    )  # fmt: skip
    stats = None
    if r.per_layer:
        budget = layer_memory_budget(r.max_memory)
        prepared = layers or layer_models(*models)
        stats = layer_statistics(
            prepared, dataset, batch_size=r.batch_size, max_memory=budget, progress=progress, log=log
        )
    names = [o.name for o in sessions[0].get_outputs()]
    return AccuracyShard(names, outputs, kinds, collected, stats)


def finish_accuracy(
    state: AccuracyShard,
    models: tuple[onnx.ModelProto, onnx.ModelProto],
    dataset: Dataset,
    request: CompareRequest,
    *,
    layers: LayerModels | None = None,
) -> Accuracy:
    """The metrics of all the data from its merged state (the custom metric and per-layer errors computed
    here; ``layers``: the per-layer models if already built, else built here when needed)."""
    metric = request.metric or MetricSpec("top1")
    task_metric = None
    if state.collected is not None and metric.function is not None:
        task_metric = TaskMetric(
            metric.name,
            evaluate_custom(metric, state.collected.get("reference", []), state.names, dataset.labels),
            evaluate_custom(
                metric,
                state.collected.get("candidate", []),
                state.names,
                dataset.labels,
                state.collected.get("reference", []),
            ),
        )
    errors: list[LayerError] = []
    if state.layers is not None:
        prepared = layers or layer_models(*models)
        errors = layer_errors(prepared, state.layers, dataset, max_memory=layer_memory_budget(request.max_memory))
    return Accuracy(
        outputs=[acc.result() for acc in state.outputs if acc.count],
        kinds=state.kinds.results(),
        task_metric=task_metric,
        layers=errors,
    )


def measure_accuracy(
    models: tuple[onnx.ModelProto, onnx.ModelProto],
    sessions: tuple[Session, Session],
    dataset: Dataset,
    request: CompareRequest,
    *,
    progress: Progress = no_progress,
    log: Callable[[str], None] | None = None,
) -> Accuracy:
    """The accuracy part of ``compare`` in this process (the per-layer models built once for both passes;
    ``log``: the per-layer pass's line when it shrinks the batch)."""
    layers = layer_models(*models) if request.per_layer else None
    state = accuracy_shard(models, sessions, dataset, request, progress=progress, layers=layers, log=log)
    return finish_accuracy(state, models, dataset, request, layers=layers)


def run_accuracy_shard(request: CompareRequest, shard: ShardSpec, plan: dict[str, KindPlan]) -> AccuracyShard:
    """What one shard task runs (on a worker): open both models and the data at the request's paths,
    and measure shard ``shard``. A custom metric's function is not called here: the outputs are
    collected for the caller (``request.metric`` names it; its function may be left out)."""
    ref_model = load_for_compare(request.reference_path, per_layer=request.per_layer)
    cand_model = load_for_compare(request.candidate_path, per_layer=request.per_layer)
    dataset = open_compare_data(request, ref_model)
    part = shard_window(dataset, request.batch_size, shard)
    ref = make_session(ref_model, threads=request.threads, source=str(request.reference_path))
    cand = make_session(cand_model, threads=request.threads, source=str(request.candidate_path))
    metric = request.metric or MetricSpec("top1")
    if metric.function is None and ":" in metric.name:  # a custom metric whose function stayed behind
        request = replace(request, metric=replace(metric, function=_collect_only))
    budget = layer_memory_budget(request.max_memory, shards=shard.count)  # the shards may share this host
    request = replace(request, max_memory=budget)
    return accuracy_shard((ref_model, cand_model), (ref, cand), part, request, plan=plan)


def _collect_only(outputs: dict[str, np.ndarray], labels: np.ndarray | None) -> float:
    """Stands for a custom metric on a worker: its outputs are collected, the caller calls the metric."""
    return float("nan")
