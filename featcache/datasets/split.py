"""Patient-level train / val / test splits.

Rows are grouped by patient (or by a coarser ``meta_*`` column such as a site,
merged with the patients so a patient is never divided) and whole groups are
assigned, so no patient can be in two splits. Fractions are shares of the
manifest's images: a group of 40 images counts 40 times. Rows that already
have a split keep it (their group follows them) unless ``overwrite`` is set,
and they count towards the fractions, so an official test set plus
``val=0.1`` gives a validation split of about a tenth of all images.

Stratification is iterative stratification (Sechidis, Tsoumakas & Vlahavas,
ECML 2011) applied to groups: take the label with the fewest positive images
left to place, give each group holding it (in a seeded random order) to the
split that still wants the most positives of that label (ties: the split that
wants the most images), update what every split still wants, repeat; groups
with no positives go to the split that wants the most images. Without
stratification, groups are taken in a seeded random order and each goes to
the split that wants the most images. The result depends only on the groups,
their labels and the seed, not on the row order of the file.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError, ManifestError
from featcache.store.manifest import Manifest, parse_manifest

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class SplitResult:
    """What ``split_manifest`` did.

    Attributes:
        out: the manifest written.
        counts: split -> {"images": int, "patients": int}.
        kept: rows whose split was already set and kept.
        prevalence: label -> split -> share of positive images (stratified labels only).
    """

    out: Path
    counts: dict[str, dict[str, int]]
    kept: int
    prevalence: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: images / patients per split."""
        parts = [f"{s}: {c['images']} images, {c['patients']} patients" for s, c in self.counts.items()]
        kept = f"; {self.kept} rows kept their split" if self.kept else ""
        return f"wrote {self.out} ({'; '.join(parts)}{kept})"


def assign_splits(
    groups: np.ndarray,
    fractions: dict[str, float],
    *,
    seed: int = 0,
    strata: np.ndarray | None = None,
    fixed: np.ndarray | None = None,
) -> np.ndarray:
    """Assign every row a split so that each group (patient) lands in exactly one split.

    Args:
        groups: str [N], the group (patient) of each row.
        fractions: split name (``train``/``val``/``test``) -> share of all rows; shares sum to 1.
        seed: random seed; the same inputs and seed give the same result.
        strata: float32 [N, K], labels to stratify on (``1`` = positive; anything else is not), or None.
        fixed: str [N], splits already set (``""`` = to assign); a group with a fixed row keeps that split.

    Returns:
        str [N] split names (object array).

    Raises:
        FeatcacheError: bad fractions, or one group with rows already fixed in two splits.
    """
    unknown = sorted(set(fractions) - set(SPLIT_NAMES))
    if unknown:
        raise FeatcacheError(f"unknown split names {unknown}; use {list(SPLIT_NAMES)}")
    frac = np.array([float(fractions.get(s, 0.0)) for s in SPLIT_NAMES])
    if np.any(frac < 0) or abs(frac.sum() - 1.0) > 1e-6:
        raise FeatcacheError(
            f"split fractions {dict(zip(SPLIT_NAMES, frac.tolist()))} must be >= 0 and sum to 1 "
            "(choose --val and --test with val + test < 1)"
        )
    groups = np.asarray(groups, dtype=np.str_)
    n = len(groups)
    names, inv = np.unique(groups, return_inverse=True)
    n_groups = len(names)
    size = np.bincount(inv, minlength=n_groups).astype(np.float64)
    if strata is None:
        pos = np.zeros((n_groups, 0))
    else:
        hits = (np.asarray(strata) == 1).astype(np.float64).reshape(n, -1)
        pos = np.zeros((n_groups, hits.shape[1]))
        np.add.at(pos, inv, hits)

    assigned = np.full(n_groups, -1, dtype=np.int64)
    if fixed is not None:
        fixed = np.asarray(fixed, dtype=np.str_)
        bad = sorted(set(fixed.tolist()) - set(SPLIT_NAMES) - {""})
        if bad:
            raise FeatcacheError(f"unknown split values {bad}; use {list(SPLIT_NAMES)} or blank")
        rows = np.flatnonzero(fixed != "")
        codes = np.array([SPLIT_NAMES.index(s) for s in fixed[rows]], dtype=np.int64)
        first = np.full(n_groups, -1, dtype=np.int64)
        first[inv[rows][::-1]] = codes[::-1]
        conflict = np.unique(inv[rows][codes != first[inv[rows]]])
        if len(conflict):
            shown = ", ".join(repr(str(g)) for g in names[conflict][:5])
            raise ManifestError(
                f"groups {shown} already have rows in more than one split; fix those rows or pass --overwrite"
            )
        assigned = first

    want_rows = frac * n
    want_pos = frac[:, None] * pos.sum(axis=0)[None, :]
    for s in range(len(SPLIT_NAMES)):
        done = assigned == s
        want_rows[s] -= size[done].sum()
        want_pos[s] -= pos[done].sum(axis=0)
    open_splits = [s for s in range(len(SPLIT_NAMES)) if frac[s] > 0]
    if not open_splits:
        raise FeatcacheError("every split fraction is 0; nothing to assign")

    rng = np.random.default_rng(seed)
    order = rng.permutation(np.flatnonzero(assigned < 0))

    def give(g: int, s: int) -> None:
        assigned[g] = s
        want_rows[s] -= size[g]
        want_pos[s] -= pos[g]

    left = np.zeros(n_groups, dtype=bool)
    left[order] = True
    while pos.shape[1]:
        remaining = pos[left].sum(axis=0)
        if not np.any(remaining > 0):
            break
        k = int(np.argmin(np.where(remaining > 0, remaining, np.inf)))
        members = order[left[order] & (pos[order, k] > 0)]
        for g in members:
            s = max(open_splits, key=lambda t: (want_pos[t, k], want_rows[t]))
            give(int(g), s)
        left[members] = False
    for g in order[left[order]]:
        give(int(g), max(open_splits, key=lambda t: want_rows[t]))

    return np.asarray(SPLIT_NAMES, dtype=object)[assigned[inv]]


