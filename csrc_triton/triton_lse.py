"""Triton kernels for the row / column log-sum-exp of S = scale * Q K^T and its gradient.

Notation: Q (N, D), K (M, D), S = s * Q K^T (never stored), "allowed" entries exclude the
diagonal (i, i) when ``exclude_diagonal``.

Forward (:func:`lse_forward`), one pass over the tiles of S:
    r_i = log sum_j exp(S_ij)        (row LSE, float32 (N,))
    c_j = log sum_i exp(S_ij)        (column LSE, float32 (M,), when ``compute_col``)
Grid (row blocks, column splits). A program owns BLOCK_M rows and a contiguous range of column
blocks; it keeps the row statistics (max, sum) online in registers and writes them to a
(splits, N) workspace; the per-tile column statistics are merged into one packed int64 per
column (high 32 bits: max, low 32 bits: sum, both fp32) with a compare-and-swap loop, which is
exact whatever the scale (no fixed shift). Two tiny kernels then turn the statistics into
lse = max + log(sum).

Backward (:func:`lse_backward`) recomputes each S tile from Q, K (FlashAttention-2 style):
    G_ij = g_i exp(S_ij - r_i) + h_j exp(S_ij - c_j) [+ w_i if j is a positive of i]
           (allowed entries; 0 elsewhere)
    dQ = s G K,   dK = s G^T Q,   ds = sum_ij G_ij (q_i . k_j)
The optional positive term (w, positives by index offset or by labels) lets a loss fold the
gradient of its positive logits into G, so that it cancels the softmax part in fp32 before dQ/dK
are rounded to bf16/fp16.
Grid (column blocks, output-D chunks, row splits); a program owns BLOCK_N keys and loops over its
row blocks. Two variants of the output side:
  * D <= 2 * BLOCK_DO: the program also owns a BLOCK_DO wide slice of the output D; it keeps its
    dK slice in registers (plain store at the end) and atomically adds its dQ contributions to an
    fp32 (N, D) buffer. Each output chunk recomputes S.
  * "wide" (D > 2 * BLOCK_DO, e.g. D = 768): one program per key block; each S tile is computed
    once and, held as G, multiplies every BLOCK_DO chunk of K and Q; both dQ and dK contributions
    are added atomically to fp32 buffers.
When there are few key blocks the row range is split across programs too (grid axis 2), and
dK is then added atomically. ds: one partial per program, summed in a fixed order.

FLOPs (a multiply-add counts 2), n_do = ceil(D / BLOCK_DO):
    forward:             2 N M D        (one tile product gives r and c together)
    backward, narrow:    2 N M D n_do   (S recompute per output chunk) + 2 N M D (dQ) + 2 N M D (dK)
    backward, wide:      6 N M D        (S recompute once + dQ + dK)
    total:  8 N M D -- the minimum for a symmetric loss -- when D <= BLOCK_DO (one chunk) and
            for every D > 2 * BLOCK_DO (wide); 10 N M D for BLOCK_DO < D <= 2 * BLOCK_DO.
            BLOCK_DO = 128 for bf16/fp16 on sm_90/sm_80, 64 for fp32, so D = 128: 8 N M D,
            D = 256: 10 N M D, D = 768: 8 N M D.
    atomics (fp32 adds): dQ: N D ceil(M / BLOCK_N); wide adds dK: M D ceil(N / BLOCK_M)
            (each N M D / 64 with the 64 x 64 backward tiles of sm_90).
Exponentials: 2 N M (forward: row and column statistics) + 2 N M per S computation (backward).
Saved state: r (N,) and c (M,). Workspaces: (splits, N) row statistics, ceil(M / BLOCK_N) *
BLOCK_N packed column statistics, (N, D) fp32 dQ (and in wide / row-split mode (M, D) fp32 dK)
buffers, one float per program for ds. Nothing N x M.

Precision: tile products accumulate in fp32. fp32 inputs use ``input_precision="ieee"`` (no TF32)
so fp32 results match PyTorch's fp32 matmul (these run on FMA units, not tensor cores); bf16/fp16
inputs use the tensor cores, and G is rounded to the input dtype for the dQ/dK products (as
PyTorch's own backward rounds the softmax gradient). Safe for scale up to 100 and beyond: every
exp() argument is <= 0 after the max shift; -inf statistics are guarded (exp(-inf - -inf)).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._alloc import empty
from .tile_configs import BackwardConfig, ForwardConfig, get_configs

__all__ = ["lse_forward", "lse_backward"]

# (max, sum) = (-inf, 0) packed: fp32 bits of -inf (0xFF800000) high, of 0.0 low, as a signed
# int64; a constant fill (no host-to-device copy), so it is also fine under CUDA-graph capture.
_PACKED_IDENTITY = 0xFF80000000000000 - 2**64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")



# --------------------------------------------------------------------------------------------
# (max, sum) statistics
# --------------------------------------------------------------------------------------------
# Merge of two (max, sum exp(x - max)) pairs, exact whatever the scale:
#   m = max(m1, m2),  s = s1 exp(m1 - m) + s2 exp(m2 - m);  (-inf, 0) is the identity.
# Packed form: one int64 with the fp32 bits of m high and of s low.
#
# The kernels are written without nested @triton.jit helpers: Triton 3.6's interpreter patches
# triton.language on a nested call and never restores it, which breaks triton.compile later in
# the same process (static_check in the test suite). Integer offsets are advanced by pointer
# increments rather than recomputed: the interpreter checks every int32 multiply for overflow,
# at a cost of milliseconds. The compiled code is the same either way.


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_dot(
    q_block, k_block, q_offs, kt_offs, q_step, k_step, row_ok, col_ok, offs_d, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dot_ij = q_i . k_j for one (BLOCK_M x BLOCK_N) tile, over D in BLOCK_D chunks (masked tail
    chunk; K loaded transposed), accumulated in fp32. Shared by the forward and the backward's
    recompute; Triton inlines it."""
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
def _lse_forward_kernel(
    q_ptr, k_ptr, scale_ptr,
    row_max_ptr, row_sum_ptr,  # (splits, N) fp32 workspaces
    col_stats_ptr,  # (ceil(M / BLOCK_N) * BLOCK_N,) int64 packed (max, sum), init (-inf, 0)
    N, M, D,
    stride_qn, stride_qd, stride_kn, stride_kd,
    col_blocks_per_split,
    EXCLUDE_DIAGONAL: tl.constexpr,
    COMPUTE_COL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (row block, column split): row statistics of its rows over its column range,
    column statistics merged into the packed global ones.

    UPCAST (interpreter with bf16 only): Triton 3.6's interpreter runs tl.dot as a NumPy matmul
    on the raw 16-bit storage of bf16, so tiles are widened to fp32 first (exact). Compiled
    kernels never set it.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    # Addresses = scalar base pointer (64-bit, advanced per block) + small loop-invariant int32
    # offsets within a tile: no tensor of 64-bit pointers is carried across loop iterations
    # (that costs two registers per element), and no int32 offset can overflow for large N*D.
    q_block = q_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_qn
    q_offs = tl.arange(0, BLOCK_M)[:, None] * stride_qn + offs_d[None, :] * stride_qd
    kt_offs = tl.arange(0, BLOCK_N)[None, :] * stride_kn + offs_d[:, None] * stride_kd
    q_step = BLOCK_D * stride_qd
    k_step = BLOCK_D * stride_kd
    k_block_step = BLOCK_N * stride_kn

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)

    first_block = split * col_blocks_per_split
    last_block = tl.minimum(first_block + col_blocks_per_split, tl.cdiv(M, BLOCK_N))
    offs_n = first_block * BLOCK_N + tl.arange(0, BLOCK_N)
    k_block = k_ptr + (first_block * BLOCK_N).to(tl.int64) * stride_kn
    for _col_block in range(first_block, last_block):
        col_ok = offs_n < M
        if COMPUTE_COL:
            # Read the global column statistics before the tile product, so that the load's
            # latency hides behind it; the CAS below retries only if another program merged in
            # between.
            stats_ptrs = col_stats_ptr + offs_n
            current = tl.load(stats_ptrs, cache_modifier=".cg")
        # dot_ij = q_i . k_j over D in BLOCK_D chunks (masked tail chunk); K loaded transposed.
        dot = _tile_dot(q_block, k_block, q_offs, kt_offs, q_step, k_step, row_ok, col_ok, offs_d, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)
        allowed = row_ok[:, None] & col_ok[None, :]
        if EXCLUDE_DIAGONAL:
            allowed = allowed & (offs_m[:, None] != offs_n[None, :])
        # S_ij = s * dot_ij on allowed entries, -inf elsewhere.
        logits = tl.where(allowed, dot * scale, float("-inf"))

        # Online row statistics: m' = max(m, max_j S_ij), l' = l exp(m - m') + sum_j exp(S_ij - m').
        # A row with nothing allowed yet has m' = -inf: shift by 0 so exp(-inf - 0) = 0, not NaN.
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        row_max = new_max

        if COMPUTE_COL:
            # This tile's column statistics (m_t, l_t), merged exactly into the global (m, l):
            #   m' = max(m, m_t),  l' = l exp(m - m') + l_t exp(m_t - m').
            tile_max = tl.max(logits, axis=0)
            tile_shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)
            tile_sum = tl.sum(tl.exp(logits - tile_shift[None, :]), axis=0)
            # One int64 per column (max bits high, sum bits low), updated by compare-and-swap
            # until every lane succeeded; lanes already done issue a no-op CAS (cmp == val)
            # because atomic_cas takes no mask. The buffer is padded to whole column blocks,
            # so every address is valid and distinct.
            todo = offs_n >= 0  # every lane
            while tl.sum(todo.to(tl.int32), axis=0) > 0:
                cur_max = (current >> 32).to(tl.int32).to(tl.float32, bitcast=True)
                cur_sum = current.to(tl.int32).to(tl.float32, bitcast=True)
                merged_max = tl.maximum(cur_max, tile_max)
                merged_shift = tl.where(merged_max == float("-inf"), 0.0, merged_max)
                merged_sum = (cur_sum * tl.exp(cur_max - merged_shift)
                              + tile_sum * tl.exp(tile_max - merged_shift))
                packed = ((merged_max.to(tl.int32, bitcast=True).to(tl.int64) << 32)
                          | (merged_sum.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF))
                seen = tl.atomic_cas(stats_ptrs, current, tl.where(todo, packed, current), sem="relaxed")
                # Integer comparison: NaN statistics cannot make the loop spin forever.
                todo = todo & (seen != current)
                current = seen
        offs_n += BLOCK_N
        k_block += k_block_step

    tl.store(row_max_ptr + split * N + offs_m, row_max, mask=row_ok)
    tl.store(row_sum_ptr + split * N + offs_m, row_sum, mask=row_ok)


