"""Check a manifest before spending GPU time on it, and show what is in each split.

Errors (a ``ManifestError`` or ``ImageReadError``, one line naming the rows or
the file): a patient in two splits (leakage), duplicate ids, label values other
than 1/0/-1/blank, image or mask files missing under the root or reached through
a symbolic link that leads outside it, the same image file in two splits, and
(when files are checked) two files with identical bytes in two splits
(``featcache.datasets.dedup``) and files that are empty or whose header declares more
pixels than the decode limit (``featcache.decode.dicom.max_pixels``). These are the
manifest reader's own checks plus the extraction's pre-flight checks, so a
manifest that passes here is one ``featcache extract`` accepts.

Warnings: labels (or classes) with no positives in a split, labels that are
blank everywhere, rows with no split, the same image file listed twice, files
with identical bytes within one split.

The report is a table: per split (and ``all``), images, patients and the
positive images per label (multi-label) or the images per class (multi-class).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.datasets.dedup import refuse_cross_split_duplicates
from featcache.errors import ManifestError
from featcache.store.manifest import Manifest, read_manifest

_SHOWN = 5


@dataclass
class CheckReport:
    """The outcome of ``check_manifest``.

    Attributes:
        source: the manifest checked.
        task: ``multilabel``, ``multiclass`` or ``none``.
        columns: table columns: split names present (``(none)`` for rows without a split), then ``all``.
        rows: table rows, (name, counts [len(columns)]): ``images``, ``patients``, then one per label
            (positive images) or per class (images).
        warnings: one line each.
    """

    source: str
    task: str
    columns: list[str]
    rows: list[tuple[str, list[int]]]
    warnings: list[str] = field(default_factory=list)

    def count(self, row: str, column: str) -> int:
        """One cell of the table, e.g. ``count("effusion", "test")``."""
        for name, values in self.rows:
            if name == row:
                return values[self.columns.index(column)]
        raise KeyError(row)

    def render(self) -> str:
        """The table as aligned text, one line per row."""
        width = max(len(r[0]) for r in self.rows)
        cells = [max(len(c), *(len(str(v[i])) for _, v in self.rows)) for i, c in enumerate(self.columns)]
        head = " " * width + "".join(f"  {c:>{w}}" for c, w in zip(self.columns, cells))
        body = [
            f"{name:<{width}}" + "".join(f"  {v:>{w}}" for v, w in zip(vals, cells))
            for name, vals in self.rows
        ]
        return "\n".join([head, *body])


def _duplicate_paths(m: Manifest) -> tuple[list[str], list[str]]:
    """(paths listed in two splits, paths listed twice in one split)."""
    where: dict[str, set[str]] = defaultdict(set)
    count: dict[str, int] = defaultdict(int)
    for p, s in zip(m.paths.tolist(), m.splits.tolist()):
        where[p].add(s)
        count[p] += 1
    across = [p for p, s in where.items() if len(s - {""}) > 1]
    within = [p for p, c in count.items() if c > 1 and p not in across]
    return across, within


def _check_headers(m: Manifest) -> None:
    """Refuse empty files and files whose header declares more pixels than the decode limit."""
    from featcache.decode.images import check_header

    for i in range(len(m)):
        check_header(m.abspath(i))
        if m.masks is not None and m.masks[i]:
            check_header(m.root / m.masks[i])


def check_manifest(
    csv_path: str | Path,
    root: str | Path | None = None,
    *,
    check_files: bool = True,
    hash_cache: str | Path | None = None,
    labels: list[str] | tuple[str, ...] | None = None,
) -> CheckReport:
    """Validate a manifest and count images, patients and positives per split.

    Args:
        csv_path: the manifest CSV.
        root: folder the paths are relative to (default: the CSV's folder).
        check_files: check that every image and mask file exists, is not empty, declares a size
            within the decode limit, and that no two files of different splits have identical bytes.
        hash_cache: digest cache file for the duplicate check (see ``featcache.datasets.dedup.hash_files``).
        labels: the label columns (None: inferred; other columns kept as metadata, with a warning).

    Returns:
        A ``CheckReport`` (table and warnings).

    Raises:
        ManifestError: leakage, duplicate ids, bad label values, missing files, one image in two splits.
        ImageReadError: an empty file or one that declares too many pixels.
    """
    m = read_manifest(csv_path, root, check_files=check_files, labels=labels)
    across, within = _duplicate_paths(m)
    if across:
        shown = ", ".join(across[:_SHOWN]) + (
            f" and {len(across) - _SHOWN} more" if len(across) > _SHOWN else ""
        )
        raise ManifestError(
            f"{m.source}: the same image file is listed in more than one split (leakage): {shown}; "
            "keep one row per image"
        )
    warnings = list(m.notes)
    if within:
        shown = ", ".join(within[:_SHOWN]) + (
            f" and {len(within) - _SHOWN} more" if len(within) > _SHOWN else ""
        )
        warnings.append(f"{len(within)} image files are listed more than once: {shown}")
    if check_files:
        _check_headers(m)
        warnings.extend(refuse_cross_split_duplicates(m, cache=hash_cache).warnings)

    present = [s for s in ("train", "val", "test") if np.any(m.splits == s)]
    columns = present + (["(none)"] if np.any(m.splits == "") else []) + ["all"]
    selections = [m.splits == s for s in present]
    if "(none)" in columns:
        selections.append(m.splits == "")
        warnings.append(
            f"{int(np.sum(m.splits == ''))} rows have no split; run `featcache split` to assign them"
        )
    selections.append(np.ones(len(m), dtype=bool))

    rows: list[tuple[str, list[int]]] = [
        ("images", [int(sel.sum()) for sel in selections]),
        ("patients", [len(np.unique(m.patient_ids[sel])) for sel in selections]),
    ]
    if m.task == "multilabel":
        for j, name in enumerate(m.label_names):
            col = m.labels[:, j]
            rows.append((name, [int(np.sum(col[sel] == 1)) for sel in selections]))
            if np.all(np.isnan(col)):
                warnings.append(f"label '{name}' is blank in every row")
                continue
            empty = [s for s, sel in zip(present, selections) if not np.any(col[sel] == 1)]
            if empty:
                warnings.append(f"label '{name}' has no positives in {', '.join(empty)}")
    elif m.task == "multiclass":
        for c in sorted(set(m.classes.tolist()) - {""}):
            rows.append((c, [int(np.sum(m.classes[sel] == c)) for sel in selections]))
            empty = [s for s, sel in zip(present, selections) if not np.any(m.classes[sel] == c)]
            if empty:
                warnings.append(f"class '{c}' has no images in {', '.join(empty)}")
        blank = int(np.sum(m.classes == ""))
        if blank:
            warnings.append(f"{blank} rows have no class in the 'label' column")
    return CheckReport(source=m.source, task=m.task, columns=columns, rows=rows, warnings=warnings)
