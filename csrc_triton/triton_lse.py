"""Triton backend of the log-sum-exp engine (the :class:`csrc_triton.backend.LseBackend` contract).

Notation (the contract's, see :mod:`csrc_triton.backend`): q (N, D), k (M, D), s = scale,
b = col_bias (M,), Z_ij = s q_i . k_j + b_j (never stored), allowed(i, j) = j != i + self_offset,
positives P(i) by ``positive_index`` or by ``row_labels``/``col_labels``. Statistics and
gradients accumulate in fp32; the kernels work in base 2, X = Z log2(e) (log2(e) folded into the
scale and the bias), and convert back at the end: lse = ln(2) (m + log2(l)).

Forward (:func:`lse_forward`), one pass over the tiles of Z, grid (row groups, column splits):
a program owns a rectangle of tiles, ``row_blocks_per_group`` row blocks of BLOCK_M rows by
``col_blocks_per_split`` column blocks of BLOCK_N keys. For each of its row blocks it walks its
column blocks keeping the row statistics (m_i, l_i) = (running max, sum 2^(X_ij - m_i)) online in
registers, and writes them once per row block to a (splits, N) workspace. Column statistics of
each tile are merged into the program's own slot of a (groups, M) workspace (read, merge, write:
no other program touches that slot, so no atomics, and the merge order is fixed: deterministic).
Two small kernels merge the partials in a fixed order and write lse = ln2 (m + log2 l).
Merging (m1, l1) with (m2, l2) is exact whatever the scale (no fixed shift, which would not be
safe for a learnable scale): m = max(m1, m2), l = l1 2^(m1 - m) + l2 2^(m2 - m).
Workspaces: 8 (g_c N + g_r M) bytes with g_r g_c ~ min_programs and g_r ~ sqrt(P N / M), i.e.
about 16 sqrt(P N M) bytes (P = 264: ~1.1 GB at N = M = 4,194,304; 17 MB at N = M = 65,536).

Positives in the forward:
  * labels: positive_sum and the masked online (max, sum) of positive_lse are accumulated in the
    same tile pass (positive_lse with its own shift: one more exponential per logit);
  * ``positive_index``: a fused row-dot kernel (O(N D), no copies of q or k) gives
    Z_{i, p_i}, which is both positive_sum_i and positive_lse_i.

Exponentials (special-function unit: ~3.9e12/s on an H100 vs 989 TFLOP/s of bf16 GEMM, so a
symmetric forward at D = 128 with two exponentials per logit is exp-bound; docs/kernels.md has
the arithmetic per D):
  * row statistics alone: one exp per logit, shifted by the running row max (FlashAttention-2);
  * row + column statistics: one exp per logit, E_ij = 2^(X_ij - t) with t the tile max, when
    every row max and every column max of the tile is within SHIFT_RANGE = 64 of t (in base 2;
    44.4 in natural units); then sum_j E_ij and sum_i E_ij are rescaled per row / per column
    (BLOCK_M + BLOCK_N exponentials per tile). Otherwise two exps per logit (row shift and
    column shift). Proof that the single shift is exact to fp32 precision:
      ex2.approx.ftz flushes results below 2^-126 to 0; any other result is normal and has the
      same relative accuracy as with per-row shifts. A flushed term has
      2^(X_ij - rowmax_i) = 2^(X_ij - t) 2^(t - rowmax_i) < 2^-126 2^64 = 2^-62, i.e. it is below
      2^-62 times the largest term of row i, hence below 2^-62 of row i's total; a row has at
      most M such terms, so the mass lost is below M 2^-62 of the total: below 2^-30 for
      M <= 2^32, under fp32 resolution (2^-24). Same for columns with N. The argument X - t is
      rounded once, by at most half an ulp of 2 max|X|: the size of the rounding already in X.
    Both schemes are tested against float64 (tests/test_triton_lse.py forces the second).
  * backward: one exp per term and logit: g exp(Z - r), h exp(Z - c) (symmetric), u exp(Z -
    positive_lse) (labels); ``positive_index`` positives take one exp per row. The backward does
    three tile products per tile (recompute, dq, dk), so at D >= 128 it is GEMM-bound even with
    two exponentials per logit; the single-shift form of G costs about 25 registers per
    thread, which made the 64 x 64 x 128 backward tiles spill (static_check), so it is not used.
Backward (:func:`lse_backward`) recomputes each tile of Z from q, k (FlashAttention-2 style):
    G_ij = [allowed] (g_i exp(Z_ij - r_i) + h_j exp(Z_ij - c_j))
         + [j in P(i)] (w_i + u_i exp(Z_ij - positive_lse_i))
    dq = s G k,   dk = s G^T q,   dscale = sum_ij G_ij (q_i . k_j),   dbias_j = sum_i G_ij.
Kernels (n_do = ceil(D / BLOCK_DO), a multiply-add counts 2 flops):
  * fused (``deterministic=False``), grid (column blocks, output-D chunks, row splits): a program
    owns BLOCK_N keys and loops over row blocks. dq contributions are added atomically to an fp32
    (N, D) buffer; dk stays in registers (added atomically when the rows are split). For
    D > 2 BLOCK_DO the "wide" form computes each tile once and loops over the output chunks
    inside (dq and dk atomic). FLOPs: narrow 2NMD n_do + 4NMD; wide 6NMD. So 8NMD in all for a
    symmetric loss at D <= BLOCK_DO and at D > 2 BLOCK_DO (10NMD in between).
  * owner kernels (``deterministic=True``, and whenever only one of dq/dk is needed at
    D <= 2 BLOCK_DO): one kernel over key blocks computes dk (and dbias, dscale), one over query
    blocks computes dq; each keeps its output chunk in registers; when the other side is split
    across programs (for parallelism) each split writes an fp32 partial that a reduction adds in
    a fixed order. No floating-point atomic anywhere: bitwise reproducible. FLOPs: each kernel
    2NMD n_do + 2NMD, so 4NMD (n_do + 1) for dq and dk: 8NMD at D <= BLOCK_DO (like the fused
    path), 28NMD at D = 768 with BLOCK_DO = 128 (the price of determinism at wide D).
    Partials: at most ~min_programs x BLOCK x D fp32 (52 MB at D = 768).
dscale and dbias are always reduced from per-program partials in a fixed order.

No host synchronisation: launch parameters depend on shapes only, and every data-dependent
decision (the shift scheme, masks, empty rows, invalid positive indices) is taken inside the
kernels, so the calls can be captured in a CUDA graph. Positive indices outside [0, M) mean
"no positive" (they are not checked on the host, which would need a sync).

Offsets: row/column indices are int32 (N, M, D < 2^30 are checked); every address is a 64-bit
block base plus a small int32 offset inside a tile (inputs whose strides could overflow that are
made contiguous first), and the epilogue kernels index with 64-bit program offsets, so
N x D >= 2^31 elements (e.g. 4,194,304 x 768) is fine.

Precision: tile products accumulate in fp32. fp32 inputs use ``input_precision="ieee"`` (no TF32,
results match PyTorch's fp32 matmul; FMA units, not tensor cores). bf16/fp16 use tensor cores;
G is rounded to the input dtype for the dq/dk products, after every term of G (positives
included) is summed in fp32. NaN inputs give NaN outputs: NaN reaches the sums (tl.max drops NaN
when compiled, so every tile-wide quantity is computed from NaN-free values on purpose).

References: Milakov & Gimelshein 2018 (online softmax); Dao 2023, FlashAttention-2 (recompute
from the LSE); Shah et al. 2024, FlashAttention-3 (exp throughput on Hopper); Wijmans et al.
2025, Cut Your Losses in Large-Vocabulary Language Models (tiled LSE without logits).

Example::

    stats = lse_forward(q, k, torch.tensor(14.3, device="cuda"), col_bias=None, self_offset=0,
                        compute_col=True, positive_index=None, row_labels=None, col_labels=None,
                        positive_sum=False, positive_lse=False)
    grads = lse_backward(q, k, scale, stats, grad_row=g, grad_col=h, grad_positive_sum=None,
                         grad_positive_lse=None, col_bias=None, self_offset=0, positive_index=None,
                         row_labels=None, col_labels=None, needs_dq=True, needs_dk=True,
                         needs_dbias=False, deterministic=False)
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._alloc import empty
from .backend import LseGrads, LseStats
from .tile_configs import BackwardConfig, ForwardConfig, get_configs

__all__ = ["lse_forward", "lse_backward", "SHIFT_RANGE"]

#: Largest distance (base 2) between a tile's shift and a row/column statistic for which one
#: exponential per logit is used (see the module docstring for the bound).
SHIFT_RANGE = 64.0

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# Runtime (non-constexpr) scalar arguments that Triton's JIT must not specialise (by default it
# turns an integer equal to 1 into a constant and records divisibility by 16): the compiled
# variants are then exactly the constexpr combinations that static_check compiles.
RUNTIME_SCALARS = ("self_offset", "has_bias", "has_plse", "needs_dbias", "dk_mode", "needs_dscale", "direct",
                   "store_pos_sum", "store_pos_lse", "row_blocks_per_group", "col_blocks_per_split",
                   "row_blocks_per_split", "splits")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------
# Shared device helpers (inlined by Triton)
# --------------------------------------------------------------------------------------------
# Integer offsets inside a tile are small int32 (loop-invariant); block bases are 64-bit scalar
# pointers advanced by increments, so no offset wraps at N x D >= 2^31 and the interpreter (which
# checks every int32 multiply for overflow, slowly) does few multiplies.


@triton.jit
def _tile_dot(
    q_block, k_block, q_offs, kt_offs, q_step, k_step, row_ok, col_ok, offs_d, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dot_ij = q_i . k_j for one (BLOCK_M x BLOCK_N) tile, over D in BLOCK_D chunks (masked tail
    chunk; K loaded transposed), accumulated in fp32.

    UPCAST (interpreter with bf16 only): Triton 3.6's interpreter runs tl.dot as a NumPy matmul
    on the raw 16-bit storage of bf16, so tiles are widened to fp32 first (exact)."""
    q_chunk = q_block
    k_chunk = k_block
    dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d_start in range(0, D, BLOCK_D):
        d_left = D - d_start
        q_tile = tl.load(q_chunk + q_offs, mask=row_ok[:, None] & (offs_d[None, :] < d_left), other=0.0)
        kt_tile = tl.load(k_chunk + kt_offs, mask=col_ok[None, :] & (offs_d[:, None] < d_left), other=0.0)
        if UPCAST:
            q_tile = q_tile.to(tl.float32)
            kt_tile = kt_tile.to(tl.float32)
        dot = tl.dot(q_tile, kt_tile, dot, input_precision=DOT_PRECISION)
        q_chunk += q_step
        k_chunk += k_step
    return dot


