"""The offer index contract: upsert by ``offer_id``, delete, top-k search inside a category, and
save/load together with the Kafka offsets the index has consumed.

Two engines keep it: :class:`core.faiss_index.FaissIndex` (embedded, the default) and
:class:`core.qdrant_index.QdrantIndex` (a Qdrant cluster, for when one machine is not
enough). Both pass the same contract tests (``tests/unit/test_offer_index.py``).

An offer carries one L2-normalised vector per *space* (``image``, ``text``, ``fused``); scores
are inner products, so cosine similarities in [-1, 1]. A category filter names a path or any
prefix of it (``"Men > Footwear"`` holds ``"Men > Footwear > Shoes > Casual Shoes"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from core.dictionaries import PATH_SEPARATOR

__all__ = [
    "Hit",
    "IndexUnavailableError",
    "IndexedOffer",
    "OfferIndex",
    "OfferIndexError",
    "Offsets",
    "category_prefixes",
    "checked_queries",
    "normalised",
]

# (topic, partition) -> the next offset to read: what the index holds is everything before it.
Offsets = dict[tuple[str, int], int]


class OfferIndexError(ValueError):
    """The index cannot be opened or used as asked: a corrupt file, a missing space, a bad vector.
    A ``ValueError``: each is bad input (a file, a message, a query), reported as such."""


class IndexUnavailableError(RuntimeError):
    """The engine cannot be reached now (a Qdrant server down, restarting or overloaded). Nothing
    was wrong with the request: the indexer retries with backoff and the query service answers 503
    meanwhile, instead of exiting and being restarted in a loop."""


@dataclass(frozen=True)
class IndexedOffer:
    """One offer as the index keeps it.

    ``product`` groups the listings of one product (its duplicates across shops); ``image_sha``
    is the SHA-256 of the image bytes. Both let a search leave out the query's own product and
    byte-identical images. ``title`` feeds the lexical candidate source.
    """

    offer_id: str
    category: str
    vectors: Mapping[str, np.ndarray]  # space -> (D,) float32, L2-normalised
    product: str | None = None
    image_sha: str | None = None
    listed_at: str | None = None
    title: str | None = None  # the shop's title, for the lexical candidate source


@dataclass(frozen=True)
class Hit:
    """One search result, with what a caller needs to filter it without a second lookup."""

    offer_id: str
    score: float
    category: str
    product: str | None = None
    image_sha: str | None = None
    listed_at: str | None = None
    extra: dict[str, object] = field(default_factory=dict, compare=False)


class OfferIndex(Protocol):
    """What every engine does."""

    @property
    def spaces(self) -> Mapping[str, int]:
        """Each space's name and dimension."""
        ...

    def upsert(self, offers: Sequence[IndexedOffer]) -> None:
        """Add offers, replacing any already held under the same ``offer_id`` (so redelivery is harmless)."""
        ...

    def delete(self, offer_ids: Iterable[str]) -> int:
        """Remove offers; returns how many were held. Unknown ids are ignored."""
        ...

    def get(self, offer_id: str) -> IndexedOffer | None:
        """The offer held under ``offer_id``, vectors included, or ``None``."""
        ...

    def titles(self) -> Iterator[tuple[str, str]]:
        """``(offer_id, title)`` of every held offer that has a title: what the lexical candidate
        source (:class:`core.title_index.TitleIndex`) is rebuilt from when the index is opened."""
        ...

    def count(self, category: str | None = None) -> int:
        """How many offers are held, all or under ``category`` (a path or a prefix of one)."""
        ...

    def search(self, space: str, queries: np.ndarray, *, k: int, category: str | None = None) -> list[list[Hit]]:
        """For each row of ``queries`` ``(N, D)``, the ``k`` nearest offers in ``space`` (best first),
        only among offers under ``category`` when it is given."""
        ...

    def save(self, offsets: Offsets) -> None:
        """Persist what the index holds together with ``offsets``, atomically."""
        ...

    def offsets(self) -> Offsets:
        """The offsets saved with the state the index was opened from (empty for a new index)."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...


def category_prefixes(category: str) -> list[str]:
    """``"A > B > C"`` -> ``["A", "A > B", "A > B > C"]``: every filter that holds ``category``."""
    parts = [part.strip() for part in category.split(PATH_SEPARATOR.strip())]
    return [PATH_SEPARATOR.join(parts[: depth + 1]) for depth in range(len(parts))]


def checked_queries(spaces: Mapping[str, int], space: str, queries: np.ndarray, k: int) -> np.ndarray:
    """``queries`` ready for :meth:`OfferIndex.search` in ``space``, or the reason they are not."""
    if space not in spaces:
        raise OfferIndexError(f"unknown space {space!r}; this index holds {sorted(spaces)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return normalised(queries, dimension=spaces[space], what="query")


def normalised(vectors: np.ndarray, *, dimension: int, what: str) -> np.ndarray:
    """``vectors`` as a C-contiguous ``(N, dimension)`` float32 array with unit rows.

    Raises :class:`OfferIndexError` for a wrong shape or a non-finite value, since one NaN would
    poison every inner product it meets.
    """
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dimension:
        raise OfferIndexError(f"{what}: expected vectors of dimension {dimension}, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise OfferIndexError(f"{what}: vectors hold NaN or infinity")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise OfferIndexError(f"{what}: a zero vector has no direction")
    return np.ascontiguousarray(array / norms)
