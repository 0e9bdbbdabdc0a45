"""Bundle stage of training: everything a trained model needs to be served and rebuilt, written
into one directory (``core.bundle`` describes the files and reads them back)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.bundle import SHOPS_FILE, BundleConfig, TrainingOffers
from core.lexical import LEXICAL_DIR, LexicalModel
from core.model import FusionModel
from core.offer_files import offer_fingerprints
from training.features import Prepared
from training.machine import describe_machine
from training.options import TrainOptions

__all__ = ["write_bundle"]

_VALIDATION_KEYS = (
    "accuracy",
    "coverage",
    "precision",
    "precision_bound",
    "design_effect",
    "target_reached",
    "tested_from",
    "parents",
)


def write_bundle(
    out_dir: Path,
    *,
    data: str | Path,
    prepared: Prepared,
    options: TrainOptions,
    model: FusionModel,
    lexical: LexicalModel | None,
    calibration: dict[str, Any],
    history: list[dict],
    cleaning_report: dict,
    parity: float,
    stages: dict[str, float],
    started: float,
) -> BundleConfig:
    """Write the bundle's files next to ``model.onnx`` (already exported into ``out_dir``) and its
    ``config.json``; returns the config. ``started`` is the ``time.monotonic()`` training began at."""
    torch.save(model.state_dict(), out_dir / "model.pt")
    shutil.rmtree(out_dir / LEXICAL_DIR, ignore_errors=True)  # a stale one from an earlier run must not serve
    if lexical is not None:
        lexical.save(out_dir / LEXICAL_DIR)
    _copy_dictionaries(Path(options.dictionaries or ""), out_dir / "dictionaries", exclusions=options.use_exclusions)
    seen = prepared.frame.iloc[np.sort(np.concatenate([prepared.split.train, prepared.split.validation]))]
    TrainingOffers.save(out_dir, seen["offer_id"].tolist(), offer_fingerprints(seen))
    (out_dir / "labels.json").write_text(json.dumps(list(prepared.labels), ensure_ascii=False, indent=1))
    (out_dir / SHOPS_FILE).write_text(
        json.dumps(
            {
                "default": 1.0,
                "weights": prepared.shop_weights,
                "evidence": prepared.shop_table.to_dict(orient="records"),
            },
            indent=1,
        )
    )

    digest = hashlib.sha256((out_dir / "model.onnx").read_bytes()).hexdigest()[:12]
    now = dt.datetime.now(dt.UTC)
    config = BundleConfig(
        model_version=f"{now:%Y%m%dT%H%M%S}-{digest}",
        created_at=now.isoformat(timespec="seconds"),
        model=model.config,
        threshold=calibration["threshold"],
        parent_threshold=calibration["parent_threshold"],
        temperature=calibration["temperature"],
        operating_points=calibration["operating_points"],
        pretrained_image_weights=str(prepared.pretrained_weights) if prepared.pretrained_weights else None,
        training={
            "data": str(Path(data).resolve()),
            "data_fingerprint": prepared.report["fingerprint"],
            "labels": {
                "label_columns": options.label_columns,
                "min_label_count": options.min_label_count,
                "rare_leaves": options.rare_leaves,
            },
            "split": options.split_spec.to_dict(),
            "calibration": {
                "mode": options.calibration,
                "offers": calibration["offers"],
                "folds": calibration.get("folds"),
                "target_precision": options.target_precision,
                "threshold_confidence": options.threshold_confidence,
                "threshold_by": options.threshold_by,
                "fold_title_groups": calibration.get("fold_title_groups"),
            },
            "validation": {key: calibration[key] for key in _VALIDATION_KEYS},
            "options": _json_ready(options.to_dict()),
            "data_report": _json_ready(prepared.report | cleaning_report),
            "history": history,
            "lexical": (
                calibration.get("lexical", {}) | {"features": lexical.num_features if lexical else 0}
                if options.lexical
                else None
            ),
            "onnx_parity_max_abs_diff": parity,
            "stage_seconds": {key: round(value, 1) for key, value in stages.items()},
            "seconds": round(time.monotonic() - started, 1),
            "device": str(prepared.device),
            "threads": options.threads,
            "machine": describe_machine(),
        },
    )
    config.write(out_dir)
    return config


def _copy_dictionaries(source: Path, target: Path, *, exclusions: bool) -> None:
    """The dictionaries the model was trained with; without the exclusions (the ablation's row
    without the dictionary), only the ambiguous terms, so that it serves without the mask too."""
    if exclusions:
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        return
    target.mkdir(exist_ok=True)
    if (source / "ambiguous_terms.tsv").is_file():
        shutil.copy(source / "ambiguous_terms.tsv", target / "ambiguous_terms.tsv")


def _json_ready(value: Any) -> Any:
    """``value`` with tuples as lists and numpy scalars as Python numbers, as JSON keeps them."""
    return json.loads(json.dumps(value, default=lambda item: item.item() if hasattr(item, "item") else str(item)))
