import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpu_workers.batcher import DynamicBatcher


def test_size_trigger_only():
    batcher = DynamicBatcher(max_batch_size=3, max_wait_s=1e9)
    for i in range(2):
        batcher.add(i, now=0.0)
        assert batcher.pop_ready(now=1e6) is None
    batcher.add(2, now=0.0)
    assert batcher.pop_ready(now=0.0) == [0, 1, 2]
    assert len(batcher) == 0 and batcher.deadline() is None


def test_time_trigger_only():
    batcher = DynamicBatcher(max_batch_size=1000, max_wait_s=0.010)
    batcher.add("a", now=5.000)
    batcher.add("b", now=5.008)
    assert batcher.deadline() == pytest.approx(5.010)
    assert batcher.pop_ready(now=5.0099) is None
    assert batcher.pop_ready(now=5.010) == ["a", "b"]


def test_deadline_counts_from_first_item_of_each_batch():
    batcher = DynamicBatcher(max_batch_size=10, max_wait_s=1.0)
    batcher.add(1, now=0.0)
    assert batcher.pop_ready(now=1.0) == [1]
    batcher.add(2, now=3.0)
    assert batcher.pop_ready(now=3.9) is None
    assert batcher.deadline() == pytest.approx(4.0)


def test_force_flushes_partial_batch_and_full_batch_refuses_more():
    batcher = DynamicBatcher(max_batch_size=2, max_wait_s=1e9)
    assert batcher.pop_ready(now=0.0, force=True) is None
    batcher.add(1, now=0.0)
    assert batcher.pop_ready(now=0.0, force=True) == [1]
    batcher.add(1, now=0.0)
    batcher.add(2, now=0.0)
    with pytest.raises(OverflowError):
        batcher.add(3, now=0.0)


@given(st.integers(1, 16), st.lists(st.floats(0, 0.05), max_size=200), st.floats(0.0, 0.03))
def test_batches_keep_order_respect_size_and_lose_nothing(max_size, gaps, wait):
    batcher = DynamicBatcher(max_batch_size=max_size, max_wait_s=wait)
    now, out = 0.0, []
    for item, gap in enumerate(gaps):
        now += gap
        if batch := batcher.pop_ready(now):
            out.append(batch)
        batcher.add(item, now)
        if batch := batcher.pop_ready(now):
            out.append(batch)
    if batch := batcher.pop_ready(now, force=True):
        out.append(batch)
    assert all(1 <= len(batch) <= max_size for batch in out)
    assert [item for batch in out for item in batch] == list(range(len(gaps)))
