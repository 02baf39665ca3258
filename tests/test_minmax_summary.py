"""Min-max calibration reduced inside the graph: what the augmented graph holds, and that its summaries
fold to the same bytes as the values they replace (NaN, inf, -0.0, empty batches, int tensors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quantcli.core.options import CalibrationMethod
from quantcli.data.datasets import FeedList
from quantcli.graph.reductions import summarize_min_max
from quantcli.graph.session import augmented, make_session
from quantcli.passes.preprocess import preprocess
from quantcli.stats.calibration import CalibrationOptions, calibrate, expose
from quantcli.stats.collector import RangeRequest, SummaryRangeStats
from quantcli.stats.observers import MinMaxObserver
from tests import models
from tests.helpers import dataset
from tests.models import make_model


def _state(observer: MinMaxObserver) -> str:
    """Everything the observer holds, as text that tells -0.0 from 0.0 and keeps NaN visible."""
    return repr((observer.min, observer.max, observer.count, observer.last, observer.nans))


def _identity_model(opset: int = 17) -> onnx.ModelProto:
    """y = Identity(x) on a float tensor of any shape; y's values are exactly the batch fed."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)  # any rank: the checker would want one
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="id")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _adversarial_batches(rng: np.random.Generator) -> list[np.ndarray]:
    def with_value(n: int, pos: int, value: float, base: np.ndarray | None = None) -> np.ndarray:
        a = rng.normal(size=n).astype(np.float32) if base is None else base.copy()
        a[pos] = value
        return a

    zeros = np.zeros(17, dtype=np.float32)
    batches = [
        with_value(9, 4, np.nan),  # first batch holds a NaN: numpy's min is NaN, the batch is left out
        rng.normal(size=(2, 3, 5)).astype(np.float32),
        with_value(33, 0, np.nan),
        with_value(33, 32, np.nan),
        np.full(8, np.nan, dtype=np.float32),
        np.zeros((0, 4), dtype=np.float32),  # empty: dropped
        with_value(17, 3, -0.0, zeros),  # zeros of both signs: min and max are zero, of either sign
        with_value(17, 16, 0.0, -zeros),
        np.full(5, -0.0, dtype=np.float32),
        with_value(40, 7, np.inf),
        with_value(40, 39, -np.inf),
        with_value(40, 1, np.nan, with_value(40, 2, np.inf)),
        np.float32(rng.normal(size=(64, 33)) * 1e30),
    ]
    return batches


def test_summarized_graph_reduces_inside_and_returns_no_activation() -> None:
    model = preprocess(models.small_cnn())[0]
    images = {"x": models.structured_images(6, seed=1)}
    exposure = expose(model, dataset(model, images), CalibrationOptions(), summarize=True)
    ops = [n.op_type for n in exposure.model.graph.node]
    assert ops.count("ReduceMin") == len(exposure.summaries) == len(exposure.fetched) > 3
    outputs = {o.name for o in exposure.model.graph.output}
    original = {o.name for o in model.graph.output}
    assert outputs == original | set(exposure.summaries.values())  # no activation is returned as such
    assert {o.type for o in exposure.probe.get_outputs() if o.name in exposure.summaries.values()} == {"tensor(double)"}
    assert {o.name for o in model.graph.output} == original  # the input model is not touched


def test_summaries_fold_to_the_same_bytes_as_the_values(rng: np.random.Generator) -> None:
    summarized = summarize_min_max(_identity_model(), ["y"])
    assert summarized is not None
    session = make_session(summarized.model)
    from_values, from_summaries = MinMaxObserver(), SummaryRangeStats()
    for batch in _adversarial_batches(rng):
        summary = session.run([summarized.outputs["y"]], {"x": batch})[0]
        assert summary.shape == (4,) and int(summary[3]) == batch.size
        from_values.update(batch)
        from_summaries.update([summary])
        assert _state(from_summaries.minmax) == _state(from_values), batch


@pytest.mark.parametrize("batch", [[-0.0, 0.0, 1.0], [0.0, -0.0, -1.0], [-0.0] * 7])
def test_a_zero_bound_is_recorded_as_positive_zero(batch: list[float]) -> None:
    observer = MinMaxObserver()
    observer.update(np.array(batch, dtype=np.float32))
    assert all(repr(v) != "-0.0" for v in (observer.min, observer.max, *observer.last))


