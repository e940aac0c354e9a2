"""The manifest: the CSV that says which images to embed, whose they are and what they show.

Format (see docs/ARCHITECTURE.md): a header row, one row per image.

* ``path`` (required): image file relative to the root (default: the manifest's folder).
* ``id``: unique row id (default: ``path``).
* ``patient_id``: patient id (default: ``id``); all rows of a patient share one split.
* ``split``: ``train``, ``val``, ``test`` or blank.
* ``label``: a class-name column (multi-class task).
* ``mask``: segmentation mask path relative to the root (blank: none).
* ``meta_*``: free-text metadata kept as strings.
* every other column: a binary label (``1``, ``0``, ``-1`` uncertain, blank missing) or metadata.

Which other columns are labels: declared ones (``labels=["Effusion", ...]`` of
:func:`read_manifest`; ``--labels`` on the command line) are labels and every value must be 1, 0,
-1 or blank; the undeclared ones are kept as metadata (``meta_<name>``). With no declaration, a
column is inferred to be a label only when every value is 1, 0, -1 or blank; the others are kept
as metadata, and ``Manifest.notes`` says once which columns were kept so (a 0/1 column such as
``went_to_icu`` is still inferred to be a label: declare the labels to keep it out).

Everything is validated before any model is loaded, and every problem found is
reported at once in one line that names the rows (CSV line numbers, header = line 1). The checks of
column names and path locations are in :mod:`featcache.store.manifest_checks`, the split of the
columns into labels and metadata in :mod:`featcache.store.manifest_labels`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.errors import ManifestError
from featcache.store.manifest_checks import (
    MAX_NAMED,
    bad_column_name,
    check_locations,
    resolves_inside,  # noqa: F401  (importable from here as before)
    rows_text,
)
from featcache.store.manifest_labels import (
    LABEL_VALUES,
    RESERVED,  # noqa: F401  (importable from here as before)
    label_columns,
)
from featcache.urls import UrlPath, is_url

SPLITS = ("train", "val", "test", "")


@dataclass
class Manifest:
    """A validated manifest.

    Attributes:
        source: the CSV file it was read from (or a description).
        root: folder the ``path`` and ``mask`` columns are relative to.
        paths: str [N], image paths relative to ``root``.
        ids: str [N], unique row ids.
        patient_ids: str [N].
        splits: str [N], one of ``train``/``val``/``test``/``""``.
        label_names: the binary label columns, in file order (multi-label task).
        labels: float32 [N, L], 1 / 0 / -1 raw, NaN where blank.
        classes: str [N] class names for a ``label`` column ('' = missing), else None.
        masks: str [N] mask paths relative to ``root`` ('' = none).
        meta: metadata columns keyed ``meta_<name>``, each str [N] (``meta_*`` columns, and the
            columns that are not labels, see the module docstring).
        label_source: ``declared`` (``labels=`` given) or ``inferred`` (from the values).
        notes: what was decided for the user while reading (e.g. columns kept as metadata), each
            one short line, to be printed once.
    """

    source: str
    root: Path
    paths: np.ndarray
    ids: np.ndarray
    patient_ids: np.ndarray
    splits: np.ndarray
    label_names: list[str] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    classes: np.ndarray | None = None
    masks: np.ndarray | None = None
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    label_source: str = "inferred"
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def task(self) -> str:
        """``multilabel``, ``multiclass`` or ``none``."""
        if self.classes is not None:
            return "multiclass"
        return "multilabel" if self.label_names else "none"

    def abspath(self, i: int) -> Path:
        """Absolute path of row ``i``'s image."""
        return self.root / self.paths[i]

    def rows_digest(self) -> str:
        """SHA-256 of what defines the images (ids and paths, in order): equal digests, same features."""
        return hashlib.sha256(json.dumps([self.ids.tolist(), self.paths.tolist()]).encode()).hexdigest()

    def columns_digest(self) -> str:
        """SHA-256 of every column, metadata included: equal digests, nothing for the store to update."""
        meta = {k: v.tolist() for k, v in sorted(self.meta.items())}
        return hashlib.sha256((self.digest() + json.dumps(meta, sort_keys=True)).encode()).hexdigest()

    def digest(self) -> str:
        """SHA-256 of the manifest's content (not its formatting): ids, paths, patients, splits, labels."""
        h = hashlib.sha256()
        labels = self.labels if self.labels.size else np.zeros((len(self.ids), 0), np.float32)
        payload = {
            "ids": self.ids.tolist(),
            "paths": self.paths.tolist(),
            "patient_ids": self.patient_ids.tolist(),
            "splits": self.splits.tolist(),
            "label_names": self.label_names,
            # a manifest without label columns has N empty label rows, however it was built
            "labels": [[None if np.isnan(v) else float(v) for v in row] for row in labels.tolist()],
            "classes": None if self.classes is None else self.classes.tolist(),
            "masks": None if self.masks is None else self.masks.tolist(),
        }
        h.update(json.dumps(payload, sort_keys=True).encode())
        return h.hexdigest()


