"""Segmentation probes: metrics on hand-computed cases, a head that must recover a mask the tokens
encode exactly, the mean-mask baseline against numpy, results rows and the report, the synthetic
demo and the real Hannover lung masks with a random-init backbone."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featcache.decode.images import read_mask
from featcache.errors import FeatcacheError, StoreError
from featcache.store.feature_store import ArraySpec, FeatureStore
from featcache.store.manifest import Manifest
from featcache.store.preprocess import Preprocess
from probes.seg.run import (
    SegProbe,
    StoreTokens,
    dice,
    hd95,
    jaccard,
    mean_mask_baseline,
    run_seg,
    seg_metrics,
)

RES, GRID, DIM = 128, 8, 8


def _square(size: int, lo: int, hi: int, shape=(12, 12)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo:hi, lo:hi] = True
    return m


# ---------------------------------------------------------------------------------------------- metrics


def test_dice_and_jaccard_hand_computed():
    outer, inner = _square(12, 2, 7), _square(12, 3, 6)  # 5x5 = 25 pixels around a 3x3 = 9
    assert dice(inner, outer) == pytest.approx(2 * 9 / (9 + 25))
    assert jaccard(inner, outer) == pytest.approx(9 / 25)
    assert dice(outer, outer) == 1.0 and jaccard(outer, outer) == 1.0
    shifted = np.roll(outer, 7, axis=1)  # disjoint
    assert dice(shifted, outer) == 0.0 and jaccard(shifted, outer) == 0.0
    empty = np.zeros((12, 12), bool)
    assert dice(empty, outer) == 0.0 and jaccard(outer, empty) == 0.0
    assert math.isnan(dice(empty, empty)) and math.isnan(jaccard(empty, empty))


def test_hd95_hand_computed():
    a = np.zeros((12, 12), bool)
    b = np.zeros((12, 12), bool)
    a[0, 0], b[3, 4] = True, True
    assert hd95(a, b) == pytest.approx(5.0)  # single pixels are their own boundary: a 3-4-5 triangle
    two = np.zeros((12, 12), bool)
    two[0, 0] = two[0, 10] = True
    one = np.zeros((12, 12), bool)
    one[0, 0] = True
    # two -> one: distances [0, 10], 95th percentile 9.5 (linear); one -> two: [0]; the larger wins
    assert hd95(two, one) == pytest.approx(9.5) and hd95(one, two) == pytest.approx(9.5)
    # a 5x5 square around a 3x3 one: ring-5 corners are sqrt(2) from ring 3, the rest 1; ring 3 -> ring 5: all 1
    assert hd95(_square(12, 2, 7), _square(12, 3, 6)) == pytest.approx(math.sqrt(2))
    assert hd95(_square(12, 2, 7), _square(12, 2, 7)) == 0.0
    full = np.ones((12, 12), bool)
    assert hd95(full, full) == 0.0  # the image edge is boundary
    assert math.isnan(hd95(np.zeros((12, 12), bool), full)) and math.isnan(
        hd95(full, np.zeros((12, 12), bool))
    )


def test_seg_metrics_per_structure():
    truth = np.zeros((1, 12, 12), np.int64)
    truth[0][_square(12, 2, 7)] = 1
    truth[0, 9:11, 9:11] = 2
    pred = np.zeros_like(truth)
    pred[0][_square(12, 3, 6)] = 1  # structure 2 missed entirely
    m = seg_metrics(pred, truth, 3)
    assert m["dice"][0, 0] == pytest.approx(18 / 34) and m["jaccard"][0, 0] == pytest.approx(9 / 25)
    assert m["dice_jaccard_mean"][0, 0] == pytest.approx((18 / 34 + 9 / 25) / 2)
    assert m["hd95"][0, 0] == pytest.approx(math.sqrt(2))
    assert m["dice"][0, 1] == 0.0 and math.isnan(m["hd95"][0, 1])
    assert math.isnan(m["dice"][0, 2])  # structure 3 absent from both: undefined, not a perfect 1


def test_mean_mask_baseline_thresholds_at_half():
    masks = np.zeros((4, 3, 3), np.int64)
    masks[:2, 0, 0] = 1  # 2 of 4: exactly 0.5 -> structure
    masks[:1, 1, 1] = 1  # 1 of 4 -> background
    masks[:3, 2, 2] = 2
    expected = np.zeros((3, 3), np.int64)
    expected[0, 0], expected[2, 2] = 1, 2
    assert np.array_equal(mean_mask_baseline(masks, 2), expected)


def _dicom_header(path: Path, shape, pixel_spacing=None, imager_spacing=None) -> Path:
    """A small DICOM file (zero pixels of ``shape``) with the given spacing attributes."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", int(shape[0]), int(shape[1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(int(shape[0]) * int(shape[1]))
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = [float(v) for v in imager_spacing]
    ds.save_as(path, enforce_file_format=True)
    return path


def _boundary_points(m: np.ndarray) -> np.ndarray:
    """(row, col) of the pixels of m with a 4-neighbour outside m or on the image edge (numpy only)."""
    p = np.pad(m, 1, constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return np.argwhere(m & ~inner).astype(np.float64)


def _hd95_brute(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0)) -> float:
    """HD95 from all boundary-point pairs with scaled coordinates (scipy cdist)."""
    from scipy.spatial.distance import cdist

    pa, pb = _boundary_points(a) * spacing, _boundary_points(b) * spacing
    d = cdist(pa, pb)
    return float(max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95)))


