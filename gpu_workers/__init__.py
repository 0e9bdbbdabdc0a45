"""Inference stage: dynamic batches from the queue → ONNX Runtime → decisions → Kafka."""

from gpu_workers.batcher import DynamicBatcher
from gpu_workers.worker import InferenceWorker, run_inference_worker

__all__ = ["DynamicBatcher", "InferenceWorker", "run_inference_worker"]
