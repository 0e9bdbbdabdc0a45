"""The index's query service over real HTTP, on an index of the synthetic marketplace embedded by
the small bundle's attached graph: answers, and a clear 4xx for every kind of bad input."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from catstream.query_service import QueryService
from core.bundle import ModelBundle
from core.faiss_index import FaissIndex
from core.offer_files import LABEL, offers_from_frame, read_offer_file
from core.offer_index import IndexedOffer
from core.scoring import OfferEmbedder

pytestmark = pytest.mark.integration


def call(port: int, path: str, body: bytes | None = None) -> tuple[int, dict | str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            status, text = answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.fixture(scope="module")
def served(marketplace, embedded_bundle):
    frame = read_offer_file(marketplace, label_columns=["category"]).head(400)
    offers = list(offers_from_frame(frame))
    embedder = OfferEmbedder(ModelBundle.load(embedded_bundle))
    vectors = embedder.embed(offers)
    index = FaissIndex({space: matrix.shape[1] for space, matrix in vectors.items()})
    index.upsert(
        [
            IndexedOffer(offer.offer_id, label, {space: vectors[space][row] for space in vectors})
            for row, (offer, label) in enumerate(zip(offers, frame[LABEL], strict=True))
        ]
    )
    lock = threading.Lock()
    service = QueryService(lambda: index, lock, embedder=embedder).start("127.0.0.1", 0)
    without_model = QueryService(lambda: index, lock).start("127.0.0.1", 0)
    empty = QueryService(lambda: None, lock, embedder=embedder).start("127.0.0.1", 0)
    yield service, without_model, empty, offers, frame
    for running in (service, without_model, empty):
        running.stop()


def test_similar_search_and_match_answer(served):
    service, _, _, offers, frame = served
    query = offers[0]
    status, body = call(service.port, f"/similar/{query.offer_id}?k=5")
    assert status == 200 and len(body["results"]) == 5
    assert query.offer_id not in {r["offer_id"] for r in body["results"]}
    leaf = frame[LABEL].iloc[0]
    assert all(r["category"] == leaf for r in body["results"] if r["level"] == 0)

    status, body = call(service.port, "/search", json.dumps({"q": query.title, "k": 3}).encode())
    assert status == 200 and len(body["results"]) == 3 and body["rank_on"] == "text"
    status, body = call(
        service.port, "/search", json.dumps({"q": query.title, "k": 3, "rank_on": "image", "category": leaf}).encode()
    )
    assert status == 200 and all(r["category"] == leaf for r in body["results"])

    status, body = call(service.port, "/match?k=4", json.dumps({"offer_id": "new-1", "title": query.title}).encode())
    assert status == 200 and body["offer_id"] == "new-1" and 0 < len(body["candidates"]) <= 4
    assert {"offer_id", "score", "scores"} <= set(body["candidates"][0])

    status, text = call(service.port, "/metrics")
    assert status == 200 and "catstream_index_offers 400" in text
    assert 'catstream_query_requests_total{route="similar",status="200"} 1' in text
    assert call(service.port, "/readyz")[0] == 200 and call(service.port, "/healthz")[0] == 200


@pytest.mark.parametrize(
    "path, body, status, reason",
    [
        ("/similar/no-such-offer", None, 404, "no offer 'no-such-offer'"),
        ("/similar/{known}?k=0", None, 400, "k must be in 1..1000"),
        ("/similar/{known}?k=1001", None, 400, "k must be in 1..1000"),
        ("/similar/{known}?k=ten", None, 400, "k must be an integer"),
        ("/search", b'{"q": ""}', 400, "q must be a non-empty string"),
        ("/search", b'{"q": "  "}', 400, "q must be a non-empty string"),
        ("/search", b'{"q": "shoes", "k": 0}', 400, "k must be in 1..1000"),
        ("/search", b'{"q": "shoes", "rank_on": "price"}', 400, "rank_on must be text or image"),
        ("/search", b"not json", 400, "the body is not JSON"),
        ("/search", b"[1, 2]", 400, "the body must be a JSON object"),
        ("/match", b'{"offer_id": "x"}', 400, "not an offer"),
        ("/nowhere", None, 404, "not found"),
    ],
)
def test_bad_input_is_a_clear_4xx(served, path, body, status, reason):
    service, _, _, offers, _ = served
    answer = call(service.port, path.replace("{known}", offers[0].offer_id), body)
    assert answer[0] == status and reason in answer[1]["error"]


def test_too_big_a_body_no_model_and_no_index_are_refused_readably(served):
    service, without_model, empty, offers, _ = served
    huge = json.dumps({"q": "x" * 1_100_000}).encode()
    assert call(service.port, "/search", huge)[0] == 413
    status, body = call(without_model.port, "/search", b'{"q": "shoes"}')
    assert status == 503 and "--model" in body["error"]
    assert call(without_model.port, f"/similar/{offers[0].offer_id}")[0] == 200  # needs no model
    status, body = call(empty.port, f"/similar/{offers[0].offer_id}")
    assert status == 503 and "index is empty" in body["error"]
    assert call(empty.port, "/readyz")[0] == 503
