"""``catstream train``: labeled offers (a file or a history store) → model bundle.

Stages (each logged, the long ones with progress bars and an ETA):
label set from data (min count; rarer leaves excluded or rolled up to their parent) → split
(random, time or title group; test rows held out) → exclusion dictionary drops contradicted examples →
SentencePiece on the training text → per-shop trust in the mall category → featurise → frozen
MobileNetV2 features (cached on disk per image size) → optional cleanlab label cleaning on K-fold
out-of-sample probabilities → text branches + head trained on season-balanced samples →
lexical model (TF-IDF n-grams + linear SVM) whose scores are added to the network's logits, with
its weight chosen on held-out predictions → temperature and "uncertain" threshold on held-out
predictions → ONNX export with a parity check → bundle.

Calibration (``--calibration``): ``crossfit`` (the default, on every split) trains K
models, each without one fold of the training + validation offers (whole title groups on a group
split), and chooses temperature and threshold on all
their out-of-fold predictions — ten times as many offers as the validation part alone, so the
threshold no longer swings with a handful of validation errors — then trains the served model on
every one of those offers. It is the recipe retraining serves, so a time split measures what it
does on offers newer than all its training data. ``validation`` calibrates on the validation part
only (the newest training offers on a time split) and serves the model trained without them;
measured on Myntra's time split it is 1.5 points less accurate (README).
The lexical model is fitted alongside every fold model, so its weight, the temperature and the
threshold are all chosen on predictions of offers neither model saw.

The same code runs the ablation table and ``catstream tune``: :func:`prepare` does the expensive
part once, :func:`fit_model` trains one configuration on it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from catstream.bundle import BUNDLE_FORMAT, SHOPS_FILE, TrainingOffers
from catstream.decision import apply_exclusions, softmax
from catstream.dictionaries import PATH_SEPARATOR, Dictionaries
from catstream.features import Featurizer
from catstream.lexical import LEXICAL_DIR, LexicalModel
from catstream.model import BACKBONE_BLOCKS, FusionConfig, FusionModel, find_pretrained_weights
from catstream.offer_files import LABEL, offer_fingerprints, offers_from_frame, read_offer_file
from catstream.tokenizer import train_tokenizer
from training.calibration import (
    SEQUENCE_START_SHARE, choose_parent_threshold, choose_threshold, fit_temperature, operating_points,
)
from training.cleaning import CLEANING_MODES, find_issues, out_of_sample_probabilities
from training.export import check_parity, export_onnx
from training.history import HistoryStore, season_balanced_weights
from training.lexical import choose_lexical_weight, fit_lexical
from training.machine import describe_machine
from training.shops import estimate_shop_weights
from training.splits import Split, SplitSpec, assign_folds, split_offers, title_groups

__all__ = [
    "CALIBRATION_MODES", "DEFAULT_DICTIONARIES", "INPUTS", "RARE_LEAF_POLICIES", "Prepared", "TrainOptions",
    "calibrate", "calibrate_logits", "cross_fitted", "fit_lexical_model", "fit_model", "lexical_scores", "load_labeled",
    "predict_logits", "prepare", "progress_bar", "train_bundle",
]

log = logging.getLogger(__name__)

DEFAULT_DICTIONARIES = Path(__file__).resolve().parents[1] / "dictionaries"
INPUTS = ("title", "mall", "image")
RARE_LEAF_POLICIES = ("exclude", "parent")
THRESHOLD_UNITS = ("product", "offer")
CALIBRATION_MODES = ("crossfit", "validation")


@dataclass
class TrainOptions:
    """Options of one training run (all stored in the bundle's config.json and the MLflow run)."""

    label_columns: list[str]
    image_size: int = 96
    vocab_size: int = 20_000
    max_title_tokens: int = 32
    max_mall_tokens: int = 16
    char_buckets: int = 50_000  # hashed character n-grams of the title; 0 = none
    max_title_grams: int = 192
    min_label_count: int = 50
    rare_leaves: str = "exclude"  # or "parent": roll a rare leaf up to its first frequent ancestor
    split: str = "random"
    test_share: float = 0.2
    validation_share: float = 0.1
    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    finetune_blocks: int = 0  # last MobileNetV2 blocks trained; the frozen rest is computed once and cached
    image_dropout: float = 0.15  # share of training offers whose image is hidden
    mall_dropout: float = 0.1  # share whose mall category is hidden
    inputs: tuple[str, ...] = INPUTS  # the ablation turns branches off
    season_balance: bool = False  # measured: -0.4 points on a random split of Myntra (README, Model quality)
    recent_weeks: float = 4.0
    recent_share: float = 0.1
    cleaning: str = "off"  # off, drop, relabel; measured: dropping cost 0.1 points on Myntra (README)
    cleaning_folds: int = 4
    use_exclusions: bool = True  # drop contradicted examples in training; the mask at inference
    lexical: bool = True  # TF-IDF + linear SVM scores added to the logits; +0.06-0.17 points over 3 splits (README)
    lexical_c: float = 0.5  # the SVM's C
    lexical_weight: float | None = None  # None: chosen on held-out predictions
    shop_min_offers: int = 30
    target_precision: float = 0.995
    threshold_confidence: float = 0.95  # the target must hold at this confidence (Clopper-Pearson), 0: observed
    threshold_by: str = "product"  # the bound counts evidence by title group (colour variants share their fate), or "offer"
    calibration: str = "crossfit"  # or "validation" (module docstring)
    calibration_folds: int = 4
    seed: int = 0
    threads: int = 2
    device: str = "auto"
    pretrained: str | None = None
    use_pretrained: bool = True
    dictionaries: str = str(DEFAULT_DICTIONARIES)
    feature_cache: str | None = None  # default: ~/.cache/catstream/image-features
    model: dict = field(default_factory=dict)  # FusionConfig overrides (text_dim, fusion_hidden, dropout, …)

    def __post_init__(self):
        if self.rare_leaves not in RARE_LEAF_POLICIES:
            raise ValueError(f"rare_leaves must be one of {', '.join(RARE_LEAF_POLICIES)}")
        if self.cleaning not in CLEANING_MODES:
            raise ValueError(f"cleaning must be one of {', '.join(CLEANING_MODES)}")
        if self.calibration not in CALIBRATION_MODES:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATION_MODES)}")
        if not 0.0 <= self.threshold_confidence < 1.0:
            raise ValueError("threshold_confidence must be in [0, 1)")
        if self.threshold_by not in THRESHOLD_UNITS:
            raise ValueError(f"threshold_by must be one of {', '.join(THRESHOLD_UNITS)}")
        if self.calibration_folds < 2:
            raise ValueError("calibration_folds must be at least 2")
        unknown = set(self.inputs) - set(INPUTS)
        if unknown or "title" not in self.inputs:
            raise ValueError(f"inputs must include 'title' and be among {', '.join(INPUTS)}")
        self.inputs = tuple(self.inputs)
        self.split_spec  # validates

    @property
    def split_spec(self) -> SplitSpec:
        return SplitSpec(self.split, self.test_share, self.validation_share, self.seed)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class Prepared:
    """Everything a configuration is trained and judged on; built once by :func:`prepare`."""

    frame: pd.DataFrame  # the labeled offers kept, in split order of positions
    labels: tuple[str, ...]
    targets: np.ndarray  # (N,) class index
    split: Split
    inputs: dict[str, torch.Tensor]  # title_ids (N, T), mall_ids (N, M), has_image (N,), mall_weight (N,)
    texts: pd.DataFrame  # title, mall: the strings the text branches and the lexical model read (N rows)
    trunk: torch.Tensor  # (N, C, h, w) float16 output of the frozen backbone blocks, (N, 1280) pooled when all are frozen
    trunk_layer: int  # blocks before it; the blocks from here on are fine-tuned
    config: FusionConfig
    tokenizer_path: Path
    dictionaries: Dictionaries
    exclusion: np.ndarray  # (N, K) bool, the dictionary's mask per offer
    contradicted: np.ndarray  # (N,) bool, the label is excluded by the title's keywords
    shop_weights: dict[str, float]
    shop_table: pd.DataFrame
    report: dict
    pretrained_weights: Path | None
    device: torch.device


