"""Blockwise backend: the kernels' tiling in plain PyTorch, for CPUs (and any device).

Notation: q (N, D), k (M, D), s the scale, S = s q k^T (never stored whole). Rows of S are
processed ``block_rows`` at a time, so the workspace is O(block_rows x M), never N x M.

Forward, one pass over the row blocks:
    r_i = log sum_j exp(S_ij)                 (exact per block: a block holds whole rows)
    c_j = log sum_i exp(S_ij)                 (running (max, sum) per column, merged exactly:
                                               m' = max(m, m_b), l' = l e^(m - m') + l_b e^(m_b - m'))
Backward, recomputing each block of S from q, k and the saved r, c:
    G_ij = g_i exp(S_ij - r_i) + h_j exp(S_ij - c_j)
    dq = s G k,   dk = s G^T q,   ds = sum_ij G_ij (q_i . k_j) = sum_i q_i . (G k)_i
Three GEMMs of 2NMD flops each in the backward, one in the forward: 8NMD for a symmetric loss.
Accumulation is float32 (float64 for float64 inputs) whatever the input dtype.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import positives
from ._numerics import acc_dtype, finite_or_zero
from ._alloc import empty

#: Elements of one (block_rows x M) float32 buffer. Two such buffers are live at a time, so the
#: workspace is about 2 x 4 x WORKSPACE_ELEMENTS bytes (64 MiB) at most, whatever N and M are.
WORKSPACE_ELEMENTS = 1 << 23
#: When set (an int), overrides the block height (tests use it to exercise many blocks).
BLOCK_ROWS: int | None = None


def block_rows_for(n: int, m: int) -> int:
    if BLOCK_ROWS is not None:
        return max(1, min(n, int(BLOCK_ROWS)))
    # As tall as the workspace allows (GEMM efficiency grows with the block height), but no
    # taller than 2048 rows: beyond that a block no longer gains speed and only costs memory.
    return max(1, min(n, 2048, WORKSPACE_ELEMENTS // max(m, 1)))


def _fold_grad(shift: Tensor, grad: Tensor) -> tuple[Tensor, Tensor | None]:
    """g exp(S - r) = exp(S - (r - log g)) when g >= 0 (the usual case: a mean of the losses).

    Folding log g into the shift saves one full pass over each (rows x M) block; g = 0 gives
    a shift of +inf and exp(-inf) = 0. Otherwise (negative or NaN upstream gradients) the
    multiply stays, and the returned grad is not None.
    """
    if bool((grad >= 0).all()):
        return shift - grad.log(), None
    return shift, grad


#: exp(x) for x below this is subnormal in float32, and this CPU's exp is 10-30x slower there
#: (a trained CLIP scale of 100 puts most logits of a row that far below its max). Clamping
#: the shifted logits at the floor changes a sum whose largest term is 1 by at most
#: M * 1.6e-38; rows or columns with nothing allowed keep their -inf explicitly.
EXP_FLOOR = {torch.float32: -87.0}


def _exp_(x: Tensor) -> Tensor:
    floor = EXP_FLOOR.get(x.dtype)
    if floor is not None:
        x.clamp_min_(floor)
    return x.exp_()


def _block_logits(qs_blk: Tensor, ka: Tensor, out: Tensor, start: int, exclude_diagonal: bool) -> Tensor:
    torch.mm(qs_blk, ka.T, out=out)
    if exclude_diagonal:
        # entries (i, start + i) of this block, for the rows whose diagonal lies inside k
        n_diag = max(0, min(out.shape[0], ka.shape[0] - start))
        if n_diag:
            out.diagonal(offset=start)[:n_diag] = float("-inf")
    return out


def lse_forward(
    q: Tensor, k: Tensor, scale: Tensor, exclude_diagonal: bool, compute_col: bool
) -> tuple[Tensor, Tensor]:
    n, m = q.shape[0], k.shape[0]
    acc = acc_dtype(q)
    qa, ka = q.to(acc), k.to(acc)
    s_acc = scale.to(acc)
    rows = block_rows_for(n, m)
    logits_buf = torch.empty(rows, m, dtype=acc, device=q.device)
    exp_buf = torch.empty(rows, m, dtype=acc, device=q.device)

    row_lse = empty(n, dtype=acc, device=q.device)
    col_max = torch.full((m,), -math.inf, dtype=acc, device=q.device) if compute_col else None
    col_sum = torch.zeros(m, dtype=acc, device=q.device) if compute_col else None

    for start in range(0, n, rows):
        stop = min(n, start + rows)
        # the scale is folded into a (rows x D) slice of q: no scaled copy of q is kept
        s = _block_logits(qa[start:stop] * s_acc, ka, logits_buf[: stop - start], start, exclude_diagonal)
        e = exp_buf[: stop - start]

        row_max = s.amax(dim=1)
        row_shift = finite_or_zero(row_max)
        torch.sub(s, row_shift[:, None], out=e)
        lse = row_shift + _exp_(e).sum(dim=1).log()
        row_lse[start:stop] = torch.where(row_max == -math.inf, row_max, lse)

        if compute_col:
            new_max = torch.maximum(col_max, s.amax(dim=0))
            shift = finite_or_zero(new_max)
            torch.sub(s, shift[None, :], out=e)
            col_sum.mul_(torch.exp(col_max - shift)).add_(_exp_(e).sum(dim=0))
            col_max = new_max

    col_lse = empty(m if compute_col else 0, dtype=acc, device=q.device)
    if compute_col:
        col_lse.copy_(torch.where(col_max == -math.inf, col_max, finite_or_zero(col_max) + col_sum.log()))
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
    n, m = q.shape[0], k.shape[0]
    acc = acc_dtype(q)
    s_acc = scale.to(acc)
    qa, ka = q.to(acc), k.to(acc)
    has_col = grad_col.numel() > 0
    row_shift, g_row = _fold_grad(finite_or_zero(row_lse.to(acc)), grad_row.to(acc))
    if has_col:
        col_shift, g_col = _fold_grad(finite_or_zero(col_lse.to(acc)), grad_col.to(acc))

    rows = block_rows_for(n, m)
    logits_buf = torch.empty(rows, m, dtype=acc, device=q.device)
    grad_buf = torch.empty(rows, m, dtype=acc, device=q.device)

    # accumulators in the accumulation dtype; for float32 inputs they are the outputs themselves
    dq_acc = empty(*q.shape, dtype=acc, device=q.device)
    dk_acc = torch.zeros(k.shape, dtype=acc, device=k.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        s = _block_logits(qa[start:stop] * s_acc, ka, logits_buf[: stop - start], start, exclude_diagonal)
        g = grad_buf[: stop - start]
        # G = g_i exp(S - r_i) [+ h_j exp(S - c_j)]; excluded entries have S = -inf, so G = 0
        # there (or the float32 floor e^-87 ~ 1.6e-38, which no float32 sum can see)
        _exp_(torch.sub(s, row_shift[start:stop, None], out=g))
        if g_row is not None:
            g.mul_(g_row[start:stop, None])
        if has_col:
            _exp_(s.sub_(col_shift[None, :]))
            if g_col is not None:
                s.mul_(g_col[None, :])
            g.add_(s)
        torch.mm(g, ka, out=dq_acc[start:stop])  # (G k)_i, scaled below
        dk_acc.addmm_(g.T, qa[start:stop])

    if grad_positive is not None:
        positives.add_grad(dq_acc, dk_acc, qa, ka, grad_positive, exclude_diagonal, positive_offset, labels)
    dscale = empty(dtype=acc, device=q.device)
    dscale.copy_((dq_acc * qa).sum())  # sum_i q_i . (G k)_i
    dq_acc.mul_(s_acc)
    dk_acc.mul_(s_acc)
    if q.dtype == acc and k.dtype == acc:
        return dq_acc, dk_acc, dscale
    dq = empty(*q.shape, dtype=q.dtype, device=q.device)
    dk = empty(*k.shape, dtype=k.dtype, device=k.device)
    return dq.copy_(dq_acc), dk.copy_(dk_acc), dscale
