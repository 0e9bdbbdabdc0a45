"""Temperature scaling and the choice of the "uncertain" threshold, both on held-out predictions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import beta

from core.decision import ParentCategories, apply_exclusions
from core.decision import softmax as _softmax

__all__ = [
    "OPERATING_GRID",
    "PARENT_THRESHOLD_GRID",
    "SEQUENCE_START_SHARE",
    "OperatingPoint",
    "ParentThreshold",
    "Threshold",
    "choose_parent_threshold",
    "choose_threshold",
    "effective_counts",
    "effective_totals",
    "fewest_offers",
    "fit_temperature",
    "operating_points",
    "precision_lower_bound",
]

# Candidate thresholds on a parent's probability: 0.5 (two parents of one depth cannot both pass) to
# 0.99995, evenly spaced in log(1 - threshold), as the doubt shrinks by factors, not by steps.
PARENT_THRESHOLD_GRID = 1.0 - 0.5 * np.logspace(0.0, -4.0, 81)
# Leaf thresholds an operator may serve at (``operating_points``): 0 to 0.9999, evenly spaced in
# log(1 - threshold) like the parent grid.
OPERATING_GRID = 1.0 - np.logspace(0.0, -4.0, 41)
# Leaf and parent thresholds are tested in a fixed sequence, strictest first, from the first one
# that files this share of the offers it judges (``choose_threshold``). The start is fixed before
# the labels are seen, and is half rather than the few most confident offers: label errors gather
# there (a title filed both ways is learnt confidently). On Myntra's time split a leaf sequence
# started at a tenth of the offers failed at once, where 49% of them had a lower bound of 99.78%,
# and a parent sequence started at the strictest candidate with enough answers failed as well.
SEQUENCE_START_SHARE = 0.5


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature in [0.25, 10] that minimises validation NLL. ``logits`` is ``(N, K)``."""
    grid = np.exp(np.linspace(np.log(0.25), np.log(10.0), 80))
    rows = np.arange(len(targets))
    nll = [-np.log(_softmax(logits, t)[rows, targets] + 1e-12).mean() for t in grid]
    return float(grid[int(np.argmin(nll))])


