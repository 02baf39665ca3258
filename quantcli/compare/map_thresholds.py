"""Where a map output is cut into a mask for IoU: one threshold for every map, or one per output.

A model's maps need not share a threshold: Basic Pitch's transcription reads its note (frame)
posteriorgram at 0.3 and its onsets at 0.5 (``basic_pitch.inference.predict``), and judged at 0.5 its
note map reads IoU 0.846 against FP32 where at 0.3 it reads 0.914. ``--map-threshold 0.3`` sets every
map's; ``--map-threshold NAME=0.3`` (repeatable) sets one output's, the others keep the default (or the
plain value given beside them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from quantcli.core.errors import InvalidOption

__all__ = ["DEFAULT_MAP_THRESHOLD", "MapThreshold", "MapThresholds", "as_thresholds", "parse_map_thresholds"]

#: where a probability map is cut into a mask for IoU
DEFAULT_MAP_THRESHOLD = 0.5


@dataclass(frozen=True, slots=True)
class MapThresholds:
    """``default`` for every map output but those named in ``by_output`` (name, threshold)."""

    default: float = DEFAULT_MAP_THRESHOLD
    by_output: tuple[tuple[str, float], ...] = ()

    def of(self, name: str) -> float:
        """The threshold of output ``name``."""
        return dict(self.by_output).get(name, self.default)

    def named(self) -> list[str]:
        """The outputs given a threshold of their own."""
        return [name for name, _ in self.by_output]

    def check(self, option: str) -> None:
        """Every threshold is in (0, 1).

        Raises:
            InvalidOption: one is not (naming ``option``).
        """
        for name, value in (("", self.default), *self.by_output):
            if not 0.0 < value < 1.0:
                what = f"{name}={value:g}" if name else f"{value:g}"
                raise InvalidOption(f"${option} {what}: must be in (0, 1)", option=option)


#: a threshold for every map, or thresholds per output
MapThreshold = float | MapThresholds


def as_thresholds(value: MapThreshold) -> MapThresholds:
    """``value`` as ``MapThresholds`` (a plain number is every map's)."""
    return value if isinstance(value, MapThresholds) else MapThresholds(float(value))


def parse_map_thresholds(items: Sequence[str] | None, option: str = "map_threshold") -> MapThresholds:
    """``["0.4", "onsets=0.5"]`` -> default 0.4, ``onsets`` 0.5 (the last plain value is the default).

    Raises:
        InvalidOption: an item that is not ``VALUE`` or ``NAME=VALUE`` with VALUE in (0, 1).
    """
    default, named = DEFAULT_MAP_THRESHOLD, {}
    for item in items or ():
        name, _, text = item.rpartition("=")
        try:
            value = float(text)
        except ValueError:
            raise InvalidOption(f"${option} {item!r}: expected VALUE or NAME=VALUE", option=option) from None
        if name:
            named[name] = value
        else:
            default = value
    thresholds = MapThresholds(default, tuple(named.items()))
    thresholds.check(option)
    return thresholds
