"""Dense backend: materialises the full N x M logit matrix. The reference, and the baseline.

Same contract as :mod:`csrc_triton.blockwise` (see there for the formulas); it stores S, so its
memory grows with N x M.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import positives
from ._numerics import acc_dtype, finite_or_zero
from ._alloc import empty


def _logits(q: Tensor, k: Tensor, scale: Tensor, exclude_diagonal: bool) -> Tensor:
    acc = acc_dtype(q)
    s = (q.to(acc) * scale.to(acc)) @ k.to(acc).T
    if exclude_diagonal:
        s.fill_diagonal_(float("-inf"))
    return s


def lse_forward(
    q: Tensor, k: Tensor, scale: Tensor, exclude_diagonal: bool, compute_col: bool
) -> tuple[Tensor, Tensor]:
    s = _logits(q, k, scale, exclude_diagonal)
    row_lse = empty(q.shape[0], dtype=s.dtype, device=q.device)
    row_lse.copy_(torch.logsumexp(s, dim=1))
    col_lse = empty(k.shape[0] if compute_col else 0, dtype=s.dtype, device=q.device)
    if compute_col:
        col_lse.copy_(torch.logsumexp(s, dim=0))
    return row_lse, col_lse


def lse_backward(
    grad_row: Tensor,
    grad_col: Tensor,
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    row_lse: Tensor,
    col_lse: Tensor,
    exclude_diagonal: bool,
    *,
    grad_positive: Tensor | None = None,
    positive_offset: int = -1,
    labels: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    s = _logits(q, k, scale, exclude_diagonal)
    acc = s.dtype
    # G_ij = g_i exp(S_ij - r_i) + h_j exp(S_ij - c_j)
    g = torch.exp(s - finite_or_zero(row_lse.to(acc))[:, None]) * grad_row.to(acc)[:, None]
    if grad_col.numel():
        g = g + torch.exp(s - finite_or_zero(col_lse.to(acc))[None, :]) * grad_col.to(acc)[None, :]
    qa, ka = q.to(acc), k.to(acc)
    g_k = g @ ka  # dQ / scale
    g_t_q = g.T @ qa  # dK / scale
    if grad_positive is not None:
        positives.add_grad(g_k, g_t_q, qa, ka, grad_positive, exclude_diagonal, positive_offset, labels)
    dq = empty(*q.shape, dtype=q.dtype, device=q.device)
    dk = empty(*k.shape, dtype=k.dtype, device=k.device)
    dq.copy_(scale.to(acc) * g_k)
    dk.copy_(scale.to(acc) * g_t_q)
    # dscale = sum_ij G_ij q_i.k_j = sum_i q_i . (G K)_i
    dscale = empty(dtype=acc, device=q.device)
    dscale.copy_((g_k * qa).sum())
    return dq, dk, dscale
