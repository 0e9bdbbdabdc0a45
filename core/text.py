"""Text normalisation shared by training and serving, so both see identical strings."""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
import zlib

import numpy as np

__all__ = [
    "CHAR_NGRAM_SIZES",
    "COLOUR_WORDS",
    "char_ngram_ids",
    "forget_remembered_grams",
    "normalize_text",
    "product_key",
    "product_words",
    "words",
]

CHAR_NGRAM_SIZES = (2, 5)  # smallest and largest n, as the character baseline's 2-5 grams
WORD_GRAM_CACHE = 1 << 15  # distinct (word, buckets) whose gram ids are remembered: a few MB at most

# Words are runs of letters/digits (Hangul included); everything else separates them.
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def normalize_text(text: str) -> str:
    """NFKC, lower-case, punctuation to spaces, whitespace collapsed."""
    return " ".join(words(text))


def words(text: str) -> list[str]:
    """The normalised words of ``text`` in order."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


# Dropped from titles to name a product: its colour variants are one product. A word missing here
# only leaves some colour variants apart (a milder split, a duplicate not excluded), it never
# merges different products.
COLOUR_WORDS = frozenset(
    [
        "aqua",
        "beige",
        "black",
        "blue",
        "bronze",
        "brown",
        "burgundy",
        "charcoal",
        "coffee",
        "copper",
        "coral",
        "cream",
        "fluorescent",
        "fuchsia",
        "gold",
        "golden",
        "green",
        "grey",
        "gray",
        "indigo",
        "ivory",
        "khaki",
        "lavender",
        "lemon",
        "lilac",
        "lime",
        "magenta",
        "maroon",
        "mauve",
        "melange",
        "metallic",
        "multi",
        "multicolor",
        "multicolour",
        "multicoloured",
        "mushroom",
        "mustard",
        "navy",
        "neon",
        "nude",
        "off",
        "olive",
        "orange",
        "peach",
        "pink",
        "plum",
        "purple",
        "red",
        "rose",
        "rust",
        "sea",
        "silver",
        "skin",
        "steel",
        "tan",
        "taupe",
        "teal",
        "turquoise",
        "violet",
        "white",
        "wine",
        "yellow",
        "light",
        "dark",
    ]
)


def product_words(title: str) -> str:
    """The normalised words of ``title`` without colour words: what the colour variants and the
    repeated listings of one product share ("Rocia Women Black Flats" -> "rocia women flats")."""
    return " ".join(word for word in words(title) if word not in COLOUR_WORDS)


def product_key(title: str) -> str | None:
    """A short stable key of the product a title names (32 hex digits of BLAKE2b over
    :func:`product_words`), or None when no word is left. Predictions carry it so similar-product
    search can leave out other listings of the query's own product."""
    kept = product_words(title)
    return hashlib.blake2b(kept.encode("utf-8"), digest_size=16).hexdigest() if kept else None


def char_ngram_ids(normalized_text: str, buckets: int, length: int) -> np.ndarray:
    """``(length,)`` int64 ids in ``1..buckets`` of the character n-grams of each word, 0 = padding.

    Each word is wrapped as ``<word>`` so prefixes and suffixes have their own grams (fastText's
    scheme). Hashing is CRC-32 of the UTF-8 bytes: stable across processes and Python versions,
    so training and the workers agree. Grams past ``length`` are dropped (titles are short: on the
    Myntra data 99.9% of titles have at most 220). Titles reuse a small set of words, so each
    distinct word's ids are computed once and remembered (a bounded cache).
    """
    out = np.zeros(length, dtype=np.int64)
    filled = 0
    for word in normalized_text.split():
        if filled == length:
            break
        ids = _word_gram_ids(word, buckets)
        taken = min(len(ids), length - filled)
        out[filled : filled + taken] = ids[:taken]
        filled += taken
    return out


def forget_remembered_grams() -> None:
    """Empty the per-word cache of :func:`char_ngram_ids` (benchmarks measure the path without it)."""
    _word_gram_ids.cache_clear()


@functools.lru_cache(maxsize=WORD_GRAM_CACHE)
def _word_gram_ids(word: str, buckets: int) -> np.ndarray:
    """Read-only ``(G,)`` int64 ids of ``<word>``'s grams: n ascending, then position."""
    token = f"<{word}>"
    smallest, largest = CHAR_NGRAM_SIZES
    ids = np.fromiter(
        (
            zlib.crc32(token[start : start + n].encode()) % buckets + 1
            for n in range(smallest, largest + 1)
            for start in range(len(token) - n + 1)
        ),
        dtype=np.int64,
    )
    ids.flags.writeable = False
    return ids
