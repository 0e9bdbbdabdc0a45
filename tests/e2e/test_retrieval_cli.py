"""``catstream train-embedder``, ``evaluate-retrieval`` and ``query`` as a user runs them, on the synthetic
marketplace and the session's small bundle: the embedder is written, the report holds every
section with figures in range, and bad input is a readable error."""

from __future__ import annotations

import base64
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
    assert {
        "fused (embedding)",
        "BM25 (rewritten title)",
        "ImageNet MobileNetV2 (image)",
        "classifier's penultimate layer (image + rewritten title)",
        "fused + lexical (rank fusion, as the indexer)",
    } <= set(methods)
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


@pytest.fixture(scope="module")
def saved_index(tmp_path_factory, marketplace, embedded_bundle) -> tuple[Path, list]:
    """200 synthetic offers embedded by the bundle and saved as an embedded index, as
    ``catstream index`` leaves one."""
    import pandas as pd

    from core.bundle import ModelBundle
    from core.faiss_index import FaissIndex
    from core.images import ImagePolicy
    from core.offer_files import offers_from_frame, read_offer_file
    from core.offer_index import IndexedOffer
    from core.scoring import OfferEmbedder
    from core.text import product_key

    offers = list(offers_from_frame(read_offer_file(marketplace).head(200)))
    category = pd.read_csv(marketplace).set_index("offer_id")["category"]
    embedder = OfferEmbedder(ModelBundle.load(embedded_bundle), image_policy=ImagePolicy.for_offer_files())
    vectors = embedder.embed(offers)
    location = tmp_path_factory.mktemp("query") / "index"
    index = FaissIndex.open(location, spaces={space: matrix.shape[1] for space, matrix in vectors.items()})
    index.upsert(
        [
            IndexedOffer(
                offer_id=offer.offer_id,
                category=category[offer.offer_id],
                vectors={space: matrix[row] for space, matrix in vectors.items()},
                product=product_key(offer.title),
            )
            for row, offer in enumerate(offers)
        ]
    )
    index.save({("offers.categorized", 0): len(offers)})
    return location, offers


def test_query_operations_from_the_cli(tmp_path, saved_index, embedded_bundle):
    from core.images import ImagePolicy, image_bytes

    location, offers = saved_index
    where = ("--index-location", str(location))
    similar = catstream("query", "similar", offers[0].offer_id, "-k", "5", *where)
    assert similar.returncode == 0, similar.stderr[-3000:]
    answer = json.loads(similar.stdout)
    assert len(answer["results"]) == 5 and offers[0].offer_id not in {r["offer_id"] for r in answer["results"]}
    assert [r["level"] for r in answer["results"]] == sorted(r["level"] for r in answer["results"])

    found = catstream(
        "query", "search", "women dress", "--rank-on", "image", "-k", "3", "--model", str(embedded_bundle), *where
    )
    assert found.returncode == 0, found.stderr[-3000:]
    assert json.loads(found.stdout)["rank_on"] == "image" and len(json.loads(found.stdout)["results"]) == 3

    # A relisting of an indexed offer under a new id, image inlined: the original is its best match.
    original = offers[1]
    relisted = {"offer_id": "relisted-1", "title": original.title, "mall_category": original.mall_category}
    image = image_bytes(image_url=original.image_url, image_b64=None, policy=ImagePolicy.for_offer_files())
    relisted["image_b64"] = base64.b64encode(image).decode()
    (tmp_path / "offer.json").write_text(json.dumps(relisted))
    matched = catstream("query", "match", str(tmp_path / "offer.json"), "--model", str(embedded_bundle), *where)
    assert matched.returncode == 0, matched.stderr[-3000:]
    best = json.loads(matched.stdout)["candidates"][0]
    assert best["offer_id"] == original.offer_id and best["score"] > 0.99


def test_query_errors_are_readable(tmp_path, saved_index, embedded_bundle):
    location, _ = saved_index
    where = ("--index-location", str(location))
    for args, message in [
        (("similar", "no-such-offer", *where), "no offer 'no-such-offer' in the index"),
        (("similar", "x", "-k", "0", *where), "k must be in 1..1000"),
        (("search", "shoes", *where), "give --model"),
        (("search", " ", "--model", str(embedded_bundle), *where), "q must be a non-empty string"),
        (("similar", "x", "--index-location", str(tmp_path / "none")), "no offer index at"),
    ]:
        answer = catstream("query", *args)
        assert answer.returncode == 2 and message in answer.stderr, (args, answer.stderr[-2000:])
        assert "Traceback" not in answer.stderr
