"""fsspec URLs (remote stores and image roots), shared by the decoders, the manifest and the store.

This module imports neither torch nor zarr.
"""

from __future__ import annotations

import os


def is_url(path: object) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://...``, ``gs://...``) other than a local ``file://`` one."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


class UrlPath(str):
    """An image root or image on an fsspec URL, carrying the file system's storage options.

    A ``str`` (the URL itself, pickled with its options into decode workers) that joins like a
    ``Path``: ``UrlPath("s3://bucket/images") / "a/1.png"`` is ``s3://bucket/images/a/1.png``.
    ``featcache.decode.images.read_image`` reads such a path's bytes through fsspec.
    """

    storage_options: dict

    def __new__(cls, url: str, storage_options: dict | None = None) -> UrlPath:
        self = super().__new__(cls, str(url).rstrip("/"))
        self.storage_options = dict(storage_options or {})
        return self

    def __truediv__(self, rel: object) -> UrlPath:
        return UrlPath(f"{self}/{str(rel).lstrip('/')}", self.storage_options)

    def __reduce__(self):
        return (UrlPath, (str(self), self.storage_options))

    @property
    def name(self) -> str:
        """The last part of the URL."""
        return self.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        """The file suffix of the last part (``.png``), or ''."""
        return os.path.splitext(self.name)[1]

    def fs(self):
        """The fsspec file system and the path inside it."""
        import fsspec

        return fsspec.core.url_to_fs(str(self), **self.storage_options)


def url_files(root: UrlPath) -> set[str] | None:
    """The relative paths of every file under a URL root, from one listing (None: cannot list)."""
    try:
        fs, base = root.fs()
        found = fs.find(base)
    except Exception:
        return None
    base = base.rstrip("/") + "/"
    return {f[len(base) :] for f in found if f.startswith(base)}
