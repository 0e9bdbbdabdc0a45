import json
from pathlib import Path

import pytest

from core.bundle import TRAINING_OFFERS_FILE, BundleConfig, BundleError, ModelBundle, OperatingPoint, TrainingOffers
from core.dictionaries import Dictionaries
from tests.unit.bundles import POINTS, config_document


def test_training_offers_round_trip_keeps_awkward_ids(tmp_path):
    ids = ["1164", "shop\tA-7", 'quoted "id"', "two\nlines", "ünïcode"]
    prints = [f"{i:032x}" for i in range(len(ids))]
    TrainingOffers.save(tmp_path, ids, prints)
    record = TrainingOffers.read(tmp_path)
    assert record.ids == set(ids) and record.fingerprints == set(prints)


def test_unreadable_record_and_mismatched_lengths_are_refused(tmp_path):
    assert TrainingOffers.read(tmp_path) is None
    with pytest.raises(ValueError, match="2 offer ids but 1 fingerprints"):
        TrainingOffers.save(tmp_path, ["1", "2"], ["f" * 32])
    (tmp_path / TRAINING_OFFERS_FILE).write_text("1\n2\n")
    with pytest.raises(BundleError, match="offer_id and fingerprint"):
        TrainingOffers.read(tmp_path)


def bundle_with(**overrides) -> ModelBundle:
    config = BundleConfig.model_validate(config_document(**overrides))
    return ModelBundle(path=Path("."), config=config, labels=("A > x", "A > y"), dictionaries=Dictionaries())


def test_config_json_round_trips_typed_and_is_read_by_attribute(tmp_path):
    config = BundleConfig.model_validate(config_document())
    config.write(tmp_path)
    again = BundleConfig.read(tmp_path)
    assert again == config
    assert again.training.labels.label_columns == ["category"] and again.training.split.protocol == "random"
    assert again.model.image_size == 32 and isinstance(again.operating_points[1], OperatingPoint)
    assert json.loads((tmp_path / "config.json").read_text()) == config_document()


def test_a_bundle_of_another_format_is_refused_naming_both_formats(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_document(bundle_format=2)))
    with pytest.raises(BundleError, match=r"bundle format 2, but this catstream reads format 3"):
        BundleConfig.read(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_version": "x"}))
    with pytest.raises(BundleError, match="bundle format None"):
        BundleConfig.read(tmp_path)
    broken = config_document()
    del broken["training"]["labels"]
    (tmp_path / "config.json").write_text(json.dumps(broken))
    with pytest.raises(BundleError, match="labels"):
        BundleConfig.read(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot be read"):
        BundleConfig.read(tmp_path)


def test_served_thresholds_default_to_the_bundles():
    bundle = bundle_with()
    assert bundle.with_thresholds() is bundle
    same = bundle.with_thresholds(threshold=0.99)  # the bundle's own leaf threshold keeps its parent threshold
    assert (same.threshold, same.parent_threshold) == (0.99, 0.95)


def test_an_overridden_leaf_threshold_takes_the_parent_threshold_of_its_operating_point():
    bundle = bundle_with()
    assert bundle.operating_point(0.95).threshold == 0.9  # the highest tabled at or below it
    assert bundle.operating_point(0.99).threshold == 0.99 and bundle.operating_point(-1.0) is None
    served = bundle.with_thresholds(threshold=0.95)
    assert (served.threshold, served.parent_threshold) == (0.95, 0.99)
    assert served.served_at.parent_threshold_from == "operating_point"
    assert served.served_at.operating_point.threshold == 0.9
    assert bundle_with(operating_points=POINTS[:1]).with_thresholds(threshold=0.5).parent_threshold is None
    assert (bundle.threshold, bundle.parent_threshold) == (0.99, 0.95)  # the loaded bundle is untouched


def test_a_given_parent_threshold_wins_and_an_empty_table_keeps_the_bundles():
    bundle = bundle_with()
    both = bundle.with_thresholds(threshold=0.95, parent_threshold=0.7)
    assert (both.threshold, both.parent_threshold, both.served_at.parent_threshold_from) == (0.95, 0.7, "override")
    bare = bundle_with(operating_points=[]).with_thresholds(threshold=0.95)
    assert (bare.parent_threshold, bare.served_at.parent_threshold_from) == (0.95, "bundle")


def test_the_note_on_served_thresholds_says_where_the_parent_threshold_came_from():
    bundle = bundle_with()
    assert bundle.served_at_note() is None
    assert bundle.with_thresholds(threshold=0.95).served_at_note() == (
        "served at threshold 0.9500 (the bundle's: 0.9900), parent threshold 0.9900: the one chosen in training on "
        "the offers its operating point at 0.9000 leaves uncertain; on the offers the bundle was calibrated on, that "
        "operating point categorised 95.00% at precision 99.00% (lower bound 98.50%)"
    )
    assert (
        bundle.with_thresholds(threshold=0.5)
        .served_at_note()
        .startswith(
            "served at threshold 0.5000 (the bundle's: 0.9900) and no parent threshold: none reached the target"
        )
    )
    assert bundle.with_thresholds(parent_threshold=0.8).served_at_note() == (
        "served at threshold 0.9900 (the bundle's: 0.9900), parent threshold 0.8000, as given"
    )
