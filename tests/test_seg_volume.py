"""Volumetric segmentation scores: slices stacked by meta_slice, Dice/Jaccard/HD95 per volume against a
numpy/scipy reference computed from the saved predicted volumes, voxel spacing from the slice rows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage
from test_seg_unet import GRID, RES, _one_torch_thread, layered_store  # noqa: F401 (autouse fixture)

from featcache.decode.images import read_mask
from featcache.errors import FeatcacheError
from probes.seg.metrics import hd95
from probes.seg.run import run_seg, seg_metrics

N_VOL, N_SLICES = 6, 4  # 24 slice rows, 2 volumes per split


def _volume_meta(n: int, order=None, spacing=True):
    order = np.arange(n) if order is None else order
    meta = {
        "meta_volume": np.array([f"vol{i // N_SLICES}" for i in range(n)]),
        "meta_slice": np.array([str(int(order[i]) % N_SLICES * 2) for i in range(n)]),  # every 2nd slice
    }
    if spacing:
        meta.update(
            meta_spacing_row=np.full(n, "0.7"),
            meta_spacing_col=np.full(n, "0.9"),
            meta_spacing_slice=np.full(n, "2.5"),
        )
    return meta


def _volume_masks(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros((n, GRID, GRID), np.int64)
    for i in range(n):
        r, c = rng.integers(0, GRID - 1, size=2)
        m[i, r : r + 2, c : c + 2] = 1
    return m


def _surface_distances_brute(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """HD95 by brute force over all surface voxel pairs (surface: a 6-neighbour outside or the edge)."""

    def surface(m):
        pad = np.pad(m, 1)
        inner = m.copy()
        for ax in range(3):
            for sh in (-1, 1):
                inner &= np.roll(pad, sh, axis=ax)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~inner) * np.asarray(spacing)

    pa, pb = surface(a), surface(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_of_volumes_against_a_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(3):
        a = ndimage.binary_dilation(rng.random((5, 9, 8)) > 0.93, iterations=1)
        b = ndimage.binary_dilation(rng.random((5, 9, 8)) > 0.93, iterations=1)
        spacing = (2.5, 0.7, 0.9)
        assert hd95(a, b, spacing) == pytest.approx(_surface_distances_brute(a, b, spacing))
    one = np.zeros((3, 4, 4), bool)
    two = one.copy()
    one[0, 0, 0], two[2, 0, 0] = True, True
    assert hd95(one, two, (2.0, 1.0, 1.0)) == pytest.approx(4.0)  # two slices apart at 2 mm
    with pytest.raises(ValueError, match=r"\(slice, row, column\)"):
        hd95(one, two, (1.0, 1.0))


@pytest.fixture(scope="module")
def volume_rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vol")
    n = N_VOL * N_SLICES
    order = np.r_[
        [np.random.default_rng(0).permutation(N_SLICES) + N_SLICES * v for v in range(N_VOL)]
    ].ravel()
    cache, _, masks, full, splits = layered_store(
        tmp, n=n, signal_layer=3, meta=_volume_meta(n, order), masks=_volume_masks(n)
    )
    pred_dir = tmp / "pred"
    rows = run_seg(
        cache, head="linear", epochs=40, n_boot=50, scored_per="volume", save_masks=pred_dir, baseline=True
    )
    return rows, pred_dir, tmp, order, splits


def test_volume_scores_equal_a_reference_from_the_saved_volumes(volume_rows):
    rows, pred_dir, tmp, order, splits = volume_rows
    test = np.flatnonzero(splits == "test")
    vols = sorted({f"vol{i // N_SLICES}" for i in test})
    values = {m: [] for m in ("dice", "jaccard", "hd95")}
    for vid in vols:
        pred = np.load(pred_dir / "volumes" / f"{vid}.npy").astype(np.int64)
        assert pred.shape == (N_SLICES, RES, RES)
        # the true volume: the mask files of the volume's rows in meta_slice order
        members = [i for i in test if f"vol{i // N_SLICES}" == vid]
        members.sort(key=lambda i: order[i] % N_SLICES)
        truth = np.stack([read_mask(tmp / "data" / "masks" / f"img{i:02d}.png") for i in members])
        # and the saved per-slice PNGs stacked in the same order are the saved volume
        slices = np.stack([read_mask(pred_dir / f"img{i:02d}.png") for i in members])
        assert np.array_equal(slices, pred)
        p, t = pred == 1, truth == 1
        values["dice"].append(2 * (p & t).sum() / (p.sum() + t.sum()))
        values["jaccard"].append((p & t).sum() / (p | t).sum())
        values["hd95"].append(_surface_distances_brute(p, t, (2.5 * 2, 0.7, 0.9)))  # every 2nd slice
    by = {(r["probe"], r["label"], r["metric"]): r for r in rows}
    for metric, v in values.items():
        r = by[("seg", "structure_1", metric)]
        assert r["value"] == pytest.approx(np.mean(v), rel=1e-9), metric
        assert r["n_test"] == len(vols) and r["n_patients_test"] == len(vols)
        assert r["ci_low"] <= r["value"] <= r["ci_high"]
    p = by[("seg", "mean", "dice")]["params"]
    assert p["scored_per"] == "volume" and p["hd95_unit"] == "mm" and p["slice_steps"] == [2]
    assert p["n_slices_test"] == len(test)
    assert by[("seg", "mean", "dice")]["value"] > by[("seg-baseline", "mean", "dice")]["value"]


def test_volume_metrics_equal_seg_metrics_on_stacked_slices():
    rng = np.random.default_rng(5)
    pred, truth = rng.integers(0, 3, (2, 4, 6, 6)), rng.integers(0, 3, (2, 4, 6, 6))
    got = seg_metrics(pred, truth, 2, (3.0, 1.0, 1.0))
    for i in range(2):
        for k in (1, 2):
            p, t = pred[i] == k, truth[i] == k
            assert got["dice"][i, k - 1] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))
            assert got["jaccard"][i, k - 1] == pytest.approx((p & t).sum() / (p | t).sum())


def test_without_recorded_spacing_hd95_is_in_voxels_and_said(tmp_path):
    n = N_VOL * N_SLICES
    cache, *_ = layered_store(tmp_path, n=n, signal_layer=3, meta=_volume_meta(n, spacing=False),
                              masks=_volume_masks(n))  # fmt: skip
    with pytest.warns(UserWarning, match="records no voxel spacing"):
        rows = run_seg(cache, epochs=2, n_boot=20, scored_per="volume", baseline=False)
    p = rows[0]["params"]
    assert p["hd95_unit"] == "px" and "meta_spacing_slice" in p["hd95_px_because"]
    per_slice = run_seg(cache, epochs=2, n_boot=20, baseline=False)  # the default stays per slice
    assert per_slice[0]["params"]["scored_per"] == "slice"
    assert next(r for r in per_slice if r["metric"] == "dice")["n_test"] == n - 2 * (n // 3)


def test_a_volume_with_a_missing_slice_is_refused(tmp_path):
    n = N_VOL * N_SLICES
    meta = _volume_meta(n)
    meta["meta_slice"] = np.array([str(i % N_SLICES * 2) for i in range(n)])
    meta["meta_slice"][n - 2] = "9"  # the last test volume: slices 0, 2, 9, 6 -> 4 missing between 2 and 6
    cache, *_ = layered_store(tmp_path, n=n, signal_layer=3, meta=meta, masks=_volume_masks(n))
    with pytest.raises(FeatcacheError, match=r"test volume 'vol5' lacks slices"):
        run_seg(cache, epochs=1, n_boot=10, scored_per="volume")
    with pytest.raises(FeatcacheError, match="--scored-per"):
        run_seg(cache, scored_per="series")


def test_slice_rows_without_meta_volume_cannot_be_scored_per_volume(tmp_path):
    cache, *_ = layered_store(tmp_path, n=9)
    with pytest.raises(FeatcacheError, match="meta_volume"):
        run_seg(cache, epochs=1, n_boot=10, scored_per="volume")


def _hd95_2d_brute(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """2-D HD95 over all boundary pixel pairs (boundary: a 4-neighbour outside or the image edge)."""

    def boundary(m):
        pad = np.pad(m, 1)
        inner = m & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        return np.argwhere(m & ~inner) * np.asarray(spacing)

    pa, pb = boundary(a), boundary(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_per_slice_hd95_is_in_mm_from_the_recorded_spacing(volume_rows):
    _, _, tmp, _, splits = volume_rows
    cache, pred_dir = tmp / "cache", tmp / "pred_slices"
    rows = run_seg(cache, head="linear", epochs=20, n_boot=20, save_masks=pred_dir, baseline=False)
    values = []
    for i in np.flatnonzero(splits == "test"):
        p = read_mask(pred_dir / f"img{i:02d}.png") == 1
        t = read_mask(tmp / "data" / "masks" / f"img{i:02d}.png") == 1
        if p.any() and t.any():
            values.append(_hd95_2d_brute(p, t, (0.7, 0.9)))  # meta_spacing_row, meta_spacing_col
    r = next(r for r in rows if r["label"] == "structure_1" and r["metric"] == "hd95")
    assert r["value"] == pytest.approx(np.mean(values), rel=1e-9)
    assert r["params"]["hd95_unit"] == "mm" and r["params"]["scored_per"] == "slice"
    assert r["params"]["spacing_tags"] == {"meta_spacing": len(np.flatnonzero(splits == "test"))}


@pytest.mark.parametrize("scored_per", ["volume", "slice"])
def test_spacing_missing_on_some_slices_gives_pixels_said_once(tmp_path, scored_per):
    n = N_VOL * N_SLICES
    meta = _volume_meta(n)
    meta["meta_spacing_slice"] = meta["meta_spacing_slice"].astype(object)
    meta["meta_spacing_slice"][n - 1] = ""  # one test slice without a slice spacing
    cache, *_ = layered_store(tmp_path, n=n, signal_layer=3, meta=meta, masks=_volume_masks(n))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = run_seg(cache, epochs=2, n_boot=10, scored_per=scored_per, baseline=False)
    said = [w for w in caught if "no positive voxel spacing" in str(w.message)]
    assert len(said) == 1 and "1 of 8 test slices" in str(said[0].message)
    p = rows[0]["params"]
    assert p["hd95_unit"] == "px" and p["hd95_px_because"] == str(said[0].message)
