"""When a preprocess worker pauses and resumes its partitions: pure hysteresis.

A worker holds consumed offers in memory while its queue slots are full. librdkafka purges its
prefetched messages on pause and restarts fetching only on the broker thread's next cycle after
resume (about a second measured with the embedded broker), so pausing at every full queue would
stall the stream. Instead the worker pauses only when its buffer is full and resumes at half, so
the refetch overlaps with the buffered work.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BufferGate"]


@dataclass(frozen=True)
class BufferGate:
    """Pause above ``max_messages`` or ``max_bytes`` buffered; resume at half of both."""

    max_messages: int
    max_bytes: int

    def paused(self, *, messages: int, nbytes: int, currently_paused: bool) -> bool:
        """Whether partitions should be paused given the buffer's size now."""
        if currently_paused:
            return messages > self.max_messages // 2 or nbytes > self.max_bytes // 2
        return messages >= self.max_messages or nbytes >= self.max_bytes
