"""Paper plots from long-format result rows: curves (few-shot, resolution, kNN k), forest plots.

Each point or interval is one setting over distinct seeds, summarized as in :mod:`probes.report.tables`
(re-runs dropped, the newest row winning): several seeds give the mean and ± 1 SD, a single run
its bootstrap CI. Plots are PNG files drawn with matplotlib's object API on the Agg canvas (no
pyplot, no global backend change), imported only when a plot is made (``pip install
featcache[plot]``). Every function returns the path it wrote.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError
from probes.report.figures import DPI, matplotlib_agg, save_png
from probes.report.tables import check_one_setting, per_label_grid, select, show, sorted_keys, summarize
from probes.results import drop_duplicates

__all__ = [
    "labels_in_mean",
    "plot_compare",
    "plot_fewshot",
    "plot_forest",
    "plot_k",
    "plot_resolution",
    "thin_ticks",
]

_METRIC_NAMES = {
    "auroc": "AUROC",
    "auroc_diff": "AUROC difference",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "f1": "F1",
    "dice": "Dice",
    "jaccard": "Jaccard",
    "dice_jaccard_mean": "mean of Dice and Jaccard",
    "hd95": "HD95",
    "auprc": "AUPRC",
    "ece": "ECE",
    "brier": "Brier score",
}
_FIGSIZE = (6.4, 4.4)  # inches
_MARKERS = "osD^vP*Xhp<>"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def labels_in_mean(runs: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    """The distinct label sets (``params.labels_in_mean``) behind the ``mean`` rows, in order seen."""
    sets = {}
    for r in runs:
        labs = (r.get("params") or {}).get("labels_in_mean")
        if r.get("label") == "mean" and labs is not None:
            sets.setdefault(tuple(labs), list(labs))
    return list(sets.values())


def _mean_note(runs: Sequence[Mapping[str, Any]], label: str) -> str:
    if label != "mean":
        return ""
    sets = labels_in_mean(runs)
    if not sets:
        return "\nmean over the labels of each run"
    if len(sets) == 1:
        labs = sets[0]
        text = ", ".join(labs) if len(labs) <= 6 else f"{', '.join(labs[:5])} ... ({len(labs)} labels)"
        return f"\nmean over {text}"
    return f"\nmean over labels that vary between runs ({len(sets)} label sets; see the report)"


def series(rows, x_field: str, by, metric, label, probe, where):
    """Per ``by`` value: ``(x, summary)`` points sorted by x, each point one setting over seeds.

    Returns:
        ``(series, runs)``: ``{by value tuple: [(x, summary dict), ...]}`` and the rows plotted.
    """
    by = (by,) if isinstance(by, str) else tuple(by)
    runs = [
        r for r in drop_duplicates(select(rows, metric, label, probe, where))[0] if _is_number(r.get(x_field))
    ]
    if not runs:
        raise FeatcacheError(
            f"no result rows with a numeric {x_field!r} for metric={metric!r}, label={label!r}"
        )
    if "dataset" not in by and len({r.get("dataset") for r in runs}) > 1:
        by = (*by, "dataset")  # never join points of different datasets into one curve
    points: dict[tuple, dict[float, list[dict]]] = {}
    for r in runs:
        points.setdefault(tuple(r.get(f) for f in by), {}).setdefault(r[x_field], []).append(r)
    out = {}
    for key in sorted_keys(points):
        pts = []
        for x in sorted(points[key]):
            check_one_setting(
                points[key][x], f"point ({', '.join(f'{f}={v}' for f, v in zip(by, key))}, {x_field}={x})"
            )
            s = summarize(points[key][x])
            if s is not None:
                pts.append((x, s))
        out[key] = pts
    return out, runs


_series = series  # the name older callers use


def thin_ticks(xs: Sequence[float], log: bool, min_gap: float = 0.07) -> list[bool]:
    """Which tick labels to keep so that none overlaps: a label at least ``min_gap`` of the axis span
    from the previous kept one; the first and the last are always kept (the one before the last is
    dropped instead when too close).

    Args:
        xs: tick positions, ascending.
        log: positions on a log axis (gaps measured in log2).
        min_gap: smallest gap between kept labels, as a fraction of the span.

    Returns:
        One bool per tick.
    """
    if len(xs) <= 2:
        return [True] * len(xs)
    pos = np.log2(np.asarray(xs, float)) if log else np.asarray(xs, float)
    span = float(pos[-1] - pos[0]) or 1.0
    keep = [False] * len(xs)
    keep[0] = True
    last = pos[0]
    for i in range(1, len(xs) - 1):
        if (pos[i] - last) / span >= min_gap and (pos[-1] - pos[i]) / span >= min_gap:
            keep[i], last = True, pos[i]
    keep[-1] = True
    return keep


def _curves(series_, xlabel: str, ylabel: str, title: str, band: bool, log2: bool):
    Figure, Canvas = matplotlib_agg()
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=_FIGSIZE, dpi=DPI)
    Canvas(fig)
    ax = fig.add_subplot()
    xs_all = sorted({x for pts in series_.values() for x, _ in pts})
    kinds = set()
    for i, (key, pts) in enumerate(series_.items()):
        if not pts:
            continue
        x = np.array([p[0] for p in pts], dtype=float)
        s = [p[1] for p in pts]
        (line,) = ax.plot(
            x,
            [p["mean"] for p in s],
            marker=_MARKERS[i % len(_MARKERS)],
            label=" / ".join(show(v) for v in key),
        )
        if band:
            # several seeds: mean ± std; a single run with a bootstrap CI: the CI
            lo = np.array([p["mean"] - p["std"] if p["n"] > 1 else p["low"] for p in s])
            hi = np.array([p["mean"] + p["std"] if p["n"] > 1 else p["high"] for p in s])
            kinds |= {"sd" if p["n"] > 1 else "ci" for p in s if p["n"] > 1 or not math.isnan(p["low"])}
            if np.isfinite(lo).any():
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
    log = log2 and len(xs_all) > 1 and min(xs_all) > 0
    if log:
        ax.set_xscale("log", base=2)
    keep = thin_ticks(xs_all, log)
    ax.set_xticks(xs_all)
    ax.set_xticklabels(
        [show(int(v) if float(v).is_integer() else v) if k else "" for v, k in zip(xs_all, keep)]
    )
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    note = {
        frozenset({"sd"}): "band: ± 1 SD over seeds",
        frozenset({"ci"}): "band: bootstrap CI",
        frozenset({"sd", "ci"}): "band: ± 1 SD over seeds or bootstrap CI",
    }.get(frozenset(kinds))
    ax.legend(fontsize="small", loc="best", title=note, title_fontsize="small")
    return fig


def _axis_label(metric: str, label: str) -> str:
    name = _METRIC_NAMES.get(metric, metric)
    return f"{name} (mean over labels)" if label == "mean" else f"{name} ({label})"


def _default_title(runs: Sequence[dict], what: str) -> str:
    datasets = ", ".join(dict.fromkeys(show(r.get("dataset")) for r in runs))
    probes_ = ", ".join(dict.fromkeys(show(r.get("probe")) for r in runs))
    heads = ", ".join(dict.fromkeys(show(r["head"]) for r in runs if r.get("head") is not None))
    return f"{datasets}: {what} ({probes_}{', ' + heads if heads else ''})"


def _curve_plot(
    rows, path, x_field, xlabel, what, by, metric, label, probe, where, band, title, log2=True
) -> Path:
    rows = list(rows)
    s, runs = series(rows, x_field, by, metric, label, probe, where)
    title = (title or _default_title(runs, what)) + _mean_note(runs, label)
    return save_png(_curves(s, xlabel, _axis_label(metric, label), title, band, log2), path)


def plot_fewshot(
    rows: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    by: str | Sequence[str] = ("model",),
    metric: str = "auroc",
    label: str = "mean",
    probe: str | None = None,
    where: Mapping[str, Any] | None = None,
    band: bool = True,
    title: str | None = None,
) -> Path:
    """Few-shot curves: the metric against shots (log2 axis, a tick at every K present, labels
    thinned so none overlaps), one line per backbone; the title names the labels of the mean.

    Args:
        rows: result rows with ``shots``.
        path: PNG file to write (parent folders are created); 960 x 660 pixels.
        by: field(s) naming a line, e.g. ``"model"`` or ``("model", "res")``.
        metric: metric on the y axis.
        label: label (``"mean"``: mean over labels, whose set ``params.labels_in_mean`` is named).
        probe: keep only this probe.
        where: further filter, e.g. ``{"dataset": "nih", "head": "logreg"}``.
        band: draw the ± std (several seeds) or CI (single run) band.
        title: plot title (default: dataset and probe names).

    Raises:
        FeatcacheError: no matching rows, mixed settings in a point, or matplotlib missing.
    """
    return _curve_plot(
        rows, path, "shots", "shots per class (K)", "few-shot", by, metric, label, probe, where, band, title
    )


def plot_resolution(
    rows: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    by: str | Sequence[str] = ("model",),
    metric: str = "auroc",
    label: str = "mean",
    probe: str | None = None,
    where: Mapping[str, Any] | None = None,
    band: bool = True,
    title: str | None = None,
) -> Path:
    """Resolution curves: the metric against input resolution (log2 axis), one line per backbone.

    Arguments as :func:`plot_fewshot`; with several probes in the rows, name one or filter.
    """
    return _curve_plot(
        rows,
        path,
        "res",
        "input resolution (pixels)",
        "resolution",
        by,
        metric,
        label,
        probe,
        where,
        band,
        title,
    )


def plot_k(
    rows: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    by: str | Sequence[str] = ("model",),
    metric: str = "auroc",
    label: str = "mean",
    where: Mapping[str, Any] | None = None,
    band: bool = True,
    title: str | None = None,
) -> Path:
    """kNN: the metric against k (log2 axis), one line per backbone.

    Arguments as :func:`plot_fewshot`; only ``probe == "knn"`` rows are used.
    """
    return _curve_plot(rows, path, "k", "neighbours (k)", "kNN", by, metric, label, "knn", where, band, title)


def _forest(g, path, xlabel: str, title: str, zero_line: bool) -> Path:
    """Horizontal intervals: one row per label (``mean`` last, bottom), one colour per column."""
    Figure, Canvas = matplotlib_agg()
    n_lab, n_col = len(g.lines), len(g.cols)
    height = max(2.6, 0.9 + 0.28 * n_lab * max(1, min(n_col, 4)) ** 0.5 + 0.2 * n_col)
    fig = Figure(figsize=(_FIGSIZE[0], min(height, 30.0)), dpi=DPI)
    Canvas(fig)
    ax = fig.add_subplot()
    step = 0.8 / max(n_col, 1)
    kinds = set()
    for c, col in enumerate(g.cols):
        ys, xs, lo, hi = [], [], [], []
        for i, line in enumerate(g.lines):
            s = g.cells.get((line, col))
            if s is None:
                continue
            y = (n_lab - 1 - i) + 0.4 - step * (c + 0.5)
            ys.append(y)
            xs.append(s["mean"])
            if s["n"] > 1:
                lo.append(s["mean"] - s["std"])
                hi.append(s["mean"] + s["std"])
                kinds.add("sd")
            else:
                lo.append(s["low"])
                hi.append(s["high"])
                if not math.isnan(s["low"]):
                    kinds.add("ci")
        if not ys:
            continue
        xs_a, lo_a, hi_a = np.array(xs), np.array(lo), np.array(hi)
        err = np.vstack([xs_a - lo_a, hi_a - xs_a])
        err = np.where(np.isfinite(err), err, 0.0)
        name = " / ".join(show(v) for f, v in zip(g.col_fields, col) if f != "k" and v is not None)
        name += "".join(f" k={v}" for f, v in zip(g.col_fields, col) if f == "k" and v is not None)
        ax.errorbar(
            xs_a, ys, xerr=err, fmt=_MARKERS[c % len(_MARKERS)], capsize=2.5, markersize=4, label=name
        )
    if zero_line:
        ax.axvline(0.0, color="0.3", linewidth=1.0, linestyle="--")
    ax.set_yticks(range(n_lab))
    ax.set_yticklabels([show(line[0]) for line in reversed(g.lines)])
    if g.lines and g.lines[-1][0] == "mean":
        ax.axhline(0.5, color="0.6", linewidth=0.8)  # the mean apart from the labels
        ax.get_yticklabels()[0].set_fontweight("bold")
    ax.set_ylim(-0.6, n_lab - 0.4)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(True, axis="x", alpha=0.3)
    note = {frozenset({"sd"}): "bars: ± 1 SD over seeds", frozenset({"ci"}): "bars: bootstrap 95% CI"}.get(
        frozenset(kinds), "bars: bootstrap CI or ± 1 SD over seeds" if kinds else None
    )
    ax.legend(fontsize="small", loc="best", title=note, title_fontsize="small")
    return save_png(fig, path)


def plot_forest(
    rows: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    metric: str = "auroc",
    backbone: Sequence[str] = ("model", "res"),
    probe: str | None = None,
    where: Mapping[str, Any] | None = None,
    title: str | None = None,
    extra_cols: Sequence[str] = (),
) -> Path:
    """Forest plot: the metric per label (``mean`` last) with its CI, one colour per backbone.

    Args:
        rows: result rows of one probe setting (filter with ``probe``/``where``).
        path: PNG file to write; 960 pixels wide, height growing with the labels.
        metric: metric on the x axis.
        backbone: fields naming a backbone (``res`` only when several are present).
        probe: keep only this probe.
        where: further filter, e.g. ``{"dataset": "nih", "k": 20}``.
        title: plot title (default: dataset, probe, and the labels of the mean).
        extra_cols: more fields telling colours apart, e.g. ``("k",)`` for one per backbone and k.

    Raises:
        FeatcacheError: no matching rows, a backbone/label holding two settings, matplotlib missing.
    """
    g = per_label_grid(list(rows), metric, backbone, probe, where, extra_cols)
    title = (title or _default_title(g.runs, f"{_METRIC_NAMES.get(metric, metric)} per label")) + _mean_note(
        g.runs, "mean"
    )
    return _forest(g, path, f"{_METRIC_NAMES.get(metric, metric)} per label", title, zero_line=False)


def plot_compare(
    rows: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    where: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """Paired differences of ``probes compare``: AUROC difference per label with its paired CI, a
    zero line, one colour per pair (``store_set`` minus ``vs``).

    Args:
        rows: result rows; the ``auroc_diff`` rows are used.
        path: PNG file to write.
        where: further filter, e.g. ``{"vs": "nih/rad-dino/518"}``.
        title: plot title (default: dataset and the labels of the mean).

    Raises:
        FeatcacheError: no comparison rows, a pair holding two settings, or matplotlib missing.
    """
    sel = select(list(rows), "auroc_diff", None, None, where)
    from probes.report.tables import grid, label_order

    for r in sel:  # the pair: set A (its store set, else model/res) minus set B
        r["pair"] = (
            f"{r.get('store_set') or show(r.get('model')) + '/' + show(r.get('res'))} − {show(r.get('vs'))}"
        )
    g = grid(sel, ("label",), ("pair",), line_order=label_order(sel))
    title = (title or _default_title(g.runs, "paired AUROC differences")) + _mean_note(g.runs, "mean")
    return _forest(g, path, "AUROC difference (A − B)", title, zero_line=True)


def __getattr__(name: str):
    if name == "plot_roc":  # lives in probes.report.roc (which imports this module's helpers)
        from probes.report.roc import plot_roc

        return plot_roc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
