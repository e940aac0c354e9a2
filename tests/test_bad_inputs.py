"""A corpus of bad inputs: each ends in one line naming the file or row, from the reader and from check.

Manifest cases go through ``read_manifest`` and ``featcache check``; file cases through
``read_image`` (or ``read_volume``) and ``featcache check`` on a one-row manifest. DICOM variants
are built in ``tmp_path`` from a real file of ``../shared/data/dicom_samples`` (skipped without it),
with patient data planted so that no failure reason may quote it.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from featcache.datasets import check_manifest
from featcache.datasets.dedup import (
    cross_split_duplicates,
    file_digest,
    hash_files,
    refuse_cross_split_duplicates,
)
from featcache.datasets.volumes import read_volume
from featcache.decode import dicom as dicom
from featcache.decode.images import check_header, read_image
from featcache.errors import FeatcacheError, ImageReadError, ManifestError
from featcache.store.manifest import read_manifest

SECRETS = ("SECRET^NAME", "SECRET-ID-42", "SECRET HOSPITAL")


def _one_line(msg: str, *names: str) -> None:
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    for n in names:
        assert n in msg, (n, msg)


def _png(path, value=0, size=(8, 8)):
    from PIL import Image

    Image.fromarray(np.full(size[::-1], value % 256, dtype=np.uint8)).save(path, format="PNG")
    return path


# ------------------------------------------------------------------------------------------ manifests


def _outside(tmp_path):
    far = tmp_path / "elsewhere"
    far.mkdir(exist_ok=True)
    _png(far / "secret.png", 7)
    return far


def _link_file(root, tmp_path):
    (root / "link.png").symlink_to(_outside(tmp_path) / "secret.png")


def _link_dir(root, tmp_path):
    (root / "linked").symlink_to(_outside(tmp_path), target_is_directory=True)


def _folder(root, tmp_path):
    (root / "adir.png").mkdir()


MANIFESTS = {
    # name: (csv bytes, what to prepare under the root, substrings the message must hold)
    "no-path-column": (b"image,effusion\na.png,1\n", None, ["no 'path' column"]),
    "duplicate-ids": (b"path,id\na.png,x\nb.png,x\n", None, ["duplicate ids: 'x' at rows 2, 3"]),
    "bom-then-bad-label": ("\ufeffpath,effusion\na.png,yes\n".encode(), None, ["column 'effusion'", "rows 2"]),
    "empty-file": (b"", None, ["empty file"]),
    "header-only": (b"path,effusion\n", None, ["no data rows"]),
    "not-utf8": ("path,meta_site\na.png,K\xf6ln\n".encode("latin-1"), None, ["save it as UTF-8"]),
    "nul-byte": (b"path\na.png\x00\n", None, ["rows 2 have control characters (e.g. NUL)"]),
    "ragged-rows": (b"path,effusion\na.png,1,0\nb.png\n", None, ["rows 2, 3 have a different number"]),
    "bad-split": (b"path,split\na.png,training\n", None, ["rows 2", "unknown split values ['training']"]),
    "label-two": (b"path,effusion\na.png,2\n", None, ["column 'effusion' has values ['2'] at rows 2"]),
    "label-yes": (b"path,effusion\na.png,yes\n", None, ["values ['yes'] at rows 2"]),
    "empty-path": (b"path,id\n,x\na.png,y\n", None, ["rows 2 have an empty 'path'"]),
    "dotdot": (b"path\n../a.png\n", None, ["rows 2 (../a.png) have paths outside the root"]),
    "absolute": (b"path\n/etc/passwd\n", None, ["rows 2 (/etc/passwd) have paths outside the root"]),
    "symlink-file": (b"path\nlink.png\n", _link_file, ["rows 2 (link.png)", "symbolic link"]),
    "symlink-dir": (b"path\nlinked/secret.png\n", _link_dir, ["rows 2 (linked/secret.png)", "symbolic link"]),
    "mask-symlink": (b"path,mask\na.png,link.png\n", _link_file, ["rows 2 (link.png) have mask paths", "link"]),
    "missing-file": (b"path\na.png\ngone.png\n", None, ["rows 3 (gone.png) name image files that do not exist"]),
    "missing-mask": (b"path,mask\na.png,gone.png\n", None, ["rows 2 (gone.png) name mask files"]),
    "folder-not-file": (b"path\nadir.png\n", _folder, ["rows 2 (adir.png) name folders"]),
    "patient-two-splits": (b"path,patient_id,split\na.png,p,train\nb.png,p,test\n", None, ["'p' in ['test', 'train']"]),
    "meta-dotdot": (b"path,meta_..\na.png,x\n", None, ["'meta_..' starts with '.'"]),
    "meta-dot": (b"path,meta_.\na.png,x\n", None, ["'meta_.' starts with '.'"]),
    "bare-meta": (b"path,meta_\na.png,x\n", None, ["'meta_' is a bare 'meta_'"]),
    "slash-column": (b"path,meta_a/b\na.png,x\n", None, ["contains '/'"]),
    "dunder-column": (b"path,__zarr\na.png,1\n", None, ["'__zarr' starts with '.' or '__'"]),
    "trailing-comma": (b"path,effusion,\na.png,1,\n", None, ["'' is empty"]),
    "duplicate-columns": (b"path,a,a\na.png,1,1\n", None, ["duplicate column names ['a']"]),
    "label-and-class": (b"path,effusion,label\na.png,1,x\n", None, ["both a 'label' class column"]),
}  # fmt: skip


DECLARED = {"bom-then-bad-label", "label-two", "label-yes"}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_bad_manifest_is_one_line(tmp_path, case):
    text, prepare, expect = MANIFESTS[case]
    root = tmp_path / "root"
    root.mkdir()
    _png(root / "a.png", 1)
    _png(root / "b.png", 2)
    if prepare is not None:
        prepare(root, tmp_path)
    csv = root / "m.csv"
    csv.write_bytes(text)
    # a bad value in a column is an error once the column is declared a label (undeclared, such a
    # column is kept as metadata with a note)
    labels = ["effusion"] if case in DECLARED else None
    with pytest.raises(ManifestError) as e:
        read_manifest(csv, labels=labels)
    _one_line(str(e.value), str(csv), *expect)
    with pytest.raises(ManifestError) as e:
        check_manifest(csv, labels=labels)
    _one_line(str(e.value), *expect)
    r = CliRunner().invoke(cli.featcache, ["check", str(csv), *(["--labels", "effusion"] if labels else [])])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and r.output.startswith("Error: ")


def test_link_inside_the_root_is_accepted(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").symlink_to(tmp_path / "a.png")  # stays inside: fine
    (tmp_path / "m.csv").write_text("path\nsub/b.png\n")
    assert read_manifest(tmp_path / "m.csv").paths.tolist() == ["sub/b.png"]


# ----------------------------------------------------------------------------------------------- files


def _truncated_png(path):
    _png(path.with_suffix(".full.png"), 3, (64, 64))
    data = path.with_suffix(".full.png").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _huge_png(path, side=100_000, colour=0):
    """A valid PNG header declaring ``side`` x ``side`` pixels followed by almost nothing."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, colour, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


