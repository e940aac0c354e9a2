"""The catalogue: every backbone of the seed studies, as a ``ModelSpec``.

Architecture configs reproduce the released ``config.json`` files (facts from
docs/MODELS.md where the hub cannot be reached); fields not listed there take
the transformers class default for the family, as noted per entry. ``params``
is the parameter count of the class featcache builds (no classification head)
and is checked against the class on the meta device by tests/test_registry.py.
The DINO counts equal the published ones exactly; the others agree with the
published sizes quoted beside each entry.

The DINO entries (DINOv2, DINOv3, RAD-DINO) are in ``featcache.models.zoo_dino``; this module
holds the other families and builds ``REGISTRY`` from both.
"""

from __future__ import annotations

from featcache.models.registry import CLIP_MEAN, CLIP_STD, ModelSpec, Registry
from featcache.models.zoo_dino import DINO_SPECS

__all__ = ["REGISTRY", "SPECS"]

SPECS: list[ModelSpec] = [
    *DINO_SPECS,
    # ImageNet-21k supervised ViTs. Counts include the released pooler (dense + tanh, 590,592
    # parameters for B) that featcache loads but does not use; published: 86.4M / 304M.
    ModelSpec(
        name="vit-b16-in21k",
        hub_id="google/vit-base-patch16-224-in21k",
        family="vit",
        config={
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "hidden_act": "gelu",
            "patch_size": 16,
            "image_size": 224,  # learned 14 x 14 position table, interpolated for other sizes
            "layer_norm_eps": 1e-12,
            "qkv_bias": True,
        },
        patch_size=16,
        embed_dim=768,
        num_layers=12,
        native_res=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        license="Apache-2.0",
        params=86_389_248,
    ),
    ModelSpec(
        name="vit-l16-in21k",
        hub_id="google/vit-large-patch16-224-in21k",
        family="vit",
        config={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "hidden_act": "gelu",
            "patch_size": 16,
            "image_size": 224,
            "layer_norm_eps": 1e-12,
            "qkv_bias": True,
        },
        patch_size=16,
        embed_dim=1024,
        num_layers=24,
        native_res=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        license="Apache-2.0",
        params=304_351_232,
    ),
    # ConvNeXt-B ImageNet-22k: backbone without the 21,841-class head; published 88.6M with a
    # 1k head (87.6M + 1,025,000)
    ModelSpec(
        name="convnext-b-in22k",
        hub_id="facebook/convnext-base-224-22k",
        family="convnext",
        config={
            "hidden_sizes": [128, 256, 512, 1024],
            "depths": [3, 3, 27, 3],
            "hidden_act": "gelu",
            "patch_size": 4,
            "num_stages": 4,
            "layer_norm_eps": 1e-12,  # class default
            "layer_scale_init_value": 1e-6,
            "drop_path_rate": 0.0,
            "image_size": 224,
        },
        patch_size=None,
        embed_dim=1024,
        num_layers=4,
        has_cls=False,
        native_res=224,
        license="Apache-2.0",
        params=87_566_464,
        notes="pooled = the model's final LayerNorm of the global average; patch = last stage map",
    ),
    # ResNet-152 ImageNet-1k: published 60.2M with the 1000-class fc (2,049,000)
    ModelSpec(
        name="resnet152",
        hub_id="microsoft/resnet-152",
        family="resnet",
        config={
            "embedding_size": 64,
            "hidden_sizes": [256, 512, 1024, 2048],
            "depths": [3, 8, 36, 3],
            "layer_type": "bottleneck",
            "hidden_act": "relu",
            "downsample_in_first_stage": False,
        },
        patch_size=None,
        embed_dim=2048,
        num_layers=4,
        has_cls=False,
        native_res=224,
        license="Apache-2.0",
        params=58_143_808,
    ),
    # torchvision weights through timm and transformers' TimmWrapper (needs `pip install timm`).
    # TimmWrapper builds timm's model with num_classes=0; counts are the published totals minus
    # the classifier: DenseNet-201 20,013,928 - 1,921,000; VGG-19 143,667,240 - 4,097,000
    # (VGG keeps timm's fc6/fc7 pre-logits, which featcache does not use).
    ModelSpec(
        name="densenet201",
        hub_id="timm/densenet201.tv_in1k",
        family="timm",
        config={"architecture": "densenet201"},
        patch_size=None,
        embed_dim=1920,
        num_layers=4,
        has_cls=False,
        native_res=224,
        license="BSD-3-Clause",
        params=18_092_928,
        notes="needs timm; pooled = global average of the last dense block (after norm5 + ReLU)",
    ),
    ModelSpec(
        name="vgg19",
        hub_id="timm/vgg19.tv_in1k",
        family="timm",
        config={"architecture": "vgg19"},
        patch_size=None,
        embed_dim=512,
        num_layers=5,
        has_cls=False,
        native_res=224,
        license="BSD-3-Clause",
        params=139_570_240,
        notes="needs timm; pooled = global average of the last conv block (512-d), not fc7",
    ),
    # CLIP image towers (CLIPVisionModel: no projection head). Published: ViT-L/14 vision 303M;
    # OpenCLIP ViT-H/14 vision 632M with its 1280 x 1024 projection (1,310,720) that is not built here.
    ModelSpec(
        name="clip-vitl14",
        hub_id="openai/clip-vit-large-patch14",
        family="clip",
        config={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "hidden_act": "quick_gelu",
            "patch_size": 14,
            "image_size": 224,  # learned 16 x 16 position table, interpolated for other sizes
            "layer_norm_eps": 1e-5,
            "projection_dim": 768,
        },
        patch_size=14,
        embed_dim=1024,
        num_layers=24,
        native_res=224,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        license="MIT",
        params=303_179_776,
        notes="features before the projection; post_layernorm applied to every token",
    ),
    ModelSpec(
        name="openclip-vith14",
        hub_id="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        family="openclip",
        config={
            "hidden_size": 1280,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "intermediate_size": 5120,
            "hidden_act": "gelu",
            "patch_size": 14,
            "image_size": 224,
            "layer_norm_eps": 1e-5,
            "projection_dim": 1024,
        },
        patch_size=14,
        embed_dim=1280,
        num_layers=32,
        native_res=224,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        license="MIT",
        params=630_766_080,
        notes="features before the projection; post_layernorm applied to every token",
    ),
    # MAE ViT-L/16 encoder (ViTMAEModel; the decoder of the checkpoint is not loaded). The count
    # includes the fixed sin-cos position table (197 x 1024); published ViT-L 304M.
    ModelSpec(
        name="mae-vitl16",
        hub_id="facebook/vit-mae-large",
        family="mae",
        config={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "hidden_act": "gelu",
            "patch_size": 16,
            "image_size": 224,
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
            "mask_ratio": 0.0,  # released 0.75 (pre-training); no masking at extraction
        },
        patch_size=16,
        embed_dim=1024,
        num_layers=24,
        native_res=224,
        license="Apache-2.0 (hub card; the original MAE release is CC-BY-NC-4.0)",
        params=303_301_632,
        notes="mask ratio forced to 0 and patch order kept (no shuffling)",
    ),
    # SAM ViT-L image encoder (SamVisionModel). Published encoder size 308M.
    ModelSpec(
        name="sam-vitl",
        hub_id="facebook/sam-vit-large",
        family="sam",
        config={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "mlp_dim": 4096,
            "global_attn_indexes": [5, 11, 17, 23],
            "window_size": 14,
            "output_channels": 256,
            "patch_size": 16,
            "image_size": 1024,  # learned 64 x 64 position table, interpolated for other sizes
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
            "use_abs_pos": True,
            "use_rel_pos": True,
        },
        patch_size=16,
        embed_dim=256,
        num_layers=24,
        has_cls=False,
        native_res=1024,
        license="Apache-2.0",
        params=308_278_272,
        notes="no CLS: cls = pooled = mean of the 256-d neck embedding map; layers are 1024-d",
    ),
]

REGISTRY = Registry()
for _spec in SPECS:
    REGISTRY.register(_spec)