def precision_lower_bound(correct: np.ndarray, accepted: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound on precision: ``correct`` of ``accepted`` offers right.

    With ``confidence`` 0 this is the observed precision itself.
    """
    correct = np.asarray(correct, dtype=float)
    accepted = np.asarray(accepted, dtype=float)
    if not confidence:
        return correct / np.maximum(accepted, 1)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(1.0 - confidence, correct, accepted - correct + 1)
    return np.where(correct > 0, bound, 0.0)


def fewest_offers(target_precision: float, confidence: float) -> int:
    """Fewest offers, all right, whose lower bound at ``confidence`` reaches ``target_precision``:
    fewer cannot show the target, so a threshold accepting fewer is not tested."""
    if not confidence or target_precision <= 0:
        return 1
    if target_precision >= 1:
        raise ValueError("no number of offers shows a precision of 1 with a confidence bound")
    # All n right: the one-sided Clopper-Pearson lower bound is (1 - confidence) ** (1 / n)
    return int(np.ceil(np.log(1.0 - confidence) / np.log(target_precision) - 1e-9))


def _sequence_start(judged: int, target_precision: float, confidence: float) -> int:
    """Offers a threshold must file to open the fixed sequence over ``judged`` offers: half of them,
    and at least as many as a perfect record needs to show the target."""
    return max(fewest_offers(target_precision, confidence), int(np.ceil(SEQUENCE_START_SHARE * judged)))


def _passing_run(passes: np.ndarray) -> int:
    """How many of ``passes`` ``(M,)``, tested in order, pass before the first that fails: a fixed-
    sequence test rejects exactly these hypotheses and keeps its error rate at that of one test."""
    failing = np.flatnonzero(~np.asarray(passes, dtype=bool))
    return int(failing[0]) if len(failing) else len(passes)


def effective_counts(correct: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(right, offers)`` ``(N,)``: effective counts of every prefix of ``correct`` ``(N,)``, rows in
    ``groups`` ``(N,)``.

    Colour variants of one product are right or wrong together, so ``k`` offers from few products
    carry less evidence than ``k`` independent ones. Each prefix's count is divided by its design
    effect: the cluster-robust variance of its precision (a ratio over groups) over the variance the
    same precision would have on independent offers, floored at 1 (Korn and Graubard's effective
    sample size for Clopper-Pearson intervals on clustered samples). Where the prefix is all right
    or all wrong the variance carries no clustering information and the counts stay as they are.
    One pass: each group's running sums are updated as its offers arrive.
    """
    x = np.asarray(correct, dtype=float)
    g = pd.Series(np.asarray(groups))
    before = g.groupby(g).cumcount().to_numpy(dtype=float)  # the group's offers earlier in the prefix
    right_before = pd.Series(x).groupby(g).cumsum().to_numpy() - x
    offers = np.arange(1, len(x) + 1, dtype=float)
    right = np.cumsum(x)
    # Sums over groups of n_g², c_g² and c_g·n_g, grown by one offer at a time
    s_nn = np.cumsum(2 * before + 1)
    s_cc = np.cumsum(2 * right_before * x + x)
    s_cn = np.cumsum(right_before + x * before + x)
    clusters = np.cumsum(before == 0)
    p = right / offers
    spread = np.maximum(s_cc - 2 * p * s_cn + p * p * s_nn, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        clustered = clusters / (clusters - 1) * spread / offers**2
        independent = p * (1 - p) / offers
        design_effect = np.where((clusters > 1) & (independent > 0), clustered / independent, 1.0)
    design_effect = np.maximum(np.nan_to_num(design_effect, nan=1.0), 1.0)
    return right / design_effect, offers / design_effect


def _prefixes(probabilities: np.ndarray, targets: np.ndarray, *, confidence: float, groups: np.ndarray | None):
    """``(confidences, correct, order, offers, bound)``: the offers ``(N,)`` from most to least
    confident (``order``), and for every prefix of that order its effective count of offers and the
    lower bound on its precision (by product with ``groups``), which a threshold accepts."""
    confidences = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    order = np.argsort(-confidences, kind="stable")
    if groups is None:
        right, offers = np.cumsum(correct[order]), np.arange(1, len(order) + 1, dtype=float)
    else:
        right, offers = effective_counts(correct[order], np.asarray(groups)[order])
    return confidences, correct, order, offers, precision_lower_bound(right, offers, confidence)


@dataclass(frozen=True)
class Threshold:
    threshold: float
    coverage: float  # on the data it was chosen on
    precision: float  # observed there
    precision_bound: float  # the lower confidence bound the choice was held to
    design_effect: float = 1.0  # of the accepted offers, when the bound counted them by product
    target_reached: bool = True  # False: the sequence failed at its start (see choose_threshold)
    tested_from: float | None = None  # coverage at which the fixed sequence started; None: too few offers


def choose_threshold(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    temperature: float = 1.0,
    target_precision: float,
    confidence: float = 0.0,
    exclusion: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> Threshold:
    """Lowest confidence threshold the fixed sequence below certifies at ``target_precision``.

    The confidences are those serving will see: softmax at ``temperature``, then the exclusion
    mask ``(N, K)`` if given. With ``confidence`` > 0 the target must be met by the one-sided
    Clopper-Pearson lower bound on precision at that confidence, not by the observed precision:
    a threshold chosen on the observed precision lands below the target on new offers about half
    the time. With ``groups`` ``(N,)`` (title groups: one product's colour variants) the bound
    counts evidence by product (:func:`effective_counts`), so many variants of a few products
    cannot carry a threshold that new products will miss.

    The thresholds are a fixed-sequence test: from the strictest one that accepts
    :data:`SEQUENCE_START_SHARE` of the offers (and at least :func:`fewest_offers`) down, each
    is accepted while its bound reaches the target, and the first that misses ends the scan. So the
    chosen threshold is below the target with at most the error rate of a single bound (5% at
    ``confidence`` 0.95), not that rate once per threshold tried, as taking the lowest of all the
    thresholds that pass would be.

    If the sequence fails at its start, ``target_reached`` is False and the threshold is the lowest
    whose own bound reaches the target, without the sequence's protection against the scan (with
    none reaching it, the one with the best bound).
    """
    probabilities, _ = apply_exclusions(_softmax(logits, temperature), exclusion)
    confidences, correct, order, offers, bound = _prefixes(probabilities, targets, confidence=confidence, groups=groups)
    # A threshold accepts every offer at least as confident, so only prefixes that end where the
    # confidence drops can be accepted (colour variants often tie).
    ordered = confidences[order]
    ends = np.flatnonzero(np.append(ordered[1:] < ordered[:-1], True))
    tested = ends[ends + 1 >= _sequence_start(len(order), target_precision, confidence)]
    passing = _passing_run(bound[tested] >= target_precision)
    if passing:  # the longest prefix (most offers) the sequence reaches
        cut = int(tested[passing - 1])
    else:
        reaching = ends[bound[ends] >= target_precision]
        cut = int(reaching.max()) if len(reaching) else int(ends[np.argmax(bound[ends])])
    accepted = order[: cut + 1]
    return Threshold(
        threshold=float(ordered[cut]),
        coverage=(cut + 1) / len(order),
        precision=float(correct[accepted].mean()),
        precision_bound=float(bound[cut]),
        design_effect=float((cut + 1) / offers[cut]),
        target_reached=passing > 0,
        tested_from=float((tested[0] + 1) / len(order)) if len(tested) else None,
    )


@dataclass(frozen=True)
class ParentThreshold:
    threshold: float | None  # None: no candidate reaches the target, so no parent is named
    uncertain: int  # offers the leaf threshold leaves uncertain
    answered: int  # of those, filed under a parent at this threshold
    precision: float  # observed: the offer's category lies under the parent
    precision_bound: float  # the lower confidence bound the choice was held to
    design_effect: float = 1.0


def effective_totals(correct: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """``(right, offers)`` of the whole of ``correct`` ``(N,)`` counted by product: the last prefix of
    :func:`effective_counts`, in one pass over the groups instead of one per offer."""
    x = np.asarray(correct, dtype=float)
    if not len(x):
        return 0.0, 0.0
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    sizes = np.bincount(group).astype(float)
    rights = np.bincount(group, weights=x)
    offers, right = float(len(x)), float(x.sum())
    p = right / offers
    spread = float(((rights - p * sizes) ** 2).sum())
    clusters = len(sizes)
    independent = p * (1 - p) / offers
    design_effect = 1.0
    if clusters > 1 and independent > 0:
        design_effect = max(clusters / (clusters - 1) * spread / offers**2 / independent, 1.0)
    return right / design_effect, offers / design_effect


def choose_parent_threshold(
    probabilities: np.ndarray,
    targets: np.ndarray,
    labels: tuple[str, ...],
    *,
    leaf_threshold: float,
    target_precision: float,
    confidence: float = 0.0,
    groups: np.ndarray | None = None,
) -> ParentThreshold:
    """Lowest threshold on a parent category's probability the fixed sequence certifies at ``target_precision``.

    ``probabilities`` ``(N, K)`` as served (temperature, exclusion mask), ``targets`` ``(N,)``. Only
    the offers below ``leaf_threshold`` are filed under a parent: each under the deepest parent
    whose summed probability reaches the candidate (``ParentCategories.confident``), right when
    the offer's category lies under it. The bound and the scan are held as for the leaf threshold
    (:func:`choose_threshold`: one-sided Clopper-Pearson at ``confidence``, by product with
    ``groups``; a fixed sequence over :data:`PARENT_THRESHOLD_GRID` from the strictest candidate
    that files :data:`SEQUENCE_START_SHARE` of the uncertain offers, ended by the first that
    misses). So a parent threshold is named only where it files at least half of them. A lower
    threshold answers a superset of the offers, some under deeper parents, so precision need not
    fall steadily as it is lowered; the sequence stops where it first dips.
    With the sequence failing at its start (or no uncertain offers to judge by) the threshold is
    None: naming no parent is the answer the evidence supports, and unlike the leaf threshold,
    which every bundle needs, nothing is served in its place.
    """
    parents = ParentCategories.of(tuple(labels))
    uncertain = probabilities.max(axis=1) < leaf_threshold
    return _choose_parent_threshold(
        parents,
        *parents.by_depth(probabilities[uncertain]),
        np.asarray(targets)[uncertain],
        target_precision=target_precision,
        confidence=confidence,
        groups=None if groups is None else np.asarray(groups)[uncertain],
    )


def _choose_parent_threshold(
    parents: ParentCategories,
    parent: np.ndarray,
    probability: np.ndarray,
    truth: np.ndarray,
    *,
    target_precision: float,
    confidence: float,
    groups: np.ndarray | None,
) -> ParentThreshold:
    """:func:`choose_parent_threshold` on the uncertain offers' ``ParentCategories.by_depth`` arrays."""
    chosen = ParentThreshold(None, len(truth), 0, float("nan"), 0.0)
    start = _sequence_start(len(truth), target_precision, confidence)
    for threshold in PARENT_THRESHOLD_GRID[::-1]:  # strictest first, down to the first that misses
        answer, _ = parents.deepest(parent, probability, float(threshold))
        found = answer >= 0
        if found.sum() < start:  # too few answers to test: the sequence has not started
            continue
        right = parents.holds(truth[found], answer[found])
        if groups is None:
            effective_right, effective_offers = float(right.sum()), float(found.sum())
        else:
            effective_right, effective_offers = effective_totals(right, groups[found])
        bound = float(precision_lower_bound(np.array([effective_right]), np.array([effective_offers]), confidence)[0])
        if bound < target_precision:
            break
        chosen = ParentThreshold(
            float(threshold),
            len(truth),
            int(found.sum()),
            float(right.mean()),
            bound,
            float(found.sum() / effective_offers),
        )
    return chosen


@dataclass(frozen=True)
class OperatingPoint:
    """What serving at leaf ``threshold`` did on the held-out offers the bundle was calibrated on."""

    threshold: float
    coverage: float  # share of the offers categorised
    precision: float  # observed on them
    precision_bound: float  # lower confidence bound, counted as the chosen threshold's was
    parent_threshold: float | None  # chosen for this leaf threshold's uncertain offers; None: no parent
    parent_offers: int  # uncertain offers filed under a parent at it
    parent_precision: float

    def to_dict(self) -> dict:
        """JSON-ready: no observed precision (nothing accepted) is None, not NaN."""
        return {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in dataclasses.asdict(self).items()}


def operating_points(
    probabilities: np.ndarray,
    targets: np.ndarray,
    labels: tuple[str, ...],
    *,
    target_precision: float,
    confidence: float = 0.0,
    groups: np.ndarray | None = None,
    grid: np.ndarray = OPERATING_GRID,
) -> list[OperatingPoint]:
    """The leaf thresholds of ``grid`` an operator may serve at instead of the chosen one, each with
    its coverage, precision and lower bound on these held-out ``probabilities`` ``(N, K)`` (as
    served), and the parent threshold :func:`choose_parent_threshold` gives its uncertain offers.

    A parent threshold is chosen for the offers one leaf threshold leaves uncertain; served below
    another leaf threshold it would judge other offers, so an override of the leaf threshold takes
    its parent threshold from this table (``ModelBundle.operating_point``).
    """
    parents = ParentCategories.of(tuple(labels))
    targets = np.asarray(targets)
    groups = None if groups is None else np.asarray(groups)
    confidences, correct, order, _, bounds = _prefixes(probabilities, targets, confidence=confidence, groups=groups)
    parent, probability = parents.by_depth(probabilities)
    ordered = confidences[order]
    points = []
    for threshold in grid:
        accepted = int(np.searchsorted(-ordered, -threshold, side="right"))  # offers at or above it
        uncertain = confidences < threshold
        chosen = _choose_parent_threshold(
            parents,
            parent[uncertain],
            probability[uncertain],
            targets[uncertain],
            target_precision=target_precision,
            confidence=confidence,
            groups=None if groups is None else groups[uncertain],
        )
        points.append(
            OperatingPoint(
                threshold=float(threshold),
                coverage=accepted / max(1, len(order)),
                precision=float(correct[order[:accepted]].mean()) if accepted else float("nan"),
                precision_bound=float(bounds[accepted - 1]) if accepted else 0.0,
                parent_threshold=chosen.threshold,
                parent_offers=chosen.answered,
                parent_precision=chosen.precision,
            )
        )
    return points
