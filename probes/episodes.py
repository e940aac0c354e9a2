"""Few-shot support sets: the DINOv2-radiology first-patients protocol, and episodes on disk.

Episodes are saved by support row ids, so others can re-run them on any backbone's set of the
same manifest. ``first_patient_episodes`` builds the deterministic support set of the
DINOv2-radiology study (see its docstring for where we follow it and where not).

This module does not import torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError
from probes.data import ProbeData
from probes.estimators.fewshot import Episode

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


SAMPLINGS = ("random", "first-patients")


def first_patient_episodes(
    patient_ids: np.ndarray,
    Y: np.ndarray,
    shots: int,
    task: str = "multilabel",
    label_names: list[str] | None = None,
) -> tuple[list[Episode], dict[str, int]]:
    """The support set of the DINOv2-radiology few-shot protocol, as one episode per label.

    Reproduces ``get_fewshot_in_nih`` of MohammedSB/DINOv2ForRadiology (``dinov2/data/utils.py``,
    used by ``FewShotDatasetWrapper`` in ``dinov2/data/wrappers.py`` for ``eval/linear.py --shots``):

    1. A patient "has" a label when every one of its images is positive for it (the intersection
       of the label sets of its images). Here a missing (NaN) value is not positive, as a label
       absent from a label set is not in the intersection.
    2. Patients in patient-id order (their ``groupby("Patient ID")`` sorts the ids; so does
       ``numpy.unique`` here), labels in sorted-name order (``MultiLabelBinarizer.classes_`` is
       sorted).
    3. For each label in turn: its first ``shots`` patients; a patient already taken for an earlier
       label is skipped and not replaced (so a label can end with fewer than ``shots``).
    4. All images of every taken patient (they concatenate the train and val datasets when no
       val set is given; so is the support pool here). The union is kept in row order, theirs
       grouped by label: the same images, and a fit does not depend on their order.
    5. One multi-label head trained on that union. A multi-label logistic head with a separable
       penalty is one binary problem per label, so each label's episode here is the whole union
       with that label's image-level targets (rows where it is missing left out).

    Where we do not follow them: no seeds (the protocol is deterministic; seed 0 is recorded);
    our heads (logreg at C on centred L2-normalised features, kNN, prototype) instead of their
    SGD-trained linear layer on concatenated CLS + pooled tokens with a learning-rate grid; we do
    not add the full validation set back to the few-shot support before their final refit (the
    ``shots == None or num_samples == None`` test in their ``linear.py`` does so whenever
    ``--val-dataset`` is given); their non-NIH datasets take ``shots`` evenly spaced images
    (``np.arange(0, n, n / shots)``), here every dataset gets the per-patient rule above;
    "No Finding" is one of their classes, here only when it is a label column asked for.
    Multi-class: the same rule with each image's class as its label set, giving one multi-class
    episode.

    The support depends on which labels are asked for (step 3), by construction of the protocol.

    Args:
        patient_ids: str [N] patient of each support-pool row.
        Y: float32 [N, L] multi-label targets (1/0/NaN) or int64 [N] class indices (-1 missing).
        shots: patients per label.
        task: ``"multilabel"`` or ``"multiclass"``.
        label_names: label / class names (default: the column indices as strings).

    Returns:
        (episodes, taken): multi-label: one binary episode per label whose union targets hold
        both classes (``label`` its column, ``seed`` 0, support = the union rows knowing the label,
        targets = their 0/1 values); multi-class: one episode. ``taken`` maps each label name to
        the number of patients taken for it (at most ``shots``).

    Raises:
        FeatcacheError: multi-class when a class ends with no patient.
    """
    pids = np.asarray(patient_ids).astype(str)
    if task == "multilabel":
        n_labels = Y.shape[1]
    else:
        n_labels = len(label_names) if label_names is not None else int(Y.max()) + 1
    names = [str(j) for j in range(n_labels)] if label_names is None else list(label_names)
    _, pidx = np.unique(pids, return_inverse=True)
    n_pat = int(pidx.max()) + 1 if len(pidx) else 0
    images = np.bincount(pidx, minlength=n_pat)
    if task == "multilabel":
        positive = np.stack(
            [np.bincount(pidx, weights=Y[:, j] == 1, minlength=n_pat) for j in range(n_labels)], axis=1
        )
    else:
        positive = np.zeros((n_pat, n_labels))
        known = Y >= 0
        np.add.at(positive, (pidx[known], Y[known]), 1)
    has = positive == images[:, None]  # every image of the patient carries the label
    taken_by = np.full(n_pat, -1)
    taken: dict[str, int] = {}
    for j in sorted(range(n_labels), key=lambda c: names[c]):
        first = np.flatnonzero(has[:, j])[:shots]
        new = first[taken_by[first] < 0]
        taken_by[new] = j
        taken[names[j]] = int(new.size)
    rows = np.flatnonzero(taken_by[pidx] >= 0)  # every image of the taken patients, in row order
    if task != "multilabel":
        empty = [names[c] for c in range(n_labels) if taken[names[c]] == 0]
        if empty:
            raise FeatcacheError(
                f"first-patients sampling: no patient has only class {empty[0]!r} images; "
                "drop the class (--labels) or use random sampling"
            )
        return [Episode(None, shots, 0, rows, Y[rows])], taken
    episodes = []
    for j in range(n_labels):
        y = Y[rows, j]
        keep = ~np.isnan(y)
        if np.unique(y[keep]).size == 2:
            episodes.append(Episode(j, shots, 0, rows[keep], y[keep].astype(np.int64)))
    return episodes, taken


_EPISODES_FORMAT = "featcache-episodes/1"


def _episode_key(e: dict) -> tuple:
    return (e["label"], int(e["shots"]), int(e["seed"]))


def _episodes_run(data: ProbeData, episodes: list[Episode], sampling: str = "random") -> dict:
    """The JSON record of a set's episodes: support row ids, so they survive any re-extraction."""
    ids = data.train.ids
    return {
        "sampling": sampling,
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


def save_episodes(
    path: str | os.PathLike, data: ProbeData, episodes: list[Episode], sampling: str = "random"
) -> Path:
    """Merge a run's episodes into an episodes file (JSON), keeping those of other sets and settings.

    The file holds one record per (sampling, set, manifest, uncertain policy, labels) with its episodes keyed
    by (label, shots, seed); a new episode replaces the one with the same key, so several few-shot
    runs (other shots, seeds or sets) can share one file. Concurrent writers are serialised by a lock.

    Args:
        path: the ``.episodes.json`` file (created with its folder if absent).
        data: the run's data (its ``train`` split is the support pool the episodes index).
        episodes: the episodes drawn.
        sampling: ``"random"`` or ``"first-patients"`` (records written before it existed are random).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = _episodes_run(data, episodes, sampling)
    same = ("sampling", "store_set", "manifest_digest", "uncertain", "label_names")
    with open(path, "a+", encoding="utf-8") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        text = fh.read()
        doc = _read_episodes_file(path) if text.strip() else {"format": _EPISODES_FORMAT, "runs": []}
        for run in doc["runs"]:
            if all(run.get(k, "random" if k == "sampling" else None) == record[k] for k in same):
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


def load_episodes(path: str | os.PathLike, data: ProbeData, sampling: str = "random") -> list[Episode]:
    """Read saved episodes and map their support ids onto ``data``'s support pool.

    Episodes depend only on the manifest (patients, labels, splits), so those drawn on one backbone's
    set can be re-run on another set extracted from the same manifest: the record of the same set is
    used when the file has one, else one drawn on the same manifest.

    Args:
        path: the ``.episodes.json`` file.
        data: the loaded data; ``data.train`` is the support pool (train + val for few-shot).
        sampling: read the episodes drawn with this sampling (``"random"`` or ``"first-patients"``).

    Returns:
        The episodes of ``data``'s labels, ``support`` indexing ``data.train``.

    Raises:
        FeatcacheError: unreadable file, no record for this manifest, support ids that are not
            train rows here, or targets that disagree with the labels here (another uncertain policy).
    """
    path = Path(path)
    doc = _read_episodes_file(path)
    digest, set_name = data.context.get("manifest_digest"), data.context.get("store_set")
    candidates = [
        r
        for r in doc["runs"]
        if r.get("manifest_digest") == digest
        and r.get("task") == data.task
        and r.get("sampling", "random") == sampling
    ]
    if not candidates:
        raise FeatcacheError(
            f"{path}: no {sampling} episodes drawn on the manifest of '{set_name}'; draw new ones "
            "(leave out --episodes-from) or pass the --sampling they were drawn with"
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
