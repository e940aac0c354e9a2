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
reported at once in one line that names the rows (CSV line numbers, header = line 1).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.errors import ManifestError
from featcache.urls import UrlPath, is_url, url_files

RESERVED = ("path", "id", "patient_id", "split", "label", "mask")
SPLITS = ("train", "val", "test", "")
_LABEL_VALUES = {"1": 1.0, "0": 0.0, "-1": -1.0, "1.0": 1.0, "0.0": 0.0, "-1.0": -1.0, "": np.nan}
_MAX_NAMED = 5


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


def _rows_text(lines: list[int], ids: list[str] | None = None) -> str:
    shown = lines[:_MAX_NAMED]
    text = ", ".join(str(n) for n in shown)
    if ids is not None:
        text += " (" + ", ".join(ids[:_MAX_NAMED]) + ")"
    if len(lines) > _MAX_NAMED:
        text += f" and {len(lines) - _MAX_NAMED} more"
    return text


def _inside(root: Path, rel: str) -> bool:
    """Whether ``rel`` names a place inside ``root`` as written (no absolute path, no ``..`` out)."""
    if isinstance(root, UrlPath):
        clean = posixpath.normpath(rel)
        return not (
            rel.startswith("/") or "://" in rel or "\\" in rel or clean == ".." or clean.startswith("../")
        )
    if os.path.isabs(rel) or (len(rel) > 1 and rel[1] == ":"):
        return False
    target = os.path.normpath(os.path.join(str(root), rel))
    return target == str(root) or target.startswith(str(root) + os.sep)


def resolves_inside(root: Path, rel: str, _parents: dict[str, str] | None = None) -> bool:
    """Whether ``root / rel`` still lies inside ``root`` once symbolic links are followed.

    Args:
        root: the (already resolved) root folder.
        rel: a path relative to it, as written in the manifest.
        _parents: cache of resolved parent folders, shared across the rows of one manifest (the
            folder part is resolved once per folder, the file itself is checked for being a link).

    Returns:
        False when the text escapes (absolute, ``..``) or a link on the way points outside the root;
        a path that does not exist is judged by the links of the part that does.
    """
    if not _inside(root, rel):
        return False
    if isinstance(root, UrlPath):  # object stores have no symbolic links
        return True
    cache = {} if _parents is None else _parents
    real_root = cache.get("\0") or cache.setdefault("\0", os.path.realpath(root))
    parent, name = os.path.split(rel)
    if _parents is None or name in ("", ".", ".."):
        target = os.path.realpath(os.path.join(real_root, rel))
    else:
        real_parent = _parents.get(parent)
        if real_parent is None:
            real_parent = _parents[parent] = os.path.realpath(os.path.join(real_root, parent))
        target = os.path.join(real_parent, name)
        if os.path.islink(target):
            target = os.path.realpath(target)
    return target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)


def bad_column_name(name: str) -> str | None:
    """Why a header cell cannot be a column name, or None when it can.

    Column names become array names in the feature store (``meta/<name>``, label names), so they must
    be plain: not empty, no ``/`` or ``\\``, no control characters, and not ``.``, ``..`` or a name
    starting with ``.`` or ``__`` once the ``meta_`` prefix is removed.
    """
    if not name:
        return "is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    if "/" in name or "\\" in name:
        return "contains '/' or '\\'"
    key = name[len("meta_") :] if name.startswith("meta_") else name
    if not key:
        return "is a bare 'meta_'"
    if key.startswith((".", "__")):
        return "starts with '.' or '__'"
    return None


