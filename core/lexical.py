"""The lexical model: TF-IDF n-grams of the title and the mall category → a linear score per category.

Its scores are added to the fusion network's logits (``logits = network(x) + lexical(x)``). A
linear model over sparse word and character n-grams is a different learner from the network and
gets different offers wrong: added with a weight chosen on held-out predictions it lifts accuracy
(docs/model-quality.md). Features, per field (title, mall category), each field L2-normalised on
its own as scikit-learn's ``TfidfVectorizer`` does:

    word      word 1-2 grams
    char_wb   character 2-5 grams inside word boundaries

with sublinear term frequency ``1 + log(tf)`` and the idf learnt on the training offers. The
analyzers are scikit-learn's own, so the strings are cut exactly as at fitting time; the rest is
a dot product with the stored coefficients, cheap enough for every preprocess worker. Character
n-grams never cross a word boundary, so a worker cuts each distinct word once and remembers its
known n-grams (a bounded cache): marketplace titles reuse a small set of words. A shop files its
offers under a few dozen mall categories, so a worker also remembers the scores of each distinct
mall category (another bounded cache); the shop's trust scales them afterwards.

Stored in a bundle's ``lexical/`` directory: ``fields.json`` (analyzers, vocabularies, the weight)
and ``weights.npz`` (idf per field, coefficients ``(F, K)``, intercept ``(K,)``, both already
multiplied by the weight).
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer

__all__ = ["FIELD_SPECS", "LEXICAL_DIR", "MALL_CACHE", "WORD_CACHE", "LexicalField", "LexicalModel"]

LEXICAL_DIR = "lexical"
# (name, source text, analyzer, n-gram range, min_df): the tuned TF-IDF baseline's title and mall fields
FIELD_SPECS: tuple[tuple[str, str, str, tuple[int, int], int], ...] = (
    ("title_word", "title", "word", (1, 2), 1),
    ("title_char", "title", "char_wb", (2, 5), 2),
    ("mall_word", "mall", "word", (1, 2), 1),
    ("mall_char", "mall", "char_wb", (2, 5), 2),
)
WORD_CACHE = 1 << 16  # distinct words whose character n-grams a field remembers (a few MB at most)
MALL_CACHE = 1 << 12  # distinct mall categories whose (K,) scores a model remembers (under 2 MB for 100 categories)


def _vectorizer(analyzer: str, ngram_range: tuple[int, int], min_df: int = 1, vocabulary=None) -> TfidfVectorizer:
    return TfidfVectorizer(
        analyzer=analyzer,
        ngram_range=tuple(ngram_range),
        min_df=min_df,
        sublinear_tf=True,
        lowercase=True,
        vocabulary=vocabulary,
    )


@dataclass(frozen=True)
class LexicalField:
    """One vectoriser: which text it reads, how it cuts it, its vocabulary and idf."""

    name: str
    source: str  # "title" or "mall"
    analyzer: str
    ngram_range: tuple[int, int]
    terms: tuple[str, ...]  # index = column within the field
    idf: np.ndarray  # (len(terms),)
    word_cache: int = WORD_CACHE  # words remembered by a char_wb field; 0 cuts every word anew
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    _analyze: Callable[[str], list[str]] = field(init=False, repr=False, compare=False)
    _word_columns: Callable[[str], tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # term → column: one dict lookup per term on the workers' per-offer path
        object.__setattr__(self, "_index", {term: i for i, term in enumerate(self.terms)})
        object.__setattr__(self, "_analyze", _vectorizer(self.analyzer, self.ngram_range).build_analyzer())
        object.__setattr__(self, "_word_columns", functools.lru_cache(maxsize=self.word_cache)(self._known_columns))

    def _known_columns(self, text: str) -> tuple[int, ...]:
        """Columns of the known terms of ``text``, one per occurrence."""
        index = self._index
        return tuple(index[term] for term in self._analyze(text) if term in index)

    def columns(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Column indices ``(T,)`` int64 and L2-normalised TF-IDF values ``(T,)`` of ``text``'s known terms."""
        if self.analyzer == "char_wb":
            # scikit-learn lowercases, then pads and cuts each whitespace-separated word on its own
            occurrences: list[int] = []
            for word in text.lower().split():
                occurrences.extend(self._word_columns(word))
        else:
            occurrences = list(self._known_columns(text))
        counts = Counter(occurrences)
        if not counts:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        columns = np.fromiter(counts.keys(), np.int64, len(counts))
        values = (1.0 + np.log(np.fromiter(counts.values(), np.float64, len(counts)))) * self.idf[columns]
        norm = math.sqrt(values @ values) or 1.0
        return columns, values / norm

    def vectorizer(self) -> TfidfVectorizer:
        """scikit-learn's vectoriser with this field's vocabulary and idf: the reference :meth:`columns` matches."""
        vectorizer = _vectorizer(self.analyzer, self.ngram_range, vocabulary=self._index)
        vectorizer.fit(self.terms[:1])  # sets up idf_, replaced by the field's own
        vectorizer.idf_ = self.idf
        return vectorizer

    @classmethod
    def fit(
        cls, name: str, source: str, analyzer: str, ngram_range: tuple[int, int], min_df: int, texts: list[str]
    ) -> LexicalField | None:
        """Vocabulary and idf from ``texts``; None when no term survives (e.g. every text empty)."""
        vectorizer = _vectorizer(analyzer, ngram_range, min_df=min(min_df, max(1, len(texts))))
        try:
            vectorizer.fit(texts)
        except ValueError:  # empty vocabulary, or nothing left after min_df
            return None
        terms = [""] * len(vectorizer.vocabulary_)
        for term, column in vectorizer.vocabulary_.items():
            terms[column] = term
        low, high = ngram_range
        return cls(name, source, analyzer, (low, high), tuple(terms), vectorizer.idf_.astype(np.float64))


