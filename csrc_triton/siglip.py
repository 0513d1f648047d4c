r"""The SigLIP loss (Zhai, Mustafa, Kolesnikov and Beyer 2023, "Sigmoid Loss for Language Image
Pre-Training"), tiled: the N x M logits are never stored.

With image features x (N, D), text features y (M, D) (M = N in one process; the global batch
with a process group), t = ``logit_scale`` (the multiplier itself, ``model.logit_scale.exp()``)
and b = ``logit_bias``:

    s_ij = t x_i . y_j + b,    z_ij = +1 if j == i (the pair) else -1
    loss = (1/N) sum_i sum_j softplus(-z_ij s_ij)   ( = -(1/N) sum_ij log sigmoid(z_ij s_ij) )

Every pair is an independent binary classification: no softmax, so no row or column
normaliser, and the row sums are all the forward has to produce. Backward, with u_i the
upstream gradient of row i's sum:

    G_ij = -z_ij sigmoid(-z_ij s_ij) u_i
    dx = t G y,  dy = t G^T x,  dt = sum_ij G_ij x_i . y_j,  db = sum_ij G_ij

Ops (``torch.ops.contrastive``):

    siglip_rows(x, y, scale, bias, offset, deterministic, backend) -> (N,) row sums, with autograd
        (row i's positive is column i + offset); fake kernel for torch.compile
    siglip_rows_backward(grad, x, y, scale, bias, offset, needs_dx, needs_dy, deterministic,
        backend) -> (dx, dy, dscale, dbias)   (dx / dy (0,) when not needed)
    siglip(image_features, text_features, logit_scale, logit_bias, reduction, deterministic,
        backend) -> the loss (composite over siglip_rows)

Backends: "triton" (:mod:`csrc_triton.triton_siglip`), "blockwise" (below: the same tiling in
plain PyTorch, workspace bounded by :func:`csrc_triton.blockwise.tile_shape`) and "dense" (below:
the full N x M matrix; the reference). Accumulation in float32 (float64 for float64 inputs);
softplus(v) = max(v, 0) + log1p(e^-|v|), which neither overflows nor loses the small terms.
Work: 2NMD flops forward, 6NMD backward (recompute, dx, dy).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _validate as check
from . import distributed as dist_
from ._alloc import empty
from ._numerics import acc_dtype
from .losses import COMMON_ARGS, _LossModule
from .ops import _no_autocast, _own_storage, resolve_backend

__all__ = ["SigLipLoss", "siglip", "siglip_impl"]


# ----------------------------------------------------------------------------------------------
# CPU backends: blockwise and dense (same interface as csrc_triton.triton_siglip)
# ----------------------------------------------------------------------------------------------
def _softplus_(v: Tensor) -> Tensor:
    """softplus(v) = max(v, 0) + log1p(e^-|v|), in place on v (a NaN stays NaN)."""
    tail = v.abs().neg_().exp_().log1p_()
    return v.clamp_min_(0.0).add_(tail)


def _flip_positives_(v: Tensor, r0: int, c0: int, offset: int) -> Tensor:
    """Negate the tile's entries (i, i + offset) in global indices: -z s from s."""
    v.diagonal(offset=r0 + offset - c0).neg_()
    return v


def _tile_shape(n: int, m: int) -> tuple[int, int]:
    from . import blockwise  # the engine's tile policy (and its test override)

    return blockwise.tile_shape(n, m, buffers=2)


def _blocks(length: int, step: int):
    for start in range(0, length, step):
        yield start, min(length, start + step)


def blockwise_forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, offset: int) -> Tensor:
    """Row sums sum_j softplus(-z_ij s_ij), (N,), tile by tile (at most a (rows x cols) logit tile)."""
    acc = acc_dtype(x)
    xa, ya, t, b = x.to(acc), y.to(acc), scale.to(acc), bias.to(acc)
    n, m = x.shape[0], y.shape[0]
    rows, cols = _tile_shape(n, m)
    out = empty(n, dtype=acc, device=x.device)
    for r0, r1 in _blocks(n, rows):
        total = torch.zeros(r1 - r0, dtype=acc, device=x.device)
        for c0, c1 in _blocks(m, cols):
            v = torch.mm(xa[r0:r1], ya[c0:c1].T).mul_(t).add_(b)  # s = t x.y + b
            total += _softplus_(_flip_positives_(v, r0, c0, offset)).sum(dim=1)
        out[r0:r1] = total
    return out


