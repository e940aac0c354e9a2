"""The DINO part of the catalogue: DINOv2 (with and without registers), DINOv3 ViT and ConvNeXt,
and RAD-DINO (a DINOv2 ViT-B/14 continued on chest X-rays), with the helpers that build their
specs. ``featcache.models.zoo`` puts these first in ``SPECS``; its docstring says where the
numbers come from.
"""

from __future__ import annotations

from featcache.models.registry import ModelSpec

__all__ = ["DINO_SPECS"]

_DINOV2_LICENSE = "Apache-2.0"
_DINOV3_LICENSE = "DINOv3 License (custom; accept it on the model page)"
_DINOV3_GATED_NOTE = (
    "gated on the hub: accept the licence on the model page, then `hf auth login` or set HF_TOKEN"
)


def _dinov2(
    name: str,
    hub_id: str,
    *,
    hidden: int,
    layers: int,
    heads: int,
    swiglu: bool,
    params: int,
    registers: int = 0,
    aliases: tuple[str, ...] = (),
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    license: str = _DINOV2_LICENSE,
    notes: str = "",
) -> ModelSpec:
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "mlp_ratio": 4,
        "use_swiglu_ffn": swiglu,  # giant only; SwiGLU width 2/3 * 4 * hidden rounded to 8 = 4096
        "patch_size": 14,
        "image_size": 518,  # learned 37 x 37 position table, interpolated for other sizes
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "qkv_bias": True,
        "hidden_act": "gelu",
        "drop_path_rate": 0.0,
    }
    if registers:
        config["num_register_tokens"] = registers
    extra = {}
    if mean is not None:
        extra = {"mean": mean, "std": std}
    return ModelSpec(
        name=name,
        hub_id=hub_id,
        family="dinov2_reg" if registers else "dinov2",
        config=config,
        patch_size=14,
        embed_dim=hidden,
        num_layers=layers,
        num_registers=registers,
        has_cls=True,
        native_res=518,
        license=license,
        params=params,
        aliases=aliases,
        notes=notes,
        **extra,
    )


def _dinov3_vit(
    name: str,
    *,
    hidden: int,
    layers: int,
    heads: int,
    ffn: int,
    gated: bool,
    params: int,
    qv_bias: bool = True,
    aliases: tuple[str, ...] = (),
) -> ModelSpec:
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
        "use_gated_mlp": gated,  # SwiGLU
        "hidden_act": "silu" if gated else "gelu",
        "query_bias": qv_bias,
        "key_bias": False,
        "value_bias": qv_bias,
        "proj_bias": True,  # class default
        "mlp_bias": True,  # class default
        "num_register_tokens": 4,
        "patch_size": 16,
        "image_size": 224,  # RoPE: any multiple of 16 works; nothing is interpolated
        "rope_theta": 100.0,  # class default
        "layer_norm_eps": 1e-5,
        "layerscale_value": 1.0,
        "pos_embed_rescale": 2.0,  # training-time augmentation only
    }
    return ModelSpec(
        name=name,
        hub_id=f"facebook/{name}-pretrain-lvd1689m",
        family="dinov3_vit",
        config=config,
        patch_size=16,
        embed_dim=hidden,
        num_layers=layers,
        num_registers=4,
        has_cls=True,
        native_res=224,
        license=_DINOV3_LICENSE,
        params=params,
        aliases=aliases,
        gated=True,
        notes=_DINOV3_GATED_NOTE,
    )


def _dinov3_convnext(size: str, *, widths: list[int], depths: list[int], params: int) -> ModelSpec:
    return ModelSpec(
        name=f"dinov3-convnext-{size}",
        hub_id=f"facebook/dinov3-convnext-{size}-pretrain-lvd1689m",
        family="dinov3_convnext",
        config={
            "hidden_sizes": widths,
            "depths": depths,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,  # class default
            "layer_scale_init_value": 1e-6,  # class default
            "drop_path_rate": 0.0,
            "image_size": 224,
        },
        patch_size=None,
        embed_dim=widths[-1],
        num_layers=len(depths),
        has_cls=False,
        native_res=224,
        license=_DINOV3_LICENSE,
        params=params,
        gated=True,
        notes=_DINOV3_GATED_NOTE + "; cls = pooled = final LayerNorm of the global average",
    )


