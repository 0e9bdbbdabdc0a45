"""Figures of the evaluation report, drawn from the report's own numbers (``evaluation.json``):
where people would rather look than read. PNG files, written next to ``evaluation.md`` and
embedded in it; matplotlib without a display."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the figures go to files
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["FIGURES", "write_figures"]

# file name → title, in the order the report shows them
FIGURES = {
    "coverage_precision.png": "Coverage against precision",
    "reliability.png": "Reliability",
    "accuracy_by_month.png": "Accuracy per listing month",
    "confusions.png": "Most confused categories",
}
_DPI = 110


def write_figures(report: dict, out_dir: Path) -> list[Path]:
    """Draw every figure the report has the numbers for into ``out_dir``; returns their paths."""
    model = report["results"]["catstream"]
    drawers = {
        "coverage_precision.png": (_coverage_precision, "curves" in model),
        "reliability.png": (_reliability, "curves" in model),
        "accuracy_by_month.png": (_accuracy_by_month, bool(model.get("per_month"))),
        "confusions.png": (_confusions, bool(model.get("confusion", {}).get("categories"))),
    }
    written = []
    for name, (draw, available) in drawers.items():
        if not available:
            continue
        figure = draw(report)
        path = out_dir / name
        figure.savefig(path, dpi=_DPI, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def _coverage_precision(report: dict) -> plt.Figure:
    model = report["results"]["catstream"]
    curve = model["curves"]["coverage_precision"]
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    axes.plot(
        [100 * p["coverage"] for p in curve],
        [100 * p["precision"] for p in curve],
        color="#1f5fa8",
        label="catstream, served",
    )
    at = model.get("at_threshold")
    if at and at["coverage"] > 0:
        axes.scatter(
            [100 * at["coverage"]],
            [100 * at["precision"]],
            color="#c0392b",
            zorder=3,
            label=f"threshold {at['threshold']:.3f}: {100 * at['coverage']:.1f}% at {100 * at['precision']:.2f}%",
        )
    target = report.get("target_precision")
    if target:
        axes.axhline(100 * target, color="#7f8c8d", linestyle="--", linewidth=1, label=f"target {100 * target:.1f}%")
    low = min(100 * p["precision"] for p in curve)
    axes.set_ylim(max(low - 0.5, 0), 100.2)
    axes.set_xlabel("coverage: offers categorised, most confident first (%)")
    axes.set_ylabel("precision of the categorised offers (%)")
    axes.set_title(f"{FIGURES['coverage_precision.png']} ({report['test_offers']} held-out offers)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    return figure


def _reliability(report: dict) -> plt.Figure:
    bins = [b for b in report["results"]["catstream"]["curves"]["reliability"] if b["offers"]]
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    axes.plot([0, 1], [0, 1], color="#7f8c8d", linestyle="--", linewidth=1, label="perfectly calibrated")
    sizes = np.asarray([b["offers"] for b in bins], dtype=float)
    axes.scatter(
        [b["confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        s=20 + 200 * sizes / sizes.max(),
        color="#1f5fa8",
        alpha=0.8,
        label="offers by confidence (area: how many)",
    )
    axes.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], color="#1f5fa8", linewidth=1)
    axes.set_xlabel("served confidence (after temperature and mask)")
    axes.set_ylabel("share right")
    axes.set_xlim(0, 1.01)
    axes.set_ylim(0, 1.01)
    axes.set_title(FIGURES["reliability.png"])
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
    return figure


def _accuracy_by_month(report: dict) -> plt.Figure:
    results = report["results"]
    months = list(results["catstream"]["per_month"])
    figure, axes = plt.subplots(figsize=(7.2, 4.2))
    width = 0.8 / len(results)
    for index, (name, result) in enumerate(results.items()):
        values = [100 * result["per_month"][month]["accuracy"] for month in months]
        axes.bar(np.arange(len(months)) + index * width, values, width=width, label=name)
    axes.set_xticks(np.arange(len(months)) + width * (len(results) - 1) / 2, months)
    counts = [results["catstream"]["per_month"][month]["offers"] for month in months]
    low = min(100 * r["per_month"][m]["accuracy"] for r in results.values() for m in months)
    axes.set_ylim(max(low - 2, 0), 100)
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{FIGURES['accuracy_by_month.png']} ({min(counts)}–{max(counts)} offers a month)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def _confusions(report: dict) -> plt.Figure:
    confusion = report["results"]["catstream"]["confusion"]
    names = confusion["categories"]
    counts = np.asarray(confusion["counts"], dtype=float)
    size = max(4.0, 0.45 * len(names) + 2.5)
    figure, axes = plt.subplots(figsize=(size + 1.5, size))
    image = axes.imshow(counts, cmap="Reds")
    shown = _shortest_unique(names)
    axes.set_xticks(range(len(names)), shown, rotation=60, ha="right", fontsize=7)
    axes.set_yticks(range(len(names)), shown, fontsize=7)
    for (row, column), value in np.ndenumerate(counts):
        if value:
            axes.text(
                column,
                row,
                f"{value:.0f}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if value > counts.max() / 2 else "black",
            )
    axes.set_xlabel("predicted")
    axes.set_ylabel("labeled")
    axes.set_title(f"{FIGURES['confusions.png']} (wrong answers)")
    figure.colorbar(image, ax=axes, fraction=0.04)
    return figure


def _shortest_unique(paths: list[str]) -> list[str]:
    """The category paths cut to their last levels, as few as keep them apart (the rest repeats
    along the axis): "Footwear > Shoes > Flats" unless "Women > …" and "Girls > …" both appear."""
    split = [path.split(" > ") for path in paths]
    for levels in range(1, max((len(parts) for parts in split), default=1) + 1):
        shown = [" > ".join(parts[-levels:]) for parts in split]
        if len(set(shown)) == len(shown):
            return shown
    return list(paths)
