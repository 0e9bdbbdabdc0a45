import numpy as np
import pytest

from core.decision import ParentCategories, decide, decide_batch, softmax
from core.schemas import UNCERTAIN

LABELS = ("A", "B", "C", "D")


def test_softmax_rows_sum_to_one_and_temperature_flattens():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    sharp, flat = softmax(logits, 1.0), softmax(logits, 4.0)
    assert np.allclose(sharp.sum(1), 1.0)
    assert flat.max() < sharp.max()


def test_threshold_gives_uncertain_with_top3():
    probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]])
    first, second = decide(probs, np.zeros_like(probs, bool), labels=LABELS, threshold=0.6, parent_threshold=None)
    assert first.category == UNCERTAIN and [c for c, _ in first.top3] == ["A", "B", "C"]
    assert second.category == "A" and second.confidence == pytest.approx(0.9)


def test_exclusion_mask_removes_and_renormalises():
    probs = np.array([[0.6, 0.3, 0.1, 0.0]])
    mask = np.array([[True, False, False, False]])
    (decision,) = decide(probs, mask, labels=LABELS, threshold=0.7, parent_threshold=None)
    assert decision.category == "B" and decision.confidence == pytest.approx(0.75)
    assert decision.excluded == 1


def test_mask_that_excludes_everything_is_ignored():
    probs = np.array([[0.7, 0.1, 0.1, 0.1]])
    (decision,) = decide(probs, np.ones_like(probs, bool), labels=LABELS, threshold=0.5, parent_threshold=None)
    assert decision.category == "A" and decision.excluded == 0


TREE = (
    "Men > Footwear > Shoes > Casual Shoes",
    "Men > Footwear > Shoes > Sports Shoes",
    "Men > Footwear > Sandals",
    "Men > Apparel > Topwear > Tshirts",
    "Women > Footwear > Shoes > Flats",
)


def test_parents_are_every_proper_prefix_and_sum_their_leaves():
    parents = ParentCategories.of(TREE)
    assert parents.names == (
        "Men",
        "Men > Apparel",
        "Men > Apparel > Topwear",
        "Men > Footwear",
        "Men > Footwear > Shoes",
        "Women",
        "Women > Footwear",
        "Women > Footwear > Shoes",
    )
    shoes = parents.names.index("Men > Footwear > Shoes")
    assert parents.members[:, shoes].tolist() == [1, 1, 0, 0, 0]
    assert parents.members[:, parents.names.index("Men")].tolist() == [1, 1, 1, 1, 0]
    assert parents.depths[shoes] == 3
    assert ParentCategories.of(("A", "B")).names == ()  # a flat label set has no parents


def test_uncertain_leaf_is_filed_under_the_deepest_confident_parent():
    probs = np.array(
        [
            [0.50, 0.46, 0.02, 0.01, 0.01],  # Casual vs Sports: "Shoes" holds 0.96
            [0.40, 0.30, 0.27, 0.02, 0.01],  # only "Men > Footwear" (0.97) reaches it
            [0.40, 0.10, 0.05, 0.40, 0.05],  # "Men" (0.95) at most
            [0.30, 0.10, 0.05, 0.15, 0.40],  # nothing reaches 0.9
            [0.95, 0.02, 0.01, 0.01, 0.01],  # the leaf itself is confident: no parent
        ]
    )
    decisions = decide(probs, np.zeros_like(probs, bool), labels=TREE, threshold=0.9, parent_threshold=0.9)
    assert [d.category for d in decisions] == [UNCERTAIN] * 4 + [TREE[0]]
    assert [d.parent and d.parent[0] for d in decisions] == [
        "Men > Footwear > Shoes",
        "Men > Footwear",
        "Men",
        None,
        None,
    ]
    assert decisions[0].parent[1] == pytest.approx(0.96)


