"""Messages that cross stage boundaries: offers in, predictions and dead letters out.

``parse_offer`` is total: any bytes give either an :class:`Offer` or a :class:`Rejection` with a
readable reason, never an exception, so a bad message can always be dead-lettered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MAX_OFFER_ID_CHARS",
    "MAX_TITLE_CHARS",
    "SCHEMA_VERSION",
    "UNCERTAIN",
    "DeadLetter",
    "Offer",
    "Prediction",
    "Rejection",
    "dead_letter",
    "decode_vectors",
    "encode_vectors",
    "parse_offer",
]

SCHEMA_VERSION = 1
UNCERTAIN = "uncertain"
MAX_OFFER_ID_CHARS = 200
MAX_TITLE_CHARS = 2000
_MAX_FIELD_CHARS = 5000

_STRING_FIELDS = ("mall_id", "mall_category", "image_url", "image_b64", "listed_at")


@dataclass(frozen=True, slots=True)
class Offer:
    """One marketplace offer as published to the ``offers`` topic."""

    offer_id: str
    title: str
    mall_id: str | None = None
    mall_category: str | None = None
    image_url: str | None = None
    image_b64: str | None = None
    listed_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_message(self) -> dict[str, Any]:
        """The JSON object published for this offer (``None`` fields left out)."""
        message: dict[str, Any] = {"schema_version": SCHEMA_VERSION, **self.extra}
        message["offer_id"] = self.offer_id
        message["title"] = self.title
        for name in _STRING_FIELDS:
            value = getattr(self, name)
            if value is not None:
                message[name] = value
        return message

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_message(), ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message could not become an offer."""

    reason: str
    error_type: str


def parse_offer(raw: bytes | None, *, max_bytes: int) -> Offer | Rejection:
    """Parse one offer message; never raises.

    Accepts UTF-8 JSON objects with a non-empty string ``title`` and an ``offer_id`` (string or
    integer). Optional fields must be strings when present; ``image_url`` or ``image_b64`` may
    carry the image. Unknown fields are kept in ``extra``.
    """
    if raw is None:
        return Rejection("empty message (no value)", "EmptyMessage")
    if len(raw) > max_bytes:
        return Rejection(f"message of {len(raw)} bytes exceeds the limit of {max_bytes}", "OversizedMessage")
    try:
        document = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as error:
        return Rejection(f"not UTF-8: {error}", "UnicodeDecodeError")
    except (ValueError, RecursionError) as error:
        return Rejection(f"malformed JSON: {error}", type(error).__name__)
    if not isinstance(document, dict):
        return Rejection(f"expected a JSON object, got {type(document).__name__}", "SchemaError")

    version = document.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        return Rejection(f"unsupported schema_version {version!r} (this worker reads {SCHEMA_VERSION})", "SchemaError")

    offer_id = document.get("offer_id")
    if isinstance(offer_id, bool) or not isinstance(offer_id, (str, int)):
        return Rejection("offer_id is missing or not a string/integer", "SchemaError")
    offer_id = str(offer_id).strip()
    if not offer_id or len(offer_id) > MAX_OFFER_ID_CHARS:
        return Rejection(f"offer_id must have 1 to {MAX_OFFER_ID_CHARS} characters", "SchemaError")

    title = document.get("title")
    if not isinstance(title, str):
        return Rejection("title is missing or not a string", "SchemaError")
    title = title.strip()
    if not title:
        return Rejection("title is empty", "SchemaError")
    if len(title) > MAX_TITLE_CHARS:
        return Rejection(f"title longer than {MAX_TITLE_CHARS} characters", "SchemaError")

    optional: dict[str, str | None] = {}
    for name in _STRING_FIELDS:
        value = document.get(name)
        if value is not None and not isinstance(value, str):
            return Rejection(f"{name} must be a string, got {type(value).__name__}", "SchemaError")
        if value is not None and name != "image_b64" and len(value) > _MAX_FIELD_CHARS:
            return Rejection(f"{name} longer than {_MAX_FIELD_CHARS} characters", "SchemaError")
        optional[name] = value or None

    known = {"schema_version", "offer_id", "title", *_STRING_FIELDS}
    extra = {key: value for key, value in document.items() if key not in known}
    return Offer(offer_id=offer_id, title=title, extra=extra, **optional)


def _reject_constant(name: str) -> float:
    # NaN/Infinity are not JSON; accepting them would make outputs non-JSON too.
    raise ValueError(f"non-JSON constant {name}")


