"""Hostile input against a running node: the embedded broker, real processes, real servers. No
message, of any size or content, may end a worker, make it read local files or reach internal
hosts, or hold it past its deadlines; every image failure still ends as a prediction from the text."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import socket
import threading
import time

import pytest
from confluent_kafka import Producer
from PIL import Image

from core.kafka import producer_config, read_topic
from core.schemas import Offer
from tests.conftest import read_predictions
from tests.integration.test_stream import committed_offsets

pytestmark = pytest.mark.integration


def publish(settings, messages: list[tuple[bytes, bytes]]) -> None:
    """Publish as a shop's own producer might: with a larger message limit than ours."""
    producer = Producer(producer_config(settings, **{"message.max.bytes": 4_000_000}))
    for key, value in messages:
        producer.produce(settings.offers_topic, key=key, value=value)
    assert producer.flush(30) == 0


class Listener:
    """A loopback TCP listener that counts connections and answers nothing (or ``answer``)."""

    def __init__(self, answer=None):
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            if self._answer:
                threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def close(self):
        self._listener.close()


def offer(offer_id: str, **fields) -> tuple[bytes, bytes]:
    return offer_id.encode(), Offer(offer_id=offer_id, title="Aurora women black dress", **fields).to_bytes()


def test_a_message_too_large_for_the_dead_letter_topic_is_dead_lettered_cut_and_the_worker_lives(
    stream_settings, start_node
):
    poison = b"\x00not json " + bytes(range(256)) * 4700  # 1.2 MB, within the parser's 2 MB limit
    good = [offer(f"good-{i}") for i in range(20)]
    node = start_node(workers=1)
    publish(stream_settings, [good[0], (b"poison", poison), *good[1:]])
    predictions = read_predictions(stream_settings, {key.decode() for key, _ in good})
    dead = read_topic(stream_settings, stream_settings.dead_letter_topic, until=lambda ms: len(ms) >= 1, timeout_s=60)
    time.sleep(1.5)  # one more commit interval
    assert node.stop() == 0
    assert {p["offer_id"] for p in predictions} == {key.decode() for key, _ in good}
    (letter,) = dead
    headers = dict(letter.headers())
    assert headers["catstream.stage"] == b"parse" and headers["catstream.truncated"] == b"value"
    assert headers["catstream.original_bytes"] == str(len(poison)).encode()
    assert headers["catstream.original_sha256"] == hashlib.sha256(poison).hexdigest().encode()
    assert poison.startswith(letter.value()) and 500_000 < len(letter.value()) < 900_000
    assert "died" not in node.log() and "Traceback" not in node.log()
    assert sum(committed_offsets(stream_settings).values()) == len(good) + 1  # the offset moved on


def test_images_the_policy_refuses_are_never_read_nor_fetched_and_the_offer_is_still_categorised(
    stream_settings, start_node, tmp_path
):
    internal = Listener()
    ftp = Listener()

    def redirect_to_ftp(connection):
        connection.recv(65536)
        connection.sendall(
            f"HTTP/1.1 302 Found\r\nLocation: ftp://127.0.0.1:{ftp.port}/x\r\nContent-Length: 0\r\n\r\n".encode()
        )
        connection.close()

    redirector = Listener(redirect_to_ftp)
    messages = [
        offer("local-path", image_url="/etc/shadow"),
        offer("local-proc", image_url="/proc/self/environ"),
        offer("local-device", image_url="/dev/ptmx"),
        offer("file-url", image_url="file:///etc/passwd"),
        offer("loopback", image_url=f"http://127.0.0.1:{internal.port}/x.png"),
        offer("metadata", image_url="http://169.254.169.254/latest/meta-data/"),
        offer("ftp", image_url=f"ftp://127.0.0.1:{ftp.port}/x.png"),
        offer("gopher", image_url="gopher://127.0.0.1/x"),
    ]
    node = start_node(workers=1)
    publish(stream_settings, messages)
    by_id = {p["offer_id"]: p for p in read_predictions(stream_settings, {k.decode() for k, _ in messages})}
    node.stop()
    statuses = {offer_id: (p["image_status"], p["image_used"]) for offer_id, p in by_id.items()}
    assert statuses == {
        "local-path": ("refused", False),
        "local-proc": ("refused", False),
        "local-device": ("refused", False),
        "file-url": ("refused", False),
        "loopback": ("refused", False),
        "metadata": ("refused", False),
        "ftp": ("unsupported_url", False),
        "gopher": ("unsupported_url", False),
    }
    assert internal.connections == 0 and ftp.connections == 0
    assert all(p["category"] and p["top3"] for p in by_id.values())  # categorised from the text

    # With loopback allowed (as for a private image host), a redirect to another scheme is still refused.
    node = start_node(workers=1, env={"CATSTREAM_IMAGE_ALLOW_PRIVATE_HOSTS": "true"})
    publish(stream_settings, [offer("redirect", image_url=f"http://127.0.0.1:{redirector.port}/x.png")])
    (prediction,) = [p for p in read_predictions(stream_settings, {"redirect"}) if p["offer_id"] == "redirect"]
    node.stop()
    assert prediction["image_status"] == "refused" and redirector.connections == 1 and ftp.connections == 0
    for listener in (internal, ftp, redirector):
        listener.close()


