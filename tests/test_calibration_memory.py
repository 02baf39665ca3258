"""Calibration memory: the batch shrinks to fit the budget, Loop-body tensors are observed per iteration."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.options import CalibrationMethod
from quantcli.data.datasets import FeedList
from quantcli.graph.model_io import infer_shapes
from quantcli.graph.scopes import elem_types
from quantcli.graph.session import augmented, make_session
from quantcli.graph.subgraphs import expose_subgraph_tensors
from quantcli.passes.preprocess import preprocess
from quantcli.stats.calibration import CalibrationOptions, calibrate, expose, range_request
from quantcli.stats.collector import CollectOptions, collect, plan_batch
from tests import models
from tests.helpers import dataset
from tests.models import make_model
from tests.test_control_flow import loop_model


def test_plan_batch_fits_the_budget_down_to_one_sample() -> None:
    assert plan_batch(per_sample=1000, batch_size=32, budget=1 << 20) == 32  # fits: the batch asked for
    assert plan_batch(per_sample=1000, batch_size=32, budget=8500) == 8
    assert plan_batch(per_sample=1000, batch_size=32, budget=10) == 1  # groups take over from there
    assert plan_batch(per_sample=1000, batch_size=32, budget=1 << 20, target=4500) == 5  # reaches the target
    assert plan_batch(per_sample=10, batch_size=32, budget=1 << 20, target=4500) == 32


def test_batch_shrinks_before_tensors_split_into_passes() -> None:
    prepared = preprocess(models.small_cnn())[0]
    ds = dataset(prepared, {"x": models.structured_images(64, seed=11)})
    options = CalibrationOptions(method=CalibrationMethod.PERCENTILE)
    exposure = expose(prepared, ds, options)
    per_sample = sum(a.nbytes for a in exposure.probe.run(exposure.fetched, next(iter(ds.batches(1)))))
    requests = [range_request(n, options) for n in exposure.fetched]

    def run(budget: int, fit: bool) -> tuple[int, int, dict[str, tuple[float, float]]]:
        got = collect([exposure.model], ds, requests, CollectOptions(max_memory=budget, fit_batch=fit))
        hists = {r.tensor: got[r].histogram.result() for r in requests}  # type: ignore[attr-defined]
        ranges = {r.tensor: got[r].minmax.result() for r in requests}  # type: ignore[attr-defined]
        return got.passes, got.batch_size, {n: (*ranges[n], *hists[n].counts[:8].tolist()) for n in ranges}

    passes, batch, whole = run(1 << 30, fit=True)
    assert (passes, batch) == (1, 32)
    passes, batch, fitted = run(per_sample * 5 + 1, fit=True)
    assert (passes, batch) == (1, 5)  # one pass at a smaller batch, not 7 passes at 32
    assert fitted == whole  # min/max and histogram counts do not depend on the batch
    passes, batch, one = run(per_sample // 4, fit=True)
    assert (passes, batch) == (1, 1) and one == whole  # the size probe held one sample: no passes below it
    passes, batch, grouped = run(per_sample * 5 + 1, fit=False)
    assert passes > 3 and batch == 32
    # each pass exposes other tensors as graph outputs, so onnxruntime may fuse (and round) differently:
    # measured on AVX2 without VNNI, a Conv's max moved by one float32 ulp (12.660882 vs 12.660883)
    assert grouped.keys() == whole.keys()
    for name, values in grouped.items():
        np.testing.assert_allclose(values, whole[name], rtol=1e-6, atol=0, err_msg=name)


def _if_in_loop_model(steps: int, d: int = 8) -> onnx.ModelProto:
    """h <- Loop(steps){ If(iter < 2) then relu(h) * 3 else h * 0.5 }: the then-branch runs twice only."""
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
    two = numpy_helper.from_array(np.array(2, np.int64), "two")
    then_g = helper.make_graph(
        [
            helper.make_node("Relu", ["h_in"], ["t_relu"], name="t_relu"),
            helper.make_node("Mul", ["t_relu", "three"], ["t_out"], name="t_mul"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["N", d])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Mul", ["h_in", "half"], ["e_out"], name="e_mul")],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["N", d])],
    )
    body = helper.make_graph(
        [
            helper.make_node("Less", ["iter", "two"], ["early"], name="early"),
            helper.make_node("If", ["early"], ["b_if"], name="branch", then_branch=then_g, else_branch=else_g),
            helper.make_node("Tanh", ["b_if"], ["h_out"], name="b_tanh"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="b_cond"),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", d]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", d]),
        ],
    )
    trip = numpy_helper.from_array(np.array(steps, np.int64), "trip")
    nodes = [helper.make_node("Loop", ["trip", "", "x"], ["h"], name="loop", body=body)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])]
    outputs = [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", d])]
    return make_model(nodes, inputs, outputs, [trip, half, three, two])


def _stacked_ranges(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """Min/max of every subgraph tensor from its values stacked across iterations (the old exposure)."""
    exposed = expose_subgraph_tensors(model, elem_types(infer_shapes(model)[0]))
    session = make_session(augmented(exposed.model, list(exposed.names)))
    seen: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        for out, value in zip(exposed.names, session.run(list(exposed.names), feed), strict=True):
            if value.size:
                seen.setdefault(exposed.names[out], []).append(value.ravel())
    return {n: (float(np.min(np.concatenate(v))), float(np.max(np.concatenate(v)))) for n, v in seen.items()}


def _exposed_bytes(model: onnx.ModelProto, feed: dict[str, np.ndarray], *, reduce: bool) -> int:
    exposed = expose_subgraph_tensors(model, elem_types(infer_shapes(model)[0]), reduce_loops=reduce)
    session = make_session(augmented(exposed.model, list(exposed.names)))
    return sum(a.nbytes for a in session.run(list(exposed.names), feed))


@pytest.mark.parametrize("build", [lambda s: loop_model(d=64, steps=s), _if_in_loop_model])
def test_loop_body_exposure_is_two_values_per_iteration_whatever_the_batch(build, rng: np.random.Generator) -> None:
    steps = 500
    model = build(steps)
    d = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    small, large = ({"x": rng.normal(size=(n, d)).astype(np.float32)} for n in (1, 16))
    exposed = expose_subgraph_tensors(model, elem_types(infer_shapes(model)[0]), reduce_loops=True)
    bound = steps * 2 * 4 * len(exposed.names)  # a float [min, max] pair per iteration and tensor
    assert _exposed_bytes(model, small, reduce=True) == _exposed_bytes(model, large, reduce=True) <= bound


def test_stacking_loop_body_tensors_costs_iterations_times_batch(rng: np.random.Generator) -> None:
    """What the reduced form replaces: 500 steps x 16 samples x 64 floats for each body tensor."""
    feed = {"x": rng.normal(size=(16, 64)).astype(np.float32)}
    assert _exposed_bytes(loop_model(d=64, steps=500), feed, reduce=False) >= 500 * 16 * 64 * 4 * 3


@pytest.mark.parametrize("method", [CalibrationMethod.MINMAX, CalibrationMethod.PERCENTILE])
def test_loop_body_ranges_equal_the_stacked_ones(method, rng: np.random.Generator) -> None:
    model = loop_model(d=16, steps=40)
    feeds = [{"x": rng.normal(size=(4, 16)).astype(np.float32)} for _ in range(3)]
    result = calibrate(model, FeedList(feeds), model_sha256="-", method=method)
    stacked = _stacked_ranges(model, feeds)
    assert {"h_in", "b_mm", "b_tanh", "h_out"} <= set(stacked) <= set(result.ranges)
    for name, (lo, hi) in stacked.items():
        r = result.ranges[name]
        assert (r.observed_min, r.observed_max) == (lo, hi), name
        assert (r.min, r.max) == (lo, hi), name  # histogram methods: a Loop-body tensor gets its min-max range
        assert name not in result.histograms
    assert method == CalibrationMethod.MINMAX or "x" in result.histograms  # main-graph tensors keep theirs


def test_if_inside_loop_is_calibrated_per_branch_and_iteration(rng: np.random.Generator) -> None:
    """Stacking cannot carry an If's output out of a Loop (the branch not taken gives an empty tensor of
    another shape): the [min, max] pairs can, and each branch's range covers only the steps it ran."""
    steps = 30
    x = rng.normal(size=(4, 8)).astype(np.float32)
    result = calibrate(_if_in_loop_model(steps), FeedList([{"x": x}]), model_sha256="-")
    h, seen = x, {}
    for i in range(steps):
        if i < 2:
            seen.setdefault("t_relu", []).append(np.maximum(h, 0))
            b = np.maximum(h, 0) * np.float32(3)
        else:
            b = h * np.float32(0.5)
            seen.setdefault("e_out", []).append(b)
        seen.setdefault("h_in", []).append(h)
        h = np.tanh(b)
    for name, values in seen.items():
        r = result.ranges[name]
        expected = (float(np.min(values)), float(np.max(values)))
        np.testing.assert_allclose((r.observed_min, r.observed_max), expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_if_branch_inside_loop_never_taken_is_unobserved(rng: np.random.Generator) -> None:
    """Two steps only: the else branch never runs, its [+inf, -inf] pairs are dropped, not taken as a range."""
    model = _if_in_loop_model(steps=2)
    feeds = [{"x": rng.normal(size=(2, 8)).astype(np.float32)}]
    result = calibrate(model, FeedList(feeds), model_sha256="-")
    assert "t_relu" in result.ranges and "e_out" not in result.ranges
    assert "e_out" in result.unobserved


def test_freed_memory_is_trimmed_every_few_large_batches_not_every_few_tiny_ones(monkeypatch) -> None:
    from quantcli.core import process

    trims: list[int] = []
    monkeypatch.setattr(process._State, "trim", trims.append)
    monkeypatch.setattr(process._State, "batches_since_trim", 0)
    monkeypatch.setattr(process._State, "bytes_since_trim", 0)
    for _ in range(256):  # Silero VAD: a few KB a batch
        process.release_freed_memory(8 << 10)
    assert len(trims) == 0
    for _ in range(4 * process._TRIM_EVERY):  # 8 MB batches: every _TRIM_EVERY batches, as before
        process.release_freed_memory(8 << 20)
    assert len(trims) == 4
