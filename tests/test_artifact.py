"""The calibration file: exact round trip, byte-stable, and refusals with the right error."""

from __future__ import annotations

import json

import pytest

from quantcli.core.errors import ArtifactMismatchError, OutputPathError
from quantcli.core.options import CalibrationMethod
from quantcli.stats.artifact import SCHEMA, read_calibration, write_calibration
from quantcli.stats.calibration import CalibrationResult, TensorRange


def _result() -> CalibrationResult:
    ranges = {
        "b": TensorRange(-0.1 + 1e-9, 3.0000001192092896, -0.25, 3.5),
        "a": TensorRange(0.0, 1 / 3, 0.0, 1 / 3),
    }
    return CalibrationResult("ab" * 32, CalibrationMethod.PERCENTILE, {"percentile": 99.9}, 17, ranges)


def test_round_trip_is_exact_and_sorted(tmp_path):
    path = tmp_path / "c.json"
    write_calibration(_result(), path, model_path="m.onnx")
    back = read_calibration(path, expected_sha256="ab" * 32)
    assert back.ranges == _result().ranges
    assert back.method == CalibrationMethod.PERCENTILE and back.num_samples == 17
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA and list(doc["tensors"]) == ["a", "b"]


def test_same_result_same_bytes(tmp_path):
    write_calibration(_result(), tmp_path / "1.json", model_path="m.onnx")
    write_calibration(_result(), tmp_path / "2.json", model_path="m.onnx")
    assert (tmp_path / "1.json").read_bytes() == (tmp_path / "2.json").read_bytes()


def test_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("keep me")
    with pytest.raises(OutputPathError, match="already exists; pass --force"):
        write_calibration(_result(), path, model_path="m.onnx")
    assert path.read_text() == "keep me"
    write_calibration(_result(), path, model_path="m.onnx", force=True)
    assert read_calibration(path).num_samples == 17


def test_other_model_names_both_hashes(tmp_path):
    path = tmp_path / "c.json"
    write_calibration(_result(), path, model_path="m.onnx")
    with pytest.raises(ArtifactMismatchError, match=r"sha256 ababababab.*this model's sha256 is cdcdcdcd"):
        read_calibration(path, expected_sha256="cd" * 32)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json at all", "not JSON"),
        ('{"schema": "quantcli.calibration/2"}', "schema 'quantcli.calibration/2' is not supported"),
        ('{"hello": 1}', "no 'schema' key"),
        ('{"schema": "quantcli.calibration/1", "model": {}}', "malformed calibration file"),
    ],
)
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ArtifactMismatchError, match=message):
        read_calibration(path)


def test_the_calibration_file_carries_sample_shapes_to_convert(tmp_path):
    """A model with dynamic height and width: convert from the calibration file counts every MAC at the data's
    size and plans what convert --data plans, because the file records one sample's input shapes."""
    import numpy as np
    from typer.testing import CliRunner

    from quantcli.cli.app import app
    from tests import models

    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    model.write_bytes(models.small_cnn(dynamic_spatial=True).SerializeToString())
    np.savez(data, x=models.structured_images(12, seed=1))
    run = CliRunner().invoke
    calib = tmp_path / "c.json"
    assert run(app, ["calibrate", str(model), "--data", str(data), "-o", str(calib)]).exit_code == 0
    assert json.loads(calib.read_text())["input_shapes"] == {"x": [1, 3, 16, 16]}
    assert read_calibration(calib).input_shapes == {"x": (1, 3, 16, 16)}

    docs = {}
    for how, source in (("file", ["-c", str(calib)]), ("data", ["--data", str(data), "--verdict-share", "0"])):
        out, doc = tmp_path / f"{how}.onnx", tmp_path / f"{how}.json"
        result = run(app, ["convert", str(model), *source, "-o", str(out), "--no-verdict", "--json", str(doc)])
        assert result.exit_code == 0, result.output
        docs[how] = json.loads(doc.read_text())
    macs = docs["file"]["audit"]["macs"]
    assert macs["unknown_nodes"] == 0 and macs["total"] == docs["data"]["audit"]["macs"]["total"] > 0
    assert docs["file"]["quantized"] == docs["data"]["quantized"]
