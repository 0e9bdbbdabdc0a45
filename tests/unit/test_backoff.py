"""The indexer's retry waits: doubling, capped, jittered within bounds, reset by a success."""

from __future__ import annotations

import pytest

from retrieval.indexer import Backoff


def test_waits_double_up_to_the_cap_and_a_success_resets_them():
    backoff = Backoff(first_s=0.5, max_s=4.0, jitter=0.0)
    assert [backoff.next_wait() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.failures == 6
    backoff.reset()
    assert backoff.next_wait() == 0.5


def test_jitter_stays_within_its_share_and_differs_between_indexers():
    waits = [Backoff(first_s=1.0, max_s=1.0, jitter=0.2, seed=seed).next_wait() for seed in range(200)]
    assert all(0.8 <= wait <= 1.2 for wait in waits)
    assert len(set(waits)) > 100


@pytest.mark.parametrize("options", [{"first_s": 0.0}, {"first_s": 5.0, "max_s": 1.0}, {"jitter": 1.0}])
def test_nonsense_settings_are_refused(options):
    with pytest.raises(ValueError):
        Backoff(**options)
