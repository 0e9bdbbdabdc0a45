"""Text normalisation shared by training and serving, so both see identical strings."""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize_text", "words"]

# Words are runs of letters/digits (Hangul included); everything else separates them.
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def normalize_text(text: str) -> str:
    """NFKC, lower-case, punctuation to spaces, whitespace collapsed."""
    return " ".join(words(text))


def words(text: str) -> list[str]:
    """The normalised words of ``text`` in order."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())
