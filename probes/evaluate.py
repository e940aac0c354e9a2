"""From a fitted probe's scores to metric rows: AUROC with patient-level CIs, thresholded metrics.

Shared by every classification runner (:mod:`probes.run`, :mod:`probes.fewshot_run`,
:mod:`probes.compare`). Metrics (``label`` is a label column or a class name; ``mean`` is the
summary over labels):

- ``auroc`` per label, with a patient-level bootstrap 95% CI (``n_boot`` draws, fixed ``seed``)
  and the test ROC curve in ``params.roc`` (``{"fpr", "tpr"}``, at most 101 exact vertices,
  thinned by FPR beyond that: :mod:`probes.report.roc`).
  The ``mean`` row averages the labels that have both classes among the test rows (labels without
  are reported with a null value); its CI resamples patients and averages the same labels.
  Multi-class: one-vs-rest AUROC per class, and the macro mean.
- ``sensitivity@0.5``, ``specificity@0.5``, ``f1@0.5`` per label (score >= 0.5), and the same at
  ``@youden``: the threshold maximising Youden's J on the validation split, applied unchanged to
  test (``params.threshold``; null when validation lacks a class). Multi-class: per class, one vs
  rest on the class probability. Each with a patient-level CI from the same draws as the AUROC's,
  the threshold held fixed (it was chosen before test was seen); sensitivity needs 2 positive
  patients, specificity 2 negative, F1 2 of each.
- Multi-class only: ``accuracy`` and ``balanced_accuracy`` of the arg-max class, with CIs (label
  ``mean``).
- ``auprc`` (average precision, as ``sklearn.metrics.average_precision_score``), ``ece`` (10
  equal-width bins, ``params.ece_bins``; ``params.reliability`` holds the bins' counts, mean
  probabilities and fractions of positives) and ``brier`` per label and ``mean``, with patient CIs
  from the same draws (:mod:`probes.evaluation.score_rows`, :mod:`probes.evaluation.calibration`). Calibration rows say
  what the scores are (``params.calibration_of``): ``probability`` for logistic regression, the
  renormalised kNN vote and ML-kNN; the dinov2 kNN vote at a k below its softmax window is a
  partial vote mass (it sums to less than 1) and says so.
- With ``by`` (e.g. ``meta_sex,meta_age:0,40,60,80``), every metric again per subgroup
  (``params.subgroup``) and the gap between the groups (:mod:`probes.subgroups`).

This module does not import torch.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from probes.data import ProbeData, load_probe_data
from probes.evaluation import metrics
from probes.evaluation.calibration import DEFAULT_BINS
from probes.evaluation.score_rows import (
    _binary_targets,
    ci_reason,
    draw_counts,
    percentile_ci,
    score_entries,
    thresholded_draws,
)
from probes.evaluation.stats import bootstrap_ci
from probes.fit import Scored
from probes.report.roc import roc_curve_params
from probes.results import RESULT_FIELDS, append_jsonl, make_rows
from probes.subgroups import subgroup_entries

DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)
MIN_CI_PATIENTS = 2  # positive and negative test patients a label needs for a bootstrap CI
_THRESHOLD_METRICS = ("sensitivity", "specificity", "f1")


# ---- shared plumbing ----


def _load(
    cache, set_name, features, labels, uncertain, val_fraction, seed, aggregate=None, allow_partial=False
) -> ProbeData:
    return load_probe_data(
        cache,
        set_name,
        features=features,
        labels=labels,
        uncertain=uncertain,
        val_fraction=val_fraction,
        seed=seed,
        aggregate=aggregate,
        allow_partial=allow_partial,
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
    if c.get("pending_rows"):
        params["pending_rows"] = c["pending_rows"]  # --allow-partial: rows not yet extracted, left out
    if c.get("featcache_version"):
        params["extracted_with"] = c["featcache_version"]
    return {"context": row, "params": params}


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _write(rows: list[dict], out: str | os.PathLike | None) -> None:
    if out is not None:
        append_jsonl(out, rows)


def evaluate_scores(
    data: ProbeData,
    sc: Scored,
    base: dict[str, Any],
    params: dict[str, Any],
    n_boot: int,
    seed: int,
    by: str | None = None,
    n_bins: int = DEFAULT_BINS,
) -> list[dict[str, Any]]:
    """Metric entries of one fitted probe (the metrics of the module docstring).

    Every entry whose value is null says why in ``params.skipped``; every missing CI says why in
    ``params.ci``.

    Args:
        data: the run's data.
        sc: the probe's scores (:class:`probes.fit.Scored`): test scores [n_test, L] (multi-label:
            per label; multi-class: class probabilities), the held-out scores thresholds are chosen
            on, which labels were fitted, and per-label extra fields.
        base: fields of every entry (``k``, ``C``, ``seed`` ...).
        params: the run's params (merged into each entry's ``params``).
        n_boot: bootstrap draws.
        seed: bootstrap seed.
        by: subgroup columns (:func:`probes.subgroups.parse_by`), or None.
        n_bins: ECE bins.

    Returns:
        Entries for :func:`probes.results.make_rows`.
    """
    names = data.label_names
    L = len(names)
    fitted = np.asarray(sc.fitted, bool)
    label_extra = sc.extra or [{} for _ in names]
    Y = _binary_targets(data, "test")
    patients = data.test.patients
    S = np.asarray(sc.test, dtype=np.float64)
    params = {**params, "fit_rows": sc.fit_rows, "threshold_from": sc.thr_from}
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
    thresholds = sc.thresholds(data.task)
    draws = draw_counts(patients, n_boot, seed)  # the draws of every interval of the run

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
            ci_fields["params"] = {"ci": _few_patients(pos_pat[j], neg_pat[j])}
        why_not = None
        if not fitted[j]:
            why_not = (label_extra[j].get("params") or {}).get("skipped", "the probe could not be fitted")
        elif not defined[j]:
            why_not = _one_class_reason(Y[:, j])
        auc_params = {"skipped": why_not} if why_not else {"roc": roc_curve_params(Y[:, j], S[:, j])}
        auc_params.update(ci_fields.pop("params", {}))
        entry(name, "auroc", _finite(auc[j]), label_extra[j], **counts, **ci_fields, params=auc_params)
        if not fitted[j]:
            for m in _THRESHOLD_METRICS:
                for t in ("0.5", "youden"):
                    entry(name, f"{m}@{t}", None, label_extra[j], **counts, params={"skipped": why_not})
            continue
        usable = {n: t for n, (t, why) in thresholds[j].items() if why is None and known.any()}
        t_draws = thresholded_draws(Y[:, j], S[:, j], usable, *draws) if usable else {}
        for t_name, (t, why) in thresholds[j].items():
            if why is None and not known.any():
                why = "no test row has this label"
            if why is not None:
                values = dict.fromkeys(_THRESHOLD_METRICS)
            else:
                bm = metrics.binary_metrics(Y[:, j], S[:, j], t)
                values = {m: _finite(bm[m]) for m in _THRESHOLD_METRICS}
            for m, v in values.items():
                p = {"threshold": _finite(t)}
                ci: dict[str, Any] = {}
                if v is None:
                    p["skipped"] = why or f"undefined at this threshold ({m} needs both classes in test)"
                elif (reason := ci_reason(m, Y[:, j], patients)) is not None:
                    p["ci"] = reason
                else:  # the threshold stays fixed: it was chosen before test was seen
                    low_t, high_t, n_skip = percentile_ci(t_draws[t_name][m])
                    ci = {"ci_low": low_t, "ci_high": high_t, "n_boot": n_boot, "n_boot_skipped": n_skip}
                entry(name, f"{m}@{t_name}", v, label_extra[j], **counts, **ci, params=p)

    n_mean = int(defined.sum())
    mean_fields = {"n_test": len(data.test), "n_patients_test": int(len(np.unique(patients)))}
    if n_mean:
        value = metrics.mean_auroc(Y[:, defined], S[:, defined])
        ci = bootstrap_ci(metrics.mean_auroc, Y[:, defined], S[:, defined], patients, n_boot, seed)
        mean_fields.update(_ci_fields(ci, n_boot))
        mean_fields.setdefault("params", {})["mean_ci"] = (
            "every draw averages the labels of the point estimate; draws in which one of them lacks a "
            "class are rejected (n_boot_skipped)"
        )
    else:
        value = None
        mean_fields["params"] = {"skipped": "no label has both classes among the test rows"}
    entry(
        "mean",
        "auroc",
        _finite(value) if value is not None else None,
        params={
            "labels_in_mean": [names[j] for j in np.flatnonzero(defined)],
            **mean_fields.pop("params", {}),
        },
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
                **_ci_fields(ci, n_boot),
            )
    not_fitted = [
        None
        if fitted[j]
        else (label_extra[j].get("params") or {}).get("skipped", "the probe could not be fitted")
        for j in range(L)
    ]
    cal = _calibration_of(base, params)
    for e in score_entries(
        Y, S, patients, names, not_fitted, n_boot, seed, n_bins=n_bins, calibration_of=cal
    ):
        label, metric, value, p = e.pop("label"), e.pop("metric"), e.pop("value"), e.pop("params")
        if label == "mean":
            counts = {"n_test": len(data.test), "n_patients_test": int(len(np.unique(patients)))}
            entry(label, metric, value, **counts, **e, params=p)
            continue
        known = ~np.isnan(Y[:, names.index(label)])
        counts = {"n_test": int(known.sum()), "n_patients_test": int(len(np.unique(patients[known])))}
        entry(label, metric, value, label_extra[names.index(label)], **counts, **e, params=p)
    if by:  # the same evaluation again on each group's rows
        entries += subgroup_entries(
            data, sc, base, params, n_boot, seed, by, n_bins=n_bins, evaluate=evaluate_scores
        )
    return entries


def _calibration_of(base: dict[str, Any], params: dict[str, Any]) -> str:
    """What the scores of a run are, for the calibration rows (``params.calibration_of``)."""
    k, window = base.get("k"), params.get("softmax_k")
    if params.get("vote") == "dinov2" and k is not None and window is not None and k < window:
        return (
            f"partial vote mass (dinov2 vote: softmax over the {window} nearest, summed over the first "
            f"{k}: the scores sum to less than 1; --method renormalized gives probabilities)"
        )
    return "probability"


def _ci_fields(ci, n_boot: int) -> dict[str, Any]:
    """Row fields of a bootstrap CI; a CI that could not be given has none, and says why."""
    if getattr(ci, "reason", None):
        return {"params": {"ci": f"no CI ({ci.reason})"}}
    return {"ci_low": ci.low, "ci_high": ci.high, "n_boot": n_boot, "n_boot_skipped": int(ci.n_skipped)}


def _few_patients(n_pos: int, n_neg: int) -> str:
    """Why a label gets no CI or p-value: too few patients on a side."""
    sides = [
        f"{n} {side} patient{'s' if n != 1 else ''}" for n, side in ((n_pos, "positive"), (n_neg, "negative"))
    ]
    return f"no CI ({', '.join(sides)} in test; a CI needs {MIN_CI_PATIENTS} of each)"


def _one_class_reason(y: np.ndarray) -> str:
    known = ~np.isnan(y)
    n_pos, n_neg = int((y[known] == 1).sum()), int((y[known] == 0).sum())
    return f"test rows hold {n_pos} positives and {n_neg} negatives: AUROC needs both"


def _finish(entries: list[dict], run: dict, out) -> list[dict]:
    rows = make_rows(run["context"], entries)
    _write(rows, out)
    return rows
