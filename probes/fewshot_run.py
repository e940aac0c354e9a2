"""The few-shot runner: K shots per side or class, many seeds, every episode scored on test.

Sampling (``sampling``):

- ``"random"`` (default): K positive and K negative patients per label (K per class), drawn per
  (label name, K, seed) by :func:`probes.estimators.fewshot.sample_episodes`; an episode does not depend on
  which other labels were asked for.
- ``"first-patients"``: the DINOv2-radiology protocol (:func:`probes.episodes.first_patient_episodes`):
  the first K patients of each label in patient-id order, all their images, one multi-label head
  on the union. Deterministic: one support set per K (recorded as seed 0).

The mean over labels averages ONE label set at every K, named in every ``mean`` row
(``params.labels_in_mean``, the same list at every K): by default the labels that can be sampled
at the largest K at which any label can be (shots no label can reach hold no label back) and that
have both classes among the test rows; ``mean_labels`` names the set instead (every one must
qualify). The labels left out, and why, are in ``params.labels_left_out_of_mean``.

This module does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from featcache.errors import FeatcacheError
from probes.data import ProbeData
from probes.episodes import (
    SAMPLINGS,
    _eligible_patients,
    episodes_path,
    first_patient_episodes,
    load_episodes,
    save_episodes,
)
from probes.estimators.fewshot import fewshot_scores, sample_episodes
from probes.evaluate import _context, _finish, _finite, _load
from probes.evaluation import metrics


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
    allow_partial: bool = False,
    out: str | os.PathLike | None = None,
    episodes_out: str | os.PathLike | None = None,
    episodes_from: str | os.PathLike | None = None,
    sampling: str = "random",
    mean_labels: Sequence[str] | None = None,
) -> list[dict]:
    """Few-shot probe: K shots per side / class, many seeds, every episode scored on the full test split.

    Support sets are drawn per patient from the train and validation rows together (there is
    nothing to tune with K shots). One row per (shots, seed, label) with that episode's test
    AUROC, and a ``mean`` row per (shots, seed) over one fixed label set (see the module
    docstring); multi-class episodes also give ``accuracy`` and ``balanced_accuracy``.

    Args:
        cache: feature store folder or URL.
        set_name: feature set (None: the store's only set).
        shots: K values (default 1, 2, 4, 8, 16; with ``episodes_from``: those in the file).
        seeds: number of seeds (0..n-1) or the seed values (default 10; with ``episodes_from``: those in
            the file). Not allowed with ``sampling="first-patients"`` (deterministic).
        head: ``logreg``, ``knn`` or ``prototype`` (see :mod:`probes.estimators.fewshot`).
        features: features to probe.
        labels: label columns / class names (None: all).
        uncertain: uncertain-label policy.
        aggregate: ``mean``/``max`` pools slice features per volume first (one sample per volume).
        C: logreg head inverse regularisation.
        k: kNN head neighbours (capped at the support size).
        temperature: kNN / prototype temperature.
        allow_partial: probe a set whose extraction has not finished (pending rows left out,
            counted in ``params.pending_rows``).
        out: JSON-lines file to append rows to; the episodes are merged into ``<out>.episodes.json``.
        episodes_out: where to save the episodes instead (see :func:`save_episodes`).
        episodes_from: re-run saved episodes (an ``.episodes.json``, possibly drawn on another backbone's
            set of the same manifest) instead of drawing new ones.
        sampling: ``"random"`` or ``"first-patients"`` (the DINOv2-radiology protocol).
        mean_labels: multi-label: the labels the mean averages (None: every label that can be
            sampled at the largest shots and has both classes in test).

    Returns:
        The result rows, ``probe = "fewshot"``.

    Raises:
        FeatcacheError: bad shots, seeds, sampling or ``mean_labels`` (naming the label and why).
    """
    if sampling not in SAMPLINGS:
        raise FeatcacheError(f"unknown few-shot sampling {sampling!r}: use one of {', '.join(SAMPLINGS)}")
    first = sampling == "first-patients"
    if first and seeds is not None and _seed_list(seeds) != [0]:
        raise FeatcacheError(
            "first-patients sampling is deterministic (one support set per shots): leave out --seeds"
        )
    # Few-shot tunes nothing, so there is no validation split to carve: the support pool is train + val.
    pool = _pool(_load(cache, set_name, features, labels, uncertain, 0.0, 0, aggregate, allow_partial))
    run = _context(pool, "fewshot")
    given_shots = (1, 2, 4, 8, 16) if shots is None else ([shots] if np.isscalar(shots) else shots)
    shot_list = sorted({int(s) for s in given_shots})
    seed_list = [0] if first else _seed_list(10 if seeds is None else seeds)
    if not shot_list or shot_list[0] < 1 or not seed_list:
        raise FeatcacheError(f"shots must be positive integers and seeds non-empty; got {shots!r}, {seeds!r}")
    names = pool.label_names
    params = {**run["params"], "support_pool": "train+val", "sampling": sampling}
    head_params = {"logreg": {"C": float(C)}, "knn": {"k": int(k), "temperature": float(temperature)}}
    params.update(head_params.get(head, {"temperature": float(temperature)} if head == "prototype" else {}))
    skipped: dict[tuple[int, int], dict] = {}
    taken: dict[int, dict[str, int]] = {}
    if episodes_from is not None:
        episodes = [
            e
            for e in load_episodes(episodes_from, pool, sampling)
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
                        skipped[(kk, j)] = {
                            "skipped": f"no {kk}-shot episode for this label in {episodes_from}"
                        }
    elif first:
        episodes = []
        for kk in shot_list:
            eps, taken[kk] = first_patient_episodes(
                pool.train.patients, pool.train.y, kk, pool.task, list(names)
            )
            episodes += eps
            have = {e.label for e in eps}
            if pool.task == "multilabel":
                for j in set(range(len(names))) - have:
                    skipped[(kk, j)] = {"skipped": f"the {kk}-first-patients support holds one class of it"}
    elif pool.task == "multiclass":
        episodes = sample_episodes(
            pool.train.patients, pool.train.y, shot_list, seed_list, task="multiclass", label_names=names
        )
    else:
        enough = _eligible_patients(pool)
        episodes = []
        for kk in shot_list:
            ok = np.flatnonzero(enough >= kk)
            for j in np.flatnonzero(enough < kk):
                skipped[(kk, int(j))] = {
                    "skipped": f"{int(enough[j])} eligible train+val patients on the smaller side; "
                    f"{kk} shots need {kk}",
                    "max_shots": int(enough[j]),
                }
            if len(ok):
                episodes += sample_episodes(
                    pool.train.patients, pool.train.y, [kk], seed_list, task="multilabel",
                    labels=ok.tolist(), label_names=names,
                )  # fmt: skip
    binary = pool.task == "multilabel"
    if episodes:
        S = fewshot_scores(
            pool.train.X, episodes, pool.test.X, head=head, C=C, k=k, temperature=temperature, ranking=binary
        )
    else:
        S = np.zeros((0, len(pool.test)))
    path = episodes_out or (episodes_path(out) if out is not None and episodes_from is None else None)
    if path is not None:
        save_episodes(path, pool, episodes, sampling)
    if path is not None or episodes_from is not None:
        params["episodes_file"] = str(episodes_from if episodes_from is not None else path)
    if not binary:
        entries = _multiclass_entries(pool, episodes, S, head, params)
    else:
        entries = _multilabel_entries(
            pool, episodes, S, shot_list, seed_list, skipped, taken, head, params, mean_labels
        )
    return _finish(entries, run, out)


def _pool(data: ProbeData) -> ProbeData:
    """``data`` with the validation rows moved into train (the few-shot support pool)."""
    from probes.data import merge_train_val

    return merge_train_val(data)


def auroc_many(y: np.ndarray, S: np.ndarray) -> np.ndarray:
    """AUROC of many score vectors against one label vector, ties counted half (as scikit-learn).

    One sort per row and two binary searches of the sorted positives: the Mann-Whitney U is the
    sum over positives of (#scores below + #scores at or below) / 2, minus n_pos^2 / 2.

    Args:
        y: 0/1 labels [n] (no missing values).
        S: float [E, n] scores, one row per episode.

    Returns:
        float64 [E]; NaN when ``y`` holds one class.
    """
    y = np.asarray(y)
    S = np.asarray(S)
    pos = y == 1
    m, n = int(pos.sum()), y.size
    if m == 0 or m == n:
        return np.full(S.shape[0], np.nan)
    if not np.isfinite(S).all():
        return metrics.auroc_rows(y, S)
    ranked = np.sort(S, axis=1)
    P = np.sort(S[:, pos], axis=1)
    U = np.empty(S.shape[0])
    for e in range(S.shape[0]):
        below = np.searchsorted(ranked[e], P[e], "left").sum()
        at_or_below = np.searchsorted(ranked[e], P[e], "right").sum()
        U[e] = (below + at_or_below) / 2
    return (U - m * m / 2) / (m * (n - m))


def _multiclass_entries(data, episodes, S, head, params) -> list[dict]:
    names = data.label_names
    Y = metrics.one_hot(data.test.y, len(names))
    common = {"n_test": len(data.test), "n_patients_test": int(len(np.unique(data.test.patients)))}
    entries: list[dict] = []
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
        value = _finite(metrics.auroc_ovr(data.test.y, s))
        entries.append({**base, **common, "label": "mean", "metric": "auroc", "value": value})
        for m, fn in (("accuracy", metrics.accuracy), ("balanced_accuracy", metrics.balanced_accuracy)):
            entries.append(
                {**base, **common, "label": "mean", "metric": m, "value": _finite(fn(data.test.y, pred))}
            )
    return entries


def _mean_set(names, shot_list, skipped, test_ok, mean_labels):
    """The label columns the mean averages at every shots, and {name: why} for the others."""
    L = len(names)
    feasible = [kk for kk in shot_list if any((kk, j) not in skipped for j in range(L))]
    missing = {j: [kk for kk in feasible if (kk, j) in skipped] for j in range(L)}

    def why(j):
        if not test_ok[j]:
            return "one class among the test rows"
        if missing[j]:
            cap = skipped[(missing[j][0], j)].get("max_shots")
            return f"at most {cap} shots" if cap is not None else f"no result at {missing[j][0]} shots"
        return None

    if mean_labels is None:
        chosen = [j for j in range(L) if why(j) is None]
    else:
        unknown = [m for m in mean_labels if m not in names]
        if unknown:
            raise FeatcacheError(
                f"--mean-labels {unknown[0]!r} is not a label here; use some of {', '.join(names)}"
            )
        chosen = sorted({names.index(m) for m in mean_labels})
        for j in chosen:
            if why(j) is not None:
                raise FeatcacheError(
                    f"--mean-labels: {names[j]} cannot be in the mean at every shots ({why(j)}); leave it out"
                )
    left = {names[j]: why(j) or "not in --mean-labels" for j in range(L) if j not in chosen}
    return chosen, left, feasible


def _multilabel_entries(
    data, episodes, S, shot_list, seed_list, skipped, taken, head, params, mean_labels
) -> list[dict]:
    names = data.label_names
    L = len(names)
    Y = data.test.y
    known = ~np.isnan(Y)
    _, tp = np.unique(data.test.patients, return_inverse=True)
    counts = [
        {"n_test": int(known[:, j].sum()), "n_patients_test": int(np.unique(tp[known[:, j]]).size)}
        for j in range(L)
    ]
    test_ok = [bool(np.isin([0, 1], Y[known[:, j], j]).all()) for j in range(L)]
    by_label: dict[int, list[int]] = {}
    for i, e in enumerate(episodes):
        by_label.setdefault(int(e.label), []).append(i)
    auc, size = {}, {}
    for j, idx in by_label.items():
        values = auroc_many(Y[known[:, j], j], S[idx][:, known[:, j]])
        for i, v in zip(idx, values):
            key = (episodes[i].shots, episodes[i].seed, j)
            auc[key], size[key] = float(v), int(episodes[i].support.size)
    in_mean, left, feasible = _mean_set(names, shot_list, skipped, test_ok, mean_labels)
    mean_params = {
        **params,
        "labels_in_mean": [names[j] for j in in_mean],
        "mean_labels": "given"
        if mean_labels is not None
        else "sampled at the largest shots, both classes in test",
    }
    if left:
        mean_params["labels_left_out_of_mean"] = left
    not_everywhere = [names[j] for j in range(L) if any((kk, j) in skipped for kk in feasible)]
    if not_everywhere:
        mean_params["labels_not_at_every_shots"] = not_everywhere
    label_params = params
    entries: list[dict] = []
    n_patients_test = int(tp.max()) + 1 if tp.size else 0
    for kk in shot_list:
        if taken:
            label_params = {**params, "patients_taken": taken[kk]}
        union = {int(r) for e in episodes if e.shots == kk for r in e.support} if taken else None
        for seed in seed_list:
            n_train = len(union) if union is not None else 2 * kk
            base = {"shots": kk, "seed": seed, "head": head}
            for j, name in enumerate(names):
                if (kk, j) in skipped:
                    p = {**label_params, **skipped[(kk, j)]}
                    entries.append(
                        {
                            **base,
                            **counts[j],
                            "n_train": n_train,
                            "label": name,
                            "metric": "auroc",
                            "value": None,
                            "params": p,
                        }
                    )
                    continue
                v = auc.get((kk, seed, j), float("nan"))
                n = size.get((kk, seed, j), 2 * kk)
                entries.append(
                    {**base, **counts[j], "n_train": n, "label": name, "metric": "auroc", "value": _finite(v),
                     "params": label_params}
                )  # fmt: skip
            p = mean_params
            if kk in feasible and in_mean:
                mean = float(np.mean([auc[(kk, seed, j)] for j in in_mean]))
            else:
                mean = None
                p = {**mean_params, "skipped": f"no label in the mean can be sampled at {kk} shots"}
            entries.append(
                {**base, "n_test": len(data.test), "n_patients_test": n_patients_test, "n_train": n_train,
                 "label": "mean", "metric": "auroc", "value": mean, "params": p}
            )  # fmt: skip
    return entries


def summarize_fewshot(rows: list[dict], metric: str = "auroc") -> list[dict]:
    """Mean and SD over seeds of the ``mean`` rows of one few-shot run, per shots.

    Args:
        rows: result rows of one ``run_fewshot`` call (or any rows with ``shots``, ``seed``,
            ``label == "mean"``).
        metric: the metric summarised (``auroc``; multi-class also ``accuracy``, ``balanced_accuracy``).

    Returns:
        One dict per shots, ascending: ``{"shots", "mean", "sd", "n_seeds", "labels_in_mean"}``;
        ``mean`` None when no seed has a value, ``sd`` (ddof = 1) None with fewer than two;
        ``labels_in_mean`` from the rows' params (None for multi-class).
    """
    out = []
    for s in sorted({r["shots"] for r in rows if r.get("shots") is not None}):
        mine = [
            r for r in rows if r.get("shots") == s and r.get("label") == "mean" and r.get("metric") == metric
        ]
        vals = [r["value"] for r in mine if r.get("value") is not None]
        out.append(
            {
                "shots": s,
                "mean": float(np.mean(vals)) if vals else None,
                "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                "n_seeds": len(vals),
                "labels_in_mean": next(((r.get("params") or {}).get("labels_in_mean") for r in mine), None),
            }
        )
    return out


def fewshot_notes(rows: list[dict]) -> list[str]:
    """What a few-shot run left out or capped, one line each: the mean's label set, then per label.

    Returns:
        Lines such as ``mean over the same 13 of 14 labels at every shots: ...; left out: Hernia
        (at most 9 shots)`` and ``Hernia: at most 9 shots (9 eligible patients on the smaller side);
        no result above 9``.
    """
    lines = []
    mean = next(
        (r for r in rows if r.get("label") == "mean" and "labels_in_mean" in (r.get("params") or {})), None
    )
    if mean is not None:
        p = mean["params"]
        labels = {r["label"] for r in rows if r.get("label") != "mean"}
        text = f"mean over the same {len(p['labels_in_mean'])} of {len(labels)} labels at every shots"
        text += f": {', '.join(p['labels_in_mean'])}" if p["labels_in_mean"] else ""
        left = p.get("labels_left_out_of_mean") or {}
        if left:
            text += "; left out: " + ", ".join(f"{k} ({v})" for k, v in left.items())
        lines.append(text)
    skipped: dict[str, dict] = {}
    short: dict[str, list[tuple[int, int]]] = {}
    for r in rows:
        p = r.get("params") or {}
        if r.get("label") == "mean" or r.get("metric") != "auroc":
            continue
        if p.get("skipped"):
            skipped.setdefault(r["label"], {"shots": set(), "params": p})["shots"].add(r["shots"])
        got = (p.get("patients_taken") or {}).get(r["label"])
        if got is not None and got < r["shots"] and (r["shots"], got) not in short.get(r["label"], []):
            short.setdefault(r["label"], []).append((r["shots"], got))
    for label, s in skipped.items():
        cap = s["params"].get("max_shots")
        if cap is not None:
            lines.append(f"{label}: at most {cap} shots ({cap} eligible patients on the smaller side); "
                         f"no result above {cap}")  # fmt: skip
        else:
            at = ", ".join(str(k) for k in sorted(s["shots"]))
            lines.append(f"{label}: no result at {at} shots: {s['params']['skipped']}")
    for label, pairs in short.items():
        lines.append(
            f"{label}: fewer first patients than shots ("
            + ", ".join(f"{got} at {k}" for k, got in pairs)
            + "): the others were taken by earlier labels or do not exist"
        )
    return lines
