"""Paired comparison of two feature sets (two backbones, resolutions...) on the same test patients.

This module does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from featcache.errors import FeatcacheError
from probes.data import check_same_test
from probes.estimators.logreg import DEFAULT_C_GRID
from probes.evaluate import MIN_CI_PATIENTS, _context, _finish, _finite, _load
from probes.evaluation import metrics
from probes.evaluation.score_rows import _binary_targets
from probes.evaluation.stats import delong, headline_p, holm, paired_bootstrap
from probes.fit import knn_scores, logreg_scores


def run_compare(
    cache,
    sets: Sequence[str],
    *,
    probe: str = "logreg",
    features: str = "cls",
    labels: Sequence[str] | None = None,
    uncertain: str = "ignore",
    aggregate: str | None = None,
    k: int = 20,
    temperature: float = 0.07,
    C: float | None = None,
    C_grid: Sequence[float] = DEFAULT_C_GRID,
    n_boot: int = 1000,
    seed: int = 0,
    val_fraction: float = 0.2,
    allow_partial: bool = False,
    out: str | os.PathLike | None = None,
) -> list[dict]:
    """Paired comparison of two feature sets (e.g. two backbones) on the same test patients.

    The same probe is fitted on each set; per label and for the mean AUROC, the difference
    AUROC(A) - AUROC(B) gets a paired patient-level bootstrap CI (both sets scored on the same
    draws). Per label, ``p`` is a patient-level two-sided p-value (:func:`probes.evaluation.stats.headline_p`:
    the clustered DeLong test of Obuchowski (1997) when a patient has several test images, the
    ordinary DeLong test only when each has one; ``params.p_method`` says which) and ``p_holm`` its
    Holm adjustment over the labels; the mean row's ``p`` is the paired patient-bootstrap p-value.
    ``params`` holds both AUROCs, the bootstrap p-value and, for reference only, the image-level
    DeLong p-value (``p_delong_images``) of every row.

    Args:
        cache: feature store folder or URL.
        sets: the two set names ``(A, B)``.
        probe: ``logreg`` or ``knn``.
        features, labels, uncertain, val_fraction: as in :func:`run_logreg`.
        k: kNN neighbours (one k).
        temperature: kNN temperature.
        C, C_grid: logistic-regression C (None: chosen on val per set).
        n_boot: bootstrap draws.
        seed: bootstrap seed.
        allow_partial: probe a set whose extraction has not finished (pending rows left out,
            counted in ``params.pending_rows``).
        out: JSON-lines file to append the rows to.

    Returns:
        Rows with ``probe = "compare"``, ``metric = "auroc_diff"``, ``store_set`` = A, ``vs`` = B.

    Raises:
        FeatcacheError: not two sets, an unknown probe, or sets without the same test rows.
    """
    sets = list(sets)
    if len(sets) != 2:
        raise FeatcacheError(f"compare needs two feature sets A,B; got {sets}")
    if probe not in ("logreg", "knn"):
        raise FeatcacheError(f"unknown probe {probe!r} for compare: use logreg or knn")
    data = [_load(cache, s, features, labels, uncertain, 0.0, seed, aggregate, allow_partial) for s in sets]
    check_same_test(data[0], data[1])
    k = min(int(k), *(len(d.train) + len(d.val) for d in data))  # as in run_knn: capped at the indexed rows
    scores = []
    for i, d in enumerate(data):
        if probe == "knn":
            sc = knn_scores(d, [k], temperature=temperature, seed=seed, thresholds=False)[k]
        else:
            sc, data[i] = logreg_scores(d, C, C_grid, val_fraction=val_fraction, seed=seed)
        scores.append((sc.test, sc.fitted))
    a, b = data
    run = _context(a, "compare")
    Y = _binary_targets(a, "test")
    patients = a.test.patients
    (Sa, fa), (Sb, fb) = scores
    both = fa & fb
    names = a.label_names
    auc_a = np.full(len(names), np.nan)
    auc_b = np.full(len(names), np.nan)
    auc_a[both] = metrics.auroc_per_label(Y[:, both], Sa[:, both])
    auc_b[both] = metrics.auroc_per_label(Y[:, both], Sb[:, both])
    defined = both & ~np.isnan(auc_a) & ~np.isnan(auc_b)
    params = {**run["params"], "compared_probe": probe}
    if probe == "knn":
        params.update(k=int(k), temperature=float(temperature))
    base = {"vs": sets[1], "seed": int(seed), "n_train": len(a.train), "metric": "auroc_diff"}
    p_head = np.full(len(names), np.nan)
    rows_label = []
    for j, name in enumerate(names):
        known = ~np.isnan(Y[:, j])
        counts = {"n_test": int(known.sum()), "n_patients_test": int(len(np.unique(patients[known])))}
        row = {**base, **counts, "label": name}
        if not defined[j]:
            reason = "one class only among the test rows" if both[j] else "the probe could not be fitted"
            rows_label.append(
                {**row, "value": None, "params": {**params, "skipped": f"no difference: {reason}"}}
            )
            continue
        row, p_head[j] = _label_diff(
            row, Y[known, j], Sa[known, j], Sb[known, j], patients[known], (auc_a[j], auc_b[j]), params, n_boot, seed
        )  # fmt: skip
        rows_label.append(row)
    adjusted = holm(p_head)  # Holm over the headline (patient-level) p-values
    for j, row in enumerate(rows_label):
        if defined[j] and not np.isnan(p_head[j]):
            row["p_holm"] = _finite(adjusted[j])
    mean_row = {
        **base,
        "n_test": len(a.test),
        "n_patients_test": int(len(np.unique(patients))),
        "label": "mean",
    }
    entries = [
        *rows_label,
        _mean_diff(mean_row, Y, Sa, Sb, patients, defined, auc_a, auc_b, names, params, n_boot, seed),
    ]
    return _finish(entries, run, out)


def _label_diff(row, y, sa, sb, patients, aucs, params, n_boot, seed) -> tuple[dict, float]:
    """One label's difference row (paired bootstrap CI, headline p) and its headline p (NaN: none)."""
    n_pos, n_neg = len(np.unique(patients[y == 1])), len(np.unique(patients[y == 0]))
    p = {**params, "auroc_a": aucs[0], "auroc_b": aucs[1]}
    if min(n_pos, n_neg) < MIN_CI_PATIENTS:  # no honest CI or test from one patient on a side
        p["ci"] = (
            f"no CI or p-value ({n_pos} positive and {n_neg} negative patients in test; "
            f"needs {MIN_CI_PATIENTS} of each)"
        )
        return {**row, "value": float(aucs[0] - aucs[1]), "params": p}, float("nan")
    pb = paired_bootstrap(metrics.auroc, y, sa, sb, patients, n_boot, seed)
    hp = headline_p(y, sa, sb, patients, n_boot=n_boot, seed=seed)
    p.update(
        p_method=hp.p_method,
        p_bootstrap=_finite(pb.p),
        # images as if independent: shown for reference, never the headline
        p_delong_images=_finite(delong(y, sa, sb).p),
        **({"ci": hp.reason} if hp.reason else {}),
    )
    out = {
        **row, "value": pb.diff, "ci_low": pb.low, "ci_high": pb.high, "n_boot": n_boot,
        "n_boot_skipped": int(pb.n_skipped), "p": _finite(hp.p), "params": p,
    }  # fmt: skip
    return out, hp.p


def _mean_diff(row, Y, Sa, Sb, patients, defined, auc_a, auc_b, names, params, n_boot, seed) -> dict:
    """The mean AUROC's difference over the labels defined in both sets, with its paired bootstrap p."""
    if not defined.any():
        return {**row, "value": None, "params": {**params, "skipped": "no label has a difference to average"}}
    cols = np.flatnonzero(defined)
    pb = paired_bootstrap(metrics.mean_auroc, Y[:, cols], Sa[:, cols], Sb[:, cols], patients, n_boot, seed)
    return {
        **row, "value": pb.diff, "ci_low": pb.low, "ci_high": pb.high, "n_boot": n_boot,
        "n_boot_skipped": int(pb.n_skipped), "p": _finite(pb.p),
        "params": {
            **params,
            "auroc_a": float(np.mean(auc_a[cols])),
            "auroc_b": float(np.mean(auc_b[cols])),
            "p_method": "paired_patient_bootstrap",
            "p_bootstrap": _finite(pb.p),
            "labels_in_mean": [names[j] for j in cols],
            "mean_ci": "draws in which a label of the mean lacks a class are rejected (n_boot_skipped)",
        },
    }  # fmt: skip
