import numpy as np
import pytest

from training.significance import accuracy_interval, accuracy_interval_by_group, paired_comparison


def test_accuracy_interval_brackets_the_observed_rate_and_narrows_with_more_offers():
    low, high = accuracy_interval(7016, 7144)
    assert low < 7016 / 7144 < high
    assert low > 0.978 and high < 0.986
    wide = accuracy_interval(982, 1000)
    assert wide[1] - wide[0] > high - low
    assert accuracy_interval(0, 50)[0] == 0.0
    assert accuracy_interval(50, 50)[1] == 1.0


def test_accuracy_interval_covers_the_true_rate():
    rng = np.random.default_rng(0)
    right = rng.binomial(7144, 0.982, 2000)
    missed = [not (low <= 0.982 <= high) for low, high in (accuracy_interval(int(r), 7144) for r in right)]
    assert np.mean(missed) <= 0.05
    assert np.mean(missed) > 0.005  # not vacuously wide


def test_paired_comparison_counts_only_the_offers_the_two_disagree_on():
    this = np.array([1, 1, 1, 0, 0, 1, 1], bool)
    other = np.array([1, 0, 0, 0, 1, 1, 1], bool)
    paired = paired_comparison(this, other)
    assert (paired["only_this"], paired["only_other"], paired["offers"]) == (2, 1, 7)
    assert paired["difference"] == pytest.approx(1 / 7)
    # The difference can move only as far as the 3 disagreements allow.
    low, high = paired["difference_interval"]
    assert -3 / 7 <= low < 1 / 7 < high <= 3 / 7
    swapped = paired_comparison(other, this)
    assert swapped["difference"] == pytest.approx(-1 / 7)
    assert swapped["p_value"] == pytest.approx(paired["p_value"])
    assert swapped["difference_interval"] == pytest.approx(
        [-paired["difference_interval"][1], -paired["difference_interval"][0]]
    )


def test_identical_systems_are_not_told_apart():
    correct = np.random.default_rng(1).random(500) < 0.9
    paired = paired_comparison(correct, correct)
    assert paired["p_value"] == 1.0 and paired["difference_interval"] == [0.0, 0.0]


def test_a_real_lead_is_found_where_unpaired_intervals_overlap():
    # Both right on most offers; the first alone right on 40, the second alone on 10.
    shared = np.ones(7144, bool)
    shared[:100] = False
    this, other = shared.copy(), shared.copy()
    this[100:110] = False
    other[110:150] = False
    paired = paired_comparison(this, other)
    assert paired["p_value"] < 0.001
    assert paired["difference_interval"][0] > 0
    this_low, _ = accuracy_interval(int(this.sum()), 7144)
    _, other_high = accuracy_interval(int(other.sum()), 7144)
    assert this_low < other_high  # the unpaired intervals could not have said it


def test_equally_good_systems_are_called_different_at_the_nominal_rate():
    rng = np.random.default_rng(2)
    rejected, covered = 0, 0
    for _ in range(400):
        base = rng.random(3000) < 0.97
        # Each system flips 2% of the offers on its own: same accuracy, different mistakes.
        this = base ^ (rng.random(3000) < 0.02)
        other = base ^ (rng.random(3000) < 0.02)
        paired = paired_comparison(this, other)
        rejected += paired["p_value"] < 0.05
        low, high = paired["difference_interval"]
        covered += low <= 0.0 <= high
    assert rejected / 400 <= 0.06
    assert covered / 400 >= 0.94


def test_systems_scored_on_different_offers_are_refused():
    with pytest.raises(ValueError, match="different offers"):
        paired_comparison(np.ones(3, bool), np.ones(4, bool))


def test_a_lead_from_one_product_is_not_mistaken_for_a_lead_over_many():
    # The first system is right on all 60 colour variants of one product the second gets wrong.
    groups = np.repeat(np.arange(1000), 3)
    groups[:60] = -1
    this, other = np.ones(len(groups), bool), np.ones(len(groups), bool)
    other[:60] = False
    other[60:63] = this[63:66] = False  # and one product each way elsewhere
    paired = paired_comparison(this, other, groups=groups)
    assert paired["p_value"] < 1e-10  # offer by offer it looks overwhelming
    by_group = paired["by_group"]
    assert (by_group["groups"], by_group["groups_this"], by_group["groups_other"], by_group["p_value"]) == (
        981,
        2,
        1,
        1.0,
    )
    # Its interval spans what one product can do: drawn or not, the lead is 60 offers or none.
    assert by_group["difference_interval"][0] <= 0.0 < paired["difference_interval"][0]
    # The same 60-offer lead spread over 60 products is found by product too.
    spread = np.ones(len(groups), bool)
    spread[np.arange(60) * 3 + 100] = False
    by_group = paired_comparison(np.ones(len(groups), bool), spread, groups=np.repeat(np.arange(1000), 3))["by_group"]
    assert (by_group["groups_this"], by_group["groups_other"]) == (60, 0) and by_group["p_value"] < 1e-10
    with pytest.raises(ValueError, match="one group per offer"):
        paired_comparison(this, other, groups=groups[:-1])


def _clustered_test_set(rng, accuracy=0.9, products=400):
    """Products of 1-10 colour variants that a system gets right or wrong all together."""
    sizes = rng.integers(1, 11, products)
    right = rng.random(products) < accuracy
    return np.repeat(right, sizes), np.repeat(np.arange(products), sizes)


def test_interval_by_product_covers_the_true_rate_where_the_per_offer_interval_does_not():
    rng = np.random.default_rng(1)
    missed_by_offer, missed_by_product = [], []
    for draw in range(200):
        correct, groups = _clustered_test_set(rng)
        low, high = accuracy_interval(int(correct.sum()), len(correct))
        missed_by_offer.append(not low <= 0.9 <= high)
        low, high = accuracy_interval_by_group(correct, groups, draws=500, seed=draw)
        missed_by_product.append(not low <= 0.9 <= high)
    assert np.mean(missed_by_offer) > 0.25  # ~2,200 offers, but only 400 pieces of evidence
    assert np.mean(missed_by_product) <= 0.09  # nominal 5%, give or take the bootstrap's own error


def test_interval_by_product_is_the_per_offer_interval_when_every_product_is_one_offer():
    correct = np.random.default_rng(2).random(7144) < 0.982
    by_offer = accuracy_interval(int(correct.sum()), len(correct))
    by_product = accuracy_interval_by_group(correct, np.arange(len(correct)))
    assert by_product == pytest.approx(by_offer, abs=0.001)
    assert accuracy_interval_by_group(correct, np.arange(len(correct))) == by_product  # seeded
    with pytest.raises(ValueError, match="one group per offer"):
        accuracy_interval_by_group(correct, np.arange(3))
