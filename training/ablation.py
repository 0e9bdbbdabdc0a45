"""``catstream ablation``: each ingredient of the model measured by adding it, on held-out offers.

Rows (cumulative, as the design claims them): title only → + mall category → + image →
+ season-balanced history → + label cleaning → + exclusion dictionary → + lexical model;
optionally the full model at other image sizes, without ImageNet weights and without the
character n-grams. Every row is trained and scored here, on the same split and the same test
offers; temperature and threshold are chosen per row on validation data. Each row is compared
offer by offer with the row it builds on (the extra rows with the full model): the exact McNemar
p-value says whether its step is more than the noise of one test set. Scoring uses the PyTorch
model (the ONNX export of the same weights agrees to about 1e-6, see the export parity check).

A full ablation trains seven to ten rows (17-25 minutes on the shared data on 2 cores). Each
finished row is saved under the work directory (``rows/``) with a key over everything that decides
its figures: the row, its resolved options, the labeled offers, the test offers and the machine
(seeded rows reproduce on the same CPU and libraries, not across them). Running the same command
again after an interruption reuses the rows whose key matches and trains the rest; ``fresh=True``
trains all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from core.decision import apply_exclusions, softmax
from training.crossfit import calibrate
from training.data import data_fingerprint
from training.evaluate import parent_answers, points_interval, score
from training.features import Prepared, prepare
from training.fit import fit_model, lexical_scores, predict_logits, training_rows
from training.machine import describe_machine
from training.options import TrainOptions
from training.significance import paired_comparison
from training.splits import title_groups

__all__ = ["ABLATION_ROWS", "ROWS_DIR", "render_ablation", "run_ablation", "score_configuration"]

log = logging.getLogger(__name__)

CLEANED = "cleaned"  # the run's --cleaning mode, or drop when it is off (the default)
ROWS_DIR = "rows"  # under the work directory: one finished row per file, reused by a rerun
# The machine facts that decide a seeded row's figures (the kernel's platform string does not)
_MACHINE_KEYS = ("cpu", "cpu_features", "cpus", "torch_cpu_capability", "torch_threads", "cuda_device", "versions")

ABLATION_ROWS: tuple[tuple[str, dict], ...] = (
    ("title only", dict(inputs=("title",), season_balance=False, cleaning="off", use_exclusions=False, lexical=False)),
    (
        "+ mall category",
        dict(inputs=("title", "mall"), season_balance=False, cleaning="off", use_exclusions=False, lexical=False),
    ),
    (
        "+ image",
        dict(
            inputs=("title", "mall", "image"), season_balance=False, cleaning="off", use_exclusions=False, lexical=False
        ),
    ),
    ("+ season-balanced history", dict(season_balance=True, cleaning="off", use_exclusions=False, lexical=False)),
    ("+ label cleaning", dict(season_balance=True, cleaning=CLEANED, use_exclusions=False, lexical=False)),
    ("+ exclusion dictionary", dict(season_balance=True, cleaning=CLEANED, use_exclusions=True, lexical=False)),
    ("+ lexical model", dict(season_balance=True, cleaning=CLEANED, use_exclusions=True, lexical=True)),
)


def score_configuration(
    prepared: Prepared, options: TrainOptions, *, progress: bool = False
) -> tuple[dict, np.ndarray]:
    """Train ``options`` on ``prepared`` and score it on the test rows (threshold from validation).

    Returns the :func:`~training.evaluate.score` report and which test offers ``(N,)`` it got right.
    """
    started = time.monotonic()
    rows, targets, report = training_rows(prepared, options, progress=progress)
    model, _ = fit_model(
        prepared, options, train_rows=rows, targets=targets, progress=progress, description="ablation row"
    )
    test = prepared.split.test
    lexical, calibration = calibrate(model, prepared, options, train_rows=rows, targets=targets)
    logits = predict_logits(model, prepared, test, inputs=options.inputs)
    if lexical is not None:
        logits = logits + lexical_scores(lexical, prepared, test, inputs=options.inputs)
    probabilities, _ = apply_exclusions(
        softmax(logits, calibration["temperature"]), prepared.exclusion[test] if options.use_exclusions else None
    )
    predicted = probabilities.argmax(1)
    result = score(
        prepared.labels,
        prepared.targets[test],
        predicted,
        confidence=probabilities.max(1),
        threshold=calibration["threshold"],
        listed_at=prepared.frame["listed_at"].iloc[test],
    )
    # Certified: the threshold's precision bound held its target in the fixed sequence; otherwise
    # the row serves the uncorrected choice (see choose_threshold) and the table says so
    result["at_threshold"]["certified"] = bool(calibration["target_reached"])
    result["at_threshold"]["threshold"] = float(calibration["threshold"])
    result["at_threshold"]["parent_threshold"] = calibration["parent_threshold"]
    result["at_threshold"]["parents"] = parent_answers(
        prepared.labels,
        probabilities,
        prepared.targets[test],
        threshold=calibration["threshold"],
        parent_threshold=calibration["parent_threshold"],
    )
    result["training_offers"] = len(rows)
    if "lexical" in calibration:
        result["lexical_weight"] = calibration["lexical"]["weight"]
    result["seconds"] = round(time.monotonic() - started, 1)
    if "cleaning" in report:
        result["cleaning"] = {k: v for k, v in report["cleaning"].items() if k != "examples"}
    return result, predicted == prepared.targets[test]


def run_ablation(
    data: str | Path,
    work_dir: str | Path,
    options: TrainOptions,
    *,
    image_sizes: list[int] = (),
    without_pretrained: bool = False,
    without_char_ngrams: bool = False,
    fresh: bool = False,
    progress: bool = True,
) -> dict:
    """The ablation report (see :func:`render_ablation`).

    Rows finished by an earlier run in ``work_dir`` with the same key are reused (``fresh`` trains
    every row again); the report lists them under ``reused_rows``.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare(data, work_dir, options, progress=progress)
    machine = describe_machine()
    report = {
        "data": str(Path(data).resolve()),
        "protocol": options.split,
        "image_size": options.image_size,
        "test_offers": len(prepared.split.test),
        "categories": len(prepared.labels),
        "machine": machine,
        "rows": [],
        "reused_rows": [],
    }
    checkpoints = _RowCheckpoints(work_dir / ROWS_DIR, prepared, machine, fresh=fresh)
    cleaning = options.cleaning if options.cleaning != "off" else "drop"
    # Rows are also compared product by product: colour variants are right or wrong together
    groups = title_groups(prepared.frame["title"].iloc[prepared.split.test])

    def measure(name: str, variant: TrainOptions, prepare_variant) -> tuple[dict, np.ndarray]:
        """The row's result and which test offers it got right: from its checkpoint, or trained now."""
        if (saved := checkpoints.load(name, variant)) is not None:
            report["reused_rows"].append(name)
            return saved
        result, correct = score_configuration(prepare_variant(), variant, progress=progress)
        checkpoints.save(name, variant, result, correct)
        return result, correct

    previous = None
    for name, overrides in ABLATION_ROWS:
        log.info("ablation row: %s", name)
        if overrides.get("cleaning") == CLEANED:
            overrides = overrides | {"cleaning": cleaning}
        result, correct = measure(name, dataclasses.replace(options, **overrides), lambda: prepared)
        if previous is not None:
            result["paired"] = {"against": previous[0]} | paired_comparison(correct, previous[1], groups=groups)
        report["rows"].append({"row": name} | result)
        log.info("%s: accuracy %.4f, macro-F1 %.4f", name, result["accuracy"], result["macro_f1"])
        previous = name, correct
    full_model = previous
    extra = [
        (f"full model at {size} px", dataclasses.replace(options, image_size=size))
        for size in image_sizes
        if size != options.image_size
    ]
    if without_pretrained:
        extra.append(("full model without ImageNet weights", dataclasses.replace(options, use_pretrained=False)))
    if without_char_ngrams and options.char_buckets:
        extra.append(("full model without character n-grams", dataclasses.replace(options, char_buckets=0)))
    for name, variant in extra:
        log.info("ablation row: %s", name)

        def prepare_variant(name=name, variant=variant) -> Prepared:
            variant_prepared = prepare(data, work_dir / name.replace(" ", "-"), variant, progress=progress)
            if not np.array_equal(
                variant_prepared.frame["offer_id"].iloc[variant_prepared.split.test],
                prepared.frame["offer_id"].iloc[prepared.split.test],
            ):
                raise RuntimeError(f"{name}: the test offers differ from the other rows'; the rows cannot be compared")
            return variant_prepared

        result, correct = measure(name, variant, prepare_variant)
        result["paired"] = {"against": full_model[0]} | paired_comparison(correct, full_model[1], groups=groups)
        report["rows"].append({"row": name} | result)
    return report


