"""Pairwise-distance engine for the metric-learning losses (triplet mining, DrLIM), tiled.

Backends (``"triton"`` in :mod:`csrc_triton.triton_distance`, ``"blockwise"`` and ``"dense"``
here) satisfy :class:`DistanceBackend`; :mod:`csrc_triton.distance_ops` picks one by name from
:data:`REGISTRY` and never special-cases it. This docstring is the documentation of record.

Notation and conventions (as in :mod:`csrc_triton.backend`)
----------------------------------------------------------
x (N, D) anchors, y (M, D) candidates, same dtype (float32, bfloat16, float16; float64 on the
CPU backends) and device; ``row_labels`` (N,) and ``col_labels`` (M,) int64. Accumulation is
float32 (float64 for float64 inputs) whatever the input dtype; gradients are cast once, at the
end. ``self_offset``: anchor i is candidate ``i + self_offset`` (0 when y is x; ``rank * B``
when a rank's B rows are compared with the R B rows of every rank; None: no self pair).

    positives P(i) = {j : col_labels[j] == row_labels[i], j != i + self_offset}
    negatives N(i) = {j : col_labels[j] != row_labels[i]}

Distances, from the tile GEMM (never an N x M matrix outside ``dense``):

    sq_ij = max(|x_i|^2 + |y_j|^2 - 2 x_i . y_j, 0)
    "euclidean": d = sqrt(sq)     "squared": d = sq     "cosine": d = 1 - x_i . y_j

For "cosine" the caller passes L2-normalised rows (an O(N D) step under autograd).

Mining rules (one rule for every backend)
-----------------------------------------
* key: hard mining compares |y_j|^2 - 2 x_i . y_j (sq less the anchor's own |x_i|^2, which
  does not change the order; -x_i . y_j for cosine); semi-hard compares the distances;
* ties, hard mining: candidates are visited in (label, index) order (a stable sort of the
  labels, so that a class is a contiguous range and the class masks are (rows, K) gathers and
  scatters, K the largest class) and the first in that order wins: among positives (one
  label) the smallest index, among negatives the smallest label, then the smallest index;
* ties, semi-hard: the smallest index;
* NaN: a NaN distance wins every maximum and minimum (as torch.max/min propagate NaN), so NaN
  inputs give NaN losses through the chosen pairs;
* an index of -1 means "none" (no positive, or no negative).

What each method computes
-------------------------
``mine_hard``: per anchor the farthest positive and the nearest (``farthest_negative``: the
farthest) negative. Batch-hard mining (Hermans, Beyer and Leibe 2017).

``mine_semi_hard`` (Schroff, Kalenichenko and Philbin 2015; as TensorFlow Addons'
``triplet_semihard_loss``): the positive pairs as slots, ``positive_index`` (N, K) with K the
largest class count among the candidates, slot r of anchor i holding its r-th same-label
candidate in index order (-1 for the anchor itself and past the end of its class), and per
slot the nearest negative n with d_in > d_ip (strictly, in the distance itself), or if there
is none the farthest negative of i; -1 where the slot is empty.

``batch_all_forward`` (Hermans et al.'s batch-all): per anchor
    loss_sum_i = sum_{p in P(i), n in N(i)} relu(d_ip - d_in + margin)
    active_i   = #{(p, n) : d_ip - d_in + margin > 0}
without any (a, p, n) tensor: with the positive distances of i sorted, s_(0) <= ... <= s_(k-1),
and t_n = d_in - margin, the negatives contribute

    sum_p relu(s_p - t_n) = (sum of the s_p > t_n) - c_n t_n,   c_n = #{p : s_p > t_n}

(a binary search and a prefix sum; c_n sums to active_i). ``batch_all_backward``: with g the
upstream gradient of loss_sum,
    dL/dd_in = -g_i c_n,   dL/dd_ip = g_i #{n : t_n < s_p}
(the second from a histogram of the negatives' search positions), then the distance chain rule.

``drlim_forward`` (Hadsell, Chopra and LeCun 2006): the dissimilar half of DrLIM,
    dissimilar_i = sum_{j in N(i)} relu(margin - d_ij)^2 / 2      (euclidean d)
``drlim_backward``: dL/dd_ij = -g_i relu(margin - d_ij).

The backward methods return (dx, dy) in the accumulation dtype: the op layer adds them when y
is x and casts once, so a 16-bit gradient is rounded once. (The similar half is O(N D) from class
statistics; it lives in :mod:`csrc_triton.triplet`.)

Gradients through the distance (the "G X" form, O(tile) memory): with G_ij = dL/dd_ij,
    euclidean: C = G / d (0 where d = 0, the gradient torch's norm gives at 0),
    squared:   C = 2 G,
    dx_i = rowsum(C)_i x_i - (C y)_i,   dy_j = colsum(C)_j y_j - (C^T x)_j;
    cosine:    dx = -G y,   dy = -G^T x.
"""
from __future__ import annotations

