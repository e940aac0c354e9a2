"""Long-format results: one JSON object per line, one line per (setting, seed, label, metric).

Every probe run appends rows to a ``results.jsonl``; ``probes report`` reads them back into tables
and plots. Rows carry the feature store's provenance so a number can always be traced to the exact
weights, preprocessing and manifest that produced it.

Schema (:data:`RESULT_FIELDS`; the first eight are required, a field that does not apply is left
out, and ``None``/``null`` stands for an undefined value such as AUROC with one class absent):

=====================  ==============  =============================================================
field                  type            meaning
=====================  ==============  =============================================================
``dataset``            str             dataset name, e.g. ``nih``
``model``              str             registry name of the backbone, e.g. ``dinov3-vitb16``
``res``                int             input resolution in pixels, e.g. ``512``
``features``           str             features probed: ``cls``, ``pooled``, ``cls+pooled``, ``patch``
``probe``              str             ``knn``, ``logreg``, ``fewshot``, ``seg``, ``compare`` ...
``metric``             str             ``auroc``, ``accuracy``, ``balanced_accuracy``, ``sensitivity``,
                                       ``specificity``, ``f1``, ``dice``, ``auroc_diff`` ...
``label``              str             label or class name; ``mean`` is the mean over labels
``value``              float or null   the metric
``layer``              int             intermediate layer index (absent: final layer)
``k``                  int             kNN neighbours
``C``                  float           logistic-regression inverse regularisation (as selected on val)
``shots``              int             few-shot K
``seed``               int             seed of the run (few-shot episodes, bootstrap)
``head``               str             few-shot / segmentation head: ``logreg``, ``knn``, ``prototype``
``params``             dict            any other hyper-parameters (e.g. ``{"temperature": 0.07}``)
``ci_low``             float or null   lower bound of the patient-level bootstrap CI
``ci_high``            float or null   upper bound
``n_boot``             int             bootstrap draws made
``n_boot_skipped``     int             draws left out because the metric was undefined on them
``vs``                 str             paired comparisons: the store set compared against
``p``                  float or null   paired comparisons: p-value
``p_holm``             float or null   paired comparisons: Holm-adjusted p-value over labels
``n_train``            int             training rows used
``n_test``             int             test rows scored
``n_patients_test``    int             distinct test patients
``weights``            str or dict     weights revision / file hash / random-init seed
``preprocessing``      dict            resize mode, interpolation, mean/std ...
``manifest_digest``    str             digest of the manifest the features came from
``store_set``          str             feature set name, e.g. ``nih/dinov3-vitb16/512``
``featcache_version``  str             version that wrote the row
``timestamp``          str             ISO 8601 UTC time the row was made
=====================  ==============  =============================================================
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from featcache import __version__
from featcache.errors import FeatcacheError

try:  # advisory lock between concurrent appenders (POSIX); O_APPEND alone suffices elsewhere
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "REQUIRED_FIELDS",
    "RESULT_FIELDS",
    "OUTCOME_PARAMS",
    "RESULT_KEY_FIELDS",
    "append_jsonl",
    "drop_duplicates",
    "make_rows",
    "read_jsonl",
    "result_key",
    "validate_row",
]

REQUIRED_FIELDS = ("dataset", "model", "res", "features", "probe", "metric", "label", "value")

_STR, _INT, _NUM = (str,), (int,), (int, float)
_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    # field: (allowed types, None allowed)
    "dataset": (_STR, False),
    "model": (_STR, False),
    "res": (_INT, False),
    "features": (_STR, False),
    "probe": (_STR, False),
    "metric": (_STR, False),
    "label": (_STR, False),
    "value": (_NUM, True),
    "layer": (_INT, False),
    "k": (_INT, False),
    "C": (_NUM, False),
    "shots": (_INT, False),
    "seed": (_INT, False),
    "head": (_STR, False),
    "params": ((dict,), False),
    "ci_low": (_NUM, True),
    "ci_high": (_NUM, True),
    "n_boot": (_INT, False),
    "n_boot_skipped": (_INT, False),
    "vs": (_STR, False),
    "p": (_NUM, True),
    "p_holm": (_NUM, True),
    "n_train": (_INT, False),
    "n_test": (_INT, False),
    "n_patients_test": (_INT, False),
    "weights": ((str, dict), True),
    "preprocessing": ((dict,), False),
    "manifest_digest": (_STR, False),
    "store_set": (_STR, False),
    "featcache_version": (_STR, False),
    "timestamp": (_STR, False),
}

RESULT_FIELDS: tuple[str, ...] = tuple(_TYPES)


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _problems(row: Any, strict: bool) -> list[str]:
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    out = [f"missing field {name!r}" for name in REQUIRED_FIELDS if name not in row]
    for name, value in row.items():
        if name not in _TYPES:
            if strict:
                out.append(f"unknown field {name!r} (put extra hyper-parameters under 'params')")
            continue
        types, nullable = _TYPES[name]
        if value is None:
            if not nullable:
                out.append(f"field {name!r} is null")
        elif isinstance(value, bool) or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in types)
            out.append(f"field {name!r} should be {want}, got {type(value).__name__} {value!r}")
    return out


def validate_row(row: Mapping[str, Any], *, strict: bool = True) -> None:
    """Check a result row against the schema.

    Args:
        row: one result row.
        strict: also refuse fields not in :data:`RESULT_FIELDS` (typos); reading tolerates them so
            files written by a newer version stay readable.

    Raises:
        FeatcacheError: naming every missing or mistyped field.
    """
    problems = _problems(row, strict)
    if problems:
        where = ", ".join(f"{k}={row[k]!r}" for k in ("dataset", "model", "metric", "label") if k in row)
        raise FeatcacheError(
            f"invalid result row ({where or 'no identifying fields'}): {'; '.join(problems)}"
        )


def _ordered(row: dict) -> dict:
    return {
        **{k: row[k] for k in RESULT_FIELDS if k in row},
        **{k: v for k, v in row.items() if k not in _TYPES},
    }


def make_rows(context: Mapping[str, Any], metrics: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Build validated result rows from a run's shared context and its metric entries.

    Args:
        context: fields shared by every row of a run: ``dataset, model, res, features, probe`` and
            provenance (``weights, preprocessing, manifest_digest, store_set``), maybe ``k``, ``seed``.
        metrics: one dict per value, at least ``metric, label, value`` plus what varies per entry
            (``k``, ``shots``, ``seed``, ``ci_low``/``ci_high`` ...); its fields override ``context``.

    Returns:
        Rows in schema field order, numpy values turned into Python ones and NaN into None;
        ``featcache_version`` and ``timestamp`` (one per call) are filled in when absent.

    Raises:
        FeatcacheError: a row misses a required field or holds a mistyped/unknown one.
    """
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for entry in metrics:
        row = _plain({**context, **entry})
        row.setdefault("featcache_version", __version__)
        row.setdefault("timestamp", stamp)
        validate_row(row)
        rows.append(_ordered(row))
    return rows


