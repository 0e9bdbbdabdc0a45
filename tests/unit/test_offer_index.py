"""The offer index contract, the same tests on every engine: Faiss exact, Faiss HNSW (deletes by
tombstone), and Qdrant in qdrant-client's local mode (in memory, and on disk for the round trip).

Qdrant here is the client's in-process engine, not a Qdrant server: filters, deletes and the
offsets collection go through the same client calls a server gets, but sharding, replication
and the server's payload indexes are not exercised.
"""

from __future__ import annotations

import numpy as np
import pytest

from core.faiss_index import FaissIndex
from core.index_location import open_index
from core.offer_index import IndexedOffer, IndexUnavailableError, OfferIndexError, category_prefixes
from core.qdrant_index import QdrantIndex
from core.similar import similar_offers

SPACES = {"image": 8, "text": 4}
ENGINES = ["faiss-exact", "faiss-hnsw", "qdrant-memory", "qdrant-disk"]


def make_index(engine: str, path):
    if engine == "faiss-exact":
        return FaissIndex(SPACES, path=path / "index", mode="exact")
    if engine == "faiss-hnsw":
        return FaissIndex(SPACES, path=path / "index", mode="hnsw")
    if engine == "qdrant-memory":
        return QdrantIndex.connect(":memory:", collection="offers", spaces=SPACES)
    return QdrantIndex.connect(str(path / "qdrant"), collection="offers", spaces=SPACES)


def reopen(engine: str, index, path):
    index.close()
    if engine.startswith("faiss"):
        return FaissIndex.open(path / "index", mode=engine.removeprefix("faiss-"))
    return QdrantIndex.connect(str(path / "qdrant"), collection="offers", spaces=SPACES)


def offer(offer_id: str, category: str, seed: int, **fields) -> IndexedOffer:
    generator = np.random.default_rng(seed)
    return IndexedOffer(
        offer_id=offer_id,
        category=category,
        vectors={name: generator.normal(size=dimension).astype(np.float32) for name, dimension in SPACES.items()},
        **fields,
    )


def catalogue(count: int = 60) -> list[IndexedOffer]:
    leaves = ["Men > Footwear > Shoes", "Men > Footwear > Sandals", "Women > Apparel > Tops"]
    return [offer(f"o{number}", leaves[number % 3], seed=number) for number in range(count)]


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture
def index(engine, tmp_path):
    made = make_index(engine, tmp_path)
    yield made
    made.close()


def test_an_offer_finds_itself_first_in_every_space(index):
    offers = catalogue()
    index.upsert(offers)
    assert index.count() == 60
    for space in SPACES:
        hits = index.search(space, np.stack([o.vectors[space] for o in offers[:5]]), k=3)
        assert [row[0].offer_id for row in hits] == [o.offer_id for o in offers[:5]]
        assert all(row[0].score == pytest.approx(1.0, abs=1e-5) for row in hits)
        assert all(row[0].score >= row[1].score >= row[2].score for row in hits)


def test_upsert_overwrites_by_offer_id(index):
    offers = catalogue()
    index.upsert(offers)
    moved = offer("o4", "Women > Apparel > Tops", seed=999, product="p-4")
    index.upsert([moved, moved])  # redelivery inside one batch is harmless too
    assert index.count() == 60
    held = index.get("o4")
    assert held is not None and held.category == "Women > Apparel > Tops" and held.product == "p-4"
    np.testing.assert_allclose(
        held.vectors["image"], moved.vectors["image"] / np.linalg.norm(moved.vectors["image"]), rtol=1e-5
    )
    top = index.search("image", moved.vectors["image"], k=1)[0][0]
    assert (top.offer_id, top.product) == ("o4", "p-4")
    # The old vector of o4 no longer finds it.
    old = offers[4].vectors["image"]
    assert index.search("image", old, k=1)[0][0].offer_id != "o4"


def test_delete_removes_and_ignores_unknown_ids(index):
    offers = catalogue()
    index.upsert(offers)
    assert index.delete(["o1", "o2", "nope", "o1"]) == 2
    assert index.count() == 58 and index.get("o1") is None
    hits = index.search("image", offers[1].vectors["image"], k=58)[0]
    assert {hit.offer_id for hit in hits}.isdisjoint({"o1", "o2"})
    assert len(hits) == 58


