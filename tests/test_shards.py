"""Sharded calibration: N merged shards give the same calibration file, byte for byte, as one run;
shard bookkeeping errors are one line naming the file."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from quantcli import api
from quantcli.cli.app import app
from quantcli.core.errors import ArtifactMismatchError, CalibrationDataError, InvalidOption
from quantcli.core.options import CalibrationMethod
from quantcli.data.datasets import FeedList
from quantcli.stats.artifact import write_calibration
from quantcli.stats.calibration import CalibrationOptions
from quantcli.stats.observers import GrowingHistogram
from quantcli.stats.shards import ShardSpec, read_statistics, shard_data, write_statistics
from tests import models
from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS

METHODS = [m for m in CalibrationMethod if m != CalibrationMethod.MOVING_AVERAGE]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """small_cnn with data whose scale grows 64x from the first sample to the last: each shard's
    histograms start on another power-of-two grid, so merging has to widen them."""
    folder = tmp_path_factory.mktemp("tiny")
    model, data = folder / "cnn.onnx", folder / "cnn.npz"
    model.write_bytes(models.small_cnn().SerializeToString())
    images = models.structured_images(90, seed=3)
    np.savez(data, x=images * np.geomspace(1.0, 64.0, len(images), dtype=np.float32)[:, None, None, None])
    return model, data


def _pair(name: str, tiny: tuple[Path, Path]) -> tuple[Path, Path]:
    if name == "tiny":
        return tiny
    return SAMPLE_MODELS / f"{name}.onnx", CALIBRATION_DATA / f"{name}_calib.npz"


def _bytes(path: Path) -> tuple[bytes, bytes | None]:
    side = path.with_name(path.name + ".hist.npz")
    return path.read_bytes(), side.read_bytes() if side.exists() else None


def _shard_files(folder: Path, model: Path, data: Path, n: int, **fields: object) -> list[Path]:
    paths = []
    folder.mkdir(exist_ok=True)
    for k in range(1, n + 1):
        stats = api.calibrate_shard(api.CalibrateRequest(model, data, **fields), f"{k}/{n}")  # type: ignore[arg-type]
        paths.append(folder / f"part{k}.stats.npz")
        write_statistics(stats, paths[-1])
    return paths


@pytest.mark.parametrize("name", ["digits_cnn", "digits_transformer", "tiny"])
@pytest.mark.parametrize("method", METHODS)
def test_four_merged_shards_are_one_run_byte_for_byte(tmp_path, tiny, name, method):
    model, data = _pair(name, tiny)
    batch = 8 if name == "tiny" else 32  # 12 batches of the tiny data, 7 of the sample models'
    one = tmp_path / "one.json"
    request = api.CalibrateRequest(model, data, method=method, batch_size=batch)
    write_calibration(api.calibrate(request), one, model_path=model.name)
    parts = _shard_files(tmp_path, model, data, 4, method=method, batch_size=batch)
    merged = api.merge_statistics(list(reversed(parts)))  # any order
    out = tmp_path / "merged.json"
    write_calibration(merged.result, out, model_path=merged.model_name)
    assert _bytes(out) == _bytes(one)
    assert (_bytes(one)[1] is not None) == (method != CalibrationMethod.MINMAX)


def test_growing_histogram_merge_is_one_pass_in_any_order(rng):
    parts = [np.zeros(50, np.float32), rng.normal(0, 0.01, 300), rng.normal(0, 40, 300), rng.normal(0, 2, 300)]
    parts = [p.astype(np.float32) for p in parts]
    one = GrowingHistogram(bins=256)
    for p in parts:
        one.update(p)
    for order in itertools.permutations(range(len(parts))):
        merged = GrowingHistogram(bins=256)
        for i in order:
            part = GrowingHistogram(bins=256)
            part.update(parts[i])
            merged.merge(part)
        assert merged.exponent == one.exponent and merged.zeros == one.zeros, order
        np.testing.assert_array_equal(merged.result().counts, one.result().counts)


def test_statistics_file_round_trips_without_pickle(tmp_path, tiny):
    model, data = tiny
    stats = api.calibrate_shard(api.CalibrateRequest(model, data, method=CalibrationMethod.ENTROPY), "2/3")
    write_statistics(stats, tmp_path / "s.stats.npz")
    with np.load(tmp_path / "s.stats.npz", allow_pickle=False) as npz:
        assert {"meta", "names", "min", "max", "count", "hist_counts", "hist_exponent"} <= set(npz.files)
        assert all(npz[k].dtype != object for k in npz.files)
    back = read_statistics(tmp_path / "s.stats.npz")
    assert (back.shard, back.num_samples, back.first_batch, back.stop_batch, back.batches) == (
        ShardSpec(2, 3),
        stats.num_samples,
        1,
        2,
        3,
    )
    assert back.observed.keys() == stats.observed.keys()
    for name, obs in stats.observed.items():
        assert (back.observed[name].minmax.min, back.observed[name].minmax.max) == (obs.minmax.min, obs.minmax.max)
        np.testing.assert_array_equal(back.observed[name].histogram.counts, obs.histogram.counts)  # type: ignore[union-attr]


def test_shards_cover_every_batch_once():
    feeds = FeedList([{"x": np.full((1, 2), i, np.float32)} for i in range(10)])
    seen = []
    for k in range(1, 4):
        part, _, _, total = shard_data(feeds, ShardSpec(k, 3), CalibrationOptions())
        assert total == 10
        seen += [int(f["x"][0, 0]) for f in part.batches(1)]
    assert seen == list(range(10))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[Path, Path]) -> dict[str, Path]:
    """Shards 1..3 of 3 of the tiny model (percentile), and odd ones out."""
    folder = tmp_path_factory.mktemp("shards")
    model, data = tiny
    parts = _shard_files(folder, model, data, 3, method=CalibrationMethod.PERCENTILE)
    other_model = folder / "other.onnx"
    other_model.write_bytes(models.small_cnn(seed=5).SerializeToString())
    odd = {
        "other_model": _shard_files(folder / "other_model", other_model, data, 3, method=CalibrationMethod.PERCENTILE)[
            0
        ],
        "other_method": _shard_files(folder / "other_method", model, data, 3, method=CalibrationMethod.ENTROPY)[0],
        "other_split": _shard_files(folder / "other_split", model, data, 2, method=CalibrationMethod.PERCENTILE)[0],
    }
    return {"1": parts[0], "2": parts[1], "3": parts[2], **odd}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["1", "2", "other_model"], r"other_model.*sha256 .* merge shards of one model"),
        (["1", "2", "other_method"], r"other_method.*method=entropy, but .* method=percentile"),
        (["1", "other_split", "3"], r"other_split.*shard 1/2, but .* shard 1/3"),
        (["1", "2", "2", "3"], r"shard 2/3 overlaps"),
        (["1", "3"], r"shard\(s\) 2/3 missing: 2 of 3 given"),
    ],
)
def test_bookkeeping_errors_name_the_file(shards, files, message):
    with pytest.raises(ArtifactMismatchError, match=message) as info:
        api.merge_statistics([shards[f] for f in files])
    assert "\n" not in str(info.value)


def test_merge_refuses_a_damaged_file(tmp_path, shards):
    bad = tmp_path / "bad.stats.npz"
    bad.write_bytes(shards["2"].read_bytes()[:300])
    with pytest.raises(ArtifactMismatchError, match=r"bad\.stats\.npz: not a quantcli statistics file"):
        api.merge_statistics([shards["1"], bad, shards["3"]])


def test_moving_average_and_bad_splits_are_refused(tiny):
    model, data = tiny
    with pytest.raises(InvalidOption, match=r"method moving-average .* cannot be split"):
        api.calibrate_shard(api.CalibrateRequest(model, data, method=CalibrationMethod.MOVING_AVERAGE), "1/2")
    with pytest.raises(CalibrationDataError, match="shard 1/5 holds no batch: the data makes 3 batch"):
        api.calibrate_shard(api.CalibrateRequest(model, data), "1/5")
    for text in ("0/4", "5/4", "two/4", "1-4"):
        with pytest.raises(InvalidOption, match="shard"):
            ShardSpec.parse(text)


def test_cli_shard_then_merge(tmp_path, tiny):
    model, data = tiny
    parts = []
    for k in (1, 2):
        parts.append(tmp_path / f"p{k}.stats.npz")
        res = runner.invoke(
            app, ["calibrate", str(model), "--data", str(data), "--shard", f"{k}/2", "-o", str(parts[-1]), "-q"]
        )
        assert res.exit_code == 0, res.output
        assert f"shard {k}/2" in res.output
    res = runner.invoke(app, ["merge", *map(str, parts), "-o", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    one = runner.invoke(app, ["calibrate", str(model), "--data", str(data), "-o", str(tmp_path / "one.json"), "-q"])
    assert one.exit_code == 0, one.output
    assert (tmp_path / "c.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    wrong = runner.invoke(
        app, ["calibrate", str(model), "--data", str(data), "--shard", "1/2", "-o", str(tmp_path / "x.json")]
    )
    assert wrong.exit_code == 3 and "with --shard, -o names the shard's statistics file" in wrong.output
    ma = runner.invoke(app, ["merge", str(parts[0]), "-o", str(tmp_path / "d.json")])
    assert ma.exit_code == 3 and "shard(s) 2/2 missing" in ma.output


def test_merge_refuses_moving_average_statistics(tmp_path, shards):
    stats = read_statistics(shards["1"])
    forged = dataclasses.replace(stats, options={**stats.options, "method": "moving-average"})
    write_statistics(forged, tmp_path / "ma.stats.npz")
    with pytest.raises(ArtifactMismatchError, match=r"ma\.stats\.npz: moving-average statistics .* cannot be merged"):
        api.merge_statistics([tmp_path / "ma.stats.npz", shards["2"], shards["3"]])


def test_cli_refuses_moving_average_shards_naming_the_flag(tmp_path, tiny):
    model, data = tiny
    args = ["calibrate", str(model), "--data", str(data), "--method", "moving-average", "--shard", "1/2"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "p.stats.npz")])
    assert res.exit_code == 3 and "--method moving-average depends on the order of batches" in res.output
