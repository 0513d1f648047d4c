"""Fused, tiled contrastive and metric-learning losses that never store the N x N matrix.

Public API:
* the losses of the log-sum-exp engine: :func:`info_nce` (and MoCo queues), :func:`clip_loss`,
  :func:`nt_xent`, :func:`supcon`, :func:`nca`, :func:`n_pair`, :func:`uniformity`;
* SigLIP's pairwise sigmoid loss, :func:`siglip` (its own tiled kernels);
* the distance-based ones: :func:`triplet_margin` (batch-hard, batch-all, semi-hard mining) and
  :func:`drlim`;
* O(N D) losses in plain PyTorch: :func:`barlow_twins`, :func:`simsiam`, :func:`byol`,
  :func:`vicreg`, :func:`drlim_pairs`, :func:`alignment`;
each with an ``nn.Module`` form; the tiled ones are also ops, ``torch.ops.contrastive.*``.
Backends of the tiled losses: ``"triton"`` (CUDA, or CPU through Triton's interpreter with
``TRITON_INTERPRET=1``), ``"blockwise"`` (plain PyTorch, bounded workspace, the CPU default) and
``"dense"`` (the reference).
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
from .noncontrastive import (
    AlignmentLoss,
    BarlowTwinsLoss,
    BYOLLoss,
    DrLIMPairsLoss,
    SimSiamLoss,
    VICRegLoss,
    alignment,
    barlow_twins,
    byol,
    drlim_pairs,
    simsiam,
    vicreg,
)
from .ops import BACKENDS
from .siglip import SigLipLoss, siglip
from .triplet import DrLIMLoss, TripletMarginLoss, drlim, triplet_margin

__all__ = [
    "AlignmentLoss",
    "BACKENDS",
    "BYOLLoss",
    "BarlowTwinsLoss",
    "ClipLoss",
    "DrLIMLoss",
    "DrLIMPairsLoss",
    "InfoNCELoss",
    "NCALoss",
    "NPairLoss",
    "NTXentLoss",
    "SigLipLoss",
    "SimSiamLoss",
    "SupConLoss",
    "TripletMarginLoss",
    "UniformityLoss",
    "VICRegLoss",
    "alignment",
    "barlow_twins",
    "byol",
    "clip_loss",
    "drlim",
    "drlim_pairs",
    "info_nce",
    "n_pair",
    "nca",
    "nt_xent",
    "siglip",
    "simsiam",
    "supcon",
    "triplet_margin",
    "uniformity",
    "vicreg",
]
