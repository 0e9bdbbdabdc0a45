"""Calibration stage of training: the lexical model's weight, the temperature, the "uncertain"
threshold, the parent threshold and the operating points, all chosen on held-out predictions.

``crossfit`` (the default, on every split) trains K models, each without one fold of the
training + validation offers (whole title groups on a group split), and chooses on all their
out-of-fold predictions — ten times as many offers as the validation part alone, so the
threshold no longer swings with a handful of validation errors — then trains the served model on
every one of those offers. It is the recipe retraining serves, so a time split measures what it
does on offers newer than all its training data. ``validation`` calibrates on the validation part
only (the newest training offers on a time split) and serves the model trained without them.
The lexical model is fitted alongside every fold model, so its weight, the temperature and the
threshold are all chosen on predictions of offers neither model saw.
"""

from __future__ import annotations

import logging

import numpy as np

from core.decision import apply_exclusions, softmax
from core.lexical import LexicalModel
from core.model import FusionModel
from training.calibration import choose_parent_threshold, choose_threshold, fit_temperature, operating_points
from training.features import Prepared
from training.fit import fit_lexical_model, fit_model, lexical_scores, predict_logits
from training.lexical import choose_lexical_weight
from training.options import TrainOptions
from training.splits import assign_folds, title_groups

__all__ = ["calibrate", "calibrate_logits", "cross_fitted"]

log = logging.getLogger(__name__)


def calibrate(
    model: FusionModel, prepared: Prepared, options: TrainOptions, *, train_rows: np.ndarray, targets: np.ndarray
) -> tuple[LexicalModel | None, dict]:
    """Lexical model on ``train_rows`` (``options.lexical``), then its weight, the temperature and
    the "uncertain" threshold on the validation rows, with the mask as served."""
    validation = prepared.split.validation
    logits = predict_logits(model, prepared, validation, inputs=options.inputs)
    lexical, report = None, None
    if options.lexical:
        lexical = fit_lexical_model(prepared, options, rows=train_rows, targets=targets)
        scores = lexical_scores(lexical, prepared, validation, inputs=options.inputs)
        weight, report = _lexical_weight(logits, scores, prepared, validation, options)
        logits = logits + weight * scores
        lexical = lexical.reweighted(weight) if weight else None
    calibration = calibrate_logits(logits, prepared, validation, options)
    return lexical, calibration | ({"lexical": report} if report else {})


def _lexical_weight(
    logits: np.ndarray, scores: np.ndarray, prepared: Prepared, rows: np.ndarray, options: TrainOptions
) -> tuple[float, dict]:
    """``options.lexical_weight``, or the weight most accurate on these held-out ``rows``."""
    exclusion = prepared.exclusion[rows] if options.use_exclusions else None
    chosen, accuracy = choose_lexical_weight(logits, scores, prepared.targets[rows], exclusion=exclusion)
    weight = chosen if options.lexical_weight is None else float(options.lexical_weight)
    log.info(
        "lexical model weight %.2f (held-out accuracy by weight: %s)",
        weight,
        ", ".join(f"{w:g}: {a:.4f}" for w, a in accuracy.items()),
    )
    # a list, not a dict: JSON would turn the float keys into strings
    by_weight = [{"weight": w, "accuracy": a} for w, a in accuracy.items()]
    return weight, {"weight": weight, "chosen": options.lexical_weight is None, "accuracy_by_weight": by_weight}


def calibrate_logits(logits: np.ndarray, prepared: Prepared, rows: np.ndarray, options: TrainOptions) -> dict:
    """Temperature, threshold, parent threshold and the operating points (other leaf thresholds)
    from held-out ``logits`` of ``rows`` (their given labels, the mask as served)."""
    targets = prepared.targets[rows]
    temperature = fit_temperature(logits, targets)
    groups = title_groups(prepared.frame["title"].iloc[rows]) if options.threshold_by == "product" else None
    exclusion = prepared.exclusion[rows] if options.use_exclusions else None
    chosen = choose_threshold(
        logits,
        targets,
        temperature=temperature,
        target_precision=options.target_precision,
        confidence=options.threshold_confidence,
        exclusion=exclusion,
        groups=groups,
    )
    served, _ = apply_exclusions(softmax(logits, temperature), exclusion)
    parent = choose_parent_threshold(
        served,
        targets,
        prepared.labels,
        leaf_threshold=chosen.threshold,
        target_precision=options.target_precision,
        confidence=options.threshold_confidence,
        groups=groups,
    )
    # What other leaf thresholds would give, for an operator who overrides the chosen one
    points = operating_points(
        served,
        targets,
        prepared.labels,
        target_precision=options.target_precision,
        confidence=options.threshold_confidence,
        groups=groups,
    )
    return {
        "temperature": temperature,
        "threshold": chosen.threshold,
        "coverage": chosen.coverage,
        "precision": chosen.precision,
        "precision_bound": chosen.precision_bound,
        "design_effect": chosen.design_effect,
        "target_reached": chosen.target_reached,
        "tested_from": chosen.tested_from,
        "parent_threshold": parent.threshold,
        "parents": {
            "uncertain": parent.uncertain,
            "answered": parent.answered,
            "precision": parent.precision,
            "precision_bound": parent.precision_bound,
            "design_effect": parent.design_effect,
            "target_reached": parent.threshold is not None,
        },
        "operating_points": [point.to_dict() for point in points],
        "accuracy": float((logits.argmax(1) == targets).mean()),
        "offers": len(rows),
    }


