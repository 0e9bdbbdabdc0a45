"""ONNX export of the fusion model, gated by a parity check against PyTorch."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from core.bundle import PARITY_FILE
from core.model import FusionModel

__all__ = [
    "INPUT_NAMES",
    "ExportParityError",
    "check_parity",
    "example_inputs",
    "export_onnx",
    "input_names",
    "strip_source_metadata",
]

log = logging.getLogger(__name__)

INPUT_NAMES = ("image", "has_image", "title_ids", "mall_ids", "mall_weight", "title_grams")


def input_names(model: FusionModel) -> tuple[str, ...]:
    """The graph's inputs: ``title_grams`` only for models with the character n-gram branch."""
    return INPUT_NAMES if model.config.char_buckets else INPUT_NAMES[:-1]


class ExportParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree on the exported model."""


def example_inputs(model: FusionModel, batch: int, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(
        0, 256, (batch, 3, config.image_size, config.image_size), dtype=torch.uint8, generator=generator
    )
    has_image = torch.ones(batch, dtype=torch.float32)
    has_image[0] = 0.0
    title = torch.randint(0, config.vocab_size, (batch, config.max_title_tokens), generator=generator)
    title[:, config.max_title_tokens // 2 :] = 0
    mall = torch.randint(0, config.vocab_size, (batch, config.max_mall_tokens), generator=generator)
    mall[0] = 0  # an offer without mall category
    mall_weight = torch.ones(batch, dtype=torch.float32)
    mall_weight[-1] = 0.25  # a shop whose categories are only partly trusted
    if not config.char_buckets:
        return image, has_image, title, mall, mall_weight
    grams = torch.randint(1, config.char_buckets + 1, (batch, config.max_title_grams), generator=generator)
    grams[:, config.max_title_grams // 3 :] = 0
    grams[-1] = 0  # a title of symbols only
    return image, has_image, title, mall, mall_weight, grams


def export_onnx(model: FusionModel, path: Path, *, export_batch: int = 2) -> None:
    """Export with the dynamo exporter and a dynamic batch dimension."""
    model.eval()
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    batch = torch.export.Dim("batch", min=1, max=4096)
    names = input_names(model)
    dynamic = {name: {0: batch} for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            example_inputs(model, export_batch),
            dynamo=True,
            input_names=list(names),
            output_names=["logits"],
            dynamic_shapes=dynamic,
            verbose=False,
        )
    program.save(str(path))
    strip_source_metadata(path)


def strip_source_metadata(path: Path) -> None:
    """Drop what the exporter records of the Python source (stack traces with file paths and line
    numbers, module and class names) from every node: the file then depends on the graph and the
    weights only, so the same network has the same digest wherever and from whichever checkout it
    was exported. ONNX Runtime reads none of it."""
    model = onnx.load(str(path))
    graphs = [model.graph, *(function for function in model.functions)]
    for graph in graphs:
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
    onnx.save(model, str(path))


def check_parity(model: FusionModel, path: Path, *, batch: int = 5, rtol: float = 1e-3, atol: float = 1e-4) -> float:
    """Compare ONNX Runtime with PyTorch on a batch size other than the export's; returns max |diff|.

    The inputs and PyTorch's logits are saved beside the model (``parity.npz``, see
    ``core.scoring.check_parity``), so that a serving node can repeat the check on a bundle
    without PyTorch before it serves it.
    """
    import onnxruntime as ort

    inputs = example_inputs(model, batch, seed=1)
    model.eval()
    with torch.no_grad():
        expected = model(*inputs).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: tensor.numpy() for name, tensor in zip(input_names(model), inputs, strict=True)}
    np.savez(path.with_name(PARITY_FILE), expected_logits=expected, **feeds)
    (actual,) = session.run(None, feeds)
    difference = float(np.max(np.abs(actual - expected)))
    try:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as error:
        raise ExportParityError(f"ONNX output differs from PyTorch (max |diff| {difference:.2e})") from error
    return difference
