"""DeLong's test and its clustered (patient-level) form; re-exported by :mod:`probes.evaluation.stats`.

Both rest on the structural components (placement values) of the Mann-Whitney AUROC, with
``psi(x, y) = 1`` if x > y, 1/2 if x == y, 0 otherwise, M positive and N negative rows, and
``theta = sum psi(X, Y) / (M N)``:

- ``V10(X) = (1/N) sum_Y psi(X, Y)`` for each positive row X (share of negatives below it),
- ``V01(Y) = (1/M) sum_X psi(X, Y)`` for each negative row Y (share of positives above it).

**DeLong** (DeLong, DeLong & Clarke-Pearson 1988; fast midrank algorithm of Sun & Xu 2014) treats
rows as independent: ``var = S10 / M + S01 / N`` with S10, S01 the sample covariances (ddof 1) of the
V10 and V01 values.

**Clustered DeLong** (Obuchowski 1997, "Nonparametric analysis of clustered ROC curve data",
Biometrics 53:567-578) treats *patients* (clusters) as the independent units; a patient may hold
several images, positives and negatives alike. With I patients, m_i positive and n_i negative rows
in patient i, ``V10_i = sum of V10 over patient i's positives`` and ``V01_i`` likewise over its
negatives, I10 (I01) the number of patients with at least one positive (negative) row:

- ``S10 = I10 / ((I10 - 1) M) * sum_i (V10_i - m_i theta)^2``
- ``S01 = I01 / ((I01 - 1) N) * sum_i (V01_i - n_i theta)^2``
- ``S11 = I / (I - 1) * sum_i (V10_i - m_i theta)(V01_i - n_i theta)``
- ``var(theta) = S10 / M + S01 / N + 2 S11 / (M N)``

and between two score vectors r, s on the same rows the same sums taken over cross products,
``cov(theta_r, theta_s) = S10^rs / M + S01^rs / N + (S11^rs + S11^sr) / (M N)``. When every patient
holds one image, S11 = 0 and S10, S01 are DeLong's: the two agree exactly.

Both need at least 2 positive and 2 negative units (rows for DeLong, patients for the clustered
form); with fewer the variance, z and p are NaN and ``reason`` says why.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from probes.evaluation.rank_metrics import _binary_labels, _finite_scores, _tie_bounds

MIN_PATIENTS = 2  # positive and negative units a variance, CI or p-value needs


class DeLongResult(NamedTuple):
    """Outcome of :func:`delong` (all floats)."""

    auc_a: float
    auc_b: float
    diff: float  # auc_a - auc_b
    var: float  # variance of diff
    z: float
    p: float  # two-sided


class ClusteredDeLongResult(NamedTuple):
    """Outcome of :func:`clustered_delong`.

    ``diff = auc_a - auc_b``, ``se = sqrt(var)``, ``z = diff / se``, ``p`` two-sided normal;
    ``n_pos_patients`` / ``n_neg_patients`` count patients with at least one positive / negative
    row; ``reason`` is None, or why var, se, z and p are NaN (e.g. ``"1 positive patient"``).
    """

    diff: float
    se: float
    z: float
    p: float
    auc_a: float
    auc_b: float
    var: float
    n_pos_patients: int
    n_neg_patients: int
    reason: str | None


class AUCVar(tuple):
    """``(auc, var)`` of one score vector; unpacks as a 2-tuple, ``reason`` says why var is NaN."""

    def __new__(cls, auc: float, var: float, reason: str | None = None):
        self = super().__new__(cls, (auc, var))
        self.reason = reason
        return self

    def __getnewargs__(self):
        return (*self, self.reason)

    auc = property(lambda self: self[0])
    var = property(lambda self: self[1])


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties sharing their mean rank: float64, same shape."""
    order = np.argsort(x, axis=-1)
    xs = np.take_along_axis(x, order, axis=-1)
    first, last = _tie_bounds(xs)
    idx = np.broadcast_to(np.arange(x.shape[-1], dtype=np.float64), x.shape)
    sorted_ranks = idx + 1 if first is None else (first + last) / 2 + 1
    ranks = np.empty(x.shape)
    np.put_along_axis(ranks, order, sorted_ranks, axis=-1)
    return ranks


