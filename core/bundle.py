"""The model bundle: a directory with everything needed to serve (and rebuild) one model.

    config.json        the typed record below (:class:`BundleConfig`): format, version, the network's
                       configuration, thresholds, temperature, operating points, how it was trained
    model.onnx         the fusion model (inputs: see ``core.features.input_fields``; output: logits)
    parity.npz         test inputs and the logits PyTorch gave on them at export: a node checks the
                       ONNX model against them before it serves a bundle
    model.pt           its PyTorch weights, for audits and the PyTorch baseline
    tokenizer.model    SentencePiece model
    labels.json        category paths, index = model output index
    dictionaries/      the dictionary files the model was trained with
    shops.json         per-shop trust in the shop's own category (mall_id → weight), optional
    lexical/           the lexical model whose scores are added to the logits (core.lexical), optional
    embedder/          the offer embedder (``catstream train-embedder``), optional: ``model.onnx`` is
                       the classifier's graph with the embedder attached to its pooled image
                       features, so one pass gives the logits and the image, text and fused vectors
    fp16.json          beside the served graph (the bundle's or the embedder's ``model.onnx``): what
                       the fp16 check measured (``training.half_precision``), optional; with
    model.fp16.onnx    the graph in float16, written only where its decisions agreed with fp32's
    training_offers.tsv  offer_id and content fingerprint of every offer its training or calibration
                       saw, so a later model is compared with it only on offers neither has seen,
                       even where the same offers come back under new ids

``config.json`` is written and read here only, by :meth:`BundleConfig.write` and
:meth:`BundleConfig.read`; a bundle of another format is refused with both formats named.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from core.dictionaries import Dictionaries
from core.lexical import LEXICAL_DIR, LexicalModel

__all__ = [
    "BUNDLE_FORMAT",
    "EMBEDDER_DIR",
    "EMBEDDING_OUTPUTS",
    "HALF_PRECISION_FILE",
    "PARITY_FILE",
    "SHOPS_FILE",
    "TRAINING_OFFERS_FILE",
    "BundleConfig",
    "BundleError",
    "CalibrationRecord",
    "FusionConfig",
    "HalfPrecisionRecord",
    "LabelRule",
    "ModelBundle",
    "OperatingPoint",
    "ParentRecord",
    "ServedAt",
    "ShopWeights",
    "SplitRecord",
    "TrainingOffers",
    "TrainingRecord",
    "ValidationRecord",
    "file_sha256",
    "half_precision_graph",
]

BUNDLE_FORMAT: Final = 3  # 3: typed config.json (BundleConfig)
SHOPS_FILE = "shops.json"
EMBEDDER_DIR = "embedder"
# Output name of each vector space in the classifier graph with the embedder attached.
EMBEDDING_OUTPUTS: Final = {"image": "embedding_image", "text": "embedding_text", "fused": "embedding_fused"}
PARITY_FILE = "parity.npz"  # inputs and PyTorch's logits on them, from the export's parity check
TRAINING_OFFERS_FILE = "training_offers.tsv"
HALF_PRECISION_FILE = "fp16.json"  # beside the fp32 graph it was checked for
CONFIG_FILE = "config.json"
_REQUIRED = (CONFIG_FILE, "labels.json", "model.onnx", "tokenizer.model", PARITY_FILE)


class BundleError(ValueError):
    """The directory is not a usable model bundle."""


@dataclass(frozen=True)
class FusionConfig:
    """Everything needed to rebuild the network (``core.model.FusionModel``)."""

    num_classes: int
    vocab_size: int
    image_size: int
    max_title_tokens: int
    max_mall_tokens: int
    text_dim: int
    char_buckets: int  # hashed character n-grams of the title; 0 = no such input
    max_title_grams: int  # n-grams kept per title; 0 when char_buckets is 0
    fusion_hidden: int
    dropout: float
    bigram_buckets: int = 50_000  # hashed piece bigrams per text branch; 0 = unigrams only
    image_dim: int = 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OperatingPoint(_Record):
    """What serving at leaf ``threshold`` did on the held-out offers the bundle was calibrated on."""

    threshold: float
    coverage: float  # share of the offers categorised
    precision: float | None  # observed on them; None when nothing was accepted
    precision_bound: float  # lower confidence bound, counted as the chosen threshold's was
    parent_threshold: float | None  # chosen for this leaf threshold's uncertain offers; None: no parent
    parent_offers: int  # uncertain offers filed under a parent at it
    parent_precision: float | None


class LabelRule(_Record):
    """How the label set was drawn from the data: evaluation applies it again to rebuild the rows."""

    label_columns: list[str]
    min_label_count: int
    rare_leaves: Literal["exclude", "parent"]


class SplitRecord(_Record):
    """The split protocol (``training.splits.SplitSpec``): evaluation rebuilds the test offers from it."""

    protocol: Literal["random", "time", "group"]
    test_share: float
    validation_share: float
    seed: int


class ParentRecord(_Record):
    """How the parent threshold did on the held-out offers the leaf threshold left uncertain."""

    uncertain: int
    answered: int
    precision: float
    precision_bound: float
    design_effect: float
    target_reached: bool


class ValidationRecord(_Record):
    """The held-out (out-of-fold or validation) figures the threshold was chosen on."""

    accuracy: float
    coverage: float
    precision: float
    precision_bound: float
    design_effect: float
    target_reached: bool
    tested_from: float | None
    parents: ParentRecord


class CalibrationRecord(_Record):
    """Where temperature and thresholds came from and what they were held to."""

    mode: Literal["crossfit", "validation"]
    offers: int
    folds: int | None
    target_precision: float
    threshold_confidence: float
    threshold_by: Literal["product", "offer"]
    fold_title_groups: int | None = None


class TrainingRecord(_Record):
    """How the model was trained: what a reader needs typed, the full options and reports as written."""

    data: str
    data_fingerprint: str  # of the labeled rows kept (``training.data.data_fingerprint``)
    labels: LabelRule
    split: SplitRecord
    calibration: CalibrationRecord
    validation: ValidationRecord
    options: dict[str, Any]  # every training option (``training.options.TrainOptions``)
    data_report: dict[str, Any]
    history: list[dict[str, float]]
    lexical: dict[str, Any] | None  # the lexical model's weight and how it was chosen; None without one
    onnx_parity_max_abs_diff: float
    stage_seconds: dict[str, float]
    seconds: float
    device: str
    threads: int
    machine: dict[str, Any]


class BundleConfig(_Record):
    """``config.json`` of a bundle."""

    bundle_format: Literal[3] = BUNDLE_FORMAT
    model_version: str
    created_at: str
    model: FusionConfig
    threshold: float
    parent_threshold: float | None  # None: the model names no parent category
    temperature: float
    operating_points: list[OperatingPoint]  # lowest threshold first
    pretrained_image_weights: str | None
    training: TrainingRecord

    def write(self, directory: str | Path) -> Path:
        """Write ``config.json`` into the bundle ``directory``."""
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), ensure_ascii=False, indent=2))
        return path

    @classmethod
    def read(cls, directory: str | Path) -> BundleConfig:
        """``config.json`` of the bundle ``directory``; :class:`BundleError` names what is wrong."""
        path = Path(directory) / CONFIG_FILE
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BundleError(f"{path}: cannot be read: {error}") from error
        found = document.get("bundle_format") if isinstance(document, dict) else None
        if found != BUNDLE_FORMAT:
            raise BundleError(
                f"{path}: bundle format {found!r}, but this catstream reads format {BUNDLE_FORMAT}; "
                "retrain the model with this version (`catstream train`)"
            )
        try:
            return cls.model_validate(document)
        except ValidationError as error:
            raise BundleError(f"{path}: not a valid format-{BUNDLE_FORMAT} config: {error}") from error


class HalfPrecisionRecord(_Record):
    """What the fp16 check (``training.half_precision``) measured for one fp32 graph, kept beside it
    as ``fp16.json``: the fp16 graph is served only while the record accepts it and both digests
    still match the files."""

    source: str  # the fp32 graph's file name, in the record's directory
    source_sha256: str  # its digest when checked: a record of another graph is stale
    graph: str | None  # the fp16 graph's file name; None when it was refused (and not written)
    graph_sha256: str | None
    offers: int  # held-out offers both graphs decided
    agreeing: int  # of them, those given the same answer (category or uncertain, and parent)
    agreement: float
    required: float
    accepted: bool
    max_probability_difference: float  # largest |fp16 - fp32| of the served confidence
    min_vector_cosine: float | None  # lowest cosine between the two graphs' vectors; None without an embedder
    data: str
    split: str
    provider: str  # the ONNX Runtime provider the check ran on
    checked_at: str

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / HALF_PRECISION_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2))
        return path

    @classmethod
    def read(cls, directory: str | Path) -> HalfPrecisionRecord | None:
        """The record in ``directory``; None where there is none. :class:`BundleError` if unreadable."""
        path = Path(directory) / HALF_PRECISION_FILE
        if not path.is_file():
            return None
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValidationError) as error:
            raise BundleError(f"{path}: not a valid fp16 record: {error}") from error


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def half_precision_graph(graph: Path) -> tuple[Path | None, str]:
    """``(fp16 graph, why)`` for the fp32 ``graph``: the fp16 graph its record accepts, or None and
    the reason it may not be served (no check, refused, or files changed since), in words."""
    record = HalfPrecisionRecord.read(graph.parent)
    if record is None:
        return None, f"no fp16 check was run for {graph.name} (catstream check-fp16)"
    measured = f"{100 * record.agreement:.2f}% of {record.offers:,} held-out decisions"
    if not record.accepted or record.graph is None:
        return None, f"the fp16 graph agreed with fp32 on {measured}, under the {100 * record.required:.2f}% required"
    if record.source != graph.name or file_sha256(graph) != record.source_sha256:
        return None, f"the fp16 check was made for another {record.source} (run catstream check-fp16 again)"
    half = graph.parent / record.graph
    if not half.is_file() or file_sha256(half) != record.graph_sha256:
        return None, f"{half} is missing or not the graph that was checked"
    return half, f"fp16 agreed with fp32 on {measured}"


@dataclass(frozen=True)
class TrainingOffers:
    """The offers a model's training or calibration saw: their ids and content fingerprints
    (:func:`core.offer_files.offer_fingerprints`)."""

    ids: frozenset[str]
    fingerprints: frozenset[str]

    @staticmethod
    def save(directory: Path, offer_ids: list[str], fingerprints: list[str]) -> None:
        """Write ``training_offers.tsv`` into the bundle ``directory`` (``offer_id`` and ``fingerprint``)."""
        if len(offer_ids) != len(fingerprints):
            raise ValueError(f"{len(offer_ids)} offer ids but {len(fingerprints)} fingerprints")
        with (directory / TRAINING_OFFERS_FILE).open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(("offer_id", "fingerprint"))
            writer.writerows(zip(offer_ids, fingerprints, strict=True))

    @classmethod
    def read(cls, directory: Path) -> TrainingOffers | None:
        """The record in the bundle ``directory``; None where it has none."""
        path = directory / TRAINING_OFFERS_FILE
        if not path.is_file():
            return None
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle, delimiter="\t"))
        if not rows or rows[0] != ["offer_id", "fingerprint"] or any(len(row) != 2 for row in rows[1:]):
            raise BundleError(f"{path}: expected two tab-separated columns, offer_id and fingerprint")
        return cls(ids=frozenset(row[0] for row in rows[1:]), fingerprints=frozenset(row[1] for row in rows[1:]))


class ServedAt(_Record):
    """Thresholds a bundle is served at other than its own (``catstream run --threshold``), and where
    the parent threshold then came from: the operating point, the bundle, or the operator."""

    threshold: float
    parent_threshold: float | None
    bundle_threshold: float
    bundle_parent_threshold: float | None
    operating_point: OperatingPoint | None = None
    parent_threshold_from: Literal["operating_point", "bundle", "override"] | None = None


@dataclass(frozen=True)
class ModelBundle:
    """A loaded bundle's metadata (no model weights are read here)."""

    path: Path
    config: BundleConfig
    labels: tuple[str, ...]
    dictionaries: Dictionaries
    served_at: ServedAt | None = None  # set by :meth:`with_thresholds`

    @classmethod
    def load(cls, path: str | Path, *, dictionaries_dir: str | Path | None = None) -> ModelBundle:
        """Read and check a bundle; ``dictionaries_dir`` replaces the dictionaries it was trained with
        (reviewed exclusion rules deployed without retraining)."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"model bundle {path} does not exist or is not a directory")
        missing = [name for name in _REQUIRED if not (path / name).is_file()]
        if missing:
            raise BundleError(f"model bundle {path} lacks {', '.join(missing)}")
        config = BundleConfig.read(path)
        labels = tuple(json.loads((path / "labels.json").read_text(encoding="utf-8")))
        if len(labels) != config.model.num_classes:
            raise BundleError(f"{path}: {len(labels)} labels but the model has {config.model.num_classes} outputs")
        if dictionaries_dir and not Path(dictionaries_dir).is_dir():
            raise BundleError(f"dictionary directory {dictionaries_dir} does not exist or is not a directory")
        dictionaries = Dictionaries.load(Path(dictionaries_dir) if dictionaries_dir else path / "dictionaries")
        return cls(path=path, config=config, labels=labels, dictionaries=dictionaries)

    @property
    def version(self) -> str:
        return self.config.model_version

    @property
    def threshold(self) -> float:
        """The leaf threshold served: below it the answer is ``uncertain``."""
        return self.served_at.threshold if self.served_at else self.config.threshold

    @property
    def parent_threshold(self) -> float | None:
        """The threshold an uncertain offer's parent category must reach; None: no parent is named."""
        return self.served_at.parent_threshold if self.served_at else self.config.parent_threshold

    @property
    def temperature(self) -> float:
        return self.config.temperature

    @property
    def operating_points(self) -> list[OperatingPoint]:
        """Leaf thresholds the bundle may serve at, each with its coverage, precision, lower bound
        and parent threshold on the held-out offers it was calibrated on, lowest threshold first."""
        return self.config.operating_points

    def operating_point(self, threshold: float) -> OperatingPoint | None:
        """The table's row that serving at leaf ``threshold`` is judged by: the highest tabled
        threshold at or below it (None below the table). Its uncertain offers are a subset of
        ``threshold``'s, the least confident ones, so its parent threshold was chosen on offers no
        easier than those it will be asked about."""
        rows = [row for row in self.operating_points if row.threshold <= threshold]
        return max(rows, key=lambda row: row.threshold) if rows else None

    def with_thresholds(self, *, threshold: float | None = None, parent_threshold: float | None = None) -> ModelBundle:
        """The bundle served at another leaf and/or parent threshold (None keeps the bundle's).

        A parent threshold is chosen for the offers one leaf threshold leaves uncertain, so with
        the leaf threshold overridden and the parent one not, the parent threshold comes from
        :meth:`operating_point` (the bundle's own where the table has no row at or below it).
        :attr:`served_at` records what was overridden and where the parent threshold came from.
        """
        if threshold is None and parent_threshold is None:
            return self
        own = self.config
        served: dict[str, Any] = {
            "threshold": own.threshold,
            "parent_threshold": own.parent_threshold,
            "bundle_threshold": own.threshold,
            "bundle_parent_threshold": own.parent_threshold,
        }
        if threshold is not None and threshold != own.threshold:
            point = self.operating_point(threshold)
            served |= {"threshold": float(threshold), "operating_point": point}
            if parent_threshold is None:
                served |= (
                    {"parent_threshold": point.parent_threshold, "parent_threshold_from": "operating_point"}
                    if point is not None
                    else {"parent_threshold_from": "bundle"}
                )
        if parent_threshold is not None:
            served |= {"parent_threshold": float(parent_threshold), "parent_threshold_from": "override"}
        return dataclasses.replace(self, served_at=ServedAt(**served))

    def served_at_note(self) -> str | None:
        """A sentence on overridden thresholds: where the parent threshold came from, and what the
        operating point gave on the offers the bundle was calibrated on. None for the bundle's own."""
        served = self.served_at
        if served is None:
            return None
        text = f"served at threshold {self.threshold:.4f} (the bundle's: {served.bundle_threshold:.4f})"
        text += (
            " and no parent threshold"
            if self.parent_threshold is None
            else f", parent threshold {self.parent_threshold:.4f}"
        )
        point, source = served.operating_point, served.parent_threshold_from
        if source == "operating_point" and point is not None:
            text += (
                ": none reached the target" if self.parent_threshold is None else ": the one chosen in training"
            ) + (f" on the offers its operating point at {point.threshold:.4f} leaves uncertain")
        elif source == "bundle":
            text += ": the bundle's own, as its operating points start above this threshold"
        elif source == "override":
            text += ", as given"
        if point is not None:
            precision = "–" if point.precision is None else f"{100 * point.precision:.2f}%"
            text += (
                f"; on the offers the bundle was calibrated on, that operating point categorised "
                f"{100 * point.coverage:.2f}% at precision {precision} (lower bound {100 * point.precision_bound:.2f}%)"
            )
        return text

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def embedded_onnx_path(self) -> Path | None:
        """The graph that also gives the offer vectors (``embedder/model.onnx``), None without an embedder."""
        path = self.path / EMBEDDER_DIR / "model.onnx"
        return path if path.is_file() else None

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
            raise BundleError(
                f"{path}: the lexical model scores {model.num_classes} categories, the bundle has {len(self.labels)}"
            )
        return model

    def shop_weights(self) -> ShopWeights:
        """Trust in each shop's own category (``shops.json``); every shop gets 1.0 without it."""
        path = self.path / SHOPS_FILE
        if not path.is_file():
            return ShopWeights()
        data = json.loads(path.read_text(encoding="utf-8"))
        return ShopWeights(weights=data["weights"], default=float(data.get("default", 1.0)))


@dataclass(frozen=True)
class ShopWeights:
    """``mall_id`` → weight in [0, 1] of the shop's own category; unknown shops get ``default``."""

    weights: dict[str, float] = field(default_factory=dict)
    default: float = 1.0

    def __call__(self, mall_id: str | None) -> float:
        return float(self.weights.get(mall_id or "", self.default))
