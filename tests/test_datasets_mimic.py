"""MIMIC-CXR-JPG adapter on gzipped files in the official PhysioNet layout (metadata, chexpert, split, files/)."""

from __future__ import annotations

import csv
import gzip

import pytest

from featcache.datasets import build_manifest
from featcache.store.manifest import read_manifest

META = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
    "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)
LABELS = (
    "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
    "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices"
)
# (dicom_id, subject_id, study_id, ViewPosition, official split)
IMAGES = [
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA", "train"),
    ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL", "train"),
    ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "AP", "train"),
    ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "10000764", "57375967", "AP", "validate"),
    ("fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818", "10000898", "50771383", "PA", "test"),
    ("ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c", "10000935", "51178377", "PA", "test"),
]
# study -> labeler output (1.0 / 0.0 / -1.0 / blank), in LABELS column order after subject_id, study_id.
STUDY_LABELS = {
    ("10000032", "50414267"): ",,,,,,,,1.0,,,,,",
    ("10000032", "53189527"): ",,,,,,,,1.0,,,,,",
    ("10000764", "57375967"): ",,1.0,,,,,,,-1.0,,,,",
    ("10000898", "50771383"): ",,,,,,,,1.0,,,,,",
    # study 51178377 of subject 10000935 has no labeler row
}


def _gz(path, lines):
    with gzip.open(path, "wt", newline="") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "mimic-cxr-jpg" / "2.0.0"
    root.mkdir(parents=True)
    _gz(
        root / "mimic-cxr-2.0.0-metadata.csv.gz",
        [META]
        + [
            f"{d},{s},{t},CHEST (PA AND LAT),{v},3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect"
            for d, s, t, v, _ in IMAGES
        ],
    )
    _gz(
        root / "mimic-cxr-2.0.0-chexpert.csv.gz",
        [LABELS] + [f"{s},{t},{v}" for (s, t), v in STUDY_LABELS.items()],
    )
    _gz(
        root / "mimic-cxr-2.0.0-split.csv.gz",
        ["dicom_id,study_id,subject_id,split"] + [f"{d},{t},{s},{sp}" for d, s, t, _, sp in IMAGES],
    )
    for d, s, t, _, _ in IMAGES:
        image = root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}" / f"{d}.jpg"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(b"\xff\xd8jpeg")
    return root


def _official_labels(root):
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "rt", newline="") as f:
        return {(r["subject_id"], r["study_id"]): r for r in csv.DictReader(f)}


def test_study_labels_join_every_image_of_the_study(root, tmp_path):
    out = tmp_path / "mimic.csv"
    build_manifest("mimic-cxr-jpg", root, out, views="all")
    m = read_manifest(out, root)
    with open(out, newline="") as f:
        cells = {r["id"]: r for r in csv.DictReader(f)}
    official = _official_labels(root)
    renamed = {"Pleural Effusion": "effusion", "No Finding": "no_finding", "Consolidation": "consolidation"}
    for d, s, t, _, _ in IMAGES:
        row = official.get((s, t))
        for source, name in renamed.items():
            want = {"1.0": "1", "0.0": "0", "-1.0": "-1", "": ""}[row[source]] if row else ""
            assert cells[d][name] == want, (d, source)
    i = m.ids.tolist().index("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714")
    assert m.labels[i, m.label_names.index("effusion")] == -1  # uncertain kept
    assert m.patient_ids.tolist() == [s for _, s, _, _, _ in IMAGES]
    assert m.meta["meta_study"].tolist() == [t for _, _, t, _, _ in IMAGES]
    assert m.paths[0] == "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"


def test_official_split_and_frontal_views(root, tmp_path):
    built = build_manifest("mimic-cxr-jpg", root, tmp_path / "mimic.csv")
    m = read_manifest(tmp_path / "mimic.csv", root)
    expected = {d: {"validate": "val"}.get(sp, sp) for d, _, _, v, sp in IMAGES if v in ("PA", "AP")}
    assert dict(zip(m.ids.tolist(), m.splits.tolist())) == expected
    assert any("without a row" in note for note in built.notes)  # study 51178377 has no labels
    i = m.ids.tolist().index("ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c")
    assert all(v != v for v in m.labels[i])  # all blank, never 0


def test_missing_jpgs_are_dropped_and_reported(root, tmp_path):
    gone = root / "files/p10/p10000898/s50771383/fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818.jpg"
    gone.unlink()
    built = build_manifest("mimic-cxr-jpg", root, tmp_path / "mimic.csv")
    assert built.missing == [gone.relative_to(root).as_posix()]
    assert (
        "fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818" not in read_manifest(tmp_path / "mimic.csv", root).ids
    )
