"""Training: offers file → model bundle (tokenizer, fusion model, calibration, ONNX export).

Importing this package does not import torch; ``training.train`` does.
"""

__all__: list[str] = []
