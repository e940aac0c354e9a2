"""Fit a probe on a :class:`~probes.data.ProbeData` and score its splits (shared by the runners).

This module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError

from .data import ProbeData
from .logreg import LogRegProbe


def _logreg_scores(
    data: ProbeData, C: float | None, C_grid: Sequence[float]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[dict[str, Any]]]:
    """Fit the linear probe: (test scores [n, L], val scores or None, fitted bool [L], per-label extra)."""
    L = len(data.label_names)
    if data.task == "multiclass":
        probe = LogRegProbe(C=C, C_grid=C_grid, task="multiclass")
        has_val = C is None and len(data.val) > 0
        if C is None and not has_val:
            raise FeatcacheError(
                f"{data.context.get('store_set')}: no validation rows to choose C on; pass --C or a val split"
            )
        probe.fit(data.train.X, data.train.y, *((data.val.X, data.val.y) if has_val else ()))
        S_val = probe.predict_scores(data.val.X) if len(data.val) else None
        extra = [{"C": float(probe.C_), "params": {"C_from": "val" if C is None else "given"}}] * L
        return probe.predict_scores(data.test.X), S_val, np.ones(L, bool), extra

    Y, Yv = data.train.y, data.val.y
    two = lambda y: (y == 1).any(axis=0) & (y == 0).any(axis=0)  # noqa: E731
    in_train = two(Y)
    in_val = two(Yv) if len(data.val) else np.zeros(L, bool)
    S_test = np.full((len(data.test), L), np.nan)
    S_val = np.full((len(data.val), L), np.nan) if len(data.val) else None
    extra: list[dict[str, Any]] = [{} for _ in range(L)]
    for j in np.flatnonzero(~in_train):
        n_pos, n_neg = int((Y[:, j] == 1).sum()), int((Y[:, j] == 0).sum())
        extra[j] = {"params": {"skipped": f"train rows hold {n_pos} positives and {n_neg} negatives"}}

    def fit(cols: np.ndarray, c: float | None, source: str) -> LogRegProbe:
        probe = LogRegProbe(C=c, C_grid=C_grid, task="multilabel")
        if c is None:
            probe.fit(data.train.X, Y[:, cols], data.val.X, Yv[:, cols])
        else:
            probe.fit(data.train.X, Y[:, cols])
        S_test[:, cols] = probe.predict_scores(data.test.X)
        if S_val is not None:
            S_val[:, cols] = probe.predict_scores(data.val.X)
        for i, j in enumerate(cols):
            extra[j] = {"C": float(np.atleast_1d(probe.C_)[i]), "params": {"C_from": source}}
        return probe

    if C is not None:
        if in_train.any():
            fit(np.flatnonzero(in_train), float(C), "given")
    else:
        selectable = np.flatnonzero(in_train & in_val)
        rest = np.flatnonzero(in_train & ~in_val)
        if not len(selectable) and len(rest):
            raise FeatcacheError(
                f"{data.context.get('store_set')}: no label has both classes in the validation split, so C "
                "cannot be chosen; pass --C, or give the manifest a larger val split"
            )
        if len(selectable):
            probe = fit(selectable, None, "val")
            if len(rest):
                grid = np.sort(np.asarray(C_grid, dtype=np.float64))
                shared = float(grid[int(np.argmax(np.nanmean(probe.val_auroc_, axis=1)))])
                fit(rest, shared, "shared")
    return S_test, S_val, in_train, extra
