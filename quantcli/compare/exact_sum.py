"""An exact running sum of floats in O(1) memory: the same total whatever the order or grouping.

Every finite float64 is an integer multiple of 2**-1074 (the smallest subnormal), so a sum of them is
kept exactly as a Python integer count of that unit; reading it divides once, correctly rounded (Python's
``int / int``). So per-sample energies added batch by batch, or shard by shard then merged, give the
same float to the bit whatever the batch size was, without keeping one float per sample (as
``math.fsum`` of a list would). Infinities and NaN are carried apart and win, as in float addition.

``ordered_sum`` is the plain running total, for sums that must equal a batch-by-batch float total to the bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ExactSum", "ordered_sum"]

#: every finite float64 is a whole number of 2**-UNIT_BITS
UNIT_BITS = 1074


@dataclass(slots=True)
class ExactSum:
    """The exact sum of the floats added (``value``: rounded once, when read)."""

    units: int = 0  # the finite terms' sum, in units of 2**-1074
    special: float = 0.0  # the infinite and NaN terms, added as floats (inf + -inf is NaN, as in a float sum)

    def add(self, x: float) -> None:
        """Add one float."""
        if x != x or x in (float("inf"), float("-inf")):
            self.special += x
            return
        numerator, denominator = float(x).as_integer_ratio()  # denominator: a power of two, 2**1074 at most
        self.units += numerator << (UNIT_BITS + 1 - denominator.bit_length())

    def extend(self, xs: Iterable[float]) -> None:
        """Add each float of ``xs``."""
        for x in xs:
            self.add(x)

    def merge(self, other: ExactSum) -> None:
        """Add ``other``'s terms."""
        self.units += other.units
        self.special += other.special

    @property
    def value(self) -> float:
        """The sum, rounded to the nearest float once (infinite beyond the float range)."""
        if self.special:
            return self.special
        try:
            return self.units / (1 << UNIT_BITS)
        except OverflowError:
            return float("inf") if self.units > 0 else float("-inf")


def ordered_sum(parts: list[float]) -> float:
    """``parts`` added left to right, as a running total over batches adds them (never reordered or
    compensated, so a total merged from shards' per-batch parts is the one process's to the bit)."""
    total = 0.0
    for part in parts:
        total += part
    return total
