"""Matching a local checkpoint's config to the model registry: which entry it is (the same
architecture), what differs (architecture fields are errors, the others warnings), or a spec derived
from the config when the registry has no such architecture.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

from featcache.models.registry import FAMILIES, ModelSpec, Registry

# config fields whose mismatch changes outputs but not the architecture's shapes: warn only
_SOFT_KEYS = {
    "layer_norm_eps",
    "drop_path_rate",
    "pos_embed_rescale",
    "mask_ratio",
    "hidden_act",
    "projection_dim",
    "layerscale_value",
    "layer_scale_init_value",
    "rope_theta",
    "initializer_range",
}
# families for which image_size does not size any parameter (RoPE, convolutions)
_SIZE_FREE = {"dinov3_vit", "dinov3_convnext", "convnext", "resnet", "timm"}


def _config_value(config: Any, key: str) -> Any:
    value = getattr(config, key, _MISSING)
    if isinstance(value, tuple):
        value = list(value)
    return value


_MISSING = object()


def _compare(spec: ModelSpec, config: Any) -> tuple[list[str], list[str]]:
    """Differences between ``spec.config`` and a loaded config: (architecture, other)."""
    hard, soft = [], []
    for key, expected in spec.config.items():
        found = _config_value(config, key)
        if isinstance(expected, tuple):
            expected = list(expected)
        same = found == expected
        if isinstance(expected, float) and isinstance(found, (int, float)) and not isinstance(found, bool):
            same = math.isclose(found, expected, rel_tol=1e-9)
        if same:
            continue
        shown = "missing" if found is _MISSING else repr(found)
        line = f"{key} is {shown}, expected {expected!r}"
        if key in _SOFT_KEYS or (key == "image_size" and spec.family in _SIZE_FREE):
            soft.append(line)
        else:
            hard.append(line)
    return hard, soft


def _placeholder(family: str) -> ModelSpec:
    return ModelSpec(
        name=f"<{family}>", hub_id="", family=family, config={}, patch_size=None, embed_dim=0, num_layers=0
    )


def _match(config: Any, family: str, raw: dict, registry: Registry, folder: Path) -> ModelSpec:
    """The registry entry with this folder's architecture, or a spec derived from its config."""
    model_class = FAMILIES[family]
    matches = [s for s in registry if s.model_class == model_class and not _compare(s, config)[0]]
    if matches:
        named = [s for s in matches if s.hub_id and s.hub_id == raw.get("_name_or_path")]
        return dataclasses.replace((named or matches)[0], origin=str(folder))
    warnings.warn(
        f"{folder}: a {model_class} checkpoint whose architecture is not in the registry; "
        "using its config as is (normalisation from preprocessor_config.json, else ImageNet)",
        stacklevel=4,
    )
    return _derive_spec(config, family, folder)


def _derive_spec(config: Any, family: str, folder: Path) -> ModelSpec:
    keep = {
        k: v for k, v in config.to_diff_dict().items() if not k.startswith("_") and k not in {"architectures"}
    }
    keep = json.loads(json.dumps(keep, default=str))
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else 224
    common = {"name": folder.name, "hub_id": "", "family": family, "config": keep, "origin": str(folder)}
    if family == "sam":
        return ModelSpec(
            **common,
            patch_size=config.patch_size,
            embed_dim=config.output_channels,
            num_layers=config.num_hidden_layers,
            has_cls=False,
            native_res=size,
        )
    if family in {"dinov3_convnext", "convnext", "resnet"}:
        return ModelSpec(
            **common,
            patch_size=None,
            embed_dim=list(config.hidden_sizes)[-1],
            num_layers=len(config.depths),
            has_cls=False,
        )
    if family == "timm":
        return ModelSpec(**common, patch_size=None, embed_dim=0, num_layers=4, has_cls=False)
    return ModelSpec(
        **common,
        patch_size=config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0],
        embed_dim=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_registers=int(getattr(config, "num_register_tokens", 0) or 0),
        native_res=size,
    )
