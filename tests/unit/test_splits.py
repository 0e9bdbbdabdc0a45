import numpy as np
import pandas as pd
import pytest

from training.splits import SplitSpec, split_offers


def offers(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    days = rng.integers(0, 700, n)
    return pd.DataFrame({"listed_at": (pd.Timestamp("2015-01-01") + pd.to_timedelta(days, unit="D")).strftime("%Y-%m-%d")})


@pytest.mark.parametrize("protocol", ["random", "time"])
def test_split_parts_are_disjoint_complete_and_deterministic(protocol):
    frame = offers()
    spec = SplitSpec(protocol, test_share=0.2, validation_share=0.1, seed=3)
    split = split_offers(frame, spec)
    parts = np.concatenate([split.train, split.validation, split.test])
    assert sorted(parts.tolist()) == list(range(len(frame)))
    assert len(split.test) == 200 and len(split.validation) == 80
    again = split_offers(frame, spec)
    assert np.array_equal(again.test, split.test) and np.array_equal(again.train, split.train)


def test_time_split_tests_on_the_newest_offers():
    frame = offers()
    split = split_offers(frame, SplitSpec("time"))
    dates = pd.to_datetime(frame["listed_at"])
    assert dates.iloc[split.train].max() <= dates.iloc[split.validation].min()
    assert dates.iloc[split.validation].max() <= dates.iloc[split.test].min()


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(ValueError, match="protocol"):
        SplitSpec("by-shop")
