"""Soak: a steady, open-loop stream into a running node for a long time, or the steady capacity.

A burst says how fast a node empties a backlog; a steady stream says whether it keeps up. This
publishes offers at a fixed rate (open loop: each at its scheduled time, whatever the node does)
into ``catstream run`` on the embedded broker and records, per minute:

- end-to-end latency (the prediction's time minus the offer's create time); the same from the
  broker's acknowledgement of the offer (less the producer's linger and produce hop: the
  consumer's fetch and the node); and in-node latency (from the worker's consumer handing the
  offer over: preprocess + queue + model), p50 / p99;
- the resident memory of every process of the node;
- the consumer lag and the counters of ``/metrics``, sampled every ``--sample-s`` seconds.

At the end: offers lost (published, never predicted), duplicates, and the verdict on the targets:
RSS flat after warm-up (within 5%), in-node p99 within ``--p99-target-ms``, end-to-end p99 not
growing minute over minute. JSON and a plot go to bench/results/.

The producer gathers offers for ``--linger-ms`` (100 ms by default) before it sends them, and the
offers topic has one partition per preprocess worker (``--partitions``): 53 offers a batch at
525/s. That is for the embedded broker: Tansu 0.6.0 keeps every batch as an object in memory and
lists all of a partition's objects on every fetch, so at a few milliseconds, one batch per
offer, its cost per fetch outgrows a core within minutes and the run measures the broker, not
the node (``--broker-only --linger-ms 2,100,500`` shows it without a node). Fewer, larger
batches keep it under a few percent of a core for an hour; a shorter linger keeps the lumps the
node receives small. The linger counts in the end-to-end figure (an offer's create time is when
it was handed to the producer), not in the figure from the broker's acknowledgement, nor in the
in-node one.

``--find-capacity`` instead runs short steady steps at rising rates and reports the highest rate
the node keeps up with: nothing is lost and the p99 from the broker's acknowledgement stays
bounded over the step's second half.

    .venv/bin/python bench/soak.py --model MODEL --data ../shared/datasets/myntra-fashion/offers.csv --find-capacity
    .venv/bin/python bench/soak.py --model MODEL --data ... --rate 300 --minutes 60
    .venv/bin/python bench/soak.py --broker-only --rate 350 --minutes 5 --linger-ms 2,100,500
"""

from __future__ import annotations

import argparse
import itertools
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
from _stream import (  # noqa: E402
    OpenLoopProducer,
    cpu_seconds,
    every_key,
    fresh_settings,
    node_roles,
    process_tree,
    rss_bytes,
    wait_ready,
)

from catstream.demo import start_node, stop_node  # noqa: E402
from core.broker import EmbeddedBroker  # noqa: E402
from core.kafka import read_topic, wait_for_broker  # noqa: E402
from core.offer_files import offers_from_frame, read_offer_file  # noqa: E402
from core.settings import Settings  # noqa: E402
from producers.publish import ImageInliner  # noqa: E402

MYNTRA = REPO.parent / "shared" / "datasets" / "myntra-fashion" / "offers.csv"


