"""The inference worker's loop, in turn and overlapped with the model's thread: a real worker,
queue and model; failing and hanging model calls."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from core.bundle import ModelBundle
from core.feature_queue import FAILED, SCORED, FeatureQueue, OfferMeta, QueueLayout
from core.features import Featurizer
from core.node_board import NodeBoard
from core.offer_files import read_offer_file
from core.schemas import Offer
from core.scoring import vector_fields_of
from gpu_workers.worker import InferenceWorker

pytestmark = pytest.mark.integration


class _LostDevice:
    """Stands in for a GPU that went away: every model call raises."""

    spaces = ()
    pad_to = ()

    def score(self, inputs, bound=None):
        raise RuntimeError("CUDA error: device lost")


def _fill(queue: FeatureQueue, featurizer: Featurizer, slots, titles=None) -> None:
    for slot in slots:
        title = titles[slot % len(titles)] if titles else f"offer {slot}"
        features = featurizer.featurize(Offer(offer_id=f"o{slot}", title=title))
        queue.put(
            slot,
            features,
            OfferMeta(
                offer_id=f"o{slot}",
                partition=0,
                offset=slot,
                image_status="absent",
                produced_ms=None,
                preprocess_ms=1.0,
            ),
        )


@pytest.mark.parametrize("overlap", [False, True])
def test_failed_batch_fails_every_item_and_repeated_failures_exit_non_zero(bundle, stream_settings, tmp_path, overlap):
    model = ModelBundle.load(bundle)
    settings = stream_settings.model_copy(
        update={"max_batch_size": 4, "max_wait_ms": 0.0, "inference_overlap": overlap}
    )
    featurizer = Featurizer.from_bundle(model)
    layout = QueueLayout(workers=1, slots_per_worker=24, fields=featurizer.fields)
    queue = FeatureQueue.create(layout, directory=tmp_path)
    board = NodeBoard.create(1, directory=tmp_path)
    try:
        worker = InferenceWorker(settings, model, queue, board, row=0)
        worker.classifier = _LostDevice()
        _fill(queue, featurizer, range(3))
        worker.stopping = True  # finish what is queued, then return
        assert worker.run() == 0
        assert (queue.state[:3] == FAILED).all()
        assert all("device lost" in queue.error_of(slot) for slot in range(3))

        _fill(queue, featurizer, range(3, 24))  # 21 offers = 6 batches of at most 4: five failures in a row
        worker.consecutive_failures = 0
        assert worker.run() == 3
        assert worker.consecutive_failures == 5
        assert board.inference_total("failed") == 3 + 20  # every offer of every failed batch
    finally:
        queue.close()
        board.close()


def _drain(bundle, marketplace, stream_settings, tmp_path, *, overlap: bool, offers: int = 45, model=None, **more):
    """A queue of ``offers`` ready offers drained by a worker; ``(queue, board, worker)``, open.
    ``more``: further settings."""
    served = ModelBundle.load(bundle)
    settings = stream_settings.model_copy(
        update={"max_batch_size": 8, "max_wait_ms": 0.0, "inference_overlap": overlap, **more}
    )
    featurizer = Featurizer.from_bundle(served)
    tmp_path.mkdir(exist_ok=True)
    layout = QueueLayout(workers=1, slots_per_worker=offers, fields=featurizer.fields, vectors=vector_fields_of(served))
    queue = FeatureQueue.create(layout, directory=tmp_path)
    board = NodeBoard.create(1, directory=tmp_path)
    worker = InferenceWorker(settings, served, queue, board, row=0)
    if model is not None:
        worker.classifier = model(worker.classifier)
    _fill(queue, featurizer, range(offers), titles=list(read_offer_file(marketplace)["title"].head(offers)))
    worker.stopping = True
    return queue, board, worker


def test_the_overlapped_loop_decides_every_offer_as_the_loop_in_turn_does(
    bundle, marketplace, stream_settings, tmp_path
):
    answers = []
    for overlap in (False, True):
        queue, board, worker = _drain(bundle, marketplace, stream_settings, tmp_path / str(overlap), overlap=overlap)
        try:
            assert worker.overlap is overlap
            assert worker.run() == 0
            labels = ModelBundle.load(bundle).labels
            scored = [queue.scored(slot, labels) for slot in range(45)]
            answers.append([(s.meta.offer_id, s.decision.top3, s.decision.category) for s in scored])
            assert board.inference_total("predicted") == 45 and board.inference_total("batches") >= 6
        finally:
            queue.close()
            board.close()
    assert answers[0] == answers[1]
    assert len({top3[0] for _, top3, _ in answers[0]}) > 5  # not one answer for all


def test_bound_inputs_and_outputs_decide_as_plain_runs(embedded_bundle, marketplace, stream_settings, tmp_path):
    """I/O binding (on the CPU: the model reads the gather buffers in place and writes into arrays
    of its own) must give every offer the answer a plain run gives: a binding that read a stale
    batch, or outputs overwritten before they were decided on, would repeat answers."""
    answers = []
    for binding in (False, True):
        queue, board, worker = _drain(
            embedded_bundle,
            marketplace,
            stream_settings,
            tmp_path / str(binding),
            overlap=True,
            pad_batches=True,
            io_binding=binding,
        )
        try:
            assert worker.classifier.io_binding is binding and worker.classifier.pad_to == (8,)
            assert worker.run() == 0
            labels = ModelBundle.load(embedded_bundle).labels
            scored = [queue.scored(slot, labels) for slot in range(45)]
            vectors = [{space: v.tobytes() for space, v in s.vectors.items()} for s in scored]
            answers.append([(s.meta.offer_id, s.decision.top3, s.decision.category) for s in scored] + vectors)
            assert board.inference_total("predicted") == 45 and board.inference_total("batches") == 6
        finally:
            queue.close()
            board.close()
    assert answers[0] == answers[1]
    assert len({top3[0] for _, top3, _ in answers[1][:45]}) > 5
    assert len({vectors["image"] for vectors in answers[1][45:]}) > 5


class _Stalling:
    """The real model, whose second run waits until released (a device that stopped answering)."""

    def __init__(self, classifier):
        self._classifier = classifier
        self.spaces, self.pad_to = classifier.spaces, classifier.pad_to
        self.runs = 0
        self.stalled, self.release = threading.Event(), threading.Event()

    def score(self, inputs, bound=None):
        self.runs += 1
        if self.runs == 2:
            self.stalled.set()
            self.release.wait(30)
        return self._classifier.score(inputs, bound=bound)


def test_a_run_that_hangs_in_the_model_thread_stops_the_heartbeat(bundle, marketplace, stream_settings, tmp_path):
    """Liveness reads the loop's heartbeat; the overlapped loop keeps turning while the model thread
    hangs, so the heartbeat must stay at the hung run's start, as when the loop ran the model."""
    queue, board, worker = _drain(bundle, marketplace, stream_settings, tmp_path, overlap=True, model=_Stalling)
    device = worker.classifier
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("code", worker.run()))
    runner.start()
    try:
        assert device.stalled.wait(30)
        time.sleep(1.5)
        age_s = (time.time_ns() - board.inference_stat(0, "heartbeat_ns")) / 1e9
        assert age_s >= 1.4, f"the heartbeat moved on while the model hung ({age_s:.2f} s old)"
    finally:
        device.release.set()
        runner.join(60)
    try:
        assert result == {"code": 0}
        assert board.inference_total("predicted") == 45
        assert (time.time_ns() - board.inference_stat(0, "heartbeat_ns")) / 1e9 < 1.0
        assert np.count_nonzero(queue.state == SCORED) == 45
    finally:
        queue.close()
        board.close()
