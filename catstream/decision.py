"""The decision rule shared by serving and evaluation: softmax, exclusion mask, threshold."""

from __future__ import annotations

import numpy as np

__all__ = ["apply_exclusions", "softmax"]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``(N, K)`` logits divided by ``temperature``."""
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def apply_exclusions(probabilities: np.ndarray, exclusion: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Zero the excluded categories of ``(N, K)`` probabilities and renormalise.

    Returns ``(probabilities, usable)``; a row whose mask would rule out every category keeps its
    original probabilities (``usable`` False): the dictionary cannot leave an offer with no answer.
    """
    if exclusion is None:
        return probabilities, np.zeros(len(probabilities), dtype=bool)
    masked = np.where(exclusion, 0.0, probabilities)
    totals = masked.sum(axis=1, keepdims=True)
    usable = totals[:, 0] > 0
    masked = np.where(usable[:, None], masked / np.where(totals > 0, totals, 1.0), probabilities)
    return masked, usable
