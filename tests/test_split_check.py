"""Patient-level split (on the full NIH metadata) and manifest check (planted leak, duplicates, bad values)."""

from __future__ import annotations

import csv
from collections import defaultdict

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from featcache.datasets import assign_splits, build_manifest, check_manifest, split_manifest
from featcache.errors import FeatcacheError, ManifestError
from featcache.store.manifest import write_manifest


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _patients_per_split(rows):
    splits = defaultdict(set)
    for r in rows:
        splits[r["patient_id"]].add(r["split"])
    return splits


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    """The full NIH ChestX-ray14 entry file (112,120 rows) as a manifest without splits."""
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("nih")
    (root / "Data_Entry_2017_v2020.csv.gz").symlink_to(
        SHARED_DATA / "nih_metadata/Data_Entry_2017_v2020.csv.gz"
    )
    build_manifest("nih", root, root / "nih.csv", check_files=False)
    return root / "nih.csv"


def test_full_nih_split_never_leaks_and_keeps_prevalence(nih, tmp_path):
    out = tmp_path / "a.csv"
    result = split_manifest(nih, out, val=0.1, test=0.2, seed=0, stratify="all")
    rows = _read(out)
    assert len(rows) == 112_120 and [r["id"] for r in rows] == [r["id"] for r in _read(nih)]
    per_patient = _patients_per_split(rows)
    assert len(per_patient) == 30_805
    assert all(len(s) == 1 for s in per_patient.values())  # no patient in two splits
    splits = np.array([r["split"] for r in rows])
    assert set(splits.tolist()) == {"train", "val", "test"}
    assert abs(np.mean(splits == "val") - 0.1) < 0.005 and abs(np.mean(splits == "test") - 0.2) < 0.005
    labels = [
        c for c in rows[0] if c not in ("path", "id", "patient_id", "split") and not c.startswith("meta_")
    ]
    assert len(labels) == 15
    for name in labels:
        y = np.array([r[name] == "1" for r in rows])
        overall = y.mean()
        for s in ("train", "val", "test"):
            share = y[splits == s].mean()
            assert abs(share - overall) <= 0.15 * overall, (name, s, share, overall)
            assert result.prevalence[name][s] == pytest.approx(share)
    assert result.counts["test"]["patients"] == len({r["patient_id"] for r in rows if r["split"] == "test"})


def test_full_nih_split_is_deterministic_for_a_seed(nih, tmp_path):
    split_manifest(nih, tmp_path / "a.csv", seed=3, stratify="hernia,pneumonia")
    split_manifest(nih, tmp_path / "b.csv", seed=3, stratify="hernia,pneumonia")
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_another_seed_gives_another_split(tmp_path):
    path, _ = _small(tmp_path, n_patients=200)
    split_manifest(path, tmp_path / "a.csv", seed=3, stratify="effusion")
    split_manifest(path, tmp_path / "c.csv", seed=4, stratify="effusion")
    a, c = _read(tmp_path / "a.csv"), _read(tmp_path / "c.csv")
    assert [r["split"] for r in a] != [r["split"] for r in c]
    assert all(len(s) == 1 for s in _patients_per_split(c).values())


def _small(tmp_path, n_patients=40, **extra):
    rng = np.random.default_rng(0)
    rows = {"path": [], "patient_id": [], "split": [], "effusion": [], "meta_site": []}
    for p in range(n_patients):
        for k in range(1 + p % 3):
            rows["path"].append(f"p{p}_{k}.png")
            rows["patient_id"].append(f"p{p}")
            rows["split"].append("")
            rows["effusion"].append(float(rng.random() < 0.3))
            rows["meta_site"].append(f"site{p % 5}")
    for key, value in extra.items():
        rows[key] = value
    return write_manifest(tmp_path / "m.csv", rows), rows


def test_rows_with_a_split_keep_it_and_pull_their_patient(tmp_path):
    path, rows = _small(tmp_path)
    rows["split"][rows["path"].index("p5_0.png")] = "test"  # p5 has images p5_0..p5_2
    rows["split"][rows["path"].index("p7_0.png")] = "val"
    write_manifest(path, rows)
    result = split_manifest(path, tmp_path / "out.csv", val=0.2, test=0.2, seed=0)
    out = {r["path"]: r["split"] for r in _read(tmp_path / "out.csv")}
    assert out["p5_0.png"] == out["p5_1.png"] == out["p5_2.png"] == "test"
    assert out["p7_0.png"] == out["p7_1.png"] == "val"
    assert result.kept == 2
    moved = split_manifest(path, tmp_path / "re.csv", val=0.2, test=0.2, seed=1, overwrite=True)
    assert moved.kept == 0
    assert all(len(s) == 1 for s in _patients_per_split(_read(tmp_path / "re.csv")).values())


def test_split_by_site_keeps_sites_and_patients_whole(tmp_path):
    path, _ = _small(tmp_path)
    split_manifest(path, tmp_path / "out.csv", val=0.2, test=0.2, by="meta_site")
    rows = _read(tmp_path / "out.csv")
    sites = defaultdict(set)
    for r in rows:
        sites[r["meta_site"]].add(r["split"])
    assert all(len(s) == 1 for s in sites.values()) and len({r["split"] for r in rows}) > 1


def test_assign_splits_does_not_depend_on_row_order():
    rng = np.random.default_rng(1)
    groups = np.array([f"g{i}" for i in rng.integers(0, 300, 2000)])
    strata = (rng.random((2000, 3)) < [0.05, 0.2, 0.5]).astype(np.float32)
    fractions = {"train": 0.7, "val": 0.1, "test": 0.2}
    a = assign_splits(groups, fractions, seed=5, strata=strata)
    perm = rng.permutation(2000)
    b = assign_splits(groups[perm], fractions, seed=5, strata=strata[perm])
    assert a[perm].tolist() == b.tolist()


