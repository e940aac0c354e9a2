"""One self-contained HTML report: tables, figures (base64 PNG data URIs), provenance, label sets.

The file has inline CSS, no scripts and no external resources, so it opens offline and can be
mailed or attached to a paper's supplement as it is.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from featcache import __version__
from probes.report.tables import show

__all__ = ["label_set_table", "provenance_table", "render_html", "write_html"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #1b1b1b; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #bbb; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .9em; }
th, td { border: 1px solid #c8c8c8; padding: .25em .6em; text-align: right; white-space: nowrap; }
th { background: #eef1f5; }
td:first-child, th:first-child { text-align: left; }
tr.mean td { font-weight: bold; border-top: 2px solid #777; }
td.wrap { white-space: normal; text-align: left; max-width: 40em; font-family: monospace; font-size: .85em; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #444; }
ul.notes li { margin: .2em 0; }
div.scroll { overflow-x: auto; }
.meta { color: #555; font-size: .9em; }
"""


def _table_html(tab: Sequence[Sequence[str]], wrap_from: int | None = None) -> str:
    if not tab:
        return ""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in tab[0])
    body = []
    for row in tab[1:]:
        cls = ' class="mean"' if row and str(row[0]) == "mean" else ""
        cells = "".join(
            f'<td class="wrap">{html.escape(str(c))}</td>'
            if wrap_from is not None and i >= wrap_from
            else f"<td>{html.escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _img(path: str | os.PathLike, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _set_name(r: Mapping[str, Any]) -> str:
    return r.get("store_set") or f"{show(r.get('dataset'))}/{show(r.get('model'))}/{show(r.get('res'))}"


def provenance_table(rows: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    """One line per feature set: what its rows say about where the numbers came from.

    Columns: set, dataset, model, res, weights, preprocessing, manifest digest, featcache version(s)
    (of the rows, and of the extraction when recorded), probes run, rows. A field that differs
    between a set's rows lists every value (``a | b``), which is itself worth a look.
    """
    sets: dict[str, dict[str, dict]] = {}
    fields = ("dataset", "model", "res", "weights", "preprocessing", "manifest_digest", "featcache_version")
    counts: dict[str, int] = {}
    for r in rows:
        name = _set_name(r)
        counts[name] = counts.get(name, 0) + 1
        info = sets.setdefault(name, {f: {} for f in (*fields, "extracted_with", "probe")})
        for f in fields:
            if r.get(f) is not None:
                info[f][show(r.get(f))] = None
        if (r.get("params") or {}).get("extracted_with") is not None:
            info["extracted_with"][show(r["params"]["extracted_with"])] = None
        info["probe"][show(r.get("probe"))] = None
    out = [
        [
            "set",
            "dataset",
            "model",
            "res",
            "weights",
            "preprocessing",
            "manifest digest",
            "featcache (rows / extraction)",
            "probes",
            "rows",
        ]
    ]
    for name, info in sets.items():
        version = " | ".join(info["featcache_version"]) or "-"
        if info["extracted_with"]:
            version += " / " + " | ".join(info["extracted_with"])
        out.append(
            [
                name,
                *(
                    " | ".join(info[f]) or "-"
                    for f in ("dataset", "model", "res", "weights", "preprocessing", "manifest_digest")
                ),
                version,
                ", ".join(info["probe"]),
                str(counts[name]),
            ]
        )
    return out


def label_set_table(rows: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    """The labels behind every ``mean``: one line per (set, probe, metric, label set).

    Columns: set, probe, metric, settings (k / head / shots / vs values seen), labels in the mean,
    rows. Means whose rows do not record ``params.labels_in_mean`` say so.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r.get("label") != "mean":
            continue
        labs = (r.get("params") or {}).get("labels_in_mean")
        labs_text = ", ".join(labs) if labs is not None else "(not recorded)"
        g = groups.setdefault(
            (_set_name(r), show(r.get("probe")), show(r.get("metric")), labs_text), {"n": 0, "settings": {}}
        )
        g["n"] += 1
        for f in ("k", "head", "shots", "vs"):
            if r.get(f) is not None:
                g["settings"].setdefault(f, {})[show(r[f])] = None
    out = [["set", "probe", "metric", "settings", "labels in the mean", "rows"]]
    for (name, probe, metric, labs), g in groups.items():
        settings = "; ".join(f"{f}={','.join(v)}" for f, v in g["settings"].items()) or "-"
        out.append([name, probe, metric, settings, labs, str(g["n"])])
    return out


def render_html(
    *,
    title: str,
    sections: Sequence[tuple[str, Sequence[tuple[str, Sequence[Sequence[str]]]]]],
    figures: Sequence[tuple[str, str | os.PathLike]],
    rows: Sequence[Mapping[str, Any]],
    notes: Sequence[str] = (),
    source: str | None = None,
) -> str:
    """The HTML text of a report.

    Args:
        title: page title and first heading.
        sections: ``(heading, [(table title, table rows of strings, header first), ...])``.
        figures: ``(caption, PNG path)``; each is embedded as a ``data:image/png;base64`` URI.
        rows: the result rows reported (after de-duplication): provenance and label sets are
            taken from them.
        notes: lines said once about the report (dropped duplicates, filters ...).
        source: the results file, named in the header.

    Returns:
        A complete HTML5 document without external resources.
    """
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(source or "")} · {len(rows)} result rows · made {stamp} by featcache {__version__}</p>',
    ]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    for heading, tables in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for sub, tab in tables:
            parts.append(f"<h3>{html.escape(sub)}</h3>{_table_html(tab)}")
    if figures:
        parts.append("<h2>Figures</h2>")
        for caption, path in figures:
            parts.append(
                f"<figure>{_img(path, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    parts.append("<h2>Labels behind each mean</h2>")
    parts.append(_table_html(label_set_table(rows), wrap_from=4))
    parts.append("<h2>Provenance of every feature set</h2>")
    parts.append(_table_html(provenance_table(rows), wrap_from=4))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write :func:`render_html` (same keyword arguments) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(**kwargs), encoding="utf-8")
    return path
