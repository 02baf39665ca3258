"""Accuracy-driven search and recipes: the budget holds, the fewest nodes fall back, replays are exact."""

from __future__ import annotations

import json
from dataclasses import replace

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from quantcli import api
from quantcli.cli.app import app
from quantcli.cli.flags import flag
from quantcli.compare.metrics import parse_metric
from quantcli.core.errors import ArtifactMismatchError, QuantCliError
from quantcli.core.host import default_config
from quantcli.core.options import QuantConfig
from quantcli.schemas import convert_document, load_schema
from quantcli.search.accuracy_search import STALL_AFTER, Budget, BudgetNotMetError, SearchOptions
from quantcli.search.recipe import read_recipe
from tests import models
from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS
from tests.helpers import run, sqnr

CONFIG = QuantConfig()  # explicit types: the same choices on every host

# a budgeted convert also requires a faster model; these tests are about accuracy, so the speed
# verdict is set (1.5x) rather than timed (test_budget_result_slower_than_fp32_is_not_written varies it)
pytestmark = pytest.mark.usefixtures("fixed_speedup")
#: 25 dB as given: which node the search floats, without the margin's standard error on top
#: (``test_search_budgets`` tests the margin)
SQNR_AS_GIVEN = Budget(min_sqnr_db=25.0, margin=0.0)


def test_search_returns_only_the_oversensitive_layer_to_float(mlp, tmp_path):
    model, calib, evald = mlp
    out = tmp_path / "q.onnx"
    result = api.convert_model(
        model, out, data_path=calib, config=CONFIG,
        search=SearchOptions(SQNR_AS_GIVEN), eval_data=evald,
    )  # fmt: skip
    search = result.search
    assert search is not None
    assert not search.trials[0].meets_budget  # plain quantization misses the budget
    assert search.trials[0].sqnr_db < 10
    assert search.chosen.meets_budget and search.chosen.sqnr_db >= 25.0
    assert search.chosen.candidate.float_nodes == ("mm2",)
    quantized = {name for name, _ in result.plan.quantized_nodes}
    assert {"mm1", "mm3"} <= quantized and "mm2" not in quantized
    # the written model really reaches the budget on the evaluation data
    x = np.load(evald)["x"]
    ref = run(models.sensitive_mlp(), {"x": x})[0]
    assert sqnr(ref, run(onnx.load(str(out)), {"x": x})[0]) >= 25.0


def test_recipe_replays_to_identical_bytes(mlp, tmp_path):
    model, calib, evald = mlp
    first, recipe = tmp_path / "a.onnx", tmp_path / "recipe.json"
    api.convert_model(
        model, first, data_path=calib, config=CONFIG, search=SearchOptions(SQNR_AS_GIVEN),
        eval_data=evald, save_recipe=recipe,
    )  # fmt: skip
    doc = json.loads(recipe.read_text())
    assert doc["schema"] == "quantcli.recipe/1" and doc["float_nodes"] == ["mm2"]
    second = tmp_path / "b.onnx"
    replay = api.convert_model(model, second, data_path=calib, recipe=recipe)
    assert replay.search is None
    assert first.read_bytes() == second.read_bytes()


def test_search_is_deterministic(mlp, tmp_path):
    model, calib, evald = mlp
    outs = []
    for name in ("a", "b"):
        res = api.convert_model(
            model, tmp_path / f"{name}.onnx", data_path=calib, config=CONFIG,
            search=SearchOptions(Budget(min_sqnr_db=25.0)), eval_data=evald,
        )  # fmt: skip
        assert res.search is not None
        outs.append([(t.action, t.meets_budget) for t in res.search.trials])
    assert outs[0] == outs[1]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_unreachable_budget_writes_nothing_and_exits_1(mlp, tmp_path):
    model, calib, evald = mlp
    out = tmp_path / "q.onnx"
    with pytest.raises(BudgetNotMetError, match="no quantization met the budget"):
        api.convert_model(
            model, out, data_path=calib, config=CONFIG,
            search=SearchOptions(Budget(min_sqnr_db=200.0), max_fallback=1, probe=1), eval_data=evald,
        )  # fmt: skip
    assert not out.exists()
    res = CliRunner().invoke(
        app, ["convert", str(model), "-o", str(out), "--data", str(calib), "--eval-data", str(evald),
              "--min-sqnr", "200", "--search-max-fallback", "1"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    assert not out.exists()


def test_recipe_for_another_model_is_refused(mlp, tmp_path):
    model, calib, evald = mlp
    recipe = tmp_path / "recipe.json"
    api.convert_model(
        model, tmp_path / "a.onnx", data_path=calib, config=CONFIG,
        search=SearchOptions(Budget(min_sqnr_db=25.0)), eval_data=evald, save_recipe=recipe,
    )  # fmt: skip
    with pytest.raises(ArtifactMismatchError, match="another model"):
        read_recipe(recipe, expected_sha256="0" * 64)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "quantcli.recipe/9"}))
    with pytest.raises(ArtifactMismatchError, match=r"not a quantcli\.recipe/1 recipe"):
        read_recipe(bad)
    bad.write_text("{not json")
    with pytest.raises(ArtifactMismatchError, match="not JSON"):
        read_recipe(bad)


