"""Metrics per subgroup of the test rows (``--by meta_sex,meta_view``) and the gaps between groups.

Grouping (:func:`parse_by`, :func:`resolve_groups`): ``by`` names ``meta_*`` columns of the feature
set, comma-separated; a column may carry band edges after a colon, the numbers that follow it
belonging to it: ``meta_sex,meta_age:0,40,60,80`` is ``meta_sex`` and ``meta_age`` banded
``[0, 40)``, ``[40, 60)``, ``[60, 80]``.

- A column whose non-blank test values are all numbers with more than :data:`MAX_LEVELS` distinct
  values is banded: by the given edges, or by the quartiles of its test values (edges at the 0, 25,
  50, 75 and 100th percentiles, repeated edges merged). Bands are half-open, the last one closed.
- Any other column: one group per distinct value (at most :data:`MAX_GROUPS`).
- Rows with a blank value, a value outside the bands, or a non-number in a banded column belong to
  no group: their count is ``params.subgroup_left_out`` and the console says it once.

Rows: every metric of :func:`probes.evaluate.evaluate_scores` again on each group's test rows,
with ``params.subgroup = {"meta_sex": "F"}`` (``params.subgroup_bands`` holds the edges of a banded
column). The fitted model and the Youden thresholds are those of the whole run; only the scored
rows change. Each group's CI resamples that group's patients.

Gaps: ``<metric>_gap`` rows (metrics ``auroc``, ``auprc``, ``ece``, ``brier``, and
``sensitivity@youden`` / ``specificity@youden``, the true- and false-positive-rate gaps at the run's
held-out Youden threshold of each label; per label and mean) with ``params.subgroup_by`` and
``params.groups``. Two groups: the difference first minus second
(groups in sorted order, ``params.gap = "F - M"``), its patient-bootstrap CI and a two-sided
bootstrap p (as :func:`probes.evaluation.stats.paired_bootstrap` defines it). More groups: max - min over the
groups (``params.gap = "max - min"``, ``params.group_values`` the per-group values) and its CI. Gap
draws are the run's draws over all test patients (:func:`probes.evaluation.stats.bootstrap_draws`, same seed),
each group evaluated on its rows under the same draw, so a patient with rows in two groups moves
both. The mean's gap averages, in each group, the labels defined in every group
(``params.labels_in_mean``).

This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError
from featcache.store.feature_store import FeatureStore
from probes.data import ProbeData, Split
from probes.evaluation.score_rows import (
    _binary_targets,
    ci_reason,
    draw_counts,
    metric_draws,
    metric_value,
    percentile_ci,
)
from probes.fit import Scored

MAX_LEVELS = 4
"""A numeric column with at most this many distinct values is treated as categories, not banded."""
MAX_GROUPS = 50
"""More distinct values than this in a categorical column is refused (give bands instead)."""
GAP_METRICS = ("auroc", "auprc", "ece", "brier", "sensitivity@youden", "specificity@youden")

_NUM = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


@dataclass
class Grouping:
    """The test rows' groups by one column.

    Attributes:
        column: ``meta_<name>``.
        group: str [n_test] group of each test row ('' = none).
        names: group names in order (sorted; bands in ascending order).
        bands: band edges (None: categories).
        banding: ``given``, ``quartiles`` or None.
        n_left_out: test rows in no group.
    """

    column: str
    group: np.ndarray
    names: list[str]
    bands: list[float] | None
    banding: str | None
    n_left_out: int


def parse_by(by: str | Sequence[str]) -> list[tuple[str, list[float] | None]]:
    """``meta_sex,meta_age:0,40,60`` -> ``[("meta_sex", None), ("meta_age", [0.0, 40.0, 60.0])]``.

    Raises:
        FeatcacheError: an empty name, bands that are not increasing numbers, or fewer than two edges.
    """
    tokens = [t.strip() for t in (by.split(",") if isinstance(by, str) else by)]
    out: list[tuple[str, list[float] | None]] = []
    for t in tokens:
        if not t:
            continue
        if _NUM.match(t) and out and out[-1][1] is not None:
            out[-1][1].append(float(t))
            continue
        name, sep, first = t.partition(":")
        name = name.strip()
        if not name or _NUM.match(t):
            raise FeatcacheError(f"--by {by!r}: {t!r} is not a column; use e.g. meta_sex,meta_age:0,40,60,80")
        if not name.startswith("meta_"):
            name = "meta_" + name
        if sep and not _NUM.match(first):
            raise FeatcacheError(f"--by {by!r}: band edge {first!r} of {name} is not a number")
        out.append((name, [float(first)] if sep else None))
    for name, edges in out:
        if edges is not None and (len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:]))):
            raise FeatcacheError(f"--by: bands of {name} must be two or more increasing numbers, got {edges}")
    if len({n for n, _ in out}) != len(out):
        raise FeatcacheError(f"--by {by!r}: a column is named twice")
    if not out:
        raise FeatcacheError(f"--by {by!r}: name one or more meta_* columns")
    return out


def _fmt(x: float) -> str:
    return f"{x:g}"


def _band(values: np.ndarray, edges: list[float]) -> tuple[np.ndarray, list[str]]:
    """Band label of each numeric value (NaN / outside: ''), and the band names in order."""
    names = [
        f"[{_fmt(a)}, {_fmt(b)}{']' if i == len(edges) - 2 else ')'}"
        for i, (a, b) in enumerate(zip(edges, edges[1:]))
    ]
    idx = np.searchsorted(edges, values, side="right") - 1
    idx[values == edges[-1]] = len(edges) - 2
    ok = ~np.isnan(values) & (idx >= 0) & (idx < len(edges) - 1)
    out = np.full(len(values), "", dtype=object)
    out[ok] = np.array(names, dtype=object)[idx[ok]]
    return out.astype(str), names


def resolve_groups(data: ProbeData, by: str | Sequence[str]) -> list[Grouping]:
    """Group the test rows of ``data`` by the ``meta_*`` columns of its feature set.

    The set is the one named in ``data.context`` (``store``, ``store_set``); a test row's value is
    that of its feature-set row (``Split.rows``; a pooled volume: its first slice).

    Raises:
        FeatcacheError: an unknown column, or a categorical column with more than MAX_GROUPS values.
    """
    fs = FeatureStore(data.context["store"]).open_set(data.context["store_set"])
    have = ["meta_" + n for n in fs.meta_names()]
    out = []
    for column, edges in parse_by(by):
        if column not in have:
            raise FeatcacheError(
                f"{fs.name}: no column {column} to group by; its columns are {', '.join(have) or 'none'}"
            )
        raw = np.char.strip(fs.meta(column)[data.test.rows].astype(str))
        blank = raw == ""
        numeric = np.array([bool(_NUM.match(v)) for v in raw])
        vals = np.full(len(raw), np.nan)
        vals[numeric] = raw[numeric].astype(np.float64)
        levels = np.unique(vals[numeric])
        if edges is not None or ((numeric | blank).all() and len(levels) > MAX_LEVELS):
            banding = "given"
            if edges is None:
                banding = "quartiles"
                edges = [float(e) for e in np.unique(np.percentile(vals[numeric], [0, 25, 50, 75, 100]))]
            group, names = _band(vals, list(edges))
            present = set(group.tolist())
            names = [n for n in names if n in present]
            out.append(
                Grouping(column, group, names, [float(e) for e in edges], banding, int((group == "").sum()))
            )
            continue
        names = sorted(set(raw[~blank].tolist()))
        if len(names) > MAX_GROUPS:
            raise FeatcacheError(
                f"{fs.name}: {column} has {len(names)} distinct test values; group by at most {MAX_GROUPS}, "
                f"or give numeric bands such as {column}:0,40,60,80"
            )
        out.append(Grouping(column, raw, names, None, None, int(blank.sum())))
    return out


def subset(data: ProbeData, sc: Scored, mask: np.ndarray) -> tuple[ProbeData, Scored]:
    """``data`` and ``sc`` with only the test rows of ``mask`` (bool [n_test]); the fit is unchanged."""
    t = data.test
    test = Split(t.X[mask], t.y[mask], t.patients[mask], t.ids[mask], t.rows[mask])
    d = ProbeData(data.task, data.label_names, data.train, data.val, test, data.context)
    return d, dataclasses.replace(sc, test=np.asarray(sc.test)[mask])


def subgroup_entries(
    data: ProbeData,
    sc: Scored,
    base: dict[str, Any],
    params: dict[str, Any],
    n_boot: int,
    seed: int,
    by: str | Sequence[str],
    n_bins: int = 10,
    *,
    evaluate: Callable[..., list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Every metric per subgroup, and the gaps between groups (module docstring).

    Args:
        data, sc, base, params, n_boot, seed: as :func:`probes.evaluate.evaluate_scores`.
        by: the grouping columns (:func:`parse_by`).
        n_bins: ECE bins.
        evaluate: the per-group evaluation, called as ``evaluate(data, sc, base, params, n_boot,
            seed, n_bins=n_bins)`` on each group's rows: :func:`probes.evaluate.evaluate_scores`,
            which passes itself (so this module needs nothing from it).

    Returns:
        Entries for :func:`probes.results.make_rows`.
    """
    entries: list[dict[str, Any]] = []
    Y = _binary_targets(data, "test")
    S = np.asarray(sc.test, dtype=np.float64)
    patients = data.test.patients
    counts, inverse = draw_counts(patients, n_boot, seed)
    for g in resolve_groups(data, by):
        gp: dict[str, Any] = {"subgroup_by": g.column}
        if g.bands is not None:
            gp.update(subgroup_bands=g.bands, subgroup_banding=g.banding)
        if g.n_left_out:
            gp["subgroup_left_out"] = g.n_left_out
        for name in g.names:
            mask = g.group == name
            d, s = subset(data, sc, mask)
            entries += evaluate(
                d, s, base, {**params, **gp, "subgroup": {g.column: name}}, n_boot, seed, n_bins=n_bins
            )
        if len(g.names) >= 2:
            entries += _gap_entries(data, sc, Y, S, g, base, {**params, **gp}, counts, inverse, n_bins)
    return entries


