"""Building backbones: from the Hugging Face hub cache, a local folder, or random weights.

``load_backbone`` is the one entry point. Weights are read only from
safetensors files, with the concrete transformers class of the family (never
``trust_remote_code``), and every backbone comes back frozen, in eval mode,
with a provenance record that the feature store keeps. Finding and
downloading hub checkpoints is ``featcache.models.hub``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featcache.errors import ModelLoadError
from featcache.models.backbone import Backbone
from featcache.models.checkpoint_spec import _compare, _match, _placeholder
from featcache.models.hub import fetch_snapshot, first_line
from featcache.models.registry import FAMILIES, ModelSpec, Registry

__all__ = ["build_model", "load_backbone"]

# config.json model_type -> family (the class is FAMILIES[family])
_MODEL_TYPES = {
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2_reg",
    "dinov3_vit": "dinov3_vit",
    "dinov3_convnext": "dinov3_convnext",
    "vit": "vit",
    "convnext": "convnext",
    "resnet": "resnet",
    "timm_wrapper": "timm",
    "clip": "clip",
    "clip_vision_model": "clip",
    "vit_mae": "mae",
    "sam": "sam",
    "sam_vision_model": "sam",
}
# weights a checkpoint may lack without harm: unused heads and training-only tokens
_OPTIONAL_WEIGHTS = re.compile(r"(^|\.)(pooler|mask_token)(\.|$)")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NO_ATTENTION = {"ConvNextModel", "ResNetModel", "DINOv3ConvNextModel", "TimmWrapperModel"}


def load_backbone(
    model: str,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    attn_implementation: str | None = "sdpa",
    registry: Registry | None = None,
    cache_dir: str | os.PathLike | None = None,
    random_init: str = "cpu",
) -> Backbone:
    """Build a frozen backbone.

    Args:
        model: one of
            - a registry name or alias (``dinov3-vitb16``, ``dinov3-7b``) or its hub id: weights are
              read from the Hugging Face cache, or downloaded when the hub is reachable;
            - a local folder with a Hugging Face checkpoint (``config.json`` + ``model.safetensors``);
              the family comes from ``config.model_type`` and is matched against the registry;
            - ``random:NAME``: the registry architecture with seeded random weights, no download
              (tests, the demo and throughput benchmarks).
        seed: seed of ``random:`` weights (``torch.manual_seed``).
        device: where the weights go. Checkpoint weights are read straight onto it (no copy of the
            whole model in host memory first) when ``accelerate`` is installed; without it they are
            staged in host memory, and the provenance says so (``placement``).
        dtype: weight dtype, e.g. ``torch.bfloat16`` for large models on a GPU.
        revision: hub branch, tag or commit (hub models only).
        attn_implementation: ``sdpa`` (default), ``eager``, ...; ignored for models without attention.
        registry: registry to resolve names in (default: ``featcache.models.REGISTRY``).
        cache_dir: Hugging Face hub cache (default: ``$HF_HUB_CACHE`` or ``$HF_HOME/hub``).
        random_init: where ``random:`` weights are drawn: ``cpu`` (default) builds them on the CPU with
            the seed and then moves them, so a GPU run has exactly the weights of a CPU run; ``device``
            draws them on ``device`` itself (seconds instead of minutes for the 7B, but other values than
            on the CPU: for throughput measurements only). Recorded as ``init_device``.

    Returns:
        A ``Backbone`` in eval mode with ``requires_grad`` off.

    Raises:
        ModelLoadError: unknown name, weights not in the cache and not downloadable, a corrupt
            or mismatching checkpoint, or a missing optional package (timm).
    """
    if registry is None:
        from featcache.models.zoo import REGISTRY as registry
    text = str(model).strip()
    device = torch.device(device)
    if random_init not in ("cpu", "device"):
        raise ModelLoadError(f"random_init {random_init!r}: choose cpu or device")
    if text.startswith("random:"):
        spec = registry.get(text[len("random:") :])
        init = torch.device("cpu") if random_init == "cpu" else device
        # the CPU draw is the reference: the same seed gives the same weights on every device
        net = build_model(spec, seed=seed, device=init, dtype=dtype, attn_implementation=attn_implementation)
        net = net.to(device)
        prov: dict[str, Any] = {
            "source": "random",
            "model_id": f"random:{spec.name}",
            "revision": None,
            "weights_sha256": None,
            "seed": int(seed),
            "init_device": init.type,
            "placement": "built on the CPU, then moved" if init != device else f"built on {device}",
        }
    else:
        folder = Path(text).expanduser()
        if folder.is_dir() and ((folder / "config.json").exists() or text not in registry):
            spec, net, prov = _load_folder(folder, None, registry, dtype, attn_implementation, device)
        else:
            spec = _spec_for(text, registry)
            if spec is None:  # a hub repository that is not in the registry: family from its config
                snapshot = fetch_snapshot(text, text, False, revision, cache_dir)
                spec, net, prov = _load_folder(snapshot, None, registry, dtype, attn_implementation, device)
                prov.update(source="hub", model_id=text, revision=snapshot.name)
            else:
                snapshot = fetch_snapshot(spec.hub_id, spec.name, spec.gated, revision, cache_dir)
                spec, net, prov = _load_folder(snapshot, spec, registry, dtype, attn_implementation, device)
                prov.update(source="hub", model_id=spec.hub_id, revision=snapshot.name)
        net = net.to(device)  # a no-op when the weights were read onto the device
    net.eval().requires_grad_(False)
    prov["weights"] = _weights_id(prov)
    prov.update(_common_provenance(spec, net, dtype, device))
    return Backbone(net, spec, prov)


def _weights_id(prov: dict[str, Any]) -> str:
    """One string naming the exact weights: ``repo@commit``, ``sha256:...`` or ``random seed N``
    (``random seed N drawn on cuda`` for weights drawn on a GPU, which differ from the CPU draw)."""
    if prov["source"] == "random":
        where = prov.get("init_device", "cpu")
        return f"random seed {prov['seed']}" + ("" if where == "cpu" else f" drawn on {where}")
    if prov["source"] == "hub":
        return f"{prov['model_id']}@{prov['revision']}"
    hashes = prov["weights_sha256"]
    if len(hashes) == 1:
        return "sha256:" + next(iter(hashes.values()))
    joined = "".join(f"{name}:{digest}\n" for name, digest in sorted(hashes.items()))
    return "sha256:" + hashlib.sha256(joined.encode()).hexdigest()


def build_model(
    spec: ModelSpec,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "sdpa",
) -> nn.Module:
    """The transformers model of ``spec`` with seeded random weights (``device="meta"``: no memory).

    Weights depend on (seed, device type, dtype): CPU and CUDA random streams differ.

    Raises:
        ModelLoadError: the family needs a package that is not installed (timm).
    """
    cls = _model_class(spec)
    config = cls.config_class(**spec.config)
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"dtype": dtype}
    attn = _attn_kwargs(cls, attn_implementation)
    kwargs.update(attn)
    with torch.device(device):
        try:
            net = cls._from_config(config, **kwargs)
        except (ValueError, ImportError) as e:
            raise ModelLoadError(f"cannot build {spec.name}: {first_line(e)}") from e
    return net


# ------------------------------------------------------------------ helpers


def _spec_for(text: str, registry: Registry) -> ModelSpec | None:
    """The registry entry named (or hub id'd) ``text``; None for another ``org/name`` hub id."""
    if text in registry:
        return registry.get(text)
    for spec in registry:
        if spec.hub_id == text:
            return spec
    if re.match(r"^[\w.-]+/[\w.-]+$", text) and not text.startswith("."):
        return None
    if text.startswith((".", "/", "~")) or os.sep in text:
        raise ModelLoadError(
            f"model folder {text} does not exist: give a folder with config.json + model.safetensors"
        )
    return registry.get(text)  # raises with close matches


def _model_class(spec: ModelSpec):
    if spec.family == "timm" and importlib.util.find_spec("timm") is None:
        raise ModelLoadError(f"{spec.name} is a timm model: install timm first (pip install timm)")
    import transformers

    return getattr(transformers, FAMILIES[spec.family])


def _attn_kwargs(cls, attn_implementation: str | None) -> dict[str, str]:
    if not attn_implementation:
        return {}
    if attn_implementation == "sdpa" and not getattr(cls, "_supports_sdpa", False):
        return {}
    if cls.__name__ in _NO_ATTENTION:
        return {}
    return {"attn_implementation": attn_implementation}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}): re-download the checkpoint or fix the file"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object: re-download the checkpoint")
    return data