def test_accuracy_budget_on_the_bundled_transformer(tmp_path):
    """Real model, real held-out labels: the chosen model keeps top-1 within the budget (the host's own types:
    8-bit weights saturate AVX2 u8*s8 kernels without VNNI)."""
    model = SAMPLE_MODELS / "digits_transformer.onnx"
    out = tmp_path / "t.onnx"
    result = api.convert_model(
        model, out, data_path=CALIBRATION_DATA / "digits_transformer_calib.npz", config=default_config(),
        search=SearchOptions(Budget(max_accuracy_drop=0.3), latency_runs=3),
        eval_data=CALIBRATION_DATA / "digits_transformer_eval.npz",
    )  # fmt: skip
    search = result.search
    assert search is not None and search.fp32_accuracy is not None
    assert search.chosen.accuracy is not None
    assert search.fp32_accuracy - search.chosen.accuracy <= 0.3 + 1e-9
    # most of the model stays quantized
    assert len(search.chosen.candidate.float_nodes) <= 4
    # integer MatMuls: static, or with run-time activation ranges (the encoder rule's linear layers)
    static = sum(op == "MatMul" for _, op in result.plan.quantized_nodes)
    assert static + len(result.plan.dynamic_nodes) >= 10


def test_cli_search_options_are_checked(mlp, tmp_path):
    model, calib, evald = mlp
    runner = CliRunner()
    res = runner.invoke(  # --eval-data without a budget: the data the verdict checks on
        app, ["convert", str(model), "-o", str(tmp_path / "v.onnx"), "--data", str(calib), "--eval-data", str(evald)]
    )
    assert res.exit_code == 0 and "$eval_data samples" not in res.output and "--eval-data samples" in res.output
    res = runner.invoke(
        app, ["convert", str(model), "-o", str(tmp_path / "q.onnx"), "--data", str(calib), "--min-sqnr", "20"]
    )
    assert res.exit_code == 3 and "--eval-data" in res.output
    # an accuracy budget needs class scores: this MLP has them, an unlabelled set uses agreement
    res = runner.invoke(
        app, ["convert", str(model), "-o", str(tmp_path / "q.onnx"), "--data", str(calib), "--eval-data",
              str(evald), "--max-accuracy-drop", "5", "--save-recipe", str(tmp_path / "r.json")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "accuracy search" in res.output and (tmp_path / "r.json").exists()
    assert "--eval-data samples (the search chose on them)" in res.output  # the verdict says its data was seen


def test_recipe_keeps_weight_clipping(mlp, tmp_path):
    from dataclasses import replace

    from quantcli.core.options import WeightClipping

    model, calib, evald = mlp
    config = replace(CONFIG, weight_clipping=WeightClipping.MSE)
    first, recipe = tmp_path / "a.onnx", tmp_path / "recipe.json"
    api.convert_model(
        model, first, data_path=calib, config=config, search=SearchOptions(Budget(min_sqnr_db=25.0)),
        eval_data=evald, save_recipe=recipe,
    )  # fmt: skip
    assert read_recipe(recipe).config.weight_clipping == WeightClipping.MSE
    second = tmp_path / "b.onnx"
    api.convert_model(model, second, data_path=calib, recipe=recipe)
    assert first.read_bytes() == second.read_bytes()


# ---- search + algorithms ------------------------------------------------------------------------


def test_search_applies_the_algorithms_to_each_candidate_and_the_recipe_replays_them(mlp, tmp_path):
    from quantcli.core.options import AlgorithmOptions
    from quantcli.static.bias_correction import BiasCorrectionReport

    model, calib, evald = mlp
    first, recipe = tmp_path / "a.onnx", tmp_path / "recipe.json"
    algorithms = AlgorithmOptions(smoothquant=0.5, bias_correction=True)
    result = api.convert_model(
        model, first, data_path=calib, config=CONFIG, algorithms=algorithms,
        search=SearchOptions(Budget(min_sqnr_db=25.0)), eval_data=evald, save_recipe=recipe,
    )  # fmt: skip
    assert result.search is not None and result.search.chosen.meets_budget
    floats = result.search.chosen.candidate.float_nodes
    assert "mm2" in floats
    # bias correction was redone for the chosen plan: mm1 (quantized, bias Add) is corrected, the
    # float mm2 is not, and mm3 has no bias Add to correct
    report = next(a for a in result.algorithms if isinstance(a, BiasCorrectionReport))
    assert report.corrected == {"MatMul": 1}
    written = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(first)).graph.initializer}
    original = {i.name: onnx.numpy_helper.to_array(i) for i in models.sensitive_mlp().graph.initializer}
    np.testing.assert_array_equal(written["b2"], original["b2"])  # float mm2's bias: untouched
    doc = json.loads(recipe.read_text())
    # schema 3 when the search also ran a MatMul with run-time activation quantization (older readers refuse it)
    dynamic = result.search.chosen.candidate.dynamic_nodes
    assert doc["schema"] == ("quantcli.recipe/3" if dynamic else "quantcli.recipe/2")
    assert doc.get("dynamic_nodes", []) == list(dynamic)
    assert doc["algorithms"] == {"cle": False, "smoothquant": 0.5, "bias_correction": True}
    assert read_recipe(recipe).algorithms == algorithms
    second = tmp_path / "b.onnx"
    replay = api.convert_model(model, second, data_path=calib, recipe=recipe)
    assert first.read_bytes() == second.read_bytes()
    assert any(isinstance(a, BiasCorrectionReport) for a in replay.algorithms)
    # the recipe fixes the algorithms: asking for others is refused, not silently ignored
    with pytest.raises(QuantCliError, match="the recipe fixes the algorithms"):
        api.convert_model(
            model, tmp_path / "c.onnx", data_path=calib, recipe=recipe, algorithms=AlgorithmOptions(cle=True)
        )


