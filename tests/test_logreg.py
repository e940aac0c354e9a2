"""LogRegProbe against scikit-learn's LogisticRegression on the same transformed features.

References: ``LogisticRegression(C=C, solver="lbfgs", tol=1e-10)`` on StandardScaler'd float64
features (the probe's standardisation), a numpy Newton solve of the same objective, and the
dinov2 protocol (select C on val, refit on train + val) written out by hand.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.special import expit
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from featcache.errors import FeatcacheError
from probes.estimators._lbfgs import fit_multinomial_lbfgs, fit_ovr_lbfgs
from probes.estimators.logreg import DINOV2_C_GRID, LogRegProbe, apply_uncertain, dinov2_preset


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny fits: BLAS/OpenMP threads only add start-up and contention cost (both sides alike)."""
    with threadpool_limits(limits=1):
        yield


GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
AUC_TOL = 1e-6


def _sk(C, **kw):
    return LogisticRegression(C=C, solver="lbfgs", tol=1e-10, max_iter=100_000, **kw)


def _scaler(X_train):
    """Reference standardisation, in float64 (scikit-learn keeps float32 inputs in float32)."""
    scaler = StandardScaler().fit(X_train.astype(np.float64))
    return lambda X: scaler.transform(X.astype(np.float64))


def _make(rng, n, W, scale, shift, noise=1.5):
    Z = rng.normal(size=(n, W.shape[0]))
    logits = Z @ W + noise * rng.logistic(size=(n, W.shape[1]))
    return (Z * scale + shift).astype(np.float32), logits


@pytest.fixture
def data():
    """Features on very different scales and offsets, 3 labels with 20% missing, split 300/150/200."""
    rng = np.random.default_rng(0)
    D, L = 10, 3
    scale, shift, W = rng.uniform(0.1, 20.0, D), rng.normal(0, 5, D), rng.normal(size=(D, L))
    out = []
    for n in (300, 150, 200):
        X, logits = _make(rng, n, W, scale, shift)
        out += [X, (logits > 0.5).astype(np.float32)]
    Xtr, Ytr, Xva, Yva, Xte, Yte = out
    Ytr[rng.random(Ytr.shape) < 0.2] = np.nan
    Yva[rng.random(Yva.shape) < 0.2] = np.nan
    return Xtr, Ytr, Xva, Yva, Xte, Yte


def _classes(X, ref, n_classes=3):
    """Classes from thresholds of a noisy projection (train quantiles), so no class is separable."""
    rng = np.random.default_rng(7)
    s = X[:, 0] / ref[:, 0].std() + X[:, 1] / ref[:, 1].std() + rng.logistic(size=len(X))
    cuts = np.quantile(
        ref[:, 0] / ref[:, 0].std() + ref[:, 1] / ref[:, 1].std(), np.linspace(0, 1, n_classes + 1)[1:-1]
    )
    return np.searchsorted(cuts, s).astype(np.int64)


def _pneumonia(shared_data, n_train=400, dim=24):
    """PneumoniaMNIST pixels through a fixed random projection: train subsample and the val split."""
    npz = np.load(shared_data / "pneumoniamnist_subset" / "pneumoniamnist_trainval.npz")
    proj = np.random.default_rng(0).normal(size=(28 * 28, dim)) / 28.0
    rows = np.random.default_rng(1).choice(len(npz["train_labels"]), n_train, replace=False)
    Xtr = (npz["train_images"][rows].reshape(n_train, -1) / 255.0) @ proj
    Xte = (npz["val_images"].reshape(len(npz["val_labels"]), -1) / 255.0) @ proj
    return (
        Xtr.astype(np.float32),
        npz["train_labels"][rows, 0].astype(np.int64),
        Xte.astype(np.float32),
        npz["val_labels"][:, 0].astype(np.int64),
    )


