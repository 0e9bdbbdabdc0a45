"""Model execution and the decision rule (softmax, exclusion mask, threshold)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from catstream.bundle import ModelBundle
from catstream.decision import ParentCategories, apply_exclusions, softmax
from catstream.schemas import UNCERTAIN

__all__ = ["Decision", "OnnxClassifier", "choose_providers", "decide", "softmax"]

log = logging.getLogger(__name__)


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """``requested`` if given (each must be available), else CUDA when present, CPU last."""
    available = ort.get_available_providers()
    if requested:
        missing = [name for name in requested if name not in available]
        if missing:
            raise ValueError(f"ONNX Runtime providers {missing} are not available here (have {available})")
        return list(requested)
    preferred = [name for name in ("CUDAExecutionProvider",) if name in available]
    return preferred + ["CPUExecutionProvider"]


class OnnxClassifier:
    """An ONNX Runtime session over the bundle's network; returns its logits ``(N, K)`` plus the
    lexical model's scores when the bundle has one (computed by the preprocess workers)."""

    def __init__(self, bundle: ModelBundle, *, providers: list[str] | None = None, intra_op_threads: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = choose_providers(providers)
        if "CUDAExecutionProvider" in self.providers and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds CUDA and cuDNN from the nvidia-* wheels only once they are preloaded
            ort.preload_dlls()
        self.session = ort.InferenceSession(str(bundle.onnx_path), sess_options=options, providers=self.providers)
        if providers and "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeError("CUDAExecutionProvider was asked for but the session fell back to the CPU "
                               "(CUDA or cuDNN libraries not loadable; see the log above)")
        self.input_names = [item.name for item in self.session.get_inputs()]
        self.uses_title_grams = "title_grams" in self.input_names
        self.uses_lexical = bundle.has_lexical
        log.info("ONNX Runtime session on %s", self.session.get_providers())

    def logits(
        self,
        image: np.ndarray,
        has_image: np.ndarray,
        title_ids: np.ndarray,
        mall_ids: np.ndarray,
        mall_weight: np.ndarray | None = None,
        title_grams: np.ndarray | None = None,
        lexical: np.ndarray | None = None,
    ) -> np.ndarray:
        """``(N, K)`` logits; ``mall_weight`` ``(N,)`` defaults to full trust in the shop's category.

        ``title_grams`` ``(N, G)`` is required by models with the character n-gram input and
        ignored by the others (bundles trained before it existed). ``lexical`` ``(N, K)``, the
        lexical model's scores, is required when the bundle has a lexical model.
        """
        if mall_weight is None:
            mall_weight = np.ones(len(image), dtype=np.float32)
        feeds = {"image": image, "has_image": has_image.astype(np.float32), "title_ids": title_ids,
                 "mall_ids": mall_ids, "mall_weight": mall_weight.astype(np.float32)}
        if self.uses_title_grams:
            if title_grams is None or title_grams.shape[1] == 0:
                raise ValueError("this model needs the title's character n-grams (title_grams)")
            feeds["title_grams"] = title_grams
        if self.uses_lexical and (lexical is None or lexical.shape[1] == 0):
            raise ValueError("this model needs the lexical model's scores (lexical)")
        (logits,) = self.session.run(None, feeds)
        return logits + lexical if self.uses_lexical else logits


@dataclass(frozen=True, slots=True)
class Decision:
    category: str
    confidence: float
    top3: list[tuple[str, float]]
    excluded: int
    parent: tuple[str, float] | None = None  # where the leaf is uncertain: the deepest parent that is not


def decide(
    probabilities: np.ndarray, exclusion: np.ndarray, *, labels: tuple[str, ...], threshold: float,
    parent_threshold: float | None,
) -> list[Decision]:
    """Mask excluded categories, renormalise, and answer ``UNCERTAIN`` below ``threshold``.

    ``probabilities`` and ``exclusion`` are ``(N, K)``. If a mask would rule out every category
    it is ignored for that row (the dictionary cannot leave an offer with no answer). An uncertain
    offer still gets the deepest parent category whose probability (summed over its leaves)
    reaches ``parent_threshold``, where one does: "Men > Footwear > Shoes" when Casual and Sports
    Shoes share the doubt. ``parent_threshold`` None names no parent.
    """
    masked, usable = apply_exclusions(probabilities, exclusion)
    top = np.argsort(-masked, axis=1)[:, :3]
    parents = ParentCategories.of(tuple(labels))
    parent, parent_probability = parents.confident(masked, parent_threshold)
    decisions = []
    for row, order in enumerate(top):
        confidence = float(masked[row, order[0]])
        top3 = [(labels[k], float(masked[row, k])) for k in order]
        excluded = int(exclusion[row].sum()) if usable[row] else 0
        if confidence >= threshold:
            decisions.append(Decision(labels[order[0]], confidence, top3, excluded))
        else:
            fallback = (parents.names[parent[row]], float(parent_probability[row])) if parent[row] >= 0 else None
            decisions.append(Decision(UNCERTAIN, confidence, top3, excluded, fallback))
    return decisions
