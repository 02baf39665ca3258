"""Every convert ends with a verdict: fidelity on samples it did not calibrate on, and batch-1 speed.

The speed is never timed here: ``tests/conftest.py`` makes it 1.5x (``fixed_speedup`` sets another)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from quantcli.api import calibrate_model, convert_model
from quantcli.cli.app import app
from quantcli.cli.flags import flag
from quantcli.compare.output_kinds import KindMetrics, OutputKind
from quantcli.core.host import default_config
from quantcli.modes.common import ConvertMode
from quantcli.pipeline.verdict import THRESHOLDS, Verdict, agreement_lower_bound, samples_to_show
from quantcli.verify.speedcheck import SpeedCheck
from tests import models
from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS

runner = CliRunner()
DIGITS = SAMPLE_MODELS / "digits_cnn.onnx"
CALIB = CALIBRATION_DATA / "digits_cnn_calib.npz"  # 200 samples


def test_convert_holds_back_a_share_and_checks_the_digits_classifier(tmp_path):
    result = convert_model(DIGITS, tmp_path / "q.onnx", data_path=CALIB, config=default_config())
    verdict = result.verdict
    assert verdict is not None and result.calibration is not None
    assert result.calibration.num_samples == 160 and verdict.num_samples == 40  # the last 20%, not calibrated on
    (k,) = verdict.kinds
    assert k.kind == OutputKind.CLASSIFIER and k.agreement is not None and k.agreement >= THRESHOLDS["agreement"]
    assert verdict.speed is not None and verdict.speed.speedup == 1.5 and verdict.passed
    line = verdict.render(flag)[0]
    assert line.startswith("verdict: ok on 40 held-back --data samples: logits classifier agreement")
    assert line.endswith("1.50x FP32 at batch 1")


def test_the_cli_prints_the_verdict_and_the_share_can_be_zero(tmp_path):
    out = tmp_path / "q.onnx"
    result = runner.invoke(app, ["convert", str(DIGITS), "--data", str(CALIB), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "verdict: ok on 40 held-back --data samples" in result.output
    full = convert_model(DIGITS, tmp_path / "all.onnx", data_path=CALIB, config=default_config(), verdict_share=0)
    assert full.calibration is not None and full.calibration.num_samples == 200
    assert full.verdict is not None and full.verdict.kinds == ()
    assert full.verdict.render(flag)[1:] == [
        "fidelity not checked: no data it did not calibrate on; give --eval-data to check"
    ]
    off = convert_model(DIGITS, tmp_path / "off.onnx", data_path=CALIB, config=default_config(), verdict=False)
    assert off.verdict is None and off.calibration is not None and off.calibration.num_samples == 200


def test_eval_data_is_checked_and_nothing_is_held_back(tmp_path):
    eval_data = CALIBRATION_DATA / "digits_cnn_eval.npz"
    result = convert_model(DIGITS, tmp_path / "q.onnx", data_path=CALIB, eval_data=eval_data, config=default_config())
    assert result.calibration is not None and result.calibration.num_samples == 200
    assert result.verdict is not None and result.verdict.num_samples == 256  # at most 256 of the 500
    assert "on 256 --eval-data samples:" in result.verdict.render(flag)[0]


def test_a_calibration_file_says_what_it_could_not_check(tmp_path, cnn_path, cnn_data):
    calibration = calibrate_model(cnn_path, cnn_data)
    result = convert_model(cnn_path, tmp_path / "q.onnx", calibration=calibration)
    assert result.verdict is not None and not result.verdict.kinds
    lines = result.verdict.render(flag)
    assert lines[0] == "verdict: fidelity not checked; 1.50x FP32 at batch 1"  # timed on a random input
    assert "convert from a calibration file has no samples it did not calibrate on; give --eval-data" in lines[1]


def test_too_few_samples_are_not_held_back(tmp_path, cnn_path):
    data = tmp_path / "few.npz"
    np.savez(data, x=models.structured_images(12, seed=1))  # 20% of 12 is 2, under the minimum of 4
    result = convert_model(cnn_path, tmp_path / "q.onnx", data_path=data)
    assert result.calibration is not None and result.calibration.num_samples == 12
    assert result.verdict is not None
    assert "12 samples of --data are too few to hold 4 back" in result.verdict.render(flag)[1]


def test_a_verdict_below_its_thresholds_warns_and_names_a_repair(tmp_path, fixed_speedup):
    """sensitive_mlp loses its predictions under 8 bits (0.8 dB SQNR): the verdict says so, and the
    model is slower (a set 0.8x): both warnings name what to do."""
    fixed_speedup(0.8)
    model, data = tmp_path / "mlp.onnx", tmp_path / "d.npz"
    model.write_bytes(models.sensitive_mlp().SerializeToString())
    np.savez(data, x=np.abs(np.random.default_rng(11).normal(size=(60, 32))).astype(np.float32))
    result = convert_model(model, tmp_path / "q.onnx", data_path=data)
    assert result.verdict is not None and not result.verdict.passed
    lines = result.verdict.render(flag)
    assert lines[0].startswith("verdict: WARNING on 12 held-back --data samples")
    (kind_warning, speed_warning) = lines[1:]
    assert "agreement" in kind_warning and "< 0.98" in kind_warning
    assert "--eval-data DATA --min-agreement 0.98" in kind_warning
    assert "0.80x FP32 at batch 1, not faster" in speed_warning
    result = runner.invoke(app, ["convert", str(model), "--data", str(data), "-o", str(tmp_path / "c.onnx")])
    assert result.exit_code == 0 and "verdict: WARNING" in result.output  # a warning, not a failure


@pytest.mark.parametrize(
    ("kind", "metric", "value", "repair"),
    [
        (OutputKind.EMBEDDING, "cosine", 0.98, "try --mode dynamic"),
        (OutputKind.MAP, "iou", 0.85, "--eval-data DATA --min-iou 0.9"),
        (OutputKind.SEQUENCE, "agreement", 0.90, "--eval-data DATA --min-agreement 0.95"),
        (OutputKind.CTC, "agreement", 0.90, "--eval-data DATA --min-agreement 0.95"),
    ],
)
def test_each_threshold_and_its_repair(kind, metric, value, repair):
    from quantcli.pipeline import verdict as v

    class _Ctx:  # what _warnings reads of the context
        class request:
            mode = ConvertMode.STATIC

    below = KindMetrics("y", kind, "", 10, 20.0, **{metric: value})
    at = KindMetrics("y", kind, "", 10, 20.0, **{metric: THRESHOLDS[metric]})
    speed = SpeedCheck(1.0, 0.5, 2.0, 1, 0.0)
    (warning,) = v._warnings([below], speed, _Ctx())  # type: ignore[arg-type]
    assert not list(v._warnings([at], speed, _Ctx()))  # type: ignore[arg-type]
    text = Verdict("s", 10, (below,), speed, (warning,), (), v._OPTIONS).render(flag)
    assert text[0].startswith("verdict: WARNING") and repair in text[1]


def test_modes_check_eval_data(tmp_path, cnn_path, cnn_data):
    result = convert_model(cnn_path, tmp_path / "d.onnx", mode=ConvertMode.DYNAMIC, eval_data=cnn_data)
    assert result.verdict is not None and result.verdict.num_samples == 96
    assert [k.kind for k in result.verdict.kinds] == [OutputKind.CLASSIFIER]


def test_a_map_output_is_judged_by_iou(tmp_path):
    from tests.test_output_kinds import _two_output_model

    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    model.write_bytes(_two_output_model().SerializeToString())
    np.savez(data, x=models.structured_images(60, seed=5))
    result = convert_model(model, tmp_path / "q.onnx", data_path=data)
    assert result.verdict is not None
    kinds = {k.name: k for k in result.verdict.kinds}
    assert kinds["mask"].kind == OutputKind.MAP and kinds["mask"].iou is not None
    assert kinds["probs"].kind == OutputKind.CLASSIFIER
    assert "mask map IoU" in result.verdict.line()


def test_the_verdict_does_not_change_a_model_converted_from_the_same_samples(tmp_path):
    """Holding back changes which samples calibrate, nothing else: calibrating on the first 160 by
    hand with the share off writes the same bytes."""
    subset = tmp_path / "first160.npz"
    with np.load(CALIB) as npz:
        np.savez(subset, **{k: npz[k][:160] for k in npz.files})
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    convert_model(DIGITS, a, data_path=CALIB, config=default_config())
    convert_model(DIGITS, b, data_path=subset, config=default_config(), verdict_share=0)
    assert Path(a).read_bytes() == Path(b).read_bytes()


def test_raw_outputs_are_not_judged_unless_named(tmp_path):
    """matmul_chain's [N, 4, 32] output has no class or map semantics: the verdict says it judged
    nothing and how to name the kind; named an embedding, it is judged by cosine."""
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    model.write_bytes(models.matmul_chain().SerializeToString())
    np.savez(data, x=np.random.default_rng(11).normal(size=(48, 4, 32)).astype(np.float32))
    result = convert_model(model, tmp_path / "q.onnx", data_path=data)
    assert result.verdict is not None and result.verdict.passed
    first, note = result.verdict.render(flag)
    assert first.startswith("verdict: no task metric on 9 held-back --data samples: y raw (SQNR")
    assert note.startswith("not judged: y look") and "--output-kind NAME=KIND names their kind" in note
    assert "--search-metric FILE.py:FUNCTION" in note
    cli = runner.invoke(
        app,
        ["convert", str(model), "--data", str(data), "-o", str(tmp_path / "e.onnx"), "--output-kind", "y=embedding"],
    )
    assert cli.exit_code == 0, cli.output
    assert "verdict: ok on 9 held-back --data samples: y embedding cosine" in cli.output


def test_a_model_with_only_raw_outputs_warns_below_the_sqnr_bound():
    """Detector heads are raw: at 14.5 dB a real YOLOX head lost 15% of its detections, so below
    THRESHOLDS["sqnr"] the verdict warns; raw outputs beside a judged one (a VAD's states) do not."""
    from quantcli.pipeline import verdict as v

    class _Ctx:
        class request:
            mode = ConvertMode.STATIC

    speed = SpeedCheck(1.0, 0.5, 2.0, 1, 0.0)
    low = KindMetrics("boxes", OutputKind.RAW, "", 10, THRESHOLDS["sqnr"] - 0.5)
    high = KindMetrics("boxes", OutputKind.RAW, "", 10, THRESHOLDS["sqnr"] + 0.5)
    (warning,) = v._warnings([low], speed, _Ctx())  # type: ignore[arg-type]
    assert not list(v._warnings([high], speed, _Ctx()))  # type: ignore[arg-type]
    judged = KindMetrics("prob", OutputKind.BINARY, "", 10, 30.0, agreement=1.0)
    assert not list(v._warnings([judged, low], speed, _Ctx()))  # type: ignore[arg-type]
    text = Verdict("s", 10, (low,), speed, (warning,), (), v._OPTIONS).render(flag)
    assert text[0].startswith("verdict: WARNING") and "--eval-data DATA --min-sqnr 20" in text[1]


def test_the_searchs_metric_stands_for_the_raw_outputs_and_warns_past_its_budget():
    """With a search's Python metric (a detector's F1 against FP32, say), the raw heads' SQNR does not warn:
    the metric judges them, by the search's --max-accuracy-drop (points of 100)."""
    from quantcli.compare.metrics import TaskMetric
    from quantcli.pipeline import verdict as v
    from quantcli.search.accuracy_search import Budget, SearchOptions

    class _Ctx:
        class request:
            mode = ConvertMode.STATIC
            search = SearchOptions(Budget(max_accuracy_drop=5.0))

    speed = SpeedCheck(1.0, 0.5, 2.0, 1, 0.0)
    low = KindMetrics("boxes", OutputKind.RAW, "", 10, THRESHOLDS["sqnr"] - 5)
    kept, lost = TaskMetric("f1.py:f1", 1.0, 0.96), TaskMetric("f1.py:f1", 1.0, 0.93)
    assert not list(v._warnings([low], speed, _Ctx(), kept))  # type: ignore[arg-type]
    (warning,) = v._warnings([low], speed, _Ctx(), lost)  # type: ignore[arg-type]
    verdict = Verdict("s", 10, (low,), speed, (warning,), (), v._OPTIONS, None, lost)
    line, text = verdict.render(flag)
    assert line == "verdict: WARNING on s: boxes raw (SQNR 15.0 dB); f1.py:f1 0.930 (FP32 1.000); 2.00x FP32 at batch 1"
    assert text.startswith("verdict: f1.py:f1 0.930, 7.00 points below FP32's 1.000, more than --max-accuracy-drop 5")
    ok = Verdict("s", 10, (low,), speed, (), (), v._OPTIONS, None, kept).render(flag)[0]
    assert ok.startswith("verdict: ok on s:")  # the metric judged it (raw outputs alone read "no task metric")


def test_wilson_lower_bound_and_the_samples_it_takes():
    assert agreement_lower_bound(40, 40) == pytest.approx(0.9366, abs=1e-4)
    assert agreement_lower_bound(39, 40) < agreement_lower_bound(40, 40) < 1.0
    assert agreement_lower_bound(0, 0) == 0.0
    need = samples_to_show(THRESHOLDS["agreement"])
    assert need == 133
    assert agreement_lower_bound(need, need) >= 0.98 > agreement_lower_bound(need - 1, need - 1)


def test_an_agreement_too_few_samples_can_show_is_said_not_warned(tmp_path):
    """40 held-back digits that all agree pass the verdict, with a note that they show 0.98 only at 133
    samples; 256 --eval-data samples (the most it reads) that all agree say nothing of the kind."""
    held = convert_model(DIGITS, tmp_path / "q.onnx", data_path=CALIB, config=default_config()).verdict
    assert held is not None and held.passed and held.kinds[0].agreement == 1.0
    (note,) = [u for u in held.render(flag) if u.startswith("few samples:")]
    assert note == (
        "few samples: logits agreement 1.000 on 40 samples shows at least 0.937 at 95% confidence, below 0.98; "
        "133 or more samples (--eval-data) can show it"
    )
    evald = CALIBRATION_DATA / "digits_cnn_eval.npz"
    full = convert_model(DIGITS, tmp_path / "e.onnx", data_path=CALIB, eval_data=evald, config=default_config())
    assert full.verdict is not None and full.verdict.num_samples == 256 and full.verdict.kinds[0].agreement == 1.0
    assert not [u for u in full.verdict.render(flag) if u.startswith("few samples:")]
