"""``catstream train-embedder`` and ``evaluate-retrieval`` as a user runs them, on the synthetic
marketplace and the session's small bundle: the embedder is written, the report holds every
section with figures in range, and bad input is a readable error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.test_cli import catstream

pytestmark = pytest.mark.integration


def test_train_embedder_then_evaluate_retrieval(tmp_path, marketplace, bundle):
    bundle = Path(shutil.copytree(bundle, tmp_path / "bundle"))  # the session's bundle stays without one
    embedder = bundle / "embedder"
    trained = catstream(
        "train-embedder", "--data", str(marketplace), "--model", str(bundle),
        "--epochs", "2", "--dim", "16", "--threads", "2", "--feature-cache", str(tmp_path / "cache"),
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (embedder / "model.pt").is_file() and (embedder / "model.onnx").is_file()
    assert "attached to the classifier graph" in trained.stdout
    config = json.loads((embedder / "config.json").read_text())
    assert config["embedder"]["dim"] == 16 and len(config["history"]) == 2
    assert config["products"]["train"] > 0 and config["products"]["test"] > 0
    report = json.loads((embedder / "retrieval-evaluation.json").read_text())
    methods = report["matching"]["methods"]
    assert {"fused (embedding)", "BM25 (rewritten title)", "ImageNet MobileNetV2 (image)"} <= set(methods)
    assert all(0.0 <= figures["recall@10"] <= 1.0 for figures in methods.values())
    assert report["matching"]["queries"] > 0
    similar = report["similar"]
    assert similar["filled_share"] == 1.0 and similar["duplicates_of_the_query_product"] == 0
    assert "skipped" in report["cold_start"]  # the synthetic file has no colour column
    assert "## Duplicate matching" in trained.stdout

    again = catstream(
        "evaluate-retrieval", "--data", str(marketplace), "--model", str(bundle), "--embedder", str(embedder),
        "--queries", "50", "--out", str(tmp_path / "report"), "--feature-cache", str(tmp_path / "cache"),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((tmp_path / "report" / "retrieval-evaluation.json").read_text())
    assert 0 < second["similar"]["queries"] <= 50  # matching has fewer: products with two listings only
    assert second["setup"]["test_products"] == report["setup"]["test_products"]  # the same held-out products


def test_retrieval_commands_reject_bad_input_readably(tmp_path, marketplace, bundle):
    missing = catstream(
        "evaluate-retrieval", "--data", str(marketplace), "--model", str(bundle), "--embedder", str(tmp_path)
    )
    assert missing.returncode == 2 and "no embedder at" in missing.stderr and "Traceback" not in missing.stderr
    queries = catstream("evaluate-retrieval", "--data", str(marketplace), "--model", str(bundle), "--queries", "0")
    assert queries.returncode == 2 and "--queries must be in 1..100000" in queries.stderr
    epochs = catstream("train-embedder", "--data", str(marketplace), "--model", str(bundle), "--epochs", "0")
    assert epochs.returncode == 2 and "--epochs must be at least 1" in epochs.stderr
