"""NIH ChestX-ray14 adapter on the real Data_Entry_2017_v2020.csv.gz and real image files (symlinked)."""

from __future__ import annotations

import csv
import gzip
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from featcache.datasets import build_manifest, nih
from featcache.errors import ManifestError
from featcache.store.manifest import read_manifest

ENTRY = "nih_metadata/Data_Entry_2017_v2020.csv.gz"
# The official finding names, as NIH spells them in `Finding Labels`.
NIH_FINDINGS = {
    "no_finding": "No Finding",
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "effusion": "Effusion",
    "infiltration": "Infiltration",
    "mass": "Mass",
    "nodule": "Nodule",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "edema": "Edema",
    "emphysema": "Emphysema",
    "fibrosis": "Fibrosis",
    "pleural_thickening": "Pleural_Thickening",
    "hernia": "Hernia",
}


def _entry_rows(shared):
    with gzip.open(shared / ENTRY, "rt", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The whole entry file as a manifest, without looking at images (one build for the module)."""
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("nih_full")
    (root / "Data_Entry_2017_v2020.csv.gz").symlink_to(SHARED_DATA / ENTRY)
    out = root / "nih.csv"
    built = build_manifest("nih", root, out, check_files=False)
    return built, read_manifest(out, root, check_files=False), _entry_rows(SHARED_DATA)


def _root_with_images(tmp_path, shared, n_first=20, n_second=20):
    """A dataset folder as the NIH archives unpack: the entry file + images_00N/images/*.png."""
    root = tmp_path / "nih"
    root.mkdir()
    (root / "Data_Entry_2017_v2020.csv.gz").symlink_to(shared / ENTRY)
    names = sorted(p.name for p in (shared / "nih_cxr14_tiny64/images").iterdir())[: n_first + n_second]
    for k, chunk in enumerate((names[:n_first], names[n_first:])):
        folder = root / f"images_00{k + 1}" / "images"
        folder.mkdir(parents=True)
        for name in chunk:
            shutil.copyfile(shared / "nih_cxr14_tiny64/images" / name, folder / name)
    return root, names


def test_every_row_matches_the_official_entry_file(full):
    built, m, entry = full
    assert len(m) == len(entry) == 112_120
    assert len(set(m.patient_ids.tolist())) == 30_805
    assert m.ids.tolist() == [r["Image Index"] for r in entry]
    assert m.patient_ids.tolist() == [r["Patient ID"] for r in entry]
    assert m.paths[0] == "images/00000001_000.png"  # documented layout when the disk is not read
    assert m.label_names == list(NIH_FINDINGS)
    for j, (name, official) in enumerate(NIH_FINDINGS.items()):
        expected = [float(official in r["Finding Labels"].split("|")) for r in entry]
        assert m.labels[:, j].tolist() == expected, name
    # NIH labels every finding for every image: no blanks, and No Finding excludes every finding.
    assert not np.isnan(m.labels).any()
    assert np.all(m.labels[m.labels[:, 0] == 1, 1:] == 0)
    assert m.meta["meta_view"].tolist() == [r["View Position"] for r in entry]
    assert m.meta["meta_sex"].tolist() == [r["Patient Gender"] for r in entry]
    assert m.meta["meta_age"][:3].tolist() == ["57", "58", "58"]
    assert built.split_counts() == {"": 112_120}


def test_images_found_in_subfolders_and_missing_reported(tmp_path, shared_data):
    root, names = _root_with_images(tmp_path, shared_data)
    built = build_manifest("nih", root, tmp_path / "nih.csv")
    m = read_manifest(tmp_path / "nih.csv", root)  # every listed file exists
    assert sorted(m.ids.tolist()) == names
    assert len(built.missing) == 112_120 - len(names)
    assert "missing" in built.summary() and str(112_120 - len(names)) in built.summary()
    assert all(p.startswith(("images_001/images/", "images_002/images/")) for p in m.paths)
    # Labels agree with the independently curated labels of the same images.
    with open(shared_data / "nih_cxr14_tiny64/labels.csv", newline="") as f:
        ref = {r["image_index"]: r for r in csv.DictReader(f)}
    for i, image in enumerate(m.ids):
        assert m.patient_ids[i] == ref[image]["patient_id"]
        for j, name in enumerate(m.label_names):
            assert m.labels[i, j] == float(ref[image][name]), (image, name)


def test_official_split_lists_are_honoured(tmp_path, shared_data):
    root, names = _root_with_images(tmp_path, shared_data)
    patient = {n: n.split("_")[0] for n in names}
    patients = sorted(set(patient.values()))
    test_patients = set(patients[::3])
    test = [n for n in names if patient[n] in test_patients]
    trainval = [n for n in names if patient[n] not in test_patients]
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(trainval) + "\n")
    build_manifest("nih", root, tmp_path / "nih.csv", val=0.3, seed=1)
    m = read_manifest(tmp_path / "nih.csv", root)
    split_of = dict(zip(m.ids.tolist(), m.splits.tolist()))
    assert sorted(n for n, s in split_of.items() if s == "test") == sorted(test)
    assert sorted(n for n, s in split_of.items() if s in ("train", "val")) == sorted(trainval)
    val = {m.patient_ids[i] for i in range(len(m)) if m.splits[i] == "val"}
    train = {m.patient_ids[i] for i in range(len(m)) if m.splits[i] == "train"}
    assert val and train and not (val & train)
    # The carve is seeded: same seed, same split.
    build_manifest("nih", root, tmp_path / "again.csv", val=0.3, seed=1)
    assert (tmp_path / "again.csv").read_text() == (tmp_path / "nih.csv").read_text()


def test_unknown_finding_names_the_row(tmp_path):
    header = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
    )
    (tmp_path / "Data_Entry_2017.csv").write_text(
        header
        + "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143\n"
        + "00000001_001.png,Cardiomegaly|Pleural Effusion,1,1,58,M,PA,2894,2729,0.143,0.143\n"
    )
    with pytest.raises(ManifestError, match=r"row 3 has finding 'Pleural Effusion'"):
        nih.build(tmp_path, check_files=False)


def test_cli_reports_missing_images(tmp_path, shared_data):
    root, names = _root_with_images(tmp_path, shared_data, 3, 2)
    out = tmp_path / "nih.csv"
    r = CliRunner().invoke(cli.featcache, ["manifest", "nih", "--root", str(root), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"nih: 5 images of {len({n.split('_')[0] for n in names})} patients" in r.output
    assert f"{112_120 - 5} images listed in the official files are missing" in r.output
    assert len(read_manifest(out, root)) == 5