def test_search_algorithm_stage_meets_a_budget_plain_quantization_misses(tmp_path):
    from tests.test_algorithms import conv_relu_conv

    model = tmp_path / "crc.onnx"
    model.write_bytes(conv_relu_conv().SerializeToString())
    calib, evald = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=models.structured_images(64, seed=1))
    np.savez(evald, x=models.structured_images(64, seed=2))
    outs, recipe = [tmp_path / "a.onnx", tmp_path / "b.onnx"], tmp_path / "recipe.json"
    options = SearchOptions(Budget(min_sqnr_db=20.0), try_algorithms=True, max_fallback=0)
    results = [
        api.convert_model(
            model, out, data_path=calib, config=CONFIG, search=options, eval_data=evald, save_recipe=recipe, force=True
        )
        for out in outs
    ]
    search = results[0].search
    assert search is not None
    plain = [t for t in search.trials if t.stage == "method" and not t.candidate.base]
    assert plain and not any(t.meets_budget for t in plain)  # no calibration method alone reaches 20 dB
    assert search.chosen.meets_budget and search.chosen.candidate.base == "all algorithms"
    assert search.chosen.candidate.float_nodes == ()
    assert outs[0].read_bytes() == outs[1].read_bytes()  # deterministic
    doc = json.loads(recipe.read_text())
    assert doc["algorithms"] == {"cle": True, "smoothquant": 0.5, "bias_correction": True}
    assert doc["config"]["weight_clipping"] == "mse"
    replayed = tmp_path / "c.onnx"
    api.convert_model(model, replayed, data_path=calib, recipe=recipe)
    assert replayed.read_bytes() == outs[0].read_bytes()
    x = np.load(evald)["x"]
    assert sqnr(run(conv_relu_conv(), {"x": x})[0], run(onnx.load(str(replayed)), {"x": x})[0]) >= 20.0


def test_search_algorithms_flag_needs_a_budget(mlp, tmp_path):
    model, calib, _ = mlp
    res = CliRunner().invoke(
        app, ["convert", str(model), "-d", str(calib), "-o", str(tmp_path / "q.onnx"), "--search-algorithms"]
    )
    assert res.exit_code != 0 and "--search-algorithms is a search stage" in res.output


def test_accuracy_budget_per_position_ignores_negative_labels(tmp_path):
    # the over-sensitive MLP on sequences: scores per position (N x T x 10), labels per position,
    # -1 where nothing is scored (as a masked language model's data marks unmasked tokens)
    mlp = models.sensitive_mlp()
    for vi, dims in ((mlp.graph.input[0], ["N", "T", 32]), (mlp.graph.output[0], ["N", "T", 10])):
        vi.CopyFrom(onnx.helper.make_tensor_value_info(vi.name, onnx.TensorProto.FLOAT, dims))
    model = tmp_path / "seq.onnx"
    model.write_bytes(mlp.SerializeToString())
    rng = np.random.default_rng(7)
    x_cal, x_ev = (np.abs(rng.normal(size=(64, 6, 32))).astype(np.float32) for _ in range(2))
    labels = run(mlp, {"x": x_ev})[0].argmax(-1)
    labels[:, 1::2] = -1  # half the positions are not scored
    calib, evald = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=x_cal)
    np.savez(evald, x=x_ev, labels=labels)
    result = api.convert_model(
        model, tmp_path / "q.onnx", data_path=calib, config=CONFIG, eval_data=evald,
        search=SearchOptions(Budget(max_accuracy_drop=1.0)),
    )  # fmt: skip
    search = result.search
    assert search is not None
    assert search.fp32_accuracy == 100.0  # the labels are FP32's own predictions where scored
    assert search.trials[0].accuracy is not None and search.trials[0].accuracy < 99.0
    assert search.chosen.meets_budget and "mm2" in search.chosen.candidate.float_nodes
    # the accuracy is over scored positions only: recompute it from the written model
    # in the search's batches of 32: a run-time quantized MatMul takes its range from the whole batch
    written = onnx.load(str(tmp_path / "q.onnx"))
    pred = np.concatenate([run(written, {"x": x_ev[i : i + 32]})[0].argmax(-1) for i in range(0, 64, 32)])
    scored = labels >= 0
    assert search.chosen.accuracy == pytest.approx(100.0 * np.mean(pred[scored] == labels[scored]))


