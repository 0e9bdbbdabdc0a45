"""Labeled offers for training and evaluation: reading them, drawing the label set, and the
fingerprint that lets evaluation rebuild a bundle's held-out rows. No training library is
imported here, so ``catstream evaluate`` and ``audit`` stay light."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from core.dictionaries import PATH_SEPARATOR
from core.offer_files import LABEL, read_offer_file
from training.history import HistoryStore

__all__ = ["data_fingerprint", "load_labeled", "select_labels"]


def load_labeled(data: str | Path, label_columns: list[str]) -> pd.DataFrame:
    """Labeled offers from an offer file or a history store directory (``catstream history add``)."""
    if HistoryStore.is_store(data):
        frame = HistoryStore(data).read()
        if LABEL not in frame.columns:
            raise ValueError(f"history store {data} has no label column")
        return frame[frame["title"] != ""].reset_index(drop=True)
    return read_offer_file(data, label_columns=label_columns)


def data_fingerprint(frame: pd.DataFrame) -> str:
    """Identifies the labeled rows (ids, titles, labels): evaluation checks it to rebuild the split."""
    digest = hashlib.sha256()
    for column in ("offer_id", "title", LABEL):
        digest.update("\x1f".join(frame[column].tolist()).encode())
    return digest.hexdigest()[:16]


def select_labels(frame: pd.DataFrame, min_count: int, policy: str = "exclude") -> tuple[pd.DataFrame, dict]:
    """The label set from data: categories with at least ``min_count`` offers.

    ``exclude`` drops offers of rarer leaves; ``parent`` relabels them with their nearest ancestor
    path that has ``min_count`` offers (counting the rolled-up offers), and drops them only when no
    ancestor qualifies. Both are counted in the returned report.
    """
    frame = frame[frame[LABEL] != ""].copy()
    counts = frame[LABEL].value_counts()
    rare = counts[counts < min_count]
    report = {
        "offers_read": len(frame),
        "categories_seen": len(counts),
        "rare_leaf_policy": policy,
        "rare_categories": len(rare),
        "offers_in_rare_categories": int(rare.sum()),
    }
    if policy == "parent" and len(rare):
        original = frame[LABEL].copy()
        label = original.copy()
        while True:
            counts = label.value_counts()
            short = (label.map(counts) < min_count) & label.str.contains(PATH_SEPARATOR, regex=False)
            if not short.any():
                break
            label.loc[short] = label[short].str.rsplit(PATH_SEPARATOR, n=1).str[0]
        frame[LABEL] = label
        report["offers_rolled_up_to_parent"] = int((label != original).sum())
    counts = frame[LABEL].value_counts()
    kept = counts[counts >= min_count].index
    out = frame[frame[LABEL].isin(kept)].reset_index(drop=True)
    report["offers_excluded"] = int(len(frame) - len(out))
    report["categories_kept"] = len(kept)
    return out, report
