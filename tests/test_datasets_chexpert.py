"""CheXpert adapter on files in the official layout (CheXpert-v1.0-small/train.csv, valid.csv, train/patient*/...)."""

from __future__ import annotations

import csv
import math

import pytest

from featcache.datasets import build_manifest
from featcache.errors import FeatcacheError, ManifestError
from featcache.store.manifest import read_manifest

HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)
# CheXpert column -> harmonised column, as documented in featcache.datasets.vocabulary.
RENAMED = {
    "No Finding": "no_finding",
    "Enlarged Cardiomediastinum": "enlarged_cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung_opacity",
    "Lung Lesion": "lung_lesion",
    "Edema": "edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "effusion",
    "Pleural Other": "pleural_other",
    "Fracture": "fracture",
    "Support Devices": "support_devices",
}
TRAIN_ROWS = [
    # the first rows of the real train.csv (values as the labeler writes them)
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
    "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
    "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Female,83,Frontal,AP,,,,1.0,,,-1.0,,,,,,1.0,",
    "CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,-1.0,,,,,,1.0,",
    "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,41,Frontal,AP,,,,,,1.0,,,,0.0,,,,",
] + [
    f"CheXpert-v1.0-small/train/patient{p:05d}/study1/view1_frontal.jpg,Male,50,Frontal,PA,,,{c},,,,,,,0.0,{e},,,"
    for p, c, e in [(4, "1.0", ""), (5, "0.0", "1.0"), (6, "", "1.0"), (7, "1.0", "0.0"), (8, "", "-1.0")]
    + [(9, "1.0", "1.0"), (10, "", ""), (11, "0.0", "1.0"), (12, "1.0", "")]
]
VALID_ROWS = [
    "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,0.0,1.0,1.0,1.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0",
    "CheXpert-v1.0-small/valid/patient64542/study1/view1_frontal.jpg,Male,70,Frontal,PA,0.0,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0",
    "CheXpert-v1.0-small/valid/patient64542/study1/view2_lateral.jpg,Male,70,Lateral,,0.0,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0",
]


@pytest.fixture
def parent(tmp_path):
    """The folder holding CheXpert-v1.0-small/ (train.csv, valid.csv, train/, valid/)."""
    base = tmp_path / "data" / "CheXpert-v1.0-small"
    base.mkdir(parents=True)
    (base / "train.csv").write_text("\n".join([HEADER, *TRAIN_ROWS]) + "\n")
    (base / "valid.csv").write_text("\n".join([HEADER, *VALID_ROWS]) + "\n")
    for row in TRAIN_ROWS + VALID_ROWS:
        image = tmp_path / "data" / row.split(",")[0]
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(b"\xff\xd8jpeg")
    return tmp_path / "data"


def _official(parent):
    """Path -> (split file, row dict) straight from the CSVs."""
    rows = {}
    for name in ("train", "valid"):
        with open(parent / "CheXpert-v1.0-small" / f"{name}.csv", newline="") as f:
            for r in csv.DictReader(f):
                rows[r["Path"]] = (name, r)
    return rows


def _cells(path):
    with open(path, newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_labels_uncertainty_and_blanks_are_kept(parent, tmp_path):
    out = tmp_path / "chexpert.csv"
    build_manifest("chexpert", parent, out, views="all")
    m = read_manifest(out, parent)
    cells = _cells(out)
    official = _official(parent)
    assert sorted(m.ids.tolist()) == sorted(official)
    assert set(m.label_names) == set(RENAMED.values())
    for rid, (_, row) in official.items():
        for source, name in RENAMED.items():
            want = {"1.0": "1", "0.0": "0", "-1.0": "-1", "": ""}[row[source]]
            assert cells[rid][name] == want, (rid, source)
    # The parsed manifest agrees: -1 stays uncertain, blank stays missing (never 0).
    i = m.ids.tolist().index("CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg")
    j = m.label_names.index("edema")
    assert m.labels[i, j] == -1 and math.isnan(m.labels[i, m.label_names.index("no_finding")])
    for rid, (_, row) in official.items():
        k = m.ids.tolist().index(rid)
        assert m.patient_ids[k] == rid.split("/")[2]
        assert m.meta["meta_sex"][k] == row["Sex"][0]
        assert m.meta["meta_view"][k] == (row["AP/PA"] if row["Frontal/Lateral"] == "Frontal" else "LATERAL")
        assert (parent / m.paths[k]).is_file()


def test_official_valid_is_test_and_val_is_carved_per_patient(parent, tmp_path):
    out = tmp_path / "chexpert.csv"
    built = build_manifest("chexpert", parent, out, val=0.3, seed=0)
    m = read_manifest(out, parent)
    assert "lateral" not in " ".join(m.ids.tolist())  # views="frontal" by default
    split_of = dict(zip(m.ids.tolist(), m.splits.tolist()))
    for rid, (source, _) in _official(parent).items():
        if "lateral" in rid:
            continue
        assert (split_of[rid] == "test") == (source == "valid")
    train = {p for p, s in zip(m.patient_ids, m.splits) if s == "train"}
    val = {p for p, s in zip(m.patient_ids, m.splits) if s == "val"}
    assert train and val and not train & val
    assert any("valid.csv" in note for note in built.notes)


def test_valid_as_val_keeps_every_train_row_in_train(parent, tmp_path):
    build_manifest("chexpert", parent, tmp_path / "c.csv", valid_as="val")
    m = read_manifest(tmp_path / "c.csv", parent)
    assert {s for s, rid in zip(m.splits, m.ids) if "/valid/" in rid} == {"val"}
    assert {s for s, rid in zip(m.splits, m.ids) if "/train/" in rid} == {"train"}


def test_root_may_be_the_dataset_folder_and_missing_images_are_reported(parent, tmp_path):
    dataset = parent / "CheXpert-v1.0-small"
    (dataset / "train/patient00003/study1/view1_frontal.jpg").unlink()
    built = build_manifest("chexpert", dataset, tmp_path / "c.csv")
    m = read_manifest(tmp_path / "c.csv", dataset)
    assert all(p.startswith(("train/", "valid/")) for p in m.paths)
    assert built.missing == ["CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg"]
    assert "patient00003" not in m.patient_ids.tolist()


def test_bad_label_value_names_file_row_and_column(parent, tmp_path):
    csv_path = parent / "CheXpert-v1.0-small/train.csv"
    text = csv_path.read_text().replace("Female,68,Frontal,AP,1.0,", "Female,68,Frontal,AP,2.0,")
    csv_path.write_text(text)
    with pytest.raises(ManifestError, match=r"train.csv: column 'No Finding' row 2 holds '2.0'"):
        build_manifest("chexpert", parent, tmp_path / "c.csv")
    assert not (tmp_path / "c.csv").exists()


def test_missing_train_csv_says_where_it_looked(tmp_path):
    with pytest.raises(FeatcacheError, match="CheXpert train.csv not found"):
        build_manifest("chexpert", tmp_path, tmp_path / "c.csv")
