"""The labeled-offer history that retraining reads, and the season-balanced sampler over it.

History store: a directory of Parquet files partitioned by listing month
(``listed_month=2016-04/part-….parquet``), as pyarrow/Spark/DuckDB read it. Adding a file
appends new offers; an ``offer_id`` seen again replaces the older row (a relabel or a fix).

Season balance: marketplaces sell coats in winter and swimwear in summer; a model retrained on
the last few weeks forgets what is out of season. :func:`season_balanced_weights` gives every
calendar month (Jan–Dec, over all years) the same total sampling weight, and adds a
configurable share for the most recent weeks so new products are still learned quickly.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

__all__ = ["UNDATED", "HistoryStore", "season_balanced_weights"]

UNDATED = "undated"
_PARTITION = "listed_month"
_ADDED = "_added_ns"


class HistoryStore:
    """Labeled offers under ``root``, one Parquet partition per listing month."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def is_store(path: str | Path) -> bool:
        path = Path(path)
        return path.is_dir() and any(path.glob(f"{_PARTITION}=*"))

    def add(self, frame: pd.DataFrame) -> dict[str, int]:
        """Append the rows of ``frame`` (from :func:`read_offer_file` with labels); returns rows per month."""
        if "label" not in frame.columns:
            raise ValueError("history rows need a label: read the offer file with its label column(s)")
        listed = pd.to_datetime(frame["listed_at"], errors="coerce")
        frame = frame.assign(**{_PARTITION: listed.dt.strftime("%Y-%m").fillna(UNDATED), _ADDED: str(time.time_ns())})
        self.root.mkdir(parents=True, exist_ok=True)
        written: dict[str, int] = {}
        batch = uuid.uuid4().hex[:12]
        for month, rows in frame.groupby(_PARTITION, sort=True):
            directory = self.root / f"{_PARTITION}={month}"
            directory.mkdir(exist_ok=True)
            table = pa.Table.from_pandas(rows.drop(columns=[_PARTITION]).astype(str), preserve_index=False)
            pq.write_table(table, directory / f"part-{batch}.parquet")
            written[str(month)] = len(rows)
        return written

    def read(self, *, months: list[str] | None = None) -> pd.DataFrame:
        """All rows (latest version of each ``offer_id``), optionally only some ``YYYY-MM`` months."""
        if not self.is_store(self.root):
            raise FileNotFoundError(f"{self.root} is not a history store (no {_PARTITION}=… partitions)")
        dataset = ds.dataset(self.root, format="parquet", partitioning="hive")
        table = dataset.to_table(filter=ds.field(_PARTITION).isin(months) if months else None)
        frame = table.to_pandas().drop(columns=[_PARTITION]).astype(str)
        # The newest addition of an offer wins, whatever order the files are read in.
        frame = frame.sort_values(_ADDED, kind="stable").drop_duplicates("offer_id", keep="last")
        return frame.drop(columns=[_ADDED]).sort_index().reset_index(drop=True)

    def months(self) -> dict[str, int]:
        """Rows stored per partition (before de-duplication)."""
        counts = {}
        for directory in sorted(self.root.glob(f"{_PARTITION}=*")):
            counts[directory.name.split("=", 1)[1]] = sum(
                pq.read_metadata(f).num_rows for f in directory.glob("*.parquet")
            )
        return counts


def season_balanced_weights(
    listed_at: pd.Series, *, recent_weeks: float = 4.0, recent_share: float = 0.1
) -> np.ndarray:
    """Sampling weights ``(N,)`` summing to 1.

    ``1 - recent_share`` is split equally between the calendar months present (January of every
    year together, and so on), uniformly within a month; ``recent_share`` goes uniformly to the
    rows listed in the ``recent_weeks`` before the newest date. Undated rows get the mean weight.
    """
    if not 0.0 <= recent_share < 1.0:
        raise ValueError("recent_share must be in [0, 1)")
    listed = pd.to_datetime(pd.Series(listed_at).reset_index(drop=True), errors="coerce")
    n = len(listed)
    if n == 0:
        return np.zeros(0)
    dated = listed.notna().to_numpy()
    if not dated.any():
        return np.full(n, 1.0 / n)
    weights = np.zeros(n)
    month = listed.dt.month.to_numpy()
    present = np.unique(month[dated])
    for m in present:
        rows = dated & (month == m)
        weights[rows] = (1.0 - recent_share) / len(present) / rows.sum()
    if recent_share > 0:
        newest = listed.max()
        recent = (dated & (listed >= newest - pd.Timedelta(weeks=recent_weeks))).to_numpy()
        weights[recent] += recent_share / recent.sum()
    if not dated.all():
        weights[~dated] = weights[dated].mean()
    return weights / weights.sum()
