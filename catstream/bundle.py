"""The model bundle: a directory with everything needed to serve (and rebuild) one model.

    model.onnx         the fusion model (inputs: image uint8, has_image, title_ids, mall_ids, mall_weight)
    shops.json         per-shop trust in the shop's own category (mall_id → weight), optional
    lexical/           the lexical model whose scores are added to the logits (catstream.lexical), optional
    model.pt           its PyTorch weights, for audits and the PyTorch baseline
    tokenizer.model    SentencePiece model
    labels.json        category paths, index = model output index
    dictionaries/      the dictionary files the model was trained with
    training_offers.tsv  offer_id and content fingerprint of every offer its training or calibration
                       saw, so a later model is compared with it only on offers neither has seen,
                       even where the same offers come back under new ids (bundles from before the
                       fingerprints have training_offers.txt, the ids alone)
    config.json        model config, input sizes, threshold, parent threshold, temperature, version, metrics,
                       and the operating points: what other leaf thresholds gave on the held-out offers
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catstream.dictionaries import Dictionaries
from catstream.lexical import LEXICAL_DIR, LexicalModel

__all__ = ["BUNDLE_FORMAT", "SHOPS_FILE", "TRAINING_OFFERS_FILE", "BundleError", "ModelBundle", "ShopWeights",
           "TrainingOffers"]

BUNDLE_FORMAT = 2  # 2: mall_weight input, shops.json
SHOPS_FILE = "shops.json"
TRAINING_OFFERS_FILE = "training_offers.tsv"
_TRAINING_OFFER_IDS_FILE = "training_offers.txt"  # written before the fingerprints: ids only
_REQUIRED = ("config.json", "labels.json", "model.onnx", "tokenizer.model")


class BundleError(ValueError):
    """The directory is not a usable model bundle."""


@dataclass(frozen=True)
class TrainingOffers:
    """The offers a model's training or calibration saw: their ids and content fingerprints
    (:func:`catstream.offer_files.offer_fingerprints`; None in bundles that recorded ids only)."""

    ids: frozenset[str]
    fingerprints: frozenset[str] | None

    @staticmethod
    def save(directory: Path, offer_ids: list[str], fingerprints: list[str]) -> None:
        """Write ``training_offers.tsv`` into the bundle ``directory`` (``offer_id`` and ``fingerprint``)."""
        if len(offer_ids) != len(fingerprints):
            raise ValueError(f"{len(offer_ids)} offer ids but {len(fingerprints)} fingerprints")
        (directory / _TRAINING_OFFER_IDS_FILE).unlink(missing_ok=True)  # an earlier run's ids-only record
        with (directory / TRAINING_OFFERS_FILE).open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(("offer_id", "fingerprint"))
            writer.writerows(zip(offer_ids, fingerprints))

    @classmethod
    def read(cls, directory: Path) -> "TrainingOffers | None":
        """The record in the bundle ``directory``; None where it has none."""
        path = directory / TRAINING_OFFERS_FILE
        if path.is_file():
            with path.open(encoding="utf-8", newline="") as handle:
                rows = list(csv.reader(handle, delimiter="\t"))
            if not rows or rows[0] != ["offer_id", "fingerprint"] or any(len(row) != 2 for row in rows[1:]):
                raise BundleError(f"{path}: expected two tab-separated columns, offer_id and fingerprint")
            return cls(ids=frozenset(row[0] for row in rows[1:]), fingerprints=frozenset(row[1] for row in rows[1:]))
        path = directory / _TRAINING_OFFER_IDS_FILE
        if path.is_file():
            return cls(ids=frozenset(line for line in path.read_text(encoding="utf-8").splitlines() if line),
                       fingerprints=None)
        return None


@dataclass(frozen=True)
class ModelBundle:
    """A loaded bundle's metadata (no model weights are read here)."""

    path: Path
    config: dict[str, Any]
    labels: tuple[str, ...]
    dictionaries: Dictionaries

    @classmethod
    def load(cls, path: str | Path, *, dictionaries_dir: str | Path | None = None) -> "ModelBundle":
        """Read and check a bundle; ``dictionaries_dir`` replaces the dictionaries it was trained with
        (reviewed exclusion rules deployed without retraining)."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"model bundle {path} does not exist or is not a directory")
        missing = [name for name in _REQUIRED if not (path / name).is_file()]
        if missing:
            raise BundleError(f"model bundle {path} lacks {', '.join(missing)}")
        config = json.loads((path / "config.json").read_text())
        if config.get("bundle_format") != BUNDLE_FORMAT:
            raise BundleError(f"{path}: bundle_format {config.get('bundle_format')!r}, expected {BUNDLE_FORMAT}")
        labels = tuple(json.loads((path / "labels.json").read_text()))
        if len(labels) != config["model"]["num_classes"]:
            raise BundleError(f"{path}: {len(labels)} labels but the model has {config['model']['num_classes']} outputs")
        if dictionaries_dir and not Path(dictionaries_dir).is_dir():
            raise BundleError(f"dictionary directory {dictionaries_dir} does not exist or is not a directory")
        dictionaries = Dictionaries.load(Path(dictionaries_dir) if dictionaries_dir else path / "dictionaries")
        return cls(path=path, config=config, labels=labels, dictionaries=dictionaries)

    @property
    def version(self) -> str:
        return self.config["model_version"]

    @property
    def image_size(self) -> int:
        return self.config["model"]["image_size"]

    @property
    def max_title_tokens(self) -> int:
        return self.config["model"]["max_title_tokens"]

    @property
    def max_mall_tokens(self) -> int:
        return self.config["model"]["max_mall_tokens"]

    @property
    def char_buckets(self) -> int:
        """Buckets of the title's hashed character n-grams; 0 = the model has no such input."""
        return int(self.config["model"].get("char_buckets", 0))

    @property
    def max_title_grams(self) -> int:
        return int(self.config["model"].get("max_title_grams", 0))

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    @property
    def parent_threshold(self) -> float | None:
        """The threshold an uncertain offer's parent category must reach; None: no parent is named.

        Chosen at training on the same held-out offers as the leaf threshold; bundles from before
        it was chosen separately used the leaf threshold, and still do.
        """
        value = self.config.get("parent_threshold", self.threshold)
        return None if value is None else float(value)

    @property
    def operating_points(self) -> list[dict]:
        """Leaf thresholds the bundle may serve at, each with its coverage, precision, lower bound
        and parent threshold on the held-out offers it was calibrated on (``training.calibration.
        operating_points``), lowest threshold first; empty for bundles from before the table."""
        return list(self.config.get("operating_points", []))

    def operating_point(self, threshold: float) -> dict | None:
        """The table's row that serving at leaf ``threshold`` is judged by: the highest tabled
        threshold at or below it (None without a table). Its uncertain offers are a subset of
        ``threshold``'s, the least confident ones, so its parent threshold was chosen on offers no
        easier than those it will be asked about."""
        rows = [row for row in self.operating_points if row["threshold"] <= threshold]
        return max(rows, key=lambda row: row["threshold"]) if rows else None

    def with_thresholds(self, *, threshold: float | None = None,
                        parent_threshold: float | None = None) -> "ModelBundle":
        """The bundle served at another leaf and/or parent threshold (None keeps the bundle's).

        A parent threshold is chosen for the offers one leaf threshold leaves uncertain, so with
        the leaf threshold overridden and the parent one not, the parent threshold comes from
        :meth:`operating_point` (bundles without the table keep theirs). ``config["served_at"]``
        records what was overridden and where the parent threshold came from.
        """
        if threshold is None and parent_threshold is None:
            return self
        config = dict(self.config)
        served_at: dict[str, Any] = {"bundle_threshold": self.threshold, "bundle_parent_threshold": self.parent_threshold}
        if threshold is not None and threshold != self.threshold:
            config["threshold"] = float(threshold)
            point = self.operating_point(threshold)
            served_at["operating_point"] = point
            if parent_threshold is None:
                config["parent_threshold"] = point["parent_threshold"] if point is not None else self.parent_threshold
                served_at["parent_threshold_from"] = "operating_point" if point is not None else "bundle"
        if parent_threshold is not None:
            config["parent_threshold"] = float(parent_threshold)
            served_at["parent_threshold_from"] = "override"
        config["served_at"] = served_at
        return dataclasses.replace(self, config=config)

    def served_at_note(self) -> str | None:
        """A sentence on overridden thresholds: where the parent threshold came from, and what the
        operating point gave on the offers the bundle was calibrated on. None for the bundle's own."""
        served_at = self.config.get("served_at")
        if not served_at:
            return None
        text = f"served at threshold {self.threshold:.4f} (the bundle's: {served_at['bundle_threshold']:.4f})"
        text += " and no parent threshold" if self.parent_threshold is None else f", parent threshold {self.parent_threshold:.4f}"
        point, source = served_at.get("operating_point"), served_at.get("parent_threshold_from")
        if source == "operating_point":
            text += (": none reached the target" if self.parent_threshold is None else ": the one chosen in training") + (
                f" on the offers its operating point at {point['threshold']:.4f} leaves uncertain")
        elif source == "bundle":
            text += ": the bundle's own, as it has no operating points to choose one for this threshold"
        elif source == "override":
            text += ", as given"
        if point is not None:
            precision = "–" if point["precision"] is None else f"{100 * point['precision']:.2f}%"
            text += (f"; on the offers the bundle was calibrated on, that operating point categorised "
                     f"{100 * point['coverage']:.2f}% at precision {precision} (lower bound {100 * point['precision_bound']:.2f}%)")
        return text

    @property
    def temperature(self) -> float:
        return float(self.config.get("temperature", 1.0))

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.model"

    def training_offers(self) -> TrainingOffers | None:
        """The offers its training or calibration saw; None for bundles that did not record them."""
        return TrainingOffers.read(self.path)

    @property
    def has_lexical(self) -> bool:
        return (self.path / LEXICAL_DIR).is_dir()

    def lexical(self) -> LexicalModel | None:
        """The lexical model (``lexical/``); None for bundles without one."""
        path = self.path / LEXICAL_DIR
        if not path.is_dir():
            return None
        model = LexicalModel.load(path)
        if model.num_classes != len(self.labels):
            raise BundleError(f"{path}: the lexical model scores {model.num_classes} categories, "
                              f"the bundle has {len(self.labels)}")
        return model

    def shop_weights(self) -> ShopWeights:
        """Trust in each shop's own category (``shops.json``); every shop gets 1.0 without it."""
        path = self.path / SHOPS_FILE
        if not path.is_file():
            return ShopWeights()
        data = json.loads(path.read_text())
        return ShopWeights(weights=data["weights"], default=float(data.get("default", 1.0)))


@dataclass(frozen=True)
class ShopWeights:
    """``mall_id`` → weight in [0, 1] of the shop's own category; unknown shops get ``default``."""

    weights: dict[str, float] = field(default_factory=dict)
    default: float = 1.0

    def __call__(self, mall_id: str | None) -> float:
        return float(self.weights.get(mall_id or "", self.default))
