"""CI gates: thresholds on a comparison that turn into a pass/fail verdict and an exit code."""

from __future__ import annotations

from dataclasses import dataclass

from quantcli.compare.result import CompareResult

__all__ = ["GateResult", "GateThresholds", "evaluate_gates"]


@dataclass(frozen=True, slots=True)
class GateThresholds:
    """Bounds given on the command line; None means the gate is not checked."""

    max_accuracy_drop: float | None = None  # percentage points
    min_agreement: float | None = None  # percent
    min_sqnr: float | None = None  # dB
    min_speedup: float | None = None  # ratio, at the largest measured batch
    max_size_ratio: float | None = None  # quantized / FP32


@dataclass(frozen=True, slots=True)
class GateResult:
    """One gate's verdict."""

    name: str
    passed: bool
    value: float
    bound: float
    comparison: str  # "<=" or ">="

    def describe(self) -> str:
        """E.g. ``accuracy drop 0.40 <= 1.00``."""
        return f"{self.value:.4g} {'meets' if self.passed else 'violates'} {self.comparison} {self.bound:g}"


def _check(name: str, value: float, bound: float, *, upper: bool) -> GateResult:
    passed = value <= bound if upper else value >= bound
    return GateResult(name, bool(passed), float(value), float(bound), "<=" if upper else ">=")


def evaluate_gates(result: CompareResult, thresholds: GateThresholds) -> list[GateResult]:
    """Check every gate that has a bound; worst output decides for per-output metrics."""
    gates: list[GateResult] = []
    t = thresholds
    if t.max_accuracy_drop is not None and result.task_metric is not None:
        tm = result.task_metric
        gates.append(_check("max-accuracy-drop", 100 * (tm.reference - tm.candidate), t.max_accuracy_drop, upper=True))
    elif t.max_accuracy_drop is not None:
        drops = [
            100 * (m.accuracy_fp32.value - m.accuracy_quant.value)
            for m in result.outputs
            if m.accuracy_fp32 is not None and m.accuracy_quant is not None
        ]
        if drops:
            gates.append(_check("max-accuracy-drop", max(drops), t.max_accuracy_drop, upper=True))
        else:
            gates.append(GateResult("max-accuracy-drop", False, float("nan"), t.max_accuracy_drop, "<="))
    if t.min_agreement is not None:
        agreements = [100 * m.top1_agreement.value for m in result.outputs if m.top1_agreement is not None]
        value = min(agreements) if agreements else float("nan")
        gates.append(
            _check("min-agreement", value, t.min_agreement, upper=False)
            if agreements
            else GateResult("min-agreement", False, value, t.min_agreement, ">=")
        )
    if t.min_sqnr is not None:
        gates.append(_check("min-sqnr", min(m.sqnr_db for m in result.outputs), t.min_sqnr, upper=False))
    if t.min_speedup is not None and result.latency:
        gates.append(_check("min-speedup", result.latency[-1].speedup, t.min_speedup, upper=False))
    if t.max_size_ratio is not None:
        gates.append(_check("max-size-ratio", result.size_ratio, t.max_size_ratio, upper=True))
    return gates