def _auc_gap_binary(probe_scores, ref_scores, y):
    return abs(roc_auc_score(y, probe_scores) - roc_auc_score(y, ref_scores))


# ---- equal to scikit-learn at every C of the dinov2 grid ----


def test_grid_has_dinov2_values():
    np.testing.assert_allclose(DINOV2_C_GRID, 10.0 ** np.linspace(-6, 5, 45), rtol=1e-15)
    assert len(DINOV2_C_GRID) == 45


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # sklearn at tiny C
def test_multilabel_with_missing_labels_equals_sklearn_at_every_grid_C(data):
    Xtr, Ytr, _, _, Xte, Yte = data
    z = _scaler(Xtr)
    worst = 0.0
    for C in DINOV2_C_GRID:
        probe = LogRegProbe(C=C).fit(Xtr, Ytr)
        assert probe.converged_.all() and probe.fitted_on_ == "train" and not probe.refit_
        S = probe.predict_proba(Xte)
        for j in range(Ytr.shape[1]):
            known = ~np.isnan(Ytr[:, j])
            ref = _sk(C).fit(z(Xtr[known]), Ytr[known, j])
            worst = max(worst, _auc_gap_binary(S[:, j], ref.predict_proba(z(Xte))[:, 1], Yte[:, j]))
            np.testing.assert_allclose(
                probe.coef_[j], ref.coef_[0], atol=1e-4 * max(np.abs(ref.coef_).max(), 1e-3)
            )
            assert probe.intercept_[j] == pytest.approx(
                ref.intercept_[0], abs=1e-4 * max(abs(ref.intercept_[0]), 1)
            )
    assert worst <= AUC_TOL


def test_two_classes_given_as_one_label_column_are_a_binary_fit_at_C(shared_data):
    """PneumoniaMNIST (normal / pneumonia), every grid C: sklearn's binary model at the same C."""
    Xtr, ytr, Xte, yte = _pneumonia(shared_data)
    z = _scaler(Xtr)
    worst = 0.0
    for C in DINOV2_C_GRID:
        probe = LogRegProbe(C=C, task="multiclass").fit(Xtr, ytr)
        ref = _sk(C).fit(z(Xtr), ytr)
        assert probe.coef_.shape == (1, Xtr.shape[1]) and probe.converged_.all()
        np.testing.assert_allclose(probe.coef_, ref.coef_, atol=1e-4 * np.abs(ref.coef_).max())
        P = probe.predict_proba(Xte)
        worst = max(worst, _auc_gap_binary(P[:, 1], ref.predict_proba(z(Xte))[:, 1], yte))
        np.testing.assert_array_equal(probe.predict(Xte), ref.predict(z(Xte)))
        assert probe.decision_function(Xte).shape == ref.decision_function(z(Xte)).shape == (len(yte),)
    assert worst <= AUC_TOL


