"""Blockwise backend: the kernels' tiling in plain PyTorch, for CPUs (and any device).

Implements :class:`csrc_triton.backend.LseBackend` (the formulas are there). Z = s q k^T + b is
processed in tiles of at most 2048 rows by as many columns as the workspace allows (all of them
when M is small), so the workspace is bounded whatever N and M are (10^6 keys included):

Forward, one pass over the tiles:
    r_i = log sum_j exp(Z_ij), c_j = log sum_i exp(Z_ij): running (max, sum) pairs per row
          (across the column tiles of a row block) and per column (across row blocks), merged
          exactly: m' = max(m, m_t), l' = l e^(m - m') + l_t e^(m_t - m')
    positives: gathered from each tile through a per-row list of positive columns (an index,
          or the columns sharing the row's label, found by sorting the labels once), so the
          positive sum and log-sum-exp cost O(rows x K), not O(rows x M); only when some label
          has too many members for lists is a (rows x cols) label mask used.
The column bias rides in the GEMM: [s q_i, 1] . [k_j, b_j] = Z_ij, so it costs no pass over the
tile, and in the backward the same augmented product gives dbias = G^T 1 as dK's last column.
Backward, recomputing each tile of Z from q, k and the saved statistics:
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
from .positives import class_ranges, class_slots

#: Elements of the (rows x cols) tile buffers, all together. With the two buffers of the usual
#: case that is 2 x 4 x 2^23 bytes (64 MiB) at most, whatever N and M are.
WORKSPACE_ELEMENTS = 1 << 24
#: Rows of a tile: GEMM efficiency grows with the height up to about this, then only memory.
MAX_TILE_ROWS = 2048
#: Tests force small tiles through ``csrc_triton._testing.blockwise_rows``: (rows, cols or None).
_tile_override: tuple[int, int | None] | None = None


def tile_shape(n: int, m: int, buffers: int = 2) -> tuple[int, int]:
    """(rows, cols) of a tile: as tall as allowed, then as wide as the workspace allows."""
    if _tile_override is not None:
        rows, cols = _tile_override
        return max(1, min(n, rows)), max(1, min(m, cols if cols is not None else m))
    rows = max(1, min(n, MAX_TILE_ROWS))
    cols = max(1, min(m, WORKSPACE_ELEMENTS // (buffers * rows)))
    return rows, cols


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
    if positive_index is not None:
        cols = positive_index.to(torch.int64)[:, None]
        valid = (cols >= 0) & (cols < m)
        if self_offset is not None:
            valid = valid & (cols != torch.arange(n, device=device)[:, None] + self_offset)
        return torch.where(valid, cols, 0), valid
    ranges = class_ranges(row_labels, col_labels, self_offset)
    k_max = int(ranges.count.max()) if n else 0
    if k_max > MAX_LISTED_POSITIVES or n * k_max > LIST_ELEMENTS:
        return None
    pos, _, positive = class_slots(ranges, k_max)
    return torch.where(positive, ranges.perm[pos], 0), positive


class _Tiles:
    """What every tile needs: the scaled (and bias-augmented) query rows, the logits, and the
    positives (listed columns, or a label mask)."""

    def __init__(self, q: Tensor, k: Tensor, scale: Tensor, col_bias: Tensor | None, self_offset: int | None,
                 positive_index: Tensor | None, row_labels: Tensor | None, col_labels: Tensor | None,
                 with_positives: bool) -> None:
        self.acc = acc_dtype(q)
        self.qa, self.ka = q.to(self.acc), k.to(self.acc)
        self.scale = scale.to(self.acc)
        self.has_bias = col_bias is not None
        # keys augmented with the bias column: [k_j, b_j]
        self.keys = torch.cat([self.ka, col_bias.to(self.acc)[:, None]], dim=1) if self.has_bias else self.ka
        self.self_offset = self_offset
        self.n, self.m = q.shape[0], k.shape[0]
        self.listed = None
        self.labels = None
        if with_positives and (positive_index is not None or row_labels is not None):
            self.listed = positive_columns(self.n, self.m, positive_index, row_labels, col_labels, self_offset,
                                           q.device)
            if self.listed is None:
                self.labels = (row_labels, col_labels)
        buffers = 3 if self.labels is not None else 2
        self.rows, self.cols = tile_shape(self.n, self.m, buffers)
        self.buffers = [torch.empty(self.rows, self.cols, dtype=self.acc, device=q.device) for _ in range(buffers)]
        self.mask_buf = (torch.empty(self.rows, self.cols, dtype=torch.bool, device=q.device)
                         if self.labels is not None else None)

    def row_blocks(self):
        for start in range(0, self.n, self.rows):
            yield start, min(self.n, start + self.rows)

    def col_blocks(self):
        for start in range(0, self.m, self.cols):
            yield start, min(self.m, start + self.cols)

    def queries(self, r0: int, r1: int, scaled: bool = True) -> Tensor:
        """s q_i (or q_i) for rows [r0, r1), with a column of ones when there is a bias."""
        qs = self.qa[r0:r1] * self.scale if scaled else self.qa[r0:r1]
        return torch.cat([qs, qs.new_ones(r1 - r0, 1)], dim=1) if self.has_bias else qs

    def buffer(self, i: int, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        return self.buffers[i][: r1 - r0, : c1 - c0]

    def logits(self, qs: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Z for the tile into the first buffer; excluded entries -inf."""
        z = torch.mm(qs, self.keys[c0:c1].T, out=self.buffer(0, r0, r1, c0, c1))
        if self.self_offset is not None:
            z.diagonal(offset=r0 + self.self_offset - c0).fill_(-math.inf)
        return z

    def label_mask(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """[j in P(i)] for the tile (mask mode), excluded entries False."""
        row_labels, col_labels = self.labels
        mask = torch.eq(row_labels[r0:r1, None], col_labels[None, c0:c1], out=self.mask_buf[: r1 - r0, : c1 - c0])
        if self.self_offset is not None:
            mask.diagonal(offset=r0 + self.self_offset - c0).fill_(False)
        return mask

    def listed_in(self, r0: int, r1: int, c0: int, c1: int) -> tuple[Tensor, Tensor, Tensor]:
        """The listed positives of rows [r0, r1) that fall in columns [c0, c1): (column within
        the tile, clamped; in this tile; the (rows, K) slot index is implicit)."""
        cols, valid = self.listed
        cols, valid = cols[r0:r1], valid[r0:r1]
        here = valid & (cols >= c0) & (cols < c1)
        return torch.where(here, cols - c0, 0), here, valid


def _merge(m: Tensor, s: Tensor, m_t: Tensor, s_t: Tensor) -> tuple[Tensor, Tensor]:
    """(max, sum exp(x - max)) pairs merged exactly; (-inf, 0) is the identity."""
    new = torch.maximum(m, m_t)
    shift = finite_or_zero(new)
    return new, s * torch.exp(m - shift) + s_t * torch.exp(m_t - shift)


def _finish(m: Tensor, s: Tensor) -> Tensor:
    return torch.where(m == -math.inf, m, finite_or_zero(m) + s.log())


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
    wants_pos = positive_sum or positive_lse
    t = _Tiles(q, k, scale, col_bias, self_offset, positive_index, row_labels, col_labels, with_positives=wants_pos)
    n, m, acc, device = t.n, t.m, t.acc, q.device

    row_lse = empty(n, dtype=acc, device=device)
    pos_sum = empty(n if positive_sum else 0, dtype=acc, device=device)
    pos_lse = empty(n if positive_lse else 0, dtype=acc, device=device)
    if wants_pos and t.listed is None and t.labels is None:  # no positives at all
        pos_sum.fill_(0.0)
        pos_lse.fill_(-math.inf)
    col_max = torch.full((m,), -math.inf, dtype=acc, device=device) if compute_col else None
    col_sum = torch.zeros(m, dtype=acc, device=device) if compute_col else None

    for r0, r1 in t.row_blocks():
        qs = t.queries(r0, r1)
        rows = r1 - r0
        r_max = torch.full((rows,), -math.inf, dtype=acc, device=device)
        r_sum = torch.zeros(rows, dtype=acc, device=device)
        if t.listed is not None:  # the positives' logits, collected tile by tile
            picked = torch.zeros(t.listed[0][r0:r1].shape, dtype=acc, device=device)
        elif t.labels is not None:
            p_total = torch.zeros(rows, dtype=acc, device=device)
            p_max = torch.full((rows,), -math.inf, dtype=acc, device=device)
            p_sum = torch.zeros(rows, dtype=acc, device=device)
        for c0, c1 in t.col_blocks():
            z = t.logits(qs, r0, r1, c0, c1)
            e = t.buffer(1, r0, r1, c0, c1)
            if t.listed is not None:
                local, here, _ = t.listed_in(r0, r1, c0, c1)
                picked = torch.where(here, z.gather(1, local), picked)
            elif t.labels is not None:
                mask = t.label_mask(r0, r1, c0, c1)
                if positive_sum:
                    p_total += torch.where(mask, z, z.new_zeros(()), out=e).sum(dim=1)
                if positive_lse:
                    torch.where(mask, z, z.new_full((), -math.inf), out=e)
                    top = e.amax(dim=1)
                    p_max, p_sum = _merge(p_max, p_sum, top, _exp_(e.sub_(finite_or_zero(top)[:, None])).sum(dim=1))

            top = z.amax(dim=1)
            shift = finite_or_zero(top)
            r_max, r_sum = _merge(r_max, r_sum, top, _exp_(torch.sub(z, shift[:, None], out=e)).sum(dim=1))

            if compute_col:
                c_max = col_max[c0:c1]
                new_max = torch.maximum(c_max, z.amax(dim=0))
                shift = finite_or_zero(new_max)
                torch.sub(z, shift[None, :], out=e)
                col_sum[c0:c1].mul_(torch.exp(c_max - shift)).add_(_exp_(e).sum(dim=0))
                col_max[c0:c1] = new_max
        row_lse[r0:r1] = _finish(r_max, r_sum)
        if t.listed is not None:
            valid = t.listed[1][r0:r1]
            if positive_sum:
                pos_sum[r0:r1] = torch.where(valid, picked, 0.0).sum(dim=1)
            if positive_lse:
                pos_lse[r0:r1] = torch.logsumexp(torch.where(valid, picked, -math.inf), dim=1)
        elif t.labels is not None:
            if positive_sum:
                pos_sum[r0:r1] = p_total
            if positive_lse:
                pos_lse[r0:r1] = _finish(p_max, p_sum)

    col_lse = empty(m if compute_col else 0, dtype=acc, device=device)
    if compute_col:
        col_lse.copy_(_finish(col_max, col_sum))
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
    wants_pos = grad_positive_sum is not None or grad_positive_lse is not None
    t = _Tiles(q, k, scale, col_bias, self_offset, positive_index, row_labels, col_labels, with_positives=wants_pos)
    m, d, acc, device, qa = t.m, q.shape[1], t.acc, q.device, t.qa

    row_shift, g_row, row_floor = _fold_grad(finite_or_zero(stats.row_lse.to(acc)), grad_row.to(acc))
    if grad_col is not None:
        col_shift, g_col, col_floor = _fold_grad(finite_or_zero(stats.col_lse.to(acc)), grad_col.to(acc))
    w = None if grad_positive_sum is None else grad_positive_sum.to(acc)
    u = None if grad_positive_lse is None else grad_positive_lse.to(acc)
    pos_shift = None if u is None else finite_or_zero(stats.positive_lse.to(acc))

    # G k for every row (dq before scaling; also gives ds). dK / s and db come from one product
    # G^T [q, 1] accumulated over tiles (its last column is db when there is a bias).
    gk = torch.zeros(q.shape, dtype=acc, device=device)
    dk_aug = torch.zeros(m, t.keys.shape[1], dtype=acc, device=device) if needs_dk else None
    db_from_dk = needs_dk and t.has_bias  # otherwise db is summed apart
    db_acc = torch.zeros(m, dtype=acc, device=device) if needs_dbias and not db_from_dk else None
    for r0, r1 in t.row_blocks():
        rows = slice(r0, r1)
        qs = t.queries(r0, r1)
        q_aug = t.queries(r0, r1, scaled=False) if needs_dk else None
        for c0, c1 in t.col_blocks():
            cols = slice(c0, c1)
            z = t.logits(qs, r0, r1, c0, c1)
            g = t.buffer(1, r0, r1, c0, c1)
            if t.listed is not None:  # read the positives' logits before z is overwritten
                local, here, _ = t.listed_in(r0, r1, c0, c1)
                term = torch.zeros(local.shape, dtype=acc, device=device)
                if w is not None:
                    term = term + w[rows, None]
                if u is not None:
                    term = term + u[rows, None] * torch.exp(z.gather(1, local) - pos_shift[rows, None])
                term = torch.where(here, term, 0.0)
            # excluded entries have Z = -inf, so G = 0 there (or the float32 floor, see EXP_FLOOR)
            _exp_(torch.sub(z, row_shift[rows, None], out=g), None if row_floor is None else row_floor[rows, None])
            if g_row is not None:
                g.mul_(g_row[rows, None])
            if t.labels is not None and wants_pos:
                # [j in P(i)] (w_i + u_i exp(Z_ij - pl_i)), before z is overwritten below
                p = t.buffer(2, r0, r1, c0, c1)
                mask = t.label_mask(r0, r1, c0, c1)
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
                _exp_(z.sub_(col_shift[None, cols]), None if col_floor is None else col_floor[None, cols])
                if g_col is not None:
                    z.mul_(g_col[None, cols])
                g.add_(z)
            if t.listed is not None:
                g.scatter_add_(1, local, term)
            gk[rows].addmm_(g, t.ka[cols])
            if needs_dk:
                dk_aug[cols].addmm_(g.T, q_aug)
            if db_acc is not None:
                db_acc[cols] += g.sum(dim=0)

    s = t.scale
    dscale = empty(dtype=acc, device=device).copy_((gk * qa).sum())  # sum_i q_i . (G k)_i
    dq = dk = dbias = None
    if needs_dq:
        dq = empty(*q.shape, dtype=q.dtype, device=device).copy_(gk.mul_(s))
    if needs_dk:
        dk = empty(*k.shape, dtype=k.dtype, device=device).copy_(dk_aug[:, :d].mul_(s))
    if needs_dbias:
        dbias = empty(m, dtype=acc, device=device).copy_(dk_aug[:, d] if db_from_dk else db_acc)
    return LseGrads(dq, dk, dscale, dbias)
