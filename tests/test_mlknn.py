"""MLkNNProbe against a loop transcription of Zhang & Zhou (2007), with scikit-learn's brute cosine kNN."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from featcache.errors import FeatcacheError
from probes.estimators.mlknn import MLkNNProbe


def _mlknn_reference(X, Y, Q, k, s, exclude_self=True):
    """ML-kNN of the paper, label by label on the rows that know the label, in plain loops."""
    N, L = Y.shape
    out = np.full((Q.shape[0], L), np.nan)
    for lab in range(L):
        rows = [i for i in range(N) if not np.isnan(Y[i, lab])]
        m = len(rows)
        if m == 0:
            continue
        Xl, yl = X[rows], [float(v) for v in Y[rows, lab]]
        kk = min(k, m - 1 if exclude_self else m)
        nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(Xl)
        # prior (Laplace smoothing s)
        p1 = (s + sum(yl)) / (2 * s + m)
        # neighbour counts of every train row, the row itself excluded
        c1 = [0] * (kk + 1)
        c0 = [0] * (kk + 1)
        if kk > 0:
            _, nbrs = nn.kneighbors(Xl, kk + 1 if exclude_self else kk)
        for i in range(m):
            if kk == 0:
                delta = 0
            else:
                others = [j for j in nbrs[i] if j != i][:kk] if exclude_self else list(nbrs[i])
                delta = int(sum(yl[j] for j in others))
            if yl[i] == 1:
                c1[delta] += 1
            else:
                c0[delta] += 1
        e1 = [(s + c1[j]) / (s * (kk + 1) + sum(c1)) for j in range(kk + 1)]
        e0 = [(s + c0[j]) / (s * (kk + 1) + sum(c0)) for j in range(kk + 1)]
        for t in range(Q.shape[0]):
            if kk == 0:
                C = 0
            else:
                _, qn = nn.kneighbors(Q[t : t + 1], kk)
                C = int(sum(yl[j] for j in qn[0]))
            a, b = p1 * e1[C], (1 - p1) * e0[C]
            out[t, lab] = a / (a + b)
    return out


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16))
    z = rng.integers(0, 3, 220)
    X = (centers[z] + 0.9 * rng.normal(size=(220, 16))).astype(np.float32)
    Y = np.stack([(z == 0) | (rng.random(220) < 0.1), z == 1, rng.random(220) < 0.3], 1).astype(np.float32)
    Y[rng.random((220, 3)) < 0.2] = np.nan
    Y[:, 1][:15] = np.nan
    return X[:170], Y[:170], X[170:]


@pytest.mark.parametrize("k,s", [(10, 1.0), (3, 0.5), (25, 2.0)])
def test_posteriors_equal_the_paper_with_missing_labels_per_label(data, k, s):
    X, Y, Q = data
    ours = MLkNNProbe(k=k, s=s).fit(X, Y).predict_proba(Q)
    np.testing.assert_allclose(ours, _mlknn_reference(X, Y, Q, k, s), atol=1e-9, rtol=0)


def test_without_missing_labels_and_with_the_row_as_its_own_neighbour(data):
    X, Y, Q = data
    Y = np.nan_to_num(Y)
    probe = MLkNNProbe(k=7, exclude_self=False).fit(X, Y)
    np.testing.assert_allclose(
        probe.predict_proba(Q), _mlknn_reference(X, Y, Q, 7, 1.0, exclude_self=False), atol=1e-9
    )
    assert len(probe.groups_) == 1  # one search serves every label when no label is missing


def test_hand_computed_case():
    # Four train rows on a line of angles; k = 1, s = 1.
    X = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]], dtype=np.float32)
    Y = np.array([[1], [1], [0], [1]], dtype=np.float32)
    probe = MLkNNProbe(k=1, s=1.0).fit(X, Y)
    # prior (1 + 3) / (2 + 4) = 2/3; deltas (the other row of each pair): 1, 1, 1, 0
    assert probe.prior_[0] == pytest.approx(2 / 3)
    # positives have delta 1, 1, 0 -> c1 = [1, 2]; the negative has delta 1 -> c0 = [0, 1]
    np.testing.assert_allclose(probe.cond_true_[0], [(1 + 1) / (2 + 3), (1 + 2) / (2 + 3)])
    np.testing.assert_allclose(probe.cond_false_[0], [(1 + 0) / (2 + 1), (1 + 1) / (2 + 1)])
    # a query next to row 0 has C = 1: (2/3 * 3/5) / (2/3 * 3/5 + 1/3 * 2/3)
    p = probe.predict_proba(np.array([[1.0, 0.02]]))[0, 0]
    assert p == pytest.approx((2 / 3 * 3 / 5) / (2 / 3 * 3 / 5 + 1 / 3 * 2 / 3), abs=1e-12)
    assert probe.predict(np.array([[1.0, 0.02]]))[0, 0] == 1.0


def test_label_no_row_knows_scores_nan_and_small_labels_cap_k(data):
    X, Y, Q = data
    Y = Y.copy()
    Y[:, 0] = np.nan
    Y[:6, 2], Y[6:, 2] = [1, 0, 0, 1, 0, 0], np.nan  # six rows know label 2: k caps at 5
    with pytest.warns(UserWarning) as record:
        probe = MLkNNProbe(k=10).fit(X, Y)
    text = " ".join(str(r.message) for r in record)
    assert "[0] have no known train row" in text and "capped at [5]" in text
    P = probe.predict_proba(Q)
    assert np.isnan(P[:, 0]).all() and np.isfinite(P[:, 1:]).all()
    assert probe.k_effective_.tolist() == [0, 10, 5]
    np.testing.assert_allclose(P, _mlknn_reference(X, Y, Q, 10, 1.0), atol=1e-9)


def test_sklearn_manners_pickle_and_score(data):
    X, Y, Q = data
    probe = MLkNNProbe(k=5, s=0.5, n_jobs=1)
    assert clone(probe).get_params() == {"k": 5, "s": 0.5, "exclude_self": True, "n_jobs": 1}
    probe.fit(X, Y)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(probe)).predict_proba(Q), probe.predict_proba(Q))
    Yq = np.nan_to_num(MLkNNProbe(k=5).fit(X, Y).predict(Q))  # a fixed 0/1 target for score
    Yq[0] = 1 - Yq[0]
    P = probe.predict_proba(Q)
    want = np.mean([roc_auc_score(Yq[:, j], P[:, j]) for j in range(3) if len(np.unique(Yq[:, j])) == 2])
    assert probe.score(Q, Yq) == pytest.approx(want)


def test_bad_input_is_a_clear_error(data):
    X, Y, Q = data
    with pytest.raises(FeatcacheError, match="not fitted"):
        MLkNNProbe().predict_proba(Q)
    bad = Y.copy()
    bad[4, 2] = -1
    with pytest.raises(FeatcacheError, match=r"row 4, label column 2.*apply_uncertain"):
        MLkNNProbe().fit(X, bad)
    with pytest.raises(FeatcacheError, match="k must be"):
        MLkNNProbe(k=0).fit(X, Y)
    with pytest.raises(FeatcacheError, match="expecting 16 features"):
        MLkNNProbe().fit(X, Y).predict_proba(Q[:, :8])
