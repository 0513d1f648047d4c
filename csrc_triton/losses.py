"""Public contrastive losses. Each one is a thin, validated front end to an op in
``torch.ops.contrastive``; the N x M logits are never stored (backend "triton" or "blockwise").

Notation: Q (N, D) queries, K (M, D) keys, s the logit scale (1 / temperature, or CLIP's
``logit_scale``), S = s Q K^T, r_i = log sum_j exp(S_ij), c_j = log sum_i exp(S_ij).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _validate as check
from . import ops  # noqa: F401  (registers torch.ops.contrastive.*)
from .ops import resolve_backend

TEMPERATURE = "temperature: logits are divided by it"


def info_nce(
    query: Tensor,
    key: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    queue: Tensor | None = None,
    in_batch_negatives: bool = True,
    symmetric: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""InfoNCE (van den Oord et al. 2018, "Representation Learning with Contrastive Predictive
    Coding"), a drop-in for ``F.cross_entropy(query @ key.T / t, arange(N))`` that never
    materialises the N x M logits.

    The positive of query i is key i; its negatives are every other key (``in_batch_negatives``)
    and every row of ``queue``:

        loss_i = log( sum_{j in negatives(i) + {i}} exp(S_ij) ) - S_ii,     S = query key^T / t

    ``queue=q, in_batch_negatives=False`` is MoCo's loss (He et al. 2020): logits
    ``[q_i . k_i, q_i . queue_j ...] / t`` with target 0. ``symmetric=True`` adds the
    key-to-query direction (column log-sum-exp) and averages the two (no queue allowed).
    Features are not normalised here.

    Args:
        query: (N, D) float32, bfloat16 or float16 (float64 on the CPU backends).
        key: (N, D), same dtype and device; row i is the positive of query i.
        temperature: positive float, or 0-dim tensor (its gradient is computed when it
            requires grad; a float32 tensor with bf16 features is fine).
        queue: optional (Q, D) extra negatives, e.g. a MoCo memory queue (no gradient flows
            into a queue that does not require grad).
        in_batch_negatives: use the other keys of the batch as negatives.
        symmetric: average with the key-to-query loss.
        reduction: "mean", "sum" or "none" (shape (N,)).
        backend: "auto" (triton on CUDA, blockwise on CPU), "triton", "blockwise" or "dense".

    Returns:
        A float32 scalar (or (N,) with ``reduction="none"``). NaN in the inputs gives NaN.

    Example:
        >>> q = torch.nn.functional.normalize(torch.randn(256, 128), dim=1)
        >>> k = torch.nn.functional.normalize(q + 0.1 * torch.randn(256, 128), dim=1)
        >>> loss = info_nce(q, k, temperature=0.1)
    """
    check.pair("query", query, "key", key)
    scale = 1.0 / check.positive_scalar("temperature", temperature, query.device, query.dtype, what=TEMPERATURE)
    check.reduction(reduction)
    resolve_backend(backend, query.device)
    if queue is not None:
        check.features("queue", queue)
        check.same_kind("query", query, "queue", queue, same_rows=False)
        if symmetric:
            raise ValueError("symmetric=True cannot be combined with a queue: the queue has no queries of its own")
    elif not in_batch_negatives:
        raise ValueError("in_batch_negatives=False needs a queue of negatives (queue=None leaves none)")
    return torch.ops.contrastive.info_nce(query, key, scale, queue, in_batch_negatives, symmetric, reduction, backend)


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: float | Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Symmetric CLIP loss (Radford et al. 2021), as OpenCLIP's ``ClipLoss`` computes it:

        S = logit_scale * image_features @ text_features^T
        loss = ( CE(S, arange(N)) + CE(S^T, arange(N)) ) / 2
             = ( mean_i (r_i - S_ii) + mean_j (c_j - S_jj) ) / 2

    Both directions come from one pass over the tiles. ``logit_scale`` is the multiplier itself
    (``model.logit_scale.exp()``), a float or a 0-dim tensor; gradients flow to all three inputs.

    Args:
        image_features: (N, D). text_features: (N, D), same dtype and device.
        logit_scale: positive float or 0-dim tensor.
        backend: "auto", "triton", "blockwise" or "dense".

    Example:
        >>> img = torch.nn.functional.normalize(torch.randn(64, 512), dim=1)
        >>> txt = torch.nn.functional.normalize(torch.randn(64, 512), dim=1)
        >>> loss = clip_loss(img, txt, logit_scale=torch.tensor(100.0))
    """
    check.pair("image_features", image_features, "text_features", text_features)
    scale = check.positive_scalar(
        "logit_scale", logit_scale, image_features.device, image_features.dtype, what="the logit multiplier"
    )
    resolve_backend(backend, image_features.device)
    return torch.ops.contrastive.clip_loss(image_features, text_features, scale, backend)


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    *,
    temperature: float | Tensor = 0.5,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""NT-Xent, SimCLR's loss (Chen et al. 2020), over the 2N views z = [z1; z2]:

        loss_i = log sum_{j != i} exp(S_ij) - S_{i, i+-N},     S = z z^T / t,  i in 0..2N-1

    Each view's positive is its partner view; its negatives are the other 2N - 2 views.

    Args:
        z1, z2: (N, D) the two views' embeddings, same dtype and device.
        temperature: positive float or 0-dim tensor.
        normalize: L2-normalise the rows first (SimCLR's cosine similarity).
        reduction: "mean" over the 2N views, "sum", or "none" (shape (2N,)).
        backend: "auto", "triton", "blockwise" or "dense".

    Example:
        >>> z1, z2 = torch.randn(128, 64), torch.randn(128, 64)
        >>> loss = nt_xent(z1, z2, temperature=0.5)
    """
    check.pair("z1", z1, "z2", z2)
    scale = 1.0 / check.positive_scalar("temperature", temperature, z1.device, z1.dtype, what=TEMPERATURE)
    check.reduction(reduction)
    resolve_backend(backend, z1.device)
    return torch.ops.contrastive.nt_xent(z1, z2, scale, bool(normalize), reduction, backend)


