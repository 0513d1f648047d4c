"""SigLIP's sigmoid loss (csrc_triton.siglip) on every backend against a float64 reference written
from the paper's formula (Zhai et al. 2023), not from the code under test:

    s_ij = t x_i . y_j + b,  z_ij = 2 [i == j] - 1,  row_i = -sum_j log sigmoid(z_ij s_ij)

evaluated with ``F.logsigmoid`` under autograd (its gradients are the truth). Acceptance rule
(Cut Cross-Entropy's, as tests/reference.py): elementwise |truth - ours| <= |truth - torch| + tol,
with torch the same formula in float32 for the loss and the scalar parameters' gradients (both
accumulated in float32 whatever the feature dtype) and in the input dtype for 16-bit feature
gradients; tol is about an ulp of that dtype plus the float32 accumulation error of the
elements' terms (8 eps (1 + |s|max) times sum |term|, computed in float64). Outputs poisoned
with NaN, random upstream gradients (zeros included), odd and multi-tile shapes. The process-group
cases (2 and 3 gloo processes) are in tests/test_distributed.py.
"""
from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

import csrc_triton
from csrc_triton._testing import blockwise_rows, poison_outputs

import reference as R
from reference import param_id as _id

siglip_module = importlib.import_module("csrc_triton.siglip")  # csrc_triton.siglip is the function
triton_siglip = importlib.import_module("csrc_triton.triton_siglip")

DTYPES16 = [torch.bfloat16, torch.float16]
EPS32 = torch.finfo(torch.float32).eps


def siglip_ref(x, y, t, b, reduction="mean"):
    """The paper's loss, dense, in the inputs' dtype (t, b tensors or floats)."""
    s = t * (x @ y.T) + b
    z = 2.0 * torch.eye(x.shape[0], y.shape[0], dtype=s.dtype) - 1.0
    rows = -F.logsigmoid(z * s).sum(dim=1)
    return {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]


