"""Fitting the lexical model (:mod:`core.lexical`) and choosing its weight on held-out offers."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.svm import LinearSVC

from core.decision import apply_exclusions, softmax
from core.lexical import FIELD_SPECS, LexicalField, LexicalModel

__all__ = ["LEXICAL_WEIGHTS", "choose_lexical_weight", "fit_lexical"]

log = logging.getLogger(__name__)

# Candidate weights of the lexical scores against the network's logits; 0 = the network alone.
LEXICAL_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_ABSENT_INTERCEPT = -2.0  # a category with no training offer: below any SVM's "no" margin of about -1


def fit_lexical(
    titles: list[str],
    malls: list[str],
    targets: np.ndarray,
    *,
    num_classes: int,
    c: float = 0.5,
    mall_weights: np.ndarray | None = None,
    seed: int = 0,
) -> LexicalModel:
    """TF-IDF fields on these offers and a one-vs-rest linear SVM over them; weight 1.

    ``targets`` ``(N,)`` are class indices in ``range(num_classes)``. Categories with no training
    offer get zero coefficients and a low intercept, so the model never proposes them.
    """
    sources = {"title": titles, "mall": malls}
    fields = [
        field
        for name, source, analyzer, ngrams, min_df in FIELD_SPECS
        if (field := LexicalField.fit(name, source, analyzer, ngrams, min_df, sources[source])) is not None
    ]
    if not fields:
        raise ValueError("the lexical model found no terms in the training titles")
    unfitted = LexicalModel(
        fields,
        np.zeros((sum(len(f.terms) for f in fields), num_classes), np.float32),
        np.zeros(num_classes, np.float32),
    )
    features = unfitted.features(titles, malls, mall_weights)
    present = np.unique(targets)
    coef = np.zeros((features.shape[1], num_classes), dtype=np.float32)
    intercept = np.full(num_classes, _ABSENT_INTERCEPT, dtype=np.float32)
    if len(present) == 1:  # a single category: it always wins
        intercept[present[0]] = 1.0
    else:
        svm = LinearSVC(C=c, random_state=seed).fit(features, targets)
        rows = svm.classes_ if len(present) > 2 else svm.classes_[1:]
        coef[:, rows] = svm.coef_.T
        intercept[rows] = svm.intercept_
        if len(present) == 2:  # scikit-learn keeps one decision function for two classes
            coef[:, svm.classes_[0]] = -svm.coef_[0]
            intercept[svm.classes_[0]] = -svm.intercept_[0]
    log.info(
        "lexical model: %d features over %s, %d categories",
        features.shape[1],
        ", ".join(f.name for f in fields),
        len(present),
    )
    return LexicalModel(fields, coef, intercept)


def choose_lexical_weight(
    logits: np.ndarray,
    scores: np.ndarray,
    targets: np.ndarray,
    *,
    exclusion: np.ndarray | None = None,
    weights=LEXICAL_WEIGHTS,
) -> tuple[float, dict]:
    """The weight of the lexical ``scores`` that makes ``logits + weight * scores`` most accurate.

    All arrays are held-out predictions: ``logits``/``scores``/``exclusion`` ``(N, K)``, ``targets``
    ``(N,)``. Ties go to the smaller weight. Returns the weight and the accuracy of each candidate.
    """
    accuracy = {}
    for weight in weights:
        probabilities, _ = apply_exclusions(softmax(logits + weight * scores), exclusion)
        accuracy[float(weight)] = float((probabilities.argmax(1) == targets).mean())
    best = max(accuracy.values())
    return next(w for w, a in accuracy.items() if a == best), accuracy
