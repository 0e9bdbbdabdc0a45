"""The inference loop alone, on a simulated accelerator: stages one after another, then overlapped.

On a GPU the model's run costs the CPU next to nothing: the calling thread waits inside ONNX
Runtime with the GIL released. What the inference loop does around each run (gather the batch
out of the queue, decide for it, write the decisions and vectors back) then bounds the node,
unless it overlaps with the run. This measures exactly that, without Kafka or preprocess workers:

1. featurise Myntra offers once, and fill a queue of ``--offers`` READY slots with them;
2. drain it with the node's own ``InferenceWorker``, whose model is a stand-in device: the
   bundle's null model (real outputs precomputed from the bundle's model, so every decision path
   runs; ``bench/_null_model.py``) plus a sleep of ``--device-us`` microseconds per offer in the
   batch, during which the GIL is free, as during a GPU run;
3. for each device speed, once with ``CATSTREAM_INFERENCE_OVERLAP`` off (the baseline: gather,
   run and decide in turn) and once on, in the same run.

Prints offers/s and the loop's CPU microseconds per offer for each, and writes JSON.

    .venv/bin/python bench/inference_loop.py --model BUNDLE --data ../shared/datasets/myntra-fashion/offers.csv
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._null_model import null_bundle  # noqa: E402
from core.bundle import ModelBundle  # noqa: E402
from core.feature_queue import SCORED, FeatureQueue, OfferMeta, QueueLayout  # noqa: E402
from core.features import Featurizer  # noqa: E402
from core.images import ImagePolicy  # noqa: E402
from core.node_board import NodeBoard  # noqa: E402
from core.offer_files import offers_from_frame, read_offer_file  # noqa: E402
from core.scoring import vector_fields_of  # noqa: E402
from core.settings import Settings  # noqa: E402
from gpu_workers.worker import InferenceWorker  # noqa: E402


class _Device:
    """The null model's session, plus ``us`` microseconds per offer of a run that holds no GIL."""

    def __init__(self, classifier, us: float):
        self._classifier = classifier
        self._seconds = us / 1e6
        self.spaces = classifier.spaces
        self.pad_to = classifier.pad_to

    def score(self, inputs, bound=None):
        result = self._classifier.score(inputs, bound=bound)
        time.sleep(self._seconds * len(next(iter(inputs.values()))))
        return result


def drain(bundle: ModelBundle, features: list, offers: int, *, batch: int, device_us: float, overlap: bool) -> dict:
    """Fill a fresh queue with ``offers`` READY slots and time one worker draining it."""
    settings = Settings(max_batch_size=batch, max_wait_ms=2.0, inference_overlap=overlap)
    layout = QueueLayout(
        workers=1,
        slots_per_worker=offers,
        fields=Featurizer.from_bundle(bundle).fields,
        vectors=vector_fields_of(bundle),
    )
    with tempfile.TemporaryDirectory() as work:
        queue = FeatureQueue.create(layout, directory=Path(work))
        board = NodeBoard.create(1, directory=Path(work))
        try:
            for slot in range(offers):
                meta = OfferMeta(
                    offer_id=f"o{slot}",
                    partition=0,
                    offset=slot,
                    image_status="used",
                    produced_ms=None,
                    preprocess_ms=1.0,
                )
                queue.put(slot, features[slot % len(features)], meta)
            worker = InferenceWorker(settings, bundle, queue, board, row=0)
            worker.classifier = _Device(worker.classifier, device_us)
            worker.stopping = True  # drain what is queued, then return
            wall, cpu = time.perf_counter(), time.process_time()
            code = worker.run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            scored = int((queue.state == SCORED).sum())
            if code or scored != offers:
                raise RuntimeError(f"the loop exited {code} with {scored} of {offers} offers scored")
            batches = board.inference_total("batches")
        finally:
            queue.close()
            board.close()
    return {
        "overlap": overlap,
        "device_us_per_offer": device_us,
        "offers_per_second": offers / wall,
        "device_ceiling_offers_per_second": 1e6 / device_us if device_us else None,
        "loop_cpu_us_per_offer": cpu / offers * 1e6,  # the device's sleep costs none
        "mean_batch_size": offers / max(1, batches),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="a trained bundle (its null model is the device)")
    parser.add_argument("--data", required=True, type=Path, help="offer file whose offers fill the queue")
    parser.add_argument("--offers", type=int, default=6000, help="offers drained per measurement (default 6000)")
    parser.add_argument("--batch", type=int, default=64, help="max batch size (default 64)")
    parser.add_argument(
        "--device-us",
        default="0,25,50,100",
        help="device microseconds per offer to simulate (default 0,25,50,100: none, then 40k, 20k and 10k offers/s)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each setting, best kept (default 2)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    offers = list(offers_from_frame(read_offer_file(args.data).head(512)))
    with tempfile.TemporaryDirectory() as work:
        bundle = ModelBundle.load(null_bundle(args.model, Path(work) / "null", offers))
        featurizer = Featurizer.from_bundle(bundle, image_policy=ImagePolicy.for_offer_files())
        features = [featurizer.featurize(offer) for offer in offers]
        rows = []
        print(f"{'device µs/offer':>15} {'overlap':>8} {'offers/s':>10} {'loop CPU µs/offer':>18} {'batch':>6}")
        for device_us in (float(value) for value in args.device_us.split(",")):
            for overlap in (False, True):
                runs = [
                    drain(bundle, features, args.offers, batch=args.batch, device_us=device_us, overlap=overlap)
                    for _ in range(args.repeats)
                ]
                best = max(runs, key=lambda run: run["offers_per_second"])
                rows.append(best)
                print(
                    f"{device_us:>15.0f} {'on' if overlap else 'off':>8} {best['offers_per_second']:>10,.0f} "
                    f"{best['loop_cpu_us_per_offer']:>18,.1f} {best['mean_batch_size']:>6.1f}",
                    flush=True,
                )
    for device_us in sorted({row["device_us_per_offer"] for row in rows}):
        off, on = (
            next(r for r in rows if r["device_us_per_offer"] == device_us and r["overlap"] is o) for o in (False, True)
        )
        gain = on["offers_per_second"] / off["offers_per_second"]
        print(f"device {device_us:.0f} µs/offer: overlapped / in turn = {gain:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"inference-loop-{time.strftime('%Y%m%dT%H%M%S')}.json"
    report = {
        "model": str(args.model),
        "data": str(args.data),
        "offers": args.offers,
        "batch": args.batch,
        "rows": rows,
    }
    path.write_text(json.dumps(report, indent=2))
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
