"""Inputs not batched on axis 0: ``--batch-axis NAME=AXIS``, unbatched (``NAME=none``) and scalar inputs.

The tiny model is shaped like a streaming audio model (Silero VAD): ``x`` [N, 4], a recurrent
``state`` [2, N, 3] batched on axis 1, and an int64 scalar ``sr`` fed with every run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from typer.testing import CliRunner

from quantcli.cli.app import EXIT_BAD_INPUT, app
from quantcli.core.errors import CalibrationDataError, QuantCliError
from quantcli.data.datasets import model_input_specs, open_dataset, parse_batch_axes
from quantcli.graph.session import make_session

runner = CliRunner()

_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
stream (float[N,4] x, float[2,N,3] state, int64 sr) => (float[N,4] y, float[2,N,3] state_out) {
    srf = Cast<to=1>(sr)
    scale = Constant<value=float {0.001}>()
    gain = Mul(srf, scale)
    h = MatMul(x, w)
    y = Mul(h, gain)
    state_out = Add(state, gain)
}
"""


def _model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(_TEXT)
    w = np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def stream_path(tmp_path: Path) -> Path:
    path = tmp_path / "stream.onnx"
    onnx.save(_model(), path)
    return path


def _arrays(n: int, sr: int = 16000) -> dict[str, np.ndarray]:
    """Sample i holds the value i in ``x[i]`` and in ``state[:, i]``, so mixed-up axes show."""
    idx = np.arange(n, dtype=np.float32)
    return {
        "x": np.repeat(idx[:, None], 4, axis=1),
        "state": np.broadcast_to(idx[None, :, None], (2, n, 3)).copy(),
        "sr": np.array(sr, np.int64),
    }


def _save(path: Path, n: int, sr: int = 16000) -> Path:
    np.savez(path, **_arrays(n, sr))
    return path


def test_state_batched_on_axis_1_and_scalar_fed_with_every_batch(tmp_path):
    specs = model_input_specs(_model())
    ds = open_dataset(_save(tmp_path / "s.npz", 7), specs, batch_axes={"state": 1})
    assert ds.num_samples == 7
    batches = list(ds.batches(3))
    assert [ds.batch_length(b) for b in batches] == [3, 3, 1]
    for b in batches:
        assert b["state"].shape[0] == 2 and b["state"].shape[2] == 3
        np.testing.assert_array_equal(b["state"][0, :, 0], b["x"][:, 0])  # same samples on both axes
        assert b["sr"].shape == () and int(b["sr"]) == 16000
    np.testing.assert_array_equal(np.concatenate([b["state"] for b in batches], axis=1), _arrays(7)["state"])
    session = make_session(_model())
    for b in batches:  # onnxruntime accepts every feed as is
        _, state_out = session.run(None, b)
        np.testing.assert_allclose(state_out, b["state"] + 16.0, rtol=1e-6)


def test_shuffled_batches_keep_axes_in_step(tmp_path):
    ds = open_dataset(_save(tmp_path / "s.npz", 9), model_input_specs(_model()), batch_axes={"state": 1})
    seen = []
    for b in ds.batches(4, shuffle=True, seed=3):
        np.testing.assert_array_equal(b["state"][1, :, 2], b["x"][:, 3])
        seen.extend(b["x"][:, 0].tolist())
    assert sorted(seen) == list(range(9)) and seen != list(range(9))


def test_single_sample_file_gets_its_batch_axis_where_declared(tmp_path):
    one = _arrays(1)
    np.savez(tmp_path / "one.npz", x=one["x"][0], state=one["state"][:, 0], sr=one["sr"])
    ds = open_dataset(tmp_path / "one.npz", model_input_specs(_model()), batch_axes={"state": 1})
    feed = next(ds.batches(4))
    assert feed["state"].shape == (2, 1, 3) and feed["x"].shape == (1, 4)


def test_files_with_their_own_unbatched_value_are_batched_file_by_file(tmp_path):
    folder = tmp_path / "rates"
    folder.mkdir()
    _save(folder / "a.npz", 5, sr=16000)
    _save(folder / "b.npz", 3, sr=8000)
    ds = open_dataset(folder, model_input_specs(_model()), batch_axes={"state": 1})
    rates = [(ds.batch_length(b), int(b["sr"])) for b in ds.batches(4)]
    assert rates == [(4, 16000), (1, 16000), (3, 8000)]
    with pytest.raises(CalibrationDataError, match="--shuffle needs one file"):
        next(ds.batches(4, shuffle=True))


