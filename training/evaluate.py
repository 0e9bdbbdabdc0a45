"""``catstream evaluate``: judge a model bundle on held-out labeled offers, next to the baselines.

The held-out rows are rebuilt from the bundle's own record of how it was trained (label columns,
label-set rule, split protocol and seed) and checked against the data's fingerprint, so the test
rows are exactly the ones training never saw. The model runs as it is served: the bundle's ONNX
graph in ONNX Runtime, softmax at the bundle's temperature, the exclusion mask, the threshold.
Both TF-IDF + LinearSVC baselines are trained in the same run on the same non-test rows, and
the model is compared with each offer by offer (:func:`training.significance.paired_comparison`):
on a few thousand offers, a lead of a few tenths of a point may be one test set's luck. Every
interval and test is also given with the product (title group) as the unit, since the colour
variants of one product are right or wrong together.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, precision_recall_fscore_support

from core.bundle import ModelBundle
from core.decision import ParentCategories
from core.offer_files import LABEL, offers_from_frame
from core.scoring import served_probabilities
from training.baselines import BASELINES, decision_scores, fit_baseline
from training.data import data_fingerprint, load_labeled, select_labels
from training.progress import progress_bar
from training.significance import INTERVAL_LEVEL, accuracy_interval, accuracy_interval_by_group, paired_comparison
from training.splits import SplitSpec, split_offers, title_groups

__all__ = [
    "COVERAGE_LEVELS",
    "ReportFiles",
    "Served",
    "confusion_among",
    "evaluate_bundle",
    "held_out",
    "operating_answers",
    "parent_answers",
    "points_interval",
    "render_markdown",
    "score",
    "serve",
    "serve_held_out",
    "served_curves",
    "write_report",
]

log = logging.getLogger(__name__)

COVERAGE_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.95, 0.97, 0.99, 1.0)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def score(
    labels: tuple[str, ...],
    targets: np.ndarray,
    predicted: np.ndarray,
    *,
    confidence: np.ndarray | None = None,
    threshold: float | None = None,
    listed_at: pd.Series | None = None,
    top_pairs: int = 15,
) -> dict:
    """Metrics of ``predicted`` ``(N,)`` against ``targets`` ``(N,)`` (class indices into ``labels``).

    With ``confidence`` ``(N,)``: the coverage-vs-precision curve, and with ``threshold`` the
    coverage and precision of the offers that would be categorized (the rest are "uncertain").
    """
    correct = predicted == targets
    present = np.unique(np.concatenate([targets, predicted]))
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predicted, labels=present, zero_division=0
    )
    result: dict = {
        "offers": len(targets),
        "accuracy": float(correct.mean()) if len(targets) else float("nan"),
        "accuracy_interval": accuracy_interval(int(correct.sum()), len(targets)),
        "macro_f1": float(f1_score(targets, predicted, labels=np.unique(targets), average="macro", zero_division=0)),
        "per_category": sorted(
            [
                {"category": labels[k], "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for k, p, r, f, s in zip(present, precision, recall, f1, support, strict=True)
                if s > 0
            ],
            key=lambda row: (row["f1"], -row["support"]),
        ),
    }
    pairs = pd.Series(list(zip(targets[~correct], predicted[~correct], strict=True))).value_counts().head(top_pairs)
    result["confused_pairs"] = [
        {"true": labels[t], "predicted": labels[p], "count": int(c)} for (t, p), c in pairs.items()
    ]
    if listed_at is not None:
        month = pd.to_datetime(pd.Series(listed_at).reset_index(drop=True), errors="coerce").dt.month
        result["per_month"] = {
            _MONTHS[int(m) - 1]: {
                "offers": int((month == m).sum()),
                "accuracy": float(correct[(month == m).to_numpy()].mean()),
            }
            for m in sorted(month.dropna().unique())
        }
    if confidence is not None:
        result["coverage_curve"] = _coverage_curve(confidence, correct)
        if threshold is not None:
            accepted = confidence >= threshold
            result["at_threshold"] = {
                "threshold": float(threshold),
                "coverage": float(accepted.mean()),
                "precision": float(correct[accepted].mean()) if accepted.any() else float("nan"),
                "uncertain": int((~accepted).sum()),
            }
    return result


def _coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> list[dict]:
    order = np.argsort(-confidence, kind="stable")
    cumulative = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    curve = []
    for level in COVERAGE_LEVELS:
        k = max(1, round(level * len(order)))
        curve.append(
            {"coverage": level, "threshold": float(confidence[order[k - 1]]), "precision": float(cumulative[k - 1])}
        )
    return curve


def held_out(
    bundle: ModelBundle, data: str | Path, *, split: str = "auto"
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, str]:
    """``(frame, test_rows, train_rows, protocol)`` for evaluating ``bundle`` on ``data``.

    ``auto`` uses the bundle's own split when ``data`` is the data it was trained on (same
    fingerprint), else every labeled row (no baseline training rows). ``random``/``time`` force a
    protocol; ``all`` evaluates on every row.
    """
    training = bundle.config.training
    everything = load_labeled(data, training.labels.label_columns)
    # The label-set rule of training, applied to the same data, gives back exactly its rows.
    frame, _ = select_labels(everything, training.labels.min_label_count, training.labels.rare_leaves)
    same_data = data_fingerprint(frame) == training.data_fingerprint
    if not same_data:
        frame = everything[everything[LABEL] != ""].reset_index(drop=True)
        outside = ~frame[LABEL].isin(bundle.labels)
        if outside.any():
            log.warning(
                "%d offers have categories outside the model's label set; they are not scored", int(outside.sum())
            )
            frame = frame[~outside].reset_index(drop=True)
    if split == "auto":
        if same_data:
            split = training.split.protocol
        else:
            log.warning("the data is not the data this model was trained on: scoring every labeled offer, no baselines")
            split = "all"
    if split == "all":
        return frame, np.arange(len(frame)), np.zeros(0, dtype=np.int64), "all"
    if not same_data:
        raise ValueError(
            "a held-out split can be rebuilt only on the data the model was trained on "
            "(its fingerprint differs); use --split all"
        )
    spec = SplitSpec(**training.split.model_dump() | {"protocol": split})
    parts = split_offers(frame, spec)
    return frame, parts.test, np.concatenate([parts.train, parts.validation]), split


@dataclass(frozen=True)
class Served:
    """A bundle's held-out offers and its served probabilities on them: scored once, then shared by
    the evaluation report and the champion comparison."""

    bundle: ModelBundle
    test: pd.DataFrame
    train: pd.DataFrame  # the baselines' training offers (empty when the split could not be rebuilt)
    protocol: str
    targets: np.ndarray  # (N,) indices into the bundle's labels
    masked: np.ndarray  # (N, K) after temperature and exclusion mask

    @property
    def correct(self) -> np.ndarray:
        """``(N,)`` which offers the served answer files under their labeled category."""
        return self.masked.argmax(1) == self.targets

    def score(self, rows: np.ndarray | None = None) -> dict:
        """:func:`score` of the served answers on ``rows`` of ``test`` (all by default)."""
        rows = np.arange(len(self.test)) if rows is None else rows
        masked = self.masked[rows]
        result = score(
            self.bundle.labels,
            self.targets[rows],
            masked.argmax(1),
            confidence=masked.max(1),
            threshold=self.bundle.threshold,
            listed_at=self.test["listed_at"].iloc[rows],
        )
        result["at_threshold"]["parents"] = parent_answers(
            self.bundle.labels,
            masked,
            self.targets[rows],
            threshold=self.bundle.threshold,
            parent_threshold=self.bundle.parent_threshold,
        )
        return result


def parent_answers(
    labels: tuple[str, ...],
    probabilities: np.ndarray,
    targets: np.ndarray,
    *,
    threshold: float,
    parent_threshold: float | None,
) -> dict:
    """How the offers left uncertain by ``threshold`` fare one or more levels up (see ``ParentCategories``).

    ``probabilities`` ``(N, K)`` as served, ``targets`` ``(N,)``. Returns how many uncertain offers
    get a parent reaching ``parent_threshold`` (None: none does), how often the offer's category
    lies under it, per depth, and the share of all offers filed somewhere (leaf or parent) with
    the precision of those answers together.
    """
    uncertain = probabilities.max(axis=1) < threshold
    parents = ParentCategories.of(tuple(labels))
    parent, _ = parents.confident(probabilities[uncertain], parent_threshold)
    found = parent >= 0
    right = parents.holds(targets[uncertain][found], parent[found])
    depths = parents.depths[parent[found]]
    leaf_right = int((probabilities.argmax(axis=1) == targets)[~uncertain].sum())
    filed = int((~uncertain).sum() + found.sum())
    return {
        "threshold": parent_threshold,
        "uncertain": int(uncertain.sum()),
        "offers": int(found.sum()),
        "right": int(right.sum()),
        "precision": float(right.mean()) if found.any() else float("nan"),
        "coverage_with_parents": filed / max(1, len(probabilities)),
        "precision_with_parents": (leaf_right + int(right.sum())) / filed if filed else float("nan"),
        "by_depth": {
            int(depth): {"offers": int((depths == depth).sum()), "precision": float(right[depths == depth].mean())}
            for depth in np.unique(depths)
        },
    }


def operating_answers(bundle: ModelBundle, probabilities: np.ndarray, targets: np.ndarray) -> list[dict]:
    """Each of the bundle's operating points (what a leaf threshold gave on the offers it was
    calibrated on, with the parent threshold chosen for it) beside what it gives on these offers:
    ``probabilities`` ``(N, K)`` as served, ``targets`` ``(N,)``. Empty for bundles without them."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    rows = []
    for point in bundle.operating_points:
        accepted = confidence >= point.threshold
        parents = parent_answers(
            bundle.labels, probabilities, targets, threshold=point.threshold, parent_threshold=point.parent_threshold
        )
        rows.append(
            {
                "threshold": point.threshold,
                "calibration": point.model_dump(),
                "coverage": float(accepted.mean()),
                "precision": float(correct[accepted].mean()) if accepted.any() else float("nan"),
                "parents": {k: parents[k] for k in ("threshold", "uncertain", "offers", "right", "precision")},
                "filed": parents["coverage_with_parents"],
                "filed_precision": parents["precision_with_parents"],
            }
        )
    return rows


