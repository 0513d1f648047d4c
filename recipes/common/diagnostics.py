"""Learning-behaviour diagnostics of a contrastive representation, logged while pre-training.

* :func:`alignment` and :func:`uniformity`: Wang and Isola 2020, "Understanding Contrastive
  Representation Learning through Alignment and Uniformity on the Hypersphere" (§4.1): how
  close positive pairs are, and how evenly the embeddings cover the sphere.
* :func:`positive_negative_cosine`: the mean cosine similarity of positive pairs and of the
  negatives a SimCLR batch contrasts them with.
* :func:`singular_values` and :func:`effective_rank`: the spectrum of the embedding matrix
  (dimensional collapse, Jing et al. 2021, "Understanding Dimensional Collapse in Contrastive
  Self-supervised Learning", Fig. 1) summarised by the effective rank of Roy and Vetterli 2007,
  "The effective rank: a measure of effective dimensionality".
* :func:`representation_report`: all of them for one batch of two views.

Every function returns Python numbers (or a CPU tensor of singular values): they synchronise
with the device and belong to logging steps, not to the training hot path. Sums are taken in
float64 whatever the input dtype.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "alignment",
    "effective_rank",
    "positive_negative_cosine",
    "representation_report",
    "singular_values",
    "uniformity",
]

# Up to this many rows uniformity is computed from the dense N x N distance matrix in float64
# (N^2 doubles: 32 MB per matrix at 2048); beyond, through csrc_triton.uniformity, the tiled engine, in
# O(N D) memory.
UNIFORMITY_DENSE_ROWS = 2048


def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2) -> float:
    """Alignment of positive pairs (Wang and Isola 2020, eq. 4), on L2-normalised rows:

        alignment = mean_i || z1_i / |z1_i| - z2_i / |z2_i| ||^alpha

    0 when every pair coincides, 2^alpha when every pair is antipodal.

    Args:
        z1, z2: (N, D) embeddings of the two views of N inputs (row i of each is a pair).
        alpha: > 0 (the paper uses 2).

    Example:
        >>> alignment(proj[:B], proj[B:])     # lower is better aligned
    """
    _check_pair(z1, z2)
    _check_positive("alpha", alpha)
    u1, u2 = _unit(z1), _unit(z2)
    return (u1 - u2).norm(dim=1).pow(alpha).mean().item()


def uniformity(z: torch.Tensor, t: float = 2, *, dense_max_rows: int = UNIFORMITY_DENSE_ROWS) -> float:
    """Uniformity (Wang and Isola 2020, eq. 5), on L2-normalised rows u_i = z_i / |z_i|:

        uniformity = log mean_{i != j} exp(-t || u_i - u_j ||^2)

    Between -4t (antipodal pairs; about -3.9 for t = 2 and uniform points in 128 dimensions)
    and 0 (collapsed to one point); lower is more uniform. Up to ``dense_max_rows`` rows it is
    computed densely in float64 (||u_i - u_j||^2 = 2 - 2 u_i.u_j, a log-sum-exp over the
    off-diagonal); beyond, by ``csrc_triton.uniformity`` (the tiled engine: O(N D) memory, fp32
    accumulation) on the normalised rows, which evaluates the same formula.

    Args:
        z: (N, D), N >= 2.
        t: > 0 (the paper uses 2).

    Example:
        >>> uniformity(proj)       # e.g. -3.5: well spread; -0.1: near collapse
    """
    _check_matrix("z", z)
    if z.shape[0] < 2:
        raise ValueError(f"z.shape={tuple(z.shape)}: uniformity needs at least 2 rows (pairs i != j)")
    _check_positive("t", t)
    n = z.shape[0]
    if n > dense_max_rows:
        from csrc_triton import uniformity as tiled_uniformity
        u = F.normalize(z.float(), dim=1)
        return tiled_uniformity(u, t=float(t)).item()
    u = _unit(z)
    sq = (2.0 - 2.0 * (u @ u.T)).clamp_min(0.0)                       # ||u_i - u_j||^2
    logits = (-t * sq).masked_fill(torch.eye(n, dtype=torch.bool, device=u.device), -math.inf)
    return (torch.logsumexp(logits.reshape(-1), 0) - math.log(n * (n - 1))).item()


def positive_negative_cosine(z1: torch.Tensor, z2: torch.Tensor) -> tuple[float, float]:
    """Mean cosine similarity of the positive pairs (z1_i, z2_i), and of the negatives: every
    other pair of distinct rows among the 2N views (the 2N(2N - 2) ordered pairs a SimCLR
    batch contrasts; a row with itself and the positive pairs excluded).

    Computed in O(N D) from sums: with u the 2N normalised rows,
    sum_{a != b} u_a.u_b = |sum_a u_a|^2 - sum_a |u_a|^2, minus the positives 2 sum_i u1_i.u2_i.

    Args:
        z1, z2: (N, D), N >= 2 (N = 1 has no negatives: NaN for the negative mean).

    Returns:
        (positive mean, negative mean). A zero row has cosine 0 with everything.

    Example:
        >>> pos, neg = positive_negative_cosine(proj[:B], proj[B:])
    """
    _check_pair(z1, z2)
    n = z1.shape[0]
    if n == 0:
        raise ValueError("z1, z2: expected at least one pair, got 0 rows")
    u1, u2 = _unit(z1), _unit(z2)
    positive_sum = (u1 * u2).sum()
    total = u1.sum(0) + u2.sum(0)
    all_pairs = total.square().sum() - u1.square().sum() - u2.square().sum()   # a != b
    count = 2 * n * (2 * n - 2)
    negative = ((all_pairs - 2.0 * positive_sum) / count).item() if count else float("nan")
    return (positive_sum / n).item(), negative


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values of the centred matrix x - mean_rows(x), in descending order (the
    spectrum Jing et al. 2021 plot to show dimensional collapse).

    Args:
        x: (N, D) embeddings.

    Returns:
        float64 (min(N, D),) on the CPU. NaN anywhere in x: all NaN.

    Example:
        >>> s = singular_values(features); effective_rank(s)
    """
    _check_matrix("x", x)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected a non-empty (N, D) matrix")
    xd = x.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(xd).all()):
        return torch.full((min(xd.shape),), math.nan, dtype=torch.float64)
    return torch.linalg.svdvals(xd - xd.mean(0))


