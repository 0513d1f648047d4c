"""Fused, tiled contrastive losses that never store the N x M logits.

Public API: :func:`info_nce`, :func:`clip_loss`, :func:`nt_xent`, :func:`supcon` and their
``nn.Module`` forms; the same losses as ``torch.ops.contrastive.*``. Backends: ``"triton"``
(CUDA, or CPU through Triton's interpreter with ``TRITON_INTERPRET=1``), ``"blockwise"`` (plain
PyTorch, O(N x block) memory, the CPU default) and ``"dense"`` (the reference).
"""
from . import ops  # noqa: F401  (registers torch.ops.contrastive.*)
from ._alloc import poison_outputs
from .losses import ClipLoss, InfoNCELoss, NTXentLoss, SupConLoss, clip_loss, info_nce, nt_xent, supcon
from .ops import BACKENDS

__all__ = [
    "BACKENDS",
    "ClipLoss",
    "InfoNCELoss",
    "NTXentLoss",
    "SupConLoss",
    "clip_loss",
    "info_nce",
    "nt_xent",
    "poison_outputs",
    "supcon",
]