def serve_held_out(
    bundle: ModelBundle,
    data: str | Path,
    *,
    split: str = "auto",
    batch_size: int = 256,
    threads: int = 2,
    progress: bool = True,
) -> Served:
    """The bundle's held-out offers in ``data`` (see :func:`held_out`), served as in production."""
    frame, test_rows, train_rows, protocol = held_out(bundle, data, split=split)
    if not len(test_rows):
        raise ValueError("no labeled offers to evaluate")
    return serve(
        bundle,
        frame.iloc[test_rows].reset_index(drop=True),
        train=frame.iloc[train_rows],
        protocol=protocol,
        batch_size=batch_size,
        threads=threads,
        progress=progress,
    )


def serve(
    bundle: ModelBundle,
    test: pd.DataFrame,
    *,
    train: pd.DataFrame | None = None,
    protocol: str = "all",
    batch_size: int = 256,
    threads: int = 2,
    progress: bool = True,
) -> Served:
    """The labeled ``test`` offers (categories all in the bundle's label set) served as in production."""
    targets = np.array([bundle.labels.index(label) for label in test[LABEL]])
    _, masked = served_probabilities(
        bundle,
        list(offers_from_frame(test)),
        batch_size=batch_size,
        threads=threads,
        progress=lambda starts: progress_bar(starts, desc="evaluating model", unit="batch", disable=not progress),
    )
    return Served(
        bundle=bundle,
        test=test,
        train=test.iloc[:0] if train is None else train,
        protocol=protocol,
        targets=targets,
        masked=masked,
    )


