"""Tiny models built in code, one per pattern quantcli must handle.

These exercise graph patterns and numerics. Claims about accuracy are made only on the trained
models in ``sample_models/``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def make_model(nodes, inputs, outputs, inits, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def structured_images(n: int, *, seed: int, channels: int = 3, size: int = 16) -> np.ndarray:
    """Smooth gradients plus strokes: activations with realistic, non-Gaussian ranges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, channels, size, size), dtype=np.float32)
    for i in range(n):
        for c in range(channels):
            a, b, ph = rng.uniform(-2, 2, 3)
            img = np.sin(a * 3 * xx + b * 3 * yy + ph)
            r = rng.integers(0, size)
            img[r, :] += rng.uniform(1, 2)
            out[i, c] = img
    return out


def small_cnn(seed: int = 0, channels: int = 16, *, dynamic_spatial: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        _init("w1", rng.normal(size=(c, 3, 3, 3)) * 0.4), _init("b1", rng.normal(size=c) * 0.1),
        _init("gamma", rng.uniform(0.5, 1.5, c)), _init("beta", rng.normal(size=c) * 0.1),
        _init("mean", rng.normal(size=c) * 0.1), _init("var", rng.uniform(0.5, 1.5, c)),
        _init("w2", rng.normal(size=(c, c, 3, 3)) * 0.15), _init("b2", rng.normal(size=c) * 0.1),
        _init("wf", rng.normal(size=(10, c)) * 0.5), _init("bf", rng.normal(size=10) * 0.1),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["mp"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["mp"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["fl"], name="flatten"),
        helper.make_node("Gemm", ["fl", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info(
                "x", TensorProto.FLOAT, ["N", 3, "H", "W"] if dynamic_spatial else ["N", 3, 16, 16]
            )
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )


def matmul_chain(seed: int = 0, d: int = 32) -> onnx.ModelProto:
    """x @ W1 + b -> Relu -> @ W2, with rank-3 activations (transformer-style MatMul)."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.normal(size=(d, d)) * 0.2), _init("b", rng.normal(size=d) * 0.1),
             _init("w2", rng.normal(size=(d, 8)) * 0.2)]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b"], ["h"], name="bias"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8])],
        inits,
    )


def attention_matmul(seed: int = 0, d: int = 16) -> onnx.ModelProto:
    """MatMul of two activations (q @ k^T) after a shared projection."""
    rng = np.random.default_rng(seed)
    inits = [_init("wq", rng.normal(size=(d, d)) * 0.3), _init("wk", rng.normal(size=(d, d)) * 0.3)]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["y"], name="scores"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 6])],
        inits,
    )


def float_only(seed: int = 0) -> onnx.ModelProto:
    """LayerNormalization between two MatMuls: the LN must stay float."""
    rng = np.random.default_rng(seed)
    d = 16
    inits = [_init("w1", rng.normal(size=(d, d)) * 0.3), _init("w2", rng.normal(size=(d, d)) * 0.3),
             _init("g", np.ones(d)), _init("bb", np.zeros(d))]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm1"),
        helper.make_node("LayerNormalization", ["m", "g", "bb"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "w2"], ["y"], name="mm2"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, d])],
        inits,
    )


def sensitive_mlp(seed: int = 0, d: int = 32) -> onnx.ModelProto:
    """Three MatMuls where only the middle one cannot be quantized well.

    Hidden unit ``k`` is dead (its pre-activation is always negative for non-negative inputs), and
    the middle weight's row ``k`` is 500x larger than the rest: FP32 never sees it, but it sets the
    int8 weight scale of ``mm2`` so that every other weight of that layer rounds to zero.
    """
    rng = np.random.default_rng(seed)
    k = 3
    w1 = rng.normal(size=(d, d)) * 0.3
    w1[:, k] = -np.abs(w1[:, k])
    b1 = rng.normal(size=d) * 0.1
    b1[k] = -1.0
    w2 = rng.normal(size=(d, d)) * 0.3
    w2[k, :] *= 500.0
    inits = [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", rng.normal(size=d) * 0.1),
             _init("w3", rng.normal(size=(d, 10)) * 0.3)]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["h2"], name="add2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )


def noisy_chain(layers: int = 8, d: int = 48, seed: int = 0) -> onnx.ModelProto:
    """``layers`` MatMuls by random orthogonal matrices in a row: every layer keeps the signal's power and
    adds its own 8-bit rounding, so the error grows with the number of layers quantized and no single
    layer returned to float repairs it (the accuracy search's region stage)."""
    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        inits.append(_init(f"w{i}", q))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"mm{i}"))
        prev = out
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])],
        inits,
    )
