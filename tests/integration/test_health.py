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
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = set(re.findall(r"`(catstream_\w+)", readme.split("## Health and metrics")[1].split("\n## ")[0]))
    served = set(re.findall(r"^# TYPE (\S+)", text, flags=re.M))
    assert len(documented) >= 15 and documented == served
    assert node.stop() == 0
