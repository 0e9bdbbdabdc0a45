import numpy as np
import pytest

from catstream.schemas import UNCERTAIN
from gpu_workers.inference import decide, softmax

LABELS = ("A", "B", "C", "D")


def test_softmax_rows_sum_to_one_and_temperature_flattens():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    sharp, flat = softmax(logits, 1.0), softmax(logits, 4.0)
    assert np.allclose(sharp.sum(1), 1.0)
    assert flat.max() < sharp.max()


def test_threshold_gives_uncertain_with_top3():
    probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]])
    first, second = decide(probs, np.zeros_like(probs, bool), labels=LABELS, threshold=0.6)
    assert first.category == UNCERTAIN and [c for c, _ in first.top3] == ["A", "B", "C"]
    assert second.category == "A" and second.confidence == pytest.approx(0.9)


def test_exclusion_mask_removes_and_renormalises():
    probs = np.array([[0.6, 0.3, 0.1, 0.0]])
    mask = np.array([[True, False, False, False]])
    (decision,) = decide(probs, mask, labels=LABELS, threshold=0.7)
    assert decision.category == "B" and decision.confidence == pytest.approx(0.75)
    assert decision.excluded == 1


def test_mask_that_excludes_everything_is_ignored():
    probs = np.array([[0.7, 0.1, 0.1, 0.1]])
    (decision,) = decide(probs, np.ones_like(probs, bool), labels=LABELS, threshold=0.5)
    assert decision.category == "A" and decision.excluded == 0
