"""Bounded shared-memory queue between preprocess workers and the inference process of one node.

One memory-mapped file (in ``/dev/shm`` by default) holds fixed slots. Tensors are written once
into a slot, never pickled. Each slot belongs to exactly one preprocess worker and moves through

    FREE ──worker writes──▶ READY ──inference copies──▶ CLAIMED ──model + decision──▶ SCORED
      ▲                                                    │                            │
      │                                                    └── batch failed ─▶ FAILED   │ worker encodes
      │                                                                          │      ▼ and produces
      └────────────── worker: dead-lettered ◀────────────────────────────────────┘   SENDING
      └────────────── worker: the broker acknowledged the prediction ◀─────────────────┘

The inference process does tensor work only: it writes each offer's decision (label indices and
probabilities) and vectors back into the slot. The worker that owns the slot turns them into the
prediction message, produces it and frees the slot from its own delivery callback, so the Python
work per offer is spread over every worker process.

Only the worker writes FREE→READY, SCORED→SENDING and back to FREE; only the inference process
writes READY→CLAIMED→SCORED/FAILED. There is no lock anywhere, so a worker killed by SIGKILL
cannot wedge the queue: its READY/CLAIMED slots still finish, and its replacement frees them once
SCORED or FAILED (their offsets were never committed, so Kafka delivers the offers again).
x86-64 keeps stores in order, so a slot's data is visible before its state word.

Counters, heartbeats and the serving generation live on the node's board (``core.node_board``),
which outlives the queue: a model change brings a new queue, laid out for the new model.

The contract: a worker puts one offer's inputs (any object with an attribute per
:class:`InputField` of the layout, e.g. ``core.features.OfferFeatures``) and its
:class:`OfferMeta`; the inference process claims slots as one :class:`SlotBatch`, whose
:class:`FeatureBatch` holds the model's inputs by name. The slot layout follows the fields the
featuriser declares, so no code here names a model input.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.decision import BatchDecisions, Decision
from core.images import IMAGE_STATUSES
from core.schemas import MAX_OFFER_ID_CHARS, MAX_TITLE_CHARS
from core.shared_memory import ArraySpec, attach_header, create_mapped_file, map_arrays, mapped_size

__all__ = [
    "CLAIMED",
    "FAILED",
    "FREE",
    "READY",
    "SCORED",
    "SENDING",
    "FeatureBatch",
    "FeatureQueue",
    "InputField",
    "OfferMeta",
    "QueueLayout",
    "ScoredOffer",
    "SlotBatch",
]

FREE, READY, CLAIMED, SCORED, FAILED, SENDING = 0, 1, 2, 3, 4, 5

_OFFER_ID_BYTES = 4 * MAX_OFFER_ID_CHARS  # UTF-8 takes at most 4 bytes a character
_PRODUCT_BYTES = 16
_TITLE_BYTES = 4 * MAX_TITLE_CHARS
_IMAGE_SHA_BYTES = 32


def _digest_bytes(digest: str | None, size: int) -> np.ndarray:
    """A hex digest as ``(size,)`` uint8; all zero for None (no digest is all zero in practice)."""
    if digest is None:
        return np.zeros(size, dtype=np.uint8)
    raw = bytes.fromhex(digest)
    if len(raw) != size:
        raise ValueError(f"expected a digest of {size} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8)


def _digest_hex(raw: np.ndarray) -> str | None:
    return raw.tobytes().hex() if raw.any() else None


@dataclass(frozen=True, slots=True)
class InputField:
    """One array an offer carries from the featuriser to the model: its name, dtype and per-offer shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> InputField:
        return cls(str(value["name"]), str(value["dtype"]), tuple(int(n) for n in value["shape"]))


@dataclass(slots=True)
class FeatureBatch:
    """The inputs of N offers: one ``(N, *field.shape)`` array per :class:`InputField`, by name."""

    inputs: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    @classmethod
    def stack(cls, offers: Sequence[Any], declared: Sequence[InputField]) -> FeatureBatch:
        """The ``declared`` inputs of ``offers`` (objects with an attribute per field) in one batch."""
        return cls(
            {
                field.name: np.stack([np.asarray(getattr(offer, field.name), dtype=field.dtype) for offer in offers])
                if len(offers)
                else np.zeros((0, *field.shape), dtype=field.dtype)
                for field in declared
            }
        )

    @property
    def exclusion(self) -> np.ndarray:
        """``(N, K)`` bool: categories the dictionary rules out for each offer."""
        return self.inputs["exclusion"]

    @property
    def lexical(self) -> np.ndarray | None:
        """``(N, K)`` lexical scores, added to the network's logits; None for models without them."""
        return self.inputs.get("lexical")


