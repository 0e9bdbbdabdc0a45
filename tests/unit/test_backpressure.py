from hypothesis import given
from hypothesis import strategies as st

from preprocess_workers.backpressure import BufferGate

GATE = BufferGate(max_messages=100, max_bytes=10_000)


def test_pauses_when_full_and_resumes_at_half():
    assert not GATE.paused(messages=99, nbytes=0, currently_paused=False)
    assert GATE.paused(messages=100, nbytes=0, currently_paused=False)
    assert GATE.paused(messages=51, nbytes=0, currently_paused=True)  # still above half: stay paused
    assert not GATE.paused(messages=50, nbytes=0, currently_paused=True)


def test_bytes_bound_applies_too():
    assert GATE.paused(messages=1, nbytes=10_000, currently_paused=False)
    assert GATE.paused(messages=1, nbytes=5_001, currently_paused=True)
    assert not GATE.paused(messages=1, nbytes=5_000, currently_paused=True)


@given(st.lists(st.integers(0, 150), max_size=200))
def test_buffer_stays_bounded_and_state_changes_are_rare(sizes):
    """Driving the gate with any buffer sizes: it never flaps between adjacent sizes."""
    paused = False
    for size in sizes:
        new = GATE.paused(messages=size, nbytes=0, currently_paused=paused)
        if new != paused:
            assert (new and size >= 100) or (not new and size <= 50)
        paused = new
