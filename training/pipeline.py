"""train → evaluate on held-out offers → fp16 check → log to MLflow → register → promote if better.

This is what ``catstream train`` and the retraining CronJob run. Promotion compares the new
version with the current ``champion`` on the *same* evaluation offers — the new model's held-out
rows that the champion did not see either (its bundle lists the offers it trained and calibrated
on, by id and by content, so the same offers under new ids are recognised) — each served exactly
as in production (ONNX, temperature, mask, threshold); the alias moves
only when the new version is more accurate (macro-F1 breaks ties). Without that restriction a
champion trained on a different split, or on an older history that holds today's test offers,
would be judged on offers it had learned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.bundle import BundleConfig, HalfPrecisionRecord, ModelBundle
from core.offer_files import LABEL, offer_fingerprints
from training.evaluate import Served, evaluate_bundle, serve, serve_held_out, write_report
from training.half_precision import check_half_precision
from training.options import TrainOptions
from training.significance import paired_comparison
from training.tracking import CHAMPION, MODEL_NAME, Tracking
from training.train import train_bundle

__all__ = ["Promotion", "TrainResult", "compare_with_champion", "train_evaluate_register"]

log = logging.getLogger(__name__)


@dataclass
class Promotion:
    version: str
    promoted: bool
    reason: str
    challenger: dict
    champion: dict | None
    champion_version: str | None

    def __str__(self) -> str:
        verb = "promoted to" if self.promoted else "not promoted to"
        return f"registered {MODEL_NAME} version {self.version}; {verb} '{CHAMPION}': {self.reason}"


@dataclass
class TrainResult:
    config: BundleConfig
    report: dict | None
    run_id: str | None
    registered: Promotion | None
    half_precision: HalfPrecisionRecord | None = None  # the fp16 check, where it ran

    @property
    def report_summary(self) -> str:
        lines = [f"held-out evaluation ({self.report['protocol']} split, {self.report['test_offers']} offers):"]
        for name, result in self.report["results"].items():
            at = result.get("at_threshold")
            extra = f"; precision {at['precision']:.4f} at coverage {at['coverage']:.4f}" if at else ""
            if at and (parents := at.get("parents")) and parents["offers"]:
                extra += (
                    f"; {parents['offers']} of {parents['uncertain']} uncertain filed under a parent "
                    f"({parents['precision']:.4f} right)"
                )
            by_product = result.get("accuracy_interval_by_product")
            spread = f" ({by_product[0]:.4f}-{by_product[1]:.4f} by product)" if by_product else ""
            lines.append(
                f"  {name:16s} accuracy {result['accuracy']:.4f}{spread}  macro-F1 {result['macro_f1']:.4f}{extra}"
            )
        for name, paired in self.report.get("paired", {}).items():
            low, high = 100 * np.asarray(paired["difference_interval"])
            line = (
                f"  catstream vs {name}: {100 * paired['difference']:+.2f} points ({low:+.2f} to {high:+.2f}), "
                f"right only by one or the other {paired['only_this']} vs {paired['only_other']}, "
                f"McNemar p {paired['p_value']:.2g}"
            )
            if by_group := paired.get("by_group"):
                low, high = 100 * np.asarray(by_group["difference_interval"])
                line += (
                    f"; products {by_group['groups_this']} vs {by_group['groups_other']}, "
                    f"p {by_group['p_value']:.2g}, {low:+.2f} to {high:+.2f}"
                )
            lines.append(line)
        return "\n".join(lines)


def train_evaluate_register(
    data: str | Path,
    out_dir: str | Path,
    options: TrainOptions,
    *,
    evaluate: bool = True,
    fp16_check: bool = True,
    register: bool = False,
    tracking: Tracking | None = Tracking(),
    progress: bool = True,
) -> TrainResult:
    out_dir = Path(out_dir)
    config = train_bundle(data, out_dir, options, progress=progress)
    report, files, served = None, [], None
    if evaluate and options.test_share > 0:
        served = serve_held_out(ModelBundle.load(out_dir), data, threads=options.threads, progress=progress)
        report = evaluate_bundle(out_dir, data, threads=options.threads, progress=progress, served=served)
        written = write_report(report, out_dir / "evaluation")
        files = written.all()
        log.info("evaluation written to %s", written.markdown)
    half = None
    if served is not None and fp16_check:
        # before tracking, so that the registered bundle carries the fp16 graph and its record
        half = check_half_precision(
            out_dir, served.test, data=str(data), split=served.protocol, threads=options.threads, progress=progress
        )
    run_id = None
    if tracking is not None:
        run_id = tracking.log_training(
            options=options.to_dict(), config=config, bundle_dir=out_dir, report=report, report_files=files
        )
    promotion = None
    if register:
        if tracking is None:
            raise ValueError("registering needs MLflow tracking (drop --no-tracking)")
        if report is None:
            raise ValueError("registering needs the held-out evaluation (drop --no-evaluate, keep --test-share > 0)")
        version = tracking.register(run_id, tags={"model_version": config.model_version})
        promotion = compare_with_champion(tracking, version, out_dir, data, served=served)
    return TrainResult(config=config, report=report, run_id=run_id, registered=promotion, half_precision=half)


def compare_with_champion(
    tracking: Tracking, version: str, bundle_dir: Path, data: str | Path, *, served: Served | None = None
) -> Promotion:
    """Score the new version and the champion on the new version's held-out offers; move the alias if better.

    ``served``: the new version already served on its held-out offers (as the evaluation did).
    """
    if served is None:
        served = serve_held_out(ModelBundle.load(bundle_dir), data, progress=False)
    test, protocol = served.test, served.protocol
    challenger = _summary(served.score())
    current = tracking.champion()
    client = tracking.client()
    if current is None:
        tracking.set_champion(version)
        reason = "there was no champion"
        promotion = Promotion(version, True, reason, challenger, None, None)
    else:
        champion_bundle = ModelBundle.load(tracking.download(MODEL_NAME, current.version))
        unseen, note = _unseen_by_both(champion_bundle, served.bundle, test, champion_version=str(current.version))
        common = test[unseen].reset_index(drop=True)
        if common.empty:
            reason = f"none of the {len(test)} held-out offers is unseen by champion v{current.version}; kept it"
            promotion = Promotion(version, False, reason, challenger, None, str(current.version))
        else:
            contender = _summary(served.score(np.flatnonzero(unseen)))
            known = common[LABEL].isin(champion_bundle.labels).to_numpy()
            champion_served = serve(champion_bundle, common[known].reset_index(drop=True), progress=False)
            champion = _summary(champion_served.score())
            # offers in categories the champion does not know count as its errors
            champion["accuracy"] *= known.mean()
            champion_right = np.zeros(len(common), dtype=bool)
            champion_right[known] = champion_served.correct
            # The rule stays "better on the same offers"; the paired test records how sure that is.
            paired = paired_comparison(served.correct[unseen], champion_right)
            better = (contender["accuracy"], contender["macro_f1"]) > (champion["accuracy"], champion["macro_f1"])
            reason = (
                f"accuracy {contender['accuracy']:.4f} vs champion v{current.version} {champion['accuracy']:.4f} "
                f"on the same {len(common)} held-out offers ({protocol} split"
                + note
                + f"; right only by the new version {paired['only_this']}, only by the champion "
                f"{paired['only_other']}, McNemar p {paired['p_value']:.2g})"
            )
            if better:
                tracking.set_champion(version)
            promotion = Promotion(version, better, reason, contender, champion, str(current.version))
    for key, value in challenger.items():
        client.set_model_version_tag(MODEL_NAME, version, f"eval_{key}", f"{value:.5f}")
    client.set_model_version_tag(MODEL_NAME, version, "promotion", promotion.reason)
    log.info("%s", promotion)
    return promotion


def _unseen_by_both(
    champion: ModelBundle, challenger: ModelBundle, test: pd.DataFrame, *, champion_version: str
) -> tuple[np.ndarray, str]:
    """``(unseen, note)``: which of the challenger's held-out ``test`` offers neither model trained or
    calibrated on, and what was left out (for the reason).

    Offers are matched by id and by content fingerprint: the same offers under new ids (a re-export,
    another id scheme) are still recognised, and an offer identical to one the challenger trained on
    is left out too, as the challenger has seen it.
    """
    record, own = champion.training_offers(), challenger.training_offers()
    if record is None or own is None:
        missing = "champion v" + champion_version if record is None else "the new version"
        raise ValueError(
            f"the bundle of {missing} lacks its training_offers.tsv: it cannot be compared on unseen offers"
        )
    by_id = test["offer_id"].isin(record.ids).to_numpy()
    fingerprints = pd.Series(offer_fingerprints(test))
    by_content = fingerprints.isin(record.fingerprints).to_numpy() & ~by_id
    by_own = fingerprints.isin(own.fingerprints).to_numpy() & ~by_id & ~by_content
    parts = []
    if by_id.any() or by_content.any():
        parts.append(
            f"{int(by_id.sum() + by_content.sum())} the champion saw left out"
            + (f", {int(by_content.sum())} of them found by content under another id" if by_content.any() else "")
        )
    if by_own.any():
        parts.append(f"{int(by_own.sum())} identical to offers the new version trained on left out")
    if by_content.any():
        log.warning(
            "%d held-out offers carry ids champion v%s did not train on but the content of offers it did: "
            "left out of the comparison",
            int(by_content.sum()),
            champion_version,
        )
    return ~(by_id | by_content | by_own), "".join(f"; {part}" for part in parts)


def _summary(result: dict) -> dict:
    at = result.get("at_threshold", {})
    return {
        "accuracy": result["accuracy"],
        "macro_f1": result["macro_f1"],
        "coverage": at.get("coverage", np.nan),
        "precision": at.get("precision", np.nan),
    }
