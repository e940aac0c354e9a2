"""Dense probes end to end on the real data: the Hannover films with lung masks through extraction
(cls, pooled, patch, last four layers) and the linear, conv and U-Net heads to a report; the MR volume
with its label map through ``expand_volumes``, extraction and volumetric scoring, checked against a
numpy/scipy reference computed from the saved predicted volumes, HD95 in mm from the NIfTI header.

A random-init backbone at a tiny resolution keeps this fast; the numbers say the pipeline holds
together, not how good a foundation model is."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from scipy import ndimage

from featcache.decode.images import read_mask
from featcache.store.manifest import read_manifest

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

HANNOVER = SHARED_DATA / "hannover_covid_cxr"
VOLUMES = SHARED_DATA / "volumes"
MODEL = "random:dinov3-vits16"
HEADS = {"linear": {}, "conv": {}, "unet": {"layers": "last4"}}
# the single MR subject cut along its anterior axis into slabs, each scored as its own volume (and
# counted as its own patient) so there are train, val and two test volumes: (first, stop), split
SLABS = {"slab0": ((0, 16), "train"), "slab1": ((16, 24), "val"), "slab2": ((24, 33), "test"),
         "slab3": ((33, 41), "test")}  # fmt: skip
AXIS = 1  # coronal: every slice crosses the label, a plate at one axial level


@pytest.fixture(scope="module")
def one_thread():
    """The heads and the tiny ViT are fastest on one intra-op thread on a small machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _extract(manifest: Path, out: Path, res: int, root: Path | None, layers: str | None = None) -> Path:
    from featcache.extract import ExtractConfig, extract

    cfg = ExtractConfig(
        model=MODEL, data=str(manifest), out=str(out), res=res, root=None if root is None else str(root),
        tokens=("cls", "pooled", "patch"), layers=layers, workers=0, batch_size=16, threads=1,
    )  # fmt: skip
    extract(cfg, progress=False)
    return out


# ------------------------------------------------------------------------------------- Hannover films


@pytest.fixture(scope="module")
def hannover(tmp_path_factory, one_thread):
    """The 42 films with lung masks extracted once at 96 px; each head trained once into one results file."""
    from probes.seg.run import run_seg

    if not HANNOVER.is_dir():
        pytest.skip(f"real data folder not found at {HANNOVER}")
    tmp = tmp_path_factory.mktemp("hannover")
    manifest = tmp / "lungs.csv"
    with open(HANNOVER / "labels.csv", newline="") as f, open(manifest, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["path", "id", "patient_id", "split", "mask"])
        for r in csv.DictReader(f):
            if r["has_lung_mask"] == "1":
                w.writerow([r["image_path"], r["image_id"], r["patient_id"], r["split"], r["mask_path"]])
    cache = _extract(manifest, tmp / "cache", res=96, root=HANNOVER, layers="last4")
    results = tmp / "results.jsonl"
    rows = {
        head: run_seg(cache, head=head, epochs=15, n_boot=50, structures=["lung"], out=results,
                      save_masks=tmp / f"pred_{head}", **kw)
        for head, kw in HEADS.items()
    }  # fmt: skip
    return tmp, cache, results, rows


def _value(rows, probe="seg", label="mean", metric="dice"):
    return next(r for r in rows if r["probe"] == probe and r["label"] == label and r["metric"] == metric)


def test_hannover_heads_dice_equals_the_saved_masks(hannover):
    from featcache.store.feature_store import FeatureStore

    tmp, cache, _, rows = hannover
    fs = FeatureStore(cache).open_set()
    assert {"patch", "layer_patch"} <= set(fs.arrays()) and fs.shape("layer_patch")[1] == 4
    test = np.flatnonzero(fs.splits == "test")
    for head in HEADS:
        ref = []
        for r in test:  # the reference: Dice of each saved prediction against the mask file, then the mean
            p = read_mask(tmp / f"pred_{head}" / f"{fs.ids[r]}.png") == 1
            t = read_mask(HANNOVER / fs.masks[r]) == 1
            ref.append(2 * np.count_nonzero(p & t) / (np.count_nonzero(p) + np.count_nonzero(t)))
        row = _value(rows[head], label="lung")
        assert row["value"] == pytest.approx(np.mean(ref), rel=1e-9), head
        assert row["n_test"] == len(test) == 6 and row["ci_low"] <= row["value"] <= row["ci_high"]
        assert row["params"]["hd95_unit"] == "px"  # PNG films carry no pixel spacing
    assert _value(rows["unet"])["features"] == "layer_patch:8,9,10,11"
    assert _value(rows["unet"])["params"]["layers"] == [8, 9, 10, 11]


def test_hannover_results_reach_the_report(hannover):
    from probes.report.run import run_report

    _, _, results, rows = hannover
    written = [json.loads(line) for line in open(results)]
    assert len(written) == sum(len(r) for r in rows.values())
    text = run_report(results, metric="dice")
    for head in HEADS:
        table = text[text.index(f"head={head}: dice") :]
        assert f"{_value(rows[head])['value']:.3f}" in table.split("\n## ")[0], head


