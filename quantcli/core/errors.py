"""The one exception family quantcli raises for problems the user can fix.

Every message says what went wrong, which file, and what to do about it. The CLI turns any
``QuantCliError`` into a single red line and exit code 3; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

__all__ = [
    "ArtifactMismatchError",
    "CalibrationDataError",
    "CalibrationTimeoutError",
    "ModelLoadError",
    "NotFasterError",
    "OutputPathError",
    "QuantCliError",
    "UnsupportedModelError",
]


class QuantCliError(Exception):
    """A problem with the user's input, options or environment (not a bug in quantcli)."""


class ModelLoadError(QuantCliError):
    """The model file is missing, unreadable, not ONNX, or fails validation."""


class UnsupportedModelError(QuantCliError):
    """The model is valid ONNX but quantcli cannot quantize it as asked."""


class CalibrationDataError(QuantCliError):
    """Calibration or evaluation data is missing, malformed or does not fit the model's inputs."""


class ArtifactMismatchError(QuantCliError):
    """A calibration file is unreadable, of another schema version, or made for another model."""


class OutputPathError(QuantCliError):
    """An output path exists (without --force), lies in a missing directory, or is not writable."""


class NotFasterError(QuantCliError):
    """The quantized model is not faster than FP32 at batch 1, and a faster one was required
    (``--require-speedup``, or an accuracy budget without ``--force``); nothing was written."""


class CalibrationTimeoutError(QuantCliError):
    """Calibration ran longer than ``--timeout``."""
