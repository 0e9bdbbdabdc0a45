"""Inference stage: dynamic batches from the queue → ONNX Runtime → decisions → Kafka."""

from gpu_workers.batcher import DynamicBatcher
from gpu_workers.inference import Decision, OnnxClassifier, decide, softmax
from gpu_workers.worker import InferenceWorker, run_inference_worker

__all__ = ["Decision", "DynamicBatcher", "InferenceWorker", "OnnxClassifier", "decide", "run_inference_worker", "softmax"]
