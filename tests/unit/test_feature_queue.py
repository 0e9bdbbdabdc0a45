from types import SimpleNamespace

import numpy as np
import pytest

from core.decision import decide_batch
from core.feature_queue import (
    CLAIMED,
    FAILED,
    FREE,
    SCORED,
    SENDING,
    FeatureQueue,
    InputField,
    OfferMeta,
    QueueLayout,
)
from core.features import input_fields

FIELDS = input_fields(
    image_size=8, max_title_tokens=4, max_mall_tokens=2, max_title_grams=6, num_classes=5, lexical=True
)
VECTORS = (InputField("image", "float16", (4,)), InputField("text", "float16", (4,)))
LAYOUT = QueueLayout(workers=2, slots_per_worker=3, fields=FIELDS, vectors=VECTORS)
LABELS = ("Men > Shoes > Casual", "Men > Shoes > Sports", "Women > Flats", "Women > Heels", "Men > Watches")


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


def test_put_claim_score_cycle_across_two_mappings(queue, tmp_path):
    other = FeatureQueue.attach(queue.path)  # what a second process sees
    assert other.layout == LAYOUT
    keys = {"product": "ab" * 16, "image_sha": "0f" * 32, "title": "로시아 Women Black Flats ✓"}
    queue.put(4, features(7), meta("o7", **keys))
    queue.put(0, features(9), meta("오퍼-9", partition=0, offset=2**40, image_status="too_large", produced_ms=None))
    ready = other.ready_slots(10)
    assert ready.tolist() == [4, 0]  # oldest first
    batch = other.claim(ready)
    assert batch.preprocess_ms.tolist() == [2.25, 2.25] and len(batch) == 2
    inputs = batch.features.inputs
    assert set(inputs) == {field.name for field in FIELDS} and len(batch.features) == 2
    assert inputs["image"].shape == (2, 3, 8, 8) and inputs["image"][0, 0, 0, 0] == 7
    assert inputs["has_image"].dtype == np.float32 and inputs["has_image"].tolist() == [1.0, 1.0]
    assert inputs["title_ids"][1].tolist() == [9, 10, 11, 12]
    assert inputs["title_grams"][0].tolist() == [0, 7, 14, 21, 28, 35]
    np.testing.assert_allclose(batch.features.lexical[1], [-9, -4.5, 0, 4.5, 9])
    assert batch.features.exclusion[0].tolist() == [False, False, True, False, False]
    assert (queue.state[[4, 0]] == CLAIMED).all()
    # The inference side writes the batch's decisions and vectors back; the owner reads them.
    probabilities = np.array([[0.05, 0.9, 0.02, 0.02, 0.01], [0.3, 0.3, 0.2, 0.1, 0.1]])
    decisions = decide_batch(
        probabilities, batch.features.exclusion, labels=LABELS, threshold=0.8, parent_threshold=0.55
    )
    vectors = {"image": np.full((2, 4), 0.5), "text": np.arange(8).reshape(2, 4) / 8}
    other.score(ready, decisions, vectors, inference_ms=3.5)
    assert (queue.state[[4, 0]] == SCORED).all()
    first, second = queue.scored(4, LABELS), queue.scored(0, LABELS)
    assert first.meta == meta("o7", **keys) and second.meta.offer_id == "오퍼-9" and second.meta.title == ""
    assert (first.decision.category, first.decision.parent) == ("Men > Shoes > Sports", None)
    assert [name for name, _ in first.decision.top3] == [
        "Men > Shoes > Sports",
        "Men > Shoes > Casual",
        "Women > Heels",  # label 7 % 5 = 2, Women > Flats, is ruled out
    ]
    # Label 9 % 5 = 4 ruled out: Men > Shoes holds 0.6 of the remaining 0.9.
    assert second.decision.category == "uncertain" and second.decision.excluded == 1
    assert second.decision.parent[0] == "Men > Shoes" and second.decision.parent[1] == pytest.approx(2 / 3)
    assert first.vectors["image"].dtype == np.float16 and first.vectors["text"].tolist() == [0, 0.125, 0.25, 0.375]
    assert (first.inference_ms, first.batch_size) == (3.5, 2) and first.queue_wait_ms >= 0
    queue.sending(4)
    other.fail(0, "inference failed: boom")
    assert queue.state[4] == SENDING and queue.state[0] == FAILED
    assert queue.error_of(0) == "inference failed: boom"
    other.close()
    assert queue.path.exists()  # only the creator removes the file


def test_claim_into_buffers_gathers_the_same_rows_and_pads_with_the_last(queue):
    """The inference loop gathers into two preallocated buffer sets: the rows are those a plain
    claim copies, padding rows copy the last offer, and nothing outside the batch's rows moves."""
    for slot, value in ((1, 3), (5, 6), (2, 8)):
        queue.put(slot, features(value), meta(f"o{value}"))
    ready = queue.ready_slots(10)
    plain = {name: array[ready] for name, array in queue.inputs.items()}
    buffers = queue.gather_buffers(8)
    assert {name: array.shape[0] for name, array in buffers.items()} == dict.fromkeys(plain, 8)
    marker = {name: array.copy() for name, array in buffers.items()}
    batch = queue.claim(ready, into=buffers, rows=4)
    assert len(batch) == 3 and len(batch.features) == 4
    for name, array in batch.features.inputs.items():
        assert np.shares_memory(array, buffers[name])  # gathered in place, not a new array
        np.testing.assert_array_equal(array[:3], plain[name])
        np.testing.assert_array_equal(array[3], plain[name][-1])
        np.testing.assert_array_equal(buffers[name][4:], marker[name][4:])
    assert (queue.state[ready] == CLAIMED).all()
    queue.put(0, features(9), meta("o9"))
    unpadded = queue.claim(queue.ready_slots(10), into=buffers)
    assert len(unpadded.features) == 1 and unpadded.features.inputs["title_ids"][0].tolist() == [9, 10, 11, 12]


def test_a_layout_without_vectors_reads_back_none(tmp_path):
    queue = FeatureQueue.create(QueueLayout(workers=1, slots_per_worker=1, fields=FIELDS), directory=tmp_path)
    try:
        queue.put(0, features(1), meta("o1"))
        batch = queue.claim(queue.ready_slots(1))
        decisions = decide_batch(
            np.eye(5)[[1]], batch.features.exclusion, labels=LABELS, threshold=0.5, parent_threshold=None
        )
        queue.score(batch.slots, decisions, {}, inference_ms=1.0)
        scored = queue.scored(0, LABELS)
        assert scored.vectors is None and scored.decision.category == LABELS[1]
    finally:
        queue.close()


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