class Sampler:
    """Every ``interval_s``: the RSS and CPU seconds of each node process and of the broker, and the
    node's /metrics counters."""

    def __init__(self, node_pid: int, log_path: Path, base_url: str, interval_s: float, broker_pid: int | None = None):
        self.node_pid, self.log_path, self.base_url, self.interval_s = node_pid, log_path, base_url, interval_s
        self.broker_pid = broker_pid
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
            pids = [pid for pid in process_tree(self.node_pid) if pid in roles]
            if self.broker_pid:
                roles[self.broker_pid] = "broker"
                pids.append(self.broker_pid)
            rss, cpu = {}, {}
            for pid in pids:
                value = rss_bytes(pid)
                if value is not None:
                    rss[roles[pid]] = value
                    cpu[roles[pid]] = cpu_seconds(pid)
            try:
                with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                text = ""
            self.samples.append({"t": time.monotonic() - started, "rss": rss, "cpu_s": cpu, "metrics": _counters(text)})

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
    broker_pid: int | None = None,
    linger_ms: float = 100.0,
    partitions: int | None = None,
) -> dict:
    """One steady run: publish at ``rate`` for ``seconds`` into a fresh node (on ``partitions``,
    one per preprocess worker by default); everything measured."""
    settings = fresh_settings(bootstrap, partitions=partitions or workers)
    log_path = work / f"node-{rate:g}-{int(time.time())}.log"
    node = start_node(bundle, settings, log_path=log_path, workers=workers, extra_env=env)
    base = wait_ready(log_path)  # the model loaded, the workers polling
    sampler = Sampler(node.pid, log_path, base, sample_s, broker_pid=broker_pid).start()
    producer = OpenLoopProducer(offers, settings, rate=rate, duration_s=seconds, linger_ms=linger_ms).start()
    producer.join()
    published_at = time.monotonic()
    expected = set(producer.sent_ids)
    messages = read_topic(
        settings,
        settings.categorized_topic,
        timeout_s=max(120.0, seconds),
        until=every_key(expected),
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
    # from the broker's acknowledgement of the offer to its prediction: the end-to-end time less the
    # producer's linger and produce hop, so the consumer's fetch and all of the node's own time
    from_broker = produced_ms - producer.acked_after_ms[number]
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
                "from_broker_ms": _percentiles(from_broker[mask]),
            }
        )
    return {
        "rate": rate,
        "seconds": seconds,
        "workers": workers,
        "published": producer.sent,
        "producer_max_send_delay_s": round(producer.max_send_delay_s, 3),
        "producer_linger_ms": linger_ms,
        "producer_offers_per_batch": round(producer.mean_batch_size, 1),
        "predicted": len(first),
        "lost": len(expected - set(first)),
        "duplicates": len(predictions) - len(first),
        "drained_after_publishing_s": round(drained_s, 1),
        "node_exit_code": code,
        "end_to_end_ms": _percentiles(produced_ms),
        "in_node_ms": _percentiles(in_node),
        "from_broker_ms": _percentiles(from_broker),
        # the offers published in the second half: past the start, where a backlog shows as it grows
        "second_half_end_to_end_ms": _percentiles(produced_ms[number >= producer.sent / 2]),
        "second_half_from_broker_ms": _percentiles(from_broker[number >= producer.sent / 2]),
        "per_minute": per_minute,
        "samples": sampler.samples,
    }


