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

from featcache.errors import FeatcacheError, StoreError
from featcache.images import Preprocess, read_mask
from featcache.manifest import Manifest
from featcache.store import ArraySpec, FeatureStore
from probes.seg import (
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


# ------------------------------------------------------------------------------------------ synthetic store


def _synthetic_store(tmp_path: Path, n_structures: int = 1, n: int = 40, seed: int = 0, patch=True):
    """A feature set whose patch tokens encode the mask exactly: channel k-1 = 1 on tokens of structure k."""
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
    for i in range(n):
        Image.fromarray((full[i] * (255 if n_structures == 1 else 1)).astype(np.uint8)).save(
            root / "masks" / f"{ids[i]}.png"
        )
    m = Manifest(
        source="synthetic",
        root=root,
        paths=np.array([f"images/{i}.png" for i in ids]),
        ids=ids,
        patient_ids=np.array([f"p{i // 2}" for i in range(n)]),
        splits=splits,
        masks=np.array([f"masks/{i}.png" for i in ids]),
    )
    arrays = {"cls": ArraySpec((DIM,)), "pooled": ArraySpec((DIM,))}
    if patch:
        arrays["patch"] = ArraySpec((GRID, GRID, DIM), "float16")
    store = FeatureStore(tmp_path / "cache", mode="a")
    attrs = {"preprocessing": Preprocess(res=RES).to_dict(), "model": "synthetic", "res": RES}
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
        run_seg(cache, head="unet")
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
    code = "import sys, probes.seg, probes.aggregate; assert 'torch' not in sys.modules, 'torch imported'"
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


@pytest.mark.slow
@pytest.mark.shared_data
def test_hannover_lung_masks_conv_head_beats_mean_mask(shared_data, tmp_path):
    folder = shared_data / "hannover_covid_cxr"
    manifest = tmp_path / "hannover_masks.csv"
    with open(folder / "labels.csv", newline="") as f, open(manifest, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["path", "id", "patient_id", "split", "mask"])
        kept = 0
        for r in csv.DictReader(f):
            if r["has_lung_mask"] == "1":
                w.writerow([r["image_path"], r["image_id"], r["patient_id"], r["split"], r["mask_path"]])
                kept += 1
    assert kept == 42
    cache = _extract(manifest, tmp_path / "cache", res=128, root=folder)
    rows = run_seg(cache, head="conv", n_boot=100, structures=["lung"])
    seg, base = _mean_dice(rows, "seg"), _mean_dice(rows, "seg-baseline")
    assert seg > base + 0.03, (seg, base)
    hd = {r["probe"]: r["value"] for r in rows if r["label"] == "mean" and r["metric"] == "hd95"}
    assert hd["seg"] < hd["seg-baseline"]


def test_saved_mask_names_never_collide():
    from probes.seg import _safe_name

    names = {_safe_name(x) for x in ("a/b", "a_b", "a:b", "é", "ü", "plain-id.1")}
    assert len(names) == 6 and _safe_name("plain-id.1") == "plain-id.1"
