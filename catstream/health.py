"""Health, readiness and Prometheus metrics of a node, served by its supervisor.

    GET /healthz   200 while the inference process is alive and its loop is turning (liveness)
    GET /readyz    200 once the model is loaded and every preprocess worker is alive (readiness)
    GET /metrics   Prometheus text format (see README, "Metrics")

Everything is read from the counters in the shared-memory queue file, so a scrape costs the
workers nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from core.feature_queue import INFERENCE_COUNTERS, LATENCY_BUCKETS_MS, WORKER_COUNTERS, FeatureQueue

__all__ = [
    "HEARTBEAT_TIMEOUT_S",
    "INFERENCE_METRICS",
    "NODE_METRICS",
    "WORKER_METRICS",
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
    """What only the supervisor knows: which processes are alive, how often workers restarted."""

    inference_alive: bool
    workers_alive: tuple[bool, ...]
    restarts: int
    model_version: str


def _age_s(heartbeat_ns: int, now_ns: int) -> float:
    return float("inf") if heartbeat_ns <= 0 else (now_ns - heartbeat_ns) / 1e9


def liveness(queue: FeatureQueue, status: NodeStatus, now_ns: int) -> tuple[bool, str]:
    heartbeat = int(queue.inference_stats[INFERENCE_COUNTERS.index("heartbeat_ns")])
    if not status.inference_alive:
        return False, "inference process is not running"
    if heartbeat and _age_s(heartbeat, now_ns) > HEARTBEAT_TIMEOUT_S:
        return False, f"inference loop stalled for {_age_s(heartbeat, now_ns):.0f} s"
    return True, "ok"


def readiness(queue: FeatureQueue, status: NodeStatus, now_ns: int) -> tuple[bool, str]:
    alive, reason = liveness(queue, status, now_ns)
    if not alive:
        return False, reason
    if not queue.inference_stats[INFERENCE_COUNTERS.index("ready")]:
        return False, "model not loaded yet"
    for index, worker_alive in enumerate(status.workers_alive):
        heartbeat = int(queue.worker_stats[index, WORKER_COUNTERS.index("heartbeat_ns")])
        if not worker_alive or _age_s(heartbeat, now_ns) > HEARTBEAT_TIMEOUT_S:
            return False, f"preprocess-{index} is not running"
    return True, "ok"


# Every metric is declared here once; docs/operations/health-and-metrics.md is generated from it.
WORKER_METRICS = {  # queue counter → (metric, type, help); one sample per worker
    "consumed": ("catstream_offers_consumed_total", "counter", "Offer messages consumed from Kafka."),
    "enqueued": ("catstream_offers_enqueued_total", "counter", "Offers featurised and put on the queue."),
    "dead_lettered": ("catstream_dead_letters_total", "counter", "Messages sent to the dead-letter topic."),
    "image_unused": ("catstream_images_unused_total", "counter", "Offers categorised without their image."),
    "pauses": ("catstream_backpressure_pauses_total", "counter", "Times a worker paused its partitions (queue full)."),
    "lag": ("catstream_consumer_lag", "gauge", "Offers waiting in Kafka on this worker's partitions."),
}
INFERENCE_METRICS = {  # queue counter → (metric, type, help); one sample per node
    "predicted": ("catstream_predictions_total", "counter", "Predictions produced (offers/s = rate of this)."),
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
    (_LATENCY, "histogram", "le", "Time from a worker taking an offer to its prediction (preprocess + queue + model)."),
)


def render_metrics(queue: FeatureQueue, status: NodeStatus) -> str:
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
        samples = [(f'{{worker="{w}"}}', float(queue.worker_stats[w, column])) for w in range(queue.layout.workers)]
        metric(name, kind, help_text, samples)
    for counter, (name, kind, help_text) in INFERENCE_METRICS.items():
        metric(name, kind, help_text, [("", float(queue.inference_stats[INFERENCE_COUNTERS.index(counter)]))])
    node = {
        "catstream_inference_seconds_total": [
            ("", queue.inference_stats[INFERENCE_COUNTERS.index("inference_ns")] / 1e9)
        ],
        "catstream_queue_depth": [("", queue.depth())],
        "catstream_queue_slots": [("", queue.layout.slots)],
        "catstream_worker_restarts_total": [("", status.restarts)],
        "catstream_model_info": [(f'{{version="{status.model_version}"}}', 1)],
    }
    for name, kind, _, help_text in NODE_METRICS:
        if name != _LATENCY:
            metric(name, kind, help_text, node[name])
    name, kind, _, help_text = NODE_METRICS[-1]
    header(name, kind, help_text)
    cumulative = 0
    for bound, count in zip((*LATENCY_BUCKETS_MS, None), queue.latency_buckets, strict=True):
        cumulative += int(count)
        le = "+Inf" if bound is None else f"{bound / 1000:g}"
        lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
    lines.append(f"{name}_sum {queue.latency_sum_us[0] / 1e6:g}")
    lines.append(f"{name}_count {cumulative}")
    return "\n".join(lines) + "\n"


class HealthServer:
    """A small HTTP server on a daemon thread; ``status`` is called per request."""

    def __init__(self, host: str, port: int, queue: FeatureQueue, status: Callable[[], NodeStatus]):
        queue_ref, status_ref = queue, status

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                now = time.time_ns()
                path = self.path.split("?")[0]
                if path == "/metrics":
                    self._reply(200, render_metrics(queue_ref, status_ref()), "text/plain; version=0.0.4")
                elif path in ("/healthz", "/readyz"):
                    check = liveness if path == "/healthz" else readiness
                    ok, reason = check(queue_ref, status_ref(), now)
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

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health and metrics on http://%s:%d (/healthz /readyz /metrics)", *self._server.server_address[:2])
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
