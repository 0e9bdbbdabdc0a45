import numpy as np
import pandas as pd
import pytest

from training.history import HistoryStore, season_balanced_weights


def skewed_dates(seed=0):
    """Three years of listings, ten times as many in April as in any other month."""
    rng = np.random.default_rng(seed)
    dates = []
    for month in range(1, 13):
        n = 500 if month == 4 else 50
        dates += [f"{rng.integers(2014, 2017)}-{month:02d}-{rng.integers(1, 28):02d}" for _ in range(n)]
    return pd.Series(dates)


def test_every_calendar_month_gets_the_same_weight():
    dates = skewed_dates()
    weights = season_balanced_weights(dates, recent_share=0.0)
    per_month = pd.Series(weights).groupby(pd.to_datetime(dates).dt.month).sum()
    assert len(per_month) == 12
    np.testing.assert_allclose(per_month.to_numpy(), 1 / 12, rtol=1e-9)
    assert weights.sum() == pytest.approx(1.0)


def test_recent_weeks_get_their_share_on_top():
    dates = skewed_dates()
    weights = season_balanced_weights(dates, recent_weeks=4, recent_share=0.25)
    listed = pd.to_datetime(dates)
    recent = listed >= listed.max() - pd.Timedelta(weeks=4)
    assert 0 < recent.sum() < len(dates)
    # the recent rows hold the extra share plus their part of their month's share
    assert weights[recent.to_numpy()].sum() >= 0.25
    months = pd.Series(weights).groupby(listed.dt.month).sum()
    assert months.min() >= 0.75 / 12 - 1e-12


def test_undated_rows_get_the_mean_weight():
    weights = season_balanced_weights(pd.Series(["2016-01-05", "", "2016-07-01"]), recent_share=0.0)
    assert weights[1] == pytest.approx(weights[[0, 2]].mean() / weights.sum() * weights.sum())
    assert weights.sum() == pytest.approx(1.0)


def test_history_store_partitions_by_month_and_keeps_the_latest_version(tmp_path):
    store = HistoryStore(tmp_path / "history")
    first = pd.DataFrame(
        {
            "offer_id": ["1", "2", "3"],
            "title": ["a", "b", "c"],
            "listed_at": ["2016-01-02", "2016-02-03", ""],
            "label": ["X", "Y", "Z"],
        }
    )
    assert store.add(first) == {"2016-01": 1, "2016-02": 1, "undated": 1}
    store.add(pd.DataFrame({"offer_id": ["2"], "title": ["b"], "listed_at": ["2016-02-03"], "label": ["Y2"]}))
    assert HistoryStore.is_store(tmp_path / "history")
    assert store.months() == {"2016-01": 1, "2016-02": 2, "undated": 1}
    frame = store.read().set_index("offer_id")
    assert frame["label"].to_dict() == {"1": "X", "2": "Y2", "3": "Z"}
    assert store.read(months=["2016-01"])["offer_id"].tolist() == ["1"]


def test_history_store_needs_labels(tmp_path):
    with pytest.raises(ValueError, match="label"):
        HistoryStore(tmp_path).add(pd.DataFrame({"offer_id": ["1"], "title": ["a"], "listed_at": [""]}))
