"""Pool slice features per volume at probe time, so one extraction of the slices serves every pooling.

A volume expanded by ``featcache volumes`` is one row per slice, with the volume id in the
``meta_volume`` column (``fs.meta("volume")``). :func:`aggregate` pools the rows of each group
(``mean`` or element-wise ``max``); :func:`aggregate_probe_data` does it for every split of a
:class:`probes.data.ProbeData`, making each volume one sample. Targets and patients are taken from
the first slice of each volume (in feature-set row order), after checking that every slice of the
volume agrees on them and on its split (the slice manifest copies them from the volume, so a
disagreement means the manifest was edited by hand). Rows the loader left out (failed extraction,
no label) are simply not pooled. Patient-level splits are untouched: all slices of a patient were
already in one split. This module does not import torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError

__all__ = ["AGGREGATIONS", "aggregate", "aggregate_probe_data", "aggregate_split", "volume_ids"]

AGGREGATIONS = ("mean", "max")


def aggregate(X, groups, how: str = "mean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool feature rows by group.

    Args:
        X: float [n, D] features (e.g. one row per slice).
        groups: str (or any hashable) [n] group of each row (e.g. the volume id).
        how: ``mean`` (average, accumulated in float64) or ``max`` (element-wise maximum).

    Returns:
        ``(X_agg float32 [g, D], group_ids [g], first_row int64 [g])``: groups in order of first
        appearance, and the index of each group's first row in ``X``.

    Raises:
        FeatcacheError: unknown ``how``, or ``X`` and ``groups`` of different lengths.
    """
    if how not in AGGREGATIONS:
        raise FeatcacheError(f"--aggregate {how!r}: choose one of {', '.join(AGGREGATIONS)}")
    X = np.asarray(X)
    groups = np.asarray(groups)
    if X.ndim != 2 or groups.ndim != 1 or len(X) != len(groups):
        raise FeatcacheError(f"aggregate needs X [n, D] and groups [n]; got {X.shape} and {groups.shape}")
    if not len(X):
        return np.zeros((0, X.shape[1]), np.float32), groups[:0], np.zeros(0, np.int64)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order_of_group = np.argsort(first, kind="stable")  # unique's sorted order -> first appearance
    rank = np.empty_like(order_of_group)
    rank[order_of_group] = np.arange(len(order_of_group))
    g = rank[inverse.ravel()]
    rows = np.argsort(g, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(g[rows]) != 0])
    if how == "mean":
        sums = np.add.reduceat(X[rows].astype(np.float64), starts, axis=0)
        counts = np.diff(np.r_[starts, len(rows)])
        pooled = sums / counts[:, None]
    else:
        pooled = np.maximum.reduceat(X[rows], starts, axis=0)
    first_row = first[order_of_group].astype(np.int64)
    return pooled.astype(np.float32), groups[first_row], first_row


def volume_ids(fs: Any) -> np.ndarray:
    """The volume id of every row of a feature set extracted from a slice manifest.

    Args:
        fs: a ``featcache.store.feature_store.FeatureSet``.

    Returns:
        str [N], the ``meta_volume`` column.

    Raises:
        FeatcacheError: the set has no ``meta_volume`` column (it was not made from a slice manifest).
    """
    if "volume" not in fs.meta_names():
        raise FeatcacheError(
            f"{fs.name}: no meta_volume column, so slices cannot be pooled per volume; expand the volumes "
            "with `featcache volumes` and extract its slices/manifest.csv (or drop --aggregate)"
        )
    return fs.meta("volume")


def _same_within(values: np.ndarray, g: np.ndarray, first: np.ndarray, equal_nan: bool) -> np.ndarray:
    """bool [n]: row i agrees with the first row of its group."""
    ref = values[first[g]]
    if values.ndim == 1:
        same = ref == values
        if equal_nan and values.dtype.kind == "f":
            same |= np.isnan(ref) & np.isnan(values)
        return same
    eq = ref == values
    if equal_nan and values.dtype.kind == "f":
        eq |= np.isnan(ref) & np.isnan(values)
    return eq.reshape(len(values), -1).all(axis=1)