def effective_rank(s: torch.Tensor | list[float]) -> float:
    """Effective rank (Roy and Vetterli 2007, eq. 2): with p_k = s_k / sum_k s_k,

        erank = exp(-sum_k p_k log p_k)        (0 log 0 = 0)

    Between 1 (one direction) and the number of non-zero singular values (all equal). The zero
    matrix (every s_k = 0, complete collapse) gives 0. NaN in s: NaN.

    Args:
        s: non-negative singular values (any order), e.g. from :func:`singular_values`.

    Example:
        >>> effective_rank(torch.tensor([1.0, 1.0, 1.0, 0.0]))     # 3.0
    """
    s = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
    if s.numel() == 0:
        raise ValueError("s: expected at least one singular value, got none")
    if bool(torch.isnan(s).any()):
        return float("nan")
    if bool((s < 0).any()):
        raise ValueError(f"s contains {s.min().item()}: expected non-negative singular values")
    total = s.sum()
    if total.item() == 0:
        return 0.0
    p = s / total
    entropy = -torch.where(p > 0, p * torch.log(p), 0.0).sum()
    return math.exp(entropy.item())


def representation_report(features: torch.Tensor, projections_view1: torch.Tensor | None = None,
                          projections_view2: torch.Tensor | None = None, *,
                          t: float = 2, alpha: float = 2) -> dict[str, Any]:
    """Every diagnostic for one batch, as plain Python values (JSON-ready):

    * of the backbone features (N, D_f), one view: ``feature_spectrum`` (list, descending),
      ``feature_effective_rank``, ``feature_uniformity``;
    * of the projections (what the loss sees; two views, (N, D_p) each, row i a positive pair):
      ``alignment``, ``uniformity`` (the mean of both views' uniformities, as in Wang and
      Isola's code), ``positive_cosine``, ``negative_cosine``, ``projection_spectrum`` and
      ``projection_effective_rank`` (of view 1, the images of ``features``).

    Projections may be None (e.g. the supervised baseline): only the feature entries.

    Example:
        >>> report = representation_report(out["feature"][:B], out["projection"][:B],
        ...                                out["projection"][B:])
    """
    s_feat = singular_values(features)
    report: dict[str, Any] = {
        "n": int(features.shape[0]),
        "feature_dim": int(features.shape[1]),
        "feature_spectrum": s_feat.tolist(),
        "feature_effective_rank": effective_rank(s_feat),
        "feature_uniformity": uniformity(features, t) if features.shape[0] >= 2 else float("nan"),
    }
    if projections_view1 is None and projections_view2 is None:
        return report
    if projections_view1 is None or projections_view2 is None:
        raise ValueError("projections_view1, projections_view2: expected both or neither")
    _check_pair(projections_view1, projections_view2)
    if projections_view1.shape[0] != features.shape[0]:
        raise ValueError(f"projections_view1.shape={tuple(projections_view1.shape)}, features.shape="
                         f"{tuple(features.shape)}: expected the same number of rows")
    pos, neg = positive_negative_cosine(projections_view1, projections_view2)
    s_proj = singular_values(projections_view1)
    unif = float("nan")
    if projections_view1.shape[0] >= 2:
        unif = 0.5 * (uniformity(projections_view1, t) + uniformity(projections_view2, t))
    report.update({
        "projection_dim": int(projections_view1.shape[1]),
        "alignment": alignment(projections_view1, projections_view2, alpha),
        "uniformity": unif,
        "positive_cosine": pos,
        "negative_cosine": neg,
        "projection_spectrum": s_proj.tolist(),
        "projection_effective_rank": effective_rank(s_proj),
    })
    return report


def _unit(z: torch.Tensor) -> torch.Tensor:
    # u = z / max(|z|, eps) in float64; a zero row stays zero
    return F.normalize(z.detach().double(), dim=1, eps=1e-300)


def _check_matrix(name: str, x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor (N, D), got {type(x).__name__}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: shape {tuple(x.shape)}, dtype {x.dtype}: expected a float "
                         "(N, D) tensor")


def _check_pair(z1: Any, z2: Any) -> None:
    _check_matrix("z1", z1)
    _check_matrix("z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(f"z1.shape={tuple(z1.shape)}, z2.shape={tuple(z2.shape)}: expected the "
                         "same (N, D) shape (row i of each is a positive pair)")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a finite number > 0")
