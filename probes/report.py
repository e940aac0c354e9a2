"""Paper tables and plots from long-format result rows (see :mod:`probes.results`).

How rows become one number (a table cell or a plotted point):

1. Rows are selected by ``metric``, ``label`` (``"mean"`` is the mean over labels), optionally
   ``probe`` and ``where`` (``{field: value}`` or ``{field: [values]}``).
2. Rows with the same setting and seed are one run; when a run was recorded twice (a probe re-run
   appends again) the row read last wins.
3. A cell must hold one setting (same values of :data:`SETTING_FIELDS`) over one or more seeds.
   Rows that differ in a setting field, e.g. ``k`` of kNN or ``features``, are refused with a
   message naming the field: put it in ``by``/``columns`` or filter it with ``where``. ``C`` is
   not a setting field: it is the value selected on validation and may differ between seeds.
4. Several seeds: ``mean ± std`` (sample standard deviation, ddof=1) of the defined values;
   a single run carrying a bootstrap CI: ``0.812 [0.790, 0.834]``; otherwise the value alone;
   ``n/a`` when the metric was undefined in every run, ``-`` when there is no row at all.

Tables are ``list[list[str]]`` with a header row, rendered by :func:`to_markdown` / :func:`to_csv`.
Plots are PNG files drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend change), imported only when a plot is made.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError

__all__ = [
    "SETTING_FIELDS",
    "fewshot_table",
    "plot_fewshot",
    "plot_resolution",
    "table",
    "to_csv",
    "to_markdown",
]

SETTING_FIELDS = (
    "dataset",
    "model",
    "res",
    "layer",
    "features",
    "probe",
    "head",
    "k",
    "shots",
    "params",
    "vs",
    "metric",
    "label",
)

_METRIC_NAMES = {
    "auroc": "AUROC",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "f1": "F1",
    "dice": "Dice",
    "jaccard": "Jaccard",
    "dice_jaccard_mean": "mean of Dice and Jaccard",
    "hd95": "HD95 (px)",
}
_FIGSIZE = (6.4, 4.4)  # inches
_DPI = 150  # so a plot is 960 x 660 pixels
_MARKERS = "osD^vP*Xhp<>"


def _matches(row: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    for field, want in where.items():
        have = row.get(field)
        if isinstance(want, (list, tuple, set, frozenset)):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


def _select(rows, metric: str, label: str, probe: str | None, where: Mapping[str, Any] | None) -> list[dict]:
    out = [
        r
        for r in rows
        if r.get("metric") == metric
        and r.get("label") == label
        and (probe is None or r.get("probe") == probe)
        and _matches(r, where or {})
    ]
    if not out:
        what = f"metric={metric!r}, label={label!r}" + (f", probe={probe!r}" if probe else "")
        what += f", where={dict(where)!r}" if where else ""
        raise FeatcacheError(
            f"no result rows with {what}: check the names (probes report lists what is there)"
        )
    return out


def _key(row: Mapping[str, Any], field: str) -> str:
    return json.dumps(row.get(field), sort_keys=True)


def _setting(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(_key(row, f) for f in SETTING_FIELDS)


def _runs(rows: Sequence[dict]) -> list[dict]:
    """One row per (setting, seed), the last one read winning."""
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(*_setting(r), _key(r, "seed"))] = r
    return list(latest.values())


def _distinct(runs: Sequence[dict], field: str) -> list[str]:
    values = {_key(r, field): r.get(field) for r in runs}
    return sorted(values, key=lambda k: (0, values[k], "") if _is_number(values[k]) else (1, 0, k))


def _check_one_setting(runs: Sequence[dict], where: str) -> None:
    if len({_setting(r) for r in runs}) <= 1:
        return
    differ = [f for f in SETTING_FIELDS if len({_key(r, f) for r in runs}) > 1]
    detail = "; ".join(f"{f}: {', '.join(_distinct(runs, f))}" for f in differ)
    raise FeatcacheError(
        f"{where} mixes rows that differ in {detail}: add {differ[0]!r} to by/columns "
        f"or filter with where={{{differ[0]!r}: ...}}"
    )


def _summary(runs: Sequence[dict]) -> dict[str, float] | None:
    """mean, std (NaN for one value), low/high (a single run's CI or NaN), n of the defined values."""
    values = [
        float(r["value"]) for r in runs if r.get("value") is not None and math.isfinite(float(r["value"]))
    ]
    if not values:
        return None
    low = high = float("nan")
    if len(runs) == 1 and runs[0].get("ci_low") is not None and runs[0].get("ci_high") is not None:
        low, high = float(runs[0]["ci_low"]), float(runs[0]["ci_high"])
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return {"mean": float(np.mean(values)), "std": std, "low": low, "high": high, "n": len(values)}


def _format(summary: dict[str, float] | None, digits: int) -> str:
    if summary is None:
        return "n/a"
    mean = f"{summary['mean']:.{digits}f}"
    if summary["n"] > 1:
        return f"{mean} ± {summary['std']:.{digits}f}"
    if not math.isnan(summary["low"]):
        return f"{mean} [{summary['low']:.{digits}f}, {summary['high']:.{digits}f}]"
    return mean


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _sorted_keys(keys: Iterable[tuple]) -> list[tuple]:
    """Numbers ascending field by field, other values in order of first appearance."""
    keys = list(dict.fromkeys(keys))
    if not keys:
        return keys
    ranks = []
    for i in range(len(keys[0])):
        col = [k[i] for k in keys]
        if all(_is_number(v) for v in col):
            ranks.append({v: v for v in col})
        else:
            ranks.append({v: j for j, v in enumerate(dict.fromkeys(col))})
    return sorted(keys, key=lambda k: tuple(ranks[i][v] for i, v in enumerate(k)))


def _show(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def table(
    rows: Iterable[Mapping[str, Any]],
    by: str | Sequence[str] = ("model", "res"),
    columns: str = "dataset",
    metric: str = "auroc",
    label: str = "mean",
    probe: str | None = None,
    where: Mapping[str, Any] | None = None,
    digits: int = 3,
) -> list[list[str]]:
    """A paper table: one line per value of ``by``, one column per value of ``columns``.

    Args:
        rows: result rows (e.g. from :func:`probes.results.read_jsonl`).
        by: field(s) naming a table line, e.g. ``("model", "res")`` (backbones) or ``"model"``.
        columns: field whose values become the columns, e.g. ``"dataset"``, ``"res"``, ``"probe"``.
        metric: metric to show, e.g. ``"auroc"``.
        label: label to show; ``"mean"`` is the mean over labels.
        probe: keep only this probe (``None``: any).
        where: further filter, ``{field: value}`` or ``{field: [values]}``.
        digits: decimals shown.

    Returns:
        Rows of strings: a header (``by`` names, then one ``columns`` value per column, as
        ``res=512`` for numeric values), then one line per ``by`` value. Cells are formatted as
        described in the module docstring.

    Raises:
        FeatcacheError: no matching rows, or a cell mixing different settings.
    """
    by = (by,) if isinstance(by, str) else tuple(by)
    runs = _runs(_select(rows, metric, label, probe, where))
    cells: dict[tuple, dict[Any, list[dict]]] = {}
    for r in runs:
        cells.setdefault(tuple(r.get(f) for f in by), {}).setdefault(r.get(columns), []).append(r)
    col_values = [k[0] for k in _sorted_keys((r.get(columns),) for r in runs)]
    numeric = all(_is_number(v) for v in col_values)
    out = [[*by, *(f"{columns}={v}" if numeric else _show(v) for v in col_values)]]
    for line in _sorted_keys(cells):
        cell_texts = []
        for v in col_values:
            cell = cells[line].get(v)
            if cell is None:
                cell_texts.append("-")
                continue
            _check_one_setting(
                cell, f"cell ({', '.join(f'{f}={x}' for f, x in zip((*by, columns), (*line, v)))})"
            )
            cell_texts.append(_format(_summary(cell), digits))
        out.append([*(_show(x) for x in line), *cell_texts])
    return out


def fewshot_table(
    rows: Iterable[Mapping[str, Any]],
    by: str | Sequence[str] = ("model",),
    metric: str = "auroc",
    label: str = "mean",
    probe: str | None = None,
    where: Mapping[str, Any] | None = None,
    digits: int = 3,
) -> list[list[str]]:
    """Few-shot table: backbones as lines, shots as columns, ``mean ± std`` over seeds.

    Args:
        rows: result rows; only rows with a ``shots`` field are used.
        by: field(s) naming a line, e.g. ``"model"`` or ``("model", "res")``.
        metric: metric to show.
        label: label to show (``"mean"``: mean over labels).
        probe: keep only this probe (``None``: any row with ``shots``).
        where: further filter, e.g. ``{"dataset": "nih", "head": "logreg"}``.
        digits: decimals shown.

    Returns:
        Rows of strings as :func:`table`, columns ``shots=1``, ``shots=2``, ...
    """
    shot_rows = [r for r in rows if r.get("shots") is not None]
    return table(
        shot_rows, by=by, columns="shots", metric=metric, label=label, probe=probe, where=where, digits=digits
    )


def to_markdown(tab: Sequence[Sequence[str]]) -> str:
    """Render a table (header first) as a GitHub-flavoured Markdown table.

    Args:
        tab: rows of strings, the first being the header.

    Returns:
        The Markdown text, one line per row, ending with a newline.
    """
    if not tab:
        return ""

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return (
        "\n".join([line(tab[0]), "|" + "|".join("---" for _ in tab[0]) + "|", *(line(r) for r in tab[1:])])
        + "\n"
    )


def to_csv(tab: Sequence[Sequence[str]]) -> str:
    """Render a table (header first) as CSV text (RFC 4180 quoting, ``\\n`` line ends).

    Args:
        tab: rows of strings.

    Returns:
        The CSV text.
    """
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(tab)
    return buf.getvalue()


def _series(rows, x_field: str, by, metric, label, probe, where):
    """Per ``by`` value: ``(x, summary)`` points sorted by x, each point one setting over seeds.

    Returns:
        ``(series, runs)``: the dict of points and the runs plotted.
    """
    by = (by,) if isinstance(by, str) else tuple(by)
    runs = [r for r in _runs(_select(rows, metric, label, probe, where)) if _is_number(r.get(x_field))]
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
    for key in _sorted_keys(points):
        series = []
        for x in sorted(points[key]):
            desc = f"point ({', '.join(f'{f}={v}' for f, v in zip(by, key))}, {x_field}={x})"
            _check_one_setting(points[key][x], desc)
            summary = _summary(points[key][x])
            if summary is not None:
                series.append((x, summary))
        out[key] = series
    return out, runs


def _axis_label(metric: str, label: str) -> str:
    name = _METRIC_NAMES.get(metric, metric)
    return f"{name} (mean over labels)" if label == "mean" else f"{name} ({label})"


def _default_title(runs: Sequence[dict], what: str) -> str:
    datasets = ", ".join(dict.fromkeys(_show(r.get("dataset")) for r in runs))
    probes_ = ", ".join(dict.fromkeys(_show(r.get("probe")) for r in runs))
    heads = ", ".join(dict.fromkeys(_show(r["head"]) for r in runs if r.get("head") is not None))
    return f"{datasets}: {what} ({probes_}{', ' + heads if heads else ''})"


def _plot(series, path, xlabel: str, ylabel: str, title: str, band: bool) -> Path:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullLocator
    except ImportError:
        raise FeatcacheError("plotting needs matplotlib: pip install featcache[plot]") from None
    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs_all = sorted({x for pts in series.values() for x, _ in pts})
    kinds = set()
    for i, (key, pts) in enumerate(series.items()):
        if not pts:
            continue
        x = np.array([p[0] for p in pts], dtype=float)
        s = [p[1] for p in pts]
        mean = np.array([p["mean"] for p in s])
        name = " / ".join(_show(v) for v in key)
        (line,) = ax.plot(x, mean, marker=_MARKERS[i % len(_MARKERS)], label=name)
        if band:
            # several seeds: mean ± std; a single run with a bootstrap CI: the CI
            lo = np.array([p["mean"] - p["std"] if p["n"] > 1 else p["low"] for p in s])
            hi = np.array([p["mean"] + p["std"] if p["n"] > 1 else p["high"] for p in s])
            kinds |= {"sd" if p["n"] > 1 else "ci" for p in s if p["n"] > 1 or not math.isnan(p["low"])}
            if np.isfinite(lo).any():
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
    if len(xs_all) > 1 and min(xs_all) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs_all)
    ax.set_xticklabels([_show(int(v) if float(v).is_integer() else v) for v in xs_all])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    band_note = {
        frozenset({"sd"}): "band: ± 1 SD over seeds",
        frozenset({"ci"}): "band: bootstrap CI",
        frozenset({"sd", "ci"}): "band: ± 1 SD over seeds or bootstrap CI",
    }.get(frozenset(kinds))
    ax.legend(fontsize="small", loc="best", title=band_note, title_fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


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
    """Few-shot curves: the metric against shots (log2 axis), one line per backbone.

    Each point is the mean over seeds; the band is ± one standard deviation over seeds (or the
    bootstrap CI of a single run that carries one).

    Args:
        rows: result rows with ``shots``.
        path: PNG file to write (parent folders are created); 960 x 660 pixels.
        by: field(s) naming a line, e.g. ``"model"`` or ``("model", "res")``.
        metric: metric on the y axis.
        label: label (``"mean"``: mean over labels).
        probe: keep only this probe.
        where: further filter, e.g. ``{"dataset": "nih", "head": "logreg"}``.
        band: draw the ± std / CI band.
        title: plot title (default: dataset and probe names).

    Returns:
        The path written.

    Raises:
        FeatcacheError: no matching rows, mixed settings in a point, or matplotlib missing.
    """
    rows = list(rows)
    series, runs = _series(rows, "shots", by, metric, label, probe, where)
    title = title or _default_title(runs, "few-shot")
    return _plot(series, path, "shots per class (K)", _axis_label(metric, label), title, band)


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

    Args:
        rows: result rows.
        path: PNG file to write (parent folders are created); 960 x 660 pixels.
        by: field(s) naming a line.
        metric: metric on the y axis.
        label: label (``"mean"``: mean over labels).
        probe: keep only this probe (with several probes in the rows, name one or filter).
        where: further filter, e.g. ``{"dataset": "nih", "features": "cls"}``.
        band: draw the ± std (several seeds) or CI (single run) band.
        title: plot title (default: dataset and probe names).

    Returns:
        The path written.

    Raises:
        FeatcacheError: no matching rows, mixed settings in a point, or matplotlib missing.
    """
    rows = list(rows)
    series, runs = _series(rows, "res", by, metric, label, probe, where)
    title = title or _default_title(runs, "resolution")
    return _plot(series, path, "input resolution (pixels)", _axis_label(metric, label), title, band)
