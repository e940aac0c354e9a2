"""The model registry, the catalogue's architectures, layer selections and FLOP counts.

References are independent of featcache: parameter counts and FLOPs from
the released model configs (docs/MODELS.md), analytic FLOP counts (copied below), published model sizes, and
torch's own FLOP counter.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from featcache.errors import FeatcacheError, ModelLoadError
from featcache.models import REGISTRY, ModelSpec, Registry, build_model, model_flops, resolve_layers
from featcache.models.backbone import Backbone

# MODELS.md: released parameter counts of the DINO families (exact)
MODELS_MD_PARAMS = {
    "dinov3-vits16": 21_596_544,
    "dinov3-vits16plus": 28_692_864,
    "dinov3-vitb16": 85_660_416,
    "dinov3-vitl16": 303_129_600,
    "dinov3-vith16plus": 840_592_640,
    "dinov3-vit7b16": 6_716_035_072,
    "dinov3-convnext-tiny": 27_820_128,
    "dinov3-convnext-small": 49_454_688,
    "dinov3-convnext-base": 87_566_464,
    "dinov3-convnext-large": 196_230_336,
    "dinov2-vits14": 22_056_576,
    "dinov2-vitb14": 86_580_480,
    "dinov2-vitl14": 304_368_640,
    "dinov2-vitg14": 1_136_480_768,
    "rad-dino": 86_580_480,  # DINOv2 ViT-B/14
}
# published sizes (model cards / papers) of the part featcache builds, in millions, with what
# is subtracted from the headline figure; checked to 1%
PUBLISHED_M = {
    "vit-b16-in21k": 86.4,  # hub card, ViTModel with pooler
    "vit-l16-in21k": 304.4,
    "convnext-b-in22k": 88.6 - 1.025,  # ConvNeXt-B 88.6M with the 1k head (1024 x 1000 + 1000)
    "resnet152": 60.2 - 2.049,  # ResNet-152 60.2M with the 1000-class fc
    "clip-vitl14": 303.2,  # CLIP ViT-L/14 image tower without projection
    "openclip-vith14": 632.1 - 1.311,  # OpenCLIP ViT-H/14 image tower minus the 1280 x 1024 projection
    "mae-vitl16": 304.3 - 1.025,  # ViT-L/16 304.3M with its 1000-class head (1024 x 1000 + 1000)
    "sam-vitl": 308.3,  # SAM ViT-L image encoder
}
# Analytic GFLOP per image (closed form worked out by hand for each architecture) at 224 / 512 / 1024 px
ANALYTIC_GFLOP = {
    "dinov3-vit7b16": (2_725, 14_511, 66_090),
    "dinov3-vitl16": (126, 727, 4_137),
    "dinov3-vitb16": (36, 215, 1_321),
    "dinov2-vitg14": (599, 3_353, 19_063),
}


def _spec(name: str, aliases: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec(
        name=name,
        hub_id=f"org/{name}",
        family="vit",
        config={"hidden_size": 16},
        patch_size=16,
        embed_dim=16,
        num_layers=2,
        aliases=aliases,
    )


# ----------------------------------------------------------------- Registry


def test_register_get_and_aliases():
    reg = Registry()
    reg.register(_spec("alpha-b16", aliases=("alpha",)))
    assert reg.get("alpha-b16").name == "alpha-b16"
    assert reg.get("alpha").name == "alpha-b16"
    assert "alpha" in reg and "beta" not in reg and len(reg) == 1


@pytest.mark.parametrize(
    "second",
    [
        _spec("alpha-b16"),
        _spec("other", aliases=("alpha",)),
        _spec("alpha"),
        _spec("x", aliases=("alpha-b16",)),
    ],
)
def test_duplicate_names_and_aliases_raise(second):
    reg = Registry()
    reg.register(_spec("alpha-b16", aliases=("alpha",)))
    with pytest.raises(ValueError, match="already registered"):
        reg.register(second)
    assert reg.list() == ["alpha-b16"]  # the refused spec left nothing behind


def test_wildcard_listing():
    reg = Registry()
    for name in ["dino-s", "dino-b", "clip-l", "sam-l"]:
        reg.register(_spec(name))
    reg.register(_spec("vit-7b", aliases=("big-dino",)))
    assert reg.list() == ["clip-l", "dino-b", "dino-s", "sam-l", "vit-7b"]
    assert reg.list("dino-*") == ["dino-b", "dino-s"]
    assert reg.list("*-l") == ["clip-l", "sam-l"]
    assert reg.list("*dino*") == ["dino-b", "dino-s", "vit-7b"]  # an alias match lists its entry
    assert reg.list("nothing*") == []


def test_unknown_name_suggests_close_matches():
    reg = Registry()
    for name in ["dinov2-vitb14", "dinov2-vitl14", "clip-vitl14"]:
        reg.register(_spec(name))
    with pytest.raises(ModelLoadError, match="did you mean dinov2-vitb14") as err:
        reg.get("dinov2-vitb16")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="unknown model 'zzz'"):
        reg.get("zzz")


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown family"):
        ModelSpec("x", "org/x", "swin", {}, patch_size=4, embed_dim=8, num_layers=1)


# ----------------------------------------------------------------- the catalogue


def test_catalogue_covers_the_studies():
    expected = [
        *(f"dinov2-vit{s}14{r}" for s in "sblg" for r in ("", "-reg")),
        *("dinov3-vits16", "dinov3-vits16plus", "dinov3-vitb16", "dinov3-vitl16", "dinov3-vith16plus"),
        "dinov3-vit7b16",
        *(f"dinov3-convnext-{s}" for s in ("tiny", "small", "base", "large")),
        *(
            "rad-dino",
            "vit-b16-in21k",
            "vit-l16-in21k",
            "convnext-b-in22k",
            "resnet152",
            "densenet201",
            "vgg19",
        ),
        *("clip-vitl14", "openclip-vith14", "mae-vitl16", "sam-vitl"),
    ]
    assert sorted(expected) == REGISTRY.list()
    assert REGISTRY.get("dinov3-7b").name == "dinov3-vit7b16"
    assert REGISTRY.list("dinov3-vit*") == [
        "dinov3-vit7b16",
        "dinov3-vitb16",
        "dinov3-vith16plus",
        "dinov3-vitl16",
        "dinov3-vits16",
        "dinov3-vits16plus",
    ]
    for spec in REGISTRY:
        assert spec.gated == spec.name.startswith("dinov3"), spec.name
        assert len(spec.mean) == 3 and len(spec.std) == 3 and spec.license and "/" in spec.hub_id


def _built(spec: ModelSpec):
    if spec.family == "timm" and not transformers.utils.is_timm_available():
        pytest.skip("timm is not installed (pip install timm)")
    return build_model(spec, device="meta")


@pytest.mark.parametrize("name", REGISTRY.list())
def test_entry_parameter_count_and_feature_dims(name):
    """Built on the meta device: no memory, no compute, the released architecture."""
    spec = REGISTRY.get(name)
    net = _built(spec)
    count = sum(p.numel() for p in net.parameters())
    assert count == spec.params
    if name in MODELS_MD_PARAMS:
        assert count == MODELS_MD_PARAMS[name]
    if name.endswith("-reg"):  # registers add 4 x D to the plain DINOv2 count
        assert count == MODELS_MD_PARAMS[name[: -len("-reg")]] + 4 * spec.embed_dim
    if name in PUBLISHED_M:
        assert count / 1e6 == pytest.approx(PUBLISHED_M[name], rel=0.01)
    size = 4 * spec.stride
    out = Backbone(net.eval(), spec, {})(torch.empty(1, 3, size, size, device="meta"))
    assert out["cls"].shape == (1, spec.embed_dim)
    assert out["pooled"].shape == (1, spec.embed_dim)
    assert out["patch"].shape == (1, 4, 4, spec.embed_dim)
    if spec.num_registers:
        assert out["registers"].shape == (1, spec.num_registers, spec.embed_dim)
    else:
        assert "registers" not in out


# ----------------------------------------------------------------- layers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("last", [11]),
        ("last4", [8, 9, 10, 11]),
        ("last1", [11]),
        ("-1", [11]),
        ("3,6,9", [3, 6, 9]),
        ("0, -1", [0, 11]),
        ("-4,-3,-2,-1", [8, 9, 10, 11]),
        ("11", [11]),
    ],
)
def test_resolve_layers(text, expected):
    assert resolve_layers(text, 12) == expected


@pytest.mark.parametrize("text", ["12", "-13", "last13", "last0", "", "a,b", "3,3", "1.5"])
def test_resolve_layers_refuses_bad_selections(text):
    with pytest.raises(FeatcacheError):
        resolve_layers(text, 12)


# ----------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("name", sorted(ANALYTIC_GFLOP))
def test_model_flops_match_perf_notes(name):
    spec = REGISTRY.get(name)
    for res, expected in zip((224, 512, 1024), ANALYTIC_GFLOP[name]):
        assert model_flops(spec, res) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("name", ["dinov2-vits14-reg", "dinov3-vits16plus", "clip-vitl14", "mae-vitl16"])
def test_closed_form_matches_torch_flop_counter(name):
    """The closed form against torch's counter on the plain transformers model (meta device)."""
    spec = REGISTRY.get(name)
    net = build_model(spec, device="meta").eval()
    kwargs = {"interpolate_pos_encoding": True} if spec.family in ("clip", "mae") else {}
    with FlopCounterMode(display=False) as counter:
        net(pixel_values=torch.empty(1, 3, 448, 448, device="meta"), **kwargs)
    assert model_flops(spec, 448) == pytest.approx(counter.get_total_flops() / 1e9, rel=0.01)


