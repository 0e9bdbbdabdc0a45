"""``catstream train``: labeled offers (a file or a history store) → model bundle.

The stages, each in its own module and each logged (the long ones with progress bars and an ETA):

1. features (``training.features``): label set from data (min count; rarer leaves excluded or
   rolled up to their parent) → split (random, time or title group; test rows held out) →
   exclusion dictionary drops contradicted examples → SentencePiece on the training text →
   per-shop trust in the mall category → featurise → frozen MobileNetV2 features (cached on disk);
2. fitting (``training.fit``): optional cleanlab label cleaning on K-fold out-of-sample
   probabilities → text branches + head, optionally on season-balanced samples → lexical model
   (TF-IDF n-grams + linear SVM) whose scores are added to the network's logits;
3. calibration (``training.crossfit``): the lexical weight, temperature, "uncertain" threshold and
   parent threshold on held-out predictions, out-of-fold by default;
4. export (``training.export``): ONNX, gated by a parity check against PyTorch;
5. the bundle (``training.bundle_writer``).

The ablation table and ``catstream tune`` reuse the stages: ``prepare`` does the expensive part
once, ``fit_model`` trains one configuration on it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from core.bundle import BundleConfig
from training.bundle_writer import write_bundle
from training.calibration import SEQUENCE_START_SHARE
from training.crossfit import calibrate, cross_fitted
from training.export import check_parity, export_onnx
from training.features import prepare
from training.fit import fit_model, training_rows
from training.options import TrainOptions

__all__ = ["train_bundle"]

log = logging.getLogger(__name__)


def train_bundle(
    data: str | Path, out_dir: str | Path, options: TrainOptions, *, progress: bool = True
) -> BundleConfig:
    """Train on ``data`` and write a bundle to ``out_dir``; returns its ``config.json``."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    clock = time.monotonic()
    prepared = prepare(data, out_dir, options, progress=progress)
    stages["prepare"] = time.monotonic() - clock
    log.info("data: %s", prepared.report)

    clock = time.monotonic()
    rows, targets, cleaning_report = training_rows(prepared, options, progress=progress)
    stages["clean"] = time.monotonic() - clock
    clock = time.monotonic()
    if options.calibration == "crossfit":
        model, lexical, history, calibration = cross_fitted(
            prepared, options, train_rows=rows, targets=targets, progress=progress
        )
    else:
        model, history = fit_model(
            prepared,
            options,
            train_rows=rows,
            validation_rows=prepared.split.validation,
            targets=targets,
            progress=progress,
        )
        lexical, calibration = calibrate(model, prepared, options, train_rows=rows, targets=targets)
    stages["fit"] = time.monotonic() - clock
    temperature, threshold = calibration["temperature"], calibration["threshold"]
    log.info(
        "%s accuracy %.4f on %d offers; temperature %.2f; threshold %.3f → coverage %.3f at precision %.4f "
        "(%.0f%% lower bound %.4f counted by %s; design effect %.1f)",
        "out-of-fold" if options.calibration == "crossfit" else "validation",
        calibration["accuracy"],
        calibration["offers"],
        temperature,
        threshold,
        calibration["coverage"],
        calibration["precision"],
        100 * options.threshold_confidence,
        calibration["precision_bound"],
        options.threshold_by,
        calibration["design_effect"],
    )
    parents = calibration["parents"]
    if parents["target_reached"]:
        log.info(
            "parent threshold %.4f: %d of the %d uncertain offers filed under a parent category at precision "
            "%.4f (lower bound %.4f)",
            calibration["parent_threshold"],
            parents["answered"],
            parents["uncertain"],
            parents["precision"],
            parents["precision_bound"],
        )
    elif not parents["uncertain"]:
        log.info(
            "the threshold leaves none of the %d held-out offers uncertain, so no parent threshold can be chosen: "
            "the model will name no parent category for uncertain offers",
            calibration["offers"],
        )
    else:
        log.warning(
            "no parent threshold reaches the target precision %.4f on the %d uncertain offers (candidates "
            "tested strictest first, from the one filing %.0f%% of them): the model will name no parent "
            "category for uncertain offers",
            options.target_precision,
            parents["uncertain"],
            100 * SEQUENCE_START_SHARE,
        )
    if not calibration["target_reached"]:
        log.warning(
            "no threshold reaches the target precision %.4f on these %d offers (their accuracy %.4f; the "
            "thresholds are tested strictest first, from the one accepting %.0f%% of them): the threshold "
            "%.3f has the best lower bound, %.4f, at coverage %.3f. Either the labels are noisier than the "
            "target allows or there are too few offers to show it; see --target-precision, --cleaning and "
            "`catstream audit`",
            options.target_precision,
            calibration["offers"],
            calibration["accuracy"],
            100 * SEQUENCE_START_SHARE,
            threshold,
            calibration["precision_bound"],
            calibration["coverage"],
        )

    clock = time.monotonic()
    export_onnx(model, out_dir / "model.onnx")
    parity = check_parity(model, out_dir / "model.onnx")
    stages["export"] = time.monotonic() - clock
    return write_bundle(
        out_dir,
        data=data,
        prepared=prepared,
        options=options,
        model=model,
        lexical=lexical,
        calibration=calibration,
        history=history,
        cleaning_report=cleaning_report,
        parity=parity,
        stages=stages,
        started=started,
    )
