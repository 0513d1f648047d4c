"""The registered ops ``torch.ops.contrastive.*``: opcheck, torch.compile, gradcheck.

Schemas (from the spec and the registration):
    lse(q, k, scale, exclude_diagonal, compute_col, positive_offset, labels, backend)
        -> (row_lse, col_lse, positive)
    info_nce(query, key, scale, queue, in_batch_negatives, symmetric, reduction, backend)
    clip_loss(image_features, text_features, logit_scale, backend)
    nt_xent(z1, z2, scale, normalize, reduction, backend)
    supcon(features, labels, scale, normalize, backend)
where ``scale`` is the logit multiplier, 1 / temperature.
"""
from __future__ import annotations

import pytest
import torch

import csrc_triton  # noqa: F401  (registers torch.ops.contrastive)
from csrc_triton._alloc import poison_outputs

from reference import clip_loss_ref, info_nce_ref, lse_ref, nt_xent_ref, supcon_ref

ops = torch.ops.contrastive
CPU_BACKENDS = ["blockwise", "dense"]


def _t(x, dtype=torch.float32, grad=False):
    return torch.tensor(x, dtype=dtype, requires_grad=grad)


def _feat(*shape, dtype=torch.float32, grad=True, scale=None):
    x = torch.randn(*shape, dtype=dtype)
    if scale is not None:
        x = x * scale
    return x.requires_grad_(grad)


# ----------------------------------------------------------------------------------------------
# contrastive::lse
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["dense", "blockwise", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("exclude_diagonal,compute_col", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("n,m,d", [(19, 19, 37), (13, 29, 5)])
def test_lse_values_and_grads(backend, dtype, exclude_diagonal, compute_col, n, m, d):
    q = (torch.randn(n, d) / d**0.5).to(dtype)
    k = (torch.randn(m, d) / d**0.5).to(dtype)
    scale = _t(3.0)
    qi, ki, si = q.clone().requires_grad_(), k.clone().requires_grad_(), scale.clone().requires_grad_()
    with poison_outputs():
        row, col, _ = ops.lse(qi, ki, si, exclude_diagonal, compute_col, -1, None, backend)
        assert row.dtype == torch.float32 and row.shape == (n,)
        assert col.dtype == torch.float32
        assert col.shape == ((m,) if compute_col else (0,))
        g_row = torch.randn(n)
        g_col = torch.randn(m)
        total = (row * g_row).sum() + ((col * g_col).sum() if compute_col else 0)
        dq, dk, ds = torch.autograd.grad(total, [qi, ki, si])

    q64, k64, s64 = q.double().requires_grad_(), k.double().requires_grad_(), scale.double().requires_grad_()
    r_ref, c_ref = lse_ref(q64, k64, s64, exclude_diagonal)
    total_ref = (r_ref * g_row.double()).sum() + ((c_ref * g_col.double()).sum() if compute_col else 0)
    dq_ref, dk_ref, ds_ref = torch.autograd.grad(total_ref, [q64, k64, s64])

    # row/col LSE are float32 whatever the inputs: compare at fp32-ish accuracy (inputs are
    # exactly representable, products accumulate in fp32).
    torch.testing.assert_close(row.double(), r_ref, rtol=1e-5, atol=1e-5)
    if compute_col:
        torch.testing.assert_close(col.double(), c_ref, rtol=1e-5, atol=1e-5)
    gtol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    for name, got, ref in (("dq", dq, dq_ref), ("dk", dk, dk_ref)):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), ref, rtol=gtol, atol=gtol * ref.abs().max().item(), msg=name)
    torch.testing.assert_close(ds.double(), ds_ref, rtol=1e-4, atol=1e-4)


def test_lse_fully_masked_row_is_minus_inf():
    """N = M = 1 with the diagonal excluded leaves nothing in the row: lse = -inf, not NaN."""
    q = torch.randn(1, 4)
    for backend in CPU_BACKENDS:
        row, _, _ = ops.lse(q, q, _t(2.0), True, False, -1, None, backend)
        assert row.item() == float("-inf"), backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("exclude_diagonal,compute_col", [(False, True), (True, False), (False, False)])
