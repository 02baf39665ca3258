"""Pure quantization arithmetic: ranges to scales and zero points, quantize and dequantize.

The formulas are the ONNX ones (QuantizeLinear / DequantizeLinear):

    q = saturate(round_half_to_even(x / scale) + zero_point)
    x' = (q - zero_point) * scale

Asymmetric parameters for a range [rmin, rmax] (always widened to contain 0 so that 0.0 is exact):

    scale = (rmax - rmin) / (qmax - qmin)        zero_point = round(qmin - rmin / scale)

Symmetric parameters use absmax = max(|rmin|, |rmax|) and put the zero point in the middle of
the type; signed types use the restricted range [-(2^(b-1) - 1), 2^(b-1) - 1] so that the grid is
symmetric around zero (what onnxruntime's integer kernels expect of weights).

Bias of Conv/Gemm is int32 with scale = input_scale * weight_scale and zero point 0.

MSE weight clipping (``clip_ratios_mse``): for each channel c with absmax a_c, try clip ratios r on
a grid (0.5 .. 1.0, 50 steps, 1.0 included), scale = r * a_c / qmax, and keep the r with the least

    mse_c(r) = mean_k (dequantize(quantize(w_ck)) - w_ck)^2

so heavy-tailed channels trade a little clipping error on the outliers for finer steps on the bulk.
The grid contains r = 1 (abs-max), so the chosen scale is never worse than abs-max on weight MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from quantcli.core.options import QuantDType

__all__ = [
    "QuantParams",
    "QuantizedTensor",
    "clip_ratios_mse",
    "dequantize",
    "dtype_bounds",
    "numpy_dtype",
    "params_from_range",
    "quantize",
    "quantize_bias",
    "quantize_weight",
]

FloatArray = npt.NDArray[np.float32]

_NUMPY_DTYPES: dict[QuantDType, type[np.integer]] = {
    QuantDType.UINT8: np.uint8,
    QuantDType.INT8: np.int8,
    QuantDType.UINT16: np.uint16,
    QuantDType.INT16: np.int16,
    QuantDType.INT4: np.int8,
    QuantDType.UINT4: np.uint8,
    QuantDType.INT32: np.int32,
}

_BITS: dict[QuantDType, int] = {
    QuantDType.UINT8: 8,
    QuantDType.INT8: 8,
    QuantDType.UINT16: 16,
    QuantDType.INT16: 16,
    QuantDType.INT4: 4,
    QuantDType.UINT4: 4,
    QuantDType.INT32: 32,
}

_SIGNED = {QuantDType.INT8, QuantDType.INT16, QuantDType.INT4, QuantDType.INT32}

#: Smallest scale we emit; below it float32 division overflows and bias quantization explodes.
MIN_SCALE = np.float32(1e-12)


@dataclass(frozen=True, slots=True)
class QuantParams:
    """Scale and zero point of one tensor: scalars, or 1-D arrays along ``axis``."""

    scale: FloatArray
    zero_point: npt.NDArray[np.integer]
    dtype: QuantDType
    axis: int | None = None


@dataclass(frozen=True, slots=True)
class QuantizedTensor:
    """Integer values plus the parameters that map them back to float."""

    values: npt.NDArray[np.integer]
    params: QuantParams


def numpy_dtype(dtype: QuantDType) -> type[np.integer]:
    """The numpy storage type of a quantized type (4-bit types are stored one per byte)."""
    return _NUMPY_DTYPES[dtype]


def dtype_bounds(dtype: QuantDType, *, symmetric: bool = False, reduce_range: bool = False) -> tuple[int, int]:
    """Smallest and largest integer used for ``dtype``.

    Args:
        dtype: the integer type.
        symmetric: for signed types, drop the most negative value so the grid is symmetric.
        reduce_range: use one bit less (7-bit for 8-bit types).
    """
    bits = _BITS[dtype] - (1 if reduce_range else 0)
    if dtype in _SIGNED:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if symmetric:
            qmin = -qmax
    else:
        qmin, qmax = 0, 2**bits - 1
    return qmin, qmax


def params_from_range(
    rmin: npt.ArrayLike,
    rmax: npt.ArrayLike,
    dtype: QuantDType,
    *,
    symmetric: bool = False,
    reduce_range: bool = False,
    axis: int | None = None,
) -> QuantParams:
    """Scale and zero point that cover [rmin, rmax] (scalars, or arrays for per-axis ranges).

    The range is widened to include 0. A degenerate range (rmin == rmax == 0) gets scale 1 so
    that no NaN or infinity can appear.
    """
    lo = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("quantization range must be finite")
    qmin, qmax = dtype_bounds(dtype, symmetric=symmetric, reduce_range=reduce_range)
    if symmetric:
        absmax = np.maximum(-lo, hi)
        if dtype in _SIGNED:
            scale = absmax / qmax
            zero_point = np.zeros_like(absmax)
        else:
            scale = 2.0 * absmax / (qmax - qmin)
            zero_point = np.full_like(absmax, (qmin + qmax + 1) // 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_point = np.where(scale > 0, np.rint(qmin - lo / np.where(scale > 0, scale, 1.0)), 0.0)
        zero_point = np.clip(zero_point, qmin, qmax)
    degenerate = scale <= 0
    scale = np.where(degenerate, 1.0, np.maximum(scale, float(MIN_SCALE)))
    if not symmetric:
        zero_point = np.where(degenerate, 0 if dtype in _SIGNED else qmin, zero_point)
    shape = np.broadcast(lo, hi).shape
    return QuantParams(
        scale=np.asarray(scale, dtype=np.float32).reshape(shape),
        zero_point=np.asarray(zero_point).astype(numpy_dtype(dtype)).reshape(shape),
        dtype=dtype,
        axis=axis,
    )


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis] = param.shape[0]
    return param.reshape(shape)


#: ``quantize`` works on blocks of about this many elements (its float64 temporaries are 8 bytes each)
_QUANTIZE_BLOCK = 1 << 22


def quantize(x: npt.ArrayLike, params: QuantParams) -> npt.NDArray[np.integer]:
    """QuantizeLinear: round half to even, add the zero point, saturate to the type's range.

    A large array is quantized in blocks of rows (the same values: every step is elementwise), so
    the float temporaries stay ~64 MiB instead of five times the array (a > 2 GB model's weight).
    """
    arr = np.asarray(x, dtype=np.float32)
    scale = _broadcast(params.scale, arr.ndim, params.axis)
    zp = _broadcast(params.zero_point.astype(np.int64), arr.ndim, params.axis)
    qmin, qmax = dtype_bounds(params.dtype)
    dtype = numpy_dtype(params.dtype)
    if arr.ndim == 0 or arr.size <= _QUANTIZE_BLOCK:
        return _quantize_block(arr, scale, zp, qmin, qmax, dtype)
    out = np.empty(arr.shape, dtype=dtype)
    rows = max(1, _QUANTIZE_BLOCK // max(1, arr.size // arr.shape[0]))
    for start in range(0, arr.shape[0], rows):
        block = slice(start, start + rows)
        s, z = (p[block] if p.ndim == arr.ndim and p.shape[0] > 1 else p for p in (scale, zp))
        out[block] = _quantize_block(arr[block], s, z, qmin, qmax, dtype)
    return out


def _quantize_block(
    arr: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int, dtype: type[np.integer]
) -> npt.NDArray[np.integer]:
    q = np.rint(arr / scale).astype(np.float64) + zp
    return np.clip(q, qmin, qmax).astype(dtype)


def dequantize(q: npt.ArrayLike, params: QuantParams) -> FloatArray:
    """DequantizeLinear: (q - zero_point) * scale, in float32."""
    arr = np.asarray(q)
    scale = _broadcast(params.scale, arr.ndim, params.axis)
    zp = _broadcast(params.zero_point.astype(np.int32), arr.ndim, params.axis)
    return ((arr.astype(np.int32) - zp).astype(np.float32) * scale).astype(np.float32)


def clip_ratios_mse(
    channels: npt.ArrayLike,
    dtype: QuantDType,
    *,
    reduce_range: bool = False,
    low: float = 0.5,
    steps: int = 50,
) -> npt.NDArray[np.float64]:
    """Per row of ``channels`` (shape [C, K]), the symmetric clip ratio of least quantization MSE."""
    w = np.asarray(channels, dtype=np.float32)
    _, qmax = dtype_bounds(dtype, symmetric=True, reduce_range=reduce_range)
    absmax = np.abs(w).max(axis=1).astype(np.float64) if w.size else np.zeros(w.shape[0])
    best_ratio = np.ones(w.shape[0])
    best_err = np.full(w.shape[0], np.inf)
    for ratio in np.linspace(1.0, low, steps):  # 1.0 first: ties keep abs-max
        scale = np.maximum(absmax * ratio / qmax, float(MIN_SCALE)).astype(np.float32)[:, None]
        err = ((np.clip(np.rint(w / scale), -qmax, qmax) * scale - w) ** 2).mean(axis=1, dtype=np.float64)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_ratio = np.where(better, ratio, best_ratio)
    return best_ratio


def quantize_weight(
    weight: npt.ArrayLike,
    dtype: QuantDType,
    *,
    axis: int | None,
    reduce_range: bool = False,
    mse_clip: bool = False,
) -> QuantizedTensor:
    """Symmetric weight quantization, per channel along ``axis`` or per tensor when ``axis`` is None.

    With ``mse_clip`` each channel's range is abs-max times the ratio from ``clip_ratios_mse``.
    """
    w = np.asarray(weight, dtype=np.float32)
    if axis is None:
        rmin, rmax = (float(w.min()), float(w.max())) if w.size else (0.0, 0.0)
        if mse_clip and w.size:
            ratio = float(clip_ratios_mse(w.reshape(1, -1), dtype, reduce_range=reduce_range)[0])
            rmin, rmax = rmin * ratio, rmax * ratio
    else:
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        rmin, rmax = moved.min(axis=1), moved.max(axis=1)
        if mse_clip and w.size:
            ratio_c = clip_ratios_mse(moved, dtype, reduce_range=reduce_range)
            rmin, rmax = rmin * ratio_c, rmax * ratio_c
    params = params_from_range(rmin, rmax, dtype, symmetric=True, reduce_range=reduce_range, axis=axis)
    return QuantizedTensor(values=quantize(w, params), params=params)


def quantize_bias(bias: npt.ArrayLike, input_scale: float, weight_scale: npt.ArrayLike) -> QuantizedTensor:
    """int32 bias with scale input_scale * weight_scale (per channel when weight_scale is 1-D)."""
    b = np.asarray(bias, dtype=np.float32)
    wscale = np.asarray(weight_scale, dtype=np.float32)
    scale = (np.float32(input_scale) * wscale).astype(np.float32)
    axis = 0 if scale.ndim == 1 else None
    q = np.rint(b.astype(np.float64) / np.broadcast_to(scale, b.shape).astype(np.float64))
    info = np.iinfo(np.int32)
    values = np.clip(q, info.min, info.max).astype(np.int32)
    params = QuantParams(
        scale=scale, zero_point=np.zeros(scale.shape, dtype=np.int32), dtype=QuantDType.INT32, axis=axis
    )
    return QuantizedTensor(values=values, params=params)
