"""Throughput: a naive loop vs the catstream pipeline, same model, same offers, one run.

(a) naive: one process consumes one offer, preprocesses it, runs PyTorch on a batch of one,
    produces the prediction — the loop a team writes first;
(b) pipeline: ``catstream run`` (preprocess process(es) → shared-memory queue → batched ONNX
    Runtime inference).

Both read the same pre-published backlog from the embedded broker; offers/s is measured from
the first to the last prediction. Prints a table and writes JSON to bench/results/.

    .venv/bin/python bench/throughput.py                      # 224 px model, 600 offers
    .venv/bin/python bench/throughput.py --image-size 128 --offers 1000
    .venv/bin/python bench/throughput.py --model path/to/bundle --data offers.csv
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from confluent_kafka import Consumer, Producer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import record  # noqa: E402  (bench/, the script's own folder)

from catstream.demo import start_node, stop_node  # noqa: E402
from core.broker import EmbeddedBroker  # noqa: E402
from core.bundle import ModelBundle  # noqa: E402
from core.decision import decide, softmax  # noqa: E402
from core.feature_queue import FeatureBatch  # noqa: E402
from core.features import Featurizer  # noqa: E402
from core.images import ImagePolicy  # noqa: E402
from core.kafka import consumer_config, ensure_topics, producer_config, read_topic, wait_for_broker  # noqa: E402
from core.model import FusionModel  # noqa: E402
from core.offer_files import offers_from_frame, read_offer_file  # noqa: E402
from core.schemas import Offer, Prediction, parse_offer  # noqa: E402
from core.settings import Settings  # noqa: E402
from producers.publish import publish_offers  # noqa: E402


def fresh_settings(bootstrap: str) -> Settings:
    run = uuid.uuid4().hex[:8]
    return Settings(
        bootstrap_servers=bootstrap,
        offers_topic=f"offers-{run}",
        categorized_topic=f"out-{run}",
        dead_letter_topic=f"dlq-{run}",
        consumer_group=f"bench-{run}",
    )


def naive_loop(bundle: ModelBundle, settings: Settings, expected: int, threads: int) -> dict:
    """One process, one offer at a time, PyTorch eager on a batch of one."""
    torch.set_num_threads(threads)
    model = FusionModel(bundle.config.model)
    model.load_state_dict(torch.load(bundle.path / "model.pt", map_location="cpu", weights_only=True))
    model.eval()
    featurizer = Featurizer.from_bundle(bundle, image_policy=ImagePolicy.for_offer_files())
    network_inputs = [field.name for field in featurizer.fields if field.name not in ("exclusion", "lexical")]
    consumer = Consumer(consumer_config(settings, group_id=settings.consumer_group, **{"enable.auto.commit": True}))
    producer = Producer(producer_config(settings))
    consumer.subscribe([settings.offers_topic])
    done, first_at = 0, None
    deadline = time.monotonic() + 1800
    with torch.inference_mode():
        while done < expected and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            offer = parse_offer(message.value(), max_bytes=settings.max_message_bytes)
            if not isinstance(offer, Offer):
                continue
            features = featurizer.featurize(offer)
            batch = FeatureBatch.stack([features], featurizer.fields).inputs
            network = {name: torch.from_numpy(batch[name]) for name in network_inputs}
            logits = model(**network).numpy()
            if features.lexical.size:
                logits = logits + features.lexical[None]
            probabilities = softmax(logits, bundle.temperature)
            (decision,) = decide(
                probabilities,
                features.exclusion[None],
                labels=bundle.labels,
                threshold=bundle.threshold,
                parent_threshold=bundle.parent_threshold,
            )
            prediction = Prediction(
                offer.offer_id,
                decision.category,
                decision.confidence,
                decision.top3,
                bundle.version,
                features.has_image,
                features.image_status,
                {},
            )
            producer.produce(settings.categorized_topic, key=offer.offer_id.encode(), value=prediction.to_bytes())
            producer.poll(0)
            done += 1
            if first_at is None:
                first_at = time.monotonic()
    producer.flush(30)
    elapsed = time.monotonic() - (first_at or time.monotonic())
    consumer.close()
    return {"offers": done, "seconds": elapsed, "offers_per_second": (done - 1) / elapsed if elapsed else 0.0}


def pipeline(
    bundle_path: Path,
    settings: Settings,
    expected: int,
    workers: int,
    log_path: Path,
    batch: int,
    wait_ms: float,
    threads: int,
) -> dict:
    node = start_node(
        bundle_path,
        settings,
        log_path=log_path,
        workers=workers,
        extra_env={"CATSTREAM_INTRA_OP_THREADS": str(threads)},
        extra_args=("--max-batch-size", str(batch), "--max-wait-ms", str(wait_ms)),
    )
    try:
        messages = read_topic(
            settings,
            settings.categorized_topic,
            timeout_s=1800,
            until=lambda ms: len({m.key() for m in ms}) >= expected,
        )
    finally:
        stop_node(node)
    stamps = sorted(m.timestamp()[1] for m in messages)
    seconds = (stamps[-1] - stamps[0]) / 1000.0
    predictions = [json.loads(m.value()) for m in messages]
    return {
        "offers": len({p["offer_id"] for p in predictions}),
        "seconds": seconds,
        "offers_per_second": (len(stamps) - 1) / seconds if seconds else 0.0,
        "mean_batch_size": float(np.mean([p["timings_ms"]["batch_size"] for p in predictions])),
        "mean_stage_ms": {
            stage: float(np.mean([p["timings_ms"][stage] for p in predictions]))
            for stage in ("preprocess", "queue_wait", "inference")
        },
        "preprocess_workers": workers,
        "intra_op_threads": threads,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model bundle (default: train one on synthetic data)")
    parser.add_argument("--data", type=Path, help="offer file to stream (default: synthetic)")
    parser.add_argument("--offers", type=int, default=600, help="offers streamed through each variant (default 600)")
    parser.add_argument("--image-size", type=int, default=224, help="image size of the trained model (default 224)")
    parser.add_argument("--preprocess-workers", type=int, default=1, help="pipeline preprocess processes (default 1)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="pipeline batch size (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="pipeline batch wait (default 10)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="PyTorch threads of the naive loop")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="ONNX Runtime threads of the pipeline's inference process (default 1)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="JSON output directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="catstream-bench-"))
    if args.data is None:
        from producers.synthetic import write_marketplace

        args.data = write_marketplace(work / "stream", offers=args.offers, seed=11)
    if args.model is None:
        from producers.synthetic import write_marketplace
        from training.options import TrainOptions
        from training.train import train_bundle

        train_csv = write_marketplace(work / "train", offers=1500, seed=10)
        args.model = work / "model"
        train_bundle(
            train_csv,
            args.model,
            TrainOptions(label_columns=["category"], image_size=args.image_size, epochs=6, calibration="validation"),
        )
    bundle = ModelBundle.load(args.model)
    offers = list(offers_from_frame(read_offer_file(args.data).head(args.offers)))

    results = {}
    with EmbeddedBroker(log_path=work / "broker.log") as broker:
        wait_for_broker(Settings(bootstrap_servers=broker.bootstrap_servers))
        for name in ("naive", "pipeline"):
            settings = fresh_settings(broker.bootstrap_servers)
            ensure_topics(settings)
            publish_offers(offers, settings, progress=False)  # a backlog: both run at full speed
            print(f"running {name} on {len(offers)} offers ...", flush=True)
            if name == "naive":
                results[name] = naive_loop(bundle, settings, len(offers), args.threads)
            else:
                results[name] = pipeline(
                    args.model,
                    settings,
                    len(offers),
                    args.preprocess_workers,
                    work / "node.log",
                    args.max_batch_size,
                    args.max_wait_ms,
                    args.intra_op_threads,
                )
    ratio = results["pipeline"]["offers_per_second"] / max(1e-9, results["naive"]["offers_per_second"])
    path = record(
        "throughput",
        {
            "cuda": torch.cuda.is_available(),
            "model": {
                "version": bundle.version,
                "image_size": bundle.config.model.image_size,
                "classes": len(bundle.labels),
            },
            "offers": len(offers),
            "results": results,
            "speedup": ratio,
        },
        args.out,
    )
    print(f"\nmodel {bundle.config.model.image_size}px, {len(offers)} offers, {os.cpu_count()} CPUs")
    print(f"{'variant':<10} {'offers/s':>10} {'seconds':>9}")
    for name, result in results.items():
        print(f"{name:<10} {result['offers_per_second']:>10.1f} {result['seconds']:>9.1f}")
    print(f"speed-up   {ratio:>10.1f}x   (JSON: {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
