"""Offer → model inputs, the one featurisation used by training, serving, evaluation and audits.

The inputs an offer carries are declared once, by :func:`input_fields`: name, dtype and shape per
offer. The shared-memory queue lays its slots out from that list, :class:`FeatureBatch` stacks
offers by it, and the served model is fed by name, so a new input is added here (declared and
computed), in the model and nowhere in between.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import ModelBundle, ShopWeights
from core.dictionaries import Dictionaries
from core.feature_queue import FeatureBatch, InputField
from core.images import IMAGE_USED, ImagePolicy, ImageUnavailableError, decode_image, image_bytes
from core.lexical import LexicalModel
from core.schemas import Offer
from core.text import char_ngram_ids
from core.tokenizer import Tokenizer

__all__ = ["IMAGE_USED", "FeatureBatch", "Featurizer", "InputField", "OfferFeatures", "input_fields", "input_fields_of"]


def input_fields(
    *,
    image_size: int,
    max_title_tokens: int,
    max_mall_tokens: int,
    max_title_grams: int,
    num_classes: int,
    lexical: bool,
) -> tuple[InputField, ...]:
    """The arrays of one offer, in queue order.

    The network reads ``image`` … ``title_grams`` (the last only when the model has character
    n-grams); the decision reads ``exclusion`` (the dictionary's mask) and ``lexical`` (the lexical
    model's scores, added to the logits; only for bundles with a lexical model).
    """
    declared = [
        InputField("image", "uint8", (3, image_size, image_size)),
        InputField("has_image", "float32", ()),
        InputField("mall_weight", "float32", ()),
        InputField("title_ids", "int64", (max_title_tokens,)),
        InputField("mall_ids", "int64", (max_mall_tokens,)),
    ]
    if max_title_grams:
        declared.append(InputField("title_grams", "int64", (max_title_grams,)))
    declared.append(InputField("exclusion", "bool", (num_classes,)))
    if lexical:
        declared.append(InputField("lexical", "float32", (num_classes,)))
    return tuple(declared)


def input_fields_of(bundle: ModelBundle) -> tuple[InputField, ...]:
    """:func:`input_fields` of the model in ``bundle``."""
    model = bundle.config.model
    return input_fields(
        image_size=model.image_size,
        max_title_tokens=model.max_title_tokens,
        max_mall_tokens=model.max_mall_tokens,
        max_title_grams=model.max_title_grams,
        num_classes=len(bundle.labels),
        lexical=bundle.has_lexical,
    )


@dataclass(slots=True)
class OfferFeatures:
    """Model inputs of one offer (see :func:`input_fields`). Shapes: image ``(3, S, S)`` uint8,
    ids ``(T,)``/``(M,)``/``(G,)`` int64, exclusion ``(K,)`` bool, lexical ``(K,)`` float32.

    ``title_grams`` has length 0 for models without the character n-gram input, ``lexical`` for
    models without a lexical model.
    """

    image: np.ndarray
    has_image: bool
    mall_weight: float
    title_ids: np.ndarray
    mall_ids: np.ndarray
    title_grams: np.ndarray
    exclusion: np.ndarray
    lexical: np.ndarray
    image_status: str
    image_sha: str | None = None  # SHA-256 of the image bytes (hex), when there were bytes


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
        image_policy: ImagePolicy = ImagePolicy(),
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
        self.image_policy = image_policy
        self.lexical = lexical

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, *, image_policy: ImagePolicy = ImagePolicy()) -> Featurizer:
        model = bundle.config.model
        return cls(
            tokenizer=Tokenizer(bundle.tokenizer_path),
            dictionaries=bundle.dictionaries,
            labels=bundle.labels,
            image_size=model.image_size,
            max_title_tokens=model.max_title_tokens,
            max_mall_tokens=model.max_mall_tokens,
            char_buckets=model.char_buckets,
            max_title_grams=model.max_title_grams,
            shop_weights=bundle.shop_weights(),
            image_policy=image_policy,
            lexical=bundle.lexical(),
        )

    @property
    def fields(self) -> tuple[InputField, ...]:
        """The arrays :meth:`featurize` fills, as :func:`input_fields` declares them."""
        return input_fields(
            image_size=self.image_size,
            max_title_tokens=self.max_title_tokens,
            max_mall_tokens=self.max_mall_tokens,
            max_title_grams=self.max_title_grams,
            num_classes=len(self.labels),
            lexical=self.lexical is not None,
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
        title_grams = (
            char_ngram_ids(title, self.char_buckets, self.max_title_grams)
            if self.char_buckets
            else np.zeros(0, dtype=np.int64)
        )
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
        pixels, has_image, status, _ = self._image(offer, base_dir=base_dir)
        return pixels, has_image, status

    def _image(
        self, offer: Offer, *, base_dir: Path | None, fetched: bytes | ImageUnavailableError | None = None
    ) -> tuple[np.ndarray, bool, str, str | None]:
        """:meth:`image` and the SHA-256 of the image bytes (None when none could be read);
        ``fetched``: the bytes of the offer's image URL, or why there are none, when they were
        fetched already (``core.image_fetcher``)."""
        sha = None
        try:
            if isinstance(fetched, ImageUnavailableError):
                raise fetched
            data = (
                fetched
                if fetched is not None
                else image_bytes(
                    image_url=offer.image_url, image_b64=offer.image_b64, policy=self.image_policy, base_dir=base_dir
                )
            )
            sha = hashlib.sha256(data).hexdigest()
            return decode_image(data, self.image_size, policy=self.image_policy), True, IMAGE_USED, sha
        except ImageUnavailableError as error:
            blank = np.zeros((3, self.image_size, self.image_size), dtype=np.uint8)
            return blank, False, error.status, sha

    def featurize(
        self, offer: Offer, *, base_dir: Path | None = None, fetched: bytes | ImageUnavailableError | None = None
    ) -> OfferFeatures:
        """Every input of ``offer`` (:func:`input_fields`); an image that cannot be used leaves a blank
        one, ``has_image`` False and the reason in ``image_status``. ``fetched``: the image URL's
        bytes or why there are none, when a worker fetched them ahead (else the image is read here)."""
        image, has_image, status, sha = self._image(offer, base_dir=base_dir, fetched=fetched)
        mall_weight = self.shop_weights(offer.mall_id)
        return OfferFeatures(
            image=image,
            has_image=has_image,
            mall_weight=mall_weight,
            image_status=status,
            image_sha=sha,
            **self._text_inputs(offer.title, offer.mall_category, mall_weight),
        )

    def with_text(self, features: OfferFeatures, title: str, mall_category: str | None) -> OfferFeatures:
        """``features`` with every input read from the text computed anew from ``title`` and
        ``mall_category``, the image and the shop's weight kept: the same offer in other words (the
        audit's SHAP coalitions)."""
        return dataclasses.replace(features, **self._text_inputs(title, mall_category, features.mall_weight))

    def _text_inputs(self, title: str, mall_category: str | None, mall_weight: float) -> dict[str, Any]:
        filtered_title, mall = self.texts(title, mall_category)  # filtered once for both text paths
        title_ids, mall_ids, title_grams = self._ids(filtered_title, mall)
        return {
            "title_ids": title_ids,
            "mall_ids": mall_ids,
            "title_grams": title_grams,
            "exclusion": self.dictionaries.exclusion_mask(title, self.labels),
            "lexical": self._lexical(filtered_title, mall, mall_weight),
        }

    def batch(self, offers: Sequence[Offer], *, base_dir: Path | None = None) -> FeatureBatch:
        """:meth:`featurize` of each offer, stacked (evaluation and audits score offers in batches)."""
        return FeatureBatch.stack([self.featurize(offer, base_dir=base_dir) for offer in offers], self.fields)
