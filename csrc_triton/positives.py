"""O(N D) pieces of the losses that never need the tiles.

* :func:`row_dot`: <a_i, b_i> accumulated in float32 without float32 copies of a and b (rows
  are upcast a bounded chunk at a time), with its own backward. MoCo's positive logit.
* :func:`label_counts`: how many columns share each row's label, by sorting (no
  ``torch.unique``, no data-dependent shape, no host synchronisation).
* :func:`class_ranges`, :func:`class_slots`: each row's class as a contiguous range of the
  columns sorted by label, and its members padded to K slots (the positive lists of the
  blockwise backend and of the distance engine).

Positives that live inside the similarity matrix (an index per row, or labels) are computed by
the backends in the same pass as the log-sum-exps (:mod:`csrc_triton.backend`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._numerics import acc_dtype

#: Elements upcast at a time by :func:`row_dot` (4 MiB of float32 per operand).
CHUNK_ELEMENTS = 1 << 20


def _chunks(n: int, d: int):
    rows = max(1, CHUNK_ELEMENTS // max(d, 1))
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


class _RowDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        acc = acc_dtype(a)
        out = torch.empty(a.shape[0], dtype=acc, device=a.device)
        for rows in _chunks(a.shape[0], a.shape[1]):
            out[rows] = (a[rows].to(acc) * b[rows].to(acc)).sum(dim=1)
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        acc = acc_dtype(a)
        da = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        db = torch.empty_like(b) if ctx.needs_input_grad[1] else None
        for rows in _chunks(a.shape[0], a.shape[1]):
            g = grad[rows].to(acc)[:, None]
            if da is not None:
                da[rows] = g * b[rows].to(acc)
            if db is not None:
                db[rows] = g * a[rows].to(acc)
        return da, db


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """(N,) <a_i, b_i> in float32 (float64 for float64 inputs) for (N, D) a and b."""
    return _RowDot.apply(a, b)


def label_counts(row_labels: Tensor, col_labels: Tensor) -> Tensor:
    """(N,) int64: the number of j with col_labels[j] == row_labels[i]."""
    ordered = torch.sort(col_labels).values
    return torch.searchsorted(ordered, row_labels, right=True) - torch.searchsorted(ordered, row_labels)


class ClassRanges(NamedTuple):
    perm: Tensor  # (M,) candidates in label order (stable: ascending index within a class)
    lo: Tensor  # (N,) first position of row i's class in that order
    count: Tensor  # (N,) size of row i's class among the candidates
    self_sorted: Tensor  # (N,) position of row i's own candidate in that order, -1 if none


def class_ranges(row_labels: Tensor, col_labels: Tensor, self_offset: int | None) -> ClassRanges:
    sorted_labels, perm = torch.sort(col_labels, stable=True)
    lo = torch.searchsorted(sorted_labels, row_labels)
    hi = torch.searchsorted(sorted_labels, row_labels, right=True)
    n, m = row_labels.shape[0], col_labels.shape[0]
    if self_offset is None:
        self_sorted = torch.full((n,), -1, dtype=torch.int64, device=row_labels.device)
    else:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(m, device=perm.device)
        own = torch.arange(n, device=perm.device) + self_offset
        self_sorted = torch.where(own < m, inv[own.clamp(max=m - 1)], -1)
    return ClassRanges(perm, lo, hi - lo, self_sorted)


def class_slots(r: ClassRanges, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Positions (in label order) of every anchor's class, padded to k slots.

    Returns (pos (N, k) int64 position, always a valid in-class position; in_class (N, k)
    bool, slot inside the class; positive (N, k) bool, in_class and not the anchor itself).
    """
    slot = torch.arange(k, device=r.lo.device)
    in_class = slot[None, :] < r.count[:, None]
    pos = torch.where(in_class, r.lo[:, None] + slot[None, :], r.lo[:, None])
    return pos, in_class, in_class & (pos != r.self_sorted[:, None])