def test_an_image_host_that_hangs_or_drips_holds_an_offer_no_longer_than_the_deadline(stream_settings, start_node):
    def drip(connection):
        connection.recv(65536)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100:
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.3)

    silent, dripping = Listener(), Listener(drip)
    env = {"CATSTREAM_IMAGE_ALLOW_PRIVATE_HOSTS": "true", "CATSTREAM_IMAGE_TIMEOUT_S": "2"}
    node = start_node(workers=1, env=env)
    started = time.monotonic()
    publish(
        stream_settings,
        [
            offer("silent", image_url=f"http://127.0.0.1:{silent.port}/x"),
            offer("drip", image_url=f"http://127.0.0.1:{dripping.port}/x"),
            offer("plain"),
        ],
    )
    by_id = {p["offer_id"]: p for p in read_predictions(stream_settings, {"silent", "drip", "plain"}, timeout_s=60)}
    node.stop()
    assert by_id["silent"]["image_status"] == by_id["drip"]["image_status"] == "unreachable"
    # each fetch ends at its 2 s deadline: well under the 40 s a per-read timeout allowed a drip
    assert max(p["timings_ms"]["preprocess"] for p in by_id.values()) < 3000
    assert time.monotonic() - started < 40
    assert json.loads(json.dumps(by_id["plain"]))["image_status"] == "absent"
    silent.close()
    dripping.close()


def test_an_offer_that_wedges_a_worker_twice_is_dead_lettered_as_stuck(stream_settings, start_node):
    """An image that takes longer to decode than the supervisor's bound (the operator raised the
    pixel limit to 200 Mpx: a 12,000 x 12,000 PNG decodes in about 3 s here): the worker is killed
    and restarted, the offer comes back, wedges the next worker, and the third reads it as stuck
    instead of trying it again."""
    buffer = io.BytesIO()
    Image.new("RGB", (12_000, 12_000), (200, 30, 30)).save(buffer, format="PNG")
    env = {"CATSTREAM_MAX_IMAGE_FULL_DECODE_PIXELS": "200000000", "CATSTREAM_WORKER_STUCK_S": "1"}
    node = start_node(workers=1, env=env)
    good = [offer(f"good-{i}") for i in range(10)]
    huge = base64.b64encode(buffer.getvalue()).decode()
    publish(stream_settings, [offer("wedge", image_b64=huge), *good])
    predictions = read_predictions(stream_settings, {key.decode() for key, _ in good}, timeout_s=180)
    dead = read_topic(stream_settings, stream_settings.dead_letter_topic, until=lambda ms: len(ms) >= 1, timeout_s=120)
    time.sleep(1.5)
    assert node.stop() == 0
    assert {p["offer_id"] for p in predictions} >= {key.decode() for key, _ in good}
    assert "wedge" not in {p["offer_id"] for p in predictions}
    (letter,) = dead
    headers = dict(letter.headers())
    assert headers["catstream.error_type"] == b"Stuck" and headers["catstream.stage"] == b"preprocess"
    assert headers["catstream.reason"].startswith(b"stuck: this offer wedged a preprocess worker 2 times")
    assert letter.key() == b"wedge"
    log = node.log()
    assert "(strike 1 of this offer)" in log and "(strike 2 of this offer)" in log
    assert sum(committed_offsets(stream_settings).values()) == len(good) + 1


