"""NIH ChestX-ray14 (Wang et al., CVPR 2017): 112,120 frontal images of 30,805 patients.

Official files read from the dataset root (or one folder below it):

* ``Data_Entry_2017_v2020.csv`` (or ``Data_Entry_2017.csv``, either may be gzipped): one row per image,
  ``Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age, Patient Gender, View Position, ...``.
  ``Finding Labels`` is ``|``-separated (``Cardiomegaly|Effusion``) or ``No Finding``. Every image is
  labelled for all 14 findings, so a finding not listed is a negative (0).
* ``train_val_list.txt`` / ``test_list.txt`` (optional): the official patient-level split, one file
  name per line. ``test_list`` rows become ``test``; ``val`` is carved per patient out of
  ``train_val_list`` (a ``val`` share of its images, seeded, stratified on all labels), the rest is
  ``train``. Without the lists the split column is left blank (run ``featcache split``).
* images: ``images*/`` folders (``images_001/images/00000001_000.png`` as the archives unpack, or a flat
  ``images/``), found by file name. Images listed in the entry file but absent are dropped and counted
  in ``missing``; with ``check_files=False`` the disk is not read and paths are ``images/<Image Index>``.

Columns: the 15 labels of ``vocabulary.LABEL_MAP["nih"]``, ``meta_view`` (PA/AP), ``meta_sex`` (M/F),
``meta_age`` (years), ``meta_follow_up``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from featcache.datasets._common import (
    DatasetManifest,
    age,
    assemble,
    carve_val,
    columns_of,
    find_file,
    index_files,
    locate,
    optional_file,
    read_table,
    sex,
)
from featcache.datasets.vocabulary import LABEL_MAP, harmonised_names
from featcache.errors import ManifestError


def _image_index(root: Path) -> dict[str, str]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("images"))
    index: dict[str, str] = {}
    for folder in folders or [root]:
        for name, rel in index_files(folder, extensions=(".png",)).items():
            index.setdefault(name, f"{folder.relative_to(root).as_posix()}/{rel}" if folder != root else rel)
    return index


def _read_list(path: Path) -> set[str]:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return {line.strip() for line in raw.decode("utf-8-sig").splitlines() if line.strip()}


def build(
    root: str | Path,
    *,
    check_files: bool = True,
    official_split: bool = True,
    val: float = 0.1,
    seed: int = 0,
) -> DatasetManifest:
    """Build an NIH ChestX-ray14 manifest from the official files.

    Args:
        root: the dataset folder (entry CSV, optional split lists, ``images*/`` folders).
        check_files: look for the images on disk (drop and report missing ones); False: documented paths.
        official_split: use ``train_val_list.txt`` / ``test_list.txt`` when present.
        val: share of the official train_val images (per patient) that becomes ``val``.
        seed: seed of the val carve.

    Returns:
        A ``DatasetManifest`` (columns, missing images, notes).

    Raises:
        FeatcacheError: the entry file is missing or malformed (names the file and row).
    """
    root = Path(root)
    entry = find_file(
        root, ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"], "NIH entry file Data_Entry_2017*.csv"
    )
    header, rows = read_table(entry)
    cols = columns_of(entry, header, rows, ["Image Index", "Finding Labels", "Patient ID"])
    names = cols["Image Index"]
    n = len(names)

    mapping = LABEL_MAP["nih"]
    label_names = harmonised_names("nih")
    labels = np.zeros((n, len(label_names)), dtype=np.float32)
    position = {name: j for j, name in enumerate(label_names)}
    for i, findings in enumerate(cols["Finding Labels"]):
        for token in findings.split("|"):
            token = token.strip()
            if token not in mapping:
                raise ManifestError(
                    f"{entry}: row {i + 2} has finding {token!r}, not one of NIH's {sorted(mapping)}; "
                    "is this the official Data_Entry file?"
                )
            labels[i, position[mapping[token]]] = 1.0

    notes: list[str] = []
    index = _image_index(root) if check_files else None
    paths, found = locate(names, index, [f"images/{nm}" for nm in names])
    missing = [nm for nm, ok in zip(names, found) if not ok]
    if index is not None:
        extra = len(set(index) - set(names))
        if extra:
            notes.append(
                f"{extra} PNG files under the image folders are not in {entry.name} and were left out"
            )

    splits = np.full(n, "", dtype=object)
    test_list = optional_file(root, ["test_list.txt"]) if official_split else None
    trainval_list = optional_file(root, ["train_val_list.txt"]) if official_split else None
    if test_list is None and trainval_list is None:
        notes.append(
            "no official train_val_list.txt / test_list.txt found: split left blank (run featcache split)"
        )
    else:
        in_test = np.isin(names, list(_read_list(test_list))) if test_list else np.zeros(n, dtype=bool)
        pool = np.isin(names, list(_read_list(trainval_list))) if trainval_list else ~in_test
        pool &= ~in_test
        splits[in_test] = "test"
        carved = carve_val(cols["Patient ID"], pool & found, val, seed, labels)
        splits[pool & found] = carved[pool & found]
        notes.append(
            f"official split: test from {test_list.name if test_list else '(none)'}; val = {val:g} of the "
            f"train_val images carved per patient (seed {seed}, stratified on all labels)"
        )
        unlisted = int(np.sum(~in_test & ~pool))
        if unlisted:
            notes.append(f"{unlisted} images are in neither official list: split left blank")

    meta = {
        "meta_view": cols.get("View Position", [""] * n),
        "meta_sex": [sex(v) for v in cols.get("Patient Gender", [""] * n)],
        "meta_age": [age(v) for v in cols.get("Patient Age", [""] * n)],
        "meta_follow_up": cols.get("Follow-up #", [""] * n),
    }
    return assemble(
        "nih",
        root,
        paths=paths,
        ids=names,
        patient_ids=cols["Patient ID"],
        splits=splits,
        labels={name: labels[:, j] for j, name in enumerate(label_names)},
        meta=meta,
        keep=found,
        missing=missing,
        notes=notes,
    )
