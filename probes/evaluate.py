"""From a fitted probe's scores to metric rows: AUROC with patient-level CIs, thresholded metrics.

Shared by every classification runner (:mod:`probes.run`, :mod:`probes.fewshot_run`,
:mod:`probes.compare`). Metrics (``label`` is a label column or a class name; ``mean`` is the
summary over labels):

- ``auroc`` per label, with a patient-level bootstrap 95% CI (``n_boot`` draws, fixed ``seed``).
  The ``mean`` row averages the labels that have both classes among the test rows (labels without
  are reported with a null value); its CI resamples patients and averages the same labels.
  Multi-class: one-vs-rest AUROC per class, and the macro mean.
- ``sensitivity@0.5``, ``specificity@0.5``, ``f1@0.5`` per label (score >= 0.5), and the same at
  ``@youden``: the threshold maximising Youden's J on the validation split, applied unchanged to
  test (``params.threshold``; null when validation lacks a class). Multi-class: per class, one vs
  rest on the class probability.
- Multi-class only: ``accuracy`` and ``balanced_accuracy`` of the arg-max class, with CIs (label
  ``mean``).

This module does not import torch.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError

from . import metrics
from .data import ProbeData, load_probe_data
from .results import RESULT_FIELDS, append_jsonl, make_rows
from .stats import bootstrap_ci

DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)
MIN_CI_PATIENTS = 2  # positive and negative test patients a label needs for a bootstrap CI
_THRESHOLD_METRICS = ("sensitivity", "specificity", "f1")


# ---- shared plumbing ----


def _load(cache, set_name, features, labels, uncertain, val_fraction, seed, aggregate=None) -> ProbeData:
    return load_probe_data(
        cache,
        set_name,
        features=features,
        labels=labels,
        uncertain=uncertain,
        val_fraction=val_fraction,
        seed=seed,
        aggregate=aggregate,
    )


def _context(data: ProbeData, probe: str) -> dict[str, Any]:
    """The fields shared by every row of a run, and the run's base ``params``."""
    c = data.context
    row = {k: c[k] for k in RESULT_FIELDS if k in c and c[k] is not None and k != "featcache_version"}
    row["probe"] = probe
    params = {"uncertain": c.get("uncertain"), "val_carved": bool(c.get("val_carved"))}
    if c.get("aggregate"):
        params.update(aggregate=c["aggregate"], n_slices=c.get("n_slices"))
    if c.get("val_carved"):
        params.update(val_fraction=c.get("val_fraction"), split_seed=c.get("split_seed"))
    if c.get("featcache_version"):
        params["extracted_with"] = c["featcache_version"]
    return {"context": row, "params": params}


def _binary_targets(data: ProbeData, split: str) -> np.ndarray:
    """float64 [n, L]: multi-label targets, or the one-vs-rest view of multi-class targets."""
    y = data.split(split).y
    if data.task == "multilabel":
        return y.astype(np.float64)
    return metrics.one_hot(y, len(data.label_names))


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _write(rows: list[dict], out: str | os.PathLike | None) -> None:
    if out is not None:
        append_jsonl(out, rows)


def _fill_undefined(S: np.ndarray, fill: np.ndarray | float, width: int) -> np.ndarray:
    """kNN scores float64 [n, width]: NaN (no neighbour knows the label) -> ``fill``; classes
    above the largest one seen in train (absent from the kNN's output) -> probability 0."""
    S = np.array(S, dtype=np.float64, copy=True)
    if S.shape[1] < width:
        S = np.concatenate([S, np.zeros((len(S), width - S.shape[1]))], axis=1)
    bad = np.isnan(S)
    if bad.any():
        S[bad] = np.broadcast_to(fill, S.shape)[bad]
    return S


def _prevalence(Y: np.ndarray) -> np.ndarray:
    """float [L] share of positives among the known train labels (0.5 where none is known)."""
    known = ~np.isnan(Y)
    pos = np.where(known, Y, 0).sum(axis=0)
    n = known.sum(axis=0)
    return np.where(n > 0, pos / np.maximum(n, 1), 0.5)


def _learnable(data: ProbeData) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """bool [L] labels whose train rows hold both classes, and a ``skipped`` reason for the others.

    Multi-class data (every class has train rows, checked at load time) is always learnable.
    """
    L = len(data.label_names)
    if data.task != "multilabel":
        return np.ones(L, bool), [{} for _ in range(L)]
    Y = data.train.y
    n_pos, n_neg = (Y == 1).sum(axis=0), (Y == 0).sum(axis=0)
    ok = (n_pos > 0) & (n_neg > 0)
    extra: list[dict[str, Any]] = [
        {}
        if ok[j]
        else {
            "params": {"skipped": f"train rows hold {int(n_pos[j])} positives and {int(n_neg[j])} negatives"}
        }
        for j in range(L)
    ]
    return ok, extra


