"""Bounded shared-memory queue between preprocess workers and the inference process of one node.

One memory-mapped file (in ``/dev/shm`` by default) holds fixed slots. Tensors are written once
into a slot, never pickled. Each slot belongs to exactly one preprocess worker and moves through

    FREE ──worker writes──▶ READY ──inference copies──▶ CLAIMED ──output acked──▶ DONE ──worker──▶ FREE
                              ▲                             │
                              └──── delivery failed, retry ─┤──── gave up ──▶ FAILED ──worker──▶ FREE

Only the worker writes FREE→READY and DONE/FAILED→FREE; only the inference process writes the
other transitions. There is no lock anywhere, so a worker killed by SIGKILL cannot wedge the
queue: its READY/CLAIMED slots still finish, and its replacement frees them when they are DONE.
x86-64 keeps stores in order, so a slot's data is visible before its state word.
"""

from __future__ import annotations

import json
import mmap
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FREE", "READY", "CLAIMED", "DONE", "FAILED",
    "WORKER_COUNTERS", "INFERENCE_COUNTERS", "LATENCY_BUCKETS_MS",
    "QueueLayout", "FeatureQueue", "SlotBatch",
]

FREE, READY, CLAIMED, DONE, FAILED = 0, 1, 2, 3, 4

# Counters live in the same file, one writer per cell, so the supervisor can serve metrics
# without asking the workers anything.
WORKER_COUNTERS = ("consumed", "enqueued", "dead_lettered", "image_unused", "pauses", "lag", "heartbeat_ns")
INFERENCE_COUNTERS = ("predicted", "uncertain", "batches", "failed", "inference_ns", "ready", "heartbeat_ns",
                      "uncertain_with_parent")
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)

_HEADER_BYTES = 4096
_ALIGN = 64