def _pairs(n, d, dtype, seed=0):
    """L2-normalised image/text pairs (as SigLIP feeds them), captions correlated with images."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(x + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return x.to(dtype), y.to(dtype)


def _magnitudes(x, y, t, b, up, reduction):
    """Sums of |terms| of every output (float64): the scale of its float32 rounding error."""
    x, y = x.double(), y.double()
    t, b = float(t), float(b)
    dot = x @ y.T
    s = t * dot + b
    z = 2.0 * torch.eye(x.shape[0], y.shape[0], dtype=s.dtype) - 1.0
    n = x.shape[0]
    if reduction == "none":
        u = up.double()
    else:
        u = torch.full((n,), float(up) / (n if reduction == "mean" else 1), dtype=torch.float64)
    g = (torch.sigmoid(-z * s) * u[:, None]).abs()  # |G|
    per_row = (s.abs() + math.log(2.0)).sum(1)  # |softplus(v)| <= |v| + log 2
    loss = {"mean": per_row.sum() / n, "sum": per_row.sum(), "none": per_row}[reduction]
    return dict(loss=loss, dx=abs(t) * g @ y.abs(), dy=abs(t) * g.T @ x.abs(), dt=(g * dot.abs()).sum(),
                db=g.sum(), logit=s.abs().max().item())


def check_siglip(backend, dtype, n, d, *, reduction="none", t=10.0, b=-3.0, deterministic=False, seed=0,
                 grads=("x", "y", "t", "b")):
    """Loss and the requested gradients against the float64 truth (module docstring's rule)."""
    x, y = _pairs(n, d, dtype, seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def leaves(cast):
        lx = cast(x).clone().requires_grad_("x" in grads)
        ly = cast(y).clone().requires_grad_("y" in grads)
        pt = torch.tensor(t, dtype=acc if cast(x).dtype != torch.float64 else torch.float64,
                          requires_grad="t" in grads)
        pb = torch.tensor(b, dtype=pt.dtype, requires_grad="b" in grads)
        return lx, ly, pt, pb

    def grad_of(out, tensors, up):
        names = [name for name in ("x", "y", "t", "b") if name in grads]
        got = torch.autograd.grad(out, [tensors[name] for name in names], up.to(out.dtype))
        return dict(zip(names, got))

    shape = (n,) if reduction == "none" else ()
    up = R.upstream(shape, seed + 7)
    truth_in = dict(zip("xytb", leaves(lambda v: v.double())))
    truth = siglip_ref(*truth_in.values(), reduction=reduction)
    truth_g = grad_of(truth, truth_in, up)
    low_in = dict(zip("xytb", leaves(lambda v: v)))  # torch in the input dtype (t, b float32)
    low = siglip_ref(low_in["x"], low_in["y"], low_in["t"].to(dtype), low_in["b"].to(dtype), reduction=reduction)
    low_g = grad_of(low, low_in, up)
    low32_in = dict(zip("xytb", leaves(lambda v: v.float() if v.dtype != torch.float64 else v)))
    low32 = siglip_ref(*low32_in.values(), reduction=reduction)
    low32_g = grad_of(low32, low32_in, up)

    ours_in = dict(zip("xytb", leaves(lambda v: v)))
    with poison_outputs():
        out = csrc_triton.siglip(*ours_in.values(), reduction=reduction, backend=backend, deterministic=deterministic)
        ours_g = grad_of(out, ours_in, up)
    assert out.dtype == acc and out.shape == shape

    mag = _magnitudes(x, y, t, b, up, reduction)
    eps = torch.finfo(acc).eps
    k = 8 * eps * (1 + mag["logit"])  # float32 sums of terms that each carry eps |s| relative error
    value_rule = torch.float64 if dtype == torch.float64 else torch.float32
    R.assert_no_worse_than_torch("loss", out, truth, low32, value_rule, floor=k * mag["loss"])
    for name in grads:
        o, want = ours_g[name], truth_g[name]
        assert o.dtype == ours_in[name].dtype, f"d/d{name} has dtype {o.dtype}"
        floor = k * mag["d" + name]
        if name in ("t", "b") or dtype in (torch.float32, torch.float64):
            R.assert_no_worse_than_torch(f"d loss/d {name}", o, want, low32_g[name], value_rule, floor=floor)
        else:
            R.assert_no_worse_than_torch(f"d loss/d {name}", o, want, low_g[name], dtype, floor=floor)
    return out, ours_g


# ----------------------------------------------------------------------------------------------
# Accuracy: every backend, dtype, odd and multi-tile shapes
# ----------------------------------------------------------------------------------------------
CPU_SHAPES = [(1, 3), (7, 33), (67, 129)]


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=_id)
@pytest.mark.parametrize("backend", ["dense", "blockwise"])
def test_cpu_backends(backend, dtype, shape):
    with blockwise_rows(16, 24):  # many blockwise tiles, ragged at the edges
        check_siglip(backend, dtype, *shape)


# Triton through the interpreter (16 x 16 tiles, D in chunks of 32, output chunks of 64 (32
# wide)): a single row; 16-bit over a few tiles; multi-tile narrow D (one output chunk, fused
# kernel); D = 100 (two output chunks, recomputed per chunk); D = 129 > 2 x 64 (the wide form);
# each deterministic as well as not where the kernels differ.
TRITON_CASES = [
    (torch.float32, (1, 3), "none", False),
    (torch.float16, (7, 33), "none", True),
    (torch.bfloat16, (67, 33), "none", False),
    (torch.bfloat16, (37, 100), "mean", False),
    (torch.float32, (37, 100), "sum", True),
    (torch.float32, (20, 129), "none", False),
    (torch.float16, (20, 129), "mean", True),
]


@pytest.mark.parametrize("dtype,shape,reduction,deterministic", TRITON_CASES,
                         ids=[f"{_id(c[0])}-{_id(c[1])}-{c[2]}-det{int(c[3])}" for c in TRITON_CASES])
def test_triton(dtype, shape, reduction, deterministic):
    check_siglip("triton", dtype, *shape, reduction=reduction, deterministic=deterministic)


@pytest.mark.parametrize("backend", ["dense", "blockwise", "triton"])
@pytest.mark.parametrize("grads", [("x",), ("y",), ("t", "b"), ("y", "b")], ids="".join)
def test_gradient_subsets(backend, grads):
    """Only the requested gradients: each kernel path that skips dx or dy (and its buffers)."""
    check_siglip(backend, torch.float32, 21, 40, grads=grads, deterministic=backend == "triton" and "x" in grads)


@pytest.mark.parametrize("backend", ["dense", "blockwise", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(backend, reduction):
    check_siglip(backend, torch.float32, 13, 20, reduction=reduction)


@pytest.mark.parametrize("backend", ["dense", "blockwise", "triton"])
def test_saturated_terms_keep_relative_accuracy(backend):
    """A near-perfect model: orthonormal pairs, t = 40, b = -20, every s_ij = +-20, every term
    softplus(-20) = 2.06e-9. log(1 + e) in float32 would give 0 for each (e < 2^-24); the loss
    and its gradients must keep their relative accuracy."""
    n = 16
    x = torch.eye(n, 24)
    t, b = torch.tensor(40.0, requires_grad=True), torch.tensor(-20.0, requires_grad=True)
    xs, ys = x.clone().requires_grad_(), x.clone().requires_grad_()
    with poison_outputs():
        loss = csrc_triton.siglip(xs, ys, t, b, backend=backend)
        gx, gt, gb = torch.autograd.grad(loss, [xs, t, b])
    term = math.log1p(math.exp(-20.0))
    assert abs(loss.item() - n * term) <= 1e-6 * n * term, (loss.item(), n * term)
    sig = 1.0 / (1.0 + math.exp(20.0))  # sigmoid(-20): each |G_ij| N
    # db = sum_ij G_ij: the N positives pull down (-sig), the N^2 - N negatives up (+sig)
    assert abs(gb.item() - (n * n - 2 * n) * sig / n) <= 1e-5 * n * sig
    # dt = sum_ij G_ij x_i.y_j: only the positives have x_i.y_j = 1
    assert abs(gt.item() - (-n * sig / n)) <= 1e-5 * sig
    want = torch.zeros_like(x)  # dx_i = t sum_j G_ij y_j = t G_i. (y_j = e_j): -sig/N on i, +sig/N off it
    want[:, :n] = 40.0 * sig / n * (1.0 - 2.0 * torch.eye(n))
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=0.0)


# ----------------------------------------------------------------------------------------------
# Scale and bias: floats, tensors with and without requires_grad
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["blockwise", "triton"])
def test_scale_and_bias_as_floats_and_tensors(backend):
    x, y = _pairs(9, 12, torch.float32)
    truth = siglip_ref(x.double(), y.double(), 7.5, -2.25)
    variants = [(7.5, -2.25), (torch.tensor(7.5), torch.tensor(-2.25)), (torch.tensor([7.5]), torch.tensor([[-2.25]])),
                (torch.tensor(7.5, dtype=torch.float64), -2.25), (7.5, torch.tensor(-2.25, requires_grad=True)),
                (torch.tensor(7.5, requires_grad=True), torch.tensor(-2.25, requires_grad=True))]
    for t, b in variants:
        xs = x.clone().requires_grad_()
        out = csrc_triton.siglip(xs, y, t, b, backend=backend)
        torch.testing.assert_close(out.double(), truth, rtol=2e-6, atol=0.0)
        out.backward()
        assert xs.grad is not None and torch.isfinite(xs.grad).all()
        for p in (t, b):
            if isinstance(p, torch.Tensor):
                assert (p.grad is not None) == p.requires_grad
                if p.requires_grad:
                    assert p.grad.shape == p.shape and p.grad.dtype == p.dtype


def test_learnable_log_scale_gets_its_gradient():
    """The DualEncoder pattern: t = exp(t') with t' a parameter, b a parameter."""
    x, y = _pairs(11, 8, torch.float32)
    t_prime = torch.tensor(math.log(10.0), requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    csrc_triton.SigLipLoss()(x, y, t_prime.exp(), b).backward()
    tp64, b64 = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True), \
        torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    siglip_ref(x.double(), y.double(), tp64.exp(), b64).backward()
    torch.testing.assert_close(t_prime.grad.double(), tp64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# NaN where the maths puts it
# ----------------------------------------------------------------------------------------------
# s_ij involves x_i and y_j only. NaN in x_i: row i's loss, dx_i, every dy_j (row i's G reaches
# every text), dt and db are NaN; other rows' losses and dx stay finite. NaN in y_j: column j
# enters every row: every loss, every dx_i, dy_j, dt, db NaN; dy_r (r != j) finite.
@pytest.mark.parametrize("backend", ["dense", "blockwise", "triton"])
@pytest.mark.parametrize("where", ["x", "y"])
def test_nan_propagation(backend, where):
    n, row = 7, 2
    x, y = _pairs(n, 6, torch.float32)
    (x if where == "x" else y)[row, 3] = math.nan
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    t, b = torch.tensor(5.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    with poison_outputs():
        out = csrc_triton.siglip(xs, ys, t, b, reduction="none", backend=backend)
        gx, gy, gt, gb = torch.autograd.grad(out.sum(), [xs, ys, t, b])
    others = torch.arange(n) != row
    assert gt.isnan() and gb.isnan()
    if where == "x":
        assert out[row].isnan() and torch.isfinite(out[others]).all(), out
        assert gx[row].isnan().all() and torch.isfinite(gx[others]).all()
        assert gy.isnan().all()
    else:
        assert out.isnan().all() and gx.isnan().all()
        assert gy[row].isnan().all() and torch.isfinite(gy[others]).all()
    mean = csrc_triton.siglip(x, y, 5.0, -1.0, backend=backend)
    assert mean.isnan()


# ----------------------------------------------------------------------------------------------
# deterministic=
# ----------------------------------------------------------------------------------------------
def test_deterministic_plan_has_no_atomics():
    """deterministic=True: no launch adds floating-point values atomically (no "cols" launch with
    dx, no dy in atomic mode), for every shape class and request."""
    config = triton_siglip.BackwardConfig(block_m=64, block_n=64, block_d=64, block_do=128, num_warps=8,
                                          num_stages=3, block_do_wide=64)
    for n, m, d in [(64, 64, 64), (5000, 300, 768), (300, 70000, 200), (4096, 4096, 128)]:
        for needs_dx in (False, True):
            for needs_dy in (False, True):
                plan = triton_siglip.backward_plan(n, m, d, config, needs_dx=needs_dx, needs_dy=needs_dy,
                                                   deterministic=True)
                assert sum(launch["scalars"] for launch in plan) == 1
                for launch in plan:
                    if launch["kernel"] == "cols":
                        assert not launch["NEEDS_DQ"] and not launch["WIDE"] and launch["dk_mode"] != 1, launch


@pytest.mark.parametrize("backend", ["blockwise", "triton"])
def test_deterministic_is_bitwise_reproducible(backend):
    x, y = _pairs(37, 70, torch.bfloat16, seed=3)
    results = []
    for deterministic in (True, True, False):
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        t, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
        out = csrc_triton.siglip(xs, ys, t, b, backend=backend, deterministic=deterministic)
        results.append([out.detach(), *torch.autograd.grad(out, [xs, ys, t, b])])
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    for a, b in zip(results[0], results[2]):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _bad_calls():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    f = csrc_triton.siglip
    return [
        (lambda: f(x.numpy(), y, 10.0, -10.0), TypeError, "image_features must be a torch.Tensor"),
        (lambda: f(x, y[:, :2], 10.0, -10.0), ValueError, "text_features has feature dimension D=2"),
        (lambda: f(x, y[:3], 10.0, -10.0), ValueError, "text_features has 3 rows but image_features has 4"),
        (lambda: f(x, y.double(), 10.0, -10.0), TypeError, "text_features has dtype torch.float64"),
        (lambda: f(x[0], y, 10.0, -10.0), ValueError, r"image_features must have shape \(N, D\)"),
        (lambda: f(x.int(), y.int(), 10.0, -10.0), TypeError, "image_features must be float32"),
        (lambda: f(x[:0], y[:0], 10.0, -10.0), ValueError, "image_features is an empty batch"),
        (lambda: f(x, y, 0.0, -10.0), ValueError, "logit_scale must be finite and positive .* got 0.0"),
        (lambda: f(x, y, -1.0, -10.0), ValueError, "logit_scale must be finite and positive"),
        (lambda: f(x, y, torch.tensor(math.inf), -10.0), ValueError, "logit_scale must be finite and positive"),
        (lambda: f(x, y, "10", -10.0), TypeError, "logit_scale must be a positive float"),
        (lambda: f(x, y, 10.0, math.nan), ValueError, "logit_bias must be finite .* got nan"),
        (lambda: f(x, y, 10.0, torch.tensor(-math.inf)), ValueError, "logit_bias must be finite .* got -inf"),
        (lambda: f(x, y, 10.0, torch.zeros(2)), ValueError, r"logit_bias must be a scalar .* shape \(2,\)"),
        (lambda: f(x, y, 10.0, torch.tensor(1)), TypeError, "logit_bias must be a floating-point tensor"),
        (lambda: f(x, y, 10.0, True), TypeError, "logit_bias must be a float or a 0-dim tensor .* got bool"),
        (lambda: f(x, y, 10.0, None), TypeError, "logit_bias must be a float or a 0-dim tensor .* got NoneType"),
        (lambda: f(x, y, 10.0, -10.0, reduction="avg"), ValueError, "reduction='avg' is not one of"),
        (lambda: f(x, y, 10.0, -10.0, backend="cuda"), ValueError, "backend='cuda' is not one of"),
        (lambda: f(x.double(), y.double(), 10.0, -10.0, backend="triton"), TypeError,
         "backend='triton' supports float32, bfloat16 and float16 features, got float64"),
        (lambda: f(x, y, 10.0, -10.0, deterministic=1), TypeError, "deterministic must be a bool, got int"),
        (lambda: f(x, y, 10.0, -10.0, process_group="world"), ValueError,
         "process_group='world' was given but torch.distributed is not initialised"),
    ]


def test_validation_messages_name_the_argument():
    for call, error, message in _bad_calls():
        with pytest.raises(error, match=message):
            call()


# ----------------------------------------------------------------------------------------------
# Ops: registration, fake kernels, torch.compile, gradcheck, module and autocast
# ----------------------------------------------------------------------------------------------
def test_registered_ops_and_exports():
    assert "siglip" in csrc_triton.__all__ and "SigLipLoss" in csrc_triton.__all__
    x, y = _pairs(6, 5, torch.float32)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    got = torch.ops.contrastive.siglip(x, y, t, b, "mean", False, "blockwise")
    torch.testing.assert_close(got.double(), siglip_ref(x.double(), y.double(), 10.0, -10.0), rtol=2e-6, atol=0.0)
    module = csrc_triton.SigLipLoss(reduction="sum", deterministic=True)
    assert "reduction='sum'" in repr(module)
    assert torch.equal(module(x, y, t, b), csrc_triton.siglip(x, y, t, b, reduction="sum"))


def test_opcheck():
    x, y = _pairs(6, 5, torch.float32)
    t, b = torch.tensor(4.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    x, y = x.requires_grad_(), y.requires_grad_()
    torch.library.opcheck(torch.ops.contrastive.siglip_rows.default, (x, y, t, b, 0, False, "blockwise"))
    grad = torch.randn(6)
    torch.library.opcheck(torch.ops.contrastive.siglip_rows_backward.default,
                          (grad, x.detach(), y.detach(), t.detach(), b.detach(), 0, True, False, False, "dense"))


def test_gradcheck_blockwise_float64():
    x, y = _pairs(5, 4, torch.float64, seed=4)
    args = (x.requires_grad_(), y.requires_grad_(), torch.tensor(3.0, dtype=torch.float64, requires_grad=True),
            torch.tensor(-1.5, dtype=torch.float64, requires_grad=True))
    with blockwise_rows(2, 3):
        assert torch.autograd.gradcheck(lambda *a: csrc_triton.siglip(*a, reduction="none", backend="blockwise"),
                                        args, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_compile_fullgraph_matches_eager():
    x, y = _pairs(10, 6, torch.float32)

    def step(a, c, t, b):
        return csrc_triton.siglip(a, c, t, b, backend="blockwise")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        a, c = x.clone().requires_grad_(), y.clone().requires_grad_()
        t, b = torch.tensor(8.0, requires_grad=True), torch.tensor(-4.0, requires_grad=True)
        out = fn(a, c, t, b)
        results.append([out, *torch.autograd.grad(out, [a, c, t, b])])
    for e, c in zip(*results):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)


def test_autocast_bf16_from_linear():
    torch.manual_seed(3)
    lin_a, lin_b = torch.nn.Linear(10, 16), torch.nn.Linear(10, 16)
    xa, xb = torch.randn(24, 10), torch.randn(24, 10)
    t = torch.tensor(5.0, requires_grad=True)
    with poison_outputs(), torch.autocast("cpu", dtype=torch.bfloat16):
        fa, fb = lin_a(xa), lin_b(xb)
        assert fa.dtype == torch.bfloat16
        out = csrc_triton.siglip(fa, fb, t, -2.0)
    assert out.dtype == torch.float32
    want = siglip_ref(fa.detach().double(), fb.detach().double(), 5.0, -2.0)
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=0.0)
    out.backward()
    assert t.grad is not None and all(torch.isfinite(p.grad).all() for p in lin_a.parameters())


def test_kernels_compile_for_sm90_without_spills():
    """The bf16 forward, fused (narrow and wide) and rows kernels compiled for sm_90 with the
    shipped tiles: no spill, wgmma tile products (python -m csrc_triton.static_check --family
    siglip compiles all 24 variants)."""
    from csrc_triton import static_check

    try:
        path = static_check._ptxas_path(90)
    except (FileNotFoundError, ImportError, AttributeError) as err:
        pytest.skip(f"cannot compile for sm_90 here: Triton's bundled ptxas is unavailable ({err})")
    if not os.access(path, os.X_OK):
        pytest.skip(f"Triton's bundled ptxas at {path} is not executable")
    jobs = static_check.siglip_variants(subset=True)
    assert {job.kernel for job in jobs} == {"siglip_forward", "siglip_cols", "siglip_rows"} and len(jobs) == 4
    for row in static_check.compile_jobs(jobs):
        where = f"{row['kernel']} {row['variant']} {row['dtype']} {row['tiles']}"
        assert 0 < row["registers"] <= 255 and row["spill_stores"] == row["spill_loads"] == 0, where
        assert row["wgmma"] and row["ex2"] > 0, where
