"""The offer embedder: image, title and fused vectors for retrieval, and a query tower that puts
free text in the image space.

Inputs (batch-first), the classifier's own so serving featurises nothing twice:
    image_features (N, 1280) float32 — pooled MobileNetV2 features, the classifier graph's
                   intermediate (the backbone is frozen ImageNet weights, so no offer trained it)
    has_image      (N,) float32
    title_ids      (N, T) int64 — SentencePiece ids, 0 = padding
    title_grams    (N, G) int64 — hashed character n-grams of the title words, 0 = padding
Outputs, each L2-normalised:
    image (N, D), text (N, D), fused (N, 2D) — ``[image, text] / sqrt(2)``, so a fused inner
    product is the mean of the image and text similarities. An offer without an image gets its
    text vector in the image half, so it stays searchable.

The query tower is the text tower itself: titles and shoppers' queries are the same kind of text,
and training pulls a title towards its own image (and its product's other images), which is what
lets words find an offer through its picture.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as functional
from torch import nn

from core.model import _BagOfGrams, _BagOfPieces

__all__ = ["IMAGE_FEATURES", "Embedder", "EmbedderConfig"]

IMAGE_FEATURES = 1280


@dataclass(frozen=True)
class EmbedderConfig:
    """Everything needed to rebuild an :class:`Embedder`."""

    vocab_size: int
    char_buckets: int  # 0 = the title has no n-gram input
    dim: int = 128  # per space; the fused vector has twice this
    text_dim: int = 128
    hidden: int = 512
    bigram_buckets: int = 50_000

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Embedder(nn.Module):
    """Two towers into one space, trained by :mod:`training.embeddings`."""

    def __init__(self, config: EmbedderConfig):
        super().__init__()
        self.config = config
        self.image_tower = nn.Sequential(
            nn.LayerNorm(IMAGE_FEATURES),
            nn.Linear(IMAGE_FEATURES, config.hidden),
            nn.GELU(),
            nn.Linear(config.hidden, config.dim),
        )
        self.title = _BagOfPieces(config.vocab_size, config.text_dim, config.bigram_buckets)
        self.grams = _BagOfGrams(config.char_buckets, config.text_dim) if config.char_buckets else None
        text_in = self.title.out_dim + (self.grams.out_dim if self.grams is not None else 0)
        self.text_tower = nn.Sequential(
            nn.LayerNorm(text_in),
            nn.Linear(text_in, config.hidden),
            nn.GELU(),
            nn.Linear(config.hidden, config.dim),
        )
        # CLIP's learnable temperature, started at 1/0.07 and capped at 100 during training.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_image(self, image_features: torch.Tensor) -> torch.Tensor:
        """``(N, 1280)`` -> ``(N, D)`` unit vectors."""
        return functional.normalize(self.image_tower(image_features), dim=1)

    def embed_text(self, title_ids: torch.Tensor, title_grams: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, T)`` pieces (and ``(N, G)`` n-grams) -> ``(N, D)`` unit vectors: titles and queries."""
        parts = [self.title(title_ids)]
        if self.grams is not None:
            assert title_grams is not None, "this embedder reads the title's character n-grams"
            parts.append(self.grams(title_grams))
        return functional.normalize(self.text_tower(torch.cat(parts, dim=1)), dim=1)

    def forward(
        self,
        image_features: torch.Tensor,
        has_image: torch.Tensor,
        title_ids: torch.Tensor,
        title_grams: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        text = self.embed_text(title_ids, title_grams)
        present = has_image.unsqueeze(1)
        image = self.embed_image(image_features) * present + text * (1.0 - present)
        fused = torch.cat([image, text], dim=1) / math.sqrt(2.0)
        return image, text, fused
