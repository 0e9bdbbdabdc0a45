import numpy as np
from sklearn.linear_model import LogisticRegression

from training.cleaning import find_issues, out_of_sample_probabilities


def test_cleaning_finds_planted_label_errors():
    rng = np.random.default_rng(0)
    n, k = 3000, 6
    centres = rng.normal(0, 4, (k, 8))
    truth = rng.integers(0, k, n)
    x = centres[truth] + rng.normal(0, 1, (n, 8))
    given = truth.copy()
    flipped = rng.choice(n, 150, replace=False)
    given[flipped] = (truth[flipped] + rng.integers(1, k, 150)) % k

    def fit_predict(fit_rows, predict_rows):
        model = LogisticRegression(max_iter=500).fit(x[fit_rows], given[fit_rows])
        return model.predict_proba(x[predict_rows])

    probabilities = out_of_sample_probabilities(fit_predict, n, given, folds=4, seed=0)
    issues = find_issues(given, probabilities)
    found = set(issues.rows.tolist())
    planted = set(flipped.tolist())
    recall = len(found & planted) / len(planted)
    precision = len(found & planted) / max(1, len(found))
    assert recall >= 0.9 and precision >= 0.8, (recall, precision)
    # the suggestion for a planted error is the true class
    hits = [i for i, row in enumerate(issues.rows) if row in planted]
    assert np.mean(issues.suggested[hits] == truth[issues.rows[hits]]) >= 0.9
