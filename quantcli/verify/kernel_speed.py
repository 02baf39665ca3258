"""How fast an integer kernel runs against its float twin on this CPU, measured once per host and cached.

Planning rules that depend on kernel speed (an image stem kept float, ...) ask a ``SpeedOracle``
(``quantcli.core.host``). ``MeasuredSpeedOracle`` answers by building two tiny models of the kernel
shape, its float form and its QDQ integer form as convert writes it, and timing them in
alternation with onnxruntime on this CPU at batch 1 (a few ms each, the median of a few rounds):

    ratio = t_float / t_int8        (above 1: the integer kernel is faster)

The two forms read and write the same tensors, so the ratio is the cost of the choice a rule makes:

* stem Conv, depthwise Conv, static MatMul (float in, uint8 out):
  ``Conv/MatMul -> QuantizeLinear``  vs  ``QuantizeLinear -> QLinearConv/QLinearMatMul``
* dynamic MatMul (float in and out): ``MatMul``  vs  ``DynamicQuantizeMatMul``
* pool island (MaxPool, AveragePool, GlobalAveragePool; uint8 in and out): ``DQ -> Relu -> Pool -> Q``
  vs ``DQ -> Pool -> Q`` (onnxruntime's uint8 MaxPool, QLinearAveragePool, QLinearGlobalAveragePool); the
  Relu stands for the producer that stays float with the pool (onnxruntime moves a DequantizeLinear
  before a MaxPool past it, and a QuantizeLinear after it before it, and runs it on uint8 anyway: a
  float MaxPool needs float neighbours, a second Relu after it). Profiled here (AMD EPYC,
  AVX512-VNNI, 1 thread) the PP-OCR direction classifier's uint8 MaxPool took 118 us, 14 us float
* depthwise island (uint8 in and out, between two integer 1x1 Convs): ``DQ -> Relu -> Conv -> Relu -> Q``
  vs ``QLinearConv``: what keeping one depthwise Conv float costs inside an integer network, with its
  transitions and the layout transposes onnxruntime adds around a float Conv among NHWC QLinearConvs
  (measured here: the bare depthwise kernel 0.49-1.06x float, its island 1.10-1.48x in favour of
  integer, so a kernel ratio alone would have kept it float and made the model slower)

For a stem this is exactly the choice (its input is the float model input). Inside a network a
float node also costs the DequantizeLinear of its input; both forms here pay one QuantizeLinear (on
the output, or on the input: the same size for a depthwise Conv or a square MatMul), so the ratio
compares the kernels. The float form reads a float tensor, never a DequantizeLinear: onnxruntime
would quantize a float Conv/MatMul behind one by itself (as quantcli's lowering knows).

Conv and pool shapes are measured as they are: exact channels, kernel, strides (both: PP-OCR's
``(2, 1)``) and image sides (an unknown side at 224). Rounding them misled: on the PP-OCR direction
classifier a 5x5 depthwise island over 88 channels at 3x96 measured 0.76x float, its power-of-two
bucket (128 channels) 1.03x; 40 channels 0.72x against 0.98x for 64 (onnxruntime's integer depthwise
kernel is fastest on channel counts it vectorizes whole). A model has few distinct shapes, and the
cache keeps each. MatMul weights are exact too (``k``, ``n``); only the rows ``m`` (a sequence length,
which varies with the input) are rounded up to a power of two.

A figure is the median of rounds (each the median of alternating pairs of runs, on fresh sessions),
stored with the rounds it came from and the load average when they were taken. Its spread is the
middle half of the rounds (25th to 75th percentile); when that spans 1.0 the rounds disagree about
the answer and more are measured, up to ``MAX_ROUNDS``, now and by later processes that read the
uncertain entry from the cache: a round slowed by load gets outvoted instead of kept. The reason
line shows the median and the spread; rules call the integer form slower only when the spread's top
is below their threshold (``KernelSpeed.slower``). Results are cached in
``$XDG_CACHE_HOME/quantcli/kernel_speed.json`` (else ``~/.cache/quantcli/...``), keyed by CPU model,
its integer-relevant flags (AVX2, AVX512-VNNI, AMX), onnxruntime and quantcli versions, threads,
and the shape; written atomically. ``QUANTCLI_NO_SPEED_CACHE=1`` (or ``cache_path=None``) measures
without reading or writing the file. ``QUANTCLI_KERNEL_SPEED=constant`` measures nothing and answers
with ``ConstantSpeedOracle`` (the decisions quantcli took before it measured): the same plan, hence
the same bytes, on every host (the tests set it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from quantcli.compare.evaluate import measure_latency
from quantcli.core.host import (
    ConstantSpeedOracle,
    KernelKind,
    KernelShape,
    KernelSpeed,
    SpeedOracle,
    cpu_model,
    int8_flags,
)
from quantcli.graph.editor import make_node, make_tensor, small_model
from quantcli.graph.session import make_session

__all__ = [
    "CACHE_ENV",
    "FIRST_ROUNDS",
    "MAX_ROUNDS",
    "MODE_ENV",
    "SCHEMA",
    "MeasuredSpeedOracle",
    "bucket",
    "cache_key",
    "default_cache_path",
    "host_oracle",
    "kernel_models",
    "measure_rounds",
    "spread",
    "uncertain",
]

logger = logging.getLogger(__name__)

#: set (to anything but "" or "0") to measure without the cache file
CACHE_ENV = "QUANTCLI_NO_SPEED_CACHE"
#: "constant": no measurement, the constants of ``ConstantSpeedOracle`` (same plan on every host)
MODE_ENV = "QUANTCLI_KERNEL_SPEED"
SCHEMA = "quantcli.kernel_speed/2"
#: rounds a shape is first measured with
FIRST_ROUNDS = 3
#: rounds an uncertain figure may gather (this process and later ones together)
MAX_ROUNDS = 9
#: rounds added at a time to an uncertain figure
_MORE_ROUNDS = 2
#: an image of unknown size is measured at this side
_UNKNOWN_SIDE = 224
_OPSETS = {"": 17, "com.microsoft": 1}


def _pow2(value: int, lo: int, hi: int) -> int:
    """``value`` rounded up to a power of two within [lo, hi]."""
    return int(min(hi, max(lo, 2 ** math.ceil(math.log2(max(value, 1))))))


def bucket(shape: KernelShape) -> KernelShape:
    """The shape measured for ``shape``: itself, but an unknown image side at 224 and MatMul rows ``m``
    rounded up to a power of two (1-256)."""
    if shape.is_conv:
        c_in, c_out, kh, kw, stride, h, w = shape.dims
        sides = (h or _UNKNOWN_SIDE, w or _UNKNOWN_SIDE)
        return KernelShape(shape.kind, (c_in, c_out, kh, kw, stride, *sides), shape.stride_w)
    m, k, n = shape.dims
    return KernelShape(shape.kind, (_pow2(m, 1, 256), k, n))


def cache_key(shape: KernelShape, *, threads: int) -> str:
    """The cache key of ``shape`` as measured (``bucket``) on this host, onnxruntime and quantcli, at ``threads``."""
    from quantcli import __version__

    b = bucket(shape)
    flags = ",".join(int8_flags()) or "-"
    dims = "x".join(str(d) for d in b.dims) + (f"w{b.stride_w}" if b.stride_w else "")
    return f"{cpu_model()}|{flags}|onnxruntime {ort.__version__}|quantcli {__version__}|t{threads}|{b.kind}:{dims}"


# ---- the two models of a kernel -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Builder:
    """Nodes and constants of one tiny model, with fixed quantization parameters (values do not matter)."""

    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    constants: list[onnx.TensorProto] = field(default_factory=list)

    def const(self, name: str, value: np.ndarray) -> str:
        self.constants.append(make_tensor(name, value))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(make_node(op, inputs, [output], name=f"{op}_{len(self.nodes)}", attrs=attrs))
        return output

    def quantize(self, x: str, out: str) -> str:
        s, z = self.const(f"{out}_s", np.float32(0.05)), self.const(f"{out}_z", np.uint8(128))
        return self.node("QuantizeLinear", [x, s, z], out)

    def dequantize(self, xq: str, out: str) -> str:
        s, z = self.const(f"{out}_s", np.float32(0.05)), self.const(f"{out}_z", np.uint8(128))
        return self.node("DequantizeLinear", [xq, s, z], out)

    def weight(self, name: str, w: np.ndarray, *, int8: bool, axis: int | None) -> str:
        """``w`` as a float initializer, or as int8 behind a DequantizeLinear (per ``axis`` when given)."""
        if not int8:
            return self.const(name, w)
        n = w.shape[axis] if axis is not None else 1
        scale = np.full((n,), 0.01, np.float32) if axis is not None else np.float32(0.01)
        zero = np.zeros((n,), np.int8) if axis is not None else np.int8(0)
        q = np.clip(np.round(w / 0.01), -127, 127).astype(np.int8)
        ins = [self.const(f"{name}_q", q), self.const(f"{name}_s", scale), self.const(f"{name}_z", zero)]
        if axis is None:
            return self.node("DequantizeLinear", ins, name)
        return self.node("DequantizeLinear", ins, name, axis=axis)

    def conv_bias(self, name: str, c_out: int, *, int8: bool) -> str:
        b = self.rng.standard_normal(c_out).astype(np.float32) * 0.1
        if not int8:
            return self.const(name, b)
        s = np.full((c_out,), 0.05 * 0.01, np.float32)
        ins = [self.const(f"{name}_q", np.round(b / s).astype(np.int32)), self.const(f"{name}_s", s)]
        ins.append(self.const(f"{name}_z", np.zeros((c_out,), np.int32)))
        return self.node("DequantizeLinear", ins, name, axis=0)


def _conv(b: _Builder, shape: KernelShape, x: str, *, int8: bool) -> str:
    c_in, c_out, kh, kw, _, _, _ = shape.dims
    group = c_in if shape.kind in (KernelKind.DEPTHWISE_CONV, KernelKind.DEPTHWISE_ISLAND) else 1
    w = b.rng.standard_normal((c_out, c_in // group, kh, kw)).astype(np.float32) * 0.1
    ins = [x, b.weight("w", w, int8=int8, axis=0), b.conv_bias("bias", c_out, int8=int8)]
    pads = [kh // 2, kw // 2, (kh - 1) // 2, (kw - 1) // 2]
    return b.node("Conv", ins, "y", group=group, kernel_shape=[kh, kw], pads=pads, strides=list(shape.strides))


def _pointwise(b: _Builder, x: str, c: int, out: str) -> str:
    """An integer 1x1 Conv ``c -> c`` reading the uint8 tensor ``x``, writing the uint8 tensor ``out``."""
    w = b.rng.standard_normal((c, c, 1, 1)).astype(np.float32) * 0.1
    ins = [b.dequantize(x, f"{out}_in"), b.weight(f"{out}_w", w, int8=True, axis=0)]
    ins.append(b.conv_bias(f"{out}_b", c, int8=True))
    return b.quantize(b.node("Conv", ins, f"{out}_f", group=1, kernel_shape=[1, 1]), out)


def _island_form(shape: KernelShape, *, int8: bool) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A depthwise Conv between two integer 1x1 Convs, itself integer or a float island.

    Float island: ``DequantizeLinear -> Relu -> Conv -> Relu -> QuantizeLinear`` (the Relu stands for
    the activation that stays float with it, and keeps onnxruntime from quantizing the float Conv
    behind the DequantizeLinear); integer: ``DQ -> Conv -> Q`` as convert writes it (QLinearConv).
    """
    b = _Builder(np.random.default_rng(0))
    c, _, _, _, _, h, w = shape.dims
    first = _pointwise(b, b.quantize("x", "xq"), c, "p1")
    if int8:
        y = _conv(b, shape, b.dequantize(first, "p1_d"), int8=True)
    else:
        relu = b.node("Relu", [b.dequantize(first, "p1_d")], "p1_r")
        y = b.node("Relu", [_conv(b, shape, relu, int8=False)], "y_r")
    second = _pointwise(b, b.quantize(y, "yq"), c, "p2")
    out = b.node("DequantizeLinear", [second, b.const("o_s", np.float32(0.05)), b.const("o_z", np.uint8(128))], "o")
    return small_model(b.nodes, [("x", np.dtype(np.float32), (1, c, h, w))], [out], b.constants, _OPSETS), (1, c, h, w)


