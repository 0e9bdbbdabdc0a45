"""What the stream benchmarks share: fresh topics on a broker, a running node and where its health
port is, an open-loop producer, and the memory of a process tree."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from confluent_kafka import Producer

from core.kafka import ensure_topics, producer_config
from core.schemas import Offer
from core.settings import Settings

__all__ = [
    "OpenLoopProducer",
    "cpu_seconds",
    "every_key",
    "fresh_settings",
    "health_port",
    "node_roles",
    "process_tree",
    "rss_bytes",
    "wait_ready",
]


def fresh_settings(bootstrap: str, *, partitions: int = 4) -> Settings:
    """Settings with topics and a consumer group of their own (created), so runs never mix."""
    run = uuid.uuid4().hex[:8]
    settings = Settings(
        bootstrap_servers=bootstrap,
        offers_topic=f"offers-{run}",
        categorized_topic=f"out-{run}",
        dead_letter_topic=f"dlq-{run}",
        consumer_group=f"bench-{run}",
        topic_partitions=partitions,
    )
    ensure_topics(settings)
    return settings


def health_port(log_path: Path, *, timeout_s: float = 120.0) -> int:
    """The node's health port, from the line its supervisor logs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text() if log_path.exists() else ""
        if match := re.search(r"health and metrics on http://[^:]+:(\d+)", text):
            return int(match[1])
        time.sleep(0.2)
    raise TimeoutError(f"no health port in {log_path}")


def wait_ready(log_path: Path, *, timeout_s: float = 120.0) -> str:
    """Until the node whose log is ``log_path`` answers /readyz with 200 and its consumers hold
    their partitions (the group join takes seconds: offers published before it would wait in
    Kafka and count against the node); returns its health URL."""
    base = f"http://127.0.0.1:{health_port(log_path, timeout_s=timeout_s)}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=5):
                if re.search(r"preprocess-\d+ assigned \[\d", log_path.read_text()):
                    return base
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the node logging to {log_path} did not become ready")


def every_key(expected: set[str]):
    """A ``read_topic(until=...)`` test that is true once every key in ``expected`` was read: it
    looks at each message once, so reading a million predictions stays linear."""
    missing = set(expected)
    looked = 0

    def until(messages) -> bool:
        nonlocal looked
        for message in messages[looked:]:
            missing.discard(message.key().decode())
        looked = len(messages)
        return not missing

    return until


class OpenLoopProducer:
    """Publishes offers at a fixed rate on a thread, whatever the node does (open loop): each offer
    is sent at its scheduled time, and how late the sender itself fell is recorded, so that a slow
    benchmark machine is not mistaken for a slow node.

    ``linger_ms`` is how long librdkafka gathers offers into one batch before sending it. On the
    embedded broker it decides how long a run stays fair: Tansu 0.6.0 keeps every batch as an
    object in memory and lists all of a partition's objects on every fetch, so its cost per fetch
    grows with the number of batches it holds, not with the offers. At 2 ms and a few hundred
    offers a second nearly every offer is a batch of its own."""

    def __init__(
        self,
        offers: Sequence[Offer],
        settings: Settings,
        *,
        rate: float,
        duration_s: float,
        linger_ms: float = 2.0,
    ):
        self.offers = offers
        self.settings = settings
        self.rate = rate
        self.linger_ms = linger_ms
        self.batch_sizes: list[float] = []  # librdkafka's mean offers per batch, one per statistics window
        self.total = int(rate * duration_s)
        self.sent = 0
        self.max_send_delay_s = 0.0
        self.started_at = 0.0
        self.sent_ids: list[str] = []
        # ms from each offer's create time to the broker's acknowledgement of its batch (as seen by
        # the producer's next poll), by running number: the linger and the produce hop
        self.acked_after_ms = np.full(self.total, np.nan, dtype=np.float32)
        self._thread = threading.Thread(target=self._run, name="open-loop-producer", daemon=True)

    def start(self) -> OpenLoopProducer:
        self._thread.start()
        return self

    def _run(self) -> None:
        producer = Producer(
            producer_config(
                self.settings,
                **{"client.id": "bench-producer", "linger.ms": self.linger_ms, "statistics.interval.ms": 5000},
            ),
            stats_cb=self._statistics,
        )
        self.started_at = time.monotonic()
        for number in range(self.total):
            due = self.started_at + number / self.rate
            ahead = due - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            else:
                self.max_send_delay_s = max(self.max_send_delay_s, -ahead)
            template = self.offers[number % len(self.offers)]
            offer_id = f"{template.offer_id}-{number}"
            offer = Offer(
                offer_id=offer_id,
                title=template.title,
                mall_id=template.mall_id,
                mall_category=template.mall_category,
                image_b64=template.image_b64,
                listed_at=template.listed_at,
            )
            while True:
                try:
                    producer.produce(
                        self.settings.offers_topic,
                        key=offer_id.encode(),
                        value=offer.to_bytes(),
                        on_delivery=self._delivered,
                    )
                    break
                except BufferError:
                    producer.poll(0.01)
            producer.poll(0)
            self.sent += 1
            self.sent_ids.append(offer_id)
        producer.flush(60)

    def _delivered(self, error, message) -> None:
        if error is None:
            number = int(message.key().decode().rsplit("-", 1)[1])
            self.acked_after_ms[number] = time.time() * 1000.0 - message.timestamp()[1]

    def _statistics(self, text: str) -> None:
        batches = json.loads(text).get("topics", {}).get(self.settings.offers_topic, {}).get("batchcnt", {})
        if batches.get("cnt"):
            self.batch_sizes.append(batches["avg"])

    @property
    def mean_batch_size(self) -> float:
        """Offers per batch sent, averaged over the run (nan before the first statistics)."""
        return sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else float("nan")

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def rss_bytes(pid: int) -> int | None:
    """Resident bytes of a process, None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rss = re.search(r"^VmRSS:\s+(\d+) kB", status, flags=re.M)
    return int(rss[1]) * 1024 if rss else 0


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def node_roles(log_path: Path) -> dict[int, str]:
    """pid → role (``inference-0``, ``preprocess-1``...) of the processes a node's log names."""
    text = log_path.read_text() if log_path.exists() else ""
    roles = {int(pid): f"preprocess-{index}" for index, pid in re.findall(r"preprocess-(\d+) pid=(\d+) started", text)}
    roles |= {
        int(pid): f"inference-{generation}"
        for generation, pid in re.findall(r"model generation (\d+): .*? inference pid=(\d+)", text)
    }
    return roles
