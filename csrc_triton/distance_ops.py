"""PyTorch op registration for the distance losses: ``torch.ops.contrastive.*``.

Core ops (functional, fake kernels so that ``torch.compile`` traces; backends from
:data:`csrc_triton.distances.REGISTRY`; the maths in :mod:`csrc_triton.distances`):

    triplet_hard_mine(x, y, row_labels, col_labels, self_offset, distance, farthest_negative,
                      backend) -> (positive_index (N,), negative_index (N,))        int64, -1: none
    triplet_semi_hard_mine(x, y, row_labels, col_labels, self_offset, distance, backend)
                      -> (positive_index (N, K), negative_index (N, K))            int64, -1: none
    triplet_batch_all(x, y, row_labels, col_labels, self_offset, margin, distance, backend)
                      -> (loss_sum (N,), active_count (N,))       with autograd on loss_sum
    triplet_batch_all_backward(grad, x, y, ...) -> (dx, dy)
    drlim_dissimilar(x, y, row_labels, col_labels, margin, backend) -> (N,)   with autograd
    drlim_dissimilar_backward(grad, x, y, row_labels, col_labels, margin, backend) -> (dx, dy)

(K of the semi-hard op is the largest class count: a data-dependent size.) Loss ops, composite
(autograd flows through the core ops and O(N D) PyTorch work), single-process:

    triplet_margin(embeddings, labels, margin, mining, distance, soft, reduction, backend)
    drlim(embeddings, labels, margin, reduction, backend)

The loss implementations below also take a ``process_group`` (see :mod:`csrc_triton.triplet`
for the public, validated functions and the distributed convention).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed, ops
from .ops import _no_autocast
from ._alloc import empty
from ._numerics import acc_dtype
from .distances import DistanceBackend, load

MININGS = ("batch_hard", "batch_all", "semi_hard")


def resolve_backend(backend: str, x: Tensor) -> str:
    """The engine's one rule (:func:`csrc_triton.ops.resolve_backend`) for ``x``'s device and dtype."""
    return ops.resolve_backend(backend, x.device, x.dtype)


def _backend(backend: str, x: Tensor) -> DistanceBackend:
    return load(resolve_backend(backend, x))


# --------------------------------------------------------------------------------------------
# Mining ops (integer outputs: no autograd)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("contrastive::triplet_hard_mine", mutates_args=())
def triplet_hard_mine(
    x: Tensor,
    y: Tensor,
    row_labels: Tensor,
    col_labels: Tensor,
    self_offset: int | None,
    distance: str,
    farthest_negative: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Per anchor the farthest positive and the nearest (or farthest) negative, int64 (N,)
    each, -1 for none. Ties: the smallest candidate index; a NaN distance wins."""
    with _no_autocast(x.device):
        return tuple(
            _backend(backend, x).mine_hard(
                x, y, distance=distance, self_offset=self_offset, row_labels=row_labels,
                col_labels=col_labels, farthest_negative=farthest_negative,
            )
        )


@triplet_hard_mine.register_fake
def _(x, y, row_labels, col_labels, self_offset, distance, farthest_negative, backend):
    return x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(x.shape[0], dtype=torch.int64)


