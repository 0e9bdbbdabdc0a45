"""Training the offer embedder (:mod:`core.embedder`) by metric learning on labeled offers.

- Products: a product is a title group (:func:`training.splits.title_groups`: a title's words
  without colour words), so colour variants and repeated listings are positives.
- Split: by group, so the products the embedder is judged on are products it never saw.
- Losses, per batch of offers drawn as pairs from the same product:
  - image–title contrast (CLIP's InfoNCE, both directions), every offer of the same product a
    positive. This puts words in the image space: the query tower is the text tower.
  - product contrast within each space (image–image, title–title), the same positives.
  - a normalised-softmax category loss on both spaces (cosine to one learned proxy per leaf),
    which keeps a leaf's offers together for the similar-products search.
- Image input: the pooled features of the frozen ImageNet MobileNetV2, the same features the
  classifier's graph computes, cached on disk like training's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as functional
from torch import nn

from core.bundle import ModelBundle
from core.embedder import Embedder, EmbedderConfig
from core.features import Featurizer
from core.images import ImagePolicy
from core.model import BACKBONE_BLOCKS, find_pretrained_weights
from core.offer_files import LABEL, offers_from_frame
from training.data import data_fingerprint, load_labeled
from training.features import cached_image_trunk
from training.options import TrainOptions
from training.progress import progress_bar
from training.splits import Split, SplitSpec, split_offers, title_groups

__all__ = [
    "EMBEDDER_DIR",
    "EmbedderOptions",
    "EmbeddingData",
    "embed_offers",
    "embed_queries",
    "fit_embedder",
    "load_embedder",
    "prepare_embedding_data",
    "save_embedder",
]

log = logging.getLogger(__name__)

EMBEDDER_DIR = "embedder"  # inside a model bundle
ATTRIBUTE_COLUMNS = ("gender", "base_colour", "article_type")


@dataclass(frozen=True)
class EmbedderOptions:
    """How the embedder is trained. Every field is a ``train-embedder`` flag of the same name."""

    dim: int = 128  # per space; the fused vector has twice this
    epochs: int = 8
    batch_pairs: int = 256  # offers per batch, each with one other offer of its product
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    category_weight: float = 0.5  # the category loss against the two contrastive ones
    category_scale: float = 16.0  # normalised-softmax scale (cosine logits times this)
    product_temperature: float = 0.05
    clip_positives: str = "offer"  # image-title pairs: "offer" (its own picture) or "product" (any listing)
    test_share: float = 0.2
    validation_share: float = 0.1
    seed: int = 0
    threads: int = 2


@dataclass
class EmbeddingData:
    """Offers featurised once for training and evaluating embedders."""

    frame: pd.DataFrame  # offer_id, title, brand, label, listed_at, base_colour, gender, article_type, ...
    categories: np.ndarray  # (N,) leaf index into ``leaves``
    leaves: tuple[str, ...]
    groups: np.ndarray  # (N,) product (title group)
    split: Split  # by group
    title_ids: torch.Tensor  # (N, T) int64
    title_grams: torch.Tensor | None  # (N, G) int64, None when the tokenizer setup has no n-grams
    has_image: torch.Tensor  # (N,) float32
    image_features: torch.Tensor  # (N, 1280) float32, frozen ImageNet MobileNetV2, pooled
    image_sha: list[str | None]  # SHA-256 of the image bytes, None without an image
    vocab_size: int  # of the tokenizer that made ``title_ids``
    char_buckets: int  # of the hashing that made ``title_grams`` (0 without them)
    featurizer: Featurizer | None = None  # turns free text into the same inputs; None for planted data
    bundle: ModelBundle | None = None  # the classifier whose tokenizer and backbone these come from

    def texts_to_ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Free text (queries, rewritten titles) as the text tower reads it."""
        if self.featurizer is None:
            raise ValueError("these offers were not featurised from text, so free text cannot be embedded")
        ids, grams = [], []
        for text in texts:
            title_ids, _, title_grams = self.featurizer.text_ids(text, None)
            ids.append(title_ids)
            grams.append(title_grams)
        stacked_grams = torch.from_numpy(np.stack(grams)) if self.title_grams is not None else None
        return torch.from_numpy(np.stack(ids)), stacked_grams