def test_models_below_opset_9_keep_the_values_path() -> None:
    assert summarize_min_max(_identity_model(opset=8), ["y"]) is None
    assert summarize_min_max(_identity_model(opset=9), ["y"]) is not None


def test_summary_requests_feed_min_max_alone() -> None:
    with pytest.raises(ValueError):
        RangeRequest("t", histogram_bins=16, summary=True).observer()


def _int_edge_model() -> onnx.ModelProto:
    """Float tensors around int ones (Shape -> Cast -> Mul): only the float ones are summarized."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["sf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["sf"], ["total"], name="sum", keepdims=1),
        helper.make_node("Mul", ["r", "total"], ["y"], name="mul"),
    ]
    return make_model(nodes, [x], [y], [])


@pytest.mark.parametrize("build", [_int_edge_model, lambda: preprocess(models.small_cnn())[0]])
def test_min_max_ranges_equal_those_of_the_values(build, rng: np.random.Generator) -> None:
    model = build()
    shape = [d.dim_value or 3 for d in model.graph.input[0].type.tensor_type.shape.dim]
    feeds = [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(4)]
    feeds[1]["x"][0, 0] = -0.0
    result = calibrate(model, FeedList(feeds), model_sha256="-", method=CalibrationMethod.MINMAX, reduce_in_graph=True)
    exposure = expose(model, FeedList(feeds), CalibrationOptions(), summarize=True)
    assert set(exposure.summaries) == {n for n in exposure.fetched if n not in exposure.reduced}
    assert build is not _int_edge_model or ("s" not in exposure.summaries and "r" in exposure.summaries)
    names = list(result.ranges)
    session = make_session(augmented(model, names))
    expected = {n: MinMaxObserver() for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            expected[name].update(value)
    for name in names:
        r = result.ranges[name]
        assert repr((r.min, r.max)) == repr(expected[name].result()), name


def test_min_max_reduces_in_graph_only_when_asked() -> None:
    assert not CalibrationOptions().summarizes
    assert CalibrationOptions(reduce_in_graph=True).summarizes
    assert not CalibrationOptions(method=CalibrationMethod.PERCENTILE, reduce_in_graph=True).summarizes


def test_min_max_batches_are_smaller_and_ranges_the_same_bytes(rng: np.random.Generator) -> None:
    """Min-max plans its batch to 4 MB of activations (histograms: 16 MB); the ranges are the same bytes
    at any batch size."""
    model = preprocess(models.small_cnn(channels=64))[0]
    images = models.structured_images(40, seed=3)
    images[5, 0, 0, 0] = -0.0
    images[7, 0, 0, 0] = 0.0
    ds = dataset(model, {"x": images})
    minmax = CalibrationOptions(method=CalibrationMethod.MINMAX)
    histogram = CalibrationOptions(method=CalibrationMethod.PERCENTILE)
    assert minmax.collect_options(None).batch_target < histogram.collect_options(None).batch_target
    results = [calibrate(model, ds, model_sha256="-", batch_size=b).ranges for b in (1, 3, 32)]
    assert repr(results[0]) == repr(results[1]) == repr(results[2])


def test_loop_body_pairs_merge_from_shards_as_in_one_run(rng: np.random.Generator) -> None:
    """Shards observe a Loop body's [min, max] pairs as pairs (an If branch never taken gives
    [+inf, -inf] pairs, which must be dropped, not taken as an infinite range)."""
    from quantcli.stats.merge import merge_shards
    from quantcli.stats.shards import ShardSpec, collect_shard
    from tests.test_calibration_memory import _if_in_loop_model

    model = _if_in_loop_model(steps=2)
    feeds = FeedList([{"x": rng.normal(size=(2, 8)).astype(np.float32)} for _ in range(4)])
    one = calibrate(model, feeds, model_sha256="-")
    options = CalibrationOptions()
    parts = [collect_shard(model, feeds, options, ShardSpec(k, 2), model_sha256="-", model_name="m") for k in (1, 2)]
    merged = merge_shards(parts, [Path("a"), Path("b")]).result
    assert "e_out" in one.unobserved and "t_relu" in one.ranges
    assert repr(merged.ranges) == repr(one.ranges)