def test_counted_flops_of_cnns_and_sam():
    # published multiply-adds at 224 px: ResNet-152 11.5 G, ConvNeXt-B 15.4 G
    assert model_flops(REGISTRY.get("resnet152"), 224) == pytest.approx(2 * 11.5, rel=0.02)
    assert model_flops(REGISTRY.get("convnext-b-in22k"), 224) == pytest.approx(2 * 15.4, rel=0.02)
    # SAM ViT-L at 1024 px by hand (multiply-adds): 64 x 64 = 4096 tokens of D = 1024; windowed
    # blocks pad the grid to 70 x 70 for their q/k/v/out projections and attend in 25 windows of 196
    d, n, padded = 1024, 4096, 70 * 70
    blocks = 20 * 4 * padded * d * d + 4 * 4 * n * d * d + 24 * 8 * n * d * d  # projections, MLPs
    attention = 4 * 2 * n * n * d + 20 * 25 * 2 * 196 * 196 * d
    rel_pos = 4 * 2 * n * 64 * d + 20 * 25 * 2 * 196 * 14 * d  # decomposed relative positions
    stem_neck = n * 3 * 16 * 16 * d + n * d * 256 + n * 256 * 256 * 9
    expected = 2 * (blocks + attention + rel_pos + stem_neck) / 1e9
    assert model_flops(REGISTRY.get("sam-vitl"), 1024) == pytest.approx(expected, rel=0.01)
