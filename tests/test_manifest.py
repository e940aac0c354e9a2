"""Manifest validation: every bad input names its rows, good input round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.errors import ManifestError
from featcache.store.manifest import read_manifest, write_manifest


def _files(root, names):
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def _csv(path, text):
    path.write_text(text)
    return path


def test_reads_labels_defaults_and_meta(tmp_path):
    _files(tmp_path, ["a.png", "b.png", "c.png"])
    m = read_manifest(
        _csv(
            tmp_path / "m.csv",
            "path,patient_id,split,effusion,mass,meta_view\na.png,p1,train,1,,PA\nb.png,p1,train,0,-1,AP\nc.png,,test,-1,1,PA\n",
        )
    )
    assert m.ids.tolist() == ["a.png", "b.png", "c.png"]  # id defaults to path
    assert m.patient_ids.tolist() == ["p1", "p1", "c.png"]  # patient defaults to id
    assert m.label_names == ["effusion", "mass"]
    np.testing.assert_array_equal(m.labels, np.array([[1, np.nan], [0, -1], [-1, 1]], np.float32))
    assert m.meta["meta_view"].tolist() == ["PA", "AP", "PA"]
    assert m.task == "multilabel"


def test_multiclass_and_digest_ignores_formatting(tmp_path):
    _files(tmp_path, ["a.png", "b.png"])
    m1 = read_manifest(_csv(tmp_path / "m1.csv", "path,label\na.png,normal\nb.png,pneumonia\n"))
    m2 = read_manifest(_csv(tmp_path / "m2.csv", "label , path\r\nnormal,a.png\r\npneumonia,b.png\r\n"))
    assert m1.task == "multiclass" and m1.classes.tolist() == ["normal", "pneumonia"]
    assert m1.digest() == m2.digest()
    m3 = read_manifest(_csv(tmp_path / "m3.csv", "path,label\na.png,normal\nb.png,normal\n"))
    assert m3.digest() != m1.digest()


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("path,id\na.png,x\nb.png,x\n", "duplicate ids: 'x' at rows 2, 3"),
        ("path\na.png\nmissing.png\n", "rows 3 (missing.png) name image files that do not exist"),
        (
            "path,patient_id,split\na.png,p,train\nb.png,p,test\n",
            "patients in more than one split (leakage): 'p'",
        ),
        ("path\n../a.png\n", "rows 2 (../a.png) have paths outside the root"),
        ("path\n/etc/passwd\n", "rows 2 (/etc/passwd) have paths outside the root"),
        ("path,split\na.png,training\n", "unknown split values ['training']"),
        ("path,effusion,label\na.png,1,x\n", "both a 'label' class column and binary label columns"),
        ("image,label\na.png,x\n", "no 'path' column"),
        ("path,mask\na.png,nomask.png\n", "name mask files that do not exist"),
        ("path,a\na.png,1,2\n", "different number of fields"),
    ],
)
def test_bad_manifests_name_rows(tmp_path, text, expect):
    _files(tmp_path, ["a.png", "b.png"])
    with pytest.raises(ManifestError) as e:
        read_manifest(_csv(tmp_path / "m.csv", text))
    msg = str(e.value)
    assert expect in msg
    assert "\n" not in msg and str(tmp_path / "m.csv") in msg


def test_all_problems_reported_at_once(tmp_path):
    _files(tmp_path, ["a.png"])
    with pytest.raises(ManifestError) as e:
        read_manifest(_csv(tmp_path / "m.csv", "path,id,split\na.png,x,train\nb.png,x,bogus\n"))
    msg = str(e.value)
    assert "duplicate ids" in msg and "unknown split" in msg and "do not exist" in msg


def test_missing_manifest_and_root(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")
    _csv(tmp_path / "m.csv", "path\na.png\n")
    with pytest.raises(ManifestError, match="root folder not found"):
        read_manifest(tmp_path / "m.csv", root=tmp_path / "nowhere")


def test_write_manifest_round_trip(tmp_path):
    _files(tmp_path, ["a.png", "b.png"])
    cols = {"path": ["a.png", "b.png"], "split": ["train", "test"], "effusion": [1.0, np.nan]}
    m = read_manifest(write_manifest(tmp_path / "w.csv", cols))
    np.testing.assert_array_equal(m.labels[:, 0], [1.0, np.nan])
    assert m.splits.tolist() == ["train", "test"]


@pytest.mark.parametrize("header", ["path,effusion,", "path,meta_", "path,meta_site/a"])
def test_bad_column_names(tmp_path, header):
    _files(tmp_path, ["a.png"])
    values = ",".join(["a.png"] + [""] * (header.count(",")))
    with pytest.raises(ManifestError, match="column names"):
        read_manifest(_csv(tmp_path / "m.csv", f"{header}\n{values}\n"))


def test_a_declared_label_column_with_other_values_names_the_rows(tmp_path):
    _files(tmp_path, ["a.png"])
    with pytest.raises(ManifestError, match=r"label column 'view' has values \['PA'\] at rows 2"):
        read_manifest(_csv(tmp_path / "m.csv", "path,view\na.png,PA\n"), labels=["view"])


@pytest.mark.parametrize("text", ["path,mean\na.png,1\n", "path,label\na.png,Mean\n"])
def test_a_label_or_class_named_mean_is_refused(tmp_path, text):
    """Result rows call the summary over labels 'mean': a label so named would collide with it."""
    _files(tmp_path, ["a.png"])
    with pytest.raises(ManifestError, match="rows use for the mean over labels; rename it") as e:
        read_manifest(_csv(tmp_path / "m.csv", text))
    assert "\n" not in str(e.value)
