"""Triton kernels of the distance engine (:mod:`csrc_triton.distances` holds the maths, the
conventions and the :class:`~csrc_triton.distances.DistanceBackend` contract).

x (N, D) anchors, y (M, D) candidates. Every kernel computes tiles of distances from the tile
GEMM, sq = |x|^2 + |y|^2 - 2 x.y clamped at 0 (euclidean: sqrt; cosine: 1 - x.y on unit rows),
accumulated in float32, and never writes an N x M array.

Kernels (grid over anchor blocks unless said otherwise, each program looping over candidate
tiles):

* :func:`_mine_hard_kernel`: running (value, index) of the farthest positive and of the
  nearest (or farthest) negative per row, in registers, over the candidates in (label, index)
  order (y permuted once, O(M D)). Ties: a tile's arg is the smallest column among its
  extremes, and a later tile replaces the running best only if strictly better, so the first
  column in that order wins; a NaN distance wins (first NaN column).
* :func:`_pair_forward_kernel`, MODE 0 (DrLIM): dissimilar_i = sum over negatives of
  relu(margin - d)^2 / 2. MODE 1 (batch-all): with the anchor's positive distances sorted
  (an (N, KP) table, +inf padded, from PyTorch: O(N KP) memory, KP the largest class count),
  each negative's t = d - margin is located by a binary search of ceil(log2(KP + 1)) steps,
  c = #{s > t}, and sum_p relu(s_p - t) = (total - prefix[#{s <= t}]) - c t from the prefix
  sums; per-row sums and counts in registers.
* :func:`_pair_backward_kernel`: G = dL/dd of the negative pairs recomputed per tile (DrLIM:
  -g relu(margin - d); batch-all: -g c), C = G / d (euclidean), 2 G (squared) or G (cosine).
  Grid (owned blocks, output-D chunks); ``COLUMN_OWNED`` False: a program owns anchor rows and
  accumulates rowsum(C) and C y over the candidate tiles (batch-all also adds a histogram of the
  search positions with integer atomics, from which PyTorch gets dL/dd of the positive pairs,
  #{n : t_n < s_p}); True: it owns candidate rows and accumulates colsum(C) and C^T x over the
  anchor tiles. No floating-point atomics: the gradients are deterministic. PyTorch then forms
  dx = rowsum(C) x - C y, dy = colsum(C) y - C^T x (cosine: -C y and -C^T x) and adds the
  positive pairs' terms (O(N KP D)).
* :func:`_semi_hard_kernel`: per negative (i, n), bucket b = #{s_ip < d_in} (binary search);
  the pair (distance, column) packed into one int64 (NaN first, then increasing distance, then
  increasing column) is merged into bucket (i, b) with an integer atomic min; the farthest
  negative is a running packed max. PyTorch then takes, per sorted positive q, the minimum over
  buckets b > q (a reversed cumulative min): the nearest negative farther than the positive.

Work: hard mining and DrLIM forward 2 N M D flops; each backward pass 2 N M D (recompute) +
2 N M D (C y or C^T x) per output-D chunk. Precision: fp32 inputs use ``input_precision="ieee"``
(no TF32); bf16/fp16 distance tiles run on the tensor cores with fp32 accumulation (the
products of 16-bit values are exact in fp32). The backward products C y and C^T x keep C in
fp32 and widen the 16-bit rows (``ieee``): slower than a 16-bit product, but the gradients are
then as accurate as the fp32 path (a C rounded to bf16 was measurably worse than PyTorch's own
bf16 backward). Under Triton's interpreter every tile is widened to fp32 first (its tl.dot on
bf16 storage is wrong).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._alloc import empty
from .distances import (
    BatchAllStats,
    HardPairs,
    SemiHardPairs,
    _check_distance,
    class_ranges,
    class_slots,
    max_class_count,
)

_DISTANCE_CODE = {"euclidean": 0, "squared": 1, "cosine": 2}
_INT31 = (1 << 31) - 1
_INT31_C: tl.constexpr = tl.constexpr(_INT31)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------
# Shared tile maths (inlined by Triton)
# --------------------------------------------------------------------------------------------
@triton.jit
def _distance_tile(
    x_ptr, y_ptr, x_sq, y_sq, offs_m, offs_n, row_ok, col_ok, D,
    stride_xn, stride_xd, stride_yn, stride_yd,
    DISTANCE: tl.constexpr, MINING: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """d_ij for one (BLOCK_M x BLOCK_N) tile. DISTANCE 0 euclidean, 1 squared, 2 cosine;
    MINING: the comparison key instead, |y|^2 - 2 x.y (-x.y for cosine), as the CPU backends."""
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xn
    y_cols = y_ptr + offs_n.to(tl.int64)[None, :] * stride_yn
    dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        xt = tl.load(x_rows + (d0 + offs_d)[None, :] * stride_xd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        yt = tl.load(y_cols + (d0 + offs_d)[:, None] * stride_yd, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            yt = yt.to(tl.float32)
        dot = tl.dot(xt, yt, dot, input_precision=DOT_PRECISION)
    if MINING:
        if DISTANCE == 2:
            return -dot
        return y_sq[None, :] - 2.0 * dot
    if DISTANCE == 2:
        return 1.0 - dot
    sq = x_sq[:, None] + y_sq[None, :] - 2.0 * dot
    sq = tl.where(sq < 0.0, 0.0, sq)  # clamp at 0; a NaN stays NaN
    if DISTANCE == 0:
        sq = tl.sqrt(sq)
    return sq


@triton.jit
def _search(table_ptr, row_base, count, value, STRICT: tl.constexpr, STEPS: tl.constexpr):
    """#{r < count : table[row_base + r] <= value} (STRICT: < value) for a tile of values, by
    binary search in each row's ascending table; STEPS = ceil(log2(KP + 1))."""
    lo = tl.zeros(value.shape, tl.int32)
    hi = tl.zeros(value.shape, tl.int32) + count[:, None]
    for _ in range(STEPS):
        live = lo < hi
        mid = (lo + hi) // 2
        probe = tl.load(table_ptr + row_base[:, None] + mid, mask=live, other=0.0)
        if STRICT:
            right = probe < value
        else:
            right = probe <= value
        lo = tl.where(live & right, mid + 1, lo)
        hi = tl.where(live & (right == 0), mid, hi)
    return lo


