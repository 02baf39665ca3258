"""The accuracy budget a searched model must keep, and how a candidate's score is judged against it.

A ``Budget`` bounds the top-1 drop (points, against labels or FP32's own top-1), the output SQNR and,
in the task's own terms, agreement, cosine and IoU on every output of their kind
(``quantcli.compare.gates.kind_gates``), each task-level value by ``Budget.margin`` standard errors of
its scored samples (``standard_error``), the SQNR and the accuracy drop by as many of their own
(``Score.sqnr_error_db``, ``Score.accuracy_error``). ``meets`` says whether a ``Score`` holds every bound
given; ``key`` orders scores (larger is better) by the budgeted metric, then SQNR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from quantcli.compare.gates import kind_gates
from quantcli.compare.output_kinds import AGREEMENT_KINDS, KindMetrics
from quantcli.core.errors import QuantCliError

__all__ = [
    "AGREEMENT",
    "DEFAULT_MARGIN",
    "Budget",
    "BudgetNotMetError",
    "Score",
    "key",
    "kind_margin",
    "meets",
    "required_share",
    "standard_error",
    "standard_errors",
]

#: ``SearchOptions.metric`` name that decides on agreement with FP32 even when the data has labels
AGREEMENT = "agreement"
#: ``Budget.margin`` unless given: a candidate's task-level value must clear its bound by one standard error
DEFAULT_MARGIN = 1.0


class BudgetNotMetError(QuantCliError):
    """No configuration the search tried met the accuracy budget."""


@dataclass(frozen=True, slots=True)
class Budget:
    """The accuracy a quantized model must keep. ``None`` means the bound is not checked."""

    max_accuracy_drop: float | None = None  # points of top-1 (per scored position; agreement without labels)
    min_sqnr_db: float | None = None  # on every float output
    #: share of samples whose decision equals FP32's, on every classifier/sequence/binary output
    min_agreement: float | None = None
    min_cosine: float | None = None  # mean per-sample cosine, on every embedding output
    min_iou: float | None = None  # mean per-sample IoU of thresholded maps, on every map output
    #: standard errors of the scored samples by which a task-level value, the accuracy drop and the SQNR
    #: must clear their bounds (``standard_error``, ``Score.accuracy_error``): a search stops at the first
    #: candidate that meets its bound, so on few samples it stops where the samples happened to favour it,
    #: and new data reads lower
    margin: float = DEFAULT_MARGIN

    def describe(self) -> str:
        """E.g. ``accuracy drop <= 0.5 points, SQNR >= 30 dB, agreement >= 0.99 (by 1 standard error)``."""
        parts = []
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop <= {self.max_accuracy_drop:g} points")
        if self.min_sqnr_db is not None:
            parts.append(f"SQNR >= {self.min_sqnr_db:g} dB")
        parts.extend(f"{name[4:]} >= {bound:g}" for name, bound in self.kind_bounds())
        text = ", ".join(parts)
        if self.has_margin():
            text += f" (by {standard_errors(self.margin)})"
        return text

    def has_margin(self) -> bool:
        """A margin applies: it is not 0, and a bound is given."""
        return bool(self.margin) and not self.is_empty()

    def kind_bounds(self) -> list[tuple[str, float]]:
        """The task-level bounds given, by gate name (``quantcli.compare.gates.kind_gates``)."""
        named = (("min-agreement", self.min_agreement), ("min-cosine", self.min_cosine), ("min-iou", self.min_iou))
        return [(name, bound) for name, bound in named if bound is not None]

    def is_empty(self) -> bool:
        """No bound is checked."""
        return self.max_accuracy_drop is None and self.min_sqnr_db is None and not self.kind_bounds()

    def record(self) -> dict[str, float | None]:
        """The bounds for a recipe (the task-level ones only when given, so older recipes read the same)."""
        bounds: dict[str, float | None] = {
            "max_accuracy_drop": self.max_accuracy_drop,
            "min_sqnr_db": self.min_sqnr_db,
        }
        bounds.update((name.replace("-", "_"), bound) for name, bound in self.kind_bounds())
        if self.has_margin():
            bounds["margin_standard_errors"] = self.margin
        return bounds


@dataclass(frozen=True, slots=True)
class Score:
    """A candidate's measured fidelity: top-1 and drop (when measured), lowest SQNR, task metrics."""

    accuracy: float | None
    accuracy_drop: float | None
    sqnr_db: float
    kinds: tuple[KindMetrics, ...] = ()
    #: the standard error (dB) of ``sqnr_db`` over the scored samples (delta method on their signal and
    #: noise energies; 0 when unknown): ``min_sqnr_db`` must hold by ``Budget.margin`` of them
    sqnr_error_db: float = 0.0
    #: the standard error (points) of ``accuracy_drop`` over the scored samples: of the per-sample changes
    #: of top-1 (paired against FP32's), of a custom metric by batch means (``Evaluator._metric_error``)
    accuracy_error: float = 0.0

    def drop_ceiling(self, budget: Budget) -> float | None:
        """The accuracy drop plus ``budget.margin`` standard errors: what ``max_accuracy_drop`` is held against."""
        if self.accuracy_drop is None:
            return None
        return self.accuracy_drop + budget.margin * self.accuracy_error

    def sqnr_floor(self, budget: Budget) -> float:
        """The SQNR less ``budget.margin`` standard errors: what ``min_sqnr_db`` is held against."""
        return self.sqnr_db - budget.margin * self.sqnr_error_db if math.isfinite(self.sqnr_db) else self.sqnr_db


