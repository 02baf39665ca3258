"""Hard activations and scalar rescales kept integer: SE blocks and exported HardSwish patterns."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.options import QuantConfig, QuantDType
from quantcli.verify.audit import audit_fusion
from tests.helpers import quantize, run, sqnr
from tests.models import make_model, structured_images


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def se_block(seed: int = 0, c: int = 16, *, hardswish: str = "op") -> onnx.ModelProto:
    """Conv -> HardSwish -> SE (GAP -> Conv -> Relu -> Conv -> HardSigmoid -> Mul) -> Conv -> MaxPool.

    ``hardswish``: "op" (ONNX HardSwish) or "exported" (x * Clip(x + 3, 0, 6) / 6, as Paddle exports it).
    """
    rng = np.random.default_rng(seed)
    inits = [
        _init("w1", rng.normal(size=(c, 8, 3, 3)) * 0.2), _init("b1", rng.normal(size=c) * 0.1),
        _init("ws1", rng.normal(size=(c // 4, c, 1, 1)) * 0.3), _init("bs1", rng.normal(size=c // 4) * 0.1),
        _init("ws2", rng.normal(size=(c, c // 4, 1, 1)) * 0.3), _init("bs2", rng.normal(size=c) * 0.1),
        _init("w2", rng.normal(size=(8, c, 1, 1)) * 0.3), _init("b2", rng.normal(size=8) * 0.1),
        _init("three", np.array(3.0)), _init("zero", np.array(0.0)), _init("six", np.array(6.0)),
    ]  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    if hardswish == "op":
        nodes.append(helper.make_node("HardSwish", ["c1"], ["h"], name="hswish"))
    else:
        nodes += [
            helper.make_node("Add", ["c1", "three"], ["p3"], name="plus3"),
            helper.make_node("Clip", ["p3", "zero", "six"], ["r6"], name="relu6"),
            helper.make_node("Mul", ["c1", "r6"], ["m"], name="times"),
            helper.make_node("Div", ["m", "six"], ["h"], name="div6"),
        ]
    nodes += [
        helper.make_node("GlobalAveragePool", ["h"], ["g"], name="gap"),
        helper.make_node("Conv", ["g", "ws1", "bs1"], ["s1"], name="se_conv1"),
        helper.make_node("Relu", ["s1"], ["s1r"], name="se_relu"),
        helper.make_node("Conv", ["s1r", "ws2", "bs2"], ["s2"], name="se_conv2"),
        helper.make_node("HardSigmoid", ["s2"], ["hs"], name="se_hsig", alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["h", "hs"], ["se"], name="se_mul"),
        helper.make_node("Conv", ["se", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("MaxPool", ["c2"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        inits,
    )


@pytest.mark.parametrize("activation", [QuantDType.UINT8, QuantDType.INT8])
@pytest.mark.parametrize("hardswish", ["op", "exported"])
def test_se_block_stays_integer(activation: QuantDType, hardswish: str) -> None:
    model = se_block(hardswish=hardswish)
    x = structured_images(32, seed=1, channels=8)
    quantized, plan, _ = quantize(model, {"x": x}, QuantConfig(activation_type=activation))
    kinds = dict(plan.quantized_nodes)
    assert kinds["se_hsig"] == "HardSigmoid"
    assert {"conv1", "se_conv1", "se_conv2", "conv2", "se_mul", "gap"} <= set(kinds)
    if hardswish == "op":
        assert kinds["hswish"] == "HardSwish"
    else:
        assert kinds["div6"] == "Div" and [r.node for r in plan.rescaled] == ["div6"]
    assert not plan.skipped, plan.skipped
    ref = run(model, {"x": x})[0]
    out = run(quantized, {"x": x})[0]
    assert sqnr(ref, out) > 25
    if activation == QuantDType.INT8:
        return  # onnxruntime fuses int8 element-wise units only on ARM
    # onnxruntime runs no float element-wise op: everything between the convs is integer
    audit = audit_fusion(quantized, feed={"x": x[:1]})
    assert not set(audit.op_counts) & {"HardSigmoid", "HardSwish", "Div", "Mul", "Add", "Clip"}, audit.op_counts
    assert audit.integer_mac_share() == pytest.approx(1.0)


def test_hard_sigmoid_grid_matches_float() -> None:
    """The re-read integers of x + 0 are the hard sigmoid of x on the grid 1/255, within one step."""
    model = se_block()
    x = structured_images(16, seed=2, channels=8)
    _, plan, _ = quantize(model, {"x": x})
    hsig = next(h for h in plan.hard if h.op_type == "HardSigmoid")
    assert float(hsig.read.scale) == pytest.approx(1 / 255)
    assert int(hsig.quantize.zero_point) == 128
    assert float(hsig.quantize.scale) == pytest.approx(1 / (255 * 0.2))
    v = np.linspace(-4, 4, 101)
    q = np.clip(np.round(v / float(hsig.quantize.scale)) + 128, 0, 255)
    got = q * float(hsig.read.scale)
    np.testing.assert_allclose(got, np.clip(0.2 * v + 0.5, 0, 1), atol=1 / 255 + 1e-9)
    assert got.min() == 0.0 and got.max() == pytest.approx(1.0)


def test_float_input_keeps_hard_activation_float() -> None:
    model = se_block()
    x = structured_images(8, seed=3, channels=8)
    _, plan, _ = quantize(model, {"x": x}, QuantConfig(exclude_nodes=("conv1",)))
    reasons = {s.node: s.reason for s in plan.skipped}
    assert "hswish" in reasons and "float" in reasons["hswish"]


def test_negative_divisor_is_not_rescaled() -> None:
    rng = np.random.default_rng(0)
    inits = [_init("w", rng.normal(size=(4, 3, 1, 1))), _init("k", np.array(-2.0))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Div", ["c", "k"], ["y"], name="div"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    x = structured_images(8, seed=4, size=8)
    quantized, plan, _ = quantize(model, {"x": x}, QuantConfig(reduce_range=True))
    assert not plan.rescaled
    assert any(s.node == "div" and "Div" in s.reason for s in plan.skipped)
    np.testing.assert_allclose(run(quantized, {"x": x})[0], run(model, {"x": x})[0], atol=0.1)


def test_image_stem_conv_stays_float_and_the_rest_integer() -> None:
    """A 3-channel 3x3 Conv reading the float input stays float; the Conv after it is quantized."""
    rng = np.random.default_rng(0)
    inits = [_init("w1", rng.normal(size=(8, 3, 3, 3)) * 0.3), _init("w2", rng.normal(size=(8, 8, 3, 3)) * 0.2)]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["h1"], name="stem_act"),
        helper.make_node("Conv", ["h1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["y"], name="relu"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, "H", "W"])],
        inits,
    )
    x = structured_images(16, seed=5)
    quantized, plan, _ = quantize(model, {"x": x}, QuantConfig(reduce_range=True))
    reasons = {s.node: s.reason for s in plan.skipped}
    assert "input channel" in reasons["stem"]
    assert "stem_act" in reasons  # its input is float: onnxruntime fuses it into the float Conv
    assert "conv2" in dict(plan.quantized_nodes)
    assert sqnr(run(model, {"x": x})[0], run(quantized, {"x": x})[0]) > 25
    # the same Conv on a known small image (16x16) is quantized
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 16
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 16
    _, plan, _ = quantize(model, {"x": x}, QuantConfig(reduce_range=True))
    assert "stem" in dict(plan.quantized_nodes)


@pytest.mark.parametrize(
    ("shape", "folds"),
    [((1, 4, 1, 1), True), ((4, 1, 1), True), ((1,), True), ((4,), False), ((1, 4, 4, 1), False)],
)
def test_per_channel_bias_add_folds_into_conv(shape: tuple[int, ...], folds: bool) -> None:
    """Conv -> Add(constant) becomes the Conv's bias only when the constant is per channel."""
    from quantcli.passes.preprocess import preprocess

    rng = np.random.default_rng(0)
    add_value = rng.normal(size=shape).astype(np.float32)
    inits = [_init("w", rng.normal(size=(4, 3, 3, 3))), _init("b", rng.normal(size=4)), _init("a", add_value)]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "a"], ["y"], name="bias_add"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])],
        inits,
    )
    x = structured_images(4, seed=6, size=4)
    prepared, report = preprocess(model)
    assert report.folded_affines == int(folds)
    assert [n.op_type for n in prepared.graph.node] == (["Conv"] if folds else ["Conv", "Add"])
    np.testing.assert_allclose(run(prepared, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_scalar_division_read_by_a_float_conv_stays_a_float_division() -> None:
    """A float Conv must read the float quotient: the Div is then not folded into a scale."""
    rng = np.random.default_rng(1)
    inits = [
        _init("w1", rng.normal(size=(8, 8, 1, 1)) * 0.3),
        _init("w2", rng.normal(size=(8, 8, 1, 1)) * 0.3),
        _init("six", np.array(6.0)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Div", ["c1", "six"], ["d"], name="div"),
        helper.make_node("Mul", ["d", "six"], ["m"], name="mul"),
        helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        inits,
    )
    x = structured_images(8, seed=7, channels=8, size=8)
    quantized, plan, _ = quantize(model, {"x": x}, QuantConfig(reduce_range=True, exclude_nodes=("conv2",)))
    assert [r.node for r in plan.rescaled] == ["div"]  # conv2 reads the Mul's output, not the Div's
    onnx.checker.check_model(quantized)
    assert sqnr(run(model, {"x": x})[0], run(quantized, {"x": x})[0]) > 25
