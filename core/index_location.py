"""Opening the offer index a location names: a directory (embedded Faiss, the default) or a
Qdrant location. The indexer, the CLI and the benchmarks open indexes through here."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from core.faiss_index import FaissIndex
from core.offer_index import OfferIndex, OfferIndexError

__all__ = ["open_index"]


def open_index(
    location: str, *, spaces: Mapping[str, int] | None = None, collection: str = "offers"
) -> OfferIndex | None:
    """The offer index at ``location``: a directory for the embedded Faiss engine (the default),
    ``qdrant+http(s)://host:port`` for a Qdrant server, ``qdrant:PATH`` or ``qdrant::memory:`` for
    Qdrant's in-process local mode.

    Without ``spaces``, an index saved there is opened and ``None`` is returned when there is none
    yet (the indexer then creates it from the first vectors it sees). A Qdrant server that cannot
    be reached raises :class:`core.offer_index.IndexUnavailableError`.
    """
    if location.startswith("qdrant"):
        from core.qdrant_index import (
            QdrantIndex,  # an optional dependency (the qdrant extra), loaded for this engine only
        )

        target = (
            location.removeprefix("qdrant+") if location.startswith("qdrant+") else location.removeprefix("qdrant:")
        )
        client = QdrantIndex.client_for(target)
        try:
            spaces = spaces or QdrantIndex.saved_spaces(client, collection)
            if spaces is None:
                client.close()
                return None
            return QdrantIndex(client, collection=collection, spaces=spaces)
        except Exception:
            client.close()
            raise
    if spaces is None and not (Path(location) / "manifest.json").exists():
        if Path(location).exists() and any(Path(location).iterdir()):
            raise OfferIndexError(f"{location} holds files but no manifest.json: not an offer index, or a damaged one")
        return None
    return FaissIndex.open(location, spaces=spaces)
