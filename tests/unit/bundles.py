"""A complete bundle config.json for unit tests of what reads it."""

from core.bundle import BUNDLE_FORMAT

POINTS = [
    {
        "threshold": t,
        "coverage": c,
        "precision": 0.99,
        "precision_bound": b,
        "parent_threshold": p,
        "parent_offers": 10,
        "parent_precision": 1.0,
    }
    for t, c, b, p in ((0.0, 1.0, 0.97, None), (0.9, 0.95, 0.985, 0.99), (0.99, 0.9, 0.996, 0.9))
]
PARENTS = {
    "uncertain": 10,
    "answered": 8,
    "precision": 1.0,
    "precision_bound": 0.9,
    "design_effect": 1.0,
    "target_reached": True,
}


def config_document(**overrides) -> dict:
    """A complete format-3 config.json, as training writes it."""
    document = {
        "bundle_format": BUNDLE_FORMAT,
        "model_version": "20261207T000000-abc",
        "created_at": "2026-12-07T00:00:00",
        "model": {
            "num_classes": 2,
            "vocab_size": 100,
            "image_size": 32,
            "max_title_tokens": 8,
            "max_mall_tokens": 4,
            "text_dim": 16,
            "char_buckets": 0,
            "max_title_grams": 0,
            "fusion_hidden": 32,
            "dropout": 0.1,
            "bigram_buckets": 50_000,
            "image_dim": 256,
        },
        "threshold": 0.99,
        "parent_threshold": 0.95,
        "temperature": 1.5,
        "operating_points": POINTS,
        "pretrained_image_weights": None,
        "training": {
            "data": "/data/offers.csv",
            "data_fingerprint": "f" * 16,
            "labels": {"label_columns": ["category"], "min_label_count": 5, "rare_leaves": "exclude"},
            "split": {"protocol": "random", "test_share": 0.2, "validation_share": 0.1, "seed": 0},
            "calibration": {
                "mode": "crossfit",
                "offers": 100,
                "folds": 4,
                "target_precision": 0.995,
                "threshold_confidence": 0.95,
                "threshold_by": "product",
                "fold_title_groups": None,
            },
            "validation": {
                "accuracy": 0.98,
                "coverage": 0.9,
                "precision": 0.996,
                "precision_bound": 0.995,
                "design_effect": 1.2,
                "target_reached": True,
                "tested_from": 0.5,
                "parents": PARENTS,
            },
            "options": {"epochs": 12},
            "data_report": {"fingerprint": "f" * 16},
            "history": [{"epoch": 1.0}],
            "lexical": None,
            "onnx_parity_max_abs_diff": 1e-6,
            "stage_seconds": {"fit": 1.0},
            "seconds": 2.0,
            "device": "cpu",
            "threads": 2,
            "machine": {},
        },
    }
    return document | overrides