FILES = {
    # name: (file name, writer, message substring, whether check finds it without decoding)
    "zero-byte-png": ("a.png", lambda p: p.write_bytes(b""), "empty file (0 bytes)", True),
    "truncated-png": ("a.png", _truncated_png, "truncated", True),
    "text-as-png": ("a.png", lambda p: p.write_text("hello"), "not a recognised image", True),
    "png-named-dcm": ("a.dcm", lambda p: _png(p, 5), "DICOM file has no pixel data", True),
    "huge-png": ("a.png", _huge_png, "decompression bomb", True),
    "huge-rgb-png": (
        "a.png",
        lambda p: _huge_png(p, 8000, colour=2),
        "192,000,000 pixel values, above",
        True,
    ),
}


def _dicom(shared, **changes):
    import pydicom

    ds = pydicom.dcmread(shared / "dicom_samples/files/CT_small.dcm")
    ds.PatientName, ds.PatientID, ds.InstitutionName = SECRETS
    for k, v in changes.items():
        if v is None:
            del ds[k]
        else:
            setattr(ds, k, v)
    return ds


def _save(ds, path, deflate=False):
    import pydicom

    if deflate:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


DICOMS = {
    # name: (changes to the real CT, message substring, check finds it)
    "no-pixel-data": ({"PixelData": None}, "no pixel data", True),
    "bad-bits-allocated": ({"BitsAllocated": 12}, "BitsAllocated 12 is not one of", True),
    "huge-dimensions": ({"Rows": 60_000, "Columns": 60_000}, "above the limit of 178,956,970", True),
    "zero-rows": ({"Rows": 0}, "empty or negative size", True),
    "truncated-pixels": ({"PixelData": b"\0" * 100}, "cannot decode pixel data", False),
    "many-frames": ({"NumberOfFrames": 4, "PixelData": b"\0" * (4 * 128 * 128 * 2)}, "has 4 frames", True),
    "odd-photometric": ({"PhotometricInterpretation": "SECRET^NAME"}, "cannot decode pixel data", False),
}