# --------------------------------------------------------------------------------------------
# Hard mining
# --------------------------------------------------------------------------------------------
@triton.jit
def _mine_hard_kernel(
    x_ptr, y_ptr, x_sq_ptr, y_sq_ptr, row_labels_ptr, col_labels_ptr, self_col_ptr, pos_out_ptr, neg_out_ptr,
    N, M, D, stride_xn, stride_xd, stride_yn, stride_yd,
    FARTHEST_NEGATIVE: tl.constexpr, DISTANCE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    row_labels = tl.load(row_labels_ptr + offs_m, mask=row_ok, other=0)
    self_col = tl.load(self_col_ptr + offs_m, mask=row_ok, other=-1)  # -1: no self pair
    x_sq = tl.load(x_sq_ptr + offs_m, mask=row_ok, other=0.0)
    none = M  # "no index" sentinel, larger than every column
    pos_val = tl.full([BLOCK_M], float("-inf"), tl.float32)
    pos_idx = tl.full([BLOCK_M], -1, tl.int32)
    pos_nan = tl.full([BLOCK_M], none, tl.int32)
    if FARTHEST_NEGATIVE:
        neg_val = tl.full([BLOCK_M], float("-inf"), tl.float32)
    else:
        neg_val = tl.full([BLOCK_M], float("inf"), tl.float32)
    neg_idx = tl.full([BLOCK_M], -1, tl.int32)
    neg_nan = tl.full([BLOCK_M], none, tl.int32)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        col_labels = tl.load(col_labels_ptr + offs_n, mask=col_ok, other=0)
        y_sq = tl.load(y_sq_ptr + offs_n, mask=col_ok, other=0.0)
        key = _distance_tile(x_ptr, y_ptr, x_sq, y_sq, offs_m, offs_n, row_ok, col_ok, D,
                             stride_xn, stride_xd, stride_yn, stride_yd,
                             DISTANCE, True, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        same = row_labels[:, None] == col_labels[None, :]
        valid = row_ok[:, None] & col_ok[None, :]
        is_pos = valid & same & (offs_n[None, :] != self_col[:, None])
        is_neg = valid & (same == 0)
        is_nan = key != key
        cols = offs_n[None, :] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        # farthest positive: tile max, smallest column among the maxima, strict update
        pk = tl.where(is_pos & (is_nan == 0), key, float("-inf"))
        t_max = tl.max(pk, axis=1)
        t_arg = tl.min(tl.where(is_pos & (pk == t_max[:, None]), cols, none), axis=1)
        better = (t_max > pos_val) & (t_arg < none)
        pos_idx = tl.where(better, t_arg, pos_idx)
        pos_val = tl.where(better, t_max, pos_val)
        pos_nan = tl.minimum(pos_nan, tl.min(tl.where(is_pos & is_nan, cols, none), axis=1))
        if FARTHEST_NEGATIVE:
            nk = tl.where(is_neg & (is_nan == 0), key, float("-inf"))
            t_ext = tl.max(nk, axis=1)
            better = t_ext > neg_val
        else:
            nk = tl.where(is_neg & (is_nan == 0), key, float("inf"))
            t_ext = tl.min(nk, axis=1)
            better = t_ext < neg_val
        t_arg = tl.min(tl.where(is_neg & (nk == t_ext[:, None]), cols, none), axis=1)
        better = better & (t_arg < none)
        neg_idx = tl.where(better, t_arg, neg_idx)
        neg_val = tl.where(better, t_ext, neg_val)
        neg_nan = tl.minimum(neg_nan, tl.min(tl.where(is_neg & is_nan, cols, none), axis=1))
    # A NaN wins; a row that saw a candidate of a kind but only infinite keys keeps its first.
    pos_idx = tl.where(pos_nan < none, pos_nan, pos_idx)
    neg_idx = tl.where(neg_nan < none, neg_nan, neg_idx)
    tl.store(pos_out_ptr + offs_m, pos_idx.to(tl.int64), mask=row_ok)
    tl.store(neg_out_ptr + offs_m, neg_idx.to(tl.int64), mask=row_ok)


# --------------------------------------------------------------------------------------------
# DrLIM and batch-all: forward sums, backward coefficient products
# --------------------------------------------------------------------------------------------
@triton.jit
def _negative_terms(
    d, is_neg, offs_m, row_ok, margin, grad, sorted_ptr, prefix_ptr, pos_count_ptr, KP,
    MODE: tl.constexpr, STEPS: tl.constexpr,
):
    """Per tile: (value, dL/dd / g, count, search position) of the negative pairs.
    MODE 0: relu(margin - d)^2 / 2 and -relu(margin - d). MODE 1: batch-all's
    sum_p relu(s_p - t) and -c with t = d - margin."""
    if MODE == 0:
        h = margin - d
        h = tl.where(h < 0.0, 0.0, h)  # relu that keeps NaN
        value = tl.where(is_neg, 0.5 * h * h, 0.0)
        slope = tl.where(is_neg, -h, 0.0)
        count = tl.zeros(d.shape, tl.int64)
        where = tl.zeros(d.shape, tl.int32)
    else:
        k = tl.load(pos_count_ptr + offs_m, mask=row_ok, other=0)
        base = offs_m.to(tl.int64) * KP
        t = d - margin
        where = _search(sorted_ptr, base, k, t, False, STEPS)  # #{s <= t}
        c = k[:, None] - where
        total = tl.load(prefix_ptr + offs_m.to(tl.int64) * (KP + 1) + k, mask=row_ok, other=0.0)
        below = tl.load(prefix_ptr + (offs_m.to(tl.int64) * (KP + 1))[:, None] + where, mask=is_neg, other=0.0)
        value = tl.where(is_neg, (total[:, None] - below) - c.to(tl.float32) * t, 0.0)
        slope = tl.where(is_neg, -c.to(tl.float32), 0.0)
        count = tl.where(is_neg, c, 0).to(tl.int64)
    return value, slope, count, where


@triton.jit
def _pair_forward_kernel(
    x_ptr, y_ptr, x_sq_ptr, y_sq_ptr, row_labels_ptr, col_labels_ptr,
    sorted_ptr, prefix_ptr, pos_count_ptr,  # batch-all: (N, KP) sorted s, (N, KP + 1) prefix, (N,) k
    loss_ptr, count_ptr,
    N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, margin, KP,
    MODE: tl.constexpr, STEPS: tl.constexpr, DISTANCE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    row_labels = tl.load(row_labels_ptr + offs_m, mask=row_ok, other=0)
    x_sq = tl.load(x_sq_ptr + offs_m, mask=row_ok, other=0.0)
    loss = tl.zeros([BLOCK_M], tl.float32)
    count = tl.zeros([BLOCK_M], tl.int64)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        col_labels = tl.load(col_labels_ptr + offs_n, mask=col_ok, other=0)
        y_sq = tl.load(y_sq_ptr + offs_n, mask=col_ok, other=0.0)
        d = _distance_tile(x_ptr, y_ptr, x_sq, y_sq, offs_m, offs_n, row_ok, col_ok, D,
                           stride_xn, stride_xd, stride_yn, stride_yd,
                           DISTANCE, False, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        is_neg = row_ok[:, None] & col_ok[None, :] & (row_labels[:, None] != col_labels[None, :])
        value, slope, c, where = _negative_terms(d, is_neg, offs_m, row_ok, margin, 0.0, sorted_ptr, prefix_ptr,
                                                 pos_count_ptr, KP, MODE, STEPS)
        loss += tl.sum(value, axis=1)
        count += tl.sum(c, axis=1)
    tl.store(loss_ptr + offs_m, loss, mask=row_ok)
    if MODE == 1:
        tl.store(count_ptr + offs_m, count, mask=row_ok)


@triton.jit
def _pair_backward_kernel(
    x_ptr, y_ptr, x_sq_ptr, y_sq_ptr, row_labels_ptr, col_labels_ptr, grad_ptr,
    sorted_ptr, prefix_ptr, pos_count_ptr, hist_ptr,
    prod_ptr,  # (owned rows, D) fp32: C y (rows) or C^T x (columns)
    sum_ptr,  # (owned rows,) fp32: rowsum(C) or colsum(C)
    N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, margin, KP,
    COLUMN_OWNED: tl.constexpr, MODE: tl.constexpr, STEPS: tl.constexpr, DISTANCE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_do = tl.program_id(1)
    offs_do = pid_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    if COLUMN_OWNED:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        col_labels = tl.load(col_labels_ptr + offs_n, mask=col_ok, other=0)
        y_sq = tl.load(y_sq_ptr + offs_n, mask=col_ok, other=0.0)
        prod = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
        total = tl.zeros([BLOCK_N], tl.float32)
        n_outer = N
        outer_block = BLOCK_M
    else:
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        row_labels = tl.load(row_labels_ptr + offs_m, mask=row_ok, other=0)
        x_sq = tl.load(x_sq_ptr + offs_m, mask=row_ok, other=0.0)
        g = tl.load(grad_ptr + offs_m, mask=row_ok, other=0.0)
        prod = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        n_outer = M
        outer_block = BLOCK_N
    for o0 in range(0, n_outer, outer_block):
        if COLUMN_OWNED:
            offs_m = o0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            row_labels = tl.load(row_labels_ptr + offs_m, mask=row_ok, other=0)
            x_sq = tl.load(x_sq_ptr + offs_m, mask=row_ok, other=0.0)
            g = tl.load(grad_ptr + offs_m, mask=row_ok, other=0.0)
        else:
            offs_n = o0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < M
            col_labels = tl.load(col_labels_ptr + offs_n, mask=col_ok, other=0)
            y_sq = tl.load(y_sq_ptr + offs_n, mask=col_ok, other=0.0)
        d = _distance_tile(x_ptr, y_ptr, x_sq, y_sq, offs_m, offs_n, row_ok, col_ok, D,
                           stride_xn, stride_xd, stride_yn, stride_yd,
                           DISTANCE, False, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        is_neg = row_ok[:, None] & col_ok[None, :] & (row_labels[:, None] != col_labels[None, :])
        value, slope, c, where = _negative_terms(d, is_neg, offs_m, row_ok, margin, 0.0, sorted_ptr, prefix_ptr,
                                                 pos_count_ptr, KP, MODE, STEPS)
        coef = slope * g[:, None]  # G = dL/dd
        if DISTANCE == 0:
            coef = tl.where(d == 0.0, 0.0, coef / tl.where(d == 0.0, 1.0, d))  # C = G / d, 0 at d = 0; NaN stays NaN
        elif DISTANCE == 1:
            coef = 2.0 * coef
        coef = tl.where(is_neg, coef, 0.0)
        if COLUMN_OWNED:
            total += tl.sum(coef.to(tl.float32), axis=0)
            xo = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xn + offs_do[None, :] * stride_xd,
                         mask=row_ok[:, None] & do_ok[None, :], other=0.0)
            prod = tl.dot(tl.trans(coef), xo.to(tl.float32), prod, input_precision="ieee")
        else:
            total += tl.sum(coef.to(tl.float32), axis=1)
            yo = tl.load(y_ptr + offs_n.to(tl.int64)[:, None] * stride_yn + offs_do[None, :] * stride_yd,
                         mask=col_ok[:, None] & do_ok[None, :], other=0.0)
            prod = tl.dot(coef, yo.to(tl.float32), prod, input_precision="ieee")
            if MODE == 1:
                if pid_do == 0:
                    # histogram of the search positions: #{n : t_n < s_(q)} = #{n : where_n <= q}
                    hist = hist_ptr + (offs_m.to(tl.int64) * (KP + 1))[:, None] + where
                    tl.atomic_add(hist, tl.full(d.shape, 1, tl.int32), mask=is_neg, sem="relaxed")
    if COLUMN_OWNED:
        tl.store(prod_ptr + offs_n.to(tl.int64)[:, None] * D + offs_do[None, :], prod,
                 mask=col_ok[:, None] & do_ok[None, :])
        if pid_do == 0:
            tl.store(sum_ptr + offs_n, total, mask=col_ok)
    else:
        tl.store(prod_ptr + offs_m.to(tl.int64)[:, None] * D + offs_do[None, :], prod,
                 mask=row_ok[:, None] & do_ok[None, :])
        if pid_do == 0:
            tl.store(sum_ptr + offs_m, total, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Semi-hard mining
# --------------------------------------------------------------------------------------------
@triton.jit
def _ordered_key(v):
    """float32 -> int64 in [0, 2^32): the same order as the floats (NaN not handled here)."""
    bits = v.to(tl.int32, bitcast=True)
    flipped = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # two's-complement order = float order
    return flipped.to(tl.int64) + 2147483648


@triton.jit
def _semi_hard_kernel(
    x_ptr, y_ptr, x_sq_ptr, y_sq_ptr, row_labels_ptr, col_labels_ptr,
    sorted_ptr, pos_count_ptr,  # (N, KP) sorted positive distances (+inf padded), (N,) counts
    bucket_ptr,  # (N, KP + 1) int64, INT64_MAX-initialised: packed (key, column) minima
    far_ptr,  # (N,) int64: packed (key, INT31 - column) maximum over the negatives
    N, M, D, stride_xn, stride_xd, stride_yn, stride_yd, KP,
    STEPS: tl.constexpr, DISTANCE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    row_labels = tl.load(row_labels_ptr + offs_m, mask=row_ok, other=0)
    x_sq = tl.load(x_sq_ptr + offs_m, mask=row_ok, other=0.0)
    k = tl.load(pos_count_ptr + offs_m, mask=row_ok, other=0)
    base = offs_m.to(tl.int64) * KP
    far = tl.full([BLOCK_M], -1, tl.int64)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        col_labels = tl.load(col_labels_ptr + offs_n, mask=col_ok, other=0)
        y_sq = tl.load(y_sq_ptr + offs_n, mask=col_ok, other=0.0)
        d = _distance_tile(x_ptr, y_ptr, x_sq, y_sq, offs_m, offs_n, row_ok, col_ok, D,
                           stride_xn, stride_xd, stride_yn, stride_yd,
                           DISTANCE, False, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        is_neg = row_ok[:, None] & col_ok[None, :] & (row_labels[:, None] != col_labels[None, :])
        is_nan = d != d
        # bucket b = #{s < d}: this negative is semi-hard for the sorted positives 0..b-1;
        # a NaN goes to the last bucket (every positive) and wins there
        bucket = _search(sorted_ptr, base, k, d, True, STEPS)
        bucket = tl.where(is_nan, k[:, None], bucket)
        key = _ordered_key(d)
        cols = (offs_n[None, :] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)).to(tl.int64)
        near_key = tl.where(is_nan, 0, tl.maximum(key, 1))
        packed = (near_key << 31) | cols
        slot = bucket_ptr + (offs_m.to(tl.int64) * (KP + 1))[:, None] + bucket
        tl.atomic_min(slot, packed, mask=is_neg, sem="relaxed")
        far_key = tl.where(is_nan, 4294967295, tl.minimum(key, 4294967294))
        far_packed = tl.where(is_neg, (far_key << 31) | (_INT31_C - cols), -1)
        far = tl.maximum(far, tl.max(far_packed, axis=1))
    tl.store(far_ptr + offs_m, far, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
class _Launch:
    """Shared launch parameters for x (N, D), y (M, D)."""

    def __init__(self, x: Tensor, y: Tensor, distance: str) -> None:
        _check_distance(distance)
        if x.dtype != y.dtype:
            raise TypeError(f"x and y must share a dtype, got {x.dtype} and {y.dtype}")
        self.x, self.y = x.contiguous(), y.contiguous()
        self.n, self.m, self.d = x.shape[0], y.shape[0], x.shape[1]
        self.distance = _DISTANCE_CODE[distance]
        interp = _interpreting()
        self.upcast = interp
        self.dot_precision = "ieee" if x.dtype == torch.float32 else "tf32"
        if x.dtype != torch.float32 and interp:
            self.dot_precision = "ieee"
        if distance == "cosine":  # unused by the kernels, but pointers are needed
            self.x_sq = torch.zeros(1, dtype=torch.float32, device=x.device)
            self.y_sq = self.x_sq
        else:
            self.x_sq = self.x.float().square().sum(dim=1)
            self.y_sq = self.y.float().square().sum(dim=1)
        self.block_m = 64
        self.block_n = 64
        self.block_d = max(16, min(64, triton.next_power_of_2(self.d)))
        self.block_do = max(16, min(64, triton.next_power_of_2(self.d)))

    def common(self):
        return (self.n, self.m, self.d, self.x.stride(0), self.x.stride(1), self.y.stride(0), self.y.stride(1))


def _steps(kp: int) -> int:
    return max(1, math.ceil(math.log2(kp + 1)))


class _Positives:
    """Per-anchor positive distances, sorted, +inf padded to KP columns (PyTorch, O(N KP D) in
    chunks), with prefix sums and the sort order (slot of each sorted entry)."""

    def __init__(self, lau: _Launch, x: Tensor, y: Tensor, distance: str, self_offset, row_labels, col_labels):
        cr = class_ranges(row_labels, col_labels, self_offset)
        kp = max_class_count(cr)
        slots, _, positive = class_slots(cr, kp)
        index = torch.where(positive, cr.perm[slots], -1)  # (N, KP) original columns
        xa, ya = x.float(), y.float()
        if distance != "cosine":
            x_sq, y_sq = lau.x_sq, lau.y_sq
        dist = torch.empty(x.shape[0], kp, dtype=torch.float32, device=x.device)
        chunk = max(1, (1 << 22) // max(kp * x.shape[1], 1))
        for start in range(0, x.shape[0], chunk):
            sl = slice(start, start + chunk)
            idx = index[sl].clamp(min=0)
            dot = torch.einsum("rd,rkd->rk", xa[sl], ya[idx])
            if distance == "cosine":
                dist[sl] = 1.0 - dot
            else:
                sq = (x_sq[sl, None] + y_sq[idx] - 2.0 * dot).clamp_min(0.0)
                dist[sl] = sq.sqrt() if distance == "euclidean" else sq
        self.index = index
        self.positive = positive
        self.dist = dist
        s = torch.where(positive, dist, math.inf)
        self.sorted, self.order = torch.sort(s, dim=1)
        self.count = positive.sum(dim=1).to(torch.int32)
        self.kp = kp
        valid = torch.arange(kp, device=x.device)[None, :] < self.count[:, None]
        self.prefix = torch.zeros(x.shape[0], kp + 1, dtype=torch.float32, device=x.device)
        torch.cumsum(torch.where(valid, self.sorted, 0.0), dim=1, out=self.prefix[:, 1:])
        self.row_nan = torch.isnan(torch.where(positive, dist, 0.0)).any(dim=1)


class TritonDistances:
    """The Triton kernels behind :class:`~csrc_triton.distances.DistanceBackend`."""

    name = "triton"

    def mine_hard(self, x, y, *, distance, self_offset, row_labels, col_labels, farthest_negative):
        # candidates in (label, index) order, the tie rule shared with the CPU backends
        cr = class_ranges(row_labels, col_labels, self_offset)
        lau = _Launch(x, y[cr.perm], distance)
        pos = torch.empty(lau.n, dtype=torch.int64, device=x.device)
        neg = torch.empty(lau.n, dtype=torch.int64, device=x.device)
        grid = (triton.cdiv(lau.n, lau.block_m),)
        _mine_hard_kernel[grid](
            lau.x, lau.y, lau.x_sq, lau.y_sq, row_labels, col_labels[cr.perm].contiguous(), cr.self_sorted, pos, neg,
            *lau.common(),
            FARTHEST_NEGATIVE=bool(farthest_negative), DISTANCE=lau.distance,
            UPCAST=lau.upcast, DOT_PRECISION=lau.dot_precision,
            BLOCK_M=lau.block_m, BLOCK_N=lau.block_n, BLOCK_D=lau.block_d,
        )
        pos_out = empty(lau.n, dtype=torch.int64, device=x.device)
        neg_out = empty(lau.n, dtype=torch.int64, device=x.device)
        pos_out.copy_(torch.where(pos >= 0, cr.perm[pos.clamp(min=0)], -1))
        neg_out.copy_(torch.where(neg >= 0, cr.perm[neg.clamp(min=0)], -1))
        return HardPairs(pos_out, neg_out)

    def mine_semi_hard(self, x, y, *, distance, self_offset, row_labels, col_labels):
        lau = _Launch(x, y, distance)
        p = _Positives(lau, lau.x, lau.y, distance, self_offset, row_labels, col_labels)
        n, kp = lau.n, p.kp
        big = torch.iinfo(torch.int64).max
        buckets = torch.full((n, kp + 1), big, dtype=torch.int64, device=x.device)
        far = torch.empty(n, dtype=torch.int64, device=x.device)
        grid = (triton.cdiv(n, lau.block_m),)
        _semi_hard_kernel[grid](
            lau.x, lau.y, lau.x_sq, lau.y_sq, row_labels, col_labels, p.sorted, p.count, buckets, far,
            *lau.common(), kp,
            STEPS=_steps(kp), DISTANCE=lau.distance, UPCAST=lau.upcast, DOT_PRECISION=lau.dot_precision,
            BLOCK_M=lau.block_m, BLOCK_N=lau.block_n, BLOCK_D=lau.block_d,
        )
        # nearest semi-hard negative of sorted positive q: the minimum over buckets b > q
        best = torch.cummin(buckets[:, 1:].flip(1), dim=1).values.flip(1)  # (N, KP)
        fallback = _INT31 - (far & _INT31)
        chosen = torch.where(best < big, best & _INT31, fallback[:, None])
        by_slot = torch.empty_like(chosen).scatter_(1, p.order, chosen)
        has_neg = far >= 0
        neg = empty(n, kp, dtype=torch.int64, device=x.device)
        neg.copy_(torch.where(p.positive & has_neg[:, None], by_slot, -1))
        pos = empty(n, kp, dtype=torch.int64, device=x.device)
        pos.copy_(p.index)
        return SemiHardPairs(pos, neg)

    def _pair_forward(self, lau, mode, margin, row_labels, col_labels, p):
        loss = empty(lau.n, dtype=torch.float32, device=lau.x.device)
        count = empty(lau.n if mode == 1 else 0, dtype=torch.int64, device=lau.x.device)
        dummy = lau.x_sq
        grid = (triton.cdiv(lau.n, lau.block_m),)
        _pair_forward_kernel[grid](
            lau.x, lau.y, lau.x_sq, lau.y_sq, row_labels, col_labels,
            p.sorted if p else dummy, p.prefix if p else dummy, p.count if p else row_labels,
            loss, count if mode == 1 else loss,
            *lau.common(), float(margin), p.kp if p else 0,
            MODE=mode, STEPS=_steps(p.kp) if p else 1, DISTANCE=lau.distance,
            UPCAST=lau.upcast, DOT_PRECISION=lau.dot_precision,
            BLOCK_M=lau.block_m, BLOCK_N=lau.block_n, BLOCK_D=lau.block_d,
        )
        return loss, count

    def _pair_backward(self, lau, mode, margin, grad, row_labels, col_labels, p):
        dev = lau.x.device
        g = grad.to(torch.float32).contiguous()
        dummy = lau.x_sq
        hist = torch.zeros(lau.n, p.kp + 1, dtype=torch.int32, device=dev) if p else row_labels
        cy = torch.empty(lau.n, lau.d, dtype=torch.float32, device=dev)
        rowsum = torch.empty(lau.n, dtype=torch.float32, device=dev)
        ctx = torch.empty(lau.m, lau.d, dtype=torch.float32, device=dev)
        colsum = torch.empty(lau.m, dtype=torch.float32, device=dev)
        n_do = triton.cdiv(lau.d, lau.block_do)
        for column_owned, prod, total, blocks in (
            (False, cy, rowsum, triton.cdiv(lau.n, lau.block_m)),
            (True, ctx, colsum, triton.cdiv(lau.m, lau.block_n)),
        ):
            _pair_backward_kernel[(blocks, n_do)](
                lau.x, lau.y, lau.x_sq, lau.y_sq, row_labels, col_labels, g,
                p.sorted if p else dummy, p.prefix if p else dummy, p.count if p else row_labels, hist,
                prod, total,
                *lau.common(), float(margin), p.kp if p else 0,
                COLUMN_OWNED=column_owned, MODE=mode, STEPS=_steps(p.kp) if p else 1, DISTANCE=lau.distance,
                UPCAST=lau.upcast, DOT_PRECISION=lau.dot_precision,
                BLOCK_M=lau.block_m, BLOCK_N=lau.block_n, BLOCK_D=lau.block_d, BLOCK_DO=lau.block_do,
            )
        xa, ya = lau.x.float(), lau.y.float()
        if lau.distance == 2:  # cosine: dx = -C y, dy = -C^T x
            dx, dy = -cy, -ctx
        else:
            dx = rowsum[:, None] * xa - cy
            dy = colsum[:, None] * ya - ctx
        if p is not None:
            self._positive_grads(lau, p, g, hist, xa, ya, dx, dy)
        return dx, dy  # float32; the op layer casts

    @staticmethod
    def _positive_grads(lau, p, g, hist, xa, ya, dx, dy):
        """dL/dd_ip = g_i #{n : t_n < s_p} from the histogram, then the chain rule on the
        positive pairs (O(N KP D), in chunks)."""
        w_sorted = hist.to(torch.float32).cumsum(dim=1)[:, : p.kp]
        w = torch.empty_like(w_sorted).scatter_(1, p.order.to(torch.int64), w_sorted)
        G = torch.where(p.positive, w * g[:, None], 0.0)
        G = torch.where(p.row_nan[:, None], math.nan, G)
        chunk = max(1, (1 << 22) // max(p.kp * lau.d, 1))
        for start in range(0, lau.n, chunk):
            sl = slice(start, start + chunk)
            idx = p.index[sl].clamp(min=0)
            coef = G[sl]
            y_rows = ya[idx]  # (r, KP, D)
            if lau.distance == 2:
                dx[sl] -= torch.einsum("rk,rkd->rd", coef, y_rows)
                dy.index_add_(0, idx.reshape(-1), -(coef[:, :, None] * xa[sl, None, :]).reshape(-1, lau.d))
                continue
            dist = p.dist[sl]
            if lau.distance == 0:
                coef = torch.where(dist == 0, 0.0, coef / dist)
            else:
                coef = 2.0 * coef
            diff = xa[sl, None, :] - y_rows
            contrib = coef[:, :, None] * diff
            dx[sl] += contrib.sum(dim=1)
            dy.index_add_(0, idx.reshape(-1), -contrib.reshape(-1, lau.d))

    def batch_all_forward(self, x, y, *, distance, margin, self_offset, row_labels, col_labels):
        lau = _Launch(x, y, distance)
        p = _Positives(lau, lau.x, lau.y, distance, self_offset, row_labels, col_labels)
        loss, count = self._pair_forward(lau, 1, margin, row_labels, col_labels, p)
        loss.masked_fill_(p.row_nan, math.nan)
        return BatchAllStats(loss, count)

    def batch_all_backward(self, grad, x, y, *, distance, margin, self_offset, row_labels, col_labels):
        lau = _Launch(x, y, distance)
        p = _Positives(lau, lau.x, lau.y, distance, self_offset, row_labels, col_labels)
        g = torch.where(p.row_nan, math.nan, grad.to(torch.float32))
        return self._pair_backward(lau, 1, margin, g, row_labels, col_labels, p)

    def drlim_forward(self, x, y, *, margin, row_labels, col_labels):
        lau = _Launch(x, y, "euclidean")
        return self._pair_forward(lau, 0, margin, row_labels, col_labels, None)[0]

    def drlim_backward(self, grad, x, y, *, margin, row_labels, col_labels):
        lau = _Launch(x, y, "euclidean")
        return self._pair_backward(lau, 0, margin, grad, row_labels, col_labels, None)


BACKEND = TritonDistances()
