"""KNNProbe against a numpy transcription of dinov2's KnnModule.forward and a brute-force kNN."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import cross_val_score
from sklearn.utils.estimator_checks import check_estimator

from featcache.errors import FeatcacheError
from probes.estimators import knn as knn_module
from probes.estimators.knn import KNNProbe


def _unit(a):
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _brute(X, Y, Q, k, T, task, n_classes=0):
    """Reference of the per-k renormalised vote: sort, softmax over the top k, weighted votes."""
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


@pytest.mark.filterwarnings("ignore:KNNProbe.*capped")
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


# ---- dinov2 arithmetic ----


def _dinov2_forward(X, labels, Q, nb_knn, T, num_classes=None):
    """numpy transcription of dinov2/eval/knn.py ``KnnModule.forward`` (features L2-normalised as
    ``ModelWithNormalize`` does): one top-``max_k`` search, ``softmax(topk_sims / T, 1)`` once,
    ``probas_for_k = sum(matmul[:, :k, :], 1)``. ``labels`` int [N] (one-hot) or 0/1 [N, L]
    (multi-hot neighbour labels, as the newer dinov2 accepts)."""
    max_k = max(nb_knn)
    similarity = _unit(Q) @ _unit(X).T
    indices = np.argsort(-similarity, axis=1, kind="stable")[:, :max_k]
    topk_sims = np.take_along_axis(similarity, indices, axis=1)
    z = topk_sims / T
    z = np.exp(z - z.max(1, keepdims=True))
    topk_sims_transform = z / z.sum(1, keepdims=True)
    if labels.ndim == 1:
        neighbors_labels = np.eye(num_classes)[labels[indices]]
    else:
        neighbors_labels = labels[indices].astype(np.float64)
    matmul = neighbors_labels * topk_sims_transform[:, :, None]
    return {k: matmul[:, :k, :].sum(1) for k in nb_knn}


def test_multiclass_scores_equal_dinov2_knn_module(data):
    X, _, Q = data
    y = np.random.default_rng(3).integers(0, 4, X.shape[0])
    ks = (10, 20, 100, 200)
    probe = KNNProbe(k=20, task="multiclass").fit(X, y)
    ours = probe.scores_for_ks(Q, ks)
    ref = _dinov2_forward(X, y, Q, ks, 0.07, 4)
    for k in ks:
        np.testing.assert_allclose(ours[k], ref[k], atol=2e-6, rtol=0)  # FAISS float32 sims, as dinov2
    # only at k = max_k do the votes sum to one: no renormalisation per k
    np.testing.assert_allclose(ours[200].sum(1), 1.0, atol=1e-12)
    assert (ours[10].sum(1) < 1 - 1e-6).any()
    # a single-k estimator with the run's window gives the run's score at that k
    np.testing.assert_allclose(
        KNNProbe(k=10, task="multiclass", softmax_k=200).fit(X, y).predict_proba(Q), ref[10], atol=2e-6
    )


def test_multilabel_scores_equal_dinov2_with_multi_hot_labels(data):
    X, Y, Q = data
    Y = np.nan_to_num(Y, nan=0.0)
    ks = (10, 20, 100, 200)
    ours = KNNProbe(k=ks).fit(X, Y).scores_for_ks(Q)
    ref = _dinov2_forward(X, Y, Q, ks, 0.07)
    for k in ks:
        np.testing.assert_allclose(ours[k], ref[k], atol=2e-6, rtol=0)  # FAISS float32 sims, as dinov2


def test_missing_labels_hand_their_weight_to_the_known_neighbours(data):
    X, Y, Q = data
    ks, W = (5, 40), 120
    ours = KNNProbe(k=ks, softmax_k=W).fit(X, Y).scores_for_ks(Q)
    S = _unit(Q) @ _unit(X).T
    for q in range(Q.shape[0]):
        order = np.argsort(-S[q])[:W]
        w = np.exp(S[q, order] / 0.07)
        w /= w.sum()
        for k in ks:
            for j in range(Y.shape[1]):
                lab = Y[order[:k], j]
                known = ~np.isnan(lab)
                if not known.any():
                    assert np.isnan(ours[k][q, j])
                    continue
                want = w[:k].sum() * (w[:k][known] * lab[known]).sum() / w[:k][known].sum()
                assert ours[k][q, j] == pytest.approx(want, abs=2e-6)


def test_renormalized_vote_and_predict_scores_keep_the_per_k_softmax(data):
    X, Y, Q = data
    ks = (10, 20, 100)
    a = KNNProbe(k=ks, vote="renormalized").fit(X, Y).scores_for_ks(Q)
    b = KNNProbe(k=ks).fit(X, Y).predict_scores(Q)
    for k in ks:
        ref = _brute(X, Y, Q, k, 0.07, "multilabel")
        np.testing.assert_allclose(a[k], ref, atol=1e-6, rtol=0)
        np.testing.assert_allclose(b[k], ref, atol=1e-6, rtol=0)


def test_one_k_has_the_same_vote_either_way(data):
    X, Y, Q = data
    a = KNNProbe(k=15).fit(X, Y).predict_proba(Q)
    b = KNNProbe(k=15, vote="renormalized").fit(X, Y).predict_proba(Q)
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_k_above_the_train_size_is_capped_and_recorded(data):
    X, Y, Q = data
    with pytest.warns(UserWarning, match=r"\[500\].*capped at 300"):
        probe = KNNProbe(k=500).fit(X, Y)
    assert probe.k_effective_ == 300
    np.testing.assert_allclose(probe.predict_proba(Q), KNNProbe(k=300).fit(X, Y).predict_proba(Q))
    with pytest.warns(UserWarning):
        multi = KNNProbe(k=(10, 400)).fit(X, Y)
    assert multi.k_effective_ == {10: 10, 400: 300}
    ref = _dinov2_forward(X, np.nan_to_num(Y), Q, (10, 300), 0.07)
    with pytest.warns(UserWarning, match="capped"):
        got = KNNProbe(k=(10, 400)).fit(X, np.nan_to_num(Y)).scores_for_ks(Q)
    np.testing.assert_allclose(got[10], ref[10], atol=2e-6)
    np.testing.assert_allclose(got[400], ref[300], atol=2e-6)


def test_window_below_k_and_several_k_for_predict_proba_are_errors(data):
    X, Y, Q = data
    with pytest.raises(FeatcacheError, match="softmax_k=5 is below k=10"):
        KNNProbe(k=10, softmax_k=5).fit(X, Y)
    with pytest.raises(FeatcacheError, match="scores_for_ks"):
        KNNProbe(k=(5, 10)).fit(X, Y).predict_proba(Q)
    with pytest.raises(FeatcacheError, match="unknown vote"):
        KNNProbe(vote="mean").fit(X, Y)


# ---- scikit-learn manners ----


def test_multiclass_estimator_methods_agree_with_scikit_learn_conventions(data):
    X, _, Q = data
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, X.shape[0])
    probe = KNNProbe(k=10, task="multiclass").fit(X, y)
    P = probe.predict_proba(Q)
    assert P.shape == (Q.shape[0], 3)
    np.testing.assert_array_equal(probe.predict(Q), P.argmax(1))
    np.testing.assert_allclose(probe.decision_function(Q), P)
    yq = rng.integers(0, 3, Q.shape[0])
    assert probe.score(Q, yq) == pytest.approx(accuracy_score(yq, P.argmax(1)))
    # string labels and two classes: classes_ order, 1-D decision function
    names = np.array(["a", "b"])[(y > 0).astype(int)]
    two = KNNProbe(k=10, task="multiclass").fit(X, names)
    assert list(two.classes_) == ["a", "b"]
    P2 = two.predict_proba(Q)
    np.testing.assert_allclose(two.decision_function(Q), P2[:, 1] - P2[:, 0])
    np.testing.assert_array_equal(two.predict(Q), np.array(["a", "b"])[P2.argmax(1)])


def test_multilabel_estimator_methods(data):
    X, Y, Q = data
    probe = KNNProbe(k=10).fit(X, Y)
    P = probe.predict_proba(Q)
    assert P.shape == (Q.shape[0], Y.shape[1])
    share = _brute(X, Y, Q, 10, 0.07, "multilabel")
    np.testing.assert_allclose(probe.decision_function(Q), share - 0.5, atol=1e-6)
    np.testing.assert_array_equal(probe.predict(Q), (share > 0.5).astype(float))
    Yq = (np.random.default_rng(5).random((Q.shape[0], Y.shape[1])) < 0.4).astype(np.float32)
    want = np.mean([roc_auc_score(Yq[:, j], P[:, j]) for j in range(Y.shape[1])])
    assert probe.score(Q, Yq) == pytest.approx(want, abs=2e-6)


def test_cross_val_score_clone_and_get_params():
    Xb, yb = make_blobs(n_samples=150, centers=3, n_features=5, random_state=0)
    est = KNNProbe(k=7, task="multiclass", softmax_k=20, n_jobs=1)
    scores = cross_val_score(est, Xb, yb, cv=3)
    assert scores.shape == (3,) and np.isfinite(scores).all() and scores.min() > 0.8
    copy = clone(est)
    assert (
        copy.get_params()
        == est.get_params()
        == {
            "k": 7,
            "temperature": 0.07,
            "task": "multiclass",
            "softmax_k": 20,
            "vote": "dinov2",
            "n_jobs": 1,
        }
    )


def test_check_estimator_passes_but_for_the_missing_class_convention():
    # -1 is the project's "no class" marker, so scikit-learn's {-1, 1} labels cannot be classes.
    expected = {"check_classifiers_classes": "class -1 marks a missing label in featcache"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(
            KNNProbe(k=5, task="multiclass", n_jobs=1), expected_failed_checks=expected, on_fail=None
        )
    failed = {r["check_name"] for r in results if r["status"] == "failed"}
    assert failed == set(), failed
    assert {r["check_name"] for r in results if r["status"] == "xfail"} == set(expected)


# ---- real chest X-rays ----


def _nih_projected(root):
    """NIH 64 px images through a fixed random projection: real image structure, real labels."""
    from PIL import Image

    rows = list(csv.DictReader(open(root / "labels.csv", newline="")))
    pix = np.stack([np.asarray(Image.open(root / r["image_path"]), dtype=np.float32).ravel() for r in rows])
    proj = np.random.default_rng(0).normal(size=(pix.shape[1], 128)).astype(np.float32)
    feats = (pix / 255.0 - 0.5) @ proj
    labels = [c for c in rows[0] if c in NIH_LABELS]
    Y = np.array([[float(r[c]) for c in labels] for r in rows], dtype=np.float32)
    train = np.array([r["split"] != "test" for r in rows])
    return feats[train], Y[train], feats[~train], Y[~train]


NIH_LABELS = [
    "no_finding", "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
    "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural_thickening", "hernia",
]  # fmt: skip


def test_real_nih_per_label_auroc_equals_dinov2(shared_data):
    Xtr, Ytr, Xte, Yte = _nih_projected(shared_data / "nih_cxr14_tiny64")
    ks = (10, 20, 100, 200)
    ours = KNNProbe(k=ks).fit(Xtr, Ytr).scores_for_ks(Xte)
    ref = _dinov2_forward(Xtr, Ytr, Xte, ks, 0.07)
    checked = 0
    for k in (10, 20):
        for j in range(Ytr.shape[1]):
            if len(np.unique(Yte[:, j])) == 2:
                a = roc_auc_score(Yte[:, j], ours[k][:, j])
                assert a == pytest.approx(roc_auc_score(Yte[:, j], ref[k][:, j]), abs=1e-4)
                checked += 1
    assert checked >= 10