def supcon(
    features: Tensor,
    labels: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    normalize: bool = True,
    backend: str = "auto",
) -> Tensor:
    r"""Supervised contrastive loss, L_out of Khosla et al. 2020 (eq. 2):

        loss_i = log sum_{a != i} exp(S_ia) - (1 / |P(i)|) sum_{p in P(i)} S_ip,   S = z z^T / t

    over all N * V views, where P(i) are the other views with i's label. The mean over P(i)
    equals s z_i . (class sum - z_i) / |P(i)|, computed in O(N D) outside the tiles. Anchors
    without a positive are left out of the mean; if none has one, ValueError.

    Args:
        features: (N, D), or (N, V, D) with V views per sample.
        labels: (N,) integer class ids (one per sample, shared by its views).
        temperature: positive float or 0-dim tensor.
        normalize: L2-normalise the rows first.
        backend: "auto", "triton", "blockwise" or "dense".

    Example:
        >>> feats = torch.randn(32, 2, 128)           # 32 samples, 2 views
        >>> labels = torch.randint(0, 4, (32,))
        >>> loss = supcon(feats, labels, temperature=0.1)
    """
    check.features("features", features, ndims=(2, 3))
    check.labels(labels, features.shape[0])
    if labels.device != features.device:
        raise ValueError(f"labels are on device {labels.device} but features are on {features.device}")
    scale = 1.0 / check.positive_scalar("temperature", temperature, features.device, features.dtype, what=TEMPERATURE)
    resolve_backend(backend, features.device)
    if not torch.compiler.is_compiling():
        views = features.shape[1] if features.dim() == 3 else 1
        if views == 1 and torch.unique(labels, return_counts=True)[1].max() < 2:
            raise ValueError(
                "supcon: no anchor has a positive (every label occurs once and there is one view per "
                "sample); give several samples per class or several views per sample"
            )
    return torch.ops.contrastive.supcon(features, labels, scale, bool(normalize), backend)


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce`; ``forward(query, key, queue=None)``."""

    def __init__(
        self,
        temperature: float | Tensor = 0.07,
        *,
        in_batch_negatives: bool = True,
        symmetric: bool = False,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.in_batch_negatives = in_batch_negatives
        self.symmetric = symmetric
        self.reduction = reduction
        self.backend = backend

    def forward(self, query: Tensor, key: Tensor, queue: Tensor | None = None) -> Tensor:
        return info_nce(
            query,
            key,
            temperature=self.temperature,
            queue=queue,
            in_batch_negatives=self.in_batch_negatives,
            symmetric=self.symmetric,
            reduction=self.reduction,
            backend=self.backend,
        )


class ClipLoss(nn.Module):
    """Module form of :func:`clip_loss`; ``forward(image_features, text_features, logit_scale)``."""

    def __init__(self, *, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: float | Tensor) -> Tensor:
        return clip_loss(image_features, text_features, logit_scale, backend=self.backend)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent`; ``forward(z1, z2)``."""

    def __init__(
        self, temperature: float | Tensor = 0.5, *, normalize: bool = True, reduction: str = "mean", backend: str = "auto"
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.normalize = normalize
        self.reduction = reduction
        self.backend = backend

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent(
            z1, z2, temperature=self.temperature, normalize=self.normalize, reduction=self.reduction, backend=self.backend
        )


class SupConLoss(nn.Module):
    """Module form of :func:`supcon`; ``forward(features, labels)``."""

    def __init__(self, temperature: float | Tensor = 0.1, *, normalize: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.temperature = temperature
        self.normalize = normalize
        self.backend = backend

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return supcon(features, labels, temperature=self.temperature, normalize=self.normalize, backend=self.backend)