class LexicalModel:
    """TF-IDF fields → ``(N, K)`` scores added to the network's logits."""

    def __init__(
        self,
        fields: list[LexicalField],
        coef: np.ndarray,
        intercept: np.ndarray,
        *,
        weight: float = 1.0,
        mall_cache: int = MALL_CACHE,
    ):
        widths = [len(field.terms) for field in fields]
        if coef.shape[0] != sum(widths) or coef.shape[1] != intercept.shape[0]:
            raise ValueError(
                f"coefficients {coef.shape} do not match {sum(widths)} features and {intercept.shape[0]} categories"
            )
        self.fields = fields
        self.offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        self.coef = np.ascontiguousarray(coef, dtype=np.float32)  # (F, K), times weight
        self.intercept = np.asarray(intercept, dtype=np.float32)  # (K,), times weight
        self.weight = float(weight)
        self.mall_cache = mall_cache
        self._mall_scores = functools.lru_cache(maxsize=mall_cache)(functools.partial(self._source_scores, "mall"))

    @property
    def num_classes(self) -> int:
        return int(self.intercept.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.offsets[-1])

    def features(
        self, titles: list[str], malls: list[str], mall_weights: np.ndarray | None = None
    ) -> sparse.csr_matrix:
        """``(N, F)`` TF-IDF rows; the mall fields scaled by ``mall_weights`` ``(N,)`` (shop trust, default 1)."""
        indptr, indices, data = [0], [], []
        for row, (title, mall) in enumerate(zip(titles, malls, strict=True)):
            trust = 1.0 if mall_weights is None else float(mall_weights[row])
            nnz = indptr[-1]
            for lexical_field, offset in zip(self.fields, self.offsets[:-1], strict=True):
                text = title if lexical_field.source == "title" else mall
                if not text or (lexical_field.source == "mall" and trust == 0.0):
                    continue
                columns, values = lexical_field.columns(text)
                indices.append(columns + offset)
                data.append((values * (1.0 if lexical_field.source == "title" else trust)).astype(np.float32))
                nnz += len(columns)
            indptr.append(nnz)
        return sparse.csr_matrix(
            (
                np.concatenate(data) if data else np.zeros(0, np.float32),
                np.concatenate(indices) if indices else np.zeros(0, np.int64),
                np.asarray(indptr),
            ),
            shape=(len(titles), self.num_features),
        )

    def scores(self, titles: list[str], malls: list[str], mall_weights: np.ndarray | None = None) -> np.ndarray:
        """``(N, K)`` float32: weight × (TF-IDF · coefficients + intercept)."""
        if not len(titles):
            return np.zeros((0, self.num_classes), dtype=np.float32)
        return np.asarray(self.features(titles, malls, mall_weights) @ self.coef, dtype=np.float32) + self.intercept

    def score(self, title: str, mall: str, mall_weight: float = 1.0) -> np.ndarray:
        """``(K,)`` scores of one offer (the preprocess workers' path: no sparse matrix built)."""
        scores = self.intercept + self._source_scores("title", title)
        if mall and mall_weight != 0.0:
            scores += np.float32(mall_weight) * self._mall_scores(mall)
        return scores

    def _source_scores(self, source: str, text: str) -> np.ndarray:
        """``(K,)`` float32, read-only: TF-IDF of ``text`` in the fields reading ``source`` · coefficients."""
        rows: list[np.ndarray] = []
        values: list[np.ndarray] = []
        if text:
            for lexical_field, offset in zip(self.fields, self.offsets[:-1], strict=True):
                if lexical_field.source == source:
                    columns, field_values = lexical_field.columns(text)
                    rows.append(columns + offset)
                    values.append(field_values)
        if rows:
            scores = np.concatenate(values).astype(np.float32) @ self.coef[np.concatenate(rows)]
        else:
            scores = np.zeros(self.num_classes, dtype=np.float32)
        scores.flags.writeable = False  # a mall category's scores are cached and shared
        return scores

    def reweighted(self, weight: float) -> LexicalModel:
        """The same model with its scores scaled to ``weight`` (instead of the current weight)."""
        factor = weight / self.weight if self.weight else 0.0
        return LexicalModel(
            self.fields, self.coef * factor, self.intercept * factor, weight=weight, mall_cache=self.mall_cache
        )

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "weight": self.weight,
            "num_classes": self.num_classes,
            "fields": [
                {
                    "name": f.name,
                    "source": f.source,
                    "analyzer": f.analyzer,
                    "ngram_range": list(f.ngram_range),
                    "terms": list(f.terms),
                }
                for f in self.fields
            ],
        }
        (directory / "fields.json").write_text(json.dumps(meta, ensure_ascii=False))
        arrays: dict[str, Any] = {"coef": self.coef, "intercept": self.intercept}
        arrays |= {f"idf_{f.name}": f.idf for f in self.fields}
        np.savez(directory / "weights.npz", **arrays)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        word_cache: int = WORD_CACHE,
        mall_cache: int = MALL_CACHE,
    ) -> LexicalModel:
        """The model saved in ``directory``; ``word_cache`` words remembered per character field, ``mall_cache``
        mall categories' scores."""
        directory = Path(directory)
        meta = json.loads((directory / "fields.json").read_text())
        with np.load(directory / "weights.npz") as arrays:
            fields = [
                LexicalField(
                    f["name"],
                    f["source"],
                    f["analyzer"],
                    tuple(f["ngram_range"]),
                    tuple(f["terms"]),
                    arrays[f"idf_{f['name']}"],
                    word_cache,
                )
                for f in meta["fields"]
            ]
            return cls(fields, arrays["coef"], arrays["intercept"], weight=meta["weight"], mall_cache=mall_cache)
