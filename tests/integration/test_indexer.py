"""The offer indexer against the embedded broker: N predictions in, N offers in the index and N
matched messages out; a planted duplicate is found by every vector; a tombstone deletes; a SIGKILL
mid-stream loses nothing after a restart from the saved index; an unreachable engine is waited
for (readiness 503, no exit) and loses nothing either."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from core.faiss_index import FaissIndex
from core.index_location import open_index
from core.kafka import ensure_topics, producer_config, read_topic
from core.offer_index import IndexUnavailableError, OfferIndexError
from core.schemas import Prediction
from core.similar import similar_offers
from retrieval.indexer import Backoff, OfferIndexer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SPACES = {"image": 8, "text": 8, "fused": 16}


def unit(rng, size):
    vector = rng.normal(size=size)
    return (vector / np.linalg.norm(vector)).astype(np.float16)


def prediction(
    offer_id: str, rng, *, vectors=None, category="Men > Footwear > Shoes", product=None, title=None
) -> bytes:
    return Prediction(
        offer_id=offer_id,
        category=category,
        confidence=0.99,
        top3=[(category, 0.99)],
        model_version="test",
        image_used=True,
        image_status="used",
        timings_ms={},
        vectors=vectors or {space: unit(rng, size) for space, size in SPACES.items()},
        product=product,
        image_sha=None if product is None else "5e" * 32,
        title=title,
    ).to_bytes()


def publish(settings, messages: list[tuple[str, bytes | None]]) -> None:
    producer = Producer(producer_config(settings))
    for key, value in messages:
        producer.produce(settings.categorized_topic, key=key.encode(), value=value)
        producer.poll(0)
    assert producer.flush(30) == 0


def saved_count(path: Path) -> int:
    """Offers in the saved index (0 before the first save; retried across a save's rename)."""
    for _ in range(50):
        try:
            return FaissIndex.open(path).count() if (path / "manifest.json").exists() else 0
        except (OfferIndexError, FileNotFoundError, OSError):
            time.sleep(0.1)
    raise AssertionError(f"{path} stayed unreadable")


def wait_until(condition, deadline: float) -> None:
    """Poll ``condition`` until it holds or ``deadline`` (monotonic) passes; the asserts that
    follow say which."""
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def index_env(settings, **extra: str) -> dict[str, str]:
    """The environment of a ``catstream index`` process on ``settings``' broker, topics and group."""
    return {
        **os.environ,
        "CATSTREAM_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "CATSTREAM_CATEGORIZED_TOPIC": settings.categorized_topic,
        "CATSTREAM_MATCHED_TOPIC": settings.matched_topic,
        "CATSTREAM_INDEX_GROUP": f"index-{settings.consumer_group}",
        **extra,
    }


def test_n_in_n_indexed_duplicates_found_and_a_tombstone_deletes(stream_settings, tmp_path):
    settings = stream_settings.model_copy(update={"index_save_interval_s": 0.5, "match_candidates": 5})
    ensure_topics(settings, extra=(settings.matched_topic,))
    rng = np.random.default_rng(0)
    twin = {space: unit(rng, size) for space, size in SPACES.items()}
    # Two waves, the second published once the first is indexed: a later listing must find the
    # earlier one. (Offers of one consumed batch find each other too, but keys spread over four
    # partitions, so which offers share a batch is up to the consumer: tests/unit/test_candidates.py
    # covers that case.)
    first = [(f"offer-{n}", prediction(f"offer-{n}", rng)) for n in range(300)]
    first += [("twin-a", prediction("twin-a", rng, vectors=twin, product="ab" * 16))]
    # Relistings whose pictures and vectors differ: only their titles can pair them.
    first += [("shop-a", prediction("shop-a", rng, title="Rocia Women Beige Solid Ballerina Flats"))]
    second = [
        ("twin-b", prediction("twin-b", rng, vectors=twin, product="ab" * 16)),
        ("offer-7", prediction("offer-7", rng)),  # redelivered or updated: still one offer
        ("shop-b", prediction("shop-b", rng, title="ROCIA women beige ballerina flats (solid)")),
    ]
    messages = first + second
    location = tmp_path / "index"
    indexer = OfferIndexer(settings, lambda spaces: open_index(str(location), spaces=spaces))
    runner = threading.Thread(target=indexer.run)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        publish(settings, first)
        wait_until(lambda: sum(indexer.positions.values()) >= len(first), deadline)
        publish(settings, second)
        wait_until(lambda: sum(indexer.positions.values()) >= len(messages), deadline)
        publish(settings, [("offer-3", None)])  # a tombstone
        wait_until(lambda: indexer.counts["deleted"] >= 1, deadline)
    finally:
        indexer.stopping = True
        runner.join(30)
    assert not runner.is_alive()
    saved = FaissIndex.open(location)
    assert saved.count() == 304 - 1  # 300, two twins, two relistings, offer-7 once, offer-3 deleted
    assert saved.get("offer-3") is None and saved.get("twin-b") is not None
    assert saved.offsets() and sum(saved.offsets().values()) == len(messages) + 1  # and the tombstone
    matched = read_topic(settings, settings.matched_topic, timeout_s=30, until=lambda ms: len(ms) >= len(messages))
    documents = {m.key().decode(): json.loads(m.value()) for m in matched}
    assert len(documents) == 304
    best = documents["twin-b"]["candidates"][0]
    assert best["offer_id"] == "twin-a" and set(best["scores"]) == set(SPACES)
    assert all(score > 0.99 for score in best["scores"].values())
    assert all(len(d["candidates"]) <= 5 for d in documents.values())
    # First of the lexical ranking, so among the first two of the fusion whatever the vectors say.
    by_id = {c["offer_id"]: (place, c) for place, c in enumerate(documents["shop-b"]["candidates"])}
    place, candidate = by_id["shop-a"]
    assert place <= 1 and candidate["scores"]["lexical"] > 0.5
    # A restarted indexer rebuilds its title index from the saved one.
    again = OfferIndexer(settings, lambda spaces: open_index(str(location), spaces=spaces))
    assert len(again.titles) == 2 and again.titles.search(["rocia flats"], k=1)[0][0][0] in {"shop-a", "shop-b"}
    # The twins are one product: a duplicate to match, never a "similar product" of each other.
    twin_a = saved.get("twin-a")
    assert twin_a is not None and (twin_a.product, twin_a.image_sha) == ("ab" * 16, "5e" * 32)
    similar = similar_offers(saved, twin_a, k=10)
    assert len(similar) == 10 and "twin-b" not in {s.hit.offer_id for s in similar}


def test_a_sigkilled_indexer_resumes_from_its_saved_index_and_loses_nothing(stream_settings, tmp_path):
    ensure_topics(stream_settings, extra=(stream_settings.matched_topic,))
    location = tmp_path / "index"
    env = index_env(stream_settings, CATSTREAM_INDEX_SAVE_INTERVAL_S="0.3")
    command = [sys.executable, "-m", "catstream", "index", "--index-location", str(location)]
    rng = np.random.default_rng(1)
    total = 3000
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    publish(stream_settings, [(f"offer-{n}", prediction(f"offer-{n}", rng)) for n in range(total // 2)])
    deadline = time.monotonic() + 60
    while saved_count(location) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    assert 0 < saved_count(location) <= total // 2
    publish(stream_settings, [(f"offer-{n}", prediction(f"offer-{n}", rng)) for n in range(total // 2, total)])
    second = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while saved_count(location) < total and time.monotonic() < deadline + 60:
            time.sleep(0.2)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.stderr.read().decode()[-2000:]
    saved = FaissIndex.open(location)
    assert saved.count() == total
    assert all(saved.get(f"offer-{n}") is not None for n in range(0, total, 97))


class FlakyEngine:
    """An embedded index that cannot be reached while ``down`` is set, as a Qdrant server that
    is restarting: every call raises IndexUnavailableError."""

    def __init__(self, inner: FaissIndex):
        self.inner = inner
        self.down = True

    def __getattr__(self, name):
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            if self.down:
                raise IndexUnavailableError("connection refused")
            return attribute(*args, **kwargs)

        return call


def test_an_unreachable_engine_is_waited_for_and_nothing_is_lost(stream_settings, tmp_path):
    settings = stream_settings.model_copy(update={"index_save_interval_s": 0.3, "match_candidates": 3})
    ensure_topics(settings, extra=(settings.matched_topic,))
    engine = FlakyEngine(FaissIndex.open(tmp_path / "index", spaces=SPACES))
    opened = []

    def open_engine(spaces):
        if engine.down:
            raise IndexUnavailableError("connection refused")
        opened.append(spaces)
        return engine if spaces is not None else None

    indexer = OfferIndexer(settings, open_engine)
    assert indexer.unavailable == "connection refused" and indexer.index is None  # no crash at start
    indexer.backoff = Backoff(first_s=0.05, max_s=0.2, seed=0)
    runner = threading.Thread(target=indexer.run)
    runner.start()
    rng = np.random.default_rng(2)
    try:
        publish(settings, [(f"flaky-{n}", prediction(f"flaky-{n}", rng)) for n in range(200)])
        deadline = time.monotonic() + 60
        wait_until(lambda: indexer.counts["index_unavailable"] >= 5, deadline)
        assert indexer.unavailable and indexer.counts["upserted"] == 0 and indexer.positions == {}
        engine.down = False  # the server is back
        wait_until(lambda: indexer.counts["upserted"] >= 200, deadline)
        assert indexer.unavailable is None
        # Down again mid-stream: the batch at hand waits, then goes in.
        engine.down = True
        publish(settings, [(f"late-{n}", prediction(f"late-{n}", rng)) for n in range(50)])
        failures = indexer.counts["index_unavailable"]
        wait_until(lambda: indexer.counts["index_unavailable"] >= failures + 3, deadline)
        assert indexer.counts["upserted"] == 200
        engine.down = False
        wait_until(lambda: indexer.counts["upserted"] >= 250, deadline)
    finally:
        indexer.stopping = True
        runner.join(30)
    assert not runner.is_alive()
    saved = FaissIndex.open(tmp_path / "index")
    assert saved.count() == 250 and sum(saved.offsets().values()) == 250
    matched = read_topic(settings, settings.matched_topic, timeout_s=30, until=lambda ms: len(ms) >= 250)
    assert len({m.key() for m in matched}) == 250


def test_catstream_index_with_qdrant_unreachable_stays_up_not_ready_and_stops_cleanly(stream_settings):
    ensure_topics(stream_settings, extra=(stream_settings.matched_topic,))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    env = index_env(stream_settings)
    command = [
        sys.executable, "-m", "catstream", "index", "--index-location", f"qdrant+http://127.0.0.1:{dead_port}",
        "--http-port", str(http_port),
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        events = ""
        while 'event="index_unavailable"} 3' not in events and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]  # no exit, no crash loop
            time.sleep(0.2)
            with contextlib.suppress(OSError):
                events = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert 'event="index_unavailable"} 3' in events
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200  # alive: no restart wanted
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"{base}/readyz", timeout=5)
        assert not_ready.value.code == 503 and b"cannot be reached" in not_ready.value.read()
        with pytest.raises(urllib.error.HTTPError) as query:
            urllib.request.urlopen(f"{base}/similar/x", timeout=5)
        assert query.value.code == 503
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    log = process.stderr.read().decode()
    assert code == 0, log[-3000:]
    assert "cannot be reached" in log and "next try in" in log and "Traceback" not in log