def prepare_embedding_data(
    data: str | Path,
    bundle_path: str | Path,
    *,
    options: EmbedderOptions = EmbedderOptions(),
    feature_cache: str | Path | None = None,
    progress: bool = True,
) -> EmbeddingData:
    """Read labeled offers, split them by product, featurise titles with the classifier bundle's
    tokenizer and compute the frozen backbone's image features (cached)."""
    torch.set_num_threads(options.threads)
    bundle = ModelBundle.load(bundle_path)
    model_config = bundle.config.model
    # The classifier's taxonomy; attribute columns (gender, colour, article type) feed the
    # cold-start queries of the evaluation when the file has them.
    frame = load_labeled(data, bundle.config.training.labels.label_columns)
    frame = frame[frame[LABEL] != ""].reset_index(drop=True)
    attributes = _attribute_columns(data)
    if attributes is not None:
        frame = frame.join(attributes, on="offer_id")
    leaves = tuple(sorted(frame[LABEL].unique()))
    categories = pd.Categorical(frame[LABEL], categories=leaves).codes.astype(np.int64)
    groups = title_groups(frame["title"])
    split = split_offers(
        frame,
        SplitSpec(
            protocol="group",
            test_share=options.test_share,
            validation_share=options.validation_share,
            seed=options.seed,
        ),
    )
    featurizer = Featurizer.from_bundle(bundle, image_policy=ImagePolicy.for_offer_files())
    n = len(frame)
    images = np.zeros((n, 3, model_config.image_size, model_config.image_size), np.uint8)
    title_ids = np.zeros((n, model_config.max_title_tokens), np.int64)
    title_grams = np.zeros((n, model_config.max_title_grams), np.int64)
    has_image = np.zeros(n, np.float32)
    for row, offer in enumerate(
        progress_bar(offers_from_frame(frame), total=n, desc="featurising", unit="offer", disable=not progress)
    ):
        image, used, _ = featurizer.image(offer)
        images[row], has_image[row] = image, float(used)
        ids, _, grams = featurizer.text_ids(offer.title, None)
        title_ids[row] = ids
        if model_config.max_title_grams:
            title_grams[row] = grams
    # The embedder reads the pooled features of the classifier's own frozen ImageNet backbone, so
    # that serving computes them once for both; a classifier without it cannot carry an embedder.
    finetuned = int(bundle.config.training.options.get("finetune_blocks", 0))
    if bundle.config.pretrained_image_weights is None or finetuned:
        raise ValueError(
            f"{bundle_path} does not serve the frozen ImageNet backbone the embedder reads "
            f"({'fine-tuned ' + str(finetuned) + ' blocks' if finetuned else 'trained without ImageNet weights'}); "
            "train the classifier with the weights and finetune_blocks=0"
        )
    weights = find_pretrained_weights()
    if weights is None:
        raise ValueError("no ImageNet MobileNetV2 weights found here (docs/training.md, 'Pretrained weights')")
    features = cached_image_trunk(
        images,
        model_config,
        weights,
        BACKBONE_BLOCKS,
        TrainOptions(feature_cache=str(feature_cache) if feature_cache else None, seed=0),
        torch.device("cpu"),
        progress=progress,
    )
    return EmbeddingData(
        frame=frame,
        categories=categories,
        leaves=leaves,
        groups=groups,
        split=split,
        title_ids=torch.from_numpy(title_ids),
        title_grams=torch.from_numpy(title_grams) if model_config.max_title_grams else None,
        has_image=torch.from_numpy(has_image),
        image_features=features.to(torch.float32),
        image_sha=[_file_sha(url) for url in frame["image_url"]],
        vocab_size=featurizer.tokenizer.vocab_size,
        char_buckets=model_config.char_buckets if model_config.max_title_grams else 0,
        featurizer=featurizer,
        bundle=bundle,
    )


