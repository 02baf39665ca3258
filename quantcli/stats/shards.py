"""Calibration in shards: a deterministic split of the data, and the statistics file a shard writes.

**The split.** Shard K of N (``calibrate --shard K/N``, K from 1) takes a contiguous block of the
batches one run over all the data would feed onnxruntime: with the data's B batches (for the
calibration's batch size and order) numbered from 0, shard K takes batches floor((K-1)·B/N) up to
floor(K·B/N) - 1. A shard therefore runs exactly the batches (same samples, batched the same way)
that the one run runs, so its activations are the same floats bit for bit; splitting by samples
instead (every N-th sample) would batch them differently, and onnxruntime's kernels may round a
batch of one differently from a batch of 32.

**Why merging is exact.** Min/max merge by min and max; the power-of-two histograms
(``observers.GrowingHistogram``) merge by growing the narrower grid to the wider one (exact bin
merges) and adding counts. Neither depends on the order of merges, so N merged shards hold the
same observer states as one run, and the calibration file written from them is the same bytes.
A moving average depends on the order of batches: it cannot be sharded.

**The statistics file** (schema ``quantcli.stats/1``): an ``.npz`` of plain arrays, read with
``allow_pickle=False``:

* ``meta``: JSON text (a 0-d string array): schema, quantcli version, the model's file name and
  sha256, the method's options (``method``, ``percentile``, ``bins``, ``levels``, ``batch_size``,
  ``shuffle``, ``seed``), the shard (``index``, ``count``, ``first_batch``, ``stop_batch``, the
  data's ``batches`` and ``samples``), ``num_samples`` of the shard, ``passes``, and the tensors
  (``tracked``, ``aliases``, ``inner``) as calibration found them, and ``input_shapes`` (the data's
  first sample's shape per input; absent from files written before);
* ``names`` (str [T]): the tensors observed directly; ``min``, ``max`` (float64 [T]) and
  ``count`` (int64 [T]): their exact min/max and element count; ``nans`` (int64 [T]): NaN values
  left out (absent from files written before, read as none);
* with a histogram method: ``hist_counts`` (int64 [T, bins]), ``hist_exponent`` (int64 [T], R =
  2**exponent where ``hist_started``), ``hist_started``, ``hist_zeros`` (int64 [T]: exact zeros
  seen before any other value) and ``hist_finite`` (bool [T]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx

from quantcli import __version__
from quantcli.core.errors import ArtifactMismatchError, CalibrationDataError, InvalidOption
from quantcli.core.options import CalibrationMethod
from quantcli.core.progress import Progress, no_progress
from quantcli.data.datasets import Dataset, FeedList, sample_shapes
from quantcli.graph.model_io import atomic_output
from quantcli.stats.calibration import CalibrationOptions, expose, exposure_requests
from quantcli.stats.collector import RangeStats, collect
from quantcli.stats.observers import GrowingHistogram, MinMaxObserver

__all__ = [
    "STATS_SCHEMA",
    "ShardSpec",
    "ShardStats",
    "collect_shard",
    "read_statistics",
    "shard_data",
    "write_statistics",
]

STATS_SCHEMA = "quantcli.stats/1"

#: the options that decide a calibration's result: shards must agree on all of them to merge
RESULT_OPTIONS = ("method", "percentile", "bins", "levels", "batch_size", "shuffle", "seed")


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """Shard ``index`` (from 1) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise InvalidOption(f"$shard {self}: K must be between 1 and N in K/N", option="shard")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        """``"2/4"`` -> ``ShardSpec(2, 4)``.

        Raises:
            InvalidOption: not ``K/N`` with 1 <= K <= N.
        """
        index, sep, count = text.partition("/")
        if not (sep and index.strip().isdigit() and count.strip().isdigit()):
            raise InvalidOption(f"$shard {text!r}: expected K/N, e.g. 1/4 for the first of 4 shards", option="shard")
        return cls(int(index), int(count))

    def batch_range(self, batches: int) -> tuple[int, int]:
        """The first batch and the one after the last this shard takes of ``batches``."""
        return (self.index - 1) * batches // self.count, self.index * batches // self.count


