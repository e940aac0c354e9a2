"""MIMIC-CXR-JPG v2 (Johnson et al., PhysioNet 2019): 377,110 JPEGs of 65,379 patients.

Official files in the dataset root (or one folder below it), plain or ``.gz``:

* ``mimic-cxr-2.0.0-metadata.csv``: one row per image, ``dicom_id, subject_id, study_id, ViewPosition, ...``.
* ``mimic-cxr-2.0.0-chexpert.csv`` (default) or ``-negbio.csv`` (``labeler="negbio"``): one row per
  study, ``subject_id, study_id`` and the 14 CheXpert observations as ``1.0`` / ``0.0`` / ``-1.0``
  (uncertain) / blank (not mentioned); kept as they are. Images of a study with no label row get
  blank labels.
* ``mimic-cxr-2.0.0-split.csv``: ``dicom_id, study_id, subject_id, split`` with the official,
  patient-level ``train`` / ``validate`` / ``test`` split (``validate`` becomes ``val``).
* images: ``files/p10/p10000032/s50414267/<dicom_id>.jpg``.
* ``patients.csv`` of MIMIC-IV (optional, ``subject_id, gender, anchor_age``): adds ``meta_sex`` and
  ``meta_age`` (the anchor age).

``views="frontal"`` (default) keeps ``ViewPosition`` PA and AP; ``views="all"`` keeps every image.
Columns: the 14 labels of ``vocabulary.LABEL_MAP["mimic-cxr-jpg"]``, ``meta_view``, ``meta_study``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.datasets._common import (
    DatasetManifest,
    age,
    assemble,
    columns_of,
    find_file,
    label_value,
    optional_file,
    read_table,
    sex,
)
from featcache.datasets.vocabulary import LABEL_MAP, harmonised_names
from featcache.errors import FeatcacheError

_FRONTAL = ("PA", "AP")
_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def build(
    root: str | Path, *, check_files: bool = True, views: str = "frontal", labeler: str = "chexpert"
) -> DatasetManifest:
    """Build a MIMIC-CXR-JPG manifest from its metadata, label and split files.

    Args:
        root: the dataset folder (``mimic-cxr-jpg/2.0.0``: CSV files and ``files/``).
        check_files: drop (and report) images not on disk.
        views: ``frontal`` or ``all``.
        labeler: ``chexpert`` or ``negbio`` label file.

    Returns:
        A ``DatasetManifest`` with paths relative to ``root``.
    """
    root = Path(root)
    if views not in ("frontal", "all"):
        raise FeatcacheError(f"--views {views!r}: use frontal or all")
    if labeler not in ("chexpert", "negbio"):
        raise FeatcacheError(f"--labeler {labeler!r}: use chexpert or negbio")
    meta_csv = find_file(root, ["mimic-cxr-2.0.0-metadata.csv"], "MIMIC-CXR-JPG metadata file")
    label_csv = find_file(root, [f"mimic-cxr-2.0.0-{labeler}.csv"], f"MIMIC-CXR-JPG {labeler} label file")
    split_csv = optional_file(root, ["mimic-cxr-2.0.0-split.csv"])

    header, rows = read_table(meta_csv)
    meta = columns_of(meta_csv, header, rows, ["dicom_id", "subject_id", "study_id"])
    n = len(rows)
    dicoms, subjects, studies = meta["dicom_id"], meta["subject_id"], meta["study_id"]
    view = meta.get("ViewPosition", [""] * n)

    mapping = LABEL_MAP["mimic-cxr-jpg"]
    header, rows = read_table(label_csv)
    lab = columns_of(label_csv, header, rows, ["subject_id", "study_id", *mapping])
    study_row = {(s, t): i for i, (s, t) in enumerate(zip(lab["subject_id"], lab["study_id"]))}
    names = harmonised_names("mimic-cxr-jpg")
    source_of = {v: k for k, v in mapping.items()}
    table = np.stack(
        [
            np.array(
                [
                    label_value(v, label_csv, source_of[name], i + 2)
                    for i, v in enumerate(lab[source_of[name]])
                ]
            )
            for name in names
        ],
        axis=1,
    ).astype(np.float32)
    where = np.array([study_row.get((s, t), -1) for s, t in zip(subjects, studies)])
    labels = np.full((n, len(names)), np.nan, dtype=np.float32)
    labels[where >= 0] = table[where[where >= 0]]
    notes = []
    unlabelled = int(np.sum(where < 0))
    if unlabelled:
        notes.append(
            f"{unlabelled} images belong to studies without a row in {label_csv.name}: labels left blank"
        )

    splits = np.full(n, "", dtype=object)
    if split_csv is not None:
        header, rows = read_table(split_csv)
        sp = columns_of(split_csv, header, rows, ["dicom_id", "split"])
        by_dicom = dict(zip(sp["dicom_id"], sp["split"]))
        bad = sorted({v for v in by_dicom.values() if v not in _SPLITS})
        if bad:
            raise FeatcacheError(
                f"{split_csv}: unknown split values {bad[:5]} (expected train, validate, test)"
            )
        splits[:] = [_SPLITS.get(by_dicom.get(d, ""), "") for d in dicoms]
        notes.append(f"official split from {split_csv.name} (validate -> val)")
    else:
        notes.append("no mimic-cxr-2.0.0-split.csv found: split left blank (run featcache split)")

    paths = [f"files/p{s[:2]}/p{s}/s{t}/{d}.jpg" for d, s, t in zip(dicoms, subjects, studies)]
    keep = np.ones(n, dtype=bool) if views == "all" else np.isin(view, _FRONTAL)
    missing: list[str] = []
    if check_files:
        on_disk = np.array([keep[i] and (root / p).is_file() for i, p in enumerate(paths)])
        missing = [paths[i] for i in np.flatnonzero(keep & ~on_disk)]
        keep &= on_disk

    extra = {"meta_view": view, "meta_study": studies}
    patients_csv = optional_file(root, ["patients.csv"])
    if patients_csv is not None:
        header, rows = read_table(patients_csv)
        pc = columns_of(patients_csv, header, rows, ["subject_id", "gender", "anchor_age"])
        info = {s: (sex(g), age(a)) for s, g, a in zip(pc["subject_id"], pc["gender"], pc["anchor_age"])}
        extra["meta_sex"] = [info.get(s, ("", ""))[0] for s in subjects]
        extra["meta_age"] = [info.get(s, ("", ""))[1] for s in subjects]
    return assemble(
        "mimic-cxr-jpg",
        root,
        paths=paths,
        ids=dicoms,
        patient_ids=subjects,
        splits=splits,
        labels={name: labels[:, j] for j, name in enumerate(names)},
        meta=extra,
        keep=keep,
        missing=missing,
        notes=notes,
    )
