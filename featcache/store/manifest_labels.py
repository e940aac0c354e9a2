"""Which of a manifest's columns are labels and which are kept as metadata.

The rule (see :mod:`featcache.store.manifest`): declared labels (``labels=``, ``--labels``) are the
label columns and the other free columns are metadata; with no declaration a column is a label when
every value is 1, 0, -1 or blank (:data:`LABEL_VALUES`). :func:`label_columns` applies it for
:func:`featcache.store.manifest.parse_manifest`, which then checks the declared columns' values.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featcache.errors import ManifestError
from featcache.store.manifest_checks import MAX_NAMED

RESERVED = ("path", "id", "patient_id", "split", "label", "mask")
LABEL_VALUES = {"1": 1.0, "0": 0.0, "-1": -1.0, "1.0": 1.0, "0.0": 0.0, "-1.0": -1.0, "": np.nan}


def _declared(labels: Sequence[str] | str) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (blank entries dropped)."""
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    return [str(v).strip() for v in items if str(v).strip()]


def label_columns(
    header: list[str], cols: dict[str, list[str]], labels: Sequence[str] | str | None, source: str
) -> tuple[list[str], dict[str, str], list[str]]:
    """Split the non-reserved columns into labels and metadata.

    Returns:
        ``(label_names, meta, notes)``: label columns in file order; metadata key (``meta_<name>``)
        -> column name; at most one note naming the columns kept as metadata by inference.

    Raises:
        ManifestError: a declared label is reserved, repeated or not a column, or two columns end up
            under the same metadata key (``age`` and ``meta_age``).
    """
    free = [h for h in header if h not in RESERVED and not h.startswith("meta_")]
    notes: list[str] = []
    if labels is not None:
        wanted = _declared(labels)
        reserved = [w for w in wanted if w in RESERVED or w.startswith("meta_")]
        if reserved:
            raise ManifestError(
                f"{source}: declared labels {reserved} are reserved or metadata columns; declare only "
                "binary label columns"
            )
        repeated = sorted({w for w in wanted if wanted.count(w) > 1})
        if repeated:
            raise ManifestError(f"{source}: labels {repeated} are declared more than once")
        missing = [w for w in wanted if w not in header]
        if missing:
            raise ManifestError(
                f"{source}: declared labels {missing[:MAX_NAMED]} are not columns of the manifest "
                f"(its other columns: {free[:12]}{' ...' if len(free) > 12 else ''})"
            )
        label_names = [h for h in free if h in set(wanted)]
    else:
        label_names = [h for h in free if all(v in LABEL_VALUES for v in cols[h])]
        kept = [h for h in free if h not in set(label_names)]
        if kept:
            shown = ", ".join(kept[:MAX_NAMED]) + (
                f" and {len(kept) - MAX_NAMED} more" if len(kept) > MAX_NAMED else ""
            )
            notes.append(
                f"{Path(source).name}: columns {shown} hold values other than 1/0/-1/blank and are kept "
                f"as metadata; {len(label_names)} label columns inferred (declare them with --labels)"
            )
    meta: dict[str, str] = {h: h for h in header if h.startswith("meta_")}
    for h in free:
        if h in label_names:
            continue
        key = f"meta_{h}"
        if key in meta:
            raise ManifestError(
                f"{source}: columns '{h}' and '{key}' would both be kept as metadata '{key}'; rename one"
            )
        meta[key] = h
    return label_names, meta, notes
