import re
import time

import numpy as np
import pytest

from catstream.health import NodeStatus, liveness, readiness, render_metrics
from core.feature_queue import FeatureQueue, QueueLayout
from core.features import input_fields

LAYOUT = QueueLayout(
    workers=2,
    slots_per_worker=2,
    fields=input_fields(
        image_size=4, max_title_tokens=2, max_mall_tokens=2, max_title_grams=0, num_classes=3, lexical=False
    ),
)


@pytest.fixture()
def queue(tmp_path):
    q = FeatureQueue.create(LAYOUT, directory=tmp_path)
    yield q
    q.close()


def status(inference=True, workers=(True, True)):
    return NodeStatus(inference_alive=inference, workers_alive=workers, restarts=1, model_version="v1")


def test_readiness_needs_model_loaded_and_live_workers(queue):
    now = time.time_ns()
    assert liveness(queue, status(), now)[0]  # alive before the first heartbeat
    assert readiness(queue, status(), now) == (False, "model not loaded yet")
    queue.set_inference_stat("ready", 1)
    queue.set_inference_stat("heartbeat_ns", now)
    assert not readiness(queue, status(), now)[0]  # workers have not beaten yet
    for worker in range(2):
        queue.set_worker_stat(worker, "heartbeat_ns", now)
    assert readiness(queue, status(), now) == (True, "ok")
    assert readiness(queue, status(workers=(True, False)), now) == (False, "preprocess-1 is not running")
    assert liveness(queue, status(inference=False), now)[0] is False
    stalled = now + int(60e9)
    assert "stalled" in liveness(queue, status(), stalled)[1]


def test_metrics_exposition(queue):
    queue.count(0, "consumed", 7)
    queue.count(1, "consumed", 3)
    queue.count(1, "dead_lettered", 2)
    queue.set_worker_stat(0, "lag", 42)
    queue.count_inference("predicted", 8)
    queue.count_inference("batches", 2)
    queue.observe_latency(np.array([3.0, 7.0, 7.0, 20000.0]))
    text = render_metrics(queue, status())
    assert 'catstream_offers_consumed_total{worker="0"} 7' in text
    assert 'catstream_offers_consumed_total{worker="1"} 3' in text
    assert 'catstream_dead_letters_total{worker="1"} 2' in text
    assert 'catstream_consumer_lag{worker="0"} 42' in text
    assert "catstream_predictions_total 8" in text and "catstream_batches_total 2" in text
    assert "catstream_queue_slots 4" in text and "catstream_worker_restarts_total 1" in text
    assert 'catstream_offer_latency_seconds_bucket{le="0.005"} 1' in text
    assert 'catstream_offer_latency_seconds_bucket{le="0.01"} 3' in text
    assert 'catstream_offer_latency_seconds_bucket{le="+Inf"} 4' in text
    assert "catstream_offer_latency_seconds_count 4" in text
    # every sample line is "name{labels} value"
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? [-+0-9.e]+(inf)?", line), line
