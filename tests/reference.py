"""Plain dense reference implementations of the contrastive losses, written from the spec.

Each function materialises the full logits matrix and uses ``F.cross_entropy`` /
``torch.logsumexp`` on it, in whatever dtype its inputs have.  The tests evaluate them twice:
in float64 (the ground truth) and in the dtype under test ("torch in the same dtype", the
error budget in the Cut Cross-Entropy acceptance rule).

These are the documentation of record for what each loss means; they share no code with
``csrc_triton``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "none":
        return per_item
    raise ValueError(reduction)


def lse_ref(q, k, scale, exclude_diagonal: bool = False):
    """Row and column log-sum-exp of S = scale * q @ k.T, with (i, i) dropped when asked."""
    s = scale * (q @ k.T)
    if exclude_diagonal:
        n = min(s.shape)
        eye = torch.zeros_like(s, dtype=torch.bool)
        eye[torch.arange(n), torch.arange(n)] = True
        s = s.masked_fill(eye, float("-inf"))
    return torch.logsumexp(s, dim=1), torch.logsumexp(s, dim=0)


def info_nce_ref(
    query,
    key,
    temperature=0.07,
    queue=None,
    in_batch_negatives=True,
    symmetric=False,
    reduction="mean",
):
    """InfoNCE / MoCo: row i of the logits holds q_i.k_i (the positive) and the negatives."""
    n = query.shape[0]
    if in_batch_negatives:
        # positive on the diagonal of q @ k.T; every other key a negative.
        blocks = [query @ key.T]
        target = torch.arange(n, device=query.device)
    else:
        # MoCo: positive logit in column 0, then the queue.
        blocks = [(query * key).sum(dim=1, keepdim=True)]
        target = torch.zeros(n, dtype=torch.long, device=query.device)
    if queue is not None:
        blocks.append(query @ queue.T)
    logits = torch.cat(blocks, dim=1) / temperature
    row = F.cross_entropy(logits, target, reduction="none")
    if not symmetric:
        return _reduce(row, reduction)
    assert queue is None and in_batch_negatives
    col = F.cross_entropy((key @ query.T) / temperature, target, reduction="none")
    return _reduce((row + col) / 2, reduction)


def clip_loss_ref(image_features, text_features, logit_scale):
    """OpenCLIP's ClipLoss (one process): (CE(L, arange) + CE(L.T, arange)) / 2."""
    logits = logit_scale * (image_features @ text_features.T)
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def nt_xent_ref(z1, z2, temperature=0.5, normalize=True, reduction="mean"):
    """SimCLR NT-Xent over the 2N views cat(z1, z2); view i's positive is view (i + N) mod 2N."""
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    if normalize:
        z = F.normalize(z, dim=1)
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(n, device=z.device)
    target = torch.cat([idx + n, idx])
    return _reduce(F.cross_entropy(logits, target, reduction="none"), reduction)


def supcon_ref(features, labels, temperature=0.1, normalize=True):
    """Khosla et al. 2020, eq. 2 (L_out), over every view as an anchor.

    Views of a (N, V, D) input are laid out view-major, as in the paper's code; the mean over
    anchors does not depend on that order.
    """
    if features.dim() == 3:
        v = features.shape[1]
        z = torch.cat(torch.unbind(features, dim=1), dim=0)
        lab = labels.repeat(v)
    else:
        z = features
        lab = labels
    if normalize:
        z = F.normalize(z, dim=1)
    m = z.shape[0]
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(m, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (lab[:, None] == lab[None, :]) & ~self_mask
    n_pos = positive.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        raise ValueError("no anchor has a positive")
    # where() rather than multiply: log_prob is -inf on the diagonal.
    pos_sum = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -pos_sum[has_pos] / n_pos[has_pos].to(pos_sum.dtype)
    return per_anchor.mean()
