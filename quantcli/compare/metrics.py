"""Task metrics for ``compare --metric``: top-k accuracy, or a user's Python function.

A custom metric is named ``module:function`` (an importable module) or ``path/to/file.py:function``.
The function receives all outputs of one model, ``{output name: array stacked over samples}``, and
the labels (or None), and returns one number where higher is better, on a 0..1 scale (so that a
maximum accuracy drop reads it in percentage points). This runs your code: it is only loaded when
you name it.

A function with a parameter named ``reference`` also receives the FP32 model's outputs, stacked the same
way: a metric against FP32 rather than labels, for outputs no built-in kind reads (a detector's raw
heads: decode both, F1 of the boxes). The FP32 model is then scored against itself (``reference`` its
own outputs), so the drop is ``1 - value`` in points of 100: ``--max-accuracy-drop 5`` asks 0.95.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantcli.core.errors import InvalidOption, QuantCliError

__all__ = ["MetricSpec", "TaskMetric", "evaluate_custom", "parse_metric", "takes_reference"]

CustomMetric = Callable[[dict[str, np.ndarray], "np.ndarray | None"], float]


@dataclass(frozen=True, slots=True)
class TaskMetric:
    """A custom metric's value for the FP32 and the quantized model."""

    name: str
    reference: float
    candidate: float


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """``topk`` for label accuracy (0: none), or a custom function."""

    name: str
    topk: int = 1
    function: CustomMetric | None = None


def parse_metric(spec: str) -> MetricSpec:
    """``top1``, ``top5``, ``none``, ``module:function`` or ``file.py:function``."""
    match = re.fullmatch(r"top(\d+)", spec)
    if match:
        return MetricSpec(spec, topk=int(match.group(1)))
    if spec == "none":
        return MetricSpec(spec, topk=0)
    if ":" not in spec:
        raise InvalidOption(
            f"$metric {spec!r}: use top1, top5, none, module:function or file.py:function", option="metric"
        )
    target, _, func_name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise InvalidOption(f"$metric: {path}: file not found", option="metric")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            if module_spec is None or module_spec.loader is None:
                raise InvalidOption(f"$metric: {path}: cannot be imported", option="metric")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")
            module = importlib.import_module(target)
    except QuantCliError:
        raise
    except Exception as exc:
        raise InvalidOption(
            f"$metric {spec!r}: importing {target} failed: {type(exc).__name__}: {exc}", option="metric"
        ) from exc
    function = getattr(module, func_name, None)
    if not callable(function):
        raise InvalidOption(f"$metric {spec!r}: {target} has no function '{func_name}'", option="metric")
    return MetricSpec(spec, topk=1, function=function)


def takes_reference(function: Callable[..., object] | None) -> bool:
    """The function has a parameter named ``reference`` (FP32's outputs are passed to it)."""
    if function is None:
        return False
    try:
        return "reference" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or C function without a signature
        return False


def evaluate_custom(
    spec: MetricSpec,
    batches: list[list[np.ndarray]],
    names: list[str],
    labels: np.ndarray | None,
    reference: list[list[np.ndarray]] | None = None,
) -> float:
    """Stack the batches and call the custom function (with FP32's batches as ``reference`` when it takes
    them: ``batches`` themselves when ``reference`` is None, i.e. FP32 against itself)."""
    assert spec.function is not None

    def stacked(parts: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
        return {name: np.concatenate([b[i] for b in parts]) for i, name in enumerate(names)}

    outputs = stacked(batches)
    extra = (
        {"reference": stacked(batches if reference is None else reference)} if takes_reference(spec.function) else {}
    )
    try:
        value = float(spec.function(outputs, labels, **extra))
    except Exception as exc:
        raise InvalidOption(f"$metric {spec.name!r} raised {type(exc).__name__}: {exc}", option="metric") from exc
    return value
