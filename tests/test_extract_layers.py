"""Multi-layer patch tokens (``--tokens patch --layers ...``): the stored ``layer_patch`` equals the
model's own hidden states at those blocks (transformers ``output_hidden_states``, final norm applied),
within the float16 cast; pooled grids equal a numpy block mean; the set resumes and states its bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.decode.images import read_image
from featcache.extract import ExtractConfig, extract
from featcache.extract.transform import model_input
from featcache.models import load_backbone
from featcache.store.feature_store import FeatureStore
from featcache.store.manifest import write_manifest
from featcache.store.preprocess import Preprocess


def _dataset(root, n=4, size=40):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(root / f"img{i}.png")
        paths.append(f"img{i}.png")
    return write_manifest(root / "manifest.csv", {"path": paths})


def _reference(model, res, fs, root, blocks, norm_attr):
    """Hidden states of ``blocks`` from transformers itself, with the final norm: [N, L, h, w, D] float32."""
    backbone = load_backbone(model, seed=0)
    spec = backbone.spec
    pre = Preprocess(res=res, mean=tuple(spec.mean), std=tuple(spec.std))
    pixels = torch.stack([model_input(pre, read_image(root / p)) for p in fs.paths])
    with torch.inference_mode():
        hidden = backbone.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        norm = getattr(backbone.model, norm_attr)
        start = 1 + spec.num_registers
        g = res // spec.patch_size
        layers = [norm(hidden[b + 1])[:, start:].reshape(len(pixels), g, g, -1) for b in blocks]
    return torch.stack(layers, dim=1).numpy()


@pytest.mark.parametrize(
    ("model", "res", "norm_attr"),
    [("random:dinov2-vits14-reg", 28, "layernorm"), ("random:dinov3-vits16", 32, "norm")],
)
def test_layer_patch_equals_hidden_states(tmp_path, model, res, norm_attr):
    manifest = _dataset(tmp_path)
    cfg = ExtractConfig(
        model=model, data=str(manifest), out=str(tmp_path / "c"), res=res, workers=0,
        tokens=("cls", "patch"), layers="last2", batch_size=3,
    )  # fmt: skip
    r = extract(cfg, progress=False)
    fs = FeatureStore(tmp_path / "c").open_set(r.set_name)
    assert fs.attrs["layers"] == [10, 11]
    stored = fs.read("layer_patch")
    assert stored.dtype == np.float16 and stored.shape == (4, 2, 2, 2, 384)
    ref = _reference(model, res, fs, tmp_path, [10, 11], norm_attr)
    # float16 keeps 11 significant bits: relative error <= 2**-11 of each value
    np.testing.assert_allclose(stored.astype(np.float32), ref, rtol=2**-10, atol=1e-3)
    # the last block's tokens are the final patch tokens
    np.testing.assert_array_equal(stored[:, -1], fs.read("patch"))


def test_layer_patch_pooled_resumes_and_reports_bytes(tmp_path, capsys):
    manifest = _dataset(tmp_path, n=6)
    kw = dict(
        model="random:dinov3-vits16", data=str(manifest), out=str(tmp_path / "c"), res=64, workers=0,
        tokens=("patch",), layers="0,-1", patch_pool=2, shard_rows=2,
    )  # fmt: skip
    full = extract(ExtractConfig(**kw), progress=False)
    assert "layer_patch float16 [2, 2, 2, 384]" in capsys.readouterr().err  # said once, with its size
    fs = FeatureStore(tmp_path / "c").open_set(full.set_name)
    pooled = fs.read("layer_patch").astype(np.float32)
    # against an unpooled run: a 2x2 block mean of the 4x4 grid
    unpooled = extract(ExtractConfig(**{**kw, "patch_pool": 1, "out": str(tmp_path / "u")}), progress=False)
    grid = FeatureStore(tmp_path / "u").open_set(unpooled.set_name).read("layer_patch").astype(np.float32)
    blocks = grid.reshape(6, 2, 2, 2, 2, 2, 384).mean(axis=(3, 5))
    np.testing.assert_allclose(pooled, blocks, rtol=2e-3, atol=2e-3)
    assert fs.attrs["layers"] == [0, 11]
    raw, _ = fs.bytes_per_row()["layer_patch"]
    assert raw == 2 * 2 * 2 * 384 * 2  # what `featcache info` prints per image
    again = extract(ExtractConfig(**kw), progress=False)
    assert again.processed == 0 and again.shards_skipped == 3
