"""compare in shards: the accuracy part measured over contiguous blocks of batches and merged in order is
exactly the one-process result (in this process, and as Ray tasks on a local Ray with 2 CPUs)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantcli.api import CompareRequest, compare_models, convert_model
from quantcli.cli.app import app
from quantcli.compare.accuracy import finish_accuracy, open_compare_data, run_accuracy_shard, shard_window
from quantcli.compare.metrics import parse_metric
from quantcli.core.errors import CalibrationDataError
from quantcli.core.host import default_config
from quantcli.graph.model_io import load_model
from quantcli.stats.shards import ShardSpec
from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS

runner = CliRunner()
CNN, CNN_EVAL = SAMPLE_MODELS / "digits_cnn.onnx", CALIBRATION_DATA / "digits_cnn_eval.npz"
VIT, VIT_EVAL = SAMPLE_MODELS / "digits_transformer.onnx", CALIBRATION_DATA / "digits_transformer_eval.npz"
METRIC = """
import numpy as np

def top1(outputs, labels):
    return float(np.mean(next(iter(outputs.values())).argmax(-1) == labels))
"""


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("q")
    # the encoder rules make the transformer's linear layers run-time quantized (no Q/DQ pairs to rank
    # per layer): switched off here so that per-layer state is merged across shards on both models
    static = replace(default_config(), disabled_rules=frozenset({"encoder-linear", "attention", "residual"}))
    for name in ("digits_cnn", "digits_transformer"):
        convert_model(
            SAMPLE_MODELS / f"{name}.onnx", out / f"{name}.int8.onnx",
            data_path=CALIBRATION_DATA / f"{name}_calib.npz",
            config=static if name == "digits_transformer" else default_config(),
        )  # fmt: skip
    return {"cnn": out / "digits_cnn.int8.onnx", "vit": out / "digits_transformer.int8.onnx"}


def _accuracy_json(path: Path) -> dict:
    """The compare document without what is timed (latency, memory) on one host."""
    doc = json.loads(path.read_text())
    return {k: v for k, v in doc.items() if k not in ("latency", "memory")}


@pytest.mark.parametrize("shards", [2, 3])
def test_shards_merged_in_order_equal_one_process(quantized, tmp_path, shards):
    """No Ray: the shard tasks' function run here, merged, gives the one-process metrics to the bit
    (per-layer errors, labels, custom metric and the confidence intervals included)."""
    metric_file = tmp_path / "metric.py"
    metric_file.write_text(METRIC)
    request = CompareRequest(
        CNN, quantized["cnn"], CNN_EVAL, batch_size=48, latency_batch_sizes=(), per_layer=True,
        metric=parse_metric(f"{metric_file}:top1"),
    )  # fmt: skip
    one = compare_models(request)
    models = (load_model(CNN), load_model(quantized["cnn"]))
    dataset = open_compare_data(request, models[0])
    from quantcli.compare.accuracy import first_batch_plan
    from quantcli.graph.session import make_session

    plan = first_batch_plan(make_session(models[0]), dataset, request)
    parts = [run_accuracy_shard(request, ShardSpec(k, shards), plan) for k in range(1, shards + 1)]
    assert [p.outputs[0].count for p in parts] != [500] and sum(p.outputs[0].count for p in parts) == 500
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    got = finish_accuracy(merged, models, dataset, request)
    assert got.outputs == one.outputs
    assert got.kinds == one.kinds
    assert got.task_metric == one.task_metric and one.task_metric is not None
    assert got.layers == one.layers and len(one.layers) > 5


def test_more_shards_than_batches_is_one_line(quantized):
    request = CompareRequest(CNN, quantized["cnn"], CNN_EVAL, batch_size=200)
    dataset = open_compare_data(request, load_model(CNN))
    with pytest.raises(CalibrationDataError, match="shard 1/4 holds no batch: the data makes 3 batch"):
        shard_window(dataset, 200, ShardSpec(1, 4))


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'quantcli[ray]'")
    ray.init(num_cpus=2, log_to_driver=False)  # a local Ray with 2 CPUs; compare uses it as it is
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize(("model", "data", "key", "shards"), [(CNN, CNN_EVAL, "cnn", 3), (VIT, VIT_EVAL, "vit", 2)])
def test_compare_on_local_ray_equals_one_process(quantized, local_ray, tmp_path, model, data, key, shards):
    args = ["compare", str(model), str(quantized[key]), "--data", str(data), "--per-layer", "--no-memory"]
    args += ["--latency-batch", "1", "--runs", "3", "--warmup", "1", "-q"]
    one = runner.invoke(app, [*args, "--json", str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.output
    res = runner.invoke(app, [*args, "--ray", "local", "--shards", str(shards), "--json", str(tmp_path / "ray.json")])
    assert res.exit_code == 0, res.output
    ray_doc, one_doc = _accuracy_json(tmp_path / "ray.json"), _accuracy_json(tmp_path / "one.json")
    assert ray_doc == one_doc
    assert one_doc["layers"] and one_doc["outputs"][0]["accuracy_quant"] is not None
    assert json.loads((tmp_path / "ray.json").read_text())["latency"]  # timed on the driver


@pytest.mark.slow
def test_compare_on_ray_custom_metric_runs_on_the_driver(quantized, local_ray, tmp_path):
    """The metric file is loaded on the driver only; the workers collect the outputs it reads."""
    metric_file = tmp_path / "metric.py"
    metric_file.write_text(METRIC)
    base = CompareRequest(
        CNN, quantized["cnn"], CNN_EVAL, latency_batch_sizes=(), metric=parse_metric(f"{metric_file}:top1")
    )
    from dataclasses import replace

    one, on_ray = compare_models(base), compare_models(replace(base, ray="local", shards=2))
    assert on_ray.task_metric == one.task_metric and one.task_metric is not None
    assert on_ray.outputs == one.outputs
