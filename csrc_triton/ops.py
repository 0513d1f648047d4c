"""PyTorch op registration: ``torch.ops.contrastive.*``.

Core ops (functional, with fake kernels so they trace under ``torch.compile``):
    contrastive::lse(q, k, scale, exclude_diagonal, compute_col, positive_offset, labels,
                     backend) -> (row_lse, col_lse, positive)
    contrastive::lse_backward(grad_row, grad_col, grad_positive, q, k, scale, row_lse, col_lse,
                              exclude_diagonal, positive_offset, labels, backend) -> (dq, dk, dscale)
``lse`` has autograd; its backward is the ``lse_backward`` op, so a compiled graph keeps the
recompute-from-LSE backward instead of storing logits.

Loss ops (composite: autograd flows through ``lse``, which also owns the positive logits):
    contrastive::info_nce, contrastive::clip_loss, contrastive::nt_xent, contrastive::supcon
"""
from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from . import positives
from ._numerics import acc_dtype

BACKENDS = ("auto", "triton", "blockwise", "dense")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "blockwise"
    return backend


def _backend_module(backend: str, q: Tensor) -> ModuleType:
    backend = resolve_backend(backend, q.device)
    if backend == "blockwise":
        from . import blockwise

        return blockwise
    if backend == "dense":
        from . import dense

        return dense
    if q.dtype == torch.float64:
        raise TypeError(
            "backend='triton' supports float32, bfloat16 and float16 features, got float64; "
            "use backend='blockwise' or 'dense' for float64"
        )
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' got tensors on device {q.device.type!r}: the Triton kernels need a "
            "CUDA device, or Triton's interpreter, enabled by setting TRITON_INTERPRET=1 in the "
            "environment before Triton is imported. Use backend='blockwise' on CPU."
        )
    from . import triton_lse

    return triton_lse


# --------------------------------------------------------------------------------------------
# contrastive::lse and its backward
# --------------------------------------------------------------------------------------------
def _no_autocast(device: torch.device):
    # The backends choose their own precision (float32 accumulation); autocast must not turn
    # their float32 products back into bf16.
    return torch.autocast(device.type, enabled=False)


