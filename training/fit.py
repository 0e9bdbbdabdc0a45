"""Fitting stage of training: the text branches and head on cached image features, the lexical
model beside them, and label cleaning (K-fold out-of-sample predictions for cleanlab)."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch
from torch import nn

from core.decision import softmax
from core.lexical import LexicalModel
from core.model import FusionModel
from training.cleaning import find_issues, out_of_sample_probabilities
from training.features import Prepared
from training.history import season_balanced_weights
from training.lexical import fit_lexical
from training.options import INPUTS, TrainOptions
from training.progress import progress_bar

__all__ = ["fit_lexical_model", "fit_model", "lexical_scores", "predict_logits", "training_rows"]

log = logging.getLogger(__name__)


def fit_model(
    prepared: Prepared,
    options: TrainOptions,
    *,
    train_rows: np.ndarray,
    validation_rows: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    progress: bool = True,
    description: str = "training",
) -> tuple[FusionModel, list[dict]]:
    """Train text branches + head (backbone frozen) on ``train_rows``; per-epoch history."""
    torch.manual_seed(options.seed)
    device = prepared.device
    targets_all = torch.as_tensor(prepared.targets if targets is None else targets, device=device)
    config = dataclasses.replace(prepared.config, **options.network())  # tune varies the head's width and dropout
    model = FusionModel(config)  # seeded above: the same backbone init as the cached features
    if prepared.pretrained_weights is not None:
        model.load_imagenet_backbone(prepared.pretrained_weights)
    model.to(device)
    inputs = {name: tensor.to(device) for name, tensor in _ablated(prepared.inputs, options.inputs).items()}
    # Embedding tables are sparse: a step touches only the pieces of its batch (3-7x faster on CPU).
    sparse = [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    dense = [
        p
        for name, p in model.named_parameters()
        if not name.startswith("backbone.") and all(p is not q for q in sparse)
    ]
    tail = list(model.backbone[prepared.trunk_layer :].parameters())
    optimizers = [
        torch.optim.SparseAdam(sparse, lr=options.learning_rate),
        torch.optim.AdamW(dense, lr=options.learning_rate, weight_decay=options.weight_decay),
    ]
    if tail:  # pretrained blocks move more slowly than the fresh head
        optimizers.append(torch.optim.AdamW(tail, lr=options.learning_rate * 0.1, weight_decay=options.weight_decay))
    steps_per_epoch = int(np.ceil(len(train_rows) / options.batch_size))
    schedulers = [
        torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=options.learning_rate, total_steps=options.epochs * steps_per_epoch
        )
        for optimizer in optimizers
    ]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    generator = torch.Generator().manual_seed(options.seed)
    if options.season_balance:
        dates = prepared.frame["listed_at"].iloc[train_rows]
        sampling = torch.as_tensor(
            season_balanced_weights(dates, recent_weeks=options.recent_weeks, recent_share=options.recent_share)
        )
    train_rows_t = torch.as_tensor(train_rows)
    history = []
    bar = progress_bar(
        total=options.epochs * steps_per_epoch, desc=description, unit="step", disable=not progress, leave=False
    )
    for epoch in range(options.epochs):
        model.train()
        model.backbone.eval()
        if options.season_balance:
            order = train_rows_t[torch.multinomial(sampling, len(train_rows), replacement=True, generator=generator)]
        else:
            order = train_rows_t[torch.randperm(len(train_rows), generator=generator)]
        total_loss = 0.0
        for start in range(0, len(order), options.batch_size):  # BatchNorm statistics stay frozen
            idx = order[start : start + options.batch_size].to(device)
            keep_image = (torch.rand(len(idx), generator=generator) >= options.image_dropout).to(device)
            keep_mall = (torch.rand(len(idx), generator=generator) >= options.mall_dropout).to(device)
            batch = {name: tensor[idx] for name, tensor in inputs.items()}
            batch["has_image"] = batch["has_image"] * keep_image
            batch["mall_weight"] = batch["mall_weight"] * keep_mall
            logits = model.classify(_pooled(model, prepared, idx), **batch)
            loss = loss_fn(logits, targets_all[idx])
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss.backward()
            for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
                optimizer.step()
                scheduler.step()
            total_loss += loss.item() * len(idx)
            bar.update()
        record = {"epoch": epoch + 1, "train_loss": total_loss / len(order)}
        if validation_rows is not None and len(validation_rows):
            logits = predict_logits(model, prepared, validation_rows, inputs=options.inputs)
            record["val_accuracy"] = float((logits.argmax(1) == prepared.targets[validation_rows]).mean())
        history.append(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "epoch"})
    bar.close()
    model.eval()
    return model.cpu(), history


@torch.no_grad()
def predict_logits(model: FusionModel, prepared: Prepared, rows: np.ndarray, *, inputs=INPUTS) -> np.ndarray:
    """``(len(rows), K)`` logits of ``model`` on ``rows`` with the ablation's ``inputs`` only."""
    model.eval()
    device = next(model.parameters()).device
    features = _ablated(prepared.inputs, inputs)
    out = []
    for start in range(0, len(rows), 4096):
        idx = torch.as_tensor(rows[start : start + 4096])
        batch = {name: tensor[idx].to(device) for name, tensor in features.items()}
        out.append(model.classify(_pooled(model, prepared, idx.to(device)), **batch).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(prepared.labels)), dtype=np.float32)


