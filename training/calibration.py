"""Temperature scaling and the choice of the "uncertain" threshold, both on validation data."""

from __future__ import annotations

import numpy as np

from catstream.decision import apply_exclusions, softmax as _softmax

__all__ = ["fit_temperature", "choose_threshold"]


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature in [0.25, 10] that minimises validation NLL. ``logits`` is ``(N, K)``."""
    grid = np.exp(np.linspace(np.log(0.25), np.log(10.0), 80))
    rows = np.arange(len(targets))
    nll = [-np.log(_softmax(logits, t)[rows, targets] + 1e-12).mean() for t in grid]
    return float(grid[int(np.argmin(nll))])


def choose_threshold(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    temperature: float = 1.0,
    target_precision: float,
    exclusion: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Lowest confidence threshold whose accepted offers reach ``target_precision``.

    The confidences are those serving will see: softmax at ``temperature``, then the exclusion
    mask ``(N, K)`` if given.

    Returns ``(threshold, coverage, precision)`` on the given data. If no threshold reaches the
    target, the one with the best precision is returned.
    """
    probabilities, _ = apply_exclusions(_softmax(logits, temperature), exclusion)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    order = np.argsort(-confidence, kind="stable")
    cumulative_precision = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    reaching = np.flatnonzero(cumulative_precision >= target_precision)
    # Accept the longest prefix (most offers) that still meets the target.
    cut = int(reaching.max()) if len(reaching) else int(np.argmax(cumulative_precision))
    # Ties: a threshold equal to this confidence also accepts equally confident offers after it.
    threshold = float(confidence[order[cut]])
    accepted = confidence >= threshold
    return threshold, float(accepted.mean()), float(correct[accepted].mean())
