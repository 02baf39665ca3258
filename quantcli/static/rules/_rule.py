"""The shape of a planning rule: the op types it matches, a check that may reject, an apply that records.

``check(ctx, node)`` looks and decides: it returns a ``Rejection`` (a reason code, a detail, the
tensor at fault) or whatever ``apply`` needs (its match). ``apply(ctx, node, match)`` records the
decision in the ``PlanContext``; it may still return a ``Rejection`` when a late input turns out
unusable. A rule with ``passes_on`` hands a node it rejects to the next rule of the table that
matches the op type (``Mul`` by a positive scalar is a rescale, any other ``Mul`` element-wise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import onnx

from quantcli.static.plan import Rejection

if TYPE_CHECKING:
    from quantcli.static.rules._context import PlanContext

__all__ = ["Rule"]

M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class Rule(Generic[M]):
    """One planning rule (see the module docstring)."""

    name: str
    op_types: frozenset[str]
    check: Callable[[PlanContext, onnx.NodeProto], Rejection | M]
    apply: Callable[[PlanContext, onnx.NodeProto, M], Rejection | None]
    passes_on: bool = False

    def run(self, ctx: PlanContext, node: onnx.NodeProto) -> tuple[Rejection | None, bool]:
        """Check, then apply; returns the rejection (None: fired) and whether it was made by ``check``."""
        found: Any = self.check(ctx, node)
        if isinstance(found, Rejection):
            return found, True
        return self.apply(ctx, node, found), False