import importlib
import math
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .positives import ClassRanges, class_ranges, class_slots  # noqa: F401  (re-exported)

from ._alloc import empty
from ._numerics import acc_dtype

DISTANCES = ("euclidean", "squared", "cosine")

#: Elements of one (block_rows x M) float32 buffer of the blockwise backend (16 MiB). Hard
#: mining keeps one buffer of 4x this, DrLIM two plus a bool mask, semi-hard and batch-all
#: (whose blocks hold int64 search results too) blocks of 1/2 and 1/4 of it, so the workspace
#: stays near 64 MiB whatever N is.
WORKSPACE_ELEMENTS = 1 << 22
#: When set (an int), overrides the block height (tests use it to exercise many blocks).
BLOCK_ROWS: int | None = None
#: DrLIM's blockwise path lists the pairs within the margin when they are at most 1/this of a
#: block (else it runs the dense block). Tests set it to force either path.
SPARSE_FRACTION = 32


class HardPairs(NamedTuple):
    positive_index: Tensor  # (N,) int64, -1: none
    negative_index: Tensor  # (N,) int64, -1: none


class SemiHardPairs(NamedTuple):
    positive_index: Tensor  # (N, K) int64, -1: empty slot
    negative_index: Tensor  # (N, K) int64, -1: empty slot


class BatchAllStats(NamedTuple):
    loss_sum: Tensor  # (N,) accumulation dtype
    active_count: Tensor  # (N,) int64


class DistanceBackend(Protocol):
    """What :mod:`csrc_triton.distance_ops` needs of a backend (maths: module docstring)."""

    def mine_hard(
        self, x: Tensor, y: Tensor, *, distance: str, self_offset: int | None,
        row_labels: Tensor, col_labels: Tensor, farthest_negative: bool,
    ) -> HardPairs: ...

    def mine_semi_hard(
        self, x: Tensor, y: Tensor, *, distance: str, self_offset: int | None,
        row_labels: Tensor, col_labels: Tensor,
    ) -> SemiHardPairs: ...

    def batch_all_forward(
        self, x: Tensor, y: Tensor, *, distance: str, margin: float, self_offset: int | None,
        row_labels: Tensor, col_labels: Tensor,
    ) -> BatchAllStats: ...

    def batch_all_backward(
        self, grad: Tensor, x: Tensor, y: Tensor, *, distance: str, margin: float,
        self_offset: int | None, row_labels: Tensor, col_labels: Tensor,
    ) -> tuple[Tensor, Tensor]: ...

    def drlim_forward(
        self, x: Tensor, y: Tensor, *, margin: float, row_labels: Tensor, col_labels: Tensor,
    ) -> Tensor: ...

    def drlim_backward(
        self, grad: Tensor, x: Tensor, y: Tensor, *, margin: float, row_labels: Tensor,
        col_labels: Tensor,
    ) -> tuple[Tensor, Tensor]: ...


#: backend name -> "module:attribute"; imported on first use (the Triton one needs triton).
REGISTRY: dict[str, str] = {
    "triton": "csrc_triton.triton_distance:BACKEND",
    "blockwise": "csrc_triton.distances:BLOCKWISE",
    "dense": "csrc_triton.distances:DENSE",
}


def load(name: str) -> DistanceBackend:
    """The backend registered as ``name`` (it satisfies :class:`DistanceBackend`)."""
    module, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


# --------------------------------------------------------------------------------------------
# Label structure, O(M log M): no N x M mask is ever built for it
# --------------------------------------------------------------------------------------------
def label_counts(row_labels: Tensor, col_labels: Tensor, self_offset: int | None) -> tuple[Tensor, Tensor]:
    """(|P(i)|, |N(i)|) per anchor, int64 (N,), from sorted labels."""
    r = class_ranges(row_labels, col_labels, self_offset)
    n_pos = r.count - (r.self_sorted >= 0).to(torch.int64)
    return n_pos, col_labels.shape[0] - r.count


def max_class_count(r: ClassRanges) -> int:
    # One host synchronisation: the padded slot count K is a shape.
    return max(int(r.count.max()), 1) if r.count.numel() else 1


def positive_slots(row_labels: Tensor, col_labels: Tensor, self_offset: int | None) -> Tensor:
    """positive_index (N, K) as :meth:`DistanceBackend.mine_semi_hard` lays it out."""
    r = class_ranges(row_labels, col_labels, self_offset)
    pos, _, positive = class_slots(r, max_class_count(r))
    return torch.where(positive, r.perm[pos], -1)


def _fill_class(block: Tensor, pos: Tensor, count: Tensor, value: float) -> Tensor:
    """block[i, pos[i, :]] = value for the rows whose class is not empty. Slots past a class's
    end repeat its first position, so every write to one address carries the same value."""
    fill = torch.where(count[:, None] > 0, torch.full_like(pos, 0, dtype=block.dtype).fill_(value), block.gather(1, pos))
    return block.scatter_(1, pos, fill)


