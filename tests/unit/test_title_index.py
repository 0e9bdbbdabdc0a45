"""The lexical candidate source: character n-gram TF-IDF over titles, kept current by upserts and
deletes; and the reciprocal rank fusion that merges it with the vector rankings."""

from __future__ import annotations

import pytest

from core.title_index import TitleIndex, rank_fusion

TITLES = {
    "a": "Nike Men Blue T20 Indian Cricket Jersey",
    "b": "Puma Men Black Fleece Jacket",
    "c": "Rocia Women Beige Flats",
    "d": "Titan Women Gold Analogue Watch",
    "e": "Nike Women Pink Running Shoes",
}


def index_of(titles: dict[str, str]) -> TitleIndex:
    index = TitleIndex(max_df_share=1.0)
    index.upsert(titles.items())
    return index


def test_a_rewritten_title_with_typos_finds_its_offer_first():
    index = index_of(TITLES)
    hits = index.search(["indain criket jersy nike blue", "fleece jaket puma"], k=3)
    assert hits[0][0][0] == "a" and hits[1][0][0] == "b"
    assert all(0.0 < score <= 1.0 + 1e-6 for row in hits for _, score in row)
    assert [score for _, score in hits[0]] == sorted((score for _, score in hits[0]), reverse=True)


def test_the_same_title_scores_one_and_unrelated_text_finds_nothing():
    index = index_of(TITLES)
    (best, score), *_ = index.search([TITLES["d"]], k=1)[0]
    assert best == "d" and score == pytest.approx(1.0, abs=1e-5)
    assert index.search(["zzzz qqqq"], k=5) == [[]]


def test_an_upsert_replaces_and_a_delete_forgets():
    index = index_of(TITLES)
    index.upsert([("c", "Samsung Galaxy Phone Cover")])
    assert len(index) == 5
    assert "c" not in {offer_id for offer_id, _ in index.search(["rocia beige flats"], k=5)[0]}
    assert index.search(["galaxy phone cover"], k=1)[0][0][0] == "c"
    assert index.delete(["a", "missing"]) == 1 and len(index) == 4
    assert "a" not in {offer_id for offer_id, _ in index.search([TITLES["a"]], k=5)[0]}


def test_compaction_after_many_deletes_keeps_the_right_ids():
    index = TitleIndex()
    index.upsert((f"o{n}", f"product number {n} model x{n}") for n in range(3000))
    index.delete(f"o{n}" for n in range(2500))
    assert len(index) == 500
    assert index.search(["product number 2750 model x2750"], k=1)[0][0][0] == "o2750"


def test_frequent_grams_are_skipped_in_queries_once_the_index_is_large():
    small = TitleIndex(max_df_share=0.5)
    small.upsert([("a", "women kurta"), ("b", "women dress")])  # every gram in half the titles or more
    assert {offer_id for offer_id, _ in small.search(["women"], k=3)[0]} == {"a", "b"}
    index = TitleIndex(max_df_share=0.5)
    index.upsert((f"o{n}", f"women dress {n}") for n in range(300))
    index.upsert([("kurta", "women kurta")])
    # "women" and "dress" grams are in most titles: the query's remaining grams decide.
    assert index.search(["women kurta"], k=1)[0][0][0] == "kurta"
    assert index.search(["women"], k=3) == [[]]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        TitleIndex(max_df_share=0.0)
    with pytest.raises(ValueError):
        index_of(TITLES).search(["x"], k=0)


def test_rank_fusion_rewards_agreement_and_keeps_every_candidate():
    fused = rank_fusion([["x", "y", "z"], ["y", "w"]], c=60)
    assert [item for item, _ in fused] == ["y", "x", "w", "z"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert rank_fusion([]) == []


def test_between_seals_new_titles_are_found_and_deleted_ones_are_not():
    index = TitleIndex(reseal_share=0.5)
    index.upsert((f"o{n}", f"catalogue item {n} variant v{n}") for n in range(1000))
    assert index.search(["catalogue item 7 variant v7"], k=1)[0][0][0] == "o7"  # the first search seals
    index.upsert([("fresh", "hand woven jute basket"), ("o8", "brass table lamp")])  # o8 replaced
    index.delete(["o7"])
    assert index.search(["woven jute basket"], k=1)[0][0][0] == "fresh"
    assert index.search(["brass lamp"], k=1)[0][0][0] == "o8"
    assert "o7" not in {offer_id for offer_id, _ in index.search(["catalogue item 7 variant v7"], k=5)[0]}
    assert "o8" not in {offer_id for offer_id, _ in index.search(["catalogue item 8 variant v8"], k=5)[0]}
    assert len(index) == 1000
