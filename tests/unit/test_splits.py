import numpy as np
import pandas as pd
import pytest

from training.splits import SplitSpec, assign_folds, split_offers, title_groups

COLOURS = ["Black", "Navy Blue", "white", "Olive Green", "Maroon"]


def offers(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    days = rng.integers(0, 700, n)
    # 1000 offers, about 250 products in one to five colours each
    products = rng.integers(0, 250, n)
    titles = [f"Brand{p % 40} Women {COLOURS[rng.integers(len(COLOURS))]} Style{p} Flats" for p in products]
    return pd.DataFrame(
        {
            "listed_at": (pd.Timestamp("2015-01-01") + pd.to_timedelta(days, unit="D")).strftime("%Y-%m-%d"),
            "title": titles,
            "product": products,
        }
    )


@pytest.mark.parametrize("protocol", ["random", "time", "group"])
def test_split_parts_are_disjoint_complete_and_deterministic(protocol):
    frame = offers()
    spec = SplitSpec(protocol, test_share=0.2, validation_share=0.1, seed=3)
    split = split_offers(frame, spec)
    parts = np.concatenate([split.train, split.validation, split.test])
    assert sorted(parts.tolist()) == list(range(len(frame)))
    if protocol == "group":  # whole groups: the shares hold to within a group's size
        assert abs(len(split.test) - 200) <= 10 and abs(len(split.validation) - 80) <= 10
    else:
        assert len(split.test) == 200 and len(split.validation) == 80
    again = split_offers(frame, spec)
    assert np.array_equal(again.test, split.test) and np.array_equal(again.train, split.train)
    assert np.array_equal(again.validation, split.validation)


def test_time_split_tests_on_the_newest_offers():
    frame = offers()
    split = split_offers(frame, SplitSpec("time"))
    dates = pd.to_datetime(frame["listed_at"])
    assert dates.iloc[split.train].max() <= dates.iloc[split.validation].min()
    assert dates.iloc[split.validation].max() <= dates.iloc[split.test].min()


def test_group_split_keeps_every_product_on_one_side():
    frame = offers()
    for seed in range(5):
        split = split_offers(frame, SplitSpec("group", seed=seed))
        sides = [set(frame["product"].iloc[part]) for part in (split.train, split.validation, split.test)]
        assert not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2]
    # a random split of the same offers puts colour variants on both sides
    split = split_offers(frame, SplitSpec("random"))
    assert set(frame["product"].iloc[split.train]) & set(frame["product"].iloc[split.test])


def test_title_groups_ignore_colour_case_and_punctuation_only():
    groups = title_groups(
        [
            "Rocia Women Black Flats",
            "ROCIA women beige flats!",
            "Rocia Women Navy Blue Flats",
            "Rocia Women Black Heels",
            "Catwalk Women Black Flats",
            "",
            "Black",
            "",
        ]
    )
    assert groups[0] == groups[1] == groups[2]
    assert len({groups[0], groups[3], groups[4]}) == 3
    # nothing left to group by: each such offer stands alone
    assert len({groups[5], groups[6], groups[7]}) == 3 and groups[5] not in groups[:5]


def test_folds_keep_groups_together_and_random_folds_are_unchanged():
    groups = np.repeat(np.arange(300), 3)
    folds = assign_folds(len(groups), 4, seed=1, groups=groups)
    assert all(len(set(folds[groups == g])) == 1 for g in range(300))
    assert min(np.bincount(folds, minlength=4)) > 150
    # without groups: the permutation the random split's cross-fitting has always used
    assert np.array_equal(assign_folds(900, 4, seed=1), np.random.default_rng(1).permutation(900) % 4)


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(ValueError, match="protocol"):
        SplitSpec("by-shop")
