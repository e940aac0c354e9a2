"""How a feature set was made, read from its attributes in one place (no torch, no zarr).

``extract`` and ``import`` write each attribute once, at the top level of the set's attributes,
and name the ones that define its content in ``settings``; every consumer reads them through
:meth:`featcache.store.FeatureSet.record` (a :class:`SetRecord`), so the rules for older sets
(values kept only under ``config``, ``res`` inside the preprocessing, weights inside the
provenance) live here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from featcache.errors import FeatcacheError
from featcache.store.preprocess import Preprocess


@dataclass(frozen=True)
class SetRecord:
    """The provenance of one feature set.

    Attributes:
        model: what ``--model`` named (``dinov3-vitb16``, ``random:NAME``, a folder), or None.
        weights: the exact weights (hub revision, file hashes or random seed), or None.
        res: input resolution in pixels, or None (imported features).
        preprocessing: the recorded preprocessing (settings and fixed steps, without ``res``), or None.
        compute_dtype: the dtype the backbone ran in (``float32``, ``bfloat16``...), or None.
        tokens: the token arrays stored (``cls``, ``pooled``, ``patch`` ...).
        layers: model layer indices of the ``layer_*`` arrays, shallow to deep.
        patch_pool: spatial pooling of stored patch tokens (1: none).
        featcache_version: the featcache version that made the set, or None.
        manifest_digest: the digest of the manifest columns the set holds, or None.
    """

    model: str | None = None
    weights: str | None = None
    res: int | None = None
    preprocessing: dict[str, Any] | None = None
    compute_dtype: str | None = None
    tokens: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()
    patch_pool: int = 1
    featcache_version: str | None = None
    manifest_digest: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> SetRecord:
        """Read a set's attributes; values that older sets kept only under ``config`` are taken there."""
        config = attrs.get("config") or {}

        def pick(key):
            value = attrs.get(key)
            return config.get(key) if value is None else value

        weights = (
            attrs.get("weights") or (attrs.get("provenance") or {}).get("weights") or config.get("weights")
        )
        res = pick("res")
        prep = pick("preprocessing")
        if isinstance(prep, Mapping):  # sets made before also kept ``res`` inside it
            prep = {k: v for k, v in prep.items() if k != "res"}
        return cls(
            model=pick("model"),
            weights=None if weights is None else str(weights),
            res=None if res is None else int(res),
            preprocessing=prep,
            compute_dtype=pick("compute_dtype"),
            tokens=tuple(pick("tokens") or ()),
            layers=tuple(int(v) for v in (pick("layers") or ())),
            patch_pool=int(pick("patch_pool") or 1),
            featcache_version=(attrs.get("versions") or {}).get("featcache"),
            manifest_digest=attrs.get("manifest_digest"),
        )

    def preprocess(self) -> Preprocess:
        """The :class:`~featcache.store.preprocess.Preprocess` the set's inputs were made with.

        Raises:
            FeatcacheError: the set records no preprocessing (imported features) or no resolution.
        """
        if self.preprocessing is None or self.res is None:
            raise FeatcacheError(
                "the set records no preprocessing (features imported from another tool?); "
                "re-extract it with `featcache extract`"
            )
        return Preprocess.from_dict({**self.preprocessing, "res": self.res})

    def backbone(self) -> dict[str, Any]:
        """What must agree for two sets' features to be comparable (external validation)."""
        return {
            "model": self.model,
            "weights": self.weights,
            "resolution": self.res,
            "preprocessing": self.preprocessing,
        }