# ------------------------------------------------------------------------------------------ MR volume


@pytest.fixture(scope="module")
def mr(tmp_path_factory, one_thread):
    """The MR slabs expanded coronally with one window for the subject, extracted at 64 px, scored per volume."""
    import nibabel as nib

    from featcache.datasets.volumes import expand_volumes
    from probes.seg.run import run_seg

    if not VOLUMES.is_dir():
        pytest.skip(f"real data folder not found at {VOLUMES}")
    tmp = tmp_path_factory.mktemp("mr")
    img, lab = nib.load(VOLUMES / "anatomical.nii"), nib.load(VOLUMES / "anatomical_label.nii.gz")
    lines = []
    for name, ((a, b), split) in SLABS.items():
        nib.save(img.slicer[:, a:b, :], tmp / f"{name}.nii.gz")
        nib.save(lab.slicer[:, a:b, :], tmp / f"{name}_label.nii.gz")
        lines.append([f"{name}.nii.gz", f"{name}_label.nii.gz", name, f"subject-{name}", split])
    vols = tmp / "vols.csv"
    with open(vols, "w", newline="") as g:
        csv.writer(g).writerows([["path", "mask", "id", "patient_id", "split"], *lines])
    lo, hi = np.percentile(np.asarray(img.dataobj, dtype=np.float64), [1, 99])  # one window for all slabs
    expanded = expand_volumes(vols, tmp / "slices", axis=AXIS, window=f"{hi - lo},{(hi + lo) / 2}")
    cache = _extract(expanded.manifest, tmp / "cache", res=64, root=None)
    rows = run_seg(cache, head="linear", epochs=30, n_boot=50, scored_per="volume", save_masks=tmp / "pred")
    return tmp, expanded, rows, lab


def _hd95_reference(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """HD95 from scipy: 6-neighbour surfaces (the volume's edge counts as outside), exact EDT in mm."""
    six = ndimage.generate_binary_structure(3, 1)

    def surface(m):
        return m & ~ndimage.binary_erosion(m, structure=six, border_value=0)

    sa, sb = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))


def test_mr_slices_record_the_header_voxel_size(mr):
    import nibabel as nib

    tmp, expanded, _, _ = mr
    m = read_manifest(expanded.manifest)
    zooms = nib.as_closest_canonical(nib.load(tmp / "slab2.nii.gz")).header.get_zooms()  # R, A, S
    expected = (zooms[2], zooms[0], zooms[1])  # coronal: rows superior-inferior, columns right-left, slices A
    for k in range(len(m)):
        got = tuple(float(m.meta[f"meta_spacing_{a}"][k]) for a in ("row", "col", "slice"))
        assert got == pytest.approx(expected, rel=1e-6)


def test_mr_volume_scores_equal_a_reference_from_the_saved_volumes(mr):
    import nibabel as nib

    tmp, expanded, rows, _ = mr
    m = read_manifest(expanded.manifest)
    dice, jac, hd = [], [], []
    for name, (_, split) in SLABS.items():
        if split != "test":
            continue
        pred = np.load(tmp / "pred" / "volumes" / f"{name}.npy") == 1
        canon = nib.as_closest_canonical(nib.load(tmp / f"{name}_label.nii.gz"))
        labels = np.asarray(canon.dataobj) == 1  # [R, A, S]
        # display layout of a coronal slice: superior up, patient right on the left -> [A, S, R] flipped
        truth = np.transpose(labels, (1, 2, 0))[:, ::-1, ::-1]
        assert pred.shape == truth.shape
        members = [k for k in range(len(m)) if m.meta["meta_volume"][k] == name]
        stacked = np.stack([read_mask(m.root / m.masks[k]) == 1 for k in members])  # what extraction saw
        assert np.array_equal(stacked, truth)
        p, t = pred, truth
        dice.append(2 * (p & t).sum() / (p.sum() + t.sum()))
        jac.append((p & t).sum() / (p | t).sum())
        zr, za, zs = canon.header.get_zooms()
        hd.append(_hd95_reference(p, t, (za, zs, zr)) if p.any() and t.any() else np.nan)
    by = {(r["probe"], r["metric"]): r for r in rows if r["label"] == "structure_1"}
    assert by[("seg", "dice")]["value"] == pytest.approx(np.mean(dice), rel=1e-9)
    assert by[("seg", "jaccard")]["value"] == pytest.approx(np.mean(jac), rel=1e-9)
    assert by[("seg", "hd95")]["value"] == pytest.approx(np.nanmean(hd), rel=1e-9)
    params = by[("seg", "dice")]["params"]
    assert params["scored_per"] == "volume" and params["hd95_unit"] == "mm"
    assert by[("seg", "dice")]["n_test"] == 2 and params["n_slices_test"] == 9 + 8
