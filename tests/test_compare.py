"""compare as a verdict: gates, per-layer culprit finding, JSON schema, markdown and HTML."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from quantcli.api import CompareRequest, compare_models, convert_model
from quantcli.cli.app import EXIT_GATE_FAILED, app
from quantcli.compare.metrics import parse_metric, takes_reference
from quantcli.core.host import default_config
from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS
from tests.helpers import run

runner = CliRunner()
SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "quantcli/schemas/compare.schema.json").read_text())
MODEL = SAMPLE_MODELS / "digits_cnn.onnx"
EVAL = CALIBRATION_DATA / "digits_cnn_eval.npz"
DAMAGED_NODE = "/features/features.6/conv1/Conv"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "cnn.int8.onnx"
    convert_model(MODEL, out, data_path=CALIBRATION_DATA / "digits_cnn_calib.npz", config=default_config())
    return out


@pytest.fixture(scope="module")
def damaged(quantized, tmp_path_factory) -> Path:
    """The same quantized model with one Conv's weight scales multiplied by 10."""
    model = onnx.load(str(quantized))
    conv = next(n for n in model.graph.node if n.name == DAMAGED_NODE)
    weight_dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    scale = next(t for t in model.graph.initializer if t.name == weight_dq.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(10), scale.name))
    out = tmp_path_factory.mktemp("d") / "damaged.onnx"
    onnx.save(model, str(out))
    return out


GATES = ["--max-accuracy-drop", "1", "--min-agreement", "98", "--min-sqnr", "25", "--max-size-ratio", "0.35"]


def test_gates_pass_on_the_good_model(quantized, tmp_path):
    result = runner.invoke(app, ["compare", str(MODEL), str(quantized), "--data", str(EVAL), "--runs", "3", *GATES])
    assert result.exit_code == 0, result.output
    assert result.output.count(": pass") == 4


def test_gates_fail_on_the_damaged_model_each_named(damaged):
    result = runner.invoke(app, ["compare", str(MODEL), str(damaged), "--data", str(EVAL), "--runs", "3", *GATES])
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    for gate in ("max-accuracy-drop", "min-agreement", "min-sqnr"):
        assert f"gate failed: {gate}:" in result.output
    assert "gate failed: max-size-ratio" not in result.output


def test_speedup_gate(quantized):
    result = runner.invoke(
        app, ["compare", str(MODEL), str(quantized), "--data", str(EVAL), "--runs", "3", "--min-speedup", "100"]
    )
    assert result.exit_code == EXIT_GATE_FAILED and "gate failed: min-speedup" in result.output


def test_per_layer_finds_the_damaged_layer(damaged):
    result = compare_models(
        CompareRequest(MODEL, damaged, EVAL, latency_batch_sizes=(), per_layer=True, max_samples=100)
    )
    worst = result.layers[0]
    assert worst.node == DAMAGED_NODE, [(e.node, e.sqnr_db, e.local_sqnr_db) for e in result.layers[:4]]
    assert worst.local_sqnr_db is not None and worst.local_sqnr_db < 10
    assert "loses precision itself" in worst.hint


def test_json_markdown_html(quantized, tmp_path):
    paths = {k: tmp_path / f"r.{k}" for k in ("json", "md", "html")}
    result = runner.invoke(
        app,
        ["compare", str(MODEL), str(quantized), "--data", str(EVAL), "--runs", "5", "--per-layer", "--min-sqnr", "20",
         "--json", str(paths["json"]), "--markdown", str(paths["md"]), "--html", str(paths["html"])],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(paths["json"].read_text())
    jsonschema.validate(doc, SCHEMA)
    assert len(doc["layers"]) >= 13 and doc["layers"][0]["sqnr_db"] <= doc["layers"][-1]["sqnr_db"]
    md = paths["md"].read_text()
    assert "passes its gates" in md and "| logits |" in md and "Worst layers" in md
    page = paths["html"].read_text()
    assert page.startswith("<!doctype html>") and page.count("<svg") >= 4
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_schema_rejects_a_broken_document(quantized, tmp_path):
    out = tmp_path / "r.json"
    assert runner.invoke(app, ["compare", str(MODEL), str(quantized), "--data", str(EVAL), "--runs", "2",
                               "--json", str(out)]).exit_code == 0  # fmt: skip
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, SCHEMA)
    del doc["outputs"][0]["sqnr_db"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)


