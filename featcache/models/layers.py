"""Parsing of layer selections such as ``last4`` or ``3,6,9`` (no torch)."""

from __future__ import annotations

import re

from featcache.errors import FeatcacheError

__all__ = ["resolve_layers"]

_LAST = re.compile(r"^last(\d*)$")


def resolve_layers(spec: str, num_layers: int) -> list[int]:
    """Turn a layer selection into 0-based block indices.

    Block ``i`` is the output of the ``i``-th transformer block (0 = first block,
    ``num_layers - 1`` = last). Accepted forms:

    - ``last``: the last block, ``[num_layers - 1]``
    - ``lastN`` (``last4``): the last N blocks in order
    - ``-1``, ``-2``: negative indices count from the end
    - ``3,6,9`` or ``0,-1``: a comma-separated list of indices, kept in the given order

    Args:
        spec: the selection, as typed on the command line.
        num_layers: blocks of the backbone (``Backbone.num_layers``).

    Returns:
        Indices in ``[0, num_layers)``, in the requested order, without repeats.

    Raises:
        FeatcacheError: malformed selection, an index out of range, a repeat, or N larger
            than ``num_layers``.
    """
    text = str(spec).strip().replace(" ", "")
    if not text:
        raise FeatcacheError("empty layer selection: use last, last4, -1 or a list such as 3,6,9")
    match = _LAST.match(text)
    if match:
        n = int(match.group(1) or 1)
        if not 1 <= n <= num_layers:
            raise FeatcacheError(f"layer selection {spec!r} asks for {n} blocks; the model has {num_layers}")
        return list(range(num_layers - n, num_layers))
    out: list[int] = []
    for part in text.split(","):
        try:
            index = int(part)
        except ValueError:
            raise FeatcacheError(
                f"layer selection {spec!r}: {part!r} is not an index; use last, last4, -1 or a list such as 3,6,9"
            ) from None
        if not -num_layers <= index < num_layers:
            raise FeatcacheError(
                f"layer {index} is out of range: the model has {num_layers} blocks (0..{num_layers - 1}, "
                f"or -1..-{num_layers})"
            )
        index %= num_layers
        if index in out:
            raise FeatcacheError(f"layer selection {spec!r} names block {index} twice")
        out.append(index)
    return out
