import numpy as np
import pytest

from catstream.feature_queue import CLAIMED, DONE, FAILED, FREE, READY, FeatureQueue, QueueLayout

LAYOUT = QueueLayout(workers=2, slots_per_worker=3, image_size=8, max_title_tokens=4, max_mall_tokens=2,
                     num_classes=5, max_title_grams=6, lexical=True, meta_bytes=128)


@pytest.fixture()
def queue(tmp_path):
    q = FeatureQueue.create(LAYOUT, directory=tmp_path)
    yield q
    q.close()


def put(queue, slot, value):
    queue.put(slot, image=np.full((3, 8, 8), value, np.uint8), has_image=True,
              title_ids=np.arange(4) + value, mall_ids=np.zeros(2, np.int64), title_grams=np.arange(6) * value,
              exclusion=np.eye(5, dtype=bool)[value % 5], lexical=np.linspace(-1, 1, 5, dtype=np.float32) * value,
              meta={"offer_id": f"o{value}", "t": "한글"})


def test_slots_start_free_and_are_owned_per_worker(queue):
    assert (queue.state == FREE).all()
    assert list(LAYOUT.worker_slots(1)) == [3, 4, 5]


def test_put_claim_complete_cycle_across_two_mappings(queue, tmp_path):
    other = FeatureQueue.attach(queue.path)  # what a second process sees
    put(queue, 4, 7)
    put(queue, 0, 9)
    ready = other.ready_slots(10)
    assert ready.tolist() == [4, 0]  # oldest first
    batch = other.claim(ready)
    assert [m["offer_id"] for m in batch.metas] == ["o7", "o9"] and batch.metas[0]["t"] == "한글"
    assert batch.image.shape == (2, 3, 8, 8) and batch.image[0, 0, 0, 0] == 7
    assert batch.title_ids[1].tolist() == [9, 10, 11, 12]
    assert batch.title_grams[0].tolist() == [0, 7, 14, 21, 28, 35]
    np.testing.assert_allclose(batch.lexical[1], [-9, -4.5, 0, 4.5, 9])
    assert (queue.state[[4, 0]] == CLAIMED).all()
    other.complete(4)
    other.fail(0, "inference failed: boom")
    assert queue.state[4] == DONE and queue.state[0] == FAILED
    assert queue.error_of(0) == "inference failed: boom"
    other.close()
    assert queue.path.exists()  # only the creator removes the file


def test_retry_puts_slot_back_and_counts(queue):
    put(queue, 1, 1)
    queue.claim(queue.ready_slots(1))
    assert queue.retry(1) == 1 and queue.state[1] == READY


def test_oversized_metadata_leaves_slot_free(queue):
    with pytest.raises(ValueError):
        queue.put(2, image=np.zeros((3, 8, 8), np.uint8), has_image=False, title_ids=np.zeros(4, np.int64),
                  mall_ids=np.zeros(2, np.int64), exclusion=np.zeros(5, bool), meta={"x": "y" * 500})
    assert queue.state[2] == FREE


def test_close_removes_file(tmp_path):
    q = FeatureQueue.create(LAYOUT, directory=tmp_path)
    path = q.path
    q.close()
    assert not path.exists()


def test_a_layout_without_the_lexical_model_carries_no_scores(tmp_path):
    layout = QueueLayout(workers=1, slots_per_worker=2, image_size=8, max_title_tokens=4, max_mall_tokens=2,
                         num_classes=5)
    q = FeatureQueue.create(layout, directory=tmp_path)
    try:
        q.put(0, image=np.zeros((3, 8, 8), np.uint8), has_image=False, title_ids=np.ones(4, np.int64),
              mall_ids=np.zeros(2, np.int64), exclusion=np.zeros(5, bool), meta={"offer_id": "o"})
        assert q.claim(np.array([0])).lexical.shape == (1, 0)
    finally:
        q.close()