def read_manifest(
    csv_path: str | Path,
    root: str | Path | None = None,
    *,
    check_files: bool = True,
    labels: Sequence[str] | str | None = None,
    storage_options: dict | None = None,
) -> Manifest:
    """Read and validate a manifest CSV.

    Args:
        csv_path: the CSV file.
        root: folder that ``path`` and ``mask`` are relative to (default: the CSV's folder), or an
            fsspec URL (``s3://bucket/images``): then images are read through fsspec, existence is
            checked from one listing of the root, and paths still may not be absolute or leave it.
        check_files: check that every image (and mask) file exists.
        storage_options: fsspec options of a URL root (credentials, endpoint); ignored otherwise.
        labels: the binary label columns (a list, or one comma-separated string); the other
            non-reserved columns are kept as metadata. None: inferred from the values (see the
            module docstring).

    Returns:
        The validated ``Manifest``.

    Raises:
        ManifestError: one line listing every problem found, with CSV line numbers.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ManifestError(f"{csv_path}: manifest not found; pass the CSV file with --data")
    if root is not None and is_url(root):
        root = UrlPath(str(root), storage_options)
    else:
        root = Path(root) if root is not None else csv_path.parent
    if not isinstance(root, UrlPath) and not root.is_dir():
        raise ManifestError(
            f"{root}: image root folder not found; pass the folder holding the images with --root"
        )
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            records = [r for r in reader if any(cell.strip() for cell in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(
            f"{csv_path}: not a readable CSV file ({' '.join(str(e).split())[:200]}); save it as UTF-8 CSV"
        ) from None
    return parse_manifest(
        header,
        records,
        root=root if isinstance(root, UrlPath) else root.resolve(),
        source=str(csv_path),
        check_files=check_files,
        labels=labels,
    )


def parse_manifest(
    header: list[str] | None,
    records: list[list[str]],
    *,
    root: Path,
    source: str = "<manifest>",
    check_files: bool = True,
    labels: Sequence[str] | str | None = None,
) -> Manifest:
    """Validate already-split CSV rows (see ``read_manifest``; ``labels`` declares the label columns)."""
    if not header:
        raise ManifestError(
            f"{source}: empty file; a manifest needs a header row with at least a 'path' column"
        )
    header = [h.strip() for h in header]
    dup_cols = sorted({h for h in header if header.count(h) > 1})
    if dup_cols:
        raise ManifestError(f"{source}: duplicate column names {dup_cols}; rename them")
    bad_names = [(h, why) for h in header if (why := bad_column_name(h)) is not None]
    if bad_names:
        text = "; ".join(f"{h!r} {why}" for h, why in bad_names[:MAX_NAMED])
        raise ManifestError(
            f"{source}: bad column names: {text}; give every column a plain name (letters, digits, '_', "
            "'-', spaces; a trailing comma in the header makes an empty one)"
        )
    if "path" not in header:
        raise ManifestError(
            f"{source}: no 'path' column (columns: {header}); name the image path column 'path'"
        )
    if not records:
        raise ManifestError(f"{source}: no data rows")
    problems: list[str] = []
    bad_width = [i + 2 for i, r in enumerate(records) if len(r) != len(header)]
    if bad_width:
        raise ManifestError(
            f"{source}: rows {rows_text(bad_width)} have a different number of fields than the header ({len(header)})"
        )
    cols = {h: [r[j].strip() for r in records] for j, h in enumerate(header)}
    n = len(records)
    line = np.arange(2, n + 2)

    paths = cols["path"]
    ids = cols.get("id") or list(paths)
    ids = [i if i else p for i, p in zip(ids, paths)]
    patients = cols.get("patient_id") or list(ids)
    patients = [p if p else i for p, i in zip(patients, ids)]
    splits = cols.get("split") or [""] * n
    splits = [s.lower() for s in splits]

    empty = [int(line[i]) for i, p in enumerate(paths) if not p]
    if empty:
        problems.append(f"rows {rows_text(empty)} have an empty 'path'")

    seen: dict[str, list[int]] = defaultdict(list)
    for i, rid in enumerate(ids):
        seen[rid].append(int(line[i]))
    dups = {rid: rows for rid, rows in seen.items() if len(rows) > 1}
    if dups:
        first = list(dups.items())[:MAX_NAMED]
        text = "; ".join(f"'{rid}' at rows {rows_text(rows)}" for rid, rows in first)
        more = f" and {len(dups) - MAX_NAMED} more" if len(dups) > MAX_NAMED else ""
        fix = "make the 'id' values unique" if "id" in cols else "add an 'id' column with unique values"
        problems.append(f"duplicate ids: {text}{more} ({fix})")

    bad_split = [i for i, s in enumerate(splits) if s not in SPLITS]
    if bad_split:
        vals = sorted({splits[i] for i in bad_split})
        problems.append(
            f"rows {rows_text([int(line[i]) for i in bad_split])} have unknown split values {vals} "
            "(use train, val, test or blank)"
        )

    patient_splits: dict[str, set[str]] = defaultdict(set)
    patient_rows: dict[str, list[int]] = defaultdict(list)
    for i, (p, s) in enumerate(zip(patients, splits)):
        if s:
            patient_splits[p].add(s)
            patient_rows[p].append(int(line[i]))
    leaks = [p for p, s in patient_splits.items() if len(s) > 1]
    if leaks:
        text = "; ".join(
            f"'{p}' in {sorted(patient_splits[p])} at rows {rows_text(patient_rows[p])}"
            for p in leaks[:MAX_NAMED]
        )
        more = f" and {len(leaks) - MAX_NAMED} more patients" if len(leaks) > MAX_NAMED else ""
        problems.append(f"patients in more than one split (leakage): {text}{more}")

    masks = cols.get("mask")
    escaping = check_locations(problems, root, paths, line, "paths", check_files, "image")
    if masks is not None:
        escaping |= check_locations(problems, root, masks, line, "mask paths", check_files, "mask")

    label_names, meta_names, notes = label_columns(header, cols, labels, source)
    if label_names and "label" in header:
        problems.append(
            f"both a 'label' class column and binary label columns {label_names[:MAX_NAMED]}; keep one "
            "kind (declare the labels, or rename metadata columns to meta_<name>)"
        )
    labels_arr = np.full((n, len(label_names)), np.nan, dtype=np.float32)
    for j, name in enumerate(label_names):
        bad = []
        for i, v in enumerate(cols[name]):
            try:
                labels_arr[i, j] = LABEL_VALUES[v]
            except KeyError:
                bad.append(i)
        if bad:
            vals = sorted({cols[name][i] for i in bad})[:MAX_NAMED]
            problems.append(
                f"declared label column '{name}' has values {vals} at rows {rows_text([int(line[i]) for i in bad])}: "
                "label columns hold 1, 0, -1 or blank; fix the values or leave it out of the labels"
            )

    # results name the summary over labels "mean": a label or class called so would collide with it
    named_mean = [x for x in label_names if x.lower() == "mean"]
    if "label" in cols:
        named_mean += sorted({c for c in cols["label"] if c.lower() == "mean"})
    if named_mean:
        problems.append(
            f"a label or class is named {named_mean[0]!r}, which result rows use for the mean over labels; "
            "rename it (e.g. 'mean_finding')"
        )

    if problems:
        raise ManifestError(f"{source}: " + "; ".join(problems))

    as_str = lambda v: np.asarray(v, dtype=np.str_)  # noqa: E731
    return Manifest(
        source=source,
        root=root,
        paths=as_str(paths),
        ids=as_str(ids),
        patient_ids=as_str(patients),
        splits=as_str(splits),
        label_names=label_names,
        labels=labels_arr,
        classes=as_str(cols["label"]) if "label" in cols else None,
        masks=as_str(masks) if masks is not None else None,
        meta={key: as_str(cols[h]) for key, h in meta_names.items()},
        label_source="inferred" if labels is None else "declared",
        notes=notes,
    )


def write_manifest(path: str | Path, columns: dict[str, list | np.ndarray]) -> Path:
    """Write a manifest CSV from columns (used by the demo and the dataset adapters).

    Args:
        path: output CSV path (parent folders are created).
        columns: column name -> values [N]; floats NaN are written blank, label floats as integers.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(columns)
    n = len(next(iter(columns.values()))) if columns else 0

    def cell(v) -> str:
        if v is None:
            return ""
        if isinstance(v, float | np.floating):
            if np.isnan(v):
                return ""
            return str(int(v)) if float(v).is_integer() else repr(float(v))
        return str(v)

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(names)
        for i in range(n):
            w.writerow([cell(columns[c][i]) for c in names])
    return path
