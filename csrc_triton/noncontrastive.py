"""The O(N D) members of the family: self-supervised losses that compare each sample with its own
partner only (or with batch statistics), so no N x M similarity matrix ever arises and no tiling
is needed. Plain PyTorch, autograd for the gradients.

    barlow_twins   Zbontar et al. 2021     cross-correlation of batch-standardised views -> I
    simsiam        Chen and He 2021        negative cosine to the stop-gradient partner view
    byol           Grill et al. 2020       squared distance of unit vectors to the target view
    vicreg         Bardes et al. 2022      invariance + variance hinge + covariance penalty
    drlim_pairs    Hadsell et al. 2006     contrastive loss on explicit (similar / dissimilar) pairs
    alignment      Wang and Isola 2020     mean of ||x_i - y_i||^alpha

Conventions shared with the rest of :mod:`csrc_triton`: inputs are (N, D) float32, bfloat16,
float16 or float64 tensors on one device with equal shapes; everything is computed in float32
(float64 for float64 inputs) with ``torch.autocast`` switched off inside, so a call under
autocast gives the same result as one outside it; the loss is float32 (float64) and each input's
gradient comes back in that input's dtype, rounded once. Bad arguments raise ``ValueError`` (or
``TypeError`` for wrong types) naming the argument, its value and what was expected, before any
computation. Nothing here synchronises with the host on CUDA (the one value check that would,
``similar`` holding only 0 and 1, runs on CPU tensors only).

Row norms ||v|| are computed as s ||v / s|| with s = max_j |v_j| (the identity holds for any
s > 0), so squares neither overflow nor underflow in float32: a difference of 1e-30 still has a
direction (an infinite entry gives a NaN norm: inf / inf). Barlow Twins and VICReg form D x D
matrices (O(N D^2) work, O(D^2) memory): that is inherent to their definitions, and independent
of the batch size. Their float32 products follow PyTorch's float32 matmul setting (exact IEEE
products unless ``torch.backends.cuda.matmul.allow_tf32`` or
``torch.set_float32_matmul_precision`` allows TF32 on CUDA).
"""
from __future__ import annotations

import contextlib
import math
from numbers import Real

import torch
from torch import Tensor, nn

from . import _validate as check
from ._numerics import acc_dtype

#: BatchNorm1d's default epsilon, which Barlow Twins' official code uses to standardise.
BARLOW_EPS = 1e-5
#: VICReg's epsilon inside the standard deviation, sqrt(var + eps) (paper and official code).
VICREG_EPS = 1e-4
#: Floor on a row norm in the cosine, as ``torch.nn.functional.cosine_similarity`` (eps=1e-8).
COSINE_EPS = 1e-8

__all__ = [
    "AlignmentLoss",
    "BYOLLoss",
    "BarlowTwinsLoss",
    "DrLIMPairsLoss",
    "SimSiamLoss",
    "VICRegLoss",
    "alignment",
    "barlow_twins",
    "byol",
    "drlim_pairs",
    "simsiam",
    "vicreg",
]


# ----------------------------------------------------------------------------------------------
# Private checks and numerics
# ----------------------------------------------------------------------------------------------
def _coefficient(name: str, value: object, *, what: str, positive: bool = False) -> float:
    """A finite real number, >= 0 (or > 0 with ``positive``), returned as a Python float."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number ({what}), got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        expected = "finite and > 0" if positive else "finite and >= 0"
        raise ValueError(f"{name} must be {expected} ({what}), got {value!r}")
    return v


def _batch_statistics_rows(loss: str, name: str, x: Tensor) -> None:
    # Barlow Twins standardises over the batch and VICReg takes an unbiased variance: one row
    # has no spread (Barlow: 0 / sqrt(eps) everywhere; VICReg: division by N - 1 = 0).
    if x.shape[0] < 2:
        raise ValueError(
            f"{name} has {x.shape[0]} row (shape {tuple(x.shape)}) but {loss} needs at least 2 rows: "
            "its terms are statistics over the batch"
        )


def _similar_labels(similar: object, x1: Tensor) -> Tensor:
    """Validate DrLIM's pair labels: (N,) bool, or integer/float holding 0 and 1 (1 = similar)."""
    n = x1.shape[0]
    if not isinstance(similar, Tensor):
        raise TypeError(f"similar must be a torch.Tensor of pair labels (bool, or 0/1), got {type(similar).__name__}")
    if similar.dtype.is_complex:
        raise TypeError(f"similar must be bool, integer or floating point (0/1 pair labels), got dtype {similar.dtype}")
    if similar.dim() != 1 or similar.shape[0] != n:
        raise ValueError(
            f"similar must have shape ({n},), one label per row of x1, got shape {tuple(similar.shape)}"
        )
    if similar.device != x1.device:
        raise ValueError(f"similar is on device {similar.device} but x1 is on {x1.device}; expected the same device")
    # Reading the values needs a host synchronisation on CUDA: there they are taken as given.
    if similar.dtype != torch.bool and similar.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = ~((similar == 0) | (similar == 1))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                "similar must hold only 0 (dissimilar pair) and 1 (similar pair), got "
                f"{similar[i].item()!r} at index {i}"
            )
    return similar


