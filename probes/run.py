"""Probe runs: load a feature set, fit, score the test split, compute metrics with CIs, write rows.

Each ``run_*`` function is what one ``probes`` command does; this module holds the kNN and
logistic-regression runners and re-exports the others (:mod:`probes.fewshot_run`,
:mod:`probes.compare`, :mod:`probes.report_run`). It loads the data
(:func:`probes.data.load_probe_data`), fits the estimator(s) on train (hyper-parameters and
thresholds chosen on val only), scores test, and returns long-format result rows
(:mod:`probes.results`), appended to ``out`` (JSON lines) when given.

Metrics (``label`` is a label column or a class name; ``mean`` is the summary over labels):

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

kNN scores that are undefined (all k neighbours miss the label) get the label's train prevalence.
Logistic regression: labels with both classes in train and val get their C chosen on val; labels
with both classes in train but one in val use the C that is best on the mean val AUROC of the
others (``params.C_from = "shared"``); a label with one class in train cannot be fitted and is
reported with null values and ``params.skipped`` saying why. Few-shot: a label with fewer eligible
patients than K in the support pool (train + val) is reported likewise for that K. Nothing is
dropped silently.

This module does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .compare import run_compare
from .episodes import episodes_path, load_episodes, save_episodes
from .evaluate import (
    DEFAULT_KS,
    _context,
    _evaluate,
    _fill_undefined,
    _finish,
    _learnable,
    _load,
    _prevalence,
)
from .fewshot_run import run_fewshot
from .fit import _logreg_scores
from .knn import KNNProbe
from .logreg import DEFAULT_C_GRID
from .report_run import run_report

__all__ = [
    "episodes_path",
    "load_episodes",
    "run_compare",
    "run_fewshot",
    "run_knn",
    "run_logreg",
    "run_report",
    "save_episodes",
]

# ---- kNN ----


def run_knn(
    cache,
    set_name: str | None = None,
    *,
    features: str = "cls",
    k: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    labels: Sequence[str] | None = None,
    uncertain: str = "ignore",
    aggregate: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    val_fraction: float = 0.2,
    out: str | os.PathLike | None = None,
) -> list[dict]:
    """Weighted kNN probe (every k from one search), evaluated on the test split.

    Args:
        cache: feature store folder or URL.
        set_name: feature set (None: the store's only set).
        features: ``cls``, ``pooled``, ``cls+pooled``, ``layer_cls:-1`` ...
        k: neighbour counts.
        temperature: softmax temperature of the votes.
        labels: label columns / class names to probe (None: all).
        uncertain: uncertain-label policy: ``ignore``, ``zeros`` or ``ones``.
        aggregate: ``mean``/``max`` pools slice features per volume first (one sample per volume).
        n_boot: bootstrap draws for the CIs.
        seed: bootstrap seed (and seed of a carved validation split).
        val_fraction: share of train patients carved into validation when the store has none.
        out: JSON-lines file to append the rows to.

    Returns:
        The result rows (see the module docstring), ``probe = "knn"``, one block per k.
    """
    data = _load(cache, set_name, features, labels, uncertain, val_fraction, seed, aggregate)
    run = _context(data, "knn")
    asked = [int(v) for v in ([k] if np.isscalar(k) else k)]
    ks = sorted({min(v, len(data.train)) for v in asked})  # k above the train size is that size, said once
    probe = KNNProbe(k=ks, temperature=temperature, task=data.task).fit(data.train.X, data.train.y)
    S_test = probe.predict_scores(data.test.X)
    S_val = probe.predict_scores(data.val.X) if len(data.val) else None
    prevalence = _prevalence(data.train.y) if data.task == "multilabel" else 0.0
    params = {**run["params"], "temperature": float(temperature)}
    if ks != sorted(set(asked)):
        params["k_requested"] = sorted(set(asked))
    learnable, extra = _learnable(data)  # a label without both classes in train gets no score, not 0.5
    entries = []
    for kk in ks:
        St = _fill_undefined(S_test[kk], prevalence, len(data.label_names))
        Sv = _fill_undefined(S_val[kk], prevalence, len(data.label_names)) if S_val is not None else None
        base = {"k": kk, "seed": int(seed), "n_train": len(data.train)}
        entries += _evaluate(data, St, Sv, base, params, n_boot, seed, fitted=learnable, label_extra=extra)
    return _finish(entries, run, out)


# ---- logistic regression ----


def run_logreg(
    cache,
    set_name: str | None = None,
    *,
    features: str = "cls",
    C: float | None = None,
    C_grid: Sequence[float] = DEFAULT_C_GRID,
    labels: Sequence[str] | None = None,
    uncertain: str = "ignore",
    aggregate: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    val_fraction: float = 0.2,
    out: str | os.PathLike | None = None,
) -> list[dict]:
    """Logistic-regression (linear) probe with C chosen on validation, evaluated on test.

    Args:
        cache: feature store folder or URL.
        set_name: feature set (None: the store's only set).
        features: features to probe (see :func:`probes.data.load_probe_data`).
        C: a fixed inverse regularisation strength; None selects it per label from ``C_grid`` on val.
        C_grid: candidate C values.
        labels: label columns / class names (None: all).
        uncertain: uncertain-label policy.
        aggregate: ``mean``/``max`` pools slice features per volume first (one sample per volume).
        n_boot: bootstrap draws.
        seed: bootstrap seed (and seed of a carved validation split).
        val_fraction: share of train patients carved into validation when the store has none.
        out: JSON-lines file to append the rows to.

    Returns:
        The result rows, ``probe = "logreg"``; label rows carry their ``C``.
    """
    data = _load(cache, set_name, features, labels, uncertain, val_fraction, seed, aggregate)
    run = _context(data, "logreg")
    S_test, S_val, fitted, extra = _logreg_scores(data, C, C_grid)
    base = {"seed": int(seed), "n_train": len(data.train)}
    params = dict(run["params"])
    if C is None:
        params["C_grid"] = [float(c) for c in np.sort(np.asarray(C_grid, dtype=np.float64))]
    entries = _evaluate(data, S_test, S_val, base, params, n_boot, seed, fitted, extra)
    return _finish(entries, run, out)
