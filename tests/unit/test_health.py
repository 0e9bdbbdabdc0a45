import re
import time

import numpy as np
import pytest

from catstream.health import NodeStatus, liveness, readiness, render_metrics
from core.node_board import STARVED_S, NodeBoard, Serving, starved_for_s


@pytest.fixture()
def board(tmp_path):
    b = NodeBoard.create(2, directory=tmp_path)
    yield b
    b.close()


def status(inference=True, workers=(True, True), **fields):
    return NodeStatus(
        inference_alive=inference, workers_alive=workers, restarts=1, model_version="v1", queue_slots=4, **fields
    )


def beat(board, now, row=0):
    board.set_inference_stat(row, "ready", 1)
    board.set_inference_stat(row, "heartbeat_ns", now)
    for worker in range(2):
        board.set_worker_stat(worker, "heartbeat_ns", now)


def test_readiness_needs_model_loaded_and_live_workers(board):
    now = time.time_ns()
    assert liveness(board, status(), now)[0]  # alive before the first heartbeat
    assert readiness(board, status(), now) == (False, "model not loaded yet")
    board.set_inference_stat(0, "ready", 1)
    board.set_inference_stat(0, "heartbeat_ns", now)
    assert not readiness(board, status(), now)[0]  # workers have not beaten yet
    for worker in range(2):
        board.set_worker_stat(worker, "heartbeat_ns", now)
    assert readiness(board, status(), now) == (True, "ok")
    assert readiness(board, status(workers=(True, False)), now) == (False, "preprocess-1 is not running")
    assert liveness(board, status(inference=False), now)[0] is False
    stalled = now + int(60e9)
    assert "stalled" in liveness(board, status(), stalled)[1]
    # after a model change the serving generation's row is the one that counts
    assert readiness(board, status(inference_row=1), now) == (False, "model not loaded yet")


def test_metrics_exposition_sums_both_generations(board):
    board.count(0, "consumed", 7)
    board.count(1, "consumed", 3)
    board.count(1, "dead_lettered", 2)
    board.set_worker_stat(0, "lag", 42)
    board.count_inference(0, "predicted", 8)
    board.count_inference(1, "predicted", 5)  # the next model generation's process
    board.count_inference(0, "batches", 2)
    board.observe_latency(0, np.array([3.0, 7.0, 7.0]))
    board.observe_latency(1, np.array([20000.0]))
    text = render_metrics(board, status(model_reloads=(1, 2)))
    assert 'catstream_offers_consumed_total{worker="0"} 7' in text
    assert 'catstream_offers_consumed_total{worker="1"} 3' in text
    assert 'catstream_dead_letters_total{worker="1"} 2' in text
    assert 'catstream_consumer_lag{worker="0"} 42' in text
    assert "catstream_predictions_total 13" in text and "catstream_batches_total 2" in text
    assert "catstream_queue_slots 4" in text and "catstream_worker_restarts_total 1" in text
    assert 'catstream_model_reloads_total{result="switched"} 1' in text
    assert 'catstream_model_reloads_total{result="refused"} 2' in text
    assert 'catstream_offer_latency_seconds_bucket{le="0.005"} 1' in text
    assert 'catstream_offer_latency_seconds_bucket{le="0.01"} 3' in text
    assert 'catstream_offer_latency_seconds_bucket{le="+Inf"} 4' in text
    assert "catstream_offer_latency_seconds_count 4" in text
    # every sample line is "name{labels} value"
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? [-+0-9.e]+(inf)?", line), line


def test_readiness_turns_503_while_no_broker_answers(board):
    now = time.time_ns()
    beat(board, now)
    assert readiness(board, status(), now) == (True, "ok")
    cut_off = status(broker_unreachable_s=12.4)
    assert readiness(board, cut_off, now) == (False, "no Kafka broker reachable for 12 s")
    assert liveness(board, cut_off, now) == (True, "ok")  # the node is alive; restarting it is the bound's job


def test_readiness_turns_503_while_a_worker_consumes_nothing_with_offers_waiting(board):
    """The embedded broker once answered every fetch empty while 470,000 offers waited: heartbeats
    fine, nothing consumed. Waiting offers and nothing consumed for 30 s is not ready; a worker
    busy with offers it holds, or with nothing to consume, is."""
    now = time.time_ns()
    beat(board, now)
    board.set_worker_stat(1, "progress_ns", now - int(40e9))
    board.set_worker_stat(1, "lag", 470_000)
    assert starved_for_s(board, 1, now) == pytest.approx(40.0)
    assert readiness(board, status(), now) == (
        False,
        "preprocess-1 has consumed nothing for 40 s while 470,000 offers wait on its partitions",
    )
    assert liveness(board, status(), now)[0]  # a restart would not help: the broker is the cause
    board.set_worker_stat(1, "held", 64)  # paused, working through what it holds
    assert readiness(board, status(), now) == (True, "ok")
    board.set_worker_stat(1, "held", 0)
    board.set_worker_stat(1, "lag", 0)  # nothing to consume
    assert readiness(board, status(), now) == (True, "ok")
    board.set_worker_stat(1, "lag", 470_000)
    board.set_worker_stat(1, "progress_ns", now - int(STARVED_S * 1e9) + int(1e9))  # consumed 29 s ago
    assert readiness(board, status(), now) == (True, "ok")
    board.set_worker_stat(1, "progress_ns", 0)  # never assigned partitions yet
    assert starved_for_s(board, 1, now) is None


def test_liveness_fails_when_a_worker_is_wedged_past_the_supervisors_bound(board):
    now = time.time_ns()
    beat(board, now)
    board.set_worker_stat(1, "heartbeat_ns", now - int(45e9))
    assert liveness(board, status(), now) == (True, "ok")  # 45 s: still within 30 s + 2 x 15 s
    board.set_worker_stat(1, "heartbeat_ns", now - int(61e9))
    assert liveness(board, status(), now) == (False, "preprocess-1 stuck for 61 s")


def test_strikes_against_an_offer_are_counted_per_partition_and_offset(board):
    assert board.strikes(0, 41) == 0
    assert board.strike(0, 41) == 1 and board.strike(0, 41) == 2
    assert board.strikes(0, 41) == 2 and board.strikes(1, 41) == 0 and board.strikes(0, 42) == 0
    for offset in range(200):  # the ring forgets the oldest
        board.strike(3, offset)
    assert board.strikes(0, 41) == 0 and board.strikes(3, 199) == 1


def test_the_busy_offer_of_a_worker_is_seen_by_the_supervisor(board):
    assert board.busy_with(1) is None
    board.busy(1, 2, 77)
    since, partition, offset = board.busy_with(1)
    assert (partition, offset) == (2, 77) and abs(since - time.time_ns()) < 1e9
    board.idle(1)
    assert board.busy_with(1) is None and board.busy_with(0) is None


def test_the_serving_generation_is_seen_by_every_process(board, tmp_path):
    other = NodeBoard.attach(board.path)  # what a worker sees
    try:
        board.publish(Serving(0, "/dev/shm/catstream-queue-1-aaaaaaaa", "/models/v1"))
        assert other.serving() == Serving(0, "/dev/shm/catstream-queue-1-aaaaaaaa", "/models/v1")
        board.publish(Serving(1, "/dev/shm/catstream-queue-1-bbbbbbbb", "/models/v2-모델"))
        assert other.generation == 1 and other.serving().bundle_path == "/models/v2-모델"
        with pytest.raises(ValueError, match="longer than"):
            board.publish(Serving(2, "q" * 2000, "b"))
    finally:
        other.close()
    assert board.path.exists()  # only the creator removes the file
