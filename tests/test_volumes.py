"""Volumes as slice manifests, checked against nibabel and pydicom read directly: slice order,
orientation (through world coordinates), windowing, label volumes, 4D refusal, DICOM series sorted
by position not file name, and multi-frame enhanced CT."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from featcache.datasets.volumes import (
    WINDOW_PRESETS,
    expand_volumes,
    parse_window,
    read_label_volume,
    read_volume,
    volume_slice,
)
from featcache.decode.images import read_image, read_mask
from featcache.errors import FeatcacheError, ImageReadError, ManifestError
from featcache.store.manifest import read_manifest


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _window(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The documented mapping, written out: [lo, hi] -> [0, 65535], clipped, rounded."""
    return np.round(np.clip((values.astype(np.float64) - lo) / (hi - lo), 0, 1) * 65535).astype(np.uint16)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# -------------------------------------------------------------------------------------------- windowing


def test_parse_window_presets_numbers_and_percentiles():
    lung = parse_window("lung")
    assert (lung.width, lung.level) == WINDOW_PRESETS["lung"] == (1500.0, -600.0)
    assert lung.bounds(np.zeros(3)) == (-1350.0, 150.0)
    w = parse_window("400,40")
    assert (w.kind, w.width, w.level) == ("fixed", 400.0, 40.0)
    p = parse_window("percentile:0.5,99.5")
    data = np.arange(1001, dtype=np.float64)
    assert p.bounds(data) == pytest.approx((5.0, 995.0))
    assert parse_window(None).bounds(data) == pytest.approx((10.0, 990.0))  # default: 1st-99th
    for bad in ("liver", "400", "0,40", "percentile:99,1", "percentile:a,b"):
        with pytest.raises(FeatcacheError, match="--window"):
            parse_window(bad)


# ------------------------------------------------------------------------------------------------ NIfTI


def _expected_slices(img: nib.Nifti1Image, data: np.ndarray, shape: tuple[int, int, int], axis: int, k: int):
    """Reference slice from nibabel's own affines: for every display pixel, the canonical voxel given
    by the documented layout (rows: decreasing second in-plane RAS axis, columns: decreasing first),
    its world point through the canonical affine, and the original voxel through the file's affine."""
    canon = nib.as_closest_canonical(img)
    plane = [a for a in range(3) if a != axis]
    n_rows, n_cols = shape[plane[1]], shape[plane[0]]
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    vox = np.zeros((n_rows, n_cols, 3))
    vox[..., axis] = k
    vox[..., plane[1]] = shape[plane[1]] - 1 - r
    vox[..., plane[0]] = shape[plane[0]] - 1 - c
    world = nib.affines.apply_affine(canon.affine, vox)
    orig = np.rint(nib.affines.apply_affine(np.linalg.inv(img.affine), world)).astype(int)
    return data[orig[..., 0], orig[..., 1], orig[..., 2]], world


