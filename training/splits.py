"""Split protocols: which labeled offers train, which choose the threshold, which are held out.

* ``random`` — a seeded permutation; the test rows are a random ``test_share`` of the data.
* ``time``   — rows ordered by ``listed_at``; the newest ``test_share`` is the test set, so the
  model is judged on offers listed after everything it learned from.

In both, validation rows (temperature, threshold, early choices) come out of the training part:
at random for ``random``, the newest training rows for ``time``. Test rows are never used for
training, tuning or the threshold. The same spec on the same file always gives the same split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

__all__ = ["PROTOCOLS", "Split", "SplitSpec", "split_offers"]

PROTOCOLS = ("random", "time")


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


def split_offers(frame: pd.DataFrame, spec: SplitSpec) -> Split:
    """Split ``frame`` (with a ``listed_at`` column for ``time``) by ``spec``."""
    n = len(frame)
    rng = np.random.default_rng(spec.seed)
    if spec.protocol == "random":
        order = rng.permutation(n)
    else:
        listed = pd.to_datetime(frame["listed_at"], errors="coerce")
        if listed.isna().all():
            raise ValueError("the time split needs a listed_at date on the offers; none could be read")
        # Undated rows count as oldest; ties keep a seeded random order so the split is deterministic.
        keys = listed.fillna(pd.Timestamp.min).to_numpy()
        order = np.lexsort((rng.permutation(n), keys))
    n_test = int(round(n * spec.test_share))
    rest, test = order[: n - n_test], order[n - n_test :]
    n_val = max(1, int(round(len(rest) * spec.validation_share)))
    if spec.protocol == "random":
        validation, train = rest[:n_val], rest[n_val:]
    else:
        train, validation = rest[: len(rest) - n_val], rest[len(rest) - n_val :]
    return Split(train=np.sort(train), validation=np.sort(validation), test=np.sort(test))
