"""Errors a user can act on.

Every error raised for bad input (a manifest row, a file, an option) is a
``FeatcacheError``; the CLI prints its message as one line and exits non-zero,
never a traceback. Messages name the file or row and say what to do.
"""

from __future__ import annotations


class FeatcacheError(Exception):
    """A user-facing error: bad input, a missing file, an incompatible store."""


class ManifestError(FeatcacheError):
    """The manifest CSV is malformed or inconsistent (rows are named in the message)."""


class ImageReadError(FeatcacheError):
    """An image file could not be decoded (the path is named in the message)."""


class ModelLoadError(FeatcacheError):
    """A backbone could not be built or its weights could not be found."""


class StoreError(FeatcacheError):
    """The feature store is missing, incomplete, locked or inconsistent."""


class ExtractionInterrupted(FeatcacheError):
    """Ctrl-C during extraction: finished shards are kept, the next run resumes."""


class ExtractionAborted(FeatcacheError):
    """The run cannot go on (a decode worker died, memory ran out); finished shards are kept."""