def _groups(m: Manifest, by: str) -> np.ndarray:
    """Group key per row: patients, or patients merged through a shared ``by`` column value."""
    if by == "patient":
        return m.patient_ids
    if by not in m.meta:
        raise FeatcacheError(
            f"{m.source}: --by {by!r} is neither 'patient' nor a meta_* column of the manifest "
            f"(meta columns: {sorted(m.meta)})"
        )
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    values = m.meta[by]
    # A blank value joins nothing: such a row forms a group with its own patient only.
    keys = np.where(values == "", np.char.add("\0row", np.arange(len(values)).astype(np.str_)), values)
    _, pinv = np.unique(m.patient_ids, return_inverse=True)
    _, binv = np.unique(keys, return_inverse=True)
    n_p, n_b = pinv.max() + 1, binv.max() + 1
    graph = coo_matrix((np.ones(len(pinv)), (pinv, n_p + binv)), shape=(n_p + n_b, n_p + n_b))
    _, comp = connected_components(graph, directed=False)
    return comp[pinv].astype(np.str_)


def _strata(m: Manifest, stratify: list[str] | str | None) -> tuple[np.ndarray | None, list[str]]:
    if stratify is None or stratify == [] or stratify == "":
        return None, []
    names = [s.strip() for s in stratify.split(",")] if isinstance(stratify, str) else list(stratify)
    if m.task == "multiclass":
        if names not in (["label"], ["all"]):
            raise FeatcacheError(
                f"{m.source}: a multi-class manifest is stratified on its classes: use --stratify label"
            )
        classes = sorted(c for c in set(m.classes.tolist()) if c)
        onehot = (m.classes[:, None] == np.asarray(classes)[None, :]).astype(np.float32)
        return onehot, classes
    if names == ["all"]:
        names = list(m.label_names)
    unknown = [s for s in names if s not in m.label_names]
    if unknown or not names:
        raise FeatcacheError(
            f"{m.source}: cannot stratify on {unknown or names}: not label columns of the manifest "
            f"(label columns: {m.label_names}); pass --stratify with some of them, or 'all'"
        )
    return m.labels[:, [m.label_names.index(s) for s in names]], names


def split_manifest(
    csv_path: str | Path,
    out: str | Path,
    *,
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    stratify: list[str] | str | None = None,
    by: str = "patient",
    overwrite: bool = False,
) -> SplitResult:
    """Write a copy of a manifest with a patient-level ``split`` column filled in.

    Args:
        csv_path: the manifest CSV.
        out: the CSV to write (may be ``csv_path`` itself); other columns are copied unchanged.
        val: share of all images for ``val``.
        test: share of all images for ``test``.
        seed: random seed.
        stratify: label columns to stratify on (list or comma-separated), ``all``, ``label`` for a
            multi-class manifest, or None.
        by: ``patient``, or a ``meta_*`` column (e.g. a site) whose groups are kept whole as well.
        overwrite: re-assign rows that already have a split.

    Returns:
        A ``SplitResult`` with images and patients per split.

    Raises:
        FeatcacheError: an invalid manifest, unknown stratification labels, bad fractions.
    """
    csv_path, out = Path(csv_path), Path(out)
    if not csv_path.is_file():
        raise ManifestError(f"{csv_path}: manifest not found")
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise FeatcacheError(f"--val {val} and --test {test} must be in [0, 1) with val + test < 1")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        records = [r for r in reader if any(c.strip() for c in r)]
    parsed = records
    if overwrite and "split" in header:
        # Splits about to be replaced may leak; validate everything else.
        j = header.index("split")
        parsed = [r[:j] + [""] + r[j + 1 :] for r in records]
    m = parse_manifest(
        header, parsed, root=csv_path.parent.resolve(), source=str(csv_path), check_files=False
    )
    fixed = np.full(len(m), "", dtype=np.str_) if overwrite else m.splits
    strata, strat_names = _strata(m, stratify)
    splits = assign_splits(
        _groups(m, by),
        {"train": 1.0 - val - test, "val": val, "test": test},
        seed=seed,
        strata=strata,
        fixed=fixed,
    )

    if "split" in header:
        j = header.index("split")
        rows = [r[:j] + [s] + r[j + 1 :] for r, s in zip(records, splits)]
        new_header = header
    else:
        j = header.index("path") + 1
        for name in ("id", "patient_id"):
            if name in header:
                j = max(j, header.index(name) + 1)
        rows = [r[:j] + [s] + r[j:] for r, s in zip(records, splits)]
        new_header = header[:j] + ["split"] + header[j:]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(new_header)
        w.writerows(rows)
    os.replace(tmp, out)

    splits = np.asarray(splits, dtype=np.str_)
    counts = {}
    prevalence: dict[str, dict[str, float]] = {name: {} for name in strat_names}
    for s in SPLIT_NAMES:
        sel = splits == s
        if not sel.any():
            continue
        counts[s] = {"images": int(sel.sum()), "patients": len(np.unique(m.patient_ids[sel]))}
        for k, name in enumerate(strat_names):
            prevalence[name][s] = float(np.mean(strata[sel, k] == 1))
    kept = int(np.sum(fixed != ""))
    return SplitResult(out=out, counts=counts, kept=kept, prevalence=prevalence)
