"""The Python API at the package's top level: the README's example runs, imports stay light, keywords are fields."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import quantcli
from quantcli import api
from quantcli.schemas import load_schema
from tests.conftest import CALIBRATION_DATA, REPO, SAMPLE_MODELS


def _readme_python_example() -> str:
    """The first ```python block of the README's "Python API" section."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "the Python API section has no ```python block"
    return match.group(1)


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "sample_models").symlink_to(SAMPLE_MODELS)
    (tmp_path / "calibration_data").symlink_to(CALIBRATION_DATA)
    code = _readme_python_example()
    assert "quantcli.calibrate(" in code and "quantcli.convert(" in code and "quantcli.compare(" in code
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "percentile: 21 activation ranges from 200 samples" in proc.stdout
    assert "'QLinearConv': 7" in proc.stdout
    match = re.search(r"top-1: FP32 ([\d.]+)%, int8 ([\d.]+)%", proc.stdout)
    assert match is not None, proc.stdout
    assert float(match.group(2)) > 95.0  # the quantized CNN keeps its accuracy on the held-out digits
    assert (tmp_path / "digits_cnn.int8.onnx").is_file()


def test_importing_quantcli_loads_neither_onnx_nor_onnxruntime(tmp_path: Path) -> None:
    code = (
        "import sys, quantcli\n"
        "assert callable(quantcli.calibrate) and callable(quantcli.compare)\n"
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'numpy', 'typer', 'rich') if m in sys.modules))\n"
    )
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_compare_stays_the_function_when_its_package_is_imported() -> None:
    from quantcli.compare.gates import evaluate_gates  # noqa: F401  (loads quantcli.compare.* submodules)
    from quantcli.compare.metrics import MetricSpec  # noqa: F401

    assert quantcli.compare.__module__ == "quantcli" and callable(quantcli.compare)
    assert sys.modules["quantcli.compare"] is not quantcli.compare


@pytest.mark.parametrize(
    ("options", "request_type", "skipped"),
    [
        (api.CalibrateOptions, api.CalibrateRequest, {"model_path"}),
        (api.ConvertOptions, api.ConvertRequest, {"model_path", "output_path"}),
        (api.CompareOptions, api.CompareRequest, {"reference_path", "candidate_path", "data_path"}),
    ],
)
def test_keywords_are_exactly_the_request_fields(options: type, request_type: type, skipped: set[str]) -> None:
    fields = {f.name for f in dataclasses.fields(request_type)} - skipped
    if request_type is api.CalibrateRequest:
        fields -= {"data_path"}  # the second positional argument
    assert set(options.__annotations__) == fields


def test_lazy_names_resolve_and_unknown_ones_fail() -> None:
    assert quantcli.ConvertRequest is api.ConvertRequest
    assert quantcli.CalibrationResult is api.CalibrationResult
    assert quantcli.QuantConfig().per_channel is True
    assert set(quantcli.__all__) <= set(dir(quantcli))
    with pytest.raises(AttributeError, match="no attribute 'convertt'"):
        _ = quantcli.convertt  # type: ignore[attr-defined]


def test_a_misspelt_keyword_is_a_type_error(cnn_path: Path, cnn_data: Path) -> None:
    with pytest.raises(TypeError, match="max_sample"):
        quantcli.calibrate(cnn_path, cnn_data, max_sample=8)  # type: ignore[call-arg]


def test_a_request_or_paths_not_both(cnn_path: Path, cnn_data: Path, tmp_path: Path) -> None:
    request = api.ConvertRequest(cnn_path, tmp_path / "q.onnx", data_path=cnn_data)
    with pytest.raises(TypeError, match="either a ConvertRequest or paths"):
        quantcli.convert(request, tmp_path / "other.onnx")
    with pytest.raises(TypeError, match="needs an output path"):
        quantcli.convert(cnn_path, data=cnn_data)


def test_the_api_mirrors_the_cli_and_its_json(cnn_path: Path, cnn_data: Path, tmp_path: Path) -> None:
    calib_file = tmp_path / "cnn.calib.json"
    calib = quantcli.calibrate(str(cnn_path), str(cnn_data), output=calib_file, method="percentile", max_samples=64)
    assert calib.method == quantcli.CalibrationMethod.PERCENTILE and calib.num_samples == 64
    assert json.loads(calib_file.read_text())["schema"] == "quantcli.calibration/1"

    # a calibration file by path (a string), a request's field as a keyword
    converted = quantcli.convert(cnn_path, tmp_path / "q.onnx", calibration=str(calib_file), require_fused=True)
    assert converted.audit.integer_op_counts()["QLinearConv"] == 2
    # or a request built by hand
    request = quantcli.ConvertRequest(cnn_path, tmp_path / "q2.onnx", calibration=calib)
    assert quantcli.convert(request).output_path == tmp_path / "q2.onnx"

    result = quantcli.compare(cnn_path, tmp_path / "q.onnx", cnn_data, runs=2, warmup=0, latency_batch_sizes=(1,))
    summary = quantcli.inspect(tmp_path / "q.onnx")
    assert summary.op_counts["QuantizeLinear"] >= 1 and summary.audit.integer_kernel_count >= 2

    for obj, schema in (
        (calib, "quantcli.calibrate/1"),
        (converted, "quantcli.convert/1"),
        (result, "quantcli.compare/1"),
        (summary, "quantcli.inspect/1"),
    ):
        doc = quantcli.to_json(obj)
        assert doc["schema"] == schema
        jsonschema.validate(doc, load_schema(schema))
    with pytest.raises(TypeError, match="no JSON document for int"):
        quantcli.to_json(3)


def test_py_typed_ships_with_the_package() -> None:
    assert (REPO / "quantcli" / "py.typed").is_file()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'quantcli = \[[^\]]*"py\.typed"', pyproject)


def test_strings_become_option_values_and_a_wrong_one_names_the_field() -> None:
    from quantcli.core.errors import InvalidOption
    from quantcli.modes.common import ConvertMode

    values = api.option_values({"method": "entropy", "mode": "weight-only", "calibration": "c.json"})
    assert values == {
        "method": quantcli.CalibrationMethod.ENTROPY,
        "mode": ConvertMode.WEIGHT_ONLY,
        "calibration": Path("c.json"),
    }
    with pytest.raises(InvalidOption, match="method 'best' is not one of minmax, percentile") as info:
        api.option_values({"method": "best"})
    assert info.value.option == "method"


def test_the_readme_example_type_checks(tmp_path: Path) -> None:
    """``py.typed`` is a promise: the documented example passes mypy against the package."""
    mypy = Path(sys.executable).with_name("mypy")
    if not mypy.exists():
        pytest.skip("mypy is not installed next to this Python")
    script = tmp_path / "example.py"
    script.write_text(_readme_python_example())
    env = {**os.environ, "MYPYPATH": str(REPO)}
    proc = subprocess.run(
        [str(mypy), "--no-incremental", "--ignore-missing-imports", "--python-version", "3.10", str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
