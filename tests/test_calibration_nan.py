"""NaN values an activation takes are left out of its range one by one, whatever the batching, and said so."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from quantcli.cli.app import app
from quantcli.core.errors import CalibrationDataError
from quantcli.core.options import CalibrationMethod
from quantcli.stats.calibration import calibrate
from quantcli.stats.collector import RangeRequest
from quantcli.stats.observers import GrowingHistogram, MinMaxObserver
from tests.helpers import dataset


def _sqrt_model() -> onnx.ModelProto:
    """y = Sqrt(x) (NaN where x < 0), z = y * 2 + 1: the NaN flows on."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 6])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("Sqrt", ["x"], ["y"], name="sqrt"),
        helper.make_node("Mul", ["y", "two"], ["w"], name="mul"),
        helper.make_node("Add", ["w", "one"], ["z"], name="add"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [z], [two, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _data() -> np.ndarray:
    """12 samples; sample 5 holds the two negative values (so two NaN) and the largest value of all."""
    x = np.random.default_rng(0).uniform(0.5, 4.0, size=(12, 6)).astype(np.float32)
    x[5] = [-1.0, 9.0, -3.0, 0.25, 1.0, 1.5]
    return x


@pytest.mark.parametrize(
    ("method", "in_graph"),
    [
        (CalibrationMethod.MINMAX, False),
        (CalibrationMethod.MINMAX, True),
        (CalibrationMethod.PERCENTILE, False),
        (CalibrationMethod.ENTROPY, False),
    ],
)
def test_a_nan_gives_the_same_ranges_batched_1_or_4(method, in_graph):
    model, x = _sqrt_model(), _data()
    results = [
        calibrate(
            model, dataset(model, {"x": x}), model_sha256="t", method=method, batch_size=b, reduce_in_graph=in_graph
        )
        for b in (1, 4)
    ]
    assert results[0].ranges == results[1].ranges
    assert results[0].nans == results[1].nans == {"y": 2, "w": 2, "z": 2}
    with np.errstate(invalid="ignore"):
        y = np.sqrt(x.astype(np.float64)).astype(np.float32)
    r = results[0].ranges["y"]
    # only the two NaN values are left out, not the rest of sample 5 (9.0 is the largest input)
    assert (r.observed_min, r.observed_max) == (float(np.nanmin(y)), 3.0)
    if method == CalibrationMethod.MINMAX:
        assert (r.min, r.max) == (r.observed_min, r.observed_max)


def test_histograms_and_min_max_ignore_nan_value_by_value():
    rng = np.random.default_rng(1)
    values = rng.normal(size=400).astype(np.float32)
    values[[3, 77, 78, 399]] = np.nan
    clean = values[~np.isnan(values)]
    # one observer fed 1 value at a time (chunked: the small-batch path), one fed 100, one fed the clean values
    states, nans = [], []
    for pieces in (np.split(values, 400), np.split(values, 4), [clean]):
        stats = RangeRequest("t", histogram_bins=64).observer()
        for piece in pieces:
            stats.update([piece])
        stats.finish()
        assert stats.histogram is not None
        states.append((stats.minmax.min, stats.minmax.max, stats.minmax.count, stats.histogram.counts.tolist()))
        nans.append(stats.minmax.nans)
    assert states[0] == states[1] == states[2] and nans == [4, 4, 0]
    merged = MinMaxObserver()
    for part in (values[:100], values[100:]):
        one = MinMaxObserver()
        one.update(part)
        merged.merge(one)  # shards merge their counts
    assert (merged.min, merged.max, merged.count, merged.nans) == (*states[2][:3], 4)
    hist = GrowingHistogram(64)
    hist.update(values)  # without a bound: the NaN values are dropped, not the histogram
    assert hist.finite and int(hist.counts.sum()) == clean.size
    observer = MinMaxObserver()
    observer.update(np.full(3, np.nan, dtype=np.float32))
    assert (observer.count, observer.nans, observer.result()) == (0, 3, (0.0, 0.0))


def test_a_tensor_of_nothing_but_nan_is_an_error():
    model = _sqrt_model()
    x = np.full((4, 6), -1.0, dtype=np.float32)
    with pytest.raises(CalibrationDataError, match=r"activation 'y' took only NaN values \(24\)"):
        calibrate(model, dataset(model, {"x": x}), model_sha256="t")


def test_calibrate_warns_in_one_line_and_records_the_counts(tmp_path):
    onnx.save(_sqrt_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=_data())
    out = tmp_path / "m.calib.json"
    args = ["calibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "NaN" in line]
    assert warnings == ["warning: 6 NaN values left out of the ranges of 3 activations: w (2), y (2), z (2)"]
    assert json.loads(out.read_text())["nans"] == {"w": 2, "y": 2, "z": 2}
    report = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "again.json"), "--json", str(tmp_path / "r.json")])
    assert report.exit_code == 0, report.output
    assert json.loads((tmp_path / "r.json").read_text())["nans"] == {"w": 2, "y": 2, "z": 2}


def test_a_tensor_that_is_always_empty_keeps_a_zero_range():
    from types import SimpleNamespace

    from quantcli.stats.calibration import CalibrationOptions, calibration_result

    stats = RangeRequest("t").observer()
    stats.update([np.zeros((4, 0), dtype=np.float32)])  # no value, and no NaN: not "only NaN"
    exposure = SimpleNamespace(tracked=["t"], aliases={}, inner={})
    result = calibration_result(exposure, {"t": stats}, CalibrationOptions(), "sha", 1, 1)
    assert (result.ranges["t"].min, result.ranges["t"].max, result.nans) == (0.0, 0.0, {})