def blockwise_backward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, grad_rows: Tensor, *, offset: int,
                       needs_dx: bool, needs_dy: bool, deterministic: bool
                       ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    """(dx, dy, dt, db) of sum_i u_i row_i, recomputing each tile (always deterministic)."""
    acc = acc_dtype(x)
    xa, ya, t, b = x.to(acc), y.to(acc), scale.to(acc), bias.to(acc)
    u = grad_rows.to(acc)
    n, m = x.shape[0], y.shape[0]
    rows, cols = _tile_shape(n, m)
    gy_sum = torch.zeros(n, x.shape[1], dtype=acc, device=x.device)  # G y (dx / t; also gives dt)
    gtx = torch.zeros(m, x.shape[1], dtype=acc, device=x.device) if needs_dy else None
    db = torch.zeros((), dtype=acc, device=x.device)
    for r0, r1 in _blocks(n, rows):
        for c0, c1 in _blocks(m, cols):
            v = _flip_positives_(torch.mm(xa[r0:r1], ya[c0:c1].T).mul_(t).add_(b), r0, c0, offset)
            # d softplus(v)/ds = sigmoid(v) dv/ds, dv/ds = -z: G = -z sigmoid(-z s) u
            g = _flip_positives_(v.sigmoid_(), r0, c0, offset).mul_(u[r0:r1, None])
            gy_sum[r0:r1].addmm_(g, ya[c0:c1])
            if gtx is not None:
                gtx[c0:c1].addmm_(g.T, xa[r0:r1])
            db += g.sum()
    dt = empty(dtype=acc, device=x.device).copy_((gy_sum * xa).sum())  # sum_i x_i . (G y)_i
    dx = empty(*x.shape, dtype=x.dtype, device=x.device).copy_(gy_sum.mul_(t)) if needs_dx else None
    dy = empty(*y.shape, dtype=y.dtype, device=y.device).copy_(gtx.mul_(t)) if needs_dy else None
    return dx, dy, dt, empty(dtype=acc, device=x.device).copy_(db)