_POOL_OPS = {
    KernelKind.MAX_POOL_ISLAND: "MaxPool",
    KernelKind.AVERAGE_POOL_ISLAND: "AveragePool",
    KernelKind.GLOBAL_POOL_ISLAND: "GlobalAveragePool",
}


def _pool_form(shape: KernelShape, *, int8: bool) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A pool between quantized tensors: its integer kernel, or a float island with a float producer.

    Integer: ``DQ -> Pool -> Q`` (one scale: onnxruntime runs it on uint8); float: ``DQ -> Relu ->
    Pool -> Q`` (the Relu stands for the producer kept float with the pool, see the module docstring),
    a float MaxPool followed by a Relu too (the float reader it needs: onnxruntime moves a
    QuantizeLinear that follows a MaxPool before it).
    """
    b = _Builder(np.random.default_rng(0))
    c, _, kh, kw, _, h, w = shape.dims
    x = b.dequantize(b.quantize("x", "xq"), "xd")
    if not int8:
        x = b.node("Relu", [x], "xr")
    op = _POOL_OPS[shape.kind]
    attrs: dict[str, Any] = {} if kh == 0 else {"kernel_shape": [kh, kw], "strides": list(shape.strides)}
    y = b.node(op, [x], "y", **attrs)
    if not int8 and op == "MaxPool":  # a QuantizeLinear right after a float MaxPool would be moved before it
        y = b.node("Relu", [y], "yr")
    out = b.dequantize(b.quantize(y, "yq"), "o")
    return small_model(b.nodes, [("x", np.dtype(np.float32), (1, c, h, w))], [out], b.constants, _OPSETS), (1, c, h, w)


def _one_form(shape: KernelShape, *, int8: bool) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """The float (``int8=False``) or integer form of ``shape`` and the shape of its float input ``x``."""
    if shape.kind == KernelKind.DEPTHWISE_ISLAND:
        return _island_form(shape, int8=int8)
    if shape.is_pool:
        return _pool_form(shape, int8=int8)
    b = _Builder(np.random.default_rng(0))
    if shape.kind == KernelKind.DYNAMIC_MATMUL:
        m, k, n = shape.dims
        w = b.rng.standard_normal((k, n)).astype(np.float32) * 0.1
        if int8:
            q, s = np.clip(np.round(w / 0.01), -127, 127).astype(np.int8), np.full((n,), 0.01, np.float32)
            b.nodes.append(make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"))
            b.node("MatMulInteger", ["xq", b.const("wq", q), "xz", b.const("wz", np.int8(0))], "acc")
            b.node("Cast", ["acc"], "accf", to=onnx.TensorProto.FLOAT)
            b.node("Mul", ["accf", b.node("Mul", ["xs", b.const("ws", s)], "scale")], "y")
        else:
            b.node("MatMul", ["x", b.const("w", w)], "y")
        return small_model(b.nodes, [("x", np.dtype(np.float32), (1, m, k))], ["y"], b.constants, _OPSETS), (1, m, k)
    d = shape.dims
    in_shape = (1, d[0], d[5], d[6]) if shape.is_conv else (1, d[0], d[1])
    # the float form reads the float tensor itself: a float Conv/MatMul reading a DequantizeLinear would be
    # quantized by onnxruntime's weight/bias quantization pass (as quantcli's lowering knows)
    x = b.dequantize(b.quantize("x", "xq"), "xd") if int8 else "x"
    if shape.is_conv:
        y = _conv(b, shape, x, int8=int8)
    else:
        w = b.rng.standard_normal(d[1:]).astype(np.float32) * 0.1
        y = b.node("MatMul", [x, b.weight("w", w, int8=int8, axis=None)], "y")
    b.quantize(y, "yq")
    return small_model(b.nodes, [("x", np.dtype(np.float32), in_shape)], ["yq"], b.constants, _OPSETS), in_shape


def kernel_models(shape: KernelShape) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
    """The float model, the integer (QDQ) model of ``shape`` and a feed for both."""
    reference, in_shape = _one_form(shape, int8=False)
    candidate, _ = _one_form(shape, int8=True)
    return reference, candidate, {"x": np.random.default_rng(1).standard_normal(in_shape).astype(np.float32)}


def measure_rounds(shape: KernelShape, *, threads: int = 1, rounds: int = 3, budget_s: float = 0.12) -> list[float]:
    """``t_float / t_int8`` for ``shape`` as given (not ``bucket``-ed), once per round: each the median of
    alternating pairs of runs within ``budget_s``, on sessions of its own (one pair of sessions keeps
    its speed: a 16-channel island at 112x112 measured 0.975-1.010x across six pairs, within 0.009
    inside each, so rounds on one pair would agree on a figure another pair contradicts)."""
    reference, candidate, feed = kernel_models(shape)
    found = []
    for _ in range(max(1, rounds)):
        ref = make_session(reference, threads=threads, source="float kernel")
        cand = make_session(candidate, threads=threads, source="integer kernel")
        timing = measure_latency(ref, cand, feed, threads=threads, warmup=3, runs=400, time_budget_s=budget_s)
        found.append(timing.speedup)
    return found


def spread(rounds: list[float]) -> tuple[float, float]:
    """The middle half of the rounds (their 25th and 75th percentiles): one round slowed by a burst of
    load moves it little, so more rounds outvote it."""
    low, high = np.percentile(rounds, [25, 75])
    return float(low), float(high)


def uncertain(rounds: list[float]) -> bool:
    """True when the rounds disagree on which form is faster (the middle half of them spans 1.0)."""
    low, high = spread(rounds)
    return low < 1.0 < high


# ---- the cache and the oracle -------------------------------------------------------------------------------


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/quantcli/kernel_speed.json``, else ``~/.cache/quantcli/kernel_speed.json``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "quantcli" / "kernel_speed.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries = doc.get("entries") if isinstance(doc, dict) and doc.get("schema") == SCHEMA else None
    return dict(entries) if isinstance(entries, dict) else {}


def _write_cache(path: Path, entries: Mapping[str, Any]) -> None:
    """Write the cache atomically (a temporary file in the same folder, then a rename); failures are logged."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kernel_speed.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"schema": SCHEMA, "entries": dict(sorted(entries.items()))}, f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("kernel speed cache %s not written: %s", path, exc)


