"""``catstream check-fp16``: an fp16 graph, served only where it decides as the fp32 graph does.

An accelerator runs a float16 graph at about twice the speed of the float32 one. The conversion
(ONNX Runtime's float16 tool; the graph's inputs and outputs keep their types) rounds every weight
and every tensor between two operators to float16. Whether that changes what the node answers is
measured, not assumed: both graphs score the bundle's held-out offers as they are served (the
featuriser, softmax at the bundle's temperature, the exclusion mask, the leaf and parent
thresholds), and the fp16 graph is written into the bundle only if the two give the same answer
(category or uncertain, and the parent category) on at least :data:`REQUIRED_AGREEMENT` of them.

The record (``fp16.json`` beside the served graph, ``core.bundle.HalfPrecisionRecord``) says what
was measured either way, and carries the digests of both graphs: a node serves the fp16 graph only
while the record accepts it and the files are the ones checked (``core.bundle.half_precision_graph``).

The check runs on ONNX Runtime's CPU provider, which rounds each operator's output to float16 as
a GPU does; the order in which a GPU's kernels add up products differs, which is why
``bench/gpu_check.py`` compares the two graphs again on the card.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import pandas as pd

from core.bundle import HalfPrecisionRecord, ModelBundle, file_sha256
from core.decision import decide_batch, softmax
from core.features import Featurizer
from core.images import ImagePolicy
from core.offer_files import offers_from_frame
from core.scoring import OnnxClassifier
from training.progress import progress_bar

__all__ = [
    "HALF_GRAPH",
    "REQUIRED_AGREEMENT",
    "Agreement",
    "check_half_precision",
    "compare_graphs",
    "to_half_precision",
]

log = logging.getLogger(__name__)

REQUIRED_AGREEMENT = 0.999
HALF_GRAPH = "model.fp16.onnx"
_CANDIDATE = "model.fp16.onnx.candidate"

Converter = Callable[[Path, Path], None]


def to_half_precision(source: Path, target: Path) -> None:
    """Write ``source``'s graph with float16 weights and activations to ``target``; inputs and
    outputs keep their types, so the node feeds and reads it as it does the fp32 graph."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns of every weight it clamps to the float16 range
        half = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(half, str(target))


@dataclass(frozen=True)
class Agreement:
    """How two graphs' served answers compare on the same offers."""

    offers: int
    agreeing: int
    max_probability_difference: float  # largest |difference| of the served confidence
    min_vector_cosine: float | None  # lowest cosine between the two graphs' vectors of one offer
    disagreeing: tuple[int, ...]  # offer positions whose answers differ (the first 100)

    @property
    def agreement(self) -> float:
        return self.agreeing / self.offers if self.offers else float("nan")


def compare_graphs(
    bundle: ModelBundle,
    offers: list,
    reference: Path,
    candidate: Path,
    *,
    batch_size: int = 256,
    threads: int = 2,
    progress: bool = True,
) -> Agreement:
    """Serve ``offers`` through both graphs (featurised once) and compare the decisions."""
    featurizer = Featurizer.from_bundle(bundle, image_policy=ImagePolicy.for_offer_files())
    graphs = [
        OnnxClassifier(bundle, graph=path, precision=precision, intra_op_threads=threads)
        for path, precision in ((reference, "fp32"), (candidate, "fp16"))
    ]
    agreeing, largest, cosine, disagreeing = 0, 0.0, None, []
    starts = progress_bar(
        range(0, len(offers), batch_size), desc="comparing fp16 with fp32", unit="batch", disable=not progress
    )
    for start in starts:
        batch = featurizer.batch(offers[start : start + batch_size])
        decisions, vectors = [], []
        for graph in graphs:
            logits, spaces = graph.score(batch.inputs)
            decisions.append(
                decide_batch(
                    softmax(logits, bundle.temperature),
                    batch.exclusion,
                    labels=bundle.labels,
                    threshold=bundle.threshold,
                    parent_threshold=bundle.parent_threshold,
                )
            )
            vectors.append(spaces)
        full, half = decisions
        same = (full.category == half.category) & (full.parent == half.parent)
        agreeing += int(same.sum())
        disagreeing.extend(start + int(row) for row in np.flatnonzero(~same)[: 100 - len(disagreeing)])
        largest = max(largest, float(np.max(np.abs(full.confidence - half.confidence), initial=0.0)))
        for space, values in vectors[0].items():
            dots = np.sum(values.astype(np.float64) * vectors[1][space].astype(np.float64), axis=1)
            lowest = float(dots.min(initial=1.0))
            cosine = lowest if cosine is None else min(cosine, lowest)
    return Agreement(len(offers), agreeing, largest, cosine, tuple(disagreeing))


def check_half_precision(
    bundle_path: str | Path,
    test: pd.DataFrame,
    *,
    data: str,
    split: str,
    required: float = REQUIRED_AGREEMENT,
    convert: Converter = to_half_precision,
    threads: int = 2,
    progress: bool = True,
) -> HalfPrecisionRecord:
    """Convert the graph the node serves to fp16 (``convert``), compare it with the fp32 graph on
    the held-out offers ``test``, and keep it only if the answers agree on ``required`` of them.

    Writes ``fp16.json`` beside the served graph either way and returns it; a refused candidate is
    deleted, and so is an fp16 graph an earlier check had accepted.
    """
    if not 0 < required <= 1:
        raise ValueError(f"the required agreement is a share in (0, 1], got {required}")
    if test.empty:
        raise ValueError("no held-out offers to compare the fp16 graph on")
    bundle = ModelBundle.load(bundle_path)
    served = bundle.embedded_onnx_path or bundle.onnx_path
    candidate = served.with_name(_CANDIDATE)
    try:
        convert(served, candidate)
        measured = compare_graphs(
            bundle, list(offers_from_frame(test)), served, candidate, threads=threads, progress=progress
        )
        accepted = measured.agreement >= required
        half = served.with_name(HALF_GRAPH)
        half.unlink(missing_ok=True)
        if accepted:
            candidate.replace(half)
    finally:
        candidate.unlink(missing_ok=True)
    record = HalfPrecisionRecord(
        source=served.name,
        source_sha256=file_sha256(served),
        graph=half.name if accepted else None,
        graph_sha256=file_sha256(half) if accepted else None,
        offers=measured.offers,
        agreeing=measured.agreeing,
        agreement=measured.agreement,
        required=required,
        accepted=accepted,
        max_probability_difference=measured.max_probability_difference,
        min_vector_cosine=measured.min_vector_cosine,
        data=data,
        split=split,
        provider="CPUExecutionProvider",
        checked_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    record.write(served.parent)
    verdict = "accepted" if accepted else "refused"
    log.info(
        "fp16 graph of %s %s: the same answer on %d of %d held-out offers (%.3f%%, %.2f%% required)%s",
        served.relative_to(bundle.path),
        verdict,
        measured.agreeing,
        measured.offers,
        100 * measured.agreement,
        100 * required,
        f"; first disagreeing offers: {list(measured.disagreeing[:10])}" if measured.disagreeing else "",
    )
    return record
