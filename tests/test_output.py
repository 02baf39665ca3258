"""Output that reads well anywhere: the terminal's width, names never cut, --json on every command, completion."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.testing import CliRunner

from quantcli.api import convert_model
from quantcli.cli import report
from quantcli.cli.app import app
from quantcli.compare.layers import LayerError, _with_hint
from quantcli.schemas import load_schema
from tests.conftest import CALIBRATION_DATA, REPO, SAMPLE_MODELS

runner = CliRunner()
MODEL = SAMPLE_MODELS / "digits_cnn.onnx"
CALIB = CALIBRATION_DATA / "digits_cnn_calib.npz"
EVAL = CALIBRATION_DATA / "digits_cnn_eval.npz"
DAMAGED_NODE = "/features/features.6/conv1/Conv"


def invoke(*args: object, columns: int | None = None):
    env = {"COLUMNS": str(columns)} if columns is not None else {"COLUMNS": None}
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quantized digits CNN with one Conv's weight scales multiplied by 10 (a layer that loses precision)."""
    folder = tmp_path_factory.mktemp("damaged")
    quantized = folder / "cnn.int8.onnx"
    convert_model(MODEL, quantized, data_path=CALIB)
    model = onnx.load(str(quantized))
    conv = next(n for n in model.graph.node if n.name == DAMAGED_NODE)
    weight_dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    scale = next(t for t in model.graph.initializer if t.name == weight_dq.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(10), scale.name))
    out = folder / "damaged.onnx"
    onnx.save(model, str(out))
    return out


# --- width ---------------------------------------------------------------------------------------------


def test_width_comes_from_columns_else_120_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "77")
    assert report.console_width(io.StringIO()) == 77
    monkeypatch.delenv("COLUMNS")
    assert report.console_width(io.StringIO()) == report.NOT_A_TERMINAL_WIDTH == 120
    monkeypatch.setenv("COLUMNS", "junk")
    assert report.console_width(io.StringIO()) == 120


def test_no_console_is_fixed_at_140_columns() -> None:
    source = (Path(report.__file__).parent / "app.py").read_text() + Path(report.__file__).read_text()
    assert "width=140" not in source


def test_the_cli_renders_at_the_width_it_is_given(tmp_path: Path) -> None:
    narrow = invoke("inspect", MODEL, "--verbose", columns=60)
    wide = invoke("inspect", MODEL, "--verbose", columns=200)
    assert narrow.exit_code == 0 and wide.exit_code == 0, narrow.output + wide.output
    assert all(len(line) <= 60 or " " not in line.strip() for line in narrow.stdout.splitlines())
    assert max(map(len, wide.stdout.splitlines())) > 60  # the table, one row per node
    assert any(
        "/features/features.11/conv2/Conv" in line and "QLinearConv" not in line for line in narrow.stdout.splitlines()
    )


# --- names never cut -----------------------------------------------------------------------------------