# Device types autocast knows, looked up once (the query itself cannot be traced by torch.compile).
_AUTOCAST_DEVICE_TYPES = frozenset(
    t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla") if torch.amp.is_autocast_available(t)
)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # The losses choose their own precision (float32 accumulation); autocast must not turn the
    # float32 products (Barlow's and VICReg's D x D matrices) back into 16-bit ones.
    if device.type in _AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _row_norm(v: Tensor) -> Tensor:
    """||v_i|| for each row of (N, D) ``v`` as s ||v_i / s||, s = max_j |v_ij| (1 for a zero row).

    s is detached: ||v|| = s ||v / s|| for every constant s > 0, so the gradient is v / ||v||
    without a term through s. At a zero row the value is 0 and ``vector_norm``'s gradient 0.
    A NaN in the row makes s, hence the norm, NaN (an inf as well: inf / inf).
    """
    s = v.detach().abs().amax(dim=1, keepdim=True)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return torch.linalg.vector_norm(v / s, dim=1) * s.squeeze(1)


def _unit(v: Tensor) -> Tensor:
    """v_i / max(||v_i||, COSINE_EPS), row-wise."""
    return v / _row_norm(v).clamp_min(COSINE_EPS).unsqueeze(1)


def _power_zero_safe(d: Tensor, alpha: float) -> Tensor:
    """d^alpha for d >= 0 with a gradient of 0 (not inf * 0 = NaN) where d = 0."""
    nonzero = d != 0  # NaN counts as nonzero, so it propagates
    d_safe = torch.where(nonzero, d, torch.ones_like(d))
    return torch.where(nonzero, d_safe.pow(alpha), torch.zeros_like(d))


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _off_diagonal(m: Tensor) -> Tensor:
    """The D (D - 1) entries m_ij, i != j, of a (D, D) matrix, as a (D - 1, D) view.

    Row-major, the diagonal entries sit at flat positions k (D + 1). Dropping the last element
    (the final diagonal entry) and reading the rest in rows of D + 1 puts one diagonal entry at
    the start of each row; the remaining D columns of each row are off-diagonal.
    """
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:]


def _standardize_over_batch(z: Tensor) -> Tensor:
    """BatchNorm1d(affine=False) in training mode: (z - mean) / sqrt(biased var + 1e-5), per column."""
    centred = z - z.mean(dim=0, keepdim=True)
    var = centred.pow(2).mean(dim=0, keepdim=True)
    return centred * torch.rsqrt(var + BARLOW_EPS)


