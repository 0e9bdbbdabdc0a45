"""Preprocessing per offer: what a preprocess worker spends on one offer, with and without its caches, one run.

A preprocess worker turns every offer into model inputs with ``Featurizer.featurize``: text
filters, SentencePiece ids, the title's hashed character n-grams, the exclusion mask, the lexical
model's scores and the decoded, resized image. Its cost per offer bounds how many offers one
worker process can feed to the queue. Same bundle, same offers, three ways:

(a) no caches: every word's n-grams and every mall category's lexical scores computed anew
    (the caches are emptied before each offer), as the workers did before they remembered them;
(b) warm caches: after ``--warm-offers`` other offers, as in a running worker;
(c) without the lexical model, warm: what the lexical model costs on top.

Each way is timed ``--passes`` times, interleaved, and the median is printed with the speed-up
over (a); every way must give the same inputs (checked). Writes JSON to bench/results/.

    .venv/bin/python bench/featurize.py --model path/to/bundle           # on the shared Myntra offers
    .venv/bin/python bench/featurize.py --model path/to/bundle --offers 5000 --passes 7
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import record  # noqa: E402  (bench/, the script's own folder)

from core.bundle import BundleError, ModelBundle  # noqa: E402
from core.features import Featurizer  # noqa: E402
from core.images import ImagePolicy  # noqa: E402
from core.lexical import LexicalModel  # noqa: E402
from core.offer_files import OfferFileError, offers_from_frame, read_offer_file  # noqa: E402
from core.text import forget_remembered_grams  # noqa: E402

MYNTRA = REPO.parent / "shared" / "datasets" / "myntra-fashion" / "offers.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model bundle (a `catstream train` output)")
    parser.add_argument("--data", type=Path, default=MYNTRA, help="offer file (default: the shared Myntra offers)")
    parser.add_argument("--offers", type=int, default=2_000, help="offers timed (default: %(default)s)")
    parser.add_argument(
        "--warm-offers",
        type=int,
        default=5_000,
        help="other offers featurised before the warm runs (default: %(default)s)",
    )
    parser.add_argument("--passes", type=int, default=5, help="timed passes per way (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="JSON output directory")
    args = parser.parse_args()

    try:
        bundle = ModelBundle.load(args.model)
        frame = read_offer_file(args.data)
    except (BundleError, OfferFileError) as error:
        sys.exit(f"error: {error}")
    offers = list(offers_from_frame(frame.sample(frac=1.0, random_state=1).reset_index(drop=True)))
    timed_offers, warm_offers = offers[: args.offers], offers[args.offers : args.offers + args.warm_offers]
    if len(timed_offers) < args.offers:
        sys.exit(f"error: {args.data} has {len(offers)} offers, fewer than --offers {args.offers}")
    base_dir = args.data.parent
    featurizer = Featurizer.from_bundle(bundle, image_policy=ImagePolicy.for_offer_files())
    lexical = featurizer.lexical
    uncached = None if lexical is None else LexicalModel.load(bundle.path / "lexical", word_cache=0, mall_cache=0)

    def no_caches(offer):
        forget_remembered_grams()
        return featurizer.featurize(offer, base_dir=base_dir)

    def warm(offer):
        return featurizer.featurize(offer, base_dir=base_dir)

    ways = {"no caches": (uncached, no_caches), "warm caches": (lexical, warm)}
    if lexical is not None:
        ways["warm caches, no lexical model"] = (None, warm)
    featurizer.lexical = lexical
    for offer in warm_offers:
        warm(offer)
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    outputs: dict[str, list] = {}
    for _ in range(args.passes):
        for name, (model, featurize) in ways.items():
            featurizer.lexical = model
            start = time.perf_counter()
            out = [featurize(offer) for offer in timed_offers]
            seconds[name].append(time.perf_counter() - start)
            outputs.setdefault(name, out)
    featurizer.lexical = lexical
    _check_same_inputs(outputs["no caches"], outputs["warm caches"])

    us = {name: float(np.median(values)) / len(timed_offers) * 1e6 for name, values in seconds.items()}
    baseline = us["no caches"]
    path = record(
        "featurize",
        {
            "model": str(args.model.resolve()),
            "data": str(args.data.resolve()),
            "offers": len(timed_offers),
            "warm_offers": len(warm_offers),
            "passes": args.passes,
            "us_per_offer_median": {name: round(value, 1) for name, value in us.items()},
            "us_per_offer_passes": {
                name: [round(s / len(timed_offers) * 1e6, 1) for s in values] for name, values in seconds.items()
            },
        },
        args.out,
    )
    print(f"\n{len(timed_offers):,} offers of {args.data}, median of {args.passes} passes")
    print(f"{'way':<34}{'µs/offer':>10}{'speed-up':>10}")
    for name, value in us.items():
        print(f"{name:<34}{value:>10.1f}{baseline / value:>9.2f}x")
    print(f"\nwrote {path}")


def _check_same_inputs(reference: list, other: list) -> None:
    """Both ways must give the same model inputs (the lexical scores to float32 rounding)."""
    for a, b in zip(reference, other, strict=True):
        for name in ("image", "title_ids", "mall_ids", "title_grams", "exclusion"):
            if not np.array_equal(getattr(a, name), getattr(b, name)):
                sys.exit(f"error: the cached path changed {name}")
        np.testing.assert_allclose(a.lexical, b.lexical, rtol=1e-4, atol=1e-4, err_msg="lexical scores disagree")


if __name__ == "__main__":
    main()