def test_nifti_mr_volume_against_nibabel(shared_data, tmp_path):
    folder = shared_data / "volumes"
    img = nib.load(folder / "anatomical.nii")
    raw = np.asarray(img.get_fdata())
    labels_raw = np.asarray(nib.load(folder / "anatomical_label.nii.gz").dataobj)
    vol = read_volume(folder / "anatomical.nii")
    assert vol.shape == img.shape and nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    lab = read_label_volume(folder / "anatomical_label.nii.gz", vol)
    assert lab.sum() == labels_raw.sum() == 330

    for axis in (2, 1, 0):
        for k in (0, vol.shape[axis] // 2, vol.shape[axis] - 1):
            ref, world = _expected_slices(img, raw, vol.shape, axis, k)
            assert np.array_equal(volume_slice(vol.data, axis, k), ref)
            # display convention in world terms: down the rows the superior (axial: anterior) coordinate
            # falls, along the columns right->left (sagittal: anterior->posterior) it falls
            down = {2: 1, 1: 2, 0: 2}[axis]
            across = {2: 0, 1: 0, 0: 1}[axis]
            assert (np.diff(world[..., down], axis=0) < 0).all() and (
                np.diff(world[..., across], axis=1) < 0
            ).all()
            ref_lab, _ = _expected_slices(img, labels_raw, vol.shape, axis, k)
            assert np.array_equal(volume_slice(lab, axis, k), ref_lab)
        # slice index runs along increasing RAS coordinate of the axis
        assert vol.affine[axis, axis] > 0

    manifest = _write_csv(
        tmp_path / "vols.csv",
        ["path", "id", "patient_id", "split", "mask", "abnormal", "meta_modality"],
        [["anatomical.nii", "mr1", "subj1", "train", "anatomical_label.nii.gz", 1, "MR"]],
    )
    result = expand_volumes(manifest, tmp_path / "slices", root=folder, window="percentile")
    lo, hi = np.percentile(raw, [1, 99])
    m = read_manifest(result.manifest)  # a valid image manifest, files present
    assert result.n_slices == len(m) == 25
    assert (
        list(m.ids[:2]) == ["mr1#0", "mr1#1"]
        and set(m.patient_ids) == {"subj1"}
        and set(m.splits) == {"train"}
    )
    assert m.label_names == ["abnormal"] and (m.labels == 1).all()
    assert list(m.meta["meta_volume"]) == ["mr1"] * 25 and list(m.meta["meta_slice"]) == [
        str(k) for k in range(25)
    ]
    assert set(m.meta["meta_modality"]) == {"MR"}
    total = 0
    for k in range(25):
        ref, _ = _expected_slices(img, raw, vol.shape, 2, k)
        png = _png(m.abspath(k))
        assert png.dtype == np.uint16 and np.array_equal(png, _window(ref, lo, hi))
        assert np.allclose(read_image(m.abspath(k)), _window(ref, lo, hi) / 65535.0)
        ref_lab, _ = _expected_slices(img, labels_raw, vol.shape, 2, k)
        mask = read_mask(m.root / m.masks[k])
        assert np.array_equal(mask, ref_lab)
        total += int(mask.sum())
    assert total == 330


def test_every_and_axis_choose_slices(shared_data, tmp_path):
    path = shared_data / "volumes" / "anatomical.nii"
    manifest = _write_csv(tmp_path / "v.csv", ["path", "id"], [[path.name, "mr"]])
    r = expand_volumes(manifest, tmp_path / "s", root=path.parent, axis=0, every=10, window="100,50")
    m = read_manifest(r.manifest)
    assert list(m.meta["meta_slice"]) == ["0", "10", "20", "30"]  # 33 sagittal slices, every 10th
    vol = read_volume(path)
    assert np.array_equal(_png(m.abspath(1)), _window(volume_slice(vol.data, 0, 10), 0.0, 100.0))
    assert _png(m.abspath(1)).shape == (
        25,
        41,
    )  # sagittal: superior-inferior rows, anterior-posterior columns


def test_4d_file_refused_or_one_frame_taken(shared_data, tmp_path):
    path = shared_data / "volumes" / "example4d.nii.gz"
    with pytest.raises(ImageReadError, match=r"4D volume 128x96x24x2 .*--frame"):
        read_volume(path)
    with pytest.raises(ImageReadError, match="out of range"):
        read_volume(path, frame=2)
    img = nib.load(path)
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")  # canonical = first axis reversed
    vol = read_volume(path, frame=1)
    assert np.array_equal(vol.data, np.asarray(img.dataobj)[::-1, :, :, 1].astype(np.float32))
    manifest = _write_csv(tmp_path / "v.csv", ["path"], [[path.name]])
    root = str(path.parent)
    res = CliRunner().invoke(
        _featcache(), ["volumes", str(manifest), "--out", str(tmp_path / "s"), "--root", root]
    )
    assert res.exit_code == 1 and "Traceback" not in res.output and "--frame" in res.output
    res = CliRunner().invoke(
        _featcache(), ["volumes", str(manifest), "--out", str(tmp_path / "s"), "--root", root, "--frame", "0"]
    )
    assert res.exit_code == 0, res.output
    assert "24 slices of 1 volumes" in res.output


def _featcache():
    from cli import featcache

    return featcache


# ------------------------------------------------------------------------------------------------ DICOM


def _dicom_slice(path: Path, pixels: np.ndarray, position, orientation, series: str, instance: int, **extra):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", series, instance
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelSpacing = [0.7, 0.6]
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = list(position)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _series(folder: Path, positions, orientation, seed=0, names=None):
    """Write one slice per position under shuffled, misleading file names; returns the pixel arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    series = generate_uid()
    pixels = [rng.integers(0, 1400, size=(6, 8)) for _ in positions]
    names = names or [f"slice_{i:02d}.dcm" for i in rng.permutation(len(positions))]
    for i, pos in enumerate(positions):
        _dicom_slice(folder / names[i], pixels[i], pos, orientation, series, instance=len(positions) - i)
    (folder / "README.txt").write_text("not DICOM")  # ignored
    return pixels


def test_axial_dicom_series_sorted_by_position_with_hu_window(tmp_path):
    z = [7.5, -2.5, 5.0, 0.0, 2.5]  # written in this order, under shuffled names
    _series(tmp_path / "ct", [(-30.0, -20.0, zz) for zz in z], (1, 0, 0, 0, 1, 0))
    vol = read_volume(tmp_path / "ct")
    assert vol.shape == (8, 6, 5)
    assert np.allclose(np.diag(vol.affine)[:3], [0.6, 0.7, 2.5], atol=1e-3)  # spacing, slices 2.5 mm apart
    # the reference, straight from pydicom: files ordered by z (RAS z = DICOM z: inferior first), HU
    files = [pydicom.dcmread(f) for f in (tmp_path / "ct").glob("*.dcm")]
    files.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in files]
    manifest = _write_csv(tmp_path / "v.csv", ["path", "id", "split"], [["ct", "ct1", "test"]])
    m = read_manifest(expand_volumes(manifest, tmp_path / "slices", window="lung").manifest)
    assert len(m) == 5 and list(m.splits) == ["test"] * 5
    for k in range(5):
        # the standard axial layout (anterior up, patient right on the left) is the stored pixel array
        assert np.array_equal(volume_slice(vol.data, 2, k), hu[k])
        assert np.array_equal(_png(m.abspath(k)), _window(hu[k], -1350.0, 150.0))  # lung: W1500 L-600


def test_coronal_dicom_series_orientation(tmp_path):
    # coronal slices: rows run towards patient left (+x), columns towards inferior (-z); normal +y (posterior)
    y = [10.0, 30.0, 20.0, 0.0]
    pixels = _series(tmp_path / "cor", [(-30.0, yy, 40.0) for yy in y], (1, 0, 0, 0, 0, -1), seed=1)
    vol = read_volume(tmp_path / "cor")
    order = np.argsort(y)[::-1]  # RAS anterior = -DICOM y: the most posterior slice (largest y) first
    for k, i in enumerate(order):
        # the standard coronal layout (superior up, patient right on the left) is the stored array
        assert np.array_equal(volume_slice(vol.data, 1, k), pixels[i] * 2.0 - 1024)


def test_dicom_series_errors(tmp_path):
    _series(tmp_path / "dup", [(0.0, 0.0, 1.0), (0.0, 0.0, 1.0)], (1, 0, 0, 0, 1, 0))
    with pytest.raises(ImageReadError, match="same position"):
        read_volume(tmp_path / "dup")
    _series(tmp_path / "two", [(0.0, 0.0, 1.0), (0.0, 0.0, 2.0)], (1, 0, 0, 0, 1, 0))
    _series(tmp_path / "other", [(0.0, 0.0, 3.0)], (1, 0, 0, 0, 1, 0), names=["x.dcm"])
    shutil.copy(tmp_path / "other" / "x.dcm", tmp_path / "two" / "x.dcm")
    with pytest.raises(ImageReadError, match="2 DICOM series"):
        read_volume(tmp_path / "two")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="no DICOM files"):
        read_volume(tmp_path / "empty")
    with pytest.raises(ImageReadError, match="not a volume"):
        read_volume(tmp_path / "two" / "README.txt")


def test_multiframe_enhanced_ct_against_pydicom(shared_data, tmp_path):
    path = shared_data / "dicom_samples" / "files" / "eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.astype(np.float64)
    per_frame = ds.PerFrameFunctionalGroupsSequence
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in per_frame]
    shared = ds.SharedFunctionalGroupsSequence[0]
    intercept = float(shared.PixelValueTransformationSequence[0].RescaleIntercept)
    orient = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert list(map(float, orient)) == [-1, 0, 0, 0, 1, 0] and z == [-159.0, -149.0]
    vol = read_volume(path)
    assert vol.shape == (512, 512, 2)
    manifest = _write_csv(tmp_path / "v.csv", ["path", "id"], [[path.name, "ect"]])
    m = read_manifest(expand_volumes(manifest, tmp_path / "s", root=path.parent, window="100,40").manifest)
    for k, i in enumerate(np.argsort(z)):
        hu = frames[i] + intercept
        # rows run towards the patient's right (-x in LPS), so the display (right on the left) mirrors them
        assert np.array_equal(volume_slice(vol.data, 2, k), np.fliplr(hu))
        assert np.array_equal(_png(m.abspath(k)), _window(np.fliplr(hu), -10.0, 90.0))


def _item(**attrs) -> Dataset:
    item = Dataset()
    for k, v in attrs.items():
        setattr(item, k, v)
    return item


def _enhanced_ct(path: Path, pixels: np.ndarray, per_frame_rescale, shared_rescale=None, **top) -> Path:
    """A multi-frame enhanced CT of axial frames 1 mm apart; per_frame_rescale[i] is (slope, intercept)
    for frame i's own PixelValueTransformationSequence, or None for a frame without one."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = "CT", generate_uid()
    ds.NumberOfFrames, ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    shared = _item(
        PlaneOrientationSequence=[_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])],
        PixelMeasuresSequence=[_item(PixelSpacing=[0.7, 0.6], SliceThickness=1.0)],
        FrameVOILUTSequence=[_item(WindowCenter=40, WindowWidth=400)],
    )
    if shared_rescale is not None:
        slope, intercept = shared_rescale
        shared.PixelValueTransformationSequence = [_item(RescaleSlope=slope, RescaleIntercept=intercept)]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for i, rescale in enumerate(per_frame_rescale):
        item = _item(PlanePositionSequence=[_item(ImagePositionPatient=[-30.0, -20.0, float(i)])])
        if rescale is not None:
            item.PixelValueTransformationSequence = [
                _item(RescaleSlope=rescale[0], RescaleIntercept=rescale[1])
            ]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    for k, v in top.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _dicom_linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window onto [0, 1], written out independently of pydicom."""
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


@pytest.mark.parametrize("fallback", ["shared", "top-level"])
def test_multiframe_frames_take_their_own_rescale(tmp_path, fallback):
    from featcache.decode.dicom import modality_values

    rng = np.random.default_rng(3)
    px = rng.integers(0, 1400, size=(4, 6, 8))
    own = [(2.0, -1000.0), None, (0.5, 10.0), None]  # frames 1 and 3 have no per-frame values
    if fallback == "shared":
        path = _enhanced_ct(tmp_path / "e.dcm", px, own, shared_rescale=(1.0, -1024.0))
        default = (1.0, -1024.0)
    else:  # no shared rescale: the top-level attributes apply
        path = _enhanced_ct(tmp_path / "e.dcm", px, own, RescaleSlope=3, RescaleIntercept=-7)
        default = (3.0, -7.0)
    expected = [px[i] * s + b for i, (s, b) in enumerate(r or default for r in own)]
    vol = read_volume(path)
    assert vol.shape == (8, 6, 4)
    for i in range(4):
        # frame i lies at z = i mm, so it is axial slice i; the axial layout is the stored array
        np.testing.assert_allclose(volume_slice(vol.data, 2, i), expected[i], rtol=1e-6)
        # read_image: the same modality values, then the shared window W400 L40
        np.testing.assert_allclose(
            read_image(path, frame=i), _dicom_linear_window(expected[i], 40, 400), atol=1e-6
        )
    # the data set is read, never changed: no frame's values are left behind for the next
    ds = pydicom.dcmread(path)
    before = ds.to_json_dict()
    for i in range(4):
        np.testing.assert_allclose(modality_values(ds.pixel_array[i], ds, i), expected[i])
    assert ds.to_json_dict() == before


def test_multiframe_frame_voi_sequence_is_per_frame(tmp_path):
    rng = np.random.default_rng(4)
    px = rng.integers(0, 1400, size=(2, 5, 7))
    path = _enhanced_ct(tmp_path / "w.dcm", px, [(1.0, -1024.0), (1.0, -1024.0)])
    ds = pydicom.dcmread(path)
    ds.PerFrameFunctionalGroupsSequence[1].FrameVOILUTSequence = [_item(WindowCenter=-600, WindowWidth=1500)]
    ds.save_as(path, enforce_file_format=True)
    hu = px - 1024.0
    np.testing.assert_allclose(read_image(path, frame=0), _dicom_linear_window(hu[0], 40, 400), atol=1e-6)
    np.testing.assert_allclose(read_image(path, frame=1), _dicom_linear_window(hu[1], -600, 1500), atol=1e-6)


def _without_decoder(monkeypatch, ts):
    """``ts``'s pixel decoder, reporting itself unavailable when a plugin for it is installed here."""
    from pydicom.pixels import get_decoder

    decoder = get_decoder(ts)
    if decoder.is_available:
        monkeypatch.setattr(type(decoder), "is_available", property(lambda self: False))
    return decoder


