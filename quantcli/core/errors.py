"""The one exception family quantcli raises for problems the user can fix.

Every message says what went wrong, which file, and what to do about it. The CLI turns any
``QuantCliError`` into a single red line and exit code 3; anything else is a bug and keeps its
traceback.

Errors that concern options carry them as fields, not as command-line flags: the message is a
template naming each option as ``$field`` (the field of ``quantcli.pipeline.ConvertRequest`` or of
the API function), and ``options`` lists those fields. ``str(error)`` names the fields as a Python
caller knows them; the CLI renders the same error with its flags (``error.render(flag_of)``), so
library code never spells a flag.

>>> e = MissingInput("the accuracy search needs $eval_data", option="eval_data")
>>> str(e), e.render(lambda f: "--" + f.replace("_", "-"))
('the accuracy search needs eval_data', 'the accuracy search needs --eval-data')
"""

from __future__ import annotations

import string
from collections.abc import Callable

__all__ = [
    "ArtifactMismatchError",
    "CalibrationDataError",
    "CalibrationTimeoutError",
    "InvalidOption",
    "MissingInput",
    "ModelLoadError",
    "NotFasterError",
    "OptionConflict",
    "OutputPathError",
    "QuantCliError",
    "UnsupportedModelError",
]


class QuantCliError(Exception):
    """A problem with the user's input, options or environment (not a bug in quantcli).

    Attributes:
        template: the message; with ``options``, each option appears in it as ``$field``.
        options: the option fields the message names (empty: a plain message).
    """

    def __init__(self, message: str, *, options: tuple[str, ...] = ()) -> None:
        self.template = message
        self.options = options
        super().__init__(self.render())

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle by fields (subclasses take keyword-only fields the default reduction would drop)."""
        return (_rebuild, (type(self), self.template, self.options, dict(self.__dict__)))

    def render(self, name: Callable[[str], str] = str) -> str:
        """The message with every named option written as ``name(field)`` (default: the field itself)."""
        if not self.options:
            return self.template
        return string.Template(self.template).safe_substitute({o: name(o) for o in self.options})


def _rebuild(
    cls: type[QuantCliError], template: str, options: tuple[str, ...], state: dict[str, object]
) -> QuantCliError:
    exc = cls.__new__(cls)
    QuantCliError.__init__(exc, template, options=options)
    exc.__dict__.update(state)
    return exc


class OptionConflict(QuantCliError):
    """Options that cannot be used together (``options`` names them all)."""


class MissingInput(QuantCliError):
    """An option needs another one (``option``) that was not given."""

    def __init__(self, message: str, *, option: str, options: tuple[str, ...] = ()) -> None:
        self.option = option
        super().__init__(message, options=(option, *(o for o in options if o != option)))


class InvalidOption(QuantCliError):
    """One option's value is out of its range or malformed (``option`` names it)."""

    def __init__(self, message: str, *, option: str, options: tuple[str, ...] = ()) -> None:
        self.option = option
        super().__init__(message, options=(option, *(o for o in options if o != option)))


class ModelLoadError(QuantCliError):
    """The model file is missing, unreadable, not ONNX, or fails validation."""


class UnsupportedModelError(QuantCliError):
    """The model is valid ONNX but quantcli cannot quantize it as asked."""


class CalibrationDataError(QuantCliError):
    """Calibration or evaluation data is missing, malformed or does not fit the model's inputs."""


class ArtifactMismatchError(QuantCliError):
    """A calibration file is unreadable, of another schema version, or made for another model."""


class OutputPathError(QuantCliError):
    """An output path exists (without ``force``), lies in a missing directory, or is not writable."""


class NotFasterError(QuantCliError):
    """The quantized model is not faster than FP32 at batch 1, and a faster one was required
    (``require_speedup``, or an accuracy budget without ``force``); nothing was written."""


class CalibrationTimeoutError(QuantCliError):
    """Calibration ran longer than ``timeout``."""
