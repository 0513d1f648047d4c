"""Tests of ``csrc_triton.noncontrastive``: Barlow Twins, SimSiam, BYOL, VICReg, DrLIM pairs and
alignment.

Ground truth: float64 references written here from each paper's formula (and, for Barlow Twins
and VICReg, transcriptions of the published pseudo-code / official code), evaluated on the very
inputs the implementation sees (already rounded to the dtype under test), with autograd giving
the gradients for a random upstream gradient.

Tolerances, from the arithmetic. The implementation upcasts to float32 (float64 for float64
inputs), computes there, and rounds each input's gradient to that input's dtype once. So:

    loss (float32, or float64):  |ours - truth| <= u_acc |truth| + c u_acc scale
    gradient in dtype T:         |ours - truth| <= h_T |truth|  + c u_acc scale + s_T

u_acc is the unit roundoff of the accumulation dtype (2^-24, or 2^-53); h_T half an ulp of T
relative to the value, T's one final rounding (2^-8 bfloat16, 2^-11 float16, 2^-24 float32,
2^-53 float64); s_T half the spacing of T's subnormals (float16: 2^-25, where small gradients
land). "scale" is the magnitude of the terms that are summed or cancel, named per loss in
SCALES (max|truth| by default): accumulation errors are relative to it, not to the result
(e.g. (1 - C_ii)^2 with C_ii ~ 1, or a cosine's gradient, exactly 0 for D = 1 but made of terms
of size 1 / ||p||). c = 64 covers the rounding of the short sums involved (length <= 130
here); the largest error measured is 15 u_acc scale, in Barlow Twins' gradients. For 16-bit
gradients this is tighter than the Cut Cross-Entropy rule |truth - ours| <= |truth - torch in
dtype T| + tol: an evaluation in T cannot, beyond luck, beat one rounding of the exact value.

The losses allocate no uninitialised buffers (every output is the result of a torch op); the
calls still run inside ``poison_outputs`` so that any future backend-allocated output is
covered.
"""
from __future__ import annotations

import math
import time
import zlib

import pytest
import torch
import torch.nn.functional as F

from csrc_triton._alloc import poison_outputs
from csrc_triton.noncontrastive import (
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

from reference import param_id as _id

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(3, 1), (7, 5), (129, 130)]
HALF_ULP = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SUBNORMAL = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-25}
SUM_ROUNDING = 64


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# float64 references, from the papers
# ----------------------------------------------------------------------------------------------
def _offdiag_mask(d):
    return ~torch.eye(d, dtype=torch.bool)


def barlow_ref(z1, z2, lambd=0.0051):
    """Zbontar et al. 2021 eq. 1 with BatchNorm1d(affine=False)'s standardisation written out."""
    n, d = z1.shape

    def standardise(z):
        mu = z.sum(0) / n
        var = ((z - mu) ** 2).sum(0) / n  # biased, eps 1e-5 as BatchNorm1d
        return (z - mu) / torch.sqrt(var + 1e-5)

    c = torch.einsum("ni,nj->ij", standardise(z1), standardise(z2)) / n
    eye = torch.eye(d, dtype=c.dtype)
    return ((1 - torch.diagonal(c)) ** 2).sum() + lambd * (c**2 * (1 - eye)).sum()


def barlow_official(z1, z2, lambd=0.0051):
    """The official code's BarlowTwins.forward (facebookresearch/barlowtwins), one process."""
    n, d = z1.shape
    bn = torch.nn.BatchNorm1d(d, affine=False).to(z1.dtype).train()
    c = bn(z1).T @ bn(z2)
    c = c / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c[_offdiag_mask(d)].pow(2).sum()
    return on_diag + lambd * off_diag


def vicreg_ref(z1, z2, sim=25.0, var=25.0, cov=1.0):
    """Bardes et al. 2022 with the official code's normalisations (see vicreg's docstring)."""
    n, d = z1.shape
    inv = ((z1 - z2) ** 2).sum() / (n * d)

    def v(z):
        std = torch.sqrt(((z - z.mean(0)) ** 2).sum(0) / (n - 1) + 1e-4)
        return torch.clamp(1 - std, min=0).sum() / d

    def c(z):
        zc = z - z.mean(0)
        cm = torch.einsum("ni,nj->ij", zc, zc) / (n - 1)
        return (cm[_offdiag_mask(d)] ** 2).sum() / d

    return sim * inv + var * (v(z1) + v(z2)) / 2 + cov * (c(z1) + c(z2))


def vicreg_paper_pseudocode(z_a, z_b, lambda_=25.0, mu=25.0, nu=1.0):
    """Algorithm 1 of the VICReg paper, transcribed (its variance term has no 1/2)."""
    N, D = z_a.shape
    sim_loss = F.mse_loss(z_a, z_b)
    std_z_a = torch.sqrt(z_a.var(dim=0) + 1e-04)
    std_z_b = torch.sqrt(z_b.var(dim=0) + 1e-04)
    std_loss = torch.mean(F.relu(1 - std_z_a)) + torch.mean(F.relu(1 - std_z_b))
    z_a = z_a - z_a.mean(dim=0)
    z_b = z_b - z_b.mean(dim=0)
    cov_z_a = (z_a.T @ z_a) / (N - 1)
    cov_z_b = (z_b.T @ z_b) / (N - 1)
    mask = _offdiag_mask(D)
    cov_loss = cov_z_a[mask].pow(2).sum() / D + cov_z_b[mask].pow(2).sum() / D
    return lambda_ * sim_loss + mu * std_loss + nu * cov_loss


