"""Throughput: a naive loop, the catstream pipeline, the pipeline on a null model, and the model
alone; same model, same offers, one run.

(a) naive: one process consumes one offer, preprocesses it, runs PyTorch on a batch of one,
    produces the prediction: the loop a team writes first (the baseline);
(b) pipeline: ``catstream run`` (preprocess process(es) → shared-memory queue → batched ONNX
    Runtime inference → the workers produce the predictions);
(c) null: the same node on a copy of the bundle whose graph costs next to nothing
    (``bench/_null_model.py``): the ceiling of Kafka → preprocess → queue → batch → produce;
(d) model: the ONNX session alone on the featurised offers at the pipeline's batch size: the
    denominator of "the pipeline reaches N% of its model".

The node variants publish the offers once the node is ready; offers/s is measured from the first
to the last prediction, and each role's CPU time (process CPU, librdkafka's threads included)
from ready to the last prediction, per offer. From those the script extrapolates the null-model
ceiling to a node of ``--cores`` cores (the formula is in bench/README.md). Prints a table and
writes JSON to bench/results/.

    .venv/bin/python bench/throughput.py                      # 224 px model, 600 offers
    .venv/bin/python bench/throughput.py --image-size 128 --offers 1000
    .venv/bin/python bench/throughput.py --model path/to/bundle --data offers.csv --offers 3000
    .venv/bin/python bench/throughput.py --model BUNDLE --variants null,model --preprocess-workers 2
    .venv/bin/python bench/throughput.py --model BUNDLE --data offers.csv --images http  # 30 ms image host

``--images``: ``files`` (the offer file's own images, inlined into the messages as ``catstream
produce`` does), ``large`` (each re-encoded as a 600 x 800 JPEG, inlined), or ``http`` (served by
a local HTTP server on 127.0.0.1 that answers each request after ``--http-delay-ms``, 30 ms; the
messages carry the URLs and the node fetches them).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import torch
from confluent_kafka import Consumer, Producer
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _image_host import SlowImageHost  # noqa: E402  (bench/, the script's own folder)
from _null_model import null_bundle  # noqa: E402
from _record import record  # noqa: E402
from _stream import cpu_seconds, every_key, node_roles, process_tree, wait_ready  # noqa: E402

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
from core.scoring import OnnxClassifier  # noqa: E402
from core.settings import Settings  # noqa: E402
from producers.publish import publish_offers  # noqa: E402

VARIANTS = ("naive", "pipeline", "null", "model")
IMAGE_KINDS = ("files", "large", "http")
_IDLE_S = 3.0


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


def local_path(url: str) -> Path:
    """The file an offer file's image URL names (a path or a ``file://`` URL)."""
    parts = urllib.parse.urlsplit(url)
    return Path(urllib.request.url2pathname(parts.path)) if parts.scheme == "file" else Path(url)


def large_jpeg(path: Path) -> str:
    """The image at ``path`` as a 600 x 800 JPEG (quality 85), base64: a marketplace photo's size."""
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").resize((600, 800), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


def with_images(offers: list[Offer], kind: str, host: SlowImageHost | None) -> list[Offer]:
    """The offers with their images as ``kind`` says (see the module's doc)."""
    if kind == "files":
        return offers
    changed = []
    for number, offer in enumerate(offers):
        if not offer.image_url:
            changed.append(offer)
        elif kind == "large":
            changed.append(
                dataclasses.replace(offer, image_url=None, image_b64=large_jpeg(local_path(offer.image_url)))
            )
        else:
            assert host is not None
            changed.append(dataclasses.replace(offer, image_url=f"{host.base}/{number}.jpg"))
    return changed


def _role(name: str) -> str:
    return "preprocess" if name.startswith("preprocess") else "inference" if name.startswith("inference") else name


def _cpu_by_role(node_pid: int, log_path: Path) -> dict[str, float]:
    """CPU seconds so far of the node's processes, summed by role (supervisor, inference, preprocess)."""
    roles = node_roles(log_path) | {node_pid: "supervisor"}
    totals: dict[str, float] = {}
    for pid in process_tree(node_pid):
        if pid in roles:
            totals[_role(roles[pid])] = totals.get(_role(roles[pid]), 0.0) + cpu_seconds(pid)
    return totals


