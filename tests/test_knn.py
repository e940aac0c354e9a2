"""KNNProbe against a numpy brute-force kNN with the same temperature-softmax voting."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.errors import FeatcacheError
from probes import knn as knn_module
from probes.knn import KNNProbe


def _unit(a):
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _brute(X, Y, Q, k, T, task, n_classes=0):
    """Reference: full similarity matrix, sort, softmax over the top k, weighted votes."""
    S = _unit(Q) @ _unit(X).T
    order = np.argsort(-S, axis=1)[:, : min(k, X.shape[0])]
    s = np.take_along_axis(S, order, axis=1)
    w = np.exp(s / T)
    w /= w.sum(1, keepdims=True)
    if task == "multiclass":
        out = np.zeros((Q.shape[0], n_classes))
        for c in range(n_classes):
            out[:, c] = (w * (Y[order] == c)).sum(1)
        return out
    out = np.empty((Q.shape[0], Y.shape[1]))
    for j in range(Y.shape[1]):
        lab = Y[order, j]
        known = ~np.isnan(lab)
        with np.errstate(invalid="ignore"):
            out[:, j] = (w * np.where(known, lab, 0)).sum(1) / (w * known).sum(1)
    return out


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 24))
    X = (centers[rng.integers(0, 4, 300)] + 0.8 * rng.normal(size=(300, 24))).astype(np.float32)
    Q = (centers[rng.integers(0, 4, 70)] + 0.8 * rng.normal(size=(70, 24))).astype(np.float32)
    Y = (rng.random((300, 3)) < 0.3).astype(np.float32)
    Y[rng.random((300, 3)) < 0.25] = np.nan
    return X, Y, Q


def test_multilabel_scores_match_brute_force_for_every_k(data):
    X, Y, Q = data
    ks = (1, 10, 20, 100, 200, 1000)
    scores = KNNProbe(k=ks, temperature=0.07).fit(X, Y).predict_scores(Q)
    assert sorted(scores) == sorted(ks)
    for k in ks:
        np.testing.assert_allclose(scores[k], _brute(X, Y, Q, k, 0.07, "multilabel"), atol=1e-6, rtol=0)


def test_multiclass_probabilities_match_brute_force_and_skip_unlabelled_rows(data):
    X, _, Q = data
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, X.shape[0])
    y[::7] = -1
    probe = KNNProbe(k=(5, 50), temperature=0.1, task="multiclass").fit(X, y)
    scores = probe.predict_scores(Q)
    labelled = y >= 0
    for k in (5, 50):
        ref = _brute(X[labelled], y[labelled], Q, k, 0.1, "multiclass", 3)
        np.testing.assert_allclose(scores[k], ref, atol=1e-6, rtol=0)
        np.testing.assert_allclose(scores[k].sum(1), 1.0, atol=1e-12)
    _, idx = probe.kneighbors(Q)
    assert (y[idx] >= 0).all()


def test_kneighbors_are_the_exact_cosine_neighbours(data):
    X, Y, Q = data
    sims, idx = KNNProbe(k=(5, 30)).fit(X, Y).kneighbors(Q)
    S = _unit(Q) @ _unit(X).T
    np.testing.assert_array_equal(idx, np.argsort(-S, axis=1)[:, :30])
    np.testing.assert_allclose(sims, np.take_along_axis(S, idx, axis=1), atol=1e-6)


def test_hand_computed_two_neighbour_vote():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    Y = np.array([[1.0], [0.0], [1.0]], dtype=np.float32)
    scores = KNNProbe(k=(2,), temperature=0.5).fit(X, Y).predict_scores(np.array([[3.0, 0.0]]))
    # Similarities 1 and 0 -> weights e^2 and e^0; the third row (sim -1) is not among the top 2.
    assert scores[2][0, 0] == pytest.approx(np.e**2 / (np.e**2 + 1.0), abs=1e-7)


def test_label_missing_in_all_k_neighbours_gives_nan():
    X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    Y = np.array([[np.nan, 1.0], [np.nan, 0.0], [1.0, 1.0]], dtype=np.float32)
    scores = KNNProbe(k=(2, 3)).fit(X, Y).predict_scores(np.array([[1.0, 0.05]]))
    assert np.isnan(scores[2][0, 0]) and not np.isnan(scores[2][0, 1])
    assert scores[3][0, 0] == pytest.approx(1.0)


def test_blocked_search_gives_the_same_scores(data, monkeypatch):
    X, Y, Q = data
    monkeypatch.setattr(knn_module, "_QUERY_BLOCK", 8)
    scores = KNNProbe(k=(20,)).fit(X, Y).predict_scores(Q)
    np.testing.assert_allclose(scores[20], _brute(X, Y, Q, 20, 0.07, "multilabel"), atol=1e-6, rtol=0)


def test_scores_ignore_feature_scale(data):
    X, Y, Q = data
    rng = np.random.default_rng(2)
    a = KNNProbe(k=(10,)).fit(X, Y).predict_scores(Q)[10]
    b = KNNProbe(k=(10,)).fit(X * rng.uniform(0.1, 10, (300, 1)), Y).predict_scores(Q * 7.0)[10]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_unmapped_uncertain_label_is_a_clear_error(data):
    X, Y, _ = data
    Y = Y.copy()
    Y[5, 1] = -1
    with pytest.raises(FeatcacheError, match=r"row 5, label column 1.*apply_uncertain"):
        KNNProbe().fit(X, Y)


def test_unfitted_and_bad_parameters_raise(data):
    X, Y, Q = data
    with pytest.raises(FeatcacheError, match="not fitted"):
        KNNProbe().predict_scores(Q)
    with pytest.raises(FeatcacheError, match="k must be"):
        KNNProbe(k=(0, 5)).fit(X, Y)
    with pytest.raises(FeatcacheError, match="unknown task"):
        KNNProbe(task="regression").fit(X, Y)
