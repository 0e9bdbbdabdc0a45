"""Soak: a steady, open-loop stream into a running node for a long time, or the steady capacity.

A burst says how fast a node empties a backlog; a steady stream says whether it keeps up. This
publishes offers at a fixed rate (open loop: each at its scheduled time, whatever the node does)
into ``catstream run`` on the embedded broker and records, per minute:

- end-to-end latency (the prediction's time minus the offer's create time) and in-node latency
  (preprocess + queue + model), p50 / p99;
- the resident memory of every process of the node;
- the consumer lag and the counters of ``/metrics``, sampled every ``--sample-s`` seconds.

At the end: offers lost (published, never predicted), duplicates, and the verdict on the targets:
RSS flat after warm-up (within 5%), in-node p99 within ``--p99-target-ms``, end-to-end p99 not
growing minute over minute. JSON and a plot go to bench/results/.

``--find-capacity`` instead runs short steady steps at rising rates and reports the highest rate
the node keeps up with: its lag does not grow over the step and end-to-end p99 stays bounded.

    .venv/bin/python bench/soak.py --model MODEL --data ../shared/datasets/myntra-fashion/offers.csv --find-capacity
    .venv/bin/python bench/soak.py --model MODEL --data ... --rate 300 --minutes 60
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import record  # noqa: E402  (bench/, the script's own folder)
from _stream import OpenLoopProducer, fresh_settings, node_roles, process_tree, rss_bytes, wait_ready  # noqa: E402

from catstream.demo import start_node, stop_node  # noqa: E402
from core.broker import EmbeddedBroker  # noqa: E402
from core.kafka import read_topic, wait_for_broker  # noqa: E402
from core.offer_files import offers_from_frame, read_offer_file  # noqa: E402
from core.settings import Settings  # noqa: E402
from producers.publish import ImageInliner  # noqa: E402

MYNTRA = REPO.parent / "shared" / "datasets" / "myntra-fashion" / "offers.csv"


class Sampler:
    """Every ``interval_s``: the RSS of each node process and the node's /metrics counters."""

    def __init__(self, node_pid: int, log_path: Path, base_url: str, interval_s: float):
        self.node_pid, self.log_path, self.base_url, self.interval_s = node_pid, log_path, base_url, interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.interval_s):
            roles = node_roles(self.log_path) | {self.node_pid: "supervisor"}
            rss = {}
            for pid in process_tree(self.node_pid):
                value = rss_bytes(pid)
                if value is not None and pid in roles:
                    rss[roles[pid]] = value
            try:
                with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                text = ""
            self.samples.append({"t": time.monotonic() - started, "rss": rss, "metrics": _counters(text)})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _counters(text: str) -> dict[str, float]:
    names = (
        "catstream_predictions_total",
        "catstream_consumer_lag",
        "catstream_queue_depth",
        "catstream_offers_consumed_total",
        "catstream_dead_letters_total",
        "catstream_worker_restarts_total",
        "catstream_backpressure_pauses_total",
    )
    return {
        name: sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, flags=re.M)) for name in names
    }