def test_series_without_a_decoder_fails_like_read_image(tmp_path, monkeypatch):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    _without_decoder(monkeypatch, JPEGLosslessSV1)
    _series(tmp_path / "jl", [(0.0, 0.0, float(z)) for z in range(3)], (1, 0, 0, 0, 1, 0))
    files = sorted((tmp_path / "jl").glob("*.dcm"))
    for f in files:  # the same series, its pixel data now in a syntax nothing here decodes
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([b"\x00" * 64])
        ds["PixelData"].VR = "OB"
        ds.save_as(f, enforce_file_format=True)
    image_errors = {}
    for f in files:
        with pytest.raises(ImageReadError) as e:
            read_image(f)
        image_errors[str(e.value)] = f
    with pytest.raises(ImageReadError) as e:
        read_volume(tmp_path / "jl")
    msg = str(e.value)
    assert msg in image_errors, msg
    assert "\n" not in msg
    assert msg.startswith(f"{image_errors[msg]}: no decoder installed for transfer syntax 'JPEG Lossless")
    # one file on its own (the multi-frame path) fails the same way
    with pytest.raises(ImageReadError) as e:
        read_volume(files[0])
    assert str(e.value) == next(m for m, f in image_errors.items() if f == files[0])


def test_manifest_problems_are_named(tmp_path, shared_data):
    manifest = _write_csv(tmp_path / "v.csv", ["path", "id"], [["missing.nii.gz", "a"]])
    with pytest.raises(FeatcacheError, match=r"line 2 \(missing.nii.gz\)"):
        expand_volumes(manifest, tmp_path / "s")
    manifest = _write_csv(tmp_path / "w.csv", ["path", "meta_slice"], [["anatomical.nii", "x"]])
    with pytest.raises(FeatcacheError, match="reserved"):
        expand_volumes(manifest, tmp_path / "s", root=shared_data / "volumes")
    img = nib.load(shared_data / "volumes" / "anatomical.nii")
    nib.save(nib.Nifti1Image(np.zeros((33, 41, 24), np.uint8), img.affine), tmp_path / "bad_label.nii.gz")
    with pytest.raises(ImageReadError, match="does not match the image"):
        read_label_volume(
            tmp_path / "bad_label.nii.gz", read_volume(shared_data / "volumes" / "anatomical.nii")
        )