@dataclass(frozen=True, slots=True)
class Prediction:
    """What the stream says about one offer (topic ``offers.categorized``, key ``offer_id``)."""

    offer_id: str
    category: str
    confidence: float
    top3: list[tuple[str, float]]
    model_version: str
    image_used: bool
    image_status: str
    timings_ms: dict[str, float]
    excluded_categories: int = 0
    confident_parent: tuple[str, float] | None = None  # only when ``category`` is uncertain
    vectors: dict[str, np.ndarray] | None = None  # space -> (D,) float16, when the model has an embedder
    product: str | None = None  # core.text.product_key of the title: the listings of one product share it
    title: str | None = None  # the shop's title, for readers that match or search offers
    image_sha: str | None = None  # SHA-256 of the image bytes, when there were any

    def to_bytes(self) -> bytes:
        document = {
            "schema_version": SCHEMA_VERSION,
            "offer_id": self.offer_id,
            "category": self.category,
            "confidence": _finite(self.confidence),
            "top3": [{"category": name, "probability": _finite(p)} for name, p in self.top3],
            "model_version": self.model_version,
            "image_used": self.image_used,
            "image_status": self.image_status,
            "excluded_categories": self.excluded_categories,
            "confident_parent": None
            if self.confident_parent is None
            else {"category": self.confident_parent[0], "probability": _finite(self.confident_parent[1])},
            "timings_ms": {stage: round(ms, 3) for stage, ms in self.timings_ms.items()},
            "title": self.title,
            "product": self.product,
            "image_sha": self.image_sha,
        }
        if self.vectors:
            document["vectors"] = encode_vectors(self.vectors)
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def encode_vectors(vectors: dict[str, np.ndarray]) -> dict[str, str]:
    """``{"dtype": "float16", space: base64 of the little-endian values}``: a prediction's vectors."""
    encoded = {"dtype": "float16"}
    for space, vector in vectors.items():
        encoded[space] = base64.b64encode(np.asarray(vector, dtype="<f2").tobytes()).decode("ascii")
    return encoded


def decode_vectors(document: dict[str, Any]) -> dict[str, np.ndarray]:
    """The vectors of a prediction document as float32 arrays by space (empty when it has none);
    ``fused`` is rebuilt from ``image`` and ``text`` when the message leaves it out, as nodes do.

    Raises ``ValueError`` for an unknown dtype or a value that is not base64 of whole float16s.
    """
    encoded = document.get("vectors")
    if not encoded:
        return {}
    if not isinstance(encoded, dict) or encoded.get("dtype") != "float16":
        raise ValueError("prediction vectors must be an object with dtype float16")
    vectors = {}
    for space, text in encoded.items():
        if space == "dtype":
            continue
        raw = base64.b64decode(text, validate=True)
        if len(raw) % 2 or not raw:
            raise ValueError(f"vector {space!r} is not a whole number of float16 values")
        vectors[space] = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if "fused" not in vectors and "image" in vectors and "text" in vectors:
        # Sent without it: the fused vector is [image, text] / sqrt(2) (core.embedder).
        fused = np.concatenate([vectors["image"], vectors["text"]]) / math.sqrt(2.0)
        vectors["fused"] = fused.astype(np.float32)
    return vectors


def _finite(value: float) -> float:
    return round(float(value), 6) if math.isfinite(value) else 0.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record for the dead-letter topic: the original key, bytes and headers (truncated when
    they do not fit) plus headers saying where, why and what failed."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def size(self) -> int:
        """Bytes of key, value and headers (what the broker's message size limit counts, give or
        take the record's own framing)."""
        return len(self.key or b"") + len(self.value or b"") + sum(len(k) + len(v) for k, v in self.headers)


# The record's own framing (offsets, lengths, timestamps) and each header's, kept out of the budget.
_RECORD_OVERHEAD = 512
_HEADER_OVERHEAD = 16
_MAX_REASON_BYTES = 1000


def dead_letter(
    key: bytes | None,
    value: bytes | None,
    original_headers: list[tuple[str, bytes]] | None,
    *,
    stage: str,
    rejection: Rejection,
    source: str,
    max_bytes: int,
) -> DeadLetter:
    """The dead letter of a message, at most ``max_bytes`` in all.

    A message that fits is kept whole. One that does not keeps as much of its value as fits, its
    key cut to a quarter of the budget and its original headers while they fit in another quarter;
    the headers ``catstream.original_bytes`` (value size), ``catstream.original_sha256`` (of the
    whole value) and ``catstream.truncated`` (``value``, ``key``, ``headers``, as cut) say so.
    Never raises: any bytes give a dead letter.
    """
    ours = [
        ("catstream.stage", stage.encode()),
        ("catstream.reason", rejection.reason.encode("utf-8", "replace")[:_MAX_REASON_BYTES]),
        ("catstream.error_type", rejection.error_type.encode("utf-8", "replace")[:200]),
        ("catstream.source", source.encode("utf-8", "replace")[:500]),
    ]
    original = list(original_headers or [])
    whole = DeadLetter(key, value, original + ours)
    if whole.size + _RECORD_OVERHEAD + _HEADER_OVERHEAD * len(whole.headers) <= max_bytes:
        return whole
    budget = max_bytes - _RECORD_OVERHEAD
    truncated = []
    kept_headers: list[tuple[str, bytes]] = []
    used = 0
    for name, header in original:
        cost = len(name) + len(header or b"") + _HEADER_OVERHEAD
        if used + cost > budget // 4:
            truncated.append("headers")
            break
        kept_headers.append((name, header))
        used += cost
    if key is not None and len(key) > budget // 4:
        key = key[: budget // 4]
        truncated.append("key")
    data = value or b""
    ours += [
        ("catstream.original_bytes", str(len(data)).encode()),
        ("catstream.original_sha256", hashlib.sha256(data).hexdigest().encode()),
    ]
    framing = sum(len(k) + len(v) + _HEADER_OVERHEAD for k, v in ours) + len("catstream.truncated") + 32
    room = max(0, budget - used - len(key or b"") - framing)
    if len(data) > room:
        data = data[:room]
        truncated.insert(0, "value")
    ours.append(("catstream.truncated", ",".join(truncated).encode()))
    return DeadLetter(key, data if value is not None else None, kept_headers + ours)
