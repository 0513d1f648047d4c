"""The metric-learning losses of the engine: NCA, the multi-class N-pair loss and uniformity.

Held against float64 references written from the papers' definitions (``tests/reference.py``):
NCA (Goldberger et al. 2004) and uniformity (Wang and Isola 2020) from explicit differences
x_i - x_j, not from the dot-product expansion the engine uses; N-pair (Sohn 2016) in its
log(1 + sum exp) form with the l2 regulariser over the 2N embeddings. Loss and every gradient
(embeddings, and the scale / t parameters), every backend, every dtype, through
``reference.check_loss`` (random upstream gradient, outputs poisoned with NaN).

Also against pytorch-metric-learning's NCALoss and NPairsLoss when it is installed, with their
conventions spelled out where they differ from ours.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import csrc_triton
from csrc_triton._testing import blockwise_rows, poison_outputs

from reference import check_loss, n_pair_ref, nca_ref, uniformity_ref
from reference import param_id as _id

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU_BACKENDS = ["dense", "blockwise"]
CPU_SHAPES = [(2, 3), (9, 1), (40, 33), (129, 70)]
# Triton through the interpreter: a tiny float32 case, a 16-bit one over a few tiles, and a
# 130 x 70 multi-tile case (16 x 16 tiles, ragged edges).
TRITON_CASES = [(torch.float32, (9, 1)), (torch.float16, (37, 33)), (torch.bfloat16, (130, 70))]


def _cases(cpu_shapes=CPU_SHAPES, triton_cases=TRITON_CASES):
    out = [pytest.param(b, dt, s, id=f"{b}-{_id(dt)}-{_id(s)}") for b in CPU_BACKENDS for dt in DTYPES
           for s in cpu_shapes]
    out += [pytest.param("triton", dt, s, id=f"triton-{_id(dt)}-{_id(s)}") for dt, s in triton_cases]
    return out


def _labels(n, seed=3):
    """About n / 3 classes, and (for n >= 4) a singleton: an anchor without a positive."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, max(1, n // 3), (n,), generator=g)
    if n >= 4:
        labels[-1] = 10_000
    labels[0] = labels[1]  # at least one positive pair
    return labels


