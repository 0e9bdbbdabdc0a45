"""How sure a held-out figure is: an interval on accuracy, and a paired test between two systems.

A test set of a few thousand offers moves accuracy by a few tenths of a point between random
splits, which is the size of the gains the model is judged on. So every accuracy in a report comes
with an interval, and every "beats the baseline" with a paired test on the same offers.

The exact intervals and tests take the offers as independent draws. The colour variants of one
product are not: they share a title, a mall category and usually a label, so a model gets them
right or wrong together, and a test set holds fewer independent pieces of evidence than offers.
With the offers' title groups, the same figures are given with the product as the unit: a cluster
bootstrap (whole groups resampled) for intervals, a sign test over groups for the paired test.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

from training.calibration import precision_lower_bound

__all__ = ["INTERVAL_LEVEL", "accuracy_interval", "accuracy_interval_by_group", "paired_comparison"]

INTERVAL_LEVEL = 0.95
BOOTSTRAP_DRAWS = 2000


def accuracy_interval(right: int, offers: int, *, level: float = INTERVAL_LEVEL) -> list[float]:
    """Two-sided Clopper-Pearson interval ``[low, high]`` on accuracy, ``right`` of ``offers`` correct.

    Offers drawn like these are classified right at a rate inside it, at ``level`` confidence. The
    interval is exact: it covers the true rate at least ``level`` of the time, so it errs wide.
    """
    if offers <= 0:
        return [float("nan"), float("nan")]
    one_sided = 1.0 - (1.0 - level) / 2
    # The upper end is the lower bound on the error rate, turned round.
    low = precision_lower_bound(right, offers, one_sided)
    high = 1.0 - precision_lower_bound(offers - right, offers, one_sided)
    return [float(low), float(high)]


def accuracy_interval_by_group(
    correct: np.ndarray,
    groups: np.ndarray,
    *,
    level: float = INTERVAL_LEVEL,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
) -> list[float]:
    """``[low, high]`` on accuracy with the product, not the offer, as the unit of evidence.

    ``correct`` ``(N,)`` says which offers were classified right, ``groups`` ``(N,)`` the title
    group of each (:func:`training.splits.title_groups`). A percentile cluster bootstrap: ``draws``
    test sets of as many groups, drawn with replacement, seeded. Where every group is one offer it
    is the ordinary bootstrap and close to :func:`accuracy_interval`; where a product's variants
    succeed or fail together it is as wide as the number of products allows, which the exact
    per-offer interval is not.
    """
    correct = np.asarray(correct, dtype=bool)
    right, offers = _sums_by_group(correct.astype(np.int64), np.asarray(groups))
    return _cluster_bootstrap(right, offers, level=level, draws=draws, seed=seed)


def paired_comparison(
    correct: np.ndarray, other_correct: np.ndarray, *, groups: np.ndarray | None = None, level: float = INTERVAL_LEVEL
) -> dict:
    """Two systems judged on the same offers: is the first one's lead more than chance?

    ``correct`` and ``other_correct`` ``(N,)`` say which offers each system got right. Only the
    offers on which they disagree carry evidence: ``only_this`` right by the first alone,
    ``only_other`` by the second alone. ``p_value`` is the exact two-sided McNemar test (a binomial
    test of ``only_this`` out of the disagreements at one half). ``difference_interval`` bounds the
    accuracy difference (first minus second) at ``level``, conditional on the number of
    disagreements: a Clopper-Pearson interval on the first system's share of them. Paired, these
    are much tighter than two independent accuracy intervals, which overlap even when one system
    is reliably better.

    Both tests take the offers as independent, and colour variants of one product are not: a
    system that gets one wrong tends to get all of them wrong. With ``groups`` ``(N,)`` (the title
    group of each offer, :func:`training.splits.title_groups`) ``by_group`` repeats the test with
    the product as the unit: ``groups_this`` groups in which the first system is right on more
    offers than the second, ``groups_other`` the reverse, and the exact sign test between them;
    ``difference_interval`` is a cluster bootstrap interval on the accuracy difference.
    """
    correct = np.asarray(correct, dtype=bool)
    other_correct = np.asarray(other_correct, dtype=bool)
    if correct.shape != other_correct.shape:
        raise ValueError(f"the two systems were scored on different offers: {correct.shape} vs {other_correct.shape}")
    offers = len(correct)
    only_this = int((correct & ~other_correct).sum())
    only_other = int((other_correct & ~correct).sum())
    disagreements = only_this + only_other
    result = {
        "offers": offers,
        "only_this": only_this,
        "only_other": only_other,
        "difference": (only_this - only_other) / offers if offers else float("nan"),
    }
    if groups is not None:
        result["by_group"] = _by_group(correct, other_correct, np.asarray(groups), level=level)
    if disagreements == 0:
        return result | {"difference_interval": [0.0, 0.0], "p_value": 1.0}
    low, high = accuracy_interval(only_this, disagreements, level=level)
    scale = disagreements / offers
    return result | {
        "difference_interval": [scale * (2 * low - 1), scale * (2 * high - 1)],
        "p_value": float(binomtest(only_this, disagreements, 0.5).pvalue),
    }


def _by_group(correct: np.ndarray, other_correct: np.ndarray, groups: np.ndarray, *, level: float) -> dict:
    net, offers = _sums_by_group(correct.astype(np.int64) - other_correct.astype(np.int64), groups)
    groups_this, groups_other = int((net > 0).sum()), int((net < 0).sum())
    p_value = (
        float(binomtest(groups_this, groups_this + groups_other, 0.5).pvalue) if groups_this + groups_other else 1.0
    )
    return {
        "groups": len(net),
        "groups_this": groups_this,
        "groups_other": groups_other,
        "p_value": p_value,
        "difference_interval": _cluster_bootstrap(net, offers, level=level),
    }


def _sums_by_group(values: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sums, offers)`` ``(G,)``: ``values`` summed within each group, and each group's size."""
    if groups.shape != values.shape:
        raise ValueError(f"one group per offer expected: {groups.shape} groups for {values.shape} offers")
    _, dense = np.unique(groups, return_inverse=True)
    return np.bincount(dense, values).astype(np.int64), np.bincount(dense)


def _cluster_bootstrap(
    sums: np.ndarray, offers: np.ndarray, *, level: float, draws: int = BOOTSTRAP_DRAWS, seed: int = 0, chunk: int = 250
) -> list[float]:
    """Percentile interval of ``sum(sums) / sum(offers)`` over test sets of resampled groups."""
    count = len(sums)
    if count == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    ratios = []
    for start in range(0, draws, chunk):
        # How often each group is drawn: ``count`` draws with replacement, ``chunk`` test sets at once.
        weights = rng.multinomial(count, np.full(count, 1.0 / count), size=min(chunk, draws - start))
        ratios.append((weights @ sums) / (weights @ offers))
    tail = (1.0 - level) / 2
    low, high = np.quantile(np.concatenate(ratios), [tail, 1.0 - tail])
    return [float(low), float(high)]
