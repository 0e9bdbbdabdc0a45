"""``catstream audit``: where the model goes wrong, per category, and why (SHAP).

The model is scored as it is served (ONNX Runtime, temperature, exclusion mask, threshold) on
labeled offers. The overview ranks categories by error rate, lists the most confused pairs, the
*ambiguous groups* (categories confused with each other in both directions) and, per shop, error
and uncertain rates with a suggested weight for its own category (``training.shops``).

For the worst categories (and any asked for by name), sampled misclassified offers are explained
with SHAP's **Permutation explainer on the served ONNX model**. The players of the game are what
a person can act on: the title's words, the shop's category (one player), and the cells of a grid
over the image. A coalition is featurised exactly as serving does (the title re-tokenised without
the absent words, an empty shop category, absent image cells filled with the image's mean
colour), so the attributions explain the deployed graph, hashed bigrams included, in units that
map onto dictionary entries, shop weights and image regions. (A GradientExplainer over the
PyTorch model would attribute to SentencePiece pieces through the embedding bags, not to words,
and would explain the training graph rather than the served one.) Antithetic permutations make
the values add up exactly to f(offer) − f(nothing) for each output. Each offer is explained
toward two outputs: the probability of the predicted category and of the true one.

The tokens that most often push offers *into* a category wrongly become candidate dictionary
entries (keyword → excluded category), kept only where the labeled data backs them, in the same
TSV format as ``dictionaries/`` (``training.mining``), for human review.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.bundle import ModelBundle
from core.decision import softmax
from core.dictionaries import PATH_SEPARATOR
from core.feature_queue import FeatureBatch
from core.features import Featurizer
from core.images import ImagePolicy
from core.offer_files import LABEL, offers_from_frame
from core.scoring import OnnxClassifier, served_probabilities
from core.text import words
from training.evaluate import held_out
from training.mining import ExclusionCandidate, write_candidates
from training.progress import progress_bar
from training.shops import estimate_shop_weights

__all__ = ["AuditOptions", "OfferExplainer", "run_audit", "write_audit"]

log = logging.getLogger(__name__)

SHOP_CATEGORY = "[shop category]"


@dataclass(frozen=True)
class AuditOptions:
    """What the audit looks at and how hard it works."""

    split: str = "auto"  # auto | all | random | time, as for ``catstream evaluate``
    worst: int = 10  # categories with a detailed section, worst first
    categories: tuple[str, ...] = ()  # also these, by name
    samples_per_category: int = 6  # misclassified offers explained per detailed category
    max_evals: int = 300  # model evaluations per explained offer
    image_grid: int = 4  # the image is split into grid × grid players
    min_pair_errors: int = 2  # an ambiguous pair needs this many errors in each direction
    min_shop_offers: int = 20  # shops with fewer audited offers get no suggested weight
    top_tokens: int = 10
    candidate_min_support: int = 5  # offers a keyword must occur in before it may become a rule
    candidate_max_violation_rate: float = 0.01
    candidate_min_expected: float = 3.0  # offers chance would put under the branch; fewer is no evidence
    threads: int = 2
    seed: int = 0


# --------------------------------------------------------------------------------------------
# Explanations


@dataclass
class Explanation:
    """SHAP values of one offer toward its predicted and its true category."""

    words: list[str]
    word_values: np.ndarray  # (W, 2): toward predicted, toward true
    shop_value: np.ndarray | None  # (2,) or None when the offer has no shop category
    image_values: np.ndarray | None  # (G, G, 2) or None when the image was not used
    base: np.ndarray  # (2,) f(nothing)
    full: np.ndarray  # (2,) f(offer)
    image: np.ndarray | None  # (3, S, S) uint8, as the model saw it


class OfferExplainer:
    """Permutation SHAP over words, the shop category and image cells, on the model as served (the ONNX
    network plus the lexical model)."""

    def __init__(
        self, bundle: ModelBundle, *, image_grid: int = 4, max_evals: int = 300, threads: int = 2, seed: int = 0
    ):
        self.bundle = bundle
        self.featurizer = Featurizer.from_bundle(bundle, image_policy=ImagePolicy.for_offer_files())
        self.classifier = OnnxClassifier(bundle, intra_op_threads=threads)
        self.image_grid = image_grid
        self.max_evals = max_evals
        self.seed = seed

    def probabilities(self, offer, outputs: list[int], coalitions: np.ndarray, layout: dict) -> np.ndarray:
        """``(C, len(outputs))`` probabilities of the offer with only each coalition's players present."""
        features = layout["features"]
        n_words, has_shop = len(layout["words"]), layout["has_shop"]
        titles, malls = [], []
        images = np.repeat(features.image[None], len(coalitions), axis=0)
        for row, present in enumerate(coalitions.astype(bool)):
            title = " ".join(w for w, keep in zip(layout["words"], present[:n_words], strict=True) if keep)
            mall = offer.mall_category if (has_shop and present[n_words]) else ""
            titles.append(title)
            malls.append(mall)
            if layout["cells"]:
                cells = present[n_words + has_shop :]
                for index, keep in enumerate(cells):
                    if not keep:
                        r, c = divmod(index, self.image_grid)
                        ys, xs = layout["cells"][r][c]
                        images[row, :, ys, xs] = layout["fill"]
        variants = [
            dataclasses.replace(self.featurizer.with_text(features, title, mall), image=image)
            for title, mall, image in zip(titles, malls, images, strict=True)
        ]
        logits = self.classifier.logits(FeatureBatch.stack(variants, self.featurizer.fields).inputs)
        return softmax(logits, self.bundle.temperature)[:, outputs]

    def explain(self, offer, predicted: int, true: int, *, base_dir: Path | None = None) -> Explanation:
        import shap

        features = self.featurizer.featurize(offer, base_dir=base_dir)
        title_words = words(offer.title)
        has_shop = int(bool(offer.mall_category and offer.mall_category.strip()))
        cells: list = []
        fill = None
        if features.has_image:
            size = features.image.shape[-1]
            edges = np.linspace(0, size, self.image_grid + 1).astype(int)
            cells = [
                [(slice(edges[r], edges[r + 1]), slice(edges[c], edges[c + 1])) for c in range(self.image_grid)]
                for r in range(self.image_grid)
            ]
            fill = features.image.reshape(3, -1).mean(1).round().astype(np.uint8)[:, None, None]  # (3, 1, 1)
        layout = {"features": features, "words": title_words, "has_shop": has_shop, "cells": cells, "fill": fill}
        players = len(title_words) + has_shop + self.image_grid**2 * bool(cells)
        outputs = [predicted, true]
        if players == 0:
            value = self.probabilities(offer, outputs, np.zeros((1, 0)), layout)[0]
            return Explanation(
                words=[],
                word_values=np.zeros((0, 2)),
                shop_value=None,
                image_values=None,
                base=value,
                full=value,
                image=None,
            )

        def model(coalitions: np.ndarray) -> np.ndarray:
            return self.probabilities(offer, outputs, coalitions, layout)

        masker = shap.maskers.Independent(np.zeros((1, players)), max_samples=1)
        explainer = shap.PermutationExplainer(model, masker, seed=self.seed)
        max_evals = max(self.max_evals, 2 * players + 2)
        result = explainer(np.ones((1, players)), max_evals=max_evals, silent=True)
        values = np.asarray(result.values[0], dtype=float)  # (players, 2)
        base = np.asarray(result.base_values[0], dtype=float)
        n_words = len(title_words)
        return Explanation(
            words=title_words,
            word_values=values[:n_words],
            shop_value=values[n_words] if has_shop else None,
            image_values=values[n_words + has_shop :].reshape(self.image_grid, self.image_grid, 2) if cells else None,
            base=base,
            full=base + values.sum(0),
            image=features.image if cells else None,
        )