def vicreg_official(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """The official code's VICReg.forward loss (facebookresearch/vicreg, main_vicreg.py), one process."""
    batch_size, num_features = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    mask = _offdiag_mask(num_features)
    cov_loss = cov_x[mask].pow(2).sum() / num_features + cov_y[mask].pow(2).sum() / num_features
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def _reduce(x, reduction):
    return {"mean": x.mean, "sum": x.sum, "none": lambda: x}[reduction]()


def simsiam_ref(p1, p2, z1, z2, reduction="mean"):
    """Chen and He 2021, Algorithm 1: D(p, z) = -cos(p, z.detach()); L = D(p1, z2)/2 + D(p2, z1)/2."""

    def neg_cos(p, z):
        z = z.detach()
        return -(p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1))

    return _reduce(neg_cos(p1, z2) / 2 + neg_cos(p2, z1) / 2, reduction)


def byol_ref(p1, p2, t1, t2, reduction="mean"):
    """Grill et al. 2020 eq. 2, symmetrised by summing: (2 - 2 cos(p1, t2)) + (2 - 2 cos(p2, t1))."""

    def term(p, t):
        return 2 - 2 * F.cosine_similarity(p, t.detach(), dim=1)

    return _reduce(term(p1, t2) + term(p2, t1), reduction)


def drlim_ref(x1, x2, similar, margin=1.0, reduction="mean"):
    """Hadsell et al. 2006 eq. 4 with y = 1 for similar pairs (the paper's Y = 1 - y)."""
    d = torch.sqrt(((x1 - x2) ** 2).sum(1))
    y = similar.to(d.dtype)
    return _reduce(y * d**2 / 2 + (1 - y) * torch.clamp(margin - d, min=0) ** 2 / 2, reduction)


def alignment_ref(x, y, alpha=2.0, reduction="mean"):
    """Wang and Isola 2020: (x - y).norm(dim=1).pow(alpha), then the expectation."""
    return _reduce(torch.sqrt(((x - y) ** 2).sum(1)) ** alpha, reduction)


# ----------------------------------------------------------------------------------------------
# Inputs (built in float64, then rounded to the dtype under test; truth uses the rounded values)
# ----------------------------------------------------------------------------------------------
def _views(n, d, gen, corr=0.7):
    """Two correlated views with columns of different means and scales (std 0.5 .. 1.5)."""
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z2 = corr * z1 + (1 - corr**2) ** 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    scale = 0.5 + torch.rand(d, generator=gen, dtype=torch.float64)
    shift = torch.randn(d, generator=gen, dtype=torch.float64)
    return z1 * scale + shift, z2 * scale - shift


def _close_pairs(n, d, gen):
    """Pairs at distances spread over [0.2, 2.2] (around the default margin 1)."""
    x1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    step = torch.randn(n, d, generator=gen, dtype=torch.float64)
    dist = 0.2 + 2 * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    return x1, x1 + dist * step / step.norm(dim=1, keepdim=True)


def _make_inputs(loss, n, d, gen):
    if loss in ("barlow", "vicreg"):
        z1, z2 = _views(n, d, gen)
        return dict(z1=z1, z2=z2), ["z1", "z2"]
    if loss in ("simsiam", "byol"):
        z1, z2 = _views(n, d, gen, corr=0.9)
        p1 = z2 + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
        p2 = z1 + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
        if loss == "simsiam":
            return dict(p1=p1, p2=p2, z1=z1, z2=z2), ["p1", "p2"]
        return dict(p1=p1, p2=p2, t1=z1, t2=z2), ["p1", "p2"]
    x1, x2 = _close_pairs(n, d, gen)
    if loss == "drlim":
        similar = torch.arange(n) % 2 == 0
        return dict(x1=x1, x2=x2, similar=similar), ["x1", "x2"]
    return dict(x=x1, y=x2), ["x", "y"]


OURS = {
    "barlow": lambda reduction=None, **kw: barlow_twins(**kw),
    "vicreg": lambda reduction=None, **kw: vicreg(**kw),
    "simsiam": lambda reduction="mean", **kw: simsiam(**kw, reduction=reduction),
    "byol": lambda reduction="mean", **kw: byol(**kw, reduction=reduction),
    "drlim": lambda reduction="mean", **kw: drlim_pairs(**kw, reduction=reduction),
    "alignment": lambda reduction="mean", **kw: alignment(**kw, reduction=reduction),
}
REFS = {
    "barlow": lambda reduction=None, **kw: barlow_ref(**kw),
    "vicreg": lambda reduction=None, **kw: vicreg_ref(**kw),
    "simsiam": simsiam_ref,
    "byol": byol_ref,
    "drlim": drlim_ref,
    "alignment": alignment_ref,
}
PER_SAMPLE = ["simsiam", "byol", "drlim", "alignment"]
BATCH = ["barlow", "vicreg"]


