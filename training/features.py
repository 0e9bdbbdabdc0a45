"""Features stage of training: labeled offers → :class:`Prepared`, everything the fits share.

Read, draw the label set, split, apply the exclusion dictionary, train SentencePiece on the
training text, estimate each shop's trust in its own category, featurise every offer with the
featuriser serving uses (``core.features``), and run the frozen MobileNetV2 blocks once over every
image (cached on disk per image size, weights and seed). :func:`prepare` does this once; the
ablation and ``catstream tune`` then fit many configurations on the same :class:`Prepared`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.bundle import FusionConfig
from core.dictionaries import Dictionaries
from core.features import Featurizer
from core.images import ImagePolicy
from core.model import BACKBONE_BLOCKS, FusionModel, find_pretrained_weights
from core.offer_files import LABEL, offers_from_frame
from core.tokenizer import train_tokenizer
from training.data import data_fingerprint, load_labeled, select_labels
from training.options import TrainOptions
from training.progress import progress_bar
from training.shops import estimate_shop_weights
from training.splits import Split, split_offers

__all__ = ["NOT_NETWORK_INPUTS", "Prepared", "cached_image_trunk", "prepare"]

log = logging.getLogger(__name__)

# Featuriser outputs the network does not read: the image goes through the cached trunk instead,
# the exclusion mask and the lexical scores apply to the logits.
NOT_NETWORK_INPUTS = frozenset({"image", "exclusion", "lexical"})


@dataclass
class Prepared:
    """Everything a configuration is trained and judged on; built once by :func:`prepare`."""

    frame: pd.DataFrame  # the labeled offers kept, in split order of positions
    labels: tuple[str, ...]
    targets: np.ndarray  # (N,) class index
    split: Split
    inputs: dict[str, torch.Tensor]  # title_ids (N, T), mall_ids (N, M), has_image (N,), mall_weight (N,)
    texts: pd.DataFrame  # title, mall: the strings the text branches and the lexical model read (N rows)
    trunk: (
        torch.Tensor
    )  # (N, C, h, w) float16 output of the frozen backbone blocks, (N, 1280) pooled when all are frozen
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
    report |= {
        "train_offers": len(split.train),
        "validation_offers": len(split.validation),
        "test_offers": len(split.test),
        "categories": len(labels),
    }

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
        **options.network(),
    )
    featurizer = Featurizer(
        image_policy=ImagePolicy.for_offer_files(),
        tokenizer=tokenizer,
        dictionaries=dictionaries,
        labels=labels,
        image_size=config.image_size,
        max_title_tokens=config.max_title_tokens,
        max_mall_tokens=config.max_mall_tokens,
        char_buckets=config.char_buckets,
        max_title_grams=config.max_title_grams,
    )
    weights = find_pretrained_weights(options.pretrained) if options.use_pretrained else None
    if weights is None:
        log.warning(
            "no ImageNet MobileNetV2 weights%s: the image branch is randomly initialised "
            "(docs/training.md, 'Pretrained weights'); text branches still learn",
            "" if options.use_pretrained else " (--no-pretrained)",
        )
    inputs, images, texts = _featurize(frame, featurizer, progress=progress)
    inputs["mall_weight"] = torch.tensor([shop_weights.get(m, 1.0) for m in frame["mall_id"]], dtype=torch.float32)
    trunk_layer = BACKBONE_BLOCKS - options.finetune_blocks
    trunk = cached_image_trunk(images, config, weights, trunk_layer, options, device, progress=progress)
    report["offers_without_usable_image"] = int((inputs["has_image"] == 0).sum())
    return Prepared(
        frame=frame,
        labels=labels,
        targets=targets,
        split=split,
        inputs=inputs,
        texts=texts,
        trunk=trunk,
        trunk_layer=trunk_layer,
        config=config,
        tokenizer_path=tokenizer_path,
        dictionaries=dictionaries,
        exclusion=exclusion,
        contradicted=contradicted,
        shop_weights=shop_weights,
        shop_table=shop_table,
        report=report,
        pretrained_weights=weights,
        device=device,
    )


def _device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _featurize(
    frame: pd.DataFrame, featurizer: Featurizer, *, progress: bool
) -> tuple[dict[str, torch.Tensor], np.ndarray, pd.DataFrame]:
    """``(inputs, images, texts)``: the network's inputs ``(N, …)`` by name (every featuriser output
    but :data:`NOT_NETWORK_INPUTS`), the images ``(N, 3, S, S)`` uint8, and the filtered title and
    mall category strings the lexical model reads."""
    n = len(frame)
    declared = [field for field in featurizer.fields if field.name == "image" or field.name not in NOT_NETWORK_INPUTS]
    arrays = {field.name: np.zeros((n, *field.shape), dtype=field.dtype) for field in declared}
    texts = []
    offers = offers_from_frame(frame)
    for i, offer in enumerate(progress_bar(offers, total=n, desc="featurising", unit="offer", disable=not progress)):
        features = featurizer.featurize(offer)
        for name, array in arrays.items():
            array[i] = getattr(features, name)
        texts.append(featurizer.texts(offer.title, offer.mall_category))
    images = arrays.pop("image")
    inputs = {name: torch.from_numpy(array) for name, array in arrays.items()}
    return inputs, images, pd.DataFrame(texts, columns=["title", "mall"], index=frame.index)


def cached_image_trunk(
    images: np.ndarray,
    config: FusionConfig,
    weights: Path | None,
    layer: int,
    options: TrainOptions,
    device: torch.device,
    *,
    progress: bool,
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
        for start in progress_bar(
            range(0, len(images), batch), desc="image features", unit="batch", disable=not progress
        ):
            chunk = (
                torch.from_numpy(images[start : start + batch]).to(device).contiguous(memory_format=torch.channels_last)
            )
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