def test_opcheck_lse(backend, exclude_diagonal, compute_col):
    q = _feat(6, 5)
    k = _feat(9, 5)
    scale = _t(2.5, grad=True)
    torch.library.opcheck(ops.lse.default, (q, k, scale, exclude_diagonal, compute_col, -1, None, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("positive", ["offset", "labels"])
def test_opcheck_lse_with_positives(backend, positive):
    q = _feat(8, 5)
    k = _feat(8, 5)
    scale = _t(2.5, grad=True)
    if positive == "offset":
        args = (q, k, scale, True, False, 4, None, backend)
    else:
        args = (q, q.detach().clone().requires_grad_(), scale, True, False, -1, torch.tensor([0, 1, 0, 2, 1, 1, 3, 0]), backend)
    torch.library.opcheck(ops.lse.default, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("positive", ["offset", "labels"])
def test_lse_positive_gradients_match_dense_logits(backend, positive):
    """positive_i = sum_{j in P(i)} S_ij and its gradient, against a masked sum of dense S."""
    q64, k64 = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])
    q, k = q64.clone().requires_grad_(), k64.clone().requires_grad_()
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    offset, lab = (3, None) if positive == "offset" else (-1, labels)
    _, _, pos = ops.lse(q, k, scale, True, False, offset, lab, backend)
    w = torch.randn(8, dtype=torch.float64)
    grads = torch.autograd.grad((pos * w).sum(), [q, k, scale])

    qr, kr, sr = q64.clone().requires_grad_(), k64.clone().requires_grad_(), scale.detach().clone().requires_grad_()
    logits = sr * qr @ kr.T
    if positive == "offset":
        mask = torch.zeros(8, 8, dtype=torch.bool)
        mask[torch.arange(8), (torch.arange(8) + 3) % 8] = True
    else:
        mask = (labels[:, None] == labels[None, :]) & ~torch.eye(8, dtype=torch.bool)
    pos_ref = (logits * mask).sum(1)
    ref = torch.autograd.grad((pos_ref * w).sum(), [qr, kr, sr])
    torch.testing.assert_close(pos, pos_ref.detach())
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_lse_backward(backend):
    q = _feat(6, 5, grad=False)
    k = _feat(6, 5, grad=False)
    scale = _t(2.5)
    row, col, _ = ops.lse(q, k, scale, False, True, -1, None, backend)
    args = (torch.randn(6), torch.randn(6), torch.empty(0), q, k, scale, row, col, False, -1, None, backend)
    torch.library.opcheck(ops.lse_backward.default, args)


# ----------------------------------------------------------------------------------------------
# Loss ops: values against the references, then opcheck
# ----------------------------------------------------------------------------------------------
def _loss_op_cases(backend):
    n, d = 7, 5
    q, k = _feat(n, d, scale=0.5), _feat(n, d, scale=0.5)
    queue = _feat(11, d, scale=0.5)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0])
    s = _t(1 / 0.2, grad=True)
    views = _feat(n, 2, d, scale=0.5)
    return {
        "info_nce": (ops.info_nce.default, (q, k, s, None, True, False, "none", backend),
                     lambda: info_nce_ref(q, k, 1 / s, reduction="none")),
        "info_nce_sym": (ops.info_nce.default, (q, k, s, None, True, True, "mean", backend),
                         lambda: info_nce_ref(q, k, 1 / s, symmetric=True)),
        "moco": (ops.info_nce.default, (q, k, s, queue, False, False, "sum", backend),
                 lambda: info_nce_ref(q, k, 1 / s, queue=queue, in_batch_negatives=False, reduction="sum")),
        "moco_in_batch": (ops.info_nce.default, (q, k, s, queue, True, False, "mean", backend),
                          lambda: info_nce_ref(q, k, 1 / s, queue=queue)),
        "clip_loss": (ops.clip_loss.default, (q, k, s, backend), lambda: clip_loss_ref(q, k, s)),
        "nt_xent": (ops.nt_xent.default, (q, k, s, True, "none", backend),
                    lambda: nt_xent_ref(q, k, 1 / s, reduction="none")),
        "nt_xent_raw": (ops.nt_xent.default, (q, k, s, False, "mean", backend),
                        lambda: nt_xent_ref(q, k, 1 / s, normalize=False)),
        "supcon": (ops.supcon.default, (q, labels, s, True, backend), lambda: supcon_ref(q, labels, 1 / s)),
        "supcon_views": (ops.supcon.default, (views, labels, s, False, backend),
                         lambda: supcon_ref(views, labels, 1 / s, normalize=False)),
    }


