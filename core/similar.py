"""Similar products inside the category tree: the query's leaf first, then its siblings under the
parent, then higher, until ``k`` results are found.

A result is never the query offer, another listing of the query's product (same ``product``
key), or an offer with byte-identical image bytes (same ``image_sha``): those are duplicates,
which a product page shows as "other sellers", not as alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.offer_index import Hit, IndexedOffer, OfferIndex, category_prefixes

__all__ = ["Similar", "similar_offers"]


@dataclass(frozen=True)
class Similar:
    """One recommendation. ``level`` is how far up the tree it was found: 0 in the query's leaf,
    1 under the leaf's parent (a sibling leaf), and so on; ``scope`` is the category searched."""

    hit: Hit
    level: int
    scope: str | None


def similar_offers(index: OfferIndex, query: IndexedOffer, *, k: int, space: str = "fused") -> list[Similar]:
    """The ``k`` offers most like ``query`` in ``space``, widening from its leaf up the tree.

    Each scope is searched for enough candidates to fill ``k`` after the exclusions; when the
    exclusions eat a page, the same scope is searched again with a larger page (the excluded are
    few, duplicates of one product, so this is rare and bounded by the scope's size).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    vector = np.asarray(query.vectors[space], dtype=np.float32)
    scopes: list[str | None] = [*reversed(category_prefixes(query.category)), None]
    found: list[Similar] = []
    seen: set[str] = set()
    for level, scope in enumerate(scopes):
        available = index.count(scope)
        page = k + 8
        while True:
            hits = index.search(space, vector, k=min(page, max(available, 1)), category=scope)[0]
            fresh = [hit for hit in hits if hit.offer_id not in seen and not _duplicate(hit, query)]
            if len(found) + len(fresh) >= k or len(hits) >= available:
                break
            page *= 4
        for hit in fresh[: k - len(found)]:
            seen.add(hit.offer_id)
            found.append(Similar(hit=hit, level=level, scope=scope))
        if len(found) >= k:
            break
    return found


def _duplicate(hit: Hit, query: IndexedOffer) -> bool:
    return (
        hit.offer_id == query.offer_id
        or (query.product is not None and hit.product == query.product)
        or (query.image_sha is not None and hit.image_sha == query.image_sha)
    )
