"""``Backbone``: one frozen transformers vision model behind one output contract.

Whatever the family, ``Backbone.forward`` returns the same named features:

- ``cls`` float32 [B, D]: the final-layer CLS token after the final norm. Models
  without a CLS token (CNNs, SAM) return ``pooled`` here.
- ``pooled`` float32 [B, D]: the mean of the final-layer patch tokens after the
  final norm; the CLS and register tokens are excluded. CNNs: the model's own
  global-average-pooled vector (after its final LayerNorm where it has one:
  ConvNeXt, DINOv3 ConvNeXt); SAM: the mean of the 256-d neck embedding map.
- ``patch`` [B, h, w, D], model dtype: final-layer patch tokens on the grid
  (h = H / patch size); CNNs: the last-stage feature map, channels last.
- ``registers`` [B, R, D], model dtype: register tokens, when R > 0.
- ``layer_cls`` / ``layer_pooled`` float32 [B, L, D], when ``layers`` is given:
  the CLS token and the patch-token mean of those blocks' outputs, with the
  model's final norm applied (the DINOv2 linear-evaluation protocol). For the
  last block they equal ``cls`` / ``pooled``. SAM: block outputs are 1024-d
  tokens without CLS or final norm, so both are the token mean (``layer_dim``).
- ``layer_patch`` [B, L, h, w, layer_dim], model dtype, only with ``layers`` and
  ``layer_patch=True``: those blocks' patch tokens with the final norm applied
  (registers and CLS dropped); for the last block it equals ``patch``. SAM: the
  block outputs as they are (no final norm).

Token order of DINO ViTs in transformers is CLS, registers, patches
(``Dinov2WithRegistersEmbeddings.forward`` and ``DINOv3ViTEmbeddings.forward``
concatenate them in that order). Intermediate layers are read with forward
hooks on the requested blocks only, and reduced to [B, D] inside the hook (or,
for ``layer_patch``, kept for those blocks only), so no full hidden-state stack
is ever kept (the 7B at 1024 px would need ~1.4 GB per image for it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featcache.errors import FeatcacheError
from featcache.models.registry import ModelSpec

__all__ = ["Backbone"]

# families whose sequence output is CLS, registers, patches
_TOKEN_FAMILIES = {"dinov2", "dinov2_reg", "dinov3_vit", "vit", "clip", "openclip", "mae"}
# learned absolute position tables that transformers interpolates only when asked
_INTERPOLATE_FLAG = {"vit", "clip", "openclip", "mae"}
# final norm applied to every token, by family (first attribute path that exists)
_NORMS = {
    "dinov2": ("layernorm",),
    "dinov2_reg": ("layernorm",),
    "dinov3_vit": ("norm",),
    "vit": ("layernorm",),
    "mae": ("layernorm",),
    "clip": ("post_layernorm", "vision_model.post_layernorm"),
    "openclip": ("post_layernorm", "vision_model.post_layernorm"),
}


def _attr(module: nn.Module, *paths: str) -> Any:
    for path in paths:
        obj: Any = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise AttributeError(f"{type(module).__name__} has none of {paths}")


def _blocks(model: nn.Module, num_layers: int) -> nn.ModuleList | None:
    # The block list moved between transformers versions (encoder.layer, model.layer,
    # layers, vision_encoder.layers); find it by its length instead of by name.
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    return None


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class Backbone(nn.Module):
    """A frozen vision backbone with a uniform feature contract (see the module docstring).

    Attributes:
        model: the wrapped transformers model (eval mode, no gradients).
        spec: the ``ModelSpec`` the model was built from.
        provenance: where the weights came from: ``source`` (``hub`` | ``folder`` |
            ``random``), ``model_id``, ``revision`` / ``weights_sha256`` / ``seed``, the
            architecture ``config`` as a dict, position-embedding handling, dtype.
        embed_dim: D of ``cls``, ``pooled``, ``patch``.
        layer_dim: D of ``layer_cls`` / ``layer_pooled`` (equal to ``embed_dim`` except SAM).
        num_layers: blocks (ViTs, SAM) or stages (CNNs).
        num_registers: R.
        patch_size: pixels per token (None for CNNs).
        stride: input sizes must be multiples of it (patch size, or 32 for CNNs).
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, provenance: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.provenance = provenance
        self.embed_dim = spec.embed_dim
        self.layer_dim = (
            int(spec.config.get("hidden_size", spec.embed_dim)) if spec.family == "sam" else spec.embed_dim
        )
        self.num_layers = spec.num_layers
        self.num_registers = spec.num_registers
        self.patch_size = spec.patch_size
        self.stride = spec.stride
        self._family = spec.family
        self._norm = _attr(model, *_NORMS[spec.family]) if spec.family in _NORMS else None
        self._blocks = _blocks(model, spec.num_layers) if not spec.is_cnn else None
        self._native_grid = self._position_grid()

    # ------------------------------------------------------------------ info

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the weights."""
        return next(self.model.parameters()).dtype

    def _position_grid(self) -> tuple[int, int] | None:
        # learned position tables exist for these families; DINOv3 uses RoPE, CNNs none
        if self._family in _INTERPOLATE_FLAG | {"dinov2", "dinov2_reg", "sam"}:
            size = self.model.config.image_size
            size = size if isinstance(size, int) else size[0]
            n = size // self.spec.patch_size
            return (n, n)
        return None

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Feature grid (h, w) for an input of ``height`` x ``width`` pixels.

        Raises:
            FeatcacheError: a size that is not a multiple of ``stride``.
        """
        s = self.stride
        if height % s or width % s or height <= 0 or width <= 0:
            bad = height if (height % s or height <= 0) else width
            lo, hi = (bad // s) * s, (bad // s + 1) * s
            near = f"{lo} or {hi}" if lo > 0 else str(s)
            raise FeatcacheError(
                f"{self.spec.name} takes input sizes that are multiples of {s} px "
                f"(e.g. {s * (224 // s)}, {s * (512 // s)}, {self.spec.native_res}); got {height}x{width}: "
                f"use {near} instead of {bad}"
            )
        return height // s, width // s

    # --------------------------------------------------------------- forward

    def forward(
        self, pixels: torch.Tensor, layers: Sequence[int] = (), layer_patch: bool = False
    ) -> dict[str, torch.Tensor]:
        """Embed a batch of normalised images.

        Args:
            pixels: float [B, 3, H, W], normalised with ``spec.mean`` / ``spec.std``; H and W
                multiples of ``stride``. Moved to the model's device and dtype here.
            layers: 0-based block indices (negative counts from the end), e.g. from
                ``resolve_layers``; empty for none.
            layer_patch: also return the patch tokens of those blocks (``layer_patch``).

        Returns:
            ``cls`` float32 [B, D], ``pooled`` float32 [B, D], ``patch`` [B, h, w, D] in the
            model dtype, ``registers`` [B, R, D] when R > 0, and with ``layers``:
            ``layer_cls`` / ``layer_pooled`` float32 [B, len(layers), layer_dim], and with
            ``layer_patch`` too: ``layer_patch`` [B, len(layers), h, w, layer_dim] in the model dtype.

        Raises:
            FeatcacheError: wrong pixel shape or size, layers out of range, or layers asked
                of a CNN.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise FeatcacheError(
                f"{self.spec.name} expects pixels of shape [B, 3, H, W]; got {list(pixels.shape)}"
            )
        gh, gw = self.grid(int(pixels.shape[2]), int(pixels.shape[3]))
        index = self._layer_indices(layers)
        x = pixels.to(device=self.device, dtype=self.dtype)
        with torch.no_grad():  # callers add inference_mode; torch.compile cannot trace inference tensors
            if self._family in _TOKEN_FAMILIES:
                out = self._forward_tokens(x, gh, gw, index, layer_patch)
            elif self._family == "sam":
                out = self._forward_sam(x, gh, gw, index, layer_patch)
            else:
                out = self._forward_cnn(x, gh, gw)
        return out

    def _layer_indices(self, layers: Sequence[int]) -> list[int]:
        index = [int(i) for i in layers]
        if not index:
            return []
        if self.spec.is_cnn:
            raise FeatcacheError(
                f"{self.spec.name} is a CNN: intermediate layers are only stored for transformer backbones; "
                "drop --layers"
            )
        n = self.num_layers
        bad = [i for i in index if not -n <= i < n]
        if bad:
            raise FeatcacheError(
                f"layers {bad} are out of range for {self.spec.name}: it has {n} blocks (0..{n - 1})"
            )
        return [i % n for i in index]

    def _note_interpolation(self, gh: int, gw: int) -> bool:
        if self._native_grid is None or (gh, gw) == self._native_grid:
            return False
        seen = self.provenance.setdefault("pos_interpolated_to", [])
        if [gh, gw] not in seen:
            seen.append([gh, gw])
        return True

    def _hooks(self, index: list[int], reduce) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], list]:
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = []
        if index and self._blocks is None:
            raise FeatcacheError(f"{self.spec.name}: cannot find its transformer blocks to read layers from")
        for i in sorted(set(index)):

            def hook(_module, _inputs, output, i=i):
                captured[i] = reduce(_first(output))

            handles.append(self._blocks[i].register_forward_hook(hook))
        return captured, handles

    def _stack_layers(self, out: dict, index: list[int], captured: dict) -> None:
        if index:
            out["layer_cls"] = torch.stack([captured[i][0] for i in index], dim=1)
            out["layer_pooled"] = torch.stack([captured[i][1] for i in index], dim=1)
            if len(captured[index[0]]) > 2:
                out["layer_patch"] = torch.stack([captured[i][2] for i in index], dim=1)

    def _forward_tokens(
        self, x: torch.Tensor, gh: int, gw: int, index: list[int], layer_patch: bool = False
    ) -> dict[str, torch.Tensor]:
        start = 1 + self.num_registers

        def reduce(tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
            normed = self._norm(tokens)
            patch = normed[:, start:]
            if layer_patch:  # [B, h*w, D] -> [B, h, w, D], model dtype
                return (
                    normed[:, 0].float(),
                    patch.float().mean(dim=1),
                    patch.reshape(-1, gh, gw, patch.shape[-1]),
                )
            return normed[:, 0].float(), patch.float().mean(dim=1)

        kwargs: dict[str, Any] = {}
        interpolated = self._note_interpolation(gh, gw)
        if self._family in _INTERPOLATE_FLAG:
            kwargs["interpolate_pos_encoding"] = interpolated
        if self._family == "mae":
            # ViTMAE shuffles patches by argsort(noise) even with mask_ratio 0; increasing noise keeps them in order
            kwargs["noise"] = torch.arange(gh * gw, device=x.device, dtype=torch.float32).expand(
                x.shape[0], -1
            )
        captured, handles = self._hooks(index, reduce)
        try:
            seq = self.model(pixel_values=x, **kwargs).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        if self._family in ("clip", "openclip"):
            # CLIP's last_hidden_state precedes post_layernorm (applied by CLIP to the CLS token only)
            seq = self._norm(seq)
        b, d = seq.shape[0], seq.shape[-1]
        if seq.shape[1] != start + gh * gw:
            raise FeatcacheError(
                f"{self.spec.name}: expected {start + gh * gw} tokens for a {gh}x{gw} grid, got {seq.shape[1]}"
            )
        patch = seq[:, start:]
        out = {
            "cls": seq[:, 0].float(),
            "pooled": patch.float().mean(dim=1),
            "patch": patch.reshape(b, gh, gw, d),
        }
        if self.num_registers:
            out["registers"] = seq[:, 1:start]
        self._stack_layers(out, index, captured)
        return out

    def _forward_sam(
        self, x: torch.Tensor, gh: int, gw: int, index: list[int], layer_patch: bool = False
    ) -> dict[str, torch.Tensor]:
        # SamPatchEmbeddings refuses any size but config.image_size, so the encoder is run
        # here step by step with the position table resized (as SAM's own code does for
        # the relative position tables, which transformers interpolates itself).
        enc = self.model.vision_encoder
        h = enc.patch_embed.projection(x).permute(0, 2, 3, 1)
        if enc.pos_embed is not None:
            pos = enc.pos_embed
            if self._note_interpolation(gh, gw):
                pos = F.interpolate(
                    pos.permute(0, 3, 1, 2).float(), size=(gh, gw), mode="bicubic", align_corners=False
                ).permute(0, 2, 3, 1)
            h = h + pos.to(h.dtype)
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(enc.layers):
            h = _first(layer(h))
            if i in index:
                mean = h.float().mean(dim=(1, 2))
                captured[i] = (mean, mean, h) if layer_patch else (mean, mean)
        emb = enc.neck(h)  # [B, 256, h, w]
        patch = emb.permute(0, 2, 3, 1)
        pooled = patch.float().mean(dim=(1, 2))
        out = {"cls": pooled, "pooled": pooled, "patch": patch}
        self._stack_layers(out, index, captured)
        return out

    def _forward_cnn(self, x: torch.Tensor, gh: int, gw: int) -> dict[str, torch.Tensor]:
        if self._family == "timm":
            result = self.model(pixel_values=x, do_pooling=False)
        else:
            result = self.model(pixel_values=x)
        hidden = result.last_hidden_state
        if self._family == "dinov3_convnext":
            # [B, 1 + h*w, C]: the normed global average first, then the normed map
            pooled = hidden[:, 0].float()
            patch = hidden[:, 1:].reshape(hidden.shape[0], gh, gw, hidden.shape[-1])
        else:
            patch = hidden.permute(0, 2, 3, 1)  # [B, C, h, w] -> [B, h, w, C]
            if self._family == "convnext":
                pooled = result.pooler_output.float()  # LayerNorm(global average)
            else:
                pooled = patch.float().mean(dim=(1, 2))
        if patch.shape[1:3] != (gh, gw):
            raise FeatcacheError(
                f"{self.spec.name}: expected a {gh}x{gw} feature map, got {tuple(patch.shape[1:3])}"
            )
        return {"cls": pooled, "pooled": pooled, "patch": patch}

    def extra_repr(self) -> str:
        return f"name={self.spec.name}, source={self.provenance.get('source')}, dim={self.embed_dim}"