@dataclass(frozen=True)
class QueueLayout:
    """Shape of the queue: slot count and per-slot tensor sizes."""

    workers: int
    slots_per_worker: int
    image_size: int
    max_title_tokens: int
    max_mall_tokens: int
    num_classes: int
    max_title_grams: int = 0  # hashed character n-grams per title; 0 for models without that input
    lexical: bool = False  # the lexical model's (K,) scores travel with the offer
    meta_bytes: int = 2048
    error_bytes: int = 512

    @property
    def slots(self) -> int:
        return self.workers * self.slots_per_worker

    def worker_slots(self, worker: int) -> range:
        start = worker * self.slots_per_worker
        return range(start, start + self.slots_per_worker)

    def _fields(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        n, s = self.slots, self.image_size
        return [
            ("state", np.dtype(np.int32), (n,)),
            ("retries", np.dtype(np.int32), (n,)),
            ("enqueued_ns", np.dtype(np.int64), (n,)),
            ("meta_len", np.dtype(np.int32), (n,)),
            ("error_len", np.dtype(np.int32), (n,)),
            ("has_image", np.dtype(np.float32), (n,)),
            ("mall_weight", np.dtype(np.float32), (n,)),
            ("title_ids", np.dtype(np.int64), (n, self.max_title_tokens)),
            ("mall_ids", np.dtype(np.int64), (n, self.max_mall_tokens)),
            ("title_grams", np.dtype(np.int64), (n, self.max_title_grams)),
            ("exclusion", np.dtype(np.bool_), (n, self.num_classes)),
            ("lexical", np.dtype(np.float32), (n, self.num_classes if self.lexical else 0)),
            ("meta", np.dtype(np.uint8), (n, self.meta_bytes)),
            ("error", np.dtype(np.uint8), (n, self.error_bytes)),
            ("worker_stats", np.dtype(np.int64), (self.workers, len(WORKER_COUNTERS))),
            ("inference_stats", np.dtype(np.int64), (len(INFERENCE_COUNTERS),)),
            # in-node latency histogram: counts per bucket (+Inf last), and the sum in microseconds
            ("latency_buckets", np.dtype(np.int64), (len(LATENCY_BUCKETS_MS) + 1,)),
            ("latency_sum_us", np.dtype(np.int64), (1,)),
            ("image", np.dtype(np.uint8), (n, 3, s, s)),
        ]

    def offsets(self) -> tuple[dict[str, tuple[int, np.dtype, tuple[int, ...]]], int]:
        table, offset = {}, _HEADER_BYTES
        for name, dtype, shape in self._fields():
            table[name] = (offset, dtype, shape)
            size = int(np.prod(shape)) * dtype.itemsize
            offset += (size + _ALIGN - 1) // _ALIGN * _ALIGN
        return table, offset


@dataclass(slots=True)
class SlotBatch:
    """Copies of the tensors of several slots, ready for the model. Shapes lead with N."""

    slots: np.ndarray
    image: np.ndarray
    has_image: np.ndarray
    mall_weight: np.ndarray
    title_ids: np.ndarray
    mall_ids: np.ndarray
    title_grams: np.ndarray
    exclusion: np.ndarray
    lexical: np.ndarray
    metas: list[dict[str, Any]]
    enqueued_ns: np.ndarray


class FeatureQueue:
    """A view of the queue file; ``create`` in the supervisor, ``attach`` in each worker."""

    def __init__(self, path: Path, layout: QueueLayout, handle: mmap.mmap, owner: bool):
        self.path = path
        self.layout = layout
        self._mmap = handle
        self._owner = owner
        table, _ = layout.offsets()
        for name, (offset, dtype, shape) in table.items():
            setattr(self, name, np.ndarray(shape, dtype=dtype, buffer=handle, offset=offset))

    @classmethod
    def create(cls, layout: QueueLayout, *, directory: str | Path = "/dev/shm") -> "FeatureQueue":
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"queue directory {directory} does not exist")
        path = directory / f"catstream-queue-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        _, size = layout.offsets()
        header = json.dumps(asdict(layout)).encode()
        with path.open("wb") as handle:
            handle.truncate(size)  # sparse; zero state means every slot starts FREE
            handle.write(header)
        return cls._map(path, layout, owner=True)

    @classmethod
    def attach(cls, path: str | Path) -> "FeatureQueue":
        path = Path(path)
        with path.open("rb") as handle:
            header = handle.read(_HEADER_BYTES).rstrip(b"\0")
        return cls._map(path, QueueLayout(**json.loads(header)), owner=False)

    @classmethod
    def _map(cls, path: Path, layout: QueueLayout, owner: bool) -> "FeatureQueue":
        with path.open("r+b") as handle:
            mapped = mmap.mmap(handle.fileno(), 0)
        return cls(path, layout, mapped, owner)

    @property
    def nbytes(self) -> int:
        return self.layout.offsets()[1]

    # --- worker side -----------------------------------------------------------------------------

    def put(
        self, slot: int, *, image, has_image: bool, title_ids, mall_ids, exclusion, meta: dict, mall_weight: float = 1.0,
        title_grams=None, lexical=None,
    ) -> None:
        """Fill a FREE slot owned by the caller and publish it as READY.

        Raises ``ValueError`` (before touching the slot's state) when ``meta`` does not fit.
        """
        encoded = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()
        if len(encoded) > self.layout.meta_bytes:
            raise ValueError(f"offer metadata of {len(encoded)} bytes exceeds the slot's {self.layout.meta_bytes}")
        self.image[slot] = image
        self.has_image[slot] = 1.0 if has_image else 0.0
        self.mall_weight[slot] = mall_weight
        self.title_ids[slot] = title_ids
        self.mall_ids[slot] = mall_ids
        if self.layout.max_title_grams:
            self.title_grams[slot] = title_grams
        self.exclusion[slot] = exclusion
        if self.layout.lexical:
            self.lexical[slot] = lexical
        self.meta[slot, : len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        self.meta_len[slot] = len(encoded)
        self.retries[slot] = 0
        self.error_len[slot] = 0
        self.enqueued_ns[slot] = time.time_ns()
        self.state[slot] = READY  # last: publishes the slot

    def release(self, slot: int) -> None:
        self.state[slot] = FREE

    def error_of(self, slot: int) -> str:
        return bytes(self.error[slot, : self.error_len[slot]]).decode("utf-8", "replace")

    # --- inference side --------------------------------------------------------------------------

    def ready_slots(self, limit: int) -> np.ndarray:
        """Up to ``limit`` READY slots, oldest first."""
        ready = np.flatnonzero(self.state == READY)
        if len(ready) > limit:
            ready = ready[np.argsort(self.enqueued_ns[ready], kind="stable")[:limit]]
        elif len(ready) > 1:
            ready = ready[np.argsort(self.enqueued_ns[ready], kind="stable")]
        return ready

    def take(self, slot: int) -> None:
        """Mark a READY slot CLAIMED: it belongs to a forming batch."""
        self.state[slot] = CLAIMED

    def claim(self, slots: np.ndarray) -> SlotBatch:
        """Mark ``slots`` CLAIMED and copy their tensors out (the slot stays intact for retries)."""
        self.state[slots] = CLAIMED
        metas = [json.loads(bytes(self.meta[slot, : self.meta_len[slot]])) for slot in slots]
        return SlotBatch(
            slots=np.asarray(slots),
            image=self.image[slots],
            has_image=self.has_image[slots],
            mall_weight=self.mall_weight[slots],
            title_ids=self.title_ids[slots],
            mall_ids=self.mall_ids[slots],
            title_grams=self.title_grams[slots],
            exclusion=self.exclusion[slots],
            lexical=self.lexical[slots],
            metas=metas,
            enqueued_ns=self.enqueued_ns[slots],
        )

    def complete(self, slot: int) -> None:
        self.state[slot] = DONE

    def retry(self, slot: int) -> int:
        """Put a CLAIMED slot back to READY; returns how many retries it has had."""
        self.retries[slot] += 1
        self.state[slot] = READY
        return int(self.retries[slot])

    def fail(self, slot: int, reason: str) -> None:
        encoded = reason.encode("utf-8", "replace")[: self.layout.error_bytes]
        self.error[slot, : len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        self.error_len[slot] = len(encoded)
        self.state[slot] = FAILED

    def count(self, worker: int, name: str, amount: int = 1) -> None:
        """Add to a worker's counter (only that worker writes its row)."""
        self.worker_stats[worker, WORKER_COUNTERS.index(name)] += amount

    def set_worker_stat(self, worker: int, name: str, value: int) -> None:
        self.worker_stats[worker, WORKER_COUNTERS.index(name)] = value

    def worker_counts(self, worker: int) -> dict[str, int]:
        return {name: int(v) for name, v in zip(WORKER_COUNTERS, self.worker_stats[worker]) if name != "heartbeat_ns"}

    def count_inference(self, name: str, amount: int = 1) -> None:
        self.inference_stats[INFERENCE_COUNTERS.index(name)] += amount

    def set_inference_stat(self, name: str, value: int) -> None:
        self.inference_stats[INFERENCE_COUNTERS.index(name)] = value

    def observe_latency(self, milliseconds: np.ndarray) -> None:
        """Record in-node latencies of a batch (inference process only)."""
        index = np.searchsorted(np.asarray(LATENCY_BUCKETS_MS, dtype=np.float64), milliseconds, side="left")
        np.add.at(self.latency_buckets, index, 1)
        self.latency_sum_us[0] += int(np.sum(milliseconds) * 1000.0)

    def depth(self) -> int:
        """Slots waiting for inference (READY)."""
        return int(np.count_nonzero(self.state == READY))

    def close(self) -> None:
        for name, *_ in self.layout._fields():
            setattr(self, name, None)
        self._mmap.close()
        if self._owner:
            self.path.unlink(missing_ok=True)
