"""Dense backend: materialises the full N x M logit matrix Z. The reference, and the baseline.

Implements :class:`csrc_triton.backend.LseBackend` (see there for the formulas) in the most
direct way: Z, masks and G as N x M tensors, so its memory grows with N x M.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._alloc import empty
from ._numerics import acc_dtype, finite_or_zero
from .backend import LseGrads, LseStats


def _excluded(n: int, m: int, self_offset: int | None, device: torch.device) -> Tensor | None:
    """(N, M) bool, True at (i, i + self_offset); None when nothing is excluded."""
    if self_offset is None:
        return None
    rows = torch.arange(n, device=device)
    return (rows[:, None] + self_offset) == torch.arange(m, device=device)[None, :]


def _logits(q: Tensor, k: Tensor, scale: Tensor, col_bias: Tensor | None, excluded: Tensor | None) -> Tensor:
    acc = acc_dtype(q)
    z = (q.to(acc) * scale.to(acc)) @ k.to(acc).T
    if col_bias is not None:
        z = z + col_bias.to(acc)[None, :]
    if excluded is not None:
        z = z.masked_fill(excluded, -math.inf)
    return z


def _positive_mask(
    n: int, m: int, positive_index: Tensor | None, row_labels: Tensor | None, col_labels: Tensor | None,
    excluded: Tensor | None, device: torch.device,
) -> Tensor | None:
    """(N, M) bool: j in P(i), allowed entries only; None without positives."""
    if positive_index is not None:
        mask = positive_index[:, None] == torch.arange(m, device=device)[None, :]
    elif row_labels is not None:
        mask = row_labels[:, None] == col_labels[None, :]
    else:
        return None
    return mask & ~excluded if excluded is not None else mask


def _out(x: Tensor) -> Tensor:
    return empty(*x.shape, dtype=x.dtype, device=x.device).copy_(x)


def lse_forward(
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    *,
    col_bias: Tensor | None,
    self_offset: int | None,
    compute_col: bool,
    positive_index: Tensor | None,
    row_labels: Tensor | None,
    col_labels: Tensor | None,
    positive_sum: bool,
    positive_lse: bool,
) -> LseStats:
    n, m = q.shape[0], k.shape[0]
    excluded = _excluded(n, m, self_offset, q.device)
    z = _logits(q, k, scale, col_bias, excluded)
    nothing = z.new_empty(0)
    row_lse = _out(torch.logsumexp(z, dim=1))
    col_lse = _out(torch.logsumexp(z, dim=0)) if compute_col else nothing
    mask = _positive_mask(n, m, positive_index, row_labels, col_labels, excluded, q.device)
    pos_sum = pos_lse = nothing
    if positive_sum:
        pos_sum = _out(torch.where(mask, z, 0.0).sum(dim=1)) if mask is not None else _out(z.new_zeros(n))
    if positive_lse:
        pos_lse = (_out(torch.logsumexp(torch.where(mask, z, -math.inf), dim=1)) if mask is not None
                   else _out(z.new_full((n,), -math.inf)))
    return LseStats(row_lse, col_lse, pos_sum, pos_lse)


def lse_backward(
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    stats: LseStats,
    *,
    grad_row: Tensor,
    grad_col: Tensor | None,
    grad_positive_sum: Tensor | None,
    grad_positive_lse: Tensor | None,
    col_bias: Tensor | None,
    self_offset: int | None,
    positive_index: Tensor | None,
    row_labels: Tensor | None,
    col_labels: Tensor | None,
    needs_dq: bool,
    needs_dk: bool,
    needs_dbias: bool,
    deterministic: bool,
) -> LseGrads:
    n, m = q.shape[0], k.shape[0]
    excluded = _excluded(n, m, self_offset, q.device)
    z = _logits(q, k, scale, col_bias, excluded)
    acc = z.dtype
    # G_ij = g_i exp(Z_ij - r_i) + h_j exp(Z_ij - c_j) + [j in P(i)] (w_i + u_i exp(Z_ij - pl_i))
    g = torch.exp(z - finite_or_zero(stats.row_lse.to(acc))[:, None]) * grad_row.to(acc)[:, None]
    if grad_col is not None:
        g = g + torch.exp(z - finite_or_zero(stats.col_lse.to(acc))[None, :]) * grad_col.to(acc)[None, :]
    mask = _positive_mask(n, m, positive_index, row_labels, col_labels, excluded, q.device)
    if mask is not None:
        pos = torch.zeros_like(z)
        if grad_positive_sum is not None:
            pos = pos + grad_positive_sum.to(acc)[:, None]
        if grad_positive_lse is not None:
            pos = pos + grad_positive_lse.to(acc)[:, None] * torch.exp(
                z - finite_or_zero(stats.positive_lse.to(acc))[:, None])
        g = g + torch.where(mask, pos, 0.0)
    qa, ka = q.to(acc), k.to(acc)
    g_k = g @ ka  # dQ / scale
    s = scale.to(acc)
    dq = empty(*q.shape, dtype=q.dtype, device=q.device).copy_(s * g_k) if needs_dq else None
    dk = empty(*k.shape, dtype=k.dtype, device=k.device).copy_(s * (g.T @ qa)) if needs_dk else None
    # dscale = sum_ij G_ij q_i.k_j = sum_i q_i . (G K)_i
    dscale = empty(dtype=acc, device=q.device).copy_((g_k * qa).sum())
    dbias = _out(g.sum(dim=0)) if needs_dbias else None
    return LseGrads(dq, dk, dscale, dbias)
