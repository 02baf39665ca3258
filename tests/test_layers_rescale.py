"""``compare --per-layer`` on a tensor whose /6 was folded into the scale it is read on (a HardSwish's tail)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantcli.compare.layers import per_layer_errors
from quantcli.core.host import default_config
from tests.helpers import dataset, quantize
from tests.models import make_model, structured_images


def hardswish_tail() -> onnx.ModelProto:
    """Conv -> Mul(c, c) -> Div by 6 -> Conv: the Div folds into the scale the second Conv reads the Mul on."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.normal(size=(16, 8, 1, 1)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
        numpy_helper.from_array((rng.normal(size=(8, 16, 1, 1)) * 0.3).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
        helper.make_node("Mul", ["c", "c"], ["m"], name="mul"),
        helper.make_node("Div", ["m", "six"], ["d"], name="div"),
        helper.make_node("Conv", ["d", "w2"], ["y"], name="conv2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])
    return make_model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])], inits)


def test_folded_rescale_is_compared_on_its_own_grid() -> None:
    model = hardswish_tail()
    arrays = {"x": structured_images(32, seed=1, channels=8)}
    quantized, plan, _ = quantize(model, arrays, default_config())  # the host's choices
    assert any(r.node == "div" for r in plan.rescaled)  # the /6 is folded: the Mul is read on a grid 6x finer
    layers = {e.tensor: e for e in per_layer_errors(model, quantized, dataset(model, arrays), batch_size=8)}
    mul = layers["m"]
    # read on the /6 grid, FP32's m compared with m/6 gave 20*log10(6/5) = 1.6 dB, accumulated and local
    assert mul.sqnr_db > 25 and mul.local_sqnr_db is not None and mul.local_sqnr_db > 25, mul
    # the model compared is a copy: the one given keeps its nodes
    assert not any(n.name.endswith("_own_grid") for n in quantized.graph.node)


def learnable_hardswish() -> onnx.ModelProto:
    """PP-OCRv4's learnable HardSwish: Conv -> c * clip(c + 3, 0, 6) / 6 * w + b -> Conv (w, b scalars)."""
    rng = np.random.default_rng(1)
    scalars = {"three": 3.0, "zero": 0.0, "six_max": 6.0, "six": 6.0, "w": 0.8, "b": 0.1}
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scalars.items()]
    inits += [
        numpy_helper.from_array((rng.normal(size=(16, 8, 1, 1)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.normal(size=(8, 16, 1, 1)) * 0.3).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
        helper.make_node("Add", ["c", "three"], ["a"], name="add3"),
        helper.make_node("Clip", ["a", "zero", "six_max"], ["cl"], name="clip"),
        helper.make_node("Mul", ["c", "cl"], ["m"], name="mul"),
        helper.make_node("Div", ["m", "six"], ["d"], name="div"),
        helper.make_node("Mul", ["w", "d"], ["e"], name="scale"),
        helper.make_node("Add", ["e", "b"], ["f"], name="shift"),
        helper.make_node("Conv", ["f", "w2"], ["y"], name="conv2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])
    return make_model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])], inits)


def test_a_folded_rescale_leaves_no_unread_initializers() -> None:
    """The DequantizeLinear a folded /6 no longer needs goes with its scale and zero point (onnxruntime
    warned once per orphan on every load of PP-OCRv4 det: 48 of them)."""
    for model in (hardswish_tail(), learnable_hardswish()):
        quantized, plan, _ = quantize(model, {"x": structured_images(16, seed=2, channels=8)}, default_config())
        assert plan.rescaled
        read = {i for n in quantized.graph.node for i in n.input}
        assert [t.name for t in quantized.graph.initializer if t.name not in read] == []
