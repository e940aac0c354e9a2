"""Patient-level inference: clustered DeLong, the mean's bootstrap, too few patients, headline p.

References are independent of :mod:`probes.evaluation.stats`: Obuchowski's (1997) formulas written out with
explicit loops over images and patients, a hand-worked case, sklearn's ``roc_auc_score`` on draws
rebuilt from the documented seed, and the patient-level bootstrap variance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from probes.evaluation import metrics as M
from probes.evaluation import stats as S


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _obuchowski_brute(y, scores, pid):
    """AUCs [K] and covariance [K, K] from Obuchowski (1997), by plain loops.

    V10(X) = (1/N) sum_Y psi(X, Y) per positive image, V01(Y) = (1/M) sum_X psi(X, Y) per negative
    image; per patient i the sums V10_i over its positives and V01_i over its negatives, m_i and n_i
    its positive and negative image counts; I10 / I01 patients with a positive / negative image.
    """
    y, pid = np.asarray(y), np.asarray(pid)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    M_, N_ = len(pos), len(neg)
    patients = sorted(set(pid.tolist()))
    n_clusters = len(patients)
    k = len(scores)
    auc = np.zeros(k)
    v10_i = np.zeros((k, n_clusters))
    v01_i = np.zeros((k, n_clusters))
    m_i = np.array([sum(1 for r in pos if pid[r] == p) for p in patients], float)
    n_i = np.array([sum(1 for r in neg if pid[r] == p) for p in patients], float)
    for r, s in enumerate(scores):
        for a in pos:
            v = sum(_psi(s[a], s[b]) for b in neg) / N_
            v10_i[r, patients.index(pid[a])] += v
            auc[r] += v / M_
        for b in neg:
            v01_i[r, patients.index(pid[b])] += sum(_psi(s[a], s[b]) for a in pos) / M_
    I10, I01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    cov = np.zeros((k, k))
    for r in range(k):
        for q in range(k):
            d10r, d10q = v10_i[r] - m_i * auc[r], v10_i[q] - m_i * auc[q]
            d01r, d01q = v01_i[r] - n_i * auc[r], v01_i[q] - n_i * auc[q]
            s10 = I10 / ((I10 - 1) * M_) * np.sum(d10r * d10q)
            s01 = I01 / ((I01 - 1) * N_) * np.sum(d01r * d01q)
            s11_rq = n_clusters / (n_clusters - 1) * np.sum(d10r * d01q)
            s11_qr = n_clusters / (n_clusters - 1) * np.sum(d10q * d01r)
            cov[r, q] = s10 / M_ + s01 / N_ + (s11_rq + s11_qr) / (M_ * N_)
    return auc, cov


# 4 patients, 7 images: positives 0.9 (p1), 0.6 (p2), 0.25 (p4); negatives 0.3 (p1), 0.5, 0.7 (p3), 0.2 (p4)
HAND_Y = [1, 0, 1, 0, 0, 1, 0]
HAND_S = [0.9, 0.3, 0.6, 0.5, 0.7, 0.25, 0.2]
HAND_P = ["p1", "p1", "p2", "p3", "p3", "p4", "p4"]


def test_clustered_variance_hand_computed():
    # M = 3, N = 4.  V10: 0.9 -> 4/4, 0.6 -> 3/4, 0.25 -> 1/4; theta = 2/3
    # V01: 0.3 -> 2/3, 0.5 -> 2/3, 0.7 -> 1/3, 0.2 -> 3/3 (mean 2/3, as it must be)
    # per patient (V10_i, m_i; V01_i, n_i): p1 (1, 1; 2/3, 1), p2 (3/4, 1; 0, 0), p3 (0, 0; 1, 2),
    # p4 (1/4, 1; 1, 1); I = 4, I10 = 3, I01 = 3
    # D10 = V10_i - m_i theta = (1/3, 1/12, 0, -5/12): sum of squares 42/144 -> S10 = 3/(2*3) * 7/24 = 7/48
    # D01 = V01_i - n_i theta = (0, 0, -1/3, 1/3): sum of squares 2/9 -> S01 = 3/(2*4) * 2/9 = 1/12
    # S11 = 4/3 * sum D10 D01 = 4/3 * (-5/36) = -5/27
    # var = S10/M + S01/N + 2 S11/(MN) = 63/1296 + 27/1296 - 40/1296 = 25/648
    auc, var = S.clustered_delong_var(HAND_Y, HAND_S, HAND_P)
    assert auc == pytest.approx(2 / 3, abs=1e-15)
    assert var == pytest.approx(25 / 648, abs=1e-15)
    b_auc, b_cov = _obuchowski_brute(HAND_Y, [HAND_S], HAND_P)
    assert var == pytest.approx(b_cov[0, 0], abs=1e-15) and auc == pytest.approx(b_auc[0])
    # the image-level DeLong variance of the same data differs (S11 and the cluster sums are ignored)
    assert abs(S.delong_var(HAND_Y, HAND_S)[1] - var) > 1e-3


def test_clustered_paired_test_matches_the_formulas_by_loops():
    rng = np.random.default_rng(0)
    for ties in (False, True):
        sizes = rng.integers(1, 4, 12)
        pid = np.repeat([f"q{i}" for i in range(12)], sizes)
        y = rng.integers(0, 2, len(pid)).astype(float)
        y[:2], y[-2:] = 1, 0
        a = rng.integers(0, 4, len(y)).astype(float) if ties else rng.normal(size=len(y)) + y
        b = rng.integers(0, 3, len(y)).astype(float) if ties else rng.normal(size=len(y)) + 0.3 * y
        auc, cov = _obuchowski_brute(y, [a, b], pid)
        res = S.clustered_delong(y, a, b, pid)
        assert (res.auc_a, res.auc_b) == pytest.approx((roc_auc_score(y, a), roc_auc_score(y, b)))
        assert (res.auc_a, res.auc_b) == pytest.approx(tuple(auc), abs=1e-12)
        var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
        assert res.var == pytest.approx(var, abs=1e-13)
        assert res.se == pytest.approx(math.sqrt(var))
        assert res.z == pytest.approx((auc[0] - auc[1]) / math.sqrt(var))
        assert res.p == pytest.approx(math.erfc(abs(res.z) / math.sqrt(2)))
        assert res.reason is None
        assert (res.n_pos_patients, res.n_neg_patients) == (
            len(set(pid[y == 1])),
            len(set(pid[y == 0])),
        )


def test_one_image_per_patient_reduces_to_delong():
    rng = np.random.default_rng(1)
    for ties in (False, True):
        n = 60
        y = rng.integers(0, 2, n).astype(float)
        y[:2], y[2:4] = 1, 0
        a = rng.integers(0, 5, n).astype(float) if ties else rng.normal(size=n) + y
        b = rng.integers(0, 3, n).astype(float) if ties else rng.normal(size=n) + 0.5 * y
        y[5] = np.nan  # a missing label leaves its row out of both
        pid = rng.permutation([f"u{i:03d}" for i in range(n)])
        c, d = S.clustered_delong(y, a, b, pid), S.delong(y, a, b)
        for got, want in ((c.diff, d.diff), (c.var, d.var), (c.z, d.z), (c.p, d.p)):
            assert abs(got - want) <= 1e-12
        assert abs(S.clustered_delong_var(y, a, pid)[1] - S.delong_var(y, a)[1]) <= 1e-12


def test_repeated_images_add_no_information_to_the_clustered_test():
    # every image repeated 3 times in its patient: the clustered variance is unchanged (the
    # repeats are not new patients) while image-level DeLong shrinks it 3-fold
    rng = np.random.default_rng(2)
    n = 40
    y = rng.integers(0, 2, n).astype(float)
    y[:2], y[2:4] = 1, 0
    a, b = rng.normal(size=n) + y, rng.normal(size=n) + 0.4 * y
    pid = np.array([f"r{i}" for i in range(n)])
    once = S.clustered_delong(y, a, b, pid)
    thrice = S.clustered_delong(np.tile(y, 3), np.tile(a, 3), np.tile(b, 3), np.tile(pid, 3))
    assert thrice.var == pytest.approx(once.var, rel=1e-12) and thrice.p == pytest.approx(once.p)
    naive = S.delong(np.tile(y, 3), np.tile(a, 3), np.tile(b, 3))
    assert naive.var == pytest.approx(once.var / 3, rel=0.05) and naive.p < once.p


def _simulated_clustered(rng, n_pat=150):
    """Patients with 1-5 images, labels mixed within a patient, scores sharing a patient effect."""
    sizes = rng.integers(1, 6, n_pat)
    pid = np.repeat(np.arange(n_pat), sizes).astype(str)
    prevalence = np.repeat(rng.random(n_pat), sizes)
    y = (rng.random(len(pid)) < prevalence).astype(float)
    ua, ub = np.repeat(rng.normal(size=(2, n_pat)), sizes, axis=1)
    a = y + ua + 0.5 * rng.normal(size=len(y))
    b = 0.7 * y + ub + 0.5 * rng.normal(size=len(y))
    return y, a, b, pid


def test_clustered_variance_agrees_with_the_patient_bootstrap():
    rng = np.random.default_rng(0)
    y, a, b, pid = _simulated_clustered(rng)
    n_boot = 4000  # relative Monte-Carlo error of a bootstrap variance: about sqrt(2 / B) = 2.2%
    va = S.bootstrap_values(M.auroc, y, a, pid, n_boot, seed=1)
    vb = S.bootstrap_values(M.auroc, y, b, pid, n_boot, seed=1)
    assert not np.isnan(va).any()
    res = S.clustered_delong(y, a, b, pid)
    boot_diff, boot_a = np.var(va - vb, ddof=1), np.var(va, ddof=1)
    assert boot_diff / res.var == pytest.approx(1.0, abs=0.1)
    assert boot_a / S.clustered_delong_var(y, a, pid).var == pytest.approx(1.0, abs=0.1)
    # image-level DeLong misses the within-patient correlation by far more than that
    assert S.delong(y, a, b).var / boot_diff < 0.8
    assert S.delong_var(y, a)[1] / boot_a < 0.8


# --- the mean's bootstrap averages the same labels in every draw ---------------------------------


def _rare_labels(rng, n_pat=53, n_labels=13, per=4):
    """Multi-label test set: 6 common easy labels, 7 rare hard ones (2-4 positive patients each)."""
    pid = np.repeat(np.arange(n_pat), per).astype(str)
    Y = np.zeros((len(pid), n_labels))
    Sc = np.zeros((len(pid), n_labels))
    for j in range(n_labels):
        rare = j >= 6
        positive = np.isin(np.arange(n_pat), rng.choice(n_pat, 2 + j % 3 if rare else 20, replace=False))
        Y[:, j] = np.repeat(positive, per)
        patient = np.repeat(rng.normal(size=n_pat), per)
        Sc[:, j] = (-1.0 if rare else 2.0) * Y[:, j] + patient + 0.5 * rng.normal(size=len(pid))
    return Y, Sc, pid


def test_mean_auroc_draws_centre_on_the_point_estimate():
    rng = np.random.default_rng(2)
    Y, Sc, pid = _rare_labels(rng)
    point = M.mean_auroc(Y, Sc)
    n_boot = 2000
    draws = S.bootstrap_values(M.mean_auroc, Y, Sc, pid, n_boot, seed=0)
    ok = ~np.isnan(draws)
    mc_error = draws[ok].std() / math.sqrt(ok.sum())
    assert abs(draws[ok].mean() - point) < 4 * mc_error
    # a mean over whichever labels a draw keeps drops the rare hard labels now and then and
    # centres well above the point estimate
    per_label = S.bootstrap_values(M.auroc_per_label, Y, Sc, pid, n_boot, seed=0)
    mixed = np.nanmean(per_label, axis=1)
    assert mixed.mean() - point > 8 * mixed.std() / math.sqrt(n_boot)
    # the rejected draws are exactly those missing a class of some label, and are counted
    assert (~ok).sum() == np.isnan(per_label).any(axis=1).sum() > 0
    ci = S.bootstrap_ci(M.mean_auroc, Y, Sc, pid, n_boot, seed=0)
    assert ci.n_skipped == (~ok).sum() and ci.reason is None
    assert ci.low < point < ci.high


def test_paired_mean_draws_centre_on_the_difference():
    rng = np.random.default_rng(3)
    Y, Sa, pid = _rare_labels(rng)
    Sb = np.where(Y == 1, 1.0, 0.0) * rng.normal(1.0, 1.0, Y.shape) + rng.normal(size=Y.shape)
    diff = M.mean_auroc(Y, Sa) - M.mean_auroc(Y, Sb)
    n_boot = 2000
    d = S.bootstrap_values(M.mean_auroc, Y, Sa, pid, n_boot, 0) - S.bootstrap_values(
        M.mean_auroc, Y, Sb, pid, n_boot, 0
    )
    ok = ~np.isnan(d)
    assert abs(d[ok].mean() - diff) < 4 * d[ok].std() / math.sqrt(ok.sum())
    res = S.paired_bootstrap(M.mean_auroc, Y, Sa, Sb, pid, n_boot, 0)
    assert res.diff == pytest.approx(diff)
    assert (res.low, res.high) == pytest.approx(tuple(np.percentile(d[ok], [2.5, 97.5])), abs=1e-12)
    assert res.n_skipped == (~ok).sum() > 0


def _sklearn_mean_draws(Y, Sa, Sb, pid, n_boot, seed):
    """Mean AUROC of each documented draw by sklearn, NaN where a label of the mean lacks a class."""
    patients = np.unique(pid)
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(n_boot, len(patients)))
    in_mean = [j for j in range(Y.shape[1]) if len(np.unique(Y[:, j])) == 2]
    out = np.full((2, n_boot), np.nan)
    for b, draw in enumerate(draws):
        idx = np.concatenate([np.flatnonzero(pid == patients[p]) for p in draw])
        if all(len(np.unique(Y[idx, j])) == 2 for j in in_mean):
            for r, Sc in enumerate((Sa, Sb)):
                out[r, b] = np.mean([roc_auc_score(Y[idx, j], Sc[idx, j]) for j in in_mean])
    return out


def test_mean_bootstrap_recomputed_with_sklearn_from_the_seed():
    rng = np.random.default_rng(4)
    n_pat = 25
    sizes = rng.integers(1, 4, n_pat)
    pid = np.repeat([f"s{i:02d}" for i in range(n_pat)], sizes)
    Y = np.zeros((len(pid), 4))
    for j, k in enumerate((12, 3, 2, 0)):  # label 3 has no positive: not in the mean
        Y[:, j] = np.repeat(np.isin(np.arange(n_pat), rng.choice(n_pat, k, replace=False)), sizes)
    Sa = np.round(Y + rng.normal(size=Y.shape), 1)
    Sb = np.round(0.5 * Y + rng.normal(size=Y.shape), 1)
    ref_a, ref_b = _sklearn_mean_draws(Y, Sa, Sb, pid, 100, seed=5)
    ok = ~np.isnan(ref_a)
    assert 0 < (~ok).sum() < 100
    ci = S.bootstrap_ci(M.mean_auroc, Y, Sa, pid, n_boot=100, seed=5)
    assert tuple(ci) == pytest.approx(tuple(np.percentile(ref_a[ok], [2.5, 97.5])), abs=1e-12)
    assert ci.n_skipped == (~ok).sum()
    d = (ref_a - ref_b)[ok]
    res = S.paired_bootstrap(M.mean_auroc, Y, Sa, Sb, pid, n_boot=100, seed=5)
    assert (res.low, res.high) == pytest.approx(tuple(np.percentile(d, [2.5, 97.5])), abs=1e-12)
    k = min((d <= 0).sum(), (d >= 0).sum())
    assert res.p == pytest.approx(min(1.0, 2 * (k + 1) / (len(d) + 1)))
    assert res.n_skipped == (~ok).sum()


# --- no interval or p-value from too few patients ----------------------------------------------


def _one_positive_patient():
    # p0 holds the only positives (two images); 9 negative patients
    pid = np.array(["p0", "p0"] + [f"n{i}" for i in range(9)])
    y = np.array([1.0, 1.0] + [0.0] * 9)
    s = np.linspace(0, 1, len(y))[::-1]
    return y, s, pid


def test_no_ci_or_p_from_one_positive_patient():
    y, s, pid = _one_positive_patient()
    b = s[::-1].copy()
    ci = S.bootstrap_ci(M.auroc, y, s, pid, n_boot=100)
    assert math.isnan(ci.low) and math.isnan(ci.high) and ci.reason == "1 positive patient"
    assert ci.n_skipped == 100
    pb = S.paired_bootstrap(M.auroc, y, s, b, pid, n_boot=100)
    assert pb.diff == pytest.approx(roc_auc_score(y, s) - roc_auc_score(y, b))
    assert all(math.isnan(v) for v in (pb.low, pb.high, pb.p)) and pb.reason == "1 positive patient"
    cd = S.clustered_delong(y, s, b, pid)
    assert math.isnan(cd.p) and math.isnan(cd.se) and cd.reason == "1 positive patient"
    assert cd.diff == pytest.approx(pb.diff)
    assert S.clustered_delong_var(y, s, pid).reason == "1 positive patient"
    hp = S.headline_p(y, s, b, pid)
    assert math.isnan(hp.p) and hp.reason == "1 positive patient" and hp.p_method == "clustered_delong"


def test_per_label_reasons_and_other_metrics():
    y, s, pid = _one_positive_patient()
    Y = np.stack([y, 1 - y, np.r_[1.0, 0.0, 1.0, 1.0, [0.0] * 7]], axis=1)
    Sc = np.stack([s, s, s], axis=1)
    ci = S.bootstrap_ci(M.auroc_per_label, Y, Sc, pid, n_boot=100, seed=1)
    # label 0: one positive patient; label 1: its negatives are p0's two images; label 2: fine
    assert ci.reason == ["1 positive patient", "1 negative patient", None]
    assert np.isnan(ci.low[:2]).all() and np.isnan(ci.high[:2]).all()
    assert list(ci.n_skipped[:2]) == [100, 100]
    alone = S.bootstrap_ci(M.auroc, Y[:, 2], s, pid, n_boot=100, seed=1)
    assert (ci.low[2], ci.high[2], ci.n_skipped[2]) == (alone.low, alone.high, alone.n_skipped)
    # a patient holding both classes counts on both sides: one patient is still one patient
    one = S.bootstrap_ci(M.auroc, [1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2], ["a"] * 4, n_boot=20)
    assert one.reason == "1 positive patient, 1 negative patient" and math.isnan(one.low)
    acc = S.bootstrap_ci(lambda a, b: M.accuracy(a, b > 0.5), [1, 0], [0.9, 0.1], ["a", "a"], n_boot=20)
    assert acc.reason == "1 patient" and math.isnan(acc.low) and math.isnan(acc.high)


# --- the headline p ---------------------------------------------------------------------------


def test_headline_p_picks_a_patient_level_test():
    rng = np.random.default_rng(5)
    y, a, b, pid = _simulated_clustered(rng, n_pat=60)
    hp = S.headline_p(y, a, b, pid)
    cd = S.clustered_delong(y, a, b, pid)
    assert (hp.p_method, hp.p, hp.diff, hp.reason) == ("clustered_delong", cd.p, cd.diff, None)
    # one image per patient: ordinary DeLong (which the clustered form equals there)
    first = np.unique(pid, return_index=True)[1]
    hp1 = S.headline_p(y[first], a[first], b[first], pid[first])
    assert hp1.p_method == "delong" and hp1.p == S.delong(y[first], a[first], b[first]).p
    # a patient with a second image whose label is missing still counts as one image
    y_missing = np.r_[y[first], np.nan]
    pid_missing = np.append(pid[first], pid[first][0])
    hp2 = S.headline_p(y_missing, np.r_[a[first], 0.0], np.r_[b[first], 0.0], pid_missing)
    assert hp2.p_method == "delong" and hp2.p == pytest.approx(hp1.p)
    # the bootstrap on request, and for the mean over labels
    boot = S.headline_p(y, a, b, pid, method="paired_patient_bootstrap", n_boot=200, seed=3)
    assert boot.p_method == "paired_patient_bootstrap"
    assert boot.p == S.paired_bootstrap(M.auroc, y, a, b, pid, 200, 3).p
    Y = np.stack([y, 1 - y], axis=1)
    mean = S.headline_p(Y, np.c_[a, -a], np.c_[b, -b], pid, n_boot=200, seed=3)
    want = S.paired_bootstrap(M.mean_auroc, Y, np.c_[a, -a], np.c_[b, -b], pid, 200, 3)
    assert (mean.p_method, mean.p, mean.diff) == ("paired_patient_bootstrap", want.p, want.diff)
    with pytest.raises(ValueError, match="needs y"):
        S.headline_p(Y, np.c_[a, a], np.c_[b, b], pid, method="clustered_delong")


def test_clustered_p_is_not_overconfident_on_repeated_images():
    # the audit's failure in miniature: 8 images per patient, scores nearly shared in a patient;
    # image-level DeLong calls a difference significant that the patients do not support
    rng = np.random.default_rng(6)
    n_pat = 40
    pid = np.repeat(np.arange(n_pat).astype(str), 8)
    y = np.repeat(rng.integers(0, 2, n_pat), 8).astype(float)
    y[:8], y[8:16] = 1, 0
    a = np.repeat(rng.normal(size=n_pat), 8) + 0.8 * y + 0.05 * rng.normal(size=len(y))
    b = np.repeat(rng.normal(size=n_pat), 8) + 0.8 * y + 0.05 * rng.normal(size=len(y))
    naive, clustered = S.delong(y, a, b), S.clustered_delong(y, a, b, pid)
    boot = S.paired_bootstrap(M.auroc, y, a, b, pid, n_boot=1000, seed=0)
    assert naive.var < clustered.var / 4
    assert clustered.p > naive.p
    # the clustered test and the paired patient bootstrap tell the same story
    assert clustered.se == pytest.approx((boot.high - boot.low) / (2 * 1.96), rel=0.25)
