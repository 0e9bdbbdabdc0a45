"""A null model: a copy of a bundle whose ONNX graph costs next to nothing, for the pipeline's ceiling.

The graph keeps the bundle's inputs and outputs. Each offer's logits (and vectors, for a bundle
with an embedder) are a row of a table of real outputs precomputed from the bundle's own model,
picked by the sum of the offer's title ids: different offers get different, realistic answers, so
the decision paths (threshold, parent categories, uncertain) run as they do on the real model,
while the model itself costs a sum, a modulo and a gather. The copy's ``parity.npz`` holds the
null graph's own logits, so the node's load-time check passes for it and for nothing else.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from core.bundle import EMBEDDER_DIR, EMBEDDING_OUTPUTS, PARITY_FILE, ModelBundle
from core.features import Featurizer
from core.images import ImagePolicy
from core.schemas import Offer
from core.scoring import OnnxClassifier

__all__ = ["null_bundle"]

_KEY_INPUT = "title_ids"


def _null_graph(model_path: Path, tables: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model_path``'s inputs, and each output named in ``tables`` as a row of its table."""
    original = onnx.load(str(model_path), load_external_data=False)
    inputs = list(original.graph.input)
    if _KEY_INPUT not in {item.name for item in inputs}:
        raise ValueError(f"{model_path} has no {_KEY_INPUT} input to key the null model's answers on")
    rows = len(next(iter(tables.values())))
    nodes = [
        helper.make_node("ReduceSum", [_KEY_INPUT, "axis_1"], ["key_sum"], keepdims=0),
        helper.make_node("Abs", ["key_sum"], ["key_abs"]),
        helper.make_node("Mod", ["key_abs", "rows"], ["row"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_1"),
        numpy_helper.from_array(np.array(rows, dtype=np.int64), "rows"),
    ]
    outputs = []
    for name, table in tables.items():
        initializers.append(numpy_helper.from_array(table.astype(np.float32), f"table_{name}"))
        nodes.append(helper.make_node("Gather", [f"table_{name}", "row"], [name], axis=0))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", table.shape[1]]))
    graph = helper.make_graph(nodes, "null_model", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = original.ir_version
    onnx.checker.check_model(model)
    return model


def null_bundle(bundle_path: Path, out: Path, offers: list[Offer], *, rows: int = 256) -> Path:
    """Write the null-model copy of the bundle at ``bundle_path`` to ``out``; its answer tables
    are the real model's outputs on up to ``rows`` of ``offers``."""
    bundle = ModelBundle.load(bundle_path)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle_path, out, symlinks=True)
    featurizer = Featurizer.from_bundle(bundle, image_policy=ImagePolicy.for_offer_files())
    real = OnnxClassifier(bundle, embeddings=True, intra_op_threads=2)
    batch = featurizer.batch(offers[:rows]).inputs
    logits = real.session.run(["logits"], {name: batch[name] for name in real.input_names})[0]
    tables = {"logits": logits}
    graph_paths = [(bundle.onnx_path, out / "model.onnx", {"logits": logits})]
    if real.spaces:
        names = [EMBEDDING_OUTPUTS[space] for space in real.spaces]
        vectors = real.session.run(names, {name: batch[name] for name in real.input_names})
        tables = {"logits": logits, **dict(zip(names, vectors, strict=True))}
        graph_paths.append((bundle.embedded_onnx_path, out / EMBEDDER_DIR / "model.onnx", tables))
    for source, target, outputs in graph_paths:
        target.unlink()
        onnx.save(_null_graph(source, outputs), str(target))
    with np.load(bundle_path / PARITY_FILE) as parity:
        probe = dict(parity)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {item.name: probe[item.name] for item in session.get_inputs()}
    (probe["expected_logits"],) = session.run(["logits"], feeds)
    (out / PARITY_FILE).unlink()
    np.savez(out / PARITY_FILE, **probe)
    return out
