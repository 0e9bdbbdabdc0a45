"""Label cleaning: cleanlab on out-of-sample predicted probabilities.

Each training row gets probabilities from a model that never saw it (K-fold), cleanlab's
``find_label_issues`` ranks the rows whose given label disagrees with them, and the flagged rows
are dropped or relabelled to the predicted category. Validation and test rows are never touched:
the threshold and the reported metrics stay honest against the labels as given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cleanlab.filter import find_label_issues

__all__ = ["CLEANING_MODES", "LabelIssues", "find_issues", "out_of_sample_probabilities"]

CLEANING_MODES = ("off", "drop", "relabel")


@dataclass(frozen=True)
class LabelIssues:
    """Flagged rows (positions into the arrays given), ranked most suspicious first."""

    rows: np.ndarray
    given: np.ndarray  # (F,) class index as labelled
    suggested: np.ndarray  # (F,) class index the out-of-sample model prefers
    confidence: np.ndarray  # (F,) out-of-sample probability of the given label


def out_of_sample_probabilities(
    fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n_rows: int,
    targets: np.ndarray,
    *,
    folds: int,
    seed: int,
) -> np.ndarray:
    """``(N, K)`` probabilities, each row predicted by a model fitted on the other folds.

    ``fit_predict(train_rows, predict_rows)`` trains on ``train_rows`` and returns ``(len(predict_rows), K)``.
    Folds are stratified by ``targets`` so every class is in every training part.
    """
    if folds < 2:
        raise ValueError("label cleaning needs at least 2 folds")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(n_rows, dtype=np.int64)
    for label in np.unique(targets):
        rows = rng.permutation(np.flatnonzero(targets == label))
        fold_of[rows] = np.arange(len(rows)) % folds
    probabilities = None
    for fold in range(folds):
        held = np.flatnonzero(fold_of == fold)
        predicted = fit_predict(np.flatnonzero(fold_of != fold), held)
        if probabilities is None:
            probabilities = np.zeros((n_rows, predicted.shape[1]))
        probabilities[held] = predicted
    return probabilities


def find_issues(targets: np.ndarray, probabilities: np.ndarray) -> LabelIssues:
    """Rows of ``targets`` ``(N,)`` that cleanlab flags given out-of-sample ``probabilities`` ``(N, K)``."""
    rows = find_label_issues(
        labels=targets,
        pred_probs=probabilities,
        filter_by="prune_by_noise_rate",
        return_indices_ranked_by="self_confidence",
    )
    rows = np.asarray(rows, dtype=np.int64)
    return LabelIssues(
        rows=rows,
        given=targets[rows],
        suggested=probabilities[rows].argmax(axis=1),
        confidence=probabilities[rows, targets[rows]],
    )