def _expect_read_error(path, expect, check):
    with pytest.raises(ImageReadError) as e:
        read_image(path)
    _one_line(str(e.value), str(path), expect)
    reasons = [str(e.value)]
    csv = path.parent / "m.csv"
    csv.write_text(f"path\n{path.name}\n")
    if check:
        with pytest.raises(FeatcacheError) as e:
            check_manifest(csv)
        _one_line(str(e.value), str(path), expect)
        reasons.append(str(e.value))
        r = CliRunner().invoke(cli.featcache, ["check", str(csv)])
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    return reasons


@pytest.mark.parametrize("case", list(FILES))
def test_bad_image_file_is_one_line(tmp_path, case):
    name, write, expect, check = FILES[case]
    write(tmp_path / name)
    _expect_read_error(tmp_path / name, expect, check)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # planted by the test itself
@pytest.mark.parametrize("case", list(DICOMS))
def test_bad_dicom_is_one_line_and_quotes_no_header_text(tmp_path, shared_data, case):
    changes, expect, check = DICOMS[case]
    path = tmp_path / "x.dcm"
    _save(_dicom(shared_data, **changes), path)
    for reason in _expect_read_error(path, expect, check):
        assert not any(s in reason for s in (*SECRETS, "SECRET")), reason


def test_limit_is_configurable_and_guards_deflated_files(tmp_path, shared_data, monkeypatch):
    path = tmp_path / "d.dcm"
    _save(_dicom(shared_data), path, deflate=True)
    assert read_image(path).shape == (128, 128)  # 16,384 values: within the default
    monkeypatch.setenv("FEATCACHE_MAX_PIXELS", "16000")
    with pytest.raises(ImageReadError, match="16,384 pixel values, above the limit of 16,000"):
        read_image(path)
    with pytest.raises(ImageReadError, match="above the limit"):
        check_header(path)
    # A deflated data set that inflates far beyond what its header declares is refused while inflating.
    monkeypatch.setenv("FEATCACHE_MAX_PIXELS", "20000")
    monkeypatch.setattr(dicom, "_DEFLATE_SLACK", 0)
    _save(_dicom(shared_data, PixelData=b"\0" * 2_000_000), path, deflate=True)
    with pytest.raises(ImageReadError, match="deflated file inflates beyond 80,000 bytes"):
        read_image(path)
    monkeypatch.setenv("FEATCACHE_MAX_PIXELS", "lots")
    with pytest.raises(ImageReadError, match="must be a positive integer"):
        read_image(path)


