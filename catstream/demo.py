"""``catstream demo``: the whole chain on embedded defaults, with a summary at the end.

synthetic marketplace → train a small model → embedded broker → ``catstream run`` (a real
subprocess, as a user would start it) → publish offers plus a few malformed messages → read the
outputs → summary → SIGTERM the node → stop the broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from core.broker import EmbeddedBroker
from core.dictionaries import PATH_SEPARATOR
from core.kafka import ensure_topics, read_topic, wait_for_broker
from core.offer_files import offers_from_frame, read_offer_file
from core.schemas import UNCERTAIN
from core.settings import Settings

__all__ = ["MALFORMED_EXAMPLES", "run_demo", "start_node", "stop_node", "summarize"]

# Bad input the stream must reject with a reason and keep going.
MALFORMED_EXAMPLES: tuple[bytes, ...] = (
    b"{not json",
    b'{"offer_id": "bad-1"}',
    b'{"offer_id": "bad-2", "title": 42}',
    b'["a", "list"]',
    b'{"offer_id": "bad-3", "title": "\xed\x95\x9c\xea\xb8 broken utf-8"}',
)


def start_node(
    model: Path,
    settings: Settings,
    *,
    log_path: Path,
    workers: int,
    extra_env: dict | None = None,
    extra_args: tuple[str, ...] = (),
    python: str = sys.executable,
) -> subprocess.Popen:
    """Start ``catstream run`` as a subprocess writing its log to ``log_path``.

    The node gets the broker, topics and group of ``settings``, and a free health port;
    ``python`` is the interpreter to run it with (another venv's, for an installed wheel).
    """
    env = {
        **os.environ,
        "CATSTREAM_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "CATSTREAM_OFFERS_TOPIC": settings.offers_topic,
        "CATSTREAM_CATEGORIZED_TOPIC": settings.categorized_topic,
        "CATSTREAM_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "CATSTREAM_CONSUMER_GROUP": settings.consumer_group,
        "CATSTREAM_HEALTH_PORT": "0",
        **(extra_env or {}),
    }
    command = [
        python,
        "-m",
        "catstream",
        "run",
        "--model",
        str(model),
        "--preprocess-workers",
        str(workers),
        *extra_args,
    ]
    return subprocess.Popen(
        command, env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )


def stop_node(process: subprocess.Popen, *, timeout_s: float = 20.0) -> int:
    """SIGTERM the node and wait for its orderly exit (kill after ``timeout_s``)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def summarize(predictions: list[dict], produce_started_ms: float, truth: dict[str, str], dead_letters: int) -> dict:
    """Throughput, latency, accuracy and uncertain rate of the first prediction per offer."""
    first: dict[str, dict] = {}
    arrival_ms: dict[str, float] = {}
    for prediction, timestamp_ms in predictions:
        first.setdefault(prediction["offer_id"], prediction)
        arrival_ms.setdefault(prediction["offer_id"], timestamp_ms)
    distinct = list(first.values())
    if not distinct:
        return {"offers_categorized": 0, "dead_lettered": dead_letters}
    # Steady state: first to last prediction, so node start-up and the group join do not count.
    span_s = max(1e-3, (max(arrival_ms.values()) - min(arrival_ms.values())) / 1000.0)
    wall_s = (max(arrival_ms.values()) - produce_started_ms) / 1000.0
    end_to_end = np.array([p["timings_ms"].get("end_to_end", np.nan) for p in distinct])
    in_node = np.array(
        [p["timings_ms"]["preprocess"] + p["timings_ms"]["queue_wait"] + p["timings_ms"]["inference"] for p in distinct]
    )
    decided = [p for p in distinct if p["category"] != UNCERTAIN]
    labelled = [p for p in distinct if p["offer_id"] in truth]
    correct_top1 = [p["top3"][0]["category"] == truth[p["offer_id"]] for p in labelled]
    correct_decided = [p["category"] == truth[p["offer_id"]] for p in decided if p["offer_id"] in truth]
    parented = [p for p in distinct if p["category"] == UNCERTAIN and p.get("confident_parent")]
    correct_parent = [
        _under(truth[p["offer_id"]], p["confident_parent"]["category"]) for p in parented if p["offer_id"] in truth
    ]
    return {
        "offers_categorized": len(distinct),
        "duplicates": len(predictions) - len(distinct),
        "dead_lettered": dead_letters,
        "offers_per_second": len(distinct) / span_s,
        "wall_seconds": wall_s,
        "latency_end_to_end_ms": {
            "p50": float(np.nanpercentile(end_to_end, 50)),
            "p99": float(np.nanpercentile(end_to_end, 99)),
        },
        "latency_in_node_ms": {"p50": float(np.percentile(in_node, 50)), "p99": float(np.percentile(in_node, 99))},
        "accuracy_top1": float(np.mean(correct_top1)) if correct_top1 else None,
        "precision_when_categorized": float(np.mean(correct_decided)) if correct_decided else None,
        "uncertain_rate": 1.0 - len(decided) / len(distinct),
        "uncertain_with_parent_rate": len(parented) / len(distinct),
        "precision_of_parents": float(np.mean(correct_parent)) if correct_parent else None,
        "image_not_used": sum(not p["image_used"] for p in distinct),
        "mean_batch_size": float(np.mean([p["timings_ms"]["batch_size"] for p in distinct])),
    }


def _under(category: str, parent: str) -> bool:
    return category == parent or category.startswith(parent + PATH_SEPARATOR)


def run_demo(args) -> int:
    from producers.publish import publish_offers, publish_raw
    from producers.synthetic import write_marketplace
    from training.options import TrainOptions
    from training.train import train_bundle

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/5] synthetic marketplace in {out}", flush=True)
    train_csv = write_marketplace(out / "train", offers=args.train_offers, seed=args.seed)
    stream_csv = write_marketplace(out / "stream", offers=args.offers, seed=args.seed + 1)

    print(f"[2/5] training a small model (image size {args.image_size})", flush=True)
    model = out / "model"
    config = train_bundle(
        train_csv,
        model,
        TrainOptions(
            label_columns=["category"],
            image_size=args.image_size,
            epochs=8,
            seed=args.seed,
            min_label_count=5,
            # the streamed offers are the demo's test set
            test_share=0.0,
            # one model, not five: the demo is about the stream
            calibration="validation",
            validation_share=0.25,
            target_precision=args.target_precision,
        ),
    )
    validation = config.training.validation
    print(
        f"      validation accuracy {validation.accuracy:.3f} (against the given, partly wrong labels); "
        f"threshold {config.threshold:.3f}: coverage {validation.coverage:.3f} at precision "
        f"{validation.precision:.3f}, target {args.target_precision}"
        + ("" if validation.target_reached else " not reached"),
        flush=True,
    )

    print("[3/5] starting the embedded broker and the pipeline", flush=True)
    with EmbeddedBroker(log_path=out / "broker.log") as broker:
        settings = Settings(bootstrap_servers=broker.bootstrap_servers)
        wait_for_broker(settings)
        ensure_topics(settings)
        node = start_node(model, settings, log_path=out / "node.log", workers=args.preprocess_workers)
        try:
            stream = read_offer_file(stream_csv, label_columns=["true_category"])
            truth = dict(zip(stream["offer_id"], stream["label"], strict=True))
            print(
                f"[4/5] publishing {len(stream)} offers and {len(MALFORMED_EXAMPLES)} malformed messages "
                f"(node log: {out / 'node.log'})",
                flush=True,
            )
            started_ms = time.time() * 1000.0
            publish_raw(((None, raw) for raw in MALFORMED_EXAMPLES), settings)
            publish_offers(offers_from_frame(stream), settings, total=len(stream))
            expected = len(stream)
            messages = read_topic(
                settings,
                settings.categorized_topic,
                timeout_s=300.0,
                until=lambda ms: len({m.key() for m in ms}) >= expected,
            )
            dead = read_topic(
                settings,
                settings.dead_letter_topic,
                timeout_s=30.0,
                until=lambda ms: len(ms) >= len(MALFORMED_EXAMPLES),
            )
        finally:
            code = stop_node(node)
        predictions = [(json.loads(m.value()), m.timestamp()[1]) for m in messages]
        summary = summarize(predictions, started_ms, truth, len(dead))
        summary["node_exit_code"] = code
        summary["dead_letter_reasons"] = sorted({dict(m.headers())["catstream.reason"].decode()[:60] for m in dead})
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print("[5/5] summary", flush=True)
    _print_summary(summary)
    print(f"      (written to {out / 'summary.json'}; node exited with {code})")
    return 0 if code == 0 and summary["offers_categorized"] == len(truth) else 1