def _render(width: int, table: Table) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    report.print_table(console, table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def _table(names: list[str]) -> Table:
    table = Table(title="nodes")
    for col in ("node", "op", "note"):
        table.add_column(col)
    for name in names:
        table.add_row(Text(name), "Conv", "stays float because its output feeds a float node")
    return table


def test_a_table_that_fits_is_a_table_else_records_with_whole_names() -> None:
    names = ["/model/encoder/layers.11/attention/self/query/MatMul", "[weird]/name"]
    wide = _render(200, _table(names))
    assert "┃ node" in wide and all(n in wide for n in names)
    narrow = _render(40, _table(names))
    assert "┃" not in narrow  # records, not a table
    lines = narrow.splitlines()
    assert all(n in lines for n in names)  # each name alone and whole on its line, markup-like text kept


def test_prose_columns_narrow_before_a_name_is_folded() -> None:
    """Rich shrinks the widest wrapable column first: a name column would fold while the prose had room."""
    name = "/model/encoder/layers.11/attention/self/query/MatMul"  # 52 columns, wider than the prose
    text = _render(90, _table([name]))
    assert "┃ node" in text and name in text  # still a table: the note wraps, the name is whole
    assert "stays float because" in text and "output feeds a float node" not in text.replace("\n", " ")


def test_hint_flags_are_split_exactly() -> None:
    assert report.hint_parts("this layer loses precision itself; try --exclude-nodes /a/b c") == (
        "this layer loses precision itself",
        ["--exclude-nodes /a/b c"],
    )
    prose, flags = report.hint_parts(
        "outliers: range 40x the 99.9th percentile; try --method percentile or --exclude-nodes x"
    )
    assert prose == "outliers: range 40x the 99.9th percentile" and flags == [
        "--method percentile",
        "--exclude-nodes x",
    ]
    assert report.hint_parts("error comes from upstream layers") == ("error comes from upstream layers", [])


@pytest.mark.parametrize(
    ("local_db", "p999", "expected"), [(5.0, 1.0, ["--exclude-nodes"]), (30.0, 0.01, ["--method", "--exclude-nodes"])]
)
def test_the_hints_compare_writes_parse_into_their_flags(local_db: float, p999: float, expected: list[str]) -> None:
    """The prose of compare.layers' hints and report.hint_parts agree (a reworded hint fails here)."""
    err = LayerError("t", "/a/very/long/node/name/Conv", "Conv", 4.0, local_db, -1.0, 1.0, -1.0, 1.0, p999, "")
    _, flags = report.hint_parts(_with_hint(err).hint)
    assert [f.split()[0] for f in flags] == expected
    assert flags[-1] == "--exclude-nodes /a/very/long/node/name/Conv"


@pytest.mark.slow
def test_per_layer_names_and_hint_flags_are_whole_at_60_columns(damaged: Path) -> None:
    result = invoke(
        "compare", MODEL, damaged, "--data", EVAL, "--per-layer", "--runs", "2", "--warmup", "0",
        "--latency-batch", "1", "--no-memory", "--max-samples", "64",
        columns=60,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"  --exclude-nodes {DAMAGED_NODE}" in lines  # pasteable: the flag alone on its line
    assert any(line.strip() == DAMAGED_NODE for line in lines)  # the record's heading: the whole name
    assert not any(line.rstrip().endswith("/Con") for line in lines)


# --- JSON ----------------------------------------------------------------------------------------------


def _valid(doc: dict) -> dict:
    jsonschema.validate(doc, load_schema(doc["schema"]))
    return doc


@pytest.mark.slow
def test_json_on_calibrate_convert_inspect_validates(tmp_path: Path) -> None:
    calib, out = tmp_path / "c.json", tmp_path / "q.onnx"
    result = invoke(
        "calibrate", MODEL, "--data", CALIB, "-o", calib, "--method", "percentile", "--json", tmp_path / "cal.json"
    )
    assert result.exit_code == 0, result.output
    doc = _valid(json.loads((tmp_path / "cal.json").read_text()))
    assert doc["schema"] == "quantcli.calibrate/1" and doc["method"]["kind"] == "percentile"
    assert doc["num_samples"] == 200 and doc["output"] == str(calib) and doc["clipped"]

    result = invoke(
        "convert", MODEL, "-c", calib, "-o", out, "--exclude-nodes", "/fc/Gemm", "--json", tmp_path / "conv.json"
    )
    assert result.exit_code == 0, result.output
    doc = _valid(json.loads((tmp_path / "conv.json").read_text()))
    assert doc["quantized"]["Conv"] == 7 and doc["audit"]["integer_kernels"]["QLinearConv"] == 7
    assert [s["node"] for s in doc["skipped"]] == ["/fc/Gemm"]
    assert {n["name"]: n["integer"] for n in doc["audit"]["compute_nodes"]}["/fc/Gemm"] is False
    # from a calibration file the verdict says what it could not check, naming the flag to give
    verdict = doc["verdict"]
    assert verdict["outputs"] == [] and any("--eval-data" in u for u in verdict["unchecked"])
    assert "$" not in json.dumps(verdict)

    result = invoke("convert", MODEL, "--data", CALIB, "-o", tmp_path / "q2.onnx", "--json", tmp_path / "conv2.json")
    assert result.exit_code == 0, result.output
    verdict = _valid(json.loads((tmp_path / "conv2.json").read_text()))["verdict"]
    assert verdict["source"].endswith("held-back --data samples") and verdict["num_samples"] == 40
    assert [(o["kind"], o["agreement"] >= 0.95) for o in verdict["outputs"]] == [("classifier", True)]
    assert verdict["passed"] is (not verdict["warnings"]) and verdict["line"].startswith("verdict: ")
    assert verdict["speed"] is not None and verdict["speed"]["speedup"] > 0

    result = invoke("inspect", out, "--json", tmp_path / "i.json")
    assert result.exit_code == 0, result.output
    doc = _valid(json.loads((tmp_path / "i.json").read_text()))
    assert doc["ops"]["Conv"] == 7 and doc["parameters"] > 100_000 and doc["macs"]["integer_share"] < 1.0


def test_json_dash_is_stdout_and_the_report_goes_to_stderr(tmp_path: Path) -> None:
    result = invoke("inspect", MODEL, "--json", "-")
    assert result.exit_code == 0, result.output
    doc = _valid(json.loads(result.stdout))
    assert doc["schema"] == "quantcli.inspect/1" and doc["model"]["bytes"] == MODEL.stat().st_size
    assert "integer kernels" in result.stderr and not Path("-").exists()


def test_a_broken_document_fails_its_schema() -> None:
    schema = load_schema("quantcli.calibrate/1")
    doc = {
        "schema": "quantcli.calibrate/1", "quantcli_version": "0", "model": {"path": None, "sha256": "0" * 64},
        "output": None, "method": {"kind": "minmax", "params": {}}, "num_samples": 1, "num_tensors": 0,
        "clipped": [], "unobserved": [],
    }  # fmt: skip
    jsonschema.validate(doc, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**doc, "method": {"kind": "best", "params": {}}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**doc, "extra": 1}, schema)


def test_every_schema_is_a_valid_draft_2020_12_schema() -> None:
    for kind in ("calibrate", "convert", "compare", "inspect"):
        schema = load_schema(f"quantcli.{kind}/1")
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$id"] == f"quantcli.{kind}/1"


# --- completion ----------------------------------------------------------------------------------------


def test_shell_completion_is_offered() -> None:
    result = invoke("--help", columns=200)
    assert result.exit_code == 0, result.output
    assert "--install-completion" in result.output and "--show-completion" in result.output


# --- the HTML report in a browser ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_the_html_report_loads_in_headless_chromium(tmp_path: Path) -> None:
    """benchmarks/screenshot_report.py: the DOM Chromium parsed has every section and plot; a screenshot."""
    shot = tmp_path / "report.png"
    script = REPO / "benchmarks" / "screenshot_report.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--out", str(shot)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok: ") == 8 and shot.read_bytes()[:4] == b"\x89PNG"


def test_completion_scripts_and_enum_values_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    # the shell is named, not detected: detection walks the parent processes, and a test run started from
    # no shell (a detached job, some CI runners) has none (typer's own switch for tests)
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    script = runner.invoke(app, ["--show-completion", "bash"], prog_name="quantcli")
    assert script.exit_code == 0 and "_QUANTCLI_COMPLETE=complete_bash" in script.stdout
    words = {"_QUANTCLI_COMPLETE": "complete_bash", "COMP_WORDS": "quantcli convert m.onnx --mode ", "COMP_CWORD": "4"}
    modes = runner.invoke(app, [], prog_name="quantcli", env=words)
    assert modes.stdout.split() == ["static", "dynamic", "weight-only", "fp16"]