def _blob(rng, shape) -> np.ndarray:
    """A random smooth blob touching random places, sometimes the image edge."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.normal(size=shape), 3)
    return noise > np.quantile(noise, rng.uniform(0.5, 0.8))


def test_dice_jaccard_against_a_numpy_count_on_random_masks():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = _blob(rng, (30, 41)), _blob(rng, (30, 41))
        tp = np.count_nonzero(a & b)
        fp, fn = np.count_nonzero(a & ~b), np.count_nonzero(~a & b)
        assert dice(a, b) == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert jaccard(a, b) == pytest.approx(tp / (tp + fp + fn))


def test_hd95_with_anisotropic_spacing_against_brute_force():
    rng = np.random.default_rng(2)
    for spacing in ((0.5, 0.25), (1.0, 1.0), (0.143, 0.139)):
        for _ in range(6):
            a, b = _blob(rng, (40, 52)), _blob(rng, (40, 52))
            assert hd95(a, b, spacing) == pytest.approx(_hd95_brute(a, b, spacing), rel=1e-9)
    a, b = np.zeros((12, 12), bool), np.zeros((12, 12), bool)
    a[0, 0], b[3, 4] = True, True  # 3 rows and 4 columns apart
    assert hd95(a, b, (0.5, 0.25)) == pytest.approx(math.hypot(3 * 0.5, 4 * 0.25))
    assert hd95(a, b) == pytest.approx(5.0) and hd95(a, b, 2.0) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, b, (0.5, 0.0))


def test_pixel_spacing_from_dicom_headers(tmp_path):
    from probes.seg.frame import pixel_spacing

    both = pixel_spacing(_dicom_header(tmp_path / "a.dcm", (20, 30), (0.5, 0.25), (0.6, 0.3)))
    assert both == (0.5, 0.25, "PixelSpacing", (20, 30))  # PixelSpacing takes precedence
    imager = pixel_spacing(_dicom_header(tmp_path / "b.dcm", (20, 30), imager_spacing=(0.6, 0.3)))
    assert imager.tag == "ImagerPixelSpacing" and (imager.row_mm, imager.col_mm) == (0.6, 0.3)
    assert imager.for_shape((10, 10)) == pytest.approx((1.2, 0.9))  # a mask at half / a third the size
    assert pixel_spacing(_dicom_header(tmp_path / "c.dcm", (20, 30))) is None
    assert pixel_spacing(_dicom_header(tmp_path / "d.dcm", (20, 30), (0.0, 0.0))) is None
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "e.png")
    assert pixel_spacing(tmp_path / "e.png") is None and pixel_spacing(tmp_path / "missing.dcm") is None


def _bilinear_reference(maps: np.ndarray, pre: Preprocess, shape) -> np.ndarray:
    """Numpy bilinear sampling of [C, h, w] maps at the mask-frame pixel centres (edges clamped)."""
    H, W = shape
    h_img, w_img, top, left = pre.geometry(H, W)
    C, h, w = maps.shape
    u = np.clip((top + (np.arange(H) + 0.5) * h_img / H) * h / pre.res - 0.5, 0, h - 1)
    v = np.clip((left + (np.arange(W) + 0.5) * w_img / W) * w / pre.res - 0.5, 0, w - 1)
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    u1, v1 = np.minimum(u0 + 1, h - 1), np.minimum(v0 + 1, w - 1)
    fu, fv = (u - u0)[:, None], (v - v0)[None, :]
    m = maps.astype(np.float64)
    return (
        m[:, u0][:, :, v0] * (1 - fu) * (1 - fv)
        + m[:, u0][:, :, v1] * (1 - fu) * fv
        + m[:, u1][:, :, v0] * fu * (1 - fv)
        + m[:, u1][:, :, v1] * fu * fv
    )


@pytest.mark.parametrize("resize", ["squash", "letterbox", "crop"])
def test_logits_to_the_mask_frame_against_references(resize):
    import torch
    import torch.nn.functional as F

    from probes.seg.frame import to_mask_frame, visible_box

    rng = np.random.default_rng(3)
    pre = Preprocess(res=RES, resize=resize)
    logits = rng.normal(size=(3, GRID, GRID)).astype(np.float32)
    for shape in ((96, 160), (150, 100), (128, 128)):
        got = to_mask_frame(torch.from_numpy(logits), pre, shape).numpy()
        assert got.shape == (3, *shape)
        assert np.allclose(got, _bilinear_reference(logits, pre, shape), atol=1e-5)
        if resize == "squash":  # one bilinear step, exactly what torch's interpolate does
            ref = F.interpolate(
                torch.from_numpy(logits)[None], size=shape, mode="bilinear", align_corners=False
            )
            assert np.array_equal(got, ref[0].numpy())
        rows, cols = visible_box(pre, shape)
        seen = (rows.stop - rows.start, cols.stop - cols.start)
        h, w, _, _ = pre.geometry(*shape)
        assert seen == (
            shape
            if resize != "crop"
            else (min(shape[0], round(shape[0] * RES / h)), min(shape[1], round(shape[1] * RES / w)))
        )


# ------------------------------------------------------------------------------------------ synthetic store


def _synthetic_store(
    tmp_path: Path, n_structures: int = 1, n: int = 40, seed: int = 0, patch=True, mask_shape=None,
    spacing=None, resize="squash",
):  # fmt: skip
    """A feature set whose patch tokens encode the mask exactly: channel k-1 = 1 on tokens of structure k.

    ``mask_shape`` (H, W): the mask files are written at that size (nearest from the token grid),
    as masks of non-square films would be; ``spacing``: the images are DICOM headers with that
    ``PixelSpacing`` (a callable of the row index may return None for an image without one).
    """
    rng = np.random.default_rng(seed)
    root = tmp_path / "data"
    (root / "masks").mkdir(parents=True)
    token_masks = np.zeros((n, GRID, GRID), np.int64)
    for i in range(n):
        for k in range(1, n_structures + 1):
            r, c = rng.integers(0, GRID - 2, size=2)
            h, w = rng.integers(2, 5, size=2)
            token_masks[i, r : r + h, c : c + w] = k
    tokens = rng.normal(0, 1, (n, GRID, GRID, DIM)).astype(np.float16)
    for k in range(1, n_structures + 1):
        tokens[..., k - 1] = (token_masks == k).astype(np.float16)
    scale = RES // GRID
    full = np.repeat(np.repeat(token_masks, scale, axis=1), scale, axis=2)  # each token = one 16x16 patch
    splits = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    ids = np.array([f"img{i:02d}" for i in range(n)])
    if mask_shape is not None:
        H, W = mask_shape
        rows = np.floor((np.arange(H) + 0.5) * GRID / H).astype(int)
        cols = np.floor((np.arange(W) + 0.5) * GRID / W).astype(int)
        full = token_masks[:, rows][:, :, cols]
    for i in range(n):
        Image.fromarray((full[i] * (255 if n_structures == 1 else 1)).astype(np.uint8)).save(
            root / "masks" / f"{ids[i]}.png"
        )
    suffix = ".png"
    if spacing is not None:
        suffix = ".dcm"
        (root / "images").mkdir()
        for i in range(n):
            sp = spacing(i) if callable(spacing) else spacing
            _dicom_header(root / "images" / f"{ids[i]}.dcm", full.shape[1:], pixel_spacing=sp)
    m = Manifest(
        source="synthetic",
        root=root,
        paths=np.array([f"images/{i}{suffix}" for i in ids]),
        ids=ids,
        patient_ids=np.array([f"p{i // 2}" for i in range(n)]),
        splits=splits,
        masks=np.array([f"masks/{i}.png" for i in ids]),
    )
    arrays = {"cls": ArraySpec((DIM,)), "pooled": ArraySpec((DIM,))}
    if patch:
        arrays["patch"] = ArraySpec((GRID, GRID, DIM), "float16")
    store = FeatureStore(tmp_path / "cache", mode="a")
    attrs = {"preprocessing": Preprocess(res=RES, resize=resize).to_dict(), "model": "synthetic", "res": RES}
    fs = store.create_set("syn/synthetic/128", m, arrays, attrs, shard_rows=16)
    for s in range(fs.n_shards):
        lo, hi = fs.shard_range(s)
        data = {"cls": np.zeros((hi - lo, DIM), np.float32), "pooled": np.zeros((hi - lo, DIM), np.float32)}
        if patch:
            data["patch"] = tokens[lo:hi]
        fs.write_shard(s, data, {})
    return tmp_path / "cache", tokens, token_masks, full, splits, ids


def test_linear_head_recovers_a_mask_the_tokens_encode(tmp_path):
    _, tokens, token_masks, full, splits, _ = _synthetic_store(tmp_path)
    tr, va, te = (splits == s for s in ("train", "val", "test"))
    probe = SegProbe(head="linear", epochs=60, random_state=0)
    probe.fit(tokens[tr], token_masks[tr], tokens[va], token_masks[va])
    # at the token grid the upsampling is the identity: the answer is known exactly
    assert np.array_equal(probe.predict(tokens[te], GRID), token_masks[te])
    # at the input resolution bilinear upsampling only rounds the corners of the patch blocks
    pred = probe.predict(tokens[te], RES)
    per_image = [dice(p == 1, t == 1) for p, t in zip(pred, full[te])]
    assert min(per_image) > 0.9 and np.mean(per_image) > 0.95
    assert max(probe.val_dice_) == 1.0 and 1 <= probe.best_epoch_ <= probe.epochs_run_


def test_fit_is_deterministic_for_a_seed(tmp_path):
    _, tokens, token_masks, _, splits, _ = _synthetic_store(tmp_path)
    tr, va = splits == "train", splits == "val"
    fits = [
        SegProbe(head=h, epochs=3, random_state=s).fit(
            tokens[tr], token_masks[tr], tokens[va], token_masks[va]
        )
        for h, s in (("conv", 0), ("conv", 0), ("conv", 1))
    ]
    a, b, c = (f.state_ for f in fits)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_run_seg_rows_baseline_saved_masks_and_report(tmp_path):
    cache, _, _, full, splits, ids = _synthetic_store(tmp_path)
    out = tmp_path / "results.jsonl"
    rows = run_seg(cache, head="linear", n_boot=200, save_masks=tmp_path / "pred", out=out)
    assert {r["probe"] for r in rows} == {"seg", "seg-baseline"}
    assert {(r["label"], r["metric"]) for r in rows if r["probe"] == "seg"} == {
        (lab, m) for lab in ("structure_1", "mean") for m in ("dice", "jaccard", "dice_jaccard_mean", "hd95")
    }
    seg = {(r["label"], r["metric"]): r for r in rows if r["probe"] == "seg"}
    base = {(r["label"], r["metric"]): r for r in rows if r["probe"] == "seg-baseline"}
    assert seg[("mean", "dice")]["head"] == "linear" and seg[("mean", "dice")]["res"] == RES
    assert seg[("mean", "dice")]["n_test"] == int((splits == "test").sum())
    for r in rows:
        if r["value"] is not None:
            assert r["ci_low"] <= r["value"] <= r["ci_high"]

    # the baseline against a numpy reference: mean of the train masks, >= 0.5, Dice per test image
    train_masks = full[splits == "train"]
    base_map = train_masks.mean(axis=0) >= 0.5
    ref = []
    for t in full[splits == "test"]:
        inter = (base_map & (t == 1)).sum()
        total = base_map.sum() + (t == 1).sum()
        if total:
            ref.append(2 * inter / total)
    assert base[("mean", "dice")]["value"] == pytest.approx(np.mean(ref))

    # the saved masks are the scored predictions: their Dice (numpy) averages to the reported value
    saved = []
    for rid, t in zip(ids[splits == "test"], full[splits == "test"]):
        p = read_mask(tmp_path / "pred" / f"{rid}.png") == 1
        saved.append(2 * (p & (t == 1)).sum() / (p.sum() + (t == 1).sum()))
    assert seg[("structure_1", "dice")]["value"] == pytest.approx(np.mean(saved))
    assert seg[("mean", "dice")]["value"] > 0.95 > base[("mean", "dice")]["value"]

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(rows)
    from probes.run import run_report

    text = run_report(out, metric="dice", label="mean")
    assert "## seg features=patch head=linear: dice, label mean" in text
    assert "## seg-baseline features=patch: dice, label mean" in text
    assert f"{seg[('mean', 'dice')]['value']:.3f}" in text


def test_tokens_streamed_from_the_store_shard_by_shard(tmp_path):
    cache, tokens, *_ = _synthetic_store(tmp_path)
    fs = FeatureStore(cache).open_set()
    rows = np.array([33, 2, 17, 5, 30, 18])  # three shards of 16 rows, unordered
    src = StoreTokens(fs, rows)
    seen = []
    for pos, block in src.blocks(np.random.default_rng(0)):
        assert len({int(r) // 16 for r in rows[pos]}) == 1  # one shard per block
        assert np.array_equal(block, tokens[rows[pos]])
        seen += pos.tolist()
    assert sorted(seen) == list(range(len(rows))) and src.shape == (6, GRID, GRID, DIM)
    # a memory budget of 0 streams train and val tokens every epoch; the head still finds the mask
    streamed = run_seg(cache, n_boot=20, baseline=False, max_memory_mb=0)
    assert next(r["value"] for r in streamed if r["label"] == "mean" and r["metric"] == "dice") > 0.95


def test_structures_are_named_and_checked(tmp_path):
    cache, *_ = _synthetic_store(tmp_path, n_structures=2)
    rows = run_seg(cache, structures=["lung", "heart"], n_boot=20, baseline=False, epochs=40)
    labels = {r["label"] for r in rows}
    assert labels == {"lung", "heart", "mean"}
    by = {(r["label"], r["metric"]): r["value"] for r in rows}
    assert by[("mean", "dice")] == pytest.approx((by[("lung", "dice")] + by[("heart", "dice")]) / 2)
    assert by[("lung", "dice")] > 0.9 and by[("heart", "dice")] > 0.9
    with pytest.raises(FeatcacheError, match="up to 2"):
        run_seg(cache, structures=["lung"], n_boot=10, epochs=1)


def test_errors_name_what_is_missing(tmp_path):
    cache, *_ = _synthetic_store(tmp_path / "a", patch=False)
    with pytest.raises(StoreError, match="--tokens cls,pooled,patch"):
        run_seg(cache)
    cache, *_ = _synthetic_store(tmp_path / "b")
    with pytest.raises(FeatcacheError, match="--head"):
        run_seg(cache, head="transformer")
    with pytest.raises(FeatcacheError, match="not found; pass the manifest's image root"):
        run_seg(cache, root=tmp_path / "elsewhere", epochs=1)


def test_cli_seg_prints_table_and_appends_rows(tmp_path):
    from cli import probes

    cache, *_ = _synthetic_store(tmp_path)
    out = tmp_path / "r.jsonl"
    res = CliRunner().invoke(
        probes, ["seg", "--cache", str(cache), "--bootstrap", "50", "--epochs", "20", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "seg-baseline" in res.output and "structure_1" in res.output and f"appended to {out}" in res.output
    bad = CliRunner().invoke(probes, ["seg", "--cache", str(tmp_path / "nowhere")])
    assert bad.exit_code == 1 and "Traceback" not in bad.output and "no feature store" in bad.output


def test_import_probes_seg_does_not_import_torch():
    code = "import sys, probes.seg.run, probes.aggregate; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------- extracted features


def _extract(manifest: Path, out: Path, res: int, root: Path | None = None) -> Path:
    from featcache.extract import ExtractConfig, extract

    cfg = ExtractConfig(
        model="random:dinov3-vits16", data=str(manifest), out=str(out), res=res, root=str(root) if root else None,
        tokens=("cls", "pooled", "patch"), workers=0, batch_size=32,
    )  # fmt: skip
    extract(cfg, progress=False)
    return out


def _mean_dice(rows, probe):
    return next(
        r["value"] for r in rows if r["probe"] == probe and r["label"] == "mean" and r["metric"] == "dice"
    )


def test_demo_dataset_linear_head_beats_mean_mask(tmp_path):
    from featcache.demo import make_demo_dataset

    manifest = make_demo_dataset(tmp_path / "data", n_patients=24, size=96)
    cache = _extract(manifest, tmp_path / "cache", res=128)
    rows = run_seg(cache, head="linear", n_boot=100, structures=["lung"])
    assert _mean_dice(rows, "seg") > _mean_dice(rows, "seg-baseline") + 0.03


@pytest.fixture(scope="module")
def hannover_cache(tmp_path_factory):
    """The 42 Hannover films with lung masks, extracted once at 128 px with a random-init backbone."""
    from conftest import SHARED_DATA

    folder = SHARED_DATA / "hannover_covid_cxr"
    if not folder.is_dir():
        pytest.skip(f"real data folder not found at {SHARED_DATA}")
    tmp = tmp_path_factory.mktemp("hannover")
    manifest = tmp / "hannover_masks.csv"
    with open(folder / "labels.csv", newline="") as f, open(manifest, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["path", "id", "patient_id", "split", "mask"])
        kept = 0
        for r in csv.DictReader(f):
            if r["has_lung_mask"] == "1":
                w.writerow([r["image_path"], r["image_id"], r["patient_id"], r["split"], r["mask_path"]])
                kept += 1
    assert kept == 42
    return _extract(manifest, tmp / "cache", res=128, root=folder), folder


@pytest.mark.slow
@pytest.mark.shared_data
def test_hannover_lung_masks_conv_head_beats_mean_mask(hannover_cache):
    cache, _ = hannover_cache
    rows = run_seg(cache, head="conv", n_boot=100, structures=["lung"])
    seg, base = _mean_dice(rows, "seg"), _mean_dice(rows, "seg-baseline")
    assert seg > base + 0.03, (seg, base)
    hd = {r["probe"]: r["value"] for r in rows if r["label"] == "mean" and r["metric"] == "hd95"}
    assert hd["seg"] < hd["seg-baseline"]


@pytest.mark.slow
@pytest.mark.shared_data
def test_hannover_dice_is_computed_at_each_masks_own_resolution(hannover_cache, tmp_path):
    cache, folder = hannover_cache
    rows = run_seg(cache, head="linear", n_boot=50, structures=["lung"], save_masks=tmp_path / "pred")
    fs = FeatureStore(cache).open_set()
    test = np.flatnonzero(fs.splits == "test")
    ref, shapes = [], set()
    for r in test:  # the saved predictions are at the film's own size (longest side 512, not 128 x 128)
        p = read_mask(tmp_path / "pred" / f"{fs.ids[r]}.png") == 1
        t = read_mask(folder / fs.masks[r]) == 1
        assert p.shape == t.shape and max(t.shape) == 512
        shapes.add(t.shape)
        ref.append(2 * np.count_nonzero(p & t) / (np.count_nonzero(p) + np.count_nonzero(t)))
    assert len(shapes) > 1  # the films are not all one size
    dice_row = next(r for r in rows if r["probe"] == "seg" and r["label"] == "lung" and r["metric"] == "dice")
    assert dice_row["value"] == pytest.approx(np.mean(ref)) and dice_row["params"]["scored_at"] == "mask"
    assert dice_row["n_test"] == len(test) == 6 and dice_row["params"]["hd95_unit"] == "px"


def test_saved_mask_names_never_collide():
    from probes.seg.run import _safe_name

    names = {_safe_name(x) for x in ("a/b", "a_b", "a:b", "é", "ü", "plain-id.1")}
    assert len(names) == 6 and _safe_name("plain-id.1") == "plain-id.1"


# ----------------------------------------------------------------------------------- scoring frame and units


def _refit(cache: Path, epochs: int):
    """The probe run_seg fits, refitted here from the stored tokens with independently built targets."""
    fs = FeatureStore(cache).open_set()
    splits, X = fs.splits, fs.read("patch")
    pre = fs.record.preprocess()

    def nearest(n_in, n_out):
        return np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(int), n_in - 1)

    def target(row):  # squash to RES, then to the training grid 4 x GRID, both pixel-centre nearest
        m = read_mask(fs.root / fs.masks[row])
        m = m[np.ix_(nearest(m.shape[0], RES), nearest(m.shape[1], RES))]
        return m[np.ix_(nearest(RES, 4 * GRID), nearest(RES, 4 * GRID))]

    rows = {s: np.flatnonzero(splits == s) for s in ("train", "val", "test")}
    Y = {s: np.stack([target(r) for r in rows[s]]) for s in ("train", "val")}
    probe = SegProbe(head="linear", epochs=epochs, random_state=0)
    probe.fit(X[rows["train"]], Y["train"], X[rows["val"]], Y["val"])
    assert pre.resize == "squash"
    return fs, probe, X[rows["test"]], rows["test"]


def test_scored_in_the_mask_frame_against_a_torch_reference(tmp_path):
    import torch
    import torch.nn.functional as F

    H, W = 72, 120  # a non-square film: squashed into the model frame, scored at its own pixels
    cache, *_ = _synthetic_store(tmp_path, mask_shape=(H, W))
    rows = run_seg(cache, n_boot=20, epochs=15, save_masks=tmp_path / "pred")
    fs, probe, X_test, test_rows = _refit(cache, epochs=15)
    logits = probe.predict_logits(X_test, GRID)  # at the token grid bilinear resizing is the identity
    dices, base_dices = [], []
    train_masks = np.stack(
        [
            Preprocess(res=RES).transform_mask(read_mask(fs.root / fs.masks[r]))
            for r in np.flatnonzero(fs.splits == "train")
        ]
    )
    freq = torch.from_numpy(
        np.stack([(train_masks == 0).mean(0), (train_masks == 1).mean(0)]).astype(np.float32)
    )
    base = F.interpolate(freq[None], size=(H, W), mode="bilinear", align_corners=False)[0].numpy()
    base = base[1] >= base[0]
    for lg, r in zip(logits, test_rows):
        ref = F.interpolate(torch.from_numpy(lg)[None], size=(H, W), mode="bilinear", align_corners=False)
        ref = ref[0].argmax(0).numpy() == 1
        saved = read_mask(tmp_path / "pred" / f"{fs.ids[r]}.png") == 1
        truth = read_mask(fs.root / fs.masks[r]) == 1
        assert saved.shape == truth.shape == (H, W)
        assert np.array_equal(saved, ref)
        dices.append(2 * (ref & truth).sum() / (ref.sum() + truth.sum()))
        base_dices.append(2 * (base & truth).sum() / (base.sum() + truth.sum()))
    by = {(r["probe"], r["label"], r["metric"]): r for r in rows}
    assert by[("seg", "mean", "dice")]["value"] == pytest.approx(np.mean(dices))
    assert by[("seg-baseline", "mean", "dice")]["value"] == pytest.approx(np.mean(base_dices))
    assert by[("seg", "mean", "dice")]["params"]["scored_at"] == "mask"
    assert by[("seg", "mean", "hd95")]["params"]["hd95_unit"] == "px"  # PNG films: no pixel spacing

    model = run_seg(cache, n_boot=20, epochs=15, baseline=False, scored_at="model")
    m = {(r["label"], r["metric"]): r for r in model}
    assert m[("mean", "dice")]["params"]["scored_at"] == "model"
    assert m[("mean", "dice")]["value"] > 0.9 and by[("seg", "mean", "dice")]["value"] > 0.9
    with pytest.raises(FeatcacheError, match="scored_at"):
        run_seg(cache, scored_at="film")


def test_hd95_in_millimetres_from_the_dicom_pixel_spacing(tmp_path):
    H, W = 48, 64
    cache, *_, splits, ids = _synthetic_store(tmp_path / "mm", mask_shape=(H, W), spacing=(0.5, 0.25))
    rows = run_seg(cache, n_boot=20, epochs=10, save_masks=tmp_path / "pred")
    fs = FeatureStore(cache).open_set()
    for unit, spacing in (("mm", (0.5, 0.25)), ("px", (1.0, 1.0))):
        ref = []
        for rid, r in zip(ids[splits == "test"], np.flatnonzero(splits == "test")):
            p, t = read_mask(tmp_path / "pred" / f"{rid}.png") == 1, read_mask(fs.root / fs.masks[r]) == 1
            if p.any() and t.any():
                ref.append(_hd95_brute(p, t, spacing))
        if unit == "mm":
            hd = next(
                r for r in rows if r["probe"] == "seg" and r["label"] == "mean" and r["metric"] == "hd95"
            )
            assert hd["params"]["hd95_unit"] == "mm" and hd["params"]["spacing_tags"] == {
                "PixelSpacing": 30 - 20
            }
            assert hd["value"] == pytest.approx(np.mean(ref))
            mm_ref = ref

    # one test film without a spacing: every HD95 falls back to pixels, recorded and said once
    last_test = int(np.flatnonzero(splits == "test")[-1])
    cache2, *_ = _synthetic_store(
        tmp_path / "mixed", mask_shape=(H, W), spacing=lambda i: None if i == last_test else (0.5, 0.25)
    )
    with pytest.warns(UserWarning, match="1 of 10 test images have no DICOM pixel spacing") as record:
        mixed = run_seg(cache2, n_boot=20, epochs=10)
    assert len([w for w in record if "pixel spacing" in str(w.message)]) == 1
    hd = next(r for r in mixed if r["probe"] == "seg" and r["label"] == "mean" and r["metric"] == "hd95")
    assert hd["params"]["hd95_unit"] == "px" and "1 of 10" in hd["params"]["hd95_px_because"]
    assert hd["value"] == pytest.approx(np.mean(ref))  # the same fit as above: the pixel values
    assert np.mean(mm_ref) < np.mean(ref)


def test_a_set_with_an_interrupted_manifest_replacement_is_refused(tmp_path):
    cache, *_ = _synthetic_store(tmp_path)
    fs = FeatureStore(cache, mode="a").open_set()
    fs.update_attrs(manifest_digest="replacing:" + str(fs.attrs.get("manifest_digest")))
    with pytest.raises(FeatcacheError, match="interrupted"):
        run_seg(cache, epochs=1, n_boot=10)


def test_one_test_patient_gives_values_without_a_ci_and_says_why():
    """A patient bootstrap from one patient cannot give an interval: the rows carry the value and the reason."""
    from probes.seg.metrics import SEG_METRICS, _ci_entries

    values = {m: np.array([[0.5, 0.7], [0.6, np.nan]]) for m in SEG_METRICS}
    entries = _ci_entries(values, ["lung", "heart"], np.array(["p0", "p0"]), 50, 0)
    assert len(entries) == 3 * len(SEG_METRICS)
    for e in entries:
        assert "ci_low" not in e and e["params"]["ci"].startswith("no CI (")
    lung = next(e for e in entries if e["label"] == "lung" and e["metric"] == "dice")
    assert lung["value"] == pytest.approx(0.55) and lung["n_patients_test"] == 1
