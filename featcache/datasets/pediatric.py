"""Pediatric pneumonia chest X-rays (Kermany et al., Cell 2018; Mendeley 10.17632/rscbjbr9sj.2): 5,856 JPEGs.

Official layout: ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` (the root may be the
``chest_xray`` folder or the folder holding it; macOS ``__MACOSX`` copies are ignored). The class is the
folder; the split is the official folder (``val`` holds only 16 images; many papers carve their own).

Patient ids come from the file names: ``person1_bacteria_1.jpeg`` / ``person1_virus_6.jpeg`` ->
``person1`` (with ``meta_pathogen`` ``bacteria`` / ``virus``), ``IM-0115-0001.jpeg`` -> ``IM-0115``,
``NORMAL2-IM-0372-0001.jpeg`` -> ``NORMAL2-IM-0372``; any other name is its own patient. The file
names cannot tell whether a ``personN`` in ``train`` and one in ``test`` are the same child: when a
parsed id occurs in more than one official folder, the ids are qualified by the folder
(``test/person1``) to keep the official split, and a note says how many. With
``official_split=False`` the split is blank and ids stay unqualified, for a strictly patient-level
``featcache split``.

Columns: ``label`` = ``normal`` / ``pneumonia`` (``classes="pathogen"``: ``normal`` / ``bacteria`` /
``virus``), ``meta_pathogen``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from featcache.datasets._common import DatasetManifest, assemble
from featcache.errors import FeatcacheError

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d+", re.IGNORECASE)
_EXT = (".jpeg", ".jpg", ".png")


def patient_of(file_name: str) -> tuple[str, str]:
    """(patient id, pathogen) parsed from a Kermany file name; (stem, "") when it matches no known form."""
    m = _PERSON.match(file_name)
    if m:
        return m.group(1), m.group(2).lower()
    m = _IM.match(file_name)
    if m:
        return m.group(1), ""
    return file_name.rsplit(".", 1)[0], ""


def _dataset_folder(root: Path) -> Path:
    for candidate in (root, root / "chest_xray", root / "chest_xray" / "chest_xray"):
        if any((candidate / s).is_dir() for s in ("train", "test")):
            return candidate
    raise FeatcacheError(
        f"{root}: no chest_xray/{{train,val,test}}/{{NORMAL,PNEUMONIA}} folders found; check --root"
    )


def build(
    root: str | Path, *, check_files: bool = True, official_split: bool = True, classes: str = "binary"
) -> DatasetManifest:
    """Build a manifest of the Kermany pediatric pneumonia set from its folders.

    Args:
        root: ``chest_xray`` or the folder holding it.
        check_files: unused (the images are listed from the disk).
        official_split: use the ``train``/``val``/``test`` folders as splits.
        classes: ``binary`` (normal / pneumonia) or ``pathogen`` (normal / bacteria / virus).

    Returns:
        A ``DatasetManifest`` with paths relative to ``root``.
    """
    del check_files
    root = Path(root)
    if classes not in ("binary", "pathogen"):
        raise FeatcacheError(f"--classes {classes!r}: use binary or pathogen")
    base = _dataset_folder(root)
    rows = []
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            folder = base / split / cls
            if not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                if f.is_file() and f.suffix.lower() in _EXT and not f.name.startswith("."):
                    pid, pathogen = patient_of(f.name)
                    rows.append((f.relative_to(root).as_posix(), split, cls.lower(), pid, pathogen))

    folders_of: dict[str, set[str]] = defaultdict(set)
    for _, split, _, pid, _ in rows:
        folders_of[pid].add(split)
    crossing = {p for p, s in folders_of.items() if len(s) > 1}
    notes = []
    if official_split and crossing:
        notes.append(
            f"{len(crossing)} patient ids parsed from file names occur in more than one official folder; "
            "they were qualified by folder (e.g. test/person1) to keep the official split"
        )
    patients = [
        f"{split}/{pid}" if official_split and pid in crossing else pid for _, split, _, pid, _ in rows
    ]
    labels = [
        pathogen if classes == "pathogen" and cls == "pneumonia" and pathogen else cls
        for _, _, cls, _, pathogen in rows
    ]
    notes.append(
        "splits are the official folders" if official_split else "split left blank (run featcache split)"
    )
    return assemble(
        "pediatric-pneumonia",
        root,
        paths=[r[0] for r in rows],
        ids=[r[0] for r in rows],
        patient_ids=patients,
        splits=[r[1] if official_split else "" for r in rows],
        classes=labels,
        meta={"meta_pathogen": [r[4] for r in rows]},
        notes=notes,
    )
