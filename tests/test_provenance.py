"""A set's recorded preprocessing reproduces its features: the model input is rebuilt from nothing but
the record (PIL to decode, torch to resize and normalise, the transformers model called directly) and
gives the stored CLS bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featcache.extract import ExtractConfig, extract
from featcache.models import load_backbone
from featcache.store.feature_store import FeatureStore
from featcache.store.manifest import write_manifest


def _films(root, n=4):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):  # non-square 8-bit films: the resize matters
        img = rng.integers(0, 256, (50 + 7 * i, 41 + 5 * i), dtype=np.uint8)
        Image.fromarray(img).save(root / f"f{i}.png")
        paths.append(f"f{i}.png")
    return write_manifest(root / "m.csv", {"path": paths, "split": ["train", "train", "test", "test"]})


def _input_from_record(path, rec: dict, res: int) -> torch.Tensor:
    """The model input as the recorded preprocessing describes it (squash, bicubic), with no featcache code."""
    assert rec["resize"] == "squash" and rec["interpolation"] == "bicubic"
    assert (
        "antialias=True" in rec["pipeline"]["resize"]
        and rec["pipeline"]["clamp"] == "to [0, 1] after the resize"
    )
    x = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255.0)[None, None]  # [1, 1, H, W]
    x = F.interpolate(x, size=(res, res), mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp(0.0, 1.0)[0].expand(3, -1, -1)
    mean = torch.tensor(rec["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(rec["std"], dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("model, res", [("random:dinov2-vits14", 56), ("random:dinov3-vits16", 64)])
def test_cls_rebuilt_from_the_recorded_preprocessing_is_bit_identical(tmp_path, model, res):
    manifest = _films(tmp_path)
    cfg = ExtractConfig(
        model=model, data=str(manifest), out=str(tmp_path / "c"), res=res, workers=0, batch_size=4
    )
    r = extract(cfg, progress=False)
    fs = FeatureStore(tmp_path / "c").open_set(r.set_name)
    rec, res = fs.attrs["preprocessing"], fs.attrs["res"]  # each recorded once
    assert "res" not in rec and "config" not in fs.attrs
    pixels = torch.stack([_input_from_record(tmp_path / p, rec, res) for p in fs.paths])
    hf = load_backbone(model, seed=0).model  # the transformers module itself: weights only
    saved = torch.get_num_threads()
    torch.set_num_threads(fs.attrs["threads"]["intra"])  # the recorded threads: the same summation order
    try:
        with torch.inference_mode():
            cls = hf(pixel_values=pixels).last_hidden_state[:, 0]
    finally:
        torch.set_num_threads(saved)
    np.testing.assert_array_equal(fs.read("cls"), cls.float().numpy())
