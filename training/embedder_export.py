"""The embedder into the served graph: exported to ONNX and attached to the classifier's pooled
image features, so the inference process gets the category and the vectors from one pass.

- The classifier's graph pools the backbone's last feature map (a ``ReduceMean``) and feeds it to
  the image branch (a ``Gemm``). That pooled tensor is the embedder's image input; the title ids,
  n-grams and ``has_image`` are inputs both graphs share. The embedder's nodes are renamed under
  ``embedder.`` and added to the classifier's graph, with its three vectors as new outputs
  (:data:`core.bundle.EMBEDDING_OUTPUTS`).
- The classifier must serve the frozen ImageNet backbone the embedder was trained on: a bundle
  that fine-tuned backbone blocks is refused.
- Parity, as for the classifier's export: on the bundle's own parity inputs, the attached graph
  must give the classifier's logits unchanged and the PyTorch embedder's vectors (computed on the
  pooled features of the frozen backbone in PyTorch).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.compose
import torch

from core.bundle import EMBEDDING_OUTPUTS, PARITY_FILE, ModelBundle
from core.embedder import IMAGE_FEATURES, Embedder
from core.model import FusionModel, find_pretrained_weights
from training.export import ExportParityError, strip_source_metadata

__all__ = ["attach_embedder", "check_attached", "export_embedder", "write_embedded_model"]

log = logging.getLogger(__name__)

_SHARED_INPUTS = ("has_image", "title_ids", "title_grams")


def export_embedder(model: Embedder, path: Path) -> None:
    """``model`` as ONNX: inputs ``image_features``, ``has_image``, ``title_ids`` (and
    ``title_grams``), outputs :data:`EMBEDDING_OUTPUTS`, dynamic batch."""
    model.eval()
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    generator = torch.Generator().manual_seed(0)
    batch = 2
    example = [
        torch.randn(batch, IMAGE_FEATURES, generator=generator),
        torch.tensor([1.0, 0.0]),
        torch.randint(1, model.config.vocab_size, (batch, 8), generator=generator),
    ]
    names = ["image_features", "has_image", "title_ids"]
    if model.grams is not None:
        example.append(torch.randint(1, model.config.char_buckets + 1, (batch, 16), generator=generator))
        names.append("title_grams")
    dimension = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {name: {0: dimension} for name in names}
    dynamic["title_ids"][1] = torch.export.Dim("title_tokens", min=1, max=4096)
    if "title_grams" in dynamic:
        dynamic["title_grams"][1] = torch.export.Dim("title_grams", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            tuple(example),
            dynamo=True,
            input_names=names,
            output_names=[EMBEDDING_OUTPUTS[space] for space in ("image", "text", "fused")],
            dynamic_shapes=dynamic,
            verbose=False,
        )
    program.save(str(path))
    strip_source_metadata(path)


def _pooled_image_features(graph: onnx.GraphProto) -> str:
    """The name of the classifier's pooled image features: the ReduceMean output a Gemm reads."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pooled = [
        node.output[0]
        for node in graph.node
        if node.op_type in ("ReduceMean", "GlobalAveragePool")
        and any(reader.op_type in ("Gemm", "MatMul") for reader in readers.get(node.output[0], []))
    ]
    if len(pooled) != 1:
        raise ValueError(f"expected one pooled image feature tensor in the classifier graph, found {pooled}")
    return pooled[0]


