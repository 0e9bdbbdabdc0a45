"""Inference worker: drain the node's queue in dynamic batches, run the model, decide, write back.

Tensor work only: gather a batch of READY slots, run the model, decide for the whole batch in a
few array operations (``core.decision.decide_batch``), and write the decisions and vectors back
into the slots as SCORED. The preprocess worker that owns each slot encodes the prediction,
produces it, and lets its partition's offset move past it once the broker holds it, so no Python
work per offer is left here.

One inference process serves one model generation: its queue and its bundle. When the model
changes, the supervisor starts the next generation's process beside it and stops this one once
its queue is empty; each writes its counters to its own row of the node's board.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import numpy as np

from core.bundle import ModelBundle
from core.decision import decide_batch, softmax
from core.feature_queue import FeatureQueue
from core.node_board import INFERENCE_COUNTERS, NodeBoard, supervisor_pid
from core.scoring import OnnxClassifier, padded_sizes
from core.settings import Settings
from gpu_workers.batcher import DynamicBatcher

__all__ = ["InferenceWorker", "run_inference_worker"]

log = logging.getLogger(__name__)

_MAX_CONSECUTIVE_BATCH_FAILURES = 5
_IDLE_SLEEP_S = 0.0005


class InferenceWorker:
    """Batches READY slots, runs the model, writes the decisions back."""

    def __init__(self, settings: Settings, bundle: ModelBundle, queue: FeatureQueue, board: NodeBoard, row: int):
        self.settings = settings
        self.bundle = bundle.with_thresholds(threshold=settings.threshold, parent_threshold=settings.parent_threshold)
        self.queue = queue
        self.board = board
        self.row = row  # this generation's row of the board
        self.threshold = self.bundle.threshold
        self.parent_threshold = self.bundle.parent_threshold
        _log_thresholds(self.bundle)
        self.classifier = OnnxClassifier(
            self.bundle,
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
            embeddings=True,
            cache_dir=settings.engine_cache_dir,
            cuda_algo_search=settings.cuda_algo_search,
            precision=settings.precision,
        )
        pad = settings.pad_batches if settings.pad_batches is not None else self.classifier.accelerated
        self.classifier.pad_to = padded_sizes(settings.max_batch_size) if pad else ()
        self._warm_up()  # before run() reports ready
        missing = {field.name for field in queue.layout.vectors} - set(self.classifier.spaces)
        if missing:
            raise RuntimeError(f"the queue holds vectors {sorted(missing)} that this model does not give")
        self.batcher: DynamicBatcher[int] = DynamicBatcher(
            max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000.0
        )
        self.stopping = False
        self.consecutive_failures = 0

    def run(self) -> int:
        """Serve until asked to stop and the queue is empty; returns the exit code."""
        parent = supervisor_pid()
        orphaned_at: float | None = None
        self.board.set_inference_stat(self.row, "ready", 1)
        while True:
            self.board.set_inference_stat(self.row, "heartbeat_ns", time.time_ns())
            now = time.monotonic()
            if self.batcher.room:
                for slot in self.queue.ready_slots(self.batcher.room):
                    self.queue.take(int(slot))
                    self.batcher.add(int(slot), now)
            batch = self.batcher.pop_ready(now, force=self.stopping)
            if batch:
                self._run_batch(np.asarray(batch))
                if self.consecutive_failures >= _MAX_CONSECUTIVE_BATCH_FAILURES:
                    log.critical("%d batches failed in a row; exiting so the node restarts", self.consecutive_failures)
                    return 3
            if self.stopping and not len(self.batcher) and not self.queue.depth():
                break
            if orphaned_at is None and os.getppid() != parent:
                log.warning("supervisor gone; finishing the queue and stopping")
                self.stopping = True
                orphaned_at = now
            if orphaned_at is not None and now - orphaned_at > self.settings.drain_timeout_s:
                # Slots a dead worker was still filling never become ready; nobody is left to wait for.
                log.warning(
                    "supervisor gone %.0f s ago; leaving %d queued offers to the next node",
                    now - orphaned_at,
                    self.queue.depth(),
                )
                break
            if not batch:
                deadline = self.batcher.deadline()
                wait = _IDLE_SLEEP_S if deadline is None else min(_IDLE_SLEEP_S, max(0.0, deadline - now))
                time.sleep(wait)
        counts = {name: self.board.inference_stat(self.row, name) for name in INFERENCE_COUNTERS}
        log.info("inference stopped: %s", counts)
        return 0

    def _warm_up(self) -> None:
        """Run the model once per batch shape it will see (each padded size, or one batch on the
        CPU) before reporting ready: on CUDA the first run of a shape chooses its kernels."""
        example = {field.name: np.zeros((1, *field.shape), dtype=field.dtype) for field in self.queue.layout.fields}
        started = time.perf_counter()
        sizes = self.classifier.warm_up(example)
        log.info(
            "warmed up on %s, batch sizes %s, in %.2f s",
            self.classifier.session.get_providers()[0],
            sizes,
            time.perf_counter() - started,
        )

    def _run_batch(self, slots: np.ndarray) -> None:
        batch = self.queue.claim(slots)
        started = time.perf_counter()
        try:
            logits, vectors = self.classifier.score(batch.features.inputs)
            if logits.shape[0] != len(slots):
                raise RuntimeError(f"model returned {logits.shape[0]} rows for {len(slots)} inputs")
            probabilities = softmax(logits, self.bundle.temperature)
            decisions = decide_batch(
                probabilities,
                batch.features.exclusion,
                labels=self.bundle.labels,
                threshold=self.threshold,
                parent_threshold=self.parent_threshold,
            )
            inference_ms = (time.perf_counter() - started) * 1000.0
            self.queue.score(slots, decisions, vectors, inference_ms=inference_ms)
        except Exception as error:  # a failed batch fails every item in it; workers dead-letter them
            self.consecutive_failures += 1
            self.board.count_inference(self.row, "failed", len(slots))
            log.exception("batch of %d failed", len(slots))
            for slot in slots:
                self.queue.fail(int(slot), f"inference failed: {type(error).__name__}: {error}")
            return
        self.consecutive_failures = 0
        scored_ns = time.time_ns()
        self.board.count_inference(self.row, "batches")
        self.board.count_inference(self.row, "inference_ns", int(inference_ms * 1e6))
        self.board.observe_latency(self.row, batch.preprocess_ms + (scored_ns - batch.enqueued_ns) / 1e6)
        uncertain = decisions.category < 0
        self.board.count_inference(self.row, "predicted", len(slots))
        self.board.count_inference(self.row, "uncertain", int(uncertain.sum()))
        self.board.count_inference(self.row, "uncertain_with_parent", int((decisions.parent >= 0).sum()))


def _log_thresholds(bundle: ModelBundle) -> None:
    """Say what the served thresholds are, and for an overridden one what it gave held out."""
    note = bundle.served_at_note()
    if note is None:
        parent = "none" if bundle.parent_threshold is None else f"{bundle.parent_threshold:.4f}"
        log.info("serving at the bundle's threshold %.4f, parent threshold %s", bundle.threshold, parent)
        return
    log.info("%s", note)
    point = bundle.served_at.operating_point if bundle.served_at else None
    target = bundle.config.training.calibration.target_precision
    if point is not None and point.precision_bound < target:
        log.warning(
            "that lower bound is below the target precision the bundle was calibrated for, %.2f%%: expect "
            "less precise answers at threshold %.4f",
            100 * target,
            bundle.threshold,
        )


def run_inference_worker(
    settings: Settings, board_path: str, generation: int, queue_path: str, bundle_path: str, log_level: str
) -> None:
    """Process entry point (spawned by the node supervisor) for one model generation; the board's
    ``ready`` counter of its row says when it serves."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s inference-{generation} %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    board = NodeBoard.attach(board_path)
    queue = FeatureQueue.attach(queue_path)
    bundle = ModelBundle.load(bundle_path, dictionaries_dir=settings.dictionaries_dir)
    worker = InferenceWorker(settings, bundle, queue, board, row=generation % 2)

    def stop(*_):
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    raise SystemExit(worker.run())
