"""Forward-pass cost of a backbone, for model FLOP utilisation (MFU) in GPU benchmarks."""

from __future__ import annotations

from featcache.models.registry import ModelSpec

__all__ = ["model_flops"]

_TOKEN_FAMILIES = {"dinov2", "dinov2_reg", "dinov3_vit", "vit", "clip", "openclip", "mae"}


def _size(res: int | tuple[int, int]) -> tuple[int, int]:
    return (int(res), int(res)) if isinstance(res, int) else (int(res[0]), int(res[1]))


def _ffn_macs_per_token(spec: ModelSpec) -> int:
    cfg = spec.config
    d = int(cfg["hidden_size"])
    if spec.family in ("dinov2", "dinov2_reg"):
        hidden = int(d * cfg.get("mlp_ratio", 4))
        if cfg.get("use_swiglu_ffn"):
            # Dinov2SwiGLUFFN: 2/3 of the width, rounded up to a multiple of 8; three matmuls
            f = (int(hidden * 2 / 3) + 7) // 8 * 8
            return 3 * d * f
        return 2 * d * hidden
    f = int(cfg["intermediate_size"])
    return (3 if cfg.get("use_gated_mlp") else 2) * d * f


def _vit_gflops(spec: ModelSpec, height: int, width: int) -> float:
    cfg = spec.config
    d = int(cfg["hidden_size"])
    p = int(spec.patch_size)
    grid = (height // p) * (width // p)
    n = grid + 1 + spec.num_registers
    per_layer = 4 * n * d * d + n * _ffn_macs_per_token(spec) + 2 * n * n * d  # qkv+out, FFN, QK^T and AV
    macs = spec.num_layers * per_layer + grid * 3 * p * p * d  # + patch embedding
    return 2.0 * macs / 1e9


def model_flops(spec: ModelSpec, res: int | tuple[int, int]) -> float:
    """Forward GFLOPs per image (2 x multiply-adds of all matmuls, convolutions and attention).

    Transformer backbones use the closed form: per block 4 N D^2 (q, k, v, output
    projections) + N x FFN (2 D F, or 3 D F for SwiGLU) + 2 N^2 D (QK^T and AV), with
    N = patches + CLS + registers, plus the patch embedding; norms, softmax and biases
    are left out. A size that is not a multiple of the patch size is floored to whole
    patches. CNNs and SAM (windowed attention, neck) are counted by running the model on
    the meta device under ``torch.utils.flop_counter.FlopCounterMode`` (no memory, no
    compute; imports torch).

    Args:
        spec: the backbone.
        res: input size in pixels, an int for square inputs or (height, width).

    Returns:
        GFLOP per image (1e9 floating-point operations).
    """
    height, width = _size(res)
    if spec.family in _TOKEN_FAMILIES:
        return _vit_gflops(spec, height, width)
    return _counted_gflops(spec, height, width)


def _counted_gflops(spec: ModelSpec, height: int, width: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from featcache.models.backbone import Backbone
    from featcache.models.loading import build_model

    s = spec.stride
    height, width = max(s, height // s * s), max(s, width // s * s)
    net = build_model(spec, device="meta")
    backbone = Backbone(net.eval(), spec, {})
    with FlopCounterMode(display=False) as counter:
        backbone(torch.empty(1, 3, height, width, device="meta"))
    return counter.get_total_flops() / 1e9