@dataclass(frozen=True, slots=True)
class ShardStats:
    """The observer states of one shard, and what is needed to check and merge them."""

    model_name: str
    model_sha256: str
    options: dict[str, Any]  # the RESULT_OPTIONS
    shard: ShardSpec
    first_batch: int
    stop_batch: int
    batches: int  # of all the data
    data_samples: int  # of all the data
    num_samples: int  # of this shard
    passes: int
    tracked: list[str]
    aliases: dict[str, str]
    inner: dict[str, str]
    observed: dict[str, RangeStats]
    #: one sample's shape per model input, of the whole data (``CalibrationResult.input_shapes``)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def calibration_options(self) -> CalibrationOptions:
        """The calibration options the statistics were collected with (those that decide the result)."""
        o = self.options
        return CalibrationOptions(
            method=CalibrationMethod(o["method"]),
            percentile=float(o["percentile"]),
            bins=int(o["bins"]),
            levels=int(o["levels"]),
            batch_size=int(o["batch_size"]),
            shuffle=bool(o["shuffle"]),
            seed=int(o["seed"]),
        )


def result_options(options: CalibrationOptions) -> dict[str, Any]:
    """The options a statistics file records (JSON values)."""
    return {
        "method": str(options.method),
        "percentile": options.percentile,
        "bins": options.bins,
        "levels": options.levels,
        "batch_size": options.batch_size,
        "shuffle": options.shuffle,
        "seed": options.seed,
    }


def shard_data(
    dataset: Dataset | FeedList, shard: ShardSpec, options: CalibrationOptions
) -> tuple[Dataset | FeedList, int, int, int]:
    """Shard ``shard`` of ``dataset``: the data, its first and stop batch, and the data's number of batches.

    Raises:
        CalibrationDataError: the shard would hold no batch (more shards than batches).
    """
    if isinstance(dataset, FeedList):
        starts = list(range(dataset.num_samples + 1))
    else:
        starts = dataset.batch_starts(options.batch_size, shuffle=options.shuffle)
    batches = len(starts) - 1
    first, stop = shard.batch_range(batches)
    if first >= stop:
        raise CalibrationDataError(
            f"{dataset.path}: shard {shard} holds no batch: the data makes {batches} batch(es) of "
            f"{options.batch_size}; use at most {batches} shards or a smaller batch size"
        )
    if isinstance(dataset, FeedList):
        return FeedList(dataset.feeds[first:stop], dataset.path), first, stop, batches
    return dataset.window(starts[first], starts[stop]), first, stop, batches


def collect_shard(
    model: onnx.ModelProto,
    dataset: Dataset | FeedList,
    options: CalibrationOptions,
    shard: ShardSpec,
    *,
    model_sha256: str,
    model_name: str,
    progress: Progress = no_progress,
) -> ShardStats:
    """Observe shard ``shard`` of ``dataset`` as ``calibrate`` observes all of it (``model`` is not modified).

    Raises:
        InvalidOption: ``options.method`` is moving-average (its result depends on order).
        CalibrationDataError: the shard holds no batch, or onnxruntime failed on the data.
    """
    if options.method == CalibrationMethod.MOVING_AVERAGE:
        raise InvalidOption(
            "$method moving-average depends on the order of batches and cannot be split into shards; "
            "use min-max, percentile, entropy or mse",
            option="method",
        )
    part, first, stop, batches = shard_data(dataset, shard, options)
    exposure = expose(model, part, options, summarize=options.summarizes)
    requests = exposure_requests(exposure, options)
    collected = collect(
        [exposure.model],
        part,
        list(requests.values()),
        options.collect_options(options.deadline()),
        sessions=[exposure.probe],
        progress=progress,
    )
    return ShardStats(
        model_name=model_name,
        model_sha256=model_sha256,
        options=result_options(options),
        shard=shard,
        first_batch=first,
        stop_batch=stop,
        batches=batches,
        data_samples=dataset.num_samples,
        num_samples=part.num_samples,
        passes=collected.passes,
        tracked=list(exposure.tracked),
        aliases=dict(exposure.aliases),
        inner=dict(exposure.inner),
        observed={n: cast(RangeStats, collected[r]) for n, r in requests.items()},
        input_shapes=sample_shapes(dataset),  # of the whole data's first sample, as one run records
    )


def _meta(stats: ShardStats) -> dict[str, Any]:
    return {
        "schema": STATS_SCHEMA,
        "quantcli_version": __version__,
        "model": {"name": stats.model_name, "sha256": stats.model_sha256},
        "options": stats.options,
        "shard": {
            "index": stats.shard.index,
            "count": stats.shard.count,
            "first_batch": stats.first_batch,
            "stop_batch": stats.stop_batch,
            "batches": stats.batches,
            "samples": stats.data_samples,
        },
        "num_samples": stats.num_samples,
        "passes": stats.passes,
        "tracked": stats.tracked,
        "aliases": stats.aliases,
        "inner": stats.inner,
        "input_shapes": {name: list(shape) for name, shape in sorted(stats.input_shapes.items())},
    }


