"""PadChest adapter on a gzipped label CSV in the official BIMCV column layout, images in ImageDir folders."""

from __future__ import annotations

import csv
import gzip

import pytest

from featcache.datasets import build_manifest
from featcache.store.manifest import read_manifest

COLUMNS = (
    "ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,ViewPosition_DICOM,"
    "Projection,MethodProjection,Pediatric,Modality_DICOM,Manufacturer_DICOM,PhotometricInterpretation_DICOM,"
    "PixelRepresentation_DICOM,PixelAspectRatio_DICOM,SpatialResolution_DICOM,BitsStored_DICOM,"
    "WindowCenter_DICOM,WindowWidth_DICOM,Rows_DICOM,Columns_DICOM,XRayTubeCurrent_DICOM,Exposure_DICOM,"
    "ExposureInuAs_DICOM,ExposureTime,RelativeXRayExposure_DICOM,ReportID,Report,MethodLabel,Labels,"
    "Localizations,LabelsLocalizationsBySentence,labelCUIS,LocalizationsCUIS"
).split(",")
# (ImageID, ImageDir, StudyDate, PatientID, birth year, sex, Projection, MethodLabel, Labels)
ROWS = [
    ("2_1.png", "0", "20140915", "pat_a", "1939.0", "M", "PA", "Physician", "['pleural effusion', ' cardiomegaly']"),
    ("2_2.png", "0", "20140915", "pat_a", "1939.0", "M", "L", "Physician", "['pleural effusion', ' cardiomegaly']"),
    ("3_1.png", "1", "20120101", "pat_b", "1950.0", "F", "AP", "RNN_model", "['normal']"),
    ("4_1.png", "1", "20130505", "pat_c", "1960.0", "F", "AP_horizontal", "RNN_model", "[' lobar atelectasis', 'pneumonia', 'aortic elongation', 'kyphosis']"),
    ("5_1.png", "1", "20130505", "pat_d", "1961.0", "M", "PA", "RNN_model", "['']"),
    ("6_1.png", "2", "20130505", "pat_e", "1962.0", "M", "PA", "Physician", "['pacemaker', 'hiatal hernia']"),
]  # fmt: skip


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "padchest"
    root.mkdir()
    with gzip.open(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for image, folder, date, patient, birth, sex, proj, method, labels in ROWS:
            row = dict.fromkeys(COLUMNS, "")
            row.update(
                ImageID=image,
                ImageDir=folder,
                StudyDate_DICOM=date,
                StudyID=f"study_{patient}",
                PatientID=patient,
                PatientBirth=birth,
                PatientSex_DICOM=sex,
                Projection=proj,
                MethodLabel=method,
                Labels=labels,
                Report="derrame pleural, cardiomegalia.",
            )
            w.writerow([row[c] for c in COLUMNS])
    for image, folder, *_ in ROWS:
        if image != "6_1.png":  # one image missing on disk
            (root / folder).mkdir(exist_ok=True)
            (root / folder / image).write_bytes(b"\x89PNG")
    return root


def _value(m, image, name):
    return m.labels[m.ids.tolist().index(image), m.label_names.index(name)]


def test_terms_map_exactly_and_missing_labels_stay_blank(root, tmp_path):
    built = build_manifest("padchest", root, tmp_path / "pc.csv")
    m = read_manifest(tmp_path / "pc.csv", root)
    assert m.ids.tolist() == ["2_1.png", "3_1.png", "4_1.png", "5_1.png"]  # lateral and missing dropped
    assert built.missing == ["6_1.png"]
    assert _value(m, "2_1.png", "effusion") == 1 and _value(m, "2_1.png", "cardiomegaly") == 1
    assert _value(m, "2_1.png", "no_finding") == 0 and _value(m, "2_1.png", "pneumonia") == 0
    assert _value(m, "3_1.png", "no_finding") == 1 and _value(m, "3_1.png", "effusion") == 0
    assert _value(m, "4_1.png", "atelectasis") == 1  # ' lobar atelectasis' -> atelectasis
    assert _value(m, "4_1.png", "pneumonia") == 1 and _value(m, "4_1.png", "aortic_elongation") == 1
    assert _value(m, "4_1.png", "consolidation") == 0
    assert (m.labels[m.ids.tolist().index("5_1.png")] != m.labels[m.ids.tolist().index("5_1.png")]).all()
    assert "kyphosis" not in m.label_names  # terms outside the table do not become columns
    assert m.patient_ids.tolist() == ["pat_a", "pat_b", "pat_c", "pat_d"]
    assert m.paths.tolist() == ["0/2_1.png", "1/3_1.png", "1/4_1.png", "1/5_1.png"]
    assert m.meta["meta_age"].tolist() == ["75", "62", "53", "52"]
    assert m.meta["meta_label_method"].tolist() == ["Physician", "RNN_model", "RNN_model", "RNN_model"]
    assert set(m.splits.tolist()) == {""}


def test_all_views_and_devices(root, tmp_path):
    (root / "2" / "6_1.png").parent.mkdir(exist_ok=True)
    (root / "2" / "6_1.png").write_bytes(b"\x89PNG")
    build_manifest("padchest", root, tmp_path / "pc.csv", views="all")
    m = read_manifest(tmp_path / "pc.csv", root)
    assert len(m) == len(ROWS)
    assert m.meta["meta_view"].tolist() == [r[6] for r in ROWS]
    assert _value(m, "6_1.png", "support_devices") == 1 and _value(m, "6_1.png", "hernia") == 1
