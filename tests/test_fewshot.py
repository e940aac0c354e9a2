"""Few-shot sampling on hand-checkable cases, and the batched heads against per-episode references."""

from __future__ import annotations

import csv
import gzip
import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from featcache.errors import FeatcacheError
from probes.estimators.fewshot import Episode, fewshot_scores, sample_episodes

# Hand-made multi-label train rows: patient, label 0, label 1 (NaN missing).
# Label 0: positive patients a, b, c (c has one negative image too), d only negative,
# e negative twice, f missing only, g negative -> negatives {d, e, g}.
ROWS = [
    ("a", 1, 0),
    ("a", 1, np.nan),
    ("b", 1, 1),
    ("c", 0, 1),
    ("c", 1, 0),
    ("d", 0, 1),
    ("e", 0, 0),
    ("e", 0, np.nan),
    ("f", np.nan, 1),
    ("g", 0, 0),
]
PIDS = np.array([r[0] for r in ROWS])
Y = np.array([r[1:] for r in ROWS], dtype=np.float32)


def _patient_labels(pids, Y, j):
    pos = {p for p, v in zip(pids, Y[:, j]) if v == 1}
    neg = {p for p, v in zip(pids, Y[:, j]) if v == 0} - pos
    return pos, neg


def test_multilabel_support_is_k_positive_and_k_negative_patients():
    eps = sample_episodes(PIDS, Y, shots=[1, 2, 3], seeds=range(20), labels=[0])
    assert len(eps) == 3 * 20
    pos, neg = _patient_labels(PIDS, Y, 0)
    assert pos == {"a", "b", "c"} and neg == {"d", "e", "g"}
    for e in eps:
        patients = PIDS[e.support]
        assert len(set(patients)) == e.support.size == 2 * e.shots  # no patient twice
        np.testing.assert_array_equal(e.targets, [1] * e.shots + [0] * e.shots)
        np.testing.assert_array_equal(Y[e.support, 0], e.targets)  # the image carries the drawn label
        assert set(patients[: e.shots]) <= pos and set(patients[e.shots :]) <= neg
    # Over 20 seeds, row 3 (patient c's negative image) is never drawn: c is a positive patient.
    assert 3 not in np.concatenate([e.support for e in eps])


def test_too_few_patients_names_the_label_and_the_count():
    with pytest.raises(FeatcacheError, match=r"label 'Edema' \(column 0\) has 3 positive patients.*4-shot"):
        sample_episodes(PIDS, Y, shots=[1, 4], seeds=1, label_names=["Edema", "Mass"])
    # Label 1: positive patients b, c, d, f; negatives a, e, g (c is positive, so not negative).
    with pytest.raises(FeatcacheError, match=r"label 'Mass' \(column 1\) has 3 negative patients"):
        sample_episodes(PIDS, Y, shots=4, seeds=1, labels=[1], label_names=["Edema", "Mass"])


def test_episodes_are_reproducible_and_independent_of_the_other_requests():
    rng = np.random.default_rng(0)
    pids = np.repeat([f"p{i:03d}" for i in range(120)], 2)
    Y2 = (rng.random((240, 3)) < 0.5).astype(np.float32)
    a = sample_episodes(pids, Y2, shots=[2, 5], seeds=[0, 1, 2])
    b = sample_episodes(pids, Y2, shots=[2, 5], seeds=[0, 1, 2])
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    # The same (seed, shots, label) gives the same episode whatever else is asked for.
    only = sample_episodes(pids, Y2, shots=5, seeds=[2], labels=[1])[0]
    match = [e for e in a if (e.seed, e.shots, e.label) == (2, 5, 1)][0]
    np.testing.assert_array_equal(only.support, match.support)
    # Different seeds draw different supports.
    supports = {tuple(e.support) for e in a if e.shots == 5 and e.label == 0}
    assert len(supports) == 3
    assert [(e.shots, e.seed, e.label) for e in a][:4] == [(2, 0, 0), (2, 0, 1), (2, 0, 2), (2, 1, 0)]


