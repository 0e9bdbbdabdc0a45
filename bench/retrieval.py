"""The offer index under load: build time, query latency and throughput, memory, and the
approximate path's recall, each next to a baseline measured in the same run.

1. **Myntra offers** (``--embedder``, ``--model``, ``--data``): the embedder's vectors of every
   offer (image, text, fused) into the embedded Faiss index (exact at this size). Single queries
   (one thread) unfiltered and inside the query's leaf, batches of 64, against a plain numpy
   matrix product over the same vectors (the baseline), then a save and a load.
2. **Synthetic vectors** (``--synthetic N``, default 1,000,000 x 128): clustered unit vectors into
   the HNSW path; recall@10 against exact search on the same queries, and latency at several
   ``efSearch`` values.
3. **Freshness**: predictions at a steady rate through the indexer's loop on the embedded
   broker, into the Myntra index: how long after its prediction a new offer is searchable.
4. **HTTP**: ``GET /similar`` on the Myntra index at a fixed rate, open loop, over real HTTP.

    .venv/bin/python bench/retrieval.py --model MYNTRA_BUNDLE --embedder MYNTRA_BUNDLE/embedder
    .venv/bin/python bench/retrieval.py --synthetic 200000 --skip-myntra
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import faiss  # noqa: E402
from _record import record  # noqa: E402  (bench/, the script's own folder)
from threadpoolctl import threadpool_limits  # noqa: E402

from core.faiss_index import FaissIndex  # noqa: E402
from core.offer_files import LABEL  # noqa: E402
from core.offer_index import IndexedOffer  # noqa: E402

MYNTRA = REPO.parent / "shared" / "datasets" / "myntra-fashion" / "offers.csv"


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def latency(run, queries: np.ndarray, repeats: int = 1) -> dict:
    """p50/p99 in ms of ``run(query)`` over single queries ``(1, D)``."""
    times = []
    for _ in range(repeats):
        for row in range(len(queries)):
            started = time.perf_counter()
            run(queries[row : row + 1])
            times.append(time.perf_counter() - started)
    milliseconds = np.array(times) * 1000
    return {"p50_ms": float(np.percentile(milliseconds, 50)), "p99_ms": float(np.percentile(milliseconds, 99))}


def per_second(run, queries: np.ndarray, batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        run(queries[start : start + batch])
    return len(queries) / (time.perf_counter() - started)


def myntra(args) -> tuple[dict, list[IndexedOffer]]:
    from training.embeddings import embed_offers, load_embedder, prepare_embedding_data

    model, options = load_embedder(args.embedder)
    data = prepare_embedding_data(args.data, args.model, options=options, progress=False)
    rows = np.arange(len(data.frame))
    vectors = embed_offers(model, data, rows)
    categories = data.frame[LABEL].tolist()
    offers = [
        IndexedOffer(
            offer_id=str(data.frame["offer_id"].iloc[row]),
            category=categories[row],
            vectors={space: vectors[space][row] for space in vectors},
            product=str(data.groups[row]),
            image_sha=data.image_sha[row],
            title=str(data.frame["title"].iloc[row]),
        )
        for row in rows
    ]
    spaces = {space: matrix.shape[1] for space, matrix in vectors.items()}
    before = rss_mib()
    started = time.perf_counter()
    index = FaissIndex(spaces, mode="auto")
    for start in range(0, len(offers), 1000):
        index.upsert(offers[start : start + 1000])
    build_s = time.perf_counter() - started
    memory = rss_mib() - before
    rng = np.random.default_rng(0)
    picks = rng.choice(len(offers), size=min(args.queries, len(offers)), replace=False)
    queries = vectors["fused"][picks]
    leaves = [categories[p] for p in picks]
    matrix = vectors["fused"]
    report: dict = {
        "offers": len(offers),
        "spaces": spaces,
        "build_s": build_s,
        "index_rss_mib": memory,
        "approximate": index._approximate,
    }
    report["single_unfiltered"] = latency(lambda q: index.search("fused", q, k=10), queries)
    position = iter(range(len(leaves) * 2))
    report["single_in_leaf"] = latency(
        lambda q: index.search("fused", q, k=10, category=leaves[next(position) % len(leaves)]), queries
    )
    report["baseline_numpy_single"] = latency(lambda q: np.argpartition(-(q @ matrix.T), 10, axis=1)[:, :10], queries)
    report["batched_64_per_s"] = per_second(lambda q: index.search("fused", q, k=10), queries, 64)
    report["baseline_numpy_batched_64_per_s"] = per_second(
        lambda q: np.argpartition(-(q @ matrix.T), 10, axis=1)[:, :10], queries, 64
    )
    with tempfile.TemporaryDirectory() as scratch:
        index.path = Path(scratch) / "index"
        started = time.perf_counter()
        index.save({("offers.predictions", 0): len(offers)})
        report["save_s"] = time.perf_counter() - started
        report["saved_mib"] = sum(f.stat().st_size for f in index.path.iterdir()) / 2**20
        started = time.perf_counter()
        FaissIndex.open(index.path)
        report["load_s"] = time.perf_counter() - started
    return report, offers


def freshness(args, offers: list[IndexedOffer], *, titles: bool = True) -> dict:
    """A steady stream of predictions through the indexer (``catstream index``'s loop) on the
    embedded broker, into an index already holding ``offers``: how long after its prediction each
    new offer is searchable (broker timestamp to upsert done). With ``titles`` the predictions
    carry them, so the lexical candidate source does its share of the work; without, the run is
    the baseline of vectors alone."""
    import threading

    from confluent_kafka import Producer

    from core.broker import EmbeddedBroker
    from core.kafka import ensure_topics, producer_config, wait_for_broker
    from core.schemas import Prediction
    from core.settings import Settings
    from retrieval.indexer import OfferIndexer

    spaces = {space: len(vector) for space, vector in offers[0].vectors.items()}
    prefilled = FaissIndex(spaces, mode="auto")
    prefilled.upsert(offers if titles else [dataclasses.replace(offer, title=None) for offer in offers])
    total = int(args.freshness_rate * args.freshness_seconds)
    with tempfile.TemporaryDirectory() as scratch, EmbeddedBroker(log_path=Path(scratch) / "broker.log") as broker:
        settings = Settings(
            bootstrap_servers=broker.bootstrap_servers,
            categorized_topic="fresh-predictions",
            matched_topic="fresh-matched",
            index_group="fresh-index",
        )
        wait_for_broker(settings)
        ensure_topics(settings, extra=(settings.matched_topic,))
        prefilled.path = Path(scratch) / "index"
        indexer = OfferIndexer(settings, lambda _spaces: prefilled)
        runner = threading.Thread(target=indexer.run)
        runner.start()
        producer = Producer(producer_config(settings))
        started = time.perf_counter()
        for number in range(total):
            pause = started + number / args.freshness_rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            source = offers[number % len(offers)]
            value = Prediction(
                offer_id=f"new-{number}",
                category=source.category,
                confidence=0.99,
                top3=[(source.category, 0.99)],
                model_version="bench",
                image_used=True,
                image_status="used",
                timings_ms={},
                vectors={space: vector.astype(np.float16) for space, vector in source.vectors.items()},
                title=source.title if titles else None,
            ).to_bytes()
            producer.produce(settings.categorized_topic, key=f"new-{number}".encode(), value=value)
            producer.poll(0)
        producer.flush(30)
        deadline = time.monotonic() + 60
        while indexer.counts["upserted"] < total and time.monotonic() < deadline:
            time.sleep(0.05)
        indexer.stopping = True
        runner.join(60)
    waits = np.array(indexer.freshness_ms)
    return {
        "rate": args.freshness_rate,
        "seconds": args.freshness_seconds,
        "offers": total,
        "indexed": int(indexer.counts["upserted"]),
        "index_size_at_end": prefilled.count(),
        "titles": titles,
        "p50_ms": float(np.percentile(waits, 50)),
        "p99_ms": float(np.percentile(waits, 99)),
        "max_ms": float(waits.max()),
    }


def http_similar(args, offers: list[IndexedOffer]) -> dict:
    """``GET /similar/{offer_id}?k=10`` over real HTTP at a fixed rate, open loop: each request at
    its scheduled time, its latency counted from that time (waiting included)."""
    import threading
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from catstream.query_service import QueryService

    spaces = {space: len(vector) for space, vector in offers[0].vectors.items()}
    index = FaissIndex(spaces, mode="auto")
    index.upsert(offers)
    service = QueryService(lambda: index, threading.Lock()).start("127.0.0.1", 0)
    rng = np.random.default_rng(2)
    total = int(args.http_rate * args.http_seconds)
    ids = [offers[i].offer_id for i in rng.integers(len(offers), size=total)]
    latencies: list[float] = []
    failures = 0

    def one(scheduled: float, offer_id: str) -> None:
        nonlocal failures
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{service.port}/similar/{offer_id}?k=10", timeout=10) as r:
                r.read()
        except OSError:
            failures += 1
        latencies.append((time.perf_counter() - scheduled) * 1000)

    started = time.perf_counter() + 0.1
    with ThreadPoolExecutor(max_workers=8) as pool:
        for number, offer_id in enumerate(ids):
            scheduled = started + number / args.http_rate
            pause = scheduled - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            pool.submit(one, scheduled, offer_id)
    service.stop()
    waits = np.array(latencies)
    return {
        "rate": args.http_rate,
        "seconds": args.http_seconds,
        "requests": total,
        "failures": failures,
        "p50_ms": float(np.percentile(waits, 50)),
        "p99_ms": float(np.percentile(waits, 99)),
        "max_ms": float(waits.max()),
    }


def synthetic(args) -> dict:
    rng = np.random.default_rng(1)
    count, dimension = args.synthetic, 128
    centres = rng.normal(size=(1000, dimension)).astype(np.float32)
    vectors = centres[rng.integers(1000, size=count)] + rng.normal(size=(count, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # Queries are fresh draws from the same clusters, not perturbed copies of indexed vectors:
    # their neighbours are a cluster's crowd, which is what makes approximate search miss.
    queries = centres[rng.integers(1000, size=args.queries)] + rng.normal(size=(args.queries, dimension)).astype(
        np.float32
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(dimension)
    exact.add(vectors)
    truth = exact.search(queries, 10)[1]
    report: dict = {"vectors": count, "dimension": dimension, "queries": args.queries}
    report["exact_single"] = latency(lambda q: exact.search(q, 10), queries[:200])
    before = rss_mib()
    started = time.perf_counter()
    offers = (
        IndexedOffer(offer_id=f"s{row}", category="Synthetic", vectors={"v": vectors[row]}) for row in range(count)
    )
    index = FaissIndex({"v": dimension}, mode="hnsw", ef_construction=args.ef_construction)
    batch: list[IndexedOffer] = []
    for offer in offers:
        batch.append(offer)
        if len(batch) == 20_000:
            index.upsert(batch)
            batch = []
    index.upsert(batch)
    report["hnsw_build_s"] = time.perf_counter() - started
    report["hnsw_rss_mib"] = rss_mib() - before
    report["ef_construction"] = args.ef_construction
    slot_of = {f"s{row}": row for row in range(count)}
    for ef_search in (32, 64, 128, 256):
        index.ef_search = ef_search
        found = [[slot_of[hit.offer_id] for hit in row] for row in index.search("v", queries, k=10)]
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
        timing = latency(lambda q: index.search("v", q, k=10), queries[:500])
        report[f"hnsw_ef{ef_search}"] = {"recall@10": recall, **timing}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="classifier bundle (its tokenizer)")
    parser.add_argument("--embedder", type=Path, help="embedder directory (default: <model>/embedder)")
    parser.add_argument("--data", type=Path, default=MYNTRA)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--synthetic", type=int, default=1_000_000, help="vectors for the HNSW part (0 skips it)")
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--skip-myntra", action="store_true")
    parser.add_argument("--freshness-rate", type=float, default=300.0, help="predictions/s of the freshness run")
    parser.add_argument("--freshness-seconds", type=float, default=30.0, help="its length (0 skips it)")
    parser.add_argument("--http-rate", type=float, default=100.0, help="GET /similar requests/s of the HTTP run")
    parser.add_argument("--http-seconds", type=float, default=20.0, help="its length (0 skips it)")
    parser.add_argument("--threads", type=int, default=1, help="Faiss and BLAS threads (default 1)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    # The exact path and the numpy baseline run on numpy's BLAS: hold it to the same threads.
    threadpool_limits(args.threads)
    report: dict = {"threads": args.threads}
    if not args.skip_myntra:
        if args.model is None:
            parser.error("--model is required for the Myntra part (or pass --skip-myntra)")
        args.embedder = args.embedder or args.model / "embedder"
        report["myntra"], offers = myntra(args)
        mine = report["myntra"]
        single, leaf, numpy = mine["single_unfiltered"], mine["single_in_leaf"], mine["baseline_numpy_single"]
        print(
            f"Myntra: {mine['offers']:,} offers, built in {mine['build_s']:.1f} s, +{mine['index_rss_mib']:.0f} MiB; "
            f"single query p50/p99 {single['p50_ms']:.2f}/{single['p99_ms']:.2f} ms "
            f"(in leaf {leaf['p50_ms']:.2f}/{leaf['p99_ms']:.2f} ms; "
            f"numpy {numpy['p50_ms']:.2f}/{numpy['p99_ms']:.2f} ms); "
            f"batched {mine['batched_64_per_s']:,.0f} queries/s "
            f"(numpy {mine['baseline_numpy_batched_64_per_s']:,.0f}); "
            f"save {mine['save_s']:.2f} s ({mine['saved_mib']:.0f} MiB), load {mine['load_s']:.2f} s"
        )
        if args.freshness_seconds:
            # The baseline first: vectors alone, then with the lexical candidate source.
            for key, with_titles in (("freshness_vectors_only", False), ("freshness", True)):
                report[key] = fresh = freshness(args, offers, titles=with_titles)
                print(
                    f"freshness ({'vectors + titles' if with_titles else 'vectors only, baseline'}) at "
                    f"{fresh['rate']:.0f} predictions/s for {fresh['seconds']:.0f} s into {len(offers):,} offers: "
                    f"searchable after p50 {fresh['p50_ms']:.0f} ms, p99 {fresh['p99_ms']:.0f} ms, "
                    f"max {fresh['max_ms']:.0f} ms ({fresh['indexed']:,} of {fresh['offers']:,} indexed)"
                )
        if args.http_seconds:
            report["http_similar"] = http = http_similar(args, offers)
            print(
                f"GET /similar at {http['rate']:.0f} requests/s for {http['seconds']:.0f} s: "
                f"p50 {http['p50_ms']:.1f} ms, p99 {http['p99_ms']:.1f} ms, max {http['max_ms']:.1f} ms, "
                f"{http['failures']} failed"
            )
    if args.synthetic:
        report["synthetic"] = synth = synthetic(args)
        print(
            f"synthetic: {synth['vectors']:,} x {synth['dimension']}; exact p50/p99 "
            f"{synth['exact_single']['p50_ms']:.1f}/{synth['exact_single']['p99_ms']:.1f} ms; HNSW built in "
            f"{synth['hnsw_build_s']:.0f} s, +{synth['hnsw_rss_mib']:.0f} MiB"
        )
        for ef in (32, 64, 128, 256):
            figures = synth[f"hnsw_ef{ef}"]
            print(
                f"  efSearch {ef}: recall@10 {figures['recall@10']:.3f}, "
                f"p50/p99 {figures['p50_ms']:.2f}/{figures['p99_ms']:.2f} ms"
            )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report["peak_rss_mib"] = usage.ru_maxrss / 1024
    print(f"wrote {record('retrieval', report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
