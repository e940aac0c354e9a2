"""Uncertainty and comparisons at the patient level: bootstrap, (clustered) DeLong, Holm.

The one module to import them from; the two halves live next to it:

- :mod:`probes.evaluation.bootstrap`: the patient-level bootstrap. A draw resamples *patients*, never
  images, reproducibly from the seed (:func:`bootstrap_draws`); :func:`bootstrap_ci` gives the
  percentile interval over the draws where the metric is defined (``n_skipped`` counts the others),
  :func:`paired_bootstrap` the interval and two-sided p of a difference on the same draws. The mean
  AUROC over labels averages, in every draw, the labels of the point estimate (a draw where one of
  them lacks a class is rejected). No interval from too few patients: an AUROC interval needs
  :data:`MIN_PATIENTS` (2) positive and 2 negative patients per label, else NaN bounds and a
  ``reason``. Its docstring gives the full protocol and the fast path.
- :mod:`probes.evaluation.delong`: DeLong's test treats images as independent; :func:`clustered_delong`
  (Obuchowski 1997) treats patients as the units.

Here: :func:`headline_p` picks the p-value to headline a paired comparison and says which
(``p_method``); :func:`holm` adjusts p-values over labels.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from probes.evaluation import metrics
from probes.evaluation.bootstrap import (
    CI,
    PairedResult,
    _check_lengths,
    bootstrap_ci,
    bootstrap_draws,
    bootstrap_values,
    paired_bootstrap,
)
from probes.evaluation.delong import (
    MIN_PATIENTS,
    AUCVar,
    ClusteredDeLongResult,
    DeLongResult,
    _count_reason,
    _patients_per_class,
    clustered_delong,
    clustered_delong_var,
    delong,
    delong_var,
)
from probes.evaluation.rank_metrics import _binary_labels

__all__ = [
    "CI",
    "MIN_PATIENTS",
    "AUCVar",
    "ClusteredDeLongResult",
    "DeLongResult",
    "HeadlineP",
    "PairedResult",
    "bootstrap_ci",
    "bootstrap_draws",
    "bootstrap_values",
    "clustered_delong",
    "clustered_delong_var",
    "delong",
    "delong_var",
    "headline_p",
    "holm",
    "paired_bootstrap",
]


class HeadlineP(NamedTuple):
    """Outcome of :func:`headline_p`.

    ``p`` two-sided; ``p_method`` one of ``"delong"``, ``"clustered_delong"``,
    ``"paired_patient_bootstrap"``; ``reason`` None or why p is NaN; ``diff`` metric(a) - metric(b);
    ``detail`` the underlying :class:`DeLongResult`, :class:`ClusteredDeLongResult` or
    :class:`PairedResult`.
    """

    p: float
    p_method: str
    reason: str | None
    diff: float
    detail: object


def _one_image_each(y, patient_ids) -> bool:
    """True when every patient holds at most one row with a label in y [n]."""
    known = ~np.isnan(_binary_labels(y))
    _, counts = np.unique(np.asarray(patient_ids)[known], return_counts=True)
    return bool((counts <= 1).all())


def headline_p(
    y, score_a, score_b, patient_ids, method: str = "auto", n_boot: int = 1000, seed: int = 0
) -> HeadlineP:
    """The p-value to headline a paired AUROC comparison, and which test gave it.

    ``method="auto"`` picks a patient-level test: for one label (y [n]) the clustered DeLong test
    (:func:`clustered_delong`) when any patient holds several labelled images, and ordinary
    :func:`delong` only when every patient holds one (the two then agree exactly); for the mean
    AUROC over labels (y [n, L]) the paired patient bootstrap of :func:`paired_bootstrap` with
    ``metrics.mean_auroc`` (no DeLong form averages labels). Holm's correction (:func:`holm`) is
    then applied over the labels' p-values.

    Args:
        y: 0/1 labels [n] (one label) or [n, L] (the mean AUROC), NaN = missing.
        score_a: float, same shape as y: the first feature set's scores.
        score_b: float, same shape: the second set's scores.
        patient_ids: [n] patient id of each row.
        method: ``"auto"``, ``"clustered_delong"``, ``"delong"`` or ``"paired_patient_bootstrap"``
            (the first three need y [n]).
        n_boot: draws of the bootstrap (used by ``paired_patient_bootstrap`` only).
        seed: seed of the draws.

    Returns:
        :class:`HeadlineP` ``(p, p_method, reason, diff, detail)``; p is NaN with a ``reason`` when
        fewer than 2 patients hold a positive (or a negative) row.
    """
    yy = _binary_labels(y)
    if method not in ("auto", "clustered_delong", "delong", "paired_patient_bootstrap"):
        raise ValueError(f"unknown method {method!r}")
    _check_lengths(patient_ids, y=yy, score_a=score_a, score_b=score_b)
    if yy.ndim == 2 and method not in ("auto", "paired_patient_bootstrap"):
        raise ValueError(f"method {method!r} needs y [n]; the mean over labels takes the bootstrap")
    if method == "auto":
        if yy.ndim == 2:
            method = "paired_patient_bootstrap"
        else:
            method = "delong" if _one_image_each(yy, patient_ids) else "clustered_delong"
    if method == "paired_patient_bootstrap":
        fn = metrics.mean_auroc if yy.ndim == 2 else metrics.auroc
        pb = paired_bootstrap(fn, yy, score_a, score_b, patient_ids, n_boot, seed)
        return HeadlineP(float(pb.p), method, pb.reason, float(pb.diff), pb)
    if method == "clustered_delong":
        cd = clustered_delong(yy, score_a, score_b, patient_ids)
        return HeadlineP(cd.p, method, cd.reason, cd.diff, cd)
    dl = delong(yy, score_a, score_b)
    pos, neg = _patients_per_class(yy[:, None], np.asarray(patient_ids))
    reason = _count_reason(int(pos[0]), int(neg[0]))
    return HeadlineP(float("nan") if reason else dl.p, method, reason, dl.diff, dl)


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, family-wise error control).

    The i-th smallest of m p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``. NaN entries
    (e.g. labels without positives) are passed through and do not count towards m.

    Args:
        pvalues: float [m] (any shape; adjusted over all entries).

    Returns:
        float64 array of the same shape.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    flat = p.ravel()
    out = np.full(flat.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(flat))
    if len(idx):
        order = idx[np.argsort(flat[idx], kind="stable")]
        m = len(order)
        adj = np.minimum(1.0, (m - np.arange(m)) * flat[order])
        out[order] = np.maximum.accumulate(adj)
    return out.reshape(p.shape)