DINO_SPECS: list[ModelSpec] = [
    # DINOv2 (facebook/dinov2-*): counts from MODELS.md, 518 px position table included
    _dinov2(
        "dinov2-vits14",
        "facebook/dinov2-small",
        hidden=384,
        layers=12,
        heads=6,
        swiglu=False,
        params=22_056_576,
    ),
    _dinov2(
        "dinov2-vitb14",
        "facebook/dinov2-base",
        hidden=768,
        layers=12,
        heads=12,
        swiglu=False,
        params=86_580_480,
    ),
    _dinov2(
        "dinov2-vitl14",
        "facebook/dinov2-large",
        hidden=1024,
        layers=24,
        heads=16,
        swiglu=False,
        params=304_368_640,
    ),
    _dinov2(
        "dinov2-vitg14",
        "facebook/dinov2-giant",
        hidden=1536,
        layers=40,
        heads=24,
        swiglu=True,
        params=1_136_480_768,
    ),
    # DINOv2 with registers: the same counts plus 4 x hidden register parameters
    _dinov2(
        "dinov2-vits14-reg",
        "facebook/dinov2-with-registers-small",
        hidden=384,
        layers=12,
        heads=6,
        swiglu=False,
        registers=4,
        params=22_058_112,  # 22,056,576 + 4 x 384
    ),
    _dinov2(
        "dinov2-vitb14-reg",
        "facebook/dinov2-with-registers-base",
        hidden=768,
        layers=12,
        heads=12,
        swiglu=False,
        registers=4,
        params=86_583_552,  # 86,580,480 + 4 x 768
    ),
    _dinov2(
        "dinov2-vitl14-reg",
        "facebook/dinov2-with-registers-large",
        hidden=1024,
        layers=24,
        heads=16,
        swiglu=False,
        registers=4,
        params=304_372_736,  # 304,368,640 + 4 x 1024
    ),
    _dinov2(
        "dinov2-vitg14-reg",
        "facebook/dinov2-with-registers-giant",
        hidden=1536,
        layers=40,
        heads=24,
        swiglu=True,
        registers=4,
        params=1_136_486_912,  # 1,136,480,768 + 4 x 1536
    ),
    # DINOv3 ViT (gated): counts from MODELS.md
    _dinov3_vit("dinov3-vits16", hidden=384, layers=12, heads=6, ffn=1536, gated=False, params=21_596_544),
    _dinov3_vit("dinov3-vits16plus", hidden=384, layers=12, heads=6, ffn=1536, gated=True, params=28_692_864),
    _dinov3_vit("dinov3-vitb16", hidden=768, layers=12, heads=12, ffn=3072, gated=False, params=85_660_416),
    _dinov3_vit("dinov3-vitl16", hidden=1024, layers=24, heads=16, ffn=4096, gated=False, params=303_129_600),
    _dinov3_vit(
        "dinov3-vith16plus", hidden=1280, layers=32, heads=20, ffn=5120, gated=True, params=840_592_640
    ),
    _dinov3_vit(
        "dinov3-vit7b16",
        hidden=4096,
        layers=40,
        heads=32,
        ffn=8192,
        gated=True,
        qv_bias=False,  # the 7B has no query/value bias
        params=6_716_035_072,  # 13.4 GB in bf16
        aliases=("dinov3-7b",),
    ),
    # DINOv3 ConvNeXt (gated): counts from MODELS.md
    _dinov3_convnext("tiny", widths=[96, 192, 384, 768], depths=[3, 3, 9, 3], params=27_820_128),
    _dinov3_convnext("small", widths=[96, 192, 384, 768], depths=[3, 3, 27, 3], params=49_454_688),
    _dinov3_convnext("base", widths=[128, 256, 512, 1024], depths=[3, 3, 27, 3], params=87_566_464),
    _dinov3_convnext("large", widths=[192, 384, 768, 1536], depths=[3, 3, 27, 3], params=196_230_336),
    # RAD-DINO: DINOv2 ViT-B/14 continued on chest X-rays; same architecture as dinov2-vitb14
    _dinov2(
        "rad-dino",
        "microsoft/rad-dino",
        hidden=768,
        layers=12,
        heads=12,
        swiglu=False,
        params=86_580_480,  # = dinov2-vitb14
        mean=(0.5307, 0.5307, 0.5307),  # its preprocessor_config.json (chest X-ray statistics)
        std=(0.2583, 0.2583, 0.2583),
        license="MIT (revisions before 2024-09: MSRLA)",
        notes="trained at 518 px; use --res 518 for the published setting",
    ),
]