def cross_fitted(
    prepared: Prepared,
    options: TrainOptions,
    *,
    train_rows: np.ndarray,
    targets: np.ndarray,
    progress: bool = True,
) -> tuple[FusionModel, LexicalModel | None, list[dict], dict]:
    """Cross-fitted calibration, then the served model on every training and validation offer.

    ``train_rows``/``targets`` are the training rows after the dictionary and cleaning; the
    validation rows join them for fitting (minus those the dictionary contradicts, as for any
    training row) and are never cleaned. Every training and validation offer is predicted once by
    the fold model that did not see it; temperature and threshold are chosen on those predictions
    with the labels as given. With ``options.lexical`` each fold also fits a lexical model, and its
    weight is chosen on the same out-of-fold predictions before temperature and threshold. The
    history holds the final model's loss and, per epoch, the out-of-fold accuracy averaged over
    the folds.
    """
    validation = prepared.split.validation
    if options.use_exclusions:
        validation = validation[~prepared.contradicted[validation]]
    fit_rows = np.concatenate([train_rows, validation])
    held_rows = np.sort(np.concatenate([prepared.split.train, prepared.split.validation]))
    fold_of = np.full(len(prepared.targets), -1)
    # On a group split a fold holds whole title groups, or colour twins would flatter the out-of-fold predictions
    groups = title_groups(prepared.frame["title"].iloc[held_rows]) if options.split == "group" else None
    fold_of[held_rows] = assign_folds(len(held_rows), options.calibration_folds, seed=options.seed, groups=groups)
    logits = np.zeros((len(held_rows), len(prepared.labels)), dtype=np.float32)
    scores = np.zeros_like(logits)
    fold_histories = []
    for fold in range(options.calibration_folds):
        held = held_rows[fold_of[held_rows] == fold]
        fold_rows = fit_rows[fold_of[fit_rows] != fold]
        model, fold_history = fit_model(
            prepared,
            options,
            train_rows=fold_rows,
            validation_rows=held,
            targets=targets,
            progress=progress,
            description=f"calibration fold {fold + 1}/{options.calibration_folds}",
        )
        logits[fold_of[held_rows] == fold] = predict_logits(model, prepared, held, inputs=options.inputs)
        fold_histories.append(fold_history)
        if options.lexical:
            lexical = fit_lexical_model(prepared, options, rows=fold_rows, targets=targets)
            scores[fold_of[held_rows] == fold] = lexical_scores(lexical, prepared, held, inputs=options.inputs)
    lexical_report, weight = None, 0.0
    if options.lexical:
        weight, lexical_report = _lexical_weight(logits, scores, prepared, held_rows, options)
        logits = logits + weight * scores
    calibration = calibrate_logits(logits, prepared, held_rows, options) | {"folds": options.calibration_folds}
    if groups is not None:
        calibration["fold_title_groups"] = len(np.unique(groups))
    if lexical_report:
        calibration["lexical"] = lexical_report
    model, history = fit_model(
        prepared, options, train_rows=fit_rows, targets=targets, progress=progress, description="training on all folds"
    )
    for epoch, record in enumerate(history):
        record["val_accuracy"] = float(np.mean([fold[epoch]["val_accuracy"] for fold in fold_histories]))
    lexical = (
        fit_lexical_model(prepared, options, rows=fit_rows, targets=targets).reweighted(weight)
        if options.lexical and weight
        else None
    )
    return model, lexical, history, calibration
