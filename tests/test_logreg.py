"""LogRegProbe against scikit-learn's LogisticRegression on the same standardised features."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from featcache.errors import FeatcacheError
from probes.logreg import LogRegProbe, apply_uncertain

GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _sk(C, **kw):
    return LogisticRegression(C=C, tol=1e-10, max_iter=20000, **kw)


def _scaler(X_train):
    """Reference standardisation, in float64 (scikit-learn keeps float32 inputs in float32)."""
    scaler = StandardScaler().fit(X_train.astype(np.float64))
    return lambda X: scaler.transform(X.astype(np.float64))


@pytest.fixture
def data():
    """Features on very different scales and offsets, 3 labels with 20% missing, split 300/150/200."""
    rng = np.random.default_rng(0)
    D, L = 16, 3
    scale, shift = rng.uniform(0.1, 20.0, D), rng.normal(0, 5, D)
    W = rng.normal(size=(D, L))

    def make(n):
        Z = rng.normal(size=(n, D))
        Y = (Z @ W + 2.5 * rng.normal(size=(n, L)) > 0.5).astype(np.float32)
        return (Z * scale + shift).astype(np.float32), Y

    (Xtr, Ytr), (Xva, Yva), (Xte, Yte) = make(300), make(150), make(200)
    Ytr[rng.random(Ytr.shape) < 0.2] = np.nan
    Yva[rng.random(Yva.shape) < 0.2] = np.nan
    return Xtr, Ytr, Xva, Yva, Xte, Yte


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_fixed_C_matches_sklearn_per_label(data, C):
    Xtr, Ytr, _, _, Xte, Yte = data
    probe = LogRegProbe(C=C, tol=1e-9).fit(Xtr, Ytr)
    z = _scaler(Xtr)
    scores = probe.predict_scores(Xte)
    assert scores.shape == Yte.shape
    for j in range(Ytr.shape[1]):
        known = ~np.isnan(Ytr[:, j])
        ref = _sk(C).fit(z(Xtr[known]), Ytr[known, j])
        np.testing.assert_allclose(probe.coef_[j], ref.coef_[0], atol=1e-4 * np.abs(ref.coef_).max())
        assert probe.intercept_[j] == pytest.approx(ref.intercept_[0], abs=1e-4)
        ref_scores = ref.predict_proba(z(Xte))[:, 1]
        assert abs(roc_auc_score(Yte[:, j], scores[:, j]) - roc_auc_score(Yte[:, j], ref_scores)) <= 1e-3
    np.testing.assert_array_equal(probe.C_, [C] * 3)


def test_multiclass_matches_sklearn_multinomial(data):
    Xtr, _, _, _, Xte, _ = data
    rng = np.random.default_rng(3)
    y = (Xtr[:, 0] > np.median(Xtr[:, 0])).astype(np.int64) + (Xtr[:, 1] > np.median(Xtr[:, 1]))
    y[rng.random(y.size) < 0.1] = -1
    probe = LogRegProbe(C=0.3, task="multiclass", tol=1e-9).fit(Xtr, y)
    z = _scaler(Xtr)
    ref = _sk(0.3).fit(z(Xtr[y >= 0]), y[y >= 0])
    np.testing.assert_allclose(probe.coef_, ref.coef_, atol=1e-4 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(probe.predict_scores(Xte), ref.predict_proba(z(Xte)), atol=1e-5)


def test_C_is_selected_on_validation_auroc_per_label(data):
    Xtr, Ytr, Xva, Yva, Xte, _ = data
    probe = LogRegProbe(C_grid=GRID, tol=1e-8).fit(Xtr, Ytr, X_val=Xva, Y_val=Yva)
    z = _scaler(Xtr)
    for j in range(Ytr.shape[1]):
        known, vknown = ~np.isnan(Ytr[:, j]), ~np.isnan(Yva[:, j])
        val_auc = {}
        for C in GRID:
            ref = _sk(C).fit(z(Xtr[known]), Ytr[known, j])
            val_auc[C] = roc_auc_score(Yva[vknown, j], ref.decision_function(z(Xva[vknown])))
        assert val_auc[probe.C_[j]] >= max(val_auc.values()) - 1e-3
        # The kept model is the train-only fit at the chosen C.
        ref = _sk(probe.C_[j]).fit(z(Xtr[known]), Ytr[known, j])
        np.testing.assert_allclose(
            probe.decision_function(Xte)[:, j], ref.decision_function(z(Xte)), atol=1e-3
        )
    assert probe.val_auroc_.shape == (len(GRID), 3)


def test_multiclass_C_is_selected_on_mean_one_vs_rest_validation_auroc(data):
    Xtr, _, Xva, _, _, _ = data

    def classes(X):
        return (X[:, 0] > np.median(Xtr[:, 0])).astype(np.int64) + (X[:, 2] > np.median(Xtr[:, 2]))

    ytr, yva = classes(Xtr), classes(Xva)
    probe = LogRegProbe(C_grid=GRID, task="multiclass", tol=1e-8).fit(Xtr, ytr, X_val=Xva, Y_val=yva)
    z = _scaler(Xtr)
    val_auc = {}
    for C in GRID:
        proba = _sk(C).fit(z(Xtr), ytr).predict_proba(z(Xva))
        val_auc[C] = roc_auc_score(yva, proba, multi_class="ovr", average="macro")
    assert isinstance(probe.C_, float)
    assert val_auc[probe.C_] >= max(val_auc.values()) - 1e-3


def test_standardisation_makes_scores_invariant_to_feature_affine_maps(data):
    Xtr, Ytr, _, _, Xte, _ = data
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.01, 100.0, Xtr.shape[1]), rng.normal(0, 50, Xtr.shape[1])
    s1 = LogRegProbe(C=0.1, tol=1e-9).fit(Xtr, Ytr).predict_scores(Xte)
    s2 = LogRegProbe(C=0.1, tol=1e-9).fit(Xtr * a + b, Ytr).predict_scores(Xte * a + b)
    np.testing.assert_allclose(s1, s2, atol=1e-4)


def test_constant_feature_does_not_break_the_fit(data):
    Xtr, Ytr, _, _, Xte, _ = data
    Xtr, Xte = Xtr.copy(), Xte.copy()
    Xtr[:, 3] = 7.0
    scores = LogRegProbe(C=1.0).fit(Xtr, Ytr).predict_scores(Xte)
    assert np.isfinite(scores).all()


def test_apply_uncertain_policies_by_hand():
    Y = np.array([[1, 0, -1], [np.nan, -1, 1]], dtype=np.float32)
    nan = np.nan
    np.testing.assert_array_equal(apply_uncertain(Y, "ignore"), [[1, 0, nan], [nan, nan, 1]])
    np.testing.assert_array_equal(apply_uncertain(Y, "zeros"), [[1, 0, 0], [nan, 0, 1]])
    np.testing.assert_array_equal(apply_uncertain(Y, "U-Ones"), [[1, 0, 1], [nan, 1, 1]])
    np.testing.assert_array_equal(Y[0], [1, 0, -1])  # the input is left alone
    with pytest.raises(FeatcacheError, match="unknown uncertain-label policy"):
        apply_uncertain(Y, "random")
    with pytest.raises(FeatcacheError, match="row 1, label column 0"):
        apply_uncertain(np.array([[1, 0], [2, 0]]), "ones")


def test_user_errors_name_the_problem(data):
    Xtr, Ytr, Xva, Yva, _, _ = data
    with pytest.raises(FeatcacheError, match="no C given"):
        LogRegProbe().fit(Xtr, Ytr)
    one_class = Ytr.copy()
    one_class[:, 2] = np.where(np.isnan(one_class[:, 2]), np.nan, 1.0)
    with pytest.raises(FeatcacheError, match=r"label column 2 has \d+ positive and 0 negative train rows"):
        LogRegProbe(C=1.0).fit(Xtr, one_class)
    val_one_class = Yva.copy()
    val_one_class[:, 1] = 0.0
    with pytest.raises(
        FeatcacheError, match=r"label column 1 has 0 positive and \d+ negative validation rows"
    ):
        LogRegProbe(C_grid=GRID).fit(Xtr, Ytr, X_val=Xva, Y_val=val_one_class)
    with pytest.raises(FeatcacheError, match="class 1 has no labelled train rows"):
        LogRegProbe(C=1.0, task="multiclass").fit(Xtr, np.where(np.arange(300) % 2 == 0, 0, 2))
    with pytest.raises(FeatcacheError, match="not fitted"):
        LogRegProbe(C=1.0).predict_scores(Xtr)
