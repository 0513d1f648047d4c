"""Positive logits, shared by every backend. O(N D): they never need the tiles.

P(i), the positives of query i, is either one key at an offset, P(i) = {(i + offset) mod M}
(InfoNCE and CLIP: offset 0; NT-Xent over 2N views: offset N), or, with labels, every key with
query i's label, P(i) = {j : labels_j = labels_i} minus i itself when the diagonal is excluded
(SupCon). The forward returns positive_i = sum_{j in P(i)} S_ij.

In the backward a loss's gradient w_i of positive_i enters G as G_ij += w_i for j in P(i).
Adding it to the float32 accumulators of dQ and dK before they are rounded to the input dtype
is what makes 16-bit gradients as accurate as PyTorch's softmax-minus-one-hot: computed apart
and added after rounding, the two large terms would cancel in bf16.
"""
from __future__ import annotations

import torch
from torch import Tensor


def has_positive(positive_offset: int, labels: Tensor | None) -> bool:
    return labels is not None or positive_offset >= 0


def _partner_index(n: int, m: int, positive_offset: int, device: torch.device) -> Tensor:
    return (torch.arange(n, device=device) + positive_offset) % m


def _class_index(labels: Tensor) -> tuple[Tensor, int]:
    """Each row's class as an index into 0..C-1: (N,), and C."""
    classes, index = torch.unique(labels, return_inverse=True)
    return index, classes.shape[0]


def _class_sums(x: Tensor, index: Tensor, n_classes: int) -> Tensor:
    """Per-class sums of the rows of x: (C, D)."""
    return x.new_zeros(n_classes, x.shape[1]).index_add_(0, index, x)


def forward(
    qa: Tensor, ka: Tensor, scale: Tensor, exclude_diagonal: bool, positive_offset: int, labels: Tensor | None
) -> Tensor:
    """positive_i = s sum_{j in P(i)} q_i . k_j, from accumulation-dtype q and k: (N,)."""
    if labels is not None:
        index, n_classes = _class_index(labels)
        sums = _class_sums(ka, index, n_classes)
        partners = sums[index] - ka if exclude_diagonal else sums[index]
    else:
        partners = ka[_partner_index(qa.shape[0], ka.shape[0], positive_offset, qa.device)]
    return scale * (qa * partners).sum(dim=1)


def add_grad(
    gk: Tensor,
    gtq: Tensor,
    qa: Tensor,
    ka: Tensor,
    grad_positive: Tensor,
    exclude_diagonal: bool,
    positive_offset: int,
    labels: Tensor | None,
) -> None:
    """Add the positive term to the unscaled accumulators gk = G K (N, D) and gtq = G^T Q (M, D).

    G_ij += w_i for j in P(i), so (G K)_i += w_i sum_{j in P(i)} k_j and
    (G^T Q)_j += sum_{i : j in P(i)} w_i q_i.
    """
    w = grad_positive.to(qa.dtype)
    wq = w[:, None] * qa
    if labels is not None:
        index, n_classes = _class_index(labels)
        k_sums = _class_sums(ka, index, n_classes)
        wq_sums = _class_sums(wq, index, n_classes)
        gk.add_(w[:, None] * (k_sums[index] - ka if exclude_diagonal else k_sums[index]))
        gtq.add_(wq_sums[index] - wq if exclude_diagonal else wq_sums[index])
    else:
        idx = _partner_index(qa.shape[0], ka.shape[0], positive_offset, qa.device)
        gk.add_(w[:, None] * ka[idx])
        # idx holds distinct rows ((i + offset) mod M for i < N <= M): a gather and a copy,
        # several times faster on CPU than a scatter-add
        gtq.index_copy_(0, idx, gtq.index_select(0, idx).add_(wq))
