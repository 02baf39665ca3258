"""The catalogue of bad inputs: each gives one clear line, a documented exit code, and writes nothing.

Run ``python -m tests.test_errors`` to print the catalogue as a table (input, exit code, message).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from quantcli.cli.app import app
from tests import models

runner = CliRunner()


@dataclass(frozen=True)
class Case:
    """One bad input: ``make(tmp) -> argv`` builds the files and returns the command line."""

    name: str
    make: Callable[[Path], list[str]]
    code: int
    message: str
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


def _model(tmp: Path, model: onnx.ModelProto | None = None, name: str = "model.onnx") -> Path:
    path = tmp / name
    path.write_bytes((model or models.small_cnn()).SerializeToString())
    return path


def _data(tmp: Path, name: str = "data.npz", **arrays: np.ndarray) -> Path:
    path = tmp / name
    np.savez(path, **(arrays or {"x": models.structured_images(8, seed=0)}))
    return path


def _calibrate(tmp: Path, model: Path | None = None, data: Path | None = None, *extra: str) -> list[str]:
    return [
        "calibrate",
        str(model or _model(tmp)),
        "--data",
        str(data or _data(tmp)),
        "-o",
        str(tmp / "out.json"),
        *extra,
    ]


def _convert(tmp: Path, model: Path | None = None, *extra: str) -> list[str]:
    return ["convert", str(model or _model(tmp)), "--data", str(_data(tmp)), "-o", str(tmp / "out.onnx"), *extra]


def _opset(version: int) -> onnx.ModelProto:
    m = models.small_cnn()
    m.opset_import[0].version = version
    return m


def _old_opset() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 14, 14])
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "g", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = 6
    return m


def _custom_op() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 16, 16])
    g = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="acme.ops", name="f")], "g", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("acme.ops", 1)])


def _qdq_model() -> onnx.ModelProto:
    m = models.small_cnn()
    n = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q")
    d = helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq")
    m.graph.initializer.extend(
        [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(0), "z")]
    )
    for node in m.graph.node:
        node.input[:] = ["xd" if i == "x" else i for i in node.input]
    m.graph.node.insert(0, d)
    m.graph.node.insert(0, n)
    return m


def _qoperator_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, ["N", 4, 14, 14])
    inits = [
        numpy_helper.from_array(v, n)
        for n, v in [
            ("xs", np.float32(0.1)),
            ("xz", np.uint8(0)),
            ("w", np.ones((4, 3, 3, 3), np.int8)),
            ("ws", np.float32(0.1)),
            ("wz", np.int8(0)),
            ("ys", np.float32(0.1)),
            ("yz", np.uint8(0)),
        ]
    ]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="qc")
    g = helper.make_graph([node], "g", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _external(tmp: Path, location: str) -> Path:
    m = models.small_cnn()
    for t in m.graph.initializer:
        if t.name == "w2":
            raw = numpy_helper.to_array(t).tobytes()
            t.ClearField("float_data")
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            t.external_data.add(key="location", value=location)
            t.external_data.add(key="length", value=str(len(raw)))
    return _model(tmp, m)


def _not_writable(mp: pytest.MonkeyPatch) -> None:
    real = os.access
    mp.setattr(os, "access", lambda p, mode, *a, **k: False if mode == os.W_OK else real(p, mode, *a, **k))


def _no_memory(mp: pytest.MonkeyPatch) -> None:
    import quantcli.graph.model_io

    mp.setattr(quantcli.graph.model_io, "available_memory", lambda: 1000)


def _calib_file(tmp: Path, text: str) -> list[str]:
    path = tmp / "calib.json"
    path.write_text(text)
    return ["convert", str(_model(tmp)), "--calibration", str(path), "-o", str(tmp / "out.onnx")]


def _calib_other_model(tmp: Path) -> list[str]:
    assert runner.invoke(app, _calibrate(tmp)).exit_code == 0
    other = _model(tmp, models.small_cnn(seed=9), "other.onnx")
    return ["convert", str(other), "--calibration", str(tmp / "out.json"), "-o", str(tmp / "out.onnx")]


def _existing_output(tmp: Path) -> list[str]:
    (tmp / "out.onnx").write_bytes(b"keep")
    return _convert(tmp)


def _pickled_npz(tmp: Path) -> list[str]:
    path = tmp / "data.npz"
    np.savez(path, x=np.array([object()], dtype=object))
    return _calibrate(tmp, data=path)


def _object_npy(tmp: Path) -> list[str]:
    path = tmp / "data.npy"
    np.save(path, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    return _calibrate(tmp, data=path)


def _recipe_other_model(tmp: Path) -> list[str]:
    recipe = {
        "schema": "quantcli.recipe/1", "model_sha256": "0" * 64, "method": "minmax", "float_nodes": [],
        "config": {"activation_type": "uint8", "weight_type": "int8", "per_channel": True,
                   "symmetric_activations": False, "reduce_range": False},
    }  # fmt: skip
    return _convert(tmp, None, "--recipe", str(_write(tmp, "r.json", json.dumps(recipe).encode())))


def _budget_on_regressor(tmp: Path) -> list[str]:
    model = _model(tmp, models.matmul_chain())  # output [N, 4, 8]: not class scores
    x = np.random.default_rng(0).normal(size=(16, 4, 32)).astype(np.float32)
    calib, evald = _data(tmp, "c.npz", x=x), _data(tmp, "e.npz", x=x[::-1].copy())
    out = str(tmp / "out.onnx")
    return ["convert", str(model), "--data", str(calib), "--eval-data", str(evald), "--max-accuracy-drop", "1",
            "-o", out]  # fmt: skip


def _budget_unreachable(tmp: Path) -> list[str]:
    model = _model(tmp, models.matmul_chain())
    x = np.random.default_rng(0).normal(size=(16, 4, 32)).astype(np.float32)
    calib, evald = _data(tmp, "c.npz", x=x), _data(tmp, "e.npz", x=x[::-1].copy())
    return ["convert", str(model), "--data", str(calib), "--eval-data", str(evald), "--min-sqnr", "300",
            "--search-max-fallback", "1", "-o", str(tmp / "out.onnx")]  # fmt: skip


CASES = [
    Case("model path does not exist", lambda t: _calibrate(t, t / "missing.onnx"), 3, "ONNX model not found"),
    Case("model path is a directory", lambda t: _calibrate(t, t), 3, "is a directory"),
    Case("file is not ONNX", lambda t: _calibrate(t, _write(t, "m.onnx", b"hello, I am text\n" * 20)), 3, "not"),
    Case(
        "truncated model",
        lambda t: _calibrate(t, _write(t, "m.onnx", models.small_cnn().SerializeToString()[:700])),
        3,
        "ONNX",
    ),
    Case(
        "opset too old (11) with --no-upgrade-opset",
        lambda t: _calibrate(t, _model(t, _old_opset()), None, "--no-upgrade-opset"),
        3,
        "unless --upgrade-opset is off",
    ),
    Case(
        "convert: opset too old (11) with --no-upgrade-opset",
        lambda t: _convert(t, _model(t, _old_opset()), "--no-upgrade-opset"),
        3,
        "opset 11 is too old",
    ),
    Case("opset newer than onnxruntime", lambda t: _calibrate(t, _model(t, _opset(40))), 3, "opset 40"),
    Case(
        "custom-domain op", lambda t: _calibrate(t, _model(t, _custom_op())), 3, "no kernel for op acme.ops:Frobnicate"
    ),
    Case("already quantized (QDQ)", lambda t: _convert(t, _model(t, _qdq_model())), 3, "already quantized"),
    Case("already quantized (QOperator)", lambda t: _convert(t, _model(t, _qoperator_model())), 3, "already quantized"),
    Case("external data file missing", lambda t: _calibrate(t, _external(t, "weights.bin")), 3, "'weights.bin'"),
    Case(
        "external data outside the model's directory",
        lambda t: _calibrate(t, _external(t, "../../etc/passwd")),
        3,
        "outside the model's directory",
    ),
    Case(
        "data: wrong input name",
        lambda t: _calibrate(t, data=_data(t, image=np.zeros((2, 3, 16, 16), np.float32))),
        3,
        "keys do not match the model inputs ['x']",
    ),
    Case(
        "data: wrong dtype",
        lambda t: _calibrate(t, data=_data(t, x=np.zeros((2, 3, 16, 16), np.int32))),
        3,
        "expects float32[N,3,16,16]",
    ),
    Case(
        "data: wrong rank",
        lambda t: _calibrate(t, data=_data(t, x=np.zeros((2, 2, 3, 16, 16), np.float32))),
        3,
        "is float32[2,2,3,16,16]",
    ),
    Case(
        "data: wrong shape",
        lambda t: _calibrate(t, data=_data(t, x=np.zeros((2, 3, 8, 16), np.float32))),
        3,
        "axis 2 should be 16",
    ),
    Case(
        "data: empty", lambda t: _calibrate(t, data=_data(t, x=np.zeros((0, 3, 16, 16), np.float32))), 3, "no samples"
    ),
    Case(
        "data: NaN values",
        lambda t: _calibrate(t, data=_data(t, x=np.full((2, 3, 16, 16), np.nan, np.float32))),
        3,
        "NaN/Inf",
    ),
    Case("data: object array in .npy (pickle)", _object_npy, 3, "never unpickles"),
    Case("data: object array in .npz (pickle)", _pickled_npz, 3, "never unpickles"),
    Case(
        "data: unsupported format",
        lambda t: _calibrate(t, data=_write(t, "d.csv", b"1,2")),
        3,
        "unsupported data format",
    ),
    Case("calibration file is not JSON", lambda t: _calib_file(t, "{not json"), 3, "not JSON"),
    Case(
        "calibration file of another schema",
        lambda t: _calib_file(t, json.dumps({"schema": "quantcli.calibration/9"})),
        3,
        "schema 'quantcli.calibration/9' is not supported",
    ),
    Case("calibration file for another model", _calib_other_model, 3, "made for a model with sha256"),
    Case("output exists", _existing_output, 3, "already exists; pass --force"),
    Case(
        "output directory missing",
        lambda t: ["convert", str(_model(t)), "--data", str(_data(t)), "-o", str(t / "nope" / "out.onnx")],
        3,
        "does not exist",
    ),
    Case("output directory not writable", lambda t: _convert(t), 3, "is not writable", _not_writable),
    Case("conflicting options", lambda t: _convert(t, None, "--calibration", "c.json"), 3, "not both"),
    Case("bad --max-memory", lambda t: _calibrate(t, None, None, "--max-memory", "lots"), 3, "--max-memory"),
    Case("calibration exceeds --timeout", lambda t: _calibrate(t, None, None, "--timeout", "0"), 3, "--timeout"),
    Case("model larger than free memory", lambda t: _calibrate(t), 3, "larger than the free memory", _no_memory),
    Case("unknown option", lambda t: _calibrate(t, None, None, "--frobnicate"), 2, "No such option"),
    Case(
        "recipe is not JSON",
        lambda t: _convert(t, None, "--recipe", str(_write(t, "r.json", b"{x"))),
        3,
        "not a quantcli recipe",
    ),
    Case(
        "recipe of another schema",
        lambda t: _convert(t, None, "--recipe", str(_write(t, "r.json", b'{"schema": "quantcli.recipe/7"}'))),
        3,
        "not a quantcli.recipe/1 recipe",
    ),
    Case("recipe for another model", _recipe_other_model, 3, "made for another model"),
    Case("recipe file missing", lambda t: _convert(t, None, "--recipe", str(t / "none.json")), 3, "does not exist"),
    Case("--verdict-share out of range", lambda t: _convert(t, None, "--verdict-share", "0.9"), 2, "--verdict-share"),
    Case("budget without --eval-data", lambda t: _convert(t, None, "--min-sqnr", "30"), 3, "needs --eval-data"),
    Case("accuracy budget on a non-classifier", _budget_on_regressor, 3, "needs a classifier output"),
    Case("budget that no model meets", _budget_unreachable, 1, "no quantization met the budget"),
]


def _write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(tmp_path, monkeypatch, case):
    argv = case.make(tmp_path)
    inputs = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    if case.patch:
        case.patch(monkeypatch)
    result = runner.invoke(app, argv)
    assert result.exit_code == case.code, result.output
    assert case.message in result.output, result.output
    assert "Traceback" not in result.output
    if case.code == 3:
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert lines[-1].startswith("error: ") or lines[0].startswith("error: "), result.output
        assert sum(ln.startswith("error: ") for ln in lines) == 1
    for path, data in inputs.items():  # inputs untouched
        assert path.read_bytes() == data, path
    leftovers = {p for p in tmp_path.rglob("*") if p.is_file()} - set(inputs)
    assert not leftovers, f"wrote {leftovers}"


@pytest.mark.parametrize("extra", [(), ("--upgrade-opset",)], ids=["default", "flag-kept-as-no-op"])
def test_old_opset_is_upgraded_by_default(tmp_path, extra):
    model = _model(tmp_path, _old_opset())
    result = runner.invoke(app, _convert(tmp_path, model, *extra))
    assert result.exit_code == 0, result.output
    assert "input: opset 11 upgraded to 13 in memory" in result.output
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert next(i.version for i in out.opset_import if i.domain == "") >= 13
    assert model.read_bytes() == _old_opset().SerializeToString()  # the input file is unchanged


def test_old_opset_calibrates_by_default_and_says_so(tmp_path):
    result = runner.invoke(app, _calibrate(tmp_path, _model(tmp_path, _old_opset())))
    assert result.exit_code == 0, result.output
    assert "note: opset 11 upgraded to 13" in result.stderr


def test_old_opset_result_field_and_api_refusal(tmp_path):
    from quantcli.api import convert_model
    from quantcli.core.errors import UnsupportedModelError

    model, data = _model(tmp_path, _old_opset()), _data(tmp_path)
    result = convert_model(model, tmp_path / "a.onnx", data_path=data)
    assert result.opset_note is not None and result.opset_note.startswith("opset 11 upgraded to 13")
    current = convert_model(_model(tmp_path, name="new.onnx"), tmp_path / "b.onnx", data_path=data)
    assert current.opset_note is None  # an opset-13+ model says nothing
    with pytest.raises(UnsupportedModelError) as info:
        convert_model(model, tmp_path / "c.onnx", data_path=data, upgrade_opset=False)
    assert info.value.options == ("upgrade_opset",)


def test_option_errors_name_fields_and_the_cli_names_flags():
    from quantcli.cli.flags import error_text, flag
    from quantcli.core.errors import MissingInput, OptionConflict

    exc = MissingInput("the accuracy search needs $eval_data", option="eval_data")
    assert str(exc) == "the accuracy search needs eval_data" and exc.option == "eval_data"
    assert error_text(exc) == "the accuracy search needs --eval-data"
    conflict = OptionConflict("give either $calibration or $data_path, not both", options=("calibration", "data_path"))
    assert error_text(conflict) == "give either --calibration or --data, not both"
    assert flag("random_samples") == "--random" and flag("upgrade_opset") == "--upgrade-opset"
    # a message without option fields is left alone, even with a dollar in a path
    assert error_text(OptionConflict("/tmp/$data_path/m.onnx")) == "/tmp/$data_path/m.onnx"
    # the fields survive pickling (errors raised in a worker process)
    import pickle

    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is MissingInput and copy.option == "eval_data" and error_text(copy) == error_text(exc)


@pytest.mark.parametrize(
    ("keywords", "error", "fields"),
    [
        ({"calibration": Path("c.json"), "data_path": Path("d.npz")}, "OptionConflict", ("calibration", "data_path")),
        ({}, "MissingInput", ("calibration", "data_path")),
        ({"data_path": Path("d.npz"), "verdict_share": 0.9}, "InvalidOption", ("verdict_share",)),
        ({"data_path": Path("d.npz"), "save_recipe": Path("r.json")}, "MissingInput", ("search", "save_recipe")),
        ({"mode": "dynamic", "data_path": Path("d.npz")}, "OptionConflict", ("data_path", "mode")),
        ({"mode": "fp16", "recipe": Path("r.json")}, "OptionConflict", ("mode", "recipe")),
    ],
)
def test_the_request_refuses_what_the_cli_refuses(tmp_path, keywords, error, fields):
    """One check, in ConvertRequest: the API raises it with fields, the CLI prints it with flags, exit 3."""
    from quantcli import api
    from quantcli.core import errors
    from quantcli.modes.common import ConvertMode

    keywords = {**keywords, "mode": ConvertMode(keywords.get("mode", "static"))}
    model, out = _model(tmp_path), tmp_path / "out.onnx"
    with pytest.raises(getattr(errors, error)) as caught:
        api.convert_model(model, out, **keywords)
    assert caught.value.options == fields
    assert not out.exists()


def print_catalogue() -> None:  # pragma: no cover - documentation helper
    import tempfile

    print("| input | exit code | message |\n|---|---|---|")
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
            argv = case.make(Path(tmp))
            if case.patch:
                case.patch(mp)
            result = runner.invoke(app, argv)
            line = next((ln for ln in result.output.splitlines() if ln.startswith("error")), result.output.strip())
            line = line.replace(tmp, "<tmp>").replace("|", "\\|")
            print(f"| {case.name} | {result.exit_code} | `{line[:200]}` |")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(print_catalogue())


def test_sixteen_bit_types_upgrade_an_opset_13_model_to_21(tmp_path):
    """16-bit Q/DQ exist from opset 21: convert upgrades the input in memory, as it does below 13, instead of
    failing after calibration with 'upgrade it first'; --no-upgrade-opset still refuses, in one line."""
    model = _model(tmp_path, _opset(13))
    result = runner.invoke(app, _convert(tmp_path, model, "--activation-type", "uint16", "--no-verdict"))
    assert result.exit_code == 0, result.output
    assert "input: opset 13 upgraded to 21 in memory" in result.output
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert next(i.version for i in out.opset_import if i.domain == "") == 21
    inits = {i.name: i for i in out.graph.initializer}
    zero_points = [inits[n.input[2]] for n in out.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.data_type == TensorProto.UINT16 for z in zero_points)  # 16-bit activations
    refused = runner.invoke(
        app, _convert(tmp_path, model, "--activation-type", "uint16", "--no-upgrade-opset", "--force")
    )
    assert refused.exit_code == 3 and "16-bit and 4-bit Q/DQ" in refused.output
    assert "Traceback" not in refused.output
