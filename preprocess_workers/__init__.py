"""CPU stage: consume offers, featurise them, fill the node's shared-memory queue."""

from preprocess_workers.offsets import OffsetTracker
from preprocess_workers.worker import PreprocessWorker, run_preprocess_worker

__all__ = ["OffsetTracker", "PreprocessWorker", "run_preprocess_worker"]
