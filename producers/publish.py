"""Publish offers to the ``offers`` topic, keyed by offer_id, at an optional rate."""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from confluent_kafka import KafkaException, Producer
from tqdm import tqdm

from core.kafka import producer_config
from core.schemas import Offer
from core.settings import Settings

__all__ = ["ImageInliner", "publish_offers", "publish_raw"]

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

    An offer whose image is a local file carries the file's bytes instead (``image_b64``): the
    workers read no local paths from messages. Returns the number delivered; raises if any
    delivery failed.
    """
    inliner = ImageInliner(max_bytes=int(0.7 * settings.max_message_bytes))  # base64 and JSON around it
    messages = ((o.offer_id.encode(), inliner(o).to_bytes()) for o in offers)
    delivered = publish_raw(messages, settings, rate=rate, total=total, progress=progress)
    if inliner.dropped:
        log.warning(
            "%d offers were published without their image: the local file was missing, unreadable or over %d bytes",
            inliner.dropped,
            inliner.max_bytes,
        )
    return delivered


class ImageInliner:
    """Turns an offer's local image (a path or ``file://`` URL) into inline bytes; ``http(s)`` URLs
    stay as they are, for the workers to fetch."""

    def __init__(self, *, max_bytes: int):
        self.max_bytes = max_bytes
        self.dropped = 0

    def __call__(self, offer: Offer) -> Offer:
        url = offer.image_url
        if not url:
            return offer
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            return offer
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path)) if scheme == "file" else Path(url)
        try:
            with path.open("rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except OSError:
            data = b""
        if not data or len(data) > self.max_bytes:
            self.dropped += 1
            return dataclasses.replace(offer, image_url=None)
        return dataclasses.replace(offer, image_url=None, image_b64=base64.b64encode(data).decode("ascii"))


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
