"""VinDr-CXR v1.0.0 (Nguyen et al., Scientific Data 2022): 18,000 PA radiographs, 22 findings + 6 diagnoses.

Official files (PhysioNet layout; the CSVs are in ``annotations/`` or the root):

* ``image_labels_train.csv``: ``image_id, rad_id`` and 28 label columns (0/1), one row per image *and
  radiologist*: each of the 15,000 training images was read independently by 3 radiologists.
* ``image_labels_test.csv``: the same label columns, one row per image (no ``rad_id``): each of the
  3,000 test images carries the consensus of 5 radiologists. (The file spells ``Other disease`` in the
  singular; both spellings map to ``other_diseases``.)
* images: ``train/<image_id>.dicom`` and ``test/<image_id>.dicom`` (converted copies with another
  extension, e.g. PNG, are found by image id anywhere under the root).

Aggregating the training readers: the test labels are a consensus, and the closest rule to a consensus
for three independent readers is the majority (``aggregate="majority"``, default: positive when at
least 2 of 3 marked the finding); ``aggregate="any"`` marks a finding positive when any reader did
(higher sensitivity, noisier). Files holding one row per image (like the test file) are taken as they
are. The official train / test split is kept.

VinDr-CXR publishes no patient ids, so each image is its own patient (``patient_id`` = image id); the
authors split the set by image. Columns: the 28 labels of ``vocabulary.LABEL_MAP["vindr-cxr"]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.datasets._common import (
    DatasetManifest,
    assemble,
    columns_of,
    find_file,
    index_files,
    label_value,
    locate,
    optional_file,
    read_table,
)
from featcache.datasets.vocabulary import LABEL_MAP, harmonised_names
from featcache.errors import FeatcacheError


def _read(path: Path, aggregate: str) -> tuple[list[str], dict[str, np.ndarray], bool]:
    """Image ids [M], harmonised labels float32 [M] each, and whether readers were aggregated."""
    header, rows = read_table(path)
    cols = columns_of(path, header, rows, ["image_id"])
    mapping = LABEL_MAP["vindr-cxr"]
    sources = [c for c in header if c in mapping]
    if not sources:
        raise FeatcacheError(f"{path}: none of VinDr-CXR's label columns found; is this image_labels_*.csv?")
    ids, inv = np.unique(np.asarray(cols["image_id"], dtype=np.str_), return_inverse=True)
    per_reader = "rad_id" in header or len(ids) < len(rows)
    readers = np.bincount(inv, minlength=len(ids))
    labels: dict[str, np.ndarray] = {}
    for c in sources:
        values = np.array([label_value(v, path, c, i + 2) for i, v in enumerate(cols[c])], dtype=np.float32)
        votes = np.bincount(inv, weights=(values == 1).astype(np.float64), minlength=len(ids))
        if aggregate == "any":
            agg = votes >= 1
        else:
            agg = 2 * votes > readers
        labels[mapping[c]] = agg.astype(np.float32)
    return ids.tolist(), labels, per_reader


def build(root: str | Path, *, check_files: bool = True, aggregate: str = "majority") -> DatasetManifest:
    """Build a VinDr-CXR manifest from ``image_labels_train.csv`` and ``image_labels_test.csv``.

    Args:
        root: the dataset folder (``vindr-cxr/1.0.0``).
        check_files: drop (and report) images not on disk.
        aggregate: how the 3 training readers are combined: ``majority`` or ``any``.

    Returns:
        A ``DatasetManifest`` with paths relative to ``root``.
    """
    root = Path(root)
    if aggregate not in ("majority", "any"):
        raise FeatcacheError(f"--aggregate {aggregate!r}: use majority or any")
    files = [(find_file(root, ["image_labels_train.csv"], "VinDr-CXR image_labels_train.csv"), "train")]
    test_csv = optional_file(root, ["image_labels_test.csv"])
    if test_csv is not None:
        files.append((test_csv, "test"))

    names = harmonised_names("vindr-cxr")
    ids, splits, defaults = [], [], []
    parts = []
    notes = []
    for path, split in files:
        part_ids, part_labels, aggregated = _read(path, aggregate)
        ids += part_ids
        splits += [split] * len(part_ids)
        defaults += [f"{split}/{i}.dicom" for i in part_ids]
        parts.append((len(part_ids), part_labels))
        if aggregated:
            notes.append(f"{path.name}: readers combined per image by {aggregate} vote")
    labels = {
        name: np.concatenate([lab.get(name, np.full(m, np.nan, dtype=np.float32)) for m, lab in parts])
        for name in names
    }
    index = index_files(root, key="stem") if check_files else None
    paths, found = locate(ids, index, defaults)
    missing = [i for i, ok in zip(ids, found) if not ok]
    notes.append("VinDr-CXR has no patient ids: each image is its own patient")
    return assemble(
        "vindr-cxr",
        root,
        paths=paths,
        ids=ids,
        patient_ids=ids,
        splits=splits,
        labels=labels,
        keep=found,
        missing=missing,
        notes=notes,
    )
