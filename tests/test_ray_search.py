"""The accuracy search with its independent candidates scored as Ray tasks (a local Ray with 2 CPUs):
the same trials, the same recipe and the same bytes as one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from quantcli import api, distributed
from quantcli.cli.app import app
from quantcli.core.options import QuantConfig
from quantcli.search.accuracy_search import Budget, SearchOptions
from tests import models

CONFIG = QuantConfig()
pytestmark = pytest.mark.usefixtures("fixed_speedup")  # the cost decides, never a timing


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'quantcli[ray]'")
    ray.init(num_cpus=2, log_to_driver=False)  # the search uses it as it is
    yield ray
    ray.shutdown()


@pytest.fixture
def cnn(tmp_path: Path) -> tuple[Path, Path, Path]:
    path = tmp_path / "cnn.onnx"
    path.write_bytes(models.small_cnn().SerializeToString())
    calib, evald = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=models.structured_images(48, seed=1))
    np.savez(evald, x=models.structured_images(40, seed=2))
    return path, calib, evald


@pytest.fixture
def cnn_own_data(cnn: tuple[Path, Path, Path]) -> tuple[Path, Path, Path]:
    """The CNN searched on its calibration data: two folds, each candidate built from both calibrations."""
    path, calib, _ = cnn
    return path, calib, calib


def _search(files, out: Path, ray: str | None, budget: Budget):
    path, calib, evald = files
    result = api.convert_model(
        path, out, data_path=calib, eval_data=evald, config=CONFIG, force=True,
        search=SearchOptions(budget, ray=ray), save_recipe=out.with_suffix(".json"),
    )  # fmt: skip
    assert result.search is not None
    return result.search


def _decisions(recipe: Path) -> dict[str, object]:
    """The recipe without its timings (the batch-1 speed-up is measured, never the same twice)."""
    doc = json.loads(recipe.read_text())

    def strip(value: object) -> object:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "speedup" not in k}
        return value

    return dict(strip(doc))  # type: ignore[call-overload]


def _trials(search) -> list[tuple[object, ...]]:
    return [(t.action, t.sqnr_db, t.accuracy_drop, t.meets_budget, t.kept) for t in search.trials]


@pytest.mark.parametrize(
    ("fixture", "budget"),
    [("cnn", Budget(min_sqnr_db=48.0)), ("mlp", Budget(min_sqnr_db=25.0)), ("cnn_own_data", Budget(min_sqnr_db=48.0))],
    ids=["cnn-conv", "mlp-matmul", "cnn-two-folds"],
)
def test_search_on_local_ray_equals_one_process(local_ray, request, tmp_path, monkeypatch, fixture, budget) -> None:
    files = request.getfixturevalue(fixture)
    sent: list[int] = []
    original = distributed.score_on_ray

    def counted(evaluator, candidates):
        sent.append(len(candidates))
        return original(evaluator, candidates)

    monkeypatch.setattr(distributed, "score_on_ray", counted)
    one = _search(files, tmp_path / "one.onnx", None, budget)
    assert not sent
    on_ray = _search(files, tmp_path / "ray.onnx", "local", budget)
    assert sent and sent[0] == 4  # the four calibration methods, at once
    if fixture == "cnn_own_data":  # 24 held samples a fold: each task scored both folds' models
        assert one.num_samples == on_ray.num_samples == 48
    assert _trials(on_ray) == _trials(one)
    assert on_ray.chosen.candidate == one.chosen.candidate
    assert _decisions(tmp_path / "ray.json") == _decisions(tmp_path / "one.json")
    assert (tmp_path / "ray.onnx").read_bytes() == (tmp_path / "one.onnx").read_bytes()


def test_cli_ray_needs_a_budget(cnn, tmp_path) -> None:
    path, calib, _ = cnn
    res = CliRunner().invoke(
        app, ["convert", str(path), "-o", str(tmp_path / "q.onnx"), "-d", str(calib), "--ray", "local"]
    )
    assert res.exit_code != 0 and "--ray" in res.output and "Traceback" not in res.output