# ----------------------------------------------------------------------------------------------
# Barlow Twins
# ----------------------------------------------------------------------------------------------
def barlow_twins(z1: Tensor, z2: Tensor, *, lambd: float = 0.0051) -> Tensor:
    r"""Barlow Twins (Zbontar, Jing, Misra, LeCun and Deny 2021, "Barlow Twins: Self-Supervised
    Learning via Redundancy Reduction", eq. 1), as the official code computes it:

        a = BN(z1), b = BN(z2)         BatchNorm1d(D, affine=False) in training mode: per column,
                                       (z - mean) / sqrt(biased variance + 1e-5) over the batch
        C = a^T b / N                  (D, D) cross-correlation
        loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2

    (The paper's Algorithm 1 standardises with ``z.std(0)``, unbiased and without epsilon; the
    official repository's BatchNorm1d is what is implemented here.) Single process: with several ranks
    the official code all-reduces C, which this function does not do. Work O(N D^2), memory
    O(D^2).

    Args:
        z1: (N, D) embeddings of the first views, N >= 2. float32, bfloat16, float16 or float64.
        z2: (N, D), same dtype and device; row i is the other view of sample i.
        lambd: finite, >= 0, weight of the redundancy (off-diagonal) term. The default 0.0051 is
            the official code's.

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs). NaN in the inputs gives NaN.

    Example:
        >>> z1, z2 = torch.randn(256, 128), torch.randn(256, 128)
        >>> loss = barlow_twins(z1, z2)  # independent views: about D (1 + 1/N) + lambd D (D - 1) / N
    """
    check.pair("z1", z1, "z2", z2)
    lambd = _coefficient("lambd", lambd, what="weight of the off-diagonal redundancy term")
    _batch_statistics_rows("barlow_twins", "z1", z1)
    acc = acc_dtype(z1)
    with _no_autocast(z1.device):
        a = _standardize_over_batch(z1.to(acc))
        b = _standardize_over_batch(z2.to(acc))
        c = (a.T @ b) / z1.shape[0]
        invariance = (1 - c.diagonal()).pow(2).sum()
        # the off-diagonal entries themselves: ||C||_F^2 - sum C_ii^2 would cancel when C_ii ~ 1
        redundancy = _off_diagonal(c).pow(2).sum()
        return invariance + lambd * redundancy


# ----------------------------------------------------------------------------------------------
# SimSiam and BYOL
# ----------------------------------------------------------------------------------------------
def _four_views(names: tuple[str, str, str, str], p1: object, p2: object, t1: object, t2: object) -> None:
    n1, n2, n3, n4 = names
    check.pair(n1, p1, n4, t2)  # p1 is compared with the other view's target t2
    check.pair(n2, p2, n3, t1)
    check.same_kind(n1, p1, n2, p2, same_rows=True)  # type: ignore[arg-type]


def simsiam(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor, *, reduction: str = "mean") -> Tensor:
    r"""SimSiam's symmetrised loss (Chen and He 2021, "Exploring Simple Siamese Representation
    Learning", eqs. 1-4): the negative cosine between each view's prediction and the other
    view's projection, with a stop-gradient on the projections:

        loss_i = -( cos(p1_i, sg(z2_i)) + cos(p2_i, sg(z1_i)) ) / 2,
        cos(u, v) = u . v / ( max(||u||, 1e-8) max(||v||, 1e-8) )

    (the two directions are averaged, as in the paper). No gradient flows into ``z1`` or ``z2``
    from this loss, whether or not they require grad. Values lie in [-1, 1]; identical
    predictions and projections give -1.

    Args:
        p1, p2: (N, D) predictor outputs of views 1 and 2.
        z1, z2: (N, D) projector outputs of views 1 and 2 (same dtype and device as p1, p2).
        reduction: "mean" over the N samples, "sum", or "none" (shape (N,)).

    Returns:
        float32 (float64 for float64 inputs). A NaN in row i makes loss_i NaN.

    Example:
        >>> z1, z2 = torch.randn(64, 256), torch.randn(64, 256)        # projector outputs
        >>> p1, p2 = torch.randn(64, 256), torch.randn(64, 256)        # predictor outputs
        >>> loss = simsiam(p1, p2, z1, z2)
    """
    _four_views(("p1", "p2", "z1", "z2"), p1, p2, z1, z2)
    check.reduction(reduction)
    acc = acc_dtype(p1)
    with _no_autocast(p1.device):
        u1, u2 = _unit(p1.to(acc)), _unit(p2.to(acc))
        v1, v2 = _unit(z1.detach().to(acc)), _unit(z2.detach().to(acc))
        per_sample = -((u1 * v2).sum(dim=1) + (u2 * v1).sum(dim=1)) / 2
        return _reduce(per_sample, reduction)