def _placements(yy: np.ndarray, s: np.ndarray):
    """AUROCs [K], V10 [K, M] and V01 [K, N] of K score vectors [K, n] on labels yy [n] (0/1 only)."""
    x, z = s[:, yy == 1], s[:, yy == 0]
    m, n = x.shape[1], z.shape[1]
    t = _midranks(np.concatenate([x, z], axis=1))
    auc = (t[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (t[:, :m] - _midranks(x)) / n  # share of negatives below each positive
    v01 = 1.0 - (t[:, m:] - _midranks(z)) / m  # share of positives above each negative
    return auc, v10, v01


def _known(y, scores, patient_ids=None):
    """Labels [n'], scores [K, n'] (and patient ids) of the rows with a label."""
    yy = _binary_labels(y)
    s = _finite_scores(scores)
    if s.shape[-1] != len(yy):
        raise ValueError(f"scores have {s.shape[-1]} rows but y has {len(yy)}")
    ok = ~np.isnan(yy)
    if patient_ids is None:
        return yy[ok], s[:, ok], None
    pid = np.asarray(patient_ids)
    if pid.shape != yy.shape:
        raise ValueError(f"patient_ids has shape {pid.shape} but y has {yy.shape}")
    return yy[ok], s[:, ok], pid[ok]


def _delong_components(y, scores: np.ndarray):
    """AUROCs [K] and DeLong covariance [K, K] of K score vectors [K, n] on one binary label."""
    yy, s, _ = _known(y, scores)
    k = len(s)
    m, n = int((yy == 1).sum()), int((yy == 0).sum())
    if m == 0 or n == 0:
        return np.full(k, np.nan), np.full((k, k), np.nan)
    auc, v10, v01 = _placements(yy, s)
    if m < 2 or n < 2:
        return auc, np.full((k, k), np.nan)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return auc, cov


def _count_reason(n_pos: int, n_neg: int, unit: str = "patient") -> str | None:
    """None when both counts reach :data:`MIN_PATIENTS`, else e.g. ``"1 positive patient"``."""
    short = []
    for count, side in ((n_pos, "positive"), (n_neg, "negative")):
        if count < MIN_PATIENTS:
            short.append(f"{count} {side} {unit}{'' if count == 1 else 's'}")
    return ", ".join(short) or None


def _patients_per_class(yy: np.ndarray, pid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct patients with a positive / a negative row per label of yy [n, L]: int [L] each."""
    _, inv = np.unique(pid, return_inverse=True)
    n_pat = int(inv.max()) + 1

    def count(mask: np.ndarray) -> np.ndarray:
        return np.array([np.count_nonzero(np.bincount(inv[c], minlength=n_pat)) for c in mask.T], int)

    return count(yy == 1), count(yy == 0)


def _clustered_components(y, scores: np.ndarray, patient_ids):
    """AUROCs [K], Obuchowski covariance [K, K], patient counts and reason, for scores [K, n]."""
    yy, s, pid = _known(y, scores, patient_ids)
    k = len(s)
    pos, neg = yy == 1, yy == 0
    _, cluster = np.unique(pid, return_inverse=True)
    n_clusters = int(cluster.max()) + 1 if len(cluster) else 0
    m_i = np.bincount(cluster[pos], minlength=n_clusters).astype(np.float64)
    n_i = np.bincount(cluster[neg], minlength=n_clusters).astype(np.float64)
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    nan_cov = np.full((k, k), np.nan)
    if not pos.any() or not neg.any():
        return np.full(k, np.nan), nan_cov, i10, i01, _count_reason(i10, i01)
    auc, v10, v01 = _placements(yy, s)
    reason = _count_reason(i10, i01)
    if reason:
        return auc, nan_cov, i10, i01, reason
    big_m, big_n = float(pos.sum()), float(neg.sum())
    V10 = np.stack([np.bincount(cluster[pos], weights=v, minlength=n_clusters) for v in v10])
    V01 = np.stack([np.bincount(cluster[neg], weights=v, minlength=n_clusters) for v in v01])
    D10 = V10 - m_i * auc[:, None]  # [K, I]; zero for patients without positives
    D01 = V01 - n_i * auc[:, None]
    S10 = i10 / ((i10 - 1) * big_m) * (D10 @ D10.T)
    S01 = i01 / ((i01 - 1) * big_n) * (D01 @ D01.T)
    S11 = n_clusters / (n_clusters - 1) * (D10 @ D01.T)
    cov = S10 / big_m + S01 / big_n + (S11 + S11.T) / (big_m * big_n)
    return auc, cov, i10, i01, None


def _z_test(diff: float, var: float) -> tuple[float, float, float]:
    """Variance (rounding negatives to 0), z and two-sided normal p of a difference."""
    if var < 0:  # rounding when the two curves are (nearly) identical
        var = 0.0
    if math.isnan(var) or math.isnan(diff):
        return var, float("nan"), float("nan")
    if var <= 1e-15:
        z, p = (0.0, 1.0) if abs(diff) < 1e-12 else (math.copysign(math.inf, diff), 0.0)
        return var, z, p
    z = diff / math.sqrt(var)
    return var, z, math.erfc(abs(z) / math.sqrt(2))


def _pair(score_a, score_b) -> np.ndarray:
    a = np.asarray(score_a, dtype=np.float64)
    b = np.asarray(score_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"score_a and score_b must both be [n], got {a.shape} and {b.shape}")
    return np.stack([a, b])


def delong_var(y, score) -> tuple[float, float]:
    """AUROC of one score vector and its DeLong variance.

    Args:
        y: 0/1 [n] (NaN = missing, left out).
        score: float [n].

    Returns:
        ``(auc, var)``; var is NaN with fewer than 2 positives or 2 negatives.
    """
    auc, cov = _delong_components(y, np.asarray(score, dtype=np.float64)[None, :])
    return float(auc[0]), float(cov[0, 0])


def delong(y, score_a, score_b) -> DeLongResult:
    """DeLong's test for two correlated ROC curves (same images, two score vectors).

    Images are treated as independent; with several images per patient use
    :func:`clustered_delong` (or :func:`probes.evaluation.stats.headline_p`, which picks).

    Args:
        y: 0/1 [n] (NaN = missing, left out).
        score_a: float [n], first model's scores.
        score_b: float [n], second model's scores.

    Returns:
        :class:`DeLongResult` ``(auc_a, auc_b, diff, var, z, p)`` with ``diff = auc_a - auc_b``,
        ``var`` its variance, ``z = diff / sqrt(var)`` and the two-sided normal p-value. Identical
        curves give ``z = 0, p = 1``; too few positives/negatives give NaN.
    """
    auc, cov = _delong_components(y, _pair(score_a, score_b))
    diff = float(auc[0] - auc[1])
    var, z, p = _z_test(diff, float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))
    return DeLongResult(float(auc[0]), float(auc[1]), diff, var, z, p)


def clustered_delong_var(y, score, patient_ids) -> AUCVar:
    """AUROC of one score vector and its clustered (Obuchowski 1997) variance.

    Args:
        y: 0/1 [n] (NaN = missing, left out).
        score: float [n].
        patient_ids: [n] patient id of each row (any sortable values); patients are the clusters.

    Returns:
        :class:`AUCVar` ``(auc, var)``; var is NaN, with ``reason`` set, when fewer than 2 patients
        hold a positive row or fewer than 2 a negative one.
    """
    s = np.asarray(score, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"score must be 1-D [n], got shape {s.shape}")
    auc, cov, _, _, reason = _clustered_components(y, s[None, :], patient_ids)
    return AUCVar(float(auc[0]), float(cov[0, 0]), reason)


def clustered_delong(y, score_a, score_b, patient_ids) -> ClusteredDeLongResult:
    """Paired test of two AUROCs on the same clustered data (Obuchowski 1997).

    The patient, not the image, is the independent unit: a patient may contribute several images,
    positives and negatives alike. Reduces exactly to :func:`delong` when every patient has one
    image.

    Args:
        y: 0/1 [n] (NaN = missing, left out).
        score_a: float [n], first model's scores.
        score_b: float [n], second model's scores on the same rows.
        patient_ids: [n] patient id of each row.

    Returns:
        :class:`ClusteredDeLongResult` ``(diff, se, z, p, auc_a, auc_b, var, n_pos_patients,
        n_neg_patients, reason)``. Identical curves give ``z = 0, p = 1``; fewer than 2 positive or
        2 negative patients give NaN var/se/z/p and a ``reason``.
    """
    auc, cov, i10, i01, reason = _clustered_components(y, _pair(score_a, score_b), patient_ids)
    diff = float(auc[0] - auc[1])
    var, z, p = _z_test(diff, float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))
    return ClusteredDeLongResult(
        diff,
        math.sqrt(var) if var >= 0 else float("nan"),
        z,
        p,
        float(auc[0]),
        float(auc[1]),
        var,
        i10,
        i01,
        reason,
    )
