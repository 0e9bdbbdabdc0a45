"""Human-edited keyword data (``README.md`` in this folder), shipped inside the catstream package
so that an installed catstream finds it as a source checkout does."""

from pathlib import Path

__all__ = ["DEFAULT_DIRECTORY"]

# The directory of the shipped files; training copies them into every bundle it writes.
DEFAULT_DIRECTORY = Path(__file__).resolve().parent
