"""AUPRC, ECE and Brier entries with patient-level CIs, and metrics under bootstrap draw weights.

The draws are those of :func:`probes.evaluation.stats.bootstrap_draws` (the same seed gives the same patients
as every AUROC interval of the run). A draw is expressed as integer weights, how often each row's
patient was drawn, and each metric is evaluated under those weights, which equals evaluating it on
the materialised resample. Intervals are percentile intervals over the draws on which the metric is
defined (``n_boot_skipped`` counts the others), as in :mod:`probes.evaluation.stats`.

- ``auprc``: average precision (:func:`probes.evaluation.metrics.average_precision`), per label and the mean
  over the labels with a positive test row; a CI needs 2 positive and 2 negative patients.
- ``ece`` (equal-width bins, ``params.ece_bins``) and ``brier`` (:mod:`probes.evaluation.calibration`) on the
  positive-class probability, per label and the mean over labels; a CI needs 2 patients.

This module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from featcache.errors import FeatcacheError
from featcache.progress import probe_progress
from probes.evaluation import calibration, metrics
from probes.evaluation.stats import MIN_PATIENTS, bootstrap_draws

if TYPE_CHECKING:
    from probes.data import ProbeData

SCORE_METRICS = ("auprc", "ece", "brier")
_BLOCK = 2_000_000  # float64 weights per block of draws


def _binary_targets(data: ProbeData, split: str) -> np.ndarray:
    """float64 [n, L]: multi-label targets, or the one-vs-rest view of multi-class targets."""
    y = data.split(split).y
    if data.task == "multilabel":
        return y.astype(np.float64)
    return metrics.one_hot(y, len(data.label_names))


def draw_counts(patients: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap draws as counts: int64 [B, P] times each patient is drawn, and int [n] the
    patient index of each row (patients sorted, as :func:`probes.evaluation.stats.bootstrap_draws`)."""
    uniq, draws = bootstrap_draws(patients, n_boot, seed)
    inverse = np.searchsorted(uniq, np.asarray(patients))
    P = len(uniq)
    counts = np.bincount((draws + np.arange(n_boot)[:, None] * P).ravel(), minlength=n_boot * P)
    return counts.reshape(n_boot, P), inverse


THRESHOLD_METRICS = ("sensitivity", "specificity", "f1")


def metric_value(
    metric: str, y: np.ndarray, s: np.ndarray, weight=None, n_bins: int = 10, threshold: float | None = None
) -> np.ndarray:
    """``metric`` (``auroc``, ``auprc``, ``ece``, ``brier``; with ``threshold``: ``sensitivity``,
    ``specificity``, ``f1`` of ``score >= threshold``) of one label under weights.

    Args:
        metric: the metric name.
        y: float [n] 0/1 labels (NaN missing).
        s: float [n] scores (probabilities for ece/brier).
        weight: None (every row once) or float [E, n] weights.
        n_bins: ECE bins.
        threshold: the decision threshold of the thresholded metrics.

    Returns:
        float64 [E] (E = 1 without weights); NaN where undefined.
    """
    known = ~np.isnan(y)
    y, s = y[known], s[known]
    w = np.ones((1, len(y))) if weight is None else np.atleast_2d(weight)[:, known]
    if metric in THRESHOLD_METRICS:
        if threshold is None:
            raise ValueError(f"{metric} needs a threshold")
        return _thresholded(metric, y, s >= threshold, w)
    if metric == "ece":
        return calibration.ece_rows(y, s, w, n_bins)
    if metric == "brier":
        return calibration.brier_rows(y, s, w)
    if not len(y):
        return np.full(len(w), np.nan)
    if metric == "auprc":
        return metrics.average_precision_rows(y, s, w)  # scores sorted once for every weighting
    if metric == "auroc":
        return metrics.auroc_rows(y, np.ascontiguousarray(np.broadcast_to(s, w.shape)), w)
    raise ValueError(f"unknown metric {metric!r}")


