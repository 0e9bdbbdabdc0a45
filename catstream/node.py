"""The node supervisor behind ``catstream run``: one inference process per model generation, N
preprocess processes.

It owns the node's board (``core.node_board``) and the queue of each generation, and watches what
the processes cannot watch themselves:

- a preprocess worker that dies is restarted; one that stays on a single offer past
  ``worker_stuck_s`` (or whose loop stops turning) is killed and restarted, and the offer gets a
  strike: an offer with two strikes is dead-lettered as ``stuck`` by the next worker that reads it;
- the Kafka cluster: with no broker reachable, readiness turns 503 at once, and past
  ``broker_unreachable_exit_s`` the node exits non-zero so that the orchestrator restarts it;
- the model: every ``model_poll_s`` it asks where ``--model`` points now (the registry alias,
  or the bundle directory, a symlink an operator swaps). A new bundle is loaded and checked
  (``core.scoring.check_bundle``) off the main loop; one that fails is refused with a log line
  and a metric, and the old model keeps serving. One that passes becomes the next generation: a
  new queue laid out for it and an inference process that loads it; once that process is ready
  the generation is published on the board, every worker moves its next offers to the new queue
  while its earlier offers finish in the old one, and the old inference process stops when its
  queue is empty. No offer is featurised by one bundle and scored by another;
- leftovers of a node that was killed: stale queue and board files in the queue directory are
  removed at start (the node creates no semaphores, so there are none to leave).

It shuts down in the order that loses nothing: workers stop polling and drain, then inference
finishes the queue and flushes, then the files are removed. A process that has to be killed on
the way makes the exit code non-zero.
"""

from __future__ import annotations

import enum
import logging
import multiprocessing as mp
import os
import queue as queue_module
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from catstream.health import HealthServer, NodeStatus
from core.bundle import BundleError, ModelBundle
from core.feature_queue import CLAIMED, READY, FeatureQueue, QueueLayout
from core.features import input_fields_of
from core.kafka import client_config
from core.node_board import NodeBoard, Serving
from core.registry import MODELS_SCHEME, Registry, resolve_model_uri
from core.scoring import check_bundle, vector_fields_of
from core.settings import Settings
from gpu_workers.worker import run_inference_worker
from preprocess_workers.worker import run_preprocess_worker

__all__ = ["EXIT_BROKER_UNREACHABLE", "EXIT_KILLED_AT_DRAIN", "Node", "remove_stale_files"]

log = logging.getLogger(__name__)

EXIT_KILLED_AT_DRAIN = 1
EXIT_BROKER_UNREACHABLE = 4
_INFERENCE_START_TIMEOUT_S = 120.0
_RESTART_BACKOFF_S = 1.0
# A worker that keeps dying (bad config, unreachable broker) is not restarted forever: the node
# exits non-zero and the orchestrator's back-off takes over.
_MAX_RESTARTS_PER_MINUTE = 5
_BROKER_PROBE_INTERVAL_S = 2.0
# A worker's loop may stop turning while it waits on one offer; past this much more than the
# stuck bound, it is wedged outside any offer (in a library call) and is restarted too.
_HEARTBEAT_GRACE_S = 15.0
_NODE_FILE = re.compile(r"catstream-(?:queue|board)-(\d+)-[0-9a-f]{8}$")


