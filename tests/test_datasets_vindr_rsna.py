"""VinDr-CXR and RSNA Pneumonia adapters on files in their official layouts."""

from __future__ import annotations

import csv

import pytest

from featcache.datasets import build_manifest
from featcache.store.manifest import read_manifest

VINDR_LABELS = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other diseases", "No finding",
]  # fmt: skip


def _vindr_row(image_id, rad, positives, labels=VINDR_LABELS):
    cells = ["1" if name in positives else "0" for name in labels]
    return ",".join([image_id, rad, *cells] if rad else [image_id, *cells])


@pytest.fixture
def vindr(tmp_path):
    root = tmp_path / "vindr-cxr" / "1.0.0"
    (root / "annotations").mkdir(parents=True)
    train = [
        # image a: 2 of 3 readers see cardiomegaly, 1 of 3 sees effusion
        ("a" * 32, "R8", {"Cardiomegaly", "Pleural effusion"}),
        ("a" * 32, "R9", {"Cardiomegaly"}),
        ("a" * 32, "R10", {"No finding"}),
        # image b: all three readers: no finding
        ("b" * 32, "R1", {"No finding"}),
        ("b" * 32, "R2", {"No finding"}),
        ("b" * 32, "R3", {"No finding"}),
    ]
    (root / "annotations/image_labels_train.csv").write_text(
        "\n".join([",".join(["image_id", "rad_id", *VINDR_LABELS])] + [_vindr_row(*r) for r in train]) + "\n"
    )
    test_labels = [n if n != "Other diseases" else "Other disease" for n in VINDR_LABELS]
    (root / "annotations/image_labels_test.csv").write_text(
        ",".join(["image_id", *test_labels])
        + "\n"
        + _vindr_row("c" * 32, "", {"Nodule/Mass", "Other disease", "Lung tumor"}, test_labels)
        + "\n"
    )
    for split, image_id in (("train", "a" * 32), ("train", "b" * 32), ("test", "c" * 32)):
        (root / split).mkdir(exist_ok=True)
        (root / split / f"{image_id}.dicom").write_bytes(b"DICM")
    return root


def test_vindr_majority_vote_and_test_consensus(vindr, tmp_path):
    built = build_manifest("vindr-cxr", vindr, tmp_path / "vindr.csv")
    m = read_manifest(tmp_path / "vindr.csv", vindr)
    rows = {rid: i for i, rid in enumerate(m.ids.tolist())}
    a, b, c = rows["a" * 32], rows["b" * 32], rows["c" * 32]

    def value(i, name):
        return m.labels[i, m.label_names.index(name)]

    assert value(a, "cardiomegaly") == 1 and value(a, "effusion") == 0 and value(a, "no_finding") == 0
    assert value(b, "no_finding") == 1 and value(b, "cardiomegaly") == 0
    assert value(c, "nodule_mass") == 1 and value(c, "other_diseases") == 1 and value(c, "lung_tumor") == 1
    assert value(c, "no_finding") == 0
    assert m.splits.tolist() == ["train", "train", "test"]
    assert m.patient_ids.tolist() == m.ids.tolist()  # no patient ids in VinDr-CXR
    assert m.paths.tolist() == [
        f"train/{'a' * 32}.dicom",
        f"train/{'b' * 32}.dicom",
        f"test/{'c' * 32}.dicom",
    ]
    assert len(m.label_names) == 28 and not (m.labels != m.labels).any()  # every label known, 0/1
    assert any("majority" in n for n in built.notes) and any("own patient" in n for n in built.notes)


def test_vindr_any_vote(vindr, tmp_path):
    build_manifest("vindr-cxr", vindr, tmp_path / "vindr.csv", aggregate="any")
    m = read_manifest(tmp_path / "vindr.csv", vindr)
    i = m.ids.tolist().index("a" * 32)
    assert m.labels[i, m.label_names.index("effusion")] == 1  # one of three readers is enough
    assert m.labels[i, m.label_names.index("no_finding")] == 1


RSNA = [
    "patientId,x,y,width,height,Target",
    "0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0",
    "00313ee0-9eaa-42f4-b0ab-c148ed3241cd,,,,,0",
    "00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1",
    "00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1",
    "00569f44-917d-4c86-a842-81832af98c30,,,,,0",
]
CLASSES = [
    "patientId,class",
    "0004cfab-14fd-4e49-80ba-63a80b6bddd6,No Lung Opacity / Not Normal",
    "00313ee0-9eaa-42f4-b0ab-c148ed3241cd,No Lung Opacity / Not Normal",
    "00436515-870c-4b36-a041-de91049b9ab4,Lung Opacity",
    "00436515-870c-4b36-a041-de91049b9ab4,Lung Opacity",
    "00569f44-917d-4c86-a842-81832af98c30,Normal",
]


@pytest.fixture
def rsna(tmp_path):
    root = tmp_path / "rsna"
    (root / "stage_2_train_images").mkdir(parents=True)
    (root / "stage_2_train_labels.csv").write_text("\n".join(RSNA) + "\n")
    (root / "stage_2_detailed_class_info.csv").write_text("\n".join(CLASSES) + "\n")
    for line in RSNA[1:4]:  # the last image is absent on disk
        (root / "stage_2_train_images" / f"{line.split(',')[0]}.dcm").write_bytes(b"DICM")
    return root


def test_rsna_one_row_per_image_with_target_and_boxes(rsna, tmp_path):
    built = build_manifest("rsna-pneumonia", rsna, tmp_path / "rsna.csv")
    m = read_manifest(tmp_path / "rsna.csv", rsna)
    with open(rsna / "stage_2_train_labels.csv", newline="") as f:
        official = list(csv.DictReader(f))
    target = {r["patientId"]: float(r["Target"]) for r in official}
    boxes = {pid: sum(r["patientId"] == pid and r["Target"] == "1" for r in official) for pid in target}
    assert m.ids.tolist() == list(target)[:3]  # one row per image, file order, missing one dropped
    assert built.missing == ["00569f44-917d-4c86-a842-81832af98c30"]
    assert m.label_names == ["pneumonia"]
    assert m.labels[:, 0].tolist() == [target[i] for i in m.ids]
    assert m.meta["meta_boxes"].tolist() == [str(boxes[i]) for i in m.ids]
    assert m.meta["meta_class"].tolist() == ["No Lung Opacity / Not Normal"] * 2 + ["Lung Opacity"]
    assert set(m.splits.tolist()) == {""}  # no official split
    assert m.paths[0] == "stage_2_train_images/0004cfab-14fd-4e49-80ba-63a80b6bddd6.dcm"
