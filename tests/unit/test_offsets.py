from hypothesis import given
from hypothesis import strategies as st

from preprocess_workers.offsets import OffsetTracker

P = ("offers", 0)


def test_commit_position_is_the_oldest_offset_in_flight():
    tracker = OffsetTracker()
    tracker.assign(P)
    for offset in (10, 11, 12):
        tracker.started(P, offset)
    assert tracker.commit_position(P) == 10
    tracker.finished(P, 11)
    assert tracker.commit_position(P) == 10  # 10 is not done: nothing past it may commit
    tracker.finished(P, 10)
    assert tracker.commit_position(P) == 12
    tracker.finished(P, 12)
    assert tracker.commit_position(P) == 13


def test_uncommitted_reports_only_moved_positions():
    tracker = OffsetTracker()
    tracker.assign(P)
    tracker.started(P, 0)
    tracker.finished(P, 0)
    assert tracker.uncommitted() == {P: 1}
    tracker.mark_committed({P: 1})
    assert tracker.uncommitted() == {}


def test_positions_include_ones_marked_committed_so_a_final_commit_resends_them():
    """An asynchronous commit is marked when sent and may still be refused by the broker; the
    synchronous commit at revoke and drain sends every position again."""
    tracker = OffsetTracker()
    tracker.assign(P)
    tracker.assign(("offers", 1))
    tracker.started(P, 0)
    tracker.finished(P, 0)
    tracker.mark_committed({P: 1})
    assert tracker.uncommitted() == {}
    assert tracker.positions() == {P: 1}  # partition 1 has no position yet: nothing to commit


def test_acks_for_revoked_partitions_are_ignored():
    tracker = OffsetTracker()
    tracker.assign(P)
    tracker.started(P, 5)
    tracker.revoke(P)
    assert tracker.finished(P, 5) is False
    assert tracker.commit_position(P) is None


@given(st.lists(st.integers(0, 50), min_size=1, max_size=50, unique=True), st.randoms())
def test_never_commits_past_an_unfinished_offset(done_order, random):
    tracker = OffsetTracker()
    tracker.assign(P)
    offsets = list(range(51))
    for offset in offsets:
        tracker.started(P, offset)
    finished = set()
    for offset in done_order:
        tracker.finished(P, offset)
        finished.add(offset)
        position = tracker.commit_position(P)
        assert all(o in finished for o in range(position))
        assert position == 51 or position not in finished
