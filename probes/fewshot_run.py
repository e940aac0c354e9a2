"""The few-shot runner: K shots per side or class, many seeds, every episode scored on test.

This module does not import torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from featcache.errors import FeatcacheError

from . import metrics
from .data import ProbeData
from .episodes import _eligible_patients, episodes_path, load_episodes, save_episodes
from .evaluate import _context, _finish, _finite, _load
from .fewshot import fewshot_scores, sample_episodes


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
