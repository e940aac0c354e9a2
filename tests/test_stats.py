"""Bootstrap, DeLong and Holm against hand-computed cases and plain-loop references."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from probes.evaluation import metrics as M
from probes.evaluation import stats as S

# --- DeLong -----------------------------------------------------------------------------------

# 5 positives then 5 negatives; image i has score A[i] under model a and B[i] under model b.
Y10 = [1] * 5 + [0] * 5
A10 = [0.9, 0.8, 0.7, 0.6, 0.4, 0.7, 0.5, 0.3, 0.2, 0.1]
B10 = [0.6, 0.9, 0.5, 0.3, 0.8, 0.4, 0.7, 0.2, 0.6, 0.1]


def test_delong_hand_computed():
    # Structural components, psi(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise:
    # model a: V10 = [5, 5, 4.5, 4, 3] / 5 = [1, 1, .9, .8, .6]  (0.7 ties the negative 0.7)
    #          V01 = [2.5, 4, 5, 5, 5] / 5 = [.5, .8, 1, 1, 1]    AUC_a = 4.3 / 5 = 0.86
    # model b: V10 = [3.5, 5, 3, 2, 5] / 5 = [.7, 1, .6, .4, 1]  (0.6 ties the negative 0.6)
    #          V01 = [4, 2, 5, 2.5, 5] / 5 = [.8, .4, 1, .5, 1]  AUC_b = 3.7 / 5 = 0.74
    # S10 (ddof 1): aa = .112/4 = .028, bb = .272/4 = .068, ab = -.022/4 = -.0055
    # S01 (ddof 1): aa = .192/4 = .048, bb = .312/4 = .078, ab =  .038/4 =  .0095
    # var_a = (.028 + .048)/5 = .0152, var_b = (.068 + .078)/5 = .0292, cov = (-.0055 + .0095)/5 = .0008
    # var(diff) = .0152 + .0292 - 2 * .0008 = .0428, z = .12 / sqrt(.0428)
    res = S.delong(Y10, A10, B10)
    assert res.auc_a == pytest.approx(0.86)
    assert res.auc_b == pytest.approx(0.74)
    assert res.diff == pytest.approx(0.12)
    assert res.var == pytest.approx(0.0428)
    z = 0.12 / math.sqrt(0.0428)
    assert res.z == pytest.approx(z)
    assert res.p == pytest.approx(math.erfc(z / math.sqrt(2)))
    assert S.delong_var(Y10, A10) == pytest.approx((0.86, 0.0152))
    assert S.delong_var(Y10, B10) == pytest.approx((0.74, 0.0292))


def _delong_brute(y, scores):
    """DeLong from placement values by explicit double loops: AUCs [K], covariance [K, K]."""
    y = np.asarray(y)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n = len(pos), len(neg)
    k = len(scores)
    v10, v01 = np.zeros((k, m)), np.zeros((k, n))
    for r, s in enumerate(scores):
        for a, i in enumerate(pos):
            for b, j in enumerate(neg):
                psi = 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
                v10[r, a] += psi / n
                v01[r, b] += psi / m
    auc = v10.mean(axis=1)
    s10 = np.array(
        [[np.sum((v10[p] - auc[p]) * (v10[q] - auc[q])) / (m - 1) for q in range(k)] for p in range(k)]
    )
    s01 = np.array(
        [[np.sum((v01[p] - auc[p]) * (v01[q] - auc[q])) / (n - 1) for q in range(k)] for p in range(k)]
    )
    return auc, s10 / m + s01 / n


def test_delong_matches_brute_force_placement_values():
    rng = np.random.default_rng(0)
    for ties in (False, True):
        y = rng.integers(0, 2, 40)
        y[:4] = [0, 0, 1, 1]
        a = rng.integers(0, 5, 40).astype(float) if ties else rng.normal(size=40) + y
        b = rng.integers(0, 3, 40).astype(float) if ties else rng.normal(size=40) + 0.5 * y
        auc, cov = _delong_brute(y, [a, b])
        res = S.delong(y, a, b)
        assert (res.auc_a, res.auc_b) == pytest.approx((roc_auc_score(y, a), roc_auc_score(y, b)))
        assert (res.auc_a, res.auc_b) == pytest.approx(tuple(auc))
        assert res.var == pytest.approx(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
        assert S.delong_var(y, a)[1] == pytest.approx(cov[0, 0])


def test_delong_identical_curves_and_degenerate_input():
    res = S.delong(Y10, A10, A10)
    assert (res.diff, res.z, res.p) == (0.0, 0.0, 1.0)
    assert all(math.isnan(v) for v in S.delong([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]))


# --- Holm -------------------------------------------------------------------------------------


def test_holm_known_example_with_nan():
    # sorted: .005*4 = .02, .01*3 = .03, .03*2 = .06, .04*1 = .04 -> running max .06
    got = S.holm([0.01, np.nan, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(got, [0.03, np.nan, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(S.holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1, monotone
    assert np.isnan(S.holm([np.nan])).all()


# --- bootstrap --------------------------------------------------------------------------------


def _clustered(rng, n_patients=40, max_images=4):
    """Labels/scores where images of a patient share label and roughly the score."""
    sizes = rng.integers(1, max_images + 1, n_patients)
    pid = np.repeat([f"p{i:03d}" for i in range(n_patients)], sizes)
    y_pat = rng.integers(0, 2, n_patients)
    y_pat[:2] = [0, 1]
    y = np.repeat(y_pat, sizes)
    s = np.round(np.repeat(rng.normal(size=n_patients) + y_pat, sizes) + 0.3 * rng.normal(size=len(y)), 1)
    return y, s, pid


def _naive_values(metric, y, s, pid, n_boot, seed):
    """The documented draws, resampled by a plain loop over patients."""
    patients = np.unique(pid)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(patients), size=(n_boot, len(patients)))
    values = []
    for draw in draws:
        idx = np.concatenate([np.flatnonzero(pid == patients[p]) for p in draw])
        values.append(metric(y[idx], s[idx]))
    return np.array(values)


def _safe_auc(y, s):
    return roc_auc_score(y, s) if len(np.unique(y)) == 2 else np.nan


def test_bootstrap_ci_equals_naive_loop_and_contains_estimate():
    rng = np.random.default_rng(1)
    y, s, pid = _clustered(rng)
    naive = _naive_values(_safe_auc, y, s, pid, n_boot=200, seed=7)
    ok = ~np.isnan(naive)
    expected = np.percentile(naive[ok], [2.5, 97.5])
    ci = S.bootstrap_ci(M.auroc, y, s, pid, n_boot=200, seed=7)
    assert tuple(ci) == pytest.approx(tuple(expected), abs=1e-12)
    assert ci.n_skipped == (~ok).sum()
    assert ci.low <= M.auroc(y, s) <= ci.high
    # a metric without a fast path goes through the per-draw loop and must agree too
    bacc = _naive_values(lambda a, b: balanced_accuracy_score(a, b > 0.5), y, s, pid, 100, 3)
    ci = S.bootstrap_ci(
        lambda a, b: M.balanced_accuracy(a, (b > 0.5).astype(int)), y, s, pid, n_boot=100, seed=3
    )
    assert tuple(ci) == pytest.approx(tuple(np.percentile(bacc, [2.5, 97.5])), abs=1e-12)


def test_bootstrap_per_label_fast_path_equals_per_draw_loop():
    rng = np.random.default_rng(2)
    y, s, pid = _clustered(rng, n_patients=30)
    Y = np.stack([y, rng.integers(0, 2, len(y)), np.where(rng.random(len(y)) < 0.3, np.nan, y)], axis=1)
    Sc = np.stack([s, np.round(rng.normal(size=len(y)), 1), -s], axis=1)
    fast = S.bootstrap_values(M.auroc_per_label, Y, Sc, pid, n_boot=60, seed=5)
    loop = S.bootstrap_values(lambda a, b: M.auroc_per_label(a, b), Y, Sc, pid, n_boot=60, seed=5)
    assert fast.shape == (60, 3)
    np.testing.assert_allclose(fast, loop, atol=1e-12)
    fast_mean = S.bootstrap_values(M.mean_auroc, Y, Sc, pid, n_boot=60, seed=5)
    np.testing.assert_allclose(fast_mean, np.nanmean(loop, axis=1), atol=1e-12)
    ci = S.bootstrap_ci(M.auroc_per_label, Y, Sc, pid, n_boot=60, seed=5)
    assert ci.low.shape == (3,) and (ci.low <= ci.high).all()


def test_patients_stay_together():
    # two images per patient with the same label and score: any patient-level resample holds each
    # (label, score) an even number of times; an image-level resample would not
    rng = np.random.default_rng(3)
    y, s, pid = _clustered(rng, max_images=1)
    y2, s2, pid2 = np.repeat(y, 2), np.repeat(s + np.arange(len(s)), 2), np.repeat(pid, 2)

    def all_pairs(yy, ss):
        _, counts = np.unique(ss, return_counts=True)
        return float(np.all(counts % 2 == 0))

    assert np.all(S.bootstrap_values(all_pairs, y2, s2, pid2, n_boot=50, seed=0) == 1.0)


def test_duplicated_images_do_not_narrow_the_patient_ci():
    # repeating every image of a patient adds no information: the patient-level interval is
    # unchanged (an image-level bootstrap would shrink it by about sqrt(3))
    rng = np.random.default_rng(4)
    y, s, pid = _clustered(rng)
    ci1 = S.bootstrap_ci(M.auroc, y, s, pid, n_boot=300, seed=11)
    ci3 = S.bootstrap_ci(M.auroc, np.tile(y, 3), np.tile(s, 3), np.tile(pid, 3), n_boot=300, seed=11)
    assert tuple(ci3) == pytest.approx(tuple(ci1), abs=1e-12)


def test_undefined_draws_are_skipped_and_counted():
    # two positive patients: draws that miss both have no positives, so AUROC is undefined there
    n = 12
    pid = np.array([f"p{i:02d}" for i in range(n)])
    y = np.zeros(n)
    y[:2] = 1
    s = np.linspace(0, 1, n)
    patients, draws = S.bootstrap_draws(pid, n_boot=300, seed=2)
    pos = np.searchsorted(patients, ["p00", "p01"])
    without_positive = int(np.sum(~np.isin(draws, pos).any(axis=1)))
    ci = S.bootstrap_ci(M.auroc, y, s, pid, n_boot=300, seed=2)
    assert 0 < ci.n_skipped == without_positive
    assert ci.n_boot == 300 and ci.reason is None
    again = pickle.loads(pickle.dumps(ci))  # e.g. returned from a worker process
    assert (tuple(again), again.n_boot, again.n_skipped) == (tuple(ci), 300, ci.n_skipped)


def test_paired_bootstrap_same_draws_for_both():
    rng = np.random.default_rng(5)
    y, s, pid = _clustered(rng)
    b = np.round(s + rng.normal(size=len(s)), 1)
    res = S.paired_bootstrap(M.auroc, y, s, b, pid, n_boot=200, seed=9)
    assert res.diff == pytest.approx(roc_auc_score(y, s) - roc_auc_score(y, b))
    naive = _naive_values(
        lambda yy, ss: _safe_auc(yy, ss[:, 0]) - _safe_auc(yy, ss[:, 1]), y, np.c_[s, b], pid, 200, 9
    )
    d = naive[~np.isnan(naive)]
    assert (res.low, res.high) == pytest.approx(tuple(np.percentile(d, [2.5, 97.5])), abs=1e-12)
    k = min((d <= 0).sum(), (d >= 0).sum())
    assert res.p == pytest.approx(min(1.0, 2 * (k + 1) / (len(d) + 1)))
    same = S.paired_bootstrap(M.auroc, y, s, s, pid, n_boot=50)
    assert (same.diff, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_detects_a_clearly_better_model():
    rng = np.random.default_rng(6)
    n = 400
    pid = np.repeat(np.arange(n // 2), 2).astype(str)
    y = rng.integers(0, 2, n)
    good, noise = y + 0.5 * rng.normal(size=n), rng.normal(size=n)
    diff, low, high, p = S.paired_bootstrap(M.auroc, y, good, noise, pid, n_boot=300)
    assert low > 0 and p < 0.01 and low <= diff <= high
