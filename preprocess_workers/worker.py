"""Preprocess worker: consume offers, featurise them, fill this worker's queue slots.

One process per CPU core you give it. Offsets are committed only up to the oldest offer whose
prediction (or dead letter) the broker has not yet acknowledged, so a crash loses nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from core.bundle import ModelBundle
from core.feature_queue import DONE, FAILED, FREE, FeatureQueue, OfferMeta
from core.features import Featurizer
from core.images import ImageLimits
from core.kafka import consumer_config, producer_config
from core.schemas import Offer, Rejection, dead_letter_headers, parse_offer
from core.settings import Settings
from preprocess_workers.backpressure import BufferGate
from preprocess_workers.offsets import OffsetTracker

__all__ = ["PreprocessWorker", "run_preprocess_worker"]

log = logging.getLogger(__name__)

_CONSUME_BATCH = 64


@dataclass(slots=True)
class _InFlight:
    key: tuple[str, int]
    offset: int
    message: Message


class PreprocessWorker:
    """The consume → featurise → enqueue loop of one process."""

    def __init__(self, index: int, settings: Settings, bundle: ModelBundle, queue: FeatureQueue):
        self.index = index
        self.name = f"preprocess-{index}"
        self.settings = settings
        self.queue = queue
        self.featurizer = Featurizer.from_bundle(
            bundle,
            image_limits=ImageLimits(
                max_bytes=settings.max_image_bytes,
                max_pixels=settings.max_image_pixels,
                timeout_s=settings.image_timeout_s,
            ),
        )
        self.slots = queue.layout.worker_slots(index)
        # Slots left READY/CLAIMED by a previous process of this index finish on their own;
        # they are freed (without touching offsets) once DONE.
        self.free_slots = deque(slot for slot in self.slots if queue.state[slot] == FREE)
        self.in_flight: dict[int, _InFlight] = {}
        self.backlog: deque[Message] = deque()
        self.backlog_bytes = 0
        self.gate = BufferGate(settings.max_buffered_messages, settings.max_buffered_bytes)
        self.tracker = OffsetTracker()
        self.paused = False
        self.stopping = False
        self.consumer = Consumer(
            consumer_config(settings, group_id=settings.consumer_group, **{"client.id": self.name})
        )
        self.producer = Producer(producer_config(settings, **{"client.id": f"{self.name}-dlq"}))
        self._dead_letters_pending: dict[tuple[tuple[str, int], int], Message] = {}
        self._last_commit = time.monotonic()

    # --- rebalance -------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.tracker.assign((tp.topic, tp.partition))
        if self.paused:  # newly assigned partitions obey the current backpressure state
            consumer.pause(partitions)
        log.info("%s assigned %s", self.name, [tp.partition for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._commit(keys, asynchronous=False)
        for key in keys:
            self.tracker.revoke(key)
        self._drop_backlog(keep=lambda m: (m.topic(), m.partition()) not in keys)
        log.info("%s revoked %s", self.name, [tp.partition for tp in partitions])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.tracker.revoke((tp.topic, tp.partition))
        self._drop_backlog(keep=lambda m: self.tracker.is_assigned((m.topic(), m.partition())))
        log.warning("%s lost %s", self.name, [tp.partition for tp in partitions])

    # --- main loop -------------------------------------------------------------------------------

    def run(self) -> None:
        self.consumer.subscribe(
            [self.settings.offers_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        parent = os.getppid()
        try:
            while not self.stopping:
                if os.getppid() != parent:  # the node supervisor died: finish up and leave
                    log.warning("%s: supervisor gone, stopping", self.name)
                    break
                self.queue.set_worker_stat(self.index, "heartbeat_ns", time.time_ns())
                self._reap()
                self._place_backlog()
                self._apply_backpressure()
                timeout = 0.02 if self.in_flight or self.backlog else 0.2
                for message in self.consumer.consume(num_messages=_CONSUME_BATCH, timeout=timeout):
                    self._accept(message)
                self.producer.poll(0)
                if time.monotonic() - self._last_commit >= self.settings.commit_interval_s:
                    self._commit(None, asynchronous=True)
                    self._update_lag()
            self._drain()
        finally:
            self.consumer.close()  # leaves the group now, so partitions move without waiting
            log.info("%s stopped: %s", self.name, self.queue.worker_counts(self.index))

    def _update_lag(self) -> None:
        """Offers waiting in Kafka for this worker's partitions (high watermark − position)."""
        lag = 0
        for tp in self.consumer.position(self.consumer.assignment()):
            if tp.offset < 0:
                continue  # nothing consumed yet on this partition
            _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                lag += max(0, high - tp.offset)
        self.queue.set_worker_stat(self.index, "lag", lag)

    def _accept(self, message: Message) -> None:
        if message.error() is not None:
            if message.error().code() != KafkaError._PARTITION_EOF:
                log.warning("%s consume error: %s", self.name, message.error())
            return
        self.tracker.started((message.topic(), message.partition()), message.offset())
        self.queue.count(self.index, "consumed")
        if self.free_slots and not self.backlog:
            self._process(message)
        else:
            self.backlog.append(message)
            self.backlog_bytes += len(message.value() or b"")

    def _place_backlog(self) -> None:
        while self.backlog and self.free_slots:
            message = self.backlog.popleft()
            self.backlog_bytes -= len(message.value() or b"")
            self._process(message)

    def _drop_backlog(self, keep=lambda message: False) -> None:
        self.backlog = deque(m for m in self.backlog if keep(m))
        self.backlog_bytes = sum(len(m.value() or b"") for m in self.backlog)

    def _apply_backpressure(self) -> None:
        """Pause all partitions while the buffer is full; poll() keeps running meanwhile."""
        pause = self.gate.paused(messages=len(self.backlog), nbytes=self.backlog_bytes, currently_paused=self.paused)
        if pause and not self.paused:
            self.consumer.pause(self.consumer.assignment())
            self.paused = True
            self.queue.count(self.index, "pauses")
        elif not pause and self.paused:
            self.consumer.resume(self.consumer.assignment())
            self.paused = False

    def _process(self, message: Message) -> None:
        started = time.perf_counter()
        parsed = parse_offer(message.value(), max_bytes=self.settings.max_message_bytes)
        if isinstance(parsed, Rejection):
            self._dead_letter(message, parsed, stage="parse")
            return
        try:
            features = self.featurizer.featurize(parsed)
        except Exception as error:  # a bug or a pathological input must not kill the worker
            log.exception("%s: featurising offer %s failed", self.name, parsed.offer_id)
            self._dead_letter(
                message, Rejection(f"featurising failed: {error}", type(error).__name__), stage="preprocess"
            )
            return
        slot = self.free_slots.popleft()
        self.queue.put(slot, features, self._meta(parsed, message, features.image_status, started))
        self.in_flight[slot] = _InFlight((message.topic(), message.partition()), message.offset(), message)
        self.queue.count(self.index, "enqueued")
        self.queue.count(self.index, "image_unused", int(not features.has_image))

    @staticmethod
    def _meta(offer: Offer, message: Message, image_status: str, started: float) -> OfferMeta:
        timestamp_type, timestamp_ms = message.timestamp()
        return OfferMeta(
            offer_id=offer.offer_id,
            partition=message.partition(),
            offset=message.offset(),
            image_status=image_status,
            produced_ms=float(timestamp_ms) if timestamp_type else None,
            preprocess_ms=(time.perf_counter() - started) * 1000.0,
        )

    # --- completion ------------------------------------------------------------------------------

    def _reap(self) -> None:
        """Collect slots the inference process finished: complete their offsets, free them."""
        first = self.slots.start
        states = self.queue.state[first : self.slots.stop]
        for relative in (states >= DONE).nonzero()[0]:
            slot = first + int(relative)
            state = int(self.queue.state[slot])
            item = self.in_flight.pop(slot, None)
            if item is not None and state == DONE:
                self.tracker.finished(item.key, item.offset)
            elif item is not None and state == FAILED:
                rejection = Rejection(self.queue.error_of(slot), "InferenceError")
                self._dead_letter(item.message, rejection, stage="inference")
            self.queue.release(slot)
            self.free_slots.append(slot)

    def _dead_letter(self, message: Message, rejection: Rejection, *, stage: str) -> None:
        key = (message.topic(), message.partition())
        offset = message.offset()

        def delivered(error, _msg, key=key, offset=offset):
            if error is not None:
                log.error("%s: dead letter for %s@%d not delivered: %s; retrying", self.name, key, offset, error)
                self._send_dead_letter(message, rejection, stage, delivered)
                return
            self.tracker.finished(key, offset)

        self.queue.count(self.index, "dead_lettered")
        log.info("%s dead-lettered %s@%d (%s): %s", self.name, key, offset, stage, rejection.reason[:200])
        self._send_dead_letter(message, rejection, stage, delivered)

    def _send_dead_letter(self, message: Message, rejection: Rejection, stage: str, callback) -> None:
        source = f"{message.topic()}/{message.partition()}/{message.offset()}"
        while True:
            try:
                self.producer.produce(
                    self.settings.dead_letter_topic,
                    value=message.value(),
                    key=message.key(),
                    headers=dead_letter_headers(message.headers(), stage=stage, rejection=rejection, source=source),
                    on_delivery=callback,
                )
                return
            except BufferError:  # local queue full: serve callbacks, then try again
                self.producer.poll(0.1)

    def _commit(self, keys, *, asynchronous: bool) -> None:
        positions = self.tracker.uncommitted(keys)
        self._last_commit = time.monotonic()
        if not positions:
            return
        offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in positions.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
            self.tracker.mark_committed(positions)
        except Exception as error:  # e.g. during a rebalance; the next commit carries the same positions
            log.warning("%s commit failed: %s", self.name, error)

    def _drain(self) -> None:
        """Stop taking offers; wait for in-flight ones; flush dead letters; commit."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        self._drop_backlog()  # consumed but never started: uncommitted, so redelivered later
        while self.in_flight and time.monotonic() < deadline:
            self._reap()
            self.producer.poll(0.01)
        self.producer.flush(max(0.1, deadline - time.monotonic()))
        self._reap()
        self._commit(None, asynchronous=False)
        if self.in_flight:
            log.warning(
                "%s: %d offers still in flight at exit; they will be redelivered", self.name, len(self.in_flight)
            )


def run_preprocess_worker(index: int, settings: Settings, bundle_path: str, queue_path: str, log_level: str) -> None:
    """Process entry point (spawned by the node supervisor)."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s preprocess-{index} %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    queue = FeatureQueue.attach(queue_path)
    worker = PreprocessWorker(
        index, settings, ModelBundle.load(bundle_path, dictionaries_dir=settings.dictionaries_dir), queue
    )

    def stop(*_):
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    worker.run()