def test_two_row_softmax_at_C_is_binary_at_2C():
    """Why K = 2 must not go through the softmax: its logit difference is sklearn's binary fit at 2C."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(200, 4))
    y = (X[:, 0] + rng.logistic(size=200) > 0).astype(np.int64)
    W = fit_multinomial_lbfgs(X[None], y[None], 2, 0.05, max_iter=5000, tol=1e-12, ftol=0.0)[0]
    diff = W[:, 1] - W[:, 0]
    ref2 = _sk(0.1).fit(X, y)
    np.testing.assert_allclose(diff[:4], ref2.coef_[0], rtol=1e-6)
    assert np.abs(_sk(0.05).fit(X, y).coef_[0] - diff[:4]).max() > 1e-2


def test_multiclass_three_classes_equals_sklearn_multinomial_at_every_grid_C(data):
    Xtr, _, _, _, Xte, _ = data
    ytr, yte = _classes(Xtr, Xtr), _classes(Xte, Xtr)
    ytr[np.random.default_rng(3).random(ytr.size) < 0.1] = -1
    known = ytr >= 0
    z = _scaler(Xtr)
    worst = 0.0
    for C in DINOV2_C_GRID:
        probe = LogRegProbe(C=C, task="multiclass").fit(Xtr, ytr)
        ref = _sk(C).fit(z(Xtr[known]), ytr[known])
        assert probe.converged_.all() and probe.n_fit_rows_[0] == known.sum()
        np.testing.assert_allclose(probe.coef_, ref.coef_, atol=1e-4 * max(np.abs(ref.coef_).max(), 1e-3))
        P, R = probe.predict_proba(Xte), ref.predict_proba(z(Xte))
        for k in range(3):
            worst = max(worst, _auc_gap_binary(P[:, k], R[:, k], yte == k))
    assert worst <= AUC_TOL


def _newton_reference(X, y, C, iters=60):
    """Exact optimum of C * sum log_loss + 0.5 ||w||^2 (intercept free) by undamped Newton steps."""
    A = np.hstack([X, np.ones((len(X), 1))])
    w = np.zeros(A.shape[1])
    P = np.eye(A.shape[1])
    P[-1, -1] = 0.0
    for _ in range(iters):
        p = expit(A @ w)
        g = C * A.T @ (p - y) + P @ w
        H = C * (A * (p * (1 - p))[:, None]).T @ A + P
        w = w - np.linalg.solve(H, g)
    return w


@pytest.mark.parametrize("C", [1e-3, 1.0, 1e5])
def test_converged_fit_is_the_exact_optimum(C):
    """At the gradient tolerance the weights match a Newton solve far tighter than the AUROC needs."""
    rng = np.random.default_rng(11)
    Z = rng.normal(size=(400, 6))
    y = (Z @ rng.normal(size=6) + 2 * rng.logistic(size=400) > 0).astype(np.float32)
    X = Z @ (rng.normal(size=(6, 6)) * 0.3 ** np.arange(6)[:, None]) + rng.normal(
        0, 3, 6
    )  # correlated, offset
    probe = LogRegProbe(C=C, standardize=False).fit(X, y)
    ref = _newton_reference(X.astype(np.float32).astype(np.float64), y.astype(np.float64), C)
    got = np.append(probe.coef_[0], probe.intercept_[0])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)
    assert probe.converged_.all() and probe.n_iter_[0] > 0


def test_preconditioned_solver_reaches_the_plain_solvers_optimum_from_a_warm_start(data):
    """The change of variables (principal axes, per-label scaling, centring) leaves the optimum alone."""
    Xtr, Ytr, _, _, _, _ = data
    Xs = _scaler(Xtr)(Xtr) + 2.0  # not centred: the intercept must absorb the solver's centring
    C = np.array([0.01, 1.0, 1e4])
    plain = fit_ovr_lbfgs(Xs, Ytr, C, max_iter=20_000, tol=1e-11, ftol=0.0)
    start = plain + np.random.default_rng(0).normal(0, 0.1, plain.shape)
    pre, n_iter, conv = fit_ovr_lbfgs(
        Xs, Ytr, C, coef0=start, max_iter=20_000, tol=1e-11, ftol=0.0, precondition=True, return_info=True
    )
    assert conv.all() and (n_iter > 0).all()
    np.testing.assert_allclose(pre, plain, rtol=1e-6, atol=1e-7 * np.abs(plain).max())


def test_max_iter_cap_is_recorded_and_warned_once(data):
    Xtr, Ytr, _, _, _, _ = data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = LogRegProbe(C=100.0, max_iter=3).fit(Xtr, Ytr)
    assert [w.category for w in caught] == [ConvergenceWarning]
    assert "raise max_iter" in str(caught[0].message)
    np.testing.assert_array_equal(probe.n_iter_, [3, 3, 3])
    assert not probe.converged_.any()


# ---- selection on val, then refit on train + val ----


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # sklearn at tiny C
def test_C_is_selected_per_label_on_val_auroc_then_refit_on_train_and_val(data):
    Xtr, Ytr, Xva, Yva, Xte, _ = data
    probe = LogRegProbe(C_grid=GRID).fit(Xtr, Ytr, X_val=Xva, Y_val=Yva)
    z = _scaler(Xtr)
    X_all, Y_all = np.concatenate([Xtr, Xva]), np.concatenate([Ytr, Yva])
    z_all = _scaler(X_all)
    assert probe.refit_ and probe.fitted_on_ == "train+val"
    assert probe.val_auroc_.shape == probe.val_score_.shape == (len(GRID), 3)
    for j in range(Ytr.shape[1]):
        known, vknown = ~np.isnan(Ytr[:, j]), ~np.isnan(Yva[:, j])
        val_auc, fits = [], []
        for C in GRID:
            fits.append(_sk(C).fit(z(Xtr[known]), Ytr[known, j]))
            val_auc.append(roc_auc_score(Yva[vknown, j], fits[-1].decision_function(z(Xva[vknown]))))
        np.testing.assert_allclose(probe.val_auroc_[:, j], val_auc, atol=AUC_TOL)
        best = int(np.argmax(val_auc))  # first maximum: ties go to the smaller C
        assert probe.C_[j] == GRID[best]
        # Held-out val scores come from the train-only fit at the chosen C.
        np.testing.assert_allclose(probe.val_proba_[:, j], fits[best].predict_proba(z(Xva))[:, 1], atol=1e-6)
        both = ~np.isnan(Y_all[:, j])
        assert probe.n_fit_rows_[j] == both.sum()
        ref = _sk(GRID[best]).fit(z_all(X_all[both]), Y_all[both, j])
        np.testing.assert_allclose(
            probe.decision_function(Xte)[:, j], ref.decision_function(z_all(Xte)), atol=1e-5
        )
    kept = LogRegProbe(C_grid=GRID, refit=False).fit(Xtr, Ytr, X_val=Xva, Y_val=Yva)
    assert not kept.refit_ and kept.fitted_on_ == "train"
    np.testing.assert_array_equal(kept.C_, probe.C_)
    np.testing.assert_allclose(kept.predict_proba(Xva), probe.val_proba_, atol=1e-9)


@pytest.mark.parametrize("select", ["auto", "auroc"])
def test_multiclass_selects_on_val_accuracy_like_dinov2_then_refits(data, select):
    Xtr, _, Xva, _, Xte, _ = data
    ytr, yva = _classes(Xtr, Xtr), _classes(Xva, Xtr)
    probe = LogRegProbe(C_grid=GRID, task="multiclass", select=select).fit(Xtr, ytr, X_val=Xva, Y_val=yva)
    z = _scaler(Xtr)
    acc, auc = [], []
    for C in GRID:
        fit = _sk(C).fit(z(Xtr), ytr)
        acc.append(np.mean(fit.predict(z(Xva)) == yva))
        auc.append(roc_auc_score(yva, fit.predict_proba(z(Xva)), multi_class="ovr", average="macro"))
    np.testing.assert_allclose(probe.val_accuracy_, acc, atol=1e-12)
    np.testing.assert_allclose(np.nanmean(probe.val_auroc_, axis=1), auc, atol=AUC_TOL)
    best = int(np.argmax(acc if select == "auto" else auc))
    assert probe.C_ == GRID[best]
    X_all, y_all = np.concatenate([Xtr, Xva]), np.concatenate([ytr, yva])
    ref = _sk(GRID[best]).fit(_scaler(X_all)(X_all), y_all)
    np.testing.assert_allclose(probe.predict_proba(Xte), ref.predict_proba(_scaler(X_all)(Xte)), atol=1e-6)


def test_dinov2_preset_uses_raw_features_45_values_and_refits(shared_data):
    Xtr, ytr, Xte, yte = _pneumonia(shared_data, n_train=300, dim=12)
    half = np.random.default_rng(2).permutation(len(yte))[:135]  # the val split is sorted by class
    rest = np.setdiff1d(np.arange(len(yte)), half)
    Xva, yva, Xte, yte = Xte[half], yte[half], Xte[rest], yte[rest]
    kw = dinov2_preset(task="multiclass")
    assert kw["C_grid"] == DINOV2_C_GRID and kw["standardize"] is False and kw["refit"] is True
    probe = LogRegProbe(**kw).fit(Xtr, ytr, X_val=Xva, Y_val=yva)
    np.testing.assert_array_equal(probe.mean_, 0.0)
    np.testing.assert_array_equal(probe.scale_, 1.0)
    assert probe.val_accuracy_.shape == (45,)
    for g in (0, 22, 44):  # the val accuracies of the sweep, spot-checked against sklearn on raw features
        fit = _sk(DINOV2_C_GRID[g]).fit(Xtr.astype(np.float64), ytr)
        assert probe.val_accuracy_[g] == pytest.approx(np.mean(fit.predict(Xva.astype(np.float64)) == yva))
    assert probe.C_ == DINOV2_C_GRID[int(np.argmax(probe.val_accuracy_))]
    X_all = np.concatenate([Xtr, Xva]).astype(np.float64)
    ref = _sk(probe.C_).fit(X_all, np.concatenate([ytr, yva]))
    P = probe.predict_proba(Xte)
    assert _auc_gap_binary(P[:, 1], ref.predict_proba(Xte.astype(np.float64))[:, 1], yte) <= AUC_TOL


# ---- scikit-learn manners ----


def test_sklearn_manners_clone_predict_and_cross_val_score(data):
    Xtr, _, _, _, _, _ = data
    y = _classes(Xtr, Xtr)
    probe = LogRegProbe(C=0.5, task="multiclass")
    assert clone(probe).get_params() == probe.get_params()
    scores = cross_val_score(probe, Xtr, y, cv=3)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    ref = cross_val_score(_sk(0.5), _scaler(Xtr)(Xtr), y, cv=3)  # same folds; scaler per fold differs
    np.testing.assert_allclose(scores, ref, atol=0.05)
    probe.fit(Xtr, y)
    np.testing.assert_array_equal(probe.predict(Xtr), np.argmax(probe.predict_proba(Xtr), 1))
    np.testing.assert_array_equal(probe.predict_scores(Xtr), probe.predict_proba(Xtr))
    np.testing.assert_array_equal(probe.classes_, [0, 1, 2])


def test_standardisation_makes_scores_invariant_to_feature_affine_maps(data):
    Xtr, Ytr, _, _, Xte, _ = data
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.01, 100.0, Xtr.shape[1]), rng.normal(0, 50, Xtr.shape[1])
    s1 = LogRegProbe(C=0.1).fit(Xtr, Ytr).predict_proba(Xte)
    s2 = LogRegProbe(C=0.1).fit(Xtr * a + b, Ytr).predict_proba(Xte * a + b)
    np.testing.assert_allclose(s1, s2, atol=1e-4)


def test_constant_feature_does_not_break_the_fit(data):
    Xtr, Ytr, _, _, Xte, _ = data
    Xtr, Xte = Xtr.copy(), Xte.copy()
    Xtr[:, 3] = 7.0
    probe = LogRegProbe(C=1.0).fit(Xtr, Ytr)
    assert np.isfinite(probe.predict_proba(Xte)).all() and probe.scale_[3] == 1.0


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
    with pytest.raises(FeatcacheError, match="C is fixed.*stack the validation rows"):
        LogRegProbe(C=1.0).fit(Xtr, Ytr, Xva, Yva)
    with pytest.raises(FeatcacheError, match="select='accuracy' needs task='multiclass'"):
        LogRegProbe(C=1.0, select="accuracy").fit(Xtr, Ytr)
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