def _attribute_columns(data: str | Path) -> pd.DataFrame | None:
    """``gender``, ``base_colour``, ``article_type`` by ``offer_id`` when an offer CSV has them all."""
    if not str(data).endswith(".csv"):
        return None
    header = pd.read_csv(data, nrows=0).columns
    wanted = ["offer_id", *ATTRIBUTE_COLUMNS]
    if not set(wanted) <= set(header):
        return None
    table = pd.read_csv(data, usecols=wanted, dtype=str, keep_default_na=False)
    return table.drop_duplicates("offer_id").set_index("offer_id")


def fit_embedder(
    data: EmbeddingData, options: EmbedderOptions = EmbedderOptions(), *, progress: bool = True
) -> tuple[Embedder, list[dict]]:
    """Train an :class:`Embedder` on the training products of ``data``; per-epoch history."""
    torch.manual_seed(options.seed)
    torch.set_num_threads(options.threads)
    config = EmbedderConfig(vocab_size=data.vocab_size, char_buckets=data.char_buckets, dim=options.dim)
    model = Embedder(config)
    proxies = nn.Parameter(torch.randn(len(data.leaves), options.dim) * 0.01)
    sparse = [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    dense = [p for p in model.parameters() if all(p is not q for q in sparse)] + [proxies]
    optimizers = [
        torch.optim.SparseAdam(sparse, lr=options.learning_rate),
        torch.optim.AdamW(dense, lr=options.learning_rate, weight_decay=options.weight_decay),
    ]
    train = data.split.train
    partners = _product_partners(data.groups[train])
    steps = math.ceil(len(train) / options.batch_pairs)
    schedulers = [
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=options.learning_rate, total_steps=options.epochs * steps)
        for optimizer in optimizers
    ]
    generator = np.random.default_rng(options.seed)
    categories = torch.from_numpy(data.categories)
    groups = torch.from_numpy(data.groups)
    history = []
    bar = progress_bar(total=options.epochs * steps, desc="embedder", unit="step", disable=not progress, leave=False)
    started = time.perf_counter()
    for epoch in range(options.epochs):
        model.train()
        order = generator.permutation(len(train))
        total = 0.0
        for start in range(0, len(order), options.batch_pairs):
            anchors = order[start : start + options.batch_pairs]
            others = np.array([generator.choice(partners[a]) for a in anchors])
            rows = torch.from_numpy(train[np.concatenate([anchors, others])])
            loss = _batch_loss(model, proxies, data, rows, categories[rows], groups[rows], options)
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss.backward()
            for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
                optimizer.step()
                scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            total += loss.item()
            bar.update()
        record = {"epoch": epoch + 1, "loss": total / steps, "seconds": round(time.perf_counter() - started, 1)}
        history.append(record)
        bar.set_postfix({"loss": f"{record['loss']:.3f}"})
    bar.close()
    model.eval()
    return model, history


def _batch_loss(
    model: Embedder,
    proxies: torch.Tensor,
    data: EmbeddingData,
    rows: torch.Tensor,
    categories: torch.Tensor,
    groups: torch.Tensor,
    options: EmbedderOptions,
) -> torch.Tensor:
    grams = data.title_grams[rows] if data.title_grams is not None else None
    text = model.embed_text(data.title_ids[rows], grams)
    image = model.embed_image(data.image_features[rows])
    seen = data.has_image[rows] > 0
    same = groups[:, None] == groups[None, :]  # (B, B) positives, self included
    eye = torch.eye(len(rows), dtype=torch.bool)
    scale = model.logit_scale.exp()
    # Image–title contrast over offers with an image, both directions. A product's colour variants
    # have other colours: with "offer" positives a title is pulled to its own picture only.
    pairs = (same if options.clip_positives == "product" else eye)[seen][:, seen]
    clip = _multi_positive_nce(scale * text[seen] @ image[seen].T, pairs)
    clip = clip + _multi_positive_nce(scale * image[seen] @ text[seen].T, pairs)
    # Product contrast inside each space: the partner (and any other listing) against the rest.
    product = _multi_positive_nce((text @ text.T) / options.product_temperature, same & ~eye, exclude=eye)
    image_seen = image[seen]
    seen_eye = eye[seen][:, seen]
    product = product + _multi_positive_nce(
        (image_seen @ image_seen.T) / options.product_temperature, same[seen][:, seen] & ~seen_eye, exclude=seen_eye
    )
    weights = functional.normalize(proxies, dim=1)
    category = functional.cross_entropy(options.category_scale * text @ weights.T, categories)
    category = category + functional.cross_entropy(options.category_scale * image_seen @ weights.T, categories[seen])
    return clip / 2 + product / 2 + options.category_weight * category / 2