def _check_locations(
    problems: list[str],
    root: Path,
    values: list[str],
    line: np.ndarray,
    what: str,
    check_files: bool,
    kind: str,
) -> bool:
    """Add the problems of one path column (escaping the root, missing, folders); True if any escape."""
    control = [i for i, p in enumerate(values) if any(ord(c) < 32 or ord(c) == 127 for c in p)]
    if control:
        problems.append(
            f"rows {_rows_text([int(line[i]) for i in control])} have control characters (e.g. NUL) in "
            f"their {what}; fix the file names in the manifest"
        )
        return True
    outside = [i for i, p in enumerate(values) if p and not _inside(root, p)]
    skip = set(outside)
    parents: dict[str, str] = {}
    linked = [
        i for i, p in enumerate(values) if p and i not in skip and not resolves_inside(root, p, parents)
    ]
    if outside:
        rows = _rows_text([int(line[i]) for i in outside], [values[i] for i in outside])
        problems.append(f"rows {rows} have {what} outside the root {root} (use paths relative to --root)")
    if linked:
        rows = _rows_text([int(line[i]) for i in linked], [values[i] for i in linked])
        problems.append(
            f"rows {rows} have {what} that lead outside the root {root} through a symbolic link; "
            "copy the files under the root or pass a --root that holds the link targets"
        )
    if not check_files or outside or linked:
        return bool(outside or linked)
    if isinstance(root, UrlPath):
        listed = url_files(root)
        if listed is None:
            problems.append(
                f"cannot list {root} to check that the {kind} files exist; check the URL and "
                "--storage-options, or pass --no-check-files"
            )
            return False
        missing = [i for i, p in enumerate(values) if p and posixpath.normpath(p) not in listed]
        if missing:
            rows = _rows_text([int(line[i]) for i in missing], [values[i] for i in missing])
            problems.append(f"rows {rows} name {kind} files that do not exist under {root}")
        return False
    folders = [i for i, p in enumerate(values) if p and (root / p).is_dir()]
    skip = set(folders)
    missing = [i for i, p in enumerate(values) if p and i not in skip and not (root / p).is_file()]
    if missing:
        rows = _rows_text([int(line[i]) for i in missing], [values[i] for i in missing])
        problems.append(f"rows {rows} name {kind} files that do not exist under {root}")
    if folders:
        rows = _rows_text([int(line[i]) for i in folders], [values[i] for i in folders])
        problems.append(f"rows {rows} name folders, not {kind} files, under {root}")
    return False


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
        text = "; ".join(f"{h!r} {why}" for h, why in bad_names[:_MAX_NAMED])
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
            f"{source}: rows {_rows_text(bad_width)} have a different number of fields than the header ({len(header)})"
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
        problems.append(f"rows {_rows_text(empty)} have an empty 'path'")

    seen: dict[str, list[int]] = defaultdict(list)
    for i, rid in enumerate(ids):
        seen[rid].append(int(line[i]))
    dups = {rid: rows for rid, rows in seen.items() if len(rows) > 1}
    if dups:
        first = list(dups.items())[:_MAX_NAMED]
        text = "; ".join(f"'{rid}' at rows {_rows_text(rows)}" for rid, rows in first)
        more = f" and {len(dups) - _MAX_NAMED} more" if len(dups) > _MAX_NAMED else ""
        fix = "make the 'id' values unique" if "id" in cols else "add an 'id' column with unique values"
        problems.append(f"duplicate ids: {text}{more} ({fix})")

    bad_split = [i for i, s in enumerate(splits) if s not in SPLITS]
    if bad_split:
        vals = sorted({splits[i] for i in bad_split})
        problems.append(
            f"rows {_rows_text([int(line[i]) for i in bad_split])} have unknown split values {vals} "
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
            f"'{p}' in {sorted(patient_splits[p])} at rows {_rows_text(patient_rows[p])}"
            for p in leaks[:_MAX_NAMED]
        )
        more = f" and {len(leaks) - _MAX_NAMED} more patients" if len(leaks) > _MAX_NAMED else ""
        problems.append(f"patients in more than one split (leakage): {text}{more}")

    masks = cols.get("mask")
    escaping = _check_locations(problems, root, paths, line, "paths", check_files, "image")
    if masks is not None:
        escaping |= _check_locations(problems, root, masks, line, "mask paths", check_files, "mask")

    label_names, meta_names, notes = _label_columns(header, cols, labels, source)
    if label_names and "label" in header:
        problems.append(
            f"both a 'label' class column and binary label columns {label_names[:_MAX_NAMED]}; keep one "
            "kind (declare the labels, or rename metadata columns to meta_<name>)"
        )
    labels_arr = np.full((n, len(label_names)), np.nan, dtype=np.float32)
    for j, name in enumerate(label_names):
        bad = []
        for i, v in enumerate(cols[name]):
            try:
                labels_arr[i, j] = _LABEL_VALUES[v]
            except KeyError:
                bad.append(i)
        if bad:
            vals = sorted({cols[name][i] for i in bad})[:_MAX_NAMED]
            problems.append(
                f"declared label column '{name}' has values {vals} at rows {_rows_text([int(line[i]) for i in bad])}: "
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


def _declared(labels: Sequence[str] | str) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (blank entries dropped)."""
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    return [str(v).strip() for v in items if str(v).strip()]


def _label_columns(
    header: list[str], cols: dict[str, list[str]], labels: Sequence[str] | str | None, source: str
) -> tuple[list[str], dict[str, str], list[str]]:
    """Split the non-reserved columns into labels and metadata.

    Returns:
        ``(label_names, meta, notes)``: label columns in file order; metadata key (``meta_<name>``)
        -> column name; at most one note naming the columns kept as metadata by inference.

    Raises:
        ManifestError: a declared label is reserved, repeated or not a column, or two columns end up
            under the same metadata key (``age`` and ``meta_age``).
    """
    free = [h for h in header if h not in RESERVED and not h.startswith("meta_")]
    notes: list[str] = []
    if labels is not None:
        wanted = _declared(labels)
        reserved = [w for w in wanted if w in RESERVED or w.startswith("meta_")]
        if reserved:
            raise ManifestError(
                f"{source}: declared labels {reserved} are reserved or metadata columns; declare only "
                "binary label columns"
            )
        repeated = sorted({w for w in wanted if wanted.count(w) > 1})
        if repeated:
            raise ManifestError(f"{source}: labels {repeated} are declared more than once")
        missing = [w for w in wanted if w not in header]
        if missing:
            raise ManifestError(
                f"{source}: declared labels {missing[:_MAX_NAMED]} are not columns of the manifest "
                f"(its other columns: {free[:12]}{' ...' if len(free) > 12 else ''})"
            )
        label_names = [h for h in free if h in set(wanted)]
    else:
        label_names = [h for h in free if all(v in _LABEL_VALUES for v in cols[h])]
        kept = [h for h in free if h not in set(label_names)]
        if kept:
            shown = ", ".join(kept[:_MAX_NAMED]) + (
                f" and {len(kept) - _MAX_NAMED} more" if len(kept) > _MAX_NAMED else ""
            )
            notes.append(
                f"{Path(source).name}: columns {shown} hold values other than 1/0/-1/blank and are kept "
                f"as metadata; {len(label_names)} label columns inferred (declare them with --labels)"
            )
    meta: dict[str, str] = {h: h for h in header if h.startswith("meta_")}
    for h in free:
        if h in label_names:
            continue
        key = f"meta_{h}"
        if key in meta:
            raise ManifestError(
                f"{source}: columns '{h}' and '{key}' would both be kept as metadata '{key}'; rename one"
            )
        meta[key] = h
    return label_names, meta, notes


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