def _points(n, d, dtype, norm=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return (norm * x / x.norm(dim=1, keepdim=True) * (1 + 0.1 * torch.rand(n, 1, generator=g))).to(dtype)


# ----------------------------------------------------------------------------------------------
# NCA
# ----------------------------------------------------------------------------------------------
def _nca_impl(backend, **opts):
    def f(embeddings, labels, scale):
        return csrc_triton.nca(embeddings, labels, scale=scale, backend=backend, **opts)

    return f


def _nca_ref(**opts):
    def f(embeddings, labels, scale):
        return nca_ref(embeddings, labels, scale, **opts)

    return f


@pytest.mark.parametrize("backend,dtype,shape", _cases())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nca(backend, dtype, shape, reduction):
    if backend == "triton" and reduction == "none" and shape[0] > 100:
        pytest.skip("interpreter time: 'none' is covered by the smaller triton cases")
    n, d = shape
    x = _points(n, d, dtype)
    labels = _labels(n)
    args = dict(embeddings=x, labels=labels, scale=torch.tensor(1.3))
    out = check_loss(_nca_impl(backend, reduction=reduction), _nca_ref(reduction=reduction), args,
                     ["embeddings", "scale"], dtype)
    if reduction == "none":
        assert out.shape == (n,)
        without = (labels[:, None] == labels[None, :]).sum(dim=1) == 1
        assert (out[without] == 0).all(), "an anchor without a positive must give exactly 0"


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_nca_normalized_sum_float_scale(backend, dtype):
    if backend == "triton" and dtype != torch.bfloat16:
        pytest.skip("interpreter time: one triton case")
    n, d = (23, 17) if backend == "triton" else (61, 17)
    x = (3.0 * torch.randn(n, d)).to(dtype)  # normalize=True: the norms must not matter
    args = dict(embeddings=x, labels=_labels(n), scale=4.0)
    # the normalised rows are rounded to the input dtype before the tiles: the dtype's rule
    check_loss(_nca_impl(backend, normalize=True, reduction="sum"), _nca_ref(normalize=True, reduction="sum"),
               args, ["embeddings"], dtype, accumulated=False, normalized=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_nca_large_norms_do_not_overflow(backend, dtype):
    """|x| ~ 30: squared distances ~ 1800, so exp(-s d) underflows to 0 for every pair in any
    float format; the loss needs the log-sum-exp shift. Finite, and as accurate as float32."""
    if backend == "triton" and dtype == torch.float32:
        pytest.skip("interpreter time: one triton case")
    n, d = (20, 8) if backend == "triton" else (50, 8)
    x = _points(n, d, dtype, norm=30.0, seed=5)
    labels = _labels(n)
    args = dict(embeddings=x, labels=labels, scale=torch.tensor(1.0))
    out = check_loss(_nca_impl(backend, reduction="none"), _nca_ref(reduction="none"), args, ["embeddings", "scale"],
                     dtype)
    assert torch.isfinite(out).all()
    assert out.max() > 50  # genuinely far positives: a naive exp() would have given log(0)


def test_nca_anchors_without_positive_are_left_out():
    """An anchor whose label no one else has adds nothing to the mean, but stays a negative."""
    x = torch.randn(9, 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3])
    extra = torch.randn(1, 5, dtype=torch.float64)
    base = csrc_triton.nca(x, labels, backend="blockwise", reduction="none")
    more = csrc_triton.nca(torch.cat([x, extra]), torch.cat([labels, torch.tensor([9])]), backend="blockwise",
                           reduction="none")
    assert more[-1] == 0
    assert (more[:-1] > base).all()  # one more negative in every denominator
    mean = csrc_triton.nca(torch.cat([x, extra]), torch.cat([labels, torch.tensor([9])]), backend="blockwise")
    torch.testing.assert_close(mean, more[:-1].mean(), rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------------------------
# N-pair
# ----------------------------------------------------------------------------------------------
def _n_pair_impl(backend, l2_reg):
    def f(anchors, positives):
        return csrc_triton.n_pair(anchors, positives, l2_reg=l2_reg, backend=backend)

    return f


def _n_pair_ref(l2_reg):
    def f(anchors, positives):
        return n_pair_ref(anchors, positives, l2_reg)

    return f


@pytest.mark.parametrize("backend,dtype,shape", _cases([(1, 3), (9, 1), (40, 33), (129, 70)]))
@pytest.mark.parametrize("l2_reg", [0.0, 0.25])
def test_n_pair(backend, dtype, shape, l2_reg):
    if backend == "triton" and l2_reg == 0.0 and shape[0] > 100:
        pytest.skip("interpreter time")
    n, d = shape
    a = _points(n, d, dtype, norm=2.0, seed=1)
    p = (0.7 * a.float() + 0.5 * _points(n, d, torch.float32, seed=2)).to(dtype)
    check_loss(_n_pair_impl(backend, l2_reg), _n_pair_ref(l2_reg), dict(anchors=a, positives=p),
               ["anchors", "positives"], dtype)


def test_n_pair_default_l2_reg():
    a, p = torch.randn(12, 6, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)
    torch.testing.assert_close(csrc_triton.n_pair(a, p), n_pair_ref(a, p, 0.002), rtol=1e-13, atol=0)


# ----------------------------------------------------------------------------------------------
# Uniformity
# ----------------------------------------------------------------------------------------------
def _uniformity_impl(backend):
    def f(x, t):
        return csrc_triton.uniformity(x, t=t, backend=backend)

    return f


def _uniformity_ref(x, t):
    return uniformity_ref(x, t)


@pytest.mark.parametrize("backend,dtype,shape", _cases())
def test_uniformity(backend, dtype, shape):
    n, d = shape
    x = _points(n, d, dtype, seed=4)
    check_loss(_uniformity_impl(backend), _uniformity_ref, dict(x=x, t=torch.tensor(2.0)), ["x", "t"], dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
def test_uniformity_concentrated_embeddings_16bit(backend, dtype):
    """Nearly collapsed unit embeddings (the case uniformity exists to detect): the gradient
    2t sum_j w_ij (x_j - x_i) is small next to its parts 2t w_ij x_j and 2t w_ij x_i, so those
    parts must cancel in float32 before the one rounding to the 16-bit dtype."""
    g = torch.Generator().manual_seed(12)
    x = F.normalize(torch.randn(1, 64, generator=g) + 0.02 * torch.randn(64, 64, generator=g), dim=1).to(dtype)
    check_loss(_uniformity_impl(backend), _uniformity_ref, dict(x=x, t=torch.tensor(2.0)), ["x", "t"], dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_uniformity_float_t_and_known_value(backend):
    """Two antipodal unit points: uniformity = log exp(-t * 4) = -4t; float t."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    torch.testing.assert_close(csrc_triton.uniformity(x, t=0.75, backend=backend), torch.tensor(-3.0),
                               rtol=1e-6, atol=1e-6)
    x = _points(31, 5, torch.float32, seed=9)
    check_loss(_uniformity_impl(backend), _uniformity_ref, dict(x=x, t=3.5), ["x"], torch.float32)


# ----------------------------------------------------------------------------------------------
# Many blocks, deterministic, float64 against the reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=_id)
def test_blockwise_many_blocks(dtype):
    n, d = 23, 7
    x = _points(n, d, dtype)
    y = _points(n, d, dtype, seed=8)
    with blockwise_rows(5):
        check_loss(_nca_impl("blockwise", reduction="none"), _nca_ref(reduction="none"),
                   dict(embeddings=x, labels=_labels(n), scale=torch.tensor(2.0)), ["embeddings", "scale"], dtype)
        check_loss(_n_pair_impl("blockwise", 0.1), _n_pair_ref(0.1), dict(anchors=x, positives=y),
                   ["anchors", "positives"], dtype)
        check_loss(_uniformity_impl("blockwise"), _uniformity_ref, dict(x=x, t=torch.tensor(2.0)), ["x", "t"], dtype)


@pytest.mark.parametrize("backend", ["blockwise", "triton"])
def test_deterministic_is_bitwise_reproducible(backend):
    n, d = 24, 9
    x, y = _points(n, d, torch.float32), _points(n, d, torch.float32, seed=6)
    labels = _labels(n)
    runs = []
    for _ in range(2):
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        s = torch.tensor(1.5, requires_grad=True)
        total = (csrc_triton.nca(xs, labels, scale=s, backend=backend, deterministic=True)
                 + csrc_triton.n_pair(xs, ys, backend=backend, deterministic=True)
                 + csrc_triton.uniformity(ys, t=s, backend=backend, deterministic=True))
        runs.append([total.detach(), *torch.autograd.grad(total, [xs, ys, s])])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# NaN
# ----------------------------------------------------------------------------------------------
# NCA: x_i enters every row's denominator (a distance to every other point): one NaN feature
#   makes every kept anchor's loss and every gradient NaN; anchors without a positive are 0
#   by definition ("none"), NaN or not.
# uniformity: every pair: loss and every gradient NaN.
# N-pair, NaN in anchor i: only row i of the similarity matrix a p^T: loss NaN, d anchors_i
#   NaN, d anchors_r (r != i) finite, every d positives_j NaN (row i's softmax reaches them).
#   NaN in positive i: column i in every row: everything NaN.
ROW = 2


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
def test_nan_nca_and_uniformity(backend):
    n, d = 8, 5
    x = _points(n, d, torch.float32)
    x[ROW, 1] = math.nan
    labels = _labels(n)
    without = (labels[:, None] == labels[None, :]).sum(dim=1) == 1
    assert without.any() and (~without).any()
    xs = x.clone().requires_grad_()
    s = torch.tensor(1.0, requires_grad=True)
    with poison_outputs():
        per = csrc_triton.nca(xs, labels, scale=s, reduction="none", backend=backend)
        assert torch.isnan(per[~without]).all() and (per[without] == 0).all(), per
        dx, ds = torch.autograd.grad(per.sum(), [xs, s])
        assert torch.isnan(dx).all() and torch.isnan(ds)
        u = csrc_triton.uniformity(xs, t=s, backend=backend)
        dx, ds = torch.autograd.grad(u, [xs, s])
    assert torch.isnan(u) and torch.isnan(dx).all() and torch.isnan(ds)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("where", ["anchors", "positives"])
def test_nan_n_pair(backend, where):
    n, d = 7, 5
    inputs = {"anchors": _points(n, d, torch.float32, seed=1), "positives": _points(n, d, torch.float32, seed=2)}
    inputs[where][ROW, 0] = math.nan
    a, p = (inputs[k].clone().requires_grad_() for k in ("anchors", "positives"))
    with poison_outputs():
        loss = csrc_triton.n_pair(a, p, l2_reg=0.1, backend=backend)
        da, dp = torch.autograd.grad(loss, [a, p])
    assert torch.isnan(loss)
    others = torch.arange(n) != ROW
    if where == "anchors":
        assert torch.isnan(da[ROW]).all() and torch.isfinite(da[others]).all()
        assert torch.isnan(dp).all()
    else:
        assert torch.isnan(da).all() and torch.isnan(dp).all()


# ----------------------------------------------------------------------------------------------
# Module forms
# ----------------------------------------------------------------------------------------------
def test_modules_match_functional():
    x, y = _points(15, 6, torch.float32), _points(15, 6, torch.float32, seed=7)
    labels = _labels(15)
    nca = csrc_triton.NCALoss(scale=2.0, reduction="sum", normalize=True, deterministic=True)
    assert isinstance(nca, torch.nn.Module)
    torch.testing.assert_close(nca(x, labels), csrc_triton.nca(x, labels, scale=2.0, reduction="sum", normalize=True),
                               rtol=0, atol=0)
    torch.testing.assert_close(nca(x, labels).double(), nca_ref(x.double(), labels, 2.0, normalize=True,
                                                                reduction="sum"), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(csrc_triton.NCALoss()(x, labels).double(), nca_ref(x.double(), labels),
                               rtol=2e-6, atol=2e-6)
    npair = csrc_triton.NPairLoss(l2_reg=0.3, backend="dense")
    torch.testing.assert_close(npair(x, y).double(), n_pair_ref(x.double(), y.double(), 0.3), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(csrc_triton.NPairLoss()(x, y).double(), n_pair_ref(x.double(), y.double()),
                               rtol=2e-6, atol=2e-6)
    t = torch.tensor(3.0, requires_grad=True)
    uni = csrc_triton.UniformityLoss(t=t)
    out = uni(x)
    torch.testing.assert_close(out.double(), uniformity_ref(x.double(), 3.0), rtol=2e-6, atol=2e-6)
    out.backward()
    assert t.grad is not None and torch.isfinite(t.grad)
    torch.testing.assert_close(csrc_triton.UniformityLoss()(x).double(), uniformity_ref(x.double(), 2.0),
                               rtol=2e-6, atol=2e-6)


# ----------------------------------------------------------------------------------------------
# pytorch-metric-learning, when installed
# ----------------------------------------------------------------------------------------------
# Conventions (pytorch-metric-learning 2.x):
# * NCALoss(softmax_scale=s): squared Euclidean distances from LpDistance(power=2), whose
#   default normalize_embeddings=True L2-normalises the rows first: our normalize=True. With
#   LpDistance(power=2, normalize_embeddings=False) it is our normalize=False. It drops every
#   anchor whose positive probability is exactly 0 after its float softmax (no positive, or
#   one that underflowed), and averages over the rest; we drop only anchors without a positive
#   and keep a finite loss for far positives (see test_nca_large_norms_do_not_overflow), so the
#   two agree only while no positive probability underflows.
# * NPairsLoss: takes one (N * 2) batch with labels, picks one anchor-positive pair per label
#   (the first occurrence: our anchors[i], positives[i] when fed cat([anchors, positives]) with
#   labels cat([arange(N), arange(N)])), similarities from DotProductSimilarity, whose default
#   normalize_embeddings=True normalises (ours does not: pass normalize_embeddings=False).
#   It has no l2 term of its own; Sohn's regulariser is its LpRegularizer(power=2) with
#   embedding_reg_weight=l2_reg (mean over the 2N embeddings of |f|^2).
def _pml():
    return pytest.importorskip("pytorch_metric_learning")


@pytest.mark.parametrize("normalize", [True, False])
def test_nca_matches_pytorch_metric_learning(normalize):
    _pml()
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import NCALoss

    n, d, s = 40, 6, 1.7
    x = torch.randn(n, d, dtype=torch.float64)
    labels = _labels(n)
    theirs_x = x.clone().requires_grad_()
    ours_x = x.clone().requires_grad_()
    pml = NCALoss(softmax_scale=s, distance=LpDistance(power=2, normalize_embeddings=normalize))
    theirs = pml(theirs_x, labels)
    ours = csrc_triton.nca(ours_x, labels, scale=s, normalize=normalize, backend="blockwise")
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours_x.grad, theirs_x.grad, rtol=1e-8, atol=1e-12)
    if normalize:  # their default distance normalises
        torch.testing.assert_close(NCALoss(softmax_scale=s)(x, labels), ours.detach(), rtol=1e-10, atol=1e-12)


def test_n_pair_matches_pytorch_metric_learning():
    _pml()
    from pytorch_metric_learning.distances import DotProductSimilarity
    from pytorch_metric_learning.losses import NPairsLoss
    from pytorch_metric_learning.regularizers import LpRegularizer

    n, d, l2 = 24, 7, 0.05
    a, p = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    both = torch.cat([a, p]).requires_grad_()
    labels = torch.cat([torch.arange(n), torch.arange(n)])
    pml = NPairsLoss(distance=DotProductSimilarity(normalize_embeddings=False),
                     embedding_regularizer=LpRegularizer(power=2), embedding_reg_weight=l2)
    theirs = pml(both, labels)
    a_ours, p_ours = a.clone().requires_grad_(), p.clone().requires_grad_()
    ours = csrc_triton.n_pair(a_ours, p_ours, l2_reg=l2, backend="blockwise")
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(torch.cat([a_ours.grad, p_ours.grad]), both.grad, rtol=1e-8, atol=1e-12)
    # without the regulariser, and their default (normalised) similarity = ours on unit rows
    unit_a, unit_p = F.normalize(a, dim=1), F.normalize(p, dim=1)
    torch.testing.assert_close(NPairsLoss()(torch.cat([a, p]), labels),
                               csrc_triton.n_pair(unit_a, unit_p, l2_reg=0.0, backend="blockwise"),
                               rtol=1e-10, atol=1e-12)
