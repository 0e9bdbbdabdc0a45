"""The options of one training run: one declaration for the CLI flags, the config file, the docs
table and the record in every bundle.

Each field carries its help text. ``everyday`` marks the dozen options ``catstream train --help``
shows as flags; every option, those included, can be set from a TOML file (``--config``) or with
``--set key=value``. Choices come from the ``Literal`` types. Importing this module imports no
training library (no torch), so the CLI can build its parser from it.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from dictionaries import DEFAULT_DIRECTORY
from training.splits import SplitSpec

__all__ = ["INPUTS", "TrainOptions"]

INPUTS = ("title", "mall", "image")


def _metadata(help: str, *, everyday: bool = False, aliases: tuple[str, ...] = ()) -> dict[str, Any]:
    """What the CLI and the docs read off a field: its help text; ``everyday`` options are flags of
    ``train`` (``--<name>``, plus any ``aliases``)."""
    return {"help": help, "everyday": everyday, "aliases": aliases}


def _option(default: Any, help: str, *, everyday: bool = False) -> Any:
    """A field with an immutable default and its :func:`_metadata`."""
    return field(default=default, metadata=_metadata(help, everyday=everyday))


@dataclass
class TrainOptions:
    """Options of one training run (all stored in the bundle's config.json and the MLflow run)."""

    # --- data and split ---------------------------------------------------------------------------
    label_columns: list[str] = field(
        default_factory=lambda: ["category"],
        metadata=_metadata(
            "columns holding the category, joined with ' > ' into a path (comma-separated), e.g. "
            "gender,master_category,sub_category,article_type",
            everyday=True,
            aliases=("--label-column",),
        ),
    )
    min_label_count: int = _option(50, "categories with fewer offers are not in the label set", everyday=True)
    rare_leaves: Literal["exclude", "parent"] = _option(
        "exclude", "offers of rarer categories: excluded, or filed under their nearest frequent parent"
    )
    split: Literal["random", "time", "group"] = _option(
        "random",
        "held-out protocol: random rows; the newest rows by listed_at; or random title groups, colour "
        "variants of a product kept on one side",
        everyday=True,
    )
    test_share: float = _option(0.2, "share of offers held out for testing", everyday=True)
    validation_share: float = _option(0.1, "share of the remaining offers used for validation")
    seed: int = _option(0, "random seed of the split, the initialisation and the sampling", everyday=True)

    # --- inputs -----------------------------------------------------------------------------------
    image_size: int = _option(96, "model image input size in pixels", everyday=True)
    vocab_size: int = _option(20_000, "SentencePiece pieces")
    max_title_tokens: int = _option(32, "title pieces kept")
    max_mall_tokens: int = _option(16, "mall category pieces kept")
    char_buckets: int = _option(
        50_000, "hash buckets of the title's character 2-5-grams; 0 = no character n-gram input"
    )
    max_title_grams: int = _option(192, "character n-grams kept per title")
    inputs: tuple[str, ...] = _option(
        INPUTS, "branches the network reads (the ablation turns some off): title, mall, image; title is required"
    )
    shop_min_offers: int = _option(30, "offers a shop needs before its own category gets a trust weight of its own")

    # --- network and fitting ----------------------------------------------------------------------
    text_dim: int = _option(128, "width of the piece, bigram and character n-gram embeddings")
    fusion_hidden: int = _option(512, "width of the fusion head")
    dropout: float = _option(0.2, "dropout in the fusion head")
    finetune_blocks: int = _option(
        0,
        "last MobileNetV2 blocks trained with the head; 0 = frozen backbone (its "
        "features are computed once and cached)",
    )
    epochs: int = _option(12, "training epochs", everyday=True)
    batch_size: int = _option(64, "training batch size")
    learning_rate: float = _option(3e-3, "peak learning rate (one-cycle schedule)", everyday=True)
    weight_decay: float = _option(1e-4, "AdamW weight decay")
    image_dropout: float = _option(0.15, "share of training offers whose image is hidden")
    mall_dropout: float = _option(0.1, "share of training offers whose mall category is hidden")
    season_balance: bool = _option(
        False,
        "give every calendar month equal sampling weight (plus the recent share) instead of sampling "
        "offers uniformly (off: it cost accuracy on Myntra, see docs/model-quality.md)",
        everyday=True,
    )
    recent_weeks: float = _option(4.0, "how many weeks count as recent for --season-balance")
    recent_share: float = _option(0.1, "extra sampling weight of the most recent weeks for --season-balance")
    cleaning: Literal["off", "drop", "relabel"] = _option(
        "off", "what to do with labels cleanlab flags (off: dropping cost accuracy on Myntra)", everyday=True
    )
    cleaning_folds: int = _option(4, "K of the K-fold cleaning predictions")
    pretrained: str | None = _option(
        None, "ImageNet MobileNetV2 weights file (unset: torch's hub cache, then the offline weights package)"
    )
    use_pretrained: bool = _option(True, "start the image branch from ImageNet weights (false: random initialisation)")
    feature_cache: str | None = _option(
        None, "directory of cached frozen-backbone image features (unset: ~/.cache/catstream/image-features)"
    )

    # --- dictionary and lexical model --------------------------------------------------------------
    use_exclusions: bool = _option(
        True,
        "use category_exclusions.tsv: contradicted examples are dropped in training and the mask applies at inference",
    )
    dictionaries: str | None = _option(
        None, "dictionary directory (unset: the dictionaries shipped with catstream)", everyday=True
    )
    lexical: bool = _option(
        True, "add a lexical model (TF-IDF n-grams of title and mall category + linear SVM) to the network's logits"
    )
    lexical_c: float = _option(0.5, "the lexical model's SVM C")
    lexical_weight: float | None = _option(
        None, "weight of the lexical model's scores (unset: the most accurate on held-out predictions)"
    )

    # --- calibration ------------------------------------------------------------------------------
    target_precision: float = _option(
        0.995, "precision the 'uncertain' threshold must reach on held-out offers", everyday=True
    )
    threshold_confidence: float = _option(
        0.95,
        "confidence with which the held-out precision must reach the target (one-sided Clopper-Pearson "
        "lower bound; thresholds tested strictest first, up to the first that misses, so the chosen one misses "
        "with at most this error; 0 = the observed precision)",
    )
    threshold_by: Literal["product", "offer"] = _option(
        "product",
        "what the precision bound counts as independent evidence: products (title groups; a product's "
        "colour variants are right or wrong together) or single offers",
    )
    calibration: Literal["crossfit", "validation"] = _option(
        "crossfit",
        "where temperature and threshold come from: out-of-fold predictions of K models over the "
        "training and validation offers (crossfit; the served model then trains on all of them), or the "
        "validation offers alone (validation; the served model then trains without them)",
    )
    calibration_folds: int = _option(4, "folds of the crossfit calibration")

    # --- machine ----------------------------------------------------------------------------------
    threads: int | None = _option(None, "PyTorch threads (unset: every core)", everyday=True)
    device: str = _option("auto", "torch device: auto (CUDA when present), cpu, cuda", everyday=True)

    def __post_init__(self):
        for spec in dataclasses.fields(self):
            choices = _choices(spec)
            if choices and getattr(self, spec.name) not in choices:
                raise ValueError(f"{spec.name} must be one of {', '.join(choices)}, got {getattr(self, spec.name)!r}")
        if not 0.0 <= self.threshold_confidence < 1.0:
            raise ValueError("threshold_confidence must be in [0, 1)")
        if self.calibration_folds < 2:
            raise ValueError("calibration_folds must be at least 2")
        if not self.label_columns:
            raise ValueError("label_columns must name at least one column")
        unknown = set(self.inputs) - set(INPUTS)
        if unknown or "title" not in self.inputs:
            raise ValueError(f"inputs must include 'title' and be among {', '.join(INPUTS)}")
        self.label_columns = list(self.label_columns)
        self.inputs = tuple(self.inputs)
        if self.threads is None:
            self.threads = os.cpu_count() or 1
        if self.dictionaries is None:
            self.dictionaries = str(DEFAULT_DIRECTORY)
        _ = self.split_spec  # SplitSpec checks the protocol and the shares

    @property
    def split_spec(self) -> SplitSpec:
        return SplitSpec(self.split, self.test_share, self.validation_share, self.seed)

    def network(self) -> dict[str, Any]:
        """The network widths these options set (``core.bundle.FusionConfig`` fields)."""
        return {"text_dim": self.text_dim, "fusion_hidden": self.fusion_hidden, "dropout": self.dropout}

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _choices(spec: dataclasses.Field) -> tuple[Any, ...]:
    """The allowed values of a ``Literal`` field (empty for any other)."""
    annotation = typing.get_type_hints(TrainOptions)[spec.name]
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
