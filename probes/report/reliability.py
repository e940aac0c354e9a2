"""Reliability diagrams: the calibration bins that ``ece`` rows carry (``params.reliability``), drawn.

:func:`plot_reliability` draws curves given as ``{name: (y, p)}`` or as result rows;
:func:`reliability_groups` splits a results file's ``ece`` rows into one figure per feature set and
probe (the largest k of a kNN run, re-runs and subgroup rows left out), which ``probes report
--plot-reliability`` and the HTML report draw.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError
from probes.evaluation.calibration import DEFAULT_BINS, reliability_bins

__all__ = ["plot_reliability", "reliability_groups"]


def reliability_groups(rows: Iterable[Mapping[str, Any]]) -> list[tuple[str, list[dict]]]:
    """(caption, ece rows) per (dataset, model, res, features, probe, head) that carries reliability bins.

    Re-runs are dropped (the newest wins, :func:`probes.results.drop_duplicates`); subgroup rows and
    few-shot rows (one curve per episode) are left out; of a kNN run only its largest k is kept.
    """
    from probes.results import drop_duplicates

    keep = [
        dict(r)
        for r in drop_duplicates(list(rows))[0]
        if r.get("metric") == "ece"
        and r.get("label") != "mean"
        and r.get("probe") != "fewshot"
        and (r.get("params") or {}).get("reliability")
        and not (r.get("params") or {}).get("subgroup")
    ]
    fields = ("dataset", "model", "res", "features", "probe", "head")
    groups: dict[tuple, list[dict]] = {}
    for r in keep:
        groups.setdefault(tuple(r.get(f) for f in fields), []).append(r)
    out = []
    for key, members in groups.items():
        ks = [r["k"] for r in members if r.get("k") is not None]
        if ks:
            members = [r for r in members if r.get("k") == max(ks)]
        what = ", ".join(f"{f}={v}" for f, v in zip(fields, key) if v is not None)
        out.append((what + (f", k={max(ks)}" if ks else ""), members))
    return out


def plot_reliability(
    curves: Mapping[str, tuple[Any, Any]] | Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    n_bins: int = DEFAULT_BINS,
    title: str | None = None,
) -> Path:
    """Write a reliability diagram (PNG) of one or more labels' probabilities.

    Args:
        curves: ``{name: (y [n], p [n])}`` (probe scores and labels), or result rows: the
            ``reliability`` entries of ``ece`` rows (``params.reliability`` holds the bins) are drawn,
            one curve per row, named by its label (and subgroup).
        path: PNG to write (folders created).
        n_bins: bins for ``{name: (y, p)}`` input.
        title: figure title.

    Returns:
        The path written.

    Raises:
        FeatcacheError: nothing to draw, or matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dependency of the report extra
        raise FeatcacheError("plot_reliability needs matplotlib: pip install matplotlib") from None
    series: list[tuple[str, np.ndarray, np.ndarray]] = []
    if isinstance(curves, Mapping):
        for name, (y, p) in curves.items():
            r = reliability_bins(y, p, n_bins)
            series.append((str(name), r["mean_p"], r["frac_pos"]))
    else:
        for row in curves:
            rel = (row.get("params") or {}).get("reliability")
            if row.get("metric") != "ece" or not rel:
                continue
            sub = (row.get("params") or {}).get("subgroup")
            name = row["label"] + (f" {sub}" if sub else "")
            series.append((name, np.array(rel["mean_p"], float), np.array(rel["frac_pos"], float)))
    if not series:
        raise FeatcacheError("nothing to draw: give {name: (y, p)} or result rows with 'ece' metrics")
    fig = Figure(figsize=(5.0, 5.0), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    for name, mp, fr in series:
        ok = ~(np.isnan(mp) | np.isnan(fr))
        ax.plot(mp[ok], fr[ok], marker="o", ms=3, lw=1.2, label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="fraction positive")
    ax.set_title(title or "reliability diagram")
    ax.legend(fontsize=7, loc="upper left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
