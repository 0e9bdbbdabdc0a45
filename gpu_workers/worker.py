"""Inference worker: drain the node's queue in dynamic batches, run the model, decide, write back.

Tensor work only: gather a batch of READY slots, run the model, decide for the whole batch in a
few array operations (``core.decision.decide_batch``), and write the decisions and vectors back
into the slots as SCORED. The preprocess worker that owns each slot encodes the prediction,
produces it, and lets its partition's offset move past it once the broker holds it, so no Python
work per offer is left here.

On an accelerator the stages overlap (``inference_overlap``): one model thread runs a batch (ONNX
Runtime lets go of the GIL while it runs) while the loop decides for the batch before it and
gathers the next one. Batches are gathered into two preallocated sets of buffers, one per batch
in hand, already padded to their fixed size on an accelerator, so a turn of the loop allocates no
input arrays. There (``io_binding``) each set and padded size also has its own I/O binding: device
buffers for the inputs, refilled in place, and preallocated arrays the outputs land in.

One inference process serves one model generation: its queue and its bundle. When the model
changes, the supervisor starts the next generation's process beside it and stops this one once
its queue is empty; each writes its counters to its own row of the node's board.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from core.bundle import ModelBundle
from core.decision import decide_batch, softmax
from core.feature_queue import FeatureQueue, SlotBatch
from core.node_board import INFERENCE_COUNTERS, NodeBoard, supervisor_pid
from core.scoring import OnnxClassifier, padded_size, padded_sizes
from core.settings import Settings
from gpu_workers.batcher import DynamicBatcher

__all__ = ["InferenceWorker", "run_inference_worker"]

log = logging.getLogger(__name__)

_MAX_CONSECUTIVE_BATCH_FAILURES = 5
_IDLE_SLEEP_S = 0.0005
_RUNNING_POLL_S = 0.005


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
        overlap = settings.inference_overlap
        self.overlap = overlap if overlap is not None else self.classifier.accelerated
        binding = settings.io_binding if settings.io_binding is not None else self.classifier.accelerated
        if binding and not pad:
            log.warning("I/O binding needs padded batches (CATSTREAM_PAD_BATCHES); running without it")
        self.classifier.io_binding = binding and pad
        self._warm_up()  # before run() reports ready
        missing = {field.name for field in queue.layout.vectors} - set(self.classifier.spaces)
        if missing:
            raise RuntimeError(f"the queue holds vectors {sorted(missing)} that this model does not give")
        self.batcher: DynamicBatcher[int] = DynamicBatcher(
            max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000.0
        )
        self.stopping = False
        self.consecutive_failures = 0
        # Two sets of gather buffers: the model runs a batch in one while the next is gathered into the other.
        rows = max(self.classifier.pad_to, default=settings.max_batch_size)
        self._buffers = [queue.gather_buffers(max(rows, settings.max_batch_size)) for _ in range(2)]
        self._running: _Run | None = None
        self._gathered: tuple[SlotBatch, int] | None = None

    def run(self) -> int:
        """Serve until asked to stop and the queue is empty; returns the exit code."""
        parent = supervisor_pid()
        orphaned_at: float | None = None
        self.board.set_inference_stat(self.row, "ready", 1)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model") as model:
            while True:
                running = self._running
                # A run in progress holds the heartbeat at its start, so a model that hangs shows
                # as a stalled loop (liveness) exactly as it did when the loop ran it itself.
                beat = running.submitted_ns if running is not None and not running.future.done() else time.time_ns()
                self.board.set_inference_stat(self.row, "heartbeat_ns", beat)
                now = time.monotonic()
                if self.batcher.room:
                    for slot in self.queue.ready_slots(self.batcher.room):
                        self.queue.take(int(slot))
                        self.batcher.add(int(slot), now)
                finished = None
                if running is not None and running.future.done():
                    finished, self._running = running, None
                if self._running is None and self._gathered is not None:
                    self._running = self._submit(model, self._gathered)
                    self._gathered = None
                if finished is not None:
                    self._finish(finished)  # while the next batch runs
                    if self.consecutive_failures >= _MAX_CONSECUTIVE_BATCH_FAILURES:
                        log.critical(
                            "%d batches failed in a row; exiting so the node restarts", self.consecutive_failures
                        )
                        return 3
                gathered = self._gather(now)
                if self._running is None and self._gathered is not None:
                    self._running = self._submit(model, self._gathered)
                    self._gathered = None
                idle = not self._running and not self._gathered
                if self.stopping and idle and not len(self.batcher) and not self.queue.depth():
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
                if finished is None and not gathered:
                    self._wait(now)
        counts = {name: self.board.inference_stat(self.row, name) for name in INFERENCE_COUNTERS}
        log.info("inference stopped: %s", counts)
        return 0

    def _gather(self, now: float) -> bool:
        """Claim the next batch into the gather buffers the running batch does not use, if there
        is none gathered yet: when the batcher says it is ready and the model is free, or as soon
        as it is full while the model runs (a partial batch waits for the model to be free, and
        may still grow). Returns whether it gathered."""
        if self._gathered is not None:
            return False
        if self._running is not None and len(self.batcher) < self.batcher.max_batch_size:
            return False
        slots = self.batcher.pop_ready(now, force=self.stopping)
        if not slots:
            return False
        buffers = 1 - self._running.buffers if self._running is not None else 0
        rows = padded_size(len(slots), self.classifier.pad_to) if self.classifier.pad_to else len(slots)
        batch = self.queue.claim(np.asarray(slots), into=self._buffers[buffers], rows=rows)
        self._gathered = (batch, buffers)
        return True

    def _submit(self, model: ThreadPoolExecutor, gathered: tuple[SlotBatch, int]) -> _Run:
        batch, buffers = gathered
        submitted_ns = time.time_ns()
        # bound to its buffer set: on an accelerator, each set has its own device memory
        score = functools.partial(self.classifier.score, bound=buffers)
        if self.overlap:
            future = model.submit(_timed, score, batch.features.inputs)
            return _Run(batch, buffers, future, submitted_ns)
        done: Future = Future()  # overlap off: run here, and the next turn decides for it
        try:
            done.set_result(_timed(score, batch.features.inputs))
        except Exception as error:
            done.set_exception(error)
        return _Run(batch, buffers, done, submitted_ns)

    def _wait(self, now: float) -> None:
        """Nothing moved this turn: wait for the running batch to end (or new slots to fill the
        next batch), else a little for new slots or the forming batch's deadline."""
        if self._running is not None:
            # Wakes as the run ends. The timeout only lets a batch that fills meanwhile be gathered
            # early; a partial batch past its deadline waits for the model all the same.
            futures.wait([self._running.future], timeout=_RUNNING_POLL_S)
            return
        deadline = self.batcher.deadline()
        time.sleep(_IDLE_SLEEP_S if deadline is None else min(_IDLE_SLEEP_S, max(0.0, deadline - now)))

    def _warm_up(self) -> None:
        """Run the model once per batch shape it will see (each padded size, or one batch on the
        CPU) before reporting ready: on CUDA the first run of a shape chooses its kernels."""
        example = {field.name: np.zeros((1, *field.shape), dtype=field.dtype) for field in self.queue.layout.fields}
        started = time.perf_counter()
        sizes = self.classifier.warm_up(example, bound=(0, 1))
        log.info(
            "warmed up on %s, batch sizes %s, in %.2f s; the model runs %s%s",
            self.classifier.session.get_providers()[0],
            sizes,
            time.perf_counter() - started,
            "in its own thread, overlapped" if self.overlap else "in the loop, in turn",
            ", its inputs and outputs bound to preallocated memory" if self.classifier.io_binding else "",
        )

    def _finish(self, run: _Run) -> None:
        """Decide for a batch the model has run, write the decisions back, or fail its offers."""
        batch, slots = run.batch, run.batch.slots
        count = len(slots)
        try:
            (logits, vectors), inference_ms = run.future.result()
            if logits.shape[0] < count:
                raise RuntimeError(f"model returned {logits.shape[0]} rows for {count} inputs")
            probabilities = softmax(logits[:count], self.bundle.temperature)
            decisions = decide_batch(
                probabilities,
                batch.features.exclusion[:count],
                labels=self.bundle.labels,
                threshold=self.threshold,
                parent_threshold=self.parent_threshold,
            )
            self.queue.score(slots, decisions, {k: v[:count] for k, v in vectors.items()}, inference_ms=inference_ms)
        except Exception as error:  # a failed batch fails every item in it; workers dead-letter them
            self.consecutive_failures += 1
            self.board.count_inference(self.row, "failed", count)
            log.error("batch of %d failed", count, exc_info=error)
            for slot in slots:
                self.queue.fail(int(slot), f"inference failed: {type(error).__name__}: {error}")
            return
        self.consecutive_failures = 0
        scored_ns = time.time_ns()
        self.board.count_inference(self.row, "batches")
        self.board.count_inference(self.row, "inference_ns", int(inference_ms * 1e6))
        self.board.observe_latency(self.row, batch.preprocess_ms + (scored_ns - batch.enqueued_ns) / 1e6)
        uncertain = decisions.category < 0
        self.board.count_inference(self.row, "predicted", count)
        self.board.count_inference(self.row, "uncertain", int(uncertain.sum()))
        self.board.count_inference(self.row, "uncertain_with_parent", int((decisions.parent >= 0).sum()))


@dataclass(frozen=True)
class _Run:
    """A batch the model thread runs: its slots' gathered inputs, which buffer set holds them,
    the run's result to come, and when it was handed over."""

    batch: SlotBatch
    buffers: int
    future: Future
    submitted_ns: int


def _timed(score, inputs: dict[str, np.ndarray]):
    """``(score(inputs), milliseconds)``, in the model thread (ONNX Runtime lets go of the GIL)."""
    started = time.perf_counter()
    result = score(inputs)
    return result, (time.perf_counter() - started) * 1000.0


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
