"""Image readers and preprocessing, checked against numpy/PIL/pydicom references and hand-computed cases."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.decode.images import is_dicom, read_image, read_mask
from featcache.errors import FeatcacheError, ImageReadError
from featcache.extract.transform import model_input
from featcache.store.preprocess import IMAGENET_MEAN, IMAGENET_STD, PIPELINE, Preprocess

RNG = np.random.default_rng(0)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def _window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window, mapped to [0, 1] (written out independently of pydicom)."""
    c, w = center - 0.5, width - 1.0
    return np.clip((x - c) / w + 0.5, 0.0, 1.0)


def _pil_resize(plane: np.ndarray, size_hw: tuple[int, int], method) -> np.ndarray:
    return np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize(size_hw[::-1], method))


def _denorm(x: torch.Tensor, pre: Preprocess) -> np.ndarray:
    mean = np.array(pre.mean, dtype=np.float32)[:, None, None]
    std = np.array(pre.std, dtype=np.float32)[:, None, None]
    return x.numpy() * std + mean


# ------------------------------------------------------------------------------------- raster formats


def test_png_8bit_gray_values_are_stored_values_over_255(tmp_path):
    arr = RNG.integers(0, 256, (37, 53), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.float32 and out.shape == (37, 53)
    np.testing.assert_array_equal(out, arr.astype(np.float32) / 255)


def test_png_16bit_is_scaled_by_65535_not_clipped_to_8bit(tmp_path):
    arr = RNG.integers(0, 65536, (40, 30), dtype=np.uint16)
    arr[0, 0] = 65535
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(out, arr / 65535.0, rtol=0, atol=1e-7)
    assert len(np.unique(out)) > 256  # 8-bit quantisation would leave at most 256 levels


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_tiff_16bit_little_and_big_endian(tmp_path, dtype):
    arr = (np.arange(24 * 16).reshape(24, 16) * 170).astype(dtype)
    Image.fromarray(arr).save(tmp_path / "a.tif")
    out = read_image(tmp_path / "a.tif")
    np.testing.assert_allclose(out, arr.astype(np.float64) / 65535.0, rtol=0, atol=1e-7)
    assert out.max() > 255 / 65535


def test_jpeg_matches_written_values_within_compression_error(tmp_path):
    yy, xx = np.mgrid[0:64, 0:64]
    arr = (128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (64, 64)
    assert np.abs(out - arr / 255.0).mean() < 0.01
    assert np.abs(out - arr / 255.0).max() < 0.05


def test_rgb_and_rgba_drop_alpha_keep_stored_colour(tmp_path):
    rgb = RNG.integers(0, 256, (20, 25, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (20, 25, 1), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.concatenate([rgb, alpha], axis=-1), mode="RGBA").save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):
        out = read_image(tmp_path / name)
        assert out.shape == (20, 25, 3)
        np.testing.assert_array_equal(out, rgb.astype(np.float32) / 255)


def test_la_gives_the_luminance_channel(tmp_path):
    la = RNG.integers(0, 256, (10, 12, 2), dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), la[..., 0].astype(np.float32) / 255)


def test_palette_is_converted_through_its_palette(tmp_path):
    idx = RNG.integers(0, 4, (16, 16), dtype=np.uint8)
    palette = np.array([[0, 0, 0], [255, 0, 0], [10, 200, 30], [128, 128, 128]], dtype=np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette(palette.ravel().tolist())
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), palette[idx].astype(np.float32) / 255)


