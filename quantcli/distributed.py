"""Calibration and comparison in shards as Ray tasks, merged on the driver (optional: ``pip install 'quantcli[ray]'``).

* ``calibrate_on_ray(request, address=..., shards=N)`` runs shard K of N (``quantcli.stats.shards``)
  as one Ray task each, every task running onnxruntime on its block of batches, and merges the
  observer states on the driver (``quantcli.stats.merge``): the result is the same as
  ``quantcli.api.calibrate`` over all the data.
* ``compare_accuracy_on_ray(request, ...)`` (``compare --ray``) runs the accuracy part of compare
  (``quantcli.compare.accuracy``) the same way: each task measures a contiguous block of batches and
  returns mergeable state (per-batch energies, per-sample values, counts), merged in shard order on
  the driver into exactly the one-process result. Latency stays measured on the driver (one host).
* ``score_on_ray(evaluator, models)`` (``convert --ray`` with a search budget) scores the accuracy
  search's independent candidates as one Ray task each: the evaluator (evaluation feeds and FP32
  outputs) goes through Ray's object store once, each task builds the candidate's session and returns
  its score, the same as the driver computes (``quantcli.search.accuracy_search``).
* ``ray_cluster(address)`` and ``run_on_ray(function, argument_tuples)`` are the one path both use to
  start or join Ray and run tasks with quantcli's errors kept; they are public for other callers
  (e.g. evaluating search candidates as tasks).

Ray is imported here only, when called: the base install never imports it. Each task opens the
model and data at the request's paths: on a cluster they must be readable at the same paths on
every node (a shared file system), and quantcli installed there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from quantcli.core.errors import QuantCliError
from quantcli.pipeline.request import CalibrateRequest, CompareRequest
from quantcli.stats.merge import MergedCalibration, merge_shards
from quantcli.stats.shards import ShardSpec, ShardStats

if TYPE_CHECKING:
    import onnx

    from quantcli.compare.accuracy import Accuracy, AccuracyShard
    from quantcli.compare.output_kinds import KindPlan
    from quantcli.data.datasets import Dataset
    from quantcli.graph.session import Session
    from quantcli.search.budget import Score
    from quantcli.search.evaluator import Evaluator

__all__ = ["calibrate_on_ray", "compare_accuracy_on_ray", "ray_cluster", "run_on_ray", "score_on_ray"]

T = TypeVar("T")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise QuantCliError("running on Ray needs Ray; install it with: pip install 'quantcli[ray]'") from None
    return ray


@contextmanager
def ray_cluster(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[int]:
    """Ray, started or joined for the ``with`` block; yields the cluster's CPU count.

    ``address``: a running cluster (``"auto"``, ``"ray://host:10001"``); None or ``"local"`` starts a
    local Ray on this machine with ``num_cpus`` CPUs (None: all). A Ray already initialised in this
    process is used as it is, and left running; one started here is shut down on exit.

    Raises:
        QuantCliError: Ray is not installed.
    """
    ray = _import_ray()
    address = None if address == "local" else address
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=num_cpus if address is None else None, log_to_driver=False)
    try:
        yield max(1, int(ray.cluster_resources().get("CPU", 1)))
    finally:
        if started:
            ray.shutdown()


def run_on_ray(function: Callable[..., T], arguments: Sequence[tuple[Any, ...]]) -> list[T]:
    """``function(*args)`` for each tuple of ``arguments`` as one Ray task (1 CPU each), results in order.

    Call it inside ``ray_cluster``. ``function`` must be importable on the workers (a module-level
    function of an installed package).

    Raises:
        QuantCliError: a task raised one (re-raised as it is: the user's problem, as one process says it).
    """
    ray = _import_ray()
    task = ray.remote(num_cpus=1)(function)
    try:
        return list(ray.get([task.remote(*args) for args in arguments]))
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, QuantCliError):
            raise cause from None
        raise


def _shard_task(request: CalibrateRequest, shard: ShardSpec) -> ShardStats:
    """What one calibration task runs: one shard's statistics (on the worker)."""
    from quantcli.api import calibrate_shard

    return calibrate_shard(request, shard)


def calibrate_on_ray(
    request: CalibrateRequest, *, address: str | None = None, shards: int | None = None, num_cpus: int | None = None
) -> MergedCalibration:
    """Calibrate ``request`` in ``shards`` Ray tasks (None: one per CPU of the cluster) and merge them.

    ``address`` and ``num_cpus``: as ``ray_cluster``.

    Raises:
        QuantCliError: Ray is not installed, or a task failed (its error, as a quantcli error when
            it was one).
    """
    with ray_cluster(address, num_cpus=num_cpus) as cpus:
        specs = [ShardSpec(k, shards or cpus) for k in range(1, (shards or cpus) + 1)]
        stats = run_on_ray(_shard_task, [(request, spec) for spec in specs])
    return merge_shards(stats, [Path(f"<ray task {spec}>") for spec in specs])


def _compare_task(request: CompareRequest, shard: ShardSpec, plan: dict[str, KindPlan]) -> AccuracyShard:
    """What one compare task runs: one shard's mergeable accuracy state (on the worker)."""
    from quantcli.compare.accuracy import run_accuracy_shard

    return run_accuracy_shard(request, shard, plan)


def compare_accuracy_on_ray(
    request: CompareRequest,
    models: tuple[onnx.ModelProto, onnx.ModelProto],
    reference: Session,
    dataset: Dataset,
    *,
    num_cpus: int | None = None,
) -> Accuracy:
    """The accuracy part of ``compare`` in ``request.shards`` Ray tasks (None: one per CPU), merged in order.

    ``models``: the (FP32, quantized) models as the driver loaded them (for per-layer errors in
    isolation, computed here from the first batch); ``reference``: the FP32 session, which detects
    the output kinds on the data's first batch for every shard; ``dataset``: the data, opened here.
    A custom metric's function is called here on the merged outputs, never sent to the workers.

    Raises:
        QuantCliError: Ray is not installed, more shards than batches, or a task failed.
    """
    from quantcli.compare.accuracy import finish_accuracy, first_batch_plan, shard_window

    plan = first_batch_plan(reference, dataset, request)
    metric = request.metric
    sent = replace(request, metric=None if metric is None else replace(metric, function=None), ray=None)
    with ray_cluster(request.ray, num_cpus=num_cpus) as cpus:
        specs = [ShardSpec(k, request.shards or cpus) for k in range(1, (request.shards or cpus) + 1)]
        for spec in specs:
            shard_window(dataset, request.batch_size, spec)  # more shards than batches: said before any task
        parts = run_on_ray(_compare_task, [(sent, spec, plan) for spec in specs])
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    return finish_accuracy(merged, models, dataset, request)


def _score_task(evaluator: Evaluator, models: tuple[onnx.ModelProto, ...]) -> Score:
    """What one search task runs: one candidate's score (on the worker, one onnxruntime thread a task); one
    model a part of the evaluator's samples (the candidate built from each fold's calibration)."""
    from quantcli.graph.session import make_session

    return evaluator.score(*(make_session(model, threads=1) for model in models))


def score_on_ray(evaluator: Evaluator, models: Sequence[tuple[onnx.ModelProto, ...]]) -> list[Score]:
    """Each of ``models`` (a candidate's model for each part of the evaluator's samples: its folds) scored
    by ``evaluator`` as one Ray task, in order (call inside ``ray_cluster``).

    The evaluator is put in Ray's object store once (its feeds and FP32 outputs, without sessions);
    the scores are those ``evaluator.score`` gives in this process.

    Raises:
        QuantCliError: Ray is not installed, or a task failed.
    """
    ray = _import_ray()
    shared = ray.put(evaluator)
    return run_on_ray(_score_task, [(shared, model) for model in models])
