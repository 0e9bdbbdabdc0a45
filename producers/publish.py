"""Publish offers to the ``offers`` topic, keyed by offer_id, at an optional rate."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from confluent_kafka import KafkaException, Producer
from tqdm import tqdm

from core.kafka import producer_config
from core.schemas import Offer
from core.settings import Settings

__all__ = ["publish_offers", "publish_raw"]

log = logging.getLogger(__name__)


def publish_offers(
    offers: Iterable[Offer],
    settings: Settings,
    *,
    rate: float | None = None,
    total: int | None = None,
    progress: bool = True,
) -> int:
    """Produce every offer (at most ``rate`` per second) and wait until all are acknowledged.

    Returns the number delivered; raises if any delivery failed.
    """
    return publish_raw(
        ((o.offer_id.encode(), o.to_bytes()) for o in offers), settings, rate=rate, total=total, progress=progress
    )


def publish_raw(
    messages: Iterable[tuple[bytes | None, bytes | None]],
    settings: Settings,
    *,
    rate: float | None = None,
    total: int | None = None,
    progress: bool = False,
) -> int:
    """Produce ``(key, value)`` pairs as they are (tests use it for malformed input)."""
    producer = Producer(producer_config(settings, **{"client.id": "catstream-producer"}))
    failures: list[str] = []
    delivered = 0

    def on_delivery(error, _message):
        nonlocal delivered
        if error is not None:
            failures.append(str(error))
        else:
            delivered += 1

    started = time.monotonic()
    bar = tqdm(total=total, unit="offer", desc="publishing", disable=not progress)
    for sent, (key, value) in enumerate(messages):
        if rate:
            ahead = started + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        while True:
            try:
                producer.produce(settings.offers_topic, key=key, value=value, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        bar.update()
    remaining = producer.flush(60)
    bar.close()
    if remaining or failures:
        raise KafkaException(f"{remaining} offers unacknowledged, {len(failures)} failed: {failures[:3]}")
    return delivered
