"""Lexical scoring per offer: scikit-learn's vectorisers vs the preprocess workers' path, one run.

Every preprocess worker scores each offer's title and mall category with the lexical model
(TF-IDF n-grams · coefficients) before it enqueues the offer, so its cost per offer is part of
the preprocess budget. Same model, same offers:

(a) scikit-learn: ``TfidfVectorizer.transform`` of one offer per field, the fields side by side,
    times the coefficients — what the fitting code would do for one offer;
(b) catstream, no caches: ``LexicalModel.score`` cutting every word and mall category anew;
(c) catstream, cold: ``LexicalModel.score`` on a freshly loaded model (empty caches);
(d) catstream, warm, word cache only: after the worker has scored other offers
    (``--warm-offers``), remembering words' n-grams but not mall categories' scores;
(e) catstream, warm: both caches warm, as in a running worker.

All must give the same scores (checked). Prints µs per offer and writes JSON to
bench/results/.

    .venv/bin/python bench/lexical.py                                   # fits on Myntra offers
    .venv/bin/python bench/lexical.py --model path/to/bundle --offers 5000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import sparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import record  # noqa: E402  (bench/, the script's own folder)

from core.bundle import ModelBundle  # noqa: E402
from core.lexical import MALL_CACHE, LexicalModel  # noqa: E402
from core.offer_files import OfferFileError, read_offer_file  # noqa: E402
from training.lexical import fit_lexical  # noqa: E402

MYNTRA = REPO.parent / "shared" / "datasets" / "myntra-fashion" / "offers.csv"


def scikit_learn_scorer(model: LexicalModel):
    """One offer's ``(K,)`` scores through scikit-learn's vectorisers with the model's vocabulary and idf."""
    vectorizers = [field.vectorizer() for field in model.fields]

    def score(title: str, mall: str) -> np.ndarray:
        rows = [
            vectorizer.transform([title if field.source == "title" else mall])
            for field, vectorizer in zip(model.fields, vectorizers, strict=True)
        ]
        return np.asarray(sparse.hstack(rows).tocsr() @ model.coef, dtype=np.float32)[0] + model.intercept

    return score


def timed(score, texts: list[tuple[str, str]]) -> tuple[float, np.ndarray]:
    """µs per offer and the ``(N, K)`` scores."""
    start = time.perf_counter()
    out = [score(title, mall) for title, mall in texts]
    return (time.perf_counter() - start) / len(texts) * 1e6, np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="bundle whose lexical model to use (default: fit one on --data)")
    parser.add_argument("--data", type=Path, default=MYNTRA, help="offer file (default: the shared Myntra offers)")
    parser.add_argument(
        "--label-columns",
        default="gender,master_category,sub_category,article_type",
        help="label path when fitting a model (default: %(default)s)",
    )
    parser.add_argument("--fit-offers", type=int, default=20_000, help="offers to fit on (default: %(default)s)")
    parser.add_argument("--offers", type=int, default=2_000, help="offers timed (default: %(default)s)")
    parser.add_argument(
        "--warm-offers", type=int, default=5_000, help="other offers scored before the warm run (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="JSON output directory")
    args = parser.parse_args()

    try:
        frame = read_offer_file(args.data, label_columns=args.label_columns.split(",") if not args.model else ())
    except OfferFileError as error:
        sys.exit(f"error: {error}")
    frame = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    texts = list(zip(frame["title"].fillna(""), frame["mall_category"].fillna(""), strict=True))
    if args.model:
        source = str(args.model)
        model = ModelBundle.load(args.model).lexical()
        if model is None:
            sys.exit(f"error: bundle {args.model} has no lexical model (trained with --no-lexical?)")
    else:
        fit = texts[: args.fit_offers]
        labels = {label: i for i, label in enumerate(sorted(frame["label"][: len(fit)].unique()))}
        print(f"fitting a lexical model on {len(fit):,} offers of {args.data} ...", flush=True)
        model = fit_lexical(
            [t for t, _ in fit],
            [m for _, m in fit],
            np.array([labels[label] for label in frame["label"][: len(fit)]]),
            num_classes=len(labels),
        )
        source = f"fitted on {len(fit):,} offers of {args.data}"
    rest = texts[args.fit_offers if not args.model else 0 :]
    timed_texts, warm_texts = rest[: args.offers], rest[args.offers : args.offers + args.warm_offers]
    if len(timed_texts) < args.offers:
        sys.exit(f"error: only {len(timed_texts)} offers left to time; lower --fit-offers or --offers")

    with tempfile.TemporaryDirectory() as tmp:
        saved = model.save(Path(tmp) / "lexical")
        results = {"scikit-learn": timed(scikit_learn_scorer(model), timed_texts)}
        results["catstream, no caches"] = timed(LexicalModel.load(saved, word_cache=0, mall_cache=0).score, timed_texts)
        results["catstream, cold caches"] = timed(LexicalModel.load(saved).score, timed_texts)
        for name, mall_cache in (("catstream, warm, word cache only", 0), ("catstream, warm caches", MALL_CACHE)):
            warm = LexicalModel.load(saved, mall_cache=mall_cache)
            for title, mall in warm_texts:
                warm.score(title, mall)
            results[name] = timed(warm.score, timed_texts)

    reference = results["scikit-learn"][1]
    for name, (_, scores) in results.items():
        np.testing.assert_allclose(scores, reference, rtol=1e-4, atol=1e-4, err_msg=f"{name} disagrees")
    baseline = results["scikit-learn"][0]
    path = record(
        "lexical",
        {
            "model": source,
            "features": model.num_features,
            "categories": model.num_classes,
            "offers": len(timed_texts),
            "warm_offers": len(warm_texts),
            "us_per_offer": {name: round(us, 1) for name, (us, _) in results.items()},
        },
        args.out,
    )
    print(f"\n{model.num_features:,} features, {model.num_classes} categories, {len(timed_texts):,} offers")
    print(f"{'path':<34}{'µs/offer':>10}{'speed-up':>10}")
    for name, (us, _) in results.items():
        print(f"{name:<34}{us:>10.1f}{baseline / us:>9.1f}x")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