@triton.jit
def _row_lse_finalize_kernel(row_max_ptr, row_sum_ptr, row_lse_ptr, N, SPLITS, BLOCK: tl.constexpr):
    """r_i = m_i + log(l_i) after merging the SPLITS partial (m, l) of row i."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for split in range(0, SPLITS):
        m2 = tl.load(row_max_ptr + split * N + offs, mask=ok, other=float("-inf"))
        s2 = tl.load(row_sum_ptr + split * N + offs, mask=ok, other=0.0)
        merged = tl.maximum(m, m2)
        # All -inf: shift by 0 so that exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
        shift = tl.where(merged == float("-inf"), 0.0, merged)
        s = s * tl.exp(m - shift) + s2 * tl.exp(m2 - shift)
        m = merged
    # An empty row: (-inf, 0) -> -inf + log(0) = -inf.
    tl.store(row_lse_ptr + offs, m + tl.log(s), mask=ok)


@triton.jit
def _packed_lse_finalize_kernel(stats_ptr, lse_ptr, M, BLOCK: tl.constexpr):
    """c_j = m_j + log(l_j) from the packed (m, l) of column j."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    packed = tl.load(stats_ptr + offs, mask=ok, other=0)
    m = (packed >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    s = packed.to(tl.int32).to(tl.float32, bitcast=True)
    tl.store(lse_ptr + offs, m + tl.log(s), mask=ok)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _lse_backward_kernel(
    q_ptr, k_ptr, scale_ptr,
    row_lse_ptr, col_lse_ptr, grad_row_ptr, grad_col_ptr,
    dq_acc_ptr,  # (N, D) fp32, zero-initialised, contiguous; dQ contributions added atomically
    dk_ptr,  # (M, D) contiguous: k's dtype, or fp32 zero-initialised when DK_ATOMIC
    dscale_part_ptr,  # (row splits * column blocks,) fp32
    grad_pos_ptr, row_labels_ptr, col_labels_ptr,  # positive term (POSITIVES != 0)
    N, M, D,
    stride_qn, stride_qd, stride_kn, stride_kd,
    row_blocks_per_split,
    positive_offset,
    EXCLUDE_DIAGONAL: tl.constexpr,
    HAS_COL: tl.constexpr,
    POSITIVES: tl.constexpr,  # 0: none, 1: j = (i + positive_offset) mod M, 2: equal labels
    DK_ATOMIC: tl.constexpr,
    WIDE: tl.constexpr,  # loop over the output D inside (grid axis 1 has size 1); implies DK_ATOMIC
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """Program (column block, output-D chunk, row split), looping over its row blocks: the dK
    rows of its keys restricted to its D chunk (registers; WIDE: every chunk, atomic adds), the
    dQ contributions of its keys (atomic adds), a partial ds (first D chunk only)."""
    pid_n = tl.program_id(0)
    pid_do = tl.program_id(1)
    split = tl.program_id(2)
    scale = tl.load(scale_ptr).to(tl.float32)
    in_dtype = q_ptr.dtype.element_ty

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < M
    offs_d = tl.arange(0, BLOCK_D)
    offs_do = pid_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    # Scalar 64-bit base pointers advanced per block + loop-invariant int32 offsets in a tile
    # (see the forward kernel).
    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    k_block = k_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_kn
    kt_offs = local_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    q_offs = local_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q_out_offs = local_m[:, None] * stride_qn + offs_do[None, :] * stride_qd
    dq_offs = local_m[:, None] * D + offs_do[None, :]
    q_step = BLOCK_D * stride_qd
    k_step = BLOCK_D * stride_kd

    if HAS_COL:
        col_lse = tl.load(col_lse_ptr + offs_n, mask=col_ok, other=0.0)
        grad_col = tl.load(grad_col_ptr + offs_n, mask=col_ok, other=0.0)
        # Column term only where h_j != 0 and c_j > -inf (exp(-inf - -inf) would be NaN);
        # a NaN c_j stays live so that NaN inputs give NaN gradients.
        col_live = col_ok & (grad_col != 0.0) & (col_lse != float("-inf"))
    if POSITIVES == 2:
        col_labels = tl.load(col_labels_ptr + offs_n, mask=col_ok, other=0)
    k_out_offs = local_n[:, None] * stride_kn + offs_do[None, :] * stride_kd
    dk_block = dk_ptr + (pid_n * BLOCK_N).to(tl.int64) * D
    dk_offs = local_n[:, None] * D + offs_do[None, :]
    if not WIDE:
        # The slice k_j[offs_do] that dQ needs, loaded once.
        k_out = tl.load(k_block + k_out_offs, mask=col_ok[:, None] & do_ok[None, :], other=0.0)
        if UPCAST:
            k_out = k_out.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    dscale = tl.zeros([BLOCK_N], tl.float32)

    first_block = split * row_blocks_per_split
    last_block = tl.minimum(first_block + row_blocks_per_split, tl.cdiv(N, BLOCK_M))
    offs_m = first_block * BLOCK_M + local_m
    q_block = q_ptr + (first_block * BLOCK_M).to(tl.int64) * stride_qn
    dq_block = dq_acc_ptr + (first_block * BLOCK_M).to(tl.int64) * D
    q_block_step = BLOCK_M * stride_qn
    dq_block_step = BLOCK_M * D
    for _row_block in range(first_block, last_block):
        row_ok = offs_m < N
        # Recompute dot_ij = q_i . k_j over the full D.
        dot = _tile_dot(q_block, k_block, q_offs, kt_offs, q_step, k_step, row_ok, col_ok, offs_d, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)
        logits = dot * scale
        allowed = row_ok[:, None] & col_ok[None, :]
        if EXCLUDE_DIAGONAL:
            allowed = allowed & (offs_m[:, None] != offs_n[None, :])

        row_lse = tl.load(row_lse_ptr + offs_m, mask=row_ok, other=0.0)
        grad_row = tl.load(grad_row_ptr + offs_m, mask=row_ok, other=0.0)
        row_live = row_ok & (grad_row != 0.0) & (row_lse != float("-inf"))
        # G_ij = g_i softmax_row(S)_ij = g_i exp(S_ij - r_i)
        grad = tl.where(allowed & row_live[:, None],
                        grad_row[:, None] * tl.exp(logits - row_lse[:, None]), 0.0)
        if HAS_COL:
            #      + h_j softmax_col(S)_ij = h_j exp(S_ij - c_j)
            grad += tl.where(allowed & col_live[None, :],
                             grad_col[None, :] * tl.exp(logits - col_lse[None, :]), 0.0)
        if POSITIVES != 0:
            #      + w_i on the positives j of row i (dL/dS_ij of a term sum_i w_i sum_{j in P(i)} S_ij),
            # added here so that it cancels the softmax term in fp32, before any rounding.
            grad_pos = tl.load(grad_pos_ptr + offs_m, mask=row_ok, other=0.0)
            if POSITIVES == 1:
                is_positive = offs_n[None, :] == ((offs_m + positive_offset) % M)[:, None]
            else:
                row_labels = tl.load(row_labels_ptr + offs_m, mask=row_ok, other=0)
                is_positive = row_labels[:, None] == col_labels[None, :]
            grad += tl.where(allowed & is_positive, grad_pos[:, None], 0.0)
        if pid_do == 0:
            # ds = sum_ij G_ij dS_ij/ds = sum_ij G_ij (q_i . k_j)
            dscale += tl.sum(grad * dot, axis=0)

        # G in the input dtype for the tensor-core products (fp32 inputs: unchanged).
        grad_in = grad.to(in_dtype)
        if UPCAST:
            grad_in = grad_in.to(tl.float32)
        if WIDE:
            # One G tile serves every BLOCK_DO chunk of the output D (no recompute); dK
            # contributions are added atomically like dQ's.
            q_out_chunk = q_block
            k_out_chunk = k_block
            dq_chunk = dq_block
            dk_chunk = dk_block
            for do_start in range(0, D, BLOCK_DO):
                do_in = offs_do < D - do_start
                q_out = tl.load(q_out_chunk + q_out_offs, mask=row_ok[:, None] & do_in[None, :], other=0.0)
                k_out = tl.load(k_out_chunk + k_out_offs, mask=col_ok[:, None] & do_in[None, :], other=0.0)
                if UPCAST:
                    q_out = q_out.to(tl.float32)
                    k_out = k_out.to(tl.float32)
                # dK_j += s sum_i G_ij q_i
                dk_part = tl.dot(tl.trans(grad_in), q_out, input_precision=DOT_PRECISION) * scale
                tl.atomic_add(dk_chunk + dk_offs, dk_part, mask=col_ok[:, None] & do_in[None, :], sem="relaxed")
                # dQ_i += s sum_j G_ij k_j
                dq_part = tl.dot(grad_in, k_out, input_precision=DOT_PRECISION) * scale
                tl.atomic_add(dq_chunk + dq_offs, dq_part, mask=row_ok[:, None] & do_in[None, :], sem="relaxed")
                q_out_chunk += BLOCK_DO * stride_qd
                k_out_chunk += BLOCK_DO * stride_kd
                dq_chunk += BLOCK_DO
                dk_chunk += BLOCK_DO
        else:
            q_out = tl.load(q_block + q_out_offs, mask=row_ok[:, None] & do_ok[None, :], other=0.0)
            if UPCAST:
                q_out = q_out.to(tl.float32)
            # dK_j += sum_i G_ij q_i   (times s after the loop)
            dk = tl.dot(tl.trans(grad_in), q_out, dk, input_precision=DOT_PRECISION)
            # dQ_i += s sum_j G_ij k_j
            dq_part = tl.dot(grad_in, k_out, input_precision=DOT_PRECISION) * scale
            tl.atomic_add(dq_block + dq_offs, dq_part, mask=row_ok[:, None] & do_ok[None, :], sem="relaxed")

        offs_m += BLOCK_M
        q_block += q_block_step
        dq_block += dq_block_step

    if not WIDE:
        dk = dk * scale
        if DK_ATOMIC:
            tl.atomic_add(dk_block + dk_offs, dk, mask=col_ok[:, None] & do_ok[None, :], sem="relaxed")
        else:
            tl.store(dk_block + dk_offs, dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None] & do_ok[None, :])
    if pid_do == 0:
        tl.store(dscale_part_ptr + split * tl.num_programs(0) + pid_n, tl.sum(dscale, axis=0))


@triton.jit
def _sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = sum(x) in fp32, in a fixed order (deterministic)."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@triton.jit
def _cast_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=ok).to(dst_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EPILOGUE_BLOCK = 1024


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32: IEEE products so results match PyTorch's fp32 matmul (TF32 would lose ~10 bits).
    # bf16/fp16: the argument is ignored by Triton; tensor cores with fp32 accumulation.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_inputs(q: Tensor, k: Tensor, scale: Tensor) -> None:
    if q.dim() != 2 or k.dim() != 2:
        raise ValueError(f"q and k must be 2-D (N, D) and (M, D); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same D; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[0] < 1 or k.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"N, M and D must be >= 1; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share a dtype in {_DTYPES}; got q {q.dtype}, k {k.dtype}")
    if k.device != q.device or scale.device != q.device:
        raise ValueError(f"q, k and scale must be on one device; got {q.device}, {k.device}, {scale.device}")
    if scale.numel() != 1:
        raise ValueError(f"scale must be a 0-dim tensor; got shape {tuple(scale.shape)}")


def _splits(blocks: int, other_programs: int, min_programs: int) -> tuple[int, int]:
    """Split ``blocks`` into (splits, blocks per split) so that other_programs * splits reaches
    about min_programs, with no empty split."""
    wanted = max(1, min(blocks, triton.cdiv(min_programs, max(other_programs, 1))))
    per_split = triton.cdiv(blocks, wanted)
    return triton.cdiv(blocks, per_split), per_split


def lse_forward(
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    exclude_diagonal: bool,
    compute_col: bool,
    *,
    config: ForwardConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exp of S = scale * q @ k.T, without storing S.

    Args:
        q: (N, D) queries; k: (M, D) keys; same dtype (fp32, bf16, fp16) and device.
        scale: 0-dim float32 tensor on the same device (read by the kernel, no host sync).
        exclude_diagonal: drop the entries (i, i) (for N == M: self-similarities).
        compute_col: also return the column LSE.
        config: tile override (tests); default from :mod:`csrc_triton.tile_configs`.

    Returns:
        row_lse: float32 (N,), -inf for a row with no allowed entry;
        col_lse: float32 (M,) if ``compute_col`` else float32 (0,).
    """
    _check_inputs(q, k, scale)
    n, d = q.shape
    m = k.shape[0]
    device = q.device
    if config is None:
        config = get_configs(device, q.dtype, _interpreting())[0]
    scale = scale.reshape(()).to(torch.float32)

    row_blocks = triton.cdiv(n, config.block_m)
    col_blocks = triton.cdiv(m, config.block_n)
    splits, col_blocks_per_split = _splits(col_blocks, row_blocks, config.min_programs)

    row_max = torch.empty(splits, n, dtype=torch.float32, device=device)
    row_sum = torch.empty(splits, n, dtype=torch.float32, device=device)
    if compute_col:
        # (-inf, 0) per column, padded to whole column blocks so every CAS address is valid.
        col_stats = torch.full((col_blocks * config.block_n,), _PACKED_IDENTITY, dtype=torch.int64, device=device)
    else:
        col_stats = torch.empty(1, dtype=torch.int64, device=device)

    _lse_forward_kernel[(row_blocks, splits)](
        q, k, scale, row_max, row_sum, col_stats,
        n, m, d,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        col_blocks_per_split,
        EXCLUDE_DIAGONAL=bool(exclude_diagonal),
        COMPUTE_COL=bool(compute_col),
        DOT_PRECISION=_dot_precision(q.dtype),
        UPCAST=_interpreting() and q.dtype == torch.bfloat16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )

    row_lse = empty(n, dtype=torch.float32, device=device)
    _row_lse_finalize_kernel[(triton.cdiv(n, _EPILOGUE_BLOCK),)](
        row_max, row_sum, row_lse, n, splits, BLOCK=_EPILOGUE_BLOCK)
    if compute_col:
        col_lse = empty(m, dtype=torch.float32, device=device)
        _packed_lse_finalize_kernel[(triton.cdiv(m, _EPILOGUE_BLOCK),)](
            col_stats, col_lse, m, BLOCK=_EPILOGUE_BLOCK)
    else:
        col_lse = empty(0, dtype=torch.float32, device=device)
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
    positive_offset: int = 0,
    row_labels: Tensor | None = None,
    col_labels: Tensor | None = None,
    config: BackwardConfig | None = None,
    wide: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i g_i r_i + sum_j h_j c_j [+ sum_i w_i sum_{j in P(i)} S_ij] with
    respect to q, k and scale.

    The optional positive term lets a loss fold the gradient of its positive logits into the
    kernel's G (G_ij += w_i for j in P(i), allowed entries only): it then cancels the softmax
    part in fp32 before dQ/dK are rounded to a 16-bit dtype, as PyTorch's own backward does
    (dS = softmax - onehot). Computed outside and added to a bf16 dQ instead, the two large
    terms cancel after rounding (errors of an ulp of scale * |k|).

    Args:
        grad_row: float32 (N,) upstream gradient g of row_lse.
        grad_col: float32 (M,) upstream gradient h of col_lse, or shape (0,) for no column term.
        q, k, scale, exclude_diagonal: as in :func:`lse_forward`.
        row_lse: float32 (N,); col_lse: float32 (M,) (ignored when grad_col is empty).
        grad_positive: float32 (N,) weights w, or None for no positive term.
        positive_offset: P(i) = {(i + positive_offset) mod M} (InfoNCE/CLIP: 0; NT-Xent over
            2N views: N), used when no labels are given.
        row_labels, col_labels: int (N,) and (M,): P(i) = {j : col_labels[j] == row_labels[i]}
            (SupCon), instead of the offset; the diagonal counts only if not excluded.
        config: tile override (tests).
        wide: loop over the output D inside each program, computing every S tile once and
            adding dK atomically (6 N M D), instead of a grid axis over output chunks that keeps
            dK in registers and recomputes S per chunk; default: wide when D > 2 * block_do.

    Returns:
        dq (N, D) in q's dtype, dk (M, D) in k's dtype, dscale 0-dim float32.
    """
    _check_inputs(q, k, scale)
    n, d = q.shape
    m = k.shape[0]
    device = q.device
    if config is None:
        config = get_configs(device, q.dtype, _interpreting())[1]
    has_col = grad_col.numel() > 0
    if grad_row.shape != (n,):
        raise ValueError(f"grad_row must have shape ({n},); got {tuple(grad_row.shape)}")
    if has_col and (grad_col.shape != (m,) or col_lse.shape != (m,)):
        raise ValueError(f"grad_col and col_lse must have shape ({m},) or grad_col (0,); "
                         f"got {tuple(grad_col.shape)} and {tuple(col_lse.shape)}")
    scale = scale.reshape(()).to(torch.float32)
    grad_row = grad_row.to(torch.float32).contiguous()
    row_lse = row_lse.to(torch.float32).contiguous()
    if has_col:
        grad_col = grad_col.to(torch.float32).contiguous()
        col_lse = col_lse.to(torch.float32).contiguous()
    else:  # never read; any valid pointer
        grad_col = col_lse = row_lse

    positives = 0
    if grad_positive is not None:
        if grad_positive.shape != (n,):
            raise ValueError(f"grad_positive must have shape ({n},); got {tuple(grad_positive.shape)}")
        grad_positive = grad_positive.to(torch.float32).contiguous()
        if row_labels is None and col_labels is None:
            positives = 1
            if not 0 <= positive_offset < m:
                raise ValueError(f"positive_offset must be in [0, {m}); got {positive_offset}")
            row_labels = col_labels = grad_positive  # never read
        elif row_labels is not None and col_labels is not None:
            positives = 2
            if row_labels.shape != (n,) or col_labels.shape != (m,):
                raise ValueError(f"row_labels and col_labels must have shapes ({n},) and ({m},); "
                                 f"got {tuple(row_labels.shape)} and {tuple(col_labels.shape)}")
            row_labels = row_labels.to(device=device, dtype=torch.int64).contiguous()
            col_labels = col_labels.to(device=device, dtype=torch.int64).contiguous()
        else:
            raise ValueError("row_labels and col_labels must be given together")
    else:  # never read; any valid pointer
        grad_positive = row_labels = col_labels = row_lse

    if wide is None:
        # Output D wider than two chunks: recomputing S per chunk would cost more than the
        # extra dK atomics of the wide variant (see the FLOP count in the module docstring).
        wide = d > 2 * config.block_do
    col_blocks = triton.cdiv(m, config.block_n)
    do_blocks = 1 if wide else triton.cdiv(d, config.block_do)
    row_blocks = triton.cdiv(n, config.block_m)
    splits, row_blocks_per_split = _splits(row_blocks, col_blocks * do_blocks, config.min_programs)
    dk_atomic = wide or splits > 1

    dq_acc = torch.zeros(n, d, dtype=torch.float32, device=device)
    dk = empty(m, d, dtype=k.dtype, device=device)
    dk_target = torch.zeros(m, d, dtype=torch.float32, device=device) if dk_atomic else dk
    dscale_part = torch.empty(splits * col_blocks, dtype=torch.float32, device=device)

    _lse_backward_kernel[(col_blocks, do_blocks, splits)](
        q, k, scale, row_lse, col_lse, grad_row, grad_col,
        dq_acc, dk_target, dscale_part,
        grad_positive, row_labels, col_labels,
        n, m, d,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        row_blocks_per_split,
        int(positive_offset),
        EXCLUDE_DIAGONAL=bool(exclude_diagonal),
        HAS_COL=has_col,
        POSITIVES=positives,
        DK_ATOMIC=dk_atomic,
        WIDE=bool(wide),
        DOT_PRECISION=_dot_precision(q.dtype),
        UPCAST=_interpreting() and q.dtype == torch.bfloat16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d, BLOCK_DO=config.block_do,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )

    dq = empty(n, d, dtype=q.dtype, device=device)
    _cast_kernel[(triton.cdiv(n * d, _EPILOGUE_BLOCK),)](dq_acc, dq, n * d, BLOCK=_EPILOGUE_BLOCK)
    if dk_atomic:
        _cast_kernel[(triton.cdiv(m * d, _EPILOGUE_BLOCK),)](dk_target, dk, m * d, BLOCK=_EPILOGUE_BLOCK)
    dscale = empty(dtype=torch.float32, device=device)
    _sum_kernel[(1,)](dscale_part, dscale, dscale_part.numel(), BLOCK=_EPILOGUE_BLOCK)
    return dq, dk, dscale
