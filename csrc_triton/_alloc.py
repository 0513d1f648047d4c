"""Output allocation shared by every backend.

Backends allocate their outputs through :func:`empty` so that tests can poison them:
inside :func:`poison_outputs`, fresh outputs are filled with NaN, so an element that a
kernel never writes makes the test fail instead of passing as leftover memory.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_state = threading.local()


def poisoning() -> bool:
    return getattr(_state, "poison", False)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Fill every output allocated by the backends with NaN while the context is active."""
    previous = poisoning()
    _state.poison = enabled
    try:
        yield
    finally:
        _state.poison = previous


def empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    out = torch.empty(tuple(shape), dtype=dtype, device=device)  # no shape: a 0-dim tensor
    if poisoning():
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        else:
            out.fill_(-0x5A5A5A5A if dtype in (torch.int32, torch.int64) else 0)
    return out
