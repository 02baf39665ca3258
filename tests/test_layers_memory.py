"""``compare --per-layer`` under a memory budget: more passes as it shrinks, never other numbers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.compare import accuracy, layers
from quantcli.compare.layers import (
    DEFAULT_MEMORY_BUDGET,
    layer_errors,
    layer_memory_budget,
    layer_models,
    layer_statistics,
    per_layer_errors,
    plan_first_groups,
)
from quantcli.core.errors import InvalidOption
from quantcli.data.datasets import Dataset
from quantcli.pipeline.request import CompareRequest
from quantcli.stats.shards import ShardSpec
from tests.helpers import dataset, quantize
from tests.models import small_cnn, structured_images

runner = CliRunner()


@pytest.fixture(scope="module")
def cnn() -> tuple[onnx.ModelProto, onnx.ModelProto, Dataset]:
    """The small CNN, quantized, and 20 evaluation images (batches of 8: 8, 8, 4)."""
    model = small_cnn()
    quantized, _, _ = quantize(model, {"x": structured_images(32, seed=3)})
    return model, quantized, dataset(model, {"x": structured_images(20, seed=4)})


def test_batch_shrinks_to_the_budget_in_one_pass(cnn) -> None:
    """The budget picks pass 1's batch, not its passes (issue 14): onnxruntime's working memory follows the
    batch, and memory groups would re-run both models each; the hints still read the first batch of 8."""
    model, quantized, data = cnn
    models = layer_models(model, quantized)
    stats = [layer_statistics(models, data, batch_size=8, max_memory=b) for b in (1 << 30, 256 << 10, 1)]
    assert [s.passes for s in stats] == [1, 1, 1]
    assert [s.run_batch for s in stats] == [8, 2, 1]
    whole = layer_errors(models, stats[0], data)
    assert len(whole) >= 4 and any(e.local_sqnr_db is not None for e in whole)
    assert layer_errors(models, stats[1], data, max_memory=256 << 10) == whole
    assert layer_errors(models, stats[2], data, max_memory=1) == whole
    # pinned: optimized with every tensor exposed, then returning only its own outputs (a group adds its own)
    assert not models.optimize and [o.name for o in models.reference.graph.output] == ["y"]


def test_first_batch_is_the_one_asked_for_whatever_the_run_batch(cnn) -> None:
    """Pass 2 joins the runs of pass 1's batch into the first batch asked for: the same hints as one run."""
    model, quantized, data = cnn
    models = layer_models(model, quantized)
    one = layer_statistics(models, data, batch_size=8, max_memory=1 << 30)
    for run in (1, 3, 5):  # 3 and 5 do not divide 8: the last run of the first batch is shorter
        assert layer_errors(models, replace(one, run_batch=run), data) == layer_errors(models, one, data)
    # what a batch of 1 would read: another first batch
    assert layer_errors(models, replace(one, batch_size=1), data) != layer_errors(models, one, data)


def test_cli_says_when_the_per_layer_batch_shrinks(cnn_files) -> None:
    ref, cand, data = cnn_files
    argv = ["compare", ref, cand, "--data", data, "--per-layer", "--runs", "1", "--warmup", "0", "--no-memory"]
    result = runner.invoke(app, [*argv, "--latency-batch", "1", "--batch-size", "8", "--max-memory", "256K"])
    assert result.exit_code == 0, result.output
    assert "per-layer pass at batch 2 for --max-memory 256 KiB" in result.output
    result = runner.invoke(app, [*argv, "--latency-batch", "1", "--batch-size", "8"])
    assert result.exit_code == 0 and "per-layer pass at batch" not in result.output, result.output


def test_first_batch_groups_grow_as_the_budget_shrinks() -> None:
    needs = {"a": ["a"], "b": ["b", "a"], "c": ["c", "b"], "d": ["d", "c"]}
    nbytes = dict.fromkeys("abcd", 100)
    assert plan_first_groups("abcd", needs, nbytes, 1000) == [["a", "b", "c", "d"]]
    # a, b, c: 300 bytes, each input held once; d's group reads c again
    assert plan_first_groups("abcd", needs, nbytes, 300) == [["a", "b", "c"], ["d"]]
    assert plan_first_groups("abcd", needs, nbytes, 1) == [["a"], ["b"], ["c"], ["d"]]  # too large: one a group


