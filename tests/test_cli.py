"""The command line end to end (typer's CliRunner), exit codes, and error lines."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from quantcli import __version__
from quantcli.cli.app import EXIT_BAD_INPUT, EXIT_GATE_FAILED, app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_help_explains_the_workflow():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    assert "quantcli calibrate model.onnx --data calib.npz -o model.calib.json" in result.output
    assert "Exit codes" in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_calibrate_convert_compare(tmp_path, cnn_path, cnn_data):
    calib = tmp_path / "cnn.calib.json"
    out = tmp_path / "cnn.int8.onnx"
    before = cnn_path.read_bytes()

    result = invoke("calibrate", cnn_path, "--data", cnn_data, "-o", calib)
    assert result.exit_code == 0, result.output
    assert "calibrated" in result.output and calib.is_file()

    result = invoke("convert", cnn_path, "--calibration", calib, "-o", out, "--require-fused")
    assert result.exit_code == 0, result.output
    assert "QLinearConv" in result.output and "0 Conv/MatMul/Gemm left in float" in result.output

    report = tmp_path / "report.json"
    result = invoke(
        "compare", cnn_path, out, "--data", cnn_data, "--json", report, "--runs", "5", "--warmup", "1",
        "--min-sqnr", "20", "--max-size-ratio", "0.6",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    assert doc["schema"] == "quantcli.compare/1"
    assert doc["outputs"][0]["name"] == "y" and doc["outputs"][0]["sqnr_db"] > 20
    assert [g["name"] for g in doc["gates"]] == ["min-sqnr", "max-size-ratio"]
    assert all(g["passed"] for g in doc["gates"])
    assert [lat["batch_size"] for lat in doc["latency"]] == [1, 32]
    assert doc["integer_kernels"]["QLinearConv"] == 2
    assert cnn_path.read_bytes() == before  # the input model is never modified


def test_convert_calibrates_on_the_fly(tmp_path, cnn_path, cnn_data):
    out = tmp_path / "q.onnx"
    result = invoke("convert", cnn_path, "--data", cnn_data, "-o", out, "--method", "percentile")
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_image_folders_feed_convert_and_compare(tmp_path):
    """The bundled digits written as grey PNG files: convert calibrates from the folder and compare
    evaluates on another folder, with no .npz in between."""
    from PIL import Image

    from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS

    folders = {}
    for split, count in (("calib", 64), ("eval", 100)):
        folder = folders[split] = tmp_path / split
        folder.mkdir()
        with np.load(CALIBRATION_DATA / f"digits_cnn_{split}.npz") as npz:
            digits = npz["input"][:count, 0]
        assert digits.min() >= 0.0 and digits.max() <= 1.0  # so 8-bit PNGs hold them to 1/255
        for i, img in enumerate(digits):
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    model, out, report = SAMPLE_MODELS / "digits_cnn.onnx", tmp_path / "q.onnx", tmp_path / "r.json"
    result = invoke("convert", model, "--data", folders["calib"], "-o", out, "--scale", "255")
    assert result.exit_code == 0, result.output
    result = invoke(
        "compare", model, out, "--data", folders["eval"], "--json", report, "--runs", "2", "--warmup", "1",
        "--min-agreement", "95",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    assert doc["data"]["num_samples"] == 100 and doc["outputs"][0]["sqnr_db"] > 20


def test_failed_gate_exits_1_and_names_the_gate(tmp_path, cnn_path, cnn_data):
    out = tmp_path / "q.onnx"
    assert invoke("convert", cnn_path, "--data", cnn_data, "-o", out).exit_code == 0
    result = invoke("compare", cnn_path, out, "--data", cnn_data, "--runs", "2", "--min-sqnr", "200")
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    assert "gate failed: min-sqnr" in result.output


def test_bad_input_is_one_line_exit_3_no_traceback(tmp_path, cnn_data):
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"\x00\x01garbage" * 10)
    for args in (
        ("calibrate", tmp_path / "missing.onnx", "--data", cnn_data, "-o", tmp_path / "c.json"),
        ("calibrate", not_onnx, "--data", cnn_data, "-o", tmp_path / "c.json"),
        ("calibrate", tmp_path, "--data", cnn_data, "-o", tmp_path / "c.json"),
    ):
        result = invoke(*args)
        assert result.exit_code == EXIT_BAD_INPUT, result.output
        assert "Traceback" not in result.output
        assert result.output.startswith("error: ") and str(args[1]) in result.output
    assert not (tmp_path / "c.json").exists()


def test_existing_output_is_not_overwritten(tmp_path, cnn_path, cnn_data):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"precious")
    result = invoke("convert", cnn_path, "--data", cnn_data, "-o", out)
    assert result.exit_code == EXIT_BAD_INPUT
    assert "already exists; pass --force" in result.output
    assert out.read_bytes() == b"precious"
    assert invoke("convert", cnn_path, "--data", cnn_data, "-o", out, "--force").exit_code == 0
    assert out.read_bytes() != b"precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_calibration_for_another_model_is_refused(tmp_path, cnn_path, cnn_data):
    calib = tmp_path / "c.json"
    assert invoke("calibrate", cnn_path, "--data", cnn_data, "-o", calib).exit_code == 0
    other = tmp_path / "other.onnx"
    from tests import models

    other.write_bytes(models.small_cnn(seed=5).SerializeToString())
    result = invoke("convert", other, "--calibration", calib, "-o", tmp_path / "q.onnx")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "made for a model with sha256" in result.output


def test_usage_error_exits_2(cnn_path):
    result = invoke("convert", cnn_path)
    assert result.exit_code == 2


def test_compare_refuses_different_signatures(tmp_path, cnn_path, cnn_data):
    from tests import models

    other = tmp_path / "mm.onnx"
    other.write_bytes(models.matmul_chain().SerializeToString())
    result = invoke("compare", cnn_path, other, "--data", cnn_data)
    assert result.exit_code == EXIT_BAD_INPUT
    assert "cannot be compared" in result.output


@pytest.mark.parametrize("module_args", [["-m", "quantcli", "--version"]])
def test_python_dash_m(module_args):
    proc = subprocess.run([sys.executable, *module_args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_inspect_reports_integer_kernels(tmp_path, cnn_path, cnn_data):
    out = tmp_path / "q.onnx"
    assert invoke("convert", cnn_path, "--data", cnn_data, "-o", out).exit_code == 0
    result = invoke("inspect", out)
    assert result.exit_code == 0, result.output
    assert "QLinearConv 2" in result.output


def test_random_smoke_test_warns(tmp_path, cnn_path):
    result = invoke("calibrate", cnn_path, "--random", "8", "-o", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    assert "say nothing about real inputs" in result.output
    assert invoke("calibrate", cnn_path, "-o", tmp_path / "d.json").exit_code == 3  # neither --data nor --random


def _panel(output: str, title: str) -> str:
    """The text of one --help panel (Rich draws it as a box titled ``─ title ─``)."""
    assert f"╭─ {title} ─" in output, output
    return output.split(f"╭─ {title} ─", 1)[1].split("╰", 1)[0]


@pytest.mark.parametrize(
    ("command", "where"),
    [
        ("convert", {"Data": "--calibration", "Images": "--image-size", "Quantization": "--activation-type",
                     "Modes": "--block-size", "Algorithms": "--smoothquant", "Search": "--eval-data",
                     "Output": "--require-fused"}),
        ("calibrate", {"Data": "--random", "Images": "--mean", "Quantization": "--method", "Output": "--force"}),
        ("compare", {"Data": "--batch-axis", "Images": "--layout", "Measurement": "--latency-batch",
                     "Gates": "--min-sqnr", "Output": "--markdown"}),
    ],
)  # fmt: skip
def test_help_groups_options_into_panels(command, where):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    for title, option in where.items():
        assert option in _panel(result.output, title), (title, option)


@pytest.mark.parametrize("command", ["convert", "calibrate", "compare"])
def test_help_keeps_the_extra_in_brackets(command, monkeypatch):
    """Rich markup read 'quantcli[ray]' as a style tag and printed 'quantcli': the install line must survive."""
    monkeypatch.setenv("COLUMNS", "400")
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "pip install 'quantcli[ray]'" in result.output


def _captured_request(monkeypatch, *args):
    """Run ``convert`` with ``args`` and return the request the CLI built (the API is not run)."""
    from quantcli import api
    from quantcli.core.errors import QuantCliError

    seen = []

    def fake_convert(request, **hooks):
        seen.append(request)
        raise QuantCliError("stopped by the test")

    monkeypatch.setattr(api, "convert", fake_convert)
    result = invoke("convert", *args)
    assert result.exit_code == EXIT_BAD_INPUT and "stopped by the test" in result.output, result.output
    return seen[0]


def test_convert_flags_become_one_request(monkeypatch, tmp_path):
    from pathlib import Path

    from quantcli.core.options import CalibrationMethod, QuantDType
    from quantcli.modes.common import ConvertMode

    request = _captured_request(
        monkeypatch, tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", "--data", tmp_path / "d.npz", "--method",
        "percentile", "--percentile", "99.9", "--activation-type", "int8", "--reduce-range", "off",
        "--exclude-nodes", "a,b", "--exclude-nodes", "re:c.*", "--cle", "--smoothquant", "--smoothquant-alpha", "0.7",
        "--batch-axis", "state=1",
    )  # fmt: skip
    assert request.model_path == tmp_path / "m.onnx" and request.data_path == Path(tmp_path / "d.npz")
    assert request.calibration is None and request.mode == ConvertMode.STATIC and request.mode_options is None
    assert request.method == CalibrationMethod.PERCENTILE and request.percentile == 99.9
    assert request.config.activation_type == QuantDType.INT8 and request.config.reduce_range is False
    assert request.config.exclude_nodes == ("a", "b", "re:c.*")
    assert request.algorithms.cle and request.algorithms.smoothquant == 0.7 and not request.algorithms.bias_correction
    assert request.batch_axes == {"state": 1} and request.search is None


def test_mode_flags_become_mode_options(monkeypatch, tmp_path):
    from quantcli.modes.common import ConvertMode, WeightOnlyType

    request = _captured_request(
        monkeypatch, tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", "--mode", "weight-only", "--weight-type",
        "uint4", "--block-size", "64", "--exclude-op-types", "Gemm",
    )  # fmt: skip
    assert request.mode == ConvertMode.WEIGHT_ONLY and request.data_path is None
    assert request.mode_options.weight_type == WeightOnlyType.UINT4 and request.mode_options.block_size == 64
    assert request.mode_options.op_types == frozenset({"MatMul"})
    assert request.config.exclude_op_types == frozenset({"Gemm"})


def test_a_type_outside_the_domain_is_a_usage_error(tmp_path):
    for flag, value in (("--activation-type", "int4"), ("--weight-type", "int32")):
        result = invoke("convert", tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", flag, value)
        assert result.exit_code == 2, result.output
        assert "is not one of" in result.output


def test_target_cpu_override_picks_the_types_for_another_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build machine converting for a VNNI host (or the reverse): QUANTCLI_TARGET_CPU decides reduce_range."""
    from quantcli.core import host
    from quantcli.core.errors import InvalidOption

    for value, vnni in (("vnni", True), ("no-vnni", False), (" VNNI ", True)):
        monkeypatch.setenv(host.TARGET_ENV, value)
        host.detect_host.cache_clear()
        assert host.detect_host().vnni is vnni
        assert host.default_config().reduce_range is (host.detect_host().is_x86 and not vnni)
    monkeypatch.setenv(host.TARGET_ENV, "avx9")
    host.detect_host.cache_clear()
    with pytest.raises(InvalidOption, match="QUANTCLI_TARGET_CPU='avx9': expected one of vnni, no-vnni"):
        host.detect_host()
    monkeypatch.delenv(host.TARGET_ENV)
    host.detect_host.cache_clear()


def test_run_time_quantized_matmuls_have_their_own_table(tmp_path):
    """The encoder rules' MatMuls run integer kernels: the report does not count them as left in float."""
    from tests.conftest import CALIBRATION_DATA, SAMPLE_MODELS

    out = tmp_path / "t.onnx"
    data = CALIBRATION_DATA / "digits_transformer_calib.npz"
    result = invoke("convert", SAMPLE_MODELS / "digits_transformer.onnx", "--data", data, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    head, _, runtime = result.output.partition("integer weights, activations quantized at run time")
    assert "MatMul" in runtime and "run-time activation quantization" in runtime
    floats = head.partition("left in float\n")[2]  # the table, when one is printed
    assert "run-time activation quantization" not in floats