def test_nan_voxels_do_not_blank_the_percentile_window():
    from featcache.datasets.volumes import apply_window, parse_window

    vol = np.arange(16 * 16 * 4, dtype=np.float32).reshape(16, 16, 4)
    vol[0, 0, :] = np.nan
    lo, hi = parse_window("percentile").bounds(vol)
    finite = vol[np.isfinite(vol)]
    np.testing.assert_allclose((lo, hi), np.percentile(finite.astype(np.float64), [1, 99]), rtol=1e-6)
    out = apply_window(vol, lo, hi)
    assert out[0, 0, 0] == 0 and out.max() == 65535


# ------------------------------------------------------------------------------------------ voxel spacing


def _spacing_of(m, k: int) -> tuple[float, float, float]:
    return tuple(float(m.meta[f"meta_spacing_{a}"][k]) for a in ("row", "col", "slice"))


@pytest.mark.parametrize(
    "axis, png_shape, expected",
    [
        # hand-derived from the file's affine below: canonical R 0.7 mm (5 voxels), A 0.9 mm (6), S 5.0 mm (4)
        (2, (6, 5), (0.9, 0.7, 5.0)),  # axial: rows anterior-posterior, columns right-left, slices S
        (1, (4, 5), (5.0, 0.7, 0.9)),  # coronal: rows superior-inferior, columns right-left, slices A
        (0, (4, 6), (5.0, 0.9, 0.7)),  # sagittal: rows superior-inferior, columns anterior-posterior
    ],
)
def test_spacing_columns_follow_the_slice_layout(tmp_path, axis, png_shape, expected):
    # voxel axes of the file: 0 -> superior (5.0 mm), 1 -> patient left (0.7 mm), 2 -> anterior (0.9 mm)
    affine = np.array([[0, -0.7, 0, 10.0], [0, 0, 0.9, -5.0], [5.0, 0, 0, 3.0], [0, 0, 0, 1]])
    data = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii.gz")
    manifest = _write_csv(tmp_path / "v.csv", ["path", "id", "split"], [["v.nii.gz", "v", "test"]])
    for every in (1, 2):
        out = tmp_path / f"s{every}"
        res = expand_volumes(manifest, out, axis=axis, every=every)
        m = read_manifest(res.manifest)
        assert len(m) == len(range(0, {2: 4, 1: 6, 0: 5}[axis], every))
        for k in range(len(m)):
            assert _png(m.abspath(k)).shape == png_shape  # rows and columns are the ones named above
            assert _spacing_of(m, k) == pytest.approx(
                expected, rel=1e-6
            )  # NIfTI stores float32; every ignored
        assert res.volumes[0]["spacing_mm"] == pytest.approx(list(expected))


