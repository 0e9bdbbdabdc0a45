"""Preprocess worker: consume offers, featurise them, fill this worker's queue slots; then encode
and produce the predictions the inference process wrote back into them.

One process per CPU core you give it. The per-offer Python work on both sides of the model
(parsing, featurising, the prediction's JSON, the produce call) happens here, so it spreads over
every worker process while the inference process does tensor work only. Offsets are committed
only up to the oldest offer whose prediction (or dead letter) the broker has not yet
acknowledged, so a crash loses nothing.

A model change reaches the worker through the node's board: a new generation names a new queue
and bundle. The worker loads the new featuriser beside the running one, then puts every further
offer into the new queue while its offers already in the old queue finish there; no offer is
featurised by one bundle and scored by another, and the consumer keeps its partitions.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from core.bundle import ModelBundle
from core.feature_queue import FAILED, FREE, SCORED, SENDING, FeatureQueue, OfferMeta, ScoredOffer
from core.features import Featurizer, OfferFeatures
from core.image_fetcher import ImageFetcher, is_remote
from core.images import IMAGE_USED, ImageUnavailableError
from core.kafka import consumer_config, producer_config
from core.node_board import NodeBoard, Serving, starved_for_s, supervisor_pid
from core.schemas import Offer, Prediction, Rejection, dead_letter, parse_offer
from core.settings import Settings
from core.text import product_key
from preprocess_workers.backpressure import BufferGate
from preprocess_workers.offsets import OffsetTracker

__all__ = ["PreprocessWorker", "run_preprocess_worker"]

log = logging.getLogger(__name__)

_CONSUME_BATCH = 64
_DELIVERY_RETRIES = 3  # a prediction the broker refused this often is dead-lettered with the reason
_STRIKES_TO_DEAD_LETTER = 2  # an offer that wedged a worker this often is dead-lettered, not retried
_SMALLEST_DEAD_LETTER = 4096  # headers and a little of the value always fit
_DEAD_LETTER_RETRY_S = 1.0
_LOG_INTERVAL_S = 10.0
_LOAD_RETRY_S = 30.0


@dataclass(frozen=True, slots=True)
class _PendingDeadLetter:
    message: Message
    rejection: Rejection
    stage: str
    max_bytes: int  # the dead letter's budget; halved each time the producer or broker finds it too large

    def smaller(self) -> _PendingDeadLetter:
        return dataclasses.replace(self, max_bytes=max(_SMALLEST_DEAD_LETTER, self.max_bytes // 2))


@dataclass(slots=True)
class _Fetching:
    """An offer whose image URL is being fetched: featurised once the bytes are back."""

    message: Message
    offer: Offer
    started: float  # perf_counter when the worker took it


@dataclass(slots=True)
class _InFlight:
    key: tuple[str, int]
    offset: int
    message: Message


class _Lane:
    """This worker's slots in one generation's queue, with the featuriser of that generation."""

    def __init__(self, index: int, generation: int, queue: FeatureQueue, featurizer: Featurizer, bundle: ModelBundle):
        self.generation = generation
        self.queue = queue
        self.featurizer = featurizer
        self.version = bundle.version
        self.labels = tuple(bundle.labels)
        self.slots = queue.layout.worker_slots(index)
        # A previous process of this index left its slots: the finished ones (SCORED, SENDING,
        # FAILED) are freed now, its READY/CLAIMED ones once the inference process finishes them;
        # never with a produce or an offset: those were never committed, so Kafka delivers the
        # offers again.
        for slot in self.slots:
            if queue.state[slot] in (SCORED, SENDING, FAILED):
                queue.release(slot)
        self.free_slots = deque(slot for slot in self.slots if queue.state[slot] == FREE)
        self.in_flight: dict[int, _InFlight] = {}

    def busy_slots(self) -> int:
        """Slots of this lane not yet free (its own in flight, or a previous process's)."""
        return len(self.slots) - len(self.free_slots)


class PreprocessWorker:
    """The consume → featurise → enqueue loop of one process."""

    def __init__(self, index: int, settings: Settings, board: NodeBoard):
        self.index = index
        self.name = f"preprocess-{index}"
        self.settings = settings
        self.board = board
        serving = board.serving()
        self.lane = self._open_lane(serving)
        board.set_worker_stat(index, "generation", serving.generation)
        self.retiring: list[_Lane] = []  # earlier generations' lanes, until their offers are done
        self._loading: tuple[Serving, concurrent.futures.Future] | None = None
        self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self.fetcher = ImageFetcher(
            settings.image_policy(), threads=settings.image_fetch_threads, per_host=settings.image_fetch_per_host
        )
        self.fetching: dict[tuple[str, int, int], _Fetching] = {}  # (topic, partition, offset) -> offer
        self.fetched: deque[tuple[_Fetching, bytes | ImageUnavailableError]] = deque()  # waiting for a slot
        self.backlog: deque[tuple[Message, float]] = deque()  # with the perf_counter it was taken at
        self.backlog_bytes = 0
        self.gate = BufferGate(settings.max_buffered_messages, settings.max_buffered_bytes)
        self.tracker = OffsetTracker()
        self.paused = False
        self.stopping = False
        self.consumer = Consumer(
            consumer_config(settings, group_id=settings.consumer_group, **{"client.id": self.name})
        )
        # Predictions and dead letters: both must reach the broker before an offset moves past them.
        self.producer = Producer(producer_config(settings, **{"client.id": self.name}))
        self._dead_letter_retries: deque[tuple[float, _PendingDeadLetter]] = deque()
        self._log_gate: dict[str, tuple[float, int]] = {}
        self._last_commit = time.monotonic()
        self._drain_deadline = time.monotonic() + settings.drain_timeout_s  # set again when the drain starts
        self._next_load_at = 0.0  # a generation that failed to load here is tried again from then

    def _open_lane(self, serving: Serving) -> _Lane:
        """The lane of a generation: its queue attached, its bundle's featuriser loaded."""
        bundle = ModelBundle.load(serving.bundle_path, dictionaries_dir=self.settings.dictionaries_dir)
        featurizer = Featurizer.from_bundle(bundle, image_policy=self.settings.image_policy())
        queue = FeatureQueue.attach(serving.queue_path)
        return _Lane(self.index, serving.generation, queue, featurizer, bundle)

    @property
    def in_flight(self) -> int:
        """Offers taken and not yet finished: fetching their image, waiting for a slot, or in a slot."""
        in_slots = len(self.lane.in_flight) + sum(len(lane.in_flight) for lane in self.retiring)
        return in_slots + len(self.fetching) + len(self.fetched)

    def _room(self) -> bool:
        """Whether another offer may be taken now: each offer fetching its image or waiting for a
        slot will need one of the free slots."""
        return len(self.lane.free_slots) > len(self.fetching) + len(self.fetched)

    # --- rebalance -------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.tracker.assign((tp.topic, tp.partition))
        if self.paused:  # newly assigned partitions obey the current backpressure state
            consumer.pause(partitions)
        self.board.set_worker_stat(self.index, "progress_ns", time.time_ns())
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

    def run(self) -> bool:
        """Consume until asked to stop, then drain; returns whether the consumer left its group
        within the drain's time (when not, the group drops it after its session timeout)."""
        self.consumer.subscribe(
            [self.settings.offers_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        parent = supervisor_pid()
        try:
            while not self.stopping:
                if os.getppid() != parent:  # the node supervisor died: finish up and leave
                    log.warning("%s: supervisor gone, stopping", self.name)
                    break
                self.board.set_worker_stat(self.index, "heartbeat_ns", time.time_ns())
                self._follow_generation()
                self._reap()
                self._place_fetched()
                self._retry_dead_letters()
                self._place_backlog()
                self._apply_backpressure()
                # Short while offers are in flight: their scored slots wait for this loop to produce them.
                timeout = 0.005 if self.in_flight or self.backlog else 0.2
                messages = self.consumer.consume(num_messages=_CONSUME_BATCH, timeout=timeout)
                if messages:
                    self.board.set_worker_stat(self.index, "progress_ns", time.time_ns())
                # An offer's time in the node starts here, not when its turn comes: the ones taken
                # with it, and the backlog, are the node's to answer for.
                taken = time.perf_counter()
                for message in messages:
                    self._accept(message, taken)
                self.producer.poll(0)
                if time.monotonic() - self._last_commit >= self.settings.commit_interval_s:
                    self._commit(None, asynchronous=True)
                    self._update_lag()
            self._drain()
        finally:
            left = self._leave_group()
            self._loader.shutdown(wait=False, cancel_futures=True)
            log.info("%s stopped: %s", self.name, self.board.worker_counts(self.index))
        return left

    def _leave_group(self) -> bool:
        """Close the consumer (it leaves the group, so partitions move without waiting), but no
        longer than the drain allows: a close that waits on a rebalance the broker never ends must
        not make the supervisor kill the worker. Offsets are committed before it."""
        closer = threading.Thread(target=self.consumer.close, name="consumer-close", daemon=True)
        closer.start()
        closer.join(max(1.0, self._drain_deadline - time.monotonic()))
        if closer.is_alive():
            log.warning(
                "%s: the consumer did not leave its group in time; the group drops it after its session "
                "timeout (offsets are committed)",
                self.name,
            )
            return False
        return True

    def _update_lag(self) -> None:
        """Offers waiting in Kafka for this worker's partitions (high watermark − position)."""
        lag = 0
        for tp in self.consumer.position(self.consumer.assignment()):
            if tp.offset < 0:
                continue  # nothing consumed yet on this partition
            _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                lag += max(0, high - tp.offset)
        self.board.set_worker_stat(self.index, "lag", lag)
        self.board.set_worker_stat(self.index, "held", self.in_flight + len(self.backlog))
        starved = starved_for_s(self.board, self.index, time.time_ns())
        if starved is not None:
            self._log_limited(
                "starved",
                logging.WARNING,
                "%s has consumed nothing for %.0f s while %d offers wait on its partitions: the broker answers "
                "its fetches empty or not at all (the node reports not ready)",
                self.name,
                starved,
                lag,
            )

    # --- model changes ------------------------------------------------------------------------------

    def _follow_generation(self) -> None:
        """Load a newly published generation in the background; once loaded, switch to it."""
        if self.board.generation == self.lane.generation and self._loading is None:
            return
        if self._loading is None:
            if time.monotonic() < self._next_load_at:
                return
            serving = self.board.serving()
            log.info("%s: loading model generation %d (%s)", self.name, serving.generation, serving.bundle_path)
            self._loading = (serving, self._loader.submit(self._open_lane, serving))
            return
        serving, future = self._loading
        if not future.done():
            return
        self._loading = None
        try:
            lane = future.result()
        except Exception:  # the supervisor checked this bundle; if it cannot load here, keep serving
            self._next_load_at = time.monotonic() + _LOAD_RETRY_S
            log.exception(
                "%s: model generation %d does not load here; staying on generation %d, trying again in %g s",
                self.name,
                serving.generation,
                self.lane.generation,
                _LOAD_RETRY_S,
            )
            return
        self.retiring.append(self.lane)
        self.lane = lane
        self.board.set_worker_stat(self.index, "generation", lane.generation)
        log.info(
            "%s switched to model generation %d (version %s); %d offers finish on generation %d",
            self.name,
            lane.generation,
            lane.version,
            len(self.retiring[-1].in_flight),
            self.retiring[-1].generation,
        )

    def _accept(self, message: Message, taken: float) -> None:
        if message.error() is not None:
            if message.error().code() != KafkaError._PARTITION_EOF:
                self._log_limited("consume", logging.WARNING, "%s consume error: %s", self.name, message.error())
            return
        self.tracker.started((message.topic(), message.partition()), message.offset())
        self.board.count(self.index, "consumed")
        if self._room() and not self.backlog:
            self._process(message, taken)
        else:
            self.backlog.append((message, taken))
            self.backlog_bytes += len(message.value() or b"")

    def _place_backlog(self) -> None:
        while self.backlog and self._room():
            message, taken = self.backlog.popleft()
            self.backlog_bytes -= len(message.value() or b"")
            self._process(message, taken)

    def _drop_backlog(self, keep=lambda message: False) -> None:
        self.backlog = deque(item for item in self.backlog if keep(item[0]))
        self.backlog_bytes = sum(len(message.value() or b"") for message, _ in self.backlog)

    def _apply_backpressure(self) -> None:
        """Pause all partitions while the buffer is full; poll() keeps running meanwhile."""
        pause = self.gate.paused(messages=len(self.backlog), nbytes=self.backlog_bytes, currently_paused=self.paused)
        if pause and not self.paused:
            self.consumer.pause(self.consumer.assignment())
            self.paused = True
            self.board.count(self.index, "pauses")
        elif not pause and self.paused:
            self.consumer.resume(self.consumer.assignment())
            self.paused = False

    def _process(self, message: Message, taken: float) -> None:
        """Parse, featurise and enqueue one offer, or dead-letter it with the reason: nothing a
        message holds may end the worker. The supervisor sees which offer the worker is on, and
        kills a worker that stays on one past ``worker_stuck_s``."""
        strikes = self.board.strikes(message.partition(), message.offset())
        if strikes >= _STRIKES_TO_DEAD_LETTER:
            reason = (
                f"stuck: this offer wedged a preprocess worker {strikes} times, over "
                f"{self.settings.worker_stuck_s:g} s each; not tried again"
            )
            self._dead_letter(message, Rejection(reason, "Stuck"), stage="preprocess")
            return
        self.board.busy(self.index, message.partition(), message.offset())
        try:
            self._featurize_and_enqueue(message, taken)
        finally:
            self.board.idle(self.index)

    def _featurize_and_enqueue(self, message: Message, started: float) -> None:
        """``started``: when the consumer handed the offer over (the start of its preprocess time)."""
        parsed = parse_offer(message.value(), max_bytes=self.settings.max_message_bytes)
        if isinstance(parsed, Rejection):
            self._dead_letter(message, parsed, stage="parse")
            return
        if is_remote(parsed.image_url) and not parsed.image_b64:
            # The fetch runs beside the loop; the offer is featurised when its bytes are back.
            key = (message.topic(), message.partition(), message.offset())
            self.fetching[key] = _Fetching(message, parsed, started)
            self.fetcher.submit(key, str(parsed.image_url))
            return
        self._enqueue(message, parsed, started, fetched=None)

    def _place_fetched(self) -> None:
        """Featurise and enqueue the offers whose images came back, while slots are free."""
        for key, result in self.fetcher.completed():
            item = self.fetching.pop(key, None)
            if item is not None:
                self.fetched.append((item, result))
        while self.fetched and self.lane.free_slots:
            item, result = self.fetched.popleft()
            self.board.busy(self.index, item.message.partition(), item.message.offset())
            try:
                self._enqueue(item.message, item.offer, item.started, fetched=result)
            finally:
                self.board.idle(self.index)

    def _enqueue(
        self, message: Message, parsed: Offer, started: float, *, fetched: bytes | ImageUnavailableError | None
    ) -> None:
        lane = self.lane
        slot = lane.free_slots.popleft()
        try:
            features = lane.featurizer.featurize(parsed, fetched=fetched)
            lane.queue.put(slot, features, self._meta(parsed, message, features, started))
        except Exception as error:  # a bug or a pathological input: this offer fails, the worker goes on
            lane.free_slots.appendleft(slot)
            log.exception("%s: featurising offer %s failed", self.name, parsed.offer_id)
            rejection = Rejection(f"featurising failed ({type(error).__name__})", type(error).__name__)
            self._dead_letter(message, rejection, stage="preprocess")
            return
        lane.in_flight[slot] = _InFlight((message.topic(), message.partition()), message.offset(), message)
        self.board.count(self.index, "enqueued")
        self.board.count(self.index, "image_unused", int(not features.has_image))

    @staticmethod
    def _meta(offer: Offer, message: Message, features: OfferFeatures, started: float) -> OfferMeta:
        timestamp_type, timestamp_ms = message.timestamp()
        return OfferMeta(
            offer_id=offer.offer_id,
            partition=message.partition(),
            offset=message.offset(),
            image_status=features.image_status,
            produced_ms=float(timestamp_ms) if timestamp_type else None,
            preprocess_ms=(time.perf_counter() - started) * 1000.0,
            product=product_key(offer.title),
            title=offer.title,
            image_sha=features.image_sha,
        )

    # --- completion ------------------------------------------------------------------------------

    def _reap(self) -> None:
        """Collect slots the inference processes finished: produce the scored ones' predictions,
        dead-letter the failed ones. An earlier generation's lane is closed once none of its slots
        is in use."""
        for lane in (self.lane, *self.retiring):
            self._reap_lane(lane)
        for lane in [lane for lane in self.retiring if not lane.busy_slots()]:
            self.retiring.remove(lane)
            lane.queue.close()
            log.info("%s: generation %d done", self.name, lane.generation)

    def _reap_lane(self, lane: _Lane) -> None:
        first = lane.slots.start
        states = lane.queue.state[first : lane.slots.stop]
        for relative in ((states == SCORED) | (states == FAILED)).nonzero()[0]:  # SENDING: its callback frees it
            slot = first + int(relative)
            state = int(lane.queue.state[slot])
            item = lane.in_flight.get(slot)
            if item is None:  # a previous process's offer: Kafka delivers it again
                self._free(lane, slot)
            elif state == SCORED:
                self._produce_prediction(lane, slot, item)
            elif state == FAILED:
                lane.in_flight.pop(slot)
                rejection = Rejection(lane.queue.error_of(slot), "InferenceError")
                self._dead_letter(item.message, rejection, stage="inference")
                self._free(lane, slot)

    @staticmethod
    def _free(lane: _Lane, slot: int) -> None:
        lane.queue.release(slot)
        lane.free_slots.append(slot)

    def _produce_prediction(self, lane: _Lane, slot: int, item: _InFlight) -> None:
        """Encode the prediction the inference process wrote into ``slot`` and produce it; the
        delivery callback frees the slot and lets the offset pass, or tries again."""
        try:
            scored = lane.queue.scored(slot, lane.labels)
            value = self._encode(scored, lane.version)
        except Exception as error:  # a bug or a value JSON cannot hold: this offer fails, the worker goes on
            log.exception("%s: encoding the prediction of slot %d failed", self.name, slot)
            lane.in_flight.pop(slot, None)
            rejection = Rejection(f"encoding the prediction failed ({type(error).__name__})", type(error).__name__)
            self._dead_letter(item.message, rejection, stage="produce")
            self._free(lane, slot)
            return
        self._send_prediction(lane, slot, item, scored.meta.offer_id.encode(), value)

    @staticmethod
    def _encode(scored: ScoredOffer, version: str) -> bytes:
        """The prediction message of a scored offer."""
        meta, decision = scored.meta, scored.decision
        timings = {
            "preprocess": meta.preprocess_ms,
            "queue_wait": max(0.0, scored.queue_wait_ms - scored.inference_ms),  # before its batch ran
            "inference": scored.inference_ms,
            "batch_size": float(scored.batch_size),
        }
        if meta.produced_ms:
            timings["end_to_end"] = time.time() * 1000.0 - meta.produced_ms
        return Prediction(
            offer_id=meta.offer_id,
            category=decision.category,
            confidence=decision.confidence,
            top3=decision.top3,
            model_version=version,
            image_used=meta.image_status == IMAGE_USED,
            image_status=meta.image_status,
            timings_ms=timings,
            excluded_categories=decision.excluded,
            confident_parent=decision.parent,
            vectors=scored.vectors,
            title=meta.title or None,
            product=meta.product,
            image_sha=meta.image_sha,
        ).to_bytes()

    def _send_prediction(self, lane: _Lane, slot: int, item: _InFlight, key: bytes, value: bytes) -> None:
        def delivered(error, _record):
            if error is None:
                lane.in_flight.pop(slot, None)
                self.tracker.finished(item.key, item.offset)
                self.board.count(self.index, "delivered")
                self._free(lane, slot)
            else:
                self._prediction_failed(lane, slot, item, key, value, str(error))

        lane.queue.sending(slot)
        while True:
            try:
                self.producer.produce(self.settings.categorized_topic, key=key, value=value, on_delivery=delivered)
                return
            except BufferError:  # local queue full: serve callbacks, then try again
                self.producer.poll(0.05)
            except Exception as error:  # refused outright (a client setting): the same as a failed delivery
                self._prediction_failed(lane, slot, item, key, value, f"{type(error).__name__}: {error}")
                return

    def _prediction_failed(self, lane: _Lane, slot: int, item: _InFlight, key: bytes, value: bytes, reason: str):
        """Send a prediction the broker did not take again, up to ``_DELIVERY_RETRIES`` times; then
        dead-letter its offer with the reason, so that the offset moves on and nothing is lost."""
        if lane.queue.retries[slot] < _DELIVERY_RETRIES:
            lane.queue.retries[slot] += 1
            self._log_limited(
                "delivery", logging.WARNING, "%s: prediction not delivered (%s); retrying", self.name, reason
            )
            self._send_prediction(lane, slot, item, key, value)
            return
        lane.in_flight.pop(slot, None)
        self._dead_letter(
            item.message, Rejection(f"prediction not delivered: {reason}", "DeliveryError"), stage="produce"
        )
        self._free(lane, slot)

    def _dead_letter(self, message: Message, rejection: Rejection, *, stage: str) -> None:
        """Send ``message`` to the dead-letter topic; its offset passes once the broker has it."""
        self.board.count(self.index, "dead_lettered")
        log.info(
            "%s dead-lettered %s/%d@%d (%s): %s",
            self.name,
            message.topic(),
            message.partition(),
            message.offset(),
            stage,
            rejection.reason[:200],
        )
        self._send_dead_letter(_PendingDeadLetter(message, rejection, stage, self.settings.dead_letter_max_bytes))

    def _send_dead_letter(self, pending: _PendingDeadLetter) -> None:
        """Produce ``pending``; never raises. A record too large for the producer or the broker is sent
        again cut to half the bytes; any other failure is retried later from the main loop."""
        message = pending.message
        source = f"{message.topic()}/{message.partition()}/{message.offset()}"

        def delivered(error, _record, pending=pending):
            if error is None:
                self.tracker.finished((message.topic(), message.partition()), message.offset())
            elif error.code() == KafkaError.MSG_SIZE_TOO_LARGE and pending.max_bytes > _SMALLEST_DEAD_LETTER:
                self._send_dead_letter(pending.smaller())
            else:
                self._retry_dead_letter_later(pending, str(error))

        while True:
            letter = dead_letter(
                message.key(),
                message.value(),
                message.headers(),
                stage=pending.stage,
                rejection=pending.rejection,
                source=source,
                max_bytes=pending.max_bytes,
            )
            try:
                self.producer.produce(
                    self.settings.dead_letter_topic,
                    value=letter.value,
                    key=letter.key,
                    headers=letter.headers,
                    on_delivery=delivered,
                )
                return
            except BufferError:  # local queue full: serve callbacks, then try again
                self.producer.poll(0.1)
            except KafkaException as error:
                code = error.args[0].code() if error.args and hasattr(error.args[0], "code") else None
                if code == KafkaError.MSG_SIZE_TOO_LARGE and pending.max_bytes > _SMALLEST_DEAD_LETTER:
                    pending = pending.smaller()
                    continue
                self._retry_dead_letter_later(pending, str(error))
                return
            except Exception as error:  # a dead letter must never end the worker; its offset waits
                self._retry_dead_letter_later(pending, f"{type(error).__name__}: {error}")
                return

    def _retry_dead_letter_later(self, pending: _PendingDeadLetter, reason: str) -> None:
        message = pending.message
        self._log_limited(
            "dead-letter",
            logging.ERROR,
            "%s: dead letter for %s/%d@%d not delivered (%s); retrying, its offset waits",
            self.name,
            message.topic(),
            message.partition(),
            message.offset(),
            reason,
        )
        self._dead_letter_retries.append((time.monotonic() + _DEAD_LETTER_RETRY_S, pending))

    def _retry_dead_letters(self) -> None:
        now = time.monotonic()
        for _ in range(len(self._dead_letter_retries)):
            due, pending = self._dead_letter_retries.popleft()
            if due <= now:
                self._send_dead_letter(pending)
            else:
                self._dead_letter_retries.append((due, pending))

    def _log_limited(self, topic: str, level: int, text: str, *args) -> None:
        """Log at most once per ``_LOG_INTERVAL_S`` for ``topic`` (with how many were held back)."""
        now = time.monotonic()
        last, held = self._log_gate.get(topic, (0.0, 0))
        if now - last < _LOG_INTERVAL_S:
            self._log_gate[topic] = (last, held + 1)
            return
        suffix = f" ({held} more like it in the last {_LOG_INTERVAL_S:.0f} s)" if held else ""
        log.log(level, text + suffix, *args)
        self._log_gate[topic] = (now, 0)

    def _commit(self, keys, *, asynchronous: bool) -> None:
        # An asynchronous commit is marked done when sent; the broker may still refuse it (a
        # rebalance under way) without a word here. So a synchronous commit (revoke, drain)
        # sends every position again, not only the ones that moved since.
        positions = self.tracker.uncommitted(keys) if asynchronous else self.tracker.positions(keys)
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
        deadline = self._drain_deadline = time.monotonic() + self.settings.drain_timeout_s
        self._drop_backlog()  # consumed but never started: uncommitted, so redelivered later
        while self.in_flight and time.monotonic() < deadline:
            self._reap()
            self._place_fetched()
            self.producer.poll(0.01)
        self.producer.flush(max(0.1, deadline - time.monotonic()))
        self._reap()
        self._commit(None, asynchronous=False)
        if self.in_flight:
            log.warning("%s: %d offers still in flight at exit; they will be redelivered", self.name, self.in_flight)
        for lane in (self.lane, *self.retiring):
            lane.queue.close()
        self.fetcher.close()


def run_preprocess_worker(index: int, settings: Settings, board_path: str, log_level: str) -> None:
    """Process entry point (spawned by the node supervisor); the board names the queue and bundle."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s preprocess-{index} %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    worker = PreprocessWorker(index, settings, NodeBoard.attach(board_path))

    def stop(*_):
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    if not worker.run():  # the consumer's close is stuck in librdkafka: do not wait for its threads
        logging.shutdown()
        os._exit(0)