@torch.library.custom_op("contrastive::lse", mutates_args=())
def lse(
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    exclude_diagonal: bool,
    compute_col: bool,
    positive_offset: int,
    labels: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Row and column log-sum-exp of S = scale * q @ k.T without storing S, and the positives.

    q (N, D), k (M, D), scale 0-dim. Returns row_lse (N,), col_lse (M,) or (0,) when
    ``compute_col`` is False, and positive (N,) = sum_{j in P(i)} S_ij or (0,) when there is no
    positive term; float32 (float64 for float64 inputs). ``exclude_diagonal`` drops the entries
    (i, i). P(i) = {(i + positive_offset) mod M} (none when positive_offset < 0), or with
    ``labels`` (N == M) every j with i's label (see :mod:`csrc_triton.positives`).
    """
    with _no_autocast(q.device):
        row_lse, col_lse = _backend_module(backend, q).lse_forward(q, k, scale, exclude_diagonal, compute_col)
        if positives.has_positive(positive_offset, labels):
            acc = acc_dtype(q)
            positive = positives.forward(q.to(acc), k.to(acc), scale.to(acc), exclude_diagonal, positive_offset, labels)
        else:
            positive = row_lse.new_empty(0)
    return row_lse, col_lse, positive


@lse.register_fake
def _lse_fake(q, k, scale, exclude_diagonal, compute_col, positive_offset, labels, backend):
    acc = acc_dtype(q)
    n_pos = q.shape[0] if positives.has_positive(positive_offset, labels) else 0
    return (
        q.new_empty(q.shape[0], dtype=acc),
        q.new_empty(k.shape[0] if compute_col else 0, dtype=acc),
        q.new_empty(n_pos, dtype=acc),
    )


@torch.library.custom_op("contrastive::lse_backward", mutates_args=())
def lse_backward(
    grad_row: Tensor,
    grad_col: Tensor,
    grad_positive: Tensor,
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    row_lse: Tensor,
    col_lse: Tensor,
    exclude_diagonal: bool,
    positive_offset: int,
    labels: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i g_i row_lse_i + sum_j h_j col_lse_j + sum_i w_i positive_i w.r.t.
    q, k and scale. ``grad_col`` or ``grad_positive`` of shape (0,) means no such term."""
    module = _backend_module(backend, q)
    extra = {}
    if grad_positive.numel():
        if module.__name__.endswith("triton_lse"):
            extra = dict(
                grad_positive=grad_positive, positive_offset=max(positive_offset, 0), row_labels=labels, col_labels=labels
            )
        else:
            extra = dict(grad_positive=grad_positive, positive_offset=positive_offset, labels=labels)
    with _no_autocast(q.device):
        return module.lse_backward(grad_row, grad_col, q, k, scale, row_lse, col_lse, exclude_diagonal, **extra)


@lse_backward.register_fake
def _lse_backward_fake(
    grad_row, grad_col, grad_positive, q, k, scale, row_lse, col_lse, exclude_diagonal, positive_offset, labels, backend
):
    return torch.empty_like(q), torch.empty_like(k), q.new_empty((), dtype=acc_dtype(q))


def _lse_setup_context(ctx, inputs, output):
    q, k, scale, exclude_diagonal, compute_col, positive_offset, labels, backend = inputs
    row_lse, col_lse, _ = output
    ctx.save_for_backward(q, k, scale, row_lse, col_lse, labels)
    ctx.exclude_diagonal = exclude_diagonal
    ctx.compute_col = compute_col
    ctx.positive_offset = positive_offset
    ctx.has_positive = positives.has_positive(positive_offset, labels)
    ctx.backend = backend


def _lse_autograd_backward(ctx, grad_row, grad_col, grad_positive):
    q, k, scale, row_lse, col_lse, labels = ctx.saved_tensors
    if grad_row is None:
        grad_row = torch.zeros_like(row_lse)
    if grad_col is None or not ctx.compute_col:
        grad_col = row_lse.new_empty(0)
    if grad_positive is None or not ctx.has_positive:
        grad_positive = row_lse.new_empty(0)
    dq, dk, dscale = torch.ops.contrastive.lse_backward(
        grad_row.to(row_lse.dtype),
        grad_col.to(row_lse.dtype),
        grad_positive.to(row_lse.dtype),
        q,
        k,
        scale,
        row_lse,
        col_lse,
        ctx.exclude_diagonal,
        ctx.positive_offset,
        labels,
        ctx.backend,
    )
    return dq, dk, dscale.to(scale.dtype), None, None, None, None, None


lse.register_autograd(_lse_autograd_backward, setup_context=_lse_setup_context)


# --------------------------------------------------------------------------------------------
# Loss ops: composites of contrastive::lse and O(N D) work for the positives
# --------------------------------------------------------------------------------------------
_lib = torch.library.Library("contrastive", "FRAGMENT")
_lib.define(
    "info_nce(Tensor query, Tensor key, Tensor scale, Tensor? queue, bool in_batch_negatives, "
    "bool symmetric, str reduction, str backend) -> Tensor"
)
_lib.define("clip_loss(Tensor image_features, Tensor text_features, Tensor logit_scale, str backend) -> Tensor")
_lib.define("nt_xent(Tensor z1, Tensor z2, Tensor scale, bool normalize, str reduction, str backend) -> Tensor")
_lib.define("supcon(Tensor features, Tensor labels, Tensor scale, bool normalize, str backend) -> Tensor")


def _reduce(per_item: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "none":
        return per_item
    raise ValueError(f"reduction={reduction!r} is not one of ('mean', 'sum', 'none')")


def _pair_dots(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """scale * <a_i, b_i> accumulated in float32 (float64 for float64 inputs), shape (N,)."""
    acc = acc_dtype(a)
    return scale.to(acc) * (a.to(acc) * b.to(acc)).sum(dim=-1)


def info_nce_impl(
    query: Tensor,
    key: Tensor,
    scale: Tensor,
    queue: Tensor | None,
    in_batch_negatives: bool,
    symmetric: bool,
    reduction: str,
    backend: str,
) -> Tensor:
    backend = resolve_backend(backend, query.device)
    if in_batch_negatives:
        # the queue, if any, joins the keys: one op owns every logit of row i, so the positive's
        # gradient cancels the softmax in float32 (an O((N + Q) D) copy, no N x M memory)
        keys = key if queue is None else torch.cat([key, queue], dim=0)
        row_lse, col_lse, positive = torch.ops.contrastive.lse(query, keys, scale, False, symmetric, 0, None, backend)
    else:
        # MoCo: the positive alone from the batch, the negatives from the queue
        positive = _pair_dots(query, key, scale)
        queue_lse, col_lse, _ = torch.ops.contrastive.lse(query, queue, scale, False, False, -1, None, backend)
        row_lse = torch.logaddexp(positive, queue_lse)
    per_query = row_lse - positive
    if symmetric:
        per_query = 0.5 * (per_query + (col_lse - positive))
    return _reduce(per_query, reduction)


def clip_loss_impl(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, backend: str) -> Tensor:
    return info_nce_impl(image_features, text_features, logit_scale, None, True, True, "mean", backend)


def _unit(x: Tensor) -> Tensor:
    acc = acc_dtype(x)
    return torch.nn.functional.normalize(x.to(acc), dim=-1).to(x.dtype)


def nt_xent_impl(z1: Tensor, z2: Tensor, scale: Tensor, normalize: bool, reduction: str, backend: str) -> Tensor:
    backend = resolve_backend(backend, z1.device)
    z = torch.cat([z1, z2], dim=0)
    if normalize:
        z = _unit(z)
    # view i's partner is (i + N) mod 2N
    row_lse, _, positive = torch.ops.contrastive.lse(z, z, scale, True, False, z1.shape[0], None, backend)
    return _reduce(row_lse - positive, reduction)


def supcon_impl(features: Tensor, labels: Tensor, scale: Tensor, normalize: bool, backend: str) -> Tensor:
    backend = resolve_backend(backend, features.device)
    if features.dim() == 3:
        n_views = features.shape[1]
        z = features.reshape(-1, features.shape[-1])  # sample-major: row = sample * V + view
        labels = labels.repeat_interleave(n_views)
    else:
        z = features
    if normalize:
        z = _unit(z)
    # positive_sum_i = sum_{p in P(i)} S_ip, computed in O(N D) from class sums inside the op
    row_lse, _, positive_sum = torch.ops.contrastive.lse(z, z, scale, True, False, -1, labels, backend)
    # |P(i)| = (number of rows with i's label) - 1, by binary search: no data-dependent shapes
    ordered = torch.sort(labels).values
    n_pos = torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels) - 1
    has_pos = n_pos > 0
    per_anchor = row_lse - positive_sum / n_pos.clamp(min=1).to(row_lse.dtype)
    per_anchor = torch.where(has_pos, per_anchor, torch.zeros_like(per_anchor))
    return per_anchor.sum() / has_pos.sum().clamp(min=1).to(row_lse.dtype)


for _name, _fn in (
    ("info_nce", info_nce_impl),
    ("clip_loss", clip_loss_impl),
    ("nt_xent", nt_xent_impl),
    ("supcon", supcon_impl),
):
    _lib.impl(_name, _fn, "CompositeImplicitAutograd")