def pipeline(
    bundle_path: Path,
    settings: Settings,
    offers: list[Offer],
    workers: int,
    log_path: Path,
    batch: int,
    wait_ms: float,
    threads: int,
    env: dict[str, str] | None = None,
    host: SlowImageHost | None = None,
) -> dict:
    """``catstream run`` on ``bundle_path``: the offers are published once it is ready. With
    ``host`` (the image host it fetches from), the host's CPU is reported beside the node's roles."""

    def cpu_by_role() -> dict[str, float]:
        return _cpu_by_role(node.pid, log_path) | ({"image host": cpu_seconds(host.pid)} if host else {})

    node = start_node(
        bundle_path,
        settings,
        log_path=log_path,
        workers=workers,
        extra_env={"CATSTREAM_INTRA_OP_THREADS": str(threads), **(env or {})},
        extra_args=("--max-batch-size", str(batch), "--max-wait-ms", str(wait_ms)),
    )
    try:
        wait_ready(log_path)
        before, ready_at = cpu_by_role(), time.monotonic()
        ready_ms = time.time() * 1000.0
        publish_offers(offers, settings, progress=False)
        after: dict[str, float] = {}
        last_key = every_key({offer.offer_id for offer in offers})

        def until(messages) -> bool:
            if last_key(messages):
                after.update(cpu_by_role())  # at the last prediction
                after["_at"] = time.monotonic()
                return True
            return False

        messages = read_topic(settings, settings.categorized_topic, timeout_s=1800, until=until)
        # What each role spends with nothing to do (polling loops, librdkafka's threads), per second:
        # subtracted, so that the per-offer cost is what an offer adds.
        time.sleep(_IDLE_S)
        idle = {role: (seconds - after.get(role, 0.0)) / _IDLE_S for role, seconds in cpu_by_role().items()}
    finally:
        stop_node(node)
    busy_s = after.pop("_at") - ready_at
    stamps = sorted(m.timestamp()[1] for m in messages)
    seconds = (stamps[-1] - stamps[0]) / 1000.0
    predictions = [json.loads(m.value()) for m in messages]
    handled = sum(1 for stamp in stamps if stamp >= ready_ms)
    spent = {role: after[role] - before.get(role, 0.0) for role in after}
    cpu_us = {role: 1e6 * max(0.0, spent[role] - idle.get(role, 0.0) * busy_s) / max(1, handled) for role in spent}
    return {
        "offers": len({p["offer_id"] for p in predictions}),
        "seconds": seconds,
        "offers_per_second": (len(stamps) - 1) / seconds if seconds else 0.0,
        "mean_batch_size": float(np.mean([p["timings_ms"]["batch_size"] for p in predictions])),
        "mean_stage_ms": {
            stage: float(np.mean([p["timings_ms"][stage] for p in predictions]))
            for stage in ("preprocess", "queue_wait", "inference")
        },
        "images_used": float(np.mean([p["image_status"] == "used" for p in predictions])),
        "cpu_us_per_offer": cpu_us,
        "cpu_us_per_offer_with_idle": {role: 1e6 * spent[role] / max(1, handled) for role in spent},
        "idle_cores": idle,
        "preprocess_workers": workers,
        "intra_op_threads": threads,
    }


def model_alone(bundle: ModelBundle, offers: list[Offer], batch: int, threads: int, rounds: int = 3) -> dict:
    """Items/s of the served ONNX session alone (the graph the node runs) on the featurised offers,
    in batches of ``batch``: the best of ``rounds`` passes."""
    featurizer = Featurizer.from_bundle(bundle, image_policy=ImagePolicy.for_offer_files())
    classifier = OnnxClassifier(bundle, intra_op_threads=threads, embeddings=True)
    batches = [featurizer.batch(offers[start : start + batch]).inputs for start in range(0, len(offers), batch)]
    classifier.score(batches[0])  # warm-up
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for inputs in batches:
            classifier.score(inputs)
        best = max(best, len(offers) / (time.perf_counter() - started))
    return {"offers": len(offers), "offers_per_second": best, "batch_size": batch, "intra_op_threads": threads}