def test_search_budget_on_a_custom_metric(mlp, tmp_path):
    model, calib, evald = mlp
    x = np.load(evald)["x"]
    labels = run(models.sensitive_mlp(), {"x": x})[0].argmax(-1)
    labelled = tmp_path / "labelled.npz"
    np.savez(labelled, x=x, labels=labels)
    # a task metric of the user's: hits among the samples labelled with an even class, 0..1
    metric = tmp_path / "task.py"
    metric.write_text(
        "import numpy as np\n"
        "def even_hits(outputs, labels):\n"
        "    keep = labels % 2 == 0\n"
        "    return float((outputs['y'].argmax(-1)[keep] == labels[keep]).mean())\n"
    )
    # a drop of 1 point needs all three MatMuls in float (no integer kernel: refused); 6 keeps mm1 quantized
    out, doc = _search_with_metric(tmp_path, model, calib, labelled, f"{metric}:even_hits")
    assert doc["search"]["metric"] == f"{metric}:even_hits"
    assert doc["search"]["fp32_accuracy"] == 100.0 and "mm2" in doc["float_nodes"]
    # the recorded accuracy is the metric of the written model
    pred = run(onnx.load(str(out)), {"x": x})[0].argmax(-1)
    keep = labels % 2 == 0
    assert doc["search"]["accuracy"] == pytest.approx(100.0 * np.mean(pred[keep] == labels[keep]), abs=1e-4)
    assert doc["search"]["accuracy_drop"] <= 6.0
    # without --max-accuracy-drop the metric has nothing to measure
    res = CliRunner().invoke(
        app,
        ["convert", str(model), "-d", str(calib), "-o", str(tmp_path / "x.onnx"), "--eval-data", str(labelled),
         "--min-sqnr", "20", "--search-metric", f"{metric}:even_hits"],
    )  # fmt: skip
    assert res.exit_code != 0 and "give --max-accuracy-drop" in res.output


def test_a_custom_metric_against_fp32_needs_no_labels(mlp, tmp_path):
    """A metric with a ``reference`` parameter (FP32's outputs) budgets data without labels: FP32 scores 100
    against itself, and the drop is the share of samples whose top class moved."""
    model, calib, evald = mlp
    metric = tmp_path / "vs_fp32.py"
    metric.write_text(
        "def agreement(outputs, labels, reference):\n"
        "    assert labels is None\n"
        "    return float((outputs['y'].argmax(-1) == reference['y'].argmax(-1)).mean())\n"
    )
    out, doc = _search_with_metric(tmp_path, model, calib, evald, f"{metric}:agreement")
    assert doc["search"]["fp32_accuracy"] == 100.0 and "mm2" in doc["float_nodes"]
    x = np.load(evald)["x"]
    written = onnx.load(str(out))  # in the search's batches of 32 (a run-time MatMul's range is the batch's)
    pred = np.concatenate([run(written, {"x": x[i : i + 32]})[0].argmax(-1) for i in range(0, len(x), 32)])
    fp32 = run(models.sensitive_mlp(), {"x": x})[0].argmax(-1)
    assert doc["search"]["accuracy"] == pytest.approx(100.0 * np.mean(pred == fp32), abs=1e-4)
    assert 0.0 < 100.0 - doc["search"]["accuracy"] <= 6.0  # the budget spent, not all-float
    # the verdict measures the same metric on its samples (the search's, held out of calibration)
    result = api.convert_model(
        model, tmp_path / "v.onnx", data_path=calib, eval_data=evald, config=CONFIG,
        search=SearchOptions(Budget(max_accuracy_drop=6.0), metric=parse_metric(f"{metric}:agreement")),
    )  # fmt: skip
    verdict = result.verdict
    assert verdict is not None and verdict.metric is not None and verdict.metric.reference == 1.0
    assert verdict.metric.candidate == pytest.approx(result.search.chosen.accuracy / 100.0)
    assert f"{metric}:agreement {verdict.metric.candidate:.3f} (FP32 1.000)" in verdict.render(flag)[0]
    doc = convert_document(result)
    jsonschema.validate(doc, load_schema(doc["schema"]))
    assert doc["verdict"]["metric"] == {
        "name": f"{metric}:agreement",
        "fp32": 1.0,
        "quantized": verdict.metric.candidate,
    }


