"""catstream core: the types and helpers that cross stage boundaries.

Stages: ``producers`` → ``preprocess_workers`` → shared-memory queue → ``gpu_workers``;
``training`` writes the model bundle they load.
"""

from catstream.bundle import ModelBundle
from catstream.feature_queue import FeatureQueue, QueueLayout
from catstream.schemas import SCHEMA_VERSION, UNCERTAIN, Offer, Prediction, Rejection, parse_offer
from catstream.settings import Settings

__all__ = [
    "SCHEMA_VERSION",
    "UNCERTAIN",
    "FeatureQueue",
    "ModelBundle",
    "Offer",
    "Prediction",
    "QueueLayout",
    "Rejection",
    "Settings",
    "parse_offer",
]
