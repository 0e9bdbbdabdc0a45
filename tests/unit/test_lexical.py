import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer

from core.lexical import LexicalModel
from training.lexical import choose_lexical_weight, fit_lexical

TITLES = [
    "Nike Men Blue Running Shoes",
    "Puma Women Pink Sports Shoes",
    "Nike Men White Tshirt",
    "Roadster Women Black Top",
    "Nike Men Black Running Shoes",
    "Puma Men Grey Tshirt",
    "Roadster Women Blue Top",
    "Puma Women White Sports Shoes",
]
MALLS = ["Shoes,Sale", "Shoes", "Tshirts", "", "Shoes,Sale", "Tshirts,Casual Wear", "Tops", "Shoes"]
TARGETS = np.array([0, 0, 1, 2, 0, 1, 2, 0])


def test_features_are_scikit_learn_tfidf_of_each_field_side_by_side():
    model = fit_lexical(TITLES, MALLS, TARGETS, num_classes=3)
    expected = []
    for analyzer, ngrams, min_df, texts in (
        ("word", (1, 2), 1, TITLES),
        ("char_wb", (2, 5), 2, TITLES),
        ("word", (1, 2), 1, MALLS),
        ("char_wb", (2, 5), 2, MALLS),
    ):
        expected.append(
            TfidfVectorizer(analyzer=analyzer, ngram_range=ngrams, min_df=min_df, sublinear_tf=True).fit_transform(
                texts
            )
        )
    expected = sparse.hstack(expected).toarray()
    # scikit-learn orders each vocabulary alphabetically, as the stored terms are
    np.testing.assert_allclose(model.features(TITLES, MALLS).toarray(), expected, atol=1e-6)


_FITTED = fit_lexical(TITLES, MALLS, TARGETS, num_classes=3)
_REFERENCE = [field.vectorizer() for field in _FITTED.fields]
# Words of the fitted vocabulary in any case, with other letters, digits and all kinds of whitespace.
_texts = st.lists(
    st.sampled_from([w for t in TITLES for w in t.split()] + ["NIKE", "shoes", "Ünïcode", "ß", "İ", "42"])
    | st.text(max_size=6),
    max_size=12,
).flatmap(
    lambda words: st.lists(
        st.sampled_from([" ", "  ", "\t", "\n", "\u00a0", "-"]), min_size=len(words), max_size=len(words)
    ).map(lambda gaps: "".join(w + g for w, g in zip(words, gaps, strict=True)))
)


@settings(max_examples=200, deadline=None)
@given(_texts)
def test_one_text_cut_with_the_word_cache_is_exactly_scikit_learns_tfidf_row(text):
    for field, vectorizer in zip(_FITTED.fields, _REFERENCE, strict=True):
        for _ in range(2):  # the second time every word comes from the cache
            columns, values = field.columns(text)
            row = np.zeros(len(field.terms))
            row[columns] = values
            np.testing.assert_allclose(row, vectorizer.transform([text]).toarray()[0], atol=1e-12)


def test_one_offer_scores_equal_the_batch_scores_and_the_mall_weight_scales_the_mall_fields():
    model = fit_lexical(TITLES, MALLS, TARGETS, num_classes=3).reweighted(2.0)
    trust = np.array([1.0, 0.0, 0.5, 1.0, 0.3, 1.0, 0.0, 1.0], dtype=np.float32)
    batch = model.scores(TITLES, MALLS, trust)
    single = np.stack([model.score(t, m, w) for t, m, w in zip(TITLES, MALLS, trust, strict=True)])
    np.testing.assert_allclose(single, batch, atol=1e-5)
    without_mall = model.scores(TITLES, [""] * len(TITLES))
    np.testing.assert_allclose(batch[1], without_mall[1], atol=1e-6)  # trust 0 = no mall category
    assert not np.allclose(batch[0], without_mall[0])


def test_remembered_mall_category_scores_are_the_scores_computed_anew_at_every_trust():
    cached = fit_lexical(TITLES, MALLS, TARGETS, num_classes=3)
    uncached = LexicalModel(cached.fields, cached.coef, cached.intercept, mall_cache=0)
    offers = [
        (t, m, w) for w in (1.0, 0.4, 0.0, 2.0) for t, m in zip(TITLES, MALLS, strict=True)
    ]  # every mall seen again
    for title, mall, trust in offers:
        np.testing.assert_allclose(cached.score(title, mall, trust), uncached.score(title, mall, trust), atol=1e-6)
    distinct = len({m for m in MALLS if m})
    assert cached._mall_scores.cache_info().currsize == distinct
    assert cached._mall_scores.cache_info().hits > 0


def test_fitted_model_separates_its_training_offers_and_never_proposes_an_absent_category():
    model = fit_lexical(TITLES, MALLS, TARGETS, num_classes=4)
    scores = model.scores(TITLES, MALLS)
    assert (scores.argmax(1) == TARGETS).all()
    assert (scores[:, 3] < scores[:, :3].min(1)).all()
    unseen = model.scores(["qzxq"], [""])  # no known term: the intercepts alone
    np.testing.assert_allclose(unseen[0], model.intercept)


def test_save_and_load_round_trip_and_reweighting(tmp_path):
    model = fit_lexical(TITLES, MALLS, TARGETS, num_classes=3).reweighted(1.5)
    loaded = LexicalModel.load(model.save(tmp_path / "lexical"))
    assert loaded.weight == 1.5
    np.testing.assert_allclose(loaded.scores(TITLES, MALLS), model.scores(TITLES, MALLS), atol=1e-6)
    np.testing.assert_allclose(
        loaded.reweighted(3.0).scores(TITLES, MALLS), 2 * model.scores(TITLES, MALLS), rtol=1e-5, atol=1e-6
    )


def test_a_category_absent_from_two_class_training_data_still_gets_symmetric_scores():
    model = fit_lexical(TITLES[:3], MALLS[:3], np.array([0, 0, 1]), num_classes=3)
    scores = model.scores(TITLES[:3], MALLS[:3])
    assert scores.argmax(1).tolist() == [0, 0, 1]
    np.testing.assert_allclose(scores[:, 0], -scores[:, 1], atol=1e-6)


def test_weight_is_the_one_that_fixes_the_planted_errors_and_ties_go_to_the_smaller():
    targets = np.array([0, 1, 2, 0])
    logits = np.array([[2.0, 0, 0], [0, 2.0, 0], [2.0, 0, 1.0], [0, 1.0, 0]])  # rows 2 and 3 wrong
    scores = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.5], [0.6, 0, 0]])
    weight, accuracy = choose_lexical_weight(logits, scores, targets, weights=(0.0, 1.0, 2.0, 4.0))
    assert accuracy[0.0] == 0.5
    assert weight == 2.0 and accuracy[2.0] == 1.0 and accuracy[4.0] == 1.0
    masked, _ = choose_lexical_weight(
        logits,
        scores,
        targets,
        weights=(0.0, 1.0),
        exclusion=np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]], bool),
    )
    assert masked == 0.0  # the mask alone fixes both rows


def test_no_terms_at_all_is_a_clear_error():
    with pytest.raises(ValueError, match="no terms"):
        fit_lexical(["", "!"], ["", ""], np.array([0, 1]), num_classes=2)
