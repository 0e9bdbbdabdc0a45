"""The offer indexer: keeps the offer index current from the predictions stream, and publishes the
candidate duplicates of every new offer to ``offers.matched``.

- Input: the predictions topic. A prediction with vectors (a bundle with an embedder) is upserted
  by ``offer_id``, so a redelivered one changes nothing; a tombstone (a null value under an
  offer's key) deletes it; a prediction without vectors is skipped and counted.
- Matching is search: once a new offer is in the index, its image, text and fused vectors each
  fetch their nearest other offers (offers of the same batch included), and so does its title
  from a character n-gram title index kept beside it (``lexical``). The candidates are ranked
  by reciprocal rank fusion of the fused and lexical rankings (the pair that found the most true
  matches in the evaluation), then those only the image or text vectors found; each goes out
  with the score of every way it was found.
- State: the index is the state, saved every ``index_save_interval_s`` together with the offset
  of the next message of every partition. Before a save, every matched message of what it covers
  has been delivered. A restart (or a crash) resumes from the last save, so no offer is lost;
  offers after the save are upserted again (harmless) and their matches may be published again.
- One indexer per index: it reads every partition itself (no group rebalancing), since an
  embedded index must see every offer. The consumer group only records its progress (lag).
- An engine that cannot be reached (a Qdrant server down) is waited for, never a reason to
  exit: the batch at hand is retried with :class:`Backoff` (0.5 s doubling to 30 s, jittered)
  and nothing after it is read meanwhile; ``unavailable`` says why, which the query service's
  readiness reports as 503. Offsets move only past batches the index has taken.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition

from core.kafka import consumer_config, producer_config
from core.offer_index import IndexedOffer, IndexUnavailableError, OfferIndex, OfferIndexError, Offsets
from core.schemas import UNCERTAIN, decode_vectors
from core.settings import Settings
from core.title_index import TitleIndex, rank_fusion

__all__ = ["Backoff", "OfferIndexer", "candidates_of", "matched_message"]

log = logging.getLogger(__name__)

_BATCH = 500
_POLL_S = 0.05


class Backoff:
    """Waits between retries of an unreachable engine: ``first_s`` doubling up to ``max_s``, each
    jittered by up to ±``jitter`` so indexers that lost the same server do not retry in step."""

    def __init__(self, *, first_s: float = 0.5, max_s: float = 30.0, jitter: float = 0.2, seed: int | None = None):
        if not 0 < first_s <= max_s or not 0 <= jitter < 1:
            raise ValueError(f"need 0 < first_s <= max_s and 0 <= jitter < 1, got {first_s}, {max_s}, {jitter}")
        self.first_s, self.max_s, self.jitter = first_s, max_s, jitter
        self.failures = 0
        self._rng = random.Random(seed)

    def next_wait(self) -> float:
        """Seconds to wait after one more failure."""
        base = min(self.max_s, self.first_s * 2.0**self.failures)
        self.failures += 1
        return base * (1.0 + self.jitter * (2.0 * self._rng.random() - 1.0))

    def reset(self) -> None:
        """After a success: the next failure waits ``first_s`` again."""
        self.failures = 0


def _category(document: dict[str, Any]) -> str:
    """Where an offer is filed in the index: its category, else its confident parent, else its best guess."""
    category = document.get("category")
    if isinstance(category, str) and category and category != UNCERTAIN:
        return category
    parent = document.get("confident_parent")
    if isinstance(parent, dict) and isinstance(parent.get("category"), str):
        return parent["category"]
    top = document.get("top3") or [{}]
    guess = top[0].get("category") if isinstance(top[0], dict) else None
    return guess if isinstance(guess, str) and guess else UNCERTAIN


def _digest(value: Any) -> str | None:
    """A product key or image hash from a prediction; anything but a short hex string is ignored."""
    if isinstance(value, str) and 0 < len(value) <= 64 and all(c in "0123456789abcdef" for c in value):
        return value
    return None


def candidates_of(
    index: OfferIndex, offers: list[IndexedOffer], *, k: int, titles: TitleIndex | None = None
) -> list[list[dict[str, Any]]]:
    """For each offer, up to ``k`` indexed offers found by any of its vectors or (with ``titles``)
    by its title, best first: ``{"offer_id", "score", "scores": {way: similarity}}``, ``score``
    being the best of ``scores`` (cosines, vector or lexical).

    The order: reciprocal rank fusion of the ``fused`` and ``lexical`` rankings (ties to the higher
    best score), then candidates only the other spaces found, by their best score.
    """
    found: list[dict[str, dict[str, float]]] = [{} for _ in offers]
    ranked: list[dict[str, list[str]]] = [{} for _ in offers]
    for space in index.spaces:
        queries = np.stack([offer.vectors[space] for offer in offers])
        for row, hits in enumerate(index.search(space, queries, k=k + 1)):
            for hit in hits:
                if hit.offer_id != offers[row].offer_id:
                    found[row].setdefault(hit.offer_id, {})[space] = round(hit.score, 5)
                    ranked[row].setdefault(space, []).append(hit.offer_id)
    if titles is not None and len(titles):
        with_title = [row for row, offer in enumerate(offers) if offer.title]
        lexical = titles.search([offers[row].title or "" for row in with_title], k=k + 1)
        for row, similar_titles in zip(with_title, lexical, strict=True):
            for offer_id, score in similar_titles:
                if offer_id != offers[row].offer_id:
                    found[row].setdefault(offer_id, {})["lexical"] = round(score, 5)
                    ranked[row].setdefault("lexical", []).append(offer_id)
    results = []
    for scores_by_offer, rankings in zip(found, ranked, strict=True):
        fusion = dict(rank_fusion(rankings.get(way, []) for way in ("fused", "lexical")))
        # Ties (first in one ranking, absent from the other) go to the higher similarity.
        fused = sorted(fusion, key=lambda o: (-fusion[o], -max(scores_by_offer[o].values())))
        rest = sorted(set(scores_by_offer) - set(fused), key=lambda o: -max(scores_by_offer[o].values()))
        results.append(
            [
                {"offer_id": o, "score": max(scores_by_offer[o].values()), "scores": scores_by_offer[o]}
                for o in (fused + rest)[:k]
            ]
        )
    return results


def matched_message(offer_id: str, candidates: list[dict[str, Any]]) -> bytes:
    """The ``offers.matched`` document of one new offer."""
    return json.dumps({"offer_id": offer_id, "candidates": candidates}, separators=(",", ":")).encode()


class OfferIndexer:
    """The loop. ``open_index(spaces)`` opens (or creates) the index once the spaces are known:
    at start when one was saved, else from the first prediction that carries vectors."""

    def __init__(
        self,
        settings: Settings,
        open_index: Callable[[dict[str, int] | None], OfferIndex | None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self._open_index = open_index
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.unavailable: str | None = None  # why the engine cannot be reached, while it cannot
        self.backoff = Backoff()
        self.index: OfferIndex | None = None  # None: nothing saved yet, or not reached yet
        self.titles = TitleIndex()  # the lexical candidate source, rebuilt from the index on open
        self.positions: Offsets = {}
        # A damaged index is an error here, at start; an unreachable engine is waited for in run().
        self._opened = self._try(self._open_saved)
        # Milliseconds from a prediction's broker timestamp to its offer being searchable, recent ones.
        self.freshness_ms: deque[float] = deque(maxlen=100_000)
        self.stopping = False
        self.lock = threading.Lock()  # the index is shared with the query service
        self._dirty = False
        self._last_save = clock()
        self.consumer = Consumer(consumer_config(settings, group_id=settings.index_group))
        self.producer = Producer(producer_config(settings))
        self._undelivered = 0

    def install_signal_handlers(self) -> None:
        def stop(signum, _frame):
            log.info("signal %d: saving the index and stopping", signum)
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def run(self) -> int:
        """Index until asked to stop; returns the exit code."""
        try:
            if not self._opened and not self._retrying(self._open_saved):
                log.info("stopped before the index could be reached: %s", self.unavailable)
                return 0
            self._assign()
            while not self.stopping:
                messages = self.consumer.consume(_BATCH, timeout=_POLL_S)
                if messages:
                    self.handle(messages)
                self.producer.poll(0)
                if self._dirty and self.clock() - self._last_save >= self.settings.index_save_interval_s:
                    self.save()
            if self._dirty:
                self.save()
        finally:
            self.consumer.close()
        log.info("indexer stopped: %s", dict(self.counts))
        return 0

    def _open_saved(self) -> None:
        """Open the saved index, if any, and resume from the offsets saved with it."""
        self.index = self._open_index(None)
        self.positions = dict(self.index.offsets()) if self.index is not None else {}
        self.titles = TitleIndex()
        if self.index is not None:
            self.titles.upsert(self.index.titles())
            self.titles.seal()

    def _try(self, action: Callable[[], None]) -> bool:
        """Run ``action`` once; False (and ``unavailable`` set) when the engine cannot be reached."""
        try:
            action()
        except IndexUnavailableError as error:
            self.counts["index_unavailable"] += 1
            if self.unavailable is None:
                log.error("the offer index cannot be reached: %s; retrying with backoff", error)
            self.unavailable = str(error)
            return False
        if self.unavailable is not None:
            log.info("the offer index is reachable again after %d failed tries", self.backoff.failures)
        self.unavailable = None
        self.backoff.reset()
        return True

    def _retrying(self, action: Callable[[], None]) -> bool:
        """Run ``action`` until the engine takes it (True) or the indexer is asked to stop (False).
        Matches already produced keep being delivered while it waits."""
        while not self._try(action):
            wait = self.backoff.next_wait()
            log.warning(
                "offer index unavailable (try %d): %s; next try in %.1f s",
                self.backoff.failures,
                self.unavailable,
                wait,
            )
            until = self.clock() + wait
            while self.clock() < until:
                if self.stopping:
                    return False
                self.producer.poll(min(0.2, max(0.0, until - self.clock())))
        return True

    def _assign(self) -> None:
        topic = self.settings.categorized_topic
        metadata = self.consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics.get(topic)
        if partitions is None or partitions.error is not None or not partitions.partitions:
            raise RuntimeError(f"topic {topic} is not there to index (start a node first, or create it)")
        self.consumer.assign(
            [
                TopicPartition(topic, partition, self.positions.get((topic, partition), OFFSET_BEGINNING))
                for partition in sorted(partitions.partitions)
            ]
        )
        log.info(
            "indexing %s (%d partitions) from %s", topic, len(partitions.partitions), self.positions or "the start"
        )

    def handle(self, messages: list[Message]) -> None:
        """Apply one batch of prediction messages: deletes, then matches and upserts."""
        upserts: dict[str, IndexedOffer] = {}
        deletes: list[str] = []
        stamps: dict[str, int] = {}
        positions: Offsets = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    self.counts["consume_errors"] += 1
                    log.warning("consume error: %s", error)
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            assert topic is not None and partition is not None and offset is not None, "a message without a position"
            positions[(topic, partition)] = offset + 1
            key = (message.key() or b"").decode("utf-8", errors="replace")
            value = message.value()
            if not value:  # a tombstone (some brokers hand a null value back as empty bytes)
                deletes.append(key)
                upserts.pop(key, None)
                continue
            offer = self._offer(value)
            if offer is not None:
                upserts[offer.offer_id] = offer
                stamps[offer.offer_id] = message.timestamp()[1]
                if offer.offer_id in deletes:
                    deletes.remove(offer.offer_id)

        def apply() -> None:
            with self.lock:
                self._apply(deletes, upserts, stamps)

        # Offsets move past this batch only once the index has taken it: a stop while the engine
        # is unreachable saves nothing of it, so the next start reads it again.
        if positions and self._retrying(apply):
            self.positions.update(positions)
            self._dirty = True

    def _apply(self, deletes: list[str], upserts: dict[str, IndexedOffer], stamps: dict[str, int]) -> None:
        if deletes and self.index is not None:
            self.counts["deleted"] += self.index.delete(deletes)
            self.titles.delete(deletes)
        if not upserts:
            return
        offers = list(upserts.values())
        if self.index is None:
            self.index = self._open_index({space: len(vector) for space, vector in offers[0].vectors.items()})
            assert self.index is not None
        wanted = dict(self.index.spaces)
        fitting = [o for o in offers if {s: len(v) for s, v in o.vectors.items()} == wanted]
        if len(fitting) < len(offers):
            self.counts["wrong_spaces"] += len(offers) - len(fitting)
            log.warning(
                "%d predictions carry vectors other than the index's %s: skipped", len(offers) - len(fitting), wanted
            )
        if not fitting:
            return
        # Upsert first, then search: offers of one batch find each other too (never themselves).
        # A retry after an unreachable engine repeats all of it, which upserts make harmless.
        self.index.upsert(fitting)
        self.titles.delete(offer.offer_id for offer in fitting if not offer.title)  # a title gone
        self.titles.upsert((offer.offer_id, offer.title) for offer in fitting if offer.title)
        searchable_ms = time.time() * 1000.0
        found = candidates_of(self.index, fitting, k=self.settings.match_candidates, titles=self.titles)
        self.counts["upserted"] += len(fitting)
        self.freshness_ms.extend(searchable_ms - stamps[offer.offer_id] for offer in fitting)
        for offer, candidates in zip(fitting, found, strict=True):
            self._publish(offer.offer_id, candidates)

    def _offer(self, value: bytes) -> IndexedOffer | None:
        try:
            document = json.loads(value)
            vectors = decode_vectors(document)
            offer_id = document["offer_id"]
            if not isinstance(offer_id, str) or not offer_id:
                raise ValueError("no offer_id")
        except (ValueError, KeyError, TypeError) as error:
            self.counts["unreadable"] += 1
            log.warning("a prediction the indexer cannot read: %s", error)
            return None
        if not vectors:
            self.counts["without_vectors"] += 1
            return None
        try:
            return IndexedOffer(
                offer_id=offer_id,
                category=_category(document),
                vectors=vectors,
                product=_digest(document.get("product")),
                image_sha=_digest(document.get("image_sha")),
                title=document["title"] if isinstance(document.get("title"), str) else None,
            )
        except OfferIndexError as error:
            self.counts["unreadable"] += 1
            log.warning("prediction %s: %s", offer_id, error)
            return None

    def _publish(self, offer_id: str, candidates: list[dict[str, Any]]) -> None:
        def delivered(error, _message):
            self._undelivered -= 1
            if error is not None:
                self.counts["matched_failed"] += 1
                log.error("matches of %s not delivered: %s", offer_id, error)

        while True:
            try:
                self.producer.produce(
                    self.settings.matched_topic,
                    key=offer_id.encode(),
                    value=matched_message(offer_id, candidates),
                    on_delivery=delivered,
                )
                self._undelivered += 1
                self.counts["matched"] += 1
                return
            except BufferError:
                self.producer.poll(0.1)

    def save(self) -> None:
        """Deliver every matched message, then save the index with the offsets it covers."""
        remaining = self.producer.flush(30)
        if remaining:
            log.error("%d matched messages undelivered after 30 s; not saving yet", remaining)
            return
        if self.index is not None:
            index = self.index

            def save_index() -> None:
                with self.lock:
                    index.save(dict(self.positions))

            if not self._try(save_index):
                self._last_save = self.clock()  # tried again after another interval
                log.warning("index not saved (%s): a restart now re-reads from the last save", self.unavailable)
                return
        if self.positions:
            committed = [TopicPartition(t, p, o) for (t, p), o in self.positions.items()]
            try:
                self.consumer.commit(offsets=committed, asynchronous=True)  # progress for lag metrics only
            except Exception as error:
                log.debug("offset commit skipped: %s", error)
        self._dirty = False
        self._last_save = self.clock()
        self.counts["saves"] += 1