def append_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Append rows to a JSON-lines results file, all of them in one write.

    The parent folder is created. The rows of one call go out in a single ``write`` on a file opened
    for appending (under an exclusive lock where the OS has one), so concurrent probe processes
    never interleave their lines and a reader sees all rows of a call or none. If the file's last
    line was cut short (a crash elsewhere), the new rows start on a fresh line, so only that line
    is damaged and :func:`read_jsonl` names it.

    Args:
        path: the ``.jsonl`` file.
        rows: result rows (validated strictly before anything is written).

    Returns:
        Number of rows written.
    """
    rows = [_plain(dict(r)) for r in rows]
    for row in rows:
        validate_row(row)
    if not rows:
        return 0
    data = "".join(json.dumps(_ordered(r), allow_nan=False) + "\n" for r in rows).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)  # releases the lock
    return len(rows)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines results file.

    Blank lines are skipped; fields unknown to this version are kept; JSON ``null`` stays ``None``.

    Args:
        path: the ``.jsonl`` file.

    Returns:
        The rows, in file order.

    Raises:
        FeatcacheError: the file is missing, or a line is not a valid result row (the message names
            the file and the 1-based line number).
    """
    path = Path(path)
    if not path.is_file():
        raise FeatcacheError(
            f"results file {path} not found: run a probe that writes its results there first"
        )
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FeatcacheError(
                    f"{path}, line {lineno}: not valid JSON ({e.msg}); fix or delete that line"
                ) from None
            problems = _problems(row, strict=False)
            if problems:
                raise FeatcacheError(
                    f"{path}, line {lineno}: not a result row ({'; '.join(problems)}); fix or delete that line"
                )
            rows.append(row)
    return rows


