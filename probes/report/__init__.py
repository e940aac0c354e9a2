"""Paper tables and plots from long-format result rows (see :mod:`probes.results`).

This module gathers the report API in one place: tables in :mod:`probes.report.tables`, plots in
:mod:`probes.report.plots`, the self-contained HTML report in :mod:`probes.report.html`. How rows become one
number (re-runs dropped, seeds averaged, CIs shown) is described in :mod:`probes.report.tables`.
"""

from __future__ import annotations

from probes.report.html import render_html, write_html
from probes.report.plots import (
    _series,
    labels_in_mean,
    plot_compare,
    plot_fewshot,
    plot_forest,
    plot_k,
    plot_resolution,
    thin_ticks,
)
from probes.report.tables import (
    SETTING_FIELDS,
    Grid,
    fewshot_table,
    grid,
    grid_records,
    grid_table,
    per_label_grid,
    per_label_rows,
    per_label_table,
    records_csv,
    table,
    to_csv,
    to_markdown,
)

__all__ = [
    "SETTING_FIELDS",
    "Grid",
    "_series",
    "fewshot_table",
    "grid",
    "grid_records",
    "grid_table",
    "labels_in_mean",
    "per_label_grid",
    "per_label_rows",
    "per_label_table",
    "plot_compare",
    "plot_fewshot",
    "plot_forest",
    "plot_k",
    "plot_resolution",
    "records_csv",
    "render_html",
    "table",
    "thin_ticks",
    "to_csv",
    "to_markdown",
    "write_html",
]