def evaluate_bundle(
    model: str | Path,
    data: str | Path,
    *,
    split: str = "auto",
    baselines: bool = True,
    batch_size: int = 256,
    threads: int = 2,
    progress: bool = True,
    served: Served | None = None,
    threshold: float | None = None,
    parent_threshold: float | None = None,
) -> dict:
    """Evaluate the bundle at ``model`` on ``data``; returns the report (see :func:`write_report`).

    ``threshold`` / ``parent_threshold`` serve it at other thresholds, as ``catstream run`` would
    (``ModelBundle.with_thresholds``). ``served`` (from :func:`serve_held_out` on the same bundle
    and data) saves scoring it again.
    """
    started = time.monotonic()
    if served is None:
        bundle = ModelBundle.load(model).with_thresholds(threshold=threshold, parent_threshold=parent_threshold)
        served = serve_held_out(bundle, data, split=split, batch_size=batch_size, threads=threads, progress=progress)
    bundle, test, train, labels, targets = (
        served.bundle,
        served.test,
        served.train,
        served.bundle.labels,
        served.targets,
    )
    groups = title_groups(test["title"].fillna("").astype(str))
    model_result = served.score() | {
        "accuracy_interval_by_product": accuracy_interval_by_group(served.correct, groups),
        "operating_points": operating_answers(bundle, served.masked, targets),
        "curves": served_curves(served.masked, targets),
        "confusion": confusion_among(labels, targets, served.masked.argmax(1)),
    }
    report = {
        "model": str(Path(model).resolve()),
        "model_version": bundle.version,
        "data": str(Path(data).resolve()),
        "protocol": served.protocol,
        "test_offers": len(test),
        "train_offers_for_baselines": len(train),
        "categories": len(labels),
        "interval_level": INTERVAL_LEVEL,
        "target_precision": bundle.config.training.calibration.target_precision,
        **(
            {"served_at": bundle.served_at.model_dump(mode="json") | {"note": bundle.served_at_note()}}
            if bundle.served_at
            else {}
        ),
        "results": {
            "catstream": model_result,
        },
    }
    if baselines and len(train):
        model_correct = served.correct
        for name in BASELINES:
            clock = time.monotonic()
            log.info("training baseline %s on %d offers", name, len(train))
            fitted = fit_baseline(name, train, train[LABEL].to_numpy())
            scores = decision_scores(fitted, test)
            classes = list(fitted.classes_)
            predicted = np.array([labels.index(classes[k]) for k in scores.argmax(1)])
            baseline_correct = predicted == targets
            report["results"][name] = score(
                labels, targets, predicted, confidence=scores.max(1), listed_at=test["listed_at"]
            ) | {
                "accuracy_interval_by_product": accuracy_interval_by_group(baseline_correct, groups),
                "seconds": round(time.monotonic() - clock, 1),
            }
            # Same offers, so the lead over each baseline is judged paired (see paired_comparison).
            report.setdefault("paired", {})[name] = paired_comparison(model_correct, baseline_correct, groups=groups)
    elif baselines:
        report["baselines_skipped"] = "no training rows: the evaluation data is not the model's training data"
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote."""

    json: Path
    markdown: Path
    figures: tuple[Path, ...]

    def all(self) -> list[Path]:
        return [self.json, self.markdown, *self.figures]


def write_report(report: dict, out_dir: str | Path, *, name: str = "evaluation") -> ReportFiles:
    """Write ``<name>.json``, the figures (``training.report_figures``) and ``<name>.md``, which
    embeds them, under ``out_dir``."""
    from training.report_figures import write_figures

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    figures = write_figures(report, out_dir)
    md_path.write_text(render_markdown(report, figures=[path.name for path in figures]))
    return ReportFiles(json_path, md_path, tuple(figures))


def served_curves(probabilities: np.ndarray, targets: np.ndarray, *, points: int = 100, bins: int = 15) -> dict:
    """The served model's coverage-precision curve (``points`` coverages, most confident first) and
    reliability (``bins`` equal-width confidence bins: offers, mean confidence, share right), from
    ``probabilities`` ``(N, K)`` as served and ``targets`` ``(N,)``."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    order = np.argsort(-confidence, kind="stable")
    right = np.cumsum(correct[order])
    curve = []
    for level in np.linspace(1.0 / points, 1.0, points):
        k = max(1, round(level * len(order)))
        curve.append(
            {
                "coverage": float(level),
                "threshold": float(confidence[order[k - 1]]),
                "precision": float(right[k - 1] / k),
            }
        )
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    reliability = [
        {
            "low": float(edges[b]),
            "high": float(edges[b + 1]),
            "offers": int((which == b).sum()),
            "confidence": float(confidence[which == b].mean()) if (which == b).any() else None,
            "accuracy": float(correct[which == b].mean()) if (which == b).any() else None,
        }
        for b in range(bins)
    ]
    return {"coverage_precision": curve, "reliability": reliability}