def fit_lexical_model(
    prepared: Prepared,
    options: TrainOptions,
    *,
    rows: np.ndarray,
    targets: np.ndarray,
) -> LexicalModel:
    """The lexical model on ``rows`` (with ``targets`` ``(N_all,)``), reading what ``options.inputs`` allows."""
    titles, malls, weights = _lexical_inputs(prepared, rows, options.inputs)
    return fit_lexical(
        titles,
        malls,
        targets[rows],
        num_classes=len(prepared.labels),
        c=options.lexical_c,
        mall_weights=weights,
        seed=options.seed,
    )


def lexical_scores(lexical: LexicalModel, prepared: Prepared, rows: np.ndarray, *, inputs=INPUTS) -> np.ndarray:
    """``(len(rows), K)`` lexical scores of ``rows``, reading what ``inputs`` allows."""
    return lexical.scores(*_lexical_inputs(prepared, rows, inputs))


def _lexical_inputs(prepared: Prepared, rows: np.ndarray, inputs) -> tuple[list[str], list[str], np.ndarray]:
    titles = prepared.texts["title"].iloc[rows].tolist()
    if "mall" not in inputs:
        return titles, [""] * len(rows), np.zeros(len(rows), dtype=np.float32)
    return titles, prepared.texts["mall"].iloc[rows].tolist(), prepared.inputs["mall_weight"][rows].numpy()


def training_rows(
    prepared: Prepared, options: TrainOptions, *, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The training rows and their targets after the exclusion dictionary and label cleaning."""
    rows = prepared.split.train
    report: dict = {}
    if options.use_exclusions:
        rows = rows[~prepared.contradicted[rows]]
        report["dropped_by_exclusion_dictionary"] = int(len(prepared.split.train) - len(rows))
    targets = prepared.targets.copy()
    if options.cleaning == "off":
        return rows, targets, report

    def fit_predict(fit_part: np.ndarray, predict_part: np.ndarray) -> np.ndarray:
        model, _ = fit_model(
            prepared, options, train_rows=rows[fit_part], progress=progress, description="cleaning fold"
        )
        logits = predict_logits(model, prepared, rows[predict_part], inputs=options.inputs)
        return softmax(logits)

    started = time.monotonic()
    probabilities = out_of_sample_probabilities(
        fit_predict, len(rows), targets[rows], folds=options.cleaning_folds, seed=options.seed
    )
    issues = find_issues(targets[rows], probabilities)
    flagged = rows[issues.rows]
    report["cleaning"] = {
        "mode": options.cleaning,
        "folds": options.cleaning_folds,
        "flagged": len(flagged),
        "flagged_share": float(len(flagged) / max(1, len(rows))),
        "seconds": round(time.monotonic() - started, 1),
        "examples": [
            {
                "offer_id": prepared.frame["offer_id"].iloc[row],
                "title": prepared.frame["title"].iloc[row],
                "given": prepared.labels[given],
                "suggested": prepared.labels[suggested],
                "given_probability": round(float(confidence), 4),
            }
            for row, given, suggested, confidence in list(
                zip(flagged, issues.given, issues.suggested, issues.confidence, strict=True)
            )[:20]
        ],
    }
    log.info(
        "cleanlab flagged %d of %d training labels (%.2f%%); %s them",
        len(flagged),
        len(rows),
        100 * len(flagged) / max(1, len(rows)),
        "dropping" if options.cleaning == "drop" else "relabelling",
    )
    if options.cleaning == "drop":
        rows = np.setdiff1d(rows, flagged)
    else:
        targets[flagged] = issues.suggested
    return rows, targets, report


def _pooled(model: FusionModel, prepared: Prepared, idx: torch.Tensor) -> torch.Tensor:
    """``(len(idx), 1280)`` image features: the cached frozen trunk through the trainable tail."""
    device = next(model.parameters()).device
    trunk = prepared.trunk[idx.cpu()].to(device=device, dtype=torch.float32)
    return trunk if trunk.dim() == 2 else model.image_tail(trunk, prepared.trunk_layer)


def _ablated(inputs: dict[str, torch.Tensor], kept: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Inputs with the branches not in ``kept`` switched off (weight 0), as the ablation needs."""
    out = dict(inputs)
    if "image" not in kept:
        out["has_image"] = torch.zeros_like(inputs["has_image"])
    if "mall" not in kept:
        out["mall_weight"] = torch.zeros_like(inputs["mall_weight"])
    return out
