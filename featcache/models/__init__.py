"""Backbones: the registry of released models and their loading.

``REGISTRY``, ``ModelSpec``, ``Registry``, ``resolve_layers`` and ``model_flops``
(for transformer backbones) work without importing torch; ``load_backbone`` and
``Backbone`` import torch and transformers when first used.

Example:
    >>> from featcache.models import REGISTRY, load_backbone, resolve_layers
    >>> REGISTRY.list("dinov3-vit*")
    >>> bb = load_backbone("random:dinov2-vits14")
    >>> out = bb(pixels, layers=resolve_layers("last4", bb.num_layers))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from featcache.models.flops import model_flops
from featcache.models.layers import resolve_layers
from featcache.models.registry import FAMILIES, ModelSpec, Registry
from featcache.models.zoo import REGISTRY

if TYPE_CHECKING:
    from featcache.models.backbone import Backbone
    from featcache.models.loading import build_model, load_backbone

__all__ = [
    "FAMILIES",
    "REGISTRY",
    "Backbone",
    "ModelSpec",
    "Registry",
    "build_model",
    "load_backbone",
    "model_flops",
    "resolve_layers",
]


def __getattr__(name: str):
    if name == "Backbone":
        from featcache.models.backbone import Backbone

        return Backbone
    if name in ("load_backbone", "build_model"):
        from featcache.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
