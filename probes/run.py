"""Probe runs: load a feature set, fit, score the test split, compute metrics with CIs, write rows.

Each ``run_*`` function is what one ``probes`` command does. It loads the data
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

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError

from . import metrics
from .data import ProbeData, check_same_test, load_probe_data
from .fewshot import Episode, fewshot_scores, sample_episodes
from .knn import KNNProbe
from .logreg import DEFAULT_C_GRID, LogRegProbe
from .results import RESULT_FIELDS, append_jsonl, make_rows
from .stats import bootstrap_ci, delong, holm, paired_bootstrap

try:  # serialises writers of a shared episodes file (POSIX)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

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


def _logreg_scores(
    data: ProbeData, C: float | None, C_grid: Sequence[float]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[dict[str, Any]]]:
    """Fit the linear probe: (test scores [n, L], val scores or None, fitted bool [L], per-label extra)."""
    L = len(data.label_names)
    if data.task == "multiclass":
        probe = LogRegProbe(C=C, C_grid=C_grid, task="multiclass")
        has_val = C is None and len(data.val) > 0
        if C is None and not has_val:
            raise FeatcacheError(
                f"{data.context.get('store_set')}: no validation rows to choose C on; pass --C or a val split"
            )
        probe.fit(data.train.X, data.train.y, *((data.val.X, data.val.y) if has_val else ()))
        S_val = probe.predict_scores(data.val.X) if len(data.val) else None
        extra = [{"C": float(probe.C_), "params": {"C_from": "val" if C is None else "given"}}] * L
        return probe.predict_scores(data.test.X), S_val, np.ones(L, bool), extra

    Y, Yv = data.train.y, data.val.y
    two = lambda y: (y == 1).any(axis=0) & (y == 0).any(axis=0)  # noqa: E731
    in_train = two(Y)
    in_val = two(Yv) if len(data.val) else np.zeros(L, bool)
    S_test = np.full((len(data.test), L), np.nan)
    S_val = np.full((len(data.val), L), np.nan) if len(data.val) else None
    extra: list[dict[str, Any]] = [{} for _ in range(L)]
    for j in np.flatnonzero(~in_train):
        n_pos, n_neg = int((Y[:, j] == 1).sum()), int((Y[:, j] == 0).sum())
        extra[j] = {"params": {"skipped": f"train rows hold {n_pos} positives and {n_neg} negatives"}}

    def fit(cols: np.ndarray, c: float | None, source: str) -> LogRegProbe:
        probe = LogRegProbe(C=c, C_grid=C_grid, task="multilabel")
        if c is None:
            probe.fit(data.train.X, Y[:, cols], data.val.X, Yv[:, cols])
        else:
            probe.fit(data.train.X, Y[:, cols])
        S_test[:, cols] = probe.predict_scores(data.test.X)
        if S_val is not None:
            S_val[:, cols] = probe.predict_scores(data.val.X)
        for i, j in enumerate(cols):
            extra[j] = {"C": float(np.atleast_1d(probe.C_)[i]), "params": {"C_from": source}}
        return probe

    if C is not None:
        if in_train.any():
            fit(np.flatnonzero(in_train), float(C), "given")
    else:
        selectable = np.flatnonzero(in_train & in_val)
        rest = np.flatnonzero(in_train & ~in_val)
        if not len(selectable) and len(rest):
            raise FeatcacheError(
                f"{data.context.get('store_set')}: no label has both classes in the validation split, so C "
                "cannot be chosen; pass --C, or give the manifest a larger val split"
            )
        if len(selectable):
            probe = fit(selectable, None, "val")
            if len(rest):
                grid = np.sort(np.asarray(C_grid, dtype=np.float64))
                shared = float(grid[int(np.argmax(np.nanmean(probe.val_auroc_, axis=1)))])
                fit(rest, shared, "shared")
    return S_test, S_val, in_train, extra


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


# ---- few-shot ----


def episodes_path(out: str | os.PathLike) -> Path:
    """Where the episodes of a few-shot run writing to ``out`` are saved: ``<out>.episodes.json``."""
    return Path(str(out) + ".episodes.json")


def _eligible_patients(data: ProbeData) -> np.ndarray:
    """int [L]: the fewest patients on either side of each label (multi-label) or per class."""
    pids, y = data.train.patients, data.train.y
    _, pidx = np.unique(pids, return_inverse=True)
    n_pat = int(pidx.max()) + 1 if len(pidx) else 0
    if data.task == "multiclass":
        has = np.zeros((n_pat, len(data.label_names)), bool)
        has[pidx, y] = True
        return has.sum(axis=0)
    out = []
    for j in range(y.shape[1]):
        pos = np.bincount(pidx, weights=y[:, j] == 1, minlength=n_pat) > 0
        neg = (np.bincount(pidx, weights=y[:, j] == 0, minlength=n_pat) > 0) & ~pos
        out.append(min(int(pos.sum()), int(neg.sum())))
    return np.array(out)


_EPISODES_FORMAT = "featcache-episodes/1"


def _episode_key(e: dict) -> tuple:
    return (e["label"], int(e["shots"]), int(e["seed"]))


def _episodes_run(data: ProbeData, episodes: list[Episode]) -> dict:
    """The JSON record of a set's episodes: support row ids, so they survive any re-extraction."""
    ids = data.train.ids
    return {
        "store_set": data.context.get("store_set"),
        "manifest_digest": data.context.get("manifest_digest"),
        "uncertain": data.context.get("uncertain"),
        "task": data.task,
        "label_names": list(data.label_names),
        "episodes": [
            {
                "label": None if e.label is None else data.label_names[e.label],
                "shots": int(e.shots),
                "seed": int(e.seed),
                "support_ids": ids[e.support].tolist(),
                "targets": e.targets.tolist(),
            }
            for e in episodes
        ],
    }