def standard_errors(margin: float) -> str:
    """``1 standard error``, ``2 standard errors``."""
    return f"{margin:g} standard error{'' if margin == 1 else 's'}"


def standard_error(k: KindMetrics, bound: float) -> float:
    """The standard error of ``k``'s task metric over its scored samples: of a share at its bound
    (binomial, ``sqrt(b (1 - b) / n)``: 0.027 for 0.95 on 64 samples, so it does not vanish when every
    sample agreed), of a mean from the samples' own spread (``std / sqrt(n)``)."""
    if k.scored <= 0:
        return 0.0
    if k.kind in AGREEMENT_KINDS:
        return _share_error(bound, k.scored)
    return (k.spread or 0.0) / math.sqrt(k.scored)


def required_share(bound: float, samples: int, margin: float) -> float:
    """The share of ``samples`` an agreement must reach to meet ``bound`` by ``margin`` standard errors;
    at most 1 (every sample agrees): 12 samples are too few to show 0.98 by one standard error (1.020),
    and asking more than all of them would refuse every candidate."""
    return min(1.0, bound + margin * _share_error(bound, max(1, samples)))


def _share_error(bound: float, samples: int) -> float:
    """The binomial standard error of a share at ``bound`` over ``samples``."""
    return math.sqrt(max(0.0, bound * (1.0 - bound)) / samples)


def _slack(k: KindMetrics | None, bound: float, margin: float) -> float:
    """What ``margin`` standard errors add to ``bound`` for ``k``, never past a perfect score (1)."""
    if k is None or not margin:
        return 0.0
    return min(margin * standard_error(k, bound), max(0.0, 1.0 - bound))


def kind_margin(kinds: Sequence[KindMetrics], budget: Budget) -> float | None:
    """The smallest margin (value - bound - ``budget.margin`` standard errors) over every task-level
    bound and output it applies to."""
    bounds = budget.kind_bounds()
    if not bounds:
        return None
    by_name = {k.name: k for k in kinds}
    values = []
    for name, bound in bounds:
        for g in kind_gates(name, list(kinds), bound):
            k = by_name.get(g.output) if g.output is not None else None
            values.append(g.value - g.bound - _slack(k, bound, budget.margin))
    return -math.inf if any(math.isnan(v) for v in values) else min(values)


def meets(score: Score, budget: Budget) -> bool:
    ceiling = score.drop_ceiling(budget)
    if budget.max_accuracy_drop is not None and (ceiling is None or ceiling > budget.max_accuracy_drop + 1e-9):
        return False
    margin = kind_margin(score.kinds, budget)
    if margin is not None and margin < -1e-12:
        return False
    return budget.min_sqnr_db is None or score.sqnr_floor(budget) >= budget.min_sqnr_db


def primary_target(budget: Budget) -> float:
    """The value ``key``'s first element must reach for the budget to hold (a necessary condition)."""
    if budget.max_accuracy_drop is not None:
        return -budget.max_accuracy_drop
    if budget.kind_bounds():
        return 0.0
    return budget.min_sqnr_db if budget.min_sqnr_db is not None else -math.inf


def key(score: Score, budget: Budget) -> tuple[float, float]:
    """Larger is better: the budgeted metric first (accuracy drop, else the task-level margin), then SQNR."""
    margin = kind_margin(score.kinds, budget)
    if budget.max_accuracy_drop is not None:
        primary = -(score.drop_ceiling(budget) or 0.0)
    elif margin is not None:
        primary = margin
    else:
        primary = score.sqnr_floor(budget)
    return (round(primary, 9), round(score.sqnr_db, 6))
