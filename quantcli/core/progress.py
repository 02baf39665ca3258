"""The progress hook library loops accept: identity by default; the CLI passes a tqdm wrapper."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = ["Progress", "no_progress"]

T = TypeVar("T")

#: progress(batches, total_batches, description, samples_per_batch) -> batches
Progress = Callable[[Iterable[T], int, str, int], Iterable[T]]


def no_progress(it: Iterable[T], total: int, desc: str, batch_size: int) -> Iterable[T]:
    """Show nothing."""
    return it
