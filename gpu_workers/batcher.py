"""Dynamic batching: flush at ``max_batch_size`` items or ``max_wait`` after the first item.

Pure: the caller passes the clock, so tests can drive size and time triggers separately.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["DynamicBatcher"]

T = TypeVar("T")


class DynamicBatcher(Generic[T]):
    """Collects items into batches of at most ``max_batch_size``."""

    def __init__(self, *, max_batch_size: int, max_wait_s: float):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._items: list[T] = []
        self._first_at: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def room(self) -> int:
        return self.max_batch_size - len(self._items)

    def add(self, item: T, now: float) -> None:
        if len(self._items) >= self.max_batch_size:
            raise OverflowError("batch is full; pop it first")
        if not self._items:
            self._first_at = now
        self._items.append(item)

    def deadline(self) -> float | None:
        """When the current batch must flush, or None if it is empty."""
        return None if self._first_at is None else self._first_at + self.max_wait_s

    def pop_ready(self, now: float, *, force: bool = False) -> list[T] | None:
        """The batch if it is full, its wait is over, or ``force`` (and it is not empty)."""
        if not self._items:
            return None
        if force or len(self._items) >= self.max_batch_size or now >= self._first_at + self.max_wait_s:
            batch, self._items, self._first_at = self._items, [], None
            return batch
        return None