def test_category_filter_takes_a_leaf_or_any_ancestor(index):
    offers = catalogue()
    index.upsert(offers)
    assert index.count("Men > Footwear > Shoes") == 20
    assert index.count("Men > Footwear") == 40
    assert index.count("Men") == 40
    assert index.count("Men > Foot") == 0  # a prefix of words, not of characters
    query = offers[0].vectors["text"]
    for category, expected in [("Men > Footwear > Sandals", 20), ("Men > Footwear", 40), ("Women", 20)]:
        hits = index.search("text", query, k=100, category=category)[0]
        assert len(hits) == expected
        assert all(category_prefixes(hit.category).count(category) == 1 for hit in hits)
    assert index.search("text", query, k=5, category="Kids")[0] == []


def test_filtered_search_ranks_exactly(index):
    offers = catalogue(90)
    index.upsert(offers)
    query = np.random.default_rng(1).normal(size=8).astype(np.float32)
    hits = index.search("image", query, k=5, category="Men > Footwear > Sandals")[0]
    members = [o for o in offers if o.category == "Men > Footwear > Sandals"]
    unit = query / np.linalg.norm(query)
    scores = {o.offer_id: float(unit @ (o.vectors["image"] / np.linalg.norm(o.vectors["image"]))) for o in members}
    expected = sorted(scores, key=scores.get, reverse=True)[:5]
    assert [hit.offer_id for hit in hits] == expected
    assert [hit.score for hit in hits] == pytest.approx([scores[o] for o in expected], abs=1e-5)


@pytest.mark.parametrize("engine", ["faiss-exact", "faiss-hnsw", "qdrant-disk"])
def test_save_and_load_round_trip_with_offsets(engine, index, tmp_path):
    offers = catalogue()
    index.upsert(offers)
    index.delete(["o7"])
    offsets = {("offers.predictions", 0): 61, ("offers.predictions", 1): 3}
    index.save(offsets)
    index.upsert([offer("o99", "Men > Footwear > Shoes", seed=99)])  # after the save: not in the saved state for Faiss
    again = reopen(engine, index, tmp_path)
    try:
        assert again.offsets() == offsets
        assert again.get("o7") is None
        assert again.get("o5").category == offers[5].category
        top = again.search("text", offers[3].vectors["text"], k=1, category="Men")[0][0]
        assert top.offer_id == "o3"
        expected = 59 if engine.startswith("faiss") else 60  # Qdrant persists every acknowledged upsert
        assert again.count() == expected
    finally:
        again.close()


@pytest.mark.parametrize("engine", ["faiss-exact", "faiss-hnsw", "qdrant-disk"])
def test_titles_are_listed_kept_across_a_save_and_forgotten_on_delete(engine, index, tmp_path):
    titled = [offer(f"t{n}", "Men > Footwear > Shoes", seed=n, title=f"Shoe model {n}") for n in range(1500)]
    index.upsert([*titled, offer("untitled", "Men > Footwear > Shoes", seed=7)])  # past one Qdrant page
    index.delete(["t3"])
    index.save({})
    again = reopen(engine, index, tmp_path)
    try:
        held = dict(again.titles())
        assert len(held) == 1499 and "t3" not in held and "untitled" not in held
        assert held["t42"] == "Shoe model 42" and again.get("t42").title == "Shoe model 42"
    finally:
        again.close()


def test_bad_vectors_are_refused_with_the_reason(index):
    with pytest.raises(OfferIndexError, match="dimension 8"):
        index.upsert([IndexedOffer("x", "Men", {"image": np.ones(7), "text": np.ones(4)})])
    with pytest.raises(OfferIndexError, match="NaN"):
        index.upsert([IndexedOffer("x", "Men", {"image": np.full(8, np.nan), "text": np.ones(4)})])
    with pytest.raises(OfferIndexError, match="no vector for space"):
        index.upsert([IndexedOffer("x", "Men", {"image": np.ones(8)})])
    with pytest.raises(OfferIndexError, match="unknown space"):
        index.search("fused", np.ones(8), k=1)
    assert index.count() == 0


