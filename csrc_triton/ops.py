"""The core op of the engine, ``torch.ops.contrastive.lse``, and its backward op.

    contrastive::lse(q, k, scale, col_bias, self_offset, compute_col, positive_index, row_labels,
                     col_labels, positive_sum, positive_lse, deterministic, backend)
        -> (row_lse, col_lse, positive_sum, positive_lse)
    contrastive::lse_backward(grad_row, grad_col, grad_positive_sum, grad_positive_lse, q, k,
                              scale, col_bias, self_offset, positive_index, row_labels,
                              col_labels, row_lse, col_lse, positive_lse, needs_dq, needs_dk,
                              needs_dbias, deterministic, backend) -> (dq, dk, dscale, dbias)

The maths (Z = scale q k^T + col_bias, exclusions, positives, G) is in
:mod:`csrc_triton.backend`; every backend implements that one contract and is looked up by
name in :data:`csrc_triton.backend.REGISTRY`. ``lse`` has autograd (gradients for q, k, scale and
col_bias); its backward is the ``lse_backward`` op, so a compiled graph keeps the
recompute-from-statistics backward instead of storing logits. Both have fake kernels, so they
trace under ``torch.compile``. Outputs not asked for are empty (0,) tensors.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import backend as backends
from ._numerics import acc_dtype
from .backend import LseStats

BACKENDS = ("auto", "triton", "blockwise", "dense")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs: "auto" is Triton on CUDA (blockwise for float64, which the kernels
    do not support) and blockwise elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "blockwise"
    if backend == "triton":
        if dtype == torch.float64:
            raise TypeError(
                "backend='triton' supports float32, bfloat16 and float16 features, got float64; "
                "use backend='blockwise' or 'dense' (or 'auto') for float64"
            )
        # meta: fake tensors while tracing (torch.compile, opcheck) take the path they will run
        if device.type not in ("cuda", "meta") and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"backend='triton' got tensors on device {device.type!r}: the Triton kernels need a "
                "CUDA device, or Triton's interpreter, enabled by setting TRITON_INTERPRET=1 in the "
                "environment before Triton is imported. Use backend='blockwise' on CPU."
            )
    return backend


def _backend(backend: str, q: Tensor) -> backends.LseBackend:
    return backends.load(resolve_backend(backend, q.device, q.dtype))  # type: ignore[return-value]


def _no_autocast(device: torch.device):
    # The backends choose their own precision (float32 accumulation); autocast must not turn
    # their float32 products back into bf16.
    return torch.autocast(device.type, enabled=False)


def _or_none(x: Tensor) -> Tensor | None:
    return x if x.numel() else None


def _own_storage(outputs) -> tuple[Tensor, ...]:
    """Custom ops may not return aliased tensors, and two (0,) tensors share the null storage:
    each empty output gets a one-element storage of its own, viewed as (0,)."""
    return tuple(x if x.numel() else x.new_empty(1)[:0] for x in outputs)


@torch.library.custom_op("contrastive::lse", mutates_args=())
def lse(
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    col_bias: Tensor | None,
    self_offset: int | None,
    compute_col: bool,
    positive_index: Tensor | None,
    row_labels: Tensor | None,
    col_labels: Tensor | None,
    positive_sum: bool,
    positive_lse: bool,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row / column log-sum-exp, positive sum and positive log-sum-exp of Z = scale q k^T + b,
    without storing Z (see :mod:`csrc_triton.backend`). All float32 (float64 for float64)."""
    with _no_autocast(q.device):
        stats = _backend(backend, q).lse_forward(
            q, k, scale, col_bias=col_bias, self_offset=self_offset, compute_col=compute_col,
            positive_index=positive_index, row_labels=row_labels, col_labels=col_labels,
            positive_sum=positive_sum, positive_lse=positive_lse,
        )
    return _own_storage(stats)  # type: ignore[return-value]


@lse.register_fake
def _lse_fake(q, k, scale, col_bias, self_offset, compute_col, positive_index, row_labels, col_labels,
              positive_sum, positive_lse, deterministic, backend):
    acc = acc_dtype(q)
    n, m = q.shape[0], k.shape[0]
    return (
        q.new_empty(n, dtype=acc),
        q.new_empty(m if compute_col else 0, dtype=acc),
        q.new_empty(n if positive_sum else 0, dtype=acc),
        q.new_empty(n if positive_lse else 0, dtype=acc),
    )


