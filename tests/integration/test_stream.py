"""The stream against the embedded broker, real ONNX Runtime, real processes. Exact counts."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import time

import pytest
from confluent_kafka import Consumer, TopicPartition
from PIL import Image

from core.bundle import ModelBundle
from core.decision import ParentCategories
from core.kafka import client_config, read_topic
from core.offer_files import offers_from_frame, read_offer_file
from core.schemas import SCHEMA_VERSION, UNCERTAIN, Offer
from core.scoring import served_probabilities
from producers.publish import publish_offers, publish_raw
from tests.conftest import read_prediction_messages, read_predictions

pytestmark = pytest.mark.integration


def stream_offers(marketplace, n):
    return list(offers_from_frame(read_offer_file(marketplace).head(n)))


def committed_offsets(settings) -> dict[int, int]:
    consumer = Consumer(client_config(settings) | {"group.id": settings.consumer_group})
    try:
        partitions = [TopicPartition(settings.offers_topic, p) for p in range(settings.topic_partitions)]
        # A partition nothing was committed for yet reports a negative sentinel: position 0.
        return {tp.partition: max(0, tp.offset) for tp in consumer.committed(partitions, timeout=10)}
    finally:
        consumer.close()


def test_n_offers_in_n_distinct_offer_ids_out(marketplace, bundle, stream_settings, start_node):
    offers = stream_offers(marketplace, 300)
    png = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 80, 140)).save(png, format="PNG")
    offers += [
        Offer(
            offer_id="ko-1",
            title="Aurora 여성 블랙 원피스 무료배송",
            mall_id="mall-hana",
            image_b64=base64.b64encode(png.getvalue()).decode(),
        ),
        Offer(offer_id="ko-2", title="키즈 운동화", image_url="http://127.0.0.1:9/x.jpg"),  # loopback: refused
        Offer(offer_id="ko-3", title="전기장판 특가"),
    ]
    # The small bundle's noisy synthetic labels leave it no parent threshold that reaches its target;
    # the operator's override names parents anyway.
    node = start_node(workers=2, env={"CATSTREAM_PARENT_THRESHOLD": "0.9"})
    publish_offers(offers, stream_settings, progress=False)
    ids = {offer.offer_id for offer in offers}
    predictions = read_predictions(stream_settings, ids)
    by_id = {p["offer_id"]: p for p in predictions}
    assert set(by_id) == ids
    assert node.stop() == 0

    for prediction in by_id.values():
        assert prediction["schema_version"] == SCHEMA_VERSION
        assert len(prediction["top3"]) == 3
        assert prediction["category"] in (UNCERTAIN, prediction["top3"][0]["category"])
        assert {"preprocess", "queue_wait", "inference", "batch_size", "end_to_end"} <= set(prediction["timings_ms"])
    assert by_id["ko-1"]["image_used"] is True
    assert (by_id["ko-2"]["image_used"], by_id["ko-2"]["image_status"]) == (False, "refused")
    assert by_id["ko-3"]["image_status"] == "absent"
    # The exclusion dictionary: "여성" (women) rules out the men's and kids' branches.
    assert not any(c["category"].startswith(("Men", "Kids")) for c in by_id["ko-1"]["top3"][:1])
    assert by_id["ko-1"]["excluded_categories"] > 0
    # A trained model, not noise: most synthetic offers are right.
    truth = dict(
        zip(
            *[read_offer_file(marketplace, label_columns=["true_category"])[c] for c in ("offer_id", "label")],
            strict=True,
        )
    )
    right = sum(by_id[i]["top3"][0]["category"] == truth[i] for i in truth if i in by_id)
    assert right / 300 > 0.85
    # The stream serves exactly the offline model: network logits + the lexical model's scores,
    # which travel from the preprocess workers through the queue.
    loaded = ModelBundle.load(bundle)
    _, masked = served_probabilities(loaded, offers[:300])
    streamed = [by_id[o.offer_id]["confidence"] for o in offers[:300]]
    assert streamed == pytest.approx(masked.max(1).tolist(), abs=1e-4)
    # ...and names the same parent category where the leaf is uncertain, none where it is not.
    parents = ParentCategories.of(loaded.labels)
    parent, _ = parents.confident(masked, 0.9)
    uncertain = masked.max(1) < loaded.threshold
    expected = [parents.names[k] if doubt and k >= 0 else None for k, doubt in zip(parent, uncertain, strict=True)]
    assert [(by_id[o.offer_id]["confident_parent"] or {}).get("category") for o in offers[:300]] == expected
    assert any(expected)
    # Every offset was committed past.
    assert sum(committed_offsets(stream_settings).values()) == len(offers)


def test_an_offers_time_in_the_node_counts_its_wait_behind_the_offers_taken_with_it(
    marketplace, stream_settings, start_node
):
    """A backlog published before the node starts reaches one worker in batches of up to 64: each
    offer's preprocess time runs from its batch being taken, so it includes featurising the ones
    before it. Counted from its own turn, one worker's preprocess times could add up to no more
    than the time it was busy, from the first offer taken to the last prediction."""
    offers = stream_offers(marketplace, 200)
    publish_offers(offers, stream_settings, progress=False)
    node = start_node(workers=1)
    ids = {o.offer_id for o in offers}
    messages = read_prediction_messages(stream_settings, ids)
    assert node.stop() == 0
    first = {}
    for message in messages:
        first.setdefault(message.key().decode(), (message.timestamp()[1], json.loads(message.value())["timings_ms"]))
    assert set(first) == ids
    taken_ms = min(at - t["preprocess"] - t["queue_wait"] - t["inference"] for at, t in first.values())
    busy_ms = max(at for at, _ in first.values()) - taken_ms
    waited_ms = sum(t["preprocess"] for _, t in first.values())
    assert waited_ms > 2 * busy_ms, (waited_ms, busy_ms)


def test_malformed_messages_are_dead_lettered_while_good_ones_flow(marketplace, stream_settings, start_node):
    good = stream_offers(marketplace, 60)
    bad = [
        b"{not json",
        b'{"offer_id": "x1"}',
        b'{"offer_id": "x2", "title": ["a"]}',
        b'{"offer_id": "x3", "title": "\xed\x95 broken"}',
        b"null",
        json.dumps({"offer_id": "x4", "title": "big " * 1000}).encode(),  # over the 2 KiB limit below
    ]
    messages = [(o.offer_id.encode(), o.to_bytes()) for o in good]
    for i, raw in enumerate(bad):  # interleave
        messages.insert(i * 10 + 5, (f"bad-{i}".encode(), raw))
    node = start_node(env={"CATSTREAM_MAX_MESSAGE_BYTES": "2048"})
    publish_raw(messages, stream_settings)

    predictions = read_predictions(stream_settings, {o.offer_id for o in good})
    dead = read_topic(
        stream_settings, stream_settings.dead_letter_topic, until=lambda ms: len(ms) >= len(bad), timeout_s=60
    )
    time.sleep(1.0)
    assert node.stop() == 0
    assert len({p["offer_id"] for p in predictions}) == len(good)
    assert len(dead) == len(bad)
    assert sorted(m.value() for m in dead) == sorted(bad)  # original bytes, untouched
    for message in dead:
        headers = dict(message.headers())
        assert headers["catstream.stage"] == b"parse"
        assert headers["catstream.reason"] and headers["catstream.error_type"]
        assert headers["catstream.source"].startswith(stream_settings.offers_topic.encode())
    reasons = {dict(m.headers())["catstream.error_type"] for m in dead}
    assert {b"OversizedMessage", b"SchemaError", b"UnicodeDecodeError"} <= reasons
    # Dead-lettered offsets count as done: the group committed past every message.
    assert sum(committed_offsets(stream_settings).values()) == len(messages)


def test_sigkill_of_a_preprocess_worker_loses_no_offer(marketplace, stream_settings, start_node):
    offers = stream_offers(marketplace, 1500)
    node = start_node(workers=2, env={"CATSTREAM_SLOTS_PER_WORKER": "16", "CATSTREAM_MAX_BUFFERED_MESSAGES": "256"})
    victim = node.worker_pids()[0]
    publish_offers(offers, stream_settings, progress=False)
    read_topic(stream_settings, stream_settings.categorized_topic, until=lambda ms: len(ms) >= 150, timeout_s=90)
    os.kill(victim, signal.SIGKILL)

    ids = {o.offer_id for o in offers}
    predictions = read_predictions(stream_settings, ids, timeout_s=180)
    distinct = {p["offer_id"] for p in predictions}
    assert distinct == ids, f"lost {len(ids - distinct)} offers"
    assert "died (exit -9); restarting" in node.log()
    assert node.stop() == 0
    assert sum(committed_offsets(stream_settings).values()) == len(offers)
    # 16 slots and 256 buffered per worker against a 1500-offer backlog: the workers must have
    # paused, not blocked.
    assert any(int(n) > 0 for n in re.findall(r"'pauses': (\d+)", node.log()))
    print(f"duplicates after SIGKILL: {len(predictions) - len(distinct)}")


def test_sigterm_finishes_in_flight_work_commits_and_exits_within_10s(marketplace, stream_settings, start_node):
    offers = stream_offers(marketplace, 1500)
    node = start_node(workers=1)
    publish_offers(offers, stream_settings, progress=False)
    read_topic(stream_settings, stream_settings.categorized_topic, until=lambda ms: len(ms) >= 100, timeout_s=90)

    started = time.monotonic()
    node.process.send_signal(signal.SIGTERM)
    code = node.process.wait(timeout=30)
    elapsed = time.monotonic() - started
    assert code == 0 and elapsed < 10.0, f"exit {code} after {elapsed:.1f} s"
    assert "still in flight at exit" not in node.log()

    committed = committed_offsets(stream_settings)
    assert sum(committed.values()) >= 100
    produced = read_topic(stream_settings, stream_settings.offers_topic, until=lambda ms: len(ms) >= len(offers))
    outputs = {m.key().decode() for m in read_topic(stream_settings, stream_settings.categorized_topic, idle_s=2.0)}
    below_commit = {m.key().decode() for m in produced if m.offset() < committed[m.partition()]}
    assert below_commit and below_commit <= outputs  # everything committed has its prediction

    # A new node takes over from the committed offsets and finishes the rest.
    start_node(workers=1)
    final = read_predictions(stream_settings, {o.offer_id for o in offers}, timeout_s=180)
    assert {p["offer_id"] for p in final} == {o.offer_id for o in offers}