def byol(p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor, *, reduction: str = "mean") -> Tensor:
    r"""BYOL's symmetrised loss (Grill et al. 2020, "Bootstrap Your Own Latent", eq. 2 and the
    symmetrisation L_total = L + L~ below it): the squared distance between the unit-normalised
    online prediction of one view and the target projection of the other view, with a
    stop-gradient on the targets, **summed** over the two directions (the paper's convention):

        loss_i = || p1^_i - sg(t2^_i) ||^2 + || p2^_i - sg(t1^_i) ||^2
               = (2 - 2 cos(p1_i, t2_i)) + (2 - 2 cos(p2_i, t1_i)),     v^ = v / max(||v||, 1e-8)

    It is computed as the squared distance, which keeps its relative accuracy when the views
    nearly agree (2 - 2 cos would cancel). Values lie in [0, 8]; identical predictions and
    targets give 0. No gradient flows into ``t1`` or ``t2``.

    Args:
        p1, p2: (N, D) online network predictions for views 1 and 2.
        t1, t2: (N, D) target network projections for views 1 and 2 (same dtype and device).
        reduction: "mean" over the N samples, "sum", or "none" (shape (N,)).

    Returns:
        float32 (float64 for float64 inputs). A NaN in row i makes loss_i NaN.

    Example:
        >>> t1, t2 = torch.randn(64, 256), torch.randn(64, 256)
        >>> p1, p2 = torch.randn(64, 256, requires_grad=True), torch.randn(64, 256, requires_grad=True)
        >>> byol(p1, p2, t1, t2).backward()
    """
    _four_views(("p1", "p2", "t1", "t2"), p1, p2, t1, t2)
    check.reduction(reduction)
    acc = acc_dtype(p1)
    with _no_autocast(p1.device):
        u1, u2 = _unit(p1.to(acc)), _unit(p2.to(acc))
        v1, v2 = _unit(t1.detach().to(acc)), _unit(t2.detach().to(acc))
        per_sample = (u1 - v2).pow(2).sum(dim=1) + (u2 - v1).pow(2).sum(dim=1)
        return _reduce(per_sample, reduction)


# ----------------------------------------------------------------------------------------------
# VICReg
# ----------------------------------------------------------------------------------------------
def _variance_hinge_and_covariance(z: Tensor) -> tuple[Tensor, Tensor]:
    """mean_j relu(1 - sqrt(var_j + 1e-4)) and sum_{i != j} Cov_ij^2 / D for one view (N, D)."""
    n, d = z.shape
    centred = z - z.mean(dim=0, keepdim=True)
    var = centred.pow(2).sum(dim=0) / (n - 1)  # unbiased, as torch.var
    hinge = torch.relu(1 - torch.sqrt(var + VICREG_EPS)).mean()
    cov = (centred.T @ centred) / (n - 1)
    return hinge, _off_diagonal(cov).pow(2).sum() / d


def vicreg(z1: Tensor, z2: Tensor, *, sim: float = 25.0, var: float = 25.0, cov: float = 1.0) -> Tensor:
    r"""VICReg (Bardes, Ponce and LeCun 2022, "VICReg: Variance-Invariance-Covariance
    Regularization for Self-Supervised Learning"), as the official code
    (facebookresearch/vicreg, ``main_vicreg.py``) computes it:

        invariance = (1 / (N D)) sum_ij (z1_ij - z2_ij)^2                  (F.mse_loss)
        v(Z)       = (1 / D) sum_j relu(1 - sqrt(Var(Z_:j) + 1e-4))        (Var unbiased, / (N - 1))
        c(Z)       = (1 / D) sum_{i != j} Cov(Z)_ij^2,  Cov(Z) = (Z - mean)^T (Z - mean) / (N - 1)
        loss = sim * invariance + var * (v(z1) + v(z2)) / 2 + cov * (c(z1) + c(z2))

    Differences from the paper, for the record: its eq. 6 adds v(Z) + v(Z') (no 1/2), and so
    does its Algorithm 1 (``std_loss = mean(relu(1 - std_z_a)) + mean(relu(1 - std_z_b))``);
    the official training code halves it, as here (``vicreg(var=2 mu)`` equals the pseudo-code
    with ``mu``). Its eq. 5 writes the invariance as (1/N) sum_i ||z1_i - z2_i||^2 (D times the
    mean used here); Algorithm 1 and the code use ``mse_loss``, the mean over N D entries, as
    here. The coefficients 25 / 25 / 1 are the paper's, tuned with the official code.
    Single process (the official code gathers the batch across ranks for v and c). Work
    O(N D^2), memory O(D^2).

    Args:
        z1: (N, D) embeddings of the first views, N >= 2 (unbiased variance).
        z2: (N, D), same dtype and device.
        sim, var, cov: finite, >= 0 coefficients (the paper's lambda, mu, nu).

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs). NaN in the inputs gives NaN.

    Example:
        >>> z1 = torch.randn(256, 64)
        >>> z2 = z1 + 0.1 * torch.randn(256, 64)
        >>> loss = vicreg(z1, z2)
    """
    check.pair("z1", z1, "z2", z2)
    sim = _coefficient("sim", sim, what="weight of the invariance (MSE) term")
    var = _coefficient("var", var, what="weight of the variance hinge term")
    cov = _coefficient("cov", cov, what="weight of the covariance term")
    _batch_statistics_rows("vicreg", "z1", z1)
    acc = acc_dtype(z1)
    with _no_autocast(z1.device):
        a, b = z1.to(acc), z2.to(acc)
        invariance = (a - b).pow(2).mean()
        hinge_a, cov_a = _variance_hinge_and_covariance(a)
        hinge_b, cov_b = _variance_hinge_and_covariance(b)
        return sim * invariance + var * (hinge_a + hinge_b) / 2 + cov * (cov_a + cov_b)


