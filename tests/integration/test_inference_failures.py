"""Failure handling of the inference worker: a real worker, queue and broker, a failing model call."""

from __future__ import annotations

import pytest

from core.bundle import ModelBundle
from core.feature_queue import FAILED, FeatureQueue, OfferMeta, QueueLayout
from core.features import Featurizer
from core.node_board import NodeBoard
from core.schemas import Offer
from gpu_workers.worker import InferenceWorker

pytestmark = pytest.mark.integration


class _LostDevice:
    """Stands in for a GPU that went away: every model call raises."""

    spaces = ()

    def score(self, inputs):
        raise RuntimeError("CUDA error: device lost")


def _fill(queue: FeatureQueue, featurizer: Featurizer, slots) -> None:
    for slot in slots:
        features = featurizer.featurize(Offer(offer_id=f"o{slot}", title=f"offer {slot}"))
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


def test_failed_batch_fails_every_item_and_repeated_failures_exit_non_zero(bundle, stream_settings, tmp_path):
    model = ModelBundle.load(bundle)
    settings = stream_settings.model_copy(update={"max_batch_size": 4, "max_wait_ms": 0.0})
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