def test_none_declares_an_array_fed_unchanged(tmp_path):
    """An input of any rank can be unbatched: here the state is one [2, 1, 3] array for every run."""
    arrays = _arrays(6)
    np.savez(tmp_path / "u.npz", x=arrays["x"], state=np.full((2, 1, 3), 5.0, np.float32), sr=arrays["sr"])
    specs = model_input_specs(_model())
    ds = open_dataset(tmp_path / "u.npz", specs, batch_axes={"state": None})
    assert ds.num_samples == 6 and ds.effective_batch_size(4) == 4
    assert all(b["state"].shape == (2, 1, 3) and float(b["state"].max()) == 5.0 for b in ds.batches(4))
    np.savez(tmp_path / "bad.npz", x=arrays["x"], state=np.zeros((3, 1, 3), np.float32), sr=arrays["sr"])
    with pytest.raises(CalibrationDataError, match=r"bad\.npz: input 'state' is float32\[3,1,3\] .*unbatched"):
        open_dataset(tmp_path / "bad.npz", specs, batch_axes={"state": None})


def test_wrong_axis_is_refused_before_the_first_batch_naming_file_input_and_fix(tmp_path):
    path = _save(tmp_path / "calib.npz", 6)
    specs = model_input_specs(_model())
    for axes in ({}, {"state": 2}, {"state": 0}):
        with pytest.raises(CalibrationDataError) as info:
            open_dataset(path, specs, batch_axes=axes)
        message = str(info.value)
        assert message.startswith(f"{path}: inputs hold different numbers of samples")
        assert "'state'" in message and message.endswith("--batch-axis state=1")
        assert "\n" not in message


@pytest.mark.parametrize(
    ("sr", "axes", "message"),
    [
        (
            np.array([16000, 16000]),
            {"state": 1},
            r"input .sr. is int64\[2\] but the model expects int64\[\] \(a scalar",
        ),
        (np.array(16000), {"state": 1, "sr": 0}, r"--batch-axis sr=0: input 'sr' is int64\[\], with 0 axes"),
        (np.array(16000), {"state": 3}, r"--batch-axis state=3: input 'state' is float32\[2,N,3\], with 3 axes"),
        (np.array(16000), {"stat": 1}, r"--batch-axis names \['stat'\]"),
    ],
)
def test_bad_declarations_are_one_line_errors(tmp_path, sr, axes, message):
    arrays = _arrays(4)
    np.savez(tmp_path / "d.npz", x=arrays["x"], state=arrays["state"], sr=sr)
    with pytest.raises(CalibrationDataError, match=message):
        open_dataset(tmp_path / "d.npz", model_input_specs(_model()), batch_axes=axes)


def test_parse_batch_axes():
    assert parse_batch_axes(["state=1", "sr=none", "h=-2"]) == {"state": 1, "sr": None, "h": -2}
    assert parse_batch_axes(None) == {}
    for bad in ("state", "=1", "state=one"):
        with pytest.raises(QuantCliError, match="expected NAME=AXIS"):
            parse_batch_axes([bad])


def test_axis_0_data_is_read_as_before(tmp_path, rng):
    """Without --batch-axis nothing changes for data stacked on axis 0 (the only convention before)."""
    spec_model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[N,2] a, float[1,3] b) => (float[N,2] c) { c = Relu(a) }'
    )
    a, b = rng.normal(size=(5, 2)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    np.savez(tmp_path / "ab.npz", a=a, b=b)
    ds = open_dataset(tmp_path / "ab.npz", model_input_specs(spec_model))
    assert ds.effective_batch_size(32) == 1  # b fixes the batch at 1, as before
    feeds = list(ds.batches(32))
    np.testing.assert_array_equal(np.concatenate([f["a"] for f in feeds]), a)
    assert all(f["b"].shape == (1, 3) for f in feeds)
    np.testing.assert_array_equal(np.concatenate([f["b"] for f in feeds]), b)


def _invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_calibrate_convert_search_and_compare(tmp_path, stream_path, fixed_speedup):
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for sr, n in ((16000, 40), (8000, 24)):
        arrays = _arrays(n, sr)
        arrays["x"] = rng.normal(size=(n, 4)).astype(np.float32)
        np.savez(folder / f"{sr}.npz", **arrays)
    calib, out = tmp_path / "c.json", tmp_path / "q.onnx"
    result = _invoke("calibrate", stream_path, "--data", folder, "-o", calib, "-q")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "--batch-axis state=1" in result.output and "Traceback" not in result.output
    result = _invoke("calibrate", stream_path, "--data", folder, "--batch-axis", "state=1", "-o", calib, "-q")
    assert result.exit_code == 0, result.output
    assert "64 samples" in result.output
    result = _invoke("convert", stream_path, "--data", folder, "--batch-axis", "state=1", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)
    result = _invoke(
        "convert", stream_path, "--data", folder, "--eval-data", folder, "--batch-axis", "state=1",
        "--min-sqnr", "20", "-o", tmp_path / "s.onnx", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = _invoke(
        "compare", stream_path, out, "--data", folder, "--batch-axis", "state=1", "--latency-batch", "1",
        "--runs", "3", "--no-memory", "--metric", "none", "--json", tmp_path / "cmp.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    compared = json.loads((tmp_path / "cmp.json").read_text())
    assert compared["data"]["num_samples"] == 64
    assert {o["name"] for o in compared["outputs"]} == {"y", "state_out"}
