import numpy as np

from training.calibration import choose_threshold, fit_temperature


def planted(n=4000, seed=0):
    """Confident rows are right, unconfident rows are right half the time."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 5, n)
    logits = rng.normal(0, 0.1, (n, 5))
    confident = rng.random(n) < 0.8
    predicted = np.where(confident | (rng.random(n) < 0.5), targets, (targets + 1) % 5)
    logits[np.arange(n), predicted] += np.where(confident, 6.0, 0.8)
    return logits, targets


def test_threshold_reaches_target_precision_on_held_out_data():
    logits, targets = planted(seed=0)
    threshold, coverage, precision = choose_threshold(logits, targets, target_precision=0.99)
    assert precision >= 0.99 and 0.75 <= coverage <= 0.9
    test_logits, test_targets = planted(seed=1)
    e = np.exp(test_logits - test_logits.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    accepted = probs.max(1) >= threshold
    assert (probs.argmax(1)[accepted] == test_targets[accepted]).mean() >= 0.985


def test_temperature_of_an_overconfident_model_is_above_one():
    logits, targets = planted()
    assert fit_temperature(logits * 5.0, targets) > 1.5