def attach_embedder(classifier: onnx.ModelProto, embedder: onnx.ModelProto) -> onnx.ModelProto:
    """One graph: the classifier's inputs, its logits and the embedder's vectors."""
    pooled = _pooled_image_features(classifier.graph)
    prefixed = onnx.compose.add_prefix(embedder, "embedder.")
    renamed = {f"embedder.{name}": name for name in (*_SHARED_INPUTS, *EMBEDDING_OUTPUTS.values())}
    renamed["embedder.image_features"] = pooled
    classifier_inputs = {item.name for item in classifier.graph.input}
    for item in prefixed.graph.input:
        original = renamed.get(item.name, item.name)
        if original != pooled and original not in classifier_inputs:
            raise ValueError(f"the embedder reads {original!r}, which the classifier graph does not take")
    combined = onnx.ModelProto()
    combined.CopyFrom(classifier)
    for node in prefixed.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
        combined.graph.node.append(node)
    combined.graph.initializer.extend(prefixed.graph.initializer)
    combined.graph.value_info.extend(
        item for item in prefixed.graph.value_info if renamed.get(item.name, item.name) == item.name
    )
    for item in prefixed.graph.output:
        output = onnx.ValueInfoProto()
        output.CopyFrom(item)
        output.name = renamed[item.name]
        combined.graph.output.append(output)
    known = {(entry.domain, entry.version) for entry in combined.opset_import}
    for entry in prefixed.opset_import:
        if entry.domain not in {domain for domain, _ in known}:
            combined.opset_import.append(entry)
    combined.functions.extend(prefixed.functions)
    onnx.checker.check_model(combined)
    return combined


def check_attached(bundle: ModelBundle, embedder: Embedder, path: Path, *, atol: float = 1e-4) -> dict[str, float]:
    """Max |difference| per output between the attached graph and PyTorch on the bundle's parity
    inputs; raises :class:`ExportParityError` past ``atol``."""
    import onnxruntime as ort

    probe = np.load(bundle.path / PARITY_FILE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {item.name: probe[item.name] for item in session.get_inputs()}
    outputs = dict(zip([item.name for item in session.get_outputs()], session.run(None, feeds), strict=True))
    backbone = FusionModel(bundle.config.model)
    weights = find_pretrained_weights()
    if weights is None:
        raise ExportParityError("no ImageNet MobileNetV2 weights to check the attached graph's image features against")
    backbone.load_imagenet_backbone(weights)
    backbone.eval()
    with torch.no_grad():
        pooled = backbone.image_features(torch.from_numpy(probe["image"]))
        grams = torch.from_numpy(probe["title_grams"]) if "title_grams" in probe else None
        vectors = embedder(pooled, torch.from_numpy(probe["has_image"]), torch.from_numpy(probe["title_ids"]), grams)
    expected = {"logits": probe["expected_logits"]} | {
        EMBEDDING_OUTPUTS[space]: value.numpy()
        for space, value in zip(("image", "text", "fused"), vectors, strict=True)
    }
    differences = {name: float(np.max(np.abs(outputs[name] - value))) for name, value in expected.items()}
    worst = max(differences, key=differences.__getitem__)
    if differences[worst] > atol:
        raise ExportParityError(
            f"the attached graph's {worst} differs from PyTorch (max |diff| {differences[worst]:.2e})"
        )
    return differences


def write_embedded_model(bundle_path: str | Path, embedder: Embedder, out: Path) -> dict[str, float]:
    """Export ``embedder``, attach it to the bundle's classifier graph and write ``out/model.onnx``
    after the parity check; returns the check's differences."""
    bundle = ModelBundle.load(bundle_path)
    finetuned = int(bundle.config.training.options.get("finetune_blocks", 0))
    if finetuned:
        raise ValueError(
            f"{bundle_path} fine-tuned {finetuned} backbone blocks, so its pooled image features are not the "
            "frozen ImageNet features the embedder reads; train the classifier with --set finetune_blocks=0"
        )
    out.mkdir(parents=True, exist_ok=True)
    standalone = out / "embedder.onnx"
    export_embedder(embedder, standalone)
    combined = attach_embedder(onnx.load(str(bundle.onnx_path)), onnx.load(str(standalone)))
    temporary = out / "model.onnx.tmp"
    onnx.save(combined, str(temporary))
    differences = check_attached(bundle, embedder, temporary)
    temporary.replace(out / "model.onnx")
    log.info("attached the embedder to %s (parity: %s)", bundle.onnx_path, differences)
    return differences