class _RowCheckpoints:
    """Finished ablation rows on disk, one JSON file each: the result and which test offers it got right.

    A row is reused only when its key matches: the row's name, its resolved options, the labeled
    offers (:func:`~training.data.data_fingerprint`), the test offers and the machine.
    """

    def __init__(self, directory: Path, prepared: Prepared, machine: dict, *, fresh: bool):
        self.directory = directory
        self.fresh = fresh
        self._common = {
            "data": prepared.report["fingerprint"],
            "test": data_fingerprint(prepared.frame.iloc[prepared.split.test]),
            "test_offers": len(prepared.split.test),
            "machine": {k: machine.get(k) for k in _MACHINE_KEYS},
        }

    def key(self, name: str, options: TrainOptions) -> str:
        spec = self._common | {"row": name, "options": options.to_dict()}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def path(self, name: str) -> Path:
        return self.directory / f"{name.strip('+ ').replace(' ', '-')}.json"

    def load(self, name: str, options: TrainOptions) -> tuple[dict, np.ndarray] | None:
        path = self.path(name)
        if self.fresh or not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())
            correct = np.frombuffer(saved["correct"].encode(), dtype=np.uint8) == ord("1")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning("ablation row '%s': checkpoint %s unreadable (%s); measuring it again", name, path, error)
            return None
        if saved.get("key") != self.key(name, options) or len(correct) != self._common["test_offers"]:
            log.info(
                "ablation row '%s': checkpoint %s was measured with other settings, data or machine; "
                "measuring it again",
                name,
                path,
            )
            return None
        log.info("ablation row '%s': reusing the result finished at %s (%s)", name, saved.get("finished"), path)
        return saved["result"], correct

    def save(self, name: str, options: TrainOptions, result: dict, correct: np.ndarray) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(name)
        record = {
            "row": name,
            "key": self.key(name, options),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "result": result,
            "correct": "".join("1" if right else "0" for right in correct),
        }
        temporary = path.with_suffix(f".{os.getpid()}.tmp")  # a crash mid-write never leaves half a row
        temporary.write_text(json.dumps(record))
        temporary.replace(path)


