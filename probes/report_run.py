"""``probes report``: tables and plots of a results file, one table per probe and setting.

This module does not import torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from featcache.errors import FeatcacheError

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
