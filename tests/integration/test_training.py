"""Training side against real stores: MLflow (sqlite), ONNX Runtime evaluation, the bundle's shop weights."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from core.bundle import ModelBundle
from core.features import Featurizer
from core.offer_files import offer_fingerprints, offers_from_frame, read_offer_file
from tests.conftest import small_training_options
from training.report_figures import FIGURES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from training.tracking import Tracking

    root = tmp_path_factory.mktemp("mlflow")
    return Tracking(f"sqlite:///{root}/mlflow.db", experiment="tests")


@pytest.fixture(scope="module")
def champion_run(marketplace, registry, tmp_path_factory):
    from training.pipeline import train_evaluate_register

    cache = tmp_path_factory.mktemp("cache")
    first = train_evaluate_register(
        marketplace,
        tmp_path_factory.mktemp("v1"),
        small_training_options(cache),
        register=True,
        tracking=registry,
        progress=False,
    )
    return first, cache


def test_first_registered_version_becomes_champion_and_the_run_is_complete(champion_run, registry):
    first, _ = champion_run
    assert first.registered.promoted and first.registered.version == "1"
    client = registry.client()
    run = client.get_run(first.run_id)
    assert run.data.params["image_size"] == "64" and run.data.params["cleaning"] == "drop"
    assert len(client.get_metric_history(first.run_id, "val_accuracy")) == 5  # one point per epoch
    assert run.data.metrics["test_catstream_accuracy"] == pytest.approx(
        first.report["results"]["catstream"]["accuracy"]
    )
    parents = first.report["results"]["catstream"]["at_threshold"]["parents"]
    assert run.data.metrics["test_catstream_parent_offers"] == parents["offers"]
    assert run.data.metrics["validation_parent_uncertain"] == first.config.training.validation.parents.uncertain
    assert first.config.training.machine["cpus"] >= 1 and "numpy" in first.config.training.machine["versions"]
    artifacts = {a.path for a in client.list_artifacts(first.run_id, "bundle")}
    assert {"bundle/model.onnx", "bundle/config.json", "bundle/shops.json"} <= artifacts
    figures = {f"evaluation/{name}" for name in FIGURES}
    assert {a.path for a in client.list_artifacts(first.run_id, "evaluation")} == {
        "evaluation/evaluation.json",
        "evaluation/evaluation.md",
    } | figures
    assert str(registry.champion().version) == "1"


def test_evaluation_draws_its_figures_and_embeds_them(champion_run):
    from PIL import Image

    report_dir = ModelBundle.load(champion_run[0].report["model"]).path / "evaluation"
    markdown = (report_dir / "evaluation.md").read_text()
    for name in FIGURES:
        path = report_dir / name
        assert path.stat().st_size > 10_000, name  # a drawn figure, not an empty canvas
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 300
        assert f"]({name})" in markdown
    report = champion_run[0].report["results"]["catstream"]
    curve = report["curves"]["coverage_precision"]
    assert len(curve) == 100 and curve[-1]["coverage"] == 1.0
    assert curve[-1]["precision"] == pytest.approx(report["accuracy"])
    reliability = report["curves"]["reliability"]
    assert sum(b["offers"] for b in reliability) == champion_run[0].report["test_offers"]
    confusion = report["confusion"]
    assert len(confusion["categories"]) == len(confusion["counts"]) and all(
        confusion["counts"][i][i] == 0 for i in range(len(confusion["counts"]))
    )


def test_random_split_calibrates_on_out_of_fold_predictions_of_every_training_offer(champion_run):
    first, _ = champion_run
    config = first.config.model_dump()  # config.json as a reader of the file sees it
    written = json.loads((ModelBundle.load(first.report["model"]).path / "config.json").read_text())
    assert json.dumps(config, sort_keys=True) == json.dumps(written, sort_keys=True)  # NaN included
    training = config["training"]
    report = training["data_report"]
    assert training["calibration"] == {
        "mode": "crossfit",
        "folds": 4,
        "target_precision": 0.98,
        "threshold_confidence": 0.95,
        "threshold_by": "product",
        "fold_title_groups": None,
        "offers": report["train_offers"] + report["validation_offers"],
    }
    assert training["validation"]["design_effect"] >= 1.0  # the bound counted colour variants by product
    # the threshold is held to the lower confidence bound, which sits below the observed precision
    assert 0.0 < training["validation"]["precision_bound"] < training["validation"]["precision"]
    # the thresholds were tested as a fixed sequence from the one accepting half the offers
    validation = training["validation"]
    if validation["target_reached"]:
        assert validation["tested_from"] <= validation["coverage"]
        assert validation["precision_bound"] >= training["options"]["target_precision"]
    assert validation["tested_from"] is None or validation["tested_from"] >= 0.5
    assert 0.8 < training["validation"]["accuracy"] < 1.0  # fold models, not the final model on its own training data
    # the parent threshold is chosen on the offers that threshold leaves uncertain, held to the same bound
    parents = training["validation"]["parents"]
    assert parents["uncertain"] == round((1 - training["validation"]["coverage"]) * training["calibration"]["offers"])
    assert parents["target_reached"] == (config["parent_threshold"] is not None)
    if parents["target_reached"]:
        assert parents["precision"] >= parents["precision_bound"] >= training["options"]["target_precision"]
    # what other leaf thresholds gave on the same offers, for an operator who overrides it
    points = config["operating_points"]
    assert len(points) == 41 and points[0]["threshold"] == 0.0 and points[0]["coverage"] == 1.0
    assert all(
        a["threshold"] < b["threshold"] and a["coverage"] >= b["coverage"] for a, b in itertools.pairwise(points)
    )
    below = max((p for p in points if p["threshold"] <= config["threshold"]), key=lambda p: p["threshold"])
    assert below["coverage"] >= training["validation"]["coverage"]
    assert all(
        0 <= p["parent_offers"] <= round((1 - p["coverage"]) * training["calibration"]["offers"]) for p in points
    )
    assert all(0.0 < record["val_accuracy"] <= 1.0 for record in training["history"])
    assert training["stage_seconds"]["fit"] > 0


def test_evaluation_report_has_every_section_and_both_baselines(champion_run):
    report = champion_run[0].report
    assert set(report["results"]) == {"catstream", "tfidf-word", "tfidf-word-char"}
    model = report["results"]["catstream"]
    assert report["protocol"] == "random" and report["test_offers"] == 300
    assert len(model["per_category"]) == 15 and model["coverage_curve"][-1]["coverage"] == 1.0
    assert len(model["per_month"]) == 12
    assert 0.0 < model["at_threshold"]["coverage"] <= 1.0
    # the uncertain offers, one level up or more: counted per depth, filed coverage adds them
    parents = model["at_threshold"]["parents"]
    assert parents["uncertain"] == model["at_threshold"]["uncertain"] >= parents["offers"]
    assert sum(row["offers"] for row in parents["by_depth"].values()) == parents["offers"]
    assert parents["coverage_with_parents"] == pytest.approx(
        model["at_threshold"]["coverage"] + parents["offers"] / report["test_offers"]
    )
    # every operating point of the bundle, scored on these offers with its own parent threshold
    rows = model["operating_points"]
    assert [row["calibration"] for row in rows] == champion_run[0].config.model_dump()["operating_points"]
    assert rows[0]["coverage"] == 1.0 and all(
        row["parents"]["threshold"] == row["calibration"]["parent_threshold"] for row in rows
    )
    assert all(row["filed"] == pytest.approx(row["coverage"] + row["parents"]["offers"] / 300) for row in rows)
    # the synthetic marketplace is easy: the fusion model must be clearly better than chance
    assert model["accuracy"] > 0.85


def test_worse_model_does_not_take_the_champion_alias(champion_run, marketplace, registry, tmp_path):
    from core.registry import resolve_model_uri
    from training.evaluate import held_out
    from training.pipeline import train_evaluate_register

    first, cache = champion_run
    # another seed, so another split: part of v2's held-out offers were v1's training offers
    worse = train_evaluate_register(
        marketplace,
        tmp_path / "v2",
        small_training_options(cache, epochs=1, learning_rate=1e-4, cleaning="off", seed=1),
        register=True,
        tracking=registry,
        progress=False,
    )
    assert worse.registered.version == "2" and not worse.registered.promoted
    assert worse.registered.champion_version == "1"
    v1 = ModelBundle.load(resolve_model_uri("models:/catstream/1", registry=registry))
    frame, v1_test, v1_seen, _ = held_out(v1, marketplace)
    v1_offers = v1.training_offers()
    assert v1_offers.ids == set(frame["offer_id"].iloc[v1_seen]) and len(v1_seen) + len(v1_test) == len(frame)
    assert v1_offers.fingerprints == set(offer_fingerprints(frame.iloc[v1_seen]))
    v2_offers = ModelBundle.load(tmp_path / "v2").training_offers()
    frame, v2_test, _, _ = held_out(ModelBundle.load(tmp_path / "v2"), marketplace)
    unseen_by_both = [
        i
        for i, fingerprint in zip(v2_test, offer_fingerprints(frame.iloc[v2_test]), strict=True)
        if frame["offer_id"].iloc[i] not in v1_offers.ids
        and fingerprint not in v1_offers.fingerprints | v2_offers.fingerprints
    ]
    assert 0 < len(unseen_by_both) < len(v2_test)
    assert f"on the same {len(unseen_by_both)} held-out offers" in worse.registered.reason
    # the paired counts in the reason agree with the two accuracies on those offers
    only_new, only_champion = map(
        int,
        re.search(
            r"right only by the new version (\d+), only by the champion (\d+), "
            r"McNemar p [0-9.e+-]+",
            worse.registered.reason,
        ).groups(),
    )
    assert (only_new - only_champion) / len(unseen_by_both) == pytest.approx(
        worse.registered.challenger["accuracy"] - worse.registered.champion["accuracy"]
    )
    assert str(registry.champion().version) == "1"
    served = resolve_model_uri("models:/catstream@champion", registry=registry)
    assert ModelBundle.load(served).version == first.config.model_version
    assert (
        ModelBundle.load(resolve_model_uri("models:/catstream/2", registry=registry)).version
        == worse.config.model_version
    )
    with pytest.raises(ValueError, match="alias"):
        resolve_model_uri("models:/catstream@nope", registry=registry)
    assert "found by content under another id" not in worse.registered.reason  # the same file: every id found
    # The same offers under new ids: the champion's training offers are recognised by their content,
    # so the comparison is on the very offers it was on before, and the worse version stays out.
    from training.pipeline import compare_with_champion

    renamed = tmp_path / "renamed.csv"
    frame = pd.read_csv(marketplace, dtype=str, keep_default_na=False)
    frame["offer_id"] = "re-" + frame["offer_id"]
    frame["image"] = [str((marketplace.parent / image).resolve()) if image else "" for image in frame["image"]]
    frame.to_csv(renamed, index=False)
    try:
        again = compare_with_champion(registry, "2", tmp_path / "v2", renamed)
    finally:  # later tests need v1 as the champion, whatever happened here
        registry.set_champion("1")
    assert not again.promoted and again.champion_version == "1"
    assert f"on the same {len(unseen_by_both)} held-out offers" in again.reason
    assert f"{len(v1_offers.ids)} of them found by content under another id" in again.reason
    assert again.challenger == pytest.approx(worse.registered.challenger)
    assert again.champion == pytest.approx(worse.registered.champion)


def test_cli_evaluates_the_champion_from_the_registry(champion_run, marketplace, registry, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "catstream",
            "evaluate",
            "--model",
            "models:/catstream@champion",
            "--data",
            str(marketplace),
            "--tracking-uri",
            registry.resolved_uri,
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "tfidf-word-char" in result.stdout
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["model_version"] == champion_run[0].config.model_version
    assert report["results"]["catstream"]["accuracy"] == pytest.approx(
        champion_run[0].report["results"]["catstream"]["accuracy"]
    )
    # the lead over each baseline is judged on the same offers, and printed with its p-value
    results = report["results"]
    low, high = results["catstream"]["accuracy_interval"]
    assert low < results["catstream"]["accuracy"] < high or results["catstream"]["accuracy"] == 1.0
    for name in ("tfidf-word", "tfidf-word-char"):
        paired = report["paired"][name]
        assert paired["offers"] == report["test_offers"]
        assert paired["difference"] == pytest.approx(results["catstream"]["accuracy"] - results[name]["accuracy"])
        assert paired["difference_interval"][0] <= paired["difference"] <= paired["difference_interval"][1]
    assert "catstream against each baseline" in result.stdout and "p-value" in result.stdout
    assert "interval by product" in result.stdout
    parents = results["catstream"]["at_threshold"]["parents"]
    assert ("Uncertain offers filed under a parent category" in result.stdout) == (parents["uncertain"] > 0)


def test_cli_evaluates_the_bundle_served_at_another_threshold(champion_run, marketplace, tmp_path):
    first, _ = champion_run
    bundle_dir = first.report["model"]
    point = first.config.operating_points[25].model_dump()  # a threshold other than the bundle's
    assert point["threshold"] != first.config.threshold
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "catstream",
            "evaluate",
            "--model",
            str(bundle_dir),
            "--data",
            str(marketplace),
            "--no-baselines",
            "--threshold",
            repr(point["threshold"]),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "evaluation.json").read_text())
    at = report["results"]["catstream"]["at_threshold"]
    assert at["threshold"] == point["threshold"] and at["parents"]["threshold"] == point["parent_threshold"]
    assert report["served_at"]["bundle_threshold"] == first.config.threshold
    assert report["served_at"]["operating_point"] == point and report["served_at"]["note"].startswith("served at")
    assert f"Served at threshold {point['threshold']:.4f} (the bundle's: {first.config.threshold:.4f})" in result.stdout
    markdown = (tmp_path / "evaluation.md").read_text()
    assert "## Other leaf thresholds (catstream)" in markdown and f"| {point['threshold']:.5f} |" in markdown
    # the same offers as the bundle's own evaluation, only the threshold moved
    assert report["results"]["catstream"]["accuracy"] == first.report["results"]["catstream"]["accuracy"]


def test_group_split_holds_out_whole_title_groups_and_cross_fits_on_them(champion_run, marketplace, tmp_path):
    from training.evaluate import evaluate_bundle, held_out
    from training.splits import title_groups
    from training.train import train_bundle

    options = small_training_options(champion_run[1], split="group", epochs=3, cleaning="off", season_balance=False)
    config = train_bundle(marketplace, tmp_path / "model", options, progress=False)
    training = config.model_dump()["training"]
    assert training["split"]["protocol"] == "group" and training["calibration"]["mode"] == "crossfit"
    assert (
        training["calibration"]["offers"]
        == training["data_report"]["train_offers"] + training["data_report"]["validation_offers"]
    )
    # evaluation rebuilds the split from the bundle: no test title shares a group with a training title
    frame, test_rows, train_rows, protocol = held_out(ModelBundle.load(tmp_path / "model"), marketplace)
    assert protocol == "group" and len(test_rows) == training["data_report"]["test_offers"]
    groups = title_groups(frame["title"])
    assert not set(groups[test_rows]) & set(groups[train_rows])
    assert len(set(groups[test_rows])) > 20  # many products held out, not one big group
    # the calibration folds hold whole groups too
    assert training["calibration"]["fold_title_groups"] == len(set(groups[train_rows]))
    report = evaluate_bundle(tmp_path / "model", marketplace, progress=False)
    assert report["protocol"] == "group" and report["results"]["catstream"]["accuracy"] > 0.8
    # the lead over each baseline is also tested with the product, not the offer, as the unit
    for paired in report["paired"].values():
        by_group = paired["by_group"]
        assert by_group["groups"] == len(set(groups[test_rows]))
        assert by_group["groups_this"] + by_group["groups_other"] <= paired["only_this"] + paired["only_other"]
        assert by_group["difference_interval"][0] <= paired["difference"] <= by_group["difference_interval"][1]
    for result in report["results"].values():  # and every accuracy has an interval by product beside the exact one
        low, high = result["accuracy_interval_by_product"]
        assert low <= result["accuracy"] <= high


def test_unreliable_shop_is_down_weighted_in_the_bundle_and_at_inference(bundle, marketplace):
    loaded = ModelBundle.load(bundle)
    weights = loaded.shop_weights()
    assert min(weights.weights, key=weights.weights.get) == "mall-net"
    assert weights("mall-net") < 0.5 and weights("mall-dool") > 0.9
    assert weights("a-shop-never-seen") == 1.0
    featurizer = Featurizer.from_bundle(loaded)
    frame = read_offer_file(marketplace)
    offer = next(o for o in offers_from_frame(frame) if o.mall_id == "mall-net")
    assert featurizer.featurize(offer).mall_weight == pytest.approx(weights("mall-net"))


def test_bundle_carries_the_lexical_model_with_its_held_out_weight_and_serving_requires_its_scores(
    champion_run, marketplace
):
    from core.scoring import OnnxClassifier

    first, _ = champion_run
    bundle = ModelBundle.load(first.report["model"])
    lexical = bundle.config.training.lexical  # as read back from config.json
    accuracy = {row["weight"]: row["accuracy"] for row in lexical["accuracy_by_weight"]}
    assert lexical["chosen"] and lexical["weight"] in accuracy
    # the weight is the most accurate on the out-of-fold predictions, and beats the network alone there
    assert accuracy[lexical["weight"]] == max(accuracy.values())
    assert accuracy[lexical["weight"]] > accuracy[0.0]
    model = bundle.lexical()
    assert model.weight == lexical["weight"] and model.num_classes == len(bundle.labels)
    assert model.num_features == lexical["features"] > 0

    featurizer = Featurizer.from_bundle(bundle)
    offer = featurizer.featurize(next(offers_from_frame(read_offer_file(marketplace).head(1))))
    inputs = featurizer.batch([next(offers_from_frame(read_offer_file(marketplace).head(1)))]).inputs
    classifier = OnnxClassifier(bundle)
    without_scores = {name: array for name, array in inputs.items() if name != "lexical"}
    with pytest.raises(ValueError, match="lexical"):
        classifier.logits(without_scores)
    network = classifier.session.run(None, {name: inputs[name] for name in classifier.input_names})[0][0]
    served = classifier.logits(inputs)[0]
    assert np.abs(offer.lexical).max() > 0.1  # the scores move the logits
    np.testing.assert_allclose(served, network + offer.lexical, atol=1e-5)


def test_ablation_measures_every_row(marketplace, tmp_path):
    from training.ablation import ABLATION_ROWS, render_ablation, run_ablation

    # cleaning off, as by default: the cleaning rows must still clean
    report = run_ablation(
        marketplace,
        tmp_path,
        small_training_options(tmp_path / "cache", epochs=3, cleaning="off"),
        without_char_ngrams=True,
        progress=False,
    )
    assert [row["row"] for row in report["rows"]] == [name for name, _ in ABLATION_ROWS] + [
        "full model without character n-grams"
    ]
    # each row was trained: different configurations give different training sets or scores
    assert report["rows"][4]["training_offers"] < report["rows"][3]["training_offers"]  # cleaning dropped labels
    assert report["rows"][4]["cleaning"]["flagged"] > 0 and report["rows"][5]["cleaning"]["mode"] == "drop"
    assert "lexical_weight" in report["rows"][6] and not any("lexical_weight" in row for row in report["rows"][:6])
    assert "cleaning" not in report["rows"][7]  # the extra rows are the run's own configuration
    assert len({round(row["accuracy"], 6) for row in report["rows"]}) >= 3
    # each row is compared offer by offer with the one it builds on; same offers, so the paired
    # difference is exactly the difference of the two accuracies
    assert "paired" not in report["rows"][0]
    # the seven cumulative rows each build on the one before; the extra rows on the full model
    builds_on_rows = [r["row"] for r in report["rows"][:6]] + ["+ lexical model"] * (len(report["rows"]) - 7)
    for row, against in zip(report["rows"][1:], builds_on_rows, strict=True):
        builds_on = next(r for r in report["rows"] if r["row"] == against)
        assert row["paired"]["against"] == against
        assert row["paired"]["difference"] == pytest.approx(row["accuracy"] - builds_on["accuracy"])
        assert 0 <= row["paired"]["p_value"] <= 1
        # and product by product, over the title groups of the test offers
        by_group = row["paired"]["by_group"]
        assert (
            by_group["groups_this"] + by_group["groups_other"]
            <= row["paired"]["only_this"] + row["paired"]["only_other"]
        )
        assert by_group["difference_interval"][0] <= row["paired"]["difference"] <= by_group["difference_interval"][1]
    assert len({row["paired"]["by_group"]["groups"] for row in report["rows"][1:]}) == 1
    # each row also says what filing its uncertain offers under a parent category adds
    for row in report["rows"]:
        at = row["at_threshold"]
        parents = at["parents"]
        assert parents["uncertain"] == round((1 - at["coverage"]) * report["test_offers"])
        assert parents["coverage_with_parents"] == pytest.approx(
            at["coverage"] + parents["offers"] / report["test_offers"]
        )
        accepted = at["coverage"] * report["test_offers"]
        leaf_right = at["precision"] * accepted if accepted else 0.0
        if accepted + parents["offers"]:
            assert parents["precision_with_parents"] == pytest.approx(
                (leaf_right + parents["right"]) / (accepted + parents["offers"])
            )
    assert "| + exclusion dictionary |" in render_ablation(report)
    assert "p by product" in render_ablation(report) and "interval by product" in render_ablation(report)
    assert "filed, leaf or parent / precision" in render_ablation(report)
    # and the machine they were measured on: seeded rows reproduce on the same CPU, not across CPUs
    machine = report["machine"]
    assert machine["cpu"] and machine["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert machine["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"Measured on {machine['cpu']} ({machine['cpus']} cores; " in render_ablation(report)
    # and whether its threshold was certified by the fixed sequence or is the uncorrected fallback
    for row in report["rows"]:
        assert isinstance(row["at_threshold"]["certified"], bool) and 0 < row["at_threshold"]["threshold"] <= 1
    uncertified = dict(
        report, rows=[dict(row, at_threshold=dict(row["at_threshold"], certified=False)) for row in report["rows"][:1]]
    )
    assert "(not certified)" in render_ablation(uncertified) and "Not certified:" in render_ablation(uncertified)
    certified = dict(
        report, rows=[dict(row, at_threshold=dict(row["at_threshold"], certified=True)) for row in report["rows"][:1]]
    )
    assert "certified" not in render_ablation(certified).lower()
    # a row without a parent threshold files leaf answers alone, and says so
    no_parent = dict(
        report,
        rows=[
            dict(
                row,
                at_threshold=dict(row["at_threshold"], parents=dict(row["at_threshold"]["parents"], threshold=None)),
            )
            for row in report["rows"][:1]
        ],
    )
    assert "(no parent threshold)" in render_ablation(no_parent)
    with_parent = dict(
        report,
        rows=[
            dict(
                row, at_threshold=dict(row["at_threshold"], parents=dict(row["at_threshold"]["parents"], threshold=0.9))
            )
            for row in report["rows"][:1]
        ],
    )
    assert "(no parent threshold)" not in render_ablation(with_parent)


def test_ablation_rerun_reuses_finished_rows(marketplace, tmp_path):
    """An interrupted ablation resumes: a rerun in the same work directory reuses the rows finished
    with the same key and trains only the missing or stale ones, to the same figures."""
    from training.ablation import ABLATION_ROWS, ROWS_DIR, render_ablation, run_ablation

    options = small_training_options(tmp_path / "cache", epochs=2, cleaning="off")
    first = run_ablation(marketplace, tmp_path, options, progress=False)
    assert first["reused_rows"] == [] and "Carried over" not in render_ablation(first)
    saved = sorted((tmp_path / ROWS_DIR).glob("*.json"))
    assert len(saved) == len(ABLATION_ROWS)

    def figures(report):  # as JSON text: a NaN (no parent answers) equals itself there
        return json.dumps([{k: v for k, v in row.items() if k != "seconds"} for row in report["rows"]])

    again = run_ablation(marketplace, tmp_path, options, progress=False)
    assert again["reused_rows"] == [name for name, _ in ABLATION_ROWS]
    assert figures(again) == figures(first)  # the paired comparisons too: the right/wrong offers were kept
    assert "Carried over from an earlier run" in render_ablation(again)

    # a lost row and a row recorded under other settings are trained again, to the same figures
    (tmp_path / ROWS_DIR / "image.json").unlink()
    stale = tmp_path / ROWS_DIR / "title-only.json"
    stale.write_text(json.dumps(json.loads(stale.read_text()) | {"key": "other settings"}))
    (tmp_path / ROWS_DIR / "mall-category.json").write_text("{half a row")
    resumed = run_ablation(marketplace, tmp_path, options, progress=False)
    assert resumed["reused_rows"] == [
        name for name, _ in ABLATION_ROWS if name not in ("title only", "+ mall category", "+ image")
    ]
    assert figures(resumed) == figures(first)

    # other options, or fresh=True, reuse nothing
    assert (
        run_ablation(
            marketplace, tmp_path, small_training_options(tmp_path / "cache", epochs=1, cleaning="off"), progress=False
        )["reused_rows"]
        == []
    )
    assert run_ablation(marketplace, tmp_path, options, fresh=True, progress=False)["reused_rows"] == []


def test_tune_tracks_every_trial(marketplace, registry, tmp_path):
    from training.tune import tune

    report = tune(
        marketplace,
        tmp_path,
        small_training_options(tmp_path / "cache", epochs=2, cleaning="off"),
        trials=3,
        tracking=registry,
        progress=False,
    )
    assert len(report["trials"]) == 3 and report["best"] in report["trials"]
    client = registry.client()
    for trial in report["trials"]:
        run = client.get_run(trial["run_id"])
        assert float(run.data.params["learning_rate"]) == pytest.approx(trial["learning_rate"])
        assert run.data.metrics["val_accuracy"] == pytest.approx(trial["val_accuracy"])
        assert run.data.tags["mlflow.parentRunId"]