@torch.library.custom_op("contrastive::triplet_semi_hard_mine", mutates_args=())
def triplet_semi_hard_mine(
    x: Tensor,
    y: Tensor,
    row_labels: Tensor,
    col_labels: Tensor,
    self_offset: int | None,
    distance: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Positive pairs as (N, K) slots and the semi-hard negative of each (TF Addons' rule)."""
    with _no_autocast(x.device):
        return tuple(
            _backend(backend, x).mine_semi_hard(
                x, y, distance=distance, self_offset=self_offset, row_labels=row_labels, col_labels=col_labels
            )
        )


@triplet_semi_hard_mine.register_fake
def _(x, y, row_labels, col_labels, self_offset, distance, backend):
    k = torch.library.get_ctx().new_dynamic_size(min=1)
    return x.new_empty(x.shape[0], k, dtype=torch.int64), x.new_empty(x.shape[0], k, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Batch-all and DrLIM's dissimilar half: per-anchor sums with tiled forward and backward.
# ``y=None`` means the candidates are x itself: the backward then adds the anchor and candidate
# gradients in float32 and casts once (a 16-bit gradient is rounded once, not twice).
# --------------------------------------------------------------------------------------------
def _cast_grads(x: Tensor, y: Tensor | None, dx: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    gx = empty(*x.shape, dtype=x.dtype, device=x.device)
    if y is None:
        return gx.copy_(dx + dy), x.new_zeros(0)
    gy = empty(*y.shape, dtype=y.dtype, device=y.device)
    return gx.copy_(dx), gy.copy_(dy)


def _grads_fake(x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), (x.new_empty(0) if y is None else torch.empty_like(y))


@torch.library.custom_op("contrastive::triplet_batch_all", mutates_args=())
def triplet_batch_all(
    x: Tensor,
    y: Tensor | None,
    row_labels: Tensor,
    col_labels: Tensor,
    self_offset: int | None,
    margin: float,
    distance: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """loss_sum_i = sum_{p, n} relu(d_ip - d_in + margin) (N,) and the count of positive terms
    (N,) int64; y None: the candidates are x."""
    with _no_autocast(x.device):
        return tuple(
            _backend(backend, x).batch_all_forward(
                x, x if y is None else y, distance=distance, margin=margin, self_offset=self_offset,
                row_labels=row_labels, col_labels=col_labels,
            )
        )


@triplet_batch_all.register_fake
def _(x, y, row_labels, col_labels, self_offset, margin, distance, backend):
    return x.new_empty(x.shape[0], dtype=acc_dtype(x)), x.new_empty(x.shape[0], dtype=torch.int64)


@torch.library.custom_op("contrastive::triplet_batch_all_backward", mutates_args=())
def triplet_batch_all_backward(
    grad: Tensor,
    x: Tensor,
    y: Tensor | None,
    row_labels: Tensor,
    col_labels: Tensor,
    self_offset: int | None,
    margin: float,
    distance: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Gradients of sum_i grad_i loss_sum_i: (dx, dy); y None: (dx + dy, empty)."""
    with _no_autocast(x.device):
        dx, dy = _backend(backend, x).batch_all_backward(
            grad, x, x if y is None else y, distance=distance, margin=margin, self_offset=self_offset,
            row_labels=row_labels, col_labels=col_labels,
        )
        return _cast_grads(x, y, dx, dy)


@triplet_batch_all_backward.register_fake
def _(grad, x, y, row_labels, col_labels, self_offset, margin, distance, backend):
    return _grads_fake(x, y)


def _batch_all_setup(ctx, inputs, output):
    x, y, row_labels, col_labels, self_offset, margin, distance, backend = inputs
    ctx.save_for_backward(x, y, row_labels, col_labels)
    ctx.args = (self_offset, margin, distance, backend)


def _batch_all_backward(ctx, grad_loss, grad_count):
    x, y, row_labels, col_labels = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None, None, None
    dx, dy = torch.ops.contrastive.triplet_batch_all_backward(
        grad_loss.to(acc_dtype(x)).contiguous(), x, y, row_labels, col_labels, *ctx.args
    )
    return dx, (None if y is None else dy), None, None, None, None, None, None


triplet_batch_all.register_autograd(_batch_all_backward, setup_context=_batch_all_setup)


@torch.library.custom_op("contrastive::drlim_dissimilar", mutates_args=())
def drlim_dissimilar(
    x: Tensor, y: Tensor | None, row_labels: Tensor, col_labels: Tensor, margin: float, backend: str
) -> Tensor:
    """dissimilar_i = sum_{j : labels differ} relu(margin - ||x_i - y_j||)^2 / 2, (N,);
    y None: the candidates are x."""
    with _no_autocast(x.device):
        return _backend(backend, x).drlim_forward(
            x, x if y is None else y, margin=margin, row_labels=row_labels, col_labels=col_labels
        )


@drlim_dissimilar.register_fake
def _(x, y, row_labels, col_labels, margin, backend):
    return x.new_empty(x.shape[0], dtype=acc_dtype(x))


@torch.library.custom_op("contrastive::drlim_dissimilar_backward", mutates_args=())
def drlim_dissimilar_backward(
    grad: Tensor, x: Tensor, y: Tensor | None, row_labels: Tensor, col_labels: Tensor, margin: float, backend: str
) -> tuple[Tensor, Tensor]:
    """Gradients of sum_i grad_i dissimilar_i: (dx, dy); y None: (dx + dy, empty)."""
    with _no_autocast(x.device):
        dx, dy = _backend(backend, x).drlim_backward(
            grad, x, x if y is None else y, margin=margin, row_labels=row_labels, col_labels=col_labels
        )
        return _cast_grads(x, y, dx, dy)


@drlim_dissimilar_backward.register_fake
def _(grad, x, y, row_labels, col_labels, margin, backend):
    return _grads_fake(x, y)


def _drlim_setup(ctx, inputs, output):
    x, y, row_labels, col_labels, margin, backend = inputs
    ctx.save_for_backward(x, y, row_labels, col_labels)
    ctx.args = (margin, backend)


def _drlim_backward(ctx, grad):
    x, y, row_labels, col_labels = ctx.saved_tensors
    dx, dy = torch.ops.contrastive.drlim_dissimilar_backward(
        grad.to(acc_dtype(x)).contiguous(), x, y, row_labels, col_labels, *ctx.args
    )
    return dx, (None if y is None else dy), None, None, None, None


drlim_dissimilar.register_autograd(_drlim_backward, setup_context=_drlim_setup)


# --------------------------------------------------------------------------------------------
# Loss implementations (composites; process_group aware)
# --------------------------------------------------------------------------------------------
def _pair_distance(a: Tensor, b: Tensor, distance: str) -> Tensor:
    """d(a_i, b_i) row by row from the differences, under autograd (O(P D)). The euclidean
    norm's gradient at d = 0 is 0 (torch's convention)."""
    if distance == "cosine":
        return 1.0 - (a * b).sum(dim=1)
    diff = a - b
    if distance == "squared":
        return (diff * diff).sum(dim=1)
    return torch.linalg.vector_norm(diff, dim=1)


def _global_batch(embeddings: Tensor, labels: Tensor, distance: str, group: object | None):
    """(x, y, col_labels, self_offset, R): anchors (the local rows), candidates (every rank's
    rows in rank order, gradients back to their owners; None in a single process: x itself),
    the candidates' labels, where anchor 0 sits among them, and R.

    The cosine rows, and every row in a process group, are taken to the accumulation dtype
    first, so that each input gradient is summed in float32 and rounded once."""
    rank, size = distributed.world(group)
    x = embeddings
    if distance == "cosine":
        # rows L2-normalised in the accumulation dtype (O(N D), under autograd)
        x = F.normalize(x.to(acc_dtype(x)), dim=1)
    if size == 1:
        return x, None, labels, 0, 1
    x = x.to(acc_dtype(x))
    y = distributed.gather_rows(x, group)
    col_labels = distributed.gather_constant(labels, group)
    return x, y, col_labels, rank * x.shape[0], size


def triplet_margin_impl(
    embeddings: Tensor,
    labels: Tensor,
    margin: float,
    mining: str,
    distance: str,
    soft: bool,
    reduction: str,
    backend: str,
    process_group: object | None = None,
) -> Tensor:
    acc = acc_dtype(embeddings)
    x, y, col_labels, self_offset, _ = _global_batch(embeddings, labels, distance, process_group)
    if mining == "batch_all":
        loss_sum, active = torch.ops.contrastive.triplet_batch_all(
            x, y, labels, col_labels, self_offset, float(margin), distance, backend
        )
        return distributed.reduce(loss_sum, reduction, process_group, local_count=active.sum())

    xa = x.to(acc)
    ya = xa if y is None else y.to(acc)  # one cast: the gradients meet in float32
    y = x if y is None else y
    if mining == "batch_hard":
        pos, neg = torch.ops.contrastive.triplet_hard_mine(
            x.detach(), y.detach(), labels, col_labels, self_offset, distance, False, backend
        )
        valid = (pos >= 0) & (neg >= 0)
        anchors = xa
    elif mining == "semi_hard":
        pos_slots, neg_slots = torch.ops.contrastive.triplet_semi_hard_mine(
            x.detach(), y.detach(), labels, col_labels, self_offset, distance, backend
        )
        # one entry per positive pair (a, p), anchor-major, p ascending (data-dependent size)
        rows, slots = (neg_slots >= 0).nonzero(as_tuple=True)
        pos, neg = pos_slots[rows, slots], neg_slots[rows, slots]
        valid = None
        anchors = xa[rows]
    else:
        raise ValueError(f"mining={mining!r} is not one of {MININGS}")
    # the chosen pairs' distances, recomputed from the row differences under autograd (O(N D))
    d_ap = _pair_distance(anchors, ya[pos.clamp(min=0)], distance)
    d_an = _pair_distance(anchors, ya[neg.clamp(min=0)], distance)
    per = F.softplus(d_ap - d_an) if soft else F.relu(d_ap - d_an + margin)
    if valid is None:
        count = per.new_tensor(per.shape[0])
    else:
        per = torch.where(valid, per, torch.zeros_like(per))
        count = valid.sum()
    return distributed.reduce(per, reduction, process_group, local_count=count)


def _class_scatter_index(sorted_labels: Tensor, labels: Tensor) -> Tensor:
    """A class id in [0, M) per label (its first position in the sorted candidate labels):
    no torch.unique, no data-dependent shape."""
    return torch.searchsorted(sorted_labels, labels).clamp(max=sorted_labels.shape[0] - 1)


def drlim_impl(
    embeddings: Tensor,
    labels: Tensor,
    margin: float,
    reduction: str,
    backend: str,
    process_group: object | None = None,
) -> Tensor:
    acc = acc_dtype(embeddings)
    # Both halves send gradients to the rows: they must meet in float32 (one rounding of a
    # 16-bit gradient, not two), so the rows go to the accumulation dtype first and the
    # dissimilar op runs on them (float32 tiles for 16-bit inputs).
    x, y, col_labels, _, _ = _global_batch(embeddings.to(acc), labels, "euclidean", process_group)
    xa = x.to(acc)
    ya = xa if y is None else y.to(acc)
    m = ya.shape[0]
    # Similar half, O(M D): sum_{j in class c} |x_i - y_j|^2 = n_c |x_i - mu_c|^2 + q_c with
    # mu_c the class mean and q_c = sum_{j in c} |y_j - mu_c|^2 (the j = i term is 0 anyway).
    sorted_labels = torch.sort(col_labels).values
    col_class = _class_scatter_index(sorted_labels, col_labels)
    row_class = _class_scatter_index(sorted_labels, labels)
    row_known = sorted_labels[row_class] == labels  # the anchor's class is among the candidates
    n_c = torch.zeros(m, dtype=acc, device=x.device).index_add_(0, col_class, torch.ones(m, dtype=acc, device=x.device))
    mu = torch.zeros(m, x.shape[1], dtype=acc, device=x.device).index_add(0, col_class, ya) / n_c.clamp(min=1)[:, None]
    spread = ya - mu[col_class]
    q_c = torch.zeros(m, dtype=acc, device=x.device).index_add(0, col_class, (spread * spread).sum(dim=1))
    to_mean = xa - mu[row_class]
    similar = 0.5 * (n_c[row_class] * (to_mean * to_mean).sum(dim=1) + q_c[row_class])
    similar = torch.where(row_known, similar, torch.zeros_like(similar))
    dissimilar = torch.ops.contrastive.drlim_dissimilar(x, y, labels, col_labels, float(margin), backend)
    per_anchor = similar + dissimilar
    # N(N - 1) ordered pairs of the global batch: every rank knows it, no all-reduce needed
    pairs = torch.tensor(m * (m - 1), dtype=torch.int64, device=x.device)
    return distributed.reduce(per_anchor, reduction, process_group, global_count=pairs)


# --------------------------------------------------------------------------------------------
# Composite loss ops (single process)
# --------------------------------------------------------------------------------------------
_lib = torch.library.Library("contrastive", "FRAGMENT")
_lib.define(
    "triplet_margin(Tensor embeddings, Tensor labels, float margin, str mining, str distance, bool soft, "
    "str reduction, str backend) -> Tensor"
)
_lib.define("drlim(Tensor embeddings, Tensor labels, float margin, str reduction, str backend) -> Tensor")


def _triplet_margin_op(embeddings, labels, margin, mining, distance, soft, reduction, backend):
    return triplet_margin_impl(embeddings, labels, margin, mining, distance, soft, reduction, backend, None)


def _drlim_op(embeddings, labels, margin, reduction, backend):
    return drlim_impl(embeddings, labels, margin, reduction, backend, None)


_lib.impl("triplet_margin", _triplet_margin_op, "CompositeImplicitAutograd")
_lib.impl("drlim", _drlim_op, "CompositeImplicitAutograd")