def _evaluate(
    data: ProbeData,
    S_test: np.ndarray,
    S_val: np.ndarray | None,
    base: dict[str, Any],
    params: dict[str, Any],
    n_boot: int,
    seed: int,
    fitted: np.ndarray | None = None,
    label_extra: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Metric entries of one fitted probe.

    Args:
        data: the run's data.
        S_test: float [n_test, L] scores (multi-label: per label; multi-class: class probabilities).
        S_val: float [n_val, L] validation scores (for the Youden threshold), or None.
        base: fields of every entry (``k``, ``C``, ``seed`` ...).
        params: the run's params (merged into each entry's ``params``).
        n_boot: bootstrap draws.
        seed: bootstrap seed.
        fitted: bool [L], labels the probe could be fitted for (default: all).
        label_extra: per label, extra fields and params (``C``, ``params.skipped`` ...).

    Returns:
        Entries for :func:`probes.results.make_rows`.
    """
    names = data.label_names
    L = len(names)
    fitted = np.ones(L, bool) if fitted is None else np.asarray(fitted, bool)
    label_extra = label_extra or [{} for _ in names]
    Y = _binary_targets(data, "test")
    Yv = _binary_targets(data, "val") if S_val is not None and len(data.val) else None
    patients = data.test.patients
    S = np.asarray(S_test, dtype=np.float64)
    auc = np.full(L, np.nan)
    auc[fitted] = metrics.auroc_per_label(Y[:, fitted], S[:, fitted])
    defined = ~np.isnan(auc)
    # a patient-level CI needs patients on both sides: with one positive patient every draw either
    # repeats that patient or drops the label, and the interval would look far tighter than it is
    pos_pat = np.array([len(np.unique(patients[Y[:, j] == 1])) for j in range(L)])
    neg_pat = np.array([len(np.unique(patients[Y[:, j] == 0])) for j in range(L)])
    with_ci = defined & (pos_pat >= MIN_CI_PATIENTS) & (neg_pat >= MIN_CI_PATIENTS)
    low = np.full(L, np.nan)
    high = np.full(L, np.nan)
    skipped = np.zeros(L, int)
    if with_ci.any():
        ci = bootstrap_ci(metrics.auroc_per_label, Y[:, with_ci], S[:, with_ci], patients, n_boot, seed)
        low[with_ci], high[with_ci], skipped[with_ci] = ci.low, ci.high, ci.n_skipped
    entries: list[dict[str, Any]] = []

    def entry(label: str, metric: str, value, extra: dict | None = None, **fields) -> None:
        extra = dict(extra or {})
        p = {**params, **extra.pop("params", {}), **fields.pop("params", {})}
        entries.append(
            {**base, **extra, **fields, "label": label, "metric": metric, "value": value, "params": p}
        )

    for j, name in enumerate(names):
        known = ~np.isnan(Y[:, j])
        counts = {
            "n_test": int(known.sum()),
            "n_patients_test": int(len(np.unique(patients[known]))),
        }
        ci_fields: dict[str, Any] = (
            {"ci_low": low[j], "ci_high": high[j], "n_boot": n_boot, "n_boot_skipped": int(skipped[j])}
            if with_ci[j]
            else {}
        )
        if defined[j] and not with_ci[j]:
            ci_fields["params"] = {
                "ci": f"not computed: {pos_pat[j]} positive and {neg_pat[j]} negative patients in test "
                f"(a CI needs {MIN_CI_PATIENTS} of each)"
            }
        entry(name, "auroc", _finite(auc[j]), label_extra[j], **counts, **ci_fields)
        if not fitted[j]:
            for m in _THRESHOLD_METRICS:
                for t in ("0.5", "youden"):
                    entry(name, f"{m}@{t}", None, label_extra[j], **counts)
            continue
        thresholds: dict[str, float] = {"0.5": 0.5}
        if Yv is not None:
            try:
                thresholds["youden"] = metrics.youden_threshold(Yv[:, j], S_val[:, j])
            except FeatcacheError:
                thresholds["youden"] = float("nan")
        else:
            thresholds["youden"] = float("nan")
        for t_name, t in thresholds.items():
            if math.isnan(t) or not known.any():
                values = dict.fromkeys(_THRESHOLD_METRICS)
            else:
                bm = metrics.binary_metrics(Y[:, j], S[:, j], t)
                values = {m: _finite(bm[m]) for m in _THRESHOLD_METRICS}
            for m, v in values.items():
                entry(name, f"{m}@{t_name}", v, label_extra[j], **counts, params={"threshold": _finite(t)})

    n_mean = int(defined.sum())
    mean_fields = {"n_test": len(data.test), "n_patients_test": int(len(np.unique(patients)))}
    if n_mean:
        value = metrics.mean_auroc(Y[:, defined], S[:, defined])
        ci = bootstrap_ci(metrics.mean_auroc, Y[:, defined], S[:, defined], patients, n_boot, seed)
        mean_fields.update(ci_low=ci.low, ci_high=ci.high, n_boot=n_boot, n_boot_skipped=int(ci.n_skipped))
    else:
        value = None
    entry(
        "mean",
        "auroc",
        _finite(value) if value is not None else None,
        params={"labels_in_mean": [names[j] for j in np.flatnonzero(defined)]},
        **mean_fields,
    )
    if data.task == "multiclass":
        y = data.test.y
        pred = np.argmax(S, axis=1)
        for m, fn in (("accuracy", metrics.accuracy), ("balanced_accuracy", metrics.balanced_accuracy)):
            ci = bootstrap_ci(lambda a, b, fn=fn: fn(a, np.argmax(b, axis=1)), y, S, patients, n_boot, seed)
            entry(
                "mean",
                m,
                _finite(fn(y, pred)),
                n_test=len(y),
                n_patients_test=int(len(np.unique(patients))),
                ci_low=ci.low,
                ci_high=ci.high,
                n_boot=n_boot,
                n_boot_skipped=int(ci.n_skipped),
            )
    return entries


def _finish(entries: list[dict], run: dict, out) -> list[dict]:
    rows = make_rows(run["context"], entries)
    _write(rows, out)
    return rows