def confusion_among(labels: tuple[str, ...], targets: np.ndarray, predicted: np.ndarray, *, top: int = 12) -> dict:
    """Wrong answers among the ``top`` categories most involved in them: ``categories`` and
    ``counts[true][predicted]`` (the diagonal is zero)."""
    wrong = targets != predicted
    involvement = np.bincount(targets[wrong], minlength=len(labels)) + np.bincount(
        predicted[wrong], minlength=len(labels)
    )
    chosen = [int(k) for k in np.argsort(-involvement, kind="stable")[:top] if involvement[k] > 0]
    index = {k: i for i, k in enumerate(chosen)}
    counts = np.zeros((len(chosen), len(chosen)), dtype=int)
    for true, guess in zip(targets[wrong], predicted[wrong], strict=True):
        if true in index and guess in index:
            counts[index[true], index[guess]] += 1
    return {"categories": [labels[k] for k in chosen], "counts": counts.tolist()}


def _parent_threshold(parents: dict) -> str:
    if parents["threshold"] is None:
        return (
            "a parent threshold, which this bundle does not have (no parent reached the target precision in training)"
        )
    return f"the parent threshold {parents['threshold']:.4f}"


def _served_at(report: dict) -> list[str]:
    """A paragraph on overridden thresholds (none when the bundle's own are served)."""
    note = report.get("served_at", {}).get("note")
    return [note[0].upper() + note[1:] + ".", ""] if note else []