def test_volume_limits_and_links(tmp_path, shared_data, monkeypatch):
    import nibabel

    root = tmp_path / "root"
    (root / "series").mkdir(parents=True)
    for k in range(3):
        ds = _dicom(shared_data, InstanceNumber=k + 1, ImagePositionPatient=[0.0, 0.0, 2.0 * k])
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{k}"
        _save(ds, root / "series" / f"{k}.dcm")
    assert read_volume(root / "series", root=root).shape == (128, 128, 3)
    monkeypatch.setenv("FEATCACHE_MAX_PIXELS", str(2 * 128 * 128))
    with pytest.raises(ImageReadError, match="DICOM series of 3 files declares 49,152 pixel values"):
        read_volume(root / "series")
    monkeypatch.delenv("FEATCACHE_MAX_PIXELS")
    outside = tmp_path / "outside.dcm"
    outside.write_bytes((root / "series" / "0.dcm").read_bytes())
    (root / "series" / "3.dcm").symlink_to(outside)
    with pytest.raises(ImageReadError) as e:
        read_volume(root / "series", root=root)
    _one_line(str(e.value), "3.dcm", "outside the root")
    # A NIfTI header declaring 10^10 voxels is refused before any data is read.
    nibabel.save(nibabel.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "huge.nii")
    raw = bytearray((tmp_path / "huge.nii").read_bytes())
    raw[40:56] = struct.pack("<8h", 3, 5000, 5000, 400, 1, 1, 1, 1)  # dim[0..7] of the NIfTI-1 header
    (tmp_path / "huge.nii").write_bytes(raw)
    with pytest.raises(ImageReadError) as e:
        read_volume(tmp_path / "huge.nii")
    _one_line(str(e.value), "huge.nii", "10,000,000,000 pixel values")
    # A multi-frame file declaring many frames over a short pixel data element.
    _save(_dicom(shared_data, NumberOfFrames=20_000), tmp_path / "mf.dcm")
    with pytest.raises(ImageReadError, match="DICOM volume declares 327,680,000"):
        read_volume(tmp_path / "mf.dcm")


# ---------------------------------------------------------------------------------------------- dedup


def test_hashes_match_hashlib_and_the_cache_skips_unchanged_files(tmp_path):
    paths = [_png(tmp_path / f"{i}.png", i, (16 + i, 9)) for i in range(6)]
    want = [hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest() for p in paths]
    assert [file_digest(p) for p in paths] == want
    cache = tmp_path / "hashes.json"
    assert hash_files(paths, workers=3, cache=cache) == (want, 6)
    assert hash_files(paths, workers=3, cache=cache) == (want, 0)  # nothing re-read
    _png(paths[2], 200, (30, 30))
    digests, n_read = hash_files(paths, cache=cache)
    assert n_read == 1 and digests[2] == hashlib.blake2b(paths[2].read_bytes(), digest_size=16).hexdigest()


def test_cross_split_duplicates_match_a_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    n = 24
    content = rng.integers(0, 8, n)  # 8 distinct images spread over 24 rows
    splits = rng.choice(["train", "val", "test", ""], n)
    for i in range(n):
        _png(tmp_path / f"{i}.png", int(content[i]) * 17)
    lines = ["path,split"] + [f"{i}.png,{splits[i]}" for i in range(n)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    m = read_manifest(tmp_path / "m.csv")
    found = {frozenset(g.rows) for g in cross_split_duplicates(m)}
    data = [(tmp_path / f"{i}.png").read_bytes() for i in range(n)]
    groups = {frozenset(j for j in range(n) if data[j] == data[i]) for i in range(n)}
    want = {g for g in groups if len({splits[i] for i in g} - {""}) > 1}
    assert found == want and want
    with pytest.raises(ManifestError) as e:
        refuse_cross_split_duplicates(m)
    _one_line(str(e.value), str(tmp_path / "m.csv"), "identical bytes", "leakage")
    # The same rows with every split set to train: no leakage, and the repeats are counted once.
    (tmp_path / "t.csv").write_text("\n".join(["path,split"] + [f"{i}.png,train" for i in range(n)]) + "\n")
    report = refuse_cross_split_duplicates(read_manifest(tmp_path / "t.csv"))
    assert sum(len(g.rows) - 1 for g in report.within_split) == n - len(groups)
    assert len(report.warnings) == 1 and report.warnings[0].startswith(f"{n - len(groups)} rows repeat")