def _preprocessing(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    path = folder / "preprocessor_config.json"
    if not path.exists():
        return None
    data = _read_json(path)
    mean, std = data.get("image_mean"), data.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == 3 and len(std) == 3):
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _weights_sha256(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        target = Path(os.path.realpath(path))
        # hub cache blobs are named by the sha256 of their content: no need to read 13 GB
        if _HEX64.match(target.name):
            out[path.name] = target.name
            continue
        digest = hashlib.sha256()
        with open(target, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
        out[path.name] = digest.hexdigest()
    return out


def _load_folder(
    folder: Path,
    expected: ModelSpec | None,
    registry: Registry,
    dtype: torch.dtype,
    attn_implementation: str | None,
    device: torch.device | None = None,
) -> tuple[ModelSpec, nn.Module, dict[str, Any]]:
    folder = folder.resolve()
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelLoadError(
            f"no config.json in {folder}: a model folder holds a Hugging Face checkpoint (config.json + "
            "model.safetensors), e.g. from save_pretrained or `hf download REPO --local-dir DIR`"
        )
    raw = _read_json(config_path)
    model_type = raw.get("model_type") or ("timm_wrapper" if "architecture" in raw else None)
    family = _MODEL_TYPES.get(model_type)
    if family is None:
        raise ModelLoadError(
            f"{config_path}: model_type {model_type!r} is not a supported backbone family; "
            f"supported: {', '.join(sorted(_MODEL_TYPES))}"
        )
    if expected is not None and FAMILIES[expected.family] != FAMILIES[family]:
        raise ModelLoadError(
            f"{config_path}: model_type {model_type!r} does not match registry entry {expected.name} "
            f"({expected.model_class}); the repository holds another model"
        )
    cls = _model_class(expected or _placeholder(family))
    try:
        config = cls.config_class.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - config classes raise many types for bad values
        raise ModelLoadError(
            f"{config_path} is not a valid {cls.config_class.__name__}: {first_line(e)}"
        ) from None

    if expected is not None:
        hard, soft = _compare(expected, config)
        if hard:
            raise ModelLoadError(
                f"{config_path} does not match registry entry {expected.name}: {'; '.join(hard)}; "
                "check the revision, or load the folder by path to use it as is"
            )
        if soft:
            warnings.warn(
                f"{config_path} differs from registry entry {expected.name} in {'; '.join(soft)}; "
                "the downloaded config is used",
                stacklevel=3,
            )
        spec = expected
    else:
        spec = _match(config, family, raw, registry, folder)

    norm = _preprocessing(folder)
    if norm is not None and not (
        all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(norm[0], spec.mean))
        and all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(norm[1], spec.std))
    ):
        if expected is not None:
            warnings.warn(
                f"{folder / 'preprocessor_config.json'} normalises with mean {norm[0]} std {norm[1]}, "
                f"registry entry {spec.name} says {spec.mean} {spec.std}; using the checkpoint's",
                stacklevel=3,
            )
        spec = dataclasses.replace(spec, mean=norm[0], std=norm[1])

    if spec.family == "mae":
        config.mask_ratio = 0.0  # pre-training masks 75% of patches; extraction sees them all
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": dtype,
        "use_safetensors": True,
        "local_files_only": True,
    }
    kwargs.update(_attn_kwargs(cls, attn_implementation))
    placement = _placement(device)
    if placement == "device_map":
        kwargs["device_map"] = {"": device}  # tensors go from the safetensors files straight to the GPU
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # unused weights (CLIP text tower, SAM decoder) are expected
    try:
        net, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - missing, pickled-only or corrupt weights
        raise ModelLoadError(
            f"cannot load weights from {folder}: {first_line(e)} (featcache reads only safetensors: "
            "model.safetensors or sharded model-*.safetensors)"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info.get("missing_keys", []) if not _OPTIONAL_WEIGHTS.search(k)]
    if spec.family == "mae":
        missing = [k for k in missing if "position_embeddings" not in k]  # fixed sin-cos table, rebuilt
    if missing or info.get("mismatched_keys"):
        bad = missing or [str(k) for k in info["mismatched_keys"]]
        raise ModelLoadError(
            f"{folder} lacks {len(bad)} weight tensors of {cls.__name__} (first: {bad[0]}): "
            "the checkpoint is incomplete or of another model; re-download it"
        )
    if spec.origin != "registry" and spec.family == "timm":
        spec = dataclasses.replace(spec, embed_dim=int(net.timm_model.num_features))
    prov = {
        "source": "folder",
        "model_id": str(folder),
        "revision": None,
        "weights_sha256": _weights_sha256(folder),
        "seed": None,
        "placement": {
            "device_map": f"read straight onto {device}",
            "cpu": "read into host memory (CPU run)",
            "staged": f"staged in host memory, then moved to {device} (accelerate is not installed)",
        }[placement],
    }
    return spec, net, prov


