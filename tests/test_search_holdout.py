"""A search whose --eval-data is its --data scores on samples calibration did not read (issue 15)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from quantcli import api
from quantcli.cli.app import app
from quantcli.cli.flags import flag
from quantcli.core.options import AlgorithmOptions, QuantConfig
from quantcli.data.datasets import Dataset, InputSpec, open_dataset
from quantcli.data.identity import same_data
from quantcli.passes import algorithms as algorithm_passes
from quantcli.pipeline import steps
from quantcli.pipeline.holdout import search_count, spread
from quantcli.search import accuracy_search
from quantcli.search.accuracy_search import Budget, SearchOptions
from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS

CONFIG = QuantConfig()
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("fixed_speedup")
DIGITS = SAMPLE_MODELS / "digits_cnn.onnx"
DIGITS_CALIB = CALIBRATION_DATA / "digits_cnn_calib.npz"  # 200 real samples


def _rows(dataset: Dataset) -> np.ndarray:
    """Every sample ``dataset`` yields, in order, as one array (single-input models)."""
    return np.concatenate([next(iter(feed.values())) for feed in dataset.batches(16)])


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """The samples calibration read and those the search scored on, recorded as convert passes them on (the
    second fold's as "fold calibration" and "fold search")."""
    recorded: dict[str, np.ndarray] = {}
    calibrate, search = steps.calibrate, accuracy_search.search_quantization
    transform = algorithm_passes.transform_and_observe

    def record(key: str, dataset: Dataset) -> None:
        recorded["fold " + key if key in recorded else key] = _rows(dataset)

    def record_calibration(model, dataset, **kwargs):  # type: ignore[no-untyped-def]
        record("calibration", dataset)
        return calibrate(model, dataset, **kwargs)

    def record_search(base, dataset, options, **kwargs):  # type: ignore[no-untyped-def]
        record("search", dataset)
        if kwargs.get("second_fold") is not None:
            record("search", kwargs["second_fold"].dataset)
        return search(base, dataset, options, **kwargs)

    def record_algorithms(model, dataset, *args, **kwargs):  # type: ignore[no-untyped-def]
        record("algorithms", dataset)
        return transform(model, dataset, *args, **kwargs)

    monkeypatch.setattr(steps, "calibrate", record_calibration)
    monkeypatch.setattr(algorithm_passes, "transform_and_observe", record_algorithms)
    monkeypatch.setattr(accuracy_search, "search_quantization", record_search)
    return recorded


def test_the_search_scores_on_samples_calibration_did_not_read(tmp_path, seen):
    logs: list[str] = []
    x = np.load(DIGITS_CALIB)["input"]
    result = api.convert_model(
        DIGITS, tmp_path / "q.onnx", data_path=DIGITS_CALIB, eval_data=DIGITS_CALIB, config=CONFIG,
        search=SearchOptions(Budget(min_agreement=0.98)), log=logs.append,
    )  # fmt: skip
    scored = spread(200, 64)  # a quarter of the 200 is 50, under 64: 64 spread through them, the last included
    assert scored[:3] == [2, 5, 8] and scored[-1] == 199
    np.testing.assert_array_equal(seen["search"], x[scored])
    np.testing.assert_array_equal(seen["calibration"], np.delete(x, scored, axis=0))
    # the second fold: 64 of the other 136, spread through them, scored by a calibration on the rest
    second = np.delete(np.arange(200), scored)[spread(136, 64)]
    assert not set(second) & set(scored)
    np.testing.assert_array_equal(seen["fold search"], x[second])
    np.testing.assert_array_equal(seen["fold calibration"], np.delete(x, second, axis=0))
    assert result.calibration is not None and result.calibration.num_samples == 136
    assert result.search is not None and result.search.num_samples == 128
    assert (
        "scoring on 64 of 200 --data samples, spread through it, which calibration does not read, and on 64 "
        "others with a second calibration on the rest; what meets the budget there must meet it on the other 72 "
        "too" in logs
    )
    verdict = result.verdict
    assert verdict is not None and verdict.num_samples == 64  # the verdict checks what the search scored
    assert verdict.render(flag)[0].startswith(
        "verdict: ok on 64 --data samples calibration did not read (the search chose on them): logits classifier"
    )


def test_a_copy_of_the_data_is_the_same_data(tmp_path, seen, mlp):
    model, calib, _ = mlp
    copy = tmp_path / "copy.npz"
    shutil.copyfile(calib, copy)
    result = api.convert_model(
        model, tmp_path / "q.onnx", data_path=calib, eval_data=copy, config=CONFIG,
        search=SearchOptions(Budget(min_sqnr_db=25.0)),
    )  # fmt: skip
    assert len(seen["calibration"]) == 64 and len(seen["search"]) == 64
    assert result.search is not None and result.search.chosen.meets_budget


def test_the_algorithms_calibrate_without_the_scored_samples(tmp_path, seen, mlp):
    model, calib, _ = mlp
    x = np.load(calib)["x"]
    api.convert_model(
        model, tmp_path / "q.onnx", data_path=calib, eval_data=calib, config=CONFIG,
        search=SearchOptions(Budget(min_sqnr_db=25.0)), algorithms=AlgorithmOptions(cle=True),
    )  # fmt: skip
    np.testing.assert_array_equal(seen["algorithms"], np.delete(x, spread(128, 64), axis=0))
    np.testing.assert_array_equal(seen["search"], x[spread(128, 64)])


def test_other_eval_data_changes_nothing(tmp_path, seen, mlp):
    model, calib, evald = mlp
    logs: list[str] = []
    result = api.convert_model(
        model, tmp_path / "q.onnx", data_path=calib, eval_data=evald, config=CONFIG,
        search=SearchOptions(Budget(min_sqnr_db=25.0)), log=logs.append,
    )  # fmt: skip
    np.testing.assert_array_equal(seen["calibration"], np.load(calib)["x"])  # all 128
    np.testing.assert_array_equal(seen["search"], np.load(evald)["x"])
    assert not any("scoring on" in line or "too few" in line for line in logs)
    assert result.verdict is not None and result.verdict.num_samples == 128
    assert "on 128 --eval-data samples (the search chose on them):" in result.verdict.render(flag)[0]


def test_too_few_samples_score_on_what_calibration_read_and_say_so(tmp_path, seen, mlp):
    model, _, _ = mlp
    few = tmp_path / "few.npz"
    np.savez(few, x=np.abs(np.random.default_rng(2).normal(size=(7, 32))).astype(np.float32))  # 3 held: under 4
    logs: list[str] = []
    result = api.convert_model(
        model, tmp_path / "q.onnx", data_path=few, eval_data=few, config=CONFIG,
        search=SearchOptions(Budget(min_sqnr_db=25.0)), log=logs.append,
    )  # fmt: skip
    assert len(seen["calibration"]) == 7 and len(seen["search"]) == 7
    assert logs[0] == (
        "warning: 7 --data samples are too few to hold 4 back from calibration, so the search scores on samples "
        "calibration read (optimistic: give separate --eval-data)"
    )
    assert result.verdict is not None
    lines = result.verdict.render(flag)
    assert lines[0].startswith("verdict: ok on 7 --eval-data samples (calibration read them and the search chose on")
    assert "fidelity not checked on samples calibration did not read: give separate --eval-data" in lines


def test_a_small_scored_share_is_said_to_be_small(tmp_path, seen, mlp):
    model, _, _ = mlp
    small = tmp_path / "small.npz"
    np.savez(small, x=np.abs(np.random.default_rng(3).normal(size=(48, 32))).astype(np.float32))  # half: 24
    logs: list[str] = []
    api.convert_model(
        model, tmp_path / "q.onnx", data_path=small, eval_data=small, config=CONFIG,
        search=SearchOptions(Budget(min_sqnr_db=25.0)), log=logs.append,
    )  # fmt: skip
    assert len(seen["calibration"]) == 24 and len(seen["search"]) == 24
    # half of the data held: the second fold swaps the halves
    np.testing.assert_array_equal(seen["fold search"], seen["calibration"])
    np.testing.assert_array_equal(seen["fold calibration"], seen["search"])
    assert logs[:2] == [
        "scoring on 24 of 48 --data samples, spread through it, which calibration does not read, and on 24 others "
        "with a second calibration on the rest",
        "warning: a budget met on 2 x 24 samples, each calibration reading 24, may not hold on new data (PP-OCRv4 "
        "det: IoU 0.9 met on 16 images read 0.82 on 16 others): give separate --eval-data of a hundred samples or more",
    ]


def test_the_cli_says_where_the_search_scores(tmp_path, mlp):
    model, calib, _ = mlp
    out = tmp_path / "q.onnx"
    result = runner.invoke(
        app,
        ["convert", str(model), "-o", str(out), "--data", str(calib), "--eval-data", str(calib), "--min-sqnr", "25"],
    )
    assert result.exit_code == 0, result.output
    assert "search: scoring on 64 of 128 --data samples, spread through it, which calibration does not read" in (
        result.output
    )
    assert "on 64 --data samples calibration did not read (the search chose on them)" in result.output


def test_a_recipe_replays_on_the_same_held_back_samples(tmp_path, mlp):
    model, calib, _ = mlp
    searched, replayed, recipe = tmp_path / "s.onnx", tmp_path / "r.onnx", tmp_path / "recipe.json"
    api.convert_model(
        model, searched, data_path=calib, eval_data=calib, config=CONFIG,
        search=SearchOptions(Budget(min_sqnr_db=25.0)), save_recipe=recipe,
    )  # fmt: skip
    doc = json.loads(recipe.read_text())
    assert doc["schema"] == "quantcli.recipe/4" and doc["held_back"] == {"samples": 64, "of": 128}
    result = api.convert_model(model, replayed, data_path=calib, recipe=recipe)
    assert replayed.read_bytes() == searched.read_bytes()
    assert result.calibration is not None and result.calibration.num_samples == 64
    assert result.verdict is not None and result.verdict.num_samples == 64  # checks the held samples
    other = tmp_path / "other.npz"
    np.savez(other, x=np.load(calib)["x"][:100])
    logs: list[str] = []
    result = api.convert_model(model, tmp_path / "o.onnx", data_path=other, recipe=recipe, log=logs.append)
    assert result.calibration is not None and result.calibration.num_samples == 100
    assert logs == [
        "the recipe's search held 64 of 128 samples back from calibration; --data has 100: calibrating on all of "
        "them (not the search's bytes)"
    ]


def test_how_many_a_search_scores_on():
    def count(n: int) -> int:
        return search_count(
            Dataset.from_arrays([InputSpec("x", np.dtype(np.float32), ("n", 2))], {"x": np.zeros((n, 2))})
        )

    # a quarter, at least 64 (at most half), at most 256: small data keeps half for calibration
    assert [count(n) for n in (7, 24, 128, 256, 400, 2000)] == [3, 12, 64, 64, 100, 256]


def test_same_data_by_path_or_content(tmp_path):
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    np.savez(a, x=np.arange(12.0).reshape(3, 4))
    shutil.copyfile(a, b)
    np.savez(c, x=np.arange(12.0).reshape(3, 4)[::-1])  # same size, other samples
    assert same_data(a, a) and same_data(a, tmp_path / "." / "a.npz") and same_data(a, b)
    assert not same_data(a, c) and not same_data(a, tmp_path / "missing.npz")
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    shutil.copyfile(a, tmp_path / "d1" / "part0.npz")
    shutil.copyfile(a, tmp_path / "d2" / "other_name.npz")
    assert same_data(tmp_path / "d1", tmp_path / "d2") and not same_data(tmp_path / "d1", a.parent)


def test_select_reads_the_samples_at_positions_across_files(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    labels = np.arange(10) % 4
    np.savez(folder / "a.npz", x=x[:4], labels=labels[:4])
    np.savez(folder / "b.npz", x=x[4:], labels=labels[4:])
    dataset = open_dataset(folder, [InputSpec("x", np.dtype(np.float32), ("n", 3))])
    positions = [1, 3, 4, 5, 9]  # runs 1, 3-5 (across the two files) and 9
    picked = dataset.select(positions)
    assert picked.num_samples == 5
    np.testing.assert_array_equal(_rows(picked), x[positions])
    np.testing.assert_array_equal(np.concatenate(list(f["x"] for f in picked.batches(2))), x[positions])
    assert picked.labels is not None and picked.labels.tolist() == labels[positions].tolist()
    np.testing.assert_array_equal(_rows(picked.subset(2)), x[[1, 3]])
    np.testing.assert_array_equal(_rows(dataset.select([0, 2, 6, 7, 8])), x[[0, 2, 6, 7, 8]])