@torch.library.custom_op("contrastive::lse_backward", mutates_args=())
def lse_backward(
    grad_row: Tensor,
    grad_col: Tensor,
    grad_positive_sum: Tensor,
    grad_positive_lse: Tensor,
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    col_bias: Tensor | None,
    self_offset: int | None,
    positive_index: Tensor | None,
    row_labels: Tensor | None,
    col_labels: Tensor | None,
    row_lse: Tensor,
    col_lse: Tensor,
    positive_lse: Tensor,
    needs_dq: bool,
    needs_dk: bool,
    needs_dbias: bool,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sum_i g_i row_lse_i + sum_j h_j col_lse_j + sum_i w_i positive_sum_i +
    sum_i u_i positive_lse_i with respect to q, k, scale and col_bias. An upstream gradient of
    shape (0,) means no such term; an output not needed is returned with shape (0,)."""
    with _no_autocast(q.device):
        grads = _backend(backend, q).lse_backward(
            q, k, scale, LseStats(row_lse, col_lse, row_lse.new_empty(0), positive_lse),
            grad_row=grad_row, grad_col=_or_none(grad_col), grad_positive_sum=_or_none(grad_positive_sum),
            grad_positive_lse=_or_none(grad_positive_lse), col_bias=col_bias, self_offset=self_offset,
            positive_index=positive_index, row_labels=row_labels, col_labels=col_labels,
            needs_dq=needs_dq, needs_dk=needs_dk, needs_dbias=needs_dbias and col_bias is not None,
            deterministic=deterministic,
        )
    return _own_storage((
        grads.dq if grads.dq is not None else q.new_empty(0),
        grads.dk if grads.dk is not None else k.new_empty(0),
        grads.dscale,
        grads.dbias if grads.dbias is not None else row_lse.new_empty(0),
    ))


@lse_backward.register_fake
def _lse_backward_fake(grad_row, grad_col, grad_positive_sum, grad_positive_lse, q, k, scale, col_bias,
                       self_offset, positive_index, row_labels, col_labels, row_lse, col_lse, positive_lse,
                       needs_dq, needs_dk, needs_dbias, deterministic, backend):
    acc = acc_dtype(q)
    with_bias = needs_dbias and col_bias is not None
    return (
        torch.empty_like(q) if needs_dq else q.new_empty(0),
        torch.empty_like(k) if needs_dk else k.new_empty(0),
        q.new_empty((), dtype=acc),
        q.new_empty(k.shape[0] if with_bias else 0, dtype=acc),
    )


def _lse_setup_context(ctx, inputs, output):
    (q, k, scale, col_bias, self_offset, compute_col, positive_index, row_labels, col_labels,
     positive_sum, positive_lse, deterministic, backend) = inputs
    row_lse, col_lse, _, pos_lse = output
    ctx.save_for_backward(q, k, scale, col_bias, positive_index, row_labels, col_labels, row_lse, col_lse, pos_lse)
    ctx.flags = (self_offset, compute_col, positive_sum, positive_lse, deterministic, backend)


def _lse_autograd_backward(ctx, grad_row, grad_col, grad_pos_sum, grad_pos_lse):
    q, k, scale, col_bias, positive_index, row_labels, col_labels, row_lse, col_lse, pos_lse = ctx.saved_tensors
    self_offset, compute_col, positive_sum, positive_lse, deterministic, backend = ctx.flags
    nothing = row_lse.new_empty(0)
    grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row.to(row_lse.dtype)
    grad_col = grad_col.to(row_lse.dtype) if grad_col is not None and compute_col else nothing
    grad_pos_sum = grad_pos_sum.to(row_lse.dtype) if grad_pos_sum is not None and positive_sum else nothing
    grad_pos_lse = grad_pos_lse.to(row_lse.dtype) if grad_pos_lse is not None and positive_lse else nothing
    needs_dq, needs_dk, needs_ds, needs_db = ctx.needs_input_grad[:4]
    dq, dk, dscale, dbias = torch.ops.contrastive.lse_backward(
        grad_row, grad_col, grad_pos_sum, grad_pos_lse, q, k, scale, col_bias, self_offset,
        positive_index, row_labels, col_labels, row_lse, col_lse, pos_lse,
        needs_dq, needs_dk, needs_db, deterministic, backend,
    )
    return (
        dq if needs_dq else None,
        dk if needs_dk else None,
        dscale.to(scale.dtype) if needs_ds else None,
        dbias.to(col_bias.dtype) if needs_db else None,
        None, None, None, None, None, None, None, None, None,
    )


lse.register_autograd(_lse_autograd_backward, setup_context=_lse_setup_context)