def render_ablation(report: dict) -> str:
    def pct(value):
        return "–" if value is None or value != value else f"{100 * value:.2f}%"

    notes = []
    if any(row.get("at_threshold", {}).get("certified") is False for row in report["rows"]):
        notes = [
            "",
            "Not certified: no threshold's 95% precision bound reached the target from the start of the "
            "fixed sequence on this row's validation offers; the row serves the lowest threshold whose own "
            "bound passes, uncorrected for the thresholds tried (with none passing, the one with the best "
            "bound).",
        ]
    lines = [
        f"# Ablation ({report['protocol']} split, {report['test_offers']} held-out offers, "
        f"{report['categories']} categories, {report['image_size']} px)",
        "",
        *_machine_line(report.get("machine")),
        "| configuration | accuracy | macro-F1 | coverage at threshold | precision at threshold | "
        "filed, leaf or parent / precision | worst month | training offers | against the row it builds on | p-value | "
        "products better here / there | p by product | interval by product |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        at = row.get("at_threshold", {})
        months = row.get("per_month", {})
        worst = min(months.items(), key=lambda item: item[1]["accuracy"]) if months else None
        worst_text = f"{worst[0]} {pct(worst[1]['accuracy'])}" if worst else "–"
        paired = row.get("paired")
        versus, p_value, products, p_products, interval = "–", "–", "–", "–", "–"
        if paired:
            versus = (
                f"{100 * paired['difference']:+.2f} points ({paired['only_this']} offers right only here, "
                f"{paired['only_other']} only in '{paired['against']}')"
            )
            p_value = f"{paired['p_value']:.2g}"
        if paired and "by_group" in paired:
            by_group = paired["by_group"]
            products = f"{by_group['groups_this']} / {by_group['groups_other']}"
            p_products = f"{by_group['p_value']:.2g}"
            interval = points_interval(by_group.get("difference_interval"))
        parents = at.get("parents")
        with_parents = "–"
        if parents and "precision_with_parents" in parents:
            with_parents = f"{pct(parents['coverage_with_parents'])} / {pct(parents['precision_with_parents'])}"
            if parents.get("threshold") is None:  # the leaf answers alone: no parent threshold held its bound
                with_parents += " (no parent threshold)"
        coverage = pct(at.get("coverage")) + (" (not certified)" if at.get("certified") is False else "")
        lines.append(
            f"| {row['row']} | {pct(row['accuracy'])} | {row['macro_f1']:.4f} | {coverage} | "
            f"{pct(at.get('precision'))} | {with_parents} | {worst_text} | {row['training_offers']} | {versus} | "
            f"{p_value} | "
            f"{products} | {p_products} | {interval} |"
        )
    lines += notes
    if report.get("reused_rows"):
        lines += [
            "",
            "Carried over from an earlier run of the same command in the same work directory (same "
            "settings, data, test offers and machine; the run was interrupted or extended): "
            + ", ".join(f"'{name}'" for name in report["reused_rows"])
            + ".",
        ]
    months = list(report["rows"][0].get("per_month", {}))
    if months:
        lines += [
            "",
            "## Accuracy per listing month",
            "",
            "| configuration | " + " | ".join(months) + " |",
            "|---|" + "---|" * len(months),
        ]
        lines.append(
            "| offers | " + " | ".join(str(report["rows"][0]["per_month"][m]["offers"]) for m in months) + " |"
        )
        for row in report["rows"]:
            lines.append(
                f"| {row['row']} | "
                + " | ".join(pct(row["per_month"].get(m, {}).get("accuracy")) for m in months)
                + " |"
            )
    return "\n".join(lines) + "\n"


def _machine_line(machine: dict | None) -> list[str]:
    """The machine the rows were measured on: seeded rows reproduce to the digit on the same CPU
    and its libraries, not across CPUs (see :mod:`training.machine`)."""
    if not machine:
        return []
    versions = ", ".join(f"{name} {version}" for name, version in machine.get("versions", {}).items())
    features = ", ".join(machine.get("cpu_features", []))
    capability = f"; torch uses {machine['torch_cpu_capability']}" if machine.get("torch_cpu_capability") else ""
    return [
        f"Measured on {machine['cpu']} ({machine['cpus']} cores; {features or 'no vector extensions listed'}"
        f"{capability}); {versions}.",
        "",
    ]


def write_ablation(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(report, indent=1))
    (out_dir / "ablation.md").write_text(render_ablation(report))
    return out_dir / "ablation.json", out_dir / "ablation.md"
