"""Progress bars for the long steps of training, evaluation and audits."""

from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(*args, **kwargs) -> tqdm:
    """A tqdm bar that redraws at most every 10 s when stderr is not a terminal (CI, log files)."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 10.0)
    return tqdm(*args, **kwargs)