def test_multiclass_support_is_k_patients_per_class_without_repeats():
    rng = np.random.default_rng(1)
    pids = np.repeat([f"p{i}" for i in range(40)], 3)
    y = rng.integers(0, 3, 120)
    y[::11] = -1
    for e in sample_episodes(pids, y, shots=[1, 4], seeds=5, task="multiclass"):
        assert e.label is None
        np.testing.assert_array_equal(np.bincount(e.targets, minlength=3), [e.shots] * 3)
        np.testing.assert_array_equal(y[e.support], e.targets)
        assert len(set(pids[e.support])) == e.support.size
    with pytest.raises(FeatcacheError, match=r"class 'covid' \(index 2\) has 1 patients"):
        sample_episodes(
            np.arange(6).astype(str),
            np.array([0, 0, 1, 1, 2, 0]),
            2,
            1,
            "multiclass",
            None,
            ["a", "b", "covid"],
        )


def test_episode_json_round_trip():
    e = sample_episodes(PIDS, Y, shots=2, seeds=[7], labels=[0])[0]
    back = Episode.from_dict(json.loads(json.dumps(e.to_dict())))
    assert (back.label, back.shots, back.seed) == (0, 2, 7)
    np.testing.assert_array_equal(back.support, e.support)
    np.testing.assert_array_equal(back.targets, e.targets)


@pytest.fixture
def features():
    """Train 400 rows (200 patients, 3 labels), test 300 rows, D = 24, with an offset to centre away."""
    rng = np.random.default_rng(2)
    W = rng.normal(size=(24, 3))

    def make(n):
        X = rng.normal(size=(n, 24)) + 2.0
        return X.astype(np.float32), (X @ W + 3 * rng.normal(size=(n, 3)) > 2 * W.sum(0)).astype(np.float32)

    (Xtr, Ytr), (Xte, Yte) = make(400), make(300)
    pids = np.repeat([f"p{i}" for i in range(200)], 2)
    return Xtr, Ytr, pids, Xte, Yte


def _cl2n(X, mu):
    Z = X.astype(np.float64) - mu
    return Z / np.linalg.norm(Z, axis=1, keepdims=True)


def test_logreg_head_matches_sklearn_per_episode(features):
    Xtr, Ytr, pids, Xte, Yte = features
    eps = sample_episodes(pids, Ytr, shots=[1, 3, 8], seeds=3)
    S = fewshot_scores(Xtr, eps, Xte, head="logreg", C=1.0)
    assert S.shape == (len(eps), 300)
    mu = Xtr.astype(np.float64).mean(0)
    A, B = _cl2n(Xtr, mu), _cl2n(Xte, mu)
    for i, e in enumerate(eps):
        ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(A[e.support], e.targets)
        p = ref.predict_proba(B)[:, 1]
        np.testing.assert_allclose(S[i], p, atol=2e-5)
        assert abs(roc_auc_score(Yte[:, e.label], S[i]) - roc_auc_score(Yte[:, e.label], p)) <= 1e-3


def test_logreg_head_multiclass_matches_sklearn_multinomial(features):
    Xtr, Ytr, pids, Xte, _ = features
    y = Ytr[:, 0].astype(np.int64) + Ytr[:, 1].astype(np.int64)
    eps = sample_episodes(pids, y, shots=[2, 5], seeds=2, task="multiclass")
    S = fewshot_scores(Xtr, eps, Xte, head="logreg", C=0.5)
    mu = Xtr.astype(np.float64).mean(0)
    A, B = _cl2n(Xtr, mu), _cl2n(Xte, mu)
    assert S.shape == (len(eps), 300, 3)
    for i, e in enumerate(eps):
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(A[e.support], e.targets)
        np.testing.assert_allclose(S[i], ref.predict_proba(B), atol=2e-5)


def _vote(sims, targets, k, T, n_classes):
    order = np.argsort(-sims, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sims, order, axis=1) / T)
    w /= w.sum(1, keepdims=True)
    return np.stack([(w * (targets[order] == c)).sum(1) for c in range(n_classes)], axis=1)


