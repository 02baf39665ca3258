"""Facts about the CPU quantcli runs on, used to pick integer types and kernels onnxruntime runs fastest.

Kernel speed is a host fact too: whether an integer kernel beats its float twin depends on the CPU
(AVX2, AVX512-VNNI, AMX) and the onnxruntime build. Planning asks a ``SpeedOracle`` for the speed
of one kernel shape (``KernelShape``) and gets a ``KernelSpeed``: the ratio ``t_float / t_int8``
(above 1: the integer kernel is faster) and where that figure comes from. The oracle that measures
on this host lives in ``quantcli.verify.kernel_speed``; ``ConstantSpeedOracle`` below answers with
the constants quantcli used before it measured (tests install it, so plans stay deterministic).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from quantcli.core.errors import InvalidOption
from quantcli.core.options import QuantConfig, QuantDType, StrEnum

__all__ = [
    "ConstantSpeedOracle",
    "HostCpu",
    "KernelKind",
    "KernelShape",
    "KernelSpeed",
    "SpeedOracle",
    "cpu_model",
    "default_config",
    "detect_host",
    "int8_flags",
]

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni")
#: CPU flags that change which integer kernels onnxruntime picks (part of a speed measurement's key)
_INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "asimddp", "i8mm")


@dataclass(frozen=True, slots=True)
class HostCpu:
    """Architecture and integer-dot-product support of the host."""

    arch: str
    vnni: bool

    @property
    def is_x86(self) -> bool:
        """True on x86-64."""
        return self.arch in ("x86_64", "amd64", "i386", "i686")

    @property
    def activation_type(self) -> QuantDType:
        """uint8 on x86 (onnxruntime only fuses u8 activations there), int8 elsewhere (ARM)."""
        return QuantDType.UINT8 if self.is_x86 else QuantDType.INT8

    @property
    def reduce_range(self) -> bool:
        """7-bit weights on x86 without VNNI: AVX2's u8*s8 multiply-add saturates int16 sums otherwise.

        Measured on the bundled CNN (AVX2, no VNNI): 8-bit weights give 12.9 dB output SQNR once
        onnxruntime fuses the kernels (42.2 dB for the same model unfused); 7-bit weights give 32.9 dB
        fused and unfused alike.
        """
        return self.is_x86 and not self.vnni

    def describe(self) -> str:
        """E.g. ``x86_64 (no VNNI)``."""
        if not self.is_x86:
            return self.arch
        return f"{self.arch} ({'VNNI' if self.vnni else 'no VNNI'})"


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """The CPU model name and flags from /proc/cpuinfo (Linux; empty elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    model, flags = "", frozenset[str]()
    if not cpuinfo.is_file():
        return model, flags
    try:
        text = cpuinfo.read_text(errors="ignore")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model name") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_model() -> str:
    """The CPU's model name (``AMD EPYC``), else the architecture."""
    return _cpuinfo()[0] or platform.machine().lower() or "unknown"


def int8_flags() -> tuple[str, ...]:
    """The CPU flags relevant to integer kernels that this host has, in a fixed order."""
    flags = _cpuinfo()[1]
    return tuple(f for f in _INT8_FLAGS if f in flags)


#: plan for another x86 CPU than this one: ``vnni`` or ``no-vnni`` (a build machine converting for its
#: deployment host; the test suite sets it so plans are the same on every host it runs on)
TARGET_ENV = "QUANTCLI_TARGET_CPU"
_TARGETS = {"vnni": True, "no-vnni": False}


@lru_cache(maxsize=1)
def detect_host() -> HostCpu:
    """Read the architecture and, on Linux, the CPU flags; ``QUANTCLI_TARGET_CPU`` overrides VNNI."""
    arch = platform.machine().lower()
    target = os.environ.get(TARGET_ENV, "").strip().lower()
    if target:
        if target not in _TARGETS:
            raise InvalidOption(f"{TARGET_ENV}={target!r}: expected one of {', '.join(_TARGETS)}", option=TARGET_ENV)
        return HostCpu(arch=arch, vnni=_TARGETS[target])
    vnni = any(f in _cpuinfo()[1] for f in _VNNI_FLAGS)
    return HostCpu(arch=arch, vnni=vnni)


def default_config() -> QuantConfig:
    """The configuration quantcli uses on this host unless told otherwise."""
    host = detect_host()
    return QuantConfig(activation_type=host.activation_type, reduce_range=host.reduce_range)


class KernelKind(StrEnum):
    """The kernel shapes whose integer speed planning asks about."""

    #: a Conv over few input channels reading the float model input: Q + QLinearConv vs Conv + Q
    STEM_CONV = "stem-conv"
    #: a depthwise Conv (group = channels) between quantized tensors: QLinearConv vs DQ + Conv + Q
    DEPTHWISE_CONV = "depthwise-conv"
    #: a depthwise Conv between two integer 1x1 Convs: QLinearConv vs the float island DQ + Conv + Q
    #: (the transitions, and the layout transposes onnxruntime puts around a float Conv, included)
    DEPTHWISE_ISLAND = "depthwise-island"
    #: a MaxPool / AveragePool / GlobalAveragePool between quantized tensors: its integer kernel (uint8
    #: MaxPool, QLinearAveragePool, QLinearGlobalAveragePool) vs the float island DQ + producer + pool + Q
    MAX_POOL_ISLAND = "max-pool-island"
    AVERAGE_POOL_ISLAND = "average-pool-island"
    GLOBAL_POOL_ISLAND = "global-pool-island"
    #: a MatMul with a constant weight between quantized tensors: QLinearMatMul vs DQ + MatMul + Q
    MATMUL = "matmul"
    #: a MatMul with a constant weight on float tensors: DynamicQuantizeMatMul vs MatMul
    DYNAMIC_MATMUL = "dynamic-matmul"


_POOL_KINDS = frozenset({KernelKind.MAX_POOL_ISLAND, KernelKind.AVERAGE_POOL_ISLAND, KernelKind.GLOBAL_POOL_ISLAND})


@dataclass(frozen=True, slots=True)
class KernelShape:
    """One kernel shape at batch 1.

    ``dims`` per kind: Conv and pool kinds ``(c_in, c_out, kh, kw, stride, h, w)`` (``c_in == c_out``
    for depthwise and pools, ``kh``/``kw`` 0 for a global pool; ``h``/``w`` 0 when unknown; ``stride``
    the height stride); MatMul kinds ``(m, k, n)``. ``stride_w`` is the width stride of a Conv or pool
    whose strides differ (PP-OCR's ``(2, 1)``), else 0: a shape with equal strides compares and hashes
    the same however it was written.
    """

    kind: KernelKind
    dims: tuple[int, ...]
    stride_w: int = 0

    def __post_init__(self) -> None:
        if self.stride_w and self.is_conv and self.stride_w == self.dims[4]:
            object.__setattr__(self, "stride_w", 0)

    @property
    def strides(self) -> tuple[int, int]:
        """``(height, width)`` strides of a Conv or pool (``(1, 1)`` for a MatMul)."""
        if not self.is_conv:
            return (1, 1)
        return (self.dims[4], self.stride_w or self.dims[4])

    @property
    def is_conv(self) -> bool:
        """True for the Conv kinds and the pools (their ``dims`` read the same)."""
        conv = (KernelKind.STEM_CONV, KernelKind.DEPTHWISE_CONV, KernelKind.DEPTHWISE_ISLAND)
        return self.kind in conv or self.is_pool

    @property
    def is_pool(self) -> bool:
        """True for the pooling kinds."""
        return self.kind in _POOL_KINDS

    @property
    def pixels(self) -> int:
        """Input pixels of a Conv (0 when unknown)."""
        return self.dims[5] * self.dims[6] if self.is_conv else 0

    def describe(self) -> str:
        """E.g. ``1x3x224x224 -> 3x3x16/2`` (input, then kernel, output channels and strides, ``/2x1`` when
        they differ) or ``1x64x64 @ 64x64``."""
        if self.is_conv:
            c_in, c_out, kh, kw, _, h, w = self.dims
            size = f"{h or '?'}x{w or '?'}"
            sh, sw = self.strides
            step = "" if (sh, sw) == (1, 1) else f"/{sh}" if sh == sw else f"/{sh}x{sw}"
            if self.is_pool:
                window = "global" if kh == 0 else f"{kh}x{kw}{step}"
                return f"1x{c_in}x{size} -> {self.kind.removesuffix('-island')} {window}"
            return f"1x{c_in}x{size} -> {kh}x{kw}x{c_out}{step}"
        m, k, n = self.dims
        return f"1x{m}x{k} @ {k}x{n}"


@dataclass(frozen=True, slots=True)
class KernelSpeed:
    """How fast the integer form of a kernel runs against its float form.

    Attributes:
        shape: the shape measured (see ``quantcli.verify.kernel_speed``).
        ratio: ``t_float / t_int8``; above 1 the integer kernel is faster.
        source: where the figure comes from, for the reason line (``on this host``, or a constant's origin).
        spread: the middle half (25th to 75th percentile) of the rounds the figure is the median of
            (None: a constant, or a single figure).
    """

    shape: KernelShape
    ratio: float
    source: str
    spread: tuple[float, float] | None = None

    def slower(self, margin: float) -> bool:
        """True when the integer kernel runs below ``1 - margin`` times the float speed: the spread's top
        for a measured figure (three rounds in four), else the figure itself."""
        return (self.spread[1] if self.spread else self.ratio) < 1.0 - margin

    def describe(self, kernel: str) -> str:
        """E.g. ``QLinearConv measured 0.45x float on this host for 1x3x224x224 -> 3x3x16``, with the rounds'
        spread when there is one (``0.45x (0.44-0.47) float``)."""
        spread = f" ({self.spread[0]:.2f}-{self.spread[1]:.2f})" if self.spread else ""
        return f"{kernel} measured {self.ratio:.2f}x{spread} float {self.source} for {self.shape.describe()}"


class SpeedOracle(Protocol):
    """Answers how fast a kernel shape runs in integer form on the host planning is for."""

    def speed(self, shape: KernelShape) -> KernelSpeed | None:
        """The speed of ``shape`` (None: unknown, the rule keeps its integer default)."""
        ...


@dataclass(frozen=True, slots=True)
class ConstantSpeedOracle:
    """The speed decisions quantcli took before it measured, from figures taken on an AVX2 CPU.

    Stems over at least 64x64 pixels (or an unknown size) run at 0.45x float; every other shape
    is answered as no slower than float (1.0), which keeps the integer default. Deterministic: the
    tests install it so plans and the golden hashes do not depend on the machine.
    """

    #: AVX2, 1 thread: 3->16 3x3 at 224x224 0.49x, 3->8 at 48x192 0.39x
    stem_ratio: float = 0.45
    #: ... on images of at least this many pixels, or of unknown size (smaller: no measurable difference)
    stem_min_pixels: int = 64 * 64
    source: str = "on an AVX2 CPU (a constant, not measured here)"

    def speed(self, shape: KernelShape) -> KernelSpeed | None:
        """``stem_ratio`` for a large or unknown-size stem, else 1.0."""
        if shape.kind == KernelKind.STEM_CONV and (shape.pixels == 0 or shape.pixels >= self.stem_min_pixels):
            return KernelSpeed(shape, self.stem_ratio, self.source)
        return KernelSpeed(shape, 1.0, self.source)