def progress_bar(*args, **kwargs) -> tqdm:
    """A tqdm bar that redraws at most every 10 s when stderr is not a terminal (CI, log files)."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 10.0)
    return tqdm(*args, **kwargs)


def load_labeled(data: str | Path, label_columns: list[str]) -> pd.DataFrame:
    """Labeled offers from an offer file or a history store directory (``catstream history add``)."""
    if HistoryStore.is_store(data):
        frame = HistoryStore(data).read()
        if LABEL not in frame.columns:
            raise ValueError(f"history store {data} has no label column")
        return frame[frame["title"] != ""].reset_index(drop=True)
    return read_offer_file(data, label_columns=label_columns)


def data_fingerprint(frame: pd.DataFrame) -> str:
    """Identifies the labeled rows (ids, titles, labels): evaluation checks it to rebuild the split."""
    digest = hashlib.sha256()
    for column in ("offer_id", "title", LABEL):
        digest.update("\x1f".join(frame[column].tolist()).encode())
    return digest.hexdigest()[:16]


def prepare(data: str | Path, out_dir: Path, options: TrainOptions, *, progress: bool = True) -> Prepared:
    """Read, select labels, split, tokenise, featurise and compute image features (cached)."""
    torch.manual_seed(options.seed)
    torch.set_num_threads(options.threads)
    device = _device(options.device)
    frame = load_labeled(data, options.label_columns)
    frame, report = select_labels(frame, options.min_label_count, options.rare_leaves)
    labels = tuple(sorted(frame[LABEL].unique()))
    if len(labels) < 2:
        raise ValueError(f"need at least 2 categories with >= {options.min_label_count} offers; found {len(labels)}")
    report["fingerprint"] = data_fingerprint(frame)
    split = split_offers(frame, options.split_spec)
    report |= {"train_offers": len(split.train), "validation_offers": len(split.validation),
               "test_offers": len(split.test), "categories": len(labels)}

    dictionaries = Dictionaries.load(options.dictionaries)
    exclusion = np.stack([dictionaries.exclusion_mask(t, labels) for t in frame["title"]]) if len(frame) else None
    targets = np.array([labels.index(label) for label in frame[LABEL]])
    contradicted = exclusion[np.arange(len(frame)), targets]
    report["contradicted_by_exclusion_dictionary"] = int(contradicted[split.train].sum())

    train_rows = frame.iloc[split.train]
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out_dir / "tokenizer.model"
    log.info("training SentencePiece (%d pieces) on %d training offers", options.vocab_size, len(train_rows))
    tokenizer = train_tokenizer(
        [dictionaries.strip_ambiguous(t) for t in pd.concat([train_rows["title"], train_rows["mall_category"]])],
        tokenizer_path,
        vocab_size=options.vocab_size,
    )
    shop_weights, shop_table = estimate_shop_weights(train_rows, min_offers=options.shop_min_offers, seed=options.seed)
    if len(shop_table):
        log.info("shop trust in own categories:\n%s", shop_table.to_string(index=False))
    config = FusionConfig(
        num_classes=len(labels),
        vocab_size=tokenizer.vocab_size,
        image_size=options.image_size,
        max_title_tokens=options.max_title_tokens,
        max_mall_tokens=options.max_mall_tokens,
        char_buckets=options.char_buckets,
        max_title_grams=options.max_title_grams if options.char_buckets else 0,
        **options.model,
    )
    featurizer = Featurizer(
        tokenizer=tokenizer, dictionaries=dictionaries, labels=labels, image_size=config.image_size,
        max_title_tokens=config.max_title_tokens, max_mall_tokens=config.max_mall_tokens,
        char_buckets=config.char_buckets, max_title_grams=config.max_title_grams,
    )
    weights = find_pretrained_weights(options.pretrained) if options.use_pretrained else None
    if weights is None:
        log.warning("no ImageNet MobileNetV2 weights%s: the image branch is randomly initialised "
                    "(see README, 'Pretrained weights'); text branches still learn",
                    "" if options.use_pretrained else " (--no-pretrained)")
    inputs, images, texts = _featurize(frame, featurizer, progress=progress)
    inputs["mall_weight"] = torch.tensor([shop_weights.get(m, 1.0) for m in frame["mall_id"]], dtype=torch.float32)
    trunk_layer = BACKBONE_BLOCKS - options.finetune_blocks
    trunk = _cached_image_trunk(frame, images, config, weights, trunk_layer, options, device, progress=progress)
    report["offers_without_usable_image"] = int((inputs["has_image"] == 0).sum())
    return Prepared(
        frame=frame, labels=labels, targets=targets, split=split, inputs=inputs, texts=texts, trunk=trunk,
        trunk_layer=trunk_layer, config=config,
        tokenizer_path=tokenizer_path, dictionaries=dictionaries, exclusion=exclusion, contradicted=contradicted,
        shop_weights=shop_weights, shop_table=shop_table, report=report, pretrained_weights=weights, device=device,
    )


def select_labels(frame: pd.DataFrame, min_count: int, policy: str = "exclude") -> tuple[pd.DataFrame, dict]:
    """The label set from data: categories with at least ``min_count`` offers.

    ``exclude`` drops offers of rarer leaves; ``parent`` relabels them with their nearest ancestor
    path that has ``min_count`` offers (counting the rolled-up offers), and drops them only when no
    ancestor qualifies. Both are counted in the returned report.
    """
    frame = frame[frame[LABEL] != ""].copy()
    counts = frame[LABEL].value_counts()
    rare = counts[counts < min_count]
    report = {
        "offers_read": int(len(frame)),
        "categories_seen": int(len(counts)),
        "rare_leaf_policy": policy,
        "rare_categories": int(len(rare)),
        "offers_in_rare_categories": int(rare.sum()),
    }
    if policy == "parent" and len(rare):
        original = frame[LABEL].copy()
        label = original.copy()
        while True:
            counts = label.value_counts()
            short = (label.map(counts) < min_count) & label.str.contains(PATH_SEPARATOR, regex=False)
            if not short.any():
                break
            label.loc[short] = label[short].str.rsplit(PATH_SEPARATOR, n=1).str[0]
        frame[LABEL] = label
        report["offers_rolled_up_to_parent"] = int((label != original).sum())
    counts = frame[LABEL].value_counts()
    kept = counts[counts >= min_count].index
    out = frame[frame[LABEL].isin(kept)].reset_index(drop=True)
    report["offers_excluded"] = int(len(frame) - len(out))
    report["categories_kept"] = int(len(kept))
    return out, report


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
    config = dataclasses.replace(prepared.config, **options.model)  # tune varies the head's width and dropout
    model = FusionModel(config)  # seeded above: the same backbone init as the cached features
    if prepared.pretrained_weights is not None:
        model.load_imagenet_backbone(prepared.pretrained_weights)
    model.to(device)
    inputs = {name: tensor.to(device) for name, tensor in _ablated(prepared.inputs, options.inputs).items()}
    # Embedding tables are sparse: a step touches only the pieces of its batch (3-7x faster on CPU).
    sparse = [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    dense = [p for name, p in model.named_parameters()
             if not name.startswith("backbone.") and all(p is not q for q in sparse)]
    tail = list(model.backbone[prepared.trunk_layer:].parameters())
    optimizers = [torch.optim.SparseAdam(sparse, lr=options.learning_rate),
                  torch.optim.AdamW(dense, lr=options.learning_rate, weight_decay=options.weight_decay)]
    if tail:  # pretrained blocks move more slowly than the fresh head
        optimizers.append(torch.optim.AdamW(tail, lr=options.learning_rate * 0.1, weight_decay=options.weight_decay))
    steps_per_epoch = int(np.ceil(len(train_rows) / options.batch_size))
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=options.learning_rate, total_steps=options.epochs * steps_per_epoch
    ) for optimizer in optimizers]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    generator = torch.Generator().manual_seed(options.seed)
    if options.season_balance:
        dates = prepared.frame["listed_at"].iloc[train_rows]
        sampling = torch.as_tensor(season_balanced_weights(
            dates, recent_weeks=options.recent_weeks, recent_share=options.recent_share))
    train_rows_t = torch.as_tensor(train_rows)
    history = []
    bar = progress_bar(total=options.epochs * steps_per_epoch, desc=description, unit="step", disable=not progress,
                       leave=False)
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
            logits = model.classify(
                _pooled(model, prepared, idx), inputs["has_image"][idx] * keep_image, inputs["title_ids"][idx],
                inputs["mall_ids"][idx], inputs["mall_weight"][idx] * keep_mall, inputs["title_grams"][idx],
            )
            loss = loss_fn(logits, targets_all[idx])
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss.backward()
            for optimizer, scheduler in zip(optimizers, schedulers):
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
        out.append(model.classify(
            _pooled(model, prepared, idx.to(device)), features["has_image"][idx].to(device), features["title_ids"][idx].to(device),
            features["mall_ids"][idx].to(device), features["mall_weight"][idx].to(device),
            features["title_grams"][idx].to(device),
        ).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(prepared.labels)), dtype=np.float32)


def fit_lexical_model(prepared: Prepared, options: TrainOptions, *, rows: np.ndarray, targets: np.ndarray,
                      ) -> LexicalModel:
    """The lexical model on ``rows`` (with ``targets`` ``(N_all,)``), reading what ``options.inputs`` allows."""
    titles, malls, weights = _lexical_inputs(prepared, rows, options.inputs)
    return fit_lexical(titles, malls, targets[rows], num_classes=len(prepared.labels), c=options.lexical_c,
                       mall_weights=weights, seed=options.seed)


def lexical_scores(lexical: LexicalModel, prepared: Prepared, rows: np.ndarray, *, inputs=INPUTS) -> np.ndarray:
    """``(len(rows), K)`` lexical scores of ``rows``, reading what ``inputs`` allows."""
    return lexical.scores(*_lexical_inputs(prepared, rows, inputs))


def _lexical_inputs(prepared: Prepared, rows: np.ndarray, inputs) -> tuple[list[str], list[str], np.ndarray]:
    titles = prepared.texts["title"].iloc[rows].tolist()
    if "mall" not in inputs:
        return titles, [""] * len(rows), np.zeros(len(rows), dtype=np.float32)
    return titles, prepared.texts["mall"].iloc[rows].tolist(), prepared.inputs["mall_weight"][rows].numpy()


def training_rows(prepared: Prepared, options: TrainOptions, *, progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
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
        model, _ = fit_model(prepared, options, train_rows=rows[fit_part], progress=progress,
                             description="cleaning fold")
        logits = predict_logits(model, prepared, rows[predict_part], inputs=options.inputs)
        return _softmax(logits)

    started = time.monotonic()
    probabilities = out_of_sample_probabilities(fit_predict, len(rows), targets[rows],
                                                folds=options.cleaning_folds, seed=options.seed)
    issues = find_issues(targets[rows], probabilities)
    flagged = rows[issues.rows]
    report["cleaning"] = {
        "mode": options.cleaning,
        "folds": options.cleaning_folds,
        "flagged": int(len(flagged)),
        "flagged_share": float(len(flagged) / max(1, len(rows))),
        "seconds": round(time.monotonic() - started, 1),
        "examples": [
            {"offer_id": prepared.frame["offer_id"].iloc[row], "title": prepared.frame["title"].iloc[row],
             "given": prepared.labels[given], "suggested": prepared.labels[suggested],
             "given_probability": round(float(confidence), 4)}
            for row, given, suggested, confidence in
            list(zip(flagged, issues.given, issues.suggested, issues.confidence))[:20]
        ],
    }
    log.info("cleanlab flagged %d of %d training labels (%.2f%%); %s them", len(flagged), len(rows),
             100 * len(flagged) / max(1, len(rows)), "dropping" if options.cleaning == "drop" else "relabelling")
    if options.cleaning == "drop":
        rows = np.setdiff1d(rows, flagged)
    else:
        targets[flagged] = issues.suggested
    return rows, targets, report


def calibrate(model: FusionModel, prepared: Prepared, options: TrainOptions, *, train_rows: np.ndarray,
              targets: np.ndarray) -> tuple[LexicalModel | None, dict]:
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


def _lexical_weight(logits: np.ndarray, scores: np.ndarray, prepared: Prepared, rows: np.ndarray,
                    options: TrainOptions) -> tuple[float, dict]:
    """``options.lexical_weight``, or the weight most accurate on these held-out ``rows``."""
    exclusion = prepared.exclusion[rows] if options.use_exclusions else None
    chosen, accuracy = choose_lexical_weight(logits, scores, prepared.targets[rows], exclusion=exclusion)
    weight = chosen if options.lexical_weight is None else float(options.lexical_weight)
    log.info("lexical model weight %.2f (held-out accuracy by weight: %s)", weight,
             ", ".join(f"{w:g}: {a:.4f}" for w, a in accuracy.items()))
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
        logits, targets, temperature=temperature, target_precision=options.target_precision,
        confidence=options.threshold_confidence, exclusion=exclusion, groups=groups,
    )
    served, _ = apply_exclusions(softmax(logits, temperature), exclusion)
    parent = choose_parent_threshold(
        served, targets, prepared.labels, leaf_threshold=chosen.threshold, target_precision=options.target_precision,
        confidence=options.threshold_confidence, groups=groups,
    )
    # What other leaf thresholds would give, for an operator who overrides the chosen one
    points = operating_points(served, targets, prepared.labels, target_precision=options.target_precision,
                              confidence=options.threshold_confidence, groups=groups)
    return {"temperature": temperature, "threshold": chosen.threshold, "coverage": chosen.coverage,
            "precision": chosen.precision, "precision_bound": chosen.precision_bound,
            "design_effect": chosen.design_effect, "target_reached": chosen.target_reached,
            "tested_from": chosen.tested_from,
            "parent_threshold": parent.threshold,
            "parents": {"uncertain": parent.uncertain, "answered": parent.answered, "precision": parent.precision,
                        "precision_bound": parent.precision_bound, "design_effect": parent.design_effect,
                        "target_reached": parent.threshold is not None},
            "operating_points": [point.to_dict() for point in points],
            "accuracy": float((logits.argmax(1) == targets).mean()), "offers": int(len(rows))}


def cross_fitted(
    prepared: Prepared, options: TrainOptions, *, train_rows: np.ndarray, targets: np.ndarray, progress: bool = True,
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
            prepared, options, train_rows=fold_rows, validation_rows=held, targets=targets,
            progress=progress, description=f"calibration fold {fold + 1}/{options.calibration_folds}",
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
        calibration["fold_title_groups"] = int(len(np.unique(groups)))
    if lexical_report:
        calibration["lexical"] = lexical_report
    model, history = fit_model(prepared, options, train_rows=fit_rows, targets=targets, progress=progress,
                               description="training on all folds")
    for epoch, record in enumerate(history):
        record["val_accuracy"] = float(np.mean([fold[epoch]["val_accuracy"] for fold in fold_histories]))
    lexical = (fit_lexical_model(prepared, options, rows=fit_rows, targets=targets).reweighted(weight)
               if options.lexical and weight else None)
    return model, lexical, history, calibration


def train_bundle(data: str | Path, out_dir: str | Path, options: TrainOptions, *, progress: bool = True) -> dict:
    """Train on ``data`` and write a bundle to ``out_dir``; returns the config written."""
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
        model, lexical, history, calibration = cross_fitted(prepared, options, train_rows=rows, targets=targets,
                                                            progress=progress)
    else:
        model, history = fit_model(prepared, options, train_rows=rows, validation_rows=prepared.split.validation,
                                   targets=targets, progress=progress)
        lexical, calibration = calibrate(model, prepared, options, train_rows=rows, targets=targets)
    stages["fit"] = time.monotonic() - clock
    temperature, threshold = calibration["temperature"], calibration["threshold"]
    log.info("%s accuracy %.4f on %d offers; temperature %.2f; threshold %.3f → coverage %.3f at precision %.4f "
             "(%.0f%% lower bound %.4f counted by %s; design effect %.1f)",
             "out-of-fold" if options.calibration == "crossfit" else "validation",
             calibration["accuracy"], calibration["offers"], temperature, threshold, calibration["coverage"],
             calibration["precision"], 100 * options.threshold_confidence, calibration["precision_bound"],
             options.threshold_by, calibration["design_effect"])
    parents = calibration["parents"]
    if parents["target_reached"]:
        log.info("parent threshold %.4f: %d of the %d uncertain offers filed under a parent category at precision "
                 "%.4f (lower bound %.4f)", calibration["parent_threshold"], parents["answered"], parents["uncertain"],
                 parents["precision"], parents["precision_bound"])
    elif not parents["uncertain"]:
        log.info("the threshold leaves none of the %d held-out offers uncertain, so no parent threshold can be chosen: "
                 "the model will name no parent category for uncertain offers", calibration["offers"])
    else:
        log.warning("no parent threshold reaches the target precision %.4f on the %d uncertain offers (candidates "
                    "tested strictest first, from the one filing %.0f%% of them): the model will name no parent "
                    "category for uncertain offers", options.target_precision, parents["uncertain"],
                    100 * SEQUENCE_START_SHARE)
    if not calibration["target_reached"]:
        log.warning("no threshold reaches the target precision %.4f on these %d offers (their accuracy %.4f; the "
                    "thresholds are tested strictest first, from the one accepting %.0f%% of them): the threshold "
                    "%.3f has the best lower bound, %.4f, at coverage %.3f. Either the labels are noisier than the "
                    "target allows or there are too few offers to show it; see --target-precision, --cleaning and "
                    "`catstream audit`", options.target_precision, calibration["offers"], calibration["accuracy"],
                    100 * SEQUENCE_START_SHARE, threshold, calibration["precision_bound"], calibration["coverage"])

    clock = time.monotonic()
    export_onnx(model, out_dir / "model.onnx")
    parity = check_parity(model, out_dir / "model.onnx")
    stages["export"] = time.monotonic() - clock
    torch.save(model.state_dict(), out_dir / "model.pt")
    shutil.rmtree(out_dir / LEXICAL_DIR, ignore_errors=True)  # a stale one from an earlier run must not serve
    if lexical is not None:
        lexical.save(out_dir / LEXICAL_DIR)
    if options.use_exclusions:
        shutil.copytree(options.dictionaries, out_dir / "dictionaries", dirs_exist_ok=True)
    else:  # the ablation without the dictionary must serve without its mask too
        (out_dir / "dictionaries").mkdir(exist_ok=True)
        for name in ("ambiguous_terms.tsv",):
            if (Path(options.dictionaries) / name).is_file():
                shutil.copy(Path(options.dictionaries) / name, out_dir / "dictionaries" / name)
    seen = prepared.frame.iloc[np.sort(np.concatenate([prepared.split.train, prepared.split.validation]))]
    TrainingOffers.save(out_dir, seen["offer_id"].tolist(), offer_fingerprints(seen))
    (out_dir / "labels.json").write_text(json.dumps(list(prepared.labels), ensure_ascii=False, indent=1))
    (out_dir / SHOPS_FILE).write_text(json.dumps({
        "default": 1.0, "weights": prepared.shop_weights,
        "evidence": prepared.shop_table.to_dict(orient="records"),
    }, indent=1))

    digest = hashlib.sha256((out_dir / "model.onnx").read_bytes()).hexdigest()[:12]
    bundle_config = {
        "bundle_format": BUNDLE_FORMAT,
        "model_version": f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{digest}",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model.config.to_dict(),
        "threshold": threshold,
        "parent_threshold": calibration["parent_threshold"],
        "temperature": temperature,
        "operating_points": calibration["operating_points"],
        "pretrained_image_weights": str(prepared.pretrained_weights) if prepared.pretrained_weights else None,
        "training": {
            "data": str(Path(data).resolve()),
            "options": options.to_dict(),
            "split": options.split_spec.to_dict(),
            "data_report": prepared.report | cleaning_report,
            "history": history,
            "validation": {k: calibration[k]
                           for k in ("accuracy", "coverage", "precision", "precision_bound", "design_effect",
                                     "target_reached", "tested_from", "parents")},
            "calibration": {"mode": options.calibration, "offers": calibration["offers"], "folds": calibration.get("folds"),
                            "threshold_confidence": options.threshold_confidence, "threshold_by": options.threshold_by}
                           | {k: calibration[k] for k in ("fold_title_groups",) if k in calibration},
            "lexical": (calibration.get("lexical", {}) | {"features": lexical.num_features if lexical else 0}
                        if options.lexical else None),
            "onnx_parity_max_abs_diff": parity,
            "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
            "seconds": round(time.monotonic() - started, 1),
            "device": str(prepared.device),
            "threads": options.threads,
            "machine": describe_machine(),
        },
    }
    (out_dir / "config.json").write_text(json.dumps(bundle_config, ensure_ascii=False, indent=2, default=str))
    return bundle_config


def _pooled(model: FusionModel, prepared: Prepared, idx: torch.Tensor) -> torch.Tensor:
    """``(len(idx), 1280)`` image features: the cached frozen trunk through the trainable tail."""
    device = next(model.parameters()).device
    trunk = prepared.trunk[idx.cpu()].to(device=device, dtype=torch.float32)
    return trunk if trunk.dim() == 2 else model.image_tail(trunk, prepared.trunk_layer)


def _device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _ablated(inputs: dict[str, torch.Tensor], kept: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Inputs with the branches not in ``kept`` switched off (weight 0), as the ablation needs."""
    out = dict(inputs)
    if "image" not in kept:
        out["has_image"] = torch.zeros_like(inputs["has_image"])
    if "mall" not in kept:
        out["mall_weight"] = torch.zeros_like(inputs["mall_weight"])
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _featurize(frame: pd.DataFrame, featurizer: Featurizer, *,
               progress: bool) -> tuple[dict[str, torch.Tensor], np.ndarray, pd.DataFrame]:
    n, size = len(frame), featurizer.image_size
    images = np.zeros((n, 3, size, size), dtype=np.uint8)
    has_image = np.zeros(n, dtype=np.float32)
    titles = np.zeros((n, featurizer.max_title_tokens), dtype=np.int64)
    malls = np.zeros((n, featurizer.max_mall_tokens), dtype=np.int64)
    grams = np.zeros((n, featurizer.max_title_grams), dtype=np.int64)
    texts = []
    offers = offers_from_frame(frame)
    for i, offer in enumerate(progress_bar(offers, total=n, desc="featurising", unit="offer", disable=not progress)):
        titles[i], malls[i], grams[i] = featurizer.text_ids(offer.title, offer.mall_category)
        texts.append(featurizer.texts(offer.title, offer.mall_category))
        images[i], used, _ = featurizer.image(offer)
        has_image[i] = used
    inputs = {
        "has_image": torch.from_numpy(has_image),
        "title_ids": torch.from_numpy(titles),
        "mall_ids": torch.from_numpy(malls),
        "title_grams": torch.from_numpy(grams),
    }
    return inputs, images, pd.DataFrame(texts, columns=["title", "mall"], index=frame.index)