_STAGED_SAID: set[str] = set()


def _placement(device: torch.device | None) -> str:
    """How checkpoint weights reach ``device``: ``cpu``, ``device_map`` (straight from the files onto
    the GPU, which transformers does only with accelerate installed) or ``staged`` (through host memory,
    said once per device type)."""
    if device is None or device.type == "cpu":
        return "cpu"
    if importlib.util.find_spec("accelerate") is not None:
        return "device_map"
    if device.type not in _STAGED_SAID:
        _STAGED_SAID.add(device.type)
        warnings.warn(
            f"accelerate is not installed: the weights are staged in host memory before moving to {device} "
            "(the whole model per process); pip install accelerate to read them straight onto the GPU",
            stacklevel=4,
        )
    return "staged"


def _position_encoding(spec: ModelSpec, net: nn.Module) -> str:
    if spec.is_cnn:
        return "none (convolutional)"
    if spec.family == "dinov3_vit":
        return "RoPE (no table; any multiple of the patch size)"
    size = net.config.image_size
    size = size if isinstance(size, int) else size[0]
    n = size // spec.patch_size
    return f"learned {n}x{n} table ({size} px), bicubic-interpolated for other sizes"


def _common_provenance(
    spec: ModelSpec, net: nn.Module, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    import transformers

    config = json.loads(json.dumps(net.config.to_dict(), default=str))
    return {
        "model": spec.name,
        "registry_entry": spec.name if spec.hub_id else None,
        "family": spec.family,
        "model_class": type(net).__name__,
        "config": config,
        "params": sum(p.numel() for p in net.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "attn_implementation": getattr(net.config, "_attn_implementation", None),
        "position_encoding": _position_encoding(spec, net),
        "mean": list(spec.mean),
        "std": list(spec.std),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
