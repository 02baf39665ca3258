"""Byte counts written for people: ``531 MiB``, ``1.5 GiB``, ``12 KiB``, ``1 B``."""

from __future__ import annotations

__all__ = ["byte_text"]


def byte_text(nbytes: int, spec: str = ".0f") -> str:
    """``nbytes`` in the largest binary unit it reaches (GiB, MiB, KiB), its number formatted by ``spec``;
    plain bytes below 1 KiB."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):{spec}} {unit}"
    return f"{nbytes} B"
