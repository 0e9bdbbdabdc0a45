"""Split protocols: which labeled offers train, which choose the threshold, which are held out.

* ``random`` — a seeded permutation; the test rows are a random ``test_share`` of the data.
* ``time``   — rows ordered by ``listed_at``; the newest ``test_share`` is the test set, so the
  model is judged on offers listed after everything it learned from.
* ``group``  — like ``random``, but offers whose titles differ only in colour words (the colour
  variants of one product: "Rocia Women Black Flats", "Rocia Women Beige Flats") travel
  together, so no test offer has a near-twin among the training offers. It measures how the
  model does on products it has never seen, which a random split overstates.

In all three, validation rows (temperature, threshold, early choices) come out of the training
part: at random for ``random``, whole title groups for ``group``, the newest training rows for
``time``. Test rows are never used for training, tuning or the threshold. The same spec on the
same file always gives the same split.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from core.text import COLOUR_WORDS, product_words

__all__ = ["COLOUR_WORDS", "PROTOCOLS", "Split", "SplitSpec", "assign_folds", "split_offers", "title_groups"]

PROTOCOLS = ("random", "time", "group")


@dataclass(frozen=True)
class SplitSpec:
    """How to split; stored in the bundle so ``catstream evaluate`` can rebuild the test set."""

    protocol: str = "random"
    test_share: float = 0.2
    validation_share: float = 0.1  # of the rows left after the test rows
    seed: int = 0

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown split protocol {self.protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if not 0.0 <= self.test_share < 1.0 or not 0.0 < self.validation_share < 1.0:
            raise ValueError("test_share must be in [0, 1) and validation_share in (0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Split:
    """Row positions ``(n,)`` of the frame that was split."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def title_groups(titles: Iterable[str]) -> np.ndarray:
    """``(n,)`` int64 group of each title: its normalised words without colour words.

    A title with no word left (empty, or colours only) is a group of its own.
    """
    keys = pd.Series([product_words(title) for title in titles], dtype=object)
    groups = pd.factorize(keys)[0].astype(np.int64)
    alone = (keys == "").to_numpy()
    groups[alone] = groups.max(initial=-1) + 1 + np.arange(alone.sum())
    return groups


def assign_folds(count: int, folds: int, *, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """``(count,)`` fold of each row, seeded; with ``groups`` ``(count,)`` a group's rows share a fold."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.permutation(count) % folds
    _, dense = np.unique(groups, return_inverse=True)
    return rng.permutation(dense.max(initial=-1) + 1)[dense] % folds


def _grouped_order(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row positions, each group's rows next to each other, the groups in a seeded random order."""
    _, dense = np.unique(groups, return_inverse=True)
    rank = rng.permutation(dense.max(initial=-1) + 1)
    return np.lexsort((np.arange(len(groups)), rank[dense]))


def _group_boundary(ordered_groups: np.ndarray | None, index: int) -> int:
    """``index`` moved to the nearest position inside the rows where a new group starts, so both
    sides keep at least one group (unchanged without groups, or at either end)."""
    if ordered_groups is None or index <= 0 or index >= len(ordered_groups):
        return index
    starts = np.flatnonzero(np.diff(ordered_groups)) + 1
    return int(starts[np.argmin(np.abs(starts - index))]) if len(starts) else index


def split_offers(frame: pd.DataFrame, spec: SplitSpec) -> Split:
    """Split ``frame`` (with ``listed_at`` for ``time``, ``title`` for ``group``) by ``spec``."""
    n = len(frame)
    rng = np.random.default_rng(spec.seed)
    ordered_groups = None
    if spec.protocol == "random":
        order = rng.permutation(n)
    elif spec.protocol == "group":
        groups = title_groups(frame["title"].fillna("").astype(str))
        order = _grouped_order(groups, rng)
        ordered_groups = groups[order]
    else:
        listed = pd.to_datetime(frame["listed_at"], errors="coerce")
        if listed.isna().all():
            raise ValueError("the time split needs a listed_at date on the offers; none could be read")
        # Undated rows count as oldest; ties keep a seeded random order so the split is deterministic.
        keys = listed.fillna(pd.Timestamp.min).to_numpy()
        order = np.lexsort((rng.permutation(n), keys))
    n_test = round(n * spec.test_share)
    cut = _group_boundary(ordered_groups, n - n_test)
    rest, test = order[:cut], order[cut:]
    n_val = max(1, round(len(rest) * spec.validation_share))
    if spec.protocol == "time":
        train, validation = rest[: len(rest) - n_val], rest[len(rest) - n_val :]
    else:
        n_val = _group_boundary(None if ordered_groups is None else ordered_groups[:cut], n_val)
        validation, train = rest[:n_val], rest[n_val:]
    return Split(train=np.sort(train), validation=np.sort(validation), test=np.sort(test))
