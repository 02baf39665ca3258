"""quantcli: quantize FP32 ONNX models to fast INT8 QDQ models for the host CPU, and prove they are still right.

The Python API mirrors the command line::

    import quantcli

    calib = quantcli.calibrate("model.onnx", "calib.npz", method="percentile")
    converted = quantcli.convert("model.onnx", "model.int8.onnx", calibration=calib)
    result = quantcli.compare("model.onnx", "model.int8.onnx", "eval.npz")
    quantcli.to_json(result)  # the document ``compare --json`` writes

Each function's keywords are the fields of its request (``quantcli.CalibrateRequest``,
``ConvertRequest``, ``CompareRequest``), checked by the type checker and at run time; a request can
be passed instead of the paths. Importing ``quantcli`` is cheap: onnx and onnxruntime load on the
first call.

``quantcli.compare`` is the function; the ``quantcli/compare/`` package behind it is reached with
``from quantcli.compare.<module> import ...``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Bind the ``quantcli.compare`` subpackage before the function of the same name is defined below:
# a submodule imported later would otherwise replace the function as an attribute of this package.
importlib.import_module("quantcli.compare")

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from quantcli.api import CalibrateOptions, CompareOptions, ConvertOptions, ModelSummary
    from quantcli.compare.gates import GateResult
    from quantcli.compare.result import CompareResult
    from quantcli.core.options import CalibrationMethod, QuantConfig, QuantDType
    from quantcli.core.progress import Progress
    from quantcli.pipeline.request import CalibrateRequest, CompareRequest, ConvertRequest
    from quantcli.pipeline.result import ConvertResult
    from quantcli.stats.ranges import CalibrationResult

__all__ = [
    "CalibrateRequest",
    "CalibrationMethod",
    "CalibrationResult",
    "CompareRequest",
    "CompareResult",
    "ConvertRequest",
    "ConvertResult",
    "ModelSummary",
    "QuantConfig",
    "QuantDType",
    "__version__",
    "calibrate",
    "compare",
    "convert",
    "inspect",
    "to_json",
]

__version__ = "0.1.0"

# names in __all__ that are loaded on first use (module __getattr__), with the module that has them
_LAZY = {
    "CalibrateRequest": "quantcli.pipeline.request",
    "CompareRequest": "quantcli.pipeline.request",
    "ConvertRequest": "quantcli.pipeline.request",
    "CalibrationMethod": "quantcli.core.options",
    "QuantConfig": "quantcli.core.options",
    "QuantDType": "quantcli.core.options",
    "CalibrationResult": "quantcli.stats.ranges",
    "CompareResult": "quantcli.compare.result",
    "ConvertResult": "quantcli.pipeline.result",
    "ModelSummary": "quantcli.api",
}

StrPath = str | PathLike[str]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quantcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _path(value: StrPath | None) -> Path | None:
    return None if value is None else Path(value)


def calibrate(
    model: StrPath | CalibrateRequest,
    data: StrPath | None = None,
    *,
    output: StrPath | None = None,
    force: bool = False,
    progress: Progress | None = None,
    **options: Unpack[CalibrateOptions],
) -> CalibrationResult:
    """Run ``data`` through ``model`` and record activation ranges (``quantcli calibrate``).

    Args:
        model: the FP32 ONNX model, or a ``CalibrateRequest`` (then give no other option).
        data: ``.npz``/``.npy`` file, a directory of them, or of images.
        output: also write the calibration file here (``quantcli.calibration/1`` JSON).
        force: overwrite ``output`` if it exists.
        progress: wraps the data loop (e.g. a tqdm factory; none by default).
        **options: ``CalibrateRequest`` fields: ``method`` ("minmax", "percentile", "entropy", "mse",
            "moving-average"), ``percentile``, ``batch_size``, ``max_samples``, ``random_samples``, ...

    Returns:
        The ranges; pass them on as ``convert(..., calibration=result)``.
    """
    from quantcli import api
    from quantcli.stats.artifact import write_calibration

    request = _request(api.CalibrateRequest, model, (_path(data),), options)
    result = api.calibrate(request, progress=progress or api.no_progress)
    if output is not None:
        write_calibration(result, Path(output), model_path=request.model_path.name, force=force)
    return result


def convert(
    model: StrPath | ConvertRequest,
    output: StrPath | None = None,
    *,
    data: StrPath | None = None,
    progress: Progress | None = None,
    **options: Unpack[ConvertOptions],
) -> ConvertResult:
    """Quantize ``model`` and write it to ``output`` (``quantcli convert``).

    Args:
        model: the FP32 ONNX model (never modified), or a ``ConvertRequest``.
        output: where the quantized model goes.
        data: calibrate on the fly from this data (or give ``calibration``).
        progress: wraps data loops.
        **options: ``ConvertRequest`` fields: ``calibration`` (a ``calibrate`` result or a calibration
            file), ``config`` (a ``QuantConfig``), ``method``, ``mode``, ``force``, ``require_fused``,
            ``search`` with ``eval_data``, ``recipe``, ...

    Returns:
        What was quantized, what onnxruntime runs (``result.audit``), sizes.
    """
    from quantcli import api

    if data is not None:
        options["data_path"] = Path(data)
    if not isinstance(model, api.ConvertRequest) and output is None:
        raise TypeError("convert() needs an output path")
    request = _request(api.ConvertRequest, model, (_path(output),), options)
    return api.convert(request, progress=progress or api.no_progress)


def compare(
    reference: StrPath | CompareRequest,
    candidate: StrPath | None = None,
    data: StrPath | None = None,
    *,
    progress: Progress | None = None,
    **options: Unpack[CompareOptions],
) -> CompareResult:
    """Measure accuracy, error and latency of ``candidate`` against ``reference`` on ``data``.

    Args:
        reference: the FP32 model, or a ``CompareRequest``.
        candidate: the quantized model.
        data: evaluation data (with ``labels`` for accuracy).
        progress: wraps data loops.
        **options: ``CompareRequest`` fields: ``runs``, ``warmup``, ``latency_batch_sizes``,
            ``per_layer``, ``max_samples``, ``threads``, ``measure_memory``, ...

    Returns:
        Per-output metrics (``result.outputs``), latency, sizes, per-layer errors.
    """
    from quantcli import api

    if not isinstance(reference, api.CompareRequest) and (candidate is None or data is None):
        raise TypeError("compare() needs the reference, the candidate and the data paths")
    request = _request(api.CompareRequest, reference, (_path(candidate), _path(data)), options)
    return api.compare_models(request, progress=progress or api.no_progress)


def inspect(model: StrPath, *, data: StrPath | None = None) -> ModelSummary:
    """Size, parameters, op histogram and what onnxruntime runs for ``model`` (``quantcli inspect``).

    ``data``: one sample (``.npz``/``.npy``) to resolve dynamic shapes for the MAC counts.
    """
    from quantcli import api

    return api.inspect_model(Path(model), data_path=_path(data))


def to_json(result: Any, *, gates: list[GateResult] | None = None) -> dict[str, Any]:
    """The JSON document the command's ``--json`` writes for ``result``, as a dict.

    ``result`` is what ``calibrate``, ``convert``, ``compare`` or ``inspect`` returned; ``gates`` are
    compare's gate verdicts (``quantcli.compare.gates.evaluate_gates``).
    """
    from quantcli import api, schemas

    if isinstance(result, api.CalibrationResult):
        return schemas.calibrate_document(result)
    if isinstance(result, api.ConvertResult):
        return schemas.convert_document(result)
    if isinstance(result, api.CompareResult):
        return schemas.compare_document(result, gates)
    if isinstance(result, api.ModelSummary):
        return schemas.inspect_document(result)
    raise TypeError(f"no JSON document for {type(result).__name__}")


def _request(cls: type, first: Any, paths: tuple[Path | None, ...], options: Mapping[str, Any]) -> Any:
    """``first`` if it is already a request of ``cls`` (with no options), else ``cls(first, *paths, **options)``.

    Strings a notebook user types become the option types: ``method="percentile"``, ``mode="dynamic"``,
    ``calibration="model.calib.json"``.
    """
    if isinstance(first, cls):
        if options or any(p is not None for p in paths):
            raise TypeError(f"give either a {cls.__name__} or paths and options, not both")
        return first
    from quantcli.api import option_values

    kwargs = option_values(options)
    return cls(Path(first), *paths, **kwargs)