def _multi_positive_nce(
    logits: torch.Tensor, positive: torch.Tensor, *, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over rows with a positive of ``-log(sum of softmax over positives)``."""
    if exclude is not None:
        logits = logits.masked_fill(exclude, -1e4)
    has_positive = positive.any(dim=1)
    if not has_positive.any():
        return logits.sum() * 0.0
    log_probability = logits.log_softmax(dim=1)
    positive_log = torch.logsumexp(log_probability.masked_fill(~positive, -1e4), dim=1)
    return -positive_log[has_positive].mean()


def _product_partners(groups: np.ndarray) -> list[np.ndarray]:
    """For each training row, the other rows of its product (itself when it has none)."""
    by_group = pd.Series(np.arange(len(groups))).groupby(groups).apply(lambda rows: rows.to_numpy())
    partners = []
    for row, group in enumerate(groups):
        members = by_group[group]
        others = members[members != row]
        partners.append(others if len(others) else np.array([row]))
    return partners


@torch.no_grad()
def embed_offers(model: Embedder, data: EmbeddingData, rows: np.ndarray, *, batch: int = 2048) -> dict[str, np.ndarray]:
    """``{"image", "text", "fused"}`` -> ``(len(rows), D or 2D)`` float32 unit vectors."""
    parts: dict[str, list[np.ndarray]] = {"image": [], "text": [], "fused": []}
    for start in range(0, len(rows), batch):
        index = torch.from_numpy(rows[start : start + batch])
        grams = data.title_grams[index] if data.title_grams is not None else None
        image, text, fused = model(data.image_features[index], data.has_image[index], data.title_ids[index], grams)
        for name, value in (("image", image), ("text", text), ("fused", fused)):
            parts[name].append(value.numpy())
    return {name: np.concatenate(values) if values else np.zeros((0, 0), np.float32) for name, values in parts.items()}


@torch.no_grad()
def embed_queries(model: Embedder, data: EmbeddingData, texts: list[str]) -> np.ndarray:
    """Free text -> ``(len(texts), D)`` unit vectors in the image space."""
    ids, grams = data.texts_to_ids(texts)
    return model.embed_text(ids, grams).numpy()


def save_embedder(
    model: Embedder, out: Path, *, options: EmbedderOptions, history: list[dict], report: dict, data: EmbeddingData
) -> Path:
    """Weights and config under ``out`` (``model.pt``, ``config.json``), with the options and the
    fingerprint of the offers it was trained on, so its held-out products can be found again."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    record = {
        "embedder": model.config.to_dict(),
        "options": dataclasses.asdict(options),
        "data_fingerprint": data_fingerprint(data.frame),
        "products": {
            "train": len(np.unique(data.groups[data.split.train])),
            "test": len(np.unique(data.groups[data.split.test])),
        },
        "history": history,
        "report": report,
    }
    (out / "config.json").write_text(json.dumps(record, indent=1))
    return out


def load_embedder(path: str | Path) -> tuple[Embedder, EmbedderOptions]:
    """An embedder saved by :func:`save_embedder`, and the options it was trained with."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no embedder at {path}: expected {config_file} (train one with catstream train-embedder)"
        )
    record = json.loads(config_file.read_text())
    model = Embedder(EmbedderConfig(**record["embedder"]))
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), EmbedderOptions(**record["options"])


def _file_sha(url: str) -> str | None:
    if not url or not url.startswith("file://"):
        return None
    try:
        return hashlib.sha256(Path(url2pathname(urlparse(url).path)).read_bytes()).hexdigest()
    except OSError:
        return None
