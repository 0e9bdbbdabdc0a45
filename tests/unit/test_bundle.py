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