def test_32bit_integer_and_float_tiffs(tmp_path):
    ints = (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.int32)  # in 16-bit range: / 65535
    Image.fromarray(ints).save(tmp_path / "i.tif")
    np.testing.assert_allclose(read_image(tmp_path / "i.tif"), ints / 65535.0, atol=1e-7)
    unit = RNG.random((8, 9)).astype(np.float32)  # already in [0, 1]: kept
    Image.fromarray(unit).save(tmp_path / "f01.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "f01.tif"), unit)
    hu = RNG.normal(0, 500, (8, 9)).astype(np.float32)  # arbitrary range: min-max
    Image.fromarray(hu).save(tmp_path / "fhu.tif")
    np.testing.assert_allclose(
        read_image(tmp_path / "fhu.tif"), (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6
    )


def test_multipage_tiff_needs_a_frame(tmp_path):
    pages = [np.full((6, 7), v, dtype=np.uint8) for v in (10, 200)]
    ims = [Image.fromarray(p) for p in pages]
    ims[0].save(tmp_path / "m.tif", save_all=True, append_images=ims[1:])
    with pytest.raises(ImageReadError, match=r"m\.tif.*2 frames.*frame="):
        read_image(tmp_path / "m.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "m.tif", frame=1), pages[1] / np.float32(255))
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(tmp_path / "m.tif", frame=2)


# ------------------------------------------------------------------------------------- bad inputs


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match=r"nope\.png.*no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)
    with pytest.raises(ImageReadError, match=r"nope\.png"):
        read_mask(tmp_path / "nope.png")


def test_truncated_png(tmp_path):
    Image.fromarray(RNG.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png"):
        read_image(tmp_path / "cut.png")


def test_text_files_named_as_images(tmp_path):
    for name in ("notes.png", "notes.dcm", "notes"):
        (tmp_path / name).write_text("patient list, not an image\n" * 20)
        with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
            read_image(tmp_path / name)


def test_frame_must_be_an_integer(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match="frame"):
        read_image(tmp_path / "a.png", frame="0")


# ------------------------------------------------------------------------------------- DICOM, generated


def _write_dicom(
    path, pixels, *, photometric="MONOCHROME2", bits_stored=None, ts=None, encapsulated=False, **attrs
):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for k, v in attrs.items():
        setattr(ds, k, v)
    if encapsulated:
        ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
        ds["PixelData"].VR = "OB"
    elif pixels is not None:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return path


def test_dicom_monochrome1_without_window_is_minmax_inverted(tmp_path):
    px = RNG.integers(100, 4000, (12, 9)).astype(np.uint16)
    out = read_image(_write_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1", bits_stored=12))
    ref = 1.0 - (px - px.min()) / (px.max() - px.min())
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_dicom_rescale_then_window(tmp_path):
    px = RNG.integers(0, 3000, (10, 11)).astype(np.int16)
    path = _write_dicom(
        tmp_path / "ct.dcm", px, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400
    )
    np.testing.assert_allclose(read_image(path), _window(px * 2.0 - 1024, 40, 400), atol=1e-6)


def test_dicom_voi_lut_sequence(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    px = RNG.integers(0, 300, (8, 8)).astype(np.uint16)
    first, lut = 50, (1000 * (np.arange(201) / 200) ** 2).astype(np.uint16)  # a curve on 50..250
    item = Dataset()
    item.LUTDescriptor = [len(lut), first, 16]
    item.add_new("LUTData", "US", lut.tolist())
    path = _write_dicom(tmp_path / "voi.dcm", px, bits_stored=12, VOILUTSequence=[item])
    ref = lut[np.clip(px.astype(np.int64) - first, 0, len(lut) - 1)] / 1000.0
    np.testing.assert_allclose(read_image(path), ref, atol=1e-6)


def test_dicom_rgb(tmp_path):
    rgb = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    out = read_image(_write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    np.testing.assert_array_equal(out, rgb.astype(np.float32) / 255)


def test_dicom_found_by_magic_number_without_suffix(tmp_path):
    px = np.arange(20, dtype=np.uint16).reshape(4, 5)
    path = _write_dicom(tmp_path / "IM0001", px)
    assert is_dicom(path)
    np.testing.assert_allclose(read_image(path), px / 19.0, atol=1e-6)


def test_dicom_unknown_transfer_syntax_names_file_and_syntax(tmp_path):
    path = _write_dicom(
        tmp_path / "odd.dcm", np.zeros((4, 4), np.uint16), ts="1.2.3.4.5.6.7.8.9", encapsulated=True
    )
    with pytest.raises(ImageReadError, match=r"odd\.dcm.*1\.2\.3\.4\.5\.6\.7\.8\.9.*uncompressed"):
        read_image(path)


def test_dicom_syntax_without_installed_decoder_says_what_to_install(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    path = _write_dicom(
        tmp_path / "jl.dcm", np.zeros((4, 4), np.uint16), ts=JPEGLosslessSV1, encapsulated=True
    )
    with pytest.raises(
        ImageReadError, match=r"jl\.dcm.*JPEG Lossless.*1\.2\.840\.10008\.1\.2\.4\.70.*pip install"
    ):
        read_image(path)


def test_dicom_without_pixel_data(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    path = _write_dicom(tmp_path / "sr.dcm", np.zeros((2, 2), np.uint16))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"sr\.dcm.*no pixel data"):
        read_image(path)


def test_dicom_without_pydicom_says_pip_install_extra(tmp_path, monkeypatch):
    path = _write_dicom(tmp_path / "a.dcm", np.zeros((2, 2), np.uint16))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` raise ImportError
    with pytest.raises(ImageReadError, match=r"a\.dcm.*featcache\[dicom\]"):
        read_image(path)


# ------------------------------------------------------------------------------------- DICOM, real files


def _labels(folder):
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _raw(path):
    return pytest.importorskip("pydicom").dcmread(path).pixel_array


def test_real_ct_without_window_is_minmax_of_hounsfield(shared_data):
    folder = shared_data / "dicom_samples"
    row = next(r for r in _labels(folder) if r["file_path"].endswith("CT_small.dcm"))
    raw = _raw(folder / row["file_path"])
    lo, hi = int(row["pixel_min"]), int(row["pixel_max"])
    assert (raw.min(), raw.max()) == (lo, hi)
    # HU = raw - 1024 is a shift, so min-max of HU equals min-max of the stored values.
    np.testing.assert_allclose(read_image(folder / row["file_path"]), (raw - lo) / (hi - lo), atol=1e-6)


def test_real_mr_window(shared_data):
    path = shared_data / "dicom_samples/files/MR_small.dcm"  # Window 600/1600, no rescale
    np.testing.assert_allclose(read_image(path), _window(_raw(path).astype(np.float64), 600, 1600), atol=1e-6)


def test_real_mr_jpeg2000_lossless_rescale_and_window(shared_data):
    pydicom = pytest.importorskip("pydicom")
    path = shared_data / "dicom_samples/files/MR2_J2KR.dcm"
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = read_image(path)
    assert out.shape == (1024, 1024)
    np.testing.assert_allclose(out, _window(hu, float(ds.WindowCenter), float(ds.WindowWidth)), atol=1e-5)


def test_real_cr_chest_monochrome1_jpeg2000(shared_data):
    folder = shared_data / "dicom_samples"
    raw = _raw(folder / "files/RG1_J2KI.dcm")  # MONOCHROME1: bright = low attenuation
    out = read_image(folder / "files/RG1_J2KI.dcm")
    assert out.shape == (1955, 1841) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    # Stored window 15000/30000, then inverted.
    np.testing.assert_allclose(out, 1.0 - _window(raw.astype(np.float64), 15000, 30000), atol=1e-5)
    assert _corr(raw, out) < -0.99  # inverted relative to the stored values
    display = np.asarray(Image.open(folder / "derived/RG1_cr_chest_display8_512.png"), dtype=np.float32)
    ours = _pil_resize(out, display.shape, Image.BILINEAR)
    assert _corr(_pil_resize(raw.astype(np.float32), display.shape, Image.BILINEAR), display) < -0.9
    assert _corr(ours, display) > 0.9


def test_real_ultrasound_ybr_is_rgb(shared_data):
    path = shared_data / "dicom_samples/files/US1_J2KR.dcm"
    out = read_image(path)
    assert out.shape == (480, 640, 3)
    np.testing.assert_array_equal(out, _raw(path).astype(np.float32) / 255)


def test_real_multiframe_needs_frame_and_uses_functional_groups(shared_data):
    pydicom = pytest.importorskip("pydicom")
    path = shared_data / "dicom_samples/files/eCT_Supplemental.dcm"
    with pytest.raises(ImageReadError, match=r"eCT_Supplemental\.dcm.*2 frames.*frame="):
        read_image(path)
    frames = pydicom.dcmread(path).pixel_array
    for k in (0, 1):
        # Shared functional groups: rescale intercept -1024, window 49/102.
        np.testing.assert_allclose(read_image(path, frame=k), _window(frames[k] - 1024.0, 49, 102), atol=1e-6)
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(path, frame=2)


def test_real_16bit_png_not_clipped(shared_data):
    out = read_image(shared_data / "dicom_samples/derived/RG1_cr_chest_raw16_monochrome1_1024.png")
    assert out.shape == (1024, 964)
    assert out.max() > 255 / 65535
    assert len(np.unique(out)) > 256


@pytest.mark.parametrize(
    ("folder", "column"), [("hannover_covid_cxr", "image_path"), ("nih_cxr14_small", "image_path")]
)
def test_real_pngs_decode_to_listed_shapes(shared_data, folder, column):
    rows = _labels(shared_data / folder)[:5]
    for row in rows:
        out = read_image(shared_data / folder / row[column])
        assert out.shape == (int(row["height"]), int(row["width"]))
        assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0


def test_real_lung_mask_is_binary_and_matches_its_image(shared_data):
    folder = shared_data / "hannover_covid_cxr"
    row = next(r for r in _labels(folder) if r["mask_path"])
    mask = read_mask(folder / row["mask_path"])
    stored = np.asarray(Image.open(folder / row["mask_path"]))
    assert mask.dtype == np.int64 and set(np.unique(mask)) == {0, 1}
    np.testing.assert_array_equal(mask, (stored == 255).astype(np.int64))
    assert mask.shape == read_image(folder / row["image_path"]).shape


def test_tiny_nih_pngs(shared_data):
    rows = _labels(shared_data / "nih_cxr14_tiny64")[:3]
    for row in rows:
        assert read_image(shared_data / "nih_cxr14_tiny64" / row["image_path"]).shape == (64, 64)


# ------------------------------------------------------------------------------------- masks


def test_binary_masks_become_zero_one(tmp_path):
    m = (RNG.random((9, 11)) > 0.5).astype(np.uint8)
    Image.fromarray(m * 255).save(tmp_path / "b8.png")
    Image.fromarray(m.astype(np.uint16) * 65535).save(tmp_path / "b16.png")
    Image.fromarray(m.astype(bool)).save(tmp_path / "b1.png")
    for name in ("b8.png", "b16.png", "b1.png"):
        out = read_mask(tmp_path / name)
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, m)


def test_label_maps_keep_their_values(tmp_path):
    labels = RNG.integers(0, 4, (9, 11)).astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "l.png"), labels)
    big = RNG.integers(0, 700, (5, 6)).astype(np.uint16)
    Image.fromarray(big).save(tmp_path / "l16.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "l16.png"), big)
    im = Image.fromarray(labels, mode="P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), labels)  # palette indices, not colours


def test_bad_masks(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "m.jpg")
    with pytest.raises(ImageReadError, match=r"m\.jpg.*PNG"):
        read_mask(tmp_path / "m.jpg")
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "c.png")
    with pytest.raises(ImageReadError, match=r"c\.png.*colour"):
        read_mask(tmp_path / "c.png")
    grey = np.repeat(RNG.integers(0, 3, (4, 4, 1)).astype(np.uint8), 3, axis=-1)
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "g.png"), grey[..., 0])


# ------------------------------------------------------------------------------------- Preprocess


@pytest.mark.parametrize("resize", ["squash", "letterbox", "crop"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "area", "nearest"])
def test_output_shape_and_dtype(resize, interpolation):
    pre = Preprocess(32, resize=resize, interpolation=interpolation)
    for image in (RNG.random((50, 37), dtype=np.float32), RNG.random((20, 61, 3), dtype=np.float32)):
        out = model_input(pre, image)
        assert (
            isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == (3, 32, 32)
        )


def test_normalisation_of_a_constant_image_matches_numpy():
    pre = Preprocess(16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    out = model_input(pre, np.full((40, 30), 0.7, np.float32)).numpy()
    expected = (0.7 - np.array(pre.mean)) / np.array(pre.std)
    for c in range(3):
        np.testing.assert_allclose(out[c], expected[c], atol=1e-5)
    rgb = np.empty((10, 10, 3), np.float32)
    rgb[...] = (0.1, 0.6, 0.9)
    out = model_input(Preprocess(8), rgb).numpy()
    expected = (np.array([0.1, 0.6, 0.9]) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for c in range(3):
        np.testing.assert_allclose(out[c], expected[c], atol=1e-5)


def test_uint8_input_equals_float_input():
    img = RNG.integers(0, 256, (30, 30), dtype=np.uint8)
    pre = Preprocess(20)
    torch.testing.assert_close(
        model_input(pre, img), model_input(pre, img.astype(np.float32) / 255), rtol=0, atol=1e-6
    )


def test_letterbox_pads_with_black_centred():
    pre = Preprocess(32, resize="letterbox")
    out = _denorm(model_input(pre, np.ones((40, 80), np.float32)), pre)  # resized to 16 x 32, rows 8..23
    np.testing.assert_allclose(out[:, :8], 0.0, atol=1e-5)
    np.testing.assert_allclose(out[:, 8:24], 1.0, atol=1e-5)
    np.testing.assert_allclose(out[:, 24:], 0.0, atol=1e-5)
    tall = _denorm(model_input(pre, np.ones((90, 30), np.float32)), pre)  # resized to 32 x 11: cols 10..20
    np.testing.assert_allclose(tall[:, :, :10], 0.0, atol=1e-5)
    np.testing.assert_allclose(tall[:, :, 10:21], 1.0, atol=1e-5)
    np.testing.assert_allclose(tall[:, :, 21:], 0.0, atol=1e-5)


def test_crop_takes_the_centre():
    img = RNG.random((32, 64), dtype=np.float32)
    pre = Preprocess(32, resize="crop")
    np.testing.assert_allclose(_denorm(model_input(pre, img), pre)[0], img[:, 16:48], atol=1e-5)
    big = RNG.random((64, 128), dtype=np.float32)  # short side 64 -> 32, long side 128 -> 64, keep 16..47
    ref = np.clip(_pil_resize(big, (32, 64), Image.BICUBIC), 0, 1)[:, 16:48]
    np.testing.assert_allclose(_denorm(model_input(pre, big), pre)[0], ref, atol=1e-4)


@pytest.mark.parametrize(
    ("interpolation", "method"), [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)]
)
@pytest.mark.parametrize("shape", [(97, 131), (13, 20)])
def test_squash_resize_matches_pil(interpolation, method, shape):
    img = RNG.random(shape, dtype=np.float32)
    pre = Preprocess(48, interpolation=interpolation)
    ref = np.clip(_pil_resize(img, (48, 48), method), 0, 1)
    np.testing.assert_allclose(_denorm(model_input(pre, img), pre)[0], ref, atol=1e-4)


def test_area_averages_by_overlap():
    img = RNG.random((64, 64), dtype=np.float32)
    pre = Preprocess(32, interpolation="box")
    assert pre.interpolation == "area"
    block_mean = img.reshape(32, 2, 32, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(_denorm(model_input(pre, img), pre)[0], block_mean, atol=1e-5)
    row = np.array([[0.0, 0.6, 0.9]], np.float32).repeat(3, axis=0)  # 3 -> 2: pixel 1 split half/half
    out = _denorm(model_input(Preprocess(2, interpolation="area"), row), Preprocess(2))[0]
    np.testing.assert_allclose(out[0], [(0.0 + 0.5 * 0.6) / 1.5, (0.5 * 0.6 + 0.9) / 1.5], atol=1e-5)


def test_nearest_matches_pil_nearest():
    img = RNG.random((37, 23), dtype=np.float32)
    pre = Preprocess(16, interpolation="nearest")
    np.testing.assert_allclose(
        _denorm(model_input(pre, img), pre)[0], _pil_resize(img, (16, 16), Image.NEAREST), atol=1e-6
    )


def test_bicubic_overshoot_is_clamped():
    edge = np.zeros((8, 8), np.float32)
    edge[:, 4:] = 1.0
    pre = Preprocess(64)
    out = _denorm(model_input(pre, edge), pre)
    assert out.min() >= -1e-5 and out.max() <= 1 + 1e-5
    assert np.isclose(out.min(), 0, atol=1e-5) and np.isclose(out.max(), 1, atol=1e-5)


def test_deterministic():
    img = RNG.random((70, 50, 3), dtype=np.float32)
    for resize in ("squash", "letterbox", "crop"):
        pre = Preprocess(40, resize=resize)
        assert torch.equal(model_input(pre, img), model_input(pre, img))


def test_transform_mask_squash_matches_pil_nearest():
    mask = RNG.integers(0, 5, (37, 23)).astype(np.int64)
    pre = Preprocess(16)
    ref = np.asarray(Image.fromarray(mask.astype(np.int32), mode="I").resize((16, 16), Image.NEAREST))
    out = pre.transform_mask(mask)
    assert out.dtype == np.int64 and out.shape == (16, 16)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("resize", ["squash", "letterbox", "crop"])
def test_mask_stays_aligned_with_image(resize):
    img = np.zeros((120, 200), np.float32)
    mask = np.zeros((120, 200), np.int64)
    img[30:90, 80:150] = 1.0
    mask[30:90, 80:150] = 2
    pre = Preprocess(64, resize=resize)
    bright = _denorm(model_input(pre, img), pre)[0] > 0.5
    labelled = pre.transform_mask(mask) == 2
    iou = (bright & labelled).sum() / (bright | labelled).sum()
    assert iou > 0.9
    for axis in (0, 1):
        a, b = np.flatnonzero(bright.any(axis=1 - axis)), np.flatnonzero(labelled.any(axis=1 - axis))
        assert abs(a[0] - b[0]) <= 1 and abs(a[-1] - b[-1]) <= 1


def test_letterbox_mask_padding_is_background():
    pre = Preprocess(32, resize="letterbox")
    out = pre.transform_mask(np.full((40, 80), 3, np.uint8))
    assert out.dtype == np.uint8
    assert (out[:8] == 0).all() and (out[8:24] == 3).all() and (out[24:] == 0).all()


def test_invalid_settings_are_user_errors():
    with pytest.raises(FeatcacheError, match="squash, letterbox, crop"):
        Preprocess(224, resize="stretch")
    with pytest.raises(FeatcacheError, match="bicubic"):
        Preprocess(224, interpolation="lanczos")
    for res in (0, -5, 2.5, True):
        with pytest.raises(FeatcacheError, match="resolution"):
            Preprocess(res)
    with pytest.raises(FeatcacheError, match="std"):
        Preprocess(224, std=(0.2, 0.0, 0.2))
    with pytest.raises(FeatcacheError, match="mean"):
        Preprocess(224, mean=(0.5, 0.5))
    with pytest.raises(FeatcacheError, match="shape"):
        model_input(Preprocess(8), np.zeros((4, 4, 4), np.float32))
    with pytest.raises(FeatcacheError, match="shape"):
        Preprocess(8).transform_mask(np.zeros((4, 4, 3), np.int64))


def test_dict_round_trip_through_json():
    pre = Preprocess(
        512, resize="letterbox", interpolation="box", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
    )
    data = json.loads(json.dumps(pre.to_dict()))
    assert data == {
        "res": 512,
        "resize": "letterbox",
        "interpolation": "area",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "pipeline": PIPELINE,
    }
    again = Preprocess.from_dict(data)
    old = {k: v for k, v in data.items() if k != "pipeline"}  # sets recorded before the pipeline existed
    assert Preprocess.from_dict(old) == pre
    with pytest.raises(FeatcacheError, match="pipeline differs"):
        Preprocess.from_dict({**data, "pipeline": {**PIPELINE, "clamp": "none"}})
    assert again == pre and hash(again) == hash(pre)
    with pytest.raises(FeatcacheError, match="colour_space"):
        Preprocess.from_dict({**data, "colour_space": "rgb"})
    with pytest.raises(FeatcacheError, match="res"):
        Preprocess.from_dict({"resize": "crop"})


def test_dicom_ybr_full_is_converted_to_rgb(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.pixels import convert_color_space

    yy, xx = np.mgrid[0:16, 0:16]
    rgb = np.stack([xx * 16, yy * 16, 255 - xx * 8], axis=-1).astype(np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out = read_image(_write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL"))
    assert out.shape == (16, 16, 3)
    assert np.abs(out - rgb / 255.0).max() <= 2 / 255  # YCbCr round trip rounds to 8 bit twice


def test_dicom_palette_colour_goes_through_its_lut(tmp_path):
    idx = RNG.integers(0, 4, (5, 6)).astype(np.uint8)
    palette = np.array([[0, 0, 0], [65535, 0, 0], [0, 30000, 0], [1000, 2000, 65535]], dtype=np.uint16)
    attrs = {}
    for c, name in enumerate(("Red", "Green", "Blue")):
        attrs[f"{name}PaletteColorLookupTableDescriptor"] = [4, 0, 16]
        attrs[f"{name}PaletteColorLookupTableData"] = palette[:, c].tobytes()
    out = read_image(_write_dicom(tmp_path / "pal.dcm", idx, photometric="PALETTE COLOR", **attrs))
    np.testing.assert_allclose(out, palette[idx] / 65535.0, atol=1e-7)
