"""Models with external data, and the paths taken above protobuf's 2 GB (exercised on a small model
by lowering the limit): calibrate -> convert -> compare end to end, sessions, the checker, clear errors.

The real > 2 GB run is ``benchmarks/bench_large_model.py`` (minutes, gigabytes); these take seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from quantcli.cli import app
from quantcli.core.errors import UnsupportedModelError
from quantcli.graph import model_io
from quantcli.graph.model_io import check_model, load_model, split_weights
from quantcli.graph.session import augmented, make_session

runner = CliRunner()
WIDTH, LAYERS = 128, 3


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.full(WIDTH, 0.1, np.float32), f"b{i}"),
        ]
        out = "y" if i == LAYERS - 1 else f"r{i}"
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"matmul{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
            helper.make_node("Relu", [f"a{i}"], [out], name=f"relu{i}"),
        ]
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def external_mlp(tmp_path: Path) -> tuple[Path, Path]:
    """The MLP saved with external data (``mlp.onnx`` + ``mlp.weights``) and 32 samples for it."""
    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), str(path), save_as_external_data=True, location="mlp.weights", size_threshold=1024)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((32, WIDTH)).astype(np.float32))
    return path, data


def _external_locations(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {
        e.value
        for t in model.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }


def _end_to_end(tmp_path: Path, model: Path, data: Path) -> Path:
    calib, out = tmp_path / "mlp.calib.json", tmp_path / "mlp.int8.onnx"
    for args in (
        ["calibrate", model, "--data", data, "-o", calib],
        ["convert", model, "--calibration", calib, "-o", out],
        ["compare", model, out, "--data", data],
    ):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
    return out


def test_external_data_model_end_to_end(tmp_path, external_mlp):
    model, data = external_mlp
    out = _end_to_end(tmp_path, model, data)
    assert _external_locations(out) == {"mlp.int8.onnx.data"}  # written with external data, beside it
    assert (tmp_path / "mlp.int8.onnx.data").stat().st_size > 0
    quantized = load_model(out)
    assert {n.op_type for n in quantized.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    x = np.load(data)["x"][:4]
    ref = make_session(load_model(model)).run(None, {"x": x})[0]
    got = make_session(quantized).run(None, {"x": x})[0]
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_above_the_limit_paths_end_to_end(tmp_path, external_mlp, monkeypatch):
    """With the limit lowered, every model is 'above 2 GB': skeleton sessions, skeleton checker, external save."""
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 100_000)  # the FP32 model (200 kB) is above, the INT8 one not
    model, data = external_mlp
    out = _end_to_end(tmp_path, model, data)
    assert _external_locations(out) == {"mlp.int8.onnx.data"}


def test_skeleton_session_matches_the_in_memory_one(monkeypatch):
    model = _mlp()
    x = np.random.default_rng(2).standard_normal((2, WIDTH)).astype(np.float32)
    expected = make_session(model).run(None, {"x": x})[0]
    stub, weights = split_weights(model)
    assert [t.name for t in weights] == ["w0", "w1", "w2"]
    assert stub.ByteSize() < 4000 and model.ByteSize() > 3 * WIDTH * WIDTH * 4
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 20_000)
    np.testing.assert_array_equal(make_session(model).run(None, {"x": x})[0], expected)
    with_relu = make_session(augmented(model, ["r0"])).run(["r0", "y"], {"x": x})  # skeleton + weights of model
    np.testing.assert_array_equal(with_relu[1], expected)
    np.testing.assert_array_equal(
        with_relu[0], np.maximum(0, x @ numpy_helper.to_array(model.graph.initializer[0]) + 0.1)
    )
    check_model(model)  # the skeleton passes the checker
    assert len(model.graph.initializer[0].raw_data) == WIDTH * WIDTH * 4  # the model is left as it was


def test_skeleton_above_the_limit_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 500)  # even the graph without weights is 'too large'
    with pytest.raises(UnsupportedModelError, match=r"graph alone .* above protobuf's 2 GB"):
        make_session(_mlp(), source="big.onnx")


def test_skeleton_above_the_limit_is_one_line_in_the_cli(tmp_path, external_mlp, monkeypatch):
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 500)
    model, data = external_mlp
    result = runner.invoke(app, ["calibrate", str(model), "--data", str(data), "-o", str(tmp_path / "c.json")])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "onnxruntime cannot load it" in " ".join(result.output.split())


def test_model_read_without_its_weights_runs_from_its_files(tmp_path, external_mlp, monkeypatch):
    """``load_model(weights=False)``: no weight in the protobuf; onnxruntime reads them from the data file."""
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 100_000)
    model, data = external_mlp
    assert model_io.stored_above_limit(model)
    graph_only = load_model(model, weights=False)
    assert graph_only.ByteSize() < 4000 and model_io.external_base(graph_only) == tmp_path.resolve()
    x = np.load(data)["x"][:4]
    expected = make_session(load_model(model)).run(None, {"x": x})[0]  # weights as arrays
    np.testing.assert_array_equal(make_session(graph_only).run(None, {"x": x})[0], expected)
    np.testing.assert_array_equal(make_session(augmented(graph_only, ["r0"])).run(["y"], {"x": x})[0], expected)


def test_compare_above_the_limit_reads_no_weight_and_measures_the_same(tmp_path, external_mlp, monkeypatch):
    from quantcli.api import CompareRequest, compare_models

    model, data = external_mlp
    out = _end_to_end(tmp_path, model, data)
    import importlib

    request = CompareRequest(model, out, data, latency_batch_sizes=())
    real_load = model_io.load_model
    accuracy = importlib.import_module("quantcli.compare.accuracy")
    monkeypatch.setattr(accuracy, "load_model", lambda path, *, weights=True: real_load(path))
    below = compare_models(request)  # the whole model in memory
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 100_000)
    loads: list[bool] = []

    def spy(path: Path, *, weights: bool = True) -> onnx.ModelProto:
        loads.append(weights)
        return real_load(path, weights=weights)

    monkeypatch.setattr(accuracy, "load_model", spy)
    above = compare_models(request)
    assert loads[:2] == [False, False]  # both models: their graphs only
    assert above.outputs == below.outputs and above.kinds == below.kinds
    with_layers = compare_models(CompareRequest(model, out, data, latency_batch_sizes=(), per_layer=True))
    assert with_layers.outputs == below.outputs and with_layers.layers and loads[-1] is True


@pytest.mark.parametrize(
    "array",
    [np.zeros((3, 5), np.float32), np.ones(7, np.float16), np.arange(6, dtype=np.int8), np.array([True, False])],
)
def test_skeleton_sizes_weights_without_reading_them(array):
    tensor = numpy_helper.from_array(array, "t")
    assert model_io._raw_size(tensor) == len(tensor.raw_data)


def _saved(tmp_path: Path, threshold: int) -> Path:
    """The MLP with every tensor of ``threshold`` bytes or more in ``mlp.weights`` (0: the 512-byte biases too)."""
    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), str(path), save_as_external_data=True, location="mlp.weights", size_threshold=threshold)
    return path


def _convert_into(folder: Path, model: Path, calib: Path) -> tuple[bytes, bytes]:
    folder.mkdir()
    out = folder / "mlp.int8.onnx"
    result = runner.invoke(app, ["convert", str(model), "--calibration", str(calib), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out.read_bytes(), (folder / "mlp.int8.onnx.data").read_bytes()


@pytest.mark.parametrize("limit", [model_io.PROTOBUF_LIMIT, 100_000])
@pytest.mark.parametrize("threshold", [0, 1024])
def test_convert_reading_weights_from_their_file_writes_the_same_bytes(tmp_path, monkeypatch, limit, threshold):
    """convert leaves external weights in their file (read one at a time, copied in chunks to the output):
    the same .onnx and .data bytes as with the whole model read first, below and above the (lowered) limit."""
    from quantcli.pipeline import steps

    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", limit)
    monkeypatch.setattr(model_io, "_SPILL_ABOVE", 1024)  # the 16 kB int8 weights are spilled above the limit
    model = _saved(tmp_path, threshold)
    data, calib = tmp_path / "data.npz", tmp_path / "mlp.calib.json"
    np.savez(data, x=np.random.default_rng(1).standard_normal((32, WIDTH)).astype(np.float32))
    result = runner.invoke(app, ["calibrate", str(model), "--data", str(data), "-o", str(calib)])
    assert result.exit_code == 0, result.output
    spilled: list[int] = []
    real_spill = model_io.spill_weights

    def spill(quantized: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
        out = real_spill(quantized, folder)
        spilled.append(sum(model_io.left_in_file(t) for t in out.graph.initializer))
        return out

    monkeypatch.setattr(steps, "spill_weights", spill)
    lazy = _convert_into(tmp_path / "lazy", model, calib)
    assert spilled == ([LAYERS] if limit < 2**31 - 1 else [])  # the int8 weights, above the (lowered) limit
    assert not list((tmp_path / "lazy").glob(".quantcli-scratch-*"))  # removed at the end
    real_load = model_io.load_model
    monkeypatch.setattr(steps, "load_model", lambda path, weights=True: real_load(path))  # the whole model read
    monkeypatch.setattr(steps, "spill_weights", lambda model, folder: model)  # and its int8 weights kept
    eager = _convert_into(tmp_path / "eager", model, calib)
    assert lazy[0] == eager[0] and lazy[1] == eager[1]
    assert len(lazy[1]) >= LAYERS * WIDTH * WIDTH  # the int8 weights are in the data file


@pytest.mark.parametrize("above", [False, True])
def test_convert_holds_no_fp32_weight_in_its_models(tmp_path, external_mlp, monkeypatch, above):
    """After lowering, the models convert keeps (input, pre-processed, quantized) hold the int8 weights
    and no FP32 copy of the big ones (before: the input and the pre-processed model held one each, 2x);
    above the (lowered) limit, not even the int8 weights: they wait in the scratch file."""
    from quantcli.api import ConvertRequest
    from quantcli.pipeline import steps as s
    from quantcli.pipeline.context import ConvertContext, remove_scratch
    from quantcli.pipeline.convert import run_steps

    model, data = external_mlp
    calib = tmp_path / "mlp.calib.json"
    assert runner.invoke(app, ["calibrate", str(model), "--data", str(data), "-o", str(calib)]).exit_code == 0
    if above:
        monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 100_000)
        monkeypatch.setattr(model_io, "_SPILL_ABOVE", 1024)
    ctx = ConvertContext(ConvertRequest(model, tmp_path / "out.onnx", calibration=calib))
    run_steps(ctx, (s.load_and_check, s.preprocess, s.calibrate_or_read, s.plan, s.lower))
    held = [ctx.model, ctx.prepared, ctx.quantized]
    in_protobuf = sum(model_io._raw_size(t) for m in held if m is not None for t in m.graph.initializer)
    fp32 = LAYERS * WIDTH * WIDTH * 4
    if above:
        assert in_protobuf < 0.02 * fp32 and ctx.scratch is not None  # scales and biases only (the int8: 0.25)
    else:
        assert 0.25 * fp32 <= in_protobuf < 0.3 * fp32  # the int8 weights once, biases and scales
    x = np.load(data)["x"][:4]  # and the quantized model still runs, its float tensors read from the input's file
    ref = make_session(load_model(model)).run(None, {"x": x})[0]
    got = make_session(ctx.quantized).run(None, {"x": x})[0]
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()
    remove_scratch(ctx)
    assert ctx.scratch is None and not list(tmp_path.glob(".quantcli-scratch-*"))


@pytest.mark.parametrize("limit", [model_io.PROTOBUF_LIMIT, 100_000])
def test_calibrate_reading_weights_from_their_file_measures_the_same(tmp_path, external_mlp, monkeypatch, limit):
    """calibrate leaves external weights in their file (onnxruntime reads them): the same calibration file."""
    import quantcli.api

    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", limit)
    model, data = external_mlp
    loads: list[bool] = []
    real_load = model_io.load_model

    def load(path: Path, *, weights: bool = True) -> onnx.ModelProto:
        loads.append(weights)
        return real_load(path, weights=weights or eager)

    monkeypatch.setattr(quantcli.api, "load_model", load)
    written = []
    for eager in (False, True):
        out = tmp_path / f"calib-{eager}.json"
        result = runner.invoke(app, ["calibrate", str(model), "--data", str(data), "-o", str(out)])
        assert result.exit_code == 0, result.output
        written.append(out.read_bytes())
    assert loads == [False, False]  # calibrate asks for the graph only
    assert written[0] == written[1]


@pytest.mark.parametrize(
    "extra",
    [
        ["--cle", "--bias-correction"],
        ["--smoothquant"],
        ["--mode", "dynamic"],
        ["--mode", "weight-only"],
        ["--mode", "fp16"],
    ],
    ids=["cle-bias", "smoothquant", "dynamic", "weight-only", "fp16"],
)
def test_every_convert_path_reading_weights_from_their_file_writes_the_same_bytes(tmp_path, monkeypatch, extra):
    """The algorithms (calibrating inside convert, with a verdict) and the other modes: same bytes as
    with the whole model read first."""
    from quantcli.pipeline import mode_steps, steps

    model = _saved(tmp_path, 1024)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((32, WIDTH)).astype(np.float32))
    written = []
    real_load = model_io.load_model
    for eager in (False, True):
        if eager:
            for module in (steps, mode_steps):
                monkeypatch.setattr(module, "load_model", lambda path, weights=True: real_load(path))
            monkeypatch.setattr(steps, "spill_weights", lambda model, folder: model)
        folder = tmp_path / f"eager-{eager}"
        folder.mkdir()
        out = folder / "mlp.q.onnx"
        args = ["convert", str(model), "-o", str(out), *extra]
        args += ["--data", str(data)] if "--mode" not in extra else []
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        written.append((out.read_bytes(), (folder / "mlp.q.onnx.data").read_bytes()))
    assert written[0] == written[1]
    assert len(written[0][1]) > 0
