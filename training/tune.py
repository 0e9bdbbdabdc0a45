"""``catstream tune``: random search over learning rate, fusion width and dropout.

The expensive part (featurising, image features, label cleaning) is done once; each trial
trains the head on the same training rows and is judged on validation accuracy only — the test
rows stay unseen. Every trial is an MLflow run nested under the search's run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from training.features import prepare
from training.fit import fit_model, predict_logits, training_rows
from training.options import TrainOptions
from training.progress import progress_bar
from training.tracking import Tracking

__all__ = ["SEARCH_SPACE", "sample_trial", "tune"]

log = logging.getLogger(__name__)

SEARCH_SPACE = {
    "learning_rate": ("log-uniform", 5e-4, 1e-2),
    "fusion_hidden": ("choice", 256, 512, 1024),
    "dropout": ("uniform", 0.0, 0.5),
}


def sample_trial(rng: np.random.Generator) -> dict:
    """One point of :data:`SEARCH_SPACE`."""
    low, high = SEARCH_SPACE["learning_rate"][1:]
    return {
        "learning_rate": float(np.exp(rng.uniform(np.log(low), np.log(high)))),
        "fusion_hidden": int(rng.choice(SEARCH_SPACE["fusion_hidden"][1:])),
        "dropout": float(rng.uniform(*SEARCH_SPACE["dropout"][1:])),
    }


def tune(
    data: str | Path,
    work_dir: str | Path,
    options: TrainOptions,
    *,
    trials: int,
    tracking: Tracking | None = Tracking(),
    progress: bool = True,
) -> dict:
    """Run ``trials`` trials (the first is the current defaults); returns all trials and the best."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare(data, work_dir, options, progress=progress)
    rows, targets, _ = training_rows(prepared, options, progress=progress)
    validation = prepared.split.validation
    rng = np.random.default_rng(options.seed)
    parent = None
    if tracking is not None:
        client = tracking.client()
        parent = client.create_run(tracking.experiment_id(), run_name=f"tune-{trials}-trials").info.run_id
    results = []
    for number in progress_bar(range(trials), desc="trials", unit="trial", disable=not progress):
        params = (
            {"learning_rate": options.learning_rate, "fusion_hidden": options.fusion_hidden, "dropout": options.dropout}
            if number == 0
            else sample_trial(rng)
        )
        trial_options = dataclasses.replace(options, **params)
        started = time.monotonic()
        model, history = fit_model(
            prepared, trial_options, train_rows=rows, validation_rows=validation, targets=targets, progress=False
        )
        logits = predict_logits(model, prepared, validation)
        accuracy = float((logits.argmax(1) == prepared.targets[validation]).mean())
        trial = {"trial": number, **params, "val_accuracy": accuracy, "seconds": round(time.monotonic() - started, 1)}
        if tracking is not None:
            trial["run_id"] = tracking.log_trial(
                parent_run_id=parent,
                params=params,
                history=history,
                metrics={"val_accuracy": accuracy},
                name=f"trial-{number}",
            )
        results.append(trial)
        log.info("trial %d: %s → validation accuracy %.4f", number, params, accuracy)
    best = max(results, key=lambda t: t["val_accuracy"])
    if tracking is not None:
        client.log_dict(parent, {"trials": results, "best": best}, "tune.json")
        client.log_metric(parent, "best_val_accuracy", best["val_accuracy"])
        for key in SEARCH_SPACE:
            client.log_param(parent, f"best_{key}", best[key])
        client.set_terminated(parent, "FINISHED")
    report = {
        "data": str(Path(data).resolve()),
        "trials": results,
        "best": best,
        "validation_offers": len(validation),
        "search_space": SEARCH_SPACE,
    }
    (work_dir / "tune.json").write_text(json.dumps(report, indent=1))
    return report
