"""Reference tables of the docs, generated from the code so that they cannot drift from it: the
settings (``core.settings.Settings``), the training options (``training.options.TrainOptions``)
and the Prometheus metrics (``catstream.health``).

Each table sits in its docs page between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``.
``python -m catstream.reference`` rewrites them; ``--check`` exits 1 when a page is out of date
(the test suite checks the same).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from catstream.health import INFERENCE_METRICS, NODE_METRICS, WORKER_METRICS
from catstream.options_cli import options_table
from core.settings import ENV_PREFIX, Settings

__all__ = ["TABLES", "metrics_table", "settings_table", "update_docs"]

DOCS = Path(__file__).resolve().parents[1] / "docs"


def settings_table() -> str:
    """Every setting: environment variable, default, meaning."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else f"`{default}`"
        lines.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(lines) + "\n"


def metrics_table() -> str:
    """Every metric of ``/metrics``: name, type, labels, meaning."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for metric_name, kind, help_text in WORKER_METRICS.values():
        lines.append(f"| `{metric_name}` | {kind} | `worker` | {help_text} |")
    for metric_name, kind, help_text in INFERENCE_METRICS.values():
        lines.append(f"| `{metric_name}` | {kind} | | {help_text} |")
    for metric_name, kind, labels, help_text in NODE_METRICS:
        lines.append(f"| `{metric_name}` | {kind} | {f'`{labels}`' if labels else ''} | {help_text} |")
    return "\n".join(lines) + "\n"


TABLES: dict[str, tuple[str, Callable[[], str]]] = {
    "settings": ("operations/configuration.md", settings_table),
    "training-options": ("training.md", options_table),
    "metrics": ("operations/health-and-metrics.md", metrics_table),
}


def update_docs(docs: Path = DOCS, *, check: bool = False) -> list[str]:
    """Rewrite every generated table in ``docs``; returns the names of those that changed (with
    ``check``, nothing is written). A page without its markers is an error."""
    changed = []
    for name, (page, render) in TABLES.items():
        path = docs / page
        text = path.read_text(encoding="utf-8")
        pattern = re.compile(rf"(<!-- generated: {re.escape(name)} -->\n)(.*?)(<!-- end generated -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{path} lacks the markers of the generated table {name!r}")
        updated = pattern.sub(lambda match, render=render: match[1] + render() + match[3], text)
        if updated != text:
            changed.append(name)
            if not check:
                path.write_text(updated, encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m catstream.reference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if a table is out of date")
    args = parser.parse_args(argv)
    changed = update_docs(check=args.check)
    for name in changed:
        page = TABLES[name][0]
        print(f"docs/{page}: table {name!r} {'is out of date' if args.check else 'rewritten'}")
    return 1 if changed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
