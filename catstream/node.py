"""The node supervisor behind ``catstream run``: one inference process, N preprocess processes.

It owns the shared-memory queue, restarts preprocess workers that die, and shuts down in the
order that loses nothing: workers stop polling and drain, then inference finishes the queue and
flushes, then the queue file is removed.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
from pathlib import Path

from catstream.health import HealthServer, NodeStatus
from core.bundle import ModelBundle
from core.feature_queue import FeatureQueue, QueueLayout
from core.features import input_fields_of
from core.settings import Settings
from gpu_workers.worker import run_inference_worker
from preprocess_workers.worker import run_preprocess_worker

__all__ = ["Node"]

log = logging.getLogger(__name__)

_INFERENCE_START_TIMEOUT_S = 120.0
_RESTART_BACKOFF_S = 1.0
# A worker that keeps dying (bad config, unreachable broker) is not restarted forever: the node
# exits non-zero and the orchestrator's back-off takes over.
_MAX_RESTARTS_PER_MINUTE = 5


class Node:
    """Runs the pipeline stages of one machine until :meth:`stop` (or SIGTERM/SIGINT)."""

    def __init__(self, settings: Settings, bundle_path: str | Path, *, log_level: str = "INFO"):
        self.settings = settings
        self.bundle_path = str(Path(bundle_path).resolve())
        self.bundle = ModelBundle.load(self.bundle_path, dictionaries_dir=settings.dictionaries_dir)
        self.log_level = log_level
        self._context = mp.get_context("spawn")  # librdkafka and ORT threads do not survive fork
        self._stop = threading.Event()
        self.restarts = 0
        self.health_port: int | None = None

    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

    def run(self) -> int:
        """Start the processes, supervise them, shut down in order; returns the exit code."""
        layout = QueueLayout(
            workers=self.settings.preprocess_workers,
            slots_per_worker=self.settings.slots_per_worker,
            fields=input_fields_of(self.bundle),
        )
        queue = FeatureQueue.create(layout, directory=self.settings.queue_dir)
        log.info("queue %s: %d slots, %.1f MiB", queue.path, layout.slots, queue.nbytes / 2**20)
        workers: list[mp.Process | None] = [None] * layout.workers
        inference = None
        exit_code = 0

        def status() -> NodeStatus:
            return NodeStatus(
                inference_alive=inference is not None and inference.is_alive(),
                workers_alive=tuple(p is not None and p.is_alive() for p in workers),
                restarts=self.restarts,
                model_version=self.bundle.version,
            )

        try:
            health = HealthServer(self.settings.health_host, self.settings.health_port, queue, status)
        except OSError as error:
            queue.close()
            log.error("cannot serve health/metrics on port %d: %s", self.settings.health_port, error)
            return 1
        health.start()
        self.health_port = health.port
        try:
            ready = self._context.Event()
            inference = self._context.Process(
                target=run_inference_worker,
                args=(self.settings, self.bundle_path, str(queue.path), self.log_level, ready),
                name="inference",
            )
            inference.start()
            log.info("inference pid=%d started (model %s)", inference.pid, self.bundle.version)
            if not self._wait_ready(ready, inference):
                return 1
            for index in range(layout.workers):
                workers[index] = self._start_worker(index, queue)
            exit_code = self._supervise(workers, inference, queue)
        finally:
            self._shutdown(workers, inference)
            health.stop()
            queue.close()
        if inference is not None and inference.exitcode not in (0, None) and exit_code == 0:
            exit_code = inference.exitcode
        log.info("node stopped (exit %d, %d worker restarts)", exit_code, self.restarts)
        return exit_code

    def _wait_ready(self, ready, inference) -> bool:
        deadline = time.monotonic() + _INFERENCE_START_TIMEOUT_S
        while not ready.wait(0.2):
            if not inference.is_alive():
                log.error("inference process exited with code %s during start", inference.exitcode)
                return False
            if self._stop.is_set() or time.monotonic() > deadline:
                log.error("inference process did not become ready")
                return False
        return True

    def _start_worker(self, index: int, queue: FeatureQueue) -> mp.Process:
        process = self._context.Process(
            target=run_preprocess_worker,
            args=(index, self.settings, self.bundle_path, str(queue.path), self.log_level),
            name=f"preprocess-{index}",
        )
        process.start()
        log.info("preprocess-%d pid=%d started", index, process.pid)
        return process

    def _supervise(self, workers: list, inference, queue: FeatureQueue) -> int:
        recent_restarts: list[float] = []
        while not self._stop.wait(0.2):
            if not inference.is_alive():
                log.error("inference process died (exit %s); stopping the node", inference.exitcode)
                return inference.exitcode or 1
            for index, process in enumerate(workers):
                if process is not None and not process.is_alive():
                    log.warning("preprocess-%d pid=%d died (exit %s); restarting", index, process.pid, process.exitcode)
                    now = time.monotonic()
                    recent_restarts = [t for t in recent_restarts if now - t < 60.0] + [now]
                    if len(recent_restarts) > _MAX_RESTARTS_PER_MINUTE:
                        log.error(
                            "preprocess workers died %d times in a minute; stopping the node", len(recent_restarts)
                        )
                        return 1
                    self.restarts += 1
                    time.sleep(_RESTART_BACKOFF_S)
                    workers[index] = self._start_worker(index, queue)
        return 0

    def _shutdown(self, workers: list, inference) -> None:
        grace = self.settings.drain_timeout_s + 2.0
        for process in workers:
            if process is not None and process.is_alive():
                process.terminate()  # SIGTERM: stop polling, drain, commit
        _join_all([p for p in workers if p is not None], grace)
        if inference is not None and inference.is_alive():
            inference.terminate()
            _join_all([inference], grace)


def _join_all(processes: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("%s pid=%d did not stop in time; killing it", process.name, process.pid)
            process.kill()
            process.join()
