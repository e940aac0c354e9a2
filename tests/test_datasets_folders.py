"""Folder-layout adapters: Kermany pediatric pneumonia, class folders, MedMNIST .npz (real PneumoniaMNIST file)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cli
from featcache.datasets import build_manifest
from featcache.datasets.pediatric import patient_of
from featcache.errors import FeatcacheError
from featcache.store.manifest import read_manifest

KERMANY = {
    "train/NORMAL": ["IM-0115-0001.jpeg", "IM-0115-0002.jpeg", "NORMAL2-IM-0372-0001.jpeg"],
    "train/PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person10_virus_35.jpeg"],
    "val/NORMAL": ["NORMAL2-IM-1427-0001.jpeg"],
    "val/PNEUMONIA": ["person1946_bacteria_4874.jpeg"],
    "test/NORMAL": ["IM-0001-0001.jpeg", "NORMAL2-IM-0336-0001.jpeg"],
    "test/PNEUMONIA": ["person1_virus_6.jpeg", "person100_bacteria_475.jpeg"],
}


@pytest.fixture
def kermany(tmp_path):
    base = tmp_path / "chest_xray"
    for folder, names in KERMANY.items():
        (base / folder).mkdir(parents=True)
        for name in names:
            (base / folder / name).write_bytes(b"\xff\xd8jpeg")
    (base / "train/NORMAL/.DS_Store").write_bytes(b"")
    return tmp_path


def test_kermany_patient_ids_from_file_names():
    assert patient_of("person1_bacteria_1.jpeg") == ("person1", "bacteria")
    assert patient_of("person10_virus_35.jpeg") == ("person10", "virus")
    assert patient_of("IM-0115-0001.jpeg") == ("IM-0115", "")
    assert patient_of("NORMAL2-IM-0372-0001.jpeg") == ("NORMAL2-IM-0372", "")


def test_kermany_official_folders(kermany, tmp_path):
    built = build_manifest("pediatric-pneumonia", kermany, tmp_path / "k.csv")
    m = read_manifest(tmp_path / "k.csv", kermany)
    assert len(m) == sum(len(v) for v in KERMANY.values())
    for path, split, cls in zip(m.paths, m.splits, m.classes):
        folder = path.split("/")
        assert folder[0] == "chest_xray" and split == folder[1] and cls == folder[2].lower()
    pid = dict(zip(m.ids.tolist(), m.patient_ids.tolist()))
    assert (
        pid["chest_xray/train/NORMAL/IM-0115-0001.jpeg"] == pid["chest_xray/train/NORMAL/IM-0115-0002.jpeg"]
    )
    # person1 is in train and test folders: qualified by folder to keep the official split, and said so.
    assert pid["chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg"] == "train/person1"
    assert pid["chest_xray/test/PNEUMONIA/person1_virus_6.jpeg"] == "test/person1"
    assert pid["chest_xray/test/PNEUMONIA/person100_bacteria_475.jpeg"] == "person100"
    assert any("1 patient ids" in n for n in built.notes)


def test_kermany_without_official_split_and_pathogen_classes(kermany, tmp_path):
    build_manifest(
        "pediatric-pneumonia", kermany, tmp_path / "k.csv", official_split=False, classes="pathogen"
    )
    m = read_manifest(tmp_path / "k.csv", kermany)
    assert set(m.splits.tolist()) == {""}
    assert m.patient_ids.tolist().count("person1") == 3  # unqualified: one child, for `featcache split`
    assert sorted(set(m.classes.tolist())) == ["bacteria", "normal", "virus"]
    assert (
        m.meta["meta_pathogen"][m.ids.tolist().index("chest_xray/test/PNEUMONIA/person1_virus_6.jpeg")]
        == "virus"
    )


def test_class_folders_with_and_without_splits(tmp_path):
    flat = tmp_path / "flat"
    for cls, n in (("tb", 2), ("normal", 3)):
        (flat / cls / "sub").mkdir(parents=True)
        for i in range(n):
            Image.new("L", (4, 4)).save(flat / cls / ("sub" if i == 0 else "") / f"{i}.png")
    (flat / "normal" / "notes.txt").write_text("not an image")
    build_manifest("folder", flat, tmp_path / "flat.csv")
    m = read_manifest(tmp_path / "flat.csv", flat)
    assert sorted(zip(m.classes.tolist(), m.paths.tolist())) == [
        ("normal", "normal/1.png"),
        ("normal", "normal/2.png"),
        ("normal", "normal/sub/0.png"),
        ("tb", "tb/1.png"),
        ("tb", "tb/sub/0.png"),
    ]
    split_root = tmp_path / "split"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (split_root / split / cls).mkdir(parents=True)
            Image.new("L", (4, 4)).save(split_root / split / cls / "x.png")
    build_manifest("folder", split_root, tmp_path / "s.csv")
    m = read_manifest(tmp_path / "s.csv", split_root)
    assert [(p.split("/")[0], s) for p, s in zip(m.paths, m.splits)] == [(s, s) for s in m.splits]
    assert sorted(m.splits.tolist()) == ["test", "test", "train", "train"]
    with pytest.raises(FeatcacheError, match="no images found"):
        build_manifest("folder", tmp_path / "flat" / "tb" / "sub", tmp_path / "none.csv")


def test_medmnist_real_npz_written_as_pngs(shared_data, tmp_path):
    npz = shared_data / "pneumoniamnist_subset/pneumoniamnist_trainval.npz"
    out = tmp_path / "pmnist" / "pneumoniamnist.csv"
    built = build_manifest("medmnist", npz, out)
    m = read_manifest(out)  # paths are relative to the manifest's folder
    data = np.load(npz)
    assert len(m) == len(data["train_images"]) + len(data["val_images"]) == 2698
    assert (m.splits == "train").sum() == 2428 and (m.splits == "val").sum() == 270
    assert m.patient_ids.tolist() == m.ids.tolist()
    assert any("no patient ids" in n for n in built.notes)
    names = np.array(["normal", "pneumonia"])
    for split in ("train", "val"):
        sel = np.flatnonzero(m.splits == split)
        np.testing.assert_array_equal(m.classes[sel], names[data[f"{split}_labels"][:, 0]])
        for k in (0, 1, len(sel) - 1):
            pixels = np.asarray(Image.open(m.abspath(int(sel[k]))))
            np.testing.assert_array_equal(pixels, data[f"{split}_images"][k])
    # The shipped labels.csv (an independent export of the same arrays) agrees on every class.
    with open(shared_data / "pneumoniamnist_subset/labels.csv", newline="") as f:
        ref = {f"{r['split']}_{int(r['source_index']):05d}": r["label_name"] for r in csv.DictReader(f)}
    assert {i: c for i, c in zip(m.ids.tolist(), m.classes.tolist())} == ref


def test_medmnist_multilabel_and_cli(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "chestmnist.npz"
    labels = rng.integers(0, 2, size=(6, 14)).astype(np.uint8)
    np.savez(npz, train_images=rng.integers(0, 255, (4, 8, 8), dtype=np.uint8), train_labels=labels[:4],
             test_images=rng.integers(0, 255, (2, 8, 8), dtype=np.uint8), test_labels=labels[4:])  # fmt: skip
    out = tmp_path / "c" / "chest.csv"
    r = CliRunner().invoke(cli.featcache, ["manifest", "medmnist", "--root", str(npz), "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = read_manifest(out)
    assert m.label_names[:3] == ["atelectasis", "cardiomegaly", "effusion"] and len(m.label_names) == 14
    np.testing.assert_array_equal(m.labels, labels.astype(np.float32))
    assert m.splits.tolist() == ["train"] * 4 + ["test"] * 2
    bad = tmp_path / "organmnist3d.npz"
    np.savez(bad, train_images=np.zeros((2, 4, 4, 4), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    r = CliRunner().invoke(cli.featcache, ["manifest", "medmnist", "--root", str(bad), "--out", str(out)])
    assert r.exit_code == 1 and "only 2D MedMNIST" in r.output and "Traceback" not in r.output


def test_class_folders_keep_images_with_the_same_name_in_subfolders(tmp_path):
    from featcache.datasets import folder

    for rel in ("cat/p1/img1.png", "cat/p2/img1.png", "dog/img1.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / rel)
    m = folder.build(tmp_path)
    assert sorted(m.columns["path"]) == ["cat/p1/img1.png", "cat/p2/img1.png", "dog/img1.png"]
