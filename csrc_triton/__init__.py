"""Fused, tiled contrastive losses that never store the N x M logits.

Public API: the losses of the log-sum-exp engine (:func:`info_nce`, :func:`clip_loss`,
:func:`nt_xent`, :func:`supcon`, :func:`nca`, :func:`n_pair`, :func:`uniformity`) and their
``nn.Module`` forms; the same losses as ``torch.ops.contrastive.*``. Backends: ``"triton"``
(CUDA, or CPU through Triton's interpreter with ``TRITON_INTERPRET=1``), ``"blockwise"`` (plain
PyTorch, O(N x block) memory, the CPU default) and ``"dense"`` (the reference).
"""
from . import ops  # noqa: F401  (registers torch.ops.contrastive.lse)
from .losses import (
    ClipLoss,
    InfoNCELoss,
    NCALoss,
    NPairLoss,
    NTXentLoss,
    SupConLoss,
    UniformityLoss,
    clip_loss,
    info_nce,
    n_pair,
    nca,
    nt_xent,
    supcon,
    uniformity,
)
from .ops import BACKENDS

__all__ = [
    "BACKENDS",
    "ClipLoss",
    "InfoNCELoss",
    "NCALoss",
    "NPairLoss",
    "NTXentLoss",
    "SupConLoss",
    "UniformityLoss",
    "clip_loss",
    "info_nce",
    "n_pair",
    "nca",
    "nt_xent",
    "supcon",
    "uniformity",
]
