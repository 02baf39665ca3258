"""CI gates: thresholds on a comparison that turn into a pass/fail verdict and an exit code.

The task-level gates (``min_agreement``, ``min_cosine``, ``min_iou``) are checked on every output of
their kinds (``quantcli.compare.output_kinds``): one gate result per output, and every one must hold.
A gate with no output of its kind fails (its value is NaN): a bound nothing was measured against is
not met.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantcli.compare.output_kinds import AGREEMENT_KINDS, KindMetrics, OutputKind
from quantcli.compare.result import CompareResult

__all__ = ["GateResult", "GateThresholds", "evaluate_gates", "kind_gates"]


@dataclass(frozen=True, slots=True)
class GateThresholds:
    """Bounds given on the command line; None means the gate is not checked."""

    max_accuracy_drop: float | None = None  # percentage points
    min_agreement: float | None = None  # fraction 0..1, on classifier/sequence/binary outputs
    min_sqnr: float | None = None  # dB
    min_speedup: float | None = None  # ratio, at the largest measured batch
    max_size_ratio: float | None = None  # quantized / FP32
    min_cosine: float | None = None  # mean per-sample cosine, on embedding outputs
    min_iou: float | None = None  # mean per-sample IoU, on map outputs


@dataclass(frozen=True, slots=True)
class GateResult:
    """One gate's verdict (for a task-level gate: on one output, of the kind named)."""

    name: str
    passed: bool
    value: float
    bound: float
    comparison: str  # "<=" or ">="
    output: str | None = None
    kind: str | None = None

    def describe(self) -> str:
        """E.g. ``accuracy drop 0.40 <= 1.00``, or ``logits (classifier): 0.99 meets >= 0.98``."""
        where = ""
        if self.output is not None:
            where = f"{self.output} ({self.kind}): "
        elif self.kind is not None:
            where = f"no {self.kind} output: "
        return f"{where}{self.value:.4g} {'meets' if self.passed else 'violates'} {self.comparison} {self.bound:g}"


def _check(name: str, value: float, bound: float, *, upper: bool) -> GateResult:
    passed = value <= bound if upper else value >= bound
    return GateResult(name, bool(passed), float(value), float(bound), "<=" if upper else ">=")


#: task-level gate -> the kinds it applies to and the metric it reads
_KIND_GATES: dict[str, tuple[frozenset[OutputKind], str]] = {
    "min-agreement": (AGREEMENT_KINDS, "agreement"),
    "min-cosine": (frozenset({OutputKind.EMBEDDING}), "cosine"),
    "min-iou": (frozenset({OutputKind.MAP}), "iou"),
}


def kind_gates(name: str, kinds: list[KindMetrics], bound: float) -> list[GateResult]:
    """Gate ``name`` (a key of the task-level gates) checked on every output of its kinds."""
    applies, metric = _KIND_GATES[name]
    gates = []
    for k in kinds:
        value = getattr(k, metric)
        if k.kind in applies and value is not None:
            gates.append(GateResult(name, bool(value >= bound), float(value), bound, ">=", k.name, str(k.kind)))
    if not gates:
        wanted = " or ".join(sorted(str(a) for a in applies))
        gates.append(GateResult(name, False, float("nan"), bound, ">=", None, wanted))
    return gates


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
    for name, bound in (("min-agreement", t.min_agreement), ("min-cosine", t.min_cosine), ("min-iou", t.min_iou)):
        if bound is not None:
            gates.extend(kind_gates(name, result.kinds, bound))
    if t.min_sqnr is not None:
        gates.append(_check("min-sqnr", min(m.sqnr_db for m in result.outputs), t.min_sqnr, upper=False))
    if t.min_speedup is not None and result.latency:
        gates.append(_check("min-speedup", result.latency[-1].speedup, t.min_speedup, upper=False))
    if t.max_size_ratio is not None:
        gates.append(_check("max-size-ratio", result.size_ratio, t.max_size_ratio, upper=True))
    return gates