def test_search_metric_agreement_ignores_labels(mlp, tmp_path):
    model, calib, evald = mlp
    x = np.load(evald)["x"]
    # labels that quantization cannot hurt (every sample "wrong" for FP32 and for any model):
    # top-1 accuracy sees no drop at all, agreement with FP32 still sees mm2's damage
    labelled = tmp_path / "labelled.npz"
    np.savez(labelled, x=x, labels=np.full(len(x), 99))
    out, recipe = tmp_path / "q.onnx", tmp_path / "r.json"
    args = ["convert", str(model), "-d", str(calib), "--eval-data", str(labelled), "--max-accuracy-drop", "1"]
    res = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "top1.onnx"), "--save-recipe", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "t.json").read_text())["float_nodes"] == []  # labels: nothing to fix
    # agreement within 1 point needs all three MatMuls in float (no integer kernel: refused); 4 keeps mm1 quantized
    args[-1] = "4"
    res = CliRunner().invoke(app, [*args, "-o", str(out), "--search-metric", "agreement", "--save-recipe", str(recipe)])
    assert res.exit_code == 0, res.output
    doc = json.loads(recipe.read_text())
    assert doc["search"]["metric"] == "top1 agreement" and "mm2" in doc["float_nodes"]
    ref = run(models.sensitive_mlp(), {"x": x})[0].argmax(-1)
    changed = 100.0 * np.mean(run(onnx.load(str(out)), {"x": x})[0].argmax(-1) != ref)
    assert changed <= 4.0 and doc["search"]["accuracy_drop"] == pytest.approx(changed, abs=1e-4)


def test_budget_result_slower_than_fp32_is_not_written(tmp_path, mlp, fixed_speedup):
    """The honest answer: a model that meets the budget but is not faster than FP32 is not written,
    unless --force; the CLI exits 1 and says so in one line."""
    from quantcli.core.errors import NotFasterError

    model, calib, evald = mlp
    out = tmp_path / "q.onnx"
    fixed_speedup(0.8)
    options = SearchOptions(Budget(min_sqnr_db=25.0), latency_runs=3)
    with pytest.raises(NotFasterError, match="meets the accuracy budget but is not faster than FP32"):
        api.convert_model(model, out, data_path=calib, config=CONFIG, search=options, eval_data=evald)
    assert not out.exists()
    res = CliRunner().invoke(
        app, ["convert", str(model), "-d", str(calib), "--eval-data", str(evald), "--min-sqnr", "25", "-o", str(out)]
    )
    assert res.exit_code == 1 and "not faster than FP32" in res.output and "--force" in res.output
    assert not out.exists()
    result = api.convert_model(model, out, data_path=calib, config=CONFIG, search=options, eval_data=evald, force=True)
    assert out.exists() and result.search is not None
    fixed_speedup(1.3)  # faster: written without --force
    out2 = tmp_path / "q2.onnx"
    api.convert_model(model, out2, data_path=calib, config=CONFIG, search=options, eval_data=evald)
    assert out2.exists()
    # a median above 1 with a quarter of the rounds at or below it is a coin toss: not shown faster
    fixed_speedup(1.02, low=0.97)
    out3 = tmp_path / "q3.onnx"
    with pytest.raises(NotFasterError, match=r"x1\.02, lower quartile x0\.97 over 5 rounds.*The search's answer: step"):
        api.convert_model(model, out3, data_path=calib, config=CONFIG, search=options, eval_data=evald)
    assert not out3.exists()
    fixed_speedup(1.02, low=1.01)
    api.convert_model(model, out3, data_path=calib, config=CONFIG, search=options, eval_data=evald)
    assert out3.exists()