def test_a_lost_broker_turns_readiness_off_and_ends_the_node_non_zero(bundle, marketplace, tmp_path):
    from catstream.demo import start_node as start_node_process
    from core.broker import EmbeddedBroker
    from core.kafka import ensure_topics, wait_for_broker
    from core.settings import Settings
    from tests.integration.test_health import get

    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    settings = Settings(bootstrap_servers=broker.bootstrap_servers)
    wait_for_broker(settings)
    ensure_topics(settings)
    log_path = tmp_path / "node.log"
    node = start_node_process(
        bundle, settings, log_path=log_path, workers=1, extra_env={"CATSTREAM_BROKER_UNREACHABLE_EXIT_S": "12"}
    )
    try:
        deadline = time.monotonic() + 90
        while not (match := re.search(r"health and metrics on http://[^:]+:(\d+)", log_path.read_text())):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        base = f"http://127.0.0.1:{match[1]}"
        while get(f"{base}/readyz")[0] != 200:
            assert time.monotonic() < deadline, get(f"{base}/readyz")
            time.sleep(0.2)
        publish(settings, [offer("before")])
        read_predictions(settings, {"before"})
        lines_before = len(log_path.read_text().splitlines())
        lost = time.monotonic()  # before the stop: the node may see the broker go while stop() is still waiting
        broker.stop()
        while (answer := get(f"{base}/readyz")) == (200, "ok\n"):
            assert time.monotonic() - lost < 15, "readiness stayed 200 with the broker gone"
            time.sleep(0.2)
        assert answer[0] == 503 and "no Kafka broker reachable" in answer[1]
        assert get(f"{base}/healthz")[0] == 200  # alive: the bound decides when to give up
        code = node.wait(timeout=60)
        gone_for = time.monotonic() - lost
    finally:
        if node.poll() is None:
            node.kill()
        broker.stop()
    log = log_path.read_text()
    assert code == 4 and 12 <= gone_for < 45, (code, gone_for)
    assert "no Kafka broker reachable" in log
    # librdkafka tries to reconnect many times a second; the log says so a few times, not hundreds
    kafka_lines = [line for line in log.splitlines()[lines_before:] if "[rdkafka#" in line or " Kafka _" in line]
    assert 0 < len(kafka_lines) < 60, len(kafka_lines)


def test_a_slow_image_host_holds_up_only_its_own_offers(stream_settings, start_node):
    """Offers whose images come from a host that answers after 3 s, then offers from elsewhere: the
    others are categorised while the slow host's fetches are still running, and the slow host's
    offers get their images."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(buffer, format="PNG")
    body = buffer.getvalue()

    def slow(connection):
        connection.recv(65536)
        time.sleep(3.0)
        with contextlib.suppress(OSError):
            connection.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        connection.close()

    host = Listener(slow)
    env = {"CATSTREAM_IMAGE_ALLOW_PRIVATE_HOSTS": "true", "CATSTREAM_IMAGE_TIMEOUT_S": "10"}
    node = start_node(workers=1, env=env)
    slow_offers = [offer(f"slow-{i}", image_url=f"http://127.0.0.1:{host.port}/{i}.png") for i in range(6)]
    others = [offer(f"other-{i}") for i in range(20)]
    publish(stream_settings, [*slow_offers, *others])
    wanted = {key.decode() for key, _ in slow_offers + others}
    messages = read_topic(
        stream_settings,
        stream_settings.categorized_topic,
        timeout_s=120,
        until=lambda ms: wanted <= {m.key().decode() for m in ms},
    )
    node.stop()
    host.close()
    first, produced_ms = {}, {}
    for message in messages:
        offer_id = message.key().decode()
        first.setdefault(offer_id, json.loads(message.value()))
        produced_ms.setdefault(offer_id, message.timestamp()[1])
    assert set(first) == wanted
    assert all(first[f"slow-{i}"]["image_status"] == "used" for i in range(6))
    assert all(first[f"slow-{i}"]["timings_ms"]["preprocess"] >= 2900 for i in range(6))
    # Every other offer was answered while the slow host's fetches were still running: taken
    # after them, answered at least 2 s before the first of them.
    slowest_other = max(produced_ms[f"other-{i}"] for i in range(20))
    assert slowest_other < min(produced_ms[f"slow-{i}"] for i in range(6)) - 2000
