"""Multi-layer token sources, the U-Net-style decoder and the DINOv2-radiology linear protocol.

Stores are built by hand (no model): ``layer_patch`` float16 [N, L, h, w, D] with the model layer
indices in ``attrs["layers"]``; the mask is written into one chosen layer only, so a head that reads
the right layers must recover it and one that reads only the others cannot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache.errors import FeatcacheError, StoreError
from featcache.store.feature_store import ArraySpec, FeatureStore
from featcache.store.manifest import Manifest
from featcache.store.preprocess import Preprocess
from probes.seg.run import SegProbe, StoreTokens, dice, run_seg

RES, GRID, DIM = 64, 4, 6
LAYERS = [2, 5, 8, 11]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These heads are tiny: one intra-op thread is ~50x faster than two on a busy 2-core machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def layered_store(tmp_path: Path, n: int = 24, signal_layer: int = 1, seed: int = 0, meta=None, masks=None):
    """A set with ``patch`` (= the deepest layer) and ``layer_patch`` [n, 4, GRID, GRID, DIM].

    Channel 0 of layer position ``signal_layer`` is 1 on the mask's tokens; everything else is noise.
    ``masks`` (int [n, GRID, GRID]) overrides the random rectangles; ``meta`` adds manifest columns.
    """
    rng = np.random.default_rng(seed)
    root = tmp_path / "data"
    (root / "masks").mkdir(parents=True)
    if masks is None:
        masks = np.zeros((n, GRID, GRID), np.int64)
        for i in range(n):
            r, c = rng.integers(0, GRID - 1, size=2)
            masks[i, r : r + 2, c : c + 2] = 1
    layer = rng.normal(0, 1, (n, len(LAYERS), GRID, GRID, DIM)).astype(np.float16)
    layer[:, signal_layer, :, :, 0] = masks
    scale = RES // GRID
    full = np.repeat(np.repeat(masks, scale, axis=1), scale, axis=2)
    ids = np.array([f"img{i:02d}" for i in range(n)])
    for i in range(n):
        Image.fromarray((full[i] * 255).astype(np.uint8)).save(root / "masks" / f"{ids[i]}.png")
    third = n // 3
    m = Manifest(
        source="synthetic",
        root=root,
        paths=np.array([f"images/{i}.png" for i in ids]),
        ids=ids,
        patient_ids=np.array([f"p{i // 4}" for i in range(n)]),  # four rows (one volume) a patient
        splits=np.array(["train"] * third + ["val"] * third + ["test"] * (n - 2 * third)),
        masks=np.array([f"masks/{i}.png" for i in ids]),
        meta=meta or {},
    )
    arrays = {
        "cls": ArraySpec((DIM,)),
        "patch": ArraySpec((GRID, GRID, DIM), "float16"),
        "layer_patch": ArraySpec((len(LAYERS), GRID, GRID, DIM), "float16"),
    }
    attrs = {
        "preprocessing": Preprocess(res=RES).to_dict(),
        "model": "synthetic",
        "res": RES,
        "layers": LAYERS,
    }
    fs = FeatureStore(tmp_path / "cache", mode="a").create_set("syn/m/64", m, arrays, attrs, shard_rows=8)
    for s in range(fs.n_shards):
        lo, hi = fs.shard_range(s)
        data = {
            "cls": np.zeros((hi - lo, DIM), np.float32),
            "patch": layer[lo:hi, -1],
            "layer_patch": layer[lo:hi],
        }
        fs.write_shard(s, data, {})
    return tmp_path / "cache", layer, masks, full, np.asarray(m.splits)


def test_layers_resolve_against_the_stored_layer_indices(tmp_path):
    from probes.seg.unet import resolve_layers

    cache, layer, *_ = layered_store(tmp_path, n=9)
    fs = FeatureStore(cache).open_set()
    assert resolve_layers(fs, None).array == "patch" and resolve_layers(fs, "last").positions is None
    c = resolve_layers(fs, "last4")
    assert c.positions == (0, 1, 2, 3) and c.layers == (2, 5, 8, 11) and c.features == "layer_patch:2,5,8,11"
    assert resolve_layers(fs, "last2").layers == (8, 11)
    assert resolve_layers(fs, "11,5").positions == (1, 3)  # stored order, shallow to deep
    assert resolve_layers(fs, [-1]).layers == (11,)
    with pytest.raises(StoreError, match=r"layer 7 is not stored \(stored layers: \[2, 5, 8, 11\]\)"):
        resolve_layers(fs, "7")
    with pytest.raises(FeatcacheError, match="last1..last4"):
        resolve_layers(fs, "last5")
    with pytest.raises(FeatcacheError, match="twice"):
        resolve_layers(fs, "5,-3")
    rows = np.array([7, 0, 3])
    got = np.concatenate([b for _, b in StoreTokens(fs, rows, "layer_patch", [1, 3]).blocks()])
    order = np.concatenate([p for p, _ in StoreTokens(fs, rows, "layer_patch", [1, 3]).blocks()])
    assert np.array_equal(got, layer[rows[order]][:, [1, 3]])


def test_unet_deals_layers_to_blocks_and_upsamples_by_stage():
    import torch

    from probes.seg.unet import _unet_groups, build_unet

    assert _unet_groups(4, 4) == [[3], [2], [1], [0]]  # the study: block k takes the k-th deepest layer
    assert _unet_groups(4, 2) == [[3, 2], [1, 0]]
    assert _unet_groups(1, 2) == [[0], []]  # one layer: a progressive-upsampling decoder
    for n_layers, stages in ((4, 2), (1, 3), (2, 1)):
        net = build_unet(DIM, n_layers, 3, hidden=32, stages=stages).eval()
        out = net(torch.zeros(2, n_layers * DIM, GRID, GRID))
        assert out.shape == (2, 3, GRID * 2**stages, GRID * 2**stages)
    with pytest.raises(FeatcacheError):
        build_unet(DIM, 1, 2, stages=0)


def test_unet_recovers_a_mask_only_a_shallow_layer_encodes(tmp_path):
    _, layer, masks, _, splits = layered_store(tmp_path, n=36, signal_layer=1)
    tr, va, te = (splits == s for s in ("train", "val", "test"))
    fit = dict(head="unet", epochs=30, lr=3e-3, batch_size=4, hidden=32, patience=30, random_state=0)
    probe = SegProbe(**fit).fit(layer[tr], masks[tr], layer[va], masks[va])
    pred = probe.predict(layer[te], GRID)
    # reference: the mask written into layer 1; the Dice of a numpy count over the test images
    d = np.mean([dice(p == 1, t == 1) for p, t in zip(pred, masks[te])])
    assert d > 0.85, d
    deep = SegProbe(**fit).fit(layer[tr][:, 2:], masks[tr], layer[va][:, 2:], masks[va])
    d_deep = np.mean([dice(p == 1, t == 1) for p, t in zip(deep.predict(layer[te][:, 2:], GRID), masks[te])])
    assert d_deep < d - 0.3, (d, d_deep)  # the two deepest layers are noise: nothing to find
    assert probe.head_logits(probe._model(), layer[te][:2]).shape == (2, 2, 4 * GRID, 4 * GRID)


def test_unet_fit_is_deterministic_for_a_seed(tmp_path):
    _, layer, masks, _, splits = layered_store(tmp_path, n=12)
    tr, va = splits == "train", splits == "val"
    fits = [
        SegProbe(head="unet", epochs=2, hidden=16, random_state=s).fit(
            layer[tr], masks[tr], layer[va], masks[va]
        )
        for s in (0, 0, 1)
    ]
    a, b, c = (f.state_ for f in fits)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_linear_head_on_concatenated_layers_finds_the_signal_layer(tmp_path):
    _, layer, masks, _, splits = layered_store(tmp_path, n=36, signal_layer=0)
    tr, va, te = (splits == s for s in ("train", "val", "test"))
    probe = SegProbe(head="linear", epochs=60).fit(layer[tr], masks[tr], layer[va], masks[va])
    assert probe.n_layers_ == 4 and probe.mean_.shape == (4 * DIM,)
    pred = probe.predict(layer[te], GRID)  # at the token grid: against the mask written into layer 0
    assert np.mean([dice(p == 1, t == 1) for p, t in zip(pred, masks[te])]) > 0.9
    only = SegProbe(head="linear", epochs=60).fit(layer[tr][:, 1:], masks[tr], layer[va][:, 1:], masks[va])
    noise = np.mean([dice(p == 1, t == 1) for p, t in zip(only.predict(layer[te][:, 1:], GRID), masks[te])])
    assert noise < 0.6


def test_run_seg_unet_on_stored_layers_records_them(tmp_path):
    cache, *_ = layered_store(tmp_path, n=24, signal_layer=1)
    rows = run_seg(cache, head="unet", layers="last4", epochs=30, lr=3e-3, batch_size=4, hidden=16, n_boot=50)
    r = next(r for r in rows if r["label"] == "mean" and r["metric"] == "dice" and r["probe"] == "seg")
    base = next(r for r in rows if r["label"] == "mean" and r["metric"] == "dice" and r["probe"] != "seg")
    assert r["features"] == "layer_patch:2,5,8,11" and r["params"]["layers"] == [2, 5, 8, 11]
    assert r["params"]["stages"] == 2 and r["params"]["hidden"] == 16 and r["head"] == "unet"
    assert r["value"] > base["value"] + 0.2, (r["value"], base["value"])
    with pytest.raises(StoreError, match="layer 3 is not stored"):
        run_seg(cache, head="unet", layers="3", epochs=1, n_boot=10)


# ---------------------------------------------------------------------------- the study's linear protocol


def test_dice_loss_matches_monai_formula_by_hand():
    import torch

    from probes.seg.study import dice_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (2, 3, 5, 4)).astype(np.float32)
    target = rng.integers(0, 3, (2, 5, 4))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    g = np.stack([(target == k) for k in range(3)], axis=1).astype(np.float64)
    inter, denom = (p * g).sum(axis=(2, 3)), p.sum(axis=(2, 3)) + g.sum(axis=(2, 3))
    want = np.mean(1 - (2 * inter + 1e-5) / (denom + 1e-5))
    got = float(dice_loss(torch.from_numpy(logits), torch.from_numpy(target)))
    assert got == pytest.approx(want, rel=1e-5)


def test_study_linear_protocol_selects_the_rate_on_val_and_refits(tmp_path):
    from probes.seg.study import STUDY_LRS, _pooled_jaccard, fit_study_linear

    _, layer, masks, _, splits = layered_store(tmp_path, n=36, signal_layer=3)
    X = layer[:, 3]  # the last layer, as the study reads it
    tr, va, te = (splits == s for s in ("train", "val", "test"))
    probe = fit_study_linear(X[tr], masks[tr], X[va], masks[va], epochs=30, random_state=0)
    assert probe.lr_grid_ == list(STUDY_LRS) and len(probe.val_jaccard_) == len(STUDY_LRS)
    assert probe.lr_ == STUDY_LRS[int(np.argmax(probe.val_jaccard_))]
    assert probe.selected_on_ == "val" and probe.refit_on_val_
    assert np.all(probe.mean_ == 0) and np.all(probe.std_ == 1)  # raw tokens, as the study feeds them
    assert probe.state_["weight"].shape == (2, DIM, 1, 1)
    # the best rate recovers the encoded mask; the smallest rate in 30 epochs has barely moved
    pred = probe.predict(X[te], GRID)
    assert _pooled_jaccard(pred, masks[te], 2) > 0.75
    assert probe.val_jaccard_[-3] > probe.val_jaccard_[0]
    # the pooled Jaccard against a hand count
    a = np.array([[[1, 1], [0, 0]]])
    b = np.array([[[1, 0], [1, 0]]])
    assert _pooled_jaccard(a, b, 2) == pytest.approx(1 / 3)


def test_run_seg_study_protocol_rows_record_it(tmp_path):
    cache, *_ = layered_store(tmp_path, n=24, signal_layer=3)
    rows = run_seg(cache, protocol="dinov2-radiology-linear", epochs=20, n_boot=50, baseline=False)
    p = rows[0]["params"]
    assert p["protocol"] == "dinov2-radiology-linear" and p["batch_size"] == 128 and p["epochs"] == 20
    assert p["loss"] == "dice" and p["optimizer"] == "sgd" and p["lr"] in p["lr_grid"]
    assert p["refit_on_train_val"] is True and p["lr_selected_on"] == "val"
    with pytest.raises(FeatcacheError, match="use --head linear"):
        run_seg(cache, head="unet", protocol="dinov2-radiology-linear")