LOSS_OP_NAMES = list(_loss_op_cases("dense"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", LOSS_OP_NAMES)
def test_loss_op_matches_reference(backend, name):
    op, args, ref = _loss_op_cases(backend)[name]
    with poison_outputs():
        got = op(*args)
    expected = ref()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the same value as the public function
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    g_got = torch.autograd.grad(got.sum(), leaves)
    g_ref = torch.autograd.grad(expected.sum(), leaves)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", LOSS_OP_NAMES)
def test_opcheck_loss_ops(backend, name):
    op, args, _ = _loss_op_cases(backend)[name]
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) matches eager
# ----------------------------------------------------------------------------------------------
def _compile_cases():
    n, d = 6, 8
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    return {
        "info_nce": (
            lambda q, k, t: csrc_triton.info_nce(q, k, temperature=t, symmetric=True, backend="blockwise"),
            (_feat(n, d), _feat(n, d), _t(0.2, grad=True)),
        ),
        "moco": (
            lambda q, k, queue, t: csrc_triton.info_nce(
                q, k, temperature=t, queue=queue, in_batch_negatives=False, reduction="sum", backend="blockwise"
            ),
            (_feat(n, d), _feat(n, d), _feat(10, d), _t(0.2, grad=True)),
        ),
        "clip_loss": (
            lambda a, b, s: csrc_triton.clip_loss(a, b, s.exp(), backend="blockwise"),
            (_feat(n, d), _feat(n, d), _t(2.0, grad=True)),
        ),
        "nt_xent": (
            lambda z1, z2: csrc_triton.nt_xent(z1, z2, temperature=0.5, backend="blockwise"),
            (_feat(n, d), _feat(n, d)),
        ),
        "supcon": (
            lambda f, t: csrc_triton.supcon(f, labels, temperature=t, backend="blockwise"),
            (_feat(n, 2, d), _t(0.1, grad=True)),
        ),
    }


# Inductor's C++ codegen costs tens of seconds on a 2-core CPU: it compiles one loss; the others
# go through the same Dynamo capture (fullgraph) and AOTAutograd with fake tensors, but run eagerly.
COMPILE_BACKEND = {"info_nce": "inductor"}


@pytest.mark.parametrize("name", list(_compile_cases()))
def test_compile_fullgraph_matches_eager(name):
    torch._dynamo.reset()
    fn, args = _compile_cases()[name]
    eager = fn(*args)
    g_eager = torch.autograd.grad(eager, args)
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND.get(name, "aot_eager"))
    got = compiled(*args)
    g_got = torch.autograd.grad(got, args)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# gradcheck in float64 on the blockwise path
# ----------------------------------------------------------------------------------------------
def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("block_rows", [None, 2])
@pytest.mark.parametrize(
    "name", ["info_nce", "info_nce_sym", "moco", "moco_in_batch", "clip_loss", "nt_xent", "nt_xent_raw", "supcon", "supcon_2d"]
)
def test_gradcheck_blockwise_float64(name, block_rows, monkeypatch):
    import csrc_triton.blockwise as bw

    monkeypatch.setattr(bw, "BLOCK_ROWS", block_rows)
    n, d = 4, 3
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    q, k, queue = _f64(n, d), _f64(n, d), _f64(5, d)
    kw = dict(backend="blockwise")
    if name == "info_nce":
        fn, args = (lambda q, k, t: csrc_triton.info_nce(q, k, temperature=t, reduction="none", **kw)), (q, k, t)
    elif name == "info_nce_sym":
        fn, args = (lambda q, k, t: csrc_triton.info_nce(q, k, temperature=t, symmetric=True, reduction="none", **kw)), (q, k, t)
    elif name == "moco":
        fn = lambda q, k, u, t: csrc_triton.info_nce(q, k, temperature=t, queue=u, in_batch_negatives=False, **kw)  # noqa: E731
        args = (q, k, queue, t)
    elif name == "moco_in_batch":
        fn = lambda q, k, u, t: csrc_triton.info_nce(q, k, temperature=t, queue=u, reduction="sum", **kw)  # noqa: E731
        args = (q, k, queue, t)
    elif name == "clip_loss":
        fn, args = (lambda a, b, s: csrc_triton.clip_loss(a, b, s, **kw)), (q, k, t)
    elif name == "nt_xent":
        fn, args = (lambda a, b, t: csrc_triton.nt_xent(a, b, temperature=t, reduction="none", **kw)), (q, k, t)
    elif name == "nt_xent_raw":
        fn, args = (lambda a, b, t: csrc_triton.nt_xent(a, b, temperature=t, normalize=False, **kw)), (q, k, t)
    elif name == "supcon":
        labels = torch.tensor([0, 1, 0, 2])
        fn, args = (lambda f, t: csrc_triton.supcon(f, labels, temperature=t, **kw)), (_f64(n, 2, d), t)
    else:
        labels = torch.tensor([0, 1, 0, 2, 1])
        fn, args = (lambda f, t: csrc_triton.supcon(f, labels, temperature=t, **kw)), (_f64(5, d), t)
    out = fn(*args)
    assert out.dtype == torch.float64, f"float64 inputs gave a {out.dtype} loss"
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)