def test_confident_parent_is_the_deepest_reaching_then_the_most_probable():
    """``confident`` against its definition, ranked directly over every parent, on random rows."""
    labels = (*TREE, "Men > Footwear", "Women > Apparel > Dresses", "Women > Apparel > Tops")
    parents = ParentCategories.of(labels)
    rng = np.random.default_rng(7)
    for concentration in (0.05, 0.3, 2.0):
        probs = rng.dirichlet(np.full(len(labels), concentration), 400)
        probs[:50] = probs[:50].round(1)  # exact ties between parents of one depth
        for threshold in (None, 0.5, 0.7, 0.9, 0.99):
            parent, probability = parents.confident(probs, threshold)
            summed = probs @ parents.members
            for row in range(len(probs)):
                reaching = [
                    p for p in range(len(parents.names)) if threshold is not None and summed[row, p] >= threshold
                ]
                expected = max(reaching, key=lambda p: (parents.depths[p], summed[row, p], -p), default=-1)
                assert parent[row] == expected
                assert probability[row] == (summed[row, expected] if expected >= 0 else 0.0)


def test_the_parent_threshold_is_its_own():
    probs = np.array([[0.40, 0.30, 0.27, 0.02, 0.01]])  # Shoes 0.70, Men > Footwear 0.97

    def parent(threshold):
        (decision,) = decide(probs, np.zeros_like(probs, bool), labels=TREE, threshold=0.9, parent_threshold=threshold)
        return decision.parent and decision.parent[0]

    assert parent(0.9) == "Men > Footwear"
    assert parent(0.6) == "Men > Footwear > Shoes"  # a lower bar reaches a deeper parent
    assert parent(0.98) == "Men"  # 0.99
    assert parent(0.995) is None
    assert parent(None) is None  # the bundle names no parent


def test_parent_probability_is_taken_after_the_exclusion_mask():
    probs = np.array([[0.45, 0.10, 0.40, 0.03, 0.02]])
    mask = np.array([[False, False, True, False, False]])  # sandals ruled out by the dictionary
    (decision,) = decide(probs, mask, labels=TREE, threshold=0.9, parent_threshold=0.9)
    assert decision.category == UNCERTAIN  # 0.45 / 0.6 = 0.75
    assert decision.parent[0] == "Men > Footwear > Shoes" and decision.parent[1] == pytest.approx(0.55 / 0.6)


def test_a_label_that_is_also_a_parent_counts_under_itself():
    labels = ("Men > Footwear", "Men > Footwear > Shoes > Casual Shoes", "Women > Apparel")
    parents = ParentCategories.of(labels)
    column = parents.names.index("Men > Footwear")
    assert parents.members[:, column].tolist() == [1, 1, 0]
    (decision,) = decide(
        np.array([[0.5, 0.45, 0.05]]), np.zeros((1, 3), bool), labels=labels, threshold=0.9, parent_threshold=0.9
    )
    assert decision.parent == ("Men > Footwear", pytest.approx(0.95))


def test_evaluation_counts_parent_answers_and_whether_the_category_lies_under_them():
    from training.evaluate import parent_answers

    probs = np.array(
        [
            [0.50, 0.46, 0.02, 0.01, 0.01],  # uncertain, "Men > Footwear > Shoes"; truth Sports Shoes: right
            [0.50, 0.46, 0.02, 0.01, 0.01],  # the same, truth Sandals: wrong
            [0.40, 0.10, 0.05, 0.40, 0.05],  # uncertain, "Men"; truth Tshirts: right
            [0.30, 0.10, 0.05, 0.15, 0.40],  # uncertain, no parent
            [0.95, 0.02, 0.01, 0.01, 0.01],  # confident leaf
        ]
    )
    result = parent_answers(TREE, probs, np.array([1, 2, 3, 4, 0]), threshold=0.9, parent_threshold=0.9)
    assert (result["uncertain"], result["offers"]) == (4, 3)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["coverage_with_parents"] == pytest.approx(4 / 5)
    assert result["by_depth"] == {1: {"offers": 1, "precision": 1.0}, 3: {"offers": 2, "precision": 0.5}}
    # A lower parent threshold files more offers, some under a deeper and wrong parent: the third
    # now goes to "Men > Footwear" (0.55), the fourth to "Men" (0.60); neither holds its category.
    lower = parent_answers(TREE, probs, np.array([1, 2, 3, 4, 0]), threshold=0.9, parent_threshold=0.5)
    assert (lower["threshold"], lower["offers"], lower["precision"]) == (0.5, 4, 0.25)
    none = parent_answers(TREE, probs, np.array([1, 2, 3, 4, 0]), threshold=0.9, parent_threshold=None)
    assert (none["uncertain"], none["offers"], none["coverage_with_parents"]) == (4, 0, pytest.approx(1 / 5))