def run_steady(
    bundle: Path,
    offers,
    bootstrap: str,
    *,
    rate: float,
    seconds: float,
    workers: int,
    work: Path,
    sample_s: float,
    env: dict[str, str],
) -> dict:
    """One steady run: publish at ``rate`` for ``seconds`` into a fresh node; everything measured."""
    settings = fresh_settings(bootstrap)
    log_path = work / f"node-{rate:g}-{int(time.time())}.log"
    node = start_node(bundle, settings, log_path=log_path, workers=workers, extra_env=env)
    base = wait_ready(log_path)  # the model loaded, the workers polling
    sampler = Sampler(node.pid, log_path, base, sample_s).start()
    producer = OpenLoopProducer(offers, settings, rate=rate, duration_s=seconds).start()
    producer.join()
    published_at = time.monotonic()
    expected = set(producer.sent_ids)
    messages = read_topic(
        settings,
        settings.categorized_topic,
        timeout_s=max(120.0, seconds),
        until=lambda ms: expected <= {m.key().decode() for m in ms},
        idle_s=60,
    )
    drained_s = time.monotonic() - published_at
    sampler.stop()
    code = stop_node(node)
    predictions = [json.loads(m.value()) for m in messages]
    first = {}
    for prediction in predictions:
        first.setdefault(prediction["offer_id"], prediction)
    produced_ms = np.array([p["timings_ms"]["end_to_end"] for p in first.values()])
    in_node = np.array(
        [
            p["timings_ms"]["preprocess"] + p["timings_ms"]["queue_wait"] + p["timings_ms"]["inference"]
            for p in first.values()
        ]
    )
    # minute of each prediction by the order it was published in (the offer id's running number)
    number = np.array([int(offer_id.rsplit("-", 1)[1]) for offer_id in first])
    minute = (number / rate // 60).astype(int)
    per_minute = []
    for m in range(int(minute.max()) + 1 if len(minute) else 0):
        mask = minute == m
        if mask.sum() < 10:
            continue
        per_minute.append(
            {
                "minute": m,
                "offers": int(mask.sum()),
                "end_to_end_ms": _percentiles(produced_ms[mask]),
                "in_node_ms": _percentiles(in_node[mask]),
            }
        )
    return {
        "rate": rate,
        "seconds": seconds,
        "workers": workers,
        "published": producer.sent,
        "producer_max_send_delay_s": round(producer.max_send_delay_s, 3),
        "predicted": len(first),
        "lost": len(expected - set(first)),
        "duplicates": len(predictions) - len(first),
        "drained_after_publishing_s": round(drained_s, 1),
        "node_exit_code": code,
        "end_to_end_ms": _percentiles(produced_ms),
        "in_node_ms": _percentiles(in_node),
        "per_minute": per_minute,
        "samples": sampler.samples,
    }


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {"p50": float("nan"), "p99": float("nan")}
    return {"p50": round(float(np.percentile(values, 50)), 1), "p99": round(float(np.percentile(values, 99)), 1)}


def verdict(run: dict, *, p99_target_ms: float, warmup_minutes: int) -> dict:
    """The soak targets, each with the figure it was judged on."""
    rss_by_role: dict[str, list[float]] = {}
    for sample in run["samples"]:
        if sample["t"] >= warmup_minutes * 60:
            for role, value in sample["rss"].items():
                rss_by_role.setdefault(role, []).append(value)
    spread = {role: (max(v) - min(v)) / min(v) for role, v in rss_by_role.items() if v and min(v) > 0}
    minutes = [m for m in run["per_minute"] if m["minute"] >= warmup_minutes]
    end_to_end = [m["end_to_end_ms"]["p99"] for m in minutes]
    in_node = [m["in_node_ms"]["p99"] for m in minutes]
    slope = float(np.polyfit(range(len(end_to_end)), end_to_end, 1)[0]) if len(end_to_end) >= 3 else 0.0
    return {
        "lost": {"value": run["lost"], "met": run["lost"] == 0},
        "rss_flat_after_warmup": {
            "value": {k: round(100 * v, 1) for k, v in spread.items()},
            "met": bool(spread) and all(v <= 0.05 for v in spread.values()),
        },
        "in_node_p99_within_target": {
            "value": max(in_node, default=float("nan")),
            "met": bool(in_node) and max(in_node) <= p99_target_ms,
        },
        "end_to_end_p99_not_growing": {
            "value_ms_per_minute": round(slope, 1),
            "met": slope <= max(5.0, 0.05 * (np.median(end_to_end) if end_to_end else 0)),
        },
    }


def find_capacity(
    bundle: Path,
    offers,
    bootstrap: str,
    *,
    rates: list[float],
    step_s: float,
    workers: int,
    work: Path,
    env: dict[str, str],
) -> dict:
    """Steady steps at rising rates; a rate is kept up with when the lag sampled over its second
    half does not grow and the node empties it within a few seconds of the last offer."""
    steps = []
    for rate in rates:
        run = run_steady(
            bundle, offers, bootstrap, rate=rate, seconds=step_s, workers=workers, work=work, sample_s=2.0, env=env
        )
        lags = [
            (s["t"], s["metrics"].get("catstream_consumer_lag", 0.0))
            for s in run["samples"]
            if s["t"] > step_s / 2 and s["t"] <= step_s
        ]
        growth = float(np.polyfit(*zip(*lags, strict=True), 1)[0]) if len(lags) >= 3 else 0.0
        kept_up = run["lost"] == 0 and run["drained_after_publishing_s"] < 5.0 and growth < 0.05 * rate
        steps.append(
            {
                "rate": rate,
                "kept_up": kept_up,
                "lag_growth_per_s": round(growth, 1),
                "drained_after_publishing_s": run["drained_after_publishing_s"],
                "end_to_end_ms": run["end_to_end_ms"],
                "in_node_ms": run["in_node_ms"],
                "producer_max_send_delay_s": run["producer_max_send_delay_s"],
            }
        )
        print(
            f"  {rate:7.0f}/s  kept up: {'yes' if kept_up else 'no '}  lag growth {growth:7.1f}/s  "
            f"drained {run['drained_after_publishing_s']:5.1f} s after the last offer  "
            f"e2e p99 {run['end_to_end_ms']['p99']:8.0f} ms  in-node p99 {run['in_node_ms']['p99']:6.0f} ms",
            flush=True,
        )
        if not kept_up:
            break
    capacity = max((s["rate"] for s in steps if s["kept_up"]), default=0.0)
    return {"steps": steps, "capacity_offers_per_second": capacity}


def plot(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, memory, lag) = plt.subplots(3, 1, figsize=(8, 9), sharex=False)
    minutes = [m["minute"] for m in run["per_minute"]]
    for key, style in (("end_to_end_ms", "-"), ("in_node_ms", "--")):
        for quantile in ("p50", "p99"):
            latency.plot(
                minutes,
                [m[key][quantile] for m in run["per_minute"]],
                style,
                label=f"{key.removesuffix('_ms').replace('_', '-')} {quantile}",
            )
    latency.set_yscale("log")
    latency.set_xlabel("minute")
    latency.set_ylabel("latency (ms)")
    latency.legend(fontsize=8)
    latency.set_title(f"{run['rate']:g} offers/s for {run['seconds'] / 60:.0f} min: {run['lost']} lost")
    roles = sorted({role for s in run["samples"] for role in s["rss"]})
    for role in roles:
        memory.plot(
            [s["t"] / 60 for s in run["samples"]],
            [s["rss"].get(role, np.nan) / 2**20 for s in run["samples"]],
            label=role,
        )
    memory.set_xlabel("minute")
    memory.set_ylabel("RSS (MiB)")
    memory.legend(fontsize=8)
    lag.plot(
        [s["t"] / 60 for s in run["samples"]], [s["metrics"].get("catstream_consumer_lag", 0.0) for s in run["samples"]]
    )
    lag.set_xlabel("minute")
    lag.set_ylabel("consumer lag (offers)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model bundle to serve")
    parser.add_argument("--data", type=Path, default=MYNTRA, help="offer file whose offers are streamed")
    parser.add_argument("--rate", type=float, default=300.0, help="offers per second (default %(default)s)")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to publish (default %(default)s)")
    parser.add_argument("--warmup-minutes", type=int, default=1, help="left out of the RSS and growth verdicts")
    parser.add_argument("--sample-s", type=float, default=10.0, help="RSS and /metrics sampling interval")
    parser.add_argument("--workers", type=int, default=1, help="preprocess processes (default %(default)s)")
    parser.add_argument("--p99-target-ms", type=float, default=250.0, help="in-node p99 target (default %(default)s)")
    parser.add_argument("--find-capacity", action="store_true", help="find the steady capacity instead of soaking")
    parser.add_argument(
        "--rates",
        default="100,200,300,400,500,600,700,800",
        help="steps of --find-capacity, offers/s (default %(default)s)",
    )
    parser.add_argument("--step-s", type=float, default=60.0, help="length of each capacity step (default %(default)s)")
    parser.add_argument("--offers", type=int, default=5000, help="distinct offers cycled through (default %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="JSON and plot directory")
    args = parser.parse_args()

    inline = ImageInliner(max_bytes=int(0.7 * Settings().max_message_bytes))
    offers = [inline(o) for o in offers_from_frame(read_offer_file(args.data).head(args.offers))]
    work = Path(tempfile.mkdtemp(prefix="catstream-soak-"))
    env = {"CATSTREAM_MODEL_POLL_S": "0"}
    with EmbeddedBroker(log_path=work / "broker.log") as broker:
        wait_for_broker(Settings(bootstrap_servers=broker.bootstrap_servers))
        if args.find_capacity:
            rates = [float(r) for r in args.rates.split(",") if r.strip()]
            print(f"steady capacity: {args.step_s:g} s steps, {args.workers} preprocess worker(s)")
            result = find_capacity(
                args.model,
                offers,
                broker.bootstrap_servers,
                rates=rates,
                step_s=args.step_s,
                workers=args.workers,
                work=work,
                env=env,
            )
            print(f"capacity: {result['capacity_offers_per_second']:g} offers/s")
            path = record(
                "soak-capacity", {"model": str(args.model.resolve()), "data": str(args.data)} | result, args.out
            )
            print(f"wrote {path}")
            return 0
        run = run_steady(
            args.model,
            offers,
            broker.bootstrap_servers,
            rate=args.rate,
            seconds=60 * args.minutes,
            workers=args.workers,
            work=work,
            sample_s=args.sample_s,
            env=env,
        )
    judged = verdict(run, p99_target_ms=args.p99_target_ms, warmup_minutes=args.warmup_minutes)
    print(
        f"{run['published']} offers at {args.rate:g}/s for {args.minutes:g} min: {run['predicted']} predicted, "
        f"{run['lost']} lost, {run['duplicates']} duplicates, node exit {run['node_exit_code']}"
    )
    print(f"{'minute':>6} {'offers':>7} {'e2e p50':>9} {'e2e p99':>9} {'node p50':>9} {'node p99':>9}  (ms)")
    for m in run["per_minute"]:
        print(
            f"{m['minute']:6d} {m['offers']:7d} {m['end_to_end_ms']['p50']:9.0f} {m['end_to_end_ms']['p99']:9.0f} "
            f"{m['in_node_ms']['p50']:9.0f} {m['in_node_ms']['p99']:9.0f}"
        )
    for name, result in judged.items():
        print(
            f"  {'met    ' if result['met'] else 'NOT met'}  {name}: "
            f"{ {k: v for k, v in result.items() if k != 'met'} }"
        )
    path = record(
        "soak", {"model": str(args.model.resolve()), "data": str(args.data), "verdict": judged} | run, args.out
    )
    plot(run, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0 if all(result["met"] for result in judged.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