def test_split_refuses_bad_requests(tmp_path):
    path, _ = _small(tmp_path)
    with pytest.raises(
        FeatcacheError, match=r"cannot stratify on \['cardiomegaly'\].*label columns: \['effusion'\]"
    ):
        split_manifest(path, tmp_path / "o.csv", stratify="cardiomegaly")
    with pytest.raises(FeatcacheError, match="val \\+ test < 1"):
        split_manifest(path, tmp_path / "o.csv", val=0.5, test=0.5)
    with pytest.raises(FeatcacheError, match="neither 'patient' nor a meta_\\* column"):
        split_manifest(path, tmp_path / "o.csv", by="meta_hospital")


def _png(path, value):
    """A small real PNG whose bytes differ for each ``value``."""
    from PIL import Image

    Image.fromarray(np.full((4, 4), value % 256, dtype=np.uint8)).save(path)


@pytest.fixture
def good(tmp_path):
    """A valid manifest with its image files: 3 patients, 6 images, two labels."""
    for i in range(6):
        _png(tmp_path / f"{i}.png", i)
    cols = {
        "path": [f"{i}.png" for i in range(6)],
        "id": [f"img{i}" for i in range(6)],
        "patient_id": ["a", "a", "b", "b", "c", "c"],
        "split": ["train", "train", "val", "val", "test", "test"],
        "effusion": [1.0, 0.0, 0.0, 0.0, 1.0, -1.0],
        "edema": [0.0, 1.0, 1.0, float("nan"), 0.0, 1.0],
    }
    return tmp_path, cols


def test_check_counts_each_split(good):
    folder, cols = good
    report = check_manifest(write_manifest(folder / "m.csv", cols))
    assert report.columns == ["train", "val", "test", "all"]
    assert report.count("images", "train") == 2 and report.count("patients", "all") == 3
    assert [report.count("effusion", s) for s in report.columns] == [1, 0, 1, 2]  # -1 is not a positive
    assert [report.count("edema", s) for s in report.columns] == [1, 1, 1, 3]
    assert report.warnings == ["label 'effusion' has no positives in val"]
    assert "effusion" in report.render().splitlines()[3]


@pytest.mark.parametrize(
    "plant, message",
    [
        (lambda c: c["split"].__setitem__(1, "test"), r"patients in more than one split \(leakage\): 'a'"),
        (lambda c: c["id"].__setitem__(3, "img2"), r"duplicate ids: 'img2' at rows 4, 5"),
        (lambda c: c["edema"].__setitem__(0, 2.0), r"label column 'edema' has values \['2'\] at rows 2"),
        (
            lambda c: c["path"].__setitem__(5, "gone.png"),
            r"rows 7 \(gone.png\) name image files that do not exist",
        ),
        (lambda c: c["path"].__setitem__(3, "0.png"), r"same image file is listed in more than one split"),
    ],
    ids=["leak", "duplicate-id", "bad-label", "missing-file", "same-image-two-splits"],
)
def test_check_fails_on_planted_problems(good, plant, message):
    folder, cols = good
    plant(cols)
    path = write_manifest(folder / "m.csv", cols)
    with pytest.raises(ManifestError, match=message):  # declared labels: a bad value is an error
        check_manifest(path, labels=["effusion", "edema"])
    r = CliRunner().invoke(cli.featcache, ["check", str(path), "--labels", "effusion,edema"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("Error: ")


def test_cli_split_then_check(tmp_path):
    path, _ = _small(tmp_path)
    for i, name in enumerate(_read(path)):
        _png(tmp_path / name["path"], i)
    out = tmp_path / "s.csv"
    r = CliRunner().invoke(cli.featcache, ["split", str(path), "--val", "0.2", "--test", "0.2", "--stratify", "effusion", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {out} (train: ") and "effusion" in r.output
    r = CliRunner().invoke(cli.featcache, ["check", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].split() == ["train", "val", "test", "all"]
    assert r.output.strip().endswith("passes every check")


def test_check_refuses_identical_files_in_two_splits(good):
    folder, cols = good
    (folder / "5.png").write_bytes((folder / "0.png").read_bytes())  # a copy under another name
    path = write_manifest(folder / "m.csv", cols)
    with pytest.raises(ManifestError) as e:
        check_manifest(path)
    msg = str(e.value)
    assert "row 2 (id 'img0', 0.png, train)" in msg and "row 7 (id 'img5', 5.png, test)" in msg
    assert "leakage" in msg and "\n" not in msg
    r = CliRunner().invoke(cli.featcache, ["check", str(path)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1


def test_check_warns_once_on_identical_files_in_one_split(good):
    folder, cols = good
    (folder / "1.png").write_bytes((folder / "0.png").read_bytes())
    report = check_manifest(write_manifest(folder / "m.csv", cols))
    dup = [w for w in report.warnings if "repeat the bytes" in w]
    assert dup == ["1 rows repeat the bytes of another image file of their split ('img0' = 'img1'); "
                   "they are not leakage but weigh those images twice"]  # fmt: skip


def test_undeclared_column_with_other_values_is_kept_as_metadata_with_one_note(good):
    folder, cols = good
    cols["edema"][0] = 2.0
    report = check_manifest(write_manifest(folder / "m.csv", cols))
    notes = [w for w in report.warnings if "edema" in w]
    assert len(notes) == 1 and len(notes[0]) < 300
