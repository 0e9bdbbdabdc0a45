"""Kafka client configuration and topic set-up, shared by every stage.

Security settings pass straight through to librdkafka, so the same code talks to the embedded
broker and to a real cluster with SASL/TLS.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from core.settings import Settings

__all__ = ["client_config", "consumer_config", "ensure_topics", "producer_config", "read_topic", "wait_for_broker"]

log = logging.getLogger(__name__)


ClientConfig = dict[str, Any]  # librdkafka properties, plus the Python logger and error callback

# librdkafka logs every failed connection attempt of every client: with the brokers gone, dozens
# of lines a second. They go through this logger, which passes one line per kind (librdkafka's
# facility) per interval and says how many it held back.
LOG_INTERVAL_S = 10.0


class _RateLimit(logging.Filter):
    """Passes one record per key per ``interval_s``; the next one passed says how many were held."""

    def __init__(self, interval_s: float):
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.args[0]) if isinstance(record.args, tuple) and record.args else record.getMessage()[:40]
        now = time.monotonic()
        last, held = self._last.get(key, (-1e9, 0))
        if now - last < self.interval_s:
            self._last[key] = (last, held + 1)
            return False
        self._last[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like it in the last {self.interval_s:.0f} s)"
        return True


KAFKA_LOG = logging.getLogger("catstream.kafka")
KAFKA_LOG.addFilter(_RateLimit(LOG_INTERVAL_S))


def _on_error(error: Any) -> None:
    """librdkafka's errors (all brokers down, authentication, ...), rate-limited like its logs."""
    KAFKA_LOG.warning("Kafka %s: %s", error.name(), error.str())


def client_config(settings: Settings) -> ClientConfig:
    """librdkafka properties common to every client."""
    if not settings.bootstrap_servers:
        raise ValueError("no Kafka bootstrap servers configured (CATSTREAM_BOOTSTRAP_SERVERS)")
    config: ClientConfig = {"bootstrap.servers": settings.bootstrap_servers}
    optional = {
        "security.protocol": settings.security_protocol,
        "sasl.mechanism": settings.sasl_mechanism,
        "sasl.username": settings.sasl_username,
        "sasl.password": settings.sasl_password.get_secret_value() if settings.sasl_password else None,
        "ssl.ca.location": settings.ssl_ca_location,
        "ssl.certificate.location": settings.ssl_certificate_location,
        "ssl.key.location": settings.ssl_key_location,
    }
    config.update({key: value for key, value in optional.items() if value is not None})
    config.update(settings.kafka_config)
    config |= {"logger": KAFKA_LOG, "error_cb": _on_error, "log.connection.close": False}
    return config


def producer_config(settings: Settings, **overrides: Any) -> ClientConfig:
    """An idempotent, fully acknowledged producer: a delivered prediction is a durable one."""
    config = client_config(settings) | {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
    }
    return config | overrides


def consumer_config(settings: Settings, *, group_id: str, **overrides: Any) -> ClientConfig:
    """A consumer that commits only what the application says is done.

    ``fetch.wait.max.ms`` stays librdkafka's 500 ms. The embedded broker (Tansu 0.6.0) answers a
    fetch when that wait is over, and answers it empty when gathering the data takes longer than
    the wait; gathering grows with the messages it holds in memory. At 25 ms, after about 100,000
    offers (six minutes at 280 offers/s) every fetch came back empty: the node consumed nothing
    more while 470,000 offers waited (a bare consumer from the same offsets: 0 messages in 20 s at
    25 ms, 1 at 100 ms, 100 in 1.4 s at 500 ms). Kafka answers as soon as there is data, so the
    wait costs it nothing; on the embedded broker it costs each hop up to the wait.
    """
    config = client_config(settings) | {
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "max.poll.interval.ms": settings.max_poll_interval_ms,
        # Joins and failover in seconds rather than the default ~45 s.
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "partition.assignment.strategy": "cooperative-sticky",
    }
    return config | overrides


def ensure_topics(settings: Settings, *, timeout_s: float = 15.0, extra: tuple[str, ...] = ()) -> None:
    """Create the offers, categorized and dead-letter topics (and ``extra`` ones) if they do not exist."""
    admin = AdminClient(client_config(settings))
    wanted = [settings.offers_topic, settings.categorized_topic, settings.dead_letter_topic, *extra]
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [
        NewTopic(name, num_partitions=settings.topic_partitions, replication_factor=1)
        for name in wanted
        if name not in existing
    ]
    if not missing:
        return
    for name, future in admin.create_topics(missing, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            log.info("created topic %s", name)
        except KafkaException as error:
            if error.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise


def wait_for_broker(settings: Settings, *, timeout_s: float = 30.0) -> None:
    """Block until the cluster answers a metadata request."""
    admin = AdminClient(client_config(settings))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=2.0)
            return
        except KafkaException as error:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Kafka at {settings.bootstrap_servers} did not answer: {error}") from error
            time.sleep(0.2)


def read_topic(
    settings: Settings,
    topic: str,
    *,
    until: Callable[[list[Message]], bool] | None = None,
    timeout_s: float = 60.0,
    idle_s: float | None = None,
) -> list[Message]:
    """Read ``topic`` from the beginning of every partition, without a consumer group.

    Stops when ``until(messages)`` is true, after ``idle_s`` without new messages, or at
    ``timeout_s``. For tools and tests that inspect outputs; the workers use groups.
    """
    consumer = Consumer(
        client_config(settings)
        | {
            "group.id": f"catstream-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages: list[Message] = []
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = [m for m in consumer.consume(500, timeout=0.2) if m.error() is None]
            if batch:
                messages.extend(batch)
                last_new = time.monotonic()
            if until is not None and until(messages):
                break
            if idle_s is not None and time.monotonic() - last_new > idle_s:
                break
        return messages
    finally:
        consumer.close()