def _operating_points(rows: list[dict] | None, *, lowest: float = 0.9) -> list[str]:
    """The operating points from ``lowest`` up as a Markdown section (``evaluation.json`` has all)."""
    rows = [row for row in rows or [] if row["threshold"] >= lowest]
    if not rows:
        return []
    lines = [
        "",
        "## Other leaf thresholds (catstream)",
        "",
        "What serving at another leaf threshold gives (`catstream run --threshold T`), with the parent threshold "
        "chosen for it in training: first on the offers the bundle was calibrated on, then on these offers.",
        "",
        "| leaf threshold | calibration: coverage / precision / lower bound | parent threshold | coverage here | "
        "precision here | filed under a parent (right) | filed, leaf or parent | precision, leaf or parent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        point, parents = row["calibration"], row["parents"]
        parent = "none" if parents["threshold"] is None else f"{parents['threshold']:.4f}"
        lines.append(
            f"| {row['threshold']:.5f} | {_pct(point['coverage'])} / {_pct(point['precision'])} / "
            f"{_pct(point['precision_bound'])} | {parent} | {_pct(row['coverage'])} | {_pct(row['precision'])} | "
            f"{parents['offers']} ({parents['right']}) | {_pct(row['filed'])} | {_pct(row['filed_precision'])} |"
        )
    return lines


def _pct(value: float) -> str:
    return "–" if value is None or value != value else f"{100 * value:.2f}%"


def _interval(bounds: list[float] | None) -> str:
    return "–" if not bounds or bounds[0] != bounds[0] else f"{100 * bounds[0]:.2f}–{100 * bounds[1]:.2f}%"


def points_interval(bounds: list[float] | None) -> str:
    """``[low, high]`` difference of two accuracies as "+0.11 to +0.60" points; "–" when absent."""
    return "–" if not bounds or bounds[0] != bounds[0] else f"{100 * bounds[0]:+.2f} to {100 * bounds[1]:+.2f}"


def _level(report: dict) -> str:
    return f"{100 * report.get('interval_level', INTERVAL_LEVEL):.0f}%"


def _embed(figures, name: str) -> list[str]:
    """Markdown lines showing the figure file ``name`` when it was drawn."""
    from training.report_figures import FIGURES

    return ["", f"![{FIGURES[name]}]({name})"] if name in figures else []


def render_markdown(report: dict, *, figures: list[str] | tuple[str, ...] = ()) -> str:
    """The report as Markdown: summary, per-month accuracy, confusions, coverage curve, worst categories."""
    results = report["results"]
    model = results["catstream"]
    lines = [
        f"# Evaluation of {report['model_version']}",
        "",
        f"Data `{report['data']}`, protocol **{report['protocol']}**: {report['test_offers']} held-out offers, "
        f"{report['categories']} categories.",
        "",
        *_served_at(report),
        f"| system | accuracy | {_level(report)} interval | {_level(report)} interval by product | macro-F1 | "
        "coverage at threshold | precision at threshold |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        at = result.get("at_threshold", {})
        lines.append(
            f"| {name} | {_pct(result['accuracy'])} | {_interval(result.get('accuracy_interval'))} | "
            f"{_interval(result.get('accuracy_interval_by_product'))} | "
            f"{result['macro_f1']:.4f} | {_pct(at.get('coverage'))} | {_pct(at.get('precision'))} |"
        )
    lines += [
        "",
        "The first interval is exact and takes the offers as independent; the second resamples whole "
        "products (title groups: the same title once colours are set aside), whose colour variants are "
        "right or wrong together, and is the one to trust where a product has many.",
    ]
    if "baselines_skipped" in report:
        lines += ["", f"Baselines skipped: {report['baselines_skipped']}."]
    if report.get("paired"):
        lines += [
            "",
            "## catstream against each baseline, offer by offer",
            "",
            "Only the offers on which the two disagree tell them apart; the p-value is the exact McNemar "
            "test, the interval bounds the accuracy difference given that many disagreements. Both take "
            "the offers as independent; the colour variants of one product are not, so the test is "
            "repeated with the product (title group) as the unit: the groups in which one system is right "
            "on more offers than the other, the exact sign test between the two counts, and an interval "
            "on the difference from resampling whole products.",
            "",
            "| baseline | right by catstream only | right by the baseline only | difference | "
            f"{_level(report)} interval | p-value | products better by catstream / by the baseline | "
            f"p-value by product | {_level(report)} interval by product |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, paired in report["paired"].items():
            by_group = paired.get("by_group")
            lines.append(
                f"| {name} | {paired['only_this']} | {paired['only_other']} | "
                f"{100 * paired['difference']:+.2f} points | {points_interval(paired['difference_interval'])} | "
                f"{paired['p_value']:.2g} | "
                + (
                    f"{by_group['groups_this']} / {by_group['groups_other']} | {by_group['p_value']:.2g} | "
                    f"{points_interval(by_group.get('difference_interval'))} |"
                    if by_group
                    else "– | – | – |"
                )
            )
    if "per_month" in model:
        months = list(model["per_month"])
        lines += [
            "",
            "## Accuracy per listing month",
            "",
            "| system | " + " | ".join(months) + " |",
            "|---|" + "---|" * len(months),
        ]
        lines.append("| offers | " + " | ".join(str(model["per_month"][m]["offers"]) for m in months) + " |")
        for name, result in results.items():
            lines.append(f"| {name} | " + " | ".join(_pct(result["per_month"][m]["accuracy"]) for m in months) + " |")
        lines += _embed(figures, "accuracy_by_month.png")
    parents = model.get("at_threshold", {}).get("parents")
    if parents and parents["uncertain"]:
        lines += [
            "",
            "## Uncertain offers filed under a parent category (catstream)",
            "",
            f"Of the {parents['uncertain']} offers left uncertain, {parents['offers']} have a parent category "
            f"(the sum over its leaves) at or above {_parent_threshold(parents)}; the offer's category lies "
            f"under that parent on {_pct(parents['precision'])} of them. Filed somewhere, leaf or parent: "
            f"{_pct(parents['coverage_with_parents'])} of all offers.",
            "",
            "| parent depth | offers | category under the parent |",
            "|---|---|---|",
        ]
        lines += [
            f"| {depth} | {row['offers']} | {_pct(row['precision'])} |" for depth, row in parents["by_depth"].items()
        ]
    lines += _operating_points(model.get("operating_points"))
    lines += ["", "## Coverage vs precision (catstream)", "", "| coverage | threshold | precision |", "|---|---|---|"]
    lines += [
        f"| {_pct(p['coverage'])} | {p['threshold']:.3f} | {_pct(p['precision'])} |" for p in model["coverage_curve"]
    ]
    lines += _embed(figures, "coverage_precision.png")
    if "reliability.png" in figures:
        lines += ["", "How often an answer of a given served confidence is right (on the diagonal: calibrated)."]
        lines += _embed(figures, "reliability.png")
    lines += ["", "## Most confused category pairs (catstream)", "", "| true | predicted | offers |", "|---|---|---|"]
    lines += [f"| {p['true']} | {p['predicted']} | {p['count']} |" for p in model["confused_pairs"]]
    lines += _embed(figures, "confusions.png")
    lines += [
        "",
        "## Per category (catstream, worst F1 first)",
        "",
        "| category | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['category']} | {_pct(c['precision'])} | {_pct(c['recall'])} | {c['f1']:.4f} | {c['support']} |"
        for c in model["per_category"]
    ]
    return "\n".join(lines) + "\n"
