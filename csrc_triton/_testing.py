"""Hooks for the test suite; not part of the public API.

* :func:`poison_outputs`: outputs allocated by the backends are filled with NaN, so an element a
  kernel never writes fails a test instead of passing as leftover memory;
* :func:`blockwise_rows`: force the blockwise backend's tile shape (many small tiles).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import blockwise
from ._alloc import poison_outputs

__all__ = ["blockwise_rows", "poison_outputs"]


@contextlib.contextmanager
def blockwise_rows(rows: int, cols: int | None = None) -> Iterator[None]:
    """Run the blockwise backend with tiles of ``rows`` rows (and ``cols`` columns; None: all)
    inside the context."""
    previous = blockwise._tile_override
    blockwise._tile_override = (int(rows), None if cols is None else int(cols))
    try:
        yield
    finally:
        blockwise._tile_override = previous
