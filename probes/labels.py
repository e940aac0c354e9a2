"""Uncertain-label policies, applied at probe time (no scikit-learn, no torch)."""

from __future__ import annotations

import numpy as np

from featcache.errors import FeatcacheError

_POLICIES = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}


def apply_uncertain(Y: np.ndarray, policy: str) -> np.ndarray:
    """Map uncertain labels (-1) by a policy, leaving 1, 0 and missing (NaN) as they are.

    Args:
        Y: float [N, L] raw labels: 1 positive, 0 negative, -1 uncertain, NaN missing.
        policy: ``"ignore"`` (uncertain -> missing), ``"zeros"`` (-> negative) or ``"ones"``
            (-> positive), the U-Ignore / U-Zeros / U-Ones policies of CheXpert; a ``"u-"``
            prefix and any case are accepted.

    Returns:
        float32 [N, L] with values 1, 0 and NaN only.

    Raises:
        FeatcacheError: for an unknown policy or a value other than 1, 0, -1 and NaN.
    """
    key = str(policy).lower().removeprefix("u-").removeprefix("u_")
    if key not in _POLICIES:
        raise FeatcacheError(f"unknown uncertain-label policy {policy!r}: use 'ignore', 'zeros' or 'ones'")
    Y = np.array(Y, dtype=np.float32, copy=True)
    bad = ~(np.isnan(Y) | np.isin(Y, (1.0, 0.0, -1.0)))
    if bad.any():
        pos = np.argwhere(bad)[0]
        raise FeatcacheError(
            f"label value {Y[tuple(pos)]:g} at row {pos[0]}, label column {pos[-1]}: labels must be 1, 0, -1 or blank"
        )
    Y[Y == -1] = _POLICIES[key]
    return Y
