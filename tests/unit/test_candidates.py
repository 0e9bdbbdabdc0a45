"""Duplicate candidates of one batch (``retrieval.indexer.candidates_of``), as the indexer makes
them: upsert the batch, then search for it. Offers of one batch find each other, never
themselves; a pair only the titles join comes out first or second."""

from __future__ import annotations

import numpy as np

from core.faiss_index import FaissIndex
from core.offer_index import IndexedOffer
from core.title_index import TitleIndex
from retrieval.indexer import candidates_of

SPACES = {"image": 8, "text": 8, "fused": 16}


def offer(offer_id: str, rng, *, vectors=None, title=None) -> IndexedOffer:
    if vectors is None:
        vectors = {space: rng.normal(size=size) for space, size in SPACES.items()}
    unit = {space: (v / np.linalg.norm(v)).astype(np.float32) for space, v in vectors.items()}
    return IndexedOffer(offer_id=offer_id, category="Men > Footwear > Shoes", vectors=unit, title=title)


def test_offers_of_one_batch_find_each_other_and_never_themselves():
    rng = np.random.default_rng(0)
    index = FaissIndex(SPACES, mode="exact")
    index.upsert([offer(f"old-{n}", rng) for n in range(200)])
    twin = {space: rng.normal(size=size) for space, size in SPACES.items()}
    batch = [
        offer("twin-a", rng, vectors=twin),
        offer("twin-b", rng, vectors=twin),
        offer("shop-a", rng, title="Rocia Women Beige Solid Ballerina Flats"),
        offer("shop-b", rng, title="ROCIA women beige ballerina flats (solid)"),
    ]
    index.upsert(batch)
    titles = TitleIndex()
    titles.upsert((o.offer_id, o.title) for o in batch if o.title)
    found = dict(zip((o.offer_id for o in batch), candidates_of(index, batch, k=5, titles=titles), strict=True))
    for one, other in (("twin-a", "twin-b"), ("twin-b", "twin-a")):
        best = found[one][0]
        assert best["offer_id"] == other and set(best["scores"]) == set(SPACES)
        assert all(score > 0.99 for score in best["scores"].values())
    for one, other in (("shop-a", "shop-b"), ("shop-b", "shop-a")):
        places = [c["offer_id"] for c in found[one]]
        assert other in places[:2] and found[one][places.index(other)]["scores"]["lexical"] > 0.5
    assert all(len(c) == 5 and all(x["offer_id"] != o for x in c) for o, c in found.items())
