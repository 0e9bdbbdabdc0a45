import zlib

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from core.text import CHAR_NGRAM_SIZES, char_ngram_ids, normalize_text, product_key, product_words


def test_grams_are_the_bounded_words_character_ngrams_hashed_by_crc32():
    ids = char_ngram_ids("flip", 1000, 20)
    token = "<flip>"
    smallest, largest = CHAR_NGRAM_SIZES
    grams = [token[i : i + n] for n in range(smallest, largest + 1) for i in range(len(token) - n + 1)]
    assert ids[: len(grams)].tolist() == [zlib.crc32(g.encode()) % 1000 + 1 for g in grams]
    assert (ids[len(grams) :] == 0).all()


def test_grams_do_not_cross_words_and_are_truncated_to_length():
    assert char_ngram_ids("ab cd", 10**6, 40).tolist()[:8] != char_ngram_ids("abcd", 10**6, 40).tolist()[:8]
    assert (char_ngram_ids("a very long title " * 20, 97, 16) > 0).all()
    assert (char_ngram_ids("", 97, 16) == 0).all()


def test_a_shared_word_gives_shared_grams_whatever_surrounds_it():
    alone = set(char_ngram_ids("sneakers", 50_000, 64).tolist()) - {0}
    in_title = set(char_ngram_ids("nike men white sneakers", 50_000, 128).tolist())
    assert alone <= in_title


def _plain_ids(normalized_text: str, buckets: int, length: int) -> list[int]:
    """The definition, word by word with nothing remembered."""
    smallest, largest = CHAR_NGRAM_SIZES
    ids = [
        zlib.crc32(token[i : i + n].encode()) % buckets + 1
        for token in (f"<{word}>" for word in normalized_text.split())
        for n in range(smallest, largest + 1)
        for i in range(len(token) - n + 1)
    ]
    return (ids + [0] * length)[:length]


@given(
    st.lists(
        st.sampled_from(["nike", "men", "shoes", "a", "ß", "t-shirt", "x" * 30]) | st.text(max_size=8), max_size=12
    ).map(" ".join),
    st.integers(1, 5000),
    st.integers(0, 128),
)
def test_remembered_word_grams_are_the_grams_computed_anew(text, buckets, length):
    normalized = normalize_text(text)
    for _ in range(2):  # the second time every word comes from the cache
        assert char_ngram_ids(normalized, buckets, length).tolist() == _plain_ids(normalized, buckets, length)


@given(st.text(max_size=80), st.integers(1, 5000), st.integers(0, 64))
def test_ids_are_in_range_and_deterministic(text, buckets, length):
    normalized = normalize_text(text)
    ids = char_ngram_ids(normalized, buckets, length)
    assert ids.shape == (length,) and ids.dtype == np.int64
    assert ((ids >= 0) & (ids <= buckets)).all()
    assert (char_ngram_ids(normalized, buckets, length) == ids).all()
    padding = np.flatnonzero(ids == 0)
    assert len(padding) == 0 or (ids[padding[0] :] == 0).all()  # padding only at the end


def test_a_product_key_names_a_product_across_colours_case_and_punctuation():
    assert product_words("Rocia Women Black Flats") == "rocia women flats"
    assert product_key("Rocia Women Black Flats") == product_key("ROCIA women, BEIGE flats!")
    assert product_key("Rocia Women Black Flats") != product_key("Rocia Men Black Flats")
    assert len(product_key("Rocia Women Flats") or "") == 32
    assert product_key("Black Navy") is None and product_key("") is None
