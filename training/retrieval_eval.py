"""``catstream evaluate-retrieval``: duplicate matching, similar products and cold-start search,
judged on products the embedder never trained on, against word-count and image baselines on the
same queries.

The ground truth has to be honest. Products are title groups, built from titles, so a query made
of the unchanged title finds its group almost for free. Matching queries therefore use a seeded
seller-style rewrite of the title (brand or gender dropped, synonyms, shuffled words, typos), or
the image alone.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import Ridge

from core.dictionaries import PATH_SEPARATOR
from core.embedder import Embedder
from core.faiss_index import FaissIndex
from core.offer_files import LABEL
from core.offer_index import IndexedOffer
from core.similar import similar_offers
from core.title_index import TitleIndex, rank_fusion
from training.embeddings import EmbeddingData, embed_offers, embed_queries

__all__ = ["BM25", "RetrievalReport", "evaluate_retrieval", "format_report", "rewrite_title"]

log = logging.getLogger(__name__)

_GENDER_WORDS = {"men", "mens", "women", "womens", "boys", "girls", "unisex", "kids"}
_SYNONYMS = {
    "tshirt": "tee",
    "tshirts": "tees",
    "t-shirt": "tee",
    "shoes": "footwear",
    "trousers": "pants",
    "jeans": "denims",
    "sneakers": "trainers",
    "watch": "timepiece",
    "heels": "pumps",
    "kurta": "kurti",
    "top": "blouse",
    "shirt": "button-down",
    "bag": "purse",
    "handbag": "purse",
    "sunglasses": "shades",
    "socks": "sock",
    "casual": "everyday",
    "printed": "print",
    "striped": "stripes",
    "solid": "plain",
    "dress": "frock",
    "shorts": "half-pants",
    "jacket": "coat",
    "flats": "ballerinas",
    "sandals": "sandal",
    "belt": "strap",
    "wallet": "purse",
}


def rewrite_title(title: str, *, brand: str, rng: np.random.Generator) -> str:
    """How another shop might list the same product: the brand or the gender dropped, synonyms,
    the words shuffled, a typo or two. Seeded by ``rng``; never the title unchanged."""
    words = title.split()
    brand_words = {word.lower() for word in brand.split()}
    if brand_words and rng.random() < 0.6:
        words = [word for word in words if word.lower() not in brand_words] or words
    if rng.random() < 0.5:
        words = [word for word in words if word.lower() not in _GENDER_WORDS] or words
    words = [_SYNONYMS.get(word.lower(), word) if rng.random() < 0.6 else word for word in words]
    if rng.random() < 0.5:
        words = [words[i] for i in rng.permutation(len(words))]
    words = [_typo(word, rng) if len(word) >= 4 and rng.random() < 0.15 else word for word in words]
    rewritten = " ".join(words)
    if rewritten.lower() == title.lower() and words:
        position = int(rng.integers(len(words)))
        words[position] = _typo(words[position], rng) if len(words[position]) >= 3 else words[position] + "s"
        rewritten = " ".join(words)
    return rewritten


def _typo(word: str, rng: np.random.Generator) -> str:
    position = int(rng.integers(len(word) - 1))
    if rng.random() < 0.5:  # swap two neighbours
        return word[:position] + word[position + 1] + word[position] + word[position + 2 :]
    return word[:position] + word[position + 1 :]  # drop one letter


class BM25:
    """Okapi BM25 over titles (k1 1.2, b 0.75): the word-count engine the embeddings are judged against."""

    def __init__(self, documents: list[str], *, k1: float = 1.2, b: float = 0.75):
        self.vectorizer = CountVectorizer(lowercase=True, token_pattern=r"(?u)\b\w+\b")
        counts = self.vectorizer.fit_transform(documents).tocsr().astype(np.float64)
        n = counts.shape[0]
        document_frequency = np.bincount(counts.indices, minlength=counts.shape[1])
        idf = np.log((n - document_frequency + 0.5) / (document_frequency + 0.5) + 1.0)
        lengths = np.asarray(counts.sum(axis=1)).ravel()
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-9))
        rows = np.repeat(np.arange(n), np.diff(counts.indptr))
        data = counts.data * (k1 + 1) / (counts.data + norm[rows]) * idf[counts.indices]
        self.weights = sparse.csr_matrix((data, counts.indices, counts.indptr), shape=counts.shape).T.tocsr()

    def scores(self, queries: list[str]) -> np.ndarray:
        """``(len(queries), N)`` BM25 score of every document for each query."""
        present = self.vectorizer.transform(queries)
        present.data[:] = 1.0
        return np.asarray((present @ self.weights).todense())


@dataclass
class RetrievalReport:
    """Every figure of one evaluation, as printed and as written to JSON."""

    matching: dict
    similar: dict
    cold_start: dict
    setup: dict

    def to_dict(self) -> dict:
        return {"setup": self.setup, "matching": self.matching, "similar": self.similar, "cold_start": self.cold_start}


def evaluate_retrieval(
    model: Embedder,
    data: EmbeddingData,
    *,
    max_queries: int = 3000,
    seed: int = 0,
    k: int = 10,
) -> RetrievalReport:
    """Judge ``model`` on the test products of ``data`` (a group split: products it never saw)."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    everything = np.arange(len(data.frame))
    vectors = embed_offers(model, data, everything)
    raw = data.image_features.numpy()
    raw = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-9)
    titles = data.frame["title"].tolist()
    test = data.split.test
    group_sizes = pd.Series(data.groups).value_counts()
    setup = {
        "offers": len(data.frame),
        "test_offers": len(test),
        "test_products": len(np.unique(data.groups[test])),
        "seed": seed,
    }
    matching = _matching(data, vectors, raw, titles, test, group_sizes, rng, model=model, max_queries=max_queries, k=k)
    similar = _similar(data, vectors, test, rng, max_queries=max_queries, k=k)
    cold_start = _cold_start(model, data, raw, titles, test, rng)
    setup["seconds"] = round(time.perf_counter() - started, 1)
    return RetrievalReport(matching=matching, similar=similar, cold_start=cold_start, setup=setup)