def extrapolate(null: dict, cores: int) -> dict:
    """The null-model ceiling of a node with ``cores`` cores, from each role's CPU per offer (idle
    cost subtracted) and idle cores: the one inference process is bounded by its own cost per
    offer on its one core; the preprocess workers share the cores left after it, the supervisor
    and what the roles spend idle."""
    cost, idle = null["cpu_us_per_offer"], null["idle_cores"]
    inference_us, preprocess_us = cost.get("inference", 0.0), cost.get("preprocess", 0.0)
    supervisor_us = cost.get("supervisor", 0.0)
    inference_bound = (1.0 - idle.get("inference", 0.0)) * 1e6 / inference_us if inference_us else float("inf")
    # Preprocess idle cost scales with the worker count: one worker's, times the cores they get.
    spare = cores - 1 - idle.get("supervisor", 0.0)
    per_worker_idle = idle.get("preprocess", 0.0) / max(1, null["preprocess_workers"])
    preprocess_bound = (
        spare * (1.0 - per_worker_idle) * 1e6 / (preprocess_us + supervisor_us) if preprocess_us else float("inf")
    )
    ceiling = min(inference_bound, preprocess_bound)
    return {
        "cores": cores,
        "inference_bound": inference_bound,
        "preprocess_bound": preprocess_bound,
        "offers_per_second": ceiling,
        "preprocess_cores_at_ceiling": ceiling * (preprocess_us + supervisor_us) * 1e-6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model bundle (default: train one on synthetic data)")
    parser.add_argument("--data", type=Path, help="offer file to stream (default: synthetic)")
    parser.add_argument("--offers", type=int, default=600, help="offers streamed through each variant (default 600)")
    parser.add_argument("--image-size", type=int, default=224, help="image size of the trained model (default 224)")
    parser.add_argument("--preprocess-workers", type=int, default=1, help="pipeline preprocess processes (default 1)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="pipeline batch size (default 16, the node's)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="pipeline batch wait (default 10)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="PyTorch threads of the naive loop")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="ONNX Runtime threads of the pipeline's inference process (default 1)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)",
    )
    parser.add_argument("--images", choices=IMAGE_KINDS, default="files", help="how the images travel (default files)")
    parser.add_argument("--http-delay-ms", type=float, default=30.0, help="the image host's answer delay (default 30)")
    parser.add_argument("--cores", type=int, default=16, help="node size the null-model ceiling is extrapolated to")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="JSON output directory")
    args = parser.parse_args()
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

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
    host = None
    if args.images == "http":
        host = SlowImageHost([local_path(offer.image_url or "") for offer in offers], args.http_delay_ms / 1000.0)
        atexit.register(host.close)
    node_env = {"CATSTREAM_IMAGE_ALLOW_PRIVATE_HOSTS": "true"} if host else {}
    offers = with_images(offers, args.images, host)

    results: dict[str, dict] = {}
    if "model" in variants:
        print(f"running the model alone on {len(offers)} offers ...", flush=True)
        results["model"] = model_alone(bundle, offers, args.max_batch_size, args.intra_op_threads)
    nodes = {"pipeline": args.model}
    if "null" in variants:
        nodes["null"] = null_bundle(args.model, work / "null-model", offers)
    with EmbeddedBroker(log_path=work / "broker.log") as broker:
        wait_for_broker(Settings(bootstrap_servers=broker.bootstrap_servers))
        for name in [v for v in ("naive", "pipeline", "null") if v in variants]:
            settings = fresh_settings(broker.bootstrap_servers)
            ensure_topics(settings)
            print(f"running {name} on {len(offers)} offers ...", flush=True)
            if name == "naive":
                publish_offers(offers, settings, progress=False)  # a backlog: it runs at full speed
                results[name] = naive_loop(bundle, settings, len(offers), args.threads)
            else:
                results[name] = pipeline(
                    nodes[name],
                    settings,
                    offers,
                    args.preprocess_workers,
                    work / f"node-{name}.log",
                    args.max_batch_size,
                    args.max_wait_ms,
                    args.intra_op_threads,
                    node_env,
                    host,
                )
    ratios = {}
    if "pipeline" in results and "naive" in results:
        ratios["pipeline_over_naive"] = results["pipeline"]["offers_per_second"] / results["naive"]["offers_per_second"]
    if "pipeline" in results and "model" in results:
        ratios["pipeline_over_model"] = results["pipeline"]["offers_per_second"] / results["model"]["offers_per_second"]
    ceiling = extrapolate(results["null"], args.cores) if "null" in results else None
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
            "images": args.images if args.images != "http" else f"http, {args.http_delay_ms:g} ms",
            "results": results,
            "ratios": ratios,
            "null_ceiling": ceiling,
        },
        args.out,
    )
    size = bundle.config.model.image_size
    print(f"\nmodel {size}px, {len(offers)} offers, images: {args.images}, {os.cpu_count()} CPUs")
    print(f"{'variant':<10} {'offers/s':>10}  CPU µs per offer (from ready to the last prediction)")
    for name, result in results.items():
        cost = ", ".join(f"{role} {us:,.0f}" for role, us in sorted(result.get("cpu_us_per_offer", {}).items()))
        used = f"  ({result['images_used']:.0%} with their image)" if "images_used" in result else ""
        print(f"{name:<10} {result['offers_per_second']:>10.1f}  {cost}{used}")
    for name, value in ratios.items():
        print(f"{name.replace('_', ' ')}: {value:.2f}x")
    if ceiling:
        print(
            f"null-model ceiling on {ceiling['cores']} cores: {ceiling['offers_per_second']:,.0f} offers/s "
            f"(inference bound {ceiling['inference_bound']:,.0f}, preprocess bound {ceiling['preprocess_bound']:,.0f})"
        )
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