def _count_below(sorted_rows: Tensor, values: Tensor, *, strict: bool) -> Tensor:
    """#{k : sorted_rows[i, k] <= values[i, j]} (strict: <) as int64 (rows, M): K compares
    when the rows are short (faster than a binary search per element on this CPU), else
    torch.searchsorted. Rows are ascending, +inf padded."""
    k = sorted_rows.shape[1]
    if k > 8:
        return torch.searchsorted(sorted_rows, values, right=not strict)
    count = torch.zeros(values.shape, dtype=torch.int64, device=values.device)
    below = torch.empty(values.shape, dtype=torch.bool, device=values.device)
    for col in range(k):
        edge = sorted_rows[:, col : col + 1]
        count += torch.lt(edge, values, out=below) if strict else torch.le(edge, values, out=below)
    return count


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} is not one of {DISTANCES}")


def _out(t: Tensor, like: Tensor) -> Tensor:
    """Copy into a fresh output from :func:`_alloc.empty` (poisoned in tests)."""
    out = empty(*t.shape, dtype=like.dtype if like.dtype.is_floating_point else t.dtype, device=t.device)
    return out.copy_(t)


# --------------------------------------------------------------------------------------------
# Blockwise backend
# --------------------------------------------------------------------------------------------
def block_rows_for(n: int, m: int, workspace: int = WORKSPACE_ELEMENTS) -> int:
    if BLOCK_ROWS is not None:
        return max(1, min(n, int(BLOCK_ROWS)))
    return max(1, min(n, 2048, workspace // max(m, 1)))


class _Tiles:
    """x, y in the accumulation dtype (y optionally in label order) and the augmented factors
    whose single GEMM gives a block of distances with no extra pass:

        [x, |x|^2, 1] . [-2y, 1, |y|^2]  = sq          (euclidean, squared)
        [x, 1] . [-y, 1]                 = 1 - x.y     (cosine)
        [x, 1] . [-2y, |y|^2]            = |y|^2 - 2 x.y   (mining key: sq less |x|^2)
        x . (-y)                         = -x.y        (cosine mining key)
    """

    def __init__(self, x: Tensor, y: Tensor, distance: str, *, mining: bool = False, perm: Tensor | None = None) -> None:
        _check_distance(distance)
        self.acc = acc_dtype(x)
        self.distance = distance
        self.mining = mining
        self.x = x.to(self.acc)
        self.y = (y if perm is None else y[perm]).to(self.acc)
        ones_x = torch.ones(x.shape[0], 1, dtype=self.acc, device=x.device)
        ones_y = torch.ones(y.shape[0], 1, dtype=self.acc, device=x.device)
        if distance == "cosine":
            self.lhs = self.x if mining else torch.cat([self.x, ones_x], dim=1)
            self.rhs = -self.y if mining else torch.cat([-self.y, ones_y], dim=1)
            return
        y_sq = (self.y * self.y).sum(dim=1, keepdim=True)
        if mining:
            self.lhs = torch.cat([self.x, ones_x], dim=1)
            self.rhs = torch.cat([-2.0 * self.y, y_sq], dim=1)
        else:
            x_sq = (self.x * self.x).sum(dim=1, keepdim=True)
            self.lhs = torch.cat([self.x, x_sq, ones_x], dim=1)
            self.rhs = torch.cat([-2.0 * self.y, ones_y, y_sq], dim=1)

    def block(self, start: int, stop: int, out: Tensor, *, clamp_to: float | None = None) -> Tensor:
        """Anchors start:stop against every candidate, into ``out`` (rows, M): the mining key,
        or the distance. ``clamp_to`` (euclidean): sq is clamped into [0, clamp_to^2] first."""
        torch.mm(self.lhs[start:stop], self.rhs.T, out=out)
        if self.mining or self.distance == "cosine":
            return out
        if clamp_to is None:
            out.clamp_min_(0.0)
        else:
            # sqrt(fl(m * m)) == m exactly in binary floating point, so pairs beyond the margin
            # come out at exactly m
            out.clamp_(0.0, float(torch.tensor(clamp_to, dtype=self.acc) ** 2))
        if self.distance == "euclidean":
            out.sqrt_()
        return out


def _fill_self(block: Tensor, start: int, self_offset: int | None, value: float) -> None:
    """block[i, start + i + self_offset] = value for the rows whose own candidate exists."""
    if self_offset is None:
        return
    offset = start + self_offset
    n_diag = max(0, min(block.shape[0], block.shape[1] - offset))
    if n_diag:
        block.diagonal(offset=offset)[:n_diag] = value


def _chain_block(
    coef: Tensor, dist: Tensor | None, xb: Tensor, y: Tensor, distance: str, dx_out: Tensor,
    dy_acc: Tensor, dy_rowsum: Tensor,
) -> None:
    """Given G = dL/dd for a block (modified in place), dx of its rows (written) and the
    block's dy contributions (accumulated; dy_rowsum gathers colsum(C) for the y term)."""
    if distance == "cosine":
        # d = 1 - x.y: dx = -G y, dy = -G^T x
        torch.mm(coef, y, out=dx_out).neg_()
        dy_acc.addmm_(coef.T, xb, alpha=-1.0)
        return
    if distance == "euclidean":
        # C = G / d, 0 where d = 0 (torch's norm gradient at 0)
        coef.div_(dist).masked_fill_(dist == 0, 0.0)
    else:
        coef.mul_(2.0)
    # dx_i = rowsum(C)_i x_i - (C y)_i;  dy_j += colsum(C)_j y_j - (C^T x)_j
    torch.mm(coef, y, out=dx_out).neg_().add_(coef.sum(dim=1)[:, None] * xb)
    dy_acc.addmm_(coef.T, xb, alpha=-1.0)
    dy_rowsum.add_(coef.sum(dim=0))


def _finish_grads(dx: Tensor, dy: Tensor, dy_rowsum: Tensor, t: _Tiles, x: Tensor, y: Tensor, perm: Tensor | None):
    if t.distance != "cosine":
        dy.add_(dy_rowsum[:, None] * t.y)
    if perm is not None:  # back from label order to the candidates' own order
        dy = torch.empty_like(dy).index_copy_(0, perm, dy)
    return dx, dy


class BlockwiseDistances:
    """The tiling in plain PyTorch: a block of anchor rows against every candidate at a time,
    O(block x M) workspace (:data:`WORKSPACE_ELEMENTS`), float32 (float64) GEMMs."""

    name = "blockwise"

    # ---------------------------------------------------------------- hard mining
    def mine_hard(self, x, y, *, distance, self_offset, row_labels, col_labels, farthest_negative):
        # Candidates in label order: a class is a contiguous range, so the positives are a
        # (rows, K) gather and the negatives the row minus a (rows, K) scatter -- one full
        # pass over each block besides its GEMM.
        n, m = x.shape[0], y.shape[0]
        cr = class_ranges(row_labels, col_labels, self_offset)
        slots, _, positive = class_slots(cr, max_class_count(cr))
        t = _Tiles(x, y, distance, mining=True, perm=cr.perm)
        # one (rows x M) buffer only: blocks 4x taller than the shared workspace (a taller GEMM
        # runs 1.5x faster per row at M = 65536 on this CPU)
        rows = block_rows_for(n, m, 4 * WORKSPACE_ELEMENTS)
        buf = torch.empty(rows, m, dtype=t.acc, device=x.device)
        pos_at = torch.empty(n, dtype=torch.int64, device=x.device)
        neg_at = torch.empty(n, dtype=torch.int64, device=x.device)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            key = t.block(start, stop, buf[: stop - start])
            pos = slots[start:stop]
            # farthest positive: the first maximum in slot (= index) order; NaN wins
            best = torch.where(positive[start:stop], key.gather(1, pos), -math.inf).max(dim=1).indices
            pos_at[start:stop] = pos.gather(1, best[:, None])[:, 0]
            if farthest_negative:
                _fill_class(key, pos, cr.count[start:stop], -math.inf)
                neg_at[start:stop] = key.max(dim=1).indices
            else:
                _fill_class(key, pos, cr.count[start:stop], math.inf)
                neg_at[start:stop] = key.min(dim=1).indices
        n_pos = positive.sum(dim=1)
        n_neg = m - cr.count
        pos_idx = torch.where(n_pos > 0, cr.perm[pos_at], -1)
        neg_idx = torch.where(n_neg > 0, cr.perm[neg_at], -1)
        return HardPairs(_out(pos_idx, pos_idx), _out(neg_idx, neg_idx))

    # ---------------------------------------------------------------- semi-hard mining
    def mine_semi_hard(self, x, y, *, distance, self_offset, row_labels, col_labels):
        n, m = x.shape[0], y.shape[0]
        cr = class_ranges(row_labels, col_labels, self_offset)
        k = max_class_count(cr)
        slots, in_class, positive = class_slots(cr, k)
        t = _Tiles(x, y, distance, perm=cr.perm)  # label order: a class is a contiguous range
        _, n_neg = label_counts(row_labels, col_labels, self_offset)
        rows = block_rows_for(n, m, WORKSPACE_ELEMENTS // 2)
        dist = torch.empty(rows, m, dtype=t.acc, device=x.device)
        neg_out = torch.full((n, k), -1, dtype=torch.int64, device=x.device)
        big = torch.iinfo(torch.int64).max
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            r = stop - start
            d = t.block(start, stop, dist[:r])
            pos = slots[start:stop]
            s = torch.where(positive[start:stop], d.gather(1, pos), math.inf)  # (r, k) d_ip
            s_sorted, order = torch.sort(s, dim=1)
            _fill_class(d, pos, cr.count[start:stop], -math.inf)  # the class is no negative
            nan_neg = torch.isnan(d)
            any_nan = nan_neg.any(dim=1)
            cols = cr.perm[None, :].expand(r, m)  # original index of each (label-ordered) column
            # farthest negative (the fallback), smallest original index among equals
            far_val = d.max(dim=1, keepdim=True).values
            fallback = torch.where(d == far_val, cols, big).amin(dim=1)
            # bucket b = #{p : s_p < v}: v is a semi-hard negative of the sorted positives 0..b-1
            bucket = _count_below(s_sorted, d, strict=True)
            bucket.masked_fill_(nan_neg, k)
            bmin = torch.full((r, k + 1), math.inf, dtype=t.acc, device=x.device)
            bmin.scatter_reduce_(1, bucket, d.nan_to_num(nan=math.inf), "amin")
            # smallest index among a bucket's minima (equal distances share a bucket)
            is_min = d == bmin.gather(1, bucket)
            barg = torch.full((r, k + 1), big, dtype=torch.int64, device=x.device)
            barg.scatter_reduce_(1, bucket, torch.where(is_min, cols, big), "amin")
            # nearest semi-hard negative of sorted positive q: the minimum over buckets b > q
            tail_val, tail_at = torch.cummin(bmin[:, 1:].flip(1), dim=1)
            best_val = tail_val.flip(1)  # (r, k)
            best_bucket = k - tail_at.flip(1)
            best_idx = barg.gather(1, best_bucket)
            chosen = torch.where(best_val < math.inf, best_idx, fallback[:, None])
            if bool(any_nan.any()):  # NaN wins: the first NaN negative for every slot
                first_nan = torch.where(nan_neg, cols, big).amin(dim=1)
                chosen = torch.where(any_nan[:, None], first_nan[:, None], chosen)
            by_slot = torch.empty_like(chosen).scatter_(1, order, chosen)
            ok = positive[start:stop] & (n_neg[start:stop, None] > 0)
            neg_out[start:stop] = torch.where(ok, by_slot, -1)
        pos_out = torch.where(positive, cr.perm[slots], -1)
        return SemiHardPairs(_out(pos_out, pos_out), _out(neg_out, neg_out))

    # ---------------------------------------------------------------- batch-all
    def _batch_all_blocks(self, x, y, distance, margin, self_offset, row_labels, col_labels, grad):
        """Forward (grad None): (loss_sum, active_count). Backward: (dx, dy)."""
        n, m = x.shape[0], y.shape[0]
        cr = class_ranges(row_labels, col_labels, self_offset)
        k = max_class_count(cr)
        slots, _, positive = class_slots(cr, k)
        t = _Tiles(x, y, distance, perm=cr.perm)
        rows = block_rows_for(n, m, WORKSPACE_ELEMENTS // 4)
        dist = torch.empty(rows, m, dtype=t.acc, device=x.device)
        if grad is None:
            loss_sum = torch.empty(n, dtype=t.acc, device=x.device)
            active = torch.empty(n, dtype=torch.int64, device=x.device)
        else:
            g_all = grad.to(t.acc)
            dx = torch.empty(n, x.shape[1], dtype=t.acc, device=x.device)
            dy = torch.zeros(m, x.shape[1], dtype=t.acc, device=x.device)
            dy_rowsum = torch.zeros(m, dtype=t.acc, device=x.device)
        flt_max = torch.finfo(t.acc).max
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            r = stop - start
            d = t.block(start, stop, dist[:r])
            pos = slots[start:stop]
            is_pos = positive[start:stop]
            s = torch.where(is_pos, d.gather(1, pos), math.inf)
            s_sorted, order = torch.sort(s, dim=1)
            n_p = is_pos.sum(dim=1)  # k_i
            slot = torch.arange(k, device=x.device)
            valid_sorted = slot[None, :] < n_p[:, None]
            prefix = torch.zeros(r, k + 1, dtype=t.acc, device=x.device)
            torch.cumsum(torch.where(valid_sorted, s_sorted, 0.0), dim=1, out=prefix[:, 1:])
            total = prefix.gather(1, n_p[:, None])
            # a NaN anywhere in the row makes the anchor's loss (and its gradients) NaN
            row_nan = torch.isnan(d.sum(dim=1))
            dist_copy = d.clone() if (grad is not None and distance == "euclidean") else None
            # t_n = d_in - margin; the class gets t = FLT_MAX: c = 0 and a zero contribution
            tn = _fill_class(d, pos, cr.count[start:stop], flt_max).sub_(margin)
            idx = _count_below(s_sorted, tn, strict=False)  # #{s <= t_n}
            c = (n_p[:, None] - idx).clamp_(min=0)  # #{p : s_p > t_n}
            if grad is None:
                above = total - prefix.gather(1, idx.clamp_(max=k))  # sum of the s_p > t_n
                contrib = above.sub_(c.to(t.acc) * tn)
                loss_sum[start:stop] = torch.where(row_nan, math.nan, contrib.sum(dim=1))
                active[start:stop] = c.sum(dim=1)
                continue
            g = g_all[start:stop]
            g = torch.where(row_nan, math.nan, g)
            # dL/dd_in = -g c_n; dL/dd_ip = g #{n : t_n < s_p} = g #{n : idx_n <= rank(p)}
            hist = torch.zeros(r, k + 1, dtype=t.acc, device=x.device)
            hist.scatter_add_(1, idx.clamp_(max=k), torch.ones_like(tn))
            w_sorted = hist.cumsum(dim=1)[:, :k]
            w = torch.empty_like(w_sorted).scatter_(1, order, w_sorted)
            coef = c.to(t.acc).mul_(-g[:, None])
            coef.scatter_add_(1, pos, torch.where(is_pos, w * g[:, None], 0.0))
            d_for_chain = dist_copy
            _chain_block(coef, d_for_chain, t.x[start:stop], t.y, distance, dx[start:stop], dy, dy_rowsum)
        if grad is None:
            return BatchAllStats(_out(loss_sum, loss_sum), _out(active, active))
        return _finish_grads(dx, dy, dy_rowsum, t, x, y, cr.perm)

    def batch_all_forward(self, x, y, *, distance, margin, self_offset, row_labels, col_labels):
        return self._batch_all_blocks(x, y, distance, margin, self_offset, row_labels, col_labels, None)

    def batch_all_backward(self, grad, x, y, *, distance, margin, self_offset, row_labels, col_labels):
        return self._batch_all_blocks(x, y, distance, margin, self_offset, row_labels, col_labels, grad)

    # ---------------------------------------------------------------- DrLIM
    def _drlim_blocks(self, x, y, margin, row_labels, col_labels, grad):
        """Candidates in label order. Per block, after the GEMM giving sq:

        * the anchor's class (itself included) is set to +inf: a (rows, K) scatter. Such an
          entry then clamps to c = margin, so h = 0 and C = 0 there with no further mask;
        * one row minimum finds the rows with a dissimilar pair within the margin (sq <
          margin^2, or NaN); the others contribute nothing. The usual case (pairs of different
          classes mostly lie beyond the margin) costs the GEMM and this one reduction;
        * in the busy rows, the pairs within the margin are counted; when they are few (at
          most 1/:data:`SPARSE_FRACTION` of those rows' entries) only they are processed, as
          lists (index_add of h^2 / 2; backward: index_add of C y and C^T [g x, g]);
        * otherwise dense: c = sqrt(clamp(sq, 0, margin^2)) (exactly margin beyond it), h =
          margin - c, dissimilar_i = |h_i|^2 / 2; backward C = h / c (0 at c = 0: torch's norm
          gradient at 0), one GEMM each for [C y, rowsum C] = C [y, 1] and
          [sum_i g_i C_ij x_i, sum_i g_i C_ij] = C^T [g x, g].

        Then dx_i = -g_i (rowsum(C)_i x_i - (C y)_i) and dy_j = (C^T g x)_j - (C^T g)_j y_j."""
        n, m = x.shape[0], y.shape[0]
        acc = acc_dtype(x)
        if margin == 0:  # relu(0 - d) = 0: nothing to compute
            if grad is None:
                return _out(torch.zeros(n, dtype=acc, device=x.device), torch.zeros(0, dtype=acc))
            return torch.zeros(x.shape, dtype=acc, device=x.device), torch.zeros(y.shape, dtype=acc, device=y.device)
        cr = class_ranges(row_labels, col_labels, None)
        slots, _, _ = class_slots(cr, max_class_count(cr))
        t = _Tiles(x, y, "euclidean", perm=cr.perm)
        rows = block_rows_for(n, m)
        dist = torch.empty(rows, m, dtype=acc, device=x.device)
        margin_t = torch.tensor(margin, dtype=acc, device=x.device)
        m2 = float(margin_t**2)  # sqrt(fl(m * m)) == m exactly: clamped pairs come out at m
        d_feat = x.shape[1]
        if grad is None:
            out = empty(n, dtype=acc, device=x.device)
        else:
            g_all = grad.to(acc)
            y1 = torch.cat([t.y, torch.ones(m, 1, dtype=acc, device=x.device)], dim=1)
            gx = torch.cat([g_all[:, None] * t.x, g_all[:, None]], dim=1)
            dx = torch.empty(n, d_feat, dtype=acc, device=x.device)
            dy_aug = torch.zeros(m, d_feat + 1, dtype=acc, device=x.device)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            r = stop - start
            sq = torch.mm(t.lhs[start:stop], t.rhs.T, out=dist[:r])
            _fill_class(sq, slots[start:stop], cr.count[start:stop], math.inf)
            busy = (sq.amin(dim=1) >= m2).logical_not_().nonzero()[:, 0]  # within the margin, or NaN
            if grad is None:
                out[start:stop] = 0.0
            else:
                dx[start:stop] = 0.0
            if busy.numel() == 0:
                continue
            sub = sq if busy.numel() == r else sq.index_select(0, busy)  # (k, M) busy rows
            anchors = start + busy
            near = (sub >= m2).logical_not_()
            n_near = int(near.sum())
            if n_near <= near.numel() // SPARSE_FRACTION:
                i, j = near.nonzero().unbind(1)
                d = sub[i, j].clamp_min_(0.0).sqrt_()
                h = margin - d
                if grad is None:
                    out.index_add_(0, anchors[i], 0.5 * h * h)
                    continue
                coef = torch.where(d == 0, 0.0, h / d)  # C = h / d, 0 at d = 0; NaN stays
                cy = torch.zeros(busy.numel(), d_feat + 1, dtype=acc, device=x.device)
                for e0 in range(0, i.shape[0], 1 << 15):  # bounded (pairs x D) temporaries
                    ie, je, ce = i[e0 : e0 + (1 << 15)], j[e0 : e0 + (1 << 15)], coef[e0 : e0 + (1 << 15), None]
                    cy.index_add_(0, ie, ce * y1[je])
                    dy_aug.index_add_(0, je, ce * gx[anchors[ie]])
            else:
                c = sub.clamp_(0.0, m2).sqrt_()
                h = torch.sub(margin_t, c)  # relu(margin - d): exactly 0 beyond the margin and in the class
                if grad is None:
                    out[anchors] = torch.linalg.vector_norm(h, dim=1).square_().mul_(0.5)
                    continue
                coef = h.div_(c).nan_to_num_(nan=math.nan, posinf=0.0)  # C = h / d, 0 at d = 0
                cy = coef @ y1
                dy_aug.addmm_(coef.T, gx[anchors])
            dx[anchors] = (cy[:, -1:] * t.x[anchors] - cy[:, :-1]).mul_(-g_all[anchors, None])
        if grad is None:
            return out
        dy_sorted = dy_aug[:, :-1] - dy_aug[:, -1:] * t.y
        dy = torch.empty_like(dy_sorted).index_copy_(0, cr.perm, dy_sorted)
        return dx, dy

    def drlim_forward(self, x, y, *, margin, row_labels, col_labels):
        return self._drlim_blocks(x, y, margin, row_labels, col_labels, None)

    def drlim_backward(self, grad, x, y, *, margin, row_labels, col_labels):
        return self._drlim_blocks(x, y, margin, row_labels, col_labels, grad)


# --------------------------------------------------------------------------------------------
# Dense backend: the reference; materialises the N x M distances (and, for batch-all, the
# triplets of a few anchors at a time)
# --------------------------------------------------------------------------------------------
class DenseDistances:
    """Materialises every distance; simple masked reductions. The reference and baseline."""

    name = "dense"

    @staticmethod
    def _dist(x: Tensor, y: Tensor, distance: str, *, mining: bool, perm: Tensor | None = None) -> Tensor:
        t = _Tiles(x, y, distance, mining=mining, perm=perm)
        return t.block(0, x.shape[0], torch.empty(x.shape[0], y.shape[0], dtype=t.acc, device=x.device))

    @staticmethod
    def _masks(row_labels, col_labels, self_offset, n, m):
        same = row_labels[:, None] == col_labels[None, :]
        own = torch.zeros(n, m, dtype=torch.bool, device=row_labels.device)
        if self_offset is not None:
            i = torch.arange(n, device=own.device)
            ok = i + self_offset < m
            own[i[ok], (i + self_offset)[ok]] = True
        return same & ~own, ~same

    def mine_hard(self, x, y, *, distance, self_offset, row_labels, col_labels, farthest_negative):
        # candidates in (label, index) order: the tie rule of every backend
        perm = torch.sort(col_labels, stable=True).indices
        key = self._dist(x, y, distance, mining=True, perm=perm)
        pos, neg = self._masks(row_labels, col_labels, self_offset, *key.shape)
        pos, neg = pos[:, perm], neg[:, perm]
        p = torch.where(pos, key, -math.inf).max(dim=1).indices
        if farthest_negative:
            q = torch.where(neg, key, -math.inf).max(dim=1).indices
        else:
            q = torch.where(neg, key, math.inf).min(dim=1).indices
        p = torch.where(pos.any(dim=1), perm[p], -1)
        q = torch.where(neg.any(dim=1), perm[q], -1)
        return HardPairs(_out(p, p), _out(q, q))

    def mine_semi_hard(self, x, y, *, distance, self_offset, row_labels, col_labels):
        d = self._dist(x, y, distance, mining=False)
        _, neg = self._masks(row_labels, col_labels, self_offset, *d.shape)
        pos_index = positive_slots(row_labels, col_labels, self_offset)  # (N, K)
        s = d.gather(1, pos_index.clamp(min=0))  # (N, K)
        # semi-hard candidates: negatives farther than the positive (N, K, M)
        cand = neg[:, None, :] & (d[:, None, :] > s[:, :, None])
        nearest = torch.where(cand, d[:, None, :], math.inf).min(dim=2)
        farthest = torch.where(neg, d, -math.inf).max(dim=1).indices
        chosen = torch.where(nearest.values < math.inf, nearest.indices, farthest[:, None])
        nan_neg = neg & torch.isnan(d)
        first_nan = nan_neg.to(torch.int8).argmax(dim=1)
        chosen = torch.where(nan_neg.any(dim=1)[:, None], first_nan[:, None], chosen)
        ok = (pos_index >= 0) & neg.any(dim=1)[:, None]
        neg_index = torch.where(ok, chosen, -1)
        return SemiHardPairs(_out(pos_index, pos_index), _out(neg_index, neg_index))

    @staticmethod
    def _chain(g: Tensor, d: Tensor, x: Tensor, y: Tensor, distance: str) -> tuple[Tensor, Tensor]:
        """dx, dy from G = dL/dd (N, M), materialised (module docstring)."""
        if distance == "cosine":
            return -g @ y, -g.T @ x
        if distance == "euclidean":
            c = torch.where(d > 0, g / d, torch.zeros_like(g))
            c = torch.where(torch.isnan(d) | torch.isnan(g), d + g, c)
        else:
            c = 2.0 * g
        return c.sum(1)[:, None] * x - c @ y, c.sum(0)[:, None] * y - c.T @ x

    def _batch_all(self, x, y, distance, margin, self_offset, row_labels, col_labels, grad):
        """Explicit (p, n) triplets of a few anchors at a time. Forward (grad None):
        (loss_sum, active_count); backward: (dx, dy)."""
        _check_distance(distance)
        n, m = x.shape[0], y.shape[0]
        t = _Tiles(x, y, distance)
        d = self._dist(x, y, distance, mining=False)
        pos, neg = self._masks(row_labels, col_labels, self_offset, n, m)
        chunk = max(1, (1 << 24) // max(m * m, 1))
        sums, counts, g_rows = [], [], []
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            z = d[sl, :, None] - d[sl, None, :] + margin  # (rows, p, n): d_ap - d_an + margin
            active = pos[sl, :, None] & neg[sl, None, :] & (z > 0)
            if grad is None:
                sums.append(torch.where(active, z, 0.0).sum(dim=(1, 2)))
                counts.append(active.sum(dim=(1, 2)))
            else:
                a = active.to(d.dtype)
                # dL/dd_ap = g #{n active}, dL/dd_an = -g #{p active}
                g_rows.append(grad.to(d.dtype)[sl, None] * (a.sum(dim=2) - a.sum(dim=1)))
        nan_rows = torch.isnan(d).any(dim=1)
        if grad is None:
            loss = torch.where(nan_rows, math.nan, torch.cat(sums))
            count = torch.cat(counts)
            return BatchAllStats(_out(loss, loss), _out(count, count))
        g = torch.cat(g_rows)
        g = torch.where(nan_rows[:, None], math.nan, g)
        dx, dy = self._chain(g, d, t.x, t.y, distance)
        return dx, dy

    def batch_all_forward(self, x, y, *, distance, margin, self_offset, row_labels, col_labels):
        return self._batch_all(x, y, distance, margin, self_offset, row_labels, col_labels, None)

    def batch_all_backward(self, grad, x, y, *, distance, margin, self_offset, row_labels, col_labels):
        return self._batch_all(x, y, distance, margin, self_offset, row_labels, col_labels, grad)

    def _drlim(self, x, y, margin, row_labels, col_labels):
        d = self._dist(x, y, "euclidean", mining=False)
        h = torch.where(row_labels[:, None] == col_labels[None, :], 0.0, (margin - d).clamp_min(0.0))
        return d, h

    def drlim_forward(self, x, y, *, margin, row_labels, col_labels):
        _, h = self._drlim(x, y, margin, row_labels, col_labels)
        out = 0.5 * (h * h).sum(dim=1)
        return _out(out, out)

    def drlim_backward(self, grad, x, y, *, margin, row_labels, col_labels):
        d, h = self._drlim(x, y, margin, row_labels, col_labels)
        t = _Tiles(x, y, "euclidean")
        dx, dy = self._chain(-grad.to(d.dtype)[:, None] * h, d, t.x, t.y, "euclidean")
        return dx, dy


BLOCKWISE = BlockwiseDistances()
DENSE = DenseDistances()
