"""The retrieval stage: the offer indexer that keeps the offer index (``core.offer_index``)
current from the predictions stream and publishes candidate duplicates."""

from __future__ import annotations

from retrieval.indexer import OfferIndexer, candidates_of, matched_message

__all__ = ["OfferIndexer", "candidates_of", "matched_message"]
