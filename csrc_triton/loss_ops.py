"""The losses of the LSE engine as composites of ``torch.ops.contrastive.lse``.

Each ``*_impl`` computes one loss for this process's rows against the keys of the whole process
group (``group=None``: one process, the keys are the local batch). The single-process forms are
registered as ``torch.ops.contrastive.<name>`` (CompositeImplicitAutograd: autograd flows
through ``lse``); :mod:`csrc_triton.losses` calls the ``*_impl`` directly when a process group
of more than one rank is given (a process group cannot appear in an op schema).

Distributed convention (see :mod:`csrc_triton.distributed`): rank r returns R times its own
rows' share of the global loss, so the mean over ranks is the loss of the concatenated batch
and DDP's averaged gradients are that loss's gradients.

Work per call, N local rows, M = R N keys, D features (2 flops per multiply-add): the forward
is one pass over the tiles (2NMD: every log-sum-exp and positive term of the call at once); the
backward recomputes the tiles (2NMD) and forms dQ = s G K (2NMD) and dK = s G^T Q (2NMD):
    every loss here with keys that need a gradient:  8NMD in all (2NMD forward, 6NMD backward)
    keys without gradient (a frozen MoCo queue):     6NMD (dK's GEMM and buffer are skipped)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import distributed as dist_
from ._numerics import acc_dtype
from .ops import resolve_backend
from .positives import label_counts, row_dot


def _lse(q, k, scale, *, backend, deterministic, col_bias=None, self_offset=None, compute_col=False,
         positive_index=None, row_labels=None, col_labels=None, positive_sum=False, positive_lse=False):
    return torch.ops.contrastive.lse(q, k, scale, col_bias, self_offset, compute_col, positive_index, row_labels,
                                     col_labels, positive_sum, positive_lse, deterministic, backend)


def _reduce(per_item: Tensor, reduction: str, world_size: int = 1) -> Tensor:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum() * world_size
    if reduction == "none":
        return per_item
    raise ValueError(f"reduction={reduction!r} is not one of ('mean', 'sum', 'none')")


def _masked_mean(per_item: Tensor, keep: Tensor, reduction: str, group: object | None) -> Tensor:
    """Mean over the items with ``keep`` across the group (0 if none), or their sum, or the
    items with 0 where not kept (the convention of :func:`csrc_triton.distributed.reduce`)."""
    per_item = torch.where(keep, per_item, torch.zeros_like(per_item))
    return dist_.reduce(per_item, reduction, group, local_count=keep.sum())


def _unit(x: Tensor) -> Tensor:
    acc = acc_dtype(x)
    return torch.nn.functional.normalize(x.to(acc), dim=-1).to(x.dtype)


def _float32_if_16bit(x: Tensor) -> Tensor:
    """Losses whose input reaches the result along several paths (as queries, keys, a bias and a
    row term) whose gradients largely cancel: computed in float32, so autograd sums the paths
    in float32 and the gradient is rounded to the 16-bit dtype once, by this cast's backward.
    (Each path rounded apart loses the small true gradient: measured 10-25 % relative error in
    bf16 on near-collapsed embeddings for uniformity.)"""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _own_rows(n: int, rank: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device) + rank * n


def info_nce_impl(query: Tensor, key: Tensor, scale: Tensor, queue: Tensor | None, in_batch_negatives: bool,
                  symmetric: bool, reduction: str, deterministic: bool, backend: str,
                  group: object | None = None) -> Tensor:
    backend = resolve_backend(backend, query.device, query.dtype)
    rank, size = dist_.world(group)
    n = query.shape[0]
    opts = dict(backend=backend, deterministic=deterministic)
    if in_batch_negatives:
        keys = dist_.gather_rows(key, group)
        # row i's positive is its own key, global column rank * N + i; the positive's gradient
        # is folded into the same op, so it cancels the softmax in float32
        row_lse, col_lse, positive, _ = _lse(query, keys, scale, compute_col=symmetric,
                                             positive_index=_own_rows(n, rank, query.device), positive_sum=True,
                                             **opts)
        if queue is not None:
            # the queue's negatives from a second call on the same rows: no concatenated copy
            queue_lse = _lse(query, queue, scale, **opts)[0]
            row_lse = torch.logaddexp(row_lse, queue_lse)
    else:
        # MoCo: the positive alone from the batch (an O(N D) row dot), the negatives from the queue
        positive = scale.to(acc_dtype(query)) * row_dot(query, key)
        row_lse = torch.logaddexp(positive, _lse(query, queue, scale, **opts)[0])
    per_query = row_lse - positive
    if symmetric:
        # column j's log-sum-exp over every rank's rows; this rank owns columns rank * N + j
        col_lse = dist_.merge_lse(col_lse, group)[rank * n: (rank + 1) * n]
        per_query = 0.5 * (per_query + (col_lse - positive))
    return _reduce(per_query, reduction, size)


def clip_loss_impl(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, deterministic: bool,
                   backend: str, group: object | None = None) -> Tensor:
    return info_nce_impl(image_features, text_features, logit_scale, None, True, True, "mean", deterministic,
                         backend, group)


def nt_xent_impl(z1: Tensor, z2: Tensor, scale: Tensor, normalize: bool, reduction: str, deterministic: bool,
                 backend: str, group: object | None = None) -> Tensor:
    backend = resolve_backend(backend, z1.device, z1.dtype)
    rank, size = dist_.world(group)
    b = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    if normalize:
        z = _unit(z)
    # global keys: [z1_0; z2_0; z1_1; z2_1; ...]; local view i's partner is (i + B) mod 2B
    keys = dist_.gather_rows(z, group)
    base = rank * 2 * b
    partner = base + (torch.arange(2 * b, device=z.device) + b) % (2 * b)
    row_lse, _, positive, _ = _lse(z, keys, scale, self_offset=base, positive_index=partner, positive_sum=True,
                                   backend=backend, deterministic=deterministic)
    return _reduce(row_lse - positive, reduction, size)


def supcon_impl(features: Tensor, labels: Tensor, scale: Tensor, normalize: bool, deterministic: bool,
                backend: str, group: object | None = None) -> Tensor:
    backend = resolve_backend(backend, features.device, features.dtype)
    rank, _ = dist_.world(group)
    if features.dim() == 3:
        z = features.reshape(-1, features.shape[-1])  # sample-major: row = sample * V + view
        labels = labels.repeat_interleave(features.shape[1])
    else:
        z = features
    if normalize:
        z = _unit(z)
    labels = labels.to(torch.int64)
    keys = dist_.gather_rows(z, group)
    key_labels = dist_.gather_constant(labels, group)
    # positive_sum_i = sum over the other views with i's label of Z_ip, from the same tile pass
    row_lse, _, positive_sum, _ = _lse(z, keys, scale, self_offset=rank * z.shape[0], row_labels=labels,
                                       col_labels=key_labels, positive_sum=True, backend=backend,
                                       deterministic=deterministic)
    n_pos = label_counts(labels, key_labels) - 1  # the anchor itself is not a positive
    per_anchor = row_lse - positive_sum / n_pos.clamp(min=1).to(row_lse.dtype)
    return _masked_mean(per_anchor, n_pos > 0, "mean", group)


def nca_impl(embeddings: Tensor, labels: Tensor, scale: Tensor, normalize: bool, reduction: str,
             deterministic: bool, backend: str, group: object | None = None) -> Tensor:
    """-log sum_{j in P(i)} p_ij with p_ij = softmax_{j != i}(-s ||x_i - x_j||^2).

    -s ||x_i - x_j||^2 = 2s x_i.x_j - s|x_j|^2 - s|x_i|^2; the last term is the same for every j
    of row i and cancels between the two log-sum-exps, so both come from one pass of the
    engine with scale 2s, a column bias -s|x_j|^2 and the label mask:
        loss_i = log sum_{j != i} exp(Z_ij) - log sum_{j in P(i)} exp(Z_ij).
    """
    backend = resolve_backend(backend, embeddings.device, embeddings.dtype)
    rank, _ = dist_.world(group)
    x = _unit(embeddings) if normalize else embeddings
    labels = labels.to(torch.int64)
    keys = dist_.gather_rows(x, group)
    key_labels = dist_.gather_constant(labels, group)
    sq_norms = dist_.gather_rows(row_dot(x, x)[:, None], group)[:, 0]
    row_lse, _, _, positive_lse = _lse(x, keys, 2.0 * scale, col_bias=-scale * sq_norms,
                                       self_offset=rank * x.shape[0], row_labels=labels, col_labels=key_labels,
                                       positive_lse=True, backend=backend, deterministic=deterministic)
    has_positive = label_counts(labels, key_labels) > 1
    return _masked_mean(row_lse - positive_lse, has_positive, reduction, group)


def n_pair_impl(anchors: Tensor, positives: Tensor, l2_reg: float, deterministic: bool, backend: str,
                group: object | None = None) -> Tensor:
    """InfoNCE at temperature 1 over the in-batch positives + l2_reg mean_{2N} |f|^2 (Sohn 2016)."""
    # the l2 term's gradient joins the contrastive one in float32 (one rounding, see above)
    anchors, positives = _float32_if_16bit(anchors), _float32_if_16bit(positives)
    one = torch.ones((), dtype=acc_dtype(anchors), device=anchors.device)
    contrastive = info_nce_impl(anchors, positives, one, None, True, False, "mean", deterministic, backend, group)
    if l2_reg == 0.0:
        return contrastive
    squared = 0.5 * (row_dot(anchors, anchors).mean() + row_dot(positives, positives).mean())
    return contrastive + l2_reg * squared


def uniformity_impl(x: Tensor, t: Tensor, deterministic: bool, backend: str, group: object | None = None) -> Tensor:
    """log mean_{i != j} exp(-t ||x_i - x_j||^2) (Wang and Isola 2020), through the engine:
    -t||x_i - x_j||^2 = 2t x_i.x_j - t|x_j|^2 (column bias) - t|x_i|^2 (added per row after)."""
    backend = resolve_backend(backend, x.device, x.dtype)
    rank, size = dist_.world(group)
    n = x.shape[0]
    x = _float32_if_16bit(x)
    sq = row_dot(x, x)
    keys = dist_.gather_rows(x, group)
    key_sq = dist_.gather_rows(sq[:, None], group)[:, 0]
    row_lse = _lse(x, keys, 2.0 * t, col_bias=-t * key_sq, self_offset=rank * n, backend=backend,
                   deterministic=deterministic)[0]
    total = dist_.merge_lse(torch.logsumexp(row_lse - t * sq, dim=0).reshape(1), group)[0]
    pairs = float(n * size) * float(n * size - 1)
    return total - math.log(pairs)


# --------------------------------------------------------------------------------------------
# Registration of the single-process forms
# --------------------------------------------------------------------------------------------
_lib = torch.library.Library("contrastive", "FRAGMENT")
_SCHEMAS = {
    "info_nce": ("info_nce(Tensor query, Tensor key, Tensor scale, Tensor? queue, bool in_batch_negatives, "
                 "bool symmetric, str reduction, bool deterministic, str backend) -> Tensor", info_nce_impl),
    "clip_loss": ("clip_loss(Tensor image_features, Tensor text_features, Tensor logit_scale, "
                  "bool deterministic, str backend) -> Tensor", clip_loss_impl),
    "nt_xent": ("nt_xent(Tensor z1, Tensor z2, Tensor scale, bool normalize, str reduction, bool deterministic, "
                "str backend) -> Tensor", nt_xent_impl),
    "supcon": ("supcon(Tensor features, Tensor labels, Tensor scale, bool normalize, bool deterministic, "
               "str backend) -> Tensor", supcon_impl),
    "nca": ("nca(Tensor embeddings, Tensor labels, Tensor scale, bool normalize, str reduction, "
            "bool deterministic, str backend) -> Tensor", nca_impl),
    "n_pair": ("n_pair(Tensor anchors, Tensor positives, float l2_reg, bool deterministic, str backend) -> Tensor",
               n_pair_impl),
    "uniformity": ("uniformity(Tensor x, Tensor t, bool deterministic, str backend) -> Tensor", uniformity_impl),
}
for _name, (_schema, _fn) in _SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, _fn, "CompositeImplicitAutograd")
