"""Human-edited keyword dictionaries (``dictionaries/*.tsv``).

* ``ambiguous_terms.tsv`` — words or phrases removed from titles before tokenization, because
  they say nothing reliable about the category (preprocess applies it).
* ``category_exclusions.tsv`` — a keyword in the title rules out a category (or a whole branch,
  given as a path prefix): inference masks those categories, training drops examples whose label
  the title contradicts.

The format is documented in ``dictionaries/README.md``.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.text import words

__all__ = [
    "AMBIGUOUS_TERMS_FILE",
    "CATEGORY_EXCLUSIONS_FILE",
    "PATH_SEPARATOR",
    "Dictionaries",
    "DictionaryError",
    "ExclusionRule",
]

AMBIGUOUS_TERMS_FILE = "ambiguous_terms.tsv"
CATEGORY_EXCLUSIONS_FILE = "category_exclusions.tsv"
PATH_SEPARATOR = " > "


class DictionaryError(ValueError):
    """A dictionary file is malformed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class ExclusionRule:
    """A title containing ``keyword`` cannot belong under ``excluded`` (a category path prefix)."""

    keyword: tuple[str, ...]
    excluded: tuple[str, ...]


@dataclass(frozen=True)
class Dictionaries:
    """The loaded dictionaries; pure functions over titles and category paths."""

    ambiguous_terms: tuple[tuple[str, ...], ...] = ()
    exclusions: tuple[ExclusionRule, ...] = ()

    @classmethod
    def load(cls, directory: str | Path) -> Dictionaries:
        """Read both TSV files from ``directory``; a missing file means an empty dictionary."""
        directory = Path(directory)
        terms = tuple(_phrase(row[0], where) for row, where in _rows(directory / AMBIGUOUS_TERMS_FILE, min_columns=1))
        rules = []
        for row, where in _rows(directory / CATEGORY_EXCLUSIONS_FILE, min_columns=2):
            excluded = tuple(part.strip() for part in row[1].split(">") if part.strip())
            if not excluded:
                raise DictionaryError(f"{where}: empty excluded category")
            rules.append(ExclusionRule(keyword=_phrase(row[0], where), excluded=excluded))
        return cls(ambiguous_terms=terms, exclusions=tuple(rules))

    def strip_ambiguous(self, text: str) -> str:
        """Normalised ``text`` without the ambiguous terms (whole words/phrases only)."""
        tokens = words(text)
        if not self.ambiguous_terms or not tokens:
            return " ".join(tokens)
        keep = [True] * len(tokens)
        for phrase in self.ambiguous_terms:
            n = len(phrase)
            for start in range(len(tokens) - n + 1):
                if tuple(tokens[start : start + n]) == phrase:
                    keep[start : start + n] = [False] * n
        return " ".join(token for token, kept in zip(tokens, keep, strict=True) if kept)

    def matching_rules(self, title: str) -> list[ExclusionRule]:
        """The exclusion rules whose keyword occurs in ``title``."""
        tokens = words(title)
        joined = f" {' '.join(tokens)} "
        return [rule for rule in self.exclusions if f" {' '.join(rule.keyword)} " in joined]

    def exclusion_mask(self, title: str, labels: Sequence[str]) -> np.ndarray:
        """``(K,)`` bool: True where ``labels[k]`` is ruled out by a keyword of ``title``."""
        mask = np.zeros(len(labels), dtype=bool)
        for rule in self.matching_rules(title):
            mask |= _excluded_by(rule.excluded, tuple(labels))
        return mask


@functools.lru_cache(maxsize=4096)
def _excluded_by(prefix: tuple[str, ...], labels: tuple[str, ...]) -> np.ndarray:
    """``(K,)`` bool: which labels lie under the path ``prefix`` (cached: labels never change)."""
    paths = [tuple(part.strip() for part in label.split(">")) for label in labels]
    mask = np.array([path[: len(prefix)] == prefix for path in paths], dtype=bool)
    mask.flags.writeable = False
    return mask


def _phrase(cell: str, where: str) -> tuple[str, ...]:
    phrase = tuple(words(cell))
    if not phrase:
        raise DictionaryError(f"{where}: empty keyword")
    return phrase


def _rows(path: Path, *, min_columns: int):
    if not path.exists():
        return
    with path.open(encoding="utf-8", newline="") as handle:
        first = True
        for number, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if first and row[0].strip().lower() in {"term", "keyword"}:
                first = False
                continue  # header (the first line that is not a comment)
            first = False
            if len(row) < min_columns:
                raise DictionaryError(f"{path}:{number}: expected {min_columns} tab-separated columns")
            yield row, f"{path}:{number}"