def test_dicom_series_spacing_from_pixel_spacing_and_positions(tmp_path):
    # PixelSpacing [0.7, 0.6]: 0.7 mm between rows, 0.6 mm between columns; slices 2.5 mm apart
    _series(tmp_path / "ct" / "ax", [(-30.0, -20.0, z) for z in (5.0, 0.0, 7.5, 2.5)], (1, 0, 0, 0, 1, 0))
    # coronal slices 10 mm apart along y, rows running inferior (so 0.7 mm between superior-inferior rows)
    _series(tmp_path / "ct" / "cor", [(-30.0, y, 40.0) for y in (10.0, 30.0, 0.0, 20.0)], (1, 0, 0, 0, 0, -1))
    ax = read_manifest(
        expand_volumes(
            _write_csv(tmp_path / "a.csv", ["path", "split"], [["ct/ax", "test"]]), tmp_path / "a"
        ).manifest
    )
    cor = read_manifest(
        expand_volumes(
            _write_csv(tmp_path / "c.csv", ["path", "split"], [["ct/cor", "test"]]), tmp_path / "c", axis=1
        ).manifest
    )
    assert all(_spacing_of(ax, k) == pytest.approx((0.7, 0.6, 2.5)) for k in range(len(ax)))
    assert all(_spacing_of(cor, k) == pytest.approx((0.7, 0.6, 10.0)) for k in range(len(cor)))


def test_spacing_columns_are_reserved(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)), tmp_path / "v.nii")
    manifest = _write_csv(
        tmp_path / "v.csv", ["path", "split", "meta_spacing_slice"], [["v.nii", "test", "3"]]
    )
    with pytest.raises(ManifestError, match="meta_spacing_slice.*reserved"):
        expand_volumes(manifest, tmp_path / "s")
