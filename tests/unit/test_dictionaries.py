from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.dictionaries import Dictionaries, DictionaryError
from core.text import normalize_text

REPO_DICTIONARIES = Path(__file__).resolve().parents[2] / "dictionaries"
LABELS = ("Women > Clothing > Dresses", "Men > Clothing > Shirts", "Kids > Clothing > Dresses", "Food > Snacks")


@pytest.fixture(scope="module")
def dictionaries():
    return Dictionaries.load(REPO_DICTIONARIES)


def test_ambiguous_terms_are_removed_as_whole_words(dictionaries):
    assert dictionaries.strip_ambiguous("Aurora 여성 원피스 무료배송") == "aurora 여성 원피스"
    assert dictionaries.strip_ambiguous("Best dress FREE SHIPPING!") == "dress"
    # a substring of a word is not a term
    assert dictionaries.strip_ambiguous("bestseller dress") == "bestseller dress"


def test_exclusion_mask_rules_out_whole_branches(dictionaries):
    mask = dictionaries.exclusion_mask("Mirae womens black dress", LABELS)
    assert mask.tolist() == [False, True, True, False]
    mask = dictionaries.exclusion_mask("Dasol 키즈 드레스", LABELS)
    assert mask.tolist() == [True, True, False, False]
    assert not dictionaries.exclusion_mask("chocolate bar", LABELS).any()


def test_exclusion_keyword_is_a_word_not_a_substring(dictionaries):
    # "men" must not fire inside "women"
    mask = dictionaries.exclusion_mask("women dress", LABELS)
    assert not mask[0]


def test_malformed_file_names_the_line(tmp_path):
    (tmp_path / "category_exclusions.tsv").write_text("keyword\texcluded_category\nonlyone\n")
    with pytest.raises(DictionaryError, match=":2"):
        Dictionaries.load(tmp_path)


def test_missing_files_mean_empty_dictionaries(tmp_path):
    empty = Dictionaries.load(tmp_path)
    assert empty.strip_ambiguous("A b") == "a b"
    assert not empty.exclusion_mask("women", LABELS).any()


@given(st.text(max_size=80))
def test_filtering_never_adds_words(text):
    dictionaries = Dictionaries.load(REPO_DICTIONARIES)
    kept = dictionaries.strip_ambiguous(text).split()
    original = normalize_text(text).split()
    assert len(kept) <= len(original)
    assert all(word in original for word in kept)


@given(st.text(max_size=80))
def test_mask_has_one_entry_per_label(text):
    mask = Dictionaries.load(REPO_DICTIONARIES).exclusion_mask(text, LABELS)
    assert mask.shape == (len(LABELS),) and mask.dtype == np.bool_
