"""Run the library pipeline in memory on a model and data (no files)."""

from __future__ import annotations

import numpy as np
import onnx

from quantcli.core.options import QuantConfig
from quantcli.data.datasets import Dataset, model_input_specs
from quantcli.graph.session import make_session
from quantcli.passes.preprocess import preprocess
from quantcli.static.lowering import apply_plan
from quantcli.static.plan import QuantPlan, SkipCode
from quantcli.static.planning import make_plan
from quantcli.stats.calibration import CalibrationResult, calibrate


def dataset(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> Dataset:
    return Dataset.from_arrays(model_input_specs(model), arrays)


def quantize(
    model: onnx.ModelProto, arrays: dict[str, np.ndarray], config: QuantConfig | None = None, **calib: object
) -> tuple[onnx.ModelProto, QuantPlan, CalibrationResult]:
    prepared, _ = preprocess(model)
    result = calibrate(prepared, dataset(model, arrays), model_sha256="test", **calib)  # type: ignore[arg-type]
    plan = make_plan(prepared, result.ranges, config or QuantConfig())
    return apply_plan(prepared, plan), plan, result


def run(model: onnx.ModelProto, arrays: dict[str, np.ndarray], *, optimize: bool = True) -> list[np.ndarray]:
    return make_session(model, optimize=optimize).run(None, arrays)


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - out).astype(np.float64) ** 2)))


def held_out_fidelity(
    model: onnx.ModelProto, config: QuantConfig, calib: np.ndarray, held: np.ndarray
) -> tuple[float, dict[str, SkipCode]]:
    """Quantize ``model`` (input ``x``) calibrated on ``calib``: its output SQNR on ``held``, and each node
    the plan left float with its reason code (the rule tests' before/after)."""
    quantized, plan, _ = quantize(model, {"x": calib}, config)
    ref, out = run(model, {"x": held})[0], run(quantized, {"x": held})[0]
    return sqnr(ref, out), {s.node: s.code for s in plan.skipped}