def _search_with_metric(tmp_path, model, calib, evald, metric: str) -> tuple:
    """``convert --max-accuracy-drop 6 --search-metric METRIC`` from the CLI: the written model's path and
    the saved recipe."""
    out, recipe = tmp_path / "q.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(
        app,
        ["convert", str(model), "-d", str(calib), "-o", str(out), "--eval-data", str(evald),
         "--max-accuracy-drop", "6", "--search-metric", metric, "--save-recipe", str(recipe)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return out, json.loads(recipe.read_text())


def _case_files(tmp_path, net: onnx.ModelProto, calib_x: np.ndarray, eval_x: np.ndarray):
    """``net`` and its calibration and evaluation inputs ``x``, written where convert reads them."""
    model, calib, evald = tmp_path / "model.onnx", tmp_path / "calib.npz", tmp_path / "eval.npz"
    model.write_bytes(net.SerializeToString())
    np.savez(calib, x=calib_x)
    np.savez(evald, x=eval_x)
    return model, calib, evald


def _sqnr_with_float(tmp_path, model, calib, feed, ref, *exclude: str) -> float:
    """Output SQNR against ``ref`` on ``feed`` of a default convert with the nodes ``exclude`` kept float."""
    return _sqnr_with_config(tmp_path, model, calib, feed, ref, replace(CONFIG, exclude_nodes=exclude))


def _sqnr_with_config(tmp_path, model, calib, feed, ref, config: QuantConfig) -> float:
    """Output SQNR against ``ref`` on ``feed`` of a convert with ``config``, calibrated on all of ``calib``."""
    out = tmp_path / f"q_{'_'.join(config.exclude_nodes) or 'none'}_{'_'.join(config.dynamic_nodes)}.onnx"
    api.convert_model(model, out, data_path=calib, config=config, verdict=False, verdict_share=0.0)
    return sqnr(ref, run(onnx.load(str(out)), feed)[0])


def test_error_spread_over_the_network_is_repaired_by_a_float_region(tmp_path):
    """Each of 8 orthogonal MatMuls adds its rounding: no single float node (max_fallback=1) reaches a budget
    that half the chain in float does; the region stage finds an end of the network to keep float."""
    rng = np.random.default_rng(3)
    x_cal, x = rng.normal(size=(96, 48)).astype(np.float32), rng.normal(size=(96, 48)).astype(np.float32)
    model, calib, evald = _case_files(tmp_path, models.noisy_chain(), x_cal, x)
    ref = run(models.noisy_chain(), {"x": x})[0]

    def sqnr_of(*exclude: str) -> float:
        return _sqnr_with_float(tmp_path, model, calib, {"x": x}, ref, *exclude)

    all_int, one_float, half_float = sqnr_of(), sqnr_of("mm0"), sqnr_of("mm0", "mm1", "mm2", "mm3")
    assert one_float < half_float - 1.5  # one node is far from what half the chain gives
    budget = (one_float + half_float) / 2
    options = SearchOptions(Budget(min_sqnr_db=budget), max_fallback=1, probe=1, methods=())
    result = api.convert_model(
        model, tmp_path / "q.onnx", data_path=calib, config=CONFIG, search=options, eval_data=evald
    )
    search = result.search
    assert search is not None and all_int < budget
    regions = [t for t in search.trials if t.stage == "region"]
    assert regions and regions[0].candidate.float_nodes == tuple(f"mm{i}" for i in range(7))  # all but one
    chosen = set(search.chosen.candidate.float_nodes)
    assert search.chosen.meets_budget and 2 <= len(chosen) <= 6  # a few nodes, not one and not all
    assert sqnr(ref, run(onnx.load(str(tmp_path / "q.onnx")), {"x": x})[0]) >= budget - 0.5


def test_fallback_that_cannot_reach_the_budget_stops_early_and_regions_repair(tmp_path):
    """32 orthogonal MatMuls, a budget that needs about 20 of them float, at most 12 single moves: after
    ``STALL_AFTER`` moves their average gain shows the other moves cannot close the gap, so the search
    goes on to the regions without trying them, and the regions meet the budget."""
    chain = models.noisy_chain(layers=32, d=32)
    rng = np.random.default_rng(4)
    x_cal, x = rng.normal(size=(64, 32)).astype(np.float32), rng.normal(size=(64, 32)).astype(np.float32)
    model, calib, evald = _case_files(tmp_path, chain, x_cal, x)
    ref = run(chain, {"x": x})[0]

    def sqnr_of(*exclude: str) -> float:
        return _sqnr_with_float(tmp_path, model, calib, {"x": x}, ref, *exclude)

    twelve, twenty_four = sqnr_of(*(f"mm{i}" for i in range(12))), sqnr_of(*(f"mm{i}" for i in range(24)))
    assert twelve < twenty_four - 2.0
    budget = (twelve + twenty_four) / 2  # out of reach of 12 single moves, within reach of a region
    logs: list[str] = []
    options = SearchOptions(Budget(min_sqnr_db=budget), max_fallback=12, probe=1, methods=())
    result = api.convert_model(
        model, tmp_path / "q.onnx", data_path=calib, config=CONFIG, search=options, eval_data=evald, log=logs.append
    )
    search = result.search
    assert search is not None
    moved = {t.action.split(": ", 1)[1] for t in search.trials if t.stage == "fallback"}
    assert len(moved) == STALL_AFTER < 12
    assert any(line.startswith(f"fallback stopped after {STALL_AFTER} moves") for line in logs), logs
    assert search.chosen.meets_budget and search.chosen.stage in ("region", "prune")


def _two_sensitive_ends(d: int = 32, middle: int = 6, outlier: float = 300.0) -> onnx.ModelProto:
    """A stem and a head that each read an activation with one outlier channel (``outlier`` times the
    others, undone in their weights), so that 8-bit activations round their other channels coarsely,
    around a chain of orthogonal MatMuls that add little error each."""
    rng = np.random.default_rng(7)
    scale = np.ones(d, np.float32)
    scale[0] = outlier

    def orth() -> np.ndarray:
        return np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)

    inits = [numpy_helper.from_array(orth() / scale[:, None], "w_stem")]
    nodes = [helper.make_node("MatMul", ["x", "w_stem"], ["h0"], name="stem")]
    for i in range(middle):
        inits.append(numpy_helper.from_array(orth(), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"], name=f"mm{i}"))
    inits += [numpy_helper.from_array(scale, "spread"), numpy_helper.from_array(orth() / scale[:, None], "w_head")]
    nodes += [
        helper.make_node("Mul", [f"h{middle}", "spread"], ["wide"], name="spread"),
        helper.make_node("MatMul", ["wide", "w_head"], ["y"], name="head"),
    ]
    return models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])],
        inits,
    )


