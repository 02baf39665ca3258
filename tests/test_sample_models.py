"""The bundled, trained sample models through the whole pipeline on their real evaluation data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from quantcli.api import CompareRequest, compare_models, convert_model
from quantcli.core.host import default_config
from quantcli.graph.model_io import file_sha256
from quantcli.verify.audit import audit_fusion
from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS

pytestmark = pytest.mark.slow

METRICS = json.loads((SAMPLE_MODELS / "metrics.json").read_text())


@pytest.mark.parametrize("name", ["digits_cnn", "digits_transformer"])
def test_sample_model_is_as_documented(name):
    path = SAMPLE_MODELS / f"{name}.onnx"
    assert file_sha256(path) == METRICS[name]["sha256"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    assert opset >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    for split in ("calib", "eval"):
        data = CALIBRATION_DATA / f"{name}_{split}.npz"
        assert file_sha256(data) == METRICS[name]["data_sha256"][data.name]


def test_calibration_and_evaluation_splits_are_disjoint():
    calib_file, eval_file = CALIBRATION_DATA / "digits_cnn_calib.npz", CALIBRATION_DATA / "digits_cnn_eval.npz"
    with np.load(calib_file) as c, np.load(eval_file) as e:
        calib = {x.tobytes() for x in c["input"]}
        evaluation = {x.tobytes() for x in e["input"]}
        assert "labels" in e.files and "labels" not in c.files
    # identical images can occur in the digits data itself; the splits share (almost) none
    assert len(calib & evaluation) <= 2


@pytest.mark.parametrize("name", ["digits_cnn", "digits_transformer"])
def test_quantized_sample_model_keeps_accuracy(tmp_path, name):
    model = SAMPLE_MODELS / f"{name}.onnx"
    before = model.read_bytes()
    out = tmp_path / f"{name}.int8.onnx"
    result = convert_model(model, out, data_path=CALIBRATION_DATA / f"{name}_calib.npz", config=default_config())
    assert model.read_bytes() == before
    assert result.output_bytes <= 0.33 * result.input_bytes
    cmp = compare_models(CompareRequest(model, out, CALIBRATION_DATA / f"{name}_eval.npz", latency_batch_sizes=()))
    logits = cmp.outputs[0]
    assert logits.accuracy_fp32.value == pytest.approx(METRICS[name]["eval_top1_accuracy"])
    drop = logits.accuracy_fp32.value - logits.accuracy_quant.value
    assert drop <= 0.01, f"accuracy fell {100 * drop:.1f} points"
    assert logits.top1_agreement.value >= 0.97
    assert logits.sqnr_db >= 20.0


def test_every_conv_of_the_cnn_runs_as_an_integer_kernel(tmp_path):
    out = tmp_path / "cnn.int8.onnx"
    convert_model(
        SAMPLE_MODELS / "digits_cnn.onnx", out, data_path=CALIBRATION_DATA / "digits_cnn_calib.npz", require_fused=True
    )
    fp32_convs = sum(n.op_type == "Conv" for n in onnx.load(str(SAMPLE_MODELS / "digits_cnn.onnx")).graph.node)
    audit = audit_fusion(out)
    assert audit.integer_op_counts()["QLinearConv"] == fp32_convs == 7
    assert audit.float_compute_nodes == ()
