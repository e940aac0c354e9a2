"""featcache: embed a dataset once with a frozen vision backbone, probe the cache many times.

The extraction half (``featcache.extract.pipeline``, ``featcache.models``) imports torch;
``featcache.store.feature_store`` and ``featcache.store.manifest`` do not, so the probes can read a
store without it.
"""

from featcache.errors import FeatcacheError

__version__ = "0.1.0"

__all__ = ["FeatcacheError", "__version__"]
