"""What serving the offer vectors costs categorisation: the same backlog through ``catstream run``
on a bundle with its embedder attached and on the same bundle without it, alternated.

The bundle given must have an embedder (``catstream train-embedder``); the baseline is a copy of
it without ``embedder/``. Each round publishes the same offers to fresh topics; offers/s is
measured from the first to the last prediction, as in ``bench/throughput.py``. On two cores the
rounds of one variant spread by ±10% and more, so the model alone is timed too: both ONNX
sessions on the same featurised batches, alternated, median of ``--model-reps`` calls per batch
size. That is the part of the cost the vectors add to the inference stage.

    .venv/bin/python bench/embedding_cost.py --model MYNTRA_BUNDLE --data ../shared/datasets/myntra-fashion/offers.csv
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import record  # noqa: E402  (bench/, the script's own folder)
from throughput import fresh_settings, pipeline  # noqa: E402

from core.broker import EmbeddedBroker  # noqa: E402
from core.bundle import EMBEDDER_DIR, ModelBundle  # noqa: E402
from core.kafka import ensure_topics, wait_for_broker  # noqa: E402
from core.offer_files import offers_from_frame, read_offer_file  # noqa: E402
from core.settings import Settings  # noqa: E402
from producers.publish import publish_offers  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="bundle with an embedder attached")
    parser.add_argument("--data", type=Path, required=True, help="offer file to stream")
    parser.add_argument("--offers", type=int, default=3000, help="offers per round (default 3000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each variant, alternated (default 2)")
    parser.add_argument("--preprocess-workers", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument("--model-reps", type=int, default=60, help="timed calls per session and batch size")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if ModelBundle.load(args.model).embedded_onnx_path is None:
        parser.error(f"{args.model} has no embedder attached (run catstream train-embedder on it first)")
    work = Path(tempfile.mkdtemp(prefix="catstream-embedding-cost-"))
    plain = work / "plain"
    shutil.copytree(args.model, plain, ignore=shutil.ignore_patterns(EMBEDDER_DIR))
    variants = {"classifier only": plain, "classifier + embedder": args.model}
    offers = list(offers_from_frame(read_offer_file(args.data).head(args.offers)))
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with EmbeddedBroker(log_path=work / "broker.log") as broker:
        wait_for_broker(Settings(bootstrap_servers=broker.bootstrap_servers))
        for round_number in range(args.rounds):
            order = list(variants) if round_number % 2 == 0 else list(reversed(variants))
            for name in order:
                settings = fresh_settings(broker.bootstrap_servers)
                ensure_topics(settings)
                publish_offers(offers, settings, progress=False)
                print(f"round {round_number + 1}: {name} on {len(offers)} offers ...", flush=True)
                runs[name].append(
                    pipeline(
                        variants[name],
                        settings,
                        len(offers),
                        args.preprocess_workers,
                        work / f"node-{name.replace(' ', '-')}-{round_number}.log",
                        args.max_batch_size,
                        args.max_wait_ms,
                        args.intra_op_threads,
                    )
                )
    summary = {
        name: {
            "offers_per_second": [r["offers_per_second"] for r in results],
            "mean_offers_per_second": float(np.mean([r["offers_per_second"] for r in results])),
            "mean_inference_ms_per_batch": float(np.mean([r["mean_stage_ms"]["inference"] for r in results])),
        }
        for name, results in runs.items()
    }
    base = summary["classifier only"]["mean_offers_per_second"]
    cost = 1 - summary["classifier + embedder"]["mean_offers_per_second"] / base
    alone = model_alone(args.model, offers, (args.max_batch_size, 2 * args.max_batch_size), args.model_reps)
    path = record(
        "embedding_cost",
        {"offers": len(offers), "runs": runs, "summary": summary, "cost": cost, "model_alone": alone},
        args.out,
    )
    for name, figures in summary.items():
        rates = ", ".join(f"{rate:.0f}" for rate in figures["offers_per_second"])
        print(f"{name:<24} {figures['mean_offers_per_second']:>8.1f} offers/s ({rates}); "
              f"inference {figures['mean_inference_ms_per_batch']:.1f} ms per batch")  # fmt: skip
    for size, figures in alone.items():
        print(f"model alone, batch {size}: classifier {figures['classifier_ms']:.2f} ms, "
              f"classifier + embedder {figures['attached_ms']:.2f} ms ({figures['cost']:+.1%})")  # fmt: skip
    print(f"cost of the vectors to categorisation throughput: {cost:+.1%} (JSON: {path})")
    return 0


def model_alone(bundle_path: Path, offers, sizes: tuple[int, ...], reps: int) -> dict[int, dict[str, float]]:
    """Median ms per call of the classifier session and of the attached one on the same batches,
    the calls alternated so that drift in the machine hits both alike."""
    import time

    from core.features import Featurizer
    from core.images import ImagePolicy
    from core.scoring import OnnxClassifier

    bundle = ModelBundle.load(bundle_path)
    batch = Featurizer.from_bundle(bundle, image_policy=ImagePolicy.for_offer_files()).batch(offers[: max(sizes)])
    plain, attached = OnnxClassifier(bundle), OnnxClassifier(bundle, embeddings=True)
    figures = {}
    for size in sizes:
        inputs = {name: array[:size] for name, array in batch.inputs.items()}
        calls = {
            "classifier": lambda inputs=inputs: plain.logits(inputs),
            "attached": lambda inputs=inputs: attached.score(inputs),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for rep in range(reps):
            for name in list(calls) if rep % 2 == 0 else reversed(list(calls)):
                started = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - started)
        plain_ms, attached_ms = (float(np.median(times[name])) * 1000 for name in ("classifier", "attached"))
        figures[size] = {"classifier_ms": plain_ms, "attached_ms": attached_ms, "cost": attached_ms / plain_ms - 1}
    return figures


if __name__ == "__main__":
    sys.exit(main())