# -- matching ----------------------------------------------------------------------------------


def _top(scores: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
    """``(Q, k)`` best columns per row of ``scores`` ``(Q, N)``, leaving out column ``exclude[q]``."""
    scores = scores.copy()
    scores[np.arange(len(scores)), exclude] = -np.inf
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


_FUSION_DEPTH = 100  # how deep each ranking goes into a rank fusion


def _ranked_rows(rankings: list[list[int]], n: int) -> np.ndarray:
    """``(Q, n)`` scores that order each row's ranked columns first, best first, the rest after."""
    scores = np.full((len(rankings), n), -1.0, dtype=np.float32)
    for row, ranking in enumerate(rankings):
        scores[row, ranking] = np.linspace(1.0, 0.5, num=len(ranking), dtype=np.float32) if ranking else []
    return scores


def _chunked_top(score_rows, queries: int, k: int, exclude: np.ndarray, chunk: int = 256) -> np.ndarray:
    return np.concatenate(
        [
            _top(score_rows(slice(start, start + chunk)), k, exclude[start : start + chunk])
            for start in range(0, queries, chunk)
        ]
    )


def _matching(data, vectors, raw, titles, test, group_sizes, rng, *, model, max_queries, k) -> dict:
    candidates = test[group_sizes.reindex(data.groups[test]).to_numpy() >= 2]
    queries = np.sort(rng.choice(candidates, size=min(max_queries, len(candidates)), replace=False))
    brands = data.frame["brand"].fillna("").astype(str).to_numpy()
    rewritten = [rewrite_title(titles[q], brand=brands[q], rng=rng) for q in queries]
    query_text = embed_queries(model, data, rewritten)
    query_image = vectors["image"][queries]
    query_fused = np.concatenate([query_image, query_text], axis=1) / np.sqrt(2.0)
    bm25 = BM25(titles)
    char_tfidf = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=2)
    title_matrix = char_tfidf.fit_transform(titles)
    query_matrix = char_tfidf.transform(rewritten)
    # What the indexer runs: its streaming title index, and that fused with the embeddings by rank.
    title_index = TitleIndex()
    title_index.upsert((str(row), title) for row, title in enumerate(titles))
    lexical = [[int(i) for i, _ in hits] for hits in title_index.search(rewritten, k=_FUSION_DEPTH)]
    by_fused = _chunked_top(lambda s: query_fused[s] @ vectors["fused"].T, len(queries), _FUSION_DEPTH, queries)
    hybrid = [
        [int(i) for i, _ in rank_fusion([[str(c) for c in f], [str(c) for c in lex]])]
        for f, lex in zip(by_fused, lexical, strict=True)
    ]
    n = len(titles)
    methods = {
        "image (embedding)": lambda s: query_image[s] @ vectors["image"].T,
        "text (embedding, rewritten title)": lambda s: query_text[s] @ vectors["text"].T,
        "fused (embedding)": lambda s: query_fused[s] @ vectors["fused"].T,
        "BM25 (rewritten title)": lambda s: bm25.scores(rewritten[s]),
        "TF-IDF char 3-5 (rewritten title)": lambda s: np.asarray((query_matrix[s] @ title_matrix.T).todense()),
        "ImageNet MobileNetV2 (image)": lambda s: raw[queries[s]] @ raw.T,
        "lexical (the indexer's title index)": lambda s: _ranked_rows(lexical[s], n),
        "fused + lexical (rank fusion, as the indexer)": lambda s: _ranked_rows(hybrid[s], n),
    }
    if data.bundle is not None and data.featurizer is not None:  # planted data has no classifier
        penultimate = _classifier_layer(data, np.arange(n))
        query_penultimate = _classifier_layer(data, queries, titles=rewritten)
        methods["classifier's penultimate layer (image + rewritten title)"] = lambda s: (
            query_penultimate[s] @ penultimate.T
        )
    gold = [set(np.flatnonzero(data.groups == data.groups[q])) - {q} for q in queries]
    results, found = {}, {}
    for name, score_rows in methods.items():
        top = _chunked_top(score_rows, len(queries), k, queries)
        pairs = {(int(q), int(c)) for q, row, truth in zip(queries, top, gold, strict=True) for c in row if c in truth}
        found[name] = pairs
        results[name] = {
            "recall@1": float(np.mean([row[0] in truth for row, truth in zip(top, gold, strict=True)])),
            f"recall@{k}": float(
                np.mean([len(truth & set(row)) / min(len(truth), k) for row, truth in zip(top, gold, strict=True)])
            ),
            f"true_matches@{k}": len(pairs),
        }
    image, text, bm = (
        found["image (embedding)"],
        found["text (embedding, rewritten title)"],
        found["BM25 (rewritten title)"],
    )
    union = image | text
    complementarity = {
        "image": len(image),
        "text": len(text),
        "both": len(image & text),
        "overlap_share_of_union": len(image & text) / max(len(union), 1),
        "union": len(union),
        "fused": len(found["fused (embedding)"]),
        "bm25": len(bm),
        "union_vs_bm25": len(union) / max(len(bm), 1),
        "fused_vs_bm25": len(found["fused (embedding)"]) / max(len(bm), 1),
        "hybrid": len(found["fused + lexical (rank fusion, as the indexer)"]),
        "hybrid_vs_bm25": len(found["fused + lexical (rank fusion, as the indexer)"]) / max(len(bm), 1),
    }
    identical = _identical_images(data, vectors, raw, k)
    return {
        "queries": len(queries),
        "methods": results,
        "complementarity": complementarity,
        "identical_images": identical,
        "examples": [{"title": titles[q], "query": rewritten[i]} for i, q in enumerate(queries[:5])],
    }


