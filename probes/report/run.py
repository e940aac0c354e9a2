"""``probes report``: tables, plots and a self-contained HTML report of a results file.

Summary tables (one per probe and setting: backbones x datasets, few-shot backbones x shots),
per-label tables (labels x backbones, the mean last), numeric exports (CSV, JSON lines, Parquet),
plots and the HTML report all read the same rows: filtered, then de-duplicated (a re-run of the
same :func:`probes.results.result_key` replaces the older rows, and the report says how many it
dropped). This module does not import torch.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError

# Setting fields that split a probe's rows into separate tables when they are not lines or columns.
# kNN's k is not among them: several k become a column group of one table (one k: named in the title).
_TABLE_SPLIT = ("dataset", "features", "layer", "head", "vs")
_PER_LABEL_SPLIT = ("dataset", "features", "layer", "head", "shots", "vs")
TABLE_KINDS = ("summary", "per-label", "both")
FORMATS = ("md", "csv", "json")


def _parse_where(where: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """``["k=20", "dataset=nih"]`` or a dict -> ``{field: value}`` with numbers as numbers."""
    if where is None:
        return {}
    if isinstance(where, Mapping):
        return dict(where)
    out: dict[str, Any] = {}
    for item in where:
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip():
            raise FeatcacheError(
                f"--where {item!r}: use FIELD=VALUE, e.g. --where k=20 or --where dataset=nih"
            )
        try:
            out[name.strip()] = json.loads(value)
        except ValueError:
            out[name.strip()] = value
    return out


def _title(probe, split, metric: str, label: str | None) -> str:
    head = " ".join([str(probe), *(f"{f}={v}" for f, v in split)])
    return f"{head}: {metric}" + (f", label {label}" if label is not None else ", per label")


def _summary_groups(rows, by, columns, wanted):
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if (r.get("metric"), r.get("label")) not in wanted:
            continue
        col = "shots" if r.get("probe") == "fewshot" else columns
        split = tuple(
            (f, r.get(f)) for f in _TABLE_SPLIT if f not in by and f != col and r.get(f) is not None
        )
        groups.setdefault((r.get("probe"), r.get("metric"), col, split), []).append(r)
    return groups


def _k_split(group: list[dict], by: Sequence[str], col: str) -> tuple[tuple, tuple]:
    """Several k: a column group; one k: a setting named in the title."""
    ks = {r.get("k") for r in group if r.get("k") is not None}
    if not ks or "k" in by or col == "k":
        return (), ()
    return (("k",), ()) if len(ks) > 1 else ((), (("k", next(iter(ks))),))


def _per_label_groups(rows, metrics):
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("metric") not in metrics or r.get("probe") == "seg":
            continue
        split = tuple((f, r.get(f)) for f in _PER_LABEL_SPLIT if r.get(f) is not None)
        groups.setdefault((r.get("probe"), r.get("metric"), split), []).append(r)
    return groups


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60]


def _paths(path, names: list[str]) -> list[Path]:
    """One path when there is one figure, else ``stem-<name>.png`` beside it."""
    path = Path(path)
    if len(names) == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{_slug(n)}{path.suffix or '.png'}") for n in names]


def write_parquet(records: list[dict], path: str | os.PathLike) -> Path:
    """Numeric records as a Parquet file (needs pandas and pyarrow, not featcache dependencies)."""
    try:
        import pandas as pd
        import pyarrow  # noqa: F401 - the engine pandas writes with
    except ImportError:
        raise FeatcacheError(
            f"--parquet {path}: needs pandas and pyarrow (pip install pandas pyarrow); use --format csv or json instead"
        ) from None
    frame = pd.DataFrame.from_records(
        [{k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()} for r in records]
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def run_report(
    results: str | os.PathLike,
    *,
    by: Sequence[str] = ("model", "res"),
    columns: str = "dataset",
    fmt: str = "md",
    metric: str = "auroc",
    label: str = "mean",
    where: Mapping[str, Any] | Sequence[str] | None = None,
    table: str = "summary",
    k: int | None = None,
    plot: str | os.PathLike | None = None,
    plot_resolution: str | os.PathLike | None = None,
    plot_forest: str | os.PathLike | None = None,
    plot_compare: str | os.PathLike | None = None,
    plot_k: str | os.PathLike | None = None,
    plot_reliability: str | os.PathLike | None = None,
    html: str | os.PathLike | None = None,
    parquet: str | os.PathLike | None = None,
    notes: list[str] | None = None,
) -> str:
    """Tables (and plots, and an HTML report) of a results file.

    Rows are filtered (``where``, ``k``), then re-runs dropped: of the rows sharing a
    :func:`probes.results.result_key` the newest is kept, and a note says how many were dropped.
    Distinct seeds of one setting are averaged (``mean ± SD``); one run shows its bootstrap CI.

    Summary tables: one per probe and setting (dataset, features, layer, head, vs), ``by`` values
    as lines, ``columns`` values as columns; several kNN k are a column group of one table (one k
    is named in the title); few-shot tables have shots as columns. Paired comparisons
    (``auroc_diff``) and segmentation (``dice``) get their own tables when ``metric`` is ``auroc``.
    Per-label tables: one per probe and setting, labels as lines (the mean last), backbones
    (``model``, ``model/res`` with several resolutions, and k with several) as columns.

    Args:
        results: the JSON-lines results file.
        by: fields naming a summary line (e.g. ``model,res``: one line per backbone and resolution).
        columns: field whose values are the summary columns (e.g. ``dataset``).
        fmt: ``md`` (Markdown, formatted cells such as ``0.812 [0.790, 0.834]``), ``csv`` or
            ``json`` (JSON lines): one numeric record per cell (``value, sd, ci_low, ci_high,
            n_seeds`` beside the fields naming the table, line and column).
        metric: metric shown (``auroc``, ``accuracy``, ``sensitivity@youden`` ...).
        label: label of the summary tables (``mean``: the mean over labels).
        where: filter, ``{field: value}`` or ``["field=value", ...]``; a condition applies to the rows
            that have the field (``k=20`` picks one kNN k and keeps the logistic-regression rows).
        table: ``summary``, ``per-label`` or ``both``.
        k: keep only this kNN k (rows without k are kept), same as ``where k=K``.
        plot: PNG path for few-shot curves (metric against shots, one line per ``by`` value).
        plot_resolution: PNG path for resolution curves (one line per ``by`` value except ``res``;
            logistic regression if present, else the first probe found).
        plot_forest: PNG path for forest plots of the per-label metric with CIs, one colour per
            backbone; with several probe settings, one file each (``stem-<setting>.png``).
        plot_compare: PNG path for the paired differences of ``probes compare`` (zero line).
        plot_k: PNG path for kNN: metric against k.
        plot_reliability: PNG path for reliability diagrams of the ``ece`` rows, one per feature set and
            probe (``stem-<set>.png`` beside it when there are several).
        html: path of one self-contained HTML report (summary and per-label tables, figures,
            provenance of every set, the labels behind each mean).
        parquet: path of a Parquet file of the numeric records (needs pandas and pyarrow).
        notes: when a list, the report's notes (dropped duplicates ...) go there instead of the
            end of the text (keeps CSV/JSON output machine-readable).

    Returns:
        The rendered tables as text (a title before each in Markdown), then where files went.

    Raises:
        FeatcacheError: unreadable results, no matching rows, a bad format or table kind, a plot or
            cell that mixes settings.
    """
    from probes.report.plots import plot_compare as _plot_compare
    from probes.report.plots import plot_fewshot
    from probes.report.plots import plot_forest as _plot_forest
    from probes.report.plots import plot_k as _plot_k
    from probes.report.plots import plot_resolution as _plot_res
    from probes.report.tables import (
        grid,
        grid_records,
        grid_table,
        per_label_grid,
        per_label_rows,
        records_csv,
        to_markdown,
    )
    from probes.results import drop_duplicates, read_jsonl

    if fmt not in FORMATS:
        raise FeatcacheError(f"--format {fmt}: use {', '.join(FORMATS)}")
    if table not in TABLE_KINDS:
        raise FeatcacheError(f"--table {table}: use {', '.join(TABLE_KINDS)}")
    by = [by] if isinstance(by, str) else list(by)
    cond = _parse_where(where)
    if k is not None:
        cond["k"] = int(k)
    # a condition applies to the rows that have the field: --where k=20 keeps logreg rows (no k)
    rows = [r for r in read_jsonl(results) if all(r.get(f, v) == v for f, v in cond.items())]
    if not rows:
        raise FeatcacheError(f"{results}: no result rows{' match ' + str(cond) if cond else ''}")
    rows, n_dropped = drop_duplicates(rows)
    said: list[str] = []
    if n_dropped:
        said.append(
            f"dropped {n_dropped} duplicate row{'s' * (n_dropped != 1)}: re-runs of the same result (same set, "
            "manifest, probe settings, seed, label and metric); the newest of each was kept"
        )
    wanted = [(metric, label)] + ([("auroc_diff", label), ("dice", label)] if metric == "auroc" else [])
    metrics = {m for m, _ in wanted}

    summaries = []  # (title, grid, context)
    for (probe, m, col, split), group in _summary_groups(rows, by, columns, wanted).items():
        extra_col, k_title = _k_split(group, by, col)
        g = grid(group, by, (col, *extra_col))
        ctx = {"table": "summary", "probe": probe, "metric": m, "label": label, **dict(split + k_title)}
        summaries.append((_title(probe, split + k_title, m, label), g, ctx))
    per_label = []
    if table != "summary" or html is not None:
        for (probe, m, split), group in _per_label_groups(rows, metrics).items():
            extra_col, k_title = _k_split(group, (), "")
            g = per_label_grid(group, m, extra_cols=extra_col)
            ctx = {"table": "per-label", "probe": probe, "metric": m, **dict(split + k_title)}
            per_label.append((_title(probe, split + k_title, m, None), g, ctx))
    if not summaries and not per_label:
        raise FeatcacheError(
            f"{results}: no rows with metric={metric!r} and label={label!r}; metrics there: "
            f"{sorted({str(r.get('metric')) for r in rows})}"
        )

    def fmt_table(g, kind):
        return per_label_rows(g) if kind == "per-label" else grid_table(g)

    shown = [(t, g, c) for t, g, c in summaries if table != "per-label"] + [
        (t, g, c) for t, g, c in per_label if table != "summary"
    ]
    if fmt == "md":
        text = "\n".join(f"## {t}\n\n" + to_markdown(fmt_table(g, c["table"])) for t, g, c in shown)
    else:
        records = [rec for _, g, c in shown for rec in grid_records(g, c)]
        text = records_csv(records) if fmt == "csv" else "".join(json.dumps(r) + "\n" for r in records)
    if parquet is not None:
        path = write_parquet([rec for _, g, c in shown for rec in grid_records(g, c)], parquet)
        text += f"\nparquet: {path}\n"

    figures: list[tuple[str, Path]] = []
    line_by = [f for f in by if f != "res"] or ["model"]
    if plot is not None:
        few = [r for r in rows if r.get("probe") == "fewshot"]
        if not few:
            raise FeatcacheError(f"{results}: no few-shot rows to plot; run probes fewshot first")
        figures.append(("few-shot curves", plot_fewshot(few, plot, by=by, metric=metric, label=label)))
        text += f"\nfew-shot plot: {figures[-1][1]}\n"
    if plot_resolution is not None:
        found = [r.get("probe") for r in rows if r.get("probe") not in ("fewshot", "compare")]
        if not found:
            raise FeatcacheError(f"{results}: no kNN or logistic-regression rows to plot against resolution")
        chosen = "logreg" if "logreg" in found else found[0]
        figures.append(
            (
                f"{metric} against resolution ({chosen})",
                _plot_res(rows, plot_resolution, by=line_by, metric=metric, label=label, probe=chosen),
            )
        )
        text += f"\nresolution plot: {figures[-1][1]}\n"
    forests = _forest_groups(per_label, metric)
    if plot_forest is not None:
        if not forests:
            raise FeatcacheError(f"{results}: no per-label {metric} rows for a forest plot")
        for (t, g, _), path in zip(forests, _paths(plot_forest, [t for t, _, _ in forests])):
            figures.append(
                (
                    f"forest plot: {t}",
                    _plot_forest(
                        g.runs, path, metric=metric, extra_cols=("k",) if "k" in g.col_fields else ()
                    ),
                )
            )
            text += f"\nforest plot: {path}\n"
    if plot_compare is not None:
        figures.append(("paired differences", _plot_compare(rows, plot_compare)))
        text += f"\ncompare plot: {figures[-1][1]}\n"
    if plot_k is not None:
        figures.append((f"kNN: {metric} against k", _plot_k(rows, plot_k, by=by, metric=metric, label=label)))
        text += f"\nk plot: {figures[-1][1]}\n"
    if plot_reliability is not None:
        from probes.report.reliability import plot_reliability as _plot_rel
        from probes.report.reliability import reliability_groups

        groups = reliability_groups(rows)
        if not groups:
            raise FeatcacheError(f"{results}: no ece rows with reliability bins (kNN or logreg runs) to draw")
        for (caption, g), path in zip(groups, _paths(plot_reliability, [c for c, _ in groups])):
            figures.append((f"reliability: {caption}", _plot_rel(g, path, title=f"reliability: {caption}")))
            text += f"\nreliability diagram: {path}\n"
    if html is not None:
        from probes.report.html import write_html

        with tempfile.TemporaryDirectory() as tmp:
            figures += _auto_figures(rows, per_label, figures, Path(tmp), by, metric, label, said)
            sections = [
                ("Summary tables", [(t, fmt_table(g, "summary")) for t, g, _ in summaries]),
                ("Per-label tables", [(t, fmt_table(g, "per-label")) for t, g, _ in per_label]),
            ]
            path = write_html(
                html,
                title=f"featcache report: {Path(results).name}",
                sections=sections,
                figures=figures,
                rows=rows,
                notes=said,
                source=str(results),
            )
        text += f"\nhtml report: {path}\n"
    if notes is not None:
        notes.extend(said)
    elif said:
        text += "".join(f"\nnote: {n}\n" for n in said)
    return text


def _forest_groups(per_label, metric):
    """Per-label groups a forest plot is drawn for: not comparisons; few-shot (one per K) only when
    nothing else is there."""
    out = [p for p in per_label if p[2]["metric"] == metric and p[2]["probe"] != "compare"]
    return [p for p in out if p[2]["probe"] != "fewshot"] or out


def _auto_figures(
    rows, per_label, made, tmp: Path, by, metric, label, said: list[str]
) -> list[tuple[str, Path]]:
    """The figures an HTML report shows when not asked for one by one; a figure that cannot be drawn
    (e.g. matplotlib missing) is left out and said once."""
    from probes.report.plots import plot_compare, plot_fewshot, plot_forest, plot_k
    from probes.report.roc import plot_roc

    made_kinds = {c.split(":")[0].split(" ")[0] for c, _ in made}
    todo = []
    if "forest" not in made_kinds:
        for t, g, _ in _forest_groups(per_label, metric):
            todo.append(
                (
                    f"forest plot: {t}",
                    lambda path, g=g: plot_forest(
                        g.runs, path, metric=metric, extra_cols=("k",) if "k" in g.col_fields else ()
                    ),
                )
            )
    if "paired" not in made_kinds and any(r.get("metric") == "auroc_diff" for r in rows):
        todo.append(("paired AUROC differences (compare)", lambda path: plot_compare(rows, path)))
    few = [r for r in rows if r.get("probe") == "fewshot"]
    if "few-shot" not in made_kinds and few:
        for key in dict.fromkeys((r.get("dataset"), r.get("features"), r.get("head")) for r in few):
            where = dict(zip(("dataset", "features", "head"), key))
            todo.append(
                (
                    f"few-shot curves: {', '.join(f'{f}={v}' for f, v in where.items())}",
                    lambda path, w=where: plot_fewshot(few, path, by=by, metric=metric, label=label, where=w),
                )
            )
    knn = [r for r in rows if r.get("probe") == "knn" and r.get("k") is not None]
    if "kNN" not in made_kinds and len({r["k"] for r in knn}) > 1:
        for key in dict.fromkeys((r.get("dataset"), r.get("features")) for r in knn):
            where = dict(zip(("dataset", "features"), key))
            todo.append(
                (
                    f"kNN: {metric} against k, {', '.join(f'{f}={v}' for f, v in where.items())}",
                    lambda path, w=where: plot_k(knn, path, by=by, metric=metric, label=label, where=w),
                )
            )
    with_roc = [
        r for r in rows if r.get("metric") == "auroc" and isinstance((r.get("params") or {}).get("roc"), dict)
    ]
    if "reliability" not in made_kinds:
        from probes.report.reliability import plot_reliability, reliability_groups

        for caption, g in reliability_groups(rows):
            todo.append(
                (
                    f"reliability: {caption}",
                    lambda path, g=g, c=caption: plot_reliability(g, path, title=f"reliability: {c}"),
                )
            )
    if "ROC" not in made_kinds:
        for key in dict.fromkeys((r.get("dataset"), r.get("probe"), r.get("features")) for r in with_roc):
            where = dict(zip(("dataset", "probe", "features"), key))
            todo.append(
                (
                    f"ROC curves (test rows): {', '.join(f'{f}={v}' for f, v in where.items())}",
                    lambda path, w=where: plot_roc(
                        [r for r in with_roc if r.get("features") == w["features"]],
                        path,
                        dataset=w["dataset"],
                        probe=w["probe"],
                        title=f"ROC: {w['dataset']}, {w['probe']}, {w['features']}",
                    ),
                )
            )
    out = []
    for i, (caption, draw) in enumerate(todo):
        try:
            out.append((caption, draw(tmp / f"figure{i}.png")))
        except FeatcacheError as e:
            said.append(f"figure left out of the HTML report ({caption}): {e}")
    return out