def test_a_stem_and_a_head_both_sensitive_are_repaired_by_a_region_at_both_ends(tmp_path):
    """Neither end alone repairs a network whose first and last layers both lose most of the signal: the
    region stage then keeps the first p and the last compute node float, and finds p = 1."""
    net = _two_sensitive_ends()
    rng = np.random.default_rng(8)

    def data(n: int) -> np.ndarray:
        x = rng.normal(size=(n, 32)).astype(np.float32)
        x[:, 0] *= 300.0  # the stem's outlier input channel
        return x

    x_cal, x = data(96), data(96)
    model, calib, evald = _case_files(tmp_path, net, x_cal, x)
    ref = run(net, {"x": x})[0]

    def sqnr_of(*exclude: str) -> float:
        return _sqnr_with_float(tmp_path, model, calib, {"x": x}, ref, *exclude)

    middle = tuple(f"mm{i}" for i in range(6))
    but_head, but_stem, both = sqnr_of("stem", *middle), sqnr_of(*middle, "head"), sqnr_of("stem", "head")
    assert max(but_head, but_stem) < both - 6.0  # each end alone loses; both float keeps the signal
    budget = (max(but_head, but_stem) + both) / 2
    options = SearchOptions(Budget(min_sqnr_db=budget), max_fallback=1, probe=1, methods=())
    result = api.convert_model(
        model, tmp_path / "q.onnx", data_path=calib, config=CONFIG, search=options, eval_data=evald
    )
    search = result.search
    assert search is not None and search.chosen.meets_budget
    one_end = [t for t in search.trials if t.stage == "region" and "and the last" not in t.action]
    assert one_end and not any(t.meets_budget for t in one_end)  # the ends alone were tried, and missed
    both_ends = [t for t in search.trials if t.stage == "region" and "and the last" in t.action]
    assert both_ends and both_ends[0].action == "float: the first 6 and the last of 8 compute nodes"
    assert set(search.chosen.candidate.float_nodes) >= {"stem", "head"}
    assert len(search.chosen.candidate.float_nodes) < 8


def test_a_region_whose_static_rest_misses_tries_the_rest_at_run_time(tmp_path):
    """Evaluation data 8x louder than the calibration data: every static range clips, so no float region
    with the rest static meets the budget, while MatMuls quantized at run time (ranges per call) do; the
    region stage tries the rest at run time and keeps that choice through its bisection."""
    rng = np.random.default_rng(5)
    x_cal, x = rng.normal(size=(64, 32)).astype(np.float32), 8 * rng.normal(size=(64, 32)).astype(np.float32)
    model, calib, evald = _case_files(tmp_path, models.noisy_chain(layers=4, d=32), x_cal, x)
    options = SearchOptions(Budget(min_sqnr_db=25.0), max_fallback=1, probe=1, methods=())
    result = api.convert_model(
        model, tmp_path / "q.onnx", data_path=calib, config=CONFIG, search=options, eval_data=evald
    )
    search = result.search
    assert search is not None and search.chosen.meets_budget
    regions = [t for t in search.trials if t.stage == "region"]
    static = [t for t in regions if "at run time" not in t.action]
    assert static and not any(t.meets_budget for t in static)
    assert any(t.meets_budget and t.action.endswith("the other MatMul/Gemm at run time") for t in regions)
    assert search.chosen.candidate.dynamic_nodes  # the answer keeps MatMuls at run time
    assert len(search.chosen.candidate.float_nodes) < 4