def _thresholded(metric: str, y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted sensitivity, specificity or F1 [E] from 0/1 ``y`` [n], bool ``pred`` [n], weights [E, n]:
    each row counted as often as its weight, so a draw's weights give the resample's value."""
    pos, hit = y == 1, pred.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "sensitivity":
            return (w @ (pos * hit)) / (w @ pos)
        if metric == "specificity":
            return (w @ (~pos * (1.0 - hit))) / (w @ ~pos)
        tp, fp, fn = w @ (pos * hit), w @ (~pos * hit), w @ (pos * (1.0 - hit))
        return np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)


def thresholded_draws(
    y, s, thresholds: dict[str, float], counts, inverse
) -> dict[str, dict[str, np.ndarray]]:
    """Every thresholded metric at every threshold on every draw: ``{threshold name: {metric: float64 [B]}}``.

    The same values as :func:`metric_draws` one metric at a time, with each block of draw weights
    built once for all of them."""
    known = np.flatnonzero(~np.isnan(y))
    y, s, inverse = y[known], s[known], inverse[known]
    out = {t: {m: np.empty(len(counts)) for m in THRESHOLD_METRICS} for t in thresholds}
    step = max(1, _BLOCK // max(1, len(known)))
    for b in range(0, len(counts), step):
        w = counts[b : b + step][:, inverse].astype(np.float64)
        for name, t in thresholds.items():
            pred = s >= t
            for m in THRESHOLD_METRICS:
                out[name][m][b : b + step] = _thresholded(m, y, pred, w)
    return out


def metric_draws(
    metric: str, y, s, counts, inverse, mask=None, n_bins: int = 10, threshold: float | None = None
) -> np.ndarray:
    """``metric`` on every draw: float64 [B]; ``mask`` (bool [n]) restricts to some rows (a subgroup)
    while keeping the draws of all patients."""
    rows = np.arange(len(y)) if mask is None else np.flatnonzero(mask)
    out = np.empty(len(counts))
    step = max(1, _BLOCK // max(1, len(rows)))
    for b in range(0, len(counts), step):
        w = counts[b : b + step][:, inverse[rows]].astype(np.float64)
        out[b : b + step] = metric_value(metric, y[rows], s[rows], w, n_bins, threshold)
    return out


def percentile_ci(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float, int]:
    """(low, high, n_skipped) percentile interval over the non-NaN draws (NaN bounds if none)."""
    ok = values[~np.isnan(values)]
    if not len(ok):
        return float("nan"), float("nan"), int(len(values))
    low, high = np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high), int(len(values) - len(ok))


def ci_reason(metric: str, y: np.ndarray, patients: np.ndarray) -> str | None:
    """Why ``metric`` of label y [n] gets no CI (too few patients), or None."""
    known = ~np.isnan(y)
    if metric in ("sensitivity", "specificity"):  # a rate over one class's rows
        side = 1 if metric == "sensitivity" else 0
        n = len(np.unique(patients[known & (y == side)]))
        what = "positive" if side else "negative"
        return None if n >= MIN_PATIENTS else f"no CI ({n} {what} test patients; a CI needs {MIN_PATIENTS})"
    if metric in ("auroc", "auprc", "f1"):
        n_p = len(np.unique(patients[known & (y == 1)]))
        n_n = len(np.unique(patients[known & (y == 0)]))
        if n_p < MIN_PATIENTS or n_n < MIN_PATIENTS:
            return (
                f"no CI ({n_p} positive, {n_n} negative patients in test; a CI needs {MIN_PATIENTS} of each)"
            )
        return None
    n = len(np.unique(patients[known]))
    return (
        None if n >= MIN_PATIENTS else f"no CI ({n} test patients with this label; a CI needs {MIN_PATIENTS})"
    )


def _undefined(metric: str, y: np.ndarray) -> str:
    known = ~np.isnan(y)
    if not known.any():
        return "no test row has this label"
    if metric == "auprc":
        return f"test rows hold no positive ({int((y[known] == 0).sum())} negatives): AUPRC needs one"
    return "undefined on these rows"


def score_entries(
    Y: np.ndarray,
    S: np.ndarray,
    patients: np.ndarray,
    names: list[str],
    not_fitted: list[str | None],
    n_boot: int,
    seed: int,
    *,
    n_bins: int = calibration.DEFAULT_BINS,
    calibration_of: str = "probability",
) -> list[dict[str, Any]]:
    """``auprc``, ``ece`` and ``brier`` entries per label and for the mean.

    Args:
        Y: float64 [n, L] 0/1 test targets (NaN missing; multi-class one-vs-rest).
        S: float64 [n, L] test scores (NaN in labels that were not fitted).
        patients: str [n] test patient ids.
        names: the L label names.
        not_fitted: per label None, or why it has no scores.
        n_boot: bootstrap draws.
        seed: bootstrap seed.
        n_bins: ECE bins.
        calibration_of: what the scores are (``params.calibration_of`` of ece/brier entries).

    Returns:
        Entries ``{"label", "metric", "value", "ci_low", "ci_high", "n_boot", "n_boot_skipped",
        "params"}`` (CI fields only when a CI was computed; ``params.skipped`` / ``params.ci`` say why not).
    """
    counts, inverse = draw_counts(patients, n_boot, seed)
    out: list[dict[str, Any]] = []
    draws_of: dict[str, dict[int, np.ndarray]] = {m: {} for m in SCORE_METRICS}
    value_of: dict[str, dict[int, float]] = {m: {} for m in SCORE_METRICS}
    bar = probe_progress(len(names) * len(SCORE_METRICS) * n_boot, "bootstrap AUPRC/ECE/Brier", "draws")
    for j, name in enumerate(names):
        y, s = Y[:, j], S[:, j]
        for m in SCORE_METRICS:
            bar.update(n_boot)
            p: dict[str, Any] = {} if m == "auprc" else {"calibration_of": calibration_of}
            if m == "ece":
                p["ece_bins"] = n_bins
            e: dict[str, Any] = {"label": name, "metric": m, "value": None, "params": p}
            out.append(e)
            if not_fitted[j]:
                p["skipped"] = not_fitted[j]
                continue
            try:
                v = float(metric_value(m, y, s, n_bins=n_bins)[0])
            except FeatcacheError as err:  # scores that are not probabilities: no calibration
                p["skipped"] = str(err)
                continue
            if np.isnan(v):
                p["skipped"] = _undefined(m, y)
                continue
            e["value"] = v
            value_of[m][j] = v
            if m == "ece":
                r = calibration.reliability_bins(y, s, n_bins)
                p["reliability"] = {k: r[k] for k in ("count", "mean_p", "frac_pos")}
            why = ci_reason(m, y, patients)
            d = metric_draws(m, y, s, counts, inverse, n_bins=n_bins)
            draws_of[m][j] = d
            if why:
                p["ci"] = why
                continue
            low, high, skipped = percentile_ci(d)
            e.update(ci_low=low, ci_high=high, n_boot=n_boot, n_boot_skipped=skipped)
    bar.close()
    for m in SCORE_METRICS:
        used = sorted(value_of[m])
        p = {"labels_in_mean": [names[j] for j in used]}
        if m != "auprc":
            p["calibration_of"] = calibration_of
        if m == "ece":
            p["ece_bins"] = n_bins
        e = {"label": "mean", "metric": m, "value": None, "params": p}
        out.append(e)
        if not used:
            p["skipped"] = f"no label has a defined {m}"
            continue
        e["value"] = float(np.mean([value_of[m][j] for j in used]))
        if len(np.unique(patients)) < MIN_PATIENTS:
            p["ci"] = f"no CI (fewer than {MIN_PATIENTS} test patients)"
            continue
        d = np.stack([draws_of[m][j] for j in used], axis=1).mean(axis=1)  # NaN if a label is undefined
        low, high, skipped = percentile_ci(d)
        p["mean_ci"] = (
            "every draw averages the labels of the point estimate; draws where one is undefined are rejected"
        )
        e.update(ci_low=low, ci_high=high, n_boot=n_boot, n_boot_skipped=skipped)
    return out