def test_hnsw_tombstones_are_compacted_away(tmp_path):
    index = FaissIndex(SPACES, path=tmp_path / "index", mode="hnsw")
    index.upsert(catalogue(40))
    index.delete([f"o{n}" for n in range(10)])  # a quarter of the slots dead: kept as tombstones
    assert len(index._dead) == 10 and len(index._offer_ids) == 40
    assert {hit.offer_id for hit in index.search("image", np.ones(8), k=40)[0]} == {f"o{n}" for n in range(10, 40)}
    index.delete(["o10"])  # over a quarter: rebuilt without them
    assert index.count() == 29
    assert not index._dead and len(index._offer_ids) == 29
    assert len(index.search("image", np.ones(8), k=40)[0]) == 29


def test_auto_mode_turns_approximate_past_its_size(tmp_path):
    index = FaissIndex(SPACES, path=tmp_path / "index", mode="auto", approximate_above=50)
    index.upsert(catalogue(50))
    assert not index._approximate
    index.upsert([offer("o50", "Men", seed=50)])
    assert index._approximate
    assert index.search("image", catalogue(50)[3].vectors["image"], k=1)[0][0].offer_id == "o3"


def test_a_damaged_save_is_a_clear_error(tmp_path):
    index = FaissIndex(SPACES, path=tmp_path / "index")
    index.upsert(catalogue())
    index.save({("t", 0): 1})
    vectors = tmp_path / "index" / "vectors-image.npy"
    vectors.write_bytes(vectors.read_bytes()[:-16] + b"\0" * 16)
    with pytest.raises(OfferIndexError, match=r"vectors-image\.npy does not match its checksum"):
        FaissIndex.open(tmp_path / "index")
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "x.bin").write_bytes(b"x")
    with pytest.raises(OfferIndexError, match=r"no manifest\.json"):
        open_index(str(tmp_path / "stray"), spaces=SPACES)


def test_open_index_picks_the_engine_from_the_location(tmp_path):
    assert isinstance(open_index(str(tmp_path / "new"), spaces=SPACES), FaissIndex)
    assert isinstance(open_index("qdrant::memory:", spaces=SPACES), QdrantIndex)


def test_similar_widens_from_the_leaf_to_siblings_and_excludes_duplicates(index):
    """A planted tree: 3 offers in the query's leaf (one of them another listing of the query's
    product, one with the query's exact image), 4 in a sibling leaf, 10 elsewhere."""
    base = np.zeros(8, np.float32)
    base[0] = 1.0

    def near(offer_id, category, tilt, **fields):
        image = base.copy()
        image[1] = tilt
        return IndexedOffer(offer_id, category, {"image": image, "text": np.ones(4)}, **fields)

    query = near("q", "Men > Footwear > Shoes", 0.0, product="P", image_sha="sha-q")
    planted = [
        query,
        near("same-product", "Men > Footwear > Shoes", 0.01, product="P"),
        near("same-image", "Men > Footwear > Shoes", 0.02, image_sha="sha-q"),
        near("leaf-1", "Men > Footwear > Shoes", 0.5),
        *[near(f"sibling-{n}", "Men > Footwear > Sandals", 0.1 * n) for n in range(4)],
        *[near(f"far-{n}", "Women > Apparel > Tops", 0.05 * n) for n in range(10)],
    ]
    index.upsert(planted)
    found = similar_offers(index, query, k=6, space="image")
    assert [s.hit.offer_id for s in found] == ["leaf-1", "sibling-0", "sibling-1", "sibling-2", "sibling-3", "far-0"]
    assert [s.level for s in found] == [0, 1, 1, 1, 1, 3]
    assert found[-1].scope is None
    assert len(similar_offers(index, query, k=3, space="image")) == 3


def test_an_unreachable_qdrant_server_is_index_unavailable_not_a_crash():
    # Nothing listens on port 1: the refusal is immediate and local.
    with pytest.raises(IndexUnavailableError, match="Qdrant cannot be reached"):
        open_index("qdrant+http://127.0.0.1:1")
    with pytest.raises(IndexUnavailableError):
        QdrantIndex.connect("http://127.0.0.1:1", collection="offers", spaces=SPACES)