# --------------------------------------------------------------------------------------------
# Overview


def _path(label: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in label.split(">"))


def category_overview(
    labels: tuple[str, ...], targets: np.ndarray, predicted: np.ndarray, uncertain: np.ndarray
) -> list[dict]:
    """Per true category: support, top-1 errors, wrong answers given, uncertain; worst first."""
    rows = []
    for k in np.unique(targets):
        mine = targets == k
        wrong = mine & (predicted != k)
        into = (predicted == k) & (targets != k)
        rows.append(
            {
                "category": labels[k],
                "support": int(mine.sum()),
                "error_rate": float(wrong.sum() / mine.sum()),  # top-1 errors / support
                "wrong_answers": int((wrong & ~uncertain).sum()),  # errors that were not held back as uncertain
                "uncertain_rate": float((mine & uncertain).sum() / mine.sum()),
                "wrongly_filed_here": int(into.sum()),
                "wrongly_filed_here_answered": int((into & ~uncertain).sum()),
            }
        )
    return sorted(rows, key=lambda r: (-r["error_rate"], -r["support"], r["category"]))


def confused_pairs(labels, targets, predicted, *, top: int = 20) -> list[dict]:
    counts = Counter(zip(targets[targets != predicted].tolist(), predicted[targets != predicted].tolist(), strict=True))
    return [{"true": labels[t], "predicted": labels[p], "count": c} for (t, p), c in counts.most_common(top)]