def _read_episodes_file(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc.get("runs"), list):
            raise KeyError("runs")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FeatcacheError(
            f"{path}: not a readable episodes file ({type(e).__name__}: {e}); use one written by probes fewshot"
        ) from None
    return doc


def save_episodes(path: str | os.PathLike, data: ProbeData, episodes: list[Episode]) -> Path:
    """Merge a run's episodes into an episodes file (JSON), keeping those of other sets and settings.

    The file holds one record per (set, manifest, uncertain policy, labels) with its episodes keyed
    by (label, shots, seed); a new episode replaces the one with the same key, so several few-shot
    runs (other shots, seeds or sets) can share one file. Concurrent writers are serialised by a lock.

    Args:
        path: the ``.episodes.json`` file (created with its folder if absent).
        data: the run's data (its ``train`` split is the support pool the episodes index).
        episodes: the episodes drawn.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = _episodes_run(data, episodes)
    same = ("store_set", "manifest_digest", "uncertain", "label_names")
    with open(path, "a+", encoding="utf-8") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        text = fh.read()
        doc = _read_episodes_file(path) if text.strip() else {"format": _EPISODES_FORMAT, "runs": []}
        for run in doc["runs"]:
            if all(run.get(k) == record[k] for k in same):
                merged = {_episode_key(e): e for e in run["episodes"]}
                merged.update({_episode_key(e): e for e in record["episodes"]})
                run["episodes"] = list(merged.values())
                break
        else:
            doc["runs"].append(record)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(doc) + "\n")
    return path


def load_episodes(path: str | os.PathLike, data: ProbeData) -> list[Episode]:
    """Read saved episodes and map their support ids onto ``data``'s support pool.

    Episodes depend only on the manifest (patients, labels, splits), so those drawn on one backbone's
    set can be re-run on another set extracted from the same manifest: the record of the same set is
    used when the file has one, else one drawn on the same manifest.

    Args:
        path: the ``.episodes.json`` file.
        data: the loaded data; ``data.train`` is the support pool (train + val for few-shot).

    Returns:
        The episodes of ``data``'s labels, ``support`` indexing ``data.train``.

    Raises:
        FeatcacheError: unreadable file, no record for this manifest, support ids that are not
            train rows here, or targets that disagree with the labels here (another uncertain policy).
    """
    path = Path(path)
    doc = _read_episodes_file(path)
    digest, set_name = data.context.get("manifest_digest"), data.context.get("store_set")
    candidates = [r for r in doc["runs"] if r.get("manifest_digest") == digest and r.get("task") == data.task]
    if not candidates:
        raise FeatcacheError(
            f"{path}: no episodes drawn on the manifest of '{set_name}'; draw new ones (leave out --episodes-from)"
        )
    run = next((r for r in candidates if r.get("store_set") == set_name), candidates[0])
    where = {rid: i for i, rid in enumerate(data.train.ids.tolist())}
    out = []
    for n, e in enumerate(run["episodes"]):
        label = e["label"]
        if label is not None and label not in data.label_names:
            continue
        missing = [rid for rid in e["support_ids"] if rid not in where]
        if missing:
            raise FeatcacheError(
                f"{path}: episode {n} uses ids that are not train or val rows of '{set_name}' ({missing[:3]}); "
                "re-extract the failed rows or draw new episodes"
            )
        support = np.array([where[rid] for rid in e["support_ids"]], dtype=np.int64)
        y = data.train.y[support]
        here = y[:, data.label_names.index(label)] if label is not None else y
        if not np.array_equal(here, np.asarray(e["targets"], dtype=here.dtype)):
            raise FeatcacheError(
                f"{path}: episode {n} ({label}, {e['shots']} shots, seed {e['seed']}) has targets that differ from "
                f"the labels of '{set_name}'; use the --uncertain policy the episodes were drawn with"
            )
        out.append(
            Episode(
                None if label is None else data.label_names.index(label),
                int(e["shots"]),
                int(e["seed"]),
                support,
                e["targets"],
            )
        )
    return out


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    return list(range(int(seeds))) if np.isscalar(seeds) else [int(s) for s in seeds]


def run_fewshot(
    cache,
    set_name: str | None = None,
    *,
    shots: Sequence[int] | None = None,
    seeds: int | Sequence[int] | None = None,
    head: str = "logreg",
    features: str = "cls",
    labels: Sequence[str] | None = None,
    uncertain: str = "ignore",
    aggregate: str | None = None,
    C: float = 1.0,
    k: int = 20,
    temperature: float = 0.07,
    out: str | os.PathLike | None = None,
    episodes_out: str | os.PathLike | None = None,
    episodes_from: str | os.PathLike | None = None,
) -> list[dict]:
    """Few-shot probe: K shots per side / class, many seeds, every episode scored on the full test split.

    Support sets are drawn per patient from the train and validation rows together (there is
    nothing to tune with K shots). One row per (shots, seed, label) with that episode's test
    AUROC, and a ``mean`` row per (shots, seed) over the labels with both classes in test;
    multi-class episodes also give ``accuracy`` and ``balanced_accuracy``.

    Args:
        cache: feature store folder or URL.
        set_name: feature set (None: the store's only set).
        shots: K values (default 1, 2, 4, 8, 16; with ``episodes_from``: those in the file).
        seeds: number of seeds (0..n-1) or the seed values (default 10; with ``episodes_from``: those in
            the file).
        head: ``logreg``, ``knn`` or ``prototype`` (see :mod:`probes.fewshot`).
        features: features to probe.
        labels: label columns / class names (None: all).
        uncertain: uncertain-label policy.
        aggregate: ``mean``/``max`` pools slice features per volume first (one sample per volume).
        C: logreg head inverse regularisation.
        k: kNN head neighbours (capped at the support size).
        temperature: kNN / prototype temperature.
        out: JSON-lines file to append rows to; the episodes are merged into ``<out>.episodes.json``.
        episodes_out: where to save the episodes instead (see :func:`save_episodes`).
        episodes_from: re-run saved episodes (an ``.episodes.json``, possibly drawn on another backbone's
            set of the same manifest) instead of drawing new ones.

    Returns:
        The result rows, ``probe = "fewshot"``.
    """
    # Few-shot tunes nothing, so there is no validation split to carve: the support pool is train + val.
    pool = _pool(_load(cache, set_name, features, labels, uncertain, 0.0, 0, aggregate))
    run = _context(pool, "fewshot")
    given_shots = (1, 2, 4, 8, 16) if shots is None else ([shots] if np.isscalar(shots) else shots)
    shot_list = sorted({int(s) for s in given_shots})
    seed_list = _seed_list(10 if seeds is None else seeds)
    if not shot_list or shot_list[0] < 1 or not seed_list:
        raise FeatcacheError(f"shots must be positive integers and seeds non-empty; got {shots!r}, {seeds!r}")
    names = pool.label_names
    params = {**run["params"], "support_pool": "train+val"}
    head_params = {"logreg": {"C": float(C)}, "knn": {"k": int(k), "temperature": float(temperature)}}
    params.update(head_params.get(head, {"temperature": float(temperature)} if head == "prototype" else {}))
    skipped: dict[tuple[int, int], str] = {}
    if episodes_from is not None:
        episodes = [
            e
            for e in load_episodes(episodes_from, pool)
            if (shots is None or e.shots in shot_list) and (seeds is None or e.seed in seed_list)
        ]
        if not episodes:
            raise FeatcacheError(f"{episodes_from}: no saved episode has the shots and seeds asked for")
        shot_list = sorted({e.shots for e in episodes})
        seed_list = sorted({e.seed for e in episodes})
        if pool.task == "multilabel":
            have = {(e.shots, e.label) for e in episodes}
            for kk in shot_list:
                for j in range(len(names)):
                    if (kk, j) not in have:
                        skipped[(kk, j)] = f"no {kk}-shot episode for this label in {episodes_from}"
    else:
        enough = _eligible_patients(pool)
        episodes = []
        if pool.task == "multiclass":
            episodes = sample_episodes(
                pool.train.patients, pool.train.y, shot_list, seed_list, task="multiclass", label_names=names
            )
        else:
            for kk in shot_list:
                ok = np.flatnonzero(enough >= kk)
                for j in np.flatnonzero(enough < kk):
                    skipped[(kk, int(j))] = (
                        f"{int(enough[j])} eligible train+val patients on the smaller side; {kk} shots need {kk}"
                    )
                if len(ok):
                    episodes += sample_episodes(
                        pool.train.patients, pool.train.y, [kk], seed_list, task="multilabel",
                        labels=ok.tolist(), label_names=names,
                    )  # fmt: skip
    if episodes:
        S = fewshot_scores(pool.train.X, episodes, pool.test.X, head=head, C=C, k=k, temperature=temperature)
    else:
        S = np.zeros((0, len(pool.test)))
    path = episodes_out or (episodes_path(out) if out is not None and episodes_from is None else None)
    if path is not None:
        save_episodes(path, pool, episodes)
    if path is not None or episodes_from is not None:
        params["episodes_file"] = str(episodes_from if episodes_from is not None else path)
    entries = _fewshot_entries(pool, episodes, S, shot_list, seed_list, skipped, head, params)
    return _finish(entries, run, out)


def _pool(data: ProbeData) -> ProbeData:
    """``data`` with the validation rows moved into train (the few-shot support pool)."""
    from .data import Split

    t, v = data.train, data.val
    train = Split(
        np.concatenate([t.X, v.X]),
        np.concatenate([t.y, v.y]),
        np.concatenate([t.patients, v.patients]),
        np.concatenate([t.ids, v.ids]),
        np.concatenate([t.rows, v.rows]),
    )
    empty = Split(t.X[:0], t.y[:0], t.patients[:0], t.ids[:0], t.rows[:0])
    return ProbeData(data.task, data.label_names, train, empty, data.test, dict(data.context))


def _fewshot_entries(data, episodes, S, shot_list, seed_list, skipped, head, params) -> list[dict]:
    names = data.label_names
    patients = data.test.patients
    n_test = len(data.test)
    entries: list[dict] = []
    if data.task == "multiclass":
        Y = metrics.one_hot(data.test.y, len(names))
        for e, s in zip(episodes, S):
            base = {
                "shots": e.shots,
                "seed": e.seed,
                "head": head,
                "n_train": int(e.support.size),
                "params": params,
            }
            per_class = metrics.auroc_per_label(Y, s)
            for c, name in enumerate(names):
                entries.append({**base, "label": name, "metric": "auroc", "value": _finite(per_class[c])})
            pred = np.argmax(s, axis=1)
            common = {"n_test": n_test, "n_patients_test": int(len(np.unique(patients)))}
            entries.append(
                {
                    **base,
                    **common,
                    "label": "mean",
                    "metric": "auroc",
                    "value": _finite(metrics.auroc_ovr(data.test.y, s)),
                }
            )
            for m, fn in (("accuracy", metrics.accuracy), ("balanced_accuracy", metrics.balanced_accuracy)):
                entries.append(
                    {**base, **common, "label": "mean", "metric": m, "value": _finite(fn(data.test.y, pred))}
                )
        return entries

    Y = data.test.y.astype(np.float64)
    by_label: dict[int, list[int]] = {}
    for i, e in enumerate(episodes):
        by_label.setdefault(int(e.label), []).append(i)
    auc = {}
    for j, idx in by_label.items():
        known = ~np.isnan(Y[:, j])
        values = metrics.auroc_rows(Y[known, j], S[idx][:, known])
        for i, v in zip(idx, values):
            auc[(episodes[i].shots, episodes[i].seed, j)] = float(v)
    # the mean over labels must average the same labels at every K, or the curve mixes label sets:
    # a label that is skipped at some K (too few patients) is left out of the mean at every K
    # (shots at which no label at all can be sampled are not held against any label)
    feasible = [kk for kk in shot_list if any((kk, j) not in skipped for j in range(len(names)))]
    everywhere = [j for j in range(len(names)) if all((kk, j) not in skipped for kk in feasible)]
    left_out = [names[j] for j in range(len(names)) if j not in everywhere]
    for kk in shot_list:
        for seed in seed_list:
            base = {"shots": kk, "seed": seed, "head": head, "n_train": 2 * kk}
            in_mean = []
            for j, name in enumerate(names):
                known = ~np.isnan(Y[:, j])
                counts = {"n_test": int(known.sum()), "n_patients_test": int(len(np.unique(patients[known])))}
                if (kk, j) in skipped:
                    p = {**params, "skipped": skipped[(kk, j)]}
                    entries.append(
                        {**base, **counts, "label": name, "metric": "auroc", "value": None, "params": p}
                    )
                    continue
                v = auc.get((kk, seed, j), float("nan"))
                if math.isfinite(v) and j in everywhere:
                    in_mean.append(j)
                entries.append(
                    {
                        **base,
                        **counts,
                        "label": name,
                        "metric": "auroc",
                        "value": _finite(v),
                        "params": params,
                    }
                )
            mean = float(np.mean([auc[(kk, seed, j)] for j in in_mean])) if in_mean else None
            entries.append(
                {
                    **base,
                    "n_test": n_test,
                    "n_patients_test": int(len(np.unique(patients))),
                    "label": "mean",
                    "metric": "auroc",
                    "value": mean,
                    "params": {
                        **params,
                        "labels_in_mean": [names[j] for j in in_mean],
                        **({"labels_not_at_every_shots": left_out} if left_out else {}),
                    },
                }
            )
    return entries


# ---- paired comparison ----


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
    out: str | os.PathLike | None = None,
) -> list[dict]:
    """Paired comparison of two feature sets (e.g. two backbones) on the same test patients.

    The same probe is fitted on each set; per label and for the mean AUROC, the difference
    AUROC(A) - AUROC(B) gets a paired patient-level bootstrap CI (both sets scored on the same
    draws). Per label, ``p`` is DeLong's two-sided p-value and ``p_holm`` its Holm adjustment over
    the labels; the mean row's ``p`` is the paired-bootstrap p-value (DeLong has no mean over labels).
    ``params`` holds both AUROCs and the bootstrap p-value of every row.

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
    data = [_load(cache, s, features, labels, uncertain, val_fraction, seed, aggregate) for s in sets]
    check_same_test(data[0], data[1])
    k = min(int(k), *(len(d.train) for d in data))  # as in run_knn: k above the train size is that size
    scores = []
    for d in data:
        if probe == "knn":
            knn = KNNProbe(k=[int(k)], temperature=temperature, task=d.task).fit(d.train.X, d.train.y)
            fill = _prevalence(d.train.y) if d.task == "multilabel" else 0.0
            s = _fill_undefined(knn.predict_scores(d.test.X)[int(k)], fill, len(d.label_names))
            fitted = _learnable(d)[0]
        else:
            s, _, fitted, _ = _logreg_scores(d, C, C_grid)
        scores.append((s, fitted))
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
    p_delong = np.full(len(names), np.nan)
    rows_label = []
    for j, name in enumerate(names):
        known = ~np.isnan(Y[:, j])
        counts = {"n_test": int(known.sum()), "n_patients_test": int(len(np.unique(patients[known])))}
        if not defined[j]:
            reason = "one class only among the test rows" if both[j] else "the probe could not be fitted"
            rows_label.append(
                {**base, **counts, "label": name, "value": None, "params": {**params, "skipped": reason}}
            )
            continue
        y, sa, sb = Y[known, j], Sa[known, j], Sb[known, j]
        n_pos = len(np.unique(patients[known][y == 1]))
        n_neg = len(np.unique(patients[known][y == 0]))
        if min(n_pos, n_neg) < MIN_CI_PATIENTS:  # no honest CI or test from one patient on a side
            reason = (
                f"no CI or p-value: {n_pos} positive and {n_neg} negative patients in test "
                f"(needs {MIN_CI_PATIENTS} of each)"
            )
            rows_label.append(
                {
                    **base,
                    **counts,
                    "label": name,
                    "value": float(auc_a[j] - auc_b[j]),
                    "params": {**params, "auroc_a": auc_a[j], "auroc_b": auc_b[j], "ci": reason},
                }
            )
            continue
        pb = paired_bootstrap(metrics.auroc, y, sa, sb, patients[known], n_boot, seed)
        dl = delong(y, sa, sb)
        p_delong[j] = dl.p
        rows_label.append(
            {
                **base,
                **counts,
                "label": name,
                "value": pb.diff,
                "ci_low": pb.low,
                "ci_high": pb.high,
                "n_boot": n_boot,
                "n_boot_skipped": int(pb.n_skipped),
                "p": _finite(dl.p),
                "params": {
                    **params,
                    "auroc_a": auc_a[j],
                    "auroc_b": auc_b[j],
                    "p_bootstrap": _finite(pb.p),
                    "p_delong": _finite(dl.p),
                },
            }
        )
    adjusted = holm(p_delong)
    for j, row in enumerate(rows_label):
        if defined[j] and not np.isnan(p_delong[j]):
            row["p_holm"] = _finite(adjusted[j])
    entries = list(rows_label)
    mean_fields = {"n_test": len(a.test), "n_patients_test": int(len(np.unique(patients)))}
    if defined.any():
        cols = np.flatnonzero(defined)
        pb = paired_bootstrap(
            metrics.mean_auroc, Y[:, cols], Sa[:, cols], Sb[:, cols], patients, n_boot, seed
        )
        entries.append(
            {
                **base,
                **mean_fields,
                "label": "mean",
                "value": pb.diff,
                "ci_low": pb.low,
                "ci_high": pb.high,
                "n_boot": n_boot,
                "n_boot_skipped": int(pb.n_skipped),
                "p": _finite(pb.p),
                "params": {
                    **params,
                    "auroc_a": float(np.mean(auc_a[cols])),
                    "auroc_b": float(np.mean(auc_b[cols])),
                    "p_bootstrap": _finite(pb.p),
                    "labels_in_mean": [names[j] for j in cols],
                },
            }
        )
    else:
        entries.append({**base, **mean_fields, "label": "mean", "value": None, "params": params})
    return _finish(entries, run, out)


def summarize(rows: Iterable[dict]) -> list[dict]:
    """The headline rows of a run (label ``mean``, metric ``auroc`` or ``auroc_diff``), for display.

    Args:
        rows: result rows of one run.

    Returns:
        Those rows, in order.
    """
    return [r for r in rows if r.get("label") == "mean" and r.get("metric") in ("auroc", "auroc_diff")]


# ---- report ----

# Setting fields that split a probe's rows into separate tables when they are not lines or columns.
_TABLE_SPLIT = ("dataset", "features", "layer", "k", "head", "vs")


def _parse_where(where: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """``["k=20", "dataset=nih"]`` or a dict -> ``{field: value}`` with numbers as numbers."""
    if where is None:
        return {}
    if isinstance(where, Mapping):
        return dict(where)
    out: dict[str, Any] = {}
    for item in where:
        field, sep, value = str(item).partition("=")
        if not sep or not field.strip():
            raise FeatcacheError(
                f"--where {item!r}: use FIELD=VALUE, e.g. --where k=20 or --where dataset=nih"
            )
        try:
            out[field.strip()] = json.loads(value)
        except ValueError:
            out[field.strip()] = value
    return out


def run_report(
    results: str | os.PathLike,
    *,
    by: Sequence[str] = ("model", "res"),
    columns: str = "dataset",
    fmt: str = "md",
    metric: str = "auroc",
    label: str = "mean",
    where: Mapping[str, Any] | Sequence[str] | None = None,
    plot: str | os.PathLike | None = None,
    plot_resolution: str | os.PathLike | None = None,
) -> str:
    """Tables (and plots) of a results file, one table per probe and setting.

    Rows of one probe that differ in a setting that is neither a line (``by``) nor the column
    field, such as kNN's k or the few-shot head, go to separate tables, each titled with that
    setting. Few-shot tables have shots as columns. Paired comparisons (``probes compare``) get
    their own tables of the AUROC difference when ``metric`` is ``auroc``.

    Args:
        results: the JSON-lines results file.
        by: fields naming a table line (e.g. ``model,res``: one line per backbone and resolution).
        columns: field whose values are the columns (e.g. ``dataset``); few-shot tables use shots.
        fmt: ``md`` (Markdown) or ``csv``.
        metric: metric shown (``auroc``, ``accuracy``, ``sensitivity@youden`` ...); ``auroc`` also shows
            paired comparisons (``auroc_diff``) and segmentation (``dice``) tables.
        label: label shown (``mean``: the mean over labels).
        where: filter, ``{field: value}`` or ``["field=value", ...]``; a condition applies to the rows
            that have the field (``k=20`` picks one kNN k and keeps the logistic-regression rows).
        plot: PNG path for few-shot curves (metric against shots, one line per ``by`` value).
        plot_resolution: PNG path for resolution curves (one line per ``by`` value except ``res``;
            logistic regression if present, else the first probe found).

    Returns:
        The rendered tables as text (with a title line before each), then where plots were written.

    Raises:
        FeatcacheError: unreadable results, no matching rows, a bad format, a plot that mixes settings.
    """
    from .report import plot_fewshot, table, to_csv, to_markdown
    from .results import read_jsonl

    if fmt not in ("md", "csv"):
        raise FeatcacheError(f"--format {fmt}: use md or csv")
    by = [by] if isinstance(by, str) else list(by)
    cond = _parse_where(where)
    # a condition applies to the rows that have the field: --where k=20 keeps logreg rows (no k)
    rows = [r for r in read_jsonl(results) if all(r.get(f, v) == v for f, v in cond.items())]
    if not rows:
        raise FeatcacheError(f"{results}: no result rows{' match ' + str(cond) if cond else ''}")
    render = to_markdown if fmt == "md" else to_csv
    wanted = [(metric, label)]
    if metric == "auroc":
        wanted.append(("auroc_diff", label))
        wanted.append(("dice", label))  # segmentation results: Dice is their headline metric
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if (r.get("metric"), r.get("label")) not in wanted:
            continue
        col = "shots" if r.get("probe") == "fewshot" else columns
        split = tuple(
            (f, r.get(f)) for f in _TABLE_SPLIT if f not in by and f != col and r.get(f) is not None
        )
        groups.setdefault((r.get("probe"), r.get("metric"), col, split), []).append(r)
    if not groups:
        raise FeatcacheError(
            f"{results}: no rows with metric={metric!r} and label={label!r}; metrics there: "
            f"{sorted({str(r.get('metric')) for r in rows})}"
        )
    parts = []
    for (probe, m, col, split), group in groups.items():
        title = " ".join([str(probe), *(f"{f}={v}" for f, v in split)]) + f": {m}, label {label}"
        tab = table(group, by=by, columns=col, metric=m, label=label)
        parts.append((f"## {title}\n\n" if fmt == "md" else f"# {title}\n") + render(tab))
    text = "\n".join(parts)
    if plot is not None:
        few = [r for r in rows if r.get("probe") == "fewshot"]
        if not few:
            raise FeatcacheError(f"{results}: no few-shot rows to plot; run probes fewshot first")
        text += f"\nfew-shot plot: {plot_fewshot(few, plot, by=by, metric=metric, label=label)}\n"
    if plot_resolution is not None:
        from .report import plot_resolution as _plot_res

        probes_found = [r.get("probe") for r in rows if r.get("probe") not in ("fewshot", "compare")]
        if not probes_found:
            raise FeatcacheError(f"{results}: no kNN or logistic-regression rows to plot against resolution")
        chosen = "logreg" if "logreg" in probes_found else probes_found[0]
        line_by = [f for f in by if f != "res"] or ["model"]
        path = _plot_res(rows, plot_resolution, by=line_by, metric=metric, label=label, probe=chosen)
        text += f"\nresolution plot: {path}\n"
    return text
