"""Compact ROC curves on result rows, and the ROC grid plot drawn from them.

Each label's ``auroc`` row carries its test ROC curve in ``params.roc = {"fpr": [...], "tpr":
[...]}`` so a curve can be drawn from a results file alone. The points are the curve's vertices
(:func:`roc_vertices`: the corners of the empirical ROC, what ``sklearn.metrics.roc_curve`` returns
with ``drop_intermediate=True``), rounded to :data:`ROC_DECIMALS` decimals. A curve with more than
:data:`ROC_MAX_POINTS` vertices is thinned by FPR (:func:`thin_roc`): on the grid of
``ROC_MAX_POINTS`` evenly spaced FPR values from 0 to 1, each grid value keeps the last vertex at
or below it (the highest TPR reached by then), so every point kept is an exact vertex and (0, 0)
and (1, 1) stay. The trapezoid area of the stored points equals the row's AUROC when nothing was
thinned (up to the rounding); a thinned curve joins kept vertices by chords, so its area is close
to the AUROC but not equal (0.0005 off for 1764 vertices of 5000 rows). ``params.roc.thinned_from``
gives the vertex count when a curve was thinned.

``params.roc`` is an outcome (:data:`probes.results.OUTCOME_PARAMS`): it never changes a row's key.

This module does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError
from probes.report.figures import matplotlib_agg, save_png

__all__ = ["ROC_DECIMALS", "ROC_MAX_POINTS", "plot_roc", "roc_curve_params", "roc_vertices", "thin_roc"]

ROC_MAX_POINTS = 101
"""Most points stored per curve (the FPR grid 0, 0.01, ..., 1 when thinning)."""
ROC_DECIMALS = 5
"""Decimals of the stored FPR and TPR."""


def roc_vertices(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vertices of the empirical ROC curve of one label.

    Args:
        y: float [n] 0/1 targets (NaN rows are left out).
        s: float [n] scores, higher meaning positive (rows with a NaN score are left out).

    Returns:
        (fpr, tpr), float64 [V] each, from (0, 0) to (1, 1), non-decreasing: the points of
        ``sklearn.metrics.roc_curve(y, s, drop_intermediate=True)``.

    Raises:
        FeatcacheError: the rows lack a positive or a negative.
    """
    y, s = np.asarray(y, np.float64), np.asarray(s, np.float64)
    keep = ~(np.isnan(y) | np.isnan(s))
    y, s = y[keep], s[keep]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if not n_pos or not n_neg:
        raise FeatcacheError(f"a ROC curve needs both classes: {n_pos} positives and {n_neg} negatives")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last row of each distinct score
    tps = np.cumsum(y)[last]
    fps = 1 + last - tps
    corner = np.ones(len(tps), bool)  # one distinct score: the single vertex (1, 1)
    corner[1:-1] = np.logical_or(np.diff(fps, 2), np.diff(tps, 2))  # sklearn's rule
    tps, fps = np.r_[0, tps[corner]], np.r_[0, fps[corner]]
    return fps / n_neg, tps / n_pos