def ambiguous_groups(labels, targets, predicted, *, min_errors: int = 2) -> list[dict]:
    """Groups of categories mixed up in both directions (connected components of such pairs)."""
    counts = Counter(zip(targets[targets != predicted].tolist(), predicted[targets != predicted].tolist(), strict=True))
    edges = {(a, b) for (a, b), c in counts.items() if a < b and c >= min_errors and counts[(b, a)] >= min_errors}
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        parent[root(a)] = root(b)
    groups: dict[int, set[int]] = defaultdict(set)
    for a, b in edges:
        groups[root(a)] |= {a, b}
    result = []
    for members in groups.values():
        names = sorted(labels[m] for m in members)
        pairs = [
            {"a": labels[a], "b": labels[b], "a_as_b": counts[(a, b)], "b_as_a": counts[(b, a)]}
            for a, b in sorted(edges)
            if a in members
        ]
        leaves = {_path(n)[-1] for n in names}
        result.append(
            {
                "categories": names,
                "errors": sum(p["a_as_b"] + p["b_as_a"] for p in pairs),
                "pairs": pairs,
                "same_leaf_in_different_branches": len(leaves) == 1 and len(names) > 1,
            }
        )
    return sorted(result, key=lambda g: -g["errors"])


def shop_overview(
    frame: pd.DataFrame, predicted_labels: np.ndarray, uncertain: np.ndarray, bundle: ModelBundle, *, min_offers: int
) -> list[dict]:
    """Per shop: offers, error and uncertain rates, the weight in use and the suggested one."""
    shops = frame.assign(
        label=frame[LABEL], mall_id=frame["mall_id"].fillna(""), mall_category=frame["mall_category"].fillna("")
    )
    suggested, evidence = estimate_shop_weights(shops, min_offers=min_offers)
    purity = dict(zip(evidence["mall_id"], evidence["purity"], strict=True))
    in_use = bundle.shop_weights()
    wrong = predicted_labels != frame[LABEL].to_numpy()
    rows = []
    for mall_id, index in shops.groupby("mall_id").indices.items():
        rows.append(
            {
                "mall_id": mall_id or "(none)",
                "offers": len(index),
                "error_rate": float(wrong[index].mean()),
                "uncertain_rate": float(uncertain[index].mean()),
                "mall_categories": int(shops["mall_category"].iloc[index].nunique()),
                "category_purity": purity.get(mall_id),
                "weight_in_use": in_use(mall_id),
                "suggested_weight": suggested.get(mall_id),
            }
        )
    return sorted(rows, key=lambda r: (r["suggested_weight"] is None, r["suggested_weight"] or 0.0, -r["error_rate"]))


# --------------------------------------------------------------------------------------------
# Per category


