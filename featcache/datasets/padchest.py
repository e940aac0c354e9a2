"""PadChest (Bustos et al., Medical Image Analysis 2020): 160,868 images of 67,625 patients, 174 findings.

Official files (BIMCV), in the root or one folder below:

* ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (any ``PADCHEST*.csv``, plain or ``.gz``):
  one row per image with ``ImageID, ImageDir, StudyDate_DICOM, StudyID, PatientID, PatientBirth,
  PatientSex_DICOM, Projection, MethodLabel, Labels, ...``. ``Labels`` is a Python list literal of
  report findings (``['pleural effusion', ' cardiomegaly']``), extracted from the whole report, so a
  finding not listed is a negative. Rows whose ``Labels`` is empty or unreadable get blank labels.
* images: ``<ImageDir>/<ImageID>`` (the archive folders 0..54), or any folder under the root (found by
  file name).

Findings are renamed by exact term (after stripping and lower-casing) with
``vocabulary.LABEL_MAP["padchest"]``; several terms can make one label (``lobar atelectasis`` ->
``atelectasis``). Terms not in the table do not become columns. There is no official split (blank).

``views="frontal"`` (default) keeps ``Projection`` PA, AP and AP_horizontal; ``views="all"`` keeps
every projection. Columns: the mapped labels, ``meta_view`` (Projection), ``meta_sex``, ``meta_age``
(study year - birth year), ``meta_study``, ``meta_label_method`` (``Physician`` for the 27% labelled
by radiologists, ``RNN_model`` otherwise).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from featcache.datasets._common import (
    DatasetManifest,
    assemble,
    columns_of,
    index_files,
    locate,
    read_table,
    sex,
)
from featcache.datasets.vocabulary import LABEL_MAP, harmonised_names
from featcache.errors import FeatcacheError

_FRONTAL = ("PA", "AP", "AP_horizontal")


def _find_csv(root: Path) -> Path:
    if not root.is_dir():
        raise FeatcacheError(f"{root}: dataset folder not found; pass the PadChest folder with --root")
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        found = sorted(folder.glob("PADCHEST*.csv")) + sorted(folder.glob("PADCHEST*.csv.gz"))
        if found:
            return found[0]
    raise FeatcacheError(f"{root}: no PADCHEST_chest_x_ray_images_labels_*.csv here or one folder below")


def _terms(text: str) -> list[str] | None:
    """Findings of a ``Labels`` cell, stripped and lower case; None when empty or unreadable."""
    if text.strip() in ("", "nan", "[]", "['']"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, list | tuple):
        return None
    terms = [str(t).strip().lower() for t in value if str(t).strip()]
    return terms or None


def _age(study_date: str, birth: str) -> str:
    try:
        return str(int(study_date[:4]) - int(float(birth)))
    except ValueError:
        return ""


def build(root: str | Path, *, check_files: bool = True, views: str = "frontal") -> DatasetManifest:
    """Build a PadChest manifest from its label CSV.

    Args:
        root: the dataset folder.
        check_files: drop (and report) images not on disk.
        views: ``frontal`` or ``all``.

    Returns:
        A ``DatasetManifest`` with paths relative to ``root``.
    """
    root = Path(root)
    if views not in ("frontal", "all"):
        raise FeatcacheError(f"--views {views!r}: use frontal or all")
    path = _find_csv(root)
    header, rows = read_table(path)
    cols = columns_of(path, header, rows, ["ImageID", "PatientID", "Labels"])
    n = len(rows)
    mapping = LABEL_MAP["padchest"]
    names = harmonised_names("padchest")
    position = {name: j for j, name in enumerate(names)}
    labels = np.zeros((n, len(names)), dtype=np.float32)
    unlabelled = 0
    for i, text in enumerate(cols["Labels"]):
        terms = _terms(text)
        if terms is None:
            labels[i] = np.nan
            unlabelled += 1
            continue
        for t in terms:
            if t in mapping:
                labels[i, position[mapping[t]]] = 1.0

    view = cols.get("Projection", [""] * n)
    keep = np.ones(n, dtype=bool) if views == "all" else np.isin(view, _FRONTAL)
    image_dir = cols.get("ImageDir", [""] * n)
    defaults = [f"{d}/{img}" if d else img for d, img in zip(image_dir, cols["ImageID"])]
    index = index_files(root) if check_files else None
    paths, found = locate(cols["ImageID"], index, defaults)
    missing = [img for img, ok, k in zip(cols["ImageID"], found, keep) if k and not ok]
    keep &= found

    notes = ["PadChest has no official split: split left blank (run featcache split)"]
    if unlabelled:
        notes.append(f"{unlabelled} rows have an empty or unreadable Labels cell: their labels are blank")
    dates = cols.get("StudyDate_DICOM", [""] * n)
    births = cols.get("PatientBirth", [""] * n)
    meta = {
        "meta_view": view,
        "meta_sex": [sex(v) for v in cols.get("PatientSex_DICOM", [""] * n)],
        "meta_age": [_age(d, b) for d, b in zip(dates, births)],
        "meta_study": cols.get("StudyID", [""] * n),
        "meta_label_method": cols.get("MethodLabel", [""] * n),
    }
    return assemble(
        "padchest",
        root,
        paths=paths,
        ids=cols["ImageID"],
        patient_ids=cols["PatientID"],
        splits=[""] * n,
        labels={name: labels[:, j] for j, name in enumerate(names)},
        meta=meta,
        keep=keep,
        missing=missing,
        notes=notes,
    )
