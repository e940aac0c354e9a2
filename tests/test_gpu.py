"""GPU path: bf16 extraction on CUDA agrees with the float32 CPU result for the same random weights
(skipped without a GPU), and the loading rules behind it, checked on the CPU."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from featcache.demo import make_demo_dataset
from featcache.extract import ExtractConfig, extract
from featcache.models import load_backbone
from featcache.models import loading as ld
from featcache.store.feature_store import FeatureStore


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ----------------------------------------------------------------- CPU checks of the GPU rules


def test_random_weights_drawn_on_cpu_then_moved_equal_the_cpu_build():
    ref = load_backbone("random:dinov3-vits16", seed=3, dtype=torch.bfloat16)
    moved = load_backbone("random:dinov3-vits16", seed=3, dtype=torch.bfloat16, device="meta")
    assert moved.provenance["init_device"] == "cpu" and moved.provenance["weights"] == "random seed 3"
    assert all(p.device.type == "meta" for p in moved.parameters())  # moved after a CPU draw
    # the bf16 CPU draw is the float32 draw rounded: a GPU run sees the CPU run's weights
    fp32 = dict(load_backbone("random:dinov3-vits16", seed=3).model.named_parameters())
    for name, p in ref.model.named_parameters():
        torch.testing.assert_close(p, fp32[name].to(torch.bfloat16), rtol=0, atol=0)


def test_random_weights_drawn_on_the_device_are_named_apart():
    b = load_backbone("random:dinov3-vits16", seed=1, device="meta", random_init="device")
    assert b.provenance["init_device"] == "meta" and b.provenance["weights"] == "random seed 1 drawn on meta"


def test_checkpoint_placement(monkeypatch, tmp_path):
    assert ld._placement(torch.device("cpu")) == "cpu"
    monkeypatch.setattr(
        ld.importlib.util, "find_spec", lambda name: object() if name == "accelerate" else None
    )
    assert ld._placement(torch.device("cuda", 1)) == "device_map"
    monkeypatch.setattr(ld.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(ld, "_STAGED_SAID", set())
    with pytest.warns(UserWarning, match="accelerate is not installed"):
        assert ld._placement(torch.device("cuda")) == "staged"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert ld._placement(torch.device("cuda")) == "staged"


def test_checkpoint_is_read_with_a_device_map_onto_the_device(monkeypatch, tmp_path):
    net = ld.build_model(_spec(), seed=0)
    net.save_pretrained(tmp_path / "ckpt")
    seen = {}
    cls = type(net)
    real = cls.from_pretrained.__func__

    def spy(klass, path, **kw):
        seen.update(kw)
        kw.pop("device_map", None)  # accelerate is not needed to check what was asked
        return real(klass, path, **kw)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(ld, "_placement", lambda device: "device_map")
    b = load_backbone(str(tmp_path / "ckpt"), device="cpu")
    assert seen["device_map"] == {"": torch.device("cpu")}
    assert b.provenance["placement"] == "read straight onto cpu"
    for (name, p), q in zip(net.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def _spec():
    from featcache.models import REGISTRY

    return REGISTRY.get("dinov3-vits16")


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.parametrize(
    ("model", "res"),
    [("random:dinov3-vits16", 112), ("random:dinov3-convnext-tiny", 128), ("random:dinov2-vits14-reg", 112)],
)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_cuda_matches_float32_cpu(tmp_path, model, res):
    manifest = make_demo_dataset(tmp_path / "data", n_patients=8)
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = ExtractConfig(
            model=model, data=str(manifest), out=str(tmp_path / device), res=res, device=device,
            tokens=("cls", "pooled", "patch"), workers=2,
        )  # fmt: skip
        r = extract(cfg, progress=False)
        assert r.failed == 0 and r.pending == 0
        runs[device] = FeatureStore(tmp_path / device).open_set()
    assert runs["cuda"].record.compute_dtype in ("bfloat16", "float16")
    assert runs["cuda"].record.weights == runs["cpu"].record.weights
    for key in ("cls", "pooled"):
        assert _cos(runs["cpu"].read(key), runs["cuda"].read(key)).min() > 0.99
    a = runs["cpu"].read("patch").astype(np.float32).reshape(-1, runs["cpu"].shape("patch")[-1])
    b = runs["cuda"].read("patch").astype(np.float32).reshape(a.shape)
    assert np.median(_cos(a, b)) > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_weights_are_the_cpu_weights_and_layer_patch_agrees(tmp_path):
    gpu = load_backbone("random:dinov3-vits16", device="cuda", dtype=torch.bfloat16)
    cpu = load_backbone("random:dinov3-vits16", dtype=torch.bfloat16)
    for (name, p), q in zip(cpu.model.named_parameters(), gpu.model.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=0, atol=0, msg=name)
    manifest = make_demo_dataset(tmp_path / "data", n_patients=4)
    stores = {}
    for device in ("cpu", "cuda"):
        cfg = ExtractConfig(
            model="random:dinov3-vits16", data=str(manifest), out=str(tmp_path / device), res=64,
            device=device, tokens=("patch",), layers="last2", workers=0,
        )  # fmt: skip
        extract(cfg, progress=False)
        stores[device] = FeatureStore(tmp_path / device).open_set().read("layer_patch").astype(np.float32)
    d = stores["cpu"].shape[-1]
    assert np.median(_cos(stores["cpu"].reshape(-1, d), stores["cuda"].reshape(-1, d))) > 0.99