# ``params`` entries that describe what a run found or where it wrote, not what it was asked to do:
# a re-run of the same setting may differ in them and is still the same result.
OUTCOME_PARAMS = frozenset(
    {
        "skipped",  # why a value is null
        "ci",  # why a CI is missing
        "filled",  # test rows scored with the prevalence
        "threshold",  # threshold chosen on held-out scores
        "threshold_from",
        "fit_rows",  # rows the probe was fitted on (follows from the store's splits)
        "val_carved",
        "C_from",  # where a C came from (given, val, shared)
        "labels_in_mean",
        "auroc_a",
        "auroc_b",
        "p_bootstrap",
        "p_delong",
        "episodes_file",
        "extracted_with",  # version that wrote the features: store provenance is in the key
        "n_slices",
        "scored_at",
        "roc",  # the test ROC curve's points (probes.report.roc), a measurement like the value
    }
)

# Row fields of the key, besides ``params``; ``C`` only when it was given, not selected on val.
_KEY_FIELDS = (
    "store_set",
    "manifest_digest",
    "dataset",
    "model",
    "res",
    "features",
    "layer",
    "probe",
    "k",
    "head",
    "shots",
    "seed",
    "vs",
    "label",
    "metric",
)


RESULT_KEY_FIELDS: tuple[str, ...] = (*_KEY_FIELDS, "params")


def result_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    """The identity of a result: two rows with the same key are the same number, computed twice.

    The key is the store provenance (``store_set``, ``manifest_digest``), the backbone and features
    (``dataset, model, res, features, layer``), the probe and its settings (``probe, k, head,
    shots, seed, vs``, ``C`` when it was given rather than selected on validation, and every
    ``params`` entry except :data:`OUTCOME_PARAMS`, e.g. ``C_grid``, ``temperature``,
    ``uncertain``), and what was measured (``label, metric``). A field a row lacks counts as absent.

    Args:
        row: one result row.

    Returns:
        A tuple of JSON strings (hashable, comparable), one per key field, ``params`` last.
    """
    params = row.get("params") or {}
    setting = {k: v for k, v in params.items() if k not in OUTCOME_PARAMS}
    if params.get("C_from") in (None, "given") and "C_grid" not in params:
        setting["C"] = row.get("C")  # a given C is a setting; a selected one is an outcome
    return (
        *(json.dumps(row.get(f), sort_keys=True) for f in _KEY_FIELDS),
        json.dumps(setting, sort_keys=True),
    )


def _newer(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether ``b`` (read after ``a``) replaces ``a``: file order, unless timestamps say otherwise."""
    ta, tb = a.get("timestamp"), b.get("timestamp")
    if isinstance(ta, str) and isinstance(tb, str):
        try:
            return _dt.datetime.fromisoformat(tb) >= _dt.datetime.fromisoformat(ta)
        except (ValueError, TypeError):  # unparsable, or naive against aware
            pass
    return True


def drop_duplicates(rows: Iterable[Mapping[str, Any]]) -> tuple[list[dict], int]:
    """Keep the newest row of every :func:`result_key`: a re-run replaces the run it repeats.

    Rows are appended in time order, so the row read last wins; when both rows carry a
    ``timestamp`` (ISO 8601) the later timestamp wins (a tie goes to the row read last).

    Args:
        rows: result rows in file order.

    Returns:
        ``(kept, n_dropped)``: the kept rows, in the order of their first key's appearance, and how
        many older rows were dropped.
    """
    kept: dict[tuple, dict] = {}
    n = 0
    for r in rows:
        n += 1
        key = result_key(r)
        if key not in kept or _newer(kept[key], r):
            kept[key] = dict(r)
    return list(kept.values()), n - len(kept)