@pytest.mark.parametrize("k", [3, 50])
def test_knn_head_matches_brute_force_with_k_capped(features, k):
    Xtr, Ytr, pids, Xte, _ = features
    eps = sample_episodes(pids, Ytr, shots=[2, 6], seeds=2)
    S = fewshot_scores(Xtr, eps, Xte, head="knn", k=k, temperature=0.07)
    A, B = _cl2n(Xtr, 0.0), _cl2n(Xte, 0.0)
    for i, e in enumerate(eps):
        ref = _vote(B @ A[e.support].T, e.targets, min(k, e.support.size), 0.07, 2)[:, 1]
        # float32 cosines / 0.07 inside exp: a few 1e-6 of rounding against the float64 reference
        np.testing.assert_allclose(S[i], ref, atol=5e-6)
    y = Ytr[:, 0].astype(np.int64) + Ytr[:, 1].astype(np.int64)
    eps = sample_episodes(pids, y, shots=3, seeds=2, task="multiclass")
    S = fewshot_scores(Xtr, eps, Xte, head="knn", k=k)
    for i, e in enumerate(eps):
        np.testing.assert_allclose(S[i], _vote(B @ A[e.support].T, e.targets, min(k, 9), 0.07, 3), atol=1e-6)


def test_prototype_head_is_simpleshot(features):
    Xtr, Ytr, pids, Xte, _ = features
    eps = sample_episodes(pids, Ytr, shots=[1, 4], seeds=2)
    S = fewshot_scores(Xtr, eps, Xte, head="prototype", temperature=0.1)
    mu = Xtr.astype(np.float64).mean(0)
    A, B = _cl2n(Xtr, mu), _cl2n(Xte, mu)
    for i, e in enumerate(eps):
        means = np.stack([A[e.support[e.targets == c]].mean(0) for c in (0, 1)])
        cos = B @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
        np.testing.assert_allclose(S[i], 1 / (1 + np.exp(-(cos[:, 1] - cos[:, 0]) / 0.1)), atol=1e-5)


def test_heads_reject_bad_requests(features):
    Xtr, Ytr, pids, Xte, _ = features
    eps = sample_episodes(pids, Ytr, shots=1, seeds=1)
    with pytest.raises(FeatcacheError, match="unknown few-shot head"):
        fewshot_scores(Xtr, eps, Xte, head="svm")
    with pytest.raises(FeatcacheError, match="outside the 10 train rows"):
        fewshot_scores(Xtr[:10], [Episode(0, 1, 0, [3, 12], [1, 0])], Xte)
    with pytest.raises(FeatcacheError, match="does not hold every one"):
        fewshot_scores(Xtr, [Episode(0, 1, 0, [3, 4], [1, 1])], Xte)


def test_nih_chestxray14_episodes_at_scale(shared_data):
    """All 112,120 NIH images, 30,805 patients, 14 findings: episodes respect patient-level labels."""
    with gzip.open(shared_data / "nih_metadata" / "Data_Entry_2017_v2020.csv.gz", "rt") as f:
        rows = list(csv.DictReader(f))
    findings = sorted({x for r in rows for x in r["Finding Labels"].split("|")} - {"No Finding"})
    assert len(findings) == 14
    pids = np.array([r["Patient ID"] for r in rows])
    Yn = np.array([[x in r["Finding Labels"].split("|") for x in findings] for r in rows], dtype=np.float32)
    eps = sample_episodes(pids, Yn, shots=[1, 16], seeds=2, label_names=findings)
    assert len(eps) == 2 * 2 * 14
    for e in eps:
        patients = pids[e.support]
        assert len(set(patients)) == e.support.size
        positive_patients = set(pids[Yn[:, e.label] == 1])
        assert all(p in positive_patients for p in patients[: e.shots])
        assert not any(p in positive_patients for p in patients[e.shots :])
