"""Offer → model inputs, the one featurisation used by both training and serving."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catstream.bundle import ModelBundle, ShopWeights
from catstream.dictionaries import Dictionaries
from catstream.images import ImageLimits, ImageUnavailable, load_image
from catstream.lexical import LexicalModel
from catstream.schemas import Offer
from catstream.text import char_ngram_ids
from catstream.tokenizer import Tokenizer

__all__ = ["IMAGE_USED", "OfferFeatures", "Featurizer"]

IMAGE_USED = "used"


@dataclass(slots=True)
class OfferFeatures:
    """Model inputs of one offer. Shapes: image (3, S, S) uint8, ids (T,)/(M,)/(G,) int64, mask (K,),
    lexical (K,) float32.

    ``title_grams`` has length 0 for models without the character n-gram input, ``lexical`` (the
    lexical model's scores, added to the logits) for models without a lexical model.
    """

    image: np.ndarray
    has_image: bool
    mall_weight: float
    title_ids: np.ndarray
    mall_ids: np.ndarray
    title_grams: np.ndarray
    exclusion_mask: np.ndarray
    image_status: str
    lexical: np.ndarray


class Featurizer:
    """Tokenises text, applies the dictionaries, scores the text with the lexical model, loads the image."""

    def __init__(
        self,
        *,
        tokenizer: Tokenizer,
        dictionaries: Dictionaries,
        labels: tuple[str, ...],
        image_size: int,
        max_title_tokens: int,
        max_mall_tokens: int,
        char_buckets: int = 0,
        max_title_grams: int = 0,
        shop_weights: ShopWeights = ShopWeights(),
        image_limits: ImageLimits = ImageLimits(),
        lexical: LexicalModel | None = None,
    ):
        self.tokenizer = tokenizer
        self.dictionaries = dictionaries
        self.labels = labels
        self.image_size = image_size
        self.max_title_tokens = max_title_tokens
        self.max_mall_tokens = max_mall_tokens
        self.char_buckets = char_buckets
        self.max_title_grams = max_title_grams if char_buckets else 0
        self.shop_weights = shop_weights
        self.image_limits = image_limits
        self.lexical = lexical

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, *, image_limits: ImageLimits = ImageLimits()) -> "Featurizer":
        return cls(
            tokenizer=Tokenizer(bundle.tokenizer_path),
            dictionaries=bundle.dictionaries,
            labels=bundle.labels,
            image_size=bundle.image_size,
            max_title_tokens=bundle.max_title_tokens,
            max_mall_tokens=bundle.max_mall_tokens,
            char_buckets=bundle.char_buckets,
            max_title_grams=bundle.max_title_grams,
            shop_weights=bundle.shop_weights(),
            image_limits=image_limits,
            lexical=bundle.lexical(),
        )

    def texts(self, title: str, mall_category: str | None) -> tuple[str, str]:
        """The title and mall category as the model reads them: ambiguous terms removed."""
        return self.dictionaries.strip_ambiguous(title), self.dictionaries.strip_ambiguous(mall_category or "")

    def text_ids(self, title: str, mall_category: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids of the filtered title and of the mall category, and the title's n-gram ids."""
        return self._ids(*self.texts(title, mall_category))

    def _ids(self, title: str, mall: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`text_ids` of texts already filtered by :meth:`texts`."""
        title_ids = self.tokenizer.encode(title, self.max_title_tokens)
        mall_ids = self.tokenizer.encode(mall, self.max_mall_tokens)
        title_grams = (char_ngram_ids(title, self.char_buckets, self.max_title_grams) if self.char_buckets
                       else np.zeros(0, dtype=np.int64))
        return title_ids, mall_ids, title_grams

    def lexical_scores(self, title: str, mall_category: str | None, mall_weight: float = 1.0) -> np.ndarray:
        """``(K,)`` lexical scores of the filtered texts; ``(0,)`` when the model has no lexical model."""
        return self._lexical(*self.texts(title, mall_category), mall_weight)

    def _lexical(self, title: str, mall: str, mall_weight: float) -> np.ndarray:
        """:meth:`lexical_scores` of texts already filtered by :meth:`texts`."""
        if self.lexical is None:
            return np.zeros(0, dtype=np.float32)
        return self.lexical.score(title, mall, mall_weight)

    def image(self, offer: Offer, *, base_dir: Path | None = None) -> tuple[np.ndarray, bool, str]:
        """``(image, has_image, status)``; a blank image when it cannot be used, with the reason."""
        try:
            pixels = load_image(
                image_url=offer.image_url,
                image_b64=offer.image_b64,
                size=self.image_size,
                limits=self.image_limits,
                base_dir=base_dir,
            )
            return pixels, True, IMAGE_USED
        except ImageUnavailable as error:
            blank = np.zeros((3, self.image_size, self.image_size), dtype=np.uint8)
            return blank, False, error.status

    def featurize(self, offer: Offer, *, base_dir: Path | None = None) -> OfferFeatures:
        title, mall = self.texts(offer.title, offer.mall_category)  # filtered once for both text paths
        title_ids, mall_ids, title_grams = self._ids(title, mall)
        image, has_image, status = self.image(offer, base_dir=base_dir)
        mall_weight = self.shop_weights(offer.mall_id)
        return OfferFeatures(
            image=image,
            has_image=has_image,
            mall_weight=mall_weight,
            title_ids=title_ids,
            mall_ids=mall_ids,
            title_grams=title_grams,
            exclusion_mask=self.dictionaries.exclusion_mask(offer.title, self.labels),
            image_status=status,
            lexical=self._lexical(title, mall, mall_weight),
        )