def test_a_head_the_plan_runs_at_run_time_can_be_part_of_a_float_region(tmp_path):
    """A MatMul that the plan itself runs with run-time activation quantization (a rule's choice, here
    ``dynamic_nodes``) is a compute node a region may keep float: with the head at run time, its outlier
    channel still coarsens its other channels, and only the stem and the head float meet the budget."""
    net = _two_sensitive_ends()
    model = tmp_path / "ends.onnx"
    model.write_bytes(net.SerializeToString())
    rng = np.random.default_rng(8)
    x = rng.normal(size=(96, 32)).astype(np.float32)
    x[:, 0] *= 300.0
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    config = replace(CONFIG, dynamic_nodes=("head",))
    ref = run(net, {"x": x})[0]
    both = _sqnr_with_config(tmp_path, model, calib, {"x": x}, ref, replace(config, exclude_nodes=("stem", "head")))
    options = SearchOptions(Budget(min_sqnr_db=both - 3.0), max_fallback=1, probe=1, methods=())
    result = api.convert_model(
        model, tmp_path / "q.onnx", data_path=calib, config=config, search=options, eval_data=calib
    )
    search = result.search
    assert search is not None and search.chosen.meets_budget
    assert {"stem", "head"} <= set(search.chosen.candidate.float_nodes)
    assert any(t.stage == "region" and "of 8 compute nodes" in t.action for t in search.trials)  # head counted


def _convs_around_matmuls(d: int = 32, outlier: float = 300.0) -> onnx.ModelProto:
    """stem Conv -> two MatMuls -> a Conv and a head MatMul that each read an outlier channel (undone in
    their weights): 1x1 Convs on [N, d, 1, 1], MatMuls on [N, d]."""
    rng = np.random.default_rng(11)
    scale = np.ones(d, np.float32)
    scale[0] = outlier

    def orth() -> np.ndarray:
        return np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)

    inits = [
        numpy_helper.from_array(orth()[:, :, None, None], "w_stem"),
        numpy_helper.from_array(orth(), "w0"),
        numpy_helper.from_array(orth(), "w1"),
        numpy_helper.from_array(scale[None, :, None, None], "spread4"),
        numpy_helper.from_array((orth() / scale[None, :])[:, :, None, None], "w_c"),
        numpy_helper.from_array(scale, "spread2"),
        numpy_helper.from_array(orth() / scale[:, None], "w_head"),
        numpy_helper.from_array(np.array([-1, d], np.int64), "flat"),
        numpy_helper.from_array(np.array([-1, d, 1, 1], np.int64), "square"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_stem"], ["s"], name="stem"),
        helper.make_node("Reshape", ["s", "flat"], ["s2"], name="r0"),
        helper.make_node("MatMul", ["s2", "w0"], ["h0"], name="m0"),
        helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="m1"),
        helper.make_node("Reshape", ["h1", "square"], ["h4"], name="r1"),
        helper.make_node("Mul", ["h4", "spread4"], ["wide4"], name="spread_c"),
        helper.make_node("Conv", ["wide4", "w_c"], ["c"], name="c"),
        helper.make_node("Reshape", ["c", "flat"], ["c2"], name="r2"),
        helper.make_node("Mul", ["c2", "spread2"], ["wide"], name="spread_head"),
        helper.make_node("MatMul", ["wide", "w_head"], ["y"], name="head"),
    ]
    return models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])],
        inits,
    )


def test_when_no_region_meets_matmuls_at_run_time_with_the_rest_float_do(tmp_path):
    """Evaluation data 8x louder than calibration: every static range clips, and the Conv and the head read
    an outlier channel. No region (each leaves one node static or at run time) meets the budget; the MatMuls
    at run time with the Convs float and the head float do (issue 15: dynamic MatMuls, float where needed)."""
    net = _convs_around_matmuls()
    rng = np.random.default_rng(12)
    x_cal = rng.normal(size=(64, 32, 1, 1)).astype(np.float32)
    x = 8 * rng.normal(size=(64, 32, 1, 1)).astype(np.float32)
    model, calib, evald = _case_files(tmp_path, net, x_cal, x)
    ref = run(net, {"x": x})[0]
    config = replace(CONFIG, exclude_nodes=("stem", "c", "head"), dynamic_nodes=("m0", "m1"))
    target = _sqnr_with_config(tmp_path, model, calib, {"x": x}, ref, config)
    options = SearchOptions(Budget(min_sqnr_db=target - 3.0), max_fallback=1, probe=1, methods=())
    result = api.convert_model(
        model, tmp_path / "q.onnx", data_path=calib, config=CONFIG, search=options, eval_data=evald
    )
    search = result.search
    assert search is not None and search.chosen.meets_budget
    regions = [t for t in search.trials if t.stage == "region" and not t.action.startswith("run time")]
    assert regions and not any(t.meets_budget for t in regions)
    runtime = [t for t in search.trials if t.action.startswith("run time")]
    assert [t.meets_budget for t in runtime] == [False, True]  # the head at run time misses; float, it meets
    assert runtime[1].action == "run time: 2 MatMul/Gemm, 3 other float, the last float"
    assert set(search.chosen.candidate.dynamic_nodes) == {"m0", "m1"}
