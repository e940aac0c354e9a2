"""Probe runs: load a feature set, fit, score the test split, compute metrics with CIs, write rows.

Each ``run_*`` function is what one ``probes`` command does; this module holds the kNN and
logistic-regression runners and re-exports the others (:mod:`probes.fewshot_run`,
:mod:`probes.compare`, :mod:`probes.report.run`). It loads the data
(:func:`probes.data.load_probe_data`), fits the estimator(s) on train (hyper-parameters and
thresholds chosen on val only), scores test, and returns long-format result rows
(:mod:`probes.results`), appended to ``out`` (JSON lines) when given.

Metrics and their CIs: :mod:`probes.evaluate`; which rows each probe fits on, selection, refit
and threshold rows: :mod:`probes.fit`; the protocols and every default: docs/PROTOCOLS.md. Nothing is
dropped silently: a label a probe cannot learn has null values with ``params.skipped`` saying why.

This module does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from featcache.errors import FeatcacheError
from probes.compare import run_compare
from probes.data import load_probe_data
from probes.episodes import SAMPLINGS, episodes_path, first_patient_episodes, load_episodes, save_episodes
from probes.estimators.logreg import DEFAULT_C_GRID, DINOV2_C_GRID
from probes.evaluate import DEFAULT_KS, _context, _finish, _load, evaluate_scores
from probes.fewshot_run import auroc_many, fewshot_notes, run_fewshot, summarize_fewshot
from probes.fit import knn_scores, logreg_scores
from probes.report.run import run_report

__all__ = [
    "SAMPLINGS",
    "auroc_many",
    "episodes_path",
    "fewshot_notes",
    "first_patient_episodes",
    "load_episodes",
    "run_compare",
    "run_fewshot",
    "run_knn",
    "run_logreg",
    "run_report",
    "save_episodes",
    "summarize_fewshot",
]

# ---- kNN ----


def run_knn(
    cache,
    set_name: str | None = None,
    *,
    features: str = "cls",
    k: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    method: str = "dinov2",
    s: float = 1.0,
    search: str = "flat",
    memory_cap: int | None = None,
    labels: Sequence[str] | None = None,
    uncertain: str = "ignore",
    aggregate: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    allow_partial: bool = False,
    out: str | os.PathLike | None = None,
    by: str | Sequence[str] | None = None,
) -> list[dict]:
    """Weighted kNN probe, ``dinov2/eval/knn.py`` (every k from one search), evaluated on test.

    The index holds every labelled non-test row (train, and val when the store has one): kNN
    selects nothing, so nothing is carved. Youden thresholds come from patient-grouped
    out-of-fold scores over the indexed rows (:mod:`probes.fit`).

    Args:
        cache: feature store folder or URL.
        set_name: feature set (None: the store's only set).
        features: ``cls``, ``pooled``, ``cls+pooled``, ``layer_cls:-1`` ...
        k: neighbour counts; one above the indexed rows is capped (``params.k_requested``).
        temperature: softmax temperature of the votes.
        method: ``dinov2`` (``dinov2/eval/knn.py``: one softmax over the largest k, the score at k
            the sum of the first k weighted votes), ``renormalized`` (the softmax over each k's own
            neighbours) or ``mlknn`` (ML-kNN, multi-label; rows say ``probe = "mlknn"``).
        s: ML-kNN's Laplace smoothing.
        search: ``flat`` (exact FAISS float32), ``stream`` (the same exact search, the train + val
            features streamed from the store shard by shard within ``memory_cap`` bytes: sets larger
            than memory; Youden thresholds then have no held-out scores) or ``bf16`` (bf16
            candidates + exact re-rank: the same neighbours, faster where the CPU has bf16 matmul;
            needs torch).
        memory_cap: ``search="stream"``: bytes the search may hold at once (None: a default).
        labels: label columns / class names to probe (None: all).
        uncertain: uncertain-label policy: ``ignore``, ``zeros`` or ``ones``.
        aggregate: ``mean``/``max`` pools slice features per volume first (one sample per volume).
        n_boot: bootstrap draws for the CIs.
        seed: bootstrap seed and seed of the out-of-fold folds.
        allow_partial: probe a set whose extraction has not finished (pending rows left out,
            counted in ``params.pending_rows``).
        out: JSON-lines file to append the rows to.
        by: subgroup columns, e.g. ``meta_sex,meta_age:0,40,60,80`` (:mod:`probes.subgroups`).

    Returns:
        The result rows (see :mod:`probes.evaluate`), ``probe = "knn"``, one block per k.
    """
    streamed = search == "stream"
    if streamed and (aggregate or "+" in str(features) or ":" in str(features)):
        raise FeatcacheError(
            "--search stream reads one stored array (cls, pooled ...): no --aggregate, no '+' or ':'"
        )
    data = load_probe_data(
        cache, set_name, features=features, labels=labels, uncertain=uncertain, seed=seed, aggregate=aggregate,
        allow_partial=allow_partial, test_features_only=streamed,
    )  # fmt: skip
    run = _context(data, "knn")
    source = None
    if streamed:
        from probes.estimators.knn_search import StoreBlocks

        rows = np.concatenate([data.train.rows, data.val.rows])
        source = StoreBlocks(data.context["store"], data.context["store_set"], str(features), rows=rows)
    asked = sorted({int(v) for v in ([k] if np.isscalar(k) else k)})
    if not asked or asked[0] < 1:
        raise FeatcacheError(f"k must be positive integers; got {k!r}")
    n_index = len(data.train) + len(data.val)
    ks = sorted({min(v, n_index) for v in asked})  # k above the indexed rows is that size, said once
    scored = knn_scores(
        data,
        ks,
        temperature=temperature,
        method=method,
        s=s,
        search=search,
        seed=seed,
        source=source,
        memory_cap=memory_cap,
    )
    if method == "mlknn":
        run = _context(data, "mlknn")
        params = {**run["params"], "s": float(s), "exclude_self": True}
    else:
        params = {**run["params"], "temperature": float(temperature), "vote": method, "softmax_k": max(ks)}
    params["search"] = search
    if streamed and memory_cap:
        params["memory_cap"] = int(memory_cap)
    if ks != asked:
        params["k_requested"] = asked
    entries = []
    for kk in ks:
        base = {"k": kk, "seed": int(seed), "n_train": scored[kk].n_fit}
        entries += evaluate_scores(data, scored[kk], base, params, n_boot, seed, by=by)
    return _finish(entries, run, out)


# ---- logistic regression ----


def run_logreg(
    cache,
    set_name: str | None = None,
    *,
    features: str = "cls",
    C: float | None = None,
    C_grid: Sequence[float] | None = None,
    protocol: str | None = None,
    labels: Sequence[str] | None = None,
    uncertain: str = "ignore",
    aggregate: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    val_fraction: float = 0.2,
    allow_partial: bool = False,
    out: str | os.PathLike | None = None,
    by: str | Sequence[str] | None = None,
) -> list[dict]:
    """Logistic-regression (linear) probe, evaluated on test (:mod:`probes.fit` for the protocol).

    A fixed ``C`` fits every labelled non-test row. Without ``C``, C is selected per label from
    ``C_grid`` on val (the store's; else ``val_fraction`` of the train patients are carved off,
    recorded as ``params.val_carved``), then the model is refit on train + val at that C.

    Args:
        cache: feature store folder or URL.
        set_name: feature set (None: the store's only set).
        features: features to probe (see :func:`probes.data.load_probe_data`).
        C: a fixed inverse regularisation strength; None selects it per label from ``C_grid`` on val.
        C_grid: candidate C values (default ``DEFAULT_C_GRID``; with ``protocol="dinov2"``,
            dinov2's 45 values ``10**linspace(-6, 5, 45)``).
        protocol: ``"dinov2"``: dinov2/eval/log_regression.py's preset (its C grid, features fed as
            stored, no standardisation; a carve, when needed, of 10% as dinov2 does, but of whole
            patients); None: standardised features and ``C_grid``.
        labels: label columns / class names (None: all).
        uncertain: uncertain-label policy.
        aggregate: ``mean``/``max`` pools slice features per volume first (one sample per volume).
        n_boot: bootstrap draws.
        seed: bootstrap seed, seed of a carved validation split and of the out-of-fold folds.
        val_fraction: share of train patients carved into validation when C is selected and the
            store has no val split.
        allow_partial: probe a set whose extraction has not finished (pending rows left out,
            counted in ``params.pending_rows``).
        out: JSON-lines file to append the rows to.
        by: subgroup columns (:mod:`probes.subgroups`).

    Returns:
        The result rows, ``probe = "logreg"``; label rows carry their ``C``.
    """
    if protocol not in (None, "dinov2"):
        raise FeatcacheError(f"unknown logistic-regression protocol {protocol!r}: use dinov2 or leave it out")
    standardize = protocol != "dinov2"
    if C_grid is None:
        C_grid = DINOV2_C_GRID if protocol == "dinov2" else DEFAULT_C_GRID
    data = _load(cache, set_name, features, labels, uncertain, 0.0, seed, aggregate, allow_partial)
    scored, data = logreg_scores(
        data, C, C_grid, val_fraction=val_fraction, seed=seed, standardize=standardize
    )
    run = _context(data, "logreg")
    base = {"seed": int(seed), "n_train": scored.n_fit}
    params = dict(run["params"], standardize=standardize)
    if protocol:
        params["protocol"] = protocol
    if C is None:
        params["C_grid"] = [float(c) for c in np.sort(np.asarray(C_grid, dtype=np.float64))]
    entries = evaluate_scores(data, scored, base, params, n_boot, seed, by=by)
    return _finish(entries, run, out)
