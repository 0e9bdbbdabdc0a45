"""The node's board: one small shared-memory file beside the queue that outlives model changes.

It holds what the processes of a node tell each other, one writer per cell, no locks:

- each preprocess worker's counters, heartbeat and the offer it is on (its own row);
- each inference process's counters, heartbeat and latency histogram: two rows, used by
  generation parity, so the outgoing and the incoming model's processes never share a cell
  during a model change;
- the offers that wedged a worker (strikes, written by the supervisor);
- the serving generation: which queue file and which bundle the workers are to use (written by
  the supervisor, the generation number last, so a reader that sees it sees the paths).

The supervisor serves health and metrics from here without asking the workers anything. The
queue files (``core.feature_queue``) hold the slots of one model generation each and are
replaced when the model changes; the board stays.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.shared_memory import ArraySpec, attach_header, create_mapped_file, map_arrays

__all__ = [
    "INFERENCE_COUNTERS",
    "LATENCY_BUCKETS_MS",
    "STARVED_S",
    "STUCK_TABLE_ROWS",
    "WORKER_COUNTERS",
    "NodeBoard",
    "Serving",
    "starved_for_s",
    "supervisor_pid",
]


def supervisor_pid() -> int:
    """The pid of the node supervisor that started this worker process.

    Taken from multiprocessing's record of the parent, not from ``os.getppid()`` at start: a worker
    that reaches its loop after its supervisor was killed would read 1 there, and would never
    notice that it is an orphan.
    """
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getppid()


WORKER_COUNTERS = (
    "consumed",
    "enqueued",
    "dead_lettered",
    "image_unused",
    "pauses",
    "lag",
    "heartbeat_ns",
    "busy_since_ns",
    "busy_partition",
    "busy_offset",  # the offer a worker is on now (busy_since_ns 0: none)
    "generation",  # the model generation the worker featurises for
    "delivered",  # predictions the broker acknowledged
    "progress_ns",  # when the worker last consumed an offer or was given partitions
    "held",  # offers it held at its last lag update: in flight or buffered (paused partitions)
)
INFERENCE_COUNTERS = (
    "predicted",
    "uncertain",
    "batches",
    "failed",
    "inference_ns",
    "ready",
    "heartbeat_ns",
    "uncertain_with_parent",
)
# A worker that has consumed nothing for this long while offers wait on its partitions is starved:
# the broker answers its fetches empty or not at all (as the embedded broker did with a short
# fetch.wait.max.ms once it held enough data; see core.kafka.consumer_config).
STARVED_S = 30.0
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
STUCK_TABLE_ROWS = 64  # offers that wedged a worker (oldest overwritten)
INFERENCE_ROWS = 2  # by generation parity
_PATH_BYTES = 1024


@dataclass(frozen=True)
class Serving:
    """A model generation: the queue file and the bundle the workers are to use."""

    generation: int
    queue_path: str
    bundle_path: str


class NodeBoard:
    """A view of the board file; ``create`` in the supervisor, ``attach`` in each process."""

    def __init__(self, path: Path, workers: int, owner: bool):
        self.path = path
        self.workers = workers
        self._owner = owner
        self._mmap, self._views = map_arrays(path, self._arrays(workers))
        self.worker_stats = self._views["worker_stats"]
        self.inference_stats = self._views["inference_stats"]
        self.latency_buckets = self._views["latency_buckets"]
        self.latency_sum_us = self._views["latency_sum_us"]

    @staticmethod
    def _arrays(workers: int) -> list[ArraySpec]:
        return [
            ("worker_stats", np.dtype(np.int64), (workers, len(WORKER_COUNTERS))),
            ("inference_stats", np.dtype(np.int64), (INFERENCE_ROWS, len(INFERENCE_COUNTERS))),
            # in-node latency: counts per bucket (+Inf last) and the sum in microseconds, per row
            ("latency_buckets", np.dtype(np.int64), (INFERENCE_ROWS, len(LATENCY_BUCKETS_MS) + 1)),
            ("latency_sum_us", np.dtype(np.int64), (INFERENCE_ROWS,)),
            # partition + 1 (0: empty row), offset, strikes; a ring written by the supervisor only
            ("stuck_offers", np.dtype(np.int64), (STUCK_TABLE_ROWS, 3)),
            ("stuck_next", np.dtype(np.int64), (1,)),
            ("generation", np.dtype(np.int64), (1,)),
            ("queue_path", np.dtype(np.uint8), (_PATH_BYTES,)),
            ("bundle_path", np.dtype(np.uint8), (_PATH_BYTES,)),
            ("path_lengths", np.dtype(np.int64), (2,)),
        ]

    @classmethod
    def create(cls, workers: int, *, directory: str | Path = "/dev/shm") -> NodeBoard:
        """A new board file in ``directory``; the creator removes it on :meth:`close`."""
        path = create_mapped_file(directory, "catstream-board", {"workers": workers}, cls._arrays(workers))
        return cls(path, workers, owner=True)

    @classmethod
    def attach(cls, path: str | Path) -> NodeBoard:
        path = Path(path)
        return cls(path, int(attach_header(path)["workers"]), owner=False)

    # --- serving generation (the supervisor writes, every process reads) ---------------------------

    def publish(self, serving: Serving) -> None:
        """Tell every process which queue and bundle to use; the generation is written last."""
        queue, bundle = serving.queue_path.encode(), serving.bundle_path.encode()
        if max(len(queue), len(bundle)) > _PATH_BYTES:
            raise ValueError(f"paths longer than {_PATH_BYTES} bytes: {serving}")
        self._views["queue_path"][: len(queue)] = np.frombuffer(queue, dtype=np.uint8)
        self._views["bundle_path"][: len(bundle)] = np.frombuffer(bundle, dtype=np.uint8)
        self._views["path_lengths"][:] = (len(queue), len(bundle))
        self._views["generation"][0] = serving.generation

    @property
    def generation(self) -> int:
        return int(self._views["generation"][0])

    def serving(self) -> Serving:
        generation = self.generation
        queue_length, bundle_length = (int(n) for n in self._views["path_lengths"])
        return Serving(
            generation=generation,
            queue_path=bytes(self._views["queue_path"][:queue_length]).decode(),
            bundle_path=bytes(self._views["bundle_path"][:bundle_length]).decode(),
        )

    # --- preprocess workers (each its own row) -----------------------------------------------------

    def count(self, worker: int, name: str, amount: int = 1) -> None:
        """Add to a worker's counter (only that worker writes its row)."""
        self.worker_stats[worker, WORKER_COUNTERS.index(name)] += amount

    def set_worker_stat(self, worker: int, name: str, value: int) -> None:
        self.worker_stats[worker, WORKER_COUNTERS.index(name)] = value

    def worker_stat(self, worker: int, name: str) -> int:
        return int(self.worker_stats[worker, WORKER_COUNTERS.index(name)])

    def worker_counts(self, worker: int) -> dict[str, int]:
        """A worker's counters, for its log line at exit."""
        return {
            name: int(value)
            for name, value in zip(WORKER_COUNTERS, self.worker_stats[worker], strict=True)
            if name not in ("heartbeat_ns", "generation", "progress_ns", "held") and not name.startswith("busy_")
        }

    def busy(self, worker: int, partition: int, offset: int) -> None:
        """The worker starts on the offer at ``partition``/``offset`` (its own row only)."""
        row = self.worker_stats[worker]
        row[WORKER_COUNTERS.index("busy_partition")] = partition
        row[WORKER_COUNTERS.index("busy_offset")] = offset
        row[WORKER_COUNTERS.index("busy_since_ns")] = time.time_ns()  # last: the others are in place

    def idle(self, worker: int) -> None:
        self.worker_stats[worker, WORKER_COUNTERS.index("busy_since_ns")] = 0

    def busy_with(self, worker: int) -> tuple[int, int, int] | None:
        """``(since_ns, partition, offset)`` of the offer the worker is on, None when it is on none."""
        row = self.worker_stats[worker]
        since = int(row[WORKER_COUNTERS.index("busy_since_ns")])
        if not since:
            return None
        return since, int(row[WORKER_COUNTERS.index("busy_partition")]), int(row[WORKER_COUNTERS.index("busy_offset")])

    # --- offers that wedged a worker (the supervisor writes, workers read) -------------------------

    def strike(self, partition: int, offset: int) -> int:
        """Count one more wedged worker against the offer; returns its strikes."""
        table = self._views["stuck_offers"]
        for row in table:
            if row[0] == partition + 1 and row[1] == offset:
                row[2] += 1
                return int(row[2])
        row = table[int(self._views["stuck_next"][0]) % STUCK_TABLE_ROWS]
        row[2] = 0  # the strikes before the key: a reader never sees the new key with the old count
        row[1] = offset
        row[0] = partition + 1
        row[2] = 1
        self._views["stuck_next"][0] += 1
        return 1

    def strikes(self, partition: int, offset: int) -> int:
        """How many workers the offer at ``partition``/``offset`` has wedged."""
        table = self._views["stuck_offers"]
        hits = table[(table[:, 0] == partition + 1) & (table[:, 1] == offset)]
        return int(hits[0, 2]) if len(hits) else 0

    # --- inference processes (each the row of its generation's parity) ----------------------------

    def count_inference(self, row: int, name: str, amount: int = 1) -> None:
        self.inference_stats[row, INFERENCE_COUNTERS.index(name)] += amount

    def set_inference_stat(self, row: int, name: str, value: int) -> None:
        self.inference_stats[row, INFERENCE_COUNTERS.index(name)] = value

    def inference_stat(self, row: int, name: str) -> int:
        return int(self.inference_stats[row, INFERENCE_COUNTERS.index(name)])

    def inference_total(self, name: str) -> int:
        """A counter summed over both rows: what the node did, across model changes."""
        return int(self.inference_stats[:, INFERENCE_COUNTERS.index(name)].sum())

    def observe_latency(self, row: int, milliseconds: np.ndarray) -> None:
        """Record in-node latencies of a batch."""
        index = np.searchsorted(np.asarray(LATENCY_BUCKETS_MS, dtype=np.float64), milliseconds, side="left")
        np.add.at(self.latency_buckets[row], index, 1)
        self.latency_sum_us[row] += int(np.sum(milliseconds) * 1000.0)

    def close(self) -> None:
        self._views.clear()
        for name in ("worker_stats", "inference_stats", "latency_buckets", "latency_sum_us"):
            setattr(self, name, None)
        with contextlib.suppress(BufferError):  # a view still in use elsewhere: the mapping goes with it
            self._mmap.close()
        if self._owner:
            self.path.unlink(missing_ok=True)


def starved_for_s(board: NodeBoard, worker: int, now_ns: int) -> float | None:
    """How long ``worker`` has consumed nothing although offers wait on its partitions (its lag),
    when that is over :data:`STARVED_S`; None otherwise. A worker that holds offers or paused its
    partitions to work through them is busy, not starved."""
    progress = board.worker_stat(worker, "progress_ns")
    if not progress or board.worker_stat(worker, "lag") <= 0 or board.worker_stat(worker, "held"):
        return None
    idle = (now_ns - progress) / 1e9
    return idle if idle > STARVED_S else None