def aggregate_split(split: Any, volume_ids: np.ndarray, how: str = "mean") -> Any:
    """Pool one :class:`probes.data.Split` by volume.

    Args:
        split: a ``Split`` (X float32 [n, D], y, patients, ids, rows int64 [n] feature-set rows).
        volume_ids: str [N] volume id of every feature-set row (``fs.meta("volume")``), indexed by ``rows``.
        how: ``mean`` or ``max``.

    Returns:
        A ``Split`` with one row per volume: X float32 [g, D], y and patients of the first slice,
        ids = the volume ids, rows = the feature-set row of the first slice.

    Raises:
        FeatcacheError: slices of one volume with different patients or targets.
    """
    groups = np.asarray(volume_ids)[split.rows]
    X, gid, first = aggregate(split.X, groups, how)
    if len(first):
        lookup = {v: i for i, v in enumerate(gid.tolist())}
        g = np.array([lookup[v] for v in groups.tolist()], dtype=np.int64)
        for name, values in (("patient", split.patients), ("labels", split.y)):
            values = np.asarray(values)
            bad = ~_same_within(values, g, first, equal_nan=True)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise FeatcacheError(
                    f"volume '{groups[i]}': slice '{split.ids[i]}' has other {name} than slice "
                    f"'{split.ids[first[g[i]]]}'; all slices of a volume must share patient, split and labels "
                    "(regenerate the slice manifest with featcache volumes)"
                )
    return dataclasses.replace(
        split, X=X, y=np.asarray(split.y)[first], patients=np.asarray(split.patients)[first], ids=gid,
        rows=np.asarray(split.rows, dtype=np.int64)[first],
    )  # fmt: skip


def aggregate_probe_data(data: Any, volume_ids: np.ndarray, how: str = "mean") -> Any:
    """Pool every split of a :class:`probes.data.ProbeData` by volume: one sample per volume.

    Args:
        data: the slice-level ``ProbeData`` from ``load_probe_data``.
        volume_ids: str [N] volume id of every feature-set row, e.g. ``fs.meta("volume")``.
        how: ``mean`` or ``max``.

    Returns:
        A new ``ProbeData`` whose splits hold one row per volume and whose ``context`` gains
        ``aggregate`` (= ``how``) and ``n_slices`` (slice rows pooled).

    Raises:
        FeatcacheError: a volume whose slices are in several splits or disagree on patient or targets,
            ``volume_ids`` not covering the feature set's rows, an unknown ``how``.
    """
    if how not in AGGREGATIONS:
        raise FeatcacheError(f"--aggregate {how!r}: choose one of {', '.join(AGGREGATIONS)}")
    volume_ids = np.asarray(volume_ids)
    names = ("train", "val", "test")
    seen: dict[str, str] = {}
    for s in names:
        split = getattr(data, s)
        if len(split.rows) and int(np.max(split.rows)) >= len(volume_ids):
            raise FeatcacheError(
                f"volume ids cover {len(volume_ids)} rows but the {s} split refers to row {int(np.max(split.rows))}"
            )
        here = volume_ids[split.rows]
        if (here == "").any():
            i = int(np.flatnonzero(here == "")[0])
            raise FeatcacheError(
                f"row '{split.ids[i]}' has no volume id (meta_volume is blank); aggregate slice manifests "
                "written by featcache volumes"
            )
        for v in np.unique(here).tolist():
            if v in seen and seen[v] != s:
                raise FeatcacheError(
                    f"volume '{v}' has slices in both {seen[v]} and {s}; all slices of a volume must share one split"
                )
            seen[v] = s
    pooled = {s: aggregate_split(getattr(data, s), volume_ids, how) for s in names}
    context = {
        **data.context,
        "aggregate": how,
        "n_slices": int(sum(len(getattr(data, s)) for s in names)),
    }
    return dataclasses.replace(data, **pooled, context=context)
