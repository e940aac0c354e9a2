"""Metrics against scikit-learn and brute-force references, on random and tie-heavy data."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from featcache.errors import FeatcacheError
from probes.evaluation import metrics as M

REPO = Path(__file__).resolve().parents[1]


def _binary(rng, n, ties: bool):
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]  # both classes present
    s = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
    return y, s


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_matches_sklearn(ties):
    rng = np.random.default_rng(0)
    for _ in range(30):
        y, s = _binary(rng, int(rng.integers(2, 80)), ties)
        assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        w = rng.integers(1, 4, len(y)).astype(float)
        assert M.auroc(y, s, sample_weight=w) == pytest.approx(
            roc_auc_score(y, s, sample_weight=w), abs=1e-12
        )


def test_auroc_undefined_and_missing_labels():
    assert np.isnan(M.auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert np.isnan(M.auroc([], []))
    y = np.array([1, 0, np.nan, 1, 0, np.nan])
    s = np.array([0.9, 0.1, 0.0, 0.2, 0.5, 1.0])
    keep = ~np.isnan(y)
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y[keep], s[keep]))


def test_raw_uncertain_labels_are_refused():
    with pytest.raises(FeatcacheError, match="uncertain-label policy"):
        M.auroc([1, 0, -1], [0.1, 0.2, 0.3])


def test_auroc_rows_matches_sklearn_per_row():
    rng = np.random.default_rng(1)
    n, e = 60, 25
    y = rng.integers(0, 2, n)
    S = rng.integers(0, 5, (e, n)).astype(float)  # heavy ties, different per row
    S[::2] = rng.normal(size=(len(S[::2]), n))
    got = M.auroc_rows(y, S)
    assert got.shape == (e,)
    np.testing.assert_allclose(got, [roc_auc_score(y, row) for row in S], atol=1e-12)
    # per-row labels (e.g. episodes with different query rows), NaN = not a query row
    Y = rng.integers(0, 2, (e, n)).astype(float)
    Y[rng.random((e, n)) < 0.3] = np.nan
    Y[:, :2] = [0, 1]
    got = M.auroc_rows(Y, S)
    for i in range(e):
        keep = ~np.isnan(Y[i])
        assert got[i] == pytest.approx(roc_auc_score(Y[i, keep], S[i, keep]), abs=1e-12)


def test_auroc_per_label_and_mean_with_missing():
    rng = np.random.default_rng(2)
    n, labels = 120, 5
    Y = rng.integers(0, 2, (n, labels)).astype(float)
    Y[rng.random((n, labels)) < 0.2] = np.nan
    Y[:, 4] = np.where(np.isnan(Y[:, 4]), np.nan, 0.0)  # label 4: no positive at all
    S = np.round(rng.normal(size=(n, labels)), 1)
    got = M.auroc_per_label(Y, S)
    for j in range(4):
        keep = ~np.isnan(Y[:, j])
        assert got[j] == pytest.approx(roc_auc_score(Y[keep, j], S[keep, j]), abs=1e-12)
    assert np.isnan(got[4])
    assert M.mean_auroc(Y, S) == pytest.approx(np.mean(got[:4]))
    assert np.isnan(M.mean_auroc(np.zeros((3, 2)), np.ones((3, 2))))


def test_auroc_ovr_matches_sklearn_macro():
    rng = np.random.default_rng(3)
    n, c = 200, 4
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + np.eye(c)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert M.auroc_ovr(y, p) == pytest.approx(
        roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12
    )
    # a missing label (negative index) is left out
    y_missing = y.copy()
    y_missing[:10] = -1
    expected = roc_auc_score(y[10:], p[10:], multi_class="ovr", average="macro")
    assert M.auroc_ovr(y_missing, p) == pytest.approx(expected, abs=1e-12)


def test_accuracy_balanced_accuracy_f1_match_sklearn():
    rng = np.random.default_rng(4)
    for _ in range(20):
        y = rng.integers(0, 2, 50)
        y[:2] = [0, 1]
        pred = rng.integers(0, 2, 50)
        assert M.accuracy(y, pred) == pytest.approx(accuracy_score(y, pred))
        assert M.balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
        if pred.any() or y.any():
            assert M.f1(y, pred) == pytest.approx(f1_score(y, pred))
        yc = rng.integers(0, 4, 50)
        pc = rng.integers(0, 5, 50)  # a predicted class absent from y_true
        assert M.accuracy(yc, pc) == pytest.approx(accuracy_score(yc, pc))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns about the class absent from y_true
            expected = balanced_accuracy_score(yc, pc)
        assert M.balanced_accuracy(yc, pc) == pytest.approx(expected)
    assert np.isnan(M.f1([0, 0], [0, 0]))


def test_sensitivity_specificity_match_sklearn_recalls():
    rng = np.random.default_rng(5)
    y, s = _binary(rng, 90, ties=True)
    for t in (0.0, 1.0, 2.0, 3.5):
        pred = (s >= t).astype(int)
        sens, spec = M.sensitivity_specificity(y, s, t)
        assert sens == pytest.approx(recall_score(y, pred, pos_label=1))
        assert spec == pytest.approx(recall_score(y, pred, pos_label=0))


def test_youden_threshold_is_best_on_validation():
    rng = np.random.default_rng(6)
    for ties in (False, True):
        y, s = _binary(rng, 70, ties)
        t = M.youden_threshold(y, s)
        n_pos, n_neg = int(y.sum()), int((1 - y).sum())
        # brute force over every distinct score, exact integer J
        j = {
            c: int(((s >= c) & (y == 1)).sum()) * n_neg - int(((s >= c) & (y == 0)).sum()) * n_pos
            for c in set(s)
        }
        best = max(j.values())
        assert t == max(c for c, v in j.items() if v == best)
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        sens, spec = M.sensitivity_specificity(y, s, t)
        assert sens + spec - 1 == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    with pytest.raises(FeatcacheError, match="positives and negatives"):
        M.youden_threshold([0, 0, 0], [0.1, 0.2, 0.3])


def test_binary_metrics_agree_with_sklearn():
    rng = np.random.default_rng(7)
    y, s = _binary(rng, 100, ties=False)
    y = y.astype(float)
    y[:5] = np.nan
    keep = ~np.isnan(y)
    out = M.binary_metrics(y, s, threshold=0.2)
    yk, pk = y[keep].astype(int), (s[keep] >= 0.2).astype(int)
    assert out["auroc"] == pytest.approx(roc_auc_score(yk, s[keep]))
    assert out["accuracy"] == pytest.approx(accuracy_score(yk, pk))
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yk, pk))
    assert out["f1"] == pytest.approx(f1_score(yk, pk))
    assert out["sensitivity"] == pytest.approx(recall_score(yk, pk))
    assert out["specificity"] == pytest.approx(recall_score(yk, pk, pos_label=0))
    assert (out["n"], out["n_pos"]) == (keep.sum(), yk.sum())


def test_import_probes_never_imports_torch():
    code = (
        "import sys, probes, probes.evaluation.metrics, probes.evaluation.stats, probes.results, probes.report; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