@dataclass(frozen=True, slots=True)
class OfferMeta:
    """What the stream needs to know of an offer in a slot besides its inputs."""

    offer_id: str
    partition: int
    offset: int
    image_status: str  # one of core.images.IMAGE_STATUSES
    produced_ms: float | None  # the Kafka message's create time; None when the broker gave none
    preprocess_ms: float  # time the worker spent on it
    product: str | None = None  # core.text.product_key of the title: 32 hex digits
    title: str = ""  # the shop's title, as parsed (for the lexical candidate source downstream)
    image_sha: str | None = None  # SHA-256 of the image bytes: 64 hex digits


@dataclass(frozen=True, slots=True)
class ScoredOffer:
    """A SCORED slot as its worker reads it back: what it put in, the decision, the vectors."""

    meta: OfferMeta
    decision: Decision
    vectors: dict[str, np.ndarray] | None  # space -> (D,) float16; None for a model without an embedder
    queue_wait_ms: float  # from the put to the end of the offer's batch (its inference included)
    inference_ms: float  # the model's time on the offer's batch (deciding after it counts as queue wait)
    batch_size: int


@dataclass(frozen=True)
class QueueLayout:
    """Shape of the queue: slot count, the input fields every slot holds, and the vectors the
    model gives back for each offer (``vectors``: one float16 field per space, none without an
    embedder)."""

    workers: int
    slots_per_worker: int
    fields: tuple[InputField, ...]
    error_bytes: int = 512
    vectors: tuple[InputField, ...] = ()

    def __post_init__(self):
        if self.workers < 1 or self.slots_per_worker < 1:
            raise ValueError("a queue needs at least one worker and one slot per worker")
        names = [field.name for field in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"input field names repeat: {names}")

    @property
    def slots(self) -> int:
        return self.workers * self.slots_per_worker

    def worker_slots(self, worker: int) -> range:
        start = worker * self.slots_per_worker
        return range(start, start + self.slots_per_worker)

    def field(self, name: str) -> InputField:
        return next(field for field in self.fields if field.name == name)

    def to_dict(self) -> dict:
        return {
            "workers": self.workers,
            "slots_per_worker": self.slots_per_worker,
            "error_bytes": self.error_bytes,
            "fields": [field.to_dict() for field in self.fields],
            "vectors": [field.to_dict() for field in self.vectors],
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> QueueLayout:
        return cls(
            workers=int(value["workers"]),
            slots_per_worker=int(value["slots_per_worker"]),
            error_bytes=int(value["error_bytes"]),
            fields=tuple(InputField.from_dict(f) for f in value["fields"]),
            vectors=tuple(InputField.from_dict(f) for f in value.get("vectors", ())),
        )

    def _arrays(self) -> list[ArraySpec]:
        n = self.slots
        return [
            ("state", np.dtype(np.int32), (n,)),
            ("retries", np.dtype(np.int32), (n,)),
            ("enqueued_ns", np.dtype(np.int64), (n,)),
            ("error_len", np.dtype(np.int32), (n,)),
            ("offer_id_len", np.dtype(np.int32), (n,)),
            ("title_len", np.dtype(np.int32), (n,)),
            ("partition", np.dtype(np.int32), (n,)),
            ("offset", np.dtype(np.int64), (n,)),
            ("image_status", np.dtype(np.int8), (n,)),
            ("produced_ms", np.dtype(np.float64), (n,)),
            ("preprocess_ms", np.dtype(np.float64), (n,)),
            ("offer_id", np.dtype(np.uint8), (n, _OFFER_ID_BYTES)),
            ("product", np.dtype(np.uint8), (n, _PRODUCT_BYTES)),  # all zero: none
            ("title", np.dtype(np.uint8), (n, _TITLE_BYTES)),
            ("image_sha", np.dtype(np.uint8), (n, _IMAGE_SHA_BYTES)),
            ("error", np.dtype(np.uint8), (n, self.error_bytes)),
            # What the inference process writes back (core.decision.BatchDecisions, and timings).
            ("category", np.dtype(np.int32), (n,)),
            ("confidence", np.dtype(np.float64), (n,)),
            ("top", np.dtype(np.int32), (n, 3)),
            ("top_p", np.dtype(np.float64), (n, 3)),
            ("excluded", np.dtype(np.int32), (n,)),
            ("parent", np.dtype(np.int32), (n,)),
            ("parent_p", np.dtype(np.float64), (n,)),
            ("scored_ns", np.dtype(np.int64), (n,)),
            ("inference_ms", np.dtype(np.float64), (n,)),
            ("batch_size", np.dtype(np.int32), (n,)),
            *((f"input_{field.name}", np.dtype(field.dtype), (n, *field.shape)) for field in self.fields),
            *((f"vector_{field.name}", np.dtype(field.dtype), (n, *field.shape)) for field in self.vectors),
        ]

    def nbytes(self) -> int:
        return mapped_size(self._arrays())


@dataclass(slots=True)
class SlotBatch:
    """Copies of several slots' model inputs, oldest first, with when and how fast each was put:
    all the inference process reads (the offers' metadata stays for their workers). The features
    may hold more rows than slots: padding, copies of the last offer's."""

    slots: np.ndarray  # (N,) slot indices
    features: FeatureBatch
    enqueued_ns: np.ndarray  # (N,) when each offer was put on the queue
    preprocess_ms: np.ndarray  # (N,) what its worker spent on it

    def __len__(self) -> int:
        return len(self.slots)


class FeatureQueue:
    """A view of the queue file; ``create`` in the supervisor, ``attach`` in each worker."""

    def __init__(self, path: Path, layout: QueueLayout, owner: bool):
        self.path = path
        self.layout = layout
        self._owner = owner
        self._mmap, self._views = map_arrays(path, layout._arrays())
        self.inputs = {field.name: self._views[f"input_{field.name}"] for field in layout.fields}
        self.vectors = {field.name: self._views[f"vector_{field.name}"] for field in layout.vectors}
        self.state = self._views["state"]
        self.retries = self._views["retries"]
        self.enqueued_ns = self._views["enqueued_ns"]

    @classmethod
    def create(cls, layout: QueueLayout, *, directory: str | Path = "/dev/shm") -> FeatureQueue:
        """A new queue file (every slot FREE) in ``directory``; the creator removes it on :meth:`close`."""
        path = create_mapped_file(directory, "catstream-queue", layout.to_dict(), layout._arrays())
        return cls(path, layout, owner=True)

    @classmethod
    def attach(cls, path: str | Path) -> FeatureQueue:
        path = Path(path)
        return cls(path, QueueLayout.from_dict(attach_header(path)), owner=False)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes()

    # --- worker side -----------------------------------------------------------------------------

    def put(self, slot: int, features: Any, meta: OfferMeta) -> None:
        """Fill a FREE slot owned by the caller with ``features`` (an attribute per input field, e.g.
        ``core.features.OfferFeatures``) and ``meta``, and publish it as READY."""
        offer_id = meta.offer_id.encode("utf-8")
        if len(offer_id) > _OFFER_ID_BYTES:  # parse_offer bounds offer_id to MAX_OFFER_ID_CHARS characters
            raise ValueError(f"offer_id of {len(offer_id)} bytes exceeds the slot's {_OFFER_ID_BYTES}")
        for name, array in self.inputs.items():
            array[slot] = getattr(features, name)
        views = self._views
        views["offer_id"][slot, : len(offer_id)] = np.frombuffer(offer_id, dtype=np.uint8)
        views["offer_id_len"][slot] = len(offer_id)
        views["partition"][slot] = meta.partition
        views["offset"][slot] = meta.offset
        views["image_status"][slot] = IMAGE_STATUSES.index(meta.image_status)
        views["produced_ms"][slot] = math.nan if meta.produced_ms is None else meta.produced_ms
        views["preprocess_ms"][slot] = meta.preprocess_ms
        views["product"][slot] = _digest_bytes(meta.product, _PRODUCT_BYTES)
        title = meta.title.encode("utf-8")[:_TITLE_BYTES]
        views["title"][slot, : len(title)] = np.frombuffer(title, dtype=np.uint8)
        views["title_len"][slot] = len(title)
        views["image_sha"][slot] = _digest_bytes(meta.image_sha, _IMAGE_SHA_BYTES)
        self.retries[slot] = 0
        views["error_len"][slot] = 0
        self.enqueued_ns[slot] = time.time_ns()
        self.state[slot] = READY  # last: publishes the slot

    def release(self, slot: int) -> None:
        self.state[slot] = FREE

    def sending(self, slot: int) -> None:
        """Mark a SCORED slot SENDING: its worker produced the prediction and waits for the broker."""
        self.state[slot] = SENDING

    def scored(self, slot: int, labels: tuple[str, ...]) -> ScoredOffer:
        """What the inference process wrote back into a SCORED ``slot``, decided over ``labels``
        (the labels of the bundle this queue serves)."""
        views = self._views
        row = BatchDecisions(
            category=views["category"][slot : slot + 1],
            confidence=views["confidence"][slot : slot + 1],
            top=views["top"][slot : slot + 1],
            top_p=views["top_p"][slot : slot + 1],
            excluded=views["excluded"][slot : slot + 1],
            parent=views["parent"][slot : slot + 1],
            parent_p=views["parent_p"][slot : slot + 1],
        )
        return ScoredOffer(
            meta=self.meta_of(slot),
            decision=row.decision(0, labels),
            vectors={space: array[slot].copy() for space, array in self.vectors.items()} or None,
            queue_wait_ms=(int(views["scored_ns"][slot]) - int(self.enqueued_ns[slot])) / 1e6,
            inference_ms=float(views["inference_ms"][slot]),
            batch_size=int(views["batch_size"][slot]),
        )

    def error_of(self, slot: int) -> str:
        return bytes(self._views["error"][slot, : self._views["error_len"][slot]]).decode("utf-8", "replace")

    def meta_of(self, slot: int) -> OfferMeta:
        """The metadata a worker put into ``slot``."""
        views = self._views
        produced = float(views["produced_ms"][slot])
        return OfferMeta(
            offer_id=bytes(views["offer_id"][slot, : views["offer_id_len"][slot]]).decode("utf-8"),
            partition=int(views["partition"][slot]),
            offset=int(views["offset"][slot]),
            image_status=IMAGE_STATUSES[int(views["image_status"][slot])],
            produced_ms=None if math.isnan(produced) else produced,
            preprocess_ms=float(views["preprocess_ms"][slot]),
            product=_digest_hex(views["product"][slot]),
            title=bytes(views["title"][slot, : views["title_len"][slot]]).decode("utf-8", "replace"),
            image_sha=_digest_hex(views["image_sha"][slot]),
        )

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

    def gather_buffers(self, rows: int) -> dict[str, np.ndarray]:
        """Arrays of ``rows`` rows for every input field, for :meth:`claim` to gather into."""
        return {name: np.empty((rows, *array.shape[1:]), dtype=array.dtype) for name, array in self.inputs.items()}

    def claim(self, slots: np.ndarray, *, into: dict[str, np.ndarray] | None = None, rows: int = 0) -> SlotBatch:
        """Mark ``slots`` CLAIMED and copy their inputs out (array copies, nothing per offer).

        ``into`` (from :meth:`gather_buffers`): gather into those arrays instead of new ones, and
        fill them up to ``rows`` rows (a padded batch size) with copies of the last offer's inputs;
        the batch's features are views of the first ``max(rows, N)`` rows.
        """
        slots = np.asarray(slots)
        self.state[slots] = CLAIMED
        if into is None:
            features = {name: array[slots] for name, array in self.inputs.items()}
        else:
            count = len(slots)
            filled = max(rows, count)
            features = {}
            for name, array in self.inputs.items():
                out = into[name][:filled]
                np.take(array, slots, axis=0, out=out[:count], mode="clip")  # "raise" would buffer
                if filled > count and count:
                    out[count:] = out[count - 1]
                features[name] = out
        return SlotBatch(
            slots=slots,
            features=FeatureBatch(features),
            enqueued_ns=self.enqueued_ns[slots],
            preprocess_ms=self._views["preprocess_ms"][slots],
        )

    def score(
        self, slots: np.ndarray, decisions: BatchDecisions, vectors: Mapping[str, np.ndarray], *, inference_ms: float
    ) -> None:
        """Write a batch's decisions and vectors (by space, ``(N, D)``) into its CLAIMED ``slots``,
        then mark them SCORED. A few array writes for the whole batch."""
        slots = np.asarray(slots)
        views = self._views
        for name in ("category", "confidence", "top", "top_p", "excluded", "parent", "parent_p"):
            views[name][slots] = getattr(decisions, name)
        for space, array in self.vectors.items():
            array[slots] = vectors[space]
        views["inference_ms"][slots] = inference_ms
        views["batch_size"][slots] = len(slots)
        views["scored_ns"][slots] = time.time_ns()
        self.state[slots] = SCORED  # last: hands the slots back to their workers

    def fail(self, slot: int, reason: str) -> None:
        encoded = reason.encode("utf-8", "replace")[: self.layout.error_bytes]
        self._views["error"][slot, : len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        self._views["error_len"][slot] = len(encoded)
        self.state[slot] = FAILED

    def depth(self) -> int:
        """Slots waiting for inference (READY)."""
        return int(np.count_nonzero(self.state == READY))

    def in_use(self) -> int:
        """Slots not FREE: offers on their way, or finished and not yet freed by their worker."""
        return int(np.count_nonzero(self.state != FREE))

    def close(self) -> None:
        self._views.clear()
        self.inputs = {}
        for name in ("state", "retries", "enqueued_ns"):
            setattr(self, name, None)
        with contextlib.suppress(BufferError):  # a view still in use elsewhere: the mapping goes with it
            self._mmap.close()
        if self._owner:
            self.path.unlink(missing_ok=True)
