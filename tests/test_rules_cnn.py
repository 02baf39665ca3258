"""CNN-classifier causes found on real models (issue 15 item 4), each as a tiny graph: the failure and the fix.

* ``variance-square``: a decomposed LayerNorm's ``Mul(x, x) -> ReduceSum`` (magika v3.3's two LayerNorms);
* ``gelu-tanh-cubic``: the polynomial ``x + 0.044715 x³`` under a tanh-approximated GELU (magika's GELUs).

Each test checks the plan's reason code and that the rule recovers fidelity the default lost
(the SQNR of the model with the rule disabled is the failure the rule repairs).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantcli.core.options import QuantConfig
from quantcli.static.plan import SkipCode
from tests.helpers import held_out_fidelity
from tests.models import make_model

D = 64


def _init(name: str, value: np.ndarray | float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _rows(n: int, seed: int) -> np.ndarray:
    """Rows whose scales differ by 25x (magika's positions: padding to dense bytes)."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(np.log(0.2), np.log(5.0), size=(n, 4, 1)))
    return (rng.normal(size=(n, 4, D)) * scale).astype(np.float32)


def layernorm_model(seed: int = 0) -> onnx.ModelProto:
    """Dense -> LayerNorm written as jax2tf writes it (E[x²] - E[x]² from ReduceSum) -> Dense."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w1", rng.normal(size=(D, D)) * 0.2), _init("b1", rng.normal(size=D) * 0.01),
        _init("w2", rng.normal(size=(D, 8)) * 0.3), _init("inv_d", 1.0 / D), _init("eps", 1e-6), _init("zero", 0.0),
        _init("gamma", 1.0 + rng.normal(size=D) * 0.1), _init("beta", rng.normal(size=D) * 0.1),
        numpy_helper.from_array(np.array([-1], np.int64), "axis"),
    ]  # fmt: skip
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "w1"], ["mm"], name="dense1"),
        n("Add", ["mm", "b1"], ["h"], name="bias1"),
        n("ReduceSum", ["h", "axis"], ["s1"], name="sum", keepdims=1),
        n("Mul", ["h", "h"], ["sq"], name="square"),
        n("ReduceSum", ["sq", "axis"], ["s2"], name="sum_sq", keepdims=1),
        n("Mul", ["s1", "inv_d"], ["mean"], name="mean"),
        n("Mul", ["s2", "inv_d"], ["mean_sq"], name="mean_sq"),
        n("Mul", ["mean", "mean"], ["mean2"], name="mean2"),
        n("Sub", ["mean_sq", "mean2"], ["var"], name="var"),
        n("Max", ["var", "zero"], ["var_pos"], name="var_pos"),
        n("Add", ["var_pos", "eps"], ["var_eps"], name="var_eps"),
        n("Sqrt", ["var_eps"], ["std"], name="std"),
        n("Reciprocal", ["std"], ["inv_std"], name="inv_std"),
        n("Sub", ["h", "mean"], ["centred"], name="centre"),
        n("Mul", ["centred", "inv_std"], ["normed"], name="normalise"),
        n("Mul", ["normed", "gamma"], ["scaled"], name="gamma"),
        n("Add", ["scaled", "beta"], ["ln"], name="beta"),
        n("MatMul", ["ln", "w2"], ["y"], name="dense2"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8])],
        inits,
    )


def gelu_model(seed: int = 0) -> onnx.ModelProto:
    """Dense -> tanh-GELU as jax2tf writes it (x * 0.5 * (1 + tanh(c * (x + 0.044715 x³)))) -> Dense.

    Two of the dense layer's channels are wide (|x| up to ~20), the rest near 0, as in magika's first GELU.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(D, D)) * 0.1
    w1[:, :2] *= 15.0
    inits = [
        _init("w1", w1), _init("w2", rng.normal(size=(D, 8)) * 0.3),
        _init("k", 0.044715), _init("c", 0.7978846), _init("one", 1.0), _init("half", 0.5),
    ]  # fmt: skip
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "w1"], ["h"], name="dense1"),
        n("Mul", ["k", "h"], ["kx"], name="cube_k"),
        n("Mul", ["h", "kx"], ["kx2"], name="cube_x2"),
        n("Mul", ["h", "kx2"], ["kx3"], name="cube_x3"),
        n("Add", ["h", "kx3"], ["inner"], name="inner"),
        n("Mul", ["c", "inner"], ["arg"], name="scale_c"),
        n("Tanh", ["arg"], ["t"], name="tanh"),
        n("Add", ["one", "t"], ["t1"], name="plus_one"),
        n("Mul", ["half", "t1"], ["gate"], name="half"),
        n("Mul", ["h", "gate"], ["g"], name="gelu"),
        n("MatMul", ["g", "w2"], ["y"], name="dense2"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8])],
        inits,
    )


def _fidelity(model: onnx.ModelProto, config: QuantConfig) -> tuple[float, dict[str, SkipCode]]:
    return held_out_fidelity(model, config, _rows(64, seed=1), _rows(32, seed=2))


def test_variance_square_stays_float() -> None:
    model = layernorm_model()
    fixed, skips = _fidelity(model, QuantConfig())
    broken, broken_skips = _fidelity(model, QuantConfig(disabled_rules=frozenset({"variance-square"})))
    assert skips["square"] == SkipCode.VARIANCE_SQUARE
    assert "square" not in broken_skips  # the old plan quantized the square
    assert fixed > 15 and fixed > broken + 10, (fixed, broken)


def test_variance_square_only_for_reduced_squares() -> None:
    """A square read by no reduction (x * x as a feature) is still quantized."""
    model = gelu_model()  # its Muls square nothing summed
    _, skips = _fidelity(layernorm_model(), QuantConfig())
    assert [k for k, c in skips.items() if c == SkipCode.VARIANCE_SQUARE] == ["square"]
    _, gelu_skips = _fidelity(model, QuantConfig())
    assert SkipCode.VARIANCE_SQUARE not in gelu_skips.values()


def test_gelu_tanh_cubic_stays_float() -> None:
    model = gelu_model()
    fixed, skips = _fidelity(model, QuantConfig())
    broken, broken_skips = _fidelity(model, QuantConfig(disabled_rules=frozenset({"gelu-tanh-cubic"})))
    cubic = {"cube_k", "cube_x2", "cube_x3", "inner", "scale_c"}
    assert {k for k, c in skips.items() if c == SkipCode.GELU_TANH_CUBIC} == cubic
    assert not cubic & set(broken_skips)  # the old plan quantized the cubic
    assert fixed > 18 and fixed > broken + 6, (fixed, broken)