def _print_summary(summary: dict) -> None:
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    print(f"      offers categorized     {summary['offers_categorized']} (+{summary.get('duplicates', 0)} duplicates)")
    print(f"      throughput             {summary.get('offers_per_second', 0):.0f} offers/s (first → last prediction)")
    if "latency_end_to_end_ms" in summary:
        e2e, node = summary["latency_end_to_end_ms"], summary["latency_in_node_ms"]
        print(
            f"      latency end-to-end     p50 {e2e['p50']:.0f} ms, p99 {e2e['p99']:.0f} ms "
            "(burst: includes waiting in Kafka)"
        )
        print(
            f"      latency in the node    p50 {node['p50']:.0f} ms, p99 {node['p99']:.0f} ms "
            "(preprocess + queue + inference)"
        )
        print(f"      accuracy (top-1)       {pct(summary['accuracy_top1'])} against the true synthetic labels")
        print(f"      precision, categorized {pct(summary['precision_when_categorized'])}")
        print(f"      uncertain rate         {pct(summary['uncertain_rate'])}")
        print(
            f"      ... under a parent     {pct(summary['uncertain_with_parent_rate'])} of all offers "
            f"(category under it: {pct(summary['precision_of_parents'])})"
        )
        print(f"      image not used         {summary['image_not_used']} offers (missing or undecodable)")
        print(f"      mean batch size        {summary['mean_batch_size']:.1f}")
    print(f"      dead-lettered          {summary['dead_lettered']}")
