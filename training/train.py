"""``catstream train``: offers file → model bundle.

Steps: label set from data (min count) → drop examples the exclusion dictionary contradicts →
train/validation split → SentencePiece on training text → features → frozen MobileNetV2
features computed once → text branches + head trained → temperature and "uncertain" threshold
chosen on validation → ONNX export with a parity check → bundle written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from catstream.bundle import BUNDLE_FORMAT
from catstream.dictionaries import Dictionaries
from catstream.features import Featurizer
from catstream.model import FusionConfig, FusionModel, find_pretrained_weights
from catstream.offer_files import LABEL, offers_from_frame, read_offer_file
from catstream.tokenizer import train_tokenizer
from training.calibration import choose_threshold, fit_temperature
from training.export import check_parity, export_onnx

__all__ = ["DEFAULT_DICTIONARIES", "TrainOptions", "train_bundle"]

log = logging.getLogger(__name__)

DEFAULT_DICTIONARIES = Path(__file__).resolve().parents[1] / "dictionaries"


@dataclass
class TrainOptions:
    """Options of one training run (all stored in the bundle's config.json)."""

    label_columns: list[str]
    image_size: int = 224
    vocab_size: int = 20_000
    max_title_tokens: int = 32
    max_mall_tokens: int = 16
    min_label_count: int = 5
    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    image_dropout: float = 0.15
    validation_share: float = 0.1
    target_precision: float = 0.98
    seed: int = 0
    threads: int = 2
    pretrained: str | None = None
    use_pretrained: bool = True
    dictionaries: str = str(DEFAULT_DICTIONARIES)
    model: dict = field(default_factory=dict)  # FusionConfig overrides


def train_bundle(data: str | Path, out_dir: str | Path, options: TrainOptions, *, progress: bool = True) -> dict:
    """Train on ``data`` and write a bundle to ``out_dir``; returns the config written."""
    started = time.monotonic()
    torch.manual_seed(options.seed)
    torch.set_num_threads(options.threads)
    rng = np.random.default_rng(options.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    frame = read_offer_file(data, label_columns=options.label_columns)
    frame, data_report = _select_labels(frame, options.min_label_count)
    dictionaries = Dictionaries.load(options.dictionaries)
    labels = tuple(sorted(frame[LABEL].unique()))
    contradicted = np.array([
        dictionaries.exclusion_mask(title, labels)[labels.index(label)]
        for title, label in zip(frame["title"], frame[LABEL])
    ], dtype=bool)
    frame = frame[~contradicted].reset_index(drop=True)
    data_report["dropped_by_exclusion_dictionary"] = int(contradicted.sum())
    if len(labels) < 2:
        raise ValueError(f"need at least 2 categories with >= {options.min_label_count} offers; found {len(labels)}")

    order = rng.permutation(len(frame))
    n_val = max(len(labels), int(len(frame) * options.validation_share))
    val_index, train_index = order[:n_val], order[n_val:]
    data_report |= {"train_offers": len(train_index), "validation_offers": len(val_index), "categories": len(labels)}
    log.info("data: %s", data_report)

    tokenizer_path = out_dir / "tokenizer.model"
    train_rows = frame.iloc[train_index]
    tokenizer = train_tokenizer(
        [dictionaries.strip_ambiguous(t) for t in pd.concat([train_rows["title"], train_rows["mall_category"]])],
        tokenizer_path,
        vocab_size=options.vocab_size,
    )
    config = FusionConfig(
        num_classes=len(labels),
        vocab_size=tokenizer.vocab_size,
        image_size=options.image_size,
        max_title_tokens=options.max_title_tokens,
        max_mall_tokens=options.max_mall_tokens,
        **options.model,
    )
    featurizer = Featurizer(
        tokenizer=tokenizer, dictionaries=dictionaries, labels=labels, image_size=config.image_size,
        max_title_tokens=config.max_title_tokens, max_mall_tokens=config.max_mall_tokens,
    )
    inputs = _featurize(frame, featurizer, progress=progress)
    targets = torch.tensor([labels.index(label) for label in frame[LABEL]])

    model = FusionModel(config)
    weights = find_pretrained_weights(options.pretrained) if options.use_pretrained else None
    if weights is not None:
        model.load_imagenet_backbone(weights)
        log.info("image branch starts from ImageNet weights %s", weights)
    else:
        log.warning("no ImageNet MobileNetV2 weights found locally: the image branch is randomly initialised "
                    "(see README, 'Pretrained weights'); text branches still learn")
    pooled = _backbone_features(model, inputs["image"], progress=progress)

    history = _fit(model, pooled, inputs, targets, train_index, val_index, options, progress=progress)
    model.eval()
    with torch.no_grad():
        val_logits = model.classify(pooled[val_index], inputs["has_image"][val_index],
                                    inputs["title_ids"][val_index], inputs["mall_ids"][val_index]).numpy()
    val_targets = targets[val_index].numpy()
    temperature = fit_temperature(val_logits, val_targets)
    threshold, coverage, precision = choose_threshold(
        val_logits, val_targets, temperature=temperature, target_precision=options.target_precision
    )
    val_accuracy = float((val_logits.argmax(1) == val_targets).mean())
    log.info("validation accuracy %.4f; temperature %.2f; threshold %.3f → coverage %.3f at precision %.4f",
             val_accuracy, temperature, threshold, coverage, precision)

    export_started = time.monotonic()
    export_onnx(model, out_dir / "model.onnx")
    parity = check_parity(model, out_dir / "model.onnx")
    torch.save(model.state_dict(), out_dir / "model.pt")
    shutil.copytree(options.dictionaries, out_dir / "dictionaries", dirs_exist_ok=True)
    (out_dir / "labels.json").write_text(json.dumps(list(labels), ensure_ascii=False, indent=1))

    digest = hashlib.sha256((out_dir / "model.onnx").read_bytes()).hexdigest()[:12]
    bundle_config = {
        "bundle_format": BUNDLE_FORMAT,
        "model_version": f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{digest}",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": config.to_dict(),
        "threshold": threshold,
        "temperature": temperature,
        "pretrained_image_weights": str(weights) if weights else None,
        "training": {
            "data": str(Path(data).resolve()),
            "options": {k: v for k, v in options.__dict__.items()},
            "data_report": data_report,
            "history": history,
            "validation": {"accuracy": val_accuracy, "coverage": coverage, "precision": precision},
            "onnx_parity_max_abs_diff": parity,
            "export_seconds": time.monotonic() - export_started,
            "seconds": time.monotonic() - started,
        },
    }
    (out_dir / "config.json").write_text(json.dumps(bundle_config, ensure_ascii=False, indent=2))
    return bundle_config


def _select_labels(frame: pd.DataFrame, min_count: int) -> tuple[pd.DataFrame, dict]:
    """Keep categories with at least ``min_count`` offers; rarer leaves are excluded and counted."""
    frame = frame[frame[LABEL] != ""]
    counts = frame[LABEL].value_counts()
    kept = counts[counts >= min_count].index
    report = {
        "offers_read": int(len(frame)),
        "categories_seen": int(len(counts)),
        "rare_categories_excluded": int(len(counts) - len(kept)),
        "offers_in_rare_categories": int(counts[counts < min_count].sum()),
    }
    return frame[frame[LABEL].isin(kept)].reset_index(drop=True), report


def _featurize(frame: pd.DataFrame, featurizer: Featurizer, *, progress: bool) -> dict[str, torch.Tensor]:
    n, size = len(frame), featurizer.image_size
    images = np.zeros((n, 3, size, size), dtype=np.uint8)
    has_image = np.zeros(n, dtype=np.float32)
    titles = np.zeros((n, featurizer.max_title_tokens), dtype=np.int64)
    malls = np.zeros((n, featurizer.max_mall_tokens), dtype=np.int64)
    offers = offers_from_frame(frame)
    for i, offer in enumerate(tqdm(offers, total=n, desc="featurising", unit="offer", disable=not progress)):
        titles[i], malls[i] = featurizer.text_ids(offer.title, offer.mall_category)
        images[i], used, _ = featurizer.image(offer)
        has_image[i] = used
    return {
        "image": torch.from_numpy(images),
        "has_image": torch.from_numpy(has_image),
        "title_ids": torch.from_numpy(titles),
        "mall_ids": torch.from_numpy(malls),
    }


@torch.no_grad()
def _backbone_features(model: FusionModel, images: torch.Tensor, *, progress: bool, batch: int = 64) -> torch.Tensor:
    """Pooled MobileNetV2 features of every image, computed once (the backbone stays frozen)."""
    model.eval()
    chunks = []
    for start in tqdm(range(0, len(images), batch), desc="image features", unit="batch", disable=not progress):
        chunk = images[start : start + batch].contiguous(memory_format=torch.channels_last)
        chunks.append(model.image_features(chunk))
    return torch.cat(chunks)


def _fit(model, pooled, inputs, targets, train_index, val_index, options: TrainOptions, *, progress: bool) -> list:
    trainable = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    optimizer = torch.optim.AdamW(trainable, lr=options.learning_rate, weight_decay=options.weight_decay)
    steps = options.epochs * int(np.ceil(len(train_index) / options.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=options.learning_rate, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    generator = torch.Generator().manual_seed(options.seed)
    train_index = torch.as_tensor(train_index)
    history = []
    bar = tqdm(total=steps, desc="training", unit="step", disable=not progress)
    for epoch in range(options.epochs):
        model.train()
        model.backbone.eval()
        shuffled = train_index[torch.randperm(len(train_index), generator=generator)]
        total_loss = 0.0
        for start in range(0, len(shuffled), options.batch_size):
            idx = shuffled[start : start + options.batch_size]
            has_image = inputs["has_image"][idx]
            # Image dropout: the model must stay good when an offer's image is missing.
            has_image = has_image * (torch.rand(len(idx), generator=generator) >= options.image_dropout)
            logits = model.classify(pooled[idx], has_image, inputs["title_ids"][idx], inputs["mall_ids"][idx])
            loss = loss_fn(logits, targets[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
            bar.update()
        model.eval()
        with torch.no_grad():
            val_logits = model.classify(pooled[val_index], inputs["has_image"][val_index],
                                        inputs["title_ids"][val_index], inputs["mall_ids"][val_index])
        val_accuracy = float((val_logits.argmax(1) == targets[val_index]).float().mean())
        record = {"epoch": epoch + 1, "train_loss": total_loss / len(train_index), "val_accuracy": val_accuracy}
        history.append(record)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_acc=f"{val_accuracy:.3f}")
    bar.close()
    return history