# ----------------------------------------------------------------------------------------------
# DrLIM pairs and alignment
# ----------------------------------------------------------------------------------------------
def drlim_pairs(
    x1: Tensor, x2: Tensor, similar: Tensor, *, margin: float = 1.0, reduction: str = "mean"
) -> Tensor:
    r"""The contrastive loss of DrLIM (Hadsell, Chopra and LeCun 2006, "Dimensionality Reduction
    by Learning an Invariant Mapping", eq. 4) on explicit siamese pairs (x1_i, x2_i):

        d_i = || x1_i - x2_i ||                       (Euclidean, from the difference itself)
        loss_i = y_i d_i^2 / 2 + (1 - y_i) relu(margin - d_i)^2 / 2

    with y_i = 1 for a similar pair and 0 for a dissimilar one (the paper writes Y = 0 for
    similar: y = 1 - Y). Similar pairs are pulled together; dissimilar pairs are pushed apart
    until they are ``margin`` apart.

    Gradient at d_i = 0: the similar term's gradient, y_i (x1_i - x2_i), is 0 there. The
    dissimilar term's gradient, -(1 - y_i) relu(margin - d_i) (x1_i - x2_i) / d_i, has no
    defined direction at d_i = 0 (the loss is a cone there); it is taken as 0, so coincident
    dissimilar pairs get no gradient (and never a NaN).

    Args:
        x1, x2: (N, D) the two members of each pair, same dtype and device.
        similar: (N,) bool, or integer / floating tensor holding 0 and 1; 1 (True) = similar.
            On CPU the values are checked; on CUDA they are not (that would need a host
            synchronisation), and other values simply weight the two terms.
        margin: finite, > 0.
        reduction: "mean" over the N pairs, "sum", or "none" (shape (N,)).

    Returns:
        float32 (float64 for float64 inputs). A NaN in pair i makes loss_i NaN.

    Example:
        >>> x1, x2 = torch.randn(32, 16), torch.randn(32, 16)
        >>> similar = torch.rand(32) < 0.5
        >>> loss = drlim_pairs(x1, x2, similar, margin=2.0)
    """
    check.pair("x1", x1, "x2", x2)
    similar = _similar_labels(similar, x1)
    margin = _coefficient("margin", margin, what="distance beyond which dissimilar pairs cost nothing", positive=True)
    check.reduction(reduction)
    acc = acc_dtype(x1)
    with _no_autocast(x1.device):
        d = _row_norm(x1.to(acc) - x2.to(acc))
        y = similar.detach().to(acc)
        per_sample = (y * d.pow(2) + (1 - y) * torch.relu(margin - d).pow(2)) / 2
        return _reduce(per_sample, reduction)