def _classifier_layer(data: EmbeddingData, rows: np.ndarray, *, titles: list[str] | None = None) -> np.ndarray:
    """``(len(rows), H)`` unit vectors of the classifier's fusion layer (its head's hidden layer,
    before the category logits) for the offers at ``rows``, read with ``titles`` instead of their
    own when given: the baseline of "why not reuse the classifier". The backbone is the frozen
    ImageNet one (an embedder requires it), so the cached pooled features are the classifier's own.
    """
    import torch

    from core.model import FusionModel

    assert data.bundle is not None and data.featurizer is not None, "offers featurised from a bundle"
    classifier = FusionModel(data.bundle.config.model)
    state = torch.load(data.bundle.path / "model.pt", map_location="cpu", weights_only=True)
    classifier.load_state_dict(state)
    classifier.eval()
    frame = data.frame.iloc[rows]
    malls = frame["mall_category"].fillna("").astype(str).tolist() if "mall_category" in frame else [""] * len(rows)
    shops = [s if isinstance(s, str) else None for s in frame["mall_id"]] if "mall_id" in frame else [None] * len(rows)
    texts = frame["title"].astype(str).tolist() if titles is None else titles
    inputs = [data.featurizer.text_ids(title, mall) for title, mall in zip(texts, malls, strict=True)]
    title_ids = torch.from_numpy(np.stack([ids for ids, _, _ in inputs]))
    mall_ids = torch.from_numpy(np.stack([ids for _, ids, _ in inputs]))
    grams = torch.from_numpy(np.stack([g for _, _, g in inputs])) if classifier.title_grams is not None else None
    weights = torch.tensor([data.featurizer.shop_weights(shop) for shop in shops], dtype=torch.float32)
    with torch.no_grad():
        image = classifier.image_proj(data.image_features[rows]) * data.has_image[rows].unsqueeze(1)
        parts = [classifier.title(title_ids), classifier.mall(mall_ids) * weights.unsqueeze(1), image]
        if grams is not None:
            parts.append(classifier.title_grams(grams))
        hidden = classifier.head[:3](torch.cat(parts, dim=1))  # dropout (off in eval), linear, ReLU
    hidden = hidden.numpy()
    return hidden / np.maximum(np.linalg.norm(hidden, axis=1, keepdims=True), 1e-12)


