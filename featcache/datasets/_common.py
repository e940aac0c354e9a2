"""Plumbing shared by the dataset adapters: the result type, CSV reading, file lookup, metadata."""

from __future__ import annotations

import csv
import gzip
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError, ManifestError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
_SHOWN = 5


@dataclass
class DatasetManifest:
    """A manifest built from a dataset's official files.

    Attributes:
        dataset: adapter name (``nih``, ``chexpert``, ...).
        root: folder the ``path`` (and ``mask``) column is relative to; pass it as ``--root``.
        columns: manifest column name -> values [N], as the CSV cells (label cells ``1``/``0``/``-1``/``""``).
        missing: entries of the official files whose image is not on disk (dropped from ``columns``).
        notes: facts the user should know (no patient ids, how a split was made, ...).
        out: the CSV written, once written.
    """

    dataset: str
    root: Path
    columns: dict[str, list]
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    out: Path | None = None

    @property
    def n(self) -> int:
        """Number of rows."""
        return len(self.columns["path"])

    def split_counts(self) -> dict[str, int]:
        """Rows per split (``""`` = no split)."""
        splits = self.columns.get("split") or [""] * self.n
        values, counts = np.unique(np.asarray(splits, dtype=np.str_), return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts)}

    def summary(self) -> str:
        """One line: rows, patients, rows per split, missing images."""
        patients = len(set(self.columns.get("patient_id") or self.columns.get("id") or self.columns["path"]))
        counts = self.split_counts()
        parts = [f"{k}: {counts[k]}" for k in ("train", "val", "test") if k in counts]
        if "" in counts:
            parts.append(f"no split: {counts['']}")
        text = f"{self.dataset}: {self.n} images of {patients} patients ({', '.join(parts)})"
        if self.missing:
            shown = ", ".join(self.missing[:_SHOWN])
            more = f" and {len(self.missing) - _SHOWN} more" if len(self.missing) > _SHOWN else ""
            text += f"; {len(self.missing)} images listed in the official files are missing under {self.root} ({shown}{more})"
        return text


