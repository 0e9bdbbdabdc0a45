"""Mine candidate exclusion rules (keyword → excluded category) from labeled offers, for review.

A word that occurs in many titles but (almost) never under a category branch where chance would
put dozens of them is evidence that the word rules that branch out. Candidates are written in
the ``category_exclusions.tsv`` format with their evidence; a person deletes the wrong ones and
the kept lines go into ``dictionaries/``. Nothing mined is used unreviewed.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core.dictionaries import PATH_SEPARATOR, Dictionaries, ExclusionRule
from core.text import words

__all__ = ["ExclusionCandidate", "contradicted_rules", "mine_exclusions", "write_candidates"]


@dataclass(frozen=True)
class ExclusionCandidate:
    keyword: str
    excluded: str  # category path prefix
    offers_with_keyword: int
    violations: int  # offers with the keyword that are labelled under ``excluded``
    expected: float  # violations expected if the keyword said nothing about the branch
    examples: tuple[str, ...]  # titles of the violating offers

    @property
    def evidence(self) -> float:
        return self.expected - self.violations


def mine_exclusions(
    titles: pd.Series,
    labels: pd.Series,
    *,
    max_depth: int = 1,
    min_support: int = 30,
    min_expected: float = 10.0,
    max_violation_rate: float = 0.005,
    known: Dictionaries | None = None,
) -> list[ExclusionCandidate]:
    """Candidates, strongest evidence first.

    ``max_depth`` is the deepest path level a rule may exclude (1 = top-level branches, such as
    the gender of a fashion taxonomy). A rule is kept only if no shorter prefix already covers
    it, and rules already in ``known`` are skipped.
    """
    token_sets = [frozenset(words(title)) for title in titles]
    paths = [tuple(part.strip() for part in label.split(">")) for label in labels]
    n = len(paths)
    support = Counter(token for tokens in token_sets for token in tokens)
    keywords = [token for token, count in support.items() if count >= min_support and not token.isdigit()]
    known_pairs = {
        (" ".join(rule.keyword), PATH_SEPARATOR.join(rule.excluded)) for rule in (known.exclusions if known else ())
    }
    candidates = []
    for depth in range(1, max_depth + 1):
        branch_rows: dict[tuple[str, ...], list[int]] = {}
        for i, path in enumerate(paths):
            if len(path) >= depth:
                branch_rows.setdefault(path[:depth], []).append(i)
        for prefix, rows in branch_rows.items():
            in_branch = Counter(token for i in rows for token in token_sets[i])
            share = len(rows) / n
            excluded = PATH_SEPARATOR.join(prefix)
            for keyword in keywords:
                expected = support[keyword] * share
                violations = in_branch[keyword]
                if expected < min_expected or violations > max_violation_rate * support[keyword]:
                    continue
                covered = any(
                    c.keyword == keyword and excluded.startswith(c.excluded + PATH_SEPARATOR) for c in candidates
                )
                if covered or (keyword, excluded) in known_pairs:
                    continue
                examples = tuple(titles.iloc[i] for i in rows if keyword in token_sets[i])[:3]
                candidates.append(
                    ExclusionCandidate(
                        keyword=keyword,
                        excluded=excluded,
                        offers_with_keyword=support[keyword],
                        violations=violations,
                        expected=round(expected, 1),
                        examples=examples,
                    )
                )
    return sorted(candidates, key=lambda c: -c.evidence)


def contradicted_rules(
    titles: pd.Series, labels: pd.Series, dictionaries: Dictionaries, *, max_violation_rate: float = 0.005
) -> list[ExclusionCandidate]:
    """Rules already in ``dictionaries`` that the labeled data contradicts more often than allowed.

    Each such rule masks the labelled category of its violating offers at inference and drops
    them from training; a reviewer should confirm the labels are wrong, or delete the rule.
    """
    paths = [tuple(part.strip() for part in label.split(">")) for label in labels]
    matches: dict[ExclusionRule, list[int]] = {}
    for i, title in enumerate(titles):
        for rule in dictionaries.matching_rules(title):
            matches.setdefault(rule, []).append(i)
    found = []
    for rule, with_keyword in matches.items():
        violating = [i for i in with_keyword if paths[i][: len(rule.excluded)] == rule.excluded]
        if len(violating) > max_violation_rate * len(with_keyword):
            found.append(
                ExclusionCandidate(
                    keyword=" ".join(rule.keyword),
                    excluded=PATH_SEPARATOR.join(rule.excluded),
                    offers_with_keyword=len(with_keyword),
                    violations=len(violating),
                    expected=float("nan"),
                    examples=tuple(titles.iloc[i] for i in violating[:3]),
                )
            )
    return sorted(found, key=lambda c: -c.violations)


def write_candidates(candidates: list[ExclusionCandidate], path: str | Path) -> Path:
    """Write ``candidates`` as a ``category_exclusions.tsv`` file with evidence columns after the rule."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        handle.write("# Mined candidates: review each line, delete the wrong ones, then merge into dictionaries/.\n")
        writer.writerow(
            [
                "keyword",
                "excluded_category",
                "note",
                "offers_with_keyword",
                "violations",
                "expected_if_unrelated",
                "violating_titles",
            ]
        )
        for c in candidates:
            note = (
                f"mined: {c.violations} of {c.offers_with_keyword} offers under it, {c.expected:g} expected by chance"
            )
            writer.writerow(
                [
                    c.keyword,
                    c.excluded,
                    note,
                    c.offers_with_keyword,
                    c.violations,
                    c.expected,
                    " | ".join(t.replace("\t", " ") for t in c.examples),
                ]
            )
    return path
