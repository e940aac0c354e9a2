"""Fit a probe on a :class:`~probes.data.ProbeData` and score its splits (shared by the runners).

What is fitted on which rows (docs/PROTOCOLS.md has the whole account):

- **Nothing is carved unless something is selected on it.** kNN and a fixed-C logistic regression
  fit every labelled non-test row (train, and val when the store has one): the final model of the
  dinov2 protocols. A C grid is selected on val (the store's, or a patient-level carve of train
  when it has none, recorded as ``val_carved``), then the model is refit on train + val at the
  chosen C, as ``dinov2/eval/log_regression.py`` does.
- **Thresholds come from held-out scores.** The Youden threshold of ``@youden`` metrics is chosen
  on the val scores of the train-only model when C was selected on val; otherwise (nothing held
  out) on patient-grouped out-of-fold scores over the fitted rows (``N_FOLDS`` folds, whole
  patients per fold, fixed seed): each fitted row is scored by a model that never saw its patient.
  ``params.threshold_from`` says which (``val``, ``carved val`` or ``oof5``).

This module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError
from featcache.progress import probe_progress
from probes.data import ProbeData, Split, merge_train_val, with_carved_val
from probes.estimators.logreg import LogRegProbe
from probes.evaluation import metrics

N_FOLDS = 5
"""Patient-grouped folds of the out-of-fold scores that thresholds are chosen on."""


@dataclass
class Scored:
    """A fitted probe's scores and what the rows need to say about the fit.

    Attributes:
        test: float64 [n_test, L] scores of the test rows (NaN where a label could not be fitted).
        thr_y: targets of the rows thresholds are chosen on (float [m, L] or int [m]), or None.
        thr_s: float64 [m, L] their held-out scores, or None.
        thr_from: ``val``, ``carved val`` or ``oof5`` (None: no threshold rows).
        fitted: bool [L], labels the probe could be fitted for.
        extra: per label, extra fields and params (``C``, ``params.skipped`` ...).
        n_fit: rows the final model was fitted on.
        fit_rows: ``train`` or ``train+val``.
    """

    test: np.ndarray
    thr_y: np.ndarray | None
    thr_s: np.ndarray | None
    thr_from: str | None
    fitted: np.ndarray
    extra: list[dict[str, Any]] = field(default_factory=list)
    n_fit: int = 0
    fit_rows: str = "train"

    def thresholds(self, task: str) -> list[dict[str, tuple[float, str | None]]]:
        """Per label, ``{"0.5": (0.5, None), "youden": (t, why)}``: the fixed threshold and the one
        maximising Youden's J on the held-out scores (NaN with the reason when there is none).

        Args:
            task: ``multilabel`` (``thr_y`` float [m, L]) or ``multiclass`` (int [m], one-vs-rest).
        """
        L = self.test.shape[1]
        out: list[dict[str, tuple[float, str | None]]] = [{"0.5": (0.5, None)} for _ in range(L)]
        if self.thr_s is None or not len(self.thr_s):
            for t in out:
                t["youden"] = (float("nan"), "no held-out scores to choose a threshold on")
            return out
        Yv = self.thr_y.astype(np.float64) if task == "multilabel" else metrics.one_hot(self.thr_y, L)
        Sv = np.asarray(self.thr_s, dtype=np.float64)
        for j, t in enumerate(out):
            ok = ~np.isnan(Sv[:, j])
            try:
                t["youden"] = (metrics.youden_threshold(Yv[ok, j], Sv[ok, j]), None)
            except FeatcacheError:
                n_p, n_n = int((Yv[ok, j] == 1).sum()), int((Yv[ok, j] == 0).sum())
                t["youden"] = (
                    float("nan"),
                    f"{self.thr_from} rows hold {n_p} positives and {n_n} negatives: no Youden threshold",
                )
        return out


def patient_folds(patients: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """int [n] fold of each row, whole patients per fold, patients dealt round-robin in a seeded order.

    Args:
        patients: str [n] patient ids.
        n_folds: folds wanted (capped at the number of patients).
        seed: seed of ``np.random.default_rng`` for the patient order.

    Returns:
        int64 [n] in ``0 .. min(n_folds, n_patients) - 1``.
    """
    unique, inverse = np.unique(patients, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = np.empty(len(unique), dtype=np.int64)
    fold_of[order] = np.arange(len(unique)) % max(1, min(n_folds, len(unique)))
    return fold_of[inverse]


def _take(s: Split, mask: np.ndarray) -> Split:
    return Split(s.X[mask], s.y[mask], s.patients[mask], s.ids[mask], s.rows[mask])


def oof_scores(
    split: Split, fit_score: Callable[[Split, np.ndarray], Any], n_folds: int = N_FOLDS, seed: int = 0
) -> Any:
    """Patient-grouped out-of-fold scores of every row of ``split``.

    Args:
        split: the rows (each row is scored by a model fitted on the other folds).
        fit_score: ``(train_split, X_query) -> scores``: float [q, L], or a dict of such arrays
            (several settings scored from one fit, e.g. kNN's k).
        n_folds: folds (whole patients per fold).
        seed: seed of the fold assignment.

    Returns:
        float64 [n, L] (or a dict of them) in the row order of ``split``; NaN where a fold's model
        had no score.
    """
    folds = patient_folds(split.patients, n_folds, seed)
    out: Any = None
    bar = probe_progress(len(np.unique(folds)), "out-of-fold scores (thresholds)", unit="folds")
    for f in np.unique(folds):
        held = folds == f
        s = fit_score(_take(split, ~held), split.X[held])
        bar.update(1)
        if out is None:
            out = (
                {k: np.full((len(split), v.shape[1]), np.nan) for k, v in s.items()}
                if isinstance(s, dict)
                else np.full((len(split), s.shape[1]), np.nan)
            )
        if isinstance(s, dict):
            for k, v in s.items():
                out[k][held] = v
        else:
            out[held] = s
    bar.close()
    return out


def learnable(y: np.ndarray, task: str, n_labels: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """bool [L] labels whose rows ``y`` hold both classes, and a ``skipped`` reason for the others.

    Multi-class data is always learnable (every class has train rows, checked at load time).
    """
    if task != "multilabel":
        return np.ones(n_labels, bool), [{} for _ in range(n_labels)]
    n_pos, n_neg = (y == 1).sum(axis=0), (y == 0).sum(axis=0)
    ok = (n_pos > 0) & (n_neg > 0)
    extra: list[dict[str, Any]] = [
        {}
        if ok[j]
        else {
            "params": {"skipped": f"fitted rows hold {int(n_pos[j])} positives and {int(n_neg[j])} negatives"}
        }
        for j in range(n_labels)
    ]
    return ok, extra


# ---- kNN ----


def _prevalence(Y: np.ndarray) -> np.ndarray:
    """float [L] share of positives among the known labels (0.5 where none is known)."""
    known = ~np.isnan(Y)
    pos = np.where(known, Y, 0).sum(axis=0)
    n = known.sum(axis=0)
    return np.where(n > 0, pos / np.maximum(n, 1), 0.5)


def _fill_undefined(S: np.ndarray, fill: np.ndarray | float, width: int) -> tuple[np.ndarray, np.ndarray]:
    """kNN scores float64 [n, width] with NaN (no neighbour knows the label) -> ``fill``; classes
    above the largest one seen in train (absent from the kNN's output) -> probability 0.

    Returns:
        (scores, int [width] how many rows of each label were filled).
    """
    S = np.array(S, dtype=np.float64, copy=True)
    if S.shape[1] < width:
        S = np.concatenate([S, np.zeros((len(S), width - S.shape[1]))], axis=1)
    bad = np.isnan(S)
    if bad.any():
        S[bad] = np.broadcast_to(fill, S.shape)[bad]
    return S, bad.sum(axis=0)


KNN_METHODS = ("dinov2", "renormalized", "mlknn")
"""``dinov2``: dinov2/eval/knn.py's vote (the default); ``renormalized``: the softmax taken over each
k's own neighbours; ``mlknn``: ML-kNN (Zhang & Zhou 2007), multi-label only."""


def _knn_raw(
    train: Split, X: np.ndarray, ks: list[int], task: str, method: str, **kw
) -> dict[int, np.ndarray]:
    """Scores of ``X`` for every k of ``ks`` (each at most ``len(train)``), by ``method``."""
    if method == "mlknn":
        from probes.estimators.mlknn import MLkNNProbe

        fits = {k: MLkNNProbe(k=k, s=kw.get("s", 1.0)).fit(train.X, train.y) for k in ks}
        return _in_blocks(X, lambda q: {k: m.predict_proba(q) for k, m in fits.items()}, "ML-kNN")
    search = kw.get("search", "flat")
    if search == "flat":
        from probes.estimators.knn import KNNProbe

        probe = KNNProbe(k=ks, task=task, temperature=kw.get("temperature", 0.07), vote=method)
    else:  # bf16 pre-search + exact float32 re-rank: the same neighbours (probes/estimators/knn_bf16.py)
        from probes.estimators.knn_search import ScalableKNNProbe

        probe = ScalableKNNProbe(
            k=ks, task=task, temperature=kw.get("temperature", 0.07), vote=method, search=search
        )
    probe.fit(train.X, train.y)
    return _in_blocks(X, lambda q: probe.scores_for_ks(q, ks), f"kNN search ({len(train)} indexed)")


QUERY_BLOCK = 8192
"""Query rows scored per step of the kNN progress bar (each row's vote is its own: blocks change nothing)."""


def _in_blocks(X: np.ndarray, score, desc: str) -> dict[int, np.ndarray]:
    """``score(X)`` (k -> float [q, L]) computed :data:`QUERY_BLOCK` query rows at a time, with
    progress (queries/s, ETA) on stderr when the command turned it on."""
    if len(X) <= QUERY_BLOCK:
        return score(X)
    parts: list[dict[int, np.ndarray]] = []
    with probe_progress(len(X), desc, unit="queries") as bar:
        for start in range(0, len(X), QUERY_BLOCK):
            parts.append(score(X[start : start + QUERY_BLOCK]))
            bar.update(len(parts[-1][next(iter(parts[-1]))]))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def knn_scores(
    data: ProbeData,
    ks: Sequence[int],
    *,
    temperature: float = 0.07,
    method: str = "dinov2",
    s: float = 1.0,
    search: str = "flat",
    seed: int = 0,
    thresholds: bool = True,
    source: Any = None,
    memory_cap: int | None = None,
) -> dict[int, Scored]:
    """kNN scores of the test rows for every k from one search over train + val.

    The dinov2 vote takes one softmax over the largest k of ``ks`` (as ``KnnModule`` does over
    ``max(nb_knn)``), so the scores at a k depend on the largest k asked with it. Scores a
    neighbourhood cannot give (every one of the first k neighbours misses the label) are filled with
    the label's prevalence among the indexed rows; the count filled is recorded per label
    (``params.filled``).

    Args:
        data: loaded data.
        ks: neighbour counts (each at most the indexed rows).
        temperature: softmax temperature (``dinov2``, ``renormalized``).
        method: one of ``KNN_METHODS``.
        s: ML-kNN's Laplace smoothing.
        source: ``search="stream"``: the fitted rows' features as a block source
            (:class:`probes.estimators.knn_search.StoreBlocks` over the train + val rows, in row order).
        memory_cap: ``search="stream"``: bytes the search may hold at once.
        search: ``flat`` (exact FAISS float32), ``stream`` (the same exact search with the fitted
            rows streamed from the store shard by shard, bounded memory; no out-of-fold thresholds)
            or ``bf16`` (a bf16 candidate search with a proven
            margin, then an exact float32 re-rank of the candidates: the same neighbours; needs torch).
        seed: seed of the out-of-fold folds.
        thresholds: also compute out-of-fold scores for the Youden threshold.

    Returns:
        k -> :class:`Scored`.

    Raises:
        FeatcacheError: an unknown method, or ML-kNN on multi-class data.
    """
    if method not in KNN_METHODS:
        raise FeatcacheError(f"unknown kNN method {method!r}: use {', '.join(KNN_METHODS)}")
    if method == "mlknn" and data.task != "multilabel":
        raise FeatcacheError("ML-kNN is a multi-label method; use --method dinov2 for a multi-class set")
    pool = merge_train_val(data)
    L = len(data.label_names)
    task = data.task
    ks = sorted({int(k) for k in ks})
    fit_rows = "train+val" if len(data.val) else "train"
    fitted, extra = learnable(pool.train.y, task, L)
    fill = _prevalence(pool.train.y) if task == "multilabel" else 0.0
    if search not in ("flat", "bf16", "stream"):
        raise FeatcacheError(f"unknown kNN search {search!r}: use flat, bf16 or stream")
    if search == "stream":
        return _knn_streamed(
            data, ks, temperature=temperature, method=method, source=source, memory_cap=memory_cap
        )
    kw = {"temperature": temperature, "s": s, "search": search}
    raw = _knn_raw(pool.train, data.test.X, ks, task, method, **kw)

    def fold(tr: Split, X: np.ndarray) -> dict[int, np.ndarray]:
        kk = [min(k, len(tr)) for k in ks]
        got = _knn_raw(tr, X, sorted(set(kk)), task, method, **kw)
        f = _prevalence(tr.y) if task == "multilabel" else 0.0
        return {k: _fill_undefined(got[c], f, L)[0] for k, c in zip(ks, kk)}

    oof = oof_scores(pool.train, fold, seed=seed) if thresholds else None
    out = {}
    for k in ks:
        S, n_filled = _fill_undefined(raw[k], fill, L)
        ex = [dict(e) for e in extra]
        for j in np.flatnonzero(n_filled):
            why = f"{int(n_filled[j])} test rows scored with the prevalence (no neighbour among the first {k} knows the label)"
            ex[j] = {**ex[j], "params": {**ex[j].get("params", {}), "filled": why}}
        out[k] = Scored(
            S, pool.train.y if thresholds else None, None if oof is None else oof[k],
            f"oof{N_FOLDS}" if thresholds else None, fitted, ex, len(pool.train), fit_rows,
        )  # fmt: skip
    return out


def _knn_streamed(data: ProbeData, ks, *, temperature, method, source, memory_cap) -> dict[int, Scored]:
    """Exact kNN with the fitted rows streamed from the store (``probes.estimators.knn_search``), test in memory."""
    from probes.estimators.knn_search import ScalableKNNProbe

    if method == "mlknn" or source is None:
        raise FeatcacheError(
            "--search stream needs the dinov2 or renormalized vote and features read from the store"
        )
    pool = merge_train_val(data)
    L, task = len(data.label_names), data.task
    order = np.argsort(pool.train.rows, kind="stable")  # the stream yields rows in store order
    y = pool.train.y[order]
    fitted, extra = learnable(y, task, L)
    probe = ScalableKNNProbe(
        k=list(ks), task=task, temperature=temperature, vote=method, search="stream", memory_cap=memory_cap
    )
    raw = probe.fit(source, y).scores_for_ks(data.test.X, list(ks))
    fill = _prevalence(y) if task == "multilabel" else 0.0
    fit_rows = "train+val" if len(data.val) else "train"
    out = {}
    for k in ks:
        S, _ = _fill_undefined(raw[k], fill, L)
        out[k] = Scored(S, None, None, None, fitted, [dict(e) for e in extra], len(y), fit_rows)
    return out


# ---- logistic regression ----


def _fit_fixed(split: Split, task: str, C: float, cols: np.ndarray | None = None, **kw) -> LogRegProbe:
    y = split.y if cols is None else split.y[:, cols]
    return LogRegProbe(C=float(C), task=task, **kw).fit(split.X, y)


def _fixed_scores(split: Split, X: np.ndarray, task: str, C: float, L: int, **kw) -> np.ndarray:
    """Scores [q, L] of a fixed-C fit on ``split`` (labels with one class there: NaN)."""
    if task == "multiclass":
        return _fit_fixed(split, task, C, **kw).predict_proba(X)
    ok, _ = learnable(split.y, task, L)
    S = np.full((len(X), L), np.nan)
    if ok.any():
        S[:, ok] = _fit_fixed(split, task, C, np.flatnonzero(ok), **kw).predict_proba(X)
    return S


def _fit_params(probe: LogRegProbe, i: int, source: str) -> dict[str, Any]:
    """What a label's row says about its final fit."""
    n_iter, conv = np.atleast_1d(probe.n_iter_), np.atleast_1d(probe.converged_)
    i = min(i, len(n_iter) - 1)
    return {
        "C": float(np.atleast_1d(probe.C_)[min(i, np.atleast_1d(probe.C_).size - 1)]),
        "params": {"C_from": source, "n_iter": int(n_iter[i]), "converged": bool(conv[i])},
    }


def logreg_scores(
    data: ProbeData,
    C: float | None,
    C_grid: Sequence[float],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
) -> tuple[Scored, ProbeData]:
    """Fit the linear probe as the module docstring says.

    Args:
        data: loaded data (val may be empty).
        C: a fixed C, or None to select one per label (multi-class: one) from ``C_grid`` on val.
        C_grid: candidate C values.
        val_fraction: share of train patients carved into val when C is selected and the store
            has no val split.
        seed: seed of that carve and of the out-of-fold folds.
        standardize: z-score features with the fitted rows' statistics (False: as dinov2 feeds them).

    Returns:
        (the scores, the data as used: with a carved val when one was carved).
    """
    L = len(data.label_names)
    task = data.task
    kw = {"standardize": standardize}
    if C is not None:
        pool = merge_train_val(data)
        fit_rows = "train+val" if len(data.val) else "train"
        fitted, extra = learnable(pool.train.y, task, L)
        S_test = np.full((len(data.test), L), np.nan)
        if task == "multiclass":
            probe = _fit_fixed(pool.train, task, C, **kw)
            S_test = probe.predict_proba(data.test.X)
            extra = [_fit_params(probe, 0, "given") for _ in range(L)]
        elif fitted.any():
            cols = np.flatnonzero(fitted)
            probe = _fit_fixed(pool.train, task, C, cols, **kw)
            S_test[:, cols] = probe.predict_proba(data.test.X)
            for i, j in enumerate(cols):
                extra[j] = _fit_params(probe, i, "given")
        S_oof = oof_scores(pool.train, lambda tr, X: _fixed_scores(tr, X, task, C, L, **kw), seed=seed)
        scored = Scored(
            S_test, pool.train.y, S_oof, f"oof{N_FOLDS}", fitted, extra, len(pool.train), fit_rows
        )
        return scored, data

    carved = not len(data.val)
    if carved:
        data = with_carved_val(data, val_fraction, seed)
    thr_from = "carved val" if carved else "val"
    grid = np.sort(np.asarray(C_grid, dtype=np.float64))
    pool = merge_train_val(data)
    if task == "multiclass":  # select on val, refit on train + val (inside the estimator)
        probe = LogRegProbe(C=None, C_grid=grid, task=task, refit=True, **kw)
        probe.fit(data.train.X, data.train.y, data.val.X, data.val.y)
        extra = [_fit_params(probe, 0, thr_from) for _ in range(L)]
        for e in extra:
            e["params"]["select"] = "val accuracy"
        scored = Scored(
            probe.predict_proba(data.test.X), data.val.y, probe.val_proba_, thr_from,
            np.ones(L, bool), extra, len(pool.train), "train+val",
        )  # fmt: skip
        return scored, data

    Y, Yv = data.train.y, data.val.y
    in_train, extra = learnable(Y, task, L)
    in_val = (Yv == 1).any(axis=0) & (Yv == 0).any(axis=0)
    selectable = np.flatnonzero(in_train & in_val)
    rest = np.flatnonzero(in_train & ~in_val)
    if not len(selectable) and len(rest):
        raise FeatcacheError(
            f"{data.context.get('store_set')}: no label has both classes in the validation split, so C "
            "cannot be chosen; pass --C, or give the manifest a larger val split"
        )
    S_val = np.full((len(data.val), L), np.nan)
    S_test = np.full((len(data.test), L), np.nan)
    if len(selectable):
        probe = LogRegProbe(C=None, C_grid=grid, task=task, refit=True, **kw)
        probe.fit(data.train.X, Y[:, selectable], data.val.X, Yv[:, selectable])
        S_val[:, selectable] = probe.val_proba_  # the train-only fit at the chosen C: held out
        S_test[:, selectable] = probe.predict_proba(data.test.X)  # refit on train + val
        for i, j in enumerate(selectable):
            extra[j] = _fit_params(probe, i, thr_from)
        if len(rest):  # one class in val: the C best on the mean val AUROC of the others
            shared = float(grid[int(np.argmax(np.nanmean(probe.val_auroc_, axis=1)))])
            S_val[:, rest] = _fit_fixed(data.train, task, shared, rest, **kw).predict_proba(data.val.X)
            final = _fit_fixed(pool.train, task, shared, rest, **kw)
            S_test[:, rest] = final.predict_proba(data.test.X)
            for i, j in enumerate(rest):
                extra[j] = _fit_params(final, i, "shared")
    scored = Scored(S_test, Yv, S_val, thr_from, in_train, extra, len(pool.train), "train+val")
    return scored, data
