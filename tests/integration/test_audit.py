"""``catstream audit`` on a synthetic marketplace with planted confusions, a real model, real SHAP
and a real headless Chromium.

Planted: in the training history, half of the women's blouses carry the made-up brand word
"zorbax" and are labeled as men's shirts, so the model learns "zorbax" → men's shirts. The audited
offers are labeled correctly, so blouses with "zorbax" go wrong. The shop ``mall-net`` files its
offers under near-random shop categories (see ``producers/synthetic.py``).
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.dictionaries import Dictionaries
from core.schemas import Offer
from tests.conftest import small_training_options

pytestmark = pytest.mark.integration

LEAK = "zorbax"
BLOUSES, SHIRTS = "Women > Clothing > Blouses", "Men > Clothing > Shirts"
HOSTILE_TITLE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> zorbax blouse'
HOSTILE_CATEGORY = "Food > Snacks > Chocolate"


def planted(directory: Path, *, seed: int, mislabel: bool) -> Path:
    from producers.synthetic import write_marketplace

    path = write_marketplace(directory, offers=1500, seed=seed, progress=False)
    frame = pd.read_csv(path, keep_default_na=False)
    blouses = np.flatnonzero(frame["true_category"] == BLOUSES)
    leaked = np.random.default_rng(seed).choice(blouses, size=len(blouses) * 2 // 3, replace=False)
    frame.loc[leaked, "title"] = frame.loc[leaked, "title"] + f" {LEAK}"
    if mislabel:
        frame.loc[leaked, "category"] = SHIRTS
    else:  # one offer whose title and shop id are HTML, filed under a category with few errors
        row = int(np.flatnonzero(frame["category"] == HOSTILE_CATEGORY)[0])
        frame.loc[row, ["title", "mall_id", "mall_category", "image"]] = [HOSTILE_TITLE, "<i>shop</i>", "", ""]
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def planted_bundle(tmp_path_factory) -> Path:
    from training.train import train_bundle

    history = planted(tmp_path_factory.mktemp("planted-history"), seed=11, mislabel=True)
    out = tmp_path_factory.mktemp("planted-bundle")
    train_bundle(
        history,
        out,
        small_training_options(
            tmp_path_factory.mktemp("cache"),
            cleaning="off",
            season_balance=False,
            test_share=0.0,
            min_label_count=5,
            epochs=10,
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def audited(planted_bundle, tmp_path_factory):
    from training.audit import AuditOptions, run_audit, write_audit

    data = planted(tmp_path_factory.mktemp("planted-audit"), seed=12, mislabel=False)
    options = AuditOptions(
        split="all", worst=3, categories=(HOSTILE_CATEGORY,), samples_per_category=8, max_evals=200, threads=2
    )
    report = run_audit(planted_bundle, data, options, progress=False)
    out = tmp_path_factory.mktemp("audit")
    return report, write_audit(report, out), data


def test_planted_category_ranks_among_the_worst(audited):
    report, _, _ = audited
    worst = [row["category"] for row in report.categories[:3]]
    assert BLOUSES in worst
    assert {k: report.confused_pairs[0][k] for k in ("true", "predicted")} == {"true": BLOUSES, "predicted": SHIRTS}
    assert report.categories[0]["category"] == BLOUSES


def test_leaking_keyword_tops_the_tokens_behind_the_planted_errors(audited):
    report, _, _ = audited
    blouses = next(d for d in report.details if d["category"] == BLOUSES)
    assert any(o["kind"] == "missed" and o["predicted"] == SHIRTS for o in blouses["offers"])
    top = blouses["pushing_tokens"]
    assert LEAK in [t["token"] for t in top[:3]]
    assert next(t["token"] for t in top if t["toward"] == SHIRTS) == LEAK
    # ... and becomes a candidate rule: "zorbax" never appears under the men's branch in the labels
    assert (LEAK, "Men") in {(c["keyword"], c["excluded"]) for c in blouses["candidates"]}


def test_unreliable_shop_gets_the_lowest_suggested_weight(audited):
    report, _, _ = audited
    weighted = [row for row in report.shops if row["suggested_weight"] is not None]
    assert weighted[0]["mall_id"] == "mall-net"
    assert weighted[0]["suggested_weight"] < min(row["suggested_weight"] for row in weighted[1:]) - 0.2


def test_json_and_candidates_file(audited):
    report, paths, _ = audited
    data = json.loads(paths["json"].read_text())
    assert data["categories"] == report.categories
    offer = data["details"][0]["offers"][0]
    assert len(offer["word_shap"]) == len(offer["words"]) and "_image" not in offer
    # SHAP values add up: base + sum of contributions = the model's probability of the offer
    total = np.array(offer["base"]) + np.sum(offer["word_shap"], axis=0)
    total += np.array(offer["shop_category_shap"] or [0, 0]) + np.sum(offer["image_shap"] or [[[0, 0]]], axis=(0, 1))
    assert np.allclose(total, offer["probabilities"], atol=1e-3)
    rules = Dictionaries.load(paths["candidates"].parent).exclusions
    assert (tuple(LEAK.split()), ("Men",)) in {(r.keyword, r.excluded) for r in rules}


def test_report_renders_in_a_real_browser(audited, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail(
            "headless Chromium is needed: install the Debian packages chromium and chromium-driver (make test does)"
        )
    _, paths, _ = audited
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    try:
        driver.get(paths["html"].resolve().as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "#overview tbody tr")
        assert len(rows) >= 10
        assert rows[0].find_elements(By.TAG_NAME, "td")[0].text in {BLOUSES, SHIRTS} | {
            r.find_elements(By.TAG_NAME, "td")[0].text for r in rows[:3]
        }
        heatmap = driver.find_element(By.CSS_SELECTOR, "img.heatmap")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heatmap) == 160
        # hostile user text shows as text and runs nothing
        assert driver.execute_script("return window.__pwned") is None
        body = driver.find_element(By.TAG_NAME, "body").text
        assert HOSTILE_TITLE in body and "<i>shop</i>" in body
        screenshot = tmp_path / "audit.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    finally:
        driver.quit()


def test_the_deciding_token_carries_the_largest_attribution(tmp_path):
    """A model where one token decides the class: that token dominates the explanation."""
    from core.bundle import ModelBundle
    from training.audit import OfferExplainer
    from training.train import train_bundle

    rng = np.random.default_rng(3)
    filler = ["red", "blue", "green", "cotton", "classic", "new", "soft", "light", "daily", "basic"]
    rows = []  # every 3 filler words with each decider: the filler says nothing about the class
    for i, (combo, decider) in enumerate(itertools.product(itertools.combinations(filler, 3), ("alpha", "beta"))):
        words = [*combo, decider]
        rng.shuffle(words)
        rows.append(
            {
                "offer_id": f"t{i}",
                "title": " ".join(words),
                "mall_id": "m",
                "mall_category": "goods",
                "image": "",
                "listed_at": "2026-01-01",
                "category": f"Things > {decider.title()}",
            }
        )
    data = tmp_path / "offers.csv"
    pd.DataFrame(rows).to_csv(data, index=False)
    out = tmp_path / "bundle"
    train_bundle(
        data,
        out,
        small_training_options(
            tmp_path / "cache",
            image_size=32,
            cleaning="off",
            season_balance=False,
            min_label_count=5,
            vocab_size=60,
            epochs=5,
            test_share=0.0,
        ),
        progress=False,
    )
    bundle = ModelBundle.load(out)
    explainer = OfferExplainer(bundle, max_evals=200)
    for title, decider in (("soft red beta cotton", "beta"), ("alpha classic new light", "alpha")):
        offer = Offer(offer_id="x", title=title, mall_id="m", mall_category="goods")
        k = bundle.labels.index(f"Things > {decider.title()}")
        explanation = explainer.explain(offer, k, k)
        toward = np.abs(explanation.word_values[:, 0])
        assert explanation.words[int(toward.argmax())] == decider
        assert toward.max() > 2 * np.delete(toward, toward.argmax()).max()
