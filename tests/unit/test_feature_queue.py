from types import SimpleNamespace

import numpy as np
import pytest

from core.feature_queue import CLAIMED, DONE, FAILED, FREE, READY, FeatureQueue, InputField, OfferMeta, QueueLayout
from core.features import input_fields

FIELDS = input_fields(
    image_size=8, max_title_tokens=4, max_mall_tokens=2, max_title_grams=6, num_classes=5, lexical=True
)
LAYOUT = QueueLayout(workers=2, slots_per_worker=3, fields=FIELDS)


@pytest.fixture()
def queue(tmp_path):
    q = FeatureQueue.create(LAYOUT, directory=tmp_path)
    yield q
    q.close()


def features(value: int, **overrides):
    """An object with one attribute per input field, as the featuriser's OfferFeatures has."""
    values = dict(
        image=np.full((3, 8, 8), value, np.uint8),
        has_image=True,
        mall_weight=0.5,
        title_ids=np.arange(4) + value,
        mall_ids=np.zeros(2, np.int64),
        title_grams=np.arange(6) * value,
        exclusion=np.eye(5, dtype=bool)[value % 5],
        lexical=np.linspace(-1, 1, 5, dtype=np.float32) * value,
    )
    return SimpleNamespace(**(values | overrides))


def meta(offer_id: str, **overrides) -> OfferMeta:
    return OfferMeta(
        **(
            dict(offer_id=offer_id, partition=3, offset=41, image_status="used", produced_ms=1.5e12, preprocess_ms=2.25)
            | overrides
        )
    )


def test_slots_start_free_and_are_owned_per_worker(queue):
    assert (queue.state == FREE).all()
    assert list(LAYOUT.worker_slots(1)) == [3, 4, 5]


def test_put_claim_complete_cycle_across_two_mappings(queue, tmp_path):
    other = FeatureQueue.attach(queue.path)  # what a second process sees
    assert other.layout == LAYOUT
    keys = {"product": "ab" * 16, "image_sha": "0f" * 32, "title": "로시아 Women Black Flats ✓"}
    queue.put(4, features(7), meta("o7", **keys))
    queue.put(0, features(9), meta("오퍼-9", partition=0, offset=2**40, image_status="too_large", produced_ms=None))
    ready = other.ready_slots(10)
    assert ready.tolist() == [4, 0]  # oldest first
    batch = other.claim(ready)
    assert [offer.offer_id for offer in batch.offers] == ["o7", "오퍼-9"]
    assert batch.offers[0] == meta("o7", **keys)
    assert batch.offers[1].product is None and batch.offers[1].image_sha is None and batch.offers[1].title == ""
    assert batch.offers[1] == meta("오퍼-9", partition=0, offset=2**40, image_status="too_large", produced_ms=None)
    inputs = batch.features.inputs
    assert set(inputs) == {field.name for field in FIELDS} and len(batch.features) == 2
    assert inputs["image"].shape == (2, 3, 8, 8) and inputs["image"][0, 0, 0, 0] == 7
    assert inputs["has_image"].dtype == np.float32 and inputs["has_image"].tolist() == [1.0, 1.0]
    assert inputs["title_ids"][1].tolist() == [9, 10, 11, 12]
    assert inputs["title_grams"][0].tolist() == [0, 7, 14, 21, 28, 35]
    np.testing.assert_allclose(batch.features.lexical[1], [-9, -4.5, 0, 4.5, 9])
    assert batch.features.exclusion[0].tolist() == [False, False, True, False, False]
    assert (queue.state[[4, 0]] == CLAIMED).all()
    other.complete(4)
    other.fail(0, "inference failed: boom")
    assert queue.state[4] == DONE and queue.state[0] == FAILED
    assert queue.error_of(0) == "inference failed: boom"
    other.close()
    assert queue.path.exists()  # only the creator removes the file


def test_retry_puts_slot_back_and_counts(queue):
    queue.put(1, features(1), meta("o1"))
    queue.claim(queue.ready_slots(1))
    assert queue.retry(1) == 1 and queue.state[1] == READY


def test_an_offer_id_that_cannot_fit_leaves_the_slot_free(queue):
    with pytest.raises(ValueError, match="exceeds the slot"):
        queue.put(2, features(0), meta("한" * 300))  # parse_offer allows 200 characters
    assert queue.state[2] == FREE


def test_an_unknown_image_status_is_refused_before_the_slot_is_published(queue):
    with pytest.raises(ValueError):
        queue.put(2, features(0), meta("o", image_status="maybe"))
    assert queue.state[2] == FREE


def test_close_removes_file(tmp_path):
    q = FeatureQueue.create(LAYOUT, directory=tmp_path)
    path = q.path
    q.close()
    assert not path.exists()


def test_the_layout_follows_the_declared_fields_and_nothing_else(tmp_path):
    fields = input_fields(
        image_size=8, max_title_tokens=4, max_mall_tokens=2, max_title_grams=0, num_classes=5, lexical=False
    )
    assert {field.name for field in fields} == {
        "image",
        "has_image",
        "mall_weight",
        "title_ids",
        "mall_ids",
        "exclusion",
    }
    q = FeatureQueue.create(QueueLayout(workers=1, slots_per_worker=2, fields=fields), directory=tmp_path)
    try:
        q.put(0, features(1), meta("o"))  # extra attributes (title_grams, lexical) are not carried
        batch = q.claim(np.array([0]))
        assert batch.features.lexical is None and "title_grams" not in batch.features.inputs
    finally:
        q.close()
    extra = QueueLayout(workers=1, slots_per_worker=1, fields=(*fields, InputField("price", "float32", ())))
    q = FeatureQueue.create(extra, directory=tmp_path)
    try:  # a new input is carried without the queue naming it
        q.put(0, features(1, price=12.5), meta("o"))
        assert q.claim(np.array([0])).features.inputs["price"].tolist() == [12.5]
    finally:
        q.close()


def test_repeated_field_names_are_refused():
    with pytest.raises(ValueError, match="repeat"):
        QueueLayout(workers=1, slots_per_worker=1, fields=(FIELDS[0], FIELDS[0]))