def alignment(x: Tensor, y: Tensor, *, alpha: float = 2.0, reduction: str = "mean") -> Tensor:
    r"""Alignment loss (Wang and Isola 2020, "Understanding Contrastive Representation Learning
    through Alignment and Uniformity on the Hypersphere", the alignment loss L_align):

        loss_i = || x_i - y_i ||^alpha,     reduced by mean (the paper's expectation), sum or none

    Wang and Isola apply it to L2-normalised features; this function does not normalise (call
    ``torch.nn.functional.normalize`` first for the paper's setting). The norm is taken from the
    difference. At x_i = y_i the loss is 0 and its gradient is taken as 0 (for alpha <= 1 the
    gradient is undefined there).

    Args:
        x, y: (N, D) positive pairs (row i of each), same dtype and device.
        alpha: finite, > 0 (the paper uses 2).
        reduction: "mean" over the N pairs, "sum", or "none" (shape (N,)).

    Returns:
        float32 (float64 for float64 inputs). A NaN in pair i makes loss_i NaN.

    Example:
        >>> x = torch.nn.functional.normalize(torch.randn(128, 64), dim=1)
        >>> y = torch.nn.functional.normalize(x + 0.1 * torch.randn(128, 64), dim=1)
        >>> loss = alignment(x, y, alpha=2)
    """
    check.pair("x", x, "y", y)
    alpha = _coefficient("alpha", alpha, what="exponent of the distance", positive=True)
    check.reduction(reduction)
    acc = acc_dtype(x)
    with _no_autocast(x.device):
        d = _row_norm(x.to(acc) - y.to(acc))
        return _reduce(_power_zero_safe(d, alpha), reduction)


# ----------------------------------------------------------------------------------------------
# Module forms
# ----------------------------------------------------------------------------------------------
class BarlowTwinsLoss(nn.Module):
    """Module form of :func:`barlow_twins`; ``forward(z1, z2)``."""

    def __init__(self, lambd: float = 0.0051) -> None:
        super().__init__()
        self.lambd = _coefficient("lambd", lambd, what="weight of the off-diagonal redundancy term")

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return barlow_twins(z1, z2, lambd=self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"


class SimSiamLoss(nn.Module):
    """Module form of :func:`simsiam`; ``forward(p1, p2, z1, z2)``."""

    def __init__(self, *, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check.reduction(reduction)

    def forward(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        return simsiam(p1, p2, z1, z2, reduction=self.reduction)


class BYOLLoss(nn.Module):
    """Module form of :func:`byol`; ``forward(p1, p2, t1, t2)``."""

    def __init__(self, *, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check.reduction(reduction)

    def forward(self, p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
        return byol(p1, p2, t1, t2, reduction=self.reduction)


class VICRegLoss(nn.Module):
    """Module form of :func:`vicreg`; ``forward(z1, z2)``."""

    def __init__(self, sim: float = 25.0, var: float = 25.0, cov: float = 1.0) -> None:
        super().__init__()
        self.sim = _coefficient("sim", sim, what="weight of the invariance (MSE) term")
        self.var = _coefficient("var", var, what="weight of the variance hinge term")
        self.cov = _coefficient("cov", cov, what="weight of the covariance term")

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return vicreg(z1, z2, sim=self.sim, var=self.var, cov=self.cov)

    def extra_repr(self) -> str:
        return f"sim={self.sim}, var={self.var}, cov={self.cov}"


class DrLIMPairsLoss(nn.Module):
    """Module form of :func:`drlim_pairs`; ``forward(x1, x2, similar)``."""

    def __init__(self, margin: float = 1.0, *, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = _coefficient(
            "margin", margin, what="distance beyond which dissimilar pairs cost nothing", positive=True
        )
        self.reduction = check.reduction(reduction)

    def forward(self, x1: Tensor, x2: Tensor, similar: Tensor) -> Tensor:
        return drlim_pairs(x1, x2, similar, margin=self.margin, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


class AlignmentLoss(nn.Module):
    """Module form of :func:`alignment`; ``forward(x, y)``."""

    def __init__(self, alpha: float = 2.0, *, reduction: str = "mean") -> None:
        super().__init__()
        self.alpha = _coefficient("alpha", alpha, what="exponent of the distance", positive=True)
        self.reduction = check.reduction(reduction)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return alignment(x, y, alpha=self.alpha, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reduction={self.reduction!r}"
