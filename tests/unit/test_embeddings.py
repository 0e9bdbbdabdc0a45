"""The offer embedder on planted data, and the pieces of the retrieval evaluation (title rewrites,
BM25) on known inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.embedder import Embedder, EmbedderConfig
from training.embeddings import EmbedderOptions, EmbeddingData, embed_offers, fit_embedder
from training.retrieval_eval import BM25, rewrite_title
from training.splits import Split


def planted(products: int = 48, per_product: int = 3, seed: int = 0) -> EmbeddingData:
    """Products with their own image direction and their own combination of title words (brand,
    type, style: words that held-out products share with training ones); 4 categories; the last
    quarter of the products held out."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(products), per_product)
    n = len(groups)
    bases = rng.normal(size=(products, 1280)).astype(np.float32)
    images = bases[groups] + 0.6 * rng.normal(size=(n, 1280)).astype(np.float32)
    combos = rng.permutation(12 * 10 * 8)[:products]
    words = np.stack([10 + combos % 12, 30 + (combos // 12) % 10, 50 + combos // 120], axis=1)  # (P, 3)
    title_ids = np.zeros((n, 8), np.int64)
    for row, product in enumerate(groups):
        filler = 300 + rng.choice(20, size=2, replace=False)  # words every product uses
        title_ids[row, :5] = rng.permutation(np.concatenate([words[product], filler]))
    held_out = groups >= products * 3 // 4
    return EmbeddingData(
        frame=None,  # not read by training
        categories=((combos // 12) % 4)[groups].astype(np.int64),  # a category follows the type word
        leaves=("a", "b", "c", "d"),
        groups=groups,
        split=Split(train=np.flatnonzero(~held_out), validation=np.array([], np.int64), test=np.flatnonzero(held_out)),
        title_ids=torch.from_numpy(title_ids),
        title_grams=None,
        has_image=torch.ones(n),
        image_features=torch.from_numpy(images),
        image_sha=[None] * n,
        vocab_size=400,
        char_buckets=0,
    )


def same_product_margin(vectors: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """(share of offers whose nearest other offer is of the same product, mean same - mean other cosine)."""
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    same = groups[:, None] == groups[None, :]
    np.fill_diagonal(same, False)
    nearest_same = same[np.arange(len(groups)), similarity.argmax(axis=1)].mean()
    finite = np.isfinite(similarity)
    return float(nearest_same), float(similarity[same].mean() - similarity[~same & finite].mean())


def test_the_same_product_is_nearer_than_other_products_on_held_out_products():
    data = planted()
    test = data.split.test
    torch.manual_seed(0)
    untrained = embed_offers(Embedder(EmbedderConfig(vocab_size=400, char_buckets=0, dim=16)).eval(), data, test)
    model, history = fit_embedder(data, EmbedderOptions(dim=16, epochs=12, batch_pairs=24, threads=1), progress=False)
    assert history[-1]["loss"] < history[0]["loss"] / 10
    vectors = embed_offers(model, data, test)
    nearest = {space: same_product_margin(vectors[space], data.groups[test]) for space in vectors}
    assert nearest["image"][0] >= 0.85 and nearest["fused"][0] >= 0.9
    assert all(margin > 0.4 for _, margin in nearest.values())
    # Titles: only training puts offers of one product together (untrained 0.36, 0.13; trained 0.56, 0.52).
    before = same_product_margin(untrained["text"], data.groups[test])
    assert nearest["text"][0] >= before[0] + 0.15 and nearest["text"][1] >= before[1] + 0.3
    assert vectors["fused"].shape == (len(test), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors["fused"], axis=1), 1.0, rtol=1e-5)


def test_an_offer_without_an_image_is_searchable_by_its_title_in_the_image_space():
    data = planted(products=8)
    data.has_image[0] = 0.0
    model, _ = fit_embedder(data, EmbedderOptions(dim=8, epochs=1, batch_pairs=8, threads=1), progress=False)
    vectors = embed_offers(model, data, np.arange(3))
    np.testing.assert_allclose(vectors["image"][0], vectors["text"][0], rtol=1e-6)
    assert not np.allclose(vectors["image"][1], vectors["text"][1])


def test_a_title_rewrite_is_seeded_and_never_the_title_itself():
    titles = ["Nike Men Blue Running Shoes", "Puma Women Black Tshirt", "Fastrack Watch", "Bag"]
    first = [rewrite_title(t, brand=t.split()[0], rng=np.random.default_rng(3)) for t in titles]
    again = [rewrite_title(t, brand=t.split()[0], rng=np.random.default_rng(3)) for t in titles]
    assert first == again
    for seed in range(50):
        rng = np.random.default_rng(seed)
        assert all(rewrite_title(t, brand=t.split()[0], rng=rng).lower() != t.lower() for t in titles)


@pytest.mark.parametrize("query, best", [("blue shoes", 0), ("black tshirt women", 1), ("watch", 2)])
def test_bm25_ranks_the_document_sharing_the_rarest_words_first(query, best):
    documents = ["nike men blue running shoes", "puma women black tshirt", "fastrack black watch", "puma men shoes"]
    scores = BM25(documents).scores([query])[0]
    assert int(np.argmax(scores)) == best


def test_bm25_scores_match_the_formula():
    documents = ["a b", "a a c", "d"]
    scores = BM25(documents, k1=1.2, b=0.75).scores(["a"])[0]
    average = (2 + 3 + 1) / 3
    idf = np.log((3 - 2 + 0.5) / (2 + 0.5) + 1)

    def term(frequency, length):
        return idf * frequency * 2.2 / (frequency + 1.2 * (1 - 0.75 + 0.75 * length / average))

    np.testing.assert_allclose(scores, [term(1, 2), term(2, 3), 0.0], rtol=1e-9)
