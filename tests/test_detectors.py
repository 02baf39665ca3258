"""Failure mechanisms found on PP-OCRv4 det/rec and PicoDet, each reproduced on a tiny graph.

* A re-parameterized Conv followed by a learnable affine block (``Conv -> Mul(a) -> Add(b)``, as
  PP-LCNetV3 exports it) was quantized three times in a row; the affine is now folded into the Conv.
* A Sigmoid score map that is a graph output was rounded on an 8-bit grid although no integer op
  reads it; it now stays float, with a range decision saying so.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.options import QuantConfig
from quantcli.passes.preprocess import preprocess
from quantcli.static.lowering import apply_plan
from quantcli.static.planning import make_plan
from quantcli.stats.calibration import calibrate
from tests import models
from tests.helpers import dataset, quantize, run, sqnr


def _conv_affine_model(
    rng: np.random.Generator, mul_shape: tuple[int, ...], add_shape: tuple[int, ...]
) -> onnx.ModelProto:
    """x -> Conv(3x3, 8 channels) -> Mul(const a) -> Add(const b) -> Conv(1x1) -> y, on 8x8 images."""
    inits = [
        numpy_helper.from_array((rng.normal(size=(8, 3, 3, 3)) / 3).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.uniform(0.2, 3.0, size=mul_shape).astype(np.float32), "a"),
        numpy_helper.from_array(rng.normal(size=add_shape).astype(np.float32), "b"),
        numpy_helper.from_array((rng.normal(size=(4, 8, 1, 1)) / 3).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["a", "c1"], ["scaled"], name="lab_mul"),
        helper.make_node("Add", ["scaled", "b"], ["shifted"], name="lab_add"),
        helper.make_node("Conv", ["shifted", "w2"], ["y"], name="conv2"),
    ]
    return models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )


def test_conv_affine_is_folded_exactly(rng: np.random.Generator) -> None:
    model = _conv_affine_model(rng, (1,), (1, 8, 1, 1))  # scalar scale, per-channel shift
    prepared, report = preprocess(model)
    assert report.folded_affines == 2
    assert [n.op_type for n in prepared.graph.node] == ["Conv", "Conv"]
    assert prepared.graph.node[0].output[0] == "shifted"  # the Conv writes the Add's output
    x = {"x": rng.normal(size=(4, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(prepared, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-5)


def test_affine_that_is_not_per_channel_is_not_folded(rng: np.random.Generator) -> None:
    # a [8] constant broadcasts along the width axis of [N, 8, 8, 8], not along the channels
    model = _conv_affine_model(rng, (8,), (8, 1, 1))
    prepared, report = preprocess(model)
    assert report.folded_affines == 0  # and the per-channel Add reads the Mul, not a Conv
    assert [n.op_type for n in prepared.graph.node] == ["Conv", "Mul", "Add", "Conv"]
    x = {"x": rng.normal(size=(4, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(prepared, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-5)


def test_folded_affine_is_quantized_once(rng: np.random.Generator) -> None:
    model = _conv_affine_model(rng, (1,), (1, 8, 1, 1))
    x = {"x": models.structured_images(64, seed=5, size=8)}
    qmodel, plan, _ = quantize(model, x)
    assert {t.tensor for t in plan.activations} == {"x", "shifted", "y"}
    # without the fold: the Conv output, the Mul output and the Add output are each rounded
    unfolded, _ = preprocess(model, fold_batchnorm=False)
    ranges = calibrate(unfolded, dataset(model, x), model_sha256="-").ranges
    plan3 = make_plan(unfolded, ranges, QuantConfig())
    assert {"c1", "scaled", "shifted"} <= {t.tensor for t in plan3.activations}
    ref = run(model, x)[0]
    assert sqnr(ref, run(qmodel, x)[0]) > sqnr(ref, run(apply_plan(unfolded, plan3), x)[0])


def _score_head(rng: np.random.Generator, *, reshape: bool) -> onnx.ModelProto:
    """x -> Conv -> Sigmoid (-> Reshape) -> y: a detector's score map, mostly near 0."""
    inits = [
        numpy_helper.from_array((rng.normal(size=(2, 3, 1, 1)) / 2).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([-6.0, -4.0], np.float32), "bias"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "bias"], ["logits"], name="head"),
        helper.make_node("Sigmoid", ["logits"], ["scores" if reshape else "y"], name="sigmoid"),
    ]
    out_shape: list[str | int] = ["N", 2, 8, 8]
    if reshape:
        nodes.append(helper.make_node("Reshape", ["scores", "shape"], ["y"], name="flatten"))
        out_shape = ["N", 128]
    return models.make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )


def test_sigmoid_scores_that_only_reach_outputs_stay_float(rng: np.random.Generator) -> None:
    x = {"x": models.structured_images(64, seed=7, size=8)}
    for reshape in (False, True):
        model = _score_head(rng, reshape=reshape)
        qmodel, plan, _ = quantize(model, x)
        assert ("head", "Conv") in plan.quantized_nodes
        assert ("sigmoid", "Sigmoid") not in plan.quantized_nodes
        assert any(s.node == "sigmoid" and "graph outputs" in s.reason for s in plan.skipped)
        decision = next(d for d in plan.range_decisions if d.tensor == ("scores" if reshape else "y"))
        assert "kept in float" in decision.decision and 0.0 < decision.observed_min < decision.observed_max < 1.0
        ref, out = run(model, x)[0], run(qmodel, x)[0]
        # only the logits are rounded: each score keeps its relative precision
        assert np.max(np.abs(out - ref) / ref) < 0.1
        assert sqnr(ref, out) > 30.0
    # the same score map rounded on its own 8-bit grid: the small scores lose their precision
    qmodel, plan, _ = quantize(model, x, QuantConfig(disabled_rules=frozenset({"outputs-only"})))
    assert ("sigmoid", "Sigmoid") in plan.quantized_nodes
    out = run(qmodel, x)[0]
    assert np.max(np.abs(out - ref) / ref) > 0.5


def test_sigmoid_read_by_a_conv_is_still_quantized(rng: np.random.Generator) -> None:
    model = _score_head(rng, reshape=False)
    w2 = numpy_helper.from_array(rng.normal(size=(2, 2, 1, 1)).astype(np.float32), "w2")
    model.graph.node[1].output[0] = "scores"
    model.graph.node.append(helper.make_node("Conv", ["scores", "w2"], ["y"], name="after"))
    model.graph.initializer.append(w2)
    onnx.checker.check_model(model)
    _, plan, _ = quantize(model, {"x": models.structured_images(32, seed=7, size=8)})
    assert ("sigmoid", "Sigmoid") in plan.quantized_nodes
