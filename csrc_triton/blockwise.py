"""Blockwise backend: the kernels' tiling in plain PyTorch, for CPUs (and any device).

Implements :class:`csrc_triton.backend.LseBackend` (the formulas are there). Rows of
Z = s q k^T + b are processed a block at a time, so the workspace is O(block_rows x M), never
N x M:

Forward, one pass over the row blocks:
    r_i = log sum_j exp(Z_ij)                 (exact per block: a block holds whole rows)
    c_j = log sum_i exp(Z_ij)                 (running (max, sum) per column, merged exactly:
                                               m' = max(m, m_b), l' = l e^(m - m') + l_b e^(m_b - m'))
    positives: gathered from the block through a per-row list of positive columns (an index, or
               the columns sharing the row's label, found by sorting the labels once), so the
               positive sum and log-sum-exp cost O(rows x K) per block, not O(rows x M); only
               when some label has too many members for lists is a (rows x M) mask used.
The column bias rides in the GEMM: [s q_i, 1] . [k_j, b_j] = Z_ij, so it costs no pass over the
block, and in the backward the same augmented product gives dbias = G^T 1 as dK's last column.
Backward, recomputing each block of Z from q, k and the saved statistics:
    G_ij = g_i exp(Z_ij - r_i) + h_j exp(Z_ij - c_j) + [j in P(i)] (w_i + u_i exp(Z_ij - pl_i))
    dq = s G k,   dk = s G^T q,   ds = sum_i q_i . (G k)_i,   db = sum_i G_ij
Three GEMMs of 2NMD flops each in the backward, one in the forward: 8NMD for a symmetric loss.
Accumulation is float32 (float64 for float64 inputs) whatever the input dtype.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._alloc import empty
from ._numerics import acc_dtype, finite_or_zero
from .backend import LseGrads, LseStats

#: Elements of the (block_rows x M) float32 buffers, all together. With the two buffers of the
#: usual case that is 2 x 4 x 2^23 bytes (64 MiB) at most, whatever N and M are.
WORKSPACE_ELEMENTS = 1 << 24
#: Tests shrink the block height through ``csrc_triton._testing.blockwise_rows``.
_block_rows_override: int | None = None


def block_rows_for(n: int, m: int, buffers: int = 2) -> int:
    if _block_rows_override is not None:
        return max(1, min(n, _block_rows_override))
    # As tall as the workspace allows (GEMM efficiency grows with the block height), but no
    # taller than 2048 rows: beyond that a block no longer gains speed and only costs memory.
    return max(1, min(n, 2048, WORKSPACE_ELEMENTS // (buffers * max(m, 1))))


#: exp(x) for x below e^-87 is subnormal in float32, and on CPUs both this exp and every GEMM
#: product with such values are 10-100x slower (a trained CLIP scale of 100, or NCA on raw
#: squared distances, puts most logits of a row that far below its max). So float32 arguments
#: (already shifted by the row's or column's log-sum-exp) are clamped at -64 before exp(): a
#: term below e^-64 = 1.6e-28 of the largest is raised to it, which changes a sum of M terms
#: by at most M * 1.6e-28 relative (7e-19 for M = 2^32), and keeps every G value times a key
#: entry above 1e-10 in the normal range for the GEMMs. Rows or columns with nothing allowed
#: keep their -inf explicitly.
EXP_FLOOR = {torch.float32: -64.0}


def _fold_grad(shift: Tensor, grad: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """g exp(Z - r) = exp(Z - (r - log g)) when g >= 0 (the usual case: a mean of the losses).

    Folding log g into the shift saves one full pass over each (rows x M) block; g = 0 gives
    a shift of +inf and exp(-inf) = 0. Otherwise (negative or NaN upstream gradients) the
    multiply stays, and the returned grad is not None. The third value is the floor of the
    shifted argument (the floor of exp(Z - r) moved by log g), or None for the default.
    """
    if bool((grad >= 0).all()):
        floor = EXP_FLOOR.get(shift.dtype)
        log_g = grad.log()
        return shift - log_g, None, (None if floor is None else floor + log_g)
    return shift, grad, None


def _exp_(x: Tensor, floor: Tensor | None = None) -> Tensor:
    """exp(x) in place, x clamped at the float32 floor (or at ``floor``, broadcast)."""
    if floor is not None:
        torch.clamp_min_(x, floor)
    elif x.dtype in EXP_FLOOR:
        x.clamp_min_(EXP_FLOOR[x.dtype])
    return x.exp_()


def _lse_of(e: Tensor, shift: Tensor, top: Tensor) -> Tensor:
    """shift + log sum exp(e) (e already shifted, exponentiated in place), -inf where top is -inf."""
    return torch.where(top == -math.inf, top, shift + e.sum(dim=1).log())


#: Labels-mode positives are listed per row (column indices) when no row has more than this
#: many and the lists stay within LIST_ELEMENTS; otherwise a (rows x M) mask is built per block.
MAX_LISTED_POSITIVES = 1024
LIST_ELEMENTS = 1 << 23


def positive_columns(
    n: int, m: int, positive_index: Tensor | None, row_labels: Tensor | None, col_labels: Tensor | None,
    self_offset: int | None, device: torch.device,
) -> tuple[Tensor, Tensor] | None:
    """P(i) as (N, K) column indices (clamped to valid indices) and an (N, K) validity mask, or
    None when the labels' classes are too large to list (mask mode).

    Labels: the keys sorted by label once; row i's positives are the run of its label in that
    order (binary search). K, the largest run, is read on the host: one synchronisation per call
    on a GPU (the Triton backend, not this one, is the GPU path).
    """
    rows = torch.arange(n, device=device)
    if positive_index is not None:
        cols = positive_index.to(torch.int64)[:, None]
        valid = (cols >= 0) & (cols < m)
    else:
        order = torch.argsort(col_labels, stable=True)
        ordered = col_labels[order]
        first = torch.searchsorted(ordered, row_labels)
        count = torch.searchsorted(ordered, row_labels, right=True) - first
        k_max = int(count.max()) if n else 0
        if k_max > MAX_LISTED_POSITIVES or n * k_max > LIST_ELEMENTS:
            return None
        t = torch.arange(k_max, device=device)
        valid = t[None, :] < count[:, None]
        cols = order[(first[:, None] + t[None, :]).clamp(max=max(m - 1, 0))] if m else first[:, None] + t[None, :]
    if self_offset is not None:
        valid = valid & (cols != rows[:, None] + self_offset)
    return torch.where(valid, cols, 0), valid


class _Blocks:
    """What every block of rows needs: the scaled (and bias-augmented) query rows, the logits,
    and the positives (listed columns, or a label mask)."""

    def __init__(self, q: Tensor, k: Tensor, scale: Tensor, col_bias: Tensor | None, self_offset: int | None,
                 positive_index: Tensor | None, row_labels: Tensor | None, col_labels: Tensor | None,
                 with_positives: bool, buffers: int) -> None:
        self.acc = acc_dtype(q)
        self.qa, self.ka = q.to(self.acc), k.to(self.acc)
        self.scale = scale.to(self.acc)
        self.has_bias = col_bias is not None
        # keys augmented with the bias column: [k_j, b_j]
        self.keys = torch.cat([self.ka, col_bias.to(self.acc)[:, None]], dim=1) if self.has_bias else self.ka
        self.self_offset = self_offset
        n, m = q.shape[0], k.shape[0]
        self.listed = None
        self.labels = None
        if with_positives and (positive_index is not None or row_labels is not None):
            self.listed = positive_columns(n, m, positive_index, row_labels, col_labels, self_offset, q.device)
            if self.listed is None:
                self.labels = (row_labels, col_labels)
        self.rows = block_rows_for(n, m, buffers)
        self.buffers = [torch.empty(self.rows, m, dtype=self.acc, device=q.device) for _ in range(buffers)]
        self.mask_buf = torch.empty(self.rows, m, dtype=torch.bool, device=q.device) if self.labels else None

    def ranges(self, n: int):
        for start in range(0, n, self.rows):
            yield start, min(n, start + self.rows)

    def queries(self, start: int, stop: int) -> Tensor:
        """s q_i for rows [start, stop), with a column of ones when there is a bias."""
        qs = self.qa[start:stop] * self.scale
        return torch.cat([qs, qs.new_ones(stop - start, 1)], dim=1) if self.has_bias else qs

    def logits(self, start: int, stop: int, qs: Tensor) -> Tensor:
        """Z for rows [start, stop) into the first buffer; excluded entries -inf."""
        z = torch.mm(qs, self.keys.T, out=self.buffers[0][: stop - start])
        if self.self_offset is not None:
            z.diagonal(offset=start + self.self_offset).fill_(-math.inf)
        return z

    def label_mask(self, start: int, stop: int) -> Tensor:
        """[j in P(i)] for rows [start, stop) (mask mode), excluded entries False."""
        row_labels, col_labels = self.labels
        mask = torch.eq(row_labels[start:stop, None], col_labels[None, :], out=self.mask_buf[: stop - start])
        if self.self_offset is not None:
            mask.diagonal(offset=start + self.self_offset).fill_(False)
        return mask

    def listed_of(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        cols, valid = self.listed
        return cols[start:stop], valid[start:stop]


def _masked_lse(x: Tensor, keep: Tensor) -> Tensor:
    return torch.logsumexp(torch.where(keep, x, -math.inf), dim=1)


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
    wants_pos = positive_sum or positive_lse
    blocks = _Blocks(q, k, scale, col_bias, self_offset, positive_index, row_labels, col_labels,
                     with_positives=wants_pos, buffers=2)
    acc, device = blocks.acc, q.device

    row_lse = empty(n, dtype=acc, device=device)
    pos_sum = empty(n if positive_sum else 0, dtype=acc, device=device)
    pos_lse = empty(n if positive_lse else 0, dtype=acc, device=device)
    if wants_pos and blocks.listed is None and blocks.labels is None:  # no positives at all
        pos_sum.fill_(0.0)
        pos_lse.fill_(-math.inf)
    col_max = torch.full((m,), -math.inf, dtype=acc, device=device) if compute_col else None
    col_sum = torch.zeros(m, dtype=acc, device=device) if compute_col else None

    for start, stop in blocks.ranges(n):
        z = blocks.logits(start, stop, blocks.queries(start, stop))
        e = blocks.buffers[1][: stop - start]
        if blocks.listed is not None:
            cols, valid = blocks.listed_of(start, stop)
            picked = z.gather(1, cols)
            if positive_sum:
                pos_sum[start:stop] = torch.where(valid, picked, 0.0).sum(dim=1)
            if positive_lse:
                pos_lse[start:stop] = _masked_lse(picked, valid)
        elif blocks.labels is not None:
            mask = blocks.label_mask(start, stop)
            if positive_sum:
                pos_sum[start:stop] = torch.where(mask, z, z.new_zeros(()), out=e).sum(dim=1)
            if positive_lse:
                torch.where(mask, z, z.new_full((), -math.inf), out=e)
                top = e.amax(dim=1)
                shift = finite_or_zero(top)
                pos_lse[start:stop] = _lse_of(_exp_(e.sub_(shift[:, None])), shift, top)

        row_max = z.amax(dim=1)
        row_shift = finite_or_zero(row_max)
        torch.sub(z, row_shift[:, None], out=e)
        row_lse[start:stop] = _lse_of(_exp_(e), row_shift, row_max)

        if compute_col:
            new_max = torch.maximum(col_max, z.amax(dim=0))
            shift = finite_or_zero(new_max)
            torch.sub(z, shift[None, :], out=e)
            col_sum.mul_(torch.exp(col_max - shift)).add_(_exp_(e).sum(dim=0))
            col_max = new_max

    col_lse = empty(m if compute_col else 0, dtype=acc, device=device)
    if compute_col:
        col_lse.copy_(torch.where(col_max == -math.inf, col_max, finite_or_zero(col_max) + col_sum.log()))
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
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    wants_pos = grad_positive_sum is not None or grad_positive_lse is not None
    blocks = _Blocks(q, k, scale, col_bias, self_offset, positive_index, row_labels, col_labels,
                     with_positives=wants_pos, buffers=2)
    if blocks.labels is not None:  # mask mode needs a third block buffer
        blocks = _Blocks(q, k, scale, col_bias, self_offset, positive_index, row_labels, col_labels,
                         with_positives=True, buffers=3)
    acc, device, qa, ka = blocks.acc, q.device, blocks.qa, blocks.ka

    row_shift, g_row, row_floor = _fold_grad(finite_or_zero(stats.row_lse.to(acc)), grad_row.to(acc))
    if grad_col is not None:
        col_shift, g_col, col_floor = _fold_grad(finite_or_zero(stats.col_lse.to(acc)), grad_col.to(acc))
    w = None if grad_positive_sum is None else grad_positive_sum.to(acc)
    u = None if grad_positive_lse is None else grad_positive_lse.to(acc)
    pos_shift = None if u is None else finite_or_zero(stats.positive_lse.to(acc))

    # G k for every row (dq before scaling; also gives ds). dK and db come from one product
    # G^T [s q, 1] accumulated over blocks (its last column is db when there is a bias).
    gk = empty(*q.shape, dtype=acc, device=device)
    dk_aug = torch.zeros(m, blocks.keys.shape[1], dtype=acc, device=device) if needs_dk else None
    # without a bias column (or without dK) db is summed apart
    db_from_dk = needs_dk and blocks.has_bias
    db_acc = torch.zeros(m, dtype=acc, device=device) if needs_dbias and not db_from_dk else None
    for start, stop in blocks.ranges(n):
        rows = slice(start, stop)
        qs = blocks.queries(start, stop)
        z = blocks.logits(start, stop, qs)
        g = blocks.buffers[1][: stop - start]
        if blocks.listed is not None:  # read the positives' logits before z is overwritten
            cols, valid = blocks.listed_of(start, stop)
            term = torch.zeros(cols.shape, dtype=acc, device=device)
            if w is not None:
                term = term + w[rows, None]
            if u is not None:
                term = term + u[rows, None] * torch.exp(z.gather(1, cols) - pos_shift[rows, None])
            term = torch.where(valid, term, 0.0)
        # excluded entries have Z = -inf, so G = 0 there (or the float32 floor, see EXP_FLOOR)
        _exp_(torch.sub(z, row_shift[rows, None], out=g), None if row_floor is None else row_floor[rows, None])
        if g_row is not None:
            g.mul_(g_row[rows, None])
        if blocks.labels is not None and wants_pos:
            # [j in P(i)] (w_i + u_i exp(Z_ij - pl_i)), before z is overwritten below
            p = blocks.buffers[2][: stop - start]
            mask = blocks.label_mask(start, stop)
            if u is not None:
                # exp(Z - pl) only on the positives: elsewhere Z may exceed pl by far (overflow)
                torch.where(mask, torch.sub(z, pos_shift[rows, None], out=p), p.new_full((), -math.inf), out=p)
                _exp_(p).mul_(u[rows, None])
                if w is not None:
                    p.add_(w[rows, None])
            else:
                p.copy_(w[rows, None].expand_as(p))
            g.add_(p.mul_(mask))
        if grad_col is not None:
            _exp_(z.sub_(col_shift[None, :]), None if col_floor is None else col_floor[None, :])
            if g_col is not None:
                z.mul_(g_col[None, :])
            g.add_(z)
        if blocks.listed is not None:
            g.scatter_add_(1, cols, term)
        torch.mm(g, ka, out=gk[rows])
        if needs_dk:
            dk_aug.addmm_(g.T, qs)
        if db_acc is not None:
            db_acc.add_(g.sum(dim=0))

    s = blocks.scale
    dscale = empty(dtype=acc, device=device).copy_((gk * qa).sum())  # sum_i q_i . (G k)_i
    dq = dk = dbias = None
    if needs_dq:
        dq = gk.mul_(s) if q.dtype == acc else empty(*q.shape, dtype=q.dtype, device=device).copy_(gk.mul_(s))
    if needs_dk:
        dk = empty(*k.shape, dtype=k.dtype, device=device).copy_(dk_aug[:, :d])
    if needs_dbias:
        dbias = empty(m, dtype=acc, device=device).copy_(dk_aug[:, d] if db_from_dk else db_acc)
    return LseGrads(dq, dk, dscale, dbias)
