"""Model change under a steady stream: the node's switch against a restart, same offers, one run.

Offers are published at a fixed rate (open loop) into ``catstream run --model DIR`` where DIR is a
symlink to the first bundle. Midway the model changes to a second bundle, two ways:

(a) switch: the symlink is swapped, the node finds the new bundle (``CATSTREAM_MODEL_POLL_S``),
    checks it and moves to it while serving;
(b) restart: the node is stopped (SIGTERM) and started again on the second bundle, what a
    deployment without the switch does.

For each: offers lost (published, never predicted), duplicates, the longest gap between two
consecutive predictions while offers kept arriving, and the predictions each version made. The
second bundle is a copy of the first under a new model version unless ``--second`` names one.

    .venv/bin/python bench/model_switch.py --model MODEL --data ../shared/datasets/myntra-fashion/offers.csv
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import record  # noqa: E402  (bench/, the script's own folder)
from _stream import OpenLoopProducer, every_key, fresh_settings, wait_ready  # noqa: E402

from catstream.demo import start_node, stop_node  # noqa: E402
from core.broker import EmbeddedBroker  # noqa: E402
from core.bundle import BundleConfig  # noqa: E402
from core.kafka import read_topic, wait_for_broker  # noqa: E402
from core.offer_files import offers_from_frame, read_offer_file  # noqa: E402
from core.settings import Settings  # noqa: E402
from producers.publish import ImageInliner  # noqa: E402

MYNTRA = REPO.parent / "shared" / "datasets" / "myntra-fashion" / "offers.csv"


def point(link: Path, target: Path) -> None:
    temporary = link.with_name(link.name + ".new")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    os.replace(temporary, link)


def run(
    way: str,
    first: Path,
    second: Path,
    offers,
    bootstrap: str,
    *,
    rate: float,
    seconds: float,
    workers: int,
    work: Path,
) -> dict:
    settings = fresh_settings(bootstrap)
    link = work / f"current-{way}"
    point(link, first)
    env = {"CATSTREAM_MODEL_POLL_S": "1" if way == "switch" else "0"}
    log_path = work / f"node-{way}.log"
    node = start_node(link, settings, log_path=log_path, workers=workers, extra_env=env)
    wait_ready(log_path)
    producer = OpenLoopProducer(offers, settings, rate=rate, duration_s=seconds).start()
    time.sleep(seconds / 2)
    changed_at = time.time()
    point(link, second)
    if way == "restart":
        stop_node(node)
        node = start_node(link, settings, log_path=work / f"node-{way}-2.log", workers=workers, extra_env=env)
    producer.join()
    expected = set(producer.sent_ids)
    messages = read_topic(
        settings,
        settings.categorized_topic,
        timeout_s=180,
        idle_s=45,
        until=every_key(expected),
    )
    code = stop_node(node)
    predictions = [(json.loads(m.value()), m.timestamp()[1] / 1000.0) for m in messages]
    ids = [p["offer_id"] for p, _ in predictions]
    stamps = np.sort([t for _, t in predictions])
    steady = stamps[(stamps > stamps[0] + 3) & (stamps < stamps[-1] - 1)] if len(stamps) else stamps
    gaps = np.diff(steady)
    versions: dict[str, int] = {}
    for prediction, _ in predictions:
        versions[prediction["model_version"]] = versions.get(prediction["model_version"], 0) + 1
    new_version = BundleConfig.read(second).model_version
    first_new = min((t for p, t in predictions if p["model_version"] == new_version), default=float("nan"))
    return {
        "way": way,
        "published": producer.sent,
        "predicted": len(set(ids)),
        "lost": len(expected - set(ids)),
        "duplicates": len(ids) - len(set(ids)),
        "node_exit_code": code,
        "longest_gap_s": round(float(gaps.max()), 3) if len(gaps) else None,
        "gaps_over_1s": int((gaps > 1.0).sum()) if len(gaps) else None,
        "new_version_first_answer_after_change_s": round(first_new - changed_at, 2),
        "predictions_by_version": versions,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the first bundle")
    parser.add_argument("--second", type=Path, help="the bundle changed to (default: a copy of the first, retagged)")
    parser.add_argument("--data", type=Path, default=MYNTRA, help="offer file whose offers are streamed")
    parser.add_argument("--rate", type=float, default=100.0, help="offers per second (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=40.0, help="publishing time per way (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="preprocess processes (default %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="JSON output directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="catstream-switch-"))
    first = args.model.resolve()
    second = args.second.resolve() if args.second else None
    if second is None:
        second = work / "second"
        shutil.copytree(first, second)
        config = BundleConfig.read(second)
        config.model_copy(update={"model_version": config.model_version + "-retagged"}).write(second)
    inline = ImageInliner(max_bytes=int(0.7 * Settings().max_message_bytes))
    offers = [inline(o) for o in offers_from_frame(read_offer_file(args.data).head(3000))]
    results = []
    with EmbeddedBroker(log_path=work / "broker.log") as broker:
        wait_for_broker(Settings(bootstrap_servers=broker.bootstrap_servers))
        for way in ("switch", "restart"):
            results.append(
                run(
                    way,
                    first,
                    second,
                    offers,
                    broker.bootstrap_servers,
                    rate=args.rate,
                    seconds=args.seconds,
                    workers=args.workers,
                    work=work,
                )
            )
    print(f"model change at {args.rate:g} offers/s, halfway through {args.seconds:g} s of publishing")
    print(
        f"{'way':<8} {'published':>9} {'lost':>5} {'dups':>5} {'longest gap':>12} {'gaps > 1 s':>10} "
        f"{'new model after':>16}"
    )
    for r in results:
        print(
            f"{r['way']:<8} {r['published']:9d} {r['lost']:5d} {r['duplicates']:5d} {r['longest_gap_s']:11.2f}s "
            f"{r['gaps_over_1s']:10d} {r['new_version_first_answer_after_change_s']:15.2f}s"
        )
    path = record(
        "model-switch",
        {"model": str(first), "second": str(second), "rate": args.rate, "seconds": args.seconds, "results": results},
        args.out,
    )
    print(f"wrote {path}")
    return 0 if results[0]["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