def _identical_images(data, vectors, raw, k) -> dict:
    """Byte-identical images listed under different titles and the same article type."""
    frame = data.frame.assign(sha=data.image_sha, leaf=data.frame[LABEL])
    frame = frame[frame["sha"].notna()]
    pairs = []
    for _, rows in frame.groupby(["sha", "leaf"]):
        if rows["title"].nunique() > 1:
            positions = rows.index.to_numpy()
            first = positions[0]
            others = [p for p in positions[1:] if rows.loc[p, "title"] != rows.loc[first, "title"]]
            pairs.extend((first, other) for other in others)
    if not pairs:
        return {"pairs": 0}
    queries = np.array([a for a, _ in pairs])
    targets = np.array([b for _, b in pairs])
    out = {"pairs": len(pairs)}
    for name, table in (("image (embedding)", vectors["image"]), ("ImageNet MobileNetV2 (image)", raw)):
        top = _chunked_top(lambda s, table=table: table[queries[s]] @ table.T, len(queries), k, queries)
        out[f"{name} recall@{k}"] = float(np.mean([t in row for t, row in zip(targets, top, strict=True)]))
    return out


# -- similar products --------------------------------------------------------------------------


def _similar(data, vectors, test, rng, *, max_queries, k) -> dict:
    categories = data.frame[LABEL].tolist()
    index = FaissIndex({"fused": vectors["fused"].shape[1]}, mode="exact")
    offers = [
        IndexedOffer(
            offer_id=str(row),
            category=categories[row],
            vectors={"fused": vectors["fused"][row]},
            product=str(data.groups[row]),
            image_sha=data.image_sha[row],
        )
        for row in range(len(categories))
    ]
    index.upsert(offers)
    queries = np.sort(rng.choice(test, size=min(max_queries, len(test)), replace=False))
    precision, ndcg, filled, duplicates = [], [], [], 0
    shown: Counter[str] = Counter()
    ideal = sum(1 / np.log2(rank + 2) for rank in range(k))
    for q in queries:
        found = similar_offers(index, offers[q], k=k, space="fused")
        leaf = categories[q]
        parent = leaf.rsplit(PATH_SEPARATOR, 1)[0]
        gains = [
            1.0 if s.hit.category == leaf else 0.5 if s.hit.category.startswith(parent + PATH_SEPARATOR) else 0.0
            for s in found
        ]
        precision.append(sum(g == 1.0 for g in gains) / k)
        ndcg.append(sum(g / np.log2(rank + 2) for rank, g in enumerate(gains)) / ideal)
        filled.append(len(found) == k)
        duplicates += sum(
            s.hit.product == offers[q].product
            or (offers[q].image_sha is not None and s.hit.image_sha == offers[q].image_sha)
            for s in found
        )
        shown.update(s.hit.offer_id for s in found)
    top_share = sum(count for _, count in shown.most_common(max(1, len(offers) // 100))) / max(sum(shown.values()), 1)
    return {
        "queries": len(queries),
        f"precision@{k}_same_leaf": float(np.mean(precision)),
        f"ndcg@{k}_siblings_half": float(np.mean(ndcg)),
        "filled_share": float(np.mean(filled)),
        "duplicates_of_the_query_product": int(duplicates),
        "centrality_top1pct_share": float(top_share),
        "distinct_offers_recommended": len(shown),
    }


# -- cold start --------------------------------------------------------------------------------

_GENDER_QUERY = {
    "Men": ["men", "mens"],
    "Women": ["women", "womens"],
    "Boys": ["boys"],
    "Girls": ["girls"],
    "Unisex": ["unisex"],
}


def _attribute_query(gender: str, colour: str, article: str, rng: np.random.Generator) -> str:
    who = rng.choice(_GENDER_QUERY.get(gender, [gender.lower()]))
    colour, article = colour.lower(), article.lower()
    templates = [f"{who} {colour} {article}", f"{colour} {article} for {who}", f"{colour} {who} {article}"]
    return str(rng.choice(templates))


def _cold_start(model, data, raw, titles, test, rng, *, k: int = 20, min_relevant: int = 20) -> dict:
    """New offers found by words through their images: the index holds the test offers only (never
    trained on), searched on image vectors only."""
    frame = data.frame
    if "base_colour" not in frame.columns:
        return {"skipped": "the data has no base_colour column for attribute queries"}
    attributes = frame.iloc[test][["gender", "base_colour", "article_type"]].fillna("")
    combos = attributes[(attributes != "").all(axis=1)].value_counts()
    combos = combos[combos >= min_relevant]
    if combos.empty:
        return {"skipped": f"no gender+colour+article type combination has {min_relevant} test offers"}
    keys = list(combos.index)
    queries = [_attribute_query(*key, rng) for key in keys]
    relevant = [
        ((attributes["gender"] == g) & (attributes["base_colour"] == c) & (attributes["article_type"] == a)).to_numpy()
        for g, c, a in keys
    ]
    image_vectors = embed_offers(model, data, test)["image"]
    has_image = data.has_image.numpy()[test] > 0
    query_vectors = embed_queries(model, data, queries)
    # Baseline: a ridge map from title words to raw ImageNet features, fitted on the training offers.
    words = TfidfVectorizer(lowercase=True, sublinear_tf=True, min_df=2)
    train = data.split.train
    mapping = Ridge(alpha=1.0).fit(words.fit_transform([titles[i] for i in train]), raw[train])
    mapped = mapping.predict(words.transform(queries))
    mapped /= np.maximum(np.linalg.norm(mapped, axis=1, keepdims=True), 1e-9)
    bm25 = BM25([titles[i] for i in test])
    listed = pd.to_datetime(frame["listed_at"].iloc[test], errors="coerce")
    newest = (listed >= listed.quantile(0.9)).to_numpy()
    methods = {
        "embedding, image vectors only": query_vectors @ image_vectors.T,
        "linear map on ImageNet MobileNetV2 features": mapped @ raw[test].T,
        "BM25 over titles (reference: reads the new offers' words)": bm25.scores(queries),
    }
    out: dict = {"queries": len(queries), "index_offers": len(test), "examples": queries[:5]}
    for name, scores in methods.items():
        scores = np.where(has_image[None, :], scores, -np.inf) if "image" in name or "ImageNet" in name else scores
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        hits = np.array([relevant_row[row] for relevant_row, row in zip(relevant, top, strict=True)])
        ideal = np.array([sum(1 / np.log2(r + 2) for r in range(min(k, int(row.sum())))) for row in relevant])
        gains = (hits / np.log2(np.arange(k) + 2)).sum(axis=1)
        out[name] = {
            f"precision@{k}": float(hits.mean()),
            f"ndcg@{k}": float(np.mean(gains / ideal)),
            "newest_share_of_results": float(newest[top].mean()),
            "newest_share_of_relevant": float(np.mean([newest[row].mean() for row in relevant])),
        }
    return out


def format_report(report: RetrievalReport) -> str:
    """The report as Markdown tables: what ``evaluate-retrieval`` prints and writes."""
    setup, matching, similar, cold = report.setup, report.matching, report.similar, report.cold_start
    lines = [
        "# Retrieval evaluation",
        "",
        f"{setup['offers']:,} offers indexed; queries from {setup['test_offers']:,} held-out offers of "
        f"{setup['test_products']:,} products the embedder never trained on (group split, seed {setup['seed']}).",
        "",
        f"## Duplicate matching ({matching['queries']:,} queries: rewritten titles, or the image)",
        "",
        "| method | recall@1 | recall@10 | true matches@10 |",
        "|---|---|---|---|",
    ]
    for name, figures in matching["methods"].items():
        lines.append(
            f"| {name} | {figures['recall@1']:.3f} | {figures['recall@10']:.3f} | {figures['true_matches@10']:,} |"
        )
    c = matching["complementarity"]
    lines += [
        "",
        f"Image and text matches: {c['image']:,} and {c['text']:,}, {c['both']:,} in both "
        f"({c['overlap_share_of_union']:.0%} of their union of {c['union']:,}). Union / BM25: "
        f"{c['union_vs_bm25']:.2f}x; fused / BM25: {c['fused_vs_bm25']:.2f}x; "
        f"fused + lexical / BM25: {c['hybrid_vs_bm25']:.2f}x.",
    ]
    identical = matching["identical_images"]
    if identical.get("pairs"):
        found = ", ".join(f"{name} {value:.3f}" for name, value in identical.items() if name != "pairs")
        lines.append(
            f"Byte-identical images under different titles in one article type: {identical['pairs']} pairs; {found}."
        )
    lines += [
        "",
        f"## Similar products ({similar['queries']:,} queries, fused vectors, leaf then siblings)",
        "",
        "| P@10 same leaf | nDCG@10 (sibling 0.5) | queries filled | duplicates of the query product | top 1% share |",
        "|---|---|---|---|---|",
        f"| {similar['precision@10_same_leaf']:.3f} | {similar['ndcg@10_siblings_half']:.3f} | "
        f"{similar['filled_share']:.1%} | {similar['duplicates_of_the_query_product']} | "
        f"{similar['centrality_top1pct_share']:.1%} |",
        "",
    ]
    if "skipped" in cold:
        lines.append(f"## Cold start: skipped ({cold['skipped']})")
    else:
        lines += [
            f"## Cold start ({cold['queries']} attribute queries over {cold['index_offers']:,} new offers)",
            "",
            "| method | P@20 | nDCG@20 | newest offers in results | newest among relevant |",
            "|---|---|---|---|---|",
        ]
        for name, figures in cold.items():
            if isinstance(figures, dict):
                lines.append(
                    f"| {name} | {figures['precision@20']:.3f} | {figures['ndcg@20']:.3f} | "
                    f"{figures['newest_share_of_results']:.1%} | {figures['newest_share_of_relevant']:.1%} |"
                )
    return "\n".join(lines) + "\n"
