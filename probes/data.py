"""From a feature set to the arrays a probe needs: features, targets and patients per split.

:func:`load_probe_data` reads one feature set of a store and returns a :class:`ProbeData`:

- Rows: only rows whose features were written (status ok) and whose split is ``train``,
  ``val`` or ``test``; rows with a blank split, failed or pending rows are left out.
- Features: ``cls``, ``pooled``, ``layer_cls:K`` / ``layer_pooled:K`` (one stored intermediate
  layer: K is a model layer index as recorded at extraction, or a negative position among the
  stored layers, ``-1`` = the last), ``layer_cls`` (all stored layers concatenated), or several of
  these joined by ``+`` (``cls+pooled``), concatenated in that order. Always float32.
- Targets of a multi-label set: float32 [n, L] after the uncertain-label policy
  (:func:`probes.labels.apply_uncertain`): 1, 0, NaN missing. Rows with no known label among the
  chosen ones carry no information for any probe and are left out (a kNN would otherwise spend
  neighbour slots on them).
- Targets of a multi-class set: int64 [n] indices into ``label_names`` (the chosen class names,
  sorted); rows without a class, or of a class not chosen, are left out.
- Validation: the store's ``val`` split. Nothing is carved by default; a runner that selects
  something on validation and finds no val rows carves a patient-level share of train with
  :func:`with_carved_val` (or passes ``val_fraction``), and ``context["val_carved"]`` says so.

``context`` holds what a results row needs to say where its numbers came from (dataset, model,
resolution, features, set name and the store's provenance). This module does not import torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError, StoreError
from featcache.store.feature_store import FeatureSet, FeatureStore
from probes.labels import apply_uncertain

SPLITS = ("train", "val", "test")
_LAYER = re.compile(r"^(layer_cls|layer_pooled)(?::(-?\d+))?$")


@dataclass
class Split:
    """The rows of one split.

    Attributes:
        X: float32 [n, D] features.
        y: float32 [n, L] multi-label targets (1/0/NaN) or int64 [n] class indices.
        patients: str [n] patient ids.
        ids: str [n] row ids (the manifest's ``id``).
        rows: int64 [n] row indices in the feature set.
    """

    X: np.ndarray
    y: np.ndarray
    patients: np.ndarray
    ids: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ProbeData:
    """Features and targets of one feature set, split into train / val / test.

    Attributes:
        task: ``multilabel`` or ``multiclass``.
        label_names: the chosen label columns (multi-label) or class names (multi-class, sorted).
        train, val, test: the :class:`Split` of each (``val`` may hold zero rows).
        context: provenance for results rows: ``dataset``, ``model``, ``res``, ``features``,
            ``layer`` (the model layer index of ``layer_*:K`` features, else None), ``store``, ``store_set``, ``uncertain``, ``val_carved`` (and
            ``val_fraction``, ``split_seed`` when carved), ``weights``, ``preprocessing``,
            ``manifest_digest``, ``featcache_version``.
    """

    task: str
    label_names: list[str]
    train: Split
    val: Split
    test: Split
    context: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Split:
        """The split called ``name`` (``train``, ``val`` or ``test``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use train, val or test")
        return getattr(self, name)


def _feature_parts(fs: FeatureSet, features: str) -> list[tuple[str, int | None, str]]:
    """Parse a features spec into (array, position in the layer axis or None, label) parts."""
    parts = [p.strip() for p in str(features).split("+")]
    if not parts or any(not p for p in parts):
        raise FeatcacheError(f"features {features!r}: use cls, pooled, cls+pooled or layer_cls:-1")
    stored = fs.arrays()
    out = []
    for p in parts:
        m = _LAYER.match(p)
        name = m.group(1) if m else p
        if name in ("patch", "registers"):
            raise FeatcacheError(
                f"features {p!r}: patch and register tokens are for segmentation probes; "
                "use cls, pooled or layer_cls:K"
            )
        if name not in stored:
            hint = "--layers" if name.startswith("layer_") else "--tokens"
            raise StoreError(
                f"{fs.name}: features {p!r} are not stored (arrays: {', '.join(stored)}); "
                f"choose one of those or re-extract with {hint}"
            )
        if not m:
            if len(fs.shape(name)) != 2:
                raise FeatcacheError(f"features {p!r}: array {name} is not one vector per image")
            out.append((name, None, name))
            continue
        layers = list(fs.record.layers)
        n_stored = fs.shape(name)[1]
        if m.group(2) is None:
            out.append((name, None, name))
            continue
        k = int(m.group(2))
        if k in layers:
            pos = layers.index(k)
        elif -n_stored <= k < 0:
            pos = n_stored + k
        else:
            raise StoreError(
                f"{fs.name}: layer {k} of {name} is not stored (stored layers: {layers}); "
                "use one of those, a negative position such as -1, or re-extract with --layers"
            )
        out.append((name, pos, f"{name}:{layers[pos] if pos < len(layers) else k}"))
    return out


def _read_features(fs: FeatureSet, parts: list[tuple[str, int | None, str]], rows: np.ndarray) -> np.ndarray:
    blocks = []
    for name, pos, _ in parts:
        a = fs.read(name, rows=rows) if len(rows) else np.zeros((0, *fs.shape(name)[1:]), np.float32)
        if pos is not None:
            a = a[:, pos]
        blocks.append(np.asarray(a, dtype=np.float32).reshape(len(rows), -1))
    return np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float32)


def _targets(
    fs: FeatureSet, labels: list[str] | tuple[str, ...] | None, uncertain: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(targets for all N rows, bool [N] rows with a usable target, chosen label names)."""
    task = fs.task
    if task == "multilabel":
        names = fs.label_names
        chosen = list(names) if labels is None else list(dict.fromkeys(labels))  # a label counts once
        unknown = [c for c in chosen if c not in names]
        if unknown or not chosen:
            raise FeatcacheError(
                f"{fs.name}: unknown labels {unknown or chosen}; the set's labels are {', '.join(names)}"
            )
        Y = apply_uncertain(fs.labels[:, [names.index(c) for c in chosen]], uncertain)
        return Y, ~np.isnan(Y).all(axis=1), chosen
    if task == "multiclass":
        classes = fs.classes
        names = fs.class_names
        chosen = sorted(names) if labels is None else sorted(set(labels))
        unknown = [c for c in chosen if c not in names]
        if unknown or len(chosen) < 2:
            raise FeatcacheError(
                f"{fs.name}: unknown classes {unknown}; choose two or more of {', '.join(names)}"
                if unknown
                else f"{fs.name}: a multi-class probe needs two or more classes; the set has {', '.join(names)}"
            )
        lookup = {c: i for i, c in enumerate(chosen)}
        y = np.array([lookup.get(c, -1) for c in classes.tolist()], dtype=np.int64)
        return y, y >= 0, chosen
    raise FeatcacheError(
        f"{fs.name}: the set has no labels (task 'none'); add label columns or a 'label' column to "
        "the manifest and extract again"
    )


def carve_val(patients: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Choose validation rows among train rows, whole patients at a time.

    Args:
        patients: str [n] patient ids of the train rows.
        val_fraction: share of the train patients moved to validation (rounded up, at least one,
            at most all but one).
        seed: seed of ``np.random.default_rng``; the same patients and seed give the same split.

    Returns:
        bool [n], True for the rows that go to validation.

    Raises:
        FeatcacheError: fewer than two train patients.
    """
    unique = np.unique(patients)
    if len(unique) < 2:
        raise FeatcacheError(
            f"cannot carve a validation split from {len(unique)} train patient(s); "
            "add val rows to the manifest or pass val_fraction=0"
        )
    n_val = min(len(unique) - 1, max(1, math.ceil(val_fraction * len(unique))))
    chosen = np.random.default_rng(seed).permutation(len(unique))[:n_val]
    return np.isin(patients, unique[chosen])


def open_checked_set(
    cache: str | FeatureStore, set_name: str | None = None, *, allow_partial: bool = False
) -> FeatureSet:
    """Open a feature set for a probe, refusing one that cannot be trusted.

    Every consumer of stored features (the probes, ``seg``, ``pca``, ``export``) opens sets through
    this function, so every guard applies to all of them (:func:`featcache.store.check.check_usable`):
    a known format version, no manifest replacement in progress, arrays whose shapes agree with the
    set's attributes, a manifest digest equal to one recomputed from the stored columns, attributes
    not edited by hand, valid status values, and no pending rows unless ``allow_partial``.

    Args:
        cache: the store (a folder, fsspec URL or an open ``FeatureStore``).
        set_name: feature set name; may be None when the store holds one set.
        allow_partial: accept a set some of whose rows are still pending (an extraction still
            running or interrupted); ``fs.usable["pending"]`` counts them.

    Returns:
        The open :class:`~featcache.store.feature_store.FeatureSet`, with ``fs.usable`` =
        ``{"n", "ok", "failed", "pending"}``.

    Raises:
        StoreError: one line saying what is wrong and the command that fixes it.
    """
    store = cache if isinstance(cache, FeatureStore) else FeatureStore(cache)
    return store.open_checked(set_name, allow_partial=allow_partial)


def load_probe_data(
    cache: str | FeatureStore,
    set_name: str | None = None,
    features: str = "cls",
    labels: list[str] | tuple[str, ...] | None = None,
    uncertain: str = "ignore",
    val_fraction: float = 0.0,
    seed: int = 0,
    aggregate: str | None = None,
    allow_partial: bool = False,
    require_test: bool = True,
    test_features_only: bool = False,
) -> ProbeData:
    """Load one feature set's features and targets, split into train / val / test.

    Args:
        cache: the store (a folder, fsspec URL or an open ``FeatureStore``).
        set_name: feature set name; may be None when the store holds one set.
        features: ``cls``, ``pooled``, ``cls+pooled``, ``layer_cls:-1``, ... (see the module docstring).
        labels: label columns (multi-label) or class names (multi-class) to keep; None keeps all.
        uncertain: what uncertain (-1) labels become: ``ignore`` (missing), ``zeros`` or ``ones``.
        val_fraction: share of train patients carved into validation when the store has no val rows
            (0: no validation split).
        seed: seed of that carving.
        aggregate: ``mean`` or ``max`` to pool slice features per volume (the ``meta_volume`` column
            written by ``featcache volumes``): each volume becomes one sample; None keeps rows as they are.
        test_features_only: read only the test rows' features (train and val get [n, 0] arrays): for
            a search that streams the fitted rows from the store.
        require_test: refuse a set without test rows (False: a set that only trains a probe scored
            elsewhere, as in external validation).
        allow_partial: probe a set whose extraction has not finished (pending rows are left out,
            and ``context["pending_rows"]`` counts them).

    Returns:
        A :class:`ProbeData`.

    Raises:
        FeatcacheError: a set without labels, unknown labels, features not stored, no train or no
            test rows, or a bad ``val_fraction``.
    """
    if not 0 <= val_fraction < 1:
        raise FeatcacheError(f"val_fraction must be in [0, 1); got {val_fraction}")
    store = cache if isinstance(cache, FeatureStore) else FeatureStore(cache)
    fs = open_checked_set(store, set_name, allow_partial=allow_partial)
    parts = _feature_parts(fs, features)
    Y, has_target, chosen = _targets(fs, labels, uncertain)
    splits = fs.splits
    ok = fs.ok
    keep = {s: np.flatnonzero(ok & has_target & (splits == s)) for s in SPLITS}
    for s in ("train", "test") if require_test else ("train",):
        if not len(keep[s]):
            n_split = int((splits == s).sum())
            raise FeatcacheError(
                f"{fs.name}: no usable {s} rows ({n_split} rows have split '{s}', "
                f"{int((ok & (splits == s)).sum())} of them extracted, "
                f"{int((ok & has_target & (splits == s)).sum())} with a label); "
                f"give the manifest a '{s}' split, finish the extraction, or check the labels"
            )
    context: dict[str, Any] = {"val_carved": False}
    if fs.usable.get("pending"):
        context["pending_rows"] = int(fs.usable["pending"])
    if not len(keep["val"]) and val_fraction > 0:
        to_val = carve_val(fs.patient_ids[keep["train"]], val_fraction, seed)
        keep["val"], keep["train"] = keep["train"][to_val], keep["train"][~to_val]
        context.update(val_carved=True, val_fraction=float(val_fraction), split_seed=int(seed))
    # test_features_only: train and val features stay in the store (a search streams them)
    every = np.sort(keep["test"] if test_features_only else np.concatenate([keep[s] for s in SPLITS]))
    X_all = _read_features(fs, parts, every)
    pos = np.searchsorted(every, np.arange(fs.n))  # row index -> position in X_all (for kept rows)
    ids, patients = fs.ids, fs.patient_ids

    def make(rows: np.ndarray, features: bool = True) -> Split:
        rows = rows.astype(np.int64)
        X = X_all[pos[rows]] if features else np.zeros((len(rows), 0), np.float32)
        return Split(X, Y[rows], patients[rows], ids[rows], rows)

    rec = fs.record
    layer_parts = [label for name, _, label in parts if name.startswith("layer_")]
    context.update(
        dataset=fs.name.split("/")[0],
        model=rec.model,
        res=rec.res,
        features=str(features),
        layer=int(layer_parts[0].split(":")[1]) if len(layer_parts) == 1 and ":" in layer_parts[0] else None,
        store=store.url,
        store_set=fs.name,
        uncertain=str(uncertain),
        weights=rec.weights,
        preprocessing=rec.preprocessing,
        manifest_digest=rec.manifest_digest,
        featcache_version=rec.featcache_version,
    )
    if fs.task == "multiclass":  # a class never seen in train would be scored by nothing
        seen = np.bincount(Y[keep["train"]], minlength=len(chosen))
        absent = [c for c, n in zip(chosen, seen) if n == 0]
        if absent:
            raise FeatcacheError(
                f"{fs.name}: classes {absent} have no train rows, so no probe can learn them; "
                f"add train rows or leave them out with --labels {','.join(c for c in chosen if c not in absent)}"
            )
    data = ProbeData(
        task=fs.task,
        label_names=chosen,
        train=make(keep["train"], not test_features_only),
        val=make(keep["val"], not test_features_only),
        test=make(keep["test"]),
        context=context,
    )
    if aggregate:
        from probes.aggregate import aggregate_probe_data, volume_ids

        data = aggregate_probe_data(data, volume_ids(fs), aggregate)
    return data


def merge_train_val(data: ProbeData) -> ProbeData:
    """``data`` with the validation rows moved into train (what a final fit or a support pool uses).

    Args:
        data: loaded probe data.

    Returns:
        A new :class:`ProbeData` whose ``train`` is train then val (in that order) and whose ``val``
        is empty; ``test`` and ``context`` are unchanged (context copied).
    """
    t, v = data.train, data.val
    train = Split(
        np.concatenate([t.X, v.X]),
        np.concatenate([t.y, v.y]),
        np.concatenate([t.patients, v.patients]),
        np.concatenate([t.ids, v.ids]),
        np.concatenate([t.rows, v.rows]),
    )
    empty = Split(t.X[:0], t.y[:0], t.patients[:0], t.ids[:0], t.rows[:0])
    return ProbeData(data.task, data.label_names, train, empty, data.test, dict(data.context))


def with_carved_val(data: ProbeData, val_fraction: float, seed: int) -> ProbeData:
    """``data`` with a patient-level share of its train rows moved to validation.

    Only a runner that selects something on validation (a C grid) calls this, and only when the
    store has no val split; the carve is recorded in ``context`` (``val_carved``, ``val_fraction``,
    ``split_seed``) and so in every result row.

    Args:
        data: loaded probe data with an empty ``val``.
        val_fraction: share of the train patients moved (see :func:`carve_val`).
        seed: seed of the carve.

    Returns:
        A new :class:`ProbeData`.

    Raises:
        FeatcacheError: ``val_fraction`` outside (0, 1), a non-empty ``val``, or too few patients.
    """
    if not 0 < val_fraction < 1:
        raise FeatcacheError(
            f"val_fraction must be in (0, 1) to carve a validation split; got {val_fraction}"
        )
    if len(data.val):
        raise FeatcacheError("the data already has validation rows; nothing to carve")
    t = data.train
    to_val = carve_val(t.patients, val_fraction, seed)

    def take(mask: np.ndarray) -> Split:
        return Split(t.X[mask], t.y[mask], t.patients[mask], t.ids[mask], t.rows[mask])

    context = {
        **data.context,
        "val_carved": True,
        "val_fraction": float(val_fraction),
        "split_seed": int(seed),
    }
    return ProbeData(data.task, data.label_names, take(~to_val), take(to_val), data.test, context)


def check_same_test(a: ProbeData, b: ProbeData) -> None:
    """Refuse a paired comparison unless both feature sets hold the same test images and labels.

    Different preprocessing or models are expected (that is what is compared); what must agree is
    the manifest (digest), the task and labels, and the test rows (ids and patients, in order;
    a row that failed in one set only makes them differ).

    Args:
        a: the first set's data.
        b: the second set's data.

    Raises:
        FeatcacheError: naming what differs.
    """
    sa, sb = a.context.get("store_set"), b.context.get("store_set")
    if a.context.get("manifest_digest") != b.context.get("manifest_digest"):
        raise FeatcacheError(
            f"'{sa}' and '{sb}' were extracted from different manifests; a paired comparison needs the "
            "same images: extract both models from one manifest"
        )
    if a.task != b.task or a.label_names != b.label_names:
        raise FeatcacheError(
            f"'{sa}' and '{sb}' have different labels ({a.label_names} vs {b.label_names}); choose the same --labels"
        )
    ia, ib = a.test.ids, b.test.ids
    if len(ia) != len(ib) or not np.array_equal(ia, ib):
        only_a = sorted(set(ia.tolist()) - set(ib.tolist()))
        only_b = sorted(set(ib.tolist()) - set(ia.tolist()))
        raise FeatcacheError(
            f"'{sa}' and '{sb}' differ in test rows ({len(ia)} vs {len(ib)}; only in the first: "
            f"{only_a[:3]}, only in the second: {only_b[:3]}); re-extract failed rows "
            "(`featcache extract --retry-failed`) so both sets hold the same test images"
        )
    if not np.array_equal(a.test.patients, b.test.patients):
        raise FeatcacheError(f"'{sa}' and '{sb}' assign different patients to the same test rows")
    if not np.array_equal(a.test.y, b.test.y, equal_nan=a.task == "multilabel"):
        raise FeatcacheError(
            f"'{sa}' and '{sb}' have different test labels; use the same --uncertain policy for both"
        )