@triton.jit
def _tile_needs_mask(row0, col0, N, M, self_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether the tile at (row0, col0) has padding or crosses the excluded band j = i + offset;
    interior tiles skip the per-element mask."""
    edge = (row0 + BLOCK_M > N) | (col0 + BLOCK_N > M)
    band = (row0 + self_offset < col0 + BLOCK_N) & (row0 + (BLOCK_M - 1) + self_offset >= col0)
    return edge | band


@triton.jit
def _allowed(offs_m, offs_n, row_ok, col_ok, self_offset):
    """allowed(i, j) = in range and j != i + self_offset (an out-of-range offset excludes nothing)."""
    return row_ok[:, None] & col_ok[None, :] & (offs_n[None, :] != (offs_m + self_offset)[:, None])


@triton.jit
def _finite_or_zero(x):
    """The shift for 2^(x_ij - shift): 0 where the statistic is -inf (nothing allowed yet), so
    that 2^(-inf - 0) = 0 instead of 2^(-inf + inf) = NaN."""
    return tl.where(x == float("-inf"), 0.0, x)


@triton.jit
def _no_nan(x):
    """NaN -> -inf: tile-wide quantities (shifts, range checks) are computed from NaN-free values,
    so that a NaN row makes only itself NaN, compiled (tl.max drops NaN) as in the interpreter."""
    return tl.where(x == x, x, float("-inf"))


@triton.jit
def _positives(offs_m, offs_n, row_ok, col_ok, self_offset, masked, row_key, col_key, POS: tl.constexpr):
    """[j in P(i)]: j == index_i (POS 1) or col_label_j == row_label_i (POS 2), allowed only."""
    if POS == 1:
        pos = offs_n[None, :] == row_key[:, None]
    else:
        pos = row_key[:, None] == col_key[None, :]
    if masked:
        pos = pos & _allowed(offs_m, offs_n, row_ok, col_ok, self_offset)
    return pos


@triton.jit
def _grad_tile(
    dot, s2, bias2, offs_m, offs_n, row_ok, col_ok, self_offset, masked,
    r2, g, c2, h, row_key, col_key, w, u, plse2, has_plse,
    HAS_COL: tl.constexpr, POS: tl.constexpr,
):
    """G for one tile (BLOCK_M x BLOCK_N, fp32) from dot = q.k, with base-2 logits
    X = s2 dot + bias2 (s2 = s log2 e, bias2 = b log2 e):

        G_ij = [allowed] (g_i 2^(X_ij - r2_i) + h_j 2^(X_ij - c2_j))
             + [j in P(i)] (w_i + u_i 2^(X_ij - plse2_i))

    r2, c2, plse2: row / column / positive LSE times log2(e). POS: 0 no positives, 1 by index
    (row_key = index as int32, -1 for none), 2 by labels. A term whose upstream gradient is 0,
    or whose statistic is -inf, contributes exactly 0 (even at a NaN logit); a NaN statistic or
    gradient makes its terms NaN. One exponential per term and logit (the index positive: one per
    row): at D >= 128 the backward's three tile products outweigh them (docs/kernels.md), and the
    single-shift scheme of the forward would cost the ~25 registers per thread that this
    kernel does not have (measured with static_check: it spills).
    """
    X = dot * s2 + bias2[None, :]
    allowed = _allowed(offs_m, offs_n, row_ok, col_ok, self_offset)
    row_live = (g != 0.0) & (r2 != float("-inf"))
    G = tl.where(allowed & row_live[:, None], g[:, None] * tl.exp2(X - r2[:, None]), 0.0)
    if HAS_COL:
        col_live = (h != 0.0) & (c2 != float("-inf"))
        G += tl.where(allowed & col_live[None, :], h[None, :] * tl.exp2(X - c2[None, :]), 0.0)
    if POS != 0:
        pos_live = (u != 0.0) & (plse2 != float("-inf"))
    if POS == 2:
        pos = _positives(offs_m, offs_n, row_ok, col_ok, self_offset, masked, row_key, col_key, POS)
        if has_plse != 0:
            G += tl.where(pos & pos_live[:, None], u[:, None] * tl.exp2(X - plse2[:, None]), 0.0)
        G += tl.where(pos, w[:, None], 0.0)
    if POS == 1:
        # One positive per row: its exp(Z - positive_lse) is one exponential per row, taken from
        # that row's entry of this tile (the sum picks the single match, 0 if not in this tile).
        pos = _positives(offs_m, offs_n, row_ok, col_ok, self_offset, masked, row_key, col_key, POS)
        x_pos = tl.sum(tl.where(pos, X, 0.0), axis=1)
        pos_term = w + tl.where(pos_live, u * tl.exp2(x_pos - plse2), 0.0)
        G += tl.where(pos, pos_term[:, None], 0.0)
    return G


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=RUNTIME_SCALARS)
def _lse_forward_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, row_labels_ptr, col_labels_ptr,
    row_ws_ptr,  # fp32 (5 or 2 planes, splits, N): m, l [, positive sum, positive m, positive l]
    col_ws_ptr,  # fp32 (2 planes, groups, M): m, l
    N, M, D,
    stride_qn, stride_qd, stride_kn, stride_kd,
    self_offset, has_bias, has_plse, shift_range,
    row_blocks_per_group, col_blocks_per_split,
    COMPUTE_COL: tl.constexpr,
    LABELS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (row group, column split): row statistics of its row blocks over its column range
    to the row workspace, column statistics merged into its own slot of the column workspace."""
    group = tl.program_id(0)
    split = tl.program_id(1)
    s2 = tl.load(scale_ptr).to(tl.float32) * _LOG2E

    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_offs = local_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    kt_offs = local_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    q_step = BLOCK_D * stride_qd
    k_step = BLOCK_D * stride_kd

    row_plane = tl.num_programs(1).to(tl.int64) * N  # elements per statistic in the row workspace
    row_ws = row_ws_ptr + split.to(tl.int64) * N
    col_plane = tl.num_programs(0).to(tl.int64) * M
    col_ws = col_ws_ptr + group.to(tl.int64) * M

    first_rb = group * row_blocks_per_group
    last_rb = tl.minimum(first_rb + row_blocks_per_group, tl.cdiv(N, BLOCK_M))
    first_cb = split * col_blocks_per_split
    last_cb = tl.minimum(first_cb + col_blocks_per_split, tl.cdiv(M, BLOCK_N))

    row0 = first_rb * BLOCK_M
    q_block = q_ptr + row0.to(tl.int64) * stride_qn
    for rb in range(first_rb, last_rb):
        offs_m = row0 + local_m
        row_ok = offs_m < N
        row_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_l = tl.zeros([BLOCK_M], tl.float32)
        if LABELS:
            row_lab = tl.load(row_labels_ptr + offs_m, mask=row_ok, other=0)
            pos_sum = tl.zeros([BLOCK_M], tl.float32)
            pos_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            pos_l = tl.zeros([BLOCK_M], tl.float32)

        col0 = first_cb * BLOCK_N
        k_block = k_ptr + col0.to(tl.int64) * stride_kn
        for _cb in range(first_cb, last_cb):
            offs_n = col0 + local_n
            col_ok = offs_n < M
            dot = _tile_dot(q_block, k_block, q_offs, kt_offs, q_step, k_step, row_ok, col_ok, offs_d, D,
                            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)
            # X = log2(e) Z = (s log2 e) q.k + log2(e) b
            bias2 = tl.load(bias_ptr + offs_n, mask=col_ok & (has_bias != 0), other=0.0) * _LOG2E
            X = dot * s2 + bias2[None, :]
            masked = _tile_needs_mask(row0, col0, N, M, self_offset, BLOCK_M, BLOCK_N)
            if masked:
                X = tl.where(_allowed(offs_m, offs_n, row_ok, col_ok, self_offset), X, float("-inf"))

            if LABELS:
                # Positives first, so that their mask is dead before the statistics' exponentials.
                col_lab = tl.load(col_labels_ptr + offs_n, mask=col_ok, other=0)
                pos = _positives(offs_m, offs_n, row_ok, col_ok, self_offset, masked, row_lab, col_lab, 2)
                # positive_sum: sum of X over P(i) (times ln 2 at the end).
                pos_sum += tl.sum(tl.where(pos, X, 0.0), axis=1)
                if has_plse != 0:
                    # Online (max, sum) over P(i): one more exponential per logit.
                    tile_pos_max = tl.max(tl.where(pos, X, float("-inf")), axis=1)
                    new_pm = tl.maximum(pos_m, tile_pos_max, propagate_nan=tl.PropagateNan.ALL)
                    new_pm0 = _finite_or_zero(new_pm)
                    pos_l = (pos_l * tl.exp2(pos_m - new_pm0)
                             + tl.sum(tl.where(pos, tl.exp2(X - new_pm0[:, None]), 0.0), axis=1))
                    pos_m = new_pm

            tile_row_max = tl.max(X, axis=1)
            new_m = tl.maximum(row_m, tile_row_max, propagate_nan=tl.PropagateNan.ALL)
            new_m0 = _finite_or_zero(new_m)
            if COMPUTE_COL:
                tile_col_max = tl.max(X, axis=0)
                row_max_c = _no_nan(tile_row_max)
                t = tl.max(row_max_c, axis=0)
                t0 = _finite_or_zero(t)
                col_max_c = _no_nan(tile_col_max)
                low = tl.minimum(tl.min(tl.where(row_max_c == float("-inf"), t0, row_max_c), axis=0),
                                 tl.min(tl.where(col_max_c == float("-inf"), t0, col_max_c), axis=0))
                if low >= t0 - shift_range:
                    # One exponential per logit, against the tile max t; rescaled per row and per
                    # column: sum_j 2^(X_ij - m_i) = 2^(t - m_i) sum_j E_ij (exponent <= 64, and
                    # capped for an empty row/column, whose sum is 0).
                    E = tl.exp2(X - t0)
                    row_part = tl.sum(E, axis=1) * tl.exp2(tl.minimum(t0 - new_m0, shift_range))
                    col_part = tl.sum(E, axis=0) * tl.exp2(tl.minimum(t0 - _finite_or_zero(tile_col_max),
                                                                       shift_range))
                else:
                    # Two exponentials per logit: row shift and column shift.
                    row_part = tl.sum(tl.exp2(X - new_m0[:, None]), axis=1)
                    col_part = tl.sum(tl.exp2(X - _finite_or_zero(tile_col_max)[None, :]), axis=0)
            else:
                row_part = tl.sum(tl.exp2(X - new_m0[:, None]), axis=1)
            # Online row statistics: l' = l 2^(m - m') + sum_j 2^(X_ij - m').
            row_l = row_l * tl.exp2(row_m - new_m0) + row_part
            row_m = new_m

            if COMPUTE_COL:
                # Merge (colmax_j, col_part_j) into this program's slot (read, merge, write by
                # this program alone). The barriers order this read after the previous tile's
                # write of the slot, and this write after every thread's read: the threads that
                # load a column and those that store it differ (different register layouts).
                tl.debug_barrier()
                later = rb > first_rb
                prev_m = tl.load(col_ws + offs_n, mask=col_ok & later, other=float("-inf"))
                prev_l = tl.load(col_ws + col_plane + offs_n, mask=col_ok & later, other=0.0)
                merged = tl.maximum(prev_m, tile_col_max, propagate_nan=tl.PropagateNan.ALL)
                merged0 = _finite_or_zero(merged)
                merged_l = (prev_l * tl.exp2(prev_m - merged0)
                            + col_part * tl.exp2(tl.minimum(_finite_or_zero(tile_col_max) - merged0, 0.0)))
                tl.debug_barrier()
                tl.store(col_ws + offs_n, merged, mask=col_ok)
                tl.store(col_ws + col_plane + offs_n, merged_l, mask=col_ok)
            col0 += BLOCK_N
            k_block += BLOCK_N * stride_kn

        tl.store(row_ws + offs_m, row_m, mask=row_ok)
        tl.store(row_ws + row_plane + offs_m, row_l, mask=row_ok)
        if LABELS:
            tl.store(row_ws + 2 * row_plane + offs_m, pos_sum, mask=row_ok)
            tl.store(row_ws + 3 * row_plane + offs_m, pos_m, mask=row_ok)
            tl.store(row_ws + 4 * row_plane + offs_m, pos_l, mask=row_ok)
        row0 += BLOCK_M
        q_block += BLOCK_M * stride_qn


@triton.jit(do_not_specialize=RUNTIME_SCALARS)
def _merge_stats_kernel(
    ws_ptr, lse_ptr, pos_sum_ptr, pos_lse_ptr, n, splits, store_pos_sum, store_pos_lse,
    LABELS: tl.constexpr, BLOCK: tl.constexpr,
):
    """lse = ln2 (m + log2 l) after merging the ``splits`` partial (m, l) of each entry in order
    (workspace planes as written by the forward kernel); with LABELS also positive_sum and
    positive_lse."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    plane = splits.to(tl.int64) * n
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    if LABELS:
        ps = tl.zeros([BLOCK], tl.float32)
        pm = tl.full([BLOCK], float("-inf"), tl.float32)
        pl = tl.zeros([BLOCK], tl.float32)
    ptr = ws_ptr + offs
    for _split in range(0, splits):
        m2 = tl.load(ptr, mask=ok, other=float("-inf"))
        s2 = tl.load(ptr + plane, mask=ok, other=0.0)
        merged = tl.maximum(m, m2, propagate_nan=tl.PropagateNan.ALL)
        merged0 = _finite_or_zero(merged)
        s = s * tl.exp2(m - merged0) + s2 * tl.exp2(m2 - merged0)
        m = merged
        if LABELS:
            ps += tl.load(ptr + 2 * plane, mask=ok, other=0.0)
            pm2 = tl.load(ptr + 3 * plane, mask=ok, other=float("-inf"))
            pl2 = tl.load(ptr + 4 * plane, mask=ok, other=0.0)
            pmerged = tl.maximum(pm, pm2, propagate_nan=tl.PropagateNan.ALL)
            pmerged0 = _finite_or_zero(pmerged)
            pl = pl * tl.exp2(pm - pmerged0) + pl2 * tl.exp2(pm2 - pmerged0)
            pm = pmerged
        ptr += n
    # An empty entry: (-inf, 0) -> -inf + log2(0) = -inf.
    tl.store(lse_ptr + offs, (m + tl.log2(s)) * _LN2, mask=ok)
    if LABELS:
        if store_pos_sum != 0:
            tl.store(pos_sum_ptr + offs, ps * _LN2, mask=ok)
        if store_pos_lse != 0:
            tl.store(pos_lse_ptr + offs, (pm + tl.log2(pl)) * _LN2, mask=ok)


@triton.jit(do_not_specialize=RUNTIME_SCALARS)
def _positive_index_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, index_ptr, pos_sum_ptr, pos_lse_ptr,
    N, M, D, stride_qn, stride_qd, stride_kn, stride_kd,
    self_offset, has_bias, store_pos_sum, store_pos_lse,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Z_{i, p_i} = s q_i . k_{p_i} + b_{p_i} for the positive p_i of each row (fused gather and
    row-dot, fp32 products, O(N D)): positive_sum_i = Z (0 without a positive) and
    positive_lse_i = Z (-inf without one). p_i outside [0, M) or p_i = i + self_offset: none."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = offs < N
    p = tl.load(index_ptr + offs, mask=ok, other=-1)
    valid = ok & (p >= 0) & (p < M) & (p != offs + self_offset)
    p = tl.where(valid, p, 0)
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = q_ptr + offs * stride_qn
    k_rows = k_ptr + p * stride_kn
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for d_start in range(0, D, BLOCK_D):
        d_ok = offs_d < D - d_start
        a = tl.load(q_rows[:, None] + offs_d[None, :] * stride_qd, mask=ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(k_rows[:, None] + offs_d[None, :] * stride_kd, mask=valid[:, None] & d_ok[None, :], other=0.0)
        acc += a.to(tl.float32) * b.to(tl.float32)
        q_rows += BLOCK_D * stride_qd
        k_rows += BLOCK_D * stride_kd
    z = tl.sum(acc, axis=1) * tl.load(scale_ptr).to(tl.float32)
    z += tl.load(bias_ptr + p, mask=valid & (has_bias != 0), other=0.0)
    if store_pos_sum != 0:
        tl.store(pos_sum_ptr + offs, tl.where(valid, z, 0.0), mask=ok)
    if store_pos_lse != 0:
        tl.store(pos_lse_ptr + offs, tl.where(valid, z, float("-inf")), mask=ok)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_row_side(
    offs_m, row_ok, row_lse_ptr, grad_row_ptr, row_key_ptr, grad_psum_ptr, grad_plse_ptr, plse_ptr, M,
    POS: tl.constexpr,
):
    """Per-row inputs of G: r, g (and the positive key, w, u, positive_lse), LSEs in base 2.
    Padded rows get r = -inf and zero gradients (no contribution, not in the tile shift)."""
    r2 = tl.load(row_lse_ptr + offs_m, mask=row_ok, other=float("-inf")) * _LOG2E
    g = tl.load(grad_row_ptr + offs_m, mask=row_ok, other=0.0)
    if POS == 0:
        key = offs_m
        w = g
        u = g
        plse2 = r2
    else:
        if POS == 1:
            p = tl.load(row_key_ptr + offs_m, mask=row_ok, other=-1)
            key = tl.where((p >= 0) & (p < M), p, -1).to(tl.int32)
        else:
            key = tl.load(row_key_ptr + offs_m, mask=row_ok, other=0)
        w = tl.load(grad_psum_ptr + offs_m, mask=row_ok, other=0.0)
        u = tl.load(grad_plse_ptr + offs_m, mask=row_ok, other=0.0)
        plse2 = tl.load(plse_ptr + offs_m, mask=row_ok, other=float("-inf")) * _LOG2E
    return r2, g, key, w, u, plse2


@triton.jit
def _load_col_side(offs_n, col_ok, col_lse_ptr, grad_col_ptr, col_labels_ptr, bias_ptr, has_bias,
                   HAS_COL: tl.constexpr, POS: tl.constexpr):
    """Per-column inputs of G: c, h (base 2), the column label and the bias (base 2)."""
    bias2 = tl.load(bias_ptr + offs_n, mask=col_ok & (has_bias != 0), other=0.0) * _LOG2E
    if HAS_COL:
        c2 = tl.load(col_lse_ptr + offs_n, mask=col_ok, other=float("-inf")) * _LOG2E
        h = tl.load(grad_col_ptr + offs_n, mask=col_ok, other=0.0)
    else:
        c2 = bias2
        h = bias2
    if POS == 2:
        col_key = tl.load(col_labels_ptr + offs_n, mask=col_ok, other=0)
    else:
        col_key = offs_n
    return c2, h, col_key, bias2


# Tile helpers of the backward kernels (LSE and SigLIP: :mod:`csrc_triton.triton_siglip`), inlined by Triton.
@triton.jit
def _backward_offsets(local_m, local_n, offs_d, offs_do, D, stride_qn, stride_qd, stride_kn, stride_kd):
    """In-tile offsets: k^T (BLOCK_D, BLOCK_N) and q (BLOCK_M, BLOCK_D) of the logit products;
    q (BLOCK_M, BLOCK_DO) and k (BLOCK_N, BLOCK_DO) of the gradient products; dq, dk in the
    contiguous (., D) fp32 buffers and outputs."""
    kt_offs = local_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    q_offs = local_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q_out_offs = local_m[:, None] * stride_qn + offs_do[None, :] * stride_qd
    k_out_offs = local_n[:, None] * stride_kn + offs_do[None, :] * stride_kd
    dq_offs = local_m[:, None] * D + offs_do[None, :]
    dk_offs = local_n[:, None] * D + offs_do[None, :]
    return kt_offs, q_offs, q_out_offs, k_out_offs, dq_offs, dk_offs


@triton.jit
def _load_out_tile(ptr, mask, UPCAST: tl.constexpr):
    """An input tile of a gradient product (0 where masked); fp32 under UPCAST (the interpreter's bfloat16)."""
    tile = tl.load(ptr, mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _narrow_dq_keys(k_block, k_out_offs, col_ok, do_ok, LOAD: tl.constexpr, UPCAST: tl.constexpr):
    """The slice k_j[offs_do] a column owner's narrow dq needs, loaded once per program (LOAD:
    NEEDS_DQ and not WIDE); otherwise a placeholder :func:`_apply_grad_cols` never reads."""
    k_out = 0.0
    if LOAD:
        k_out = _load_out_tile(k_block + k_out_offs, col_ok[:, None] & do_ok[None, :], UPCAST)
    return k_out


@triton.jit
def _apply_grad_cols(
    G, dk, k_out, scale, q_block, k_block, dq_block, dk_block, q_out_offs, k_out_offs, dq_offs, dk_offs,
    offs_do, row_ok, col_ok, do_ok, D, stride_qd, stride_kd,
    NEEDS_DQ: tl.constexpr, NEEDS_DK: tl.constexpr, WIDE: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """One G tile (row block x the program's key block) of a column-owner backward: dk_j += sum_i
    G_ij q_i in registers (times s in :func:`_store_dk`), dq_i += s sum_j G_ij k_j atomically
    (k_out: :func:`_narrow_dq_keys`). WIDE: a loop over every BLOCK_DO chunk of the output, dq
    and dk (times s) added atomically. Returns dk."""
    if NEEDS_DQ or NEEDS_DK:
        # G in the input dtype for the tensor-core products (fp32 inputs: unchanged).
        g_in = G.to(q_block.dtype.element_ty)
        if UPCAST:
            g_in = g_in.to(tl.float32)
        if WIDE:
            q_chunk = q_block
            k_chunk = k_block
            dq_chunk = dq_block
            dk_chunk = dk_block
            for do_start in range(0, D, BLOCK_DO):
                do_in = offs_do < D - do_start
                if NEEDS_DK:
                    q_out = _load_out_tile(q_chunk + q_out_offs, row_ok[:, None] & do_in[None, :], UPCAST)
                    # dk_j += s sum_i G_ij q_i
                    dk_part = tl.dot(tl.trans(g_in), q_out, input_precision=DOT_PRECISION) * scale
                    tl.atomic_add(dk_chunk + dk_offs, dk_part, mask=col_ok[:, None] & do_in[None, :], sem="relaxed")
                if NEEDS_DQ:
                    k_wide = _load_out_tile(k_chunk + k_out_offs, col_ok[:, None] & do_in[None, :], UPCAST)
                    # dq_i += s sum_j G_ij k_j
                    dq_part = tl.dot(g_in, k_wide, input_precision=DOT_PRECISION) * scale
                    tl.atomic_add(dq_chunk + dq_offs, dq_part, mask=row_ok[:, None] & do_in[None, :], sem="relaxed")
                q_chunk += BLOCK_DO * stride_qd
                k_chunk += BLOCK_DO * stride_kd
                dq_chunk += BLOCK_DO
                dk_chunk += BLOCK_DO
        else:
            if NEEDS_DK:
                q_out = _load_out_tile(q_block + q_out_offs, row_ok[:, None] & do_ok[None, :], UPCAST)
                # dk_j += sum_i G_ij q_i   (times s after the loop)
                dk = tl.dot(tl.trans(g_in), q_out, dk, input_precision=DOT_PRECISION)
            if NEEDS_DQ:
                dq_part = tl.dot(g_in, k_out, input_precision=DOT_PRECISION) * scale
                tl.atomic_add(dq_block + dq_offs, dq_part, mask=row_ok[:, None] & do_ok[None, :], sem="relaxed")
    return dk


@triton.jit
def _store_dk(dk, scale, dk_ptr, dk_block, dk_offs, col0, col_ok, do_ok, dk_mode, split, M, D):
    """A column owner's dk = s sum_i G_ij q_i (narrow form): a direct store in k's dtype (dk_mode
    0), fp32 atomics into (M, D) (1) or the split's fp32 (M, D) partial (2)."""
    dk = dk * scale
    out_mask = col_ok[:, None] & do_ok[None, :]
    if dk_mode == 0:
        tl.store(dk_ptr + col0.to(tl.int64) * D + dk_offs, dk.to(dk_ptr.dtype.element_ty), mask=out_mask)
    elif dk_mode == 1:
        tl.atomic_add(dk_block + dk_offs, dk, mask=out_mask, sem="relaxed")
    else:
        tl.store(dk_block + split.to(tl.int64) * M * D + dk_offs, dk, mask=out_mask)


@triton.jit
def _rows_dq_step(G, dq, k_block, k_out_offs, col_ok, do_ok, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A query owner's dq_i += sum_j G_ij k_j over one key block (times s in :func:`_store_dq`), G
    in the input dtype for the tensor-core product. Returns dq."""
    g_in = G.to(k_block.dtype.element_ty)
    if UPCAST:
        g_in = g_in.to(tl.float32)
    k_out = _load_out_tile(k_block + k_out_offs, col_ok[:, None] & do_ok[None, :], UPCAST)
    return tl.dot(g_in, k_out, dq, input_precision=DOT_PRECISION)


@triton.jit
def _store_dq(dq, scale, dq_ptr, dq_part_ptr, dq_offs, row0, row_ok, do_ok, direct, split, N, D):
    """A query owner's dq = s sum_j G_ij k_j: a direct store in q's dtype (one split) or the
    split's fp32 (N, D) partial."""
    dq = dq * scale
    out_mask = row_ok[:, None] & do_ok[None, :]
    if direct != 0:
        tl.store(dq_ptr + row0.to(tl.int64) * D + dq_offs, dq.to(dq_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(dq_part_ptr + (split.to(tl.int64) * N + row0) * D + dq_offs, dq, mask=out_mask)


@triton.jit(do_not_specialize=RUNTIME_SCALARS)
def _lse_backward_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr,
    row_lse_ptr, grad_row_ptr, col_lse_ptr, grad_col_ptr,
    row_key_ptr, col_labels_ptr, grad_psum_ptr, grad_plse_ptr, plse_ptr,
    dq_acc_ptr,  # (N, D) fp32 zero-initialised: dq contributions added atomically (NEEDS_DQ)
    dk_ptr,  # (M, D) in k's dtype: direct store of dk (dk_mode 0)
    dk_acc_ptr,  # fp32: (M, D) zeroed for atomics (dk_mode 1) or (splits, M, D) partials (dk_mode 2)
    dscale_part_ptr,  # (splits * column blocks,) fp32
    dbias_part_ptr,  # (splits, M) fp32
    N, M, D,
    stride_qn, stride_qd, stride_kn, stride_kd,
    self_offset, has_bias, has_plse, needs_dbias, dk_mode,
    row_blocks_per_split,
    HAS_COL: tl.constexpr,
    POS: tl.constexpr,
    NEEDS_DQ: tl.constexpr,
    NEEDS_DK: tl.constexpr,
    WIDE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """Program (key block, output-D chunk, row split): G over its row blocks; dk (registers),
    dq (atomics), column sums of G (dbias) and of G * dot (dscale) as partials.

    WIDE: one program per key block computes each G tile once and loops over every BLOCK_DO
    chunk of the output (dq and dk added atomically)."""
    pid_n = tl.program_id(0)
    pid_do = tl.program_id(1)
    split = tl.program_id(2)
    scale = tl.load(scale_ptr).to(tl.float32)
    s2 = scale * _LOG2E

    col0 = pid_n * BLOCK_N
    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    offs_n = col0 + local_n
    col_ok = offs_n < M
    offs_d = tl.arange(0, BLOCK_D)
    offs_do = pid_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    k_block = k_ptr + col0.to(tl.int64) * stride_kn
    # The offsets of _backward_offsets, written out: its inlined debug scope made ptxas use one more
    # register in the fp32 (POS 1, no dq, no dk) variant (python -m csrc_triton.static_check).
    kt_offs = local_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    q_offs = local_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q_out_offs = local_m[:, None] * stride_qn + offs_do[None, :] * stride_qd
    k_out_offs = local_n[:, None] * stride_kn + offs_do[None, :] * stride_kd
    dq_offs = local_m[:, None] * D + offs_do[None, :]
    dk_offs = local_n[:, None] * D + offs_do[None, :]
    q_step = BLOCK_D * stride_qd
    k_step = BLOCK_D * stride_kd

    c2, h, col_key, bias2 = _load_col_side(offs_n, col_ok, col_lse_ptr, grad_col_ptr, col_labels_ptr,
                                           bias_ptr, has_bias, HAS_COL, POS)
    k_out = _narrow_dq_keys(k_block, k_out_offs, col_ok, do_ok, NEEDS_DQ and not WIDE, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    dscale = tl.zeros([BLOCK_N], tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    dk_block = dk_acc_ptr + col0.to(tl.int64) * D

    first_rb = split * row_blocks_per_split
    last_rb = tl.minimum(first_rb + row_blocks_per_split, tl.cdiv(N, BLOCK_M))
    row0 = first_rb * BLOCK_M
    q_block = q_ptr + row0.to(tl.int64) * stride_qn
    dq_block = dq_acc_ptr + row0.to(tl.int64) * D
    for _rb in range(first_rb, last_rb):
        offs_m = row0 + local_m
        row_ok = offs_m < N
        r2, g, row_key, w, u, plse2 = _load_row_side(offs_m, row_ok, row_lse_ptr, grad_row_ptr, row_key_ptr,
                                                     grad_psum_ptr, grad_plse_ptr, plse_ptr, M, POS)
        dot = _tile_dot(q_block, k_block, q_offs, kt_offs, q_step, k_step, row_ok, col_ok, offs_d, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)
        masked = _tile_needs_mask(row0, col0, N, M, self_offset, BLOCK_M, BLOCK_N)
        G = _grad_tile(dot, s2, bias2, offs_m, offs_n, row_ok, col_ok, self_offset, masked,
                       r2, g, c2, h, row_key, col_key, w, u, plse2, has_plse, HAS_COL, POS)
        if pid_do == 0:
            # dscale = sum_ij G_ij dZ_ij/ds = sum_ij G_ij (q_i . k_j);  dbias_j = sum_i G_ij
            dscale += tl.sum(G * dot, axis=0)
            if needs_dbias != 0:
                dbias += tl.sum(G, axis=0)

        dk = _apply_grad_cols(G, dk, k_out, scale, q_block, k_block, dq_block, dk_block, q_out_offs, k_out_offs,
                              dq_offs, dk_offs, offs_do, row_ok, col_ok, do_ok, D, stride_qd, stride_kd,
                              NEEDS_DQ, NEEDS_DK, WIDE, UPCAST, DOT_PRECISION, BLOCK_DO)
        row0 += BLOCK_M
        q_block += BLOCK_M * stride_qn
        dq_block += BLOCK_M * D

    if NEEDS_DK and not WIDE:
        _store_dk(dk, scale, dk_ptr, dk_block, dk_offs, col0, col_ok, do_ok, dk_mode, split, M, D)
    if pid_do == 0:
        tl.store(dscale_part_ptr + split * tl.num_programs(0) + pid_n, tl.sum(dscale, axis=0))
        if needs_dbias != 0:
            tl.store(dbias_part_ptr + split.to(tl.int64) * M + offs_n, dbias, mask=col_ok)


@triton.jit(do_not_specialize=RUNTIME_SCALARS)
def _lse_backward_rows_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr,
    row_lse_ptr, grad_row_ptr, col_lse_ptr, grad_col_ptr,
    row_key_ptr, col_labels_ptr, grad_psum_ptr, grad_plse_ptr, plse_ptr,
    dq_ptr,  # (N, D) in q's dtype: direct store (one split)
    dq_part_ptr,  # (splits, N, D) fp32 partials (several splits)
    dscale_part_ptr,  # (splits * row blocks,) fp32
    N, M, D,
    stride_qn, stride_qd, stride_kn, stride_kd,
    self_offset, has_bias, has_plse, needs_dscale, direct,
    col_blocks_per_split,
    HAS_COL: tl.constexpr,
    POS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """Program (query block, output-D chunk, column split): dq_i = s sum_j G_ij k_j over its key
    blocks, in registers (no atomics); a partial per split when the keys are split."""
    pid_m = tl.program_id(0)
    pid_do = tl.program_id(1)
    split = tl.program_id(2)
    scale = tl.load(scale_ptr).to(tl.float32)
    s2 = scale * _LOG2E

    row0 = pid_m * BLOCK_M
    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    offs_m = row0 + local_m
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_do = pid_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    q_block = q_ptr + row0.to(tl.int64) * stride_qn
    kt_offs, q_offs, _q_out_offs, k_out_offs, dq_offs, _dk_offs = _backward_offsets(
        local_m, local_n, offs_d, offs_do, D, stride_qn, stride_qd, stride_kn, stride_kd)
    q_step = BLOCK_D * stride_qd
    k_step = BLOCK_D * stride_kd

    r2, g, row_key, w, u, plse2 = _load_row_side(offs_m, row_ok, row_lse_ptr, grad_row_ptr, row_key_ptr,
                                                 grad_psum_ptr, grad_plse_ptr, plse_ptr, M, POS)
    dq = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    dscale = tl.zeros([BLOCK_M], tl.float32)

    first_cb = split * col_blocks_per_split
    last_cb = tl.minimum(first_cb + col_blocks_per_split, tl.cdiv(M, BLOCK_N))
    col0 = first_cb * BLOCK_N
    k_block = k_ptr + col0.to(tl.int64) * stride_kn
    for _cb in range(first_cb, last_cb):
        offs_n = col0 + local_n
        col_ok = offs_n < M
        c2, h, col_key, bias2 = _load_col_side(offs_n, col_ok, col_lse_ptr, grad_col_ptr, col_labels_ptr,
                                               bias_ptr, has_bias, HAS_COL, POS)
        dot = _tile_dot(q_block, k_block, q_offs, kt_offs, q_step, k_step, row_ok, col_ok, offs_d, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)
        masked = _tile_needs_mask(row0, col0, N, M, self_offset, BLOCK_M, BLOCK_N)
        G = _grad_tile(dot, s2, bias2, offs_m, offs_n, row_ok, col_ok, self_offset, masked,
                       r2, g, c2, h, row_key, col_key, w, u, plse2, has_plse, HAS_COL, POS)
        if pid_do == 0:
            if needs_dscale != 0:
                dscale += tl.sum(G * dot, axis=1)
        dq = _rows_dq_step(G, dq, k_block, k_out_offs, col_ok, do_ok, UPCAST, DOT_PRECISION)
        col0 += BLOCK_N
        k_block += BLOCK_N * stride_kn

    _store_dq(dq, scale, dq_ptr, dq_part_ptr, dq_offs, row0, row_ok, do_ok, direct, split, N, D)
    if pid_do == 0:
        if needs_dscale != 0:
            tl.store(dscale_part_ptr + split * tl.num_programs(0) + pid_m, tl.sum(dscale, axis=0))


@triton.jit(do_not_specialize=RUNTIME_SCALARS)
def _sum_splits_kernel(part_ptr, out_ptr, numel, splits, BLOCK: tl.constexpr):
    """out = sum over the ``splits`` planes of part (each ``numel`` long), in order; cast to
    out's dtype (a deterministic reduction of per-program partials)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros([BLOCK], tl.float32)
    ptr = part_ptr + offs
    for _split in range(0, splits):
        acc += tl.load(ptr, mask=ok, other=0.0)
        ptr += numel
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = sum(x) in fp32, in a fixed order (deterministic)."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EPILOGUE_BLOCK = 1024
_MERGE_BLOCK = 256  # the statistics merge keeps five vectors per entry: 256 keeps it far from spilling
_INDEX_BLOCK_R = 32  # rows per program of the positive-index row-dot kernel
_INDEX_BLOCK_D = 64
_INT32_LIMIT = 2**31
_MAX_D = 2**20  # keeps BLOCK x D in-tile offsets of the outputs int32

def _dot_precision(dtype: torch.dtype) -> str:
    # fp32: IEEE products so results match PyTorch's fp32 matmul (TF32 would lose ~10 bits).
    # bf16/fp16: the argument is ignored by Triton; tensor cores with fp32 accumulation.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_features(q: Tensor, k: Tensor, scale: Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("scale", scale)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if q.dim() != 2 or k.dim() != 2:
        raise ValueError(f"q and k must be 2-D (N, D) and (M, D); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same D; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if min(q.shape[0], k.shape[0], q.shape[1]) < 1:
        raise ValueError(f"N, M and D must be >= 1; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if max(q.shape[0], k.shape[0]) >= _INT32_LIMIT // 2 or q.shape[1] >= _MAX_D:
        raise ValueError(f"N and M must be < 2^30 and D < 2^{_MAX_D.bit_length() - 1} (int32 offsets in a tile); "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share a dtype in {_DTYPES} for backend 'triton'; got q {q.dtype}, k {k.dtype}")
    if k.device != q.device or scale.device != q.device:
        raise ValueError(f"q, k and scale must be on one device; got {q.device}, {k.device}, {scale.device}")
    if scale.numel() != 1 or not scale.dtype.is_floating_point:
        raise ValueError(f"scale must be a 0-dim floating tensor; got shape {tuple(scale.shape)}, {scale.dtype}")


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {value!r}")
    return value


def _vector(name: str, x: Tensor | None, length: int, device: torch.device, *, integer: bool = False) -> Tensor | None:
    """Validate an (length,) argument; return it contiguous in fp32 (int64 if ``integer``)."""
    if x is None:
        return None
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None; got {type(x).__name__}")
    if tuple(x.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},); got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device}; got {x.device}")
    if integer:
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers; got {x.dtype}")
        return x.to(torch.int64).contiguous()
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor; got {x.dtype}")
    return x.to(torch.float32).contiguous()


def _self_offset_arg(self_offset: int | None, n: int, m: int) -> int:
    """The kernels' offset: j == i + offset is excluded. None -> m (matches no j < m); values
    beyond [-n, m] exclude nothing either, so they are clamped (keeps the argument int32)."""
    if self_offset is None:
        return m
    if isinstance(self_offset, bool) or not isinstance(self_offset, int):
        raise TypeError(f"self_offset must be an int or None; got {self_offset!r}")
    return max(-n, min(m, self_offset))


def _positive_mode(positive_index, row_labels, col_labels, n, m, device) -> tuple[int, Tensor | None, Tensor | None]:
    """(0 none | 1 index | 2 labels, row key, column labels), validated."""
    index = _vector("positive_index", positive_index, n, device, integer=True)
    rows = _vector("row_labels", row_labels, n, device, integer=True)
    cols = _vector("col_labels", col_labels, m, device, integer=True)
    if (rows is None) != (cols is None):
        raise ValueError("row_labels and col_labels must be given together; got "
                         f"row_labels {'None' if rows is None else 'a tensor'}, "
                         f"col_labels {'None' if cols is None else 'a tensor'}")
    if index is not None and rows is not None:
        raise ValueError("give positives either by positive_index or by row_labels/col_labels, not both")
    if index is not None:
        return 1, index, None
    if rows is not None:
        return 2, rows, cols
    return 0, None, None


def _tile_safe(x: Tensor, block_rows: int) -> Tensor:
    """x itself, unless its strides could overflow the kernels' int32 offsets: inside a block of
    rows (local row * stride(0) + column * stride(1), column < max(D, 128) counting the masked
    tail of a D chunk) and the block step (block_rows * stride(0)); then a contiguous copy."""
    if block_rows * x.stride(0) + max(x.shape[1], 128) * x.stride(1) >= _INT32_LIMIT:
        return x.contiguous()
    return x


def _filled(n: int, value: float, device: torch.device) -> Tensor:
    out = empty(n, dtype=torch.float32, device=device)
    return out.fill_(value)


def _splits(blocks: int, other_programs: int, min_programs: int) -> tuple[int, int]:
    """Split ``blocks`` into (splits, blocks per split) so that other_programs * splits reaches
    min_programs (or splits = blocks), with no empty split."""
    wanted = max(1, min(blocks, triton.cdiv(min_programs, max(other_programs, 1))))
    per_split = max(1, blocks // wanted)
    return triton.cdiv(blocks, per_split), per_split


def forward_grid(n: int, m: int, compute_col: bool, config: ForwardConfig) -> tuple[int, int, int, int]:
    """(row groups, row blocks per group, column splits, column blocks per split).

    Without column statistics every program owns one row block (no column workspace). With
    them, row groups g_r and column splits g_c with g_r g_c ~ min_programs, g_r ~ sqrt(P N / M),
    which minimises the workspaces 8 (g_c N + g_r M) bytes."""
    row_blocks = triton.cdiv(n, config.block_m)
    col_blocks = triton.cdiv(m, config.block_n)
    if not compute_col:
        splits, per_split = _splits(col_blocks, row_blocks, config.min_programs)
        return row_blocks, 1, splits, per_split
    want_groups = max(1, min(row_blocks, round(math.sqrt(config.min_programs * n / m))))
    per_group = triton.cdiv(row_blocks, want_groups)
    groups = triton.cdiv(row_blocks, per_group)
    splits, per_split = _splits(col_blocks, groups, config.min_programs)
    return groups, per_group, splits, per_split


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
    config: ForwardConfig | None = None,
    shift_range: float = SHIFT_RANGE,
) -> LseStats:
    """Row / column / positive statistics of Z = scale q k^T + col_bias without storing Z.

    Args (see :mod:`csrc_triton.backend` for the contract):
        q: (N, D), k: (M, D), same dtype (float32, bfloat16, float16) and CUDA device (or CPU
            under Triton's interpreter).
        scale: 0-dim floating tensor on that device (read by the kernel: no host sync).
        col_bias: (M,) or None. self_offset: j == i + self_offset is excluded, or None.
        compute_col: also the column LSE.
        positive_index (N,) int, or row_labels (N,) and col_labels (M,) int: the positives.
        positive_sum, positive_lse: which positive statistics to return.
        config: tile override (tests). shift_range: the single-shift bound (tests; see the
            module docstring; a negative value forces one exponential per term).

    Returns:
        :class:`LseStats` of float32 tensors: row_lse (N,) (-inf for a row with nothing
        allowed), col_lse (M,), positive_sum (N,), positive_lse (N,); each (0,) if not asked for.

    Example::

        stats = lse_forward(q, k, torch.tensor(1 / 0.07, device=q.device), col_bias=None,
                            self_offset=None, compute_col=True, positive_index=None,
                            row_labels=None, col_labels=None, positive_sum=False, positive_lse=False)
    """
    _check_features(q, k, scale)
    compute_col = _check_flag("compute_col", compute_col)
    want_sum = _check_flag("positive_sum", positive_sum)
    want_lse = _check_flag("positive_lse", positive_lse)
    n, d = q.shape
    m = k.shape[0]
    device = q.device
    bias = _vector("col_bias", col_bias, m, device)
    offset = _self_offset_arg(self_offset, n, m)
    mode, row_key, col_key = _positive_mode(positive_index, row_labels, col_labels, n, m, device)
    any_pos = want_sum or want_lse
    labels = mode == 2 and any_pos
    if config is None:
        config = get_configs(device, q.dtype, _interpreting()).forward_for(compute_col, labels)
    scale = scale.reshape(()).to(torch.float32)
    q = _tile_safe(q, config.block_m)
    k = _tile_safe(k, config.block_n)
    f32 = dict(dtype=torch.float32, device=device)
    dummy_f = torch.empty(1, **f32)
    dummy_i = torch.empty(1, dtype=torch.int64, device=device)

    groups, per_group, splits, per_split = forward_grid(n, m, compute_col, config)
    row_ws = torch.empty(5 if labels else 2, splits, n, **f32)
    col_ws = torch.empty(2, groups, m, **f32) if compute_col else dummy_f
    _lse_forward_kernel[(groups, splits)](
        q, k, scale, dummy_f if bias is None else bias,
        row_key if labels else dummy_i, col_key if labels else dummy_i,
        row_ws, col_ws,
        n, m, d,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        offset, int(bias is not None), int(labels and want_lse), float(shift_range),
        per_group, per_split,
        COMPUTE_COL=compute_col, LABELS=labels,
        DOT_PRECISION=_dot_precision(q.dtype),
        UPCAST=_interpreting() and q.dtype == torch.bfloat16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )

    row_lse = empty(n, **f32)
    pos_sum = empty(n if want_sum else 0, **f32)
    pos_lse = empty(n if want_lse else 0, **f32)
    _merge_stats_kernel[(triton.cdiv(n, _MERGE_BLOCK),)](
        row_ws, row_lse, pos_sum if want_sum else dummy_f, pos_lse if want_lse else dummy_f,
        n, splits, int(want_sum), int(want_lse), LABELS=labels, BLOCK=_MERGE_BLOCK)
    if compute_col:
        col_lse = empty(m, **f32)
        _merge_stats_kernel[(triton.cdiv(m, _MERGE_BLOCK),)](
            col_ws, col_lse, dummy_f, dummy_f, m, groups, 0, 0, LABELS=False, BLOCK=_MERGE_BLOCK)
    else:
        col_lse = empty(0, **f32)

    if mode == 1 and any_pos:
        q_i = _tile_safe(q, _INDEX_BLOCK_R)
        _positive_index_kernel[(triton.cdiv(n, _INDEX_BLOCK_R),)](
            q_i, k, scale, dummy_f if bias is None else bias, row_key,
            pos_sum if want_sum else dummy_f, pos_lse if want_lse else dummy_f,
            n, m, d, q_i.stride(0), q_i.stride(1), k.stride(0), k.stride(1),
            offset, int(bias is not None), int(want_sum), int(want_lse),
            BLOCK_R=_INDEX_BLOCK_R, BLOCK_D=_INDEX_BLOCK_D, num_warps=4,
        )
    elif mode == 0:
        # No positives: P(i) is empty for every row.
        if want_sum:
            pos_sum.fill_(0.0)
        if want_lse:
            pos_lse.fill_(float("-inf"))
    return LseStats(row_lse, col_lse, pos_sum, pos_lse)


def backward_plan(
    n: int, m: int, d: int, config: BackwardConfig, *, needs_dq: bool, needs_dk: bool, needs_dbias: bool,
    deterministic: bool, wide: bool | None = None,
) -> list[dict]:
    """The kernel launches of one backward call, as dicts: kernel ("fused" or "rows"), its
    constexpr flags (NEEDS_DQ, NEEDS_DK, WIDE for "fused"), grid, splits, blocks per split, and
    output modes. Shared by :func:`lse_backward` and :mod:`csrc_triton.static_check`.

    Choice: deterministic -> owner kernels (rows for dq; fused without dq for dk / dbias /
    dscale); otherwise dq and dk together in the fused kernel (wide when D > 2 BLOCK_DO), dq
    alone in the rows kernel unless D is wide."""
    if wide is None:
        wide = d > 2 * config.block_do
    row_blocks = triton.cdiv(n, config.block_m)
    col_blocks = triton.cdiv(m, config.block_n)
    do_chunks = triton.cdiv(d, config.block_do)

    def fused(needs_dq_: bool, needs_dk_: bool, wide_: bool, partial_dk: bool) -> dict:
        do_blocks = do_chunks if (needs_dk_ and not wide_) else 1
        splits, per_split = _splits(row_blocks, col_blocks * do_blocks, config.min_programs)
        if not needs_dk_:
            dk_mode = 0  # unused
        elif wide_:
            dk_mode = 1  # atomics
        elif splits == 1:
            dk_mode = 0
        else:
            dk_mode = 2 if partial_dk else 1
        return dict(kernel="fused", NEEDS_DQ=needs_dq_, NEEDS_DK=needs_dk_, WIDE=wide_,
                    BLOCK_DO=config.wide_block_do if wide_ else config.block_do,
                    grid=(col_blocks, do_blocks, splits), splits=splits, per_split=per_split, dk_mode=dk_mode)

    def rows() -> dict:
        splits, per_split = _splits(col_blocks, row_blocks * do_chunks, config.min_programs)
        return dict(kernel="rows", BLOCK_DO=config.block_do, grid=(row_blocks, do_chunks, splits), splits=splits,
                    per_split=per_split)

    plan = []
    if deterministic:
        if needs_dq:
            plan.append(rows())
        if needs_dk or needs_dbias or not needs_dq:
            plan.append(fused(False, needs_dk, False, partial_dk=True))
    elif needs_dq and needs_dk:
        plan.append(fused(True, True, wide, partial_dk=False))
    elif needs_dq:
        if wide:
            plan.append(fused(True, False, True, partial_dk=False))
        else:
            plan.append(rows())
            if needs_dbias:
                plan.append(fused(False, False, False, partial_dk=False))
    else:
        plan.append(fused(False, needs_dk, wide and needs_dk, partial_dk=False))
    return plan


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
    config: BackwardConfig | None = None,
    wide: bool | None = None,
) -> LseGrads:
    """Gradients of sum_i g_i row_lse_i + sum_j h_j col_lse_j + sum_i w_i positive_sum_i
    + sum_i u_i positive_lse_i with respect to q, k, scale and col_bias.

    G_ij = [allowed] (g_i exp(Z_ij - r_i) + h_j exp(Z_ij - c_j)) + [j in P(i)] (w_i + u_i exp(Z_ij -
    positive_lse_i)); dq = s G k, dk = s G^T q, dscale = sum G_ij q_i.k_j, dbias_j = sum_i G_ij.

    Args (see :mod:`csrc_triton.backend`):
        q, k, scale, col_bias, self_offset, positive_index, row_labels, col_labels: as in the
            forward. stats: the forward's :class:`LseStats` (row_lse always; col_lse when
            grad_col is given; positive_lse when grad_positive_lse is given).
        grad_row (N,); grad_col (M,) or None (no column term); grad_positive_sum (N,) or None;
            grad_positive_lse (N,) or None.
        needs_dq, needs_dk, needs_dbias: which gradients to compute (others are None, and
            their work and buffers are skipped).
        deterministic: no floating-point atomics; bitwise-reproducible results (see the
            module docstring for the cost).
        config, wide: test knobs (tiles; force or forbid the wide form of the fused kernel).

    Returns:
        :class:`LseGrads`: dq (N, D) in q's dtype or None, dk (M, D) in k's dtype or None,
        dscale 0-dim float32, dbias (M,) float32 or None.
    """
    _check_features(q, k, scale)
    needs_dq = _check_flag("needs_dq", needs_dq)
    needs_dk = _check_flag("needs_dk", needs_dk)
    needs_dbias = _check_flag("needs_dbias", needs_dbias)
    deterministic = _check_flag("deterministic", deterministic)
    n, d = q.shape
    m = k.shape[0]
    device = q.device
    if not isinstance(stats, tuple) or len(stats) != 4:
        raise TypeError(f"stats must be the forward's LseStats; got {type(stats).__name__}")
    stats = LseStats(*stats)
    row_lse = _vector("stats.row_lse", stats.row_lse, n, device)
    g = _vector("grad_row", grad_row, n, device)
    if g is None:
        raise ValueError(f"grad_row must be a ({n},) tensor; got None")
    h = _vector("grad_col", grad_col, m, device)
    col_lse = _vector("stats.col_lse", stats.col_lse, m, device) if h is not None else None
    w = _vector("grad_positive_sum", grad_positive_sum, n, device)
    u = _vector("grad_positive_lse", grad_positive_lse, n, device)
    plse = _vector("stats.positive_lse", stats.positive_lse, n, device) if u is not None else None
    bias = _vector("col_bias", col_bias, m, device)
    offset = _self_offset_arg(self_offset, n, m)
    mode, row_key, col_key = _positive_mode(positive_index, row_labels, col_labels, n, m, device)
    if w is None and u is None:
        mode = 0  # no positive term in G
    if config is None:
        config = get_configs(device, q.dtype, _interpreting()).backward
    scale = scale.reshape(()).to(torch.float32)
    q = _tile_safe(q, config.block_m)
    k = _tile_safe(k, config.block_n)

    f32 = dict(dtype=torch.float32, device=device)
    dummy_f = torch.empty(1, **f32)
    dummy_i = torch.empty(1, dtype=torch.int64, device=device)
    zeros_n = torch.zeros(n, **f32) if mode != 0 and (w is None or u is None) else None
    common = (
        q, k, scale, dummy_f if bias is None else bias,
        row_lse, g, dummy_f if h is None else col_lse, dummy_f if h is None else h,
        dummy_i if mode == 0 else row_key, col_key if mode == 2 else dummy_i,
        dummy_f if mode == 0 else (zeros_n if w is None else w),
        dummy_f if mode == 0 else (zeros_n if u is None else u),
        dummy_f if (mode == 0 or u is None) else plse,
    )
    constexprs = dict(
        HAS_COL=h is not None, POS=mode,
        DOT_PRECISION=_dot_precision(q.dtype), UPCAST=_interpreting() and q.dtype == torch.bfloat16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    has_plse = int(mode != 0 and u is not None)

    dq = empty(n, d, dtype=q.dtype, device=device) if needs_dq else None
    dk = empty(m, d, dtype=k.dtype, device=device) if needs_dk else None
    dscale = empty(dtype=torch.float32, device=device)
    dbias = empty(m, **f32) if needs_dbias else None

    plan = backward_plan(n, m, d, config, needs_dq=needs_dq, needs_dk=needs_dk, needs_dbias=needs_dbias,
                         deterministic=deterministic, wide=wide)
    dscale_done = False
    for launch in plan:
        splits, grid = launch["splits"], launch["grid"]
        if launch["kernel"] == "rows":
            direct = splits == 1
            dq_part = dummy_f if direct else torch.empty(splits, n, d, **f32)
            has_fused = any(step["kernel"] == "fused" for step in plan)
            dscale_part = torch.empty(splits * grid[0], **f32) if not has_fused else dummy_f
            _lse_backward_rows_kernel[grid](
                *common, dq, dq_part, dscale_part,
                n, m, d, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                offset, int(bias is not None), has_plse, int(not has_fused), int(direct),
                launch["per_split"], BLOCK_DO=launch["BLOCK_DO"], **constexprs)
            if not direct:
                _sum_splits_kernel[(triton.cdiv(n * d, _EPILOGUE_BLOCK),)](
                    dq_part, dq, n * d, splits, BLOCK=_EPILOGUE_BLOCK)
            if not has_fused:
                _sum_kernel[(1,)](dscale_part, dscale, dscale_part.numel(), BLOCK=_EPILOGUE_BLOCK)
                dscale_done = True
            continue

        dk_mode = launch["dk_mode"]
        dq_acc = torch.zeros(n, d, **f32) if launch["NEEDS_DQ"] else dummy_f
        if launch["NEEDS_DK"] and dk_mode == 1:
            dk_acc = torch.zeros(m, d, **f32)
        elif launch["NEEDS_DK"] and dk_mode == 2:
            dk_acc = torch.empty(splits, m, d, **f32)
        else:
            dk_acc = dummy_f
        dscale_part = torch.empty(splits * grid[0], **f32)
        dbias_part = torch.empty(splits, m, **f32) if needs_dbias else dummy_f
        _lse_backward_kernel[grid](
            *common, dq_acc, dk if (launch["NEEDS_DK"] and dk_mode == 0) else (q if dk is None else dk),
            dk_acc, dscale_part, dbias_part,
            n, m, d, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            offset, int(bias is not None), has_plse, int(needs_dbias), dk_mode,
            launch["per_split"],
            NEEDS_DQ=launch["NEEDS_DQ"], NEEDS_DK=launch["NEEDS_DK"], WIDE=launch["WIDE"], BLOCK_DO=launch["BLOCK_DO"],
            **constexprs)
        if launch["NEEDS_DQ"]:
            _sum_splits_kernel[(triton.cdiv(n * d, _EPILOGUE_BLOCK),)](dq_acc, dq, n * d, 1, BLOCK=_EPILOGUE_BLOCK)
        if launch["NEEDS_DK"] and dk_mode != 0:
            _sum_splits_kernel[(triton.cdiv(m * d, _EPILOGUE_BLOCK),)](
                dk_acc, dk, m * d, splits if dk_mode == 2 else 1, BLOCK=_EPILOGUE_BLOCK)
        if needs_dbias:
            _sum_splits_kernel[(triton.cdiv(m, _EPILOGUE_BLOCK),)](dbias_part, dbias, m, splits, BLOCK=_EPILOGUE_BLOCK)
        if not dscale_done:
            _sum_kernel[(1,)](dscale_part, dscale, dscale_part.numel(), BLOCK=_EPILOGUE_BLOCK)
            dscale_done = True
    return LseGrads(dq, dk, dscale, dbias)
