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

__all__ = ["BatchDecisions", "Decision", "ParentCategories", "apply_exclusions", "decide", "decide_batch", "softmax"]


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


@dataclass(frozen=True, slots=True)
class BatchDecisions:
    """The decisions of N offers as arrays, what the inference process writes back into the queue.

    ``category`` is a label index, -1 for uncertain; ``top`` and ``top_p`` the three most probable
    labels after the mask; ``parent`` an index into ``ParentCategories.of(labels).names`` (-1:
    none), set only where the leaf is uncertain.
    """

    category: np.ndarray  # (N,) int32
    confidence: np.ndarray  # (N,) float64: the top label's probability, also when uncertain
    top: np.ndarray  # (N, 3) int32
    top_p: np.ndarray  # (N, 3) float64
    excluded: np.ndarray  # (N,) int32: categories the mask ruled out (0 where it was ignored)
    parent: np.ndarray  # (N,) int32
    parent_p: np.ndarray  # (N,) float64

    def __len__(self) -> int:
        return len(self.category)

    def decision(self, row: int, labels: tuple[str, ...]) -> Decision:
        """Row ``row`` as a :class:`Decision` of ``labels``."""
        top3 = [(labels[k], float(p)) for k, p in zip(self.top[row], self.top_p[row], strict=True) if k >= 0]
        parent = int(self.parent[row])
        fallback = (ParentCategories.of(labels).names[parent], float(self.parent_p[row])) if parent >= 0 else None
        category = int(self.category[row])
        return Decision(
            labels[category] if category >= 0 else UNCERTAIN,
            float(self.confidence[row]),
            top3,
            int(self.excluded[row]),
            fallback,
        )


def decide_batch(
    probabilities: np.ndarray,
    exclusion: np.ndarray,
    *,
    labels: tuple[str, ...],
    threshold: float,
    parent_threshold: float | None,
) -> BatchDecisions:
    """Mask excluded categories, renormalise, and answer uncertain (-1) below ``threshold``.

    ``probabilities`` and ``exclusion`` are ``(N, K)``. If a mask would rule out every category
    it is ignored for that row (the dictionary cannot leave an offer with no answer). An uncertain
    offer still gets the deepest parent category whose probability (summed over its leaves)
    reaches ``parent_threshold``, where one does: "Men > Footwear > Shoes" when Casual and Sports
    Shoes share the doubt. ``parent_threshold`` None names no parent. A few array operations over
    the whole batch, whatever its size: no Python per offer.
    """
    masked, usable = apply_exclusions(probabilities, exclusion)
    rows = np.arange(len(masked))
    width = min(3, masked.shape[1])
    top = (
        np.argpartition(-masked, width - 1, axis=1)[:, :width]
        if width < masked.shape[1]
        else np.tile(np.arange(width), (len(masked), 1))
    )
    # Order the three by probability, first label first on ties (as a stable full sort would).
    order = np.lexsort((top, -masked[rows[:, None], top]), axis=1) if len(masked) else top
    top = np.take_along_axis(top, order, axis=1)
    top_p = masked[rows[:, None], top]
    confidence = top_p[:, 0] if width else np.zeros(len(masked))
    certain = confidence >= threshold
    parent, parent_p = ParentCategories.of(tuple(labels)).confident(masked, parent_threshold)
    return BatchDecisions(
        category=np.where(certain, top[:, 0], -1).astype(np.int32),
        confidence=confidence.astype(np.float64),
        top=top.astype(np.int32),
        top_p=top_p.astype(np.float64),
        excluded=np.where(usable, exclusion.sum(axis=1), 0).astype(np.int32),
        parent=np.where(certain, -1, parent).astype(np.int32),
        parent_p=np.where(certain, 0.0, parent_p).astype(np.float64),
    )


def decide(
    probabilities: np.ndarray,
    exclusion: np.ndarray,
    *,
    labels: tuple[str, ...],
    threshold: float,
    parent_threshold: float | None,
) -> list[Decision]:
    """:func:`decide_batch` as one :class:`Decision` per offer."""
    batch = decide_batch(
        probabilities, exclusion, labels=labels, threshold=threshold, parent_threshold=parent_threshold
    )
    labels = tuple(labels)
    return [batch.decision(row, labels) for row in range(len(batch))]
