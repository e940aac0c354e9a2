"""Backbone loading and the feature contract, on random weights (CPU, small inputs, offline).

The reference for every feature is the underlying transformers model called
directly (``bb.model``), sliced here by the documented token layout.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import transformers

from featcache.errors import FeatcacheError, ModelLoadError
from featcache.models import REGISTRY, ModelSpec, Registry, load_backbone

torch.set_num_threads(1)


def _tiny_registry() -> Registry:
    """Tiny architectures of every family, built in milliseconds (never the global registry)."""
    vit = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}
    reg = Registry()
    specs = [
        ModelSpec(
            "tiny-vit",
            "featcache-test/tiny-vit",
            "vit",
            {**vit, "patch_size": 8, "image_size": 32, "layer_norm_eps": 1e-12},
            patch_size=8,
            embed_dim=32,
            num_layers=3,
            native_res=32,
        ),
        ModelSpec(
            "tiny-clip",
            "featcache-test/tiny-clip",
            "clip",
            {**vit, "patch_size": 8, "image_size": 32},
            patch_size=8,
            embed_dim=32,
            num_layers=3,
            native_res=32,
        ),
        ModelSpec(
            "tiny-mae",
            "featcache-test/tiny-mae",
            "mae",
            {**vit, "patch_size": 8, "image_size": 32, "mask_ratio": 0.0},
            patch_size=8,
            embed_dim=32,
            num_layers=3,
            native_res=32,
        ),
        ModelSpec(
            "tiny-dinov2-reg",
            "featcache-test/tiny-dinov2-reg",
            "dinov2_reg",
            {
                "hidden_size": 32,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "patch_size": 8,
                "image_size": 32,
                "num_register_tokens": 2,
            },
            patch_size=8,
            embed_dim=32,
            num_layers=3,
            num_registers=2,
            native_res=32,
        ),
        ModelSpec(
            "tiny-sam",
            "featcache-test/tiny-sam",
            "sam",
            {
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "mlp_dim": 64,
                "global_attn_indexes": [1],
                "window_size": 2,
                "output_channels": 16,
                "patch_size": 8,
                "image_size": 32,
            },
            patch_size=8,
            embed_dim=16,
            num_layers=2,
            has_cls=False,
            native_res=32,
        ),
        ModelSpec(
            "tiny-convnext",
            "featcache-test/tiny-convnext",
            "convnext",
            {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]},
            patch_size=None,
            embed_dim=32,
            num_layers=4,
            has_cls=False,
        ),
        ModelSpec(
            "tiny-resnet",
            "featcache-test/tiny-resnet",
            "resnet",
            {
                "embedding_size": 8,
                "hidden_sizes": [8, 16, 24, 32],
                "depths": [1, 1, 1, 1],
                "layer_type": "basic",
            },
            patch_size=None,
            embed_dim=32,
            num_layers=4,
            has_cls=False,
        ),
    ]
    for spec in specs:
        reg.register(spec)
    return reg


TINY = _tiny_registry()


def _pixels(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dinov2_reg():
    return load_backbone("random:dinov2-vits14-reg")


# ------------------------------------------------------------ token layout


@pytest.mark.parametrize(
    ("name", "size"),
    [("dinov2-vits14", 112), ("dinov2-vits14-reg", 112), ("dinov3-vits16", 64)],
)
def test_dino_token_layout_matches_transformers(name, size):
    """cls = token 0, registers = tokens 1..R, pooled = mean of the rest (registers excluded)."""
    bb = load_backbone(f"random:{name}")
    x = _pixels(size)
    out = bb(x, layers=[-1])
    r = bb.num_registers
    assert r == REGISTRY.get(name).num_registers
    seq = bb.model(pixel_values=x).last_hidden_state
    g = size // bb.patch_size
    assert seq.shape[1] == 1 + r + g * g
    torch.testing.assert_close(out["cls"], seq[:, 0])
    torch.testing.assert_close(out["pooled"], seq[:, 1 + r :].mean(1))
    torch.testing.assert_close(out["patch"], seq[:, 1 + r :].reshape(2, g, g, -1))
    assert out["cls"].shape == (2, bb.embed_dim) and out["cls"].dtype == torch.float32
    if r:
        torch.testing.assert_close(out["registers"], seq[:, 1 : 1 + r])
        with_registers = seq[:, 1:].mean(1)
        assert not torch.allclose(out["pooled"], with_registers, atol=1e-4)
    else:
        assert "registers" not in out
    torch.testing.assert_close(out["layer_cls"][:, 0], out["cls"])
    torch.testing.assert_close(out["layer_pooled"][:, 0], out["pooled"])


def test_intermediate_layers_match_hidden_states_with_final_norm(dinov2_reg):
    x = _pixels(56)
    out = dinov2_reg(x, layers=[0, 5, -1])
    hidden = dinov2_reg.model(
        pixel_values=x, output_hidden_states=True
    ).hidden_states  # embeddings + 12 blocks
    norm = dinov2_reg.model.layernorm
    assert out["layer_cls"].shape == (2, 3, 384)
    for j, block in enumerate([0, 5, 11]):
        tokens = norm(hidden[block + 1])
        torch.testing.assert_close(out["layer_cls"][:, j], tokens[:, 0])
        torch.testing.assert_close(out["layer_pooled"][:, j], tokens[:, 5:].mean(1))


def test_random_weights_are_seeded():
    x = _pixels(32)
    a = load_backbone("random:tiny-vit", seed=1, registry=TINY)(x)["cls"]
    b = load_backbone("random:tiny-vit", seed=1, registry=TINY)(x)["cls"]
    c = load_backbone("random:tiny-vit", seed=2, registry=TINY)(x)["cls"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_backbone_is_frozen_and_records_provenance(dinov2_reg):
    assert not dinov2_reg.model.training
    assert not any(p.requires_grad for p in dinov2_reg.parameters())
    prov = dinov2_reg.provenance
    assert prov["source"] == "random" and prov["seed"] == 0 and prov["weights"] == "random seed 0"
    assert prov["model_id"] == "random:dinov2-vits14-reg"
    assert prov["config"]["num_register_tokens"] == 4
    assert prov["params"] == REGISTRY.get("dinov2-vits14-reg").params
    json.dumps(prov)  # stored as store attributes


# ------------------------------------------------------------- families


def test_dinov3_convnext_pooled_is_the_models_normed_average():
    bb = load_backbone("random:dinov3-convnext-tiny")
    x = _pixels(64)
    out = bb(x)
    ref = bb.model(pixel_values=x)
    assert out["patch"].shape == (2, 2, 2, 768)
    torch.testing.assert_close(out["pooled"], ref.pooler_output)
    torch.testing.assert_close(out["cls"], out["pooled"])
    torch.testing.assert_close(out["patch"].reshape(2, 4, 768), ref.last_hidden_state[:, 1:])


@pytest.mark.parametrize("name", ["tiny-convnext", "tiny-resnet"])
def test_cnn_pooled_and_patch_map(name):
    bb = load_backbone(f"random:{name}", registry=TINY)
    x = _pixels(96)
    out = bb(x)
    ref = bb.model(pixel_values=x)
    torch.testing.assert_close(out["patch"], ref.last_hidden_state.permute(0, 2, 3, 1))
    assert out["patch"].shape == (2, 3, 3, 32)
    torch.testing.assert_close(out["pooled"], ref.pooler_output.reshape(2, -1))
    torch.testing.assert_close(out["cls"], out["pooled"])
    with pytest.raises(FeatcacheError, match="CNN"):
        bb(x, layers=[-1])


def test_clip_cls_is_the_post_layernorm_cls_token():
    bb = load_backbone("random:tiny-clip", registry=TINY)
    x = _pixels(32)
    out = bb(x, layers=[2])
    ref = bb.model(pixel_values=x)
    torch.testing.assert_close(out["cls"], ref.pooler_output)
    tokens = torch.nn.functional.layer_norm(
        ref.last_hidden_state,
        (32,),
        bb.model.post_layernorm.weight,
        bb.model.post_layernorm.bias,
        bb.model.post_layernorm.eps,
    )
    torch.testing.assert_close(out["pooled"], tokens[:, 1:].mean(1))
    torch.testing.assert_close(out["layer_cls"][:, 0], out["cls"])


def test_mae_keeps_every_patch_in_spatial_order():
    bb = load_backbone("random:tiny-mae", registry=TINY)
    x = _pixels(32)
    out = bb(x)
    assert out["patch"].shape == (2, 4, 4, 32)
    # transformers' own call shuffles the patches; ids_restore puts them back in image order
    torch.manual_seed(0)
    ref = bb.model(pixel_values=x)
    assert ref.mask.sum() == 0
    restored = torch.gather(ref.last_hidden_state[:, 1:], 1, ref.ids_restore[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(out["patch"].reshape(2, 16, 32), restored, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["cls"], ref.last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)


def test_sam_pooled_is_the_mean_of_the_embedding_map():
    bb = load_backbone("random:tiny-sam", registry=TINY)
    x = _pixels(32)
    out = bb(x, layers=[0, 1])
    ref = bb.model(pixel_values=x).last_hidden_state  # [B, 16, 4, 4]
    torch.testing.assert_close(out["patch"], ref.permute(0, 2, 3, 1))
    torch.testing.assert_close(out["pooled"], ref.mean(dim=(2, 3)))
    torch.testing.assert_close(out["cls"], out["pooled"])
    assert out["layer_pooled"].shape == (2, 2, bb.layer_dim) and bb.layer_dim == 32
    # other sizes: the 4x4 position table is interpolated and the run is recorded
    assert bb(_pixels(48))["patch"].shape == (2, 6, 6, 16)
    assert bb.provenance["pos_interpolated_to"] == [[6, 6]]


def test_learned_position_table_is_interpolated_for_other_sizes():
    bb = load_backbone("random:tiny-vit", registry=TINY)
    x = _pixels(48)
    out = bb(x)
    ref = bb.model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(out["cls"], ref[:, 0])
    assert out["patch"].shape == (2, 6, 6, 32)
    assert bb.provenance["pos_interpolated_to"] == [[6, 6]]
    assert "learned 4x4" in bb.provenance["position_encoding"]


def test_sizes_that_are_not_a_multiple_of_the_patch_are_refused(dinov2_reg):
    with pytest.raises(FeatcacheError, match=r"multiples of 14 px.*use 98 or 112 instead of 100"):
        dinov2_reg(_pixels(100))
    with pytest.raises(FeatcacheError, match="out of range"):
        dinov2_reg(_pixels(28), layers=[12])


def test_bfloat16_weights():
    bb = load_backbone("random:tiny-dinov2-reg", dtype=torch.bfloat16, registry=TINY)
    out = bb(_pixels(32))
    assert bb.dtype == torch.bfloat16
    assert out["patch"].dtype == torch.bfloat16 and out["registers"].dtype == torch.bfloat16
    assert out["cls"].dtype == torch.float32 and out["pooled"].dtype == torch.float32


# ------------------------------------------------------------- folders and the hub cache


def _save(name: str, folder, registry=TINY):
    bb = load_backbone(f"random:{name}", seed=3, registry=registry)
    bb.model.save_pretrained(folder)
    return bb


def test_folder_round_trip(tmp_path):
    folder = tmp_path / "ckpt"
    bb = _save("tiny-dinov2-reg", folder)
    back = load_backbone(str(folder), registry=TINY)
    x = _pixels(32)
    a, b = bb(x, layers=[1]), back(x, layers=[1])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert back.spec.name == "tiny-dinov2-reg"  # matched to the registry architecture
    prov = back.provenance
    assert prov["source"] == "folder" and prov["model_id"] == str(folder.resolve())
    weights = folder / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert prov["weights_sha256"] == {"model.safetensors": digest}
    assert prov["weights"] == f"sha256:{digest}"


def test_folder_of_a_registry_model_is_matched_to_its_entry(tmp_path):
    folder = tmp_path / "dinov3-small"
    _save("dinov3-vits16", folder, registry=REGISTRY)
    back = load_backbone(str(folder))
    assert back.spec.name == "dinov3-vits16"
    assert back.num_registers == 4 and back.embed_dim == 384


def test_folder_with_corrupt_config(tmp_path):
    folder = tmp_path / "ckpt"
    _save("tiny-vit", folder)
    (folder / "config.json").write_text('{"model_type": "vit", "hidden_size": 32,')
    with pytest.raises(ModelLoadError) as err:
        load_backbone(str(folder), registry=TINY)
    msg = str(err.value)
    assert "\n" not in msg and "config.json" in msg and "not valid JSON" in msg


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "ckpt"
    _save("tiny-vit", folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="cannot load weights") as err:
        load_backbone(str(folder), registry=TINY)
    assert "\n" not in str(err.value)


def test_folder_of_an_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="'bert' is not a supported backbone family"):
        load_backbone(str(tmp_path), registry=TINY)


def _fake_hub_cache(cache, hub_id: str, source, commit: str = "a" * 40):
    """Lay out ``source``'s files the way huggingface_hub caches a repository."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in source.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_registry_name_loads_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    _save("tiny-vit", tmp_path / "src")
    _fake_hub_cache(tmp_path / "hf" / "hub", "featcache-test/tiny-vit", tmp_path / "src")
    bb = load_backbone("tiny-vit", registry=TINY)
    assert bb.provenance["source"] == "hub"
    assert bb.provenance["model_id"] == "featcache-test/tiny-vit"
    assert bb.provenance["revision"] == "a" * 40
    assert bb.provenance["weights"] == "featcache-test/tiny-vit@" + "a" * 40
    ref = load_backbone("random:tiny-vit", seed=3, registry=TINY)
    torch.testing.assert_close(bb(_pixels(32))["cls"], ref(_pixels(32))["cls"], rtol=0, atol=0)


