"""Paper tables from long-format result rows (see :mod:`probes.results`).

How rows become one number (a table cell or a plotted point):

1. Rows are selected by ``metric``, ``label`` (``"mean"`` is the mean over labels), optionally
   ``probe`` and ``where`` (``{field: value}`` or ``{field: [values]}``).
2. Re-runs are dropped: rows with the same :func:`probes.results.result_key` are one result, and
   the newest row wins (:func:`probes.results.drop_duplicates`).
3. A cell must hold one setting (the same result key up to ``seed``) over one or more seeds. Rows
   that differ in a key field, e.g. ``k`` of kNN or ``features``, are refused with a message
   naming the field: put it in ``by``/``columns`` or filter it with ``where``. A ``C`` selected on
   validation is an outcome, not a setting: it may differ between seeds.
4. Several distinct seeds: ``mean ± std`` (sample standard deviation, ddof=1) of the defined
   values; a single run carrying a bootstrap CI: ``0.812 [0.790, 0.834]``; otherwise the value
   alone; ``n/a`` when the metric was undefined in every run, ``-`` when there is no row at all.

A :class:`Grid` holds the numbers (lines x columns of summaries); :func:`grid_table` formats it as
``list[list[str]]`` with a header row, rendered by :func:`to_markdown` / :func:`to_csv`;
:func:`grid_records` turns it into one numeric record per cell (CSV, JSON lines, Parquet).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError
from probes.results import RESULT_KEY_FIELDS, drop_duplicates, result_key

__all__ = [
    "SETTING_FIELDS",
    "Grid",
    "fewshot_table",
    "grid",
    "grid_records",
    "grid_table",
    "per_label_grid",
    "per_label_rows",
    "per_label_table",
    "records_csv",
    "table",
    "to_csv",
    "to_markdown",
]

# the fields (besides params and provenance) that make two rows different settings
SETTING_FIELDS = tuple(f for f in RESULT_KEY_FIELDS if f not in ("store_set", "manifest_digest", "seed"))

_NO_SEED = RESULT_KEY_FIELDS.index("seed")


def _matches(row: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    for name, want in where.items():
        have = row.get(name)
        if isinstance(want, (list, tuple, set, frozenset)):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


def select(
    rows: Iterable[Mapping[str, Any]],
    metric: str,
    label: str | None,
    probe: str | None = None,
    where: Mapping[str, Any] | None = None,
) -> list[dict]:
    """Rows of one metric (and label; ``None``: every label), optionally one probe, filtered.

    Raises:
        FeatcacheError: nothing matches (the message names the filter).
    """
    out = [
        dict(r)
        for r in rows
        if r.get("metric") == metric
        and (label is None or r.get("label") == label)
        and (probe is None or r.get("probe") == probe)
        and _matches(r, where or {})
    ]
    if not out:
        what = f"metric={metric!r}" + (f", label={label!r}" if label is not None else "")
        what += (f", probe={probe!r}" if probe else "") + (f", where={dict(where)!r}" if where else "")
        raise FeatcacheError(
            f"no result rows with {what}: check the names (probes report lists what is there)"
        )
    return out


def _key(row: Mapping[str, Any], name: str) -> str:
    return json.dumps(row.get(name), sort_keys=True)


def _setting(row: Mapping[str, Any]) -> tuple[str, ...]:
    key = result_key(row)
    return key[:_NO_SEED] + key[_NO_SEED + 1 :]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _distinct(values: Iterable[str]) -> list[str]:
    vals = {v: json.loads(v) for v in values}
    return sorted(vals, key=lambda k: (0, vals[k], "") if _is_number(vals[k]) else (1, 0, k))


def check_one_setting(runs: Sequence[Mapping[str, Any]], where: str) -> None:
    """Refuse to average rows that are different settings (not just different seeds).

    Raises:
        FeatcacheError: naming the differing key fields and their values.
    """
    settings = [_setting(r) for r in runs]
    if len(set(settings)) <= 1:
        return
    names = [f for f in RESULT_KEY_FIELDS if f != "seed"]
    differ = [i for i, _ in enumerate(names) if len({s[i] for s in settings}) > 1]
    detail = "; ".join(f"{names[i]}: {', '.join(_distinct({s[i] for s in settings}))}" for i in differ)
    first = names[differ[0]]
    raise FeatcacheError(
        f"{where} mixes rows that differ in {detail}: add {first!r} to by/columns "
        f"or filter with where={{{first!r}: ...}}"
    )


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """One number of a cell or point.

    Args:
        runs: rows of one setting, one per distinct seed.

    Returns:
        ``{"mean", "std", "low", "high", "n"}`` (floats; ``std`` NaN for one value; ``low``/``high``
        a single run's CI, else NaN; ``n`` the number of defined values), or ``None`` when no run
        has a defined value.
    """
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


def format_cell(summary: Mapping[str, float] | None, digits: int = 3) -> str:
    """``0.820 ± 0.020`` (seeds), ``0.812 [0.790, 0.834]`` (one run with a CI), ``0.812``, ``n/a``."""
    if summary is None:
        return "n/a"
    mean = f"{summary['mean']:.{digits}f}"
    if summary["n"] > 1:
        return f"{mean} ± {summary['std']:.{digits}f}"
    if not math.isnan(summary["low"]):
        return f"{mean} [{summary['low']:.{digits}f}, {summary['high']:.{digits}f}]"
    return mean


def sorted_keys(keys: Iterable[tuple]) -> list[tuple]:
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


def show(v: Any) -> str:
    """A field value as table text (``-`` for absent, dicts as sorted JSON)."""
    if v is None:
        return "-"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


@dataclass
class Grid:
    """Numbers of one table: ``cells[(line, col)]`` is a :func:`summarize` dict or ``None`` (n/a).

    ``lines``/``cols`` are tuples of field values (one per ``line_fields``/``col_fields``) in
    display order; a (line, col) pair without rows is absent from ``cells``.
    """

    line_fields: tuple[str, ...]
    col_fields: tuple[str, ...]
    lines: list[tuple]
    cols: list[tuple]
    cells: dict[tuple, dict[str, float] | None] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)


def grid(
    rows: Iterable[Mapping[str, Any]],
    line_fields: Sequence[str],
    col_fields: Sequence[str],
    *,
    line_order: Sequence[tuple] | None = None,
) -> Grid:
    """Group selected rows into cells (one setting over distinct seeds each) and summarize them.

    Args:
        rows: rows of one metric (see :func:`select`); duplicates are dropped here.
        line_fields: fields naming a line, e.g. ``("model", "res")`` or ``("label",)``.
        col_fields: fields naming a column, e.g. ``("dataset",)`` or ``("dataset", "k")``.
        line_order: lines in this order (default: :func:`sorted_keys`).

    Raises:
        FeatcacheError: a cell mixing different settings.
    """
    line_fields, col_fields = tuple(line_fields), tuple(col_fields)
    runs, _ = drop_duplicates(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        line = tuple(r.get(f) for f in line_fields)
        col = tuple(r.get(f) for f in col_fields)
        groups.setdefault((line, col), []).append(r)
    lines = list(line_order) if line_order is not None else sorted_keys(k[0] for k in groups)
    cols = sorted_keys(k[1] for k in groups)
    out = Grid(line_fields, col_fields, lines, cols, runs=runs)
    for (line, col), cell in groups.items():
        where = ", ".join(f"{f}={x}" for f, x in zip((*line_fields, *col_fields), (*line, *col)))
        check_one_setting(cell, f"cell ({where})")
        out.cells[(line, col)] = summarize(cell)
    return out


def _col_name(g: Grid, col: tuple, numeric_first: bool) -> str:
    parts = []
    for i, (f, v) in enumerate(zip(g.col_fields, col)):
        if v is None and i > 0:
            continue  # e.g. no k for this column group
        parts.append(f"{f}={v}" if (i > 0 or numeric_first) else show(v))
    return " ".join(parts)


def grid_table(g: Grid, digits: int = 3, line_header: Sequence[str] | None = None) -> list[list[str]]:
    """Format a grid: a header (line field names, then one name per column), then one line each.

    A column is named by its first field's value (``res=512`` for numbers), then ``field=value``
    for the others (``nih k=20``).
    """
    numeric_first = all(_is_number(c[0]) for c in g.cols) if g.cols else False
    out = [[*(line_header or g.line_fields), *(_col_name(g, c, numeric_first) for c in g.cols)]]
    for line in g.lines:
        texts = [format_cell(g.cells[(line, c)], digits) if (line, c) in g.cells else "-" for c in g.cols]
        out.append([*(show(x) for x in line), *texts])
    return out


def grid_records(g: Grid, context: Mapping[str, Any] | None = None) -> list[dict]:
    """One numeric record per cell: context, line and column fields, then the numbers.

    Returns:
        dicts with the ``context`` items, each line and column field, then ``value`` (mean over
        seeds, or the single value; ``None`` when undefined), ``sd`` (``None`` for one seed),
        ``ci_low``/``ci_high`` (a single run's CI, else ``None``) and ``n_seeds``.
    """
    out = []

    def num(x):
        return None if x is None or math.isnan(x) else float(x)

    for line in g.lines:
        for col in g.cols:
            if (line, col) not in g.cells:
                continue
            s = g.cells[(line, col)]
            rec = {**(context or {}), **dict(zip(g.line_fields, line)), **dict(zip(g.col_fields, col))}
            rec.update(
                value=None if s is None else s["mean"],
                sd=None if s is None else num(s["std"]),
                ci_low=None if s is None else num(s["low"]),
                ci_high=None if s is None else num(s["high"]),
                n_seeds=0 if s is None else int(s["n"]),
            )
            out.append(rec)
    return out


def table(
    rows: Iterable[Mapping[str, Any]],
    by: str | Sequence[str] = ("model", "res"),
    columns: str | Sequence[str] = "dataset",
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
        columns: field(s) whose values become the columns, e.g. ``"dataset"``, ``"res"``,
            ``("dataset", "k")`` (one column group per dataset, one column per k).
        metric: metric to show, e.g. ``"auroc"``.
        label: label to show; ``"mean"`` is the mean over labels.
        probe: keep only this probe (``None``: any).
        where: further filter, ``{field: value}`` or ``{field: [values]}``.
        digits: decimals shown.

    Returns:
        Rows of strings: a header (``by`` names, then one name per column, ``res=512`` for numeric
        values), then one line per ``by`` value. Cells as described in the module docstring.

    Raises:
        FeatcacheError: no matching rows, or a cell mixing different settings.
    """
    by = (by,) if isinstance(by, str) else tuple(by)
    columns = (columns,) if isinstance(columns, str) else tuple(columns)
    return grid_table(grid(select(rows, metric, label, probe, where), by, columns), digits)


def fewshot_table(
    rows: Iterable[Mapping[str, Any]],
    by: str | Sequence[str] = ("model",),
    metric: str = "auroc",
    label: str = "mean",
    probe: str | None = None,
    where: Mapping[str, Any] | None = None,
    digits: int = 3,
) -> list[list[str]]:
    """Few-shot table: backbones as lines, shots as columns (``shots=1`` ...), ``mean ± std`` over seeds."""
    shot_rows = [r for r in rows if r.get("shots") is not None]
    return table(
        shot_rows, by=by, columns="shots", metric=metric, label=label, probe=probe, where=where, digits=digits
    )


def backbone_fields(
    rows: Sequence[Mapping[str, Any]], backbone: Sequence[str] = ("model", "res")
) -> tuple[str, ...]:
    """The backbone fields that vary: ``res`` only when the rows hold several resolutions."""
    out = tuple(f for f in backbone if f != "res" or len({r.get("res") for r in rows}) > 1)
    return out or tuple(backbone[:1])


def label_order(rows: Sequence[Mapping[str, Any]]) -> list[tuple]:
    """Labels in order of first appearance, ``mean`` last (as 1-tuples, the lines of a grid)."""
    labels = list(dict.fromkeys(r.get("label") for r in rows))
    return [(x,) for x in labels if x != "mean"] + ([("mean",)] if "mean" in labels else [])


def per_label_grid(
    rows: Iterable[Mapping[str, Any]],
    metric: str = "auroc",
    backbone: Sequence[str] = ("model", "res"),
    probe: str | None = None,
    where: Mapping[str, Any] | None = None,
    extra_cols: Sequence[str] = (),
) -> Grid:
    """Labels x backbones: lines are labels (``mean`` last), columns backbones (``model[/res]``).

    Args:
        rows: result rows; every label of ``metric`` is used.
        metric: metric in the cells.
        backbone: fields naming a backbone; ``res`` is dropped when there is one resolution.
        probe: keep only this probe.
        where: further filter.
        extra_cols: more column fields, e.g. ``("k",)`` for one column per backbone and k.
    """
    sel = select(rows, metric, None, probe, where)
    cols = (*backbone_fields(sel, backbone), *extra_cols)
    return grid(sel, ("label",), cols, line_order=label_order(sel))


def per_label_table(
    rows: Iterable[Mapping[str, Any]],
    metric: str = "auroc",
    backbone: Sequence[str] = ("model", "res"),
    probe: str | None = None,
    where: Mapping[str, Any] | None = None,
    digits: int = 3,
) -> list[list[str]]:
    """The per-label table of a CXR paper: one line per label (the mean last), one column per backbone.

    Columns are named ``model`` or ``model/res`` (when several resolutions are present); cells as
    in :func:`table` (``0.812 [0.790, 0.834]`` for a single run with a CI).

    Raises:
        FeatcacheError: no matching rows, or a cell mixing different settings (e.g. two k: filter).
    """
    return per_label_rows(per_label_grid(rows, metric, backbone, probe, where), digits)


def per_label_rows(g: Grid, digits: int = 3) -> list[list[str]]:
    """Format a per-label grid: columns named ``model``, ``model/res``, ``model/res k=20``."""
    tab = grid_table(g, digits)

    def name(col: tuple) -> str:
        fields = dict(zip(g.col_fields, col))
        k = fields.pop("k", None)
        return "/".join(show(v) for v in fields.values()) + (f" k={k}" if k is not None else "")

    tab[0][len(g.line_fields) :] = [name(c) for c in g.cols]
    return tab


def to_markdown(tab: Sequence[Sequence[str]]) -> str:
    """Render a table (header first) as a GitHub-flavoured Markdown table, ending with a newline."""
    if not tab:
        return ""

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return (
        "\n".join([line(tab[0]), "|" + "|".join("---" for _ in tab[0]) + "|", *(line(r) for r in tab[1:])])
        + "\n"
    )


def to_csv(tab: Sequence[Sequence[str]]) -> str:
    """Render a table (header first) as CSV text (RFC 4180 quoting, ``\\n`` line ends)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(tab)
    return buf.getvalue()


def records_csv(records: Sequence[Mapping[str, Any]]) -> str:
    """Numeric records (:func:`grid_records`) as one CSV: the union of their fields as header.

    Empty cells stand for absent or undefined values; numbers are written in full precision.
    """
    fields = list(dict.fromkeys(k for r in records for k in r))
    tail = [f for f in ("value", "sd", "ci_low", "ci_high", "n_seeds") if f in fields]
    fields = [f for f in fields if f not in tail] + tail
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    for r in records:
        w.writerow(
            ["" if r.get(f) is None else (show(r[f]) if isinstance(r[f], dict) else r[f]) for f in fields]
        )
    return buf.getvalue()