def _p_two_sided(d: np.ndarray) -> float:
    ok = d[~np.isnan(d)]
    if not len(ok):
        return float("nan")
    return min(1.0, 2.0 * (min(int((ok <= 0).sum()), int((ok >= 0).sum())) + 1) / (len(ok) + 1))


def _gap(values: np.ndarray, two: bool) -> np.ndarray:
    """[..., G] group values -> the gap (first - second, or max - min); NaN if a group is NaN."""
    return values[..., 0] - values[..., 1] if two else values.max(axis=-1) - values.min(axis=-1)


def _gap_entries(data, sc, Y, S, g: Grouping, base, params, counts, inverse, n_bins) -> list[dict[str, Any]]:
    names = data.label_names
    fitted = np.asarray(sc.fitted, bool)
    masks = [g.group == n for n in g.names]
    in_any = np.logical_or.reduce(masks)
    two = len(g.names) == 2
    patients = data.test.patients
    gp = {**params, "groups": list(g.names), "gap": f"{g.names[0]} - {g.names[1]}" if two else "max - min"}
    out = []
    n_all = {"n_test": int(in_any.sum()), "n_patients_test": int(len(np.unique(patients[in_any])))}
    thresholds = sc.thresholds(data.task)
    for m in GAP_METRICS:
        m0, _, t_name = m.partition("@")  # a thresholded metric: at the run's threshold of each label
        point = np.full((len(names), len(g.names)), np.nan)
        draws = np.full((len(counts), len(names), len(g.names)), np.nan)
        why: dict[int, str] = {}
        for j in range(len(names)):
            if not fitted[j]:
                why[j] = "the probe could not be fitted for this label"
                continue
            t, no_t = thresholds[j][t_name] if t_name else (None, None)
            if no_t:
                why[j] = no_t
                continue
            try:
                for i, mk in enumerate(masks):
                    point[j, i] = metric_value(m0, Y[mk, j], S[mk, j], n_bins=n_bins, threshold=t)[0]
            except FeatcacheError as err:
                why[j] = str(err)
                continue
            bad = [n for n, v in zip(g.names, point[j]) if math.isnan(v)]
            if bad:
                why[j] = f"{m} is undefined in group {', '.join(bad)}"
                continue
            reasons = [ci_reason(m0, Y[mk, j], patients[mk]) for mk in masks]
            if any(reasons):
                why[j] = None  # value given, no CI
                continue
            for i, mk in enumerate(masks):
                draws[:, j, i] = metric_draws(
                    m0, Y[:, j], S[:, j], counts, inverse, mask=mk, n_bins=n_bins, threshold=t
                )
        for j, label in enumerate(names):
            p = {**gp, "group_values": dict(zip(g.names, point[j].tolist()))}
            e = {**base, **n_all, "label": label, "metric": f"{m}_gap", "value": None, "params": p}
            out.append(e)
            if why.get(j):
                p["skipped"] = why[j]
                continue
            e["value"] = float(_gap(point[j], two))
            if j in why:
                p["ci"] = "no CI (a group has fewer than 2 patients on a side)"
                continue
            d = _gap(draws[:, j], two)
            low, high, skipped = percentile_ci(d)
            e.update(ci_low=low, ci_high=high, n_boot=len(counts), n_boot_skipped=skipped)
            if two:
                e["p"] = _p_two_sided(d)
        ok = [j for j in range(len(names)) if not why.get(j) and not np.isnan(point[j]).any()]
        p = {**gp, "labels_in_mean": [names[j] for j in ok]}
        e = {**base, **n_all, "label": "mean", "metric": f"{m}_gap", "value": None, "params": p}
        out.append(e)
        if not ok:
            p["skipped"] = f"no label has {m} defined in every group"
            continue
        per_group = point[ok].mean(axis=0)
        p["group_values"] = dict(zip(g.names, per_group.tolist()))
        e["value"] = float(_gap(per_group, two))
        if any(j in why for j in ok):
            p["ci"] = "no CI (a label of the mean has a group with fewer than 2 patients on a side)"
            continue
        d = _gap(draws[:, ok].mean(axis=1), two)
        low, high, skipped = percentile_ci(d)
        e.update(ci_low=low, ci_high=high, n_boot=len(counts), n_boot_skipped=skipped)
        if two:
            e["p"] = _p_two_sided(d)
    return out


