"""Few-shot episodes on disk: saved by support row ids so others can re-run them on any backbone.

This module does not import torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError

from .data import ProbeData
from .fewshot import Episode

try:  # serialises writers of a shared episodes file (POSIX)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def episodes_path(out: str | os.PathLike) -> Path:
    """Where the episodes of a few-shot run writing to ``out`` are saved: ``<out>.episodes.json``."""
    return Path(str(out) + ".episodes.json")


def _eligible_patients(data: ProbeData) -> np.ndarray:
    """int [L]: the fewest patients on either side of each label (multi-label) or per class."""
    pids, y = data.train.patients, data.train.y
    _, pidx = np.unique(pids, return_inverse=True)
    n_pat = int(pidx.max()) + 1 if len(pidx) else 0
    if data.task == "multiclass":
        has = np.zeros((n_pat, len(data.label_names)), bool)
        has[pidx, y] = True
        return has.sum(axis=0)
    out = []
    for j in range(y.shape[1]):
        pos = np.bincount(pidx, weights=y[:, j] == 1, minlength=n_pat) > 0
        neg = (np.bincount(pidx, weights=y[:, j] == 0, minlength=n_pat) > 0) & ~pos
        out.append(min(int(pos.sum()), int(neg.sum())))
    return np.array(out)


_EPISODES_FORMAT = "featcache-episodes/1"


def _episode_key(e: dict) -> tuple:
    return (e["label"], int(e["shots"]), int(e["seed"]))


def _episodes_run(data: ProbeData, episodes: list[Episode]) -> dict:
    """The JSON record of a set's episodes: support row ids, so they survive any re-extraction."""
    ids = data.train.ids
    return {
        "store_set": data.context.get("store_set"),
        "manifest_digest": data.context.get("manifest_digest"),
        "uncertain": data.context.get("uncertain"),
        "task": data.task,
        "label_names": list(data.label_names),
        "episodes": [
            {
                "label": None if e.label is None else data.label_names[e.label],
                "shots": int(e.shots),
                "seed": int(e.seed),
                "support_ids": ids[e.support].tolist(),
                "targets": e.targets.tolist(),
            }
            for e in episodes
        ],
    }


def _read_episodes_file(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc.get("runs"), list):
            raise KeyError("runs")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FeatcacheError(
            f"{path}: not a readable episodes file ({type(e).__name__}: {e}); use one written by probes fewshot"
        ) from None
    return doc


def save_episodes(path: str | os.PathLike, data: ProbeData, episodes: list[Episode]) -> Path:
    """Merge a run's episodes into an episodes file (JSON), keeping those of other sets and settings.

    The file holds one record per (set, manifest, uncertain policy, labels) with its episodes keyed
    by (label, shots, seed); a new episode replaces the one with the same key, so several few-shot
    runs (other shots, seeds or sets) can share one file. Concurrent writers are serialised by a lock.

    Args:
        path: the ``.episodes.json`` file (created with its folder if absent).
        data: the run's data (its ``train`` split is the support pool the episodes index).
        episodes: the episodes drawn.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = _episodes_run(data, episodes)
    same = ("store_set", "manifest_digest", "uncertain", "label_names")
    with open(path, "a+", encoding="utf-8") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        text = fh.read()
        doc = _read_episodes_file(path) if text.strip() else {"format": _EPISODES_FORMAT, "runs": []}
        for run in doc["runs"]:
            if all(run.get(k) == record[k] for k in same):
                merged = {_episode_key(e): e for e in run["episodes"]}
                merged.update({_episode_key(e): e for e in record["episodes"]})
                run["episodes"] = list(merged.values())
                break
        else:
            doc["runs"].append(record)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(doc) + "\n")
    return path


def load_episodes(path: str | os.PathLike, data: ProbeData) -> list[Episode]:
    """Read saved episodes and map their support ids onto ``data``'s support pool.

    Episodes depend only on the manifest (patients, labels, splits), so those drawn on one backbone's
    set can be re-run on another set extracted from the same manifest: the record of the same set is
    used when the file has one, else one drawn on the same manifest.

    Args:
        path: the ``.episodes.json`` file.
        data: the loaded data; ``data.train`` is the support pool (train + val for few-shot).

    Returns:
        The episodes of ``data``'s labels, ``support`` indexing ``data.train``.

    Raises:
        FeatcacheError: unreadable file, no record for this manifest, support ids that are not
            train rows here, or targets that disagree with the labels here (another uncertain policy).
    """
    path = Path(path)
    doc = _read_episodes_file(path)
    digest, set_name = data.context.get("manifest_digest"), data.context.get("store_set")
    candidates = [r for r in doc["runs"] if r.get("manifest_digest") == digest and r.get("task") == data.task]
    if not candidates:
        raise FeatcacheError(
            f"{path}: no episodes drawn on the manifest of '{set_name}'; draw new ones (leave out --episodes-from)"
        )
    run = next((r for r in candidates if r.get("store_set") == set_name), candidates[0])
    where = {rid: i for i, rid in enumerate(data.train.ids.tolist())}
    out = []
    for n, e in enumerate(run["episodes"]):
        label = e["label"]
        if label is not None and label not in data.label_names:
            continue
        missing = [rid for rid in e["support_ids"] if rid not in where]
        if missing:
            raise FeatcacheError(
                f"{path}: episode {n} uses ids that are not train or val rows of '{set_name}' ({missing[:3]}); "
                "re-extract the failed rows or draw new episodes"
            )
        support = np.array([where[rid] for rid in e["support_ids"]], dtype=np.int64)
        y = data.train.y[support]
        here = y[:, data.label_names.index(label)] if label is not None else y
        if not np.array_equal(here, np.asarray(e["targets"], dtype=here.dtype)):
            raise FeatcacheError(
                f"{path}: episode {n} ({label}, {e['shots']} shots, seed {e['seed']}) has targets that differ from "
                f"the labels of '{set_name}'; use the --uncertain policy the episodes were drawn with"
            )
        out.append(
            Episode(
                None if label is None else data.label_names.index(label),
                int(e["shots"]),
                int(e["seed"]),
                support,
                e["targets"],
            )
        )
    return out
