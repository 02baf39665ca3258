"""Calibration shards as Ray tasks, merged on the driver (optional: ``pip install 'quantcli[ray]'``).

``calibrate_on_ray(request, address=..., shards=N)`` runs shard K of N (``quantcli.stats.shards``)
as one Ray task each, every task running onnxruntime on its block of batches, and merges the
observer states on the driver (``quantcli.stats.merge``): the result is the same as
``quantcli.api.calibrate`` over all the data. Ray is imported here only, when called: the base
install never imports it.

Each task opens the model and data at the request's paths: on a cluster they must be readable at
the same paths on every node (a shared file system), and quantcli installed there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli.core.errors import QuantCliError
from quantcli.pipeline.request import CalibrateRequest
from quantcli.stats.merge import MergedCalibration, merge_shards
from quantcli.stats.shards import ShardSpec, ShardStats

__all__ = ["calibrate_on_ray"]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise QuantCliError("calibrating on Ray needs Ray; install it with: pip install 'quantcli[ray]'") from None
    return ray


def _shard_task(request: CalibrateRequest, shard: ShardSpec) -> ShardStats:
    """What one Ray task runs: one shard's statistics (on the worker)."""
    from quantcli.api import calibrate_shard

    return calibrate_shard(request, shard)


def calibrate_on_ray(
    request: CalibrateRequest, *, address: str | None = None, shards: int | None = None, num_cpus: int | None = None
) -> MergedCalibration:
    """Calibrate ``request`` in ``shards`` Ray tasks (None: one per CPU of the cluster) and merge them.

    ``address``: a running cluster (``"auto"``, ``"ray://host:10001"``); None starts a local Ray on
    this machine with ``num_cpus`` CPUs (None: all). A Ray already initialised in this process is used.

    Raises:
        QuantCliError: Ray is not installed, or a task failed (its error, as a quantcli error when
            it was one).
    """
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=num_cpus if address is None else None, log_to_driver=False)
    try:
        count = shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1)(_shard_task)
        specs = [ShardSpec(k, count) for k in range(1, count + 1)]
        try:
            stats = ray.get([task.remote(request, spec) for spec in specs])
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, QuantCliError):  # the user's problem, as calibrate would say it
                raise cause from None
            raise
        return merge_shards(stats, [Path(f"<ray task {spec}>") for spec in specs])
    finally:
        if started:
            ray.shutdown()