def test_evaluation_scores_each_operating_point_with_its_own_parent_threshold():
    from pathlib import Path

    from core.bundle import BundleConfig, ModelBundle
    from core.dictionaries import Dictionaries
    from tests.unit.bundles import config_document
    from training.evaluate import operating_answers

    probs = np.array(
        [
            [0.50, 0.46, 0.02, 0.01, 0.01],  # "Men > Footwear > Shoes" 0.96; truth Sports Shoes: right
            [0.50, 0.46, 0.02, 0.01, 0.01],  # the same, truth Sandals: wrong
            [0.40, 0.10, 0.05, 0.40, 0.05],  # "Men" 0.95; truth Tshirts: right
            [0.95, 0.02, 0.01, 0.01, 0.01],  # leaf 0.95, right
            [0.97, 0.01, 0.01, 0.00, 0.01],  # leaf 0.97, wrong (Flats)
        ]
    )
    points = [
        {
            "threshold": 0.9,
            "coverage": 0.5,
            "precision": 0.99,
            "precision_bound": 0.98,
            "parent_threshold": None,
            "parent_offers": 0,
            "parent_precision": None,
        },
        {
            "threshold": 0.96,
            "coverage": 0.2,
            "precision": 0.99,
            "precision_bound": 0.98,
            "parent_threshold": 0.955,
            "parent_offers": 9,
            "parent_precision": 1.0,
        },
    ]
    config = BundleConfig.model_validate(config_document(threshold=0.9, operating_points=points))
    bundle = ModelBundle(path=Path("."), config=config, labels=TREE, dictionaries=Dictionaries())
    low, high = operating_answers(bundle, probs, np.array([1, 2, 3, 0, 4]))
    assert (low["coverage"], low["precision"], low["parents"]["offers"]) == (0.4, 0.5, 0)  # no parent threshold
    assert (low["filed"], low["filed_precision"]) == (0.4, 0.5)
    # At 0.96 the 0.95 leaf joins the uncertain ones; the parent threshold 0.955 files the two shoe
    # doubts (Shoes 0.96, one right) and the 0.95 leaf under "Men > Footwear > Shoes" (0.97, right)
    assert (high["coverage"], high["precision"]) == (0.2, 0.0)
    assert (high["parents"]["uncertain"], high["parents"]["offers"], high["parents"]["right"]) == (4, 3, 2)
    assert (high["filed"], high["filed_precision"]) == (4 / 5, 2 / 4)
    assert high["calibration"] == points[1]


def test_the_batch_decision_equals_a_row_by_row_one_on_random_batches():
    """decide_batch's array operations against the rule written out one offer at a time."""
    rng = np.random.default_rng(3)
    parents = ParentCategories.of(TREE)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        probs = softmax(rng.normal(scale=3.0, size=(n, len(TREE))))
        mask = rng.random((n, len(TREE))) < 0.2
        mask[0] = True  # a mask that would rule out everything is ignored
        threshold, parent_threshold = float(rng.uniform(0.3, 0.95)), float(rng.uniform(0.3, 0.95))
        batch = decide_batch(probs, mask, labels=TREE, threshold=threshold, parent_threshold=parent_threshold)
        for row in range(n):
            usable = not mask[row].all()
            p = np.where(mask[row], 0.0, probs[row]) if usable else probs[row]
            p = p / p.sum()
            order = sorted(range(len(TREE)), key=lambda k: (-p[k], k))[:3]
            # The three best probabilities, best first; among equal ones (a mask's zeros) any label.
            np.testing.assert_allclose(batch.top_p[row], p[order])
            np.testing.assert_allclose(p[batch.top[row]], p[order])
            assert batch.top[row, 0] == order[0] and len(set(batch.top[row].tolist())) == 3
            assert batch.excluded[row] == (mask[row].sum() if usable else 0)
            certain = p[order[0]] >= threshold
            assert batch.category[row] == (order[0] if certain else -1)
            expected_parent, _ = parents.confident(p[None, :], parent_threshold)
            assert batch.parent[row] == (-1 if certain else expected_parent[0])
            decision = batch.decision(row, TREE)
            assert decision.category == (TREE[order[0]] if certain else UNCERTAIN)
            assert (decision.parent is None) == (batch.parent[row] < 0)
