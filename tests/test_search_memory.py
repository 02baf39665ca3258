"""The accuracy search within a memory budget: its batches shrink to fit, down to one sample, the answer
does not change where batching cannot matter, and no candidate session outlives its scoring."""

from __future__ import annotations

import gc
import math
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from quantcli import api
from quantcli.cli.app import app
from quantcli.core.options import QuantConfig
from quantcli.data.datasets import model_input_specs, open_dataset
from quantcli.graph.session import make_session
from quantcli.search import accuracy_search
from quantcli.search.accuracy_search import Budget, SearchOptions
from quantcli.search.evaluator import Evaluator
from quantcli.search.memory import activation_bytes, plan_search_batches
from tests import models

CONFIG = QuantConfig()
pytestmark = pytest.mark.usefixtures("fixed_speedup")  # the cost decides, never a timing


@pytest.fixture
def cnn(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``small_cnn`` without its Gemm head (Convs only: nothing is quantized at run time, so no score
    depends on the batching), with calibration and evaluation images."""
    model = models.small_cnn()
    del model.graph.node[-3:]  # GlobalAveragePool, Flatten, Gemm: the output is the pooled map
    model.graph.output[0].name = "mp"
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    path = tmp_path / "cnn.onnx"
    path.write_bytes(model.SerializeToString())
    calib, evald = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=models.structured_images(48, seed=1))
    np.savez(evald, x=models.structured_images(40, seed=2))
    return path, calib, evald


def test_batches_shrink_with_the_budget_down_to_one_sample() -> None:
    per_sample = 1000
    assert plan_search_batches(per_sample, 10**9).score == 32  # never above 32
    assert plan_search_batches(per_sample, 8000).score == 8
    assert plan_search_batches(per_sample, 8000).sensitivity == 2  # reference, candidate and first batch kept
    tiny = plan_search_batches(per_sample, 10)  # below one sample: still runs, one at a time
    assert (tiny.score, tiny.sensitivity) == (1, 1)
    assert tiny.sensitivity_memory == 2000  # one batch of both models' tensors: one group, not many passes


def test_evaluator_batch_follows_its_budget_and_scores_the_same(cnn) -> None:
    path, _, evald = cnn
    model = onnx.load(str(path))
    dataset = open_dataset(evald, model_input_specs(model))
    per_sample = activation_bytes(model, next(dataset.batches(1)))
    assert per_sample > 16 * 16 * 16 * 4  # at least the first Conv's output
    sizes, scores = [], []
    candidate = make_session(model)  # FP32 against itself: every score is exact
    for budget in (None, 5 * per_sample, 1):
        ev = Evaluator(model, dataset, max_memory=budget)
        sizes.append(ev.size)
        scores.append(ev.score(candidate))
    assert sizes == [32, 5, 1]
    assert all(math.isinf(s.sqnr_db) for s in scores)


def _search(cnn, tmp_path: Path, name: str, max_memory: int | None, sqnr: float = 48.0):
    path, calib, evald = cnn
    result = api.convert_model(
        path, tmp_path / f"{name}.onnx", data_path=calib, eval_data=evald, config=CONFIG, force=True,
        search=SearchOptions(Budget(min_sqnr_db=sqnr), max_memory=max_memory),
    )  # fmt: skip
    assert result.search is not None
    return result.search


def test_search_answer_does_not_depend_on_the_budget_without_dynamic_nodes(cnn, tmp_path) -> None:
    large = _search(cnn, tmp_path, "large", 1 << 30)
    small = _search(cnn, tmp_path, "small", 1)  # batch 1 everywhere
    assert len(large.trials) > 4  # past the methods: the sensitivity ranking ran
    assert [(t.action, t.sqnr_db, t.meets_budget) for t in small.trials] == [
        (t.action, t.sqnr_db, t.meets_budget) for t in large.trials
    ]
    assert small.chosen.candidate == large.chosen.candidate
    assert (tmp_path / "small.onnx").read_bytes() == (tmp_path / "large.onnx").read_bytes()


def test_no_candidate_session_is_kept(cnn, tmp_path, monkeypatch) -> None:
    made: list[weakref.ref[object]] = []
    most_alive = 0

    def tracked(model, **kwargs):
        nonlocal most_alive
        gc.collect()
        most_alive = max(most_alive, sum(r() is not None for r in made))
        session = make_session(model, **kwargs)
        made.append(weakref.ref(session))
        return session

    monkeypatch.setattr(accuracy_search, "make_session", tracked)
    search = _search(cnn, tmp_path, "tracked", 1)
    assert len(made) == len(search.trials) > 4  # one session per candidate...
    assert most_alive == 0  # ...released before the next one is built


def test_cli_max_memory_reaches_the_search_and_needs_a_budget(cnn, tmp_path) -> None:
    path, calib, evald = cnn
    base = ["convert", str(path), "--data", str(calib), "--eval-data", str(evald), "--force"]
    alone = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "a.onnx"), "--max-memory", "1K"])
    assert alone.exit_code != 0 and "--max-memory" in alone.output and "Traceback" not in alone.output
    searched = CliRunner().invoke(
        app, [*base, "-o", str(tmp_path / "b.onnx"), "--max-memory", "1K", "--min-sqnr", "30"]
    )
    assert searched.exit_code == 0, searched.output
    assert "candidates scored at batch 1, ranked at batch 1" in searched.output