def _cached_image_trunk(
    frame: pd.DataFrame, images: np.ndarray, config: FusionConfig, weights: Path | None, layer: int,
    options: TrainOptions, device: torch.device, *, progress: bool,
) -> torch.Tensor:
    """Outputs of the frozen first ``layer`` backbone blocks for every image (float16), cached on disk."""
    digest = hashlib.sha256(images.tobytes())
    digest.update(f"{config.image_size}|{layer}|{weights.name if weights else 'random'}|{options.seed}".encode())
    cache_dir = Path(options.feature_cache or Path.home() / ".cache" / "catstream" / "image-features")
    cache = cache_dir / f"{digest.hexdigest()[:24]}.npy"
    if cache.is_file():
        log.info("image trunk features from cache %s", cache)
        return torch.from_numpy(np.load(cache))
    torch.manual_seed(options.seed)  # fit_model rebuilds the same (random or pretrained) backbone
    model = FusionModel(config)
    if weights is not None:
        model.load_imagenet_backbone(weights)
        log.info("image branch starts from ImageNet weights %s", weights)
    model.to(device).eval()
    chunks = []
    batch = 256 if device.type == "cuda" else 64
    with torch.no_grad():
        for start in progress_bar(range(0, len(images), batch), desc="image features", unit="batch",
                                  disable=not progress):
            chunk = torch.from_numpy(images[start : start + batch]).to(device).contiguous(memory_format=torch.channels_last)
            # a fully frozen backbone needs only the pooled features, not the last feature map
            out = model.image_features(chunk) if layer == BACKBONE_BLOCKS else model.image_trunk(chunk, layer)
            chunks.append(out.to(torch.float16).cpu().contiguous())
    trunk = torch.cat(chunks)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(temporary, trunk.numpy())
        temporary.replace(cache)
    except OSError as error:
        log.warning("could not cache image features in %s: %s", cache_dir, error)
    return trunk