def subgroup_lines(rows: list[dict]) -> list[str]:
    """Console lines: mean AUROC per subgroup and its gap, and rows left out of every group (once).

    Rows of several k (kNN) show the largest k.
    """
    ks = [r["k"] for r in rows if r.get("k") is not None]
    rows = [r for r in rows if not ks or r.get("k") == max(ks)]
    lines, said = [], set()
    for r in rows:
        p = r.get("params") or {}
        col = p.get("subgroup_by")
        if not col or r.get("label") != "mean":
            continue
        if p.get("subgroup_left_out") and col not in said:
            said.add(col)
            lines.append(
                f"note: {col}: {p['subgroup_left_out']} test rows in no group (blank or outside the bands)"
            )
        v = "n/a" if r.get("value") is None else f"{r['value']:.3f}"
        ci = f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r.get("ci_low") is not None else ""
        if r["metric"] == "auroc" and p.get("subgroup"):
            (value,) = p["subgroup"].values()
            lines.append(f"{col}={value}: mean AUROC {v}{ci} ({r.get('n_test')} images)")
        elif r["metric"] == "auroc_gap":
            pv = f", p {r['p']:.3g}" if r.get("p") is not None else ""
            lines.append(f"{col}: mean AUROC gap ({p.get('gap')}) {v}{ci}{pv}")
    return lines
