"""Merge the statistics files of a sharded calibration into one calibration result.

``quantcli merge S1 S2 ... -o CALIB.json`` reads every file (``quantcli.stats.shards``), checks that
they are the shards 1..N of one N-way split of the same data, made from the same model (sha256)
with the same options, and folds their observer states together (exact and order-independent:
see ``quantcli.stats.shards``). The ranges are then chosen by the same function a one-process
calibration uses (``calibration.calibration_result``), so the calibration file written from the
merge is the same bytes as one run over all the samples.

Each refusal is one line naming the file at fault: another model, other options, a shard of
another split or other data, a shard given twice, missing shards, other tensors observed, or a
moving average (its result depends on the order of batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from quantcli.core.errors import ArtifactMismatchError
from quantcli.core.options import CalibrationMethod
from quantcli.stats.calibration import calibration_result
from quantcli.stats.observers import GrowingHistogram, MinMaxObserver, RangeStats
from quantcli.stats.ranges import CalibrationResult
from quantcli.stats.shards import RESULT_OPTIONS, ShardStats, read_statistics

__all__ = ["MergedCalibration", "check_shards", "merge_files", "merge_shards"]


@dataclass(frozen=True, slots=True)
class MergedCalibration:
    """The calibration from merged shards, and the model file name the shards recorded."""

    result: CalibrationResult
    model_name: str
    shards: int


def merge_files(paths: Sequence[Path]) -> MergedCalibration:
    """Read and merge statistics files (any order).

    Raises:
        ArtifactMismatchError: a file is unreadable, or the files are not one complete set of shards.
    """
    if not paths:
        raise ArtifactMismatchError("no statistics files to merge; give the files 'calibrate --shard K/N' wrote")
    return merge_shards([read_statistics(Path(p)) for p in paths], [Path(p) for p in paths])


def merge_shards(shards: Sequence[ShardStats], sources: Sequence[Path]) -> MergedCalibration:
    """Merge shard statistics (``sources`` names each one in errors) into the calibration result.

    Raises:
        ArtifactMismatchError: the shards are not one complete set (see ``check_shards``).
    """
    check_shards(shards, sources)
    ordered = sorted(shards, key=lambda s: s.shard.index)
    first = ordered[0]
    observed: dict[str, RangeStats] = {}
    for name, stats in first.observed.items():
        hist = stats.histogram
        observed[name] = RangeStats(MinMaxObserver(), None, None if hist is None else GrowingHistogram(hist.bins))
    for shard in ordered:
        for name, stats in shard.observed.items():
            observed[name].merge(stats)
    result = calibration_result(
        first,
        observed,
        first.calibration_options(),
        first.model_sha256,
        first.data_samples,
        max(s.passes for s in ordered),
    )
    return MergedCalibration(replace(result, input_shapes=first.input_shapes), first.model_name, first.shard.count)


def check_shards(shards: Sequence[ShardStats], sources: Sequence[Path]) -> None:
    """Check that ``shards`` are shards 1..N of one split of the same data, model and options.

    Raises:
        ArtifactMismatchError: one line naming the file at fault.
    """
    ref, ref_path = shards[0], sources[0]
    seen: dict[int, Path] = {}
    for stats, path in zip(shards, sources, strict=True):
        if stats.options["method"] == str(CalibrationMethod.MOVING_AVERAGE):
            raise ArtifactMismatchError(
                f"{path}: moving-average statistics depend on the order of batches and cannot be merged"
            )
        _check_same(stats, path, ref, ref_path)
        if stats.shard.index in seen:
            raise ArtifactMismatchError(
                f"{path}: shard {stats.shard} overlaps {seen[stats.shard.index]} (the same shard given twice)"
            )
        if (stats.first_batch, stats.stop_batch) != stats.shard.batch_range(stats.batches):
            raise ArtifactMismatchError(
                f"{path}: shard {stats.shard} covers batches {stats.first_batch}..{stats.stop_batch - 1}, "
                f"not those of shard {stats.shard} of {stats.batches} batches; re-run its calibration"
            )
        seen[stats.shard.index] = path
    missing = [f"{k}/{ref.shard.count}" for k in range(1, ref.shard.count + 1) if k not in seen]
    if missing:
        raise ArtifactMismatchError(
            f"shard(s) {', '.join(missing)} missing: {len(seen)} of {ref.shard.count} given "
            f"({', '.join(str(p) for p in sources)}); merge needs every shard of the split"
        )


def _check_same(stats: ShardStats, path: Path, ref: ShardStats, ref_path: Path) -> None:
    """One shard against the first: same model, options, split, data and tensors."""
    if stats.model_sha256 != ref.model_sha256:
        raise ArtifactMismatchError(
            f"{path}: statistics of a model with sha256 {stats.model_sha256[:12]}…, but {ref_path} is of "
            f"{ref.model_sha256[:12]}…; merge shards of one model"
        )
    for key in RESULT_OPTIONS:
        if stats.options[key] != ref.options[key]:
            raise ArtifactMismatchError(
                f"{path}: collected with {key}={stats.options[key]}, but {ref_path} with "
                f"{key}={ref.options[key]}; every shard needs the same calibration options"
            )
    if stats.shard.count != ref.shard.count:
        raise ArtifactMismatchError(
            f"{path}: shard {stats.shard}, but {ref_path} is shard {ref.shard}; merge the shards of one split"
        )
    if (stats.batches, stats.data_samples) != (ref.batches, ref.data_samples):
        raise ArtifactMismatchError(
            f"{path}: a shard of data with {stats.data_samples} samples in {stats.batches} batches, but "
            f"{ref_path} of {ref.data_samples} in {ref.batches}; every shard must split the same data"
        )
    if (stats.tracked, stats.aliases, stats.inner) != (ref.tracked, ref.aliases, ref.inner):
        raise ArtifactMismatchError(
            f"{path}: observed other tensors than {ref_path} ({len(stats.tracked)} vs {len(ref.tracked)}); "
            "re-run both shards with the same quantcli"
        )