def read_table(path: Path, *, delimiter: str = ",") -> tuple[list[str], list[list[str]]]:
    """Read a CSV (plain or .gz) into a stripped header and rows of strings."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise FeatcacheError(f"{path}: cannot read this CSV file ({e})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip() for h in next(reader, [])]
    rows = [r for r in reader if any(c.strip() for c in r)]
    bad = [i + 2 for i, r in enumerate(rows) if len(r) != len(header)]
    if bad:
        raise FeatcacheError(
            f"{path}: rows {', '.join(map(str, bad[:_SHOWN]))} do not have the {len(header)} fields of the header; "
            "is this the official file, unmodified?"
        )
    return header, rows


def columns_of(
    path: Path, header: list[str], rows: list[list[str]], required: list[str]
) -> dict[str, list[str]]:
    """Columns by name (values stripped), checking that the required ones exist."""
    absent = [c for c in required if c not in header]
    if absent:
        raise FeatcacheError(
            f"{path}: missing columns {absent} (found {header[:12]}{' ...' if len(header) > 12 else ''}); "
            "is this the official file?"
        )
    return {h: [r[j].strip() for r in rows] for j, h in enumerate(header)}


def find_file(root: Path, names: list[str], what: str) -> Path:
    """First of ``names`` found in ``root`` or one folder below it (each also tried with .gz)."""
    if not root.is_dir():
        raise FeatcacheError(f"{root}: dataset folder not found; pass the dataset's folder with --root")
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for name in names:
        for folder in folders:
            for candidate in (folder / name, folder / (name + ".gz")):
                if candidate.is_file():
                    return candidate
    raise FeatcacheError(
        f"{root}: {what} not found (looked for {', '.join(names)} here and one folder below)"
    )


def optional_file(root: Path, names: list[str]) -> Path | None:
    """Like ``find_file`` but ``None`` when absent."""
    try:
        return find_file(root, names, "")
    except FeatcacheError:
        return None


def index_files(
    root: Path, *, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, key: str = "name"
) -> dict[str, str]:
    """Map each image file under ``root`` (recursively, links followed) to its path relative to ``root``.

    Args:
        root: folder to walk.
        extensions: file name endings to keep (lower case).
        key: ``name`` (file name), ``stem`` (file name without extension) or ``path`` (the relative path
            itself: every file is kept, for layouts where names repeat across subfolders).

    Returns:
        key -> relative POSIX path; with ``name``/``stem`` the first path in sorted walk order wins a
        duplicate key.
    """
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        rel = os.path.relpath(folder, root)
        for f in sorted(files):
            if f.lower().endswith(extensions):
                path = f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")
                k = {"name": f, "stem": os.path.splitext(f)[0], "path": path}[key]
                if k not in found:
                    found[k] = path
    return found


def sex(value: str) -> str:
    """``M`` / ``F`` / ``""`` from the spellings the datasets use (M, Male, F, Female, O, Unknown, ...)."""
    v = value.strip().lower()
    return {"m": "M", "male": "M", "f": "F", "female": "F"}.get(v, "")


def age(value: str) -> str:
    """Age in whole years as text (``58``), from ``58``, ``58.0``, ``058Y``; blank when unknown."""
    v = value.strip().upper().rstrip("Y")
    try:
        years = float(v)
    except ValueError:
        return ""
    return str(int(years)) if np.isfinite(years) and years >= 0 else ""


def label_value(value: str, path: Path, column: str, row: int) -> float:
    """A label cell of an official file as 1.0 / 0.0 / -1.0 / NaN (blank)."""
    v = value.strip()
    if v == "":
        return float("nan")
    try:
        x = float(v)
    except ValueError:
        x = float("nan")
    if x not in (1.0, 0.0, -1.0):
        raise ManifestError(
            f"{path}: column '{column}' row {row} holds {value!r}; official label values are 1, 0, -1 or blank"
        )
    return x


def carve_val(
    patient_ids: list[str], pool: np.ndarray, fraction: float, seed: int, strata: np.ndarray | None
) -> np.ndarray:
    """Split the rows in ``pool`` into ``train`` / ``val`` per patient (``fraction`` of the pool's images to val).

    Args:
        patient_ids: str [N].
        pool: bool [N], rows to split.
        fraction: share of the pool's images for ``val`` (0 keeps all in train).
        seed: random seed.
        strata: float32 [N, K] labels to stratify on (1 = positive), or None.

    Returns:
        str [N]: ``train`` / ``val`` inside the pool, ``""`` elsewhere.
    """
    from featcache.datasets.split import assign_splits

    out = np.full(len(patient_ids), "", dtype=object)
    idx = np.flatnonzero(pool)
    if len(idx) == 0:
        return out
    pids = np.asarray(patient_ids, dtype=np.str_)[idx]
    sub = None if strata is None else strata[idx]
    out[idx] = assign_splits(pids, {"train": 1.0 - fraction, "val": fraction}, seed=seed, strata=sub)
    return out


def rows_text(values: list[str]) -> str:
    """``a, b, c and 7 more``."""
    shown = ", ".join(values[:_SHOWN])
    return shown + (f" and {len(values) - _SHOWN} more" if len(values) > _SHOWN else "")


def assemble(
    dataset: str,
    root: Path,
    *,
    paths: list[str],
    ids: list[str],
    patient_ids: list[str],
    splits: list[str] | np.ndarray | None = None,
    labels: dict[str, np.ndarray] | None = None,
    classes: list[str] | None = None,
    meta: dict[str, list[str]] | None = None,
    keep: np.ndarray | None = None,
    missing: list[str] | None = None,
    notes: list[str] | None = None,
) -> DatasetManifest:
    """Put manifest columns in the documented order (path, id, patient_id, split, labels, meta), keeping rows ``keep``.

    Args:
        dataset: adapter name.
        root: folder the paths are relative to.
        paths, ids, patient_ids: str [N].
        splits: str [N] or None (no split column).
        labels: harmonised label name -> float32 [N] (1/0/-1/NaN), or None.
        classes: str [N] class names for a ``label`` column, or None.
        meta: ``meta_*`` name -> str [N].
        keep: bool [N] rows to keep (default all).
        missing: official entries without an image on disk.
        notes: facts to report.
    """
    n = len(paths)
    keep = np.ones(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    idx = np.flatnonzero(keep)

    def take(values) -> list:
        return [values[i] for i in idx]

    columns: dict[str, list] = {"path": take(paths), "id": take(ids), "patient_id": take(patient_ids)}
    if splits is not None:
        columns["split"] = [str(s) for s in take(list(splits))]
    if classes is not None:
        columns["label"] = take(classes)
    for name, values in (labels or {}).items():
        columns[name] = label_text(np.asarray(values, dtype=np.float32)[idx])
    for name, values in (meta or {}).items():
        columns[name] = take(values)
    return DatasetManifest(
        dataset=dataset, root=root, columns=columns, missing=list(missing or []), notes=list(notes or [])
    )


def label_text(values: np.ndarray) -> list[str]:
    """Label cells as manifest text: float32 [N] 1 / 0 / -1 / NaN -> ``"1"`` / ``"0"`` / ``"-1"`` / ``""``."""
    code = np.select([values == 1, values == 0, values == -1], [1, 2, 3], default=0)
    return np.array(["", "1", "0", "-1"], dtype=object)[code].tolist()


def locate(
    names: list[str], index: dict[str, str] | None, default: list[str]
) -> tuple[list[str], np.ndarray]:
    """Paths for official file names: from a file index (found on disk), or the documented default layout.

    Args:
        names: str [N] keys to look up in ``index``.
        index: from ``index_files``; None = do not look at the disk (``check_files=False``).
        default: str [N] documented paths, used when ``index`` is None.

    Returns:
        (paths [N] ("" where not found), found bool [N]).
    """
    if index is None:
        return list(default), np.ones(len(names), dtype=bool)
    paths = [index.get(k, "") for k in names]
    return paths, np.asarray([p != "" for p in paths], dtype=bool)
