"""External validation: fit a probe on one feature set, score the test rows of another.

:func:`run_external` fits kNN or logistic regression on the train (+ val) rows of ``train_set``
exactly as ``probes knn`` / ``probes logreg`` do (:mod:`probes.fit`: nothing carved unless C is
selected, C chosen on the train set's val only, thresholds from its held-out scores), then scores
every test-split row of ``test_set`` (``test_split="all"``: every extracted, labelled row of it,
whatever its split), and reports the same metrics with the same patient-level CIs
(:mod:`probes.evaluate`), optionally per subgroup of the external set (``by``).

Rules:

- **Same features.** The two sets must come from the same backbone: model, weights
  (``FeatureSet.record``), resolution and preprocessing must be equal, and the
  features probed must have the same width; otherwise the run is refused, naming what differs.
  Two sets from one manifest are refused too (that is internal validation: ``probes knn``).
- **Shared labels.** Labels are matched by name, which is the shared vocabulary of
  :mod:`featcache.datasets.vocabulary`. Only labels present in both sets are probed
  (``params.external.labels``); those in one set only are listed once in
  ``params.external.left_out`` and on the console. Multi-class sets keep the shared classes; rows
  of other classes are left out of both sets.

Rows: ``probe`` is the probe's name (``knn``, ``mlknn``, ``logreg``) so they sit beside internal
rows in a report; ``dataset``, ``store_set``, ``manifest_digest`` and the test counts describe the
external (test) set, where the numbers were measured; ``n_train`` and ``params.fit_rows`` the
train set's rows; ``params.external = {"train_set", "train_dataset", "test_set", "test_split",
"labels", "left_out"}`` (and ``shared_patient_ids``, the count of test patient ids also found among
the fitted rows, when there are any).

This module does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError
from featcache.store.feature_store import FeatureSet, FeatureStore
from probes.data import (
    ProbeData,
    Split,
    _feature_parts,
    _read_features,
    _targets,
    load_probe_data,
    open_checked_set,
)
from probes.estimators.logreg import DEFAULT_C_GRID
from probes.evaluate import DEFAULT_KS, _context, _finish, evaluate_scores
from probes.fit import knn_scores, logreg_scores

__all__ = ["TEST_SPLITS", "external_lines", "run_external"]

TEST_SPLITS = ("test", "all")


def _provenance(fs: FeatureSet) -> dict[str, Any]:
    return fs.record.backbone()


def _check_same_backbone(fa: FeatureSet, fb: FeatureSet, features: str) -> None:
    pa, pb = _provenance(fa), _provenance(fb)
    differ = [f"{k} {pa[k]!r} vs {pb[k]!r}" for k in pa if pa[k] != pb[k]]
    if differ:
        raise FeatcacheError(
            f"'{fa.name}' and '{fb.name}' differ in {'; '.join(differ)}: external validation scores one "
            "set with a probe fitted on the other's features, so extract both with the same model, "
            "weights, resolution and preprocessing"
        )
    la = [label for _, _, label in _feature_parts(fa, features)]
    lb = [label for _, _, label in _feature_parts(fb, features)]
    if la != lb:
        raise FeatcacheError(f"features {features!r} are {la} in '{fa.name}' but {lb} in '{fb.name}'")
    if fa.attrs.get("manifest_digest") and fa.attrs.get("manifest_digest") == fb.attrs.get("manifest_digest"):
        raise FeatcacheError(
            f"'{fa.name}' and '{fb.name}' come from one manifest: that is internal validation; "
            "use probes knn / probes logreg on one set"
        )


def _label_names(fs: FeatureSet) -> list[str]:
    if fs.task == "multilabel":
        return list(fs.label_names)
    if fs.task == "multiclass":
        return list(fs.class_names)
    raise FeatcacheError(f"{fs.name}: the set has no labels; external validation needs labels in both sets")


def _shared_labels(fa: FeatureSet, fb: FeatureSet, labels: Sequence[str] | None):
    if fa.task != fb.task:
        raise FeatcacheError(
            f"'{fa.name}' is {fa.task} but '{fb.name}' is {fb.task}; both must be the same task"
        )
    na, nb = _label_names(fa), _label_names(fb)
    left_out = {
        "only_in_train_set": [n for n in na if n not in nb],
        "only_in_test_set": [n for n in nb if n not in na],
    }
    shared = [n for n in na if n in nb]
    if labels is not None:
        missing = [(n, fa.name if n not in na else fb.name) for n in labels if n not in na or n not in nb]
        if missing:
            raise FeatcacheError(
                "labels not in both sets: "
                + ", ".join(f"{n} (not in '{s}')" for n, s in missing)
                + f"; the shared labels are {', '.join(shared) or 'none'}"
            )
        shared = [n for n in shared if n in labels]
    if not shared or (fa.task == "multiclass" and len(shared) < 2):
        raise FeatcacheError(
            f"'{fa.name}' and '{fb.name}' share {len(shared)} label(s) ({', '.join(shared) or 'none'}); "
            "external validation needs labels of the shared vocabulary in both manifests"
        )
    return shared, left_out


def _external_test(
    fs: FeatureSet, features: str, labels: list[str], uncertain: str, test_split: str
) -> Split:
    """The scored rows of the external set: its test split (or every split), extracted and labelled."""
    parts = _feature_parts(fs, features)
    Y, has_target, _ = _targets(fs, labels, uncertain)
    use = fs.ok & has_target
    if test_split == "test":
        use &= fs.splits == "test"
    rows = np.flatnonzero(use).astype(np.int64)
    if not len(rows):
        raise FeatcacheError(
            f"{fs.name}: no extracted, labelled {'test ' if test_split == 'test' else ''}rows to score"
            + (
                "; pass --test-split all to score every row of an external set"
                if test_split == "test"
                else ""
            )
        )
    X = _read_features(fs, parts, rows)
    return Split(X, Y[rows], fs.patient_ids[rows], fs.ids[rows], rows)


def run_external(
    cache,
    train_set: str,
    test_set: str,
    *,
    probe: str = "logreg",
    features: str = "cls",
    labels: Sequence[str] | None = None,
    uncertain: str = "ignore",
    k: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    method: str = "dinov2",
    s: float = 1.0,
    C: float | None = None,
    C_grid: Sequence[float] = DEFAULT_C_GRID,
    val_fraction: float = 0.2,
    test_split: str = "test",
    test_cache=None,
    by: str | Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    out: str | os.PathLike | None = None,
) -> list[dict]:
    """Fit on ``train_set``, evaluate on ``test_set`` (module docstring).

    Args:
        cache: feature store of ``train_set`` (and of ``test_set`` unless ``test_cache``).
        train_set: the set the probe is fitted on, e.g. ``nih/dinov3-vitb16/512``.
        test_set: the external set scored, e.g. ``chexpert/dinov3-vitb16/512``.
        probe: ``logreg`` or ``knn``.
        features: features (the same in both sets).
        labels: shared labels to probe (None: every shared label).
        uncertain: uncertain-label policy of both sets.
        k, temperature, method, s: kNN settings (as :func:`probes.run.run_knn`).
        C, C_grid, val_fraction: logistic-regression settings (as :func:`probes.run.run_logreg`).
        test_split: ``test`` (the external set's test rows) or ``all`` (all its rows).
        test_cache: store of ``test_set`` when it is another one.
        by: subgroup columns of the external set (:mod:`probes.subgroups`).
        n_boot: bootstrap draws (patients of the external set).
        seed: bootstrap seed, fold and carve seed.
        out: JSON-lines file to append the rows to.

    Returns:
        Result rows with ``params.external``.

    Raises:
        FeatcacheError: different backbones, no shared label, no rows to score, a bad option.
    """
    if probe not in ("logreg", "knn"):
        raise FeatcacheError(f"unknown probe {probe!r}: use logreg or knn")
    if test_split not in TEST_SPLITS:
        raise FeatcacheError(f"test split {test_split!r}: use test or all")
    store_a = cache if isinstance(cache, FeatureStore) else FeatureStore(cache)
    store_b = (
        store_a
        if test_cache is None
        else (test_cache if isinstance(test_cache, FeatureStore) else FeatureStore(test_cache))
    )
    fa, fb = open_checked_set(store_a, train_set), open_checked_set(store_b, test_set)
    if store_a.url == store_b.url and fa.name == fb.name:
        raise FeatcacheError(
            f"train and test set are both '{fa.name}'; use probes knn / probes logreg for one set"
        )
    _check_same_backbone(fa, fb, features)
    shared, left_out = _shared_labels(fa, fb, labels)
    data_a = load_probe_data(
        store_a, fa.name, features=features, labels=shared, uncertain=uncertain, seed=seed, require_test=False
    )
    test = _external_test(fb, features, shared, uncertain, test_split)
    if test.X.shape[1] != data_a.train.X.shape[1]:
        raise FeatcacheError(
            f"features {features!r} are {data_a.train.X.shape[1]} wide in '{fa.name}' but {test.X.shape[1]} in '{fb.name}'"
        )
    context = {
        **data_a.context,
        "dataset": fb.name.split("/")[0],
        "store": store_b.url,
        "store_set": fb.name,
        "manifest_digest": fb.attrs.get("manifest_digest"),
    }
    data = ProbeData(data_a.task, shared, data_a.train, data_a.val, test, context)
    fit_patients = set(np.concatenate([data.train.patients, data.val.patients]).tolist())
    overlap = len(set(test.patients.tolist()) & fit_patients)
    external: dict[str, Any] = {
        "train_set": fa.name,
        "train_dataset": fa.name.split("/")[0],
        "test_set": fb.name,
        "test_split": test_split,
        "labels": shared,
        "left_out": left_out,
    }
    if overlap:
        external["shared_patient_ids"] = overlap
    if probe == "knn":
        asked = sorted({int(v) for v in ([k] if np.isscalar(k) else k)})
        if not asked or asked[0] < 1:
            raise FeatcacheError(f"k must be positive integers; got {k!r}")
        ks = sorted({min(v, len(data.train) + len(data.val)) for v in asked})
        scored = knn_scores(data, ks, temperature=temperature, method=method, s=s, seed=seed)
        run = _context(data, "mlknn" if method == "mlknn" else "knn")
        params = dict(run["params"])
        if method == "mlknn":
            params.update(s=float(s), exclude_self=True)
        else:
            params.update(temperature=float(temperature), vote=method, softmax_k=max(ks))
        if ks != asked:
            params["k_requested"] = asked
        params["external"] = external
        entries = []
        for kk in ks:
            base = {"k": kk, "seed": int(seed), "n_train": scored[kk].n_fit}
            entries += evaluate_scores(data, scored[kk], base, params, n_boot, seed, by=by)
        return _finish(entries, run, out)
    sc, data = logreg_scores(data, C, C_grid, val_fraction=val_fraction, seed=seed)
    run = _context(data, "logreg")
    params = {**run["params"], "external": external}
    if C is None:
        params["C_grid"] = [float(c) for c in np.sort(np.asarray(C_grid, dtype=np.float64))]
    entries = evaluate_scores(data, sc, {"seed": int(seed), "n_train": sc.n_fit}, params, n_boot, seed, by=by)
    return _finish(entries, run, out)


def external_lines(rows: list[dict]) -> list[str]:
    """Console lines naming what was fitted where, the shared labels and those left out (once)."""
    if not rows:
        return []
    ext = (rows[0].get("params") or {}).get("external") or {}
    lines = [
        f"fitted on {ext.get('train_set')} ({rows[0].get('n_train')} rows), scored on {ext.get('test_set')} "
        f"({'every row' if ext.get('test_split') == 'all' else 'test split'})",
        f"labels (shared): {', '.join(ext.get('labels', []))}",
    ]
    lo = ext.get("left_out") or {}
    if lo.get("only_in_train_set"):
        lines.append(f"note: left out, only in {ext.get('train_set')}: {', '.join(lo['only_in_train_set'])}")
    if lo.get("only_in_test_set"):
        lines.append(f"note: left out, only in {ext.get('test_set')}: {', '.join(lo['only_in_test_set'])}")
    if ext.get("shared_patient_ids"):
        lines.append(
            f"note: {ext['shared_patient_ids']} test patient ids also occur among the fitted rows "
            "(the same patients, or ids that merely coincide across datasets)"
        )
    return lines