def remove_stale_files(directory: str | Path) -> list[Path]:
    """Remove the queue and board files of nodes that no longer run (their creator's pid is
    gone): what a node killed with SIGKILL leaves in ``/dev/shm``. Returns what was removed."""
    removed = []
    for path in Path(directory).glob("catstream-*"):
        match = _NODE_FILE.match(path.name)
        if match is None or _alive(int(match[1])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to touch
        return True
    return True


class _BrokerProbe:
    """Asks the cluster for its metadata every few seconds on a daemon thread; knows since when no
    broker answered."""

    def __init__(self, settings: Settings):
        self._admin = AdminClient(client_config(settings))
        self._last_ok = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-probe", daemon=True)

    def start(self) -> _BrokerProbe:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admin.list_topics(timeout=_BROKER_PROBE_INTERVAL_S)
                self._last_ok = time.monotonic()
            except KafkaException:
                pass
            self._stop.wait(_BROKER_PROBE_INTERVAL_S)

    @property
    def unreachable_s(self) -> float:
        """Seconds since a broker last answered; 0 while one answers within the probe's cycle."""
        silent = time.monotonic() - self._last_ok
        return silent if silent > 2.5 * _BROKER_PROBE_INTERVAL_S else 0.0

    def stop(self) -> None:
        self._stop.set()


class _ModelWatch:
    """Where ``--model`` points, checked every ``interval_s`` on a daemon thread: a new bundle that
    loads and passes its check is handed over through :attr:`ready`; one that does not is refused
    (logged, counted) and not tried again until it changes."""

    def __init__(self, model: str, registry: Registry, current: ModelBundle, interval_s: float, settings: Settings):
        self.model = model
        self.registry = registry
        self.interval_s = interval_s
        self.settings = settings
        self.ready: queue_module.SimpleQueue[tuple[str, ModelBundle]] = queue_module.SimpleQueue()
        self.refused = 0
        self._seen = {(str(current.path.resolve()), current.version)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-watch", daemon=True)

    def start(self) -> _ModelWatch:
        if self.interval_s > 0:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._look()
            except Exception:  # the registry may be down for a while; the old model serves on
                log.exception("could not look for a new model at %s; serving on", self.model)

    def _look(self) -> None:
        path = (
            resolve_model_uri(self.model, registry=self.registry)
            if self.model.startswith(MODELS_SCHEME)
            else Path(self.model)
        ).resolve()
        try:
            bundle = ModelBundle.load(path, dictionaries_dir=self.settings.dictionaries_dir)
        except BundleError as error:
            key = (str(path), "unreadable")
            if key not in self._seen:
                self._seen.add(key)
                self.refused += 1
                log.error("refused the model at %s: %s; the current model keeps serving", path, error)
            return
        key = (str(path), bundle.version)
        if key in self._seen:
            return
        self._seen.add(key)
        try:
            check_bundle(bundle, providers=self.settings.providers, precision=self.settings.precision)
        except BundleError as error:
            self.refused += 1
            log.error("refused model %s: %s; the current model keeps serving", bundle.version, error)
            return
        log.info("model %s at %s passed its check; switching to it", bundle.version, path)
        self.ready.put((str(path), bundle))

    def stop(self) -> None:
        self._stop.set()


@dataclass
class _Generation:
    """One model generation: its bundle, queue and inference process."""

    number: int
    bundle: ModelBundle
    bundle_path: str
    queue: FeatureQueue
    inference: mp.process.BaseProcess

    @property
    def row(self) -> int:
        return self.number % 2


class _Switch(enum.Enum):
    STARTING = "starting"  # the next generation's inference process loads its model
    MOVING = "moving"  # published: workers move to the new queue; the old one empties


class Node:
    """Runs the pipeline stages of one machine until :meth:`stop` (or SIGTERM/SIGINT)."""

    def __init__(
        self, settings: Settings, model: str | Path, *, log_level: str = "INFO", registry: Registry | None = None
    ):
        self.settings = settings
        self.model = str(model)
        self.registry = registry or Registry()
        bundle_path = resolve_model_uri(self.model, registry=self.registry).resolve()
        self.bundle = ModelBundle.load(bundle_path, dictionaries_dir=settings.dictionaries_dir)
        self.bundle_path = str(bundle_path)
        self.log_level = log_level
        self._context = mp.get_context("spawn")  # librdkafka and ORT threads do not survive fork
        # A plain flag, not a threading.Event: the SIGTERM handler runs on the main thread between
        # two bytecodes, possibly inside Event.wait() while it holds the Event's lock, and an
        # Event.set() there waits on that lock forever (the node then ignored SIGTERM until killed).
        self._stopping = False
        self.restarts = 0
        self.switched = 0
        self.health_port: int | None = None
        self._killed_at_drain = False
        self._workers: list[mp.process.BaseProcess | None] = []
        self._current: _Generation | None = None
        self._next: _Generation | None = None
        self._switch: _Switch | None = None
        self._switch_started = 0.0
        if settings.worker_stuck_s <= settings.image_timeout_s:
            log.warning(
                "worker_stuck_s (%g s) is not above image_timeout_s (%g s): a worker waiting on a slow "
                "image host will be taken for stuck",
                settings.worker_stuck_s,
                settings.image_timeout_s,
            )

    def stop(self) -> None:
        """Ask the node to shut down; safe from a signal handler and from any thread."""
        self._stopping = True

    def _stopped_after(self, seconds: float) -> bool:
        """Sleep ``seconds`` (a signal cuts nothing short: PEP 475), then whether stop was asked."""
        time.sleep(seconds)
        return self._stopping

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

    def run(self) -> int:
        """Start the processes, supervise them, shut down in order; returns the exit code."""
        for path in remove_stale_files(self.settings.queue_dir):
            log.warning("removed %s, left by a node that is no longer running", path)
        board = NodeBoard.create(self.settings.preprocess_workers, directory=self.settings.queue_dir)
        self._workers = [None] * self.settings.preprocess_workers
        probe = _BrokerProbe(self.settings).start()
        watch = _ModelWatch(self.model, self.registry, self.bundle, self.settings.model_poll_s, self.settings)
        exit_code = 0

        def depth_and_slots(generation: _Generation | None) -> tuple[int, int]:
            try:
                return generation.queue.depth(), generation.queue.layout.slots
            except (AttributeError, TypeError):  # no generation yet, or its queue closed at a model change
                return 0, 0

        def status() -> NodeStatus:
            current = self._current
            depth, slots = depth_and_slots(current)
            return NodeStatus(
                inference_alive=current is not None and current.inference.is_alive(),
                workers_alive=tuple(p is not None and p.is_alive() for p in self._workers),
                restarts=self.restarts,
                model_version=current.bundle.version if current else self.bundle.version,
                broker_unreachable_s=probe.unreachable_s,
                worker_stuck_s=self.settings.worker_stuck_s,
                inference_row=current.row if current else 0,
                queue_depth=depth,
                queue_slots=slots,
                model_reloads=(self.switched, watch.refused),
            )

        try:
            health = HealthServer(self.settings.health_host, self.settings.health_port, board, status)
        except OSError as error:
            probe.stop()
            board.close()
            log.error("cannot serve health/metrics on port %d: %s", self.settings.health_port, error)
            return 1
        health.start()
        self.health_port = health.port
        try:
            self._current = self._start_generation(0, self.bundle, self.bundle_path, board)
            if not self._wait_ready(self._current, board):
                return 1
            board.publish(Serving(0, str(self._current.queue.path), self.bundle_path))
            for index in range(len(self._workers)):
                self._workers[index] = self._start_worker(index, board)
            watch.start()
            exit_code = self._supervise(board, probe, watch)
        finally:
            watch.stop()
            self._shutdown()
            probe.stop()
            health.stop()
            board.close()
        crashed = self._current.inference.exitcode if self._current is not None else None
        if crashed not in (0, None) and exit_code == 0:
            exit_code = crashed
        if self._killed_at_drain and exit_code == 0:
            exit_code = EXIT_KILLED_AT_DRAIN
        log.info(
            "node stopped (exit %d, %d worker restarts, %d model changes)", exit_code, self.restarts, self.switched
        )
        return exit_code

    # --- generations --------------------------------------------------------------------------------

    def _start_generation(self, number: int, bundle: ModelBundle, bundle_path: str, board: NodeBoard) -> _Generation:
        layout = QueueLayout(
            workers=self.settings.preprocess_workers,
            slots_per_worker=self.settings.slots_per_worker,
            fields=input_fields_of(bundle),
            vectors=vector_fields_of(bundle),
        )
        queue = FeatureQueue.create(layout, directory=self.settings.queue_dir)
        row = number % 2
        board.set_inference_stat(row, "ready", 0)  # the row's previous process has exited
        board.set_inference_stat(row, "heartbeat_ns", 0)
        inference = self._context.Process(
            target=run_inference_worker,
            args=(self.settings, str(board.path), number, str(queue.path), bundle_path, self.log_level),
            name=f"inference-{number}",
        )
        inference.start()
        log.info(
            "model generation %d: queue %s (%d slots, %.1f MiB), inference pid=%d, model %s",
            number,
            queue.path,
            layout.slots,
            queue.nbytes / 2**20,
            inference.pid,
            bundle.version,
        )
        return _Generation(number, bundle, bundle_path, queue, inference)

    def _wait_ready(self, generation: _Generation, board: NodeBoard) -> bool:
        """Until the generation's inference process has loaded its model."""
        deadline = time.monotonic() + _INFERENCE_START_TIMEOUT_S
        while not board.inference_stat(generation.row, "ready"):
            if not generation.inference.is_alive():
                log.error("inference process exited with code %s during start", generation.inference.exitcode)
                return False
            if self._stopped_after(0.1) or time.monotonic() > deadline:
                log.error("inference process did not become ready")
                return False
        return True

    def _advance_switch(self, board: NodeBoard, watch: _ModelWatch) -> None:
        """One step of a model change, so the main loop keeps supervising while it happens."""
        if self._switch is None:
            try:
                bundle_path, bundle = watch.ready.get_nowait()
            except queue_module.Empty:
                return
            assert self._current is not None
            self._next = self._start_generation(self._current.number + 1, bundle, bundle_path, board)
            self._switch, self._switch_started = _Switch.STARTING, time.monotonic()
            return
        current, upcoming = self._current, self._next
        assert current is not None and upcoming is not None
        if self._switch is _Switch.STARTING:
            if board.inference_stat(upcoming.row, "ready"):
                board.publish(Serving(upcoming.number, str(upcoming.queue.path), upcoming.bundle_path))
                self._switch = _Switch.MOVING
                log.info("model generation %d published; workers move to it", upcoming.number)
            elif (
                not upcoming.inference.is_alive()
                or time.monotonic() - self._switch_started > _INFERENCE_START_TIMEOUT_S
            ):
                watch.refused += 1
                log.error(
                    "model %s did not start (inference exit %s); the current model keeps serving",
                    upcoming.bundle.version,
                    upcoming.inference.exitcode,
                )
                self._stop_inference(upcoming)
                self._next, self._switch = None, None
            return
        moved = all(
            p is None or not p.is_alive() or board.worker_stat(i, "generation") == upcoming.number
            for i, p in enumerate(self._workers)
        )
        in_progress = int(((current.queue.state == READY) | (current.queue.state == CLAIMED)).sum())
        if moved and not in_progress:
            self._current, self._next, self._switch = upcoming, None, None  # before the old queue closes
            self._stop_inference(current)
            self.switched += 1
            log.info(
                "model generation %d serves (version %s); generation %d stopped",
                upcoming.number,
                upcoming.bundle.version,
                current.number,
            )

    def _stop_inference(self, generation: _Generation) -> None:
        if generation.inference.is_alive():
            generation.inference.terminate()  # SIGTERM: finish the queue, exit
        self._join_all([generation.inference], self.settings.drain_timeout_s + 2.0)
        generation.queue.close()

    # --- workers ------------------------------------------------------------------------------------

    def _start_worker(self, index: int, board: NodeBoard) -> mp.process.BaseProcess:
        board.idle(index)  # the previous process of this index may have died on an offer
        process = self._context.Process(
            target=run_preprocess_worker,
            args=(index, self.settings, str(board.path), self.log_level),
            name=f"preprocess-{index}",
        )
        process.start()
        log.info("preprocess-%d pid=%d started", index, process.pid)
        return process

    def _supervise(self, board: NodeBoard, probe: _BrokerProbe, watch: _ModelWatch) -> int:
        recent_restarts: list[float] = []
        while not self._stopped_after(0.2):
            current = self._current
            assert current is not None
            if not current.inference.is_alive():
                log.error("inference process died (exit %s); stopping the node", current.inference.exitcode)
                return current.inference.exitcode or 1
            silent = probe.unreachable_s
            if silent > self.settings.broker_unreachable_exit_s:
                log.error(
                    "no Kafka broker reachable at %s for %.0f s (bound %g s); exiting so the node is restarted",
                    self.settings.bootstrap_servers,
                    silent,
                    self.settings.broker_unreachable_exit_s,
                )
                return EXIT_BROKER_UNREACHABLE
            self._advance_switch(board, watch)
            for index, process in enumerate(self._workers):
                if process is None:
                    continue
                if process.is_alive():
                    if not self._wedged(index, process, board):
                        continue
                    process.kill()
                    process.join(5.0)
                else:
                    log.warning("preprocess-%d pid=%d died (exit %s); restarting", index, process.pid, process.exitcode)
                now = time.monotonic()
                recent_restarts = [t for t in recent_restarts if now - t < 60.0] + [now]
                if len(recent_restarts) > _MAX_RESTARTS_PER_MINUTE:
                    log.error("preprocess workers died %d times in a minute; stopping the node", len(recent_restarts))
                    return 1
                self.restarts += 1
                time.sleep(_RESTART_BACKOFF_S)
                self._workers[index] = self._start_worker(index, board)
        return 0

    def _wedged(self, index: int, process, board: NodeBoard) -> bool:
        """Whether the live worker ``index`` is stuck: on one offer past the bound (the offer then
        gets a strike), or with a loop that stopped turning outside any offer."""
        now_ns = time.time_ns()
        busy = board.busy_with(index)
        bound = self.settings.worker_stuck_s
        if busy is not None:
            since_ns, partition, offset = busy
            if (now_ns - since_ns) / 1e9 <= bound:
                return False
            strikes = board.strike(partition, offset)
            log.error(
                "preprocess-%d pid=%d has been on the offer at partition %d offset %d for over %g s; killing "
                "and restarting it (strike %d of this offer)",
                index,
                process.pid,
                partition,
                offset,
                bound,
                strikes,
            )
            return True
        heartbeat = board.worker_stat(index, "heartbeat_ns")
        if heartbeat and (now_ns - heartbeat) / 1e9 > bound + _HEARTBEAT_GRACE_S:
            log.error(
                "preprocess-%d pid=%d stopped turning its loop %.0f s ago; killing and restarting it",
                index,
                process.pid,
                (now_ns - heartbeat) / 1e9,
            )
            return True
        return False

    # --- shutdown -----------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        grace = self.settings.drain_timeout_s + 2.0
        for process in self._workers:
            if process is not None and process.is_alive():
                process.terminate()  # SIGTERM: stop polling, drain, commit
        self._join_all([p for p in self._workers if p is not None], grace)
        for generation in (self._next, self._current):
            if generation is not None:
                self._stop_inference(generation)

    def _join_all(self, processes: list, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("%s pid=%d did not stop in time; killing it", process.name, process.pid)
                process.kill()
                process.join()
                self._killed_at_drain = True
