"""CheXpert (Irvin et al., AAAI 2019): 224,316 radiographs of 65,240 patients, 14 observations.

Official files, in the dataset folder (``CheXpert-v1.0-small/`` or ``CheXpert-v1.0/``), which is the
root or one folder below it:

* ``train.csv``: ``Path, Sex, Age, Frontal/Lateral, AP/PA`` and 14 observation columns labelled by the
  CheXpert report labeler: ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain, blank = not mentioned.
  All four are kept as they are (``-1`` stays uncertain, blank stays blank): uncertainty policies
  (U-ones, U-zeros, ignore) are applied by the probes.
* ``valid.csv``: the official validation set (234 images of 200 patients), labelled 1/0 by the
  consensus of three board-certified radiologists. The official test set is hidden, so papers
  commonly report on ``valid.csv``: it becomes ``test`` by default (``valid_as="test"``) and ``val``
  is carved per patient from ``train.csv`` (a ``val`` share of its images, seeded, stratified on the
  positive labels); with ``valid_as="val"`` it is the validation split and there is no test split.
* ``Path`` is ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``: relative to the
  folder above the dataset folder, so the image is ``<dataset folder>/train/patient00001/...``
  whatever the dataset folder is called. The patient id is ``patient00001``, ``meta_study`` the study.

``views="frontal"`` (default) keeps ``Frontal/Lateral == Frontal``; ``views="all"`` keeps laterals too.
Columns: the 14 labels of ``vocabulary.LABEL_MAP["chexpert"]``, ``meta_view`` (AP/PA for frontal
images, ``LATERAL`` otherwise), ``meta_sex`` (M/F), ``meta_age``, ``meta_study``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from featcache.datasets._common import (
    DatasetManifest,
    age,
    assemble,
    carve_val,
    columns_of,
    find_file,
    label_value,
    read_table,
    sex,
)
from featcache.datasets.vocabulary import LABEL_MAP, harmonised_names
from featcache.errors import FeatcacheError

_PATIENT = re.compile(r"(patient\d+)")
_STUDY = re.compile(r"(study\d+)")


def read_observations(
    path: Path, cols: dict[str, list[str]], mapping: dict[str, str]
) -> dict[str, np.ndarray]:
    """The observation columns of a CheXpert-labeler file as harmonised float32 [N] (1/0/-1/NaN)."""
    out = {}
    for source, name in mapping.items():
        if source in cols:
            out[name] = np.array(
                [label_value(v, path, source, i + 2) for i, v in enumerate(cols[source])], dtype=np.float32
            )
    return out


def build(
    root: str | Path,
    *,
    check_files: bool = True,
    views: str = "frontal",
    valid_as: str = "test",
    val: float = 0.1,
    seed: int = 0,
) -> DatasetManifest:
    """Build a CheXpert manifest from ``train.csv`` and ``valid.csv``.

    Args:
        root: the dataset folder or the folder holding it.
        check_files: drop (and report) rows whose image is not on disk.
        views: ``frontal`` or ``all``.
        valid_as: split of the official ``valid.csv`` rows, ``test`` or ``val``.
        val: with ``valid_as="test"``, share of ``train.csv`` images carved per patient into ``val``.
        seed: seed of that carve.

    Returns:
        A ``DatasetManifest`` with paths relative to ``root``.
    """
    root = Path(root)
    if views not in ("frontal", "all"):
        raise FeatcacheError(f"--views {views!r}: use frontal or all")
    if valid_as not in ("test", "val"):
        raise FeatcacheError(f"--valid-as {valid_as!r}: use test or val")
    train_csv = find_file(root, ["train.csv"], "CheXpert train.csv")
    base = train_csv.parent
    files = [(train_csv, "train")]
    valid_csv = base / "valid.csv"
    if valid_csv.is_file():
        files.append((valid_csv, valid_as))
    mapping = LABEL_MAP["chexpert"]
    prefix = base.relative_to(root).as_posix()

    paths, ids, patients, splits, studies, view, sexes, ages, missing = ([] for _ in range(9))
    label_parts: list[dict[str, np.ndarray]] = []
    keep_parts = []
    for path, split in files:
        header, rows = read_table(path)
        cols = columns_of(path, header, rows, ["Path", *mapping])
        label_parts.append(read_observations(path, cols, mapping))
        n = len(rows)
        keep = np.ones(n, dtype=bool)
        for i in range(n):
            p = cols["Path"][i]
            m = _PATIENT.search(p)
            if m is None:
                raise FeatcacheError(f"{path}: row {i + 2} Path {p!r} has no patientNNNNN part")
            study = _STUDY.search(p)
            rel = "/".join(p.split("/")[1:])  # drop the dataset folder name the CSV starts with
            rel = f"{prefix}/{rel}" if prefix != "." else rel
            frontal = cols.get("Frontal/Lateral", [""] * n)[i] == "Frontal"
            if views == "frontal" and not frontal:
                keep[i] = False
            elif check_files and not (root / rel).is_file():
                keep[i] = False
                missing.append(p)
            paths.append(rel)
            ids.append(p)
            patients.append(m.group(1))
            splits.append(split)
            studies.append(study.group(1) if study else "")
            view.append(cols.get("AP/PA", [""] * n)[i] if frontal else "LATERAL")
            sexes.append(sex(cols.get("Sex", [""] * n)[i]))
            ages.append(age(cols.get("Age", [""] * n)[i]))
        keep_parts.append(keep)

    names = harmonised_names("chexpert")
    labels = {
        name: np.concatenate(
            [part.get(name, np.full(len(k), np.nan)) for part, k in zip(label_parts, keep_parts)]
        )
        for name in names
    }
    keep = np.concatenate(keep_parts)
    splits = np.asarray(splits, dtype=object)
    notes = [f"valid.csv (radiologist consensus) is the {valid_as} split"]
    if not valid_csv.is_file():
        notes = ["no valid.csv found beside train.csv: only the training images are listed"]
    if valid_as == "test":
        pool = (splits == "train") & keep
        strata = np.stack([labels[name] for name in names], axis=1)
        carved = carve_val(patients, pool, val, seed, strata)
        splits[pool] = carved[pool]
        notes.append(f"val = {val:g} of the train.csv images carved per patient (seed {seed}, stratified)")
    return assemble(
        "chexpert",
        root,
        paths=paths,
        ids=ids,
        patient_ids=patients,
        splits=splits,
        labels=labels,
        meta={"meta_view": view, "meta_sex": sexes, "meta_age": ages, "meta_study": studies},
        keep=keep,
        missing=missing,
        notes=notes,
    )
