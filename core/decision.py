"""The decision rule shared by serving and evaluation: softmax, exclusion mask, threshold, and the
parent category an offer can still be filed under when its leaf is uncertain.

Everything here works on whole batches: ``(N, K)`` arrays in, ``(N,)`` arrays out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from core.dictionaries import PATH_SEPARATOR
from core.schemas import UNCERTAIN

__all__ = ["Decision", "ParentCategories", "apply_exclusions", "decide", "softmax"]


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
    def of(labels: tuple[str, ...]) -> ParentCategories:
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

    def by_depth(self, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(parent, probability)``, each ``(N, D)``: at each depth 1..D the most probable parent
        and its summed probability (the first such parent on ties, -1 and 0.0 where a label set has
        no parent of that depth). What :meth:`confident` picks from, for any threshold."""
        summed = probabilities @ self.members  # (N, P)
        rows = np.arange(len(summed))
        depth_count = int(self.depths.max()) if self.names else 0
        parent = np.full((len(summed), depth_count), -1)
        probability = np.zeros((len(summed), depth_count))
        for depth in range(1, depth_count + 1):
            columns = np.flatnonzero(self.depths == depth)
            if len(columns):
                parent[:, depth - 1] = columns[summed[:, columns].argmax(axis=1)]
                probability[:, depth - 1] = summed[rows, parent[:, depth - 1]]
        return parent, probability

    @staticmethod
    def deepest(parent: np.ndarray, probability: np.ndarray, threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
        """From :meth:`by_depth`'s ``(N, D)`` arrays, the deepest parent whose probability reaches
        ``threshold``: ``(parent, probability)``, each ``(N,)``, -1 and 0.0 where none does or where
        ``threshold`` is None (a model with no parent threshold)."""
        if threshold is None or probability.shape[1] == 0:
            return np.full(len(parent), -1), np.zeros(len(parent))
        reaching = (probability >= threshold) & (parent >= 0)
        depth = probability.shape[1] - 1 - reaching[:, ::-1].argmax(axis=1)  # the last depth that reaches
        rows = np.arange(len(parent))
        found = reaching[rows, depth]
        return np.where(found, parent[rows, depth], -1), np.where(found, probability[rows, depth], 0.0)

    def confident(self, probabilities: np.ndarray, threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
        """``(parent, probability)``, each ``(N,)``: the deepest parent whose probability reaches
        ``threshold`` (the most probable among equally deep ones), -1 and 0.0 where none does or
        where ``threshold`` is None (a model with no parent threshold)."""
        if not self.names or threshold is None:
            return np.full(len(probabilities), -1), np.zeros(len(probabilities))
        return self.deepest(*self.by_depth(probabilities), threshold)


@dataclass(frozen=True, slots=True)
class Decision:
    category: str
    confidence: float
    top3: list[tuple[str, float]]
    excluded: int
    parent: tuple[str, float] | None = None  # where the leaf is uncertain: the deepest parent that is not


def decide(
    probabilities: np.ndarray,
    exclusion: np.ndarray,
    *,
    labels: tuple[str, ...],
    threshold: float,
    parent_threshold: float | None,
) -> list[Decision]:
    """Mask excluded categories, renormalise, and answer ``UNCERTAIN`` below ``threshold``.

    ``probabilities`` and ``exclusion`` are ``(N, K)``. If a mask would rule out every category
    it is ignored for that row (the dictionary cannot leave an offer with no answer). An uncertain
    offer still gets the deepest parent category whose probability (summed over its leaves)
    reaches ``parent_threshold``, where one does: "Men > Footwear > Shoes" when Casual and Sports
    Shoes share the doubt. ``parent_threshold`` None names no parent.
    """
    masked, usable = apply_exclusions(probabilities, exclusion)
    top = np.argsort(-masked, axis=1)[:, :3]
    parents = ParentCategories.of(tuple(labels))
    parent, parent_probability = parents.confident(masked, parent_threshold)
    decisions = []
    for row, order in enumerate(top):
        confidence = float(masked[row, order[0]])
        top3 = [(labels[k], float(masked[row, k])) for k in order]
        excluded = int(exclusion[row].sum()) if usable[row] else 0
        if confidence >= threshold:
            decisions.append(Decision(labels[order[0]], confidence, top3, excluded))
        else:
            fallback = (parents.names[parent[row]], float(parent_probability[row])) if parent[row] >= 0 else None
            decisions.append(Decision(UNCERTAIN, confidence, top3, excluded, fallback))
    return decisions
