"""Model specs as plain data, and the small registry that holds them.

A ``ModelSpec`` says everything featcache needs to know about a backbone before
any weights are read: where the weights live, which transformers class builds
it, the exact architecture config, token layout and input normalisation. The
catalogue of released backbones is in ``featcache.models.zoo`` (which imports
this module, never the other way round) and is loaded into ``REGISTRY``,
importable from ``featcache.models``; tests build their own ``Registry`` so
they never add entries to the global one.

This module does not import torch or transformers.
"""

from __future__ import annotations

import builtins
import difflib
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from featcache.errors import ModelLoadError

__all__ = ["FAMILIES", "ModelSpec", "Registry"]

# family -> transformers model class that builds it (the config class is the
# model class's ``config_class``).
FAMILIES: dict[str, str] = {
    "dinov2": "Dinov2Model",
    "dinov2_reg": "Dinov2WithRegistersModel",
    "dinov3_vit": "DINOv3ViTModel",
    "dinov3_convnext": "DINOv3ConvNextModel",
    "vit": "ViTModel",
    "convnext": "ConvNextModel",
    "resnet": "ResNetModel",
    "timm": "TimmWrapperModel",
    "clip": "CLIPVisionModel",
    "openclip": "CLIPVisionModel",
    "mae": "ViTMAEModel",
    "sam": "SamVisionModel",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelSpec:
    """One backbone, as plain data.

    Attributes:
        name: registry name, lower case with dashes (``dinov3-vitb16``).
        hub_id: Hugging Face hub repository holding the released weights.
        family: one of ``FAMILIES``; selects the transformers class and the token layout.
        config: keyword arguments of the family's transformers config class that reproduce the
            architecture fields of the released ``config.json``.
        patch_size: ViT patch size in pixels; None for CNNs.
        embed_dim: width D of ``cls`` / ``pooled`` / ``patch`` features.
        num_layers: transformer blocks (ViTs, SAM) or stages (CNNs).
        num_registers: register tokens R between the CLS token and the patch tokens.
        has_cls: whether the model has a CLS token (False: ``cls`` equals ``pooled``).
        native_res: input size in pixels the released weights were made for (position table size
            for learned position embeddings).
        mean: per-channel RGB mean of the input normalisation, on the 0..1 scale.
        std: per-channel RGB standard deviation of the input normalisation.
        license: licence of the released weights.
        params: parameter count of the model featcache builds (the feature extractor, no
            classification head), equal to the released weights' count for that part.
        aliases: other names that resolve to this entry.
        gated: whether the hub repository asks users to accept a licence before downloading.
        notes: anything a user should know (defaults taken, caveats).
    """

    name: str
    hub_id: str
    family: str
    config: dict[str, Any]
    patch_size: int | None
    embed_dim: int
    num_layers: int
    num_registers: int = 0
    has_cls: bool = True
    native_res: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    license: str = ""
    params: int = 0
    aliases: tuple[str, ...] = ()
    gated: bool = False
    notes: str = ""
    # where the spec came from: "registry" for catalogue entries, otherwise the folder it was read from
    origin: str = field(default="registry", compare=False)

    def __hash__(self) -> int:
        return hash(self.name)  # config is a dict; the name identifies an entry

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(
                f"model spec {self.name!r}: unknown family {self.family!r}; known: {sorted(FAMILIES)}"
            )

    @property
    def model_class(self) -> str:
        """Name of the transformers model class that builds this backbone."""
        return FAMILIES[self.family]

    @property
    def is_cnn(self) -> bool:
        """True for convolutional backbones (no tokens: ``patch`` is the last stage map)."""
        return self.patch_size is None

    @property
    def stride(self) -> int:
        """Pixels per feature-grid cell: the patch size for ViTs, 32 for CNNs.

        Input sizes must be multiples of it.
        """
        return self.patch_size if self.patch_size is not None else 32

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-serialisable dict (for store attributes)."""
        return {
            "name": self.name,
            "hub_id": self.hub_id,
            "family": self.family,
            "model_class": self.model_class,
            "config": dict(self.config),
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "num_layers": self.num_layers,
            "num_registers": self.num_registers,
            "has_cls": self.has_cls,
            "native_res": self.native_res,
            "mean": list(self.mean),
            "std": list(self.std),
            "license": self.license,
            "params": self.params,
            "aliases": list(self.aliases),
            "gated": self.gated,
        }


class Registry:
    """Named ``ModelSpec`` entries; names and aliases are unique.

    Example:
        >>> reg = Registry()
        >>> reg.register(spec)
        >>> reg.get("dinov3-7b").name
        'dinov3-vit7b16'
        >>> reg.list("dinov3-vit*")
    """

    def __init__(self) -> None:
        self._specs: dict[str, ModelSpec] = {}
        self._alias: dict[str, str] = {}

    def register(self, spec: ModelSpec) -> ModelSpec:
        """Add ``spec``; returns it.

        Raises:
            ValueError: the name or one of the aliases is already taken (a programming
                error in the catalogue, not a user error).
        """
        for key in (spec.name, *spec.aliases):
            if key in self._specs or key in self._alias:
                owner = self._alias.get(key, key)
                raise ValueError(f"model name {key!r} of {spec.name!r} is already registered (by {owner!r})")
        if len(set(spec.aliases)) != len(spec.aliases) or spec.name in spec.aliases:
            raise ValueError(f"model spec {spec.name!r} repeats a name in its aliases {spec.aliases}")
        self._specs[spec.name] = spec
        for alias in spec.aliases:
            self._alias[alias] = spec.name
        return spec

    def get(self, name: str) -> ModelSpec:
        """The spec registered under ``name`` or one of its aliases.

        Raises:
            ModelLoadError: unknown name; the message lists close matches.
        """
        key = name.strip()
        key = self._alias.get(key, key)
        if key in self._specs:
            return self._specs[key]
        known = builtins.list(self._specs) + builtins.list(self._alias)
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "run `featcache models` to list them"
        raise ModelLoadError(f"unknown model {name!r}: {hint}")

    def list(self, pattern: str = "*") -> builtins.list[str]:
        """Sorted names matching the fnmatch ``pattern`` (``dinov2-*``, ``*convnext*``).

        A pattern that matches an alias lists the entry's name.
        """
        names = {n for n in self._specs if fnmatch.fnmatchcase(n, pattern)}
        names |= {t for a, t in self._alias.items() if fnmatch.fnmatchcase(a, pattern)}
        return sorted(names)

    def specs(self, pattern: str = "*") -> builtins.list[ModelSpec]:
        """Specs whose names match ``pattern``, sorted by name."""
        return [self._specs[n] for n in self.list(pattern)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._specs or name in self._alias)

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.specs())
