"""The baselines the fusion model must beat: TF-IDF + linear SVM, as a team would try first.

* ``tfidf-word`` — word 1-2-gram TF-IDF over the title.
* ``tfidf-word-char`` — word 1-2 grams + character 2-5 grams (word-boundary) over title, mall
  category and brand, each field its own vectoriser; LinearSVC.

Both are trained on exactly the training rows of the split the model was judged on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import Pipeline
from sklearn.svm import LinearSVC

__all__ = ["BASELINES", "fit_baseline"]

BASELINES = ("tfidf-word", "tfidf-word-char")


def _word(**kw) -> TfidfVectorizer:
    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, lowercase=True, **kw)


def _char() -> TfidfVectorizer:
    return TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2, lowercase=True)


def _pipeline(name: str) -> Pipeline:
    if name == "tfidf-word":
        features = ColumnTransformer([("title_word", _word(), "title")])
        return Pipeline([("tfidf", features), ("svm", LinearSVC(C=1.0))])
    if name == "tfidf-word-char":
        features = ColumnTransformer(
            [
                ("title_word", _word(), "title"),
                ("title_char", _char(), "title"),
                ("mall_word", _word(), "mall_category"),
                ("mall_char", _char(), "mall_category"),
                ("brand_word", _word(), "brand"),
            ]
        )
        return Pipeline([("tfidf", features), ("svm", LinearSVC(C=0.5))])
    raise ValueError(f"unknown baseline {name!r}; use one of {', '.join(BASELINES)}")


def fit_baseline(name: str, train: pd.DataFrame, labels: np.ndarray) -> Pipeline:
    """Fit baseline ``name`` on the ``title, mall_category, brand`` columns of ``train``; ``labels`` ``(N,)``."""
    frame = _text_columns(train)
    return _pipeline(name).fit(frame, labels)


def decision_scores(model: Pipeline, frame: pd.DataFrame) -> np.ndarray:
    """``(N, K)`` SVM margins, columns in ``model.classes_`` order."""
    return model.decision_function(_text_columns(frame))


def _text_columns(frame: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(index=frame.index)
    for column in ("title", "mall_category", "brand"):
        # Empty strings make a vectoriser's vocabulary empty for the field; a placeholder keeps it valid.
        values = frame[column] if column in frame.columns else pd.Series("", index=frame.index)
        out[column] = values.fillna("").replace("", "_none_")
    return out