def run_broker_only(
    offers, bootstrap: str, *, rate: float, seconds: float, broker_pid: int | None, linger_ms: float, partitions: int
) -> dict:
    """The control: the same open-loop stream read back by a bare consumer, no node. Its latency
    (a message's create time to its arrival at the consumer) and the broker's CPU per minute are
    what the broker alone adds to the node's end-to-end figure."""
    from confluent_kafka import Consumer

    from core.kafka import consumer_config

    settings = fresh_settings(bootstrap, partitions=partitions)
    consumer = Consumer(consumer_config(settings, group_id=f"{settings.consumer_group}-control"))
    consumer.subscribe([settings.offers_topic])
    waits: list[tuple[int, float]] = []  # (running number, ms from create time to arrival)
    done = threading.Event()

    def consume() -> None:
        while not done.is_set():
            for message in consumer.consume(64, timeout=0.02):  # as a preprocess worker reads
                if message.error() is None:
                    created = message.timestamp()[1]
                    number = int(message.key().decode().rsplit("-", 1)[1])
                    waits.append((number, time.time() * 1000.0 - created))

    while not consumer.assignment():  # the group join, before the first offer
        consumer.poll(0.2)
    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    started = time.monotonic()
    broker_cpu = [(0.0, cpu_seconds(broker_pid) if broker_pid else 0.0)]  # (s since the start, CPU s), each minute
    producer = OpenLoopProducer(offers, settings, rate=rate, duration_s=seconds, linger_ms=linger_ms).start()
    while producer.running:
        producer.join(max(0.0, started + 60 * len(broker_cpu) - time.monotonic()))
        broker_cpu.append((time.monotonic() - started, cpu_seconds(broker_pid) if broker_pid else 0.0))
    deadline = time.monotonic() + max(120.0, seconds)
    while len(waits) < producer.sent and time.monotonic() < deadline:
        time.sleep(0.5)
    done.set()
    reader.join(5)
    consumer.close()
    number = np.array([n for n, _ in waits])
    wait = np.array([w for _, w in waits])
    minute = (number / rate // 60).astype(int)
    per_minute = [
        {"minute": m, "offers": int((minute == m).sum()), "wait_ms": _percentiles(wait[minute == m])}
        for m in range(int(minute.max()) + 1 if len(minute) else 0)
    ]
    # the broker's share of a core in each minute of publishing
    core_share = {
        m: round((c1 - c0) / (t1 - t0), 3) for m, ((t0, c0), (t1, c1)) in enumerate(itertools.pairwise(broker_cpu))
    }
    return {
        "rate": rate,
        "seconds": seconds,
        "published": producer.sent,
        "received": len(set(number.tolist())),
        "producer_max_send_delay_s": round(producer.max_send_delay_s, 3),
        "producer_linger_ms": linger_ms,
        "producer_offers_per_batch": round(producer.mean_batch_size, 1),
        "wait_ms": _percentiles(wait),
        "per_minute": per_minute,
        "broker_core_share_by_minute": core_share,
    }


def _percentiles(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return {"p50": float("nan"), "p99": float("nan")}
    return {"p50": round(float(np.percentile(values, 50)), 1), "p99": round(float(np.percentile(values, 99)), 1)}


def verdict(run: dict, *, p99_target_ms: float, warmup_minutes: int) -> dict:
    """The soak targets, each with the figure it was judged on."""
    rss_by_role: dict[str, list[float]] = {}
    for sample in run["samples"]:
        if sample["t"] >= warmup_minutes * 60:
            for role, value in sample["rss"].items():
                if role != "broker":  # the embedded broker keeps every message in memory by design
                    rss_by_role.setdefault(role, []).append(value)
    spread = {role: (max(v) - min(v)) / min(v) for role, v in rss_by_role.items() if v and min(v) > 0}
    minutes = [m for m in run["per_minute"] if m["minute"] >= warmup_minutes]
    end_to_end = [m["end_to_end_ms"]["p99"] for m in minutes]
    in_node = [m["in_node_ms"]["p99"] for m in minutes]
    slope = float(np.polyfit(range(len(end_to_end)), end_to_end, 1)[0]) if len(end_to_end) >= 3 else 0.0
    # Growth is judged against the first minute after warm-up: a series that has already grown
    # large must not excuse its own growth.
    baseline = end_to_end[0] if end_to_end else 0.0
    # the backlog when publishing ended: more than two seconds of offers waiting is not keeping up
    lags = [s["metrics"].get("catstream_consumer_lag", 0.0) for s in run["samples"] if s["t"] <= run["seconds"]]
    lag = lags[-1] if lags else float("nan")
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
            "met": slope <= max(5.0, 0.05 * baseline),
        },
        "backlog_not_growing": {
            "value_offers_waiting_at_the_end": lag,
            "met": lag <= 2 * run["rate"],
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
    linger_ms: float = 100.0,
    partitions: int | None = None,
    max_p99_ms: float = 1000.0,
) -> dict:
    """Steady steps at rising rates. A rate is kept up with when nothing is lost, the offers of the
    step's second half waited less than ``max_p99_ms`` (p99) from the broker's acknowledgement to
    their prediction, so no backlog built up (the producer's linger is left out), and the node
    answers the last offer within 2 s of its publication."""
    steps = []
    for rate in rates:
        run = run_steady(
            bundle,
            offers,
            bootstrap,
            rate=rate,
            seconds=step_s,
            workers=workers,
            work=work,
            sample_s=2.0,
            env=env,
            linger_ms=linger_ms,
            partitions=partitions,
        )
        lags = [
            (s["t"], s["metrics"].get("catstream_consumer_lag", 0.0))
            for s in run["samples"]
            if s["t"] > step_s / 2 and s["t"] <= step_s
        ]
        growth = float(np.polyfit(*zip(*lags, strict=True), 1)[0]) if len(lags) >= 3 else 0.0
        settled = run["second_half_from_broker_ms"]["p99"]
        kept_up = run["lost"] == 0 and run["drained_after_publishing_s"] < 2.0 and settled < max_p99_ms
        steps.append(
            {
                "rate": rate,
                "kept_up": kept_up,
                "lag_growth_per_s": round(growth, 1),
                "drained_after_publishing_s": run["drained_after_publishing_s"],
                "end_to_end_ms": run["end_to_end_ms"],
                "second_half_end_to_end_ms": run["second_half_end_to_end_ms"],
                "from_broker_ms": run["from_broker_ms"],
                "second_half_from_broker_ms": run["second_half_from_broker_ms"],
                "in_node_ms": run["in_node_ms"],
                "producer_max_send_delay_s": run["producer_max_send_delay_s"],
            }
        )
        print(
            f"  {rate:7.0f}/s  kept up: {'yes' if kept_up else 'no '}  lag growth {growth:7.1f}/s  "
            f"drained {run['drained_after_publishing_s']:5.1f} s after the last offer  "
            f"e2e p99 {run['end_to_end_ms']['p99']:6.0f} ms, from the broker {run['from_broker_ms']['p99']:6.0f} ms "
            f"(second half {settled:6.0f} ms)  "
            f"in-node p99 {run['in_node_ms']['p99']:6.0f} ms",
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


def broker_only(args: argparse.Namespace, offers, lingers: list[float], work: Path) -> int:
    """The control for each linger, each on a fresh broker, side by side."""
    controls = []
    for linger in lingers:
        with EmbeddedBroker(log_path=work / f"broker-linger-{linger:g}.log") as broker:
            wait_for_broker(Settings(bootstrap_servers=broker.bootstrap_servers))
            control = run_broker_only(
                offers,
                broker.bootstrap_servers,
                rate=args.rate,
                seconds=60 * args.minutes,
                broker_pid=broker.pid,
                linger_ms=linger,
                partitions=args.partitions or args.workers,
            )
            control["broker_rss_mib_at_end"] = round((rss_bytes(broker.pid) or 0) / 2**20, 1)
        controls.append(control)
        print(
            f"broker only, linger {linger:g} ms ({control['producer_offers_per_batch']:g} offers per batch): "
            f"{control['published']} offers at {args.rate:g}/s, {control['received']} received; create → arrival "
            f"p50 {control['wait_ms']['p50']:.0f} ms, p99 {control['wait_ms']['p99']:.0f} ms; "
            f"broker RSS {control['broker_rss_mib_at_end']:,.0f} MiB at the end",
            flush=True,
        )
    header = "".join(f" {'p99 @' + format(c['producer_linger_ms'], 'g'):>9} {'CPU':>5}" for c in controls)
    print(f"{'minute':>6}{header}   (create → arrival ms; broker % of a core; by linger.ms)")
    for minute in range(max(len(c["per_minute"]) for c in controls)):
        cells = []
        for control in controls:
            rows = [m for m in control["per_minute"] if m["minute"] == minute]
            p99 = rows[0]["wait_ms"]["p99"] if rows else float("nan")
            share = control["broker_core_share_by_minute"].get(minute, float("nan"))
            cells.append(f" {p99:9.0f} {100 * share:4.0f}%")
        print(f"{minute:6d}{''.join(cells)}")
    path = record("soak-broker-only", {"data": str(args.data), "controls": controls}, args.out)
    print(f"wrote {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model bundle to serve (not needed with --broker-only)")
    parser.add_argument("--data", type=Path, default=MYNTRA, help="offer file whose offers are streamed")
    parser.add_argument("--rate", type=float, default=300.0, help="offers per second (default %(default)s)")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to publish (default %(default)s)")
    parser.add_argument("--warmup-minutes", type=int, default=1, help="left out of the RSS and growth verdicts")
    parser.add_argument("--sample-s", type=float, default=10.0, help="RSS and /metrics sampling interval")
    parser.add_argument("--workers", type=int, default=1, help="preprocess processes (default %(default)s)")
    parser.add_argument("--p99-target-ms", type=float, default=250.0, help="in-node p99 target (default %(default)s)")
    parser.add_argument("--find-capacity", action="store_true", help="find the steady capacity instead of soaking")
    parser.add_argument(
        "--broker-only",
        action="store_true",
        help="the control: the same stream read back by a bare consumer, no node (what the broker adds)",
    )
    parser.add_argument(
        "--rates",
        default="100,200,300,400,500,600,700,800",
        help="steps of --find-capacity, offers/s (default %(default)s)",
    )
    parser.add_argument("--step-s", type=float, default=60.0, help="length of each capacity step (default %(default)s)")
    parser.add_argument("--offers", type=int, default=5000, help="distinct offers cycled through (default %(default)s)")
    parser.add_argument(
        "--linger-ms",
        default="100",
        help="the load producer's linger.ms, how long it gathers offers into one batch (default %(default)s; "
        "see the module's docstring). --broker-only takes a list and runs each value on a fresh broker",
    )
    parser.add_argument(
        "--partitions", type=int, help="partitions of the offers topic (default: one per preprocess worker)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="JSON and plot directory")
    args = parser.parse_args()
    if args.model is None and not args.broker_only:
        parser.error("--model is required (except with --broker-only)")
    try:
        lingers = [float(value) for value in args.linger_ms.split(",") if value.strip()]
    except ValueError:
        parser.error(f"--linger-ms takes numbers separated by commas, not {args.linger_ms!r}")
    if not lingers or (len(lingers) > 1 and not args.broker_only):
        parser.error("--linger-ms takes one value (a list only with --broker-only)")

    inline = ImageInliner(max_bytes=int(0.7 * Settings().max_message_bytes))
    offers = [inline(o) for o in offers_from_frame(read_offer_file(args.data).head(args.offers))]
    work = Path(tempfile.mkdtemp(prefix="catstream-soak-"))
    env = {"CATSTREAM_MODEL_POLL_S": "0"}
    if args.broker_only:
        return broker_only(args, offers, lingers, work)
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
                linger_ms=lingers[0],
                partitions=args.partitions,
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
            broker_pid=broker.pid,
            linger_ms=lingers[0],
            partitions=args.partitions,
        )
    judged = verdict(run, p99_target_ms=args.p99_target_ms, warmup_minutes=args.warmup_minutes)
    print(
        f"{run['published']} offers at {args.rate:g}/s for {args.minutes:g} min: {run['predicted']} predicted, "
        f"{run['lost']} lost, {run['duplicates']} duplicates, node exit {run['node_exit_code']}; "
        f"{run['producer_offers_per_batch']:g} offers per batch sent (linger {lingers[0]:g} ms)"
    )
    print(
        f"{'minute':>6} {'offers':>7} {'e2e p50':>9} {'e2e p99':>9} {'acked p50':>10} {'acked p99':>10} "
        f"{'node p50':>9} {'node p99':>9}  (ms; acked: from the broker's acknowledgement)"
    )
    for m in run["per_minute"]:
        print(
            f"{m['minute']:6d} {m['offers']:7d} {m['end_to_end_ms']['p50']:9.0f} {m['end_to_end_ms']['p99']:9.0f} "
            f"{m['from_broker_ms']['p50']:10.0f} {m['from_broker_ms']['p99']:10.0f} "
            f"{m['in_node_ms']['p50']:9.0f} {m['in_node_ms']['p99']:9.0f}"
        )
    samples = run["samples"]
    if len(samples) >= 2:
        span = samples[-1]["t"] - samples[0]["t"]
        for role in sorted(samples[-1]["cpu_s"]):
            used = samples[-1]["cpu_s"][role] - samples[0]["cpu_s"].get(role, 0.0)
            first, last = (s["rss"].get(role, 0) / 2**20 for s in (samples[0], samples[-1]))
            print(f"  {role:>12}: {100 * used / span:5.1f}% of a core, RSS {first:6.0f} → {last:6.0f} MiB")
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
