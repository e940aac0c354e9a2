"""Finding a checkpoint on the Hugging Face hub: where the local cache is, whether the hub may be
reached (``HF_HUB_OFFLINE``), and fetching the few files a checkpoint needs into the cache, with a
one-line error that says how to get them when that fails. ``featcache.models.loading`` builds the
backbone from the folder this returns.
"""

from __future__ import annotations

import os
from pathlib import Path

from featcache.errors import ModelLoadError

__all__ = ["HUB_FILES", "fetch_snapshot", "first_line", "hub_cache", "hub_offline"]

# the files a checkpoint needs; other weight formats in a repository are never downloaded
HUB_FILES = [
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
]


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` forbids reaching the hub."""
    truthy = {"1", "true", "yes", "on"}
    if any(
        os.environ.get(k, "").strip().lower() in truthy for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache(cache_dir: str | os.PathLike | None) -> Path:
    """The hub cache folder: ``cache_dir``, else ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``."""
    # read the environment now, not at import time, so HF_HOME set later still applies
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def fetch_snapshot(
    hub_id: str, name: str, gated: bool, revision: str | None, cache_dir: str | os.PathLike | None
) -> Path:
    """The cached snapshot folder of ``hub_id`` (``HUB_FILES`` only), downloaded when the hub is
    reachable.

    Raises:
        ModelLoadError: not in the cache and not downloadable; says how to fetch it (and, for a
            gated repository, how to get access).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    cache = hub_cache(cache_dir)
    offline = hub_offline()
    try:
        path = snapshot_download(
            hub_id,
            revision=revision,
            cache_dir=cache,
            allow_patterns=HUB_FILES,
            local_files_only=offline,
        )
    except Exception as e:  # hub errors come in many types (offline, gated, HTTP, missing revision)
        gated = gated or isinstance(e, GatedRepoError)
        if offline:
            reason = "HF_HUB_OFFLINE is set"
        elif isinstance(e, GatedRepoError):
            reason = "access to the gated repository was refused"
        elif isinstance(e, LocalEntryNotFoundError):
            reason = "the hub is unreachable"
        else:
            reason = f"{type(e).__name__}: {first_line(e)}"
        at = f"@{revision}" if revision else ""
        msg = (
            f"weights of {name} ({hub_id}{at}) are not in the Hugging Face cache {cache} and could not be "
            f"downloaded ({reason}): run `hf download {hub_id}` (or `huggingface-cli download {hub_id}`) "
            "where the hub is reachable and retry, or pass --model /path/to/folder"
        )
        if gated:
            msg += (
                f"; the repository is gated: accept the licence at https://huggingface.co/{hub_id} "
                "and log in with `hf auth login` (or set HF_TOKEN) before downloading"
            )
        raise ModelLoadError(msg) from e
    return Path(path)


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (at most 300 characters), for one-line errors."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