# ----------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------
def assert_within(name, out, truth, *, half_ulp, acc_u, scale, subnormal=0.0):
    """|out - truth| <= half_ulp |truth| + SUM_ROUNDING acc_u scale + subnormal, elementwise."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(truth.shape)}"
    out, truth = out.detach().double(), truth.detach().double()
    bound = half_ulp * truth.abs() + SUM_ROUNDING * acc_u * scale + subnormal
    err = (out - truth).abs()
    bad = ~(err <= bound)  # NaN fails
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} off; first at {i}: ours={out.flatten()[i].item():.9g} "
            f"truth={truth.flatten()[i].item():.9g} bound={bound.flatten()[i].item():.3g}; "
            f"max err / (acc_u scale) = {(err.nan_to_num(math.inf).max() / (acc_u * scale)):.3g}"
        )


def _random_upstream(shape, gen):
    mag = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
    return mag * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()


# Error scales. Accumulation errors are relative to the magnitude of what is summed or
# cancelled, not to the result: (1 - C_ii)^2 with C_ii ~ 1, or a cosine's gradient
# (v^ - cos u^) / ||p||, which is exactly 0 for D = 1 yet made of terms of size 1 / ||p||. So
# each loss names the natural magnitude of its terms ("scale"); the default is max|truth|.
def _per_sample_weight(upstream, n, reduction):
    w = upstream.abs().expand(n) if upstream.dim() == 0 else upstream.abs()
    return w / n if reduction == "mean" else w


def _reduce_scale(per_sample, reduction):
    return per_sample.sum().item() if reduction == "sum" else per_sample.max().item()


def _cosine_scales(loss_bound, grad_factor):
    """Per sample |loss_i| <= loss_bound; |d loss_i / d p_i| <= grad_factor |g_i| / ||p_i||."""

    def scales(inp, truth, grads, upstream, reduction="mean", **_):
        n = inp["p1"].shape[0]
        w = _per_sample_weight(upstream, n, reduction)
        loss_scale = _reduce_scale(torch.full((n,), float(loss_bound)), reduction)
        return loss_scale, {
            k: (grad_factor * w / inp[k].detach().norm(dim=1)).max().item() for k in grads
        }

    return scales


def _barlow_scales(inp, truth, grads, upstream, lambd=0.0051, **_):
    # D terms (1 - C_ii)^2 with |C_ii| <= 1: 4 each; D (D - 1) terms lambd C_ij^2: lambd each
    d = inp["z1"].shape[1]
    return 4 * d * (1 + lambd * d), {k: g.abs().max().item() for k, g in grads.items()}


def _vicreg_scales(inp, truth, grads, upstream, var=25.0, **_):
    # the hinges relu(1 - std) cancel to 0 from terms of size 1: var * (1 + 1) / 2
    return abs(truth.item()) + var, {k: g.abs().max().item() for k, g in grads.items()}


def _drlim_scales(inp, truth, grads, upstream, margin=1.0, reduction="mean", **_):
    # relu(margin - d)^2 / 2 cancels between margin and d
    d = (inp["x1"] - inp["x2"]).detach().norm(dim=1)
    return _reduce_scale((d + margin) ** 2 / 2, reduction), {k: g.abs().max().item() for k, g in grads.items()}


def _alignment_scales(inp, truth, grads, upstream, alpha=2.0, **_):
    # d^alpha: a relative error e in d becomes alpha e
    return max(alpha, 1.0) * truth.abs().max().item(), {k: g.abs().max().item() for k, g in grads.items()}


SCALES = {
    "barlow": _barlow_scales,
    "vicreg": _vicreg_scales,
    "simsiam": _cosine_scales(1, 1),  # (cos + cos) / 2; (v^ - cos u^) / (2 ||p||), |.| <= 2
    "byol": _cosine_scales(8, 4),  # ||u^ - v^||^2 twice (2 - 2 cos <= 4); 2 (cos u^ - v^) / ||p||
    "drlim": _drlim_scales,
    "alignment": _alignment_scales,
}


def check_against_reference(loss, inputs, grad_names, dtype, gen, ours=None, ref=None, **opts):
    """Loss and every input gradient of ours (inputs in ``dtype``) vs the float64 reference."""
    ours = ours or OURS[loss]
    ref = ref or REFS[loss]
    ours_in = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    truth_in = {k: (v.double() if v.is_floating_point() else v) for k, v in ours_in.items()}
    for k in grad_names:
        ours_in[k] = ours_in[k].clone().requires_grad_(True)
        truth_in[k] = truth_in[k].clone().requires_grad_(True)

    truth = ref(**truth_in, **opts)
    upstream = _random_upstream(truth.shape, gen)
    truth_grads = torch.autograd.grad(truth, [truth_in[k] for k in grad_names], upstream)
    with poison_outputs():
        out = ours(**ours_in, **opts)
    assert out.dtype == _acc(dtype), f"loss dtype {out.dtype} for {dtype} inputs"
    out_grads = torch.autograd.grad(out, [ours_in[k] for k in grad_names], upstream.to(out.dtype))

    loss_scale, grad_scales = SCALES[loss](truth_in, truth, dict(zip(grad_names, truth_grads)), upstream, **opts)
    acc_u = HALF_ULP[_acc(dtype)]
    assert_within(f"{loss} loss ({_id(dtype)})", out, truth, half_ulp=acc_u, acc_u=acc_u, scale=loss_scale)
    for k, g, t in zip(grad_names, out_grads, truth_grads):
        assert g.dtype == dtype, f"gradient of {k} has dtype {g.dtype}, expected {dtype}"
        assert_within(
            f"{loss} d/d{k} ({_id(dtype)})", g, t,
            half_ulp=HALF_ULP[dtype], acc_u=acc_u, scale=grad_scales[k], subnormal=SUBNORMAL[dtype],
        )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# Accuracy: every loss, dtype and shape; random upstream gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("loss", list(OURS))
def test_against_float64_reference(loss, dtype, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{loss}{shape}".encode()))
    inputs, grads = _make_inputs(loss, *shape, gen)
    opts = {"reduction": "none"} if loss in PER_SAMPLE else {}
    check_against_reference(loss, inputs, grads, dtype, gen, **opts)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", PER_SAMPLE)
def test_reductions(loss, reduction):
    gen = torch.Generator().manual_seed(7)
    inputs, grads = _make_inputs(loss, 37, 21, gen)
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(loss, inputs, grads, dtype, gen, reduction=reduction)


@pytest.mark.parametrize(
    "loss,opts",
    [
        ("barlow", dict(lambd=0.0)),
        ("barlow", dict(lambd=0.3)),
        ("vicreg", dict(sim=1.0, var=0.0, cov=0.0)),
        ("vicreg", dict(sim=0.0, var=3.0, cov=0.0)),
        ("vicreg", dict(sim=0.0, var=0.0, cov=2.0)),
        ("drlim", dict(margin=2.5)),
        ("alignment", dict(alpha=1.0)),
        ("alignment", dict(alpha=0.5)),
        ("alignment", dict(alpha=3.0)),
    ],
    ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()),
)
def test_coefficients(loss, opts):
    """Each term on its own (coefficients 0 switch the others off), and other exponents/margins."""
    gen = torch.Generator().manual_seed(11)
    inputs, grads = _make_inputs(loss, 29, 17, gen)
    if loss in PER_SAMPLE:
        opts = dict(opts, reduction="none")
    for dtype in (torch.float32, torch.float16):
        check_against_reference(loss, inputs, grads, dtype, gen, **opts)


def test_barlow_twins_matches_official_code():
    """BatchNorm1d(affine=False) standardisation, as in the official repository."""
    gen = torch.Generator().manual_seed(3)
    z1, z2 = _views(53, 24, gen)
    for lambd in (0.0051, 0.5):
        check_against_reference(
            "barlow", dict(z1=z1, z2=z2), ["z1", "z2"], torch.float32, gen,
            ref=lambda reduction=None, **kw: barlow_official(**kw), lambd=lambd,
        )  # fmt: skip


def test_vicreg_matches_official_code_and_paper_pseudocode():
    """Ours is the official code; the paper's Algorithm 1 has no 1/2 on the variance term, so
    ours with var = 2 mu equals the pseudo-code with mu."""
    gen = torch.Generator().manual_seed(5)
    z1, z2 = _views(41, 19, gen)
    args = dict(z1=z1, z2=z2)
    check_against_reference(
        "vicreg", args, ["z1", "z2"], torch.float32, gen,
        ref=lambda z1, z2, sim, var, cov: vicreg_official(z1, z2, sim, var, cov), sim=2.0, var=3.0, cov=0.5,
    )  # fmt: skip
    check_against_reference(
        "vicreg", args, ["z1", "z2"], torch.float32, gen,
        ref=lambda z1, z2, sim, var, cov: vicreg_paper_pseudocode(z1, z2, sim, var / 2, cov), sim=2.0, var=3.0, cov=0.5,
    )  # fmt: skip
    # and the two published forms really differ (so the check above is not vacuous)
    z1_lo = z1 * 0.3  # std < 1: the variance hinge is active
    assert not torch.allclose(vicreg_official(z1_lo, z2), vicreg_paper_pseudocode(z1_lo, z2))


# ----------------------------------------------------------------------------------------------
# Stop-gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn,targets", [(simsiam, ("z1", "z2")), (byol, ("t1", "t2"))], ids=["simsiam", "byol"])
def test_stop_gradient(fn, targets):
    gen = torch.Generator().manual_seed(2)
    p1, p2, a, b = (torch.randn(9, 6, generator=gen, requires_grad=True) for _ in range(4))
    loss = fn(p1, p2, a, b)
    loss.backward()
    assert a.grad is None and b.grad is None, f"gradient flowed into {targets}"
    assert p1.grad is not None and p2.grad is not None
    assert torch.isfinite(p1.grad).all() and p1.grad.abs().sum() > 0
    # only the targets require grad: the loss does not depend on anything differentiable
    a2, b2 = a.detach().requires_grad_(), b.detach().requires_grad_()
    assert not fn(p1.detach(), p2.detach(), a2, b2).requires_grad


# ----------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------
def _orthogonal_columns():
    """N = 4 rows; u, w: zero-mean, orthogonal columns of (biased) variance 1."""
    u = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    w = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    return u, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_id)
def test_barlow_closed_forms(dtype):
    u, w = _orthogonal_columns()
    k = 1 / (1 + 1e-5)  # C_ii for unit-variance columns: var / (var + eps)
    theta = 0.6
    z = torch.stack([u, math.cos(theta) * u + math.sin(theta) * w], dim=1)
    # identical views, two columns correlated by cos(theta): C = k [[1, cos], [cos, 1]]
    lambd = 0.25
    expected = 2 * (1 - k) ** 2 + lambd * 2 * (k * math.cos(theta)) ** 2
    got = barlow_twins(z.to(dtype), z.to(dtype), lambd=lambd)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # uncorrelated unit-variance columns: only the epsilon's 2 (1 - k)^2 ~ 2e-10; in float32, C_ii
    # carries an error of a few u = 6e-8, so (1 - C_ii)^2 an absolute one of ~ 4 u (1 - k) < 1e-11
    z0 = torch.stack([u, w], dim=1)
    got = barlow_twins(z0.to(dtype), z0.to(dtype), lambd=lambd).item()
    assert got == pytest.approx(2 * (1 - k) ** 2, rel=1e-6, abs=1e-11 if dtype == torch.float32 else 0)
    # anti-correlated views: C_ii = -k, loss 2 (1 + k)^2
    assert barlow_twins(z0.to(dtype), (-z0).to(dtype), lambd=lambd).item() == pytest.approx(2 * (1 + k) ** 2, rel=1e-6)


def test_barlow_perfectly_correlated_views_leave_only_the_redundancy_term():
    """z2 = a z1 + b (a > 0 per column): standardised views agree, so C_ii ~ 1 and the loss is
    lambd * sum_{i != j} R_ij^2, R z1's correlation matrix (up to eps / var ~ 1e-5)."""
    gen = torch.Generator().manual_seed(4)
    z1 = torch.randn(64, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    z2 = z1 * torch.tensor([2.0, 0.5, 3.0, 1.0, 7.0, 0.25], dtype=torch.float64) + 5.0
    r = torch.corrcoef(z1.T)
    lambd = 0.1
    expected = lambd * (r[_offdiag_mask(6)] ** 2).sum().item()
    assert expected > 0.1
    got = barlow_twins(z1.float(), z2.float(), lambd=lambd).item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_vicreg_closed_forms():
    u, w = _orthogonal_columns()
    z = 2 * torch.stack([u, w], dim=1)  # std sqrt(16/3) > 1, uncorrelated columns
    assert vicreg(z, z).item() == 0.0
    # a shift by 1 costs sim * mean((z1 - z2)^2) = 25 * 1 only
    assert vicreg(z, z + 1).item() == pytest.approx(25.0, rel=1e-6)
    # collapse: constant rows, std = sqrt(1e-4) = 0.01, hinge 0.99 in both views
    c = torch.ones(5, 3)
    assert vicreg(c, c).item() == pytest.approx(25 * 0.99, rel=1e-6)
    # two identical columns in one view: Cov = var [[1, 1], [1, 1]], var = 16/3 (unbiased)
    zz = 2 * torch.stack([u, u], dim=1)
    expected_cov = 2 * (16 / 3) ** 2 / 2  # two off-diagonal entries, / D = 2
    assert vicreg(zz, z, sim=0.0, var=0.0, cov=1.0).item() == pytest.approx(expected_cov, rel=1e-6)


def test_simsiam_byol_closed_forms():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(11, 7, generator=gen)
    y = torch.randn(11, 7, generator=gen)
    # SimSiam: p1 vs z2 and p2 vs z1
    assert simsiam(x, y, y, x).item() == pytest.approx(-1.0, abs=2e-7)
    assert simsiam(3 * x, 0.5 * y, y, x).item() == pytest.approx(-1.0, abs=2e-7)
    assert simsiam(-x, -y, y, x).item() == pytest.approx(1.0, abs=2e-7)
    # BYOL: identical -> exactly 0; opposite -> 4 + 4
    assert byol(x, y, y, x).item() == 0.0
    assert byol(x, y, -y, -x).item() == pytest.approx(8.0, rel=1e-6)
    # orthogonal -> 2 + 2
    e1, e2 = torch.eye(2)[None, 0], torch.eye(2)[None, 1]
    assert byol(e1, e1, e2, e2).item() == pytest.approx(4.0, rel=1e-7)
    assert simsiam(e1, e1, e2, e2).item() == 0.0


def test_drlim_and_alignment_closed_forms():
    x1 = torch.zeros(3, 2)
    x2 = torch.tensor([[3.0, 4.0], [3.0, 4.0], [0.0, 0.5]])  # distances 5, 5, 0.5
    similar = torch.tensor([1, 0, 0])
    got = drlim_pairs(x1, x2, similar, margin=6.0, reduction="none")
    torch.testing.assert_close(got, torch.tensor([12.5, 0.5, 5.5**2 / 2]), rtol=1e-6, atol=0)
    assert drlim_pairs(x1, x2, similar, margin=1.0, reduction="none")[1].item() == 0.0
    assert alignment(x1, x2, alpha=2, reduction="none").tolist() == pytest.approx([25.0, 25.0, 0.25], rel=1e-6)
    assert alignment(x1, x2, alpha=1, reduction="sum").item() == pytest.approx(10.5, rel=1e-6)
    assert alignment(x1, x2, alpha=0.5, reduction="none")[0].item() == pytest.approx(5**0.5, rel=1e-6)
    x = torch.randn(6, 5)
    assert alignment(x, x).item() == 0.0


# ----------------------------------------------------------------------------------------------
# Gradients at d = 0 and extreme magnitudes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.0])
def test_alignment_gradient_at_coincident_pairs(alpha):
    x = torch.tensor([[1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    y = torch.tensor([[1.0, 2.0], [0.0, 0.0]])  # row 0 coincident, row 1 at distance 1
    alignment(x, y, alpha=alpha, reduction="sum").backward()
    assert x.grad[0].tolist() == [0.0, 0.0]  # defined as 0 (for alpha <= 1 it is undefined)
    assert x.grad[1].tolist() == pytest.approx([0.0, alpha])  # d/dx ||x||^alpha at x = e2


def test_drlim_gradient_at_coincident_pairs():
    x1 = torch.tensor([[1.0, -1.0], [1.0, -1.0], [0.0, 0.0]], requires_grad=True)
    x2 = torch.tensor([[1.0, -1.0], [1.0, -1.0], [0.0, 0.5]])
    loss = drlim_pairs(x1, x2, torch.tensor([True, False, False]), margin=1.0, reduction="none")
    assert loss.tolist() == pytest.approx([0.0, 0.5, 0.125])
    loss.sum().backward()
    assert torch.isfinite(x1.grad).all()
    assert x1.grad[:2].abs().sum().item() == 0.0  # similar: x1 - x2 = 0; dissimilar: no direction
    # dissimilar at d = 0.5 < margin: -(margin - d) (x1 - x2) / d = -(0.5) (0, -1)
    assert x1.grad[2].tolist() == pytest.approx([0.0, 0.5])


def test_distances_neither_underflow_nor_overflow_in_float32():
    """The squares of 1e-30 underflow and of 1e30 overflow in float32: a naive norm gives d = 0
    (no direction: dissimilar gradient 0) or inf."""
    d = 4
    tiny = torch.full((1, d), 1e-30, requires_grad=True)
    drlim_pairs(tiny, torch.zeros(1, d), torch.tensor([0]), margin=2.0).backward()
    # -(margin - d) * unit vector, unit = (1, 1, 1, 1) / 2
    assert tiny.grad[0].tolist() == pytest.approx([-1.0] * d, rel=1e-6)
    huge = torch.full((2, d), 1e30)
    assert alignment(huge, -huge, alpha=1).item() == pytest.approx(4e30, rel=1e-6)
    # cosine of huge vectors (below ||v|| = 1e-8 the norm is floored, as in F.cosine_similarity)
    assert simsiam(huge, -huge, -huge, huge).item() == pytest.approx(-1.0, abs=1e-6)
    assert byol(huge, -huge, -huge, huge).item() == 0.0


def test_cosine_of_a_zero_row_is_zero_with_a_finite_gradient():
    p = torch.zeros(2, 3, requires_grad=True)
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    loss = simsiam(p, p, z, z, reduction="none")
    assert loss.tolist() == [0.0, 0.0]
    loss.sum().backward()
    # d/dp of -(p . z^) / (2 max(||p||, 1e-8)) at p = 0, from both directions: -z^ / 1e-8
    torch.testing.assert_close(p.grad, -torch.eye(3)[:2] / 1e-8)


# ----------------------------------------------------------------------------------------------
# NaN inputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", PER_SAMPLE)
def test_nan_stays_in_its_row(loss):
    gen = torch.Generator().manual_seed(9)
    inputs, grads = _make_inputs(loss, 6, 4, gen)
    for poisoned in grads + [k for k in inputs if k not in grads and inputs[k].is_floating_point()]:
        args = {k: (v.float().clone() if v.is_floating_point() else v) for k, v in inputs.items()}
        args[poisoned][2, 1] = float("nan")
        for k in grads:
            args[k].requires_grad_(True)
        out = OURS[loss](**args, reduction="none")
        assert torch.isnan(out[2]), f"{loss}: NaN in {poisoned} row 2 did not reach loss_2"
        keep = [0, 1, 3, 4, 5]
        assert torch.isfinite(out[keep]).all(), f"{loss}: NaN in {poisoned} row 2 leaked into other rows"
        gs = torch.autograd.grad(out.sum(), [args[k] for k in grads])
        for k, g in zip(grads, gs):
            assert torch.isfinite(g[keep]).all(), f"{loss}: NaN leaked into d/d{k} of other rows"
        if poisoned in grads:
            assert torch.isnan(gs[grads.index(poisoned)][2]).any()
        assert torch.isnan(OURS[loss](**args, reduction="mean"))


@pytest.mark.parametrize("loss", BATCH)
def test_nan_gives_nan_batch_losses(loss):
    gen = torch.Generator().manual_seed(10)
    inputs, grads = _make_inputs(loss, 8, 5, gen)
    for poisoned in grads:
        args = {k: v.float().clone() for k, v in inputs.items()}
        args[poisoned][3, 2] = float("nan")
        for k in grads:
            args[k].requires_grad_(True)
        out = OURS[loss](**args)
        assert torch.isnan(out)
        g = torch.autograd.grad(out, [args[poisoned]])[0]
        assert torch.isnan(g[:, 2]).all(), "the NaN column's gradient must be NaN"


# ----------------------------------------------------------------------------------------------
# Autocast, modules
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", list(OURS))
def test_autocast_does_not_change_the_result(loss):
    gen = torch.Generator().manual_seed(12)
    inputs, grads = _make_inputs(loss, 33, 40, gen)

    def run(autocast):
        args = {k: (v.float().clone() if v.is_floating_point() else v) for k, v in inputs.items()}
        for k in grads:
            args[k].requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = OURS[loss](**args)
        return out, torch.autograd.grad(out, [args[k] for k in grads])

    plain, plain_grads = run(False)
    cast, cast_grads = run(True)
    assert cast.dtype == torch.float32
    assert torch.equal(plain, cast)
    for a, b in zip(plain_grads, cast_grads):
        assert torch.equal(a, b)


def test_modules_match_functions():
    gen = torch.Generator().manual_seed(13)
    z1, z2 = _views(17, 9, gen)
    z1, z2 = z1.float(), z2.float()
    p1, p2 = z2 + 0.1, z1 - 0.2
    sim = torch.arange(17) % 3 == 0
    assert torch.equal(BarlowTwinsLoss(lambd=0.2)(z1, z2), barlow_twins(z1, z2, lambd=0.2))
    assert torch.equal(VICRegLoss(sim=1.0, var=2.0, cov=3.0)(z1, z2), vicreg(z1, z2, sim=1.0, var=2.0, cov=3.0))
    assert torch.equal(SimSiamLoss(reduction="none")(p1, p2, z1, z2), simsiam(p1, p2, z1, z2, reduction="none"))
    assert torch.equal(BYOLLoss(reduction="sum")(p1, p2, z1, z2), byol(p1, p2, z1, z2, reduction="sum"))
    assert torch.equal(
        DrLIMPairsLoss(margin=2.0, reduction="none")(z1, z2, sim),
        drlim_pairs(z1, z2, sim, margin=2.0, reduction="none"),
    )
    assert torch.equal(AlignmentLoss(alpha=3.0)(z1, z2), alignment(z1, z2, alpha=3.0))
    assert "lambd=0.2" in repr(BarlowTwinsLoss(lambd=0.2))


def test_float64_inputs_give_float64_losses_without_extra_rounding():
    gen = torch.Generator().manual_seed(14)
    z1, z2 = _views(12, 5, gen)
    assert barlow_twins(z1, z2).dtype == torch.float64
    assert barlow_twins(z1, z2).item() == pytest.approx(barlow_ref(z1, z2).item(), rel=1e-13)
    assert vicreg(z1, z2).item() == pytest.approx(vicreg_ref(z1, z2).item(), rel=1e-13)


def test_large_batch_is_linear_in_n():
    """N = 65536 (an N x N float32 matrix would be 17 GB): every loss, forward and backward, in
    well under a second when nothing quadratic in N is formed; 30 s leaves room for a busy machine."""
    gen = torch.Generator().manual_seed(15)
    n, d = 65536, 8
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    y = torch.randn(n, d, generator=gen)
    similar = torch.rand(n, generator=gen) < 0.5
    start = time.perf_counter()
    total = simsiam(x, x, y, y) + byol(x, x, y, y) + alignment(x, y) + drlim_pairs(x, y, similar)
    total = total + barlow_twins(x, y) + vicreg(x, y)
    total.backward()
    assert torch.isfinite(x.grad).all()
    assert time.perf_counter() - start < 30.0


# ----------------------------------------------------------------------------------------------
# Validation: the right exception, naming the argument
# ----------------------------------------------------------------------------------------------
def _x(n=6, d=4, dtype=torch.float32, device="cpu"):
    return torch.randn(n, d, dtype=dtype, device=device)


def _drlim(similar, **kw):
    return drlim_pairs(_x(), _x(), similar, **kw)


def _validation_cases():
    c = []

    def add(name, thunk, exc, pattern):
        c.append(pytest.param(thunk, exc, pattern, id=name))

    for lname, fn in [("barlow", barlow_twins), ("vicreg", vicreg), ("alignment", alignment)]:
        a, b = ("x", "y") if lname == "alignment" else ("z1", "z2")
        add(f"{lname}-N-mismatch", lambda fn=fn: fn(_x(), _x(n=7)), ValueError, rf"\b{b}\b.*rows")
        add(f"{lname}-D-mismatch", lambda fn=fn: fn(_x(), _x(d=5)), ValueError, rf"\b{b}\b.*D=5")
        add(f"{lname}-dtype", lambda fn=fn: fn(_x(), _x(dtype=torch.float16)), TypeError, rf"\b{b}\b.*float16")
        add(f"{lname}-device", lambda fn=fn: fn(_x(), _x(device="meta")), ValueError, rf"\b{b}\b.*meta")
        add(f"{lname}-1d", lambda fn=fn: fn(torch.randn(4), _x()), ValueError, rf"\b{a}\b.*\(N, D\)")
        add(f"{lname}-int", lambda fn=fn: fn(_x().long(), _x().long()), TypeError, rf"\b{a}\b.*int64")
        add(f"{lname}-not-tensor", lambda fn=fn: fn([[1.0]], _x()), TypeError, rf"\b{a}\b.*list")
        add(f"{lname}-empty", lambda fn=fn: fn(_x(n=0), _x(n=0)), ValueError, rf"\b{a}\b")
    for lname, fn in [("barlow", barlow_twins), ("vicreg", vicreg)]:
        add(f"{lname}-N=1", lambda fn=fn: fn(_x(n=1), _x(n=1)), ValueError, r"\bz1\b has 1 row.*at least 2 rows")
    for bad in (-1.0, math.inf, math.nan):
        add(f"barlow-lambd={bad}", lambda bad=bad: barlow_twins(_x(), _x(), lambd=bad), ValueError, r"\blambd\b.*>= 0")
        for coef in ("sim", "var", "cov"):
            add(
                f"vicreg-{coef}={bad}", lambda coef=coef, bad=bad: vicreg(_x(), _x(), **{coef: bad}), ValueError,
                rf"\b{coef}\b.*>= 0",
            )  # fmt: skip
    for bad in (0.0, -1.0, math.inf, math.nan):
        add(f"drlim-margin={bad}", lambda bad=bad: _drlim(torch.ones(6), margin=bad), ValueError, r"\bmargin\b.*> 0")
        add(f"alignment-alpha={bad}", lambda bad=bad: alignment(_x(), _x(), alpha=bad), ValueError, r"\balpha\b.*> 0")
    add("barlow-lambd-str", lambda: barlow_twins(_x(), _x(), lambd="0.1"), TypeError, r"\blambd\b.*str")
    add("alignment-alpha-bool", lambda: alignment(_x(), _x(), alpha=True), TypeError, r"\balpha\b.*bool")
    add("alignment-alpha-tensor", lambda: alignment(_x(), _x(), alpha=torch.tensor(2.0)), TypeError, r"\balpha\b.*Tens")
    # four-input losses: each argument named
    for lname, fn, names in [("simsiam", simsiam, ("p1", "p2", "z1", "z2")), ("byol", byol, ("p1", "p2", "t1", "t2"))]:
        for i, name in enumerate(names):
            def thunk(fn=fn, i=i):
                args = [_x(), _x(), _x(), _x()]
                args[i] = _x(d=5)
                return fn(*args)

            add(f"{lname}-{name}-D", thunk, ValueError, rf"\b{name}\b")

            def thunk_dtype(fn=fn, i=i):
                args = [_x(), _x(), _x(), _x()]
                args[i] = _x(dtype=torch.float64)
                return fn(*args)

            add(f"{lname}-{name}-dtype", thunk_dtype, TypeError, rf"\b{name}\b")
        add(f"{lname}-reduction", lambda fn=fn: fn(_x(), _x(), _x(), _x(), reduction="avg"), ValueError, "'avg'")
    add("drlim-reduction", lambda: _drlim(torch.ones(6), reduction="max"), ValueError, r"reduction='max'")
    add("alignment-reduction", lambda: alignment(_x(), _x(), reduction=None), ValueError, r"reduction=None")
    # similar
    nan = float("nan")
    add("similar-list", lambda: _drlim([1, 0, 1, 0, 1, 0]), TypeError, r"\bsimilar\b.*list")
    add("similar-2d", lambda: _drlim(torch.ones(6, 1)), ValueError, r"\bsimilar\b.*\(6,\).*\(6, 1\)")
    add("similar-length", lambda: _drlim(torch.ones(7)), ValueError, r"\bsimilar\b.*\(6,\).*\(7,\)")
    add("similar-value-2", lambda: _drlim(torch.tensor([0, 1, 2, 0, 1, 0])), ValueError, r"\bsimilar\b.* 2 at index 2")
    add("similar-value-half", lambda: _drlim(torch.full((6,), 0.5)), ValueError, r"\bsimilar\b.*0\.5.*index 0")
    add("similar-value-nan", lambda: _drlim(torch.tensor([0.0, 1, 1, 0, nan, 1])), ValueError, r"similar.*nan.*index 4")
    add("similar-value-neg", lambda: _drlim(torch.tensor([0, -1, 1, 0, 1, 1])), ValueError, r"\bsimilar\b.*-1")
    add("similar-complex", lambda: _drlim(torch.ones(6, dtype=torch.complex64)), TypeError, r"\bsimilar\b.*complex")
    add("similar-device", lambda: _drlim(torch.ones(6, device="meta")), ValueError, r"\bsimilar\b.*meta")
    # modules validate at construction
    add("module-barlow", lambda: BarlowTwinsLoss(lambd=-0.1), ValueError, r"\blambd\b")
    add("module-vicreg", lambda: VICRegLoss(cov=-1.0), ValueError, r"\bcov\b")
    add("module-drlim", lambda: DrLIMPairsLoss(margin=0.0), ValueError, r"\bmargin\b")
    add("module-alignment", lambda: AlignmentLoss(alpha=-2.0), ValueError, r"\balpha\b")
    add("module-simsiam", lambda: SimSiamLoss(reduction="avg"), ValueError, r"reduction")
    add("module-byol", lambda: BYOLLoss(reduction="avg"), ValueError, r"reduction")
    return c


@pytest.mark.parametrize("thunk,exc,pattern", _validation_cases())
def test_validation(thunk, exc, pattern):
    with pytest.raises(exc, match=pattern):
        thunk()


@pytest.mark.parametrize(
    "similar",
    [
        torch.tensor([True, False, True, False, True, False]),
        torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.uint8),
        torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.int64),
        torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]),
        torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float16),
    ],
    ids=["bool", "uint8", "int64", "float32", "float16"],
)
def test_similar_accepted_dtypes_agree(similar):
    gen = torch.Generator().manual_seed(16)
    x1, x2 = (t.float() for t in _close_pairs(6, 4, gen))
    expected = drlim_ref(x1.double(), x2.double(), torch.tensor([1, 0, 1, 0, 1, 0]), reduction="none")
    got = drlim_pairs(x1, x2, similar, reduction="none")
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)


def test_traces_without_graph_breaks():
    """torch.compile(fullgraph=True) traces every loss, forward and backward through AOTAutograd
    (the "aot_eager" backend skips Inductor's code generation to keep this test fast). One graph
    holds all six, so tracing is paid once."""
    gen = torch.Generator().manual_seed(17)
    cases = [_make_inputs(loss, 9, 6, gen) for loss in OURS]
    leaves = []
    for inputs, grads in cases:
        for k, v in inputs.items():
            if v.is_floating_point():
                inputs[k] = v.float().requires_grad_(k in grads)
        leaves += [inputs[k] for k in grads]

    def all_losses(cases):
        return torch.stack([OURS[loss](**inputs) for loss, (inputs, _) in zip(OURS, cases)])

    torch._dynamo.reset()
    out = torch.compile(all_losses, fullgraph=True, backend="aot_eager")(cases)
    expected = all_losses(cases)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(expected.sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
