"""Temperature scaling and the choice of the "uncertain" threshold, both on held-out predictions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

from catstream.decision import apply_exclusions, softmax as _softmax

__all__ = ["Threshold", "choose_threshold", "fit_temperature", "precision_lower_bound"]


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature in [0.25, 10] that minimises validation NLL. ``logits`` is ``(N, K)``."""
    grid = np.exp(np.linspace(np.log(0.25), np.log(10.0), 80))
    rows = np.arange(len(targets))
    nll = [-np.log(_softmax(logits, t)[rows, targets] + 1e-12).mean() for t in grid]
    return float(grid[int(np.argmin(nll))])


def precision_lower_bound(correct: np.ndarray, accepted: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound on precision: ``correct`` of ``accepted`` offers right.

    With ``confidence`` 0 this is the observed precision itself.
    """
    correct = np.asarray(correct, dtype=float)
    accepted = np.asarray(accepted, dtype=float)
    if not confidence:
        return correct / np.maximum(accepted, 1)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(1.0 - confidence, correct, accepted - correct + 1)
    return np.where(correct > 0, bound, 0.0)


@dataclass(frozen=True)
class Threshold:
    threshold: float
    coverage: float  # on the data it was chosen on
    precision: float  # observed there
    precision_bound: float  # the lower confidence bound the choice was held to


def choose_threshold(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    temperature: float = 1.0,
    target_precision: float,
    confidence: float = 0.0,
    exclusion: np.ndarray | None = None,
) -> Threshold:
    """Lowest confidence threshold whose accepted offers reach ``target_precision``.

    The confidences are those serving will see: softmax at ``temperature``, then the exclusion
    mask ``(N, K)`` if given. With ``confidence`` > 0 the target must be met by the one-sided
    Clopper-Pearson lower bound on precision at that confidence, not by the observed precision:
    a threshold chosen on the observed precision lands below the target on new offers about half
    the time. The bound holds per threshold; the scan over thresholds is not corrected for.

    If no threshold reaches the target, the one with the best bound is returned.
    """
    probabilities, _ = apply_exclusions(_softmax(logits, temperature), exclusion)
    confidences = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    order = np.argsort(-confidences, kind="stable")
    right = np.cumsum(correct[order])
    bound = precision_lower_bound(right, np.arange(1, len(order) + 1), confidence)
    reaching = np.flatnonzero(bound >= target_precision)
    # Accept the longest prefix (most offers) that still meets the target.
    cut = int(reaching.max()) if len(reaching) else int(np.argmax(bound))
    # Ties: a threshold equal to this confidence also accepts equally confident offers after it.
    threshold = float(confidences[order[cut]])
    accepted = confidences >= threshold
    hits = int(correct[accepted].sum())
    return Threshold(threshold=threshold, coverage=float(accepted.mean()), precision=hits / int(accepted.sum()),
                     precision_bound=float(precision_lower_bound(hits, accepted.sum(), confidence)))
