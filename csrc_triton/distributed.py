"""Negatives across processes, with exact gradients and no duplicated tile work.

With a process group of world size R, rank r holds B local rows (every rank the same B and D).
The global batch is the concatenation of the ranks' rows in rank order. Each rank computes only
its own strip of the global similarity matrix: its B rows against all R B keys. Then:

* keys are gathered with :func:`gather_rows` (all-gather forward); their gradients go back to
  their owners with a reduce-scatter (backward), so a rank's key gradient sums the
  contributions of every rank's strip;
* column statistics of symmetric losses (a column's log-sum-exp over all R B rows) are merged
  with :func:`merge_lse`: an all-reduce of the per-column maxima, then of the shifted sums
  (O(R B) floats, never the strips themselves);
* normalisers (how many anchors have a positive, ...) come from :func:`all_reduce_sum`.

Scaling convention (every loss with ``process_group`` states it): rank r returns

    loss_r = R * (the terms of rank r's own rows) / (the global normaliser)

so that mean_r loss_r is exactly the loss of one process on the concatenated batch, and the
gradients that DDP averages over ranks are exactly that loss's gradients. (Each rank's local
embedding gradient is R times the single-process gradient of those rows; DDP divides by R.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


_MAX_DIMS = 8


def world(group: object | None) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``; (0, 1) without one."""
    if group is None:
        return 0, 1
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"process_group={group!r} was given but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first, or pass process_group=None"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    return dist.get_rank(group), dist.get_world_size(group)


def check_same_shape(name: str, x: Tensor, group: object | None) -> None:
    """Every rank must pass the same rows B and feature dimension D: ValueError naming the
    argument and the shapes of all ranks otherwise (one tiny all-gather)."""
    _, size = world(group)
    if size == 1:
        return
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"{name} has {x.dim()} dimensions; at most {_MAX_DIMS} are supported")
    # a fixed-length descriptor (ndim, shape, zero padding): ranks passing tensors of different
    # numbers of dimensions must still exchange tensors of one size, or the collective aborts
    mine = torch.tensor([x.dim(), *x.shape] + [0] * (_MAX_DIMS - x.dim()), dtype=torch.int64, device=x.device)
    shapes = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(shapes, mine, group=group)
    # one host sync per call: the shape check
    seen = [tuple(int(v) for v in s[1: 1 + int(s[0])]) for s in shapes]
    if len(set(seen)) != 1:
        raise ValueError(
            f"{name} must have the same shape on every rank of the process group (B rows, D features); "
            f"got {seen} (rank order)"
        )


class _GatherRows(torch.autograd.Function):
    """all-gather of (B, ...) rows -> (R B, ...); backward: reduce-scatter (sum) to the owners."""

    @staticmethod
    def forward(ctx, x: Tensor, group: object) -> Tensor:  # type: ignore[override]
        ctx.group = group
        size = dist.get_world_size(group)
        out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather(list(out.chunk(size)), x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        size = dist.get_world_size(ctx.group)
        chunks = [c.contiguous() for c in grad.chunk(size)]
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def gather_rows(x: Tensor, group: object | None) -> Tensor:
    """The global batch (R B, ...) in rank order; gradients flow back to each owner's rows."""
    if world(group)[1] == 1:
        return x
    if not x.requires_grad:
        return gather_constant(x, group)
    return _GatherRows.apply(x, group)


def gather_constant(x: Tensor, group: object | None) -> Tensor:
    """All-gather without autograd (labels, frozen keys)."""
    _, size = world(group)
    if size == 1:
        return x
    out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather(list(out.chunk(size)), x.detach().contiguous(), group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x (every rank gets y); backward: the upstream gradients summed over
    ranks, since every rank's loss depends on y."""

    @staticmethod
    def forward(ctx, x: Tensor, group: object) -> Tensor:  # type: ignore[override]
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        g = grad.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def all_reduce_sum(x: Tensor, group: object | None) -> Tensor:
    """Sum over ranks, differentiable (no-op without a group)."""
    if world(group)[1] == 1:
        return x
    if not x.requires_grad:
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y
    return _AllReduceSum.apply(x, group)


def merge_lse(partial_lse: Tensor, group: object | None) -> Tensor:
    """log sum_r exp(partial_lse_r), elementwise across ranks, differentiable.

    The shift m = max_r partial_lse_r (an all-reduce MAX, no gradient: it cancels exactly) keeps
    exp() in range; -inf everywhere stays -inf.
    """
    if world(group)[1] == 1:
        return partial_lse
    shift = partial_lse.detach().clone()
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isinf(shift) & (shift < 0), torch.zeros_like(shift), shift)
    total = all_reduce_sum(torch.exp(partial_lse - shift), group)
    return shift + total.log()


def reduce(per_item: Tensor, reduction: str, group: object | None, *, local_count: Tensor | None = None,
           global_count: Tensor | None = None) -> Tensor:
    """The scaling convention above, for every loss: "none" gives this rank's own terms; "sum"
    R * their sum; "mean" R * their sum / the global normaliser (0 if it is 0), which is either
    ``global_count`` (known on every rank) or the all-reduced ``local_count``."""
    if reduction == "none":
        return per_item
    size = world(group)[1]
    total = per_item.sum() * size if size > 1 else per_item.sum()
    if reduction == "sum":
        return total
    count = global_count if global_count is not None else all_reduce_sum(local_count, group)
    return total / count.to(total.dtype).clamp(min=1)
