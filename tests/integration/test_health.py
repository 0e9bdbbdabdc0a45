"""A running node serves the health, readiness and metrics endpoints the Helm chart probes."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from core.offer_files import offers_from_frame, read_offer_file
from producers.publish import publish_offers, publish_raw
from tests.conftest import read_predictions

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, flags=re.M))


def test_health_readiness_and_metrics(marketplace, stream_settings, start_node):
    node = start_node(workers=2)
    deadline = time.monotonic() + 60
    while not (match := re.search(r"health and metrics on http://[^:]+:(\d+)", node.log())):
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.2)
    base = f"http://127.0.0.1:{match.group(1)}"
    assert get(f"{base}/healthz") == (200, "ok\n")
    while get(f"{base}/readyz")[0] != 200:
        assert time.monotonic() < deadline, get(f"{base}/readyz")
        time.sleep(0.2)
    assert get(f"{base}/nope")[0] == 404

    offers = list(offers_from_frame(read_offer_file(marketplace).head(120)))
    publish_offers(offers, stream_settings, progress=False)
    publish_raw([(b"bad", b"{oops")], stream_settings)
    read_predictions(stream_settings, {o.offer_id for o in offers})
    time.sleep(1.5)  # a commit/lag interval

    status, text = get(f"{base}/metrics")
    assert status == 200
    assert metric(text, "catstream_offers_consumed_total") == 121
    assert metric(text, "catstream_offers_enqueued_total") == 120
    assert metric(text, "catstream_dead_letters_total") == 1
    assert metric(text, "catstream_predictions_total") == 120
    assert metric(text, "catstream_offer_latency_seconds_count") == 120
    assert metric(text, "catstream_batches_total") >= 1
    assert metric(text, "catstream_queue_depth") == 0
    assert metric(text, "catstream_consumer_lag") == 0
    assert metric(text, "catstream_queue_slots") == 128
    assert re.search(r'catstream_model_info\{version="[^"]+"\} 1', text)
    page = Path(__file__).resolve().parents[2] / "docs" / "operations" / "health-and-metrics.md"
    documented = set(re.findall(r"^\| `(catstream_\w+)`", page.read_text(), flags=re.M))
    served = set(re.findall(r"^# TYPE (\S+)", text, flags=re.M))
    assert len(documented) >= 15 and documented == served
    assert node.stop() == 0


def test_half_open_connections_cannot_pile_up_threads(tmp_path):
    import socket
    import threading

    from catstream.health import MAX_CONNECTIONS, HealthServer, NodeStatus
    from core.node_board import NodeBoard

    board = NodeBoard.create(1, directory=tmp_path)
    status = NodeStatus(inference_alive=True, workers_alive=(True,), restarts=0, model_version="v1")
    server = HealthServer("127.0.0.1", 0, board, lambda: status).start()
    before = threading.active_count()
    idle = []
    try:
        for _ in range(300):  # connect and send nothing
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        time.sleep(0.5)
        assert threading.active_count() - before <= MAX_CONNECTIONS
        for sock in idle:
            sock.close()
        idle.clear()
        time.sleep(0.5)
        assert get(f"http://127.0.0.1:{server.port}/healthz") == (200, "ok\n")
    finally:
        for sock in idle:
            sock.close()
        server.stop()
        board.close()