def test_custom_metric_drives_the_accuracy_gate(quantized, damaged, tmp_path):
    metric = tmp_path / "mymetric.py"
    metric.write_text(
        "import numpy as np\n"
        "def top2(outputs, labels):\n"
        "    best = np.argsort(-outputs['logits'], axis=1)[:, :2]\n"
        "    return float(np.mean(np.any(best == labels[:, None], axis=1)))\n"
    )
    args = ["--data", str(EVAL), "--runs", "2", "--no-memory", "--metric", f"{metric}:top2", "--max-accuracy-drop", "1"]
    good = runner.invoke(app, ["compare", str(MODEL), str(quantized), *args])
    assert good.exit_code == 0, good.output
    assert f"task metric {metric}:top2: FP32 " in good.output
    bad = runner.invoke(app, ["compare", str(MODEL), str(damaged), *args])
    assert bad.exit_code == EXIT_GATE_FAILED and "gate failed: max-accuracy-drop" in bad.output


def test_a_custom_metric_may_compare_with_fp32s_outputs(quantized, damaged, tmp_path):
    """A metric with a ``reference`` parameter gets FP32's outputs: FP32 scores 1 against itself, the
    candidate its top-1 agreement with FP32 (no labels read), and the drop gate judges it."""
    metric = tmp_path / "vs_fp32.py"
    metric.write_text(
        "def agreement(outputs, labels, reference):\n"
        "    return float((outputs['logits'].argmax(1) == reference['logits'].argmax(1)).mean())\n"
    )
    request = CompareRequest(MODEL, damaged, EVAL, latency_batch_sizes=(), metric=parse_metric(f"{metric}:agreement"))
    result = compare_models(request)
    tm = result.task_metric
    assert tm is not None and tm.reference == 1.0
    x = np.load(EVAL)["input"]
    fp32 = run(onnx.load(str(MODEL)), {"input": x})[0].argmax(1)
    ours = run(onnx.load(str(damaged)), {"input": x})[0].argmax(1)
    assert tm.candidate == pytest.approx(float(np.mean(fp32 == ours))) and tm.candidate < 0.99
    args = ["--data", str(EVAL), "--runs", "2", "--no-memory", "--metric", f"{metric}:agreement",
            "--max-accuracy-drop", "1"]  # fmt: skip
    assert runner.invoke(app, ["compare", str(MODEL), str(quantized), *args]).exit_code == 0
    bad = runner.invoke(app, ["compare", str(MODEL), str(damaged), *args])
    assert bad.exit_code == EXIT_GATE_FAILED and "gate failed: max-accuracy-drop" in bad.output


def test_takes_reference():
    def plain(outputs, labels):
        return 0.0

    def against(outputs, labels, reference=None):
        return 0.0

    assert takes_reference(against) and not takes_reference(plain)
    assert not takes_reference(len) and not takes_reference(None)


def test_top5_accuracy_is_at_least_top1(quantized):
    top1 = compare_models(CompareRequest(MODEL, quantized, EVAL, latency_batch_sizes=()))
    top5 = compare_models(CompareRequest(MODEL, quantized, EVAL, latency_batch_sizes=(), metric=parse_metric("top5")))
    assert top5.outputs[0].accuracy_fp32.value >= top1.outputs[0].accuracy_fp32.value
    assert top5.outputs[0].accuracy_fp32.value == 1.0


def test_bad_metric_is_a_clean_error(quantized):
    result = runner.invoke(app, ["compare", str(MODEL), str(quantized), "--data", str(EVAL), "--metric", "nope:f"])
    assert result.exit_code == 3 and "importing nope failed" in result.output


def test_time_budget_and_session_memory(quantized):
    result = compare_models(
        CompareRequest(
            MODEL, quantized, EVAL, latency_batch_sizes=(1,), runs=100_000, time_budget_s=0.5, measure_memory=True
        )
    )
    assert 5 <= result.latency[0].reference.runs < 100_000
    assert result.reference_peak_mb is not None and result.reference_peak_mb > 0
    assert result.candidate_peak_mb is not None and result.candidate_peak_mb > 0
