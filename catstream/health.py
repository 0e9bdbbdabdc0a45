"""Health, readiness and Prometheus metrics of a node, served by its supervisor.

    GET /healthz   200 while the inference process is alive and its loop is turning (liveness)
    GET /readyz    200 once the model is loaded, every preprocess worker is alive and a broker answers
    GET /metrics   Prometheus text format (docs/operations/health-and-metrics.md)

Everything is read from the counters on the node's board (``core.node_board``), so a scrape
costs the workers nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from core.node_board import LATENCY_BUCKETS_MS, WORKER_COUNTERS, NodeBoard, starved_for_s

__all__ = [
    "CONNECTION_TIMEOUT_S",
    "HEARTBEAT_TIMEOUT_S",
    "INFERENCE_METRICS",
    "NODE_METRICS",
    "WORKER_METRICS",
    "BoundedHTTPServer",
    "HealthServer",
    "NodeStatus",
    "liveness",
    "readiness",
    "render_metrics",
]

log = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class NodeStatus:
    """What only the supervisor knows: which processes are alive, how often workers restarted,
    since when no Kafka broker answered."""

    inference_alive: bool
    workers_alive: tuple[bool, ...]
    restarts: int
    model_version: str
    broker_unreachable_s: float = 0.0  # 0: a broker answers
    worker_stuck_s: float = 30.0  # the supervisor restarts a worker stuck this long
    inference_row: int = 0  # the board row of the serving generation's inference process
    queue_depth: int = 0  # offers waiting in the serving generation's queue
    queue_slots: int = 0
    model_reloads: tuple[int, int] = (0, 0)  # model changes switched to, and refused


def _age_s(heartbeat_ns: int, now_ns: int) -> float:
    return float("inf") if heartbeat_ns <= 0 else (now_ns - heartbeat_ns) / 1e9


def liveness(board: NodeBoard, status: NodeStatus, now_ns: int) -> tuple[bool, str]:
    """Whether the node should be left running: its inference loop turns, and no preprocess
    worker has stopped turning its loop for longer than the supervisor would have taken to restart
    it (a 503 here makes the orchestrator restart the whole pod)."""
    heartbeat = board.inference_stat(status.inference_row, "heartbeat_ns")
    if not status.inference_alive:
        return False, "inference process is not running"
    if heartbeat and _age_s(heartbeat, now_ns) > HEARTBEAT_TIMEOUT_S:
        return False, f"inference loop stalled for {_age_s(heartbeat, now_ns):.0f} s"
    bound = status.worker_stuck_s + 2 * HEARTBEAT_TIMEOUT_S
    for index, worker_alive in enumerate(status.workers_alive):
        worker_heartbeat = board.worker_stat(index, "heartbeat_ns")
        if worker_alive and worker_heartbeat and _age_s(worker_heartbeat, now_ns) > bound:
            return False, f"preprocess-{index} stuck for {_age_s(worker_heartbeat, now_ns):.0f} s"
    return True, "ok"


def readiness(board: NodeBoard, status: NodeStatus, now_ns: int) -> tuple[bool, str]:
    """Whether the node should get traffic: alive, the model loaded, every worker polling, and a
    Kafka broker reachable."""
    alive, reason = liveness(board, status, now_ns)
    if not alive:
        return False, reason
    if not board.inference_stat(status.inference_row, "ready"):
        return False, "model not loaded yet"
    if status.broker_unreachable_s:
        return False, f"no Kafka broker reachable for {status.broker_unreachable_s:.0f} s"
    for index, worker_alive in enumerate(status.workers_alive):
        heartbeat = board.worker_stat(index, "heartbeat_ns")
        if not worker_alive or _age_s(heartbeat, now_ns) > HEARTBEAT_TIMEOUT_S:
            return False, f"preprocess-{index} is not running"
        starved = starved_for_s(board, index, now_ns)
        if starved is not None:
            return False, (
                f"preprocess-{index} has consumed nothing for {starved:.0f} s while "
                f"{board.worker_stat(index, 'lag'):,} offers wait on its partitions"
            )
    return True, "ok"


# Every metric is declared here once; docs/operations/health-and-metrics.md is generated from it.
WORKER_METRICS = {  # board counter → (metric, type, help); one sample per worker
    "consumed": ("catstream_offers_consumed_total", "counter", "Offer messages consumed from Kafka."),
    "enqueued": ("catstream_offers_enqueued_total", "counter", "Offers featurised and put on the queue."),
    "dead_lettered": ("catstream_dead_letters_total", "counter", "Messages sent to the dead-letter topic."),
    "delivered": (
        "catstream_predictions_delivered_total",
        "counter",
        "Predictions the broker acknowledged (their offers' offsets may move on).",
    ),
    "image_unused": ("catstream_images_unused_total", "counter", "Offers categorised without their image."),
    "pauses": ("catstream_backpressure_pauses_total", "counter", "Times a worker paused its partitions (queue full)."),
    "lag": ("catstream_consumer_lag", "gauge", "Offers waiting in Kafka on this worker's partitions."),
}
INFERENCE_METRICS = {  # board counter → (metric, type, help); one sample per node
    "predicted": ("catstream_predictions_total", "counter", "Offers the model scored (offers/s = rate of this)."),
    "uncertain": ("catstream_uncertain_total", "counter", "Predictions that answered 'uncertain'."),
    "uncertain_with_parent": (
        "catstream_uncertain_with_parent_total",
        "counter",
        "Uncertain predictions that still name a confident parent category.",
    ),
    "batches": ("catstream_batches_total", "counter", "Inference batches (mean batch size = predictions/batches)."),
    "failed": ("catstream_inference_failures_total", "counter", "Offers whose inference batch failed."),
}
_LATENCY = "catstream_offer_latency_seconds"
NODE_METRICS = (  # (metric, type, labels, help) of what the supervisor knows or computes
    ("catstream_inference_seconds_total", "counter", "", "Time spent running the model."),
    ("catstream_queue_depth", "gauge", "", "Offers waiting in the shared-memory queue."),
    ("catstream_queue_slots", "gauge", "", "Slots of the shared-memory queue."),
    ("catstream_worker_restarts_total", "counter", "", "Preprocess workers restarted by the supervisor."),
    ("catstream_model_info", "gauge", "version", "The served model."),
    (
        "catstream_model_reloads_total",
        "counter",
        "result",
        "Model changes seen by the node: switched to, or refused (it did not load or failed its check).",
    ),
    (_LATENCY, "histogram", "le", "Time from a worker taking an offer to its prediction (preprocess + queue + model)."),
)


def render_metrics(board: NodeBoard, status: NodeStatus) -> str:
    """The Prometheus text exposition of one node."""
    lines: list[str] = []

    def header(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        header(name, kind, help_text)
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    for counter, (name, kind, help_text) in WORKER_METRICS.items():
        column = WORKER_COUNTERS.index(counter)
        samples = [(f'{{worker="{w}"}}', float(board.worker_stats[w, column])) for w in range(board.workers)]
        metric(name, kind, help_text, samples)
    for counter, (name, kind, help_text) in INFERENCE_METRICS.items():
        metric(name, kind, help_text, [("", float(board.inference_total(counter)))])
    node = {
        "catstream_inference_seconds_total": [("", board.inference_total("inference_ns") / 1e9)],
        "catstream_queue_depth": [("", status.queue_depth)],
        "catstream_queue_slots": [("", status.queue_slots)],
        "catstream_worker_restarts_total": [("", status.restarts)],
        "catstream_model_info": [(f'{{version="{status.model_version}"}}', 1)],
        "catstream_model_reloads_total": [
            ('{result="switched"}', status.model_reloads[0]),
            ('{result="refused"}', status.model_reloads[1]),
        ],
    }
    for name, kind, _, help_text in NODE_METRICS:
        if name != _LATENCY:
            metric(name, kind, help_text, node[name])
    name, kind, _, help_text = NODE_METRICS[-1]
    header(name, kind, help_text)
    cumulative = 0
    for bound, count in zip((*LATENCY_BUCKETS_MS, None), board.latency_buckets.sum(axis=0), strict=True):
        cumulative += int(count)
        le = "+Inf" if bound is None else f"{bound / 1000:g}"
        lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
    lines.append(f"{name}_sum {board.latency_sum_us.sum() / 1e6:g}")
    lines.append(f"{name}_count {cumulative}")
    return "\n".join(lines) + "\n"


# A probe or a scrape answers in milliseconds: a connection idle this long is dropped, and no more
# than this many are served at once (the others are closed at once), so half-open connections
# cannot pile up threads.
CONNECTION_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that serves at most ``MAX_CONNECTIONS`` connections at once and
    drops the rest, so half-open connections cannot take every thread."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: connections beyond it wait in the kernel, unseen

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: the prober retries
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HealthServer:
    """A small HTTP server on a daemon thread; ``status`` is called per request."""

    def __init__(self, host: str, port: int, board: NodeBoard, status: Callable[[], NodeStatus]):
        board_ref, status_ref = board, status

        class Handler(BaseHTTPRequestHandler):
            timeout = CONNECTION_TIMEOUT_S

            def do_GET(self):
                now = time.time_ns()
                path = self.path.split("?")[0]
                if path == "/metrics":
                    self._reply(200, render_metrics(board_ref, status_ref()), "text/plain; version=0.0.4")
                elif path in ("/healthz", "/readyz"):
                    check = liveness if path == "/healthz" else readiness
                    ok, reason = check(board_ref, status_ref(), now)
                    self._reply(200 if ok else 503, reason + "\n", "text/plain")
                else:
                    self._reply(404, "not found; try /healthz, /readyz or /metrics\n", "text/plain")

            def _reply(self, code: int, body: str, content_type: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # probes every few seconds would flood the log
                pass

        self._server = BoundedHTTPServer((host, port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health and metrics on http://%s:%d (/healthz /readyz /metrics)", *self._server.server_address[:2])
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
