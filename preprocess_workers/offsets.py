"""Which offset each partition may commit: the low watermark of completed work.

Pure bookkeeping, no Kafka calls. An offset is *completed* once its output (prediction or dead
letter) has been acknowledged by the broker; a partition may commit up to, not past, its oldest
offset still in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OffsetTracker"]

TopicPartitionKey = tuple[str, int]


@dataclass
class _Partition:
    in_flight: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset seen
    committed: int | None = None


class OffsetTracker:
    """In-flight offsets per assigned partition."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartitionKey, _Partition] = {}

    def assign(self, key: TopicPartitionKey) -> None:
        self._partitions[key] = _Partition()

    def revoke(self, key: TopicPartitionKey) -> None:
        self._partitions.pop(key, None)

    def is_assigned(self, key: TopicPartitionKey) -> bool:
        return key in self._partitions

    def started(self, key: TopicPartitionKey, offset: int) -> None:
        partition = self._partitions.setdefault(key, _Partition())
        partition.in_flight.add(offset)
        if partition.next_offset is None or offset >= partition.next_offset:
            partition.next_offset = offset + 1

    def finished(self, key: TopicPartitionKey, offset: int) -> bool:
        """Mark ``offset`` completed; False if it was not in flight here (revoked meanwhile)."""
        partition = self._partitions.get(key)
        if partition is None or offset not in partition.in_flight:
            return False
        partition.in_flight.discard(offset)
        return True

    def in_flight(self, key: TopicPartitionKey | None = None) -> int:
        if key is not None:
            partition = self._partitions.get(key)
            return len(partition.in_flight) if partition else 0
        return sum(len(p.in_flight) for p in self._partitions.values())

    def commit_position(self, key: TopicPartitionKey) -> int | None:
        """The offset to commit for ``key`` (next to consume), or None if nothing is known."""
        partition = self._partitions.get(key)
        if partition is None or partition.next_offset is None:
            return None
        return min(partition.in_flight) if partition.in_flight else partition.next_offset

    def uncommitted(self, keys=None) -> dict[TopicPartitionKey, int]:
        """Positions that moved since :meth:`mark_committed` last saw them."""
        out = {}
        for key in keys if keys is not None else list(self._partitions):
            position = self.commit_position(key)
            if position is not None and position != self._partitions[key].committed:
                out[key] = position
        return out

    def positions(self, keys=None) -> dict[TopicPartitionKey, int]:
        """Every partition's commit position, whether :meth:`mark_committed` saw it or not."""
        out = {}
        for key in keys if keys is not None else list(self._partitions):
            position = self.commit_position(key)
            if position is not None:
                out[key] = position
        return out

    def mark_committed(self, positions: dict[TopicPartitionKey, int]) -> None:
        for key, position in positions.items():
            if key in self._partitions:
                self._partitions[key].committed = position