def _cached_rounds(entry: object) -> list[float] | None:
    """The rounds of a cache entry (None: no entry, or not one this version wrote)."""
    rounds = entry.get("rounds") if isinstance(entry, dict) else None
    if not isinstance(rounds, list) or not rounds:
        return None
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in rounds):
        return None
    return [float(r) for r in rounds]


@dataclass(slots=True)
class MeasuredSpeedOracle:
    """A ``SpeedOracle`` that measures each shape on this host and caches it (see the module docstring).

    Attributes:
        cache_path: the JSON cache file; None measures without reading or writing one.
        threads: onnxruntime intra-op threads of the timing (1: batch-1 latency on one core).
        measured: shapes this object timed (first measured, or given more rounds), for reports and tests.
    """

    cache_path: Path | None = None
    threads: int = 1
    measured: list[KernelShape] = field(default_factory=list)
    _memo: dict[str, list[float]] = field(default_factory=dict)

    def speed(self, shape: KernelShape) -> KernelSpeed | None:
        """The measured speed of ``shape`` (None when onnxruntime cannot run the kernel)."""
        key = cache_key(shape, threads=self.threads)
        rep = bucket(shape)
        if key not in self._memo:
            cached = _cached_rounds(_read_cache(self.cache_path).get(key)) if self.cache_path is not None else None
            rounds = self._measure(rep, cached)
            if rounds is None:
                return None
            self._memo[key] = rounds
            if rounds != cached and self.cache_path is not None:
                self._store(key, rep, rounds)
        rounds = self._memo[key]
        return KernelSpeed(rep, float(np.median(rounds)), "on this host", spread(rounds) if len(rounds) > 1 else None)

    def _measure(self, rep: KernelShape, cached: list[float] | None) -> list[float] | None:
        """``cached``, with rounds added while they disagree (up to ``MAX_ROUNDS``); first rounds if None."""
        rounds = list(cached or [])
        try:
            if not rounds:
                rounds = measure_rounds(rep, threads=self.threads, rounds=FIRST_ROUNDS)
            while uncertain(rounds) and len(rounds) < MAX_ROUNDS:
                more = min(_MORE_ROUNDS, MAX_ROUNDS - len(rounds))
                rounds += measure_rounds(rep, threads=self.threads, rounds=more)
        except Exception as exc:  # a kernel this onnxruntime cannot build: no measurement, no decision
            logger.warning("kernel speed of %s not measured: %s", rep.describe(), exc)
            return rounds or None
        if rounds != cached:
            self.measured.append(rep)
        return rounds

    def _store(self, key: str, rep: KernelShape, rounds: list[float]) -> None:
        assert self.cache_path is not None
        entries = _read_cache(self.cache_path)
        entries[key] = {
            "ratio": round(float(np.median(rounds)), 4),
            "rounds": [round(r, 4) for r in rounds],
            "shape": rep.describe(),
            "kind": str(rep.kind),
            "load": round(os.getloadavg()[0], 2),
        }
        _write_cache(self.cache_path, entries)


@lru_cache(maxsize=1)
def host_oracle() -> SpeedOracle:
    """The process's oracle: measuring, cached in ``default_cache_path()`` unless ``QUANTCLI_NO_SPEED_CACHE``
    is set; ``ConstantSpeedOracle`` when ``QUANTCLI_KERNEL_SPEED=constant``."""
    if os.environ.get(MODE_ENV, "").strip().lower() == "constant":
        return ConstantSpeedOracle()
    off = os.environ.get(CACHE_ENV, "") not in ("", "0")
    return MeasuredSpeedOracle(cache_path=None if off else default_cache_path())
