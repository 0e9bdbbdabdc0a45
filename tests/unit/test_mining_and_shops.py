import numpy as np
import pandas as pd

from core.dictionaries import Dictionaries
from training.mining import mine_exclusions, write_candidates
from training.shops import estimate_shop_weights

LABELS = ["Women > Dresses", "Men > Shirts", "Kids > Toys"]


def catalogue(seed=0, n=600):
    rng = np.random.default_rng(seed)
    labels = rng.choice(LABELS, n)
    titles = []
    for label in labels:
        gender = {"Women": "women", "Men": "men", "Kids": "kids"}[label.split(" > ")[0]]
        titles.append(f"brand{rng.integers(0, 5)} {gender} {label.split(' > ')[1].lower()} blue")
    return pd.Series(titles), pd.Series(labels)


def test_miner_proposes_the_planted_gender_rules_with_evidence(tmp_path):
    titles, labels = catalogue()
    candidates = mine_exclusions(titles, labels, max_depth=1, min_support=20, min_expected=10)
    pairs = {(c.keyword, c.excluded) for c in candidates}
    assert {("women", "Men"), ("women", "Kids"), ("men", "Women"), ("kids", "Men")} <= pairs
    # a word present everywhere rules nothing out
    assert not any(c.keyword == "blue" for c in candidates)
    path = write_candidates(candidates, tmp_path / "dictionary" / "category_exclusions.tsv")
    # the candidates file is a valid dictionary as it stands
    loaded = Dictionaries.load(path.parent)
    assert len(loaded.exclusions) == len(candidates)  # the header line is not read as a rule
    assert loaded.exclusion_mask("Aurora women summer dress", tuple(LABELS)).tolist() == [False, True, True]


def test_miner_skips_rules_already_known():
    titles, labels = catalogue()
    known = Dictionaries.load(__import__("pathlib").Path(__file__).resolve().parents[2] / "dictionaries")
    candidates = mine_exclusions(titles, labels, min_support=20, known=known)
    assert ("women", "Men") not in {(c.keyword, c.excluded) for c in candidates}


def test_unreliable_shop_gets_the_lowest_weight():
    rng = np.random.default_rng(1)
    rows = []
    for shop, noise in (("good", 0.0), ("coarse", 0.0), ("random", 1.0)):
        for _ in range(400):
            label = rng.choice(LABELS)
            category = label.split(" > ")[1] if shop != "coarse" else "Clothing"
            if rng.random() < noise:
                category = rng.choice(["Dresses", "Shirts", "Toys"])
            rows.append({"mall_id": shop, "mall_category": category, "label": label})
    weights, table = estimate_shop_weights(pd.DataFrame(rows), min_offers=30)
    assert weights["good"] > 0.95
    assert weights["random"] < 0.2
    assert weights["coarse"] < 0.2  # one category for everything tells nothing
    assert set(table.columns) >= {"purity", "chance", "weight"}
