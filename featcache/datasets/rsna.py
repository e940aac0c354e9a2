"""RSNA Pneumonia Detection Challenge 2018 (Shih et al., Radiology: AI 2019): 26,684 labelled radiographs.

Official files (Kaggle ``rsna-pneumonia-detection-challenge``), in the root or one folder below:

* ``stage_2_train_labels.csv``: ``patientId, x, y, width, height, Target``, one row per box; an image
  with ``Target`` 1 has one row per lung opacity box, an image with ``Target`` 0 one row with empty
  box fields. ``Target`` (lung opacity suggestive of pneumonia) becomes the ``pneumonia`` column
  (1/0) and the number of boxes ``meta_boxes``.
* ``stage_2_detailed_class_info.csv`` (optional): ``patientId, class`` (``Lung Opacity``,
  ``Normal``, ``No Lung Opacity / Not Normal``) -> ``meta_class``.
* images: ``stage_2_train_images/<patientId>.dcm`` (converted copies, e.g. PNG, are found by
  ``patientId`` anywhere under the root). The stage 2 test images have no public labels and are
  left out.

Despite its name, ``patientId`` identifies an image; the challenge has one image per patient, so it
is used as both ``id`` and ``patient_id``. There is no official validation or test split: the split
column is blank (run ``featcache split``). Sex, age and view are in the DICOM headers only and are not
read here. The images are a subset of NIH ChestX-ray14: do not evaluate across the two sets.
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
    locate,
    optional_file,
    read_table,
)
from featcache.errors import FeatcacheError


def build(root: str | Path, *, check_files: bool = True) -> DatasetManifest:
    """Build an RSNA Pneumonia manifest from ``stage_2_train_labels.csv``.

    Args:
        root: the challenge folder.
        check_files: drop (and report) images not on disk.

    Returns:
        A ``DatasetManifest`` with paths relative to ``root``.
    """
    root = Path(root)
    labels_csv = find_file(
        root, ["stage_2_train_labels.csv", "stage_1_train_labels.csv"], "RSNA stage_2_train_labels.csv"
    )
    header, rows = read_table(labels_csv)
    cols = columns_of(labels_csv, header, rows, ["patientId", "Target"])
    ids: list[str] = []
    target: dict[str, float] = {}
    boxes: dict[str, int] = {}
    for i, (pid, t) in enumerate(zip(cols["patientId"], cols["Target"])):
        if t not in ("0", "1"):
            raise FeatcacheError(f"{labels_csv}: row {i + 2} Target is {t!r}; expected 0 or 1")
        if pid not in target:
            ids.append(pid)
            target[pid] = float(t)
            boxes[pid] = 0
        elif target[pid] != float(t):
            raise FeatcacheError(
                f"{labels_csv}: patientId {pid} has rows with Target 0 and 1; is the file intact?"
            )
        boxes[pid] += int(t == "1")

    meta = {"meta_boxes": [str(boxes[i]) for i in ids]}
    info_csv = optional_file(root, ["stage_2_detailed_class_info.csv"])
    if info_csv is not None:
        header, rows = read_table(info_csv)
        info = columns_of(info_csv, header, rows, ["patientId", "class"])
        cls = dict(zip(info["patientId"], info["class"]))
        meta["meta_class"] = [cls.get(i, "") for i in ids]

    index = index_files(root, key="stem") if check_files else None
    paths, found = locate(ids, index, [f"stage_2_train_images/{i}.dcm" for i in ids])
    return assemble(
        "rsna-pneumonia",
        root,
        paths=paths,
        ids=ids,
        patient_ids=ids,
        splits=[""] * len(ids),
        labels={"pneumonia": np.array([target[i] for i in ids], dtype=np.float32)},
        meta=meta,
        keep=found,
        missing=[i for i, ok in zip(ids, found) if not ok],
        notes=[
            "one image per patient (patientId); no official split: split left blank (run featcache split)",
            "RSNA images are a subset of NIH ChestX-ray14: keep the two apart in evaluation",
        ],
    )
