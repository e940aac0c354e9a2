"""GPU path: bf16 extraction on CUDA agrees with the float32 CPU result (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featcache.demo import make_demo_dataset
from featcache.extract import ExtractConfig, extract
from featcache.store import FeatureStore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize(
    "model", ["random:dinov3-vits16", "random:dinov3-convnext-tiny", "random:dinov2-vits14-reg"]
)
def test_bf16_cuda_matches_float32_cpu(tmp_path, model):
    manifest = make_demo_dataset(tmp_path / "data", n_patients=8)
    res = 112
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = ExtractConfig(
            model=model, data=str(manifest), out=str(tmp_path / device), res=res, device=device,
            tokens=("cls", "pooled", "patch"), workers=2,
        )  # fmt: skip
        r = extract(cfg, progress=False)
        assert r.failed == 0 and r.pending == 0
        runs[device] = FeatureStore(tmp_path / device).open_set()
    assert runs["cuda"].attrs["config"]["compute_dtype"] in ("bfloat16", "float16")
    for key in ("cls", "pooled"):
        assert _cos(runs["cpu"].read(key), runs["cuda"].read(key)).min() > 0.99
    a = runs["cpu"].read("patch").astype(np.float32).reshape(-1, runs["cpu"].shape("patch")[-1])
    b = runs["cuda"].read("patch").astype(np.float32).reshape(a.shape)
    assert np.median(_cos(a, b)) > 0.99
