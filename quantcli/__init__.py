"""quantcli: quantize FP32 ONNX models to fast INT8 QDQ models for the host CPU, and prove they are still right."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