def test_hub_checkpoint_that_does_not_match_its_registry_entry_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    _save("tiny-vit", tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    _fake_hub_cache(tmp_path / "hf" / "hub", "featcache-test/tiny-vit", tmp_path / "src")
    with pytest.raises(ModelLoadError, match="num_hidden_layers is 2, expected 3"):
        load_backbone("tiny-vit", registry=TINY)


@pytest.mark.parametrize("name", ["dinov2-vits14", "dinov3-vit7b16"])
def test_missing_weights_say_how_to_fetch_them(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    spec = REGISTRY.get(name)
    with pytest.raises(ModelLoadError) as err:
        load_backbone(name)
    msg = str(err.value)
    assert "\n" not in msg
    assert spec.hub_id in msg and f"hf download {spec.hub_id}" in msg and "--model /path/to/folder" in msg
    assert str(tmp_path) in msg
    if spec.gated:
        assert "accept the licence" in msg and "HF_TOKEN" in msg


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelLoadError, match="dinov2-vitb14"):
        load_backbone("dinov2-vitb16")


@pytest.mark.skipif(transformers.utils.is_timm_available(), reason="timm is installed")
def test_timm_models_need_timm():
    with pytest.raises(ModelLoadError, match="pip install timm"):
        load_backbone("random:densenet201")


def test_hub_checkpoint_with_other_normalisation_or_eps_warns_and_uses_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    _save("tiny-vit", tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    pre = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    (tmp_path / "src" / "preprocessor_config.json").write_text(json.dumps(pre))
    _fake_hub_cache(tmp_path / "hf" / "hub", "featcache-test/tiny-vit", tmp_path / "src")
    with pytest.warns(UserWarning) as record:
        bb = load_backbone("tiny-vit", registry=TINY)
    text = " ".join(str(w.message) for w in record)
    assert "layer_norm_eps is 1e-06, expected 1e-12" in text and "normalises with mean" in text
    assert bb.model.config.layer_norm_eps == 1e-6
    assert bb.spec.mean == (0.5, 0.5, 0.5) and bb.spec.std == (0.25, 0.25, 0.25)
    assert bb.provenance["mean"] == [0.5, 0.5, 0.5]


def test_folder_of_an_architecture_outside_the_registry(tmp_path):
    folder = tmp_path / "my-finetuned-vit"
    bb = _save("tiny-vit", folder)
    with pytest.warns(UserWarning, match="not in the registry"):
        back = load_backbone(str(folder))  # the global registry has no 32-wide ViT
    assert back.spec.name == "my-finetuned-vit" and back.provenance["registry_entry"] is None
    assert (back.embed_dim, back.num_layers, back.patch_size) == (32, 3, 8)
    x = _pixels(32)
    torch.testing.assert_close(back(x)["pooled"], bb(x)["pooled"], rtol=0, atol=0)


def test_hub_repository_outside_the_registry_loads_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    _save("tiny-convnext", tmp_path / "src")
    _fake_hub_cache(tmp_path / "hf" / "hub", "someone/chest-convnext", tmp_path / "src", commit="b" * 40)
    bb = load_backbone("someone/chest-convnext", registry=TINY)
    assert bb.spec.name == "tiny-convnext"  # same architecture as the registry entry
    assert bb.provenance["weights"] == "someone/chest-convnext@" + "b" * 40
    assert bb(_pixels(64))["pooled"].shape == (2, 32)