def thin_roc(
    fpr: np.ndarray, tpr: np.ndarray, max_points: int = ROC_MAX_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` vertices of a ROC curve, chosen by FPR (the module docstring).

    Args:
        fpr, tpr: float [V] vertices, non-decreasing, from (0, 0) to (1, 1).
        max_points: most points kept (at least 2).

    Returns:
        (fpr, tpr) float64 [<= max_points], a subsequence of the input (the input when V <= max_points).
    """
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    if len(fpr) <= max_points:
        return fpr, tpr
    grid = np.linspace(0.0, 1.0, max(2, int(max_points)))
    # the last vertex at or below each grid FPR; the last vertex of all (1, 1) for the grid's 1.0
    idx = np.searchsorted(fpr, grid + 1e-12, side="right") - 1
    idx = np.unique(np.r_[0, np.clip(idx, 0, len(fpr) - 1), len(fpr) - 1])
    return fpr[idx], tpr[idx]


def roc_curve_params(y: np.ndarray, s: np.ndarray, max_points: int = ROC_MAX_POINTS) -> dict[str, Any]:
    """``params.roc`` of one label's ``auroc`` row: ``{"fpr": [...], "tpr": [...]}`` (rounded to
    :data:`ROC_DECIMALS`), plus ``thinned_from`` (the vertex count) when the curve was thinned.

    Args:
        y: float [n] 0/1 test targets (NaN missing).
        s: float [n] test scores.
        max_points: most points stored.
    """
    fpr, tpr = roc_vertices(y, s)
    f, t = thin_roc(fpr, tpr, max_points)
    out: dict[str, Any] = {
        "fpr": [round(float(v), ROC_DECIMALS) for v in f],
        "tpr": [round(float(v), ROC_DECIMALS) for v in t],
    }
    if len(f) < len(fpr):
        out["thinned_from"] = int(len(fpr))
    return out


def _curves(rows: Iterable[Mapping[str, Any]], where: Mapping[str, Any]) -> dict[str, dict[str, dict]]:
    """label -> series name -> the newest ``params.roc`` of that label (rows of ``where``)."""
    from probes.results import drop_duplicates

    rows = [
        r
        for r in drop_duplicates(list(rows))[0]
        if r.get("metric") == "auroc"
        and r.get("label") != "mean"
        and isinstance((r.get("params") or {}).get("roc"), Mapping)
        and not (r.get("params") or {}).get("subgroup")
        and all(r.get(k) == v for k, v in where.items() if v is not None)
    ]
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        name = f"{r.get('model')} @ {r.get('res')}" + (f", k={r['k']}" if r.get("k") is not None else "")
        if r.get("value") is not None:
            name += f" (AUROC {r['value']:.3f})"
        out.setdefault(str(r["label"]), {})[name] = r["params"]["roc"]
    return out


def plot_roc(
    rows: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    label: str | None = None,
    backbone: str | None = None,
    dataset: str | None = None,
    probe: str | None = None,
    title: str | None = None,
) -> Path:
    """ROC curves from the ``params.roc`` of ``auroc`` rows, one panel per label (or only ``label``),
    every backbone (model @ res, and k for kNN) of a panel overlaid, with the chance diagonal.

    Re-runs are dropped first (:func:`probes.results.drop_duplicates`, the newest wins); subgroup
    rows are left out.

    Args:
        rows: result rows.
        path: PNG file written.
        label: draw only this label (None: every label, a grid of small panels).
        backbone: only rows of this ``model``.
        dataset: only rows of this dataset.
        probe: only rows of this probe.
        title: figure title (default: the dataset and probe).

    Returns:
        The path written.

    Raises:
        FeatcacheError: no row carries a ROC curve, or matplotlib is missing.
    """
    where = {"dataset": dataset, "probe": probe, "model": backbone, "label": label}
    curves = _curves(rows, where)
    if not curves:
        raise FeatcacheError(
            "no auroc row with a ROC curve (params.roc) matches"
            + "".join(f" {k}={v}" for k, v in where.items() if v is not None)
            + "; rows written before ROC curves were stored have none: re-run the probe"
        )
    Figure, FigureCanvasAgg = matplotlib_agg()
    n = len(curves)
    cols = min(n, 4)
    grid_rows = -(-n // cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * grid_rows + 0.6), dpi=150)
    FigureCanvasAgg(fig)
    axes = fig.subplots(grid_rows, cols, squeeze=False)
    for ax, (name, series) in zip(axes.ravel(), sorted(curves.items())):
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        for s_name, roc in series.items():
            ax.plot(roc["fpr"], roc["tpr"], lw=1.2, drawstyle="default", label=s_name)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=5.5, loc="lower right")
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("false positive rate", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("true positive rate", fontsize=8)
    fig.suptitle(title or " ".join(str(v) for v in (dataset, probe) if v) or "ROC curves", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
