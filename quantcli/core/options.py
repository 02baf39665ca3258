"""Typed options shared by the Python API and the command line."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "ACTIVATION_TYPES",
    "DEFAULT_PERCENTILE",
    "WEIGHT_TYPES",
    "AlgorithmOptions",
    "CalibrationMethod",
    "QuantConfig",
    "QuantDType",
    "StrEnum",
    "WeightClipping",
]


class StrEnum(str, enum.Enum):
    """A string enum that prints as its value (``enum.StrEnum`` needs Python 3.11)."""

    def __str__(self) -> str:
        return str(self.value)


class QuantDType(StrEnum):
    """Integer types a tensor can be quantized to."""

    UINT8 = "uint8"
    INT8 = "int8"
    UINT16 = "uint16"
    INT16 = "int16"
    INT4 = "int4"
    UINT4 = "uint4"
    INT32 = "int32"


#: the types an activation may be quantized to (the others are for weights and biases)
ACTIVATION_TYPES = (QuantDType.UINT8, QuantDType.INT8, QuantDType.UINT16, QuantDType.INT16)
#: the types ``convert`` may give weights (4-bit: weight-only mode only)
WEIGHT_TYPES = (QuantDType.INT8, QuantDType.UINT8, QuantDType.INT4, QuantDType.UINT4)
#: the upper percentile the ``percentile`` calibration method keeps, unless told otherwise
DEFAULT_PERCENTILE = 99.99


class CalibrationMethod(StrEnum):
    """How an activation's clip range is chosen from the calibration data."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"
    MOVING_AVERAGE = "moving-average"


class WeightClipping(StrEnum):
    """How a weight channel's symmetric range is chosen."""

    ABSMAX = "absmax"
    MSE = "mse"


@dataclass(frozen=True, slots=True)
class AlgorithmOptions:
    """Optional accuracy algorithms that change the FP32 graph or its biases (all off by default).

    Attributes:
        cle: cross-layer equalization of Conv -> (Relu | LeakyRelu | none) -> Conv chains.
        smoothquant: SmoothQuant migration strength alpha for MatMul/Gemm inputs (None: off).
        bias_correction: fold the mean output shift caused by weight quantization into the bias.
    """

    cle: bool = False
    smoothquant: float | None = None
    bias_correction: bool = False

    @property
    def needs_data(self) -> bool:
        """True when an algorithm needs the calibration data itself, not only a calibration file."""
        return self.cle or self.smoothquant is not None or self.bias_correction


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """What to quantize and how.

    Attributes:
        activation_type: integer type of activations (uint8 is what x86 integer kernels want).
        weight_type: integer type of weights.
        per_channel: per-output-channel weight scales (otherwise one scale per tensor).
        symmetric_activations: zero point fixed at the middle of the type's range.
        reduce_range: 7-bit weights, avoiding the int16 overflow of AVX2 u8*s8 kernels.
        op_types: only these op types are quantized (empty: every supported type).
        exclude_op_types: op types left in float.
        exclude_nodes: node-name patterns (glob, or ``re:`` + regex) left in float.
        fold_relu: merge Relu/Clip into the producer's output quantization range.
        weight_clipping: absmax, or the per-channel clip ratio with the least weight MSE.
        disabled_rules: planning rules and checks switched off by name (``quantcli.static.rules.RULE_NAMES``).
        dynamic_nodes: node-name patterns (like ``exclude_nodes``) of MatMul/Gemm nodes whose input is
            quantized at run time (DynamicQuantizeLinear) inside the static plan, weights int8 offline.
    """

    activation_type: QuantDType = QuantDType.UINT8
    weight_type: QuantDType = QuantDType.INT8
    per_channel: bool = True
    symmetric_activations: bool = False
    reduce_range: bool = False
    op_types: frozenset[str] = field(default_factory=frozenset)
    exclude_op_types: frozenset[str] = field(default_factory=frozenset)
    exclude_nodes: tuple[str, ...] = ()
    fold_relu: bool = True
    weight_clipping: WeightClipping = WeightClipping.ABSMAX
    disabled_rules: frozenset[str] = field(default_factory=frozenset)
    dynamic_nodes: tuple[str, ...] = ()
