"""PyTorch op registration: ``torch.ops.contrastive.*``.

Core ops (functional, with fake kernels so they trace under ``torch.compile``):
    contrastive::lse(q, k, scale, exclude_diagonal, compute_col, backend) -> (row_lse, col_lse)
    contrastive::lse_backward(grad_row, grad_col, q, k, scale, row_lse, col_lse,
                              exclude_diagonal, backend) -> (dq, dk, dscale)
``lse`` has autograd; its backward is the ``lse_backward`` op, so a compiled graph keeps the
recompute-from-LSE backward instead of storing logits.

Loss ops (composite: autograd flows through ``lse`` and O(N D) PyTorch for the positives):
    contrastive::info_nce, contrastive::clip_loss, contrastive::nt_xent, contrastive::supcon
"""
from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

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


def _acc_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# contrastive::lse and its backward
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("contrastive::lse", mutates_args=())
def lse(
    q: Tensor, k: Tensor, scale: Tensor, exclude_diagonal: bool, compute_col: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exp of S = scale * q @ k.T without storing S.

    q (N, D), k (M, D), scale 0-dim. Returns row_lse (N,) and col_lse (M,), or (0,) when
    ``compute_col`` is False; float32 (float64 for float64 inputs). ``exclude_diagonal`` drops
    the entries (i, i).
    """
    return _backend_module(backend, q).lse_forward(q, k, scale, exclude_diagonal, compute_col)


@lse.register_fake
def _lse_fake(q, k, scale, exclude_diagonal, compute_col, backend):
    acc = _acc_dtype(q)
    return q.new_empty(q.shape[0], dtype=acc), q.new_empty(k.shape[0] if compute_col else 0, dtype=acc)


@torch.library.custom_op("contrastive::lse_backward", mutates_args=())
def lse_backward(
    grad_row: Tensor,
    grad_col: Tensor,
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    row_lse: Tensor,
    col_lse: Tensor,
    exclude_diagonal: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i g_i row_lse_i + sum_j h_j col_lse_j w.r.t. q, k and scale.

    ``grad_col`` of shape (0,) means there is no column term.
    """
    return _backend_module(backend, q).lse_backward(
        grad_row, grad_col, q, k, scale, row_lse, col_lse, exclude_diagonal
    )


@lse_backward.register_fake
def _lse_backward_fake(grad_row, grad_col, q, k, scale, row_lse, col_lse, exclude_diagonal, backend):
    return torch.empty_like(q), torch.empty_like(k), q.new_empty((), dtype=_acc_dtype(q))


def _lse_setup_context(ctx, inputs, output):
    q, k, scale, exclude_diagonal, compute_col, backend = inputs
    row_lse, col_lse = output
    ctx.save_for_backward(q, k, scale, row_lse, col_lse)
    ctx.exclude_diagonal = exclude_diagonal
    ctx.compute_col = compute_col
    ctx.backend = backend


def _lse_autograd_backward(ctx, grad_row, grad_col):
    q, k, scale, row_lse, col_lse = ctx.saved_tensors
    if grad_row is None:
        grad_row = torch.zeros_like(row_lse)
    if grad_col is None or not ctx.compute_col:
        grad_col = row_lse.new_empty(0)
    dq, dk, dscale = torch.ops.contrastive.lse_backward(
        grad_row.to(row_lse.dtype),
        grad_col.to(row_lse.dtype),
        q,
        k,
        scale,
        row_lse,
        col_lse,
        ctx.exclude_diagonal,
        ctx.backend,
    )
    return dq, dk, dscale.to(scale.dtype), None, None, None


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
    acc = _acc_dtype(a)
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
    positive = _pair_dots(query, key, scale)  # p_i = S_ii
    if in_batch_negatives:
        row_lse, col_lse = torch.ops.contrastive.lse(query, key, scale, False, symmetric, backend)
    else:
        row_lse, col_lse = positive, None  # the positive alone: log exp(p_i)
    if queue is not None:
        queue_lse, _ = torch.ops.contrastive.lse(query, queue, scale, False, False, backend)
        row_lse = torch.logaddexp(row_lse, queue_lse)
    per_query = row_lse - positive
    if symmetric:
        per_query = 0.5 * (per_query + (col_lse - positive))
    return _reduce(per_query, reduction)


def clip_loss_impl(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, backend: str) -> Tensor:
    return info_nce_impl(image_features, text_features, logit_scale, None, True, True, "mean", backend)


def _unit(x: Tensor) -> Tensor:
    acc = _acc_dtype(x)
    return torch.nn.functional.normalize(x.to(acc), dim=-1).to(x.dtype)


def nt_xent_impl(z1: Tensor, z2: Tensor, scale: Tensor, normalize: bool, reduction: str, backend: str) -> Tensor:
    backend = resolve_backend(backend, z1.device)
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    if normalize:
        z = _unit(z)
    row_lse, _ = torch.ops.contrastive.lse(z, z, scale, True, False, backend)
    positive = _pair_dots(z, z.roll(n, dims=0), scale)  # view i's partner is i +- N
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
    row_lse, _ = torch.ops.contrastive.lse(z, z, scale, True, False, backend)
    # mean_{p in P(i)} S_ip = s z_i . (sum of z over i's class - z_i) / |P(i)|: O(N D), no tiles
    acc = _acc_dtype(z)
    za = z.to(acc)
    classes, index = torch.unique(labels, return_inverse=True)
    class_sum = za.new_zeros(classes.shape[0], za.shape[1]).index_add(0, index, za)
    n_pos = torch.bincount(index, minlength=classes.shape[0])[index] - 1
    has_pos = n_pos > 0
    positive_mean = _pair_dots(za, class_sum[index] - za, scale) / n_pos.clamp(min=1).to(acc)
    per_anchor = torch.where(has_pos, row_lse - positive_mean, torch.zeros_like(row_lse))
    return per_anchor.sum() / has_pos.sum().clamp(min=1).to(acc)


for _name, _fn in (
    ("info_nce", info_nce_impl),
    ("clip_loss", clip_loss_impl),
    ("nt_xent", nt_xent_impl),
    ("supcon", supcon_impl),
):
    _lib.impl(_name, _fn, "CompositeImplicitAutograd")