def _dense_signs(n: int, m: int, offset: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """z (N, M): +1 at (i, i + offset), -1 elsewhere."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    return torch.where(j == i + offset, 1.0, -1.0).to(dtype)


def dense_forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, offset: int) -> Tensor:
    """The reference: the full s = t x y^T + b, softplus(-z s) summed over each row."""
    acc = acc_dtype(x)
    s = scale.to(acc) * (x.to(acc) @ y.to(acc).T) + bias.to(acc)
    v = -_dense_signs(x.shape[0], y.shape[0], offset, x.device, acc) * s
    rows = (torch.clamp_min(v, 0.0) + torch.log1p(torch.exp(-v.abs()))).sum(dim=1)
    return empty(x.shape[0], dtype=acc, device=x.device).copy_(rows)


def dense_backward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, grad_rows: Tensor, *, offset: int,
                   needs_dx: bool, needs_dy: bool, deterministic: bool
                   ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    acc = acc_dtype(x)
    xa, ya, t = x.to(acc), y.to(acc), scale.to(acc)
    dot = xa @ ya.T
    z = _dense_signs(x.shape[0], y.shape[0], offset, x.device, acc)
    g = -z * torch.sigmoid(-z * (t * dot + bias.to(acc))) * grad_rows.to(acc)[:, None]
    dx = empty(*x.shape, dtype=x.dtype, device=x.device).copy_(t * (g @ ya)) if needs_dx else None
    dy = empty(*y.shape, dtype=y.dtype, device=y.device).copy_(t * (g.T @ xa)) if needs_dy else None
    dt = empty(dtype=acc, device=x.device).copy_((g * dot).sum())
    db = empty(dtype=acc, device=x.device).copy_(g.sum())
    return dx, dy, dt, db


def _backend(backend: str, x: Tensor) -> tuple[Callable, Callable]:
    """(forward, backward) of the backend that runs for ``x``."""
    name = resolve_backend(backend, x.device, x.dtype)
    if name == "triton":
        from . import triton_siglip

        return triton_siglip.siglip_forward, triton_siglip.siglip_backward
    if name == "dense":
        return dense_forward, dense_backward
    return blockwise_forward, blockwise_backward


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("contrastive::siglip_rows", mutates_args=())
def siglip_rows(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, offset: int, deterministic: bool,
                backend: str) -> Tensor:
    """sum_j softplus(-z_ij (scale x_i . y_j + bias)) per row i, z_ij = +1 iff j == i + offset;
    (N,) float32 (float64 for float64 inputs)."""
    with _no_autocast(x.device):
        return _backend(backend, x)[0](x, y, scale, bias, offset=offset)


@siglip_rows.register_fake
def _siglip_rows_fake(x, y, scale, bias, offset, deterministic, backend):
    return x.new_empty(x.shape[0], dtype=acc_dtype(x))


@torch.library.custom_op("contrastive::siglip_rows_backward", mutates_args=())
def siglip_rows_backward(grad: Tensor, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, offset: int,
                         needs_dx: bool, needs_dy: bool, deterministic: bool, backend: str
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_i row_i: (dx, dy, dscale, dbias); dx / dy of shape (0,) when not needed."""
    with _no_autocast(x.device):
        dx, dy, dt, db = _backend(backend, x)[1](x, y, scale, bias, grad, offset=offset, needs_dx=needs_dx,
                                                 needs_dy=needs_dy, deterministic=deterministic)
    return _own_storage((x.new_empty(0) if dx is None else dx, y.new_empty(0) if dy is None else dy, dt, db))


@siglip_rows_backward.register_fake
def _siglip_rows_backward_fake(grad, x, y, scale, bias, offset, needs_dx, needs_dy, deterministic, backend):
    acc = acc_dtype(x)
    return (torch.empty_like(x) if needs_dx else x.new_empty(0), torch.empty_like(y) if needs_dy else y.new_empty(0),
            x.new_empty((), dtype=acc), x.new_empty((), dtype=acc))


def _setup_context(ctx, inputs, output):
    x, y, scale, bias, offset, deterministic, backend = inputs
    ctx.save_for_backward(x, y, scale, bias)
    ctx.flags = (offset, deterministic, backend)


def _autograd_backward(ctx, grad):
    x, y, scale, bias = ctx.saved_tensors
    offset, deterministic, backend = ctx.flags
    needs_dx, needs_dy, needs_ds, needs_db = ctx.needs_input_grad[:4]
    dx, dy, dt, db = torch.ops.contrastive.siglip_rows_backward(
        grad.to(acc_dtype(x)).contiguous(), x, y, scale, bias, offset, needs_dx, needs_dy, deterministic, backend)
    return (dx if needs_dx else None, dy if needs_dy else None, dt.to(scale.dtype) if needs_ds else None,
            db.to(bias.dtype) if needs_db else None, None, None, None)


siglip_rows.register_autograd(_autograd_backward, setup_context=_setup_context)


def siglip_impl(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                reduction: str, deterministic: bool, backend: str, group: object | None = None) -> Tensor:
    """This rank's B images against the global texts (every rank's, in rank order); rank r's
    positives sit at columns r B + i. Scaling convention of :mod:`csrc_triton.distributed`: "mean"
    returns R * (its rows' sum) / (R B), "sum" R * (its rows' sum), "none" its rows' sums."""
    rank, size = dist_.world(group)
    b = image_features.shape[0]
    texts = dist_.gather_rows(text_features, group)
    rows = torch.ops.contrastive.siglip_rows(image_features, texts, logit_scale, logit_bias, rank * b,
                                             deterministic, backend)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum() * size if size > 1 else rows.sum()
    if reduction == "mean":
        return rows.sum() / b  # R * sum / (R B)
    raise ValueError(f"reduction={reduction!r} is not one of ('mean', 'sum', 'none')")


_lib = torch.library.Library("contrastive", "FRAGMENT")
_lib.define("siglip(Tensor image_features, Tensor text_features, Tensor logit_scale, Tensor logit_bias, "
            "str reduction, bool deterministic, str backend) -> Tensor")
_lib.impl("siglip", siglip_impl, "CompositeImplicitAutograd")


# ----------------------------------------------------------------------------------------------
# Public front end
# ----------------------------------------------------------------------------------------------
def siglip(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor,
    *,
    reduction: str = "mean",
    backend: str = "auto",
    deterministic: bool = False,
    process_group: object | None = None,
) -> Tensor:
    r"""SigLIP's sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"):

        s_ij = logit_scale * image_features_i . text_features_j + logit_bias
        z_ij = +1 if i == j else -1
        loss = (1/N) sum_i sum_j softplus(-z_ij s_ij)  =  -(1/N) sum_ij log sigmoid(z_ij s_ij)

    Each of the N^2 pairs is a binary classification (its own pair positive, every other text
    negative): no softmax, so the loss is a sum of row sums, computed tile by tile without the
    N x N logits. ``logit_scale`` is the multiplier itself (``model.logit_scale.exp()``, the
    paper initialises t' = log 10) and ``logit_bias`` the offset (initialised at -10 in the
    paper); gradients flow to all four inputs. Features are not normalised here (SigLIP
    L2-normalises them first).

    Args:
        image_features: (N, D) float32, bfloat16 or float16 (float64 on the CPU backends).
        text_features: (N, D), same dtype and device; row i is image i's caption.
        logit_scale: positive float or 0-dim tensor (t).
        logit_bias: finite float or 0-dim tensor (b), any sign.
        reduction: "mean" (the paper's, 1/N times the sum), "sum", or "none" (per-image row
            sums sum_j softplus(-z_ij s_ij), shape (N,)).
        backend: "auto" (triton on CUDA, blockwise on CPU), "triton", "blockwise" or "dense".{common}

    Returns:
        A float32 scalar (float64 for float64 inputs), or (N,) with ``reduction="none"``. NaN in
        the inputs gives NaN.

    Example:
        >>> img = torch.nn.functional.normalize(torch.randn(64, 128), dim=1)
        >>> txt = torch.nn.functional.normalize(torch.randn(64, 128), dim=1)
        >>> loss = siglip(img, txt, logit_scale=torch.tensor(10.0), logit_bias=torch.tensor(-10.0))
    """
    check.pair("image_features", image_features, "text_features", text_features)
    scale = check.positive_scalar("logit_scale", logit_scale, image_features.device, image_features.dtype,
                                  what="the logit multiplier")
    bias = check.finite_scalar("logit_bias", logit_bias, image_features.device, image_features.dtype,
                               what="b in s = t x.y + b")
    check.reduction(reduction)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    resolve_backend(backend, image_features.device, image_features.dtype)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    args = (image_features, text_features, scale, bias, reduction, deterministic, backend)
    if dist_.world(process_group)[1] == 1:
        return torch.ops.contrastive.siglip(*args)
    dist_.check_same_shape("image_features", image_features, process_group)
    return siglip_impl(*args, group=process_group)


siglip.__doc__ = siglip.__doc__.replace("{common}", COMMON_ARGS)


class SigLipLoss(_LossModule):
    """Module form of :func:`siglip`; ``forward(image_features, text_features, logit_scale, logit_bias)``.

    Example:
        >>> loss_fn = SigLipLoss()
        >>> t_prime, b = torch.nn.Parameter(torch.tensor(math.log(10.0))), torch.nn.Parameter(torch.tensor(-10.0))
        >>> loss = loss_fn(img, txt, t_prime.exp(), b)
    """

    def __init__(self, *, reduction: str = "mean", backend: str = "auto", deterministic: bool = False,
                 process_group: object | None = None) -> None:
        super().__init__(reduction=reduction, backend=backend, deterministic=deterministic,
                         process_group=process_group)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: float | Tensor,
                logit_bias: float | Tensor) -> Tensor:
        return siglip(image_features, text_features, logit_scale, logit_bias, **self.options)
