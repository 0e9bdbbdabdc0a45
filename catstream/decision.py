"""The decision rule shared by serving and evaluation: softmax, exclusion mask, threshold, and the
parent category an offer can still be filed under when its leaf is uncertain."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from catstream.dictionaries import PATH_SEPARATOR

__all__ = ["ParentCategories", "apply_exclusions", "softmax"]


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


@dataclass(frozen=True, eq=False)
class ParentCategories:
    """The parents of a label set's category paths ("Men > Footwear > Shoes" above "Men > Footwear
    > Shoes > Casual Shoes"), so that an offer whose leaf is uncertain can still be filed higher up.

    A parent's probability is the sum over the labels under it (a label equal to the parent path,
    a rare leaf's parent fallback, counts as under it).
    """

    names: tuple[str, ...]
    members: np.ndarray  # (K, P) float64: 1 where label k lies under parent p
    depths: np.ndarray  # (P,) number of path parts

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def of(labels: tuple[str, ...]) -> "ParentCategories":
        """The parents of ``labels``, remembered per label set (the workers ask once per batch)."""
        paths = [label.split(PATH_SEPARATOR) for label in labels]
        names = sorted({PATH_SEPARATOR.join(parts[:depth]) for parts in paths for depth in range(1, len(parts))})
        index = {name: column for column, name in enumerate(names)}
        members = np.zeros((len(labels), len(names)))
        for row, parts in enumerate(paths):
            for depth in range(1, len(parts) + 1):
                column = index.get(PATH_SEPARATOR.join(parts[:depth]))
                if column is not None:
                    members[row, column] = 1.0
        depths = np.array([name.count(PATH_SEPARATOR) + 1 for name in names], dtype=np.int64)
        return ParentCategories(tuple(names), members, depths)

    def holds(self, targets: np.ndarray, parents: np.ndarray) -> np.ndarray:
        """``(N,)`` whether label ``targets[i]`` lies under parent ``parents[i]`` (both ``(N,)`` indices)."""
        return self.members[targets, parents] > 0

    def confident(self, probabilities: np.ndarray, threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
        """``(parent, probability)``, each ``(N,)``: the deepest parent whose probability reaches
        ``threshold`` (the most probable among equally deep ones), -1 and 0.0 where none does or
        where ``threshold`` is None (a model with no parent threshold)."""
        if not self.names or threshold is None:
            return np.full(len(probabilities), -1), np.zeros(len(probabilities))
        summed = probabilities @ self.members  # (N, P)
        # Depth first, probability second: a probability is at most 1, a depth step is 2.
        rank = np.where(summed >= threshold, 2.0 * self.depths + summed, -np.inf)
        parent = rank.argmax(axis=1)
        found = np.isfinite(rank[np.arange(len(rank)), parent])
        return np.where(found, parent, -1), np.where(found, summed[np.arange(len(summed)), parent], 0.0)
