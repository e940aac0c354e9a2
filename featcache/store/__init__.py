"""The feature store: the contract between extraction and the probes (numpy and zarr, never torch).

A store is a Zarr v3 group of feature sets, one per (dataset, model, resolution). Everything a
consumer needs to know about a set is here: its arrays and manifest columns
(:class:`FeatureSet`), how it was made (:class:`SetRecord`, read once from the attributes that
``featcache extract`` and ``featcache import`` write), the preprocessing settings with their image
geometry and mask transform (:class:`Preprocess`), the manifest it was made from
(:class:`Manifest`), and the one check every reader passes (:meth:`FeatureStore.open_checked`).

Modules: ``feature_store`` (the store, set creation), ``feature_set`` (one set), ``layout``
(array layout, dimension names, byte columns), ``read`` / ``write`` (checked chunk reads, shard
commits), ``check`` (the usability check, ``verify``), ``io`` (names, checksums, atomic
creation, write errors), ``locks`` (locks beside the store), ``provenance`` (``SetRecord``),
``manifest``, ``preprocess``.
"""

from featcache.store.feature_set import FeatureSet
from featcache.store.feature_store import FeatureStore
from featcache.store.layout import FAILED, OK, PENDING, ArraySpec
from featcache.store.manifest import Manifest, parse_manifest, read_manifest, write_manifest
from featcache.store.preprocess import Preprocess
from featcache.store.provenance import SetRecord

__all__ = [
    "FAILED",
    "OK",
    "PENDING",
    "ArraySpec",
    "FeatureSet",
    "FeatureStore",
    "Manifest",
    "Preprocess",
    "SetRecord",
    "parse_manifest",
    "read_manifest",
    "write_manifest",
]