@pytest.mark.parametrize("budget", [1, 64 << 10])
def test_numbers_equal_at_every_budget(cnn, budget) -> None:
    """Exactly (``==`` on every float): each tensor's energies are the same per-batch sums added in the
    same order, and every group runs the same graph (all compared tensors exposed), so the same values."""
    model, quantized, data = cnn
    whole = per_layer_errors(model, quantized, data, batch_size=8, max_memory=1 << 30)
    assert len(whole) >= 4 and any(e.local_sqnr_db is not None for e in whole)
    assert any(e.hist_counts and e.p999_abs > 0 for e in whole)
    assert per_layer_errors(model, quantized, data, batch_size=8, max_memory=budget) == whole


def test_numbers_equal_when_the_models_cannot_be_pinned(cnn, monkeypatch) -> None:
    """Above 2 GB (no pinned copy) every group runs the models exposing every tensor: the same numbers."""
    model, quantized, data = cnn
    whole = per_layer_errors(model, quantized, data, batch_size=8, max_memory=1 << 30)
    monkeypatch.setattr(layers, "pinned", lambda model, keep: None)
    assert layer_models(model, quantized).optimize
    assert per_layer_errors(model, quantized, data, batch_size=8, max_memory=1) == whole


def test_shards_merged_equal_one_pass(cnn) -> None:
    model, quantized, data = cnn
    models = layer_models(model, quantized)
    one = layer_statistics(models, data, batch_size=8, max_memory=1 << 30)
    shards = [
        layer_statistics(models, accuracy.shard_window(data, 8, ShardSpec(k, 2)), batch_size=8, max_memory=1)
        for k in (1, 2)
    ]
    shards[0].merge(shards[1])
    assert layer_errors(models, shards[0], data, max_memory=1) == layer_errors(models, one, data)


def test_budget_defaults_and_shard_split() -> None:
    assert layer_memory_budget() == DEFAULT_MEMORY_BUDGET == 512 << 20
    assert layer_memory_budget(1000, shards=4) == 250
    with pytest.raises(InvalidOption, match="max_memory"):
        CompareRequest(Path("a.onnx"), Path("b.onnx"), Path("d.npz"), max_memory=0)


@pytest.fixture
def cnn_files(tmp_path: Path, cnn) -> tuple[str, str, str]:
    model, quantized, _ = cnn
    paths = tmp_path / "fp32.onnx", tmp_path / "int8.onnx", tmp_path / "eval.npz"
    onnx.save(model, paths[0])
    onnx.save(quantized, paths[1])
    np.savez(paths[2], x=structured_images(12, seed=5))
    return str(paths[0]), str(paths[1]), str(paths[2])


def test_cli_max_memory_reaches_both_passes(cnn_files, monkeypatch) -> None:
    seen: dict[str, int | None] = {}

    def statistics_spy(*args, **kwargs):
        seen["pass 1"] = kwargs["max_memory"]
        return layer_statistics(*args, **kwargs)

    def errors_spy(*args, **kwargs):
        seen["pass 2"] = kwargs["max_memory"]
        return layer_errors(*args, **kwargs)

    monkeypatch.setattr(accuracy, "layer_statistics", statistics_spy)
    monkeypatch.setattr(accuracy, "layer_errors", errors_spy)
    ref, cand, data = cnn_files
    argv = ["compare", ref, cand, "--data", data, "--per-layer", "--max-memory", "3M", "--runs", "1", "--warmup", "0"]
    result = runner.invoke(app, [*argv, "--latency-batch", "1", "--no-memory", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert seen == {"pass 1": 3 << 20, "pass 2": 3 << 20}
    assert "per-layer error" in result.output


def test_bad_max_memory_is_one_line(cnn_files) -> None:
    ref, cand, data = cnn_files
    result = runner.invoke(app, ["compare", ref, cand, "--data", data, "--per-layer", "--max-memory", "lots"])
    assert result.exit_code == 3, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--max-memory" in lines[0], result.output
    assert "Traceback" not in result.output
