"""What every benchmark writes: its report as JSON in bench/results/, stamped with the time and the machine."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from training.machine import describe_machine  # the scripts put the repository on sys.path first


def record(benchmark: str, report: dict, out_dir: Path) -> Path:
    """Write ``report`` (with ``benchmark``, ``when`` and ``machine`` put first) to a new file in ``out_dir``."""
    now = dt.datetime.now(dt.UTC)
    stamped = {
        "benchmark": benchmark,
        "when": now.isoformat(timespec="seconds"),
        "machine": describe_machine(),
        **report,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{benchmark}-{now:%Y%m%dT%H%M%S}.json"
    # numpy scalars (a verdict's bool, a percentile) are written as the Python values they hold
    path.write_text(
        json.dumps(stamped, indent=2, default=lambda value: value.item() if hasattr(value, "item") else str(value))
    )
    return path