def _arrays(stats: ShardStats) -> dict[str, np.ndarray]:
    names = sorted(stats.observed)
    obs = [stats.observed[n] for n in names]
    arrays: dict[str, np.ndarray] = {
        "meta": np.array(json.dumps(_meta(stats), sort_keys=True)),
        "names": np.array(names, dtype=np.str_),
        "min": np.array([o.minmax.min for o in obs], dtype=np.float64),
        "max": np.array([o.minmax.max for o in obs], dtype=np.float64),
        "count": np.array([o.minmax.count for o in obs], dtype=np.int64),
        "nans": np.array([o.minmax.nans for o in obs], dtype=np.int64),
    }
    hists = [o.histogram for o in obs if o.histogram is not None]
    if hists and len(hists) == len(obs):
        arrays["hist_counts"] = np.stack([h.counts for h in hists])
        arrays["hist_exponent"] = np.array([h.exponent or 0 for h in hists], dtype=np.int64)
        arrays["hist_started"] = np.array([h.exponent is not None for h in hists], dtype=np.bool_)
        arrays["hist_zeros"] = np.array([h.zeros for h in hists], dtype=np.int64)
        arrays["hist_finite"] = np.array([h.finite for h in hists], dtype=np.bool_)
    return arrays


def write_statistics(stats: ShardStats, path: Path, *, force: bool = False) -> None:
    """Write a shard's statistics file atomically (see the module docstring for its arrays)."""
    arrays = _arrays(stats)
    with atomic_output(Path(path), force=force) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]


def read_statistics(path: Path) -> ShardStats:
    """Read a statistics file written by ``write_statistics``.

    Raises:
        ArtifactMismatchError: missing, not a statistics file, another schema, or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactMismatchError(f"{path}: statistics file not found; run 'quantcli calibrate --shard K/N' first")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(str(arrays["meta"]))
    except Exception as exc:  # zipfile, numpy and json raise many types on a damaged file
        raise ArtifactMismatchError(f"{path}: not a quantcli statistics file ({type(exc).__name__})") from exc
    schema = meta.get("schema") if isinstance(meta, dict) else None
    if schema != STATS_SCHEMA:
        raise ArtifactMismatchError(
            f"{path}: statistics schema '{schema}' is not supported (this quantcli reads '{STATS_SCHEMA}'); "
            "re-run 'quantcli calibrate --shard'"
        )
    try:
        return _stats_from(meta, arrays)
    except (KeyError, TypeError, ValueError, InvalidOption) as exc:
        raise ArtifactMismatchError(f"{path}: malformed statistics file ({type(exc).__name__}: {exc})") from exc


def _stats_from(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> ShardStats:
    shard = meta["shard"]
    return ShardStats(
        model_name=str(meta["model"]["name"]),
        model_sha256=str(meta["model"]["sha256"]),
        options={k: meta["options"][k] for k in RESULT_OPTIONS},
        shard=ShardSpec(int(shard["index"]), int(shard["count"])),
        first_batch=int(shard["first_batch"]),
        stop_batch=int(shard["stop_batch"]),
        batches=int(shard["batches"]),
        data_samples=int(shard["samples"]),
        num_samples=int(meta["num_samples"]),
        passes=int(meta["passes"]),
        tracked=[str(n) for n in meta["tracked"]],
        aliases={str(k): str(v) for k, v in meta["aliases"].items()},
        inner={str(k): str(v) for k, v in meta["inner"].items()},
        observed=_observers(arrays),
        input_shapes={str(n): tuple(int(d) for d in dims) for n, dims in meta.get("input_shapes", {}).items()},
    )


def _observers(arrays: dict[str, np.ndarray]) -> dict[str, RangeStats]:
    names = [str(n) for n in arrays["names"].tolist()]
    lo, hi, count = arrays["min"], arrays["max"], arrays["count"]
    nans = arrays.get("nans", np.zeros(len(names), dtype=np.int64))  # absent from files before NaN counts
    if not len(lo) == len(hi) == len(count) == len(names):
        raise ValueError("arrays of different lengths")
    observed: dict[str, RangeStats] = {}
    for i, name in enumerate(names):
        stats = RangeStats(MinMaxObserver(float(lo[i]), float(hi[i]), int(count[i]), nans=int(nans[i])))
        if "hist_counts" in arrays:
            counts = arrays["hist_counts"]
            hist = GrowingHistogram(bins=int(counts.shape[1]))
            hist.counts = counts[i].astype(np.int64)
            hist.exponent = int(arrays["hist_exponent"][i]) if bool(arrays["hist_started"][i]) else None
            hist.zeros = int(arrays["hist_zeros"][i])
            hist.finite = bool(arrays["hist_finite"][i])
            stats.histogram = hist
        observed[name] = stats
    return observed
