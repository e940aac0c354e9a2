"""Checks of a manifest's cells that need no parsed manifest: column names and where paths lead.

:func:`featcache.store.manifest.parse_manifest` runs them and reports what they find with the rest
of the manifest's problems, in one line. :func:`bad_column_name` says why a header cell cannot name
a column (column names become array names in the store); :func:`check_locations` checks one path
column (``path``, ``mask``): no control characters, nothing absolute or leaving the root, as written
(``..``) or through a symbolic link (:func:`resolves_inside`), and, when asked, every file present
(one listing for a URL root). :func:`rows_text` writes the "rows 2, 5 (a, b) and 3 more" part of
every message.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import numpy as np

from featcache.urls import UrlPath, url_files

MAX_NAMED = 5  # rows, ids or columns named in one message before "and N more"


def rows_text(lines: list[int], ids: list[str] | None = None) -> str:
    """CSV line numbers (and their ids) as a message names them: the first few, then how many more."""
    shown = lines[:MAX_NAMED]
    text = ", ".join(str(n) for n in shown)
    if ids is not None:
        text += " (" + ", ".join(ids[:MAX_NAMED]) + ")"
    if len(lines) > MAX_NAMED:
        text += f" and {len(lines) - MAX_NAMED} more"
    return text


def _inside(root: Path, rel: str) -> bool:
    """Whether ``rel`` names a place inside ``root`` as written (no absolute path, no ``..`` out)."""
    if isinstance(root, UrlPath):
        clean = posixpath.normpath(rel)
        return not (
            rel.startswith("/") or "://" in rel or "\\" in rel or clean == ".." or clean.startswith("../")
        )
    if os.path.isabs(rel) or (len(rel) > 1 and rel[1] == ":"):
        return False
    target = os.path.normpath(os.path.join(str(root), rel))
    return target == str(root) or target.startswith(str(root) + os.sep)


def resolves_inside(root: Path, rel: str, _parents: dict[str, str] | None = None) -> bool:
    """Whether ``root / rel`` still lies inside ``root`` once symbolic links are followed.

    Args:
        root: the (already resolved) root folder.
        rel: a path relative to it, as written in the manifest.
        _parents: cache of resolved parent folders, shared across the rows of one manifest (the
            folder part is resolved once per folder, the file itself is checked for being a link).

    Returns:
        False when the text escapes (absolute, ``..``) or a link on the way points outside the root;
        a path that does not exist is judged by the links of the part that does.
    """
    if not _inside(root, rel):
        return False
    if isinstance(root, UrlPath):  # object stores have no symbolic links
        return True
    cache = {} if _parents is None else _parents
    real_root = cache.get("\0") or cache.setdefault("\0", os.path.realpath(root))
    parent, name = os.path.split(rel)
    if _parents is None or name in ("", ".", ".."):
        target = os.path.realpath(os.path.join(real_root, rel))
    else:
        real_parent = _parents.get(parent)
        if real_parent is None:
            real_parent = _parents[parent] = os.path.realpath(os.path.join(real_root, parent))
        target = os.path.join(real_parent, name)
        if os.path.islink(target):
            target = os.path.realpath(target)
    return target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)


def bad_column_name(name: str) -> str | None:
    """Why a header cell cannot be a column name, or None when it can.

    Column names become array names in the feature store (``meta/<name>``, label names), so they must
    be plain: not empty, no ``/`` or ``\\``, no control characters, and not ``.``, ``..`` or a name
    starting with ``.`` or ``__`` once the ``meta_`` prefix is removed.
    """
    if not name:
        return "is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    if "/" in name or "\\" in name:
        return "contains '/' or '\\'"
    key = name[len("meta_") :] if name.startswith("meta_") else name
    if not key:
        return "is a bare 'meta_'"
    if key.startswith((".", "__")):
        return "starts with '.' or '__'"
    return None


def check_locations(
    problems: list[str],
    root: Path,
    values: list[str],
    line: np.ndarray,
    what: str,
    check_files: bool,
    kind: str,
) -> bool:
    """Add the problems of one path column (escaping the root, missing, folders); True if any escape."""
    control = [i for i, p in enumerate(values) if any(ord(c) < 32 or ord(c) == 127 for c in p)]
    if control:
        problems.append(
            f"rows {rows_text([int(line[i]) for i in control])} have control characters (e.g. NUL) in "
            f"their {what}; fix the file names in the manifest"
        )
        return True
    outside = [i for i, p in enumerate(values) if p and not _inside(root, p)]
    skip = set(outside)
    parents: dict[str, str] = {}
    linked = [
        i for i, p in enumerate(values) if p and i not in skip and not resolves_inside(root, p, parents)
    ]
    if outside:
        rows = rows_text([int(line[i]) for i in outside], [values[i] for i in outside])
        problems.append(f"rows {rows} have {what} outside the root {root} (use paths relative to --root)")
    if linked:
        rows = rows_text([int(line[i]) for i in linked], [values[i] for i in linked])
        problems.append(
            f"rows {rows} have {what} that lead outside the root {root} through a symbolic link; "
            "copy the files under the root or pass a --root that holds the link targets"
        )
    if not check_files or outside or linked:
        return bool(outside or linked)
    if isinstance(root, UrlPath):
        listed = url_files(root)
        if listed is None:
            problems.append(
                f"cannot list {root} to check that the {kind} files exist; check the URL and "
                "--storage-options, or pass --no-check-files"
            )
            return False
        missing = [i for i, p in enumerate(values) if p and posixpath.normpath(p) not in listed]
        if missing:
            rows = rows_text([int(line[i]) for i in missing], [values[i] for i in missing])
            problems.append(f"rows {rows} name {kind} files that do not exist under {root}")
        return False
    folders = [i for i, p in enumerate(values) if p and (root / p).is_dir()]
    skip = set(folders)
    missing = [i for i, p in enumerate(values) if p and i not in skip and not (root / p).is_file()]
    if missing:
        rows = rows_text([int(line[i]) for i in missing], [values[i] for i in missing])
        problems.append(f"rows {rows} name {kind} files that do not exist under {root}")
    if folders:
        rows = rows_text([int(line[i]) for i in folders], [values[i] for i in folders])
        problems.append(f"rows {rows} name folders, not {kind} files, under {root}")
    return False
