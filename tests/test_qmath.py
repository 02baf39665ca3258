"""Quantization arithmetic against the ONNX reference implementation and its basic invariants."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from quantcli.core.options import QuantDType
from quantcli.core.qmath import (
    dequantize,
    dtype_bounds,
    params_from_range,
    quantize,
    quantize_bias,
    quantize_weight,
)


def _reference_qdq(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None):
    attrs = {"axis": axis} if axis is not None else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
    ]
    ztype = helper.np_dtype_to_tensor_dtype(zp.dtype)
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q", ztype, list(x.shape)),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return ReferenceEvaluator(model).run(None, {"x": x})


@pytest.mark.parametrize("dtype", [QuantDType.UINT8, QuantDType.INT8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_tensor_matches_onnx_reference(rng, dtype, symmetric):
    x = (rng.normal(size=(4, 37)) * 3).astype(np.float32)
    # values exactly half-way between grid points, and values far outside the range (saturation)
    params = params_from_range(-2.0, 5.0, dtype, symmetric=symmetric)
    x[0, :4] = (np.array([0.5, 1.5, 2.5, -0.5], dtype=np.float32) * params.scale).astype(np.float32)
    x[1, :2] = [1e4, -1e4]
    q_ref, y_ref = _reference_qdq(x, params.scale, params.zero_point, None)
    q = quantize(x, params)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(dequantize(q, params), y_ref)


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_weight_matches_onnx_reference(rng, axis):
    w = (rng.normal(size=(6, 5, 3)) * rng.uniform(0.01, 3, size=(6, 1, 1))).astype(np.float32)
    qt = quantize_weight(w, QuantDType.INT8, axis=axis)
    q_ref, y_ref = _reference_qdq(w, qt.params.scale, qt.params.zero_point, axis)
    np.testing.assert_array_equal(qt.values, q_ref)
    np.testing.assert_array_equal(dequantize(qt.values, qt.params), y_ref)
    assert np.all(qt.params.zero_point == 0)
    assert qt.values.min() >= -127  # symmetric grid: -128 is never used


def test_error_within_half_a_step_inside_range(rng):
    x = rng.uniform(-3, 7, size=10_000).astype(np.float32)
    params = params_from_range(-3.0, 7.0, QuantDType.UINT8)
    err = np.abs(dequantize(quantize(x, params), params) - x)
    assert err.max() <= params.scale / 2 * (1 + 1e-5)


def test_zero_is_exact_and_zero_point_in_range():
    for lo, hi in [(-1.0, 3.0), (0.5, 4.0), (-7.0, -2.0), (-1e-3, 1e3)]:
        for dtype in (QuantDType.UINT8, QuantDType.INT8):
            params = params_from_range(lo, hi, dtype)
            qmin, qmax = dtype_bounds(dtype)
            assert qmin <= int(params.zero_point) <= qmax
            assert dequantize(quantize(np.float32(0.0), params), params) == 0.0


def test_degenerate_range_gives_finite_params():
    params = params_from_range(0.0, 0.0, QuantDType.UINT8)
    assert np.isfinite(params.scale) and params.scale > 0
    assert dequantize(quantize(np.zeros(3, np.float32), params), params).tolist() == [0.0, 0.0, 0.0]
    qt = quantize_weight(np.zeros((4, 3), np.float32), QuantDType.INT8, axis=0)
    assert np.all(np.isfinite(qt.params.scale)) and np.all(qt.values == 0)


def test_per_channel_on_identical_channels_equals_per_tensor(rng):
    row = rng.normal(size=(1, 9)).astype(np.float32)
    w = np.repeat(row, 4, axis=0)
    per_channel = quantize_weight(w, QuantDType.INT8, axis=0)
    per_tensor = quantize_weight(w, QuantDType.INT8, axis=None)
    np.testing.assert_array_equal(per_channel.values, per_tensor.values)
    np.testing.assert_allclose(per_channel.params.scale, per_tensor.params.scale)


def test_reduce_range_uses_seven_bits(rng):
    w = rng.normal(size=(3, 50)).astype(np.float32)
    qt = quantize_weight(w, QuantDType.INT8, axis=0, reduce_range=True)
    assert qt.values.min() >= -63 and qt.values.max() <= 63
    assert np.abs(qt.values).max() == 63


def test_bias_scale_is_input_times_weight_scale(rng):
    b = rng.normal(size=5).astype(np.float32)
    wscale = rng.uniform(0.01, 0.1, size=5).astype(np.float32)
    qb = quantize_bias(b, 0.02, wscale)
    assert qb.values.dtype == np.int32
    np.testing.assert_allclose(qb.params.scale, np.float32(0.02) * wscale)
    np.testing.assert_allclose(qb.values * qb.params.scale, b, atol=float(qb.params.scale.max()))


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("dtype", [QuantDType.INT8, QuantDType.UINT8])
def test_quantize_in_blocks_gives_the_same_values(rng, monkeypatch, axis, dtype):
    """A large weight is quantized a block of rows at a time: the same integers as in one go."""
    import quantcli.core.qmath as qmath

    w = rng.standard_normal((37, 23)).astype(np.float32) * 3
    symmetric = dtype == QuantDType.INT8
    if axis is None:
        params = params_from_range(float(w.min()), float(w.max()), dtype, symmetric=symmetric)
    else:
        params = params_from_range(w.min(axis=1 - axis), w.max(axis=1 - axis), dtype, symmetric=symmetric, axis=axis)
    whole = quantize(w, params)
    monkeypatch.setattr(qmath, "_QUANTIZE_BLOCK", 50)  # 2 rows per block, and a last short one
    blocked = quantize(w, params)
    assert blocked.dtype == whole.dtype and blocked.shape == w.shape
    np.testing.assert_array_equal(blocked, whole)
    assert len(np.unique(whole)) > 10  # a real spread of values, not all clipped


def test_quantizing_a_large_weight_keeps_no_float64_copy_of_it(rng, monkeypatch):
    """The float temporaries of quantizing a weight stay one block's (they were ~5x the weight: float32
    quotient, float64 rounding, its clipped copy), so a > 2 GB model's largest weight fits beside it."""
    import tracemalloc

    import quantcli.core.qmath as qmath

    monkeypatch.setattr(qmath, "_QUANTIZE_BLOCK", 1 << 18)  # 2 MiB float64 blocks for a 16 MiB weight
    w = rng.standard_normal((2048, 2048)).astype(np.float32)
    tracemalloc.start()
    try:
        q = quantize_weight(w, QuantDType.INT8, axis=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert q.values.dtype == np.int8 and q.values.shape == w.shape
    assert peak < w.nbytes  # measured: 0.52x (the int8 result and one block); 4.25x in one go
