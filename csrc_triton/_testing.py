"""Hooks for the test suite; not part of the public API.

* :func:`poison_outputs`: outputs allocated by the backends are filled with NaN, so an element a
  kernel never writes fails a test instead of passing as leftover memory;
* :func:`blockwise_rows`: force the blockwise backend's block height (many small blocks).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import blockwise
from ._alloc import poison_outputs

__all__ = ["blockwise_rows", "poison_outputs"]


@contextlib.contextmanager
def blockwise_rows(rows: int) -> Iterator[None]:
    """Run the blockwise backend with blocks of ``rows`` rows inside the context."""
    previous = blockwise._block_rows_override
    blockwise._block_rows_override = int(rows)
    try:
        yield
    finally:
        blockwise._block_rows_override = previous
