"""Distance-based metric-learning losses, tiled: the triplet margin loss with batch-hard,
batch-all and semi-hard mining, and DrLIM's contrastive loss. No N x N matrix is stored
(backends "triton" and "blockwise"); the maths is in :mod:`csrc_triton.distances`.

Distances (``distance=``): "euclidean" ||a - b||, "squared" ||a - b||^2, "cosine" 1 - cos(a, b)
(rows L2-normalised first, in float32). Inputs: (N, D) float32, bfloat16 or float16 (float64 on
the CPU backends), int labels (N,). Losses are float32 (float64 for float64 inputs).

Distributed (``process_group``): the anchors are this rank's B rows, the candidates (positives
and negatives) the whole global batch of R B rows, gathered with exact gradients. Scaling
convention of :mod:`csrc_triton.distributed`: with "mean" rank r returns
R * (sum of its anchors' terms) / (the global normaliser), with "sum" R * (its sum), so that the
mean over ranks equals the single-process loss on the concatenated batch and DDP's gradient
averaging gives its gradients; "none" returns this rank's own per-item terms, unscaled.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _validate as check
from . import distributed
from .distance_ops import MININGS, drlim_impl, resolve_backend, triplet_margin_impl
from .distances import DISTANCES

DEFAULT_TRIPLET_MARGIN = 0.2


def _margin(value: object) -> float:
    return check.non_negative("margin", value, what="the margin of the hinge")


def _check_batch(labels_all: Tensor, *, need_positive: bool, need_negative: bool) -> None:
    """The global batch must hold a positive pair and two classes (for the mining losses).

    Reads label values, so it runs only where that needs no device synchronisation (CPU
    tensors, not while tracing), as :mod:`csrc_triton._validate` does. Elsewhere such a batch
    gives a loss of 0 (no term is counted)."""
    if labels_all.device.type != "cpu" or torch.compiler.is_compiling():
        return
    sorted_labels = torch.sort(labels_all).values
    distinct = int((sorted_labels[1:] != sorted_labels[:-1]).sum()) + 1
    if need_negative and distinct < 2:
        raise ValueError(
            f"labels: every sample of the batch has the same label ({int(sorted_labels[0])}), so no "
            "anchor has a negative; expected at least two classes"
        )
    if need_positive and distinct == labels_all.shape[0]:
        raise ValueError(
            f"labels: all {labels_all.shape[0]} labels of the batch are distinct, so no anchor has a "
            "positive; expected at least one label shared by two samples"
        )


def _common(embeddings: object, labels: object, reduction: object, backend: object, process_group: object | None):
    check.features("embeddings", embeddings)
    assert isinstance(embeddings, Tensor)
    labels = check.labels(labels, embeddings.shape[0], embeddings.device).to(torch.int64)
    check.reduction(reduction)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    resolve_backend(backend, embeddings)
    distributed.world(process_group)
    distributed.check_same_shape("embeddings", embeddings, process_group)
    return labels, distributed.gather_constant(labels, process_group)


def triplet_margin(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float | None = None,
    mining: str = "batch_hard",
    distance: str = "euclidean",
    soft: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    process_group: object | None = None,
) -> Tensor:
    r"""Triplet margin loss with in-batch mining, tiled (no N x N distance matrix is stored).

    With d the chosen distance and m the margin (default 0.2):

    * ``mining="batch_hard"`` (Hermans, Beyer and Leibe 2017, "In Defense of the Triplet Loss
      for Person Re-Identification"): per anchor a its farthest positive p* (same label, not
      itself) and nearest negative n*, loss_a = relu(d(a, p*) - d(a, n*) + m), or with
      ``soft=True`` softplus(d(a, p*) - d(a, n*)). "mean" is over the anchors that have both a
      positive and a negative (the others are left out; "none" gives them 0). Shape of "none":
      (N,).
    * ``mining="batch_all"`` (Hermans et al.'s batch-all): every valid triplet,
      sum_{a, p, n} relu(d_ap - d_an + m); "mean" divides by the number of triplets whose
      loss is positive (0 if there are none); "none": per anchor, summed over its triplets,
      (N,). ``soft`` is not supported (softplus over every triplet has no tiled O(N^2 log N)
      form).
    * ``mining="semi_hard"`` (Schroff, Kalenichenko and Philbin 2015, FaceNet; exactly as
      TensorFlow Addons' ``triplet_semihard_loss``): for every positive pair (a, p) the nearest
      negative n with d_an > d_ap (strictly; the margin is not part of the choice), or the
      farthest negative of a if there is none; loss_ap = relu(d_ap - d_an + m) (``soft``:
      softplus(d_ap - d_an)); "mean" over all positive pairs; "none": one value per positive
      pair, (P,), anchor-major with p in ascending index order. Costs O(P D) memory for the
      chosen pairs, P the number of positive pairs. TF Addons' default
      ``distance_metric="L_2"`` is our ``distance="squared"`` (its "L_1" is the Euclidean
      distance); ``soft`` is our extension (TF Addons has no soft semi-hard loss).

    Mining is a tiled masked max/min (ties: batch-hard takes the first candidate in (label,
    index) order, semi-hard the smallest index; NaN distances win, so NaN inputs give a NaN
    loss; :mod:`csrc_triton.distances` has the exact rules); the loss and its gradient are then recomputed from the chosen rows'
    differences under autograd, O(N D) (the gradient of ||a - b|| at a = b is 0, as torch's norm
    gives). Batch-all's forward and backward are tiled sweeps with a sort, a binary search and
    prefix sums per anchor.

    Args:
        embeddings: (N, D) float32, bfloat16, float16 (float64 on the CPU backends).
        labels: (N,) integer class ids, same device.
        margin: non-negative float; None means 0.2. ``soft=True`` has no margin: pass None.
        mining: "batch_hard", "batch_all" or "semi_hard".
        distance: "euclidean", "squared" or "cosine".
        soft: the soft-margin form softplus(d_ap - d_an) (batch_hard and semi_hard).
        reduction: "mean", "sum" or "none" (shapes above).
        backend: "auto" (triton on CUDA, blockwise on CPU), "triton", "blockwise" or "dense".
        process_group: anchors are the local rows, candidates the global batch; see the module
            docstring for the scaling convention.

    Raises ValueError for a batch with no positive pair or a single class (this check reads
    the labels: one host synchronisation, skipped under torch.compile).

    Example:
        >>> x = torch.randn(64, 128, requires_grad=True)
        >>> y = torch.arange(16).repeat_interleave(4)
        >>> loss = triplet_margin(x, y, margin=0.2, mining="batch_hard")
        >>> loss.backward()
    """
    labels, labels_all = _common(embeddings, labels, reduction, backend, process_group)
    if mining not in MININGS:
        raise ValueError(f"mining={mining!r} is not one of {MININGS}")
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} is not one of {DISTANCES}")
    if not isinstance(soft, bool):
        raise TypeError(f"soft must be a bool, got {type(soft).__name__}")
    if soft:
        if margin is not None:
            raise ValueError(
                f"soft=True with margin={margin!r}: the soft-margin loss softplus(d_ap - d_an) has no "
                "margin; pass margin=None"
            )
        if mining == "batch_all":
            raise ValueError(
                "soft=True is not supported with mining='batch_all' (softplus over every triplet has "
                "no tiled form); use 'batch_hard' or 'semi_hard'"
            )
        m = 0.0
    else:
        m = _margin(DEFAULT_TRIPLET_MARGIN if margin is None else margin)
    _check_batch(labels_all, need_positive=True, need_negative=True)
    return triplet_margin_impl(embeddings, labels, m, mining, distance, soft, reduction, backend, process_group)


def drlim(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    process_group: object | None = None,
) -> Tensor:
    r"""DrLIM's contrastive loss (Hadsell, Chopra and LeCun 2006, "Dimensionality Reduction by
    Learning an Invariant Mapping"), over all ordered pairs i != j of the batch:

        L_ij = y_ij d_ij^2 / 2 + (1 - y_ij) relu(margin - d_ij)^2 / 2,   d = ||x_i - x_j||,

    y_ij = 1 when labels i and j are equal. "mean" divides the sum by N (N - 1); "none": per
    anchor, summed over its pairs, (N,). The similar half is O(N D) from class means
    (sum_{j in c} |x_i - x_j|^2 = n_c |x_i - mu_c|^2 + sum_{j in c} |x_j - mu_c|^2); the
    dissimilar half is a tiled sum with a tiled backward (dX_i = sum_j G_ij (x_i - x_j)); on
    CPU only the pairs within the margin are visited when they are few. The gradient of a
    dissimilar pair at d = 0 is taken as 0 (torch's norm convention). 16-bit rows are taken to
    float32 first (the two halves' gradients meet there, so they are rounded once): the tiles
    run in float32.

    Args:
        embeddings: (N, D) float32, bfloat16, float16 (float64 on the CPU backends), N >= 2.
        labels: (N,) integer class ids, same device.
        margin: non-negative float (the radius beyond which dissimilar pairs cost nothing).
        reduction: "mean", "sum" or "none".
        backend: "auto", "triton", "blockwise" or "dense".
        process_group: anchors local, pairs with the global batch; module docstring.

    Example:
        >>> x = torch.randn(256, 32, requires_grad=True)
        >>> loss = drlim(x, torch.randint(0, 10, (256,)), margin=1.0)
    """
    labels, labels_all = _common(embeddings, labels, reduction, backend, process_group)
    m = _margin(margin)
    if labels_all.shape[0] < 2:
        raise ValueError(
            f"embeddings has {labels_all.shape[0]} row in the batch; DrLIM averages over pairs i != j, so "
            "expected at least 2 rows"
        )
    return drlim_impl(embeddings, labels, m, reduction, backend, process_group)


class TripletMarginLoss(nn.Module):
    """Module form of :func:`triplet_margin`; ``forward(embeddings, labels)``.

    Example:
        >>> loss_fn = TripletMarginLoss(margin=0.3, mining="semi_hard")
        >>> loss = loss_fn(torch.randn(32, 16), torch.arange(8).repeat(4))
    """

    def __init__(
        self,
        *,
        margin: float | None = None,
        mining: str = "batch_hard",
        distance: str = "euclidean",
        soft: bool = False,
        reduction: str = "mean",
        backend: str = "auto",
        process_group: object | None = None,
    ) -> None:
        super().__init__()
        self.margin, self.mining, self.distance, self.soft = margin, mining, distance, soft
        self.reduction, self.backend, self.process_group = reduction, backend, process_group

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return triplet_margin(
            embeddings, labels, margin=self.margin, mining=self.mining, distance=self.distance, soft=self.soft,
            reduction=self.reduction, backend=self.backend, process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}, distance={self.distance!r}, soft={self.soft}"


class DrLIMLoss(nn.Module):
    """Module form of :func:`drlim`; ``forward(embeddings, labels)``.

    Example:
        >>> loss = DrLIMLoss(margin=1.0)(torch.randn(32, 16), torch.randint(0, 4, (32,)))
    """

    def __init__(
        self, *, margin: float = 1.0, reduction: str = "mean", backend: str = "auto", process_group: object | None = None
    ) -> None:
        super().__init__()
        self.margin, self.reduction, self.backend, self.process_group = margin, reduction, backend, process_group

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return drlim(
            embeddings, labels, margin=self.margin, reduction=self.reduction, backend=self.backend,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
