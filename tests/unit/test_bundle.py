import pytest

from catstream.bundle import TRAINING_OFFERS_FILE, BundleError, TrainingOffers


def test_training_offers_round_trip_keeps_awkward_ids(tmp_path):
    ids = ["1164", "shop\tA-7", 'quoted "id"', "two\nlines", "ünïcode"]
    prints = [f"{i:032x}" for i in range(len(ids))]
    TrainingOffers.save(tmp_path, ids, prints)
    record = TrainingOffers.read(tmp_path)
    assert record.ids == set(ids) and record.fingerprints == set(prints)


def test_ids_only_record_of_older_bundles_is_read_and_replaced(tmp_path):
    assert TrainingOffers.read(tmp_path) is None
    (tmp_path / "training_offers.txt").write_text("1\n2\n\n3\n")
    assert TrainingOffers.read(tmp_path) == TrainingOffers(ids=frozenset({"1", "2", "3"}), fingerprints=None)
    TrainingOffers.save(tmp_path, ["4"], ["f" * 32])  # retrained into the same directory
    assert not (tmp_path / "training_offers.txt").exists()
    assert TrainingOffers.read(tmp_path).ids == {"4"}


def test_unreadable_record_and_mismatched_lengths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="2 offer ids but 1 fingerprints"):
        TrainingOffers.save(tmp_path, ["1", "2"], ["f" * 32])
    (tmp_path / TRAINING_OFFERS_FILE).write_text("1\n2\n")
    with pytest.raises(BundleError, match="offer_id and fingerprint"):
        TrainingOffers.read(tmp_path)


def bundle_with(config):
    from pathlib import Path

    from catstream.bundle import ModelBundle
    from catstream.dictionaries import Dictionaries
    return ModelBundle(path=Path("."), config=config, labels=("A > x", "A > y"), dictionaries=Dictionaries())


POINTS = [{"threshold": t, "coverage": c, "precision": 0.99, "precision_bound": b, "parent_threshold": p,
           "parent_offers": 10, "parent_precision": 1.0}
          for t, c, b, p in ((0.0, 1.0, 0.97, None), (0.9, 0.95, 0.985, 0.99), (0.99, 0.9, 0.996, 0.9))]


def test_served_thresholds_default_to_the_bundles():
    bundle = bundle_with({"threshold": 0.99, "parent_threshold": 0.95, "operating_points": POINTS})
    assert bundle.with_thresholds() is bundle
    same = bundle.with_thresholds(threshold=0.99)  # the bundle's own leaf threshold keeps its parent threshold
    assert (same.threshold, same.parent_threshold) == (0.99, 0.95)


def test_an_overridden_leaf_threshold_takes_the_parent_threshold_of_its_operating_point():
    bundle = bundle_with({"threshold": 0.99, "parent_threshold": 0.95, "operating_points": POINTS})
    assert bundle.operating_point(0.95)["threshold"] == 0.9  # the highest tabled at or below it
    assert bundle.operating_point(0.99)["threshold"] == 0.99 and bundle.operating_point(-1.0) is None
    served = bundle.with_thresholds(threshold=0.95)
    assert (served.threshold, served.parent_threshold) == (0.95, 0.99)
    assert served.config["served_at"]["parent_threshold_from"] == "operating_point"
    assert served.config["served_at"]["operating_point"]["threshold"] == 0.9
    assert bundle_with({"threshold": 0.99, "operating_points": POINTS}).with_thresholds(threshold=0.5).parent_threshold is None
    assert (bundle.threshold, bundle.parent_threshold) == (0.99, 0.95)  # the loaded bundle is untouched


def test_a_given_parent_threshold_wins_and_old_bundles_keep_theirs():
    bundle = bundle_with({"threshold": 0.99, "parent_threshold": 0.95, "operating_points": POINTS})
    both = bundle.with_thresholds(threshold=0.95, parent_threshold=0.7)
    assert (both.threshold, both.parent_threshold, both.config["served_at"]["parent_threshold_from"]) == (0.95, 0.7, "override")
    old = bundle_with({"threshold": 0.99, "parent_threshold": 0.95}).with_thresholds(threshold=0.95)
    assert (old.parent_threshold, old.config["served_at"]["parent_threshold_from"]) == (0.95, "bundle")
    older = bundle_with({"threshold": 0.99}).with_thresholds(threshold=0.95)  # before the parent threshold: the leaf one
    assert older.parent_threshold == 0.99


def test_the_note_on_served_thresholds_says_where_the_parent_threshold_came_from():
    bundle = bundle_with({"threshold": 0.99, "parent_threshold": 0.95, "operating_points": POINTS})
    assert bundle.served_at_note() is None
    assert bundle.with_thresholds(threshold=0.95).served_at_note() == (
        "served at threshold 0.9500 (the bundle's: 0.9900), parent threshold 0.9900: the one chosen in training on "
        "the offers its operating point at 0.9000 leaves uncertain; on the offers the bundle was calibrated on, that "
        "operating point categorised 95.00% at precision 99.00% (lower bound 98.50%)")
    assert bundle.with_thresholds(threshold=0.5).served_at_note().startswith(
        "served at threshold 0.5000 (the bundle's: 0.9900) and no parent threshold: none reached the target")
    assert bundle.with_thresholds(parent_threshold=0.8).served_at_note() == (
        "served at threshold 0.9900 (the bundle's: 0.9900), parent threshold 0.8000, as given")