def _sample(rows: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    return sorted(rng.choice(rows, size=min(k, len(rows)), replace=False).tolist()) if len(rows) else []


def pushing_tokens(explained: list[tuple[str, Explanation]], *, top: int) -> list[dict]:
    """Tokens (and the shop category) that pushed offers toward their wrong prediction, strongest first.

    ``explained`` holds (wrongly predicted category, explanation) pairs. ``total_push`` sums a
    token's positive SHAP values toward the wrong category over the errors (the ranking);
    ``errors`` counts the errors where it is among the three strongest pushes.
    """
    counts: Counter = Counter()
    totals: defaultdict = defaultdict(float)
    toward: defaultdict = defaultdict(Counter)
    for wrong, explanation in explained:
        players = [(w, v[0]) for w, v in zip(explanation.words, explanation.word_values, strict=True)]
        if explanation.shop_value is not None:
            players.append((SHOP_CATEGORY, explanation.shop_value[0]))
        for token, _ in sorted((p for p in players if p[1] > 0), key=lambda p: -p[1])[:3]:
            counts[token] += 1
            toward[token][wrong] += 1
        for token, value in players:
            if value > 0:
                totals[token] += float(value)
    return [
        {"token": t, "errors": counts[t], "total_push": round(totals[t], 4), "toward": toward[t].most_common(1)[0][0]}
        for t in sorted(counts, key=lambda t: (-totals[t], -counts[t], t))[:top]
    ]


@dataclass(frozen=True)
class LabeledIndex:
    """The labeled offers as evidence for rules, tokenised once: word → rows, and offers per branch."""

    titles: tuple[str, ...]
    paths: tuple[tuple[str, ...], ...]
    rows_with: dict[str, list[int]]
    per_branch: Counter

    @classmethod
    def build(cls, frame: pd.DataFrame) -> LabeledIndex:
        rows_with: dict[str, list[int]] = defaultdict(list)
        for i, title in enumerate(frame["title"]):
            for word in set(words(title)):
                rows_with[word].append(i)
        paths = tuple(_path(label) for label in frame[LABEL])
        per_branch = Counter(path[:depth] for path in paths for depth in range(1, len(path) + 1))
        return cls(tuple(frame["title"]), paths, dict(rows_with), per_branch)


def candidate_rules(
    tokens: list[dict], evidence: LabeledIndex, *, min_support: int, max_violation_rate: float, min_expected: float
) -> list[ExclusionCandidate]:
    """For each token that pushed offers into a wrong category (``toward``): token → the widest
    branch of that category under which the labeled data (almost) never files offers with it,
    although chance would put at least ``min_expected`` there (and four times the violations)."""
    candidates = []
    for item in tokens:
        token, target = item["token"], _path(item["toward"])
        if token == SHOP_CATEGORY or token.isdigit() or len(token) < 2:
            continue
        with_token = evidence.rows_with.get(token, [])
        if len(with_token) < min_support:
            continue
        for depth in range(1, len(target) + 1):
            branch = target[:depth]
            violating = [i for i in with_token if evidence.paths[i][:depth] == branch]
            # violations expected if the token said nothing about the branch
            expected = len(with_token) * evidence.per_branch[branch] / len(evidence.paths)
            if (
                expected >= min_expected
                and len(violating) <= max_violation_rate * len(with_token)
                and len(violating) <= expected / 4
            ):
                candidates.append(
                    ExclusionCandidate(
                        keyword=token,
                        excluded=PATH_SEPARATOR.join(branch),
                        offers_with_keyword=len(with_token),
                        violations=len(violating),
                        expected=round(expected, 1),
                        examples=tuple(evidence.titles[i] for i in violating[:3]),
                    )
                )
                break
    return candidates


@dataclass
class AuditReport:
    summary: dict
    categories: list[dict]
    confused_pairs: list[dict]
    ambiguous_groups: list[dict]
    shops: list[dict]
    details: list[dict] = field(default_factory=list)
    candidates: list[ExclusionCandidate] = field(default_factory=list)


def run_audit(
    model: str | Path, data: str | Path, options: AuditOptions = AuditOptions(), *, progress: bool = True
) -> AuditReport:
    started = time.monotonic()
    bundle = ModelBundle.load(model)
    unknown = [c for c in options.categories if c not in bundle.labels]
    if unknown:
        raise ValueError(f"not categories of this model: {', '.join(unknown)} (see labels.json in the bundle)")
    frame, rows, _, protocol = held_out(bundle, data, split=options.split)
    if not len(rows):
        raise ValueError("no labeled offers to audit")
    evidence = LabeledIndex.build(frame)  # every labeled offer backs or refutes candidate rules
    frame = frame.iloc[rows].reset_index(drop=True)
    labels = bundle.labels
    targets = np.array([labels.index(label) for label in frame[LABEL]])
    _, masked = served_probabilities(
        bundle,
        list(offers_from_frame(frame)),
        threads=options.threads,
        progress=lambda starts: progress_bar(starts, desc="scoring offers", unit="batch", disable=not progress),
    )
    predicted = masked.argmax(1)
    confidence = masked.max(1)
    uncertain = confidence < bundle.threshold
    overview = category_overview(labels, targets, predicted, uncertain)

    chosen = [row["category"] for row in overview if row["error_rate"] > 0][: options.worst]
    chosen += [c for c in options.categories if c not in chosen]
    rng = np.random.default_rng(options.seed)
    samples: dict[str, dict[str, list[int]]] = {}
    for category in chosen:
        k = labels.index(category)
        missed = np.flatnonzero((targets == k) & (predicted != k))
        into = np.flatnonzero((predicted == k) & (targets != k))
        half = (options.samples_per_category + 1) // 2
        take_into = min(len(into), max(half, options.samples_per_category - len(missed)))
        samples[category] = {
            "wrongly_filed_here": _sample(into, take_into, rng),
            "missed": _sample(missed, options.samples_per_category - take_into, rng),
        }

    to_explain = sorted({i for s in samples.values() for group in s.values() for i in group})
    explainer = OfferExplainer(
        bundle, image_grid=options.image_grid, max_evals=options.max_evals, threads=options.threads, seed=options.seed
    )
    offers = list(offers_from_frame(frame.iloc[to_explain]))
    base_dir = Path(data).parent if Path(data).is_file() else None
    explanations: dict[int, Explanation] = {}
    for row, offer in progress_bar(
        list(zip(to_explain, offers, strict=True)), desc="explaining errors (SHAP)", unit="offer", disable=not progress
    ):
        explanations[row] = explainer.explain(offer, int(predicted[row]), int(targets[row]), base_dir=base_dir)

    details, all_candidates = [], {}
    for category in chosen:
        rows_here = [r for group in samples[category].values() for r in group]
        tokens = pushing_tokens([(labels[predicted[r]], explanations[r]) for r in rows_here], top=options.top_tokens)
        candidates = candidate_rules(
            tokens,
            evidence,
            min_support=options.candidate_min_support,
            max_violation_rate=options.candidate_max_violation_rate,
            min_expected=options.candidate_min_expected,
        )
        for candidate in candidates:  # the same rule can come from two categories' errors
            all_candidates.setdefault((candidate.keyword, candidate.excluded), candidate)
        stats = next(r for r in overview if r["category"] == category)
        details.append(
            {
                "category": category,
                "stats": stats,
                "pushing_tokens": tokens,
                "candidates": [asdict(c) for c in candidates],
                "offers": [
                    _offer_record(
                        frame, row, explanations[row], labels, predicted, targets, confidence, uncertain, kind
                    )
                    for kind, group in samples[category].items()
                    for row in group
                ],
            }
        )

    summary = {
        "model": str(Path(model).resolve()),
        "model_version": bundle.version,
        "data": str(Path(data).resolve()),
        "protocol": protocol,
        "offers": len(frame),
        "categories": len(labels),
        "accuracy": float((predicted == targets).mean()),
        "threshold": float(bundle.threshold),
        "uncertain_rate": float(uncertain.mean()),
        "precision_answered": float((predicted == targets)[~uncertain].mean()) if (~uncertain).any() else None,
        "explained_offers": len(explanations),
        "explainer": f"shap.PermutationExplainer on the served ONNX model; players: title words, the shop "
        f"category, {options.image_grid}x{options.image_grid} image cells; max_evals {options.max_evals}",
        "options": asdict(options) | {"categories": list(options.categories)},
    }
    summary["seconds"] = round(time.monotonic() - started, 1)
    return AuditReport(
        summary=summary,
        categories=overview,
        confused_pairs=confused_pairs(labels, targets, predicted),
        ambiguous_groups=ambiguous_groups(labels, targets, predicted, min_errors=options.min_pair_errors),
        shops=shop_overview(frame, np.array(labels)[predicted], uncertain, bundle, min_offers=options.min_shop_offers),
        details=details,
        candidates=list(all_candidates.values()),
    )


def _offer_record(
    frame, row, explanation: Explanation, labels, predicted, targets, confidence, uncertain, kind
) -> dict:
    offer = frame.iloc[row]
    return {
        "kind": kind,
        "offer_id": str(offer["offer_id"]),
        "title": str(offer["title"]),
        "mall_id": str(offer.get("mall_id") or ""),
        "mall_category": str(offer.get("mall_category") or ""),
        "true": labels[targets[row]],
        "predicted": labels[predicted[row]],
        "confidence": float(confidence[row]),
        "answered_uncertain": bool(uncertain[row]),
        "words": explanation.words,
        "word_shap": np.round(explanation.word_values, 5).tolist(),  # [[toward predicted, toward true], ...]
        "shop_category_shap": None if explanation.shop_value is None else np.round(explanation.shop_value, 5).tolist(),
        "image_shap": None if explanation.image_values is None else np.round(explanation.image_values, 5).tolist(),
        "base": np.round(explanation.base, 5).tolist(),
        "probabilities": np.round(explanation.full, 5).tolist(),
        "_image": explanation.image,  # for the HTML only
    }


def write_audit(report: AuditReport, out_dir: str | Path) -> dict[str, Path]:
    """``audit.html`` (self-contained), ``audit.json`` and ``candidates/category_exclusions.tsv`` (a
    dictionary directory as it stands, for review) under ``out_dir``."""
    from training.audit_html import render_html

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "html": out_dir / "audit.html",
        "json": out_dir / "audit.json",
        "candidates": out_dir / "candidates" / "category_exclusions.tsv",
    }
    paths["html"].write_text(render_html(report), encoding="utf-8")
    data = {
        "summary": report.summary,
        "categories": report.categories,
        "confused_pairs": report.confused_pairs,
        "ambiguous_groups": report.ambiguous_groups,
        "shops": report.shops,
        "details": [
            d | {"offers": [{k: v for k, v in o.items() if not k.startswith("_")} for o in d["offers"]]}
            for d in report.details
        ],
    }
    paths["json"].write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    write_candidates(report.candidates, paths["candidates"])
    return paths
