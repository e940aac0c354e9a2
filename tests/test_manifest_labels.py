"""Declared and inferred label columns: which manifest columns are findings, which are metadata."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.demo import make_demo_dataset
from featcache.errors import ManifestError
from featcache.store.manifest import read_manifest


def _write(tmp_path, text: str):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    path = tmp_path / "m.csv"
    path.write_text(text)
    return path


METADATA_CSV = (
    "path,patient_id,split,Effusion,went_to_icu,age,sex,site,Mass\n"
    "a.png,p1,train,1,0,63,F,Boston,\n"
    "b.png,p2,train,0,1,71,M,Boston,-1\n"
    "c.png,p3,test,,0,45,F,Paris,1\n"
)


def test_declared_labels_keep_the_other_columns_as_metadata(tmp_path):
    m = read_manifest(_write(tmp_path, METADATA_CSV), labels=["Mass", "Effusion"])
    assert m.label_source == "declared"
    assert m.label_names == ["Effusion", "Mass"]  # file order, not declaration order
    np.testing.assert_array_equal(m.labels, np.array([[1, np.nan], [0, -1], [np.nan, 1]], np.float32))
    assert sorted(m.meta) == ["meta_age", "meta_sex", "meta_site", "meta_went_to_icu"]
    assert m.meta["meta_went_to_icu"].tolist() == ["0", "1", "0"]  # a 0/1 column that is not a finding
    assert m.notes == []  # nothing was guessed


def test_declared_labels_as_comma_separated_text(tmp_path):
    m = read_manifest(_write(tmp_path, METADATA_CSV), labels=" Effusion , Mass ")
    assert m.label_names == ["Effusion", "Mass"]


def test_inferred_labels_are_the_all_binary_columns_with_one_short_note(tmp_path):
    m = read_manifest(_write(tmp_path, METADATA_CSV))
    assert m.label_source == "inferred"
    assert m.label_names == ["Effusion", "went_to_icu", "Mass"]  # every value 1/0/-1/blank
    assert sorted(m.meta) == ["meta_age", "meta_sex", "meta_site"]
    assert m.meta["meta_site"].tolist() == ["Boston", "Boston", "Paris"]
    assert len(m.notes) == 1
    note = m.notes[0]
    assert "age, sex, site" in note and "kept as metadata" in note and "--labels" in note
    assert len(note) < 200


def test_many_metadata_columns_give_one_short_note_not_an_error(tmp_path):
    # the metadata CSV that used to fail with one ~2,000-character error over 12 columns
    names = [f"col{i}" for i in range(12)]
    header = "path,Effusion," + ",".join(names)
    rows = [
        f"{p},{v}," + ",".join(f"value {p} {i}" for i in range(12)) for p, v in (("a.png", 1), ("b.png", 0))
    ]
    m = read_manifest(_write(tmp_path, "\n".join([header, *rows]) + "\n"))
    assert m.label_names == ["Effusion"]
    assert len(m.meta) == 12 and len(m.notes) == 1
    assert "col0, col1, col2, col3, col4 and 7 more" in m.notes[0] and len(m.notes[0]) < 200


def test_declared_label_with_bad_values_names_column_and_rows(tmp_path):
    with pytest.raises(ManifestError) as e:
        read_manifest(_write(tmp_path, METADATA_CSV), labels=["Effusion", "age"])
    msg = str(e.value)
    assert "declared label column 'age' has values ['45', '63', '71'] at rows 2, 3, 4" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("labels", "expect"),
    [
        (["Effusion", "Nodule"], "declared labels ['Nodule'] are not columns of the manifest"),
        (["split"], "declared labels ['split'] are reserved or metadata columns"),
        (["Mass", "Mass"], "labels ['Mass'] are declared more than once"),
    ],
)
def test_bad_declarations_are_one_clear_line(tmp_path, labels, expect):
    with pytest.raises(ManifestError, match=r"m\.csv: ") as e:
        read_manifest(_write(tmp_path, METADATA_CSV), labels=labels)
    assert expect in str(e.value)


def test_a_column_and_its_meta_twin_clash(tmp_path):
    text = "path,age,meta_age,Effusion\na.png,63,x,1\nb.png,71,y,0\n"
    with pytest.raises(ManifestError, match="columns 'age' and 'meta_age' would both be kept"):
        read_manifest(_write(tmp_path, text))


def test_class_column_with_metadata_columns_now_reads(tmp_path):
    m = read_manifest(_write(tmp_path, "path,label,view\na.png,normal,PA\nb.png,pneumonia,AP\n"))
    assert m.task == "multiclass" and m.label_names == []
    assert m.meta["meta_view"].tolist() == ["PA", "AP"]


def test_existing_manifests_read_the_same_with_or_without_declaration(tmp_path):
    path = make_demo_dataset(tmp_path, n_patients=6, size=16)
    inferred = read_manifest(path)
    declared = read_manifest(path, labels=inferred.label_names)
    assert inferred.label_names == ["cardiomegaly", "effusion", "nodule"] and inferred.notes == []
    assert inferred.digest() == declared.digest()  # the store sees the same manifest
    assert inferred.columns_digest() == declared.columns_digest()
