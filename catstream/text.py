"""Text normalisation shared by training and serving, so both see identical strings."""

from __future__ import annotations

import re
import unicodedata
import zlib

import numpy as np

__all__ = ["CHAR_NGRAM_SIZES", "char_ngram_ids", "normalize_text", "words"]

CHAR_NGRAM_SIZES = (2, 5)  # smallest and largest n, as the character baseline's 2-5 grams

# Words are runs of letters/digits (Hangul included); everything else separates them.
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def normalize_text(text: str) -> str:
    """NFKC, lower-case, punctuation to spaces, whitespace collapsed."""
    return " ".join(words(text))


def words(text: str) -> list[str]:
    """The normalised words of ``text`` in order."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def char_ngram_ids(normalized_text: str, buckets: int, length: int) -> np.ndarray:
    """``(length,)`` int64 ids in ``1..buckets`` of the character n-grams of each word, 0 = padding.

    Each word is wrapped as ``<word>`` so prefixes and suffixes have their own grams (fastText's
    scheme). Hashing is CRC-32 of the UTF-8 bytes: stable across processes and Python versions,
    so training and the workers agree. Grams past ``length`` are dropped (titles are short: on the
    Myntra data 99.9% of titles have at most 220).
    """
    out = np.zeros(length, dtype=np.int64)
    smallest, largest = CHAR_NGRAM_SIZES
    i = 0
    for word in normalized_text.split():
        token = f"<{word}>"
        for n in range(smallest, largest + 1):
            for start in range(len(token) - n + 1):
                if i == length:
                    return out
                out[i] = zlib.crc32(token[start : start + n].encode()) % buckets + 1
                i += 1
    return out
