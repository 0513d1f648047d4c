"""The registered ops ``torch.ops.contrastive.*``: the core op against its contract, opcheck,
torch.compile and gradcheck.

    lse(q, k, scale, col_bias, self_offset, compute_col, positive_index, row_labels, col_labels,
        positive_sum, positive_lse, deterministic, backend)
        -> (row_lse, col_lse, positive_sum, positive_lse)
    lse_backward(grad_row, grad_col, grad_positive_sum, grad_positive_lse, q, k, scale, col_bias,
                 self_offset, positive_index, row_labels, col_labels, row_lse, col_lse,
                 positive_lse, needs_dq, needs_dk, needs_dbias, deterministic, backend)
        -> (dq, dk, dscale, dbias)

with the maths of ``csrc_triton/backend.py``; the float64 reference of that contract is
``reference.lse_contract_ref`` (dense, masked, differentiated by autograd).

Tolerances. Forward outputs are accumulated in float32 (float64 for float64 inputs) whatever
the input dtype, so they are held to that accuracy for every dtype against a float64 reference
on the same rounded inputs. The error model: a logit Z_ij = s q_i.k_j + b_j is off by about
eps * zabs_ij (zabs = s |q_i|.|k_j| + |b_j|), so a log-sum-exp by eps * (its largest zabs +
|value|), a positive sum by eps * (sum of its zabs). A gradient such as dq = s G k is off by
about eps * (zmax + log M) * s |G| |k| (each G_ij has a relative error of the logits' absolute
error). C_FWD and C_GRAD are the safety factors on those bounds (measured, the CPU backends
stay within a tenth of them). The blockwise backend clamps shifted exponents at -64 in float32
(documented in blockwise.EXP_FLOOR): a G term that should be 0 may be e^-64 times its upstream
gradient there, and only there. 16-bit dq / dk: the contract sums every term of G in float32;
the CPU backends then also multiply in float32 and round once, so |dq - truth| <= half an ulp
of the dtype + the float32 bound. The Triton kernels round G to the input dtype for the
tensor-core products (as PyTorch's own 16-bit backward rounds the softmax gradient), so for
them only the second rule holds: no worse than PyTorch in that dtype (the Cut Cross-Entropy
rule), which every backend must meet.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import csrc_triton
from csrc_triton._testing import blockwise_rows, poison_outputs

import reference as R

ops = torch.ops.contrastive
C_FWD = 4.0
C_GRAD = 8.0
CPU_BACKENDS = ["dense", "blockwise"]
BACKENDS = ["dense", "blockwise", "blockwise-rows5", "triton"]
DTYPES16 = [torch.bfloat16, torch.float16]


def _id(x):
    return str(x).replace("torch.", "") if isinstance(x, torch.dtype) else str(x)


def _backend_ctx(backend: str):
    """(name passed to the op, context): "blockwise-rows5" is blockwise with 5-row blocks."""
    if backend == "blockwise-rows5":
        return "blockwise", blockwise_rows(5)
    return backend, contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# contrastive::lse against its contract
# ----------------------------------------------------------------------------------------------
# name: n, m, d; col_bias; self_offset; compute_col; positives "none" / "index" / "labels";
# positive_sum; positive_lse; row upstream used; upstream gradients all >= 0 (blockwise folds
# log g into its shift then, a separate path)
CASES = {
    "plain": dict(n=19, m=19, d=37, bias=False, offset=None, col=False, pos="none", psum=False, plse=False),
    "col_bias": dict(n=13, m=29, d=5, bias=True, offset=None, col=True, pos="none", psum=False, plse=False),
    "self0_index": dict(n=17, m=17, d=9, bias=False, offset=0, col=True, pos="index", psum=True, plse=True),
    # 13 local rows of rank 1 against the 39 keys of 3 ranks: row i's own key is 13 + i
    "strip_index": dict(n=13, m=39, d=9, bias=True, offset=13, col=True, pos="index", psum=True, plse=True),
    "strip_labels": dict(n=13, m=39, d=6, bias=True, offset=26, col=True, pos="labels", psum=True, plse=True),
    # rows 7..12 have no own key (13 + i >= 20): nothing is excluded there
    "offset_past_end": dict(n=13, m=20, d=4, bias=False, offset=13, col=True, pos="index", psum=True, plse=False),
    "labels_lse_only": dict(n=21, m=21, d=11, bias=True, offset=0, col=False, pos="labels", psum=False, plse=True,
                            use_row=False),
    "nonneg_upstream": dict(n=23, m=31, d=7, bias=True, offset=0, col=True, pos="labels", psum=True, plse=True,
                            nonneg=True),
    # nothing allowed: row and column -inf, empty positive set
    "fully_masked": dict(n=1, m=1, d=3, bias=True, offset=0, col=True, pos="index", psum=True, plse=True),
    # Triton's interpreter tiles are 16 x 16 (D in chunks of 32 / 64): ragged in every direction
    "multitile": dict(n=130, m=70, d=67, bias=True, offset=0, col=True, pos="labels", psum=True, plse=True),
}


def make_case(name: str, dtype: torch.dtype, seed: int = 0) -> dict:
    c = dict(CASES[name])
    n, m, d = c["n"], c["m"], c["d"]
    g = torch.Generator().manual_seed(seed + 17 * len(name))
    acc = R.accumulation_dtype(dtype)
    q = (torch.randn(n, d, generator=g) / d**0.25).to(dtype)
    k = (torch.randn(m, d, generator=g) / d**0.25).to(dtype)
    scale = torch.tensor(1.7, dtype=acc)
    bias = torch.randn(m, generator=g, dtype=acc) if c["bias"] else None
    index = row_labels = col_labels = None
    if c["pos"] == "index":
        index = torch.randint(0, m, (n,), generator=g)
        index[::5] = -1  # no positive
        if c["offset"] is not None and n > 3 and 3 + c["offset"] < m:
            index[3] = 3 + c["offset"]  # the excluded self column: no positive either
        if c["offset"] is not None and n == 1:
            index[0] = c["offset"]
    elif c["pos"] == "labels":
        col_labels = torch.randint(0, max(2, m // 4), (m,), generator=g)
        off = c["offset"] or 0
        rows = col_labels[off: off + n].clone()
        row_labels = torch.cat([rows, torch.randint(0, max(2, m // 4), (n - rows.shape[0],), generator=g)])
        row_labels[1] = 999  # a label no column has: empty P(i)
        if n > 4 and off + 4 < m:
            # a label only its own (excluded) column has
            row_labels[4] = col_labels[off + 4] = 1000
    return dict(c, q=q, k=k, scale=scale, bias=bias, index=index, row_labels=row_labels, col_labels=col_labels)


OUT_NAMES = ("row_lse", "col_lse", "positive_sum", "positive_lse")


def _used(c: dict) -> list[str]:
    used = ["row_lse"] if c.get("use_row", True) else []
    used += ["col_lse"] if c["col"] else []
    used += ["positive_sum"] if c["psum"] else []
    used += ["positive_lse"] if c["plse"] else []
    return used


def _upstreams(c: dict, seed: int = 5) -> dict[str, torch.Tensor]:
    sizes = {"row_lse": c["n"], "col_lse": c["m"], "positive_sum": c["n"], "positive_lse": c["n"]}
    return {name: R.upstream(sizes[name], seed + i, nonnegative=c.get("nonneg", False))
            for i, name in enumerate(_used(c))}


def run_ours(c: dict, backend: str, *, deterministic: bool = False, grad_k: bool = True):
    """Outputs and gradients (q, k, scale, col_bias) of the op, every output poisoned first."""
    op_backend, ctx = _backend_ctx(backend)
    q = c["q"].clone().requires_grad_()
    k = c["k"].clone().requires_grad_(grad_k)
    s = c["scale"].clone().requires_grad_()
    b = None if c["bias"] is None else c["bias"].clone().requires_grad_()
    up = _upstreams(c)
    with poison_outputs(), ctx:
        outs = ops.lse(q, k, s, b, c["offset"], c["col"], c["index"], c["row_labels"], c["col_labels"],
                       c["psum"], c["plse"], deterministic, op_backend)
        named = dict(zip(OUT_NAMES, outs))
        used = [named[n] for n in up]
        leaves = [x for x in (q, k, s, b) if x is not None and x.requires_grad]
        grads = torch.autograd.grad(used, leaves, [up[n].to(named[n].dtype) for n in up])
    grads = iter(grads)
    out_grads = {name: (next(grads) if x is not None and x.requires_grad else None)
                 for name, x in (("q", q), ("k", k), ("scale", s), ("col_bias", b))}
    return named, out_grads


def run_reference(c: dict, dtype: torch.dtype = torch.float64):
    """Outputs, gradients and G = dL/dZ of the contract, with every float input cast to dtype."""
    q = c["q"].to(dtype).requires_grad_()
    k = c["k"].to(dtype).requires_grad_()
    s = c["scale"].to(dtype).requires_grad_()
    b = None if c["bias"] is None else c["bias"].to(dtype).requires_grad_()
    ref = R.lse_contract_ref(q, k, s, b, c["offset"], c["index"], c["row_labels"], c["col_labels"])
    outs = {name: ref[name] for name in OUT_NAMES}
    z, allowed, pos = ref["logits"], ref["allowed"], ref["positive"]
    up = _upstreams(c)
    leaves = [q, k, s] + ([b] if b is not None else []) + [z]
    grads = torch.autograd.grad([outs[n] for n in up], leaves, [u.to(dtype) for u in up.values()],
                                allow_unused=True)
    names = ["q", "k", "scale"] + (["col_bias"] if b is not None else [])
    out_grads = dict(zip(names, grads[:-1]))
    return outs, out_grads, grads[-1], allowed, pos


def _check_lse(c: dict, backend: str, dtype: torch.dtype, deterministic: bool) -> None:
    acc = R.accumulation_dtype(dtype)
    eps = R.EPS[acc]
    ours, our_grads = run_ours(c, backend, deterministic=deterministic)
    truth, true_grads, G, allowed, pos = run_reference(c)

    # --- forward: accumulation-dtype accuracy, whatever the input dtype --------------------------
    q64, k64 = c["q"].double(), c["k"].double()
    s = float(c["scale"].detach())
    babs = c["bias"].double().abs() if c["bias"] is not None else torch.zeros(c["m"], dtype=torch.float64)
    zabs = s * q64.abs() @ k64.abs().T + babs[None, :]
    zmax_row = torch.where(allowed, zabs, 0.0).amax(dim=1)
    zmax_col = torch.where(allowed, zabs, 0.0).amax(dim=0)
    expected_shapes = {"row_lse": c["n"], "col_lse": c["m"] if c["col"] else 0,
                       "positive_sum": c["n"] if c["psum"] else 0, "positive_lse": c["n"] if c["plse"] else 0}
    for name in OUT_NAMES:
        assert ours[name].dtype == acc, f"{name} has dtype {ours[name].dtype}, expected {acc}"
        assert ours[name].shape == (expected_shapes[name],), f"{name} has shape {tuple(ours[name].shape)}"
    tol = {
        "row_lse": C_FWD * eps * (zmax_row + truth["row_lse"].abs().nan_to_num(0, 0, 0) + 1),
        "col_lse": C_FWD * eps * (zmax_col + truth["col_lse"].abs().nan_to_num(0, 0, 0) + 1),
        "positive_sum": C_FWD * eps * (torch.where(pos, zabs, 0.0).sum(dim=1) + 1),
        "positive_lse": C_FWD * eps * (torch.where(pos, zabs, 0.0).amax(dim=1)
                                   + truth["positive_lse"].abs().nan_to_num(0, 0, 0) + 1),
    }
    for name in OUT_NAMES:
        if expected_shapes[name]:
            R.assert_within(f"{name} [{backend}, {_id(dtype)}]", ours[name], truth[name].detach(), tol[name])

    # --- gradients ------------------------------------------------------------------------------
    Gabs = G.abs()
    zmag = float(zabs.detach().max()) + math.log(max(c["m"], 2)) + 1.0
    factor = C_GRAD * eps * zmag
    # relative error of every G_ij, plus (blockwise in float32 only) its documented floor: each
    # shifted exponent is clamped at -64 (blockwise.EXP_FLOOR), so a G term that should be 0 (an
    # excluded entry, a fully masked row) may be up to e^-64 times its upstream gradient.
    Gtol = factor * Gabs
    if backend.startswith("blockwise") and acc == torch.float32:
        up = {name: u.abs() for name, u in _upstreams(c).items()}
        rows = sum((up[n] for n in ("row_lse", "positive_sum", "positive_lse") if n in up), torch.zeros(c["n"]))
        cols = up.get("col_lse", torch.zeros(c["m"]))
        Gtol = Gtol + math.exp(-64.0) * (rows.double()[:, None] + cols.double()[None, :])
    tol_g = {
        "q": s * (Gtol @ k64.abs()),
        "k": s * (Gtol.T @ q64.abs()),
        "scale": (Gtol * (q64.abs() @ k64.abs().T)).sum(),
        "col_bias": Gtol.sum(dim=0),
    }
    low = None
    for name, got in our_grads.items():
        if name == "col_bias" and c["bias"] is None:
            assert got is None
            continue
        want = true_grads[name]
        assert got is not None, f"no gradient for {name}"
        expected_dtype = {"q": dtype, "k": dtype}.get(name, acc)
        assert got.dtype == expected_dtype, f"d{name} has dtype {got.dtype}, expected {expected_dtype}"
        label = f"d{name} [{backend}, {_id(dtype)}]"
        if dtype in DTYPES16 and name in ("q", "k"):
            if backend != "triton":  # the kernels round G for the tensor cores (backend.py)
                R.assert_one_rounding(label, got, want, tol_g[name], dtype)
            if low is None:
                low = run_reference(c, dtype)[1]
            R.assert_no_worse_than_torch(label, got, want, low[name], dtype, floor=tol_g[name])
        else:
            R.assert_within(label, got, want, tol_g[name] + 1e-300)


def test_reference_matches_explicit_sums():
    """The dense reference itself, against scalar loops straight from the contract's formulas."""
    for name in ("strip_index", "strip_labels", "fully_masked"):
        c = make_case(name, torch.float64)
        q, k, s, b = c["q"], c["k"], float(c["scale"]), c["bias"]
        ref = R.lse_contract_ref(q, k, c["scale"], b, c["offset"], c["index"], c["row_labels"], c["col_labels"])
        n, m = q.shape[0], k.shape[0]

        def z(i, j):
            return s * float(q[i] @ k[j]) + (float(b[j]) if b is not None else 0.0)

        def allowed(i, j):
            return c["offset"] is None or j != i + c["offset"]

        def positive(i, j):
            if not allowed(i, j):
                return False
            if c["index"] is not None:
                return int(c["index"][i]) == j
            return c["row_labels"] is not None and int(c["row_labels"][i]) == int(c["col_labels"][j])

        def lse(values):
            return math.log(sum(math.exp(v) for v in values)) if values else -math.inf

        for i in range(n):
            assert math.isclose(ref["row_lse"][i], lse([z(i, j) for j in range(m) if allowed(i, j)]), rel_tol=1e-12)
            pos = [z(i, j) for j in range(m) if positive(i, j)]
            assert math.isclose(ref["positive_sum"][i], sum(pos), rel_tol=1e-12, abs_tol=1e-12)
            assert math.isclose(ref["positive_lse"][i], lse(pos), rel_tol=1e-12) or ref["positive_lse"][i] == lse(pos)
        for j in range(m):
            col = lse([z(i, j) for i in range(n) if allowed(i, j)])
            assert math.isclose(ref["col_lse"][j], col, rel_tol=1e-12) or ref["col_lse"][j] == col


def _lse_params():
    out = []
    for name in CASES:
        for backend in BACKENDS:
            if backend == "triton":
                dtypes = [torch.float32] + (DTYPES16 if name in ("multitile", "strip_labels") else [])
            elif backend == "blockwise-rows5" and name in ("plain", "col_bias"):
                dtypes = [torch.float32]
            else:
                dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
            for dtype in dtypes:
                out.append(pytest.param(name, backend, dtype, id=f"{name}-{backend}-{_id(dtype)}"))
    return out


@pytest.mark.parametrize("name,backend,dtype", _lse_params())
def test_lse_matches_contract(name, backend, dtype):
    # alternate deterministic so that both paths of each backend are held to the reference
    deterministic = (len(name) + len(backend)) % 2 == 0
    _check_lse(make_case(name, dtype), backend, dtype, deterministic)


# ----------------------------------------------------------------------------------------------
# Flags: needs_dk, deterministic; fully masked rows; NaN
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["dense", "blockwise", "triton"])
def test_lse_keys_without_grad_skip_dk(backend, monkeypatch):
    """Keys that need no gradient (a frozen MoCo queue): the backend is asked for no dk; dq and
    dscale are exactly those of the full backward, dbias the same to float32 rounding."""
    from csrc_triton import backend as registry

    c = make_case("strip_index", torch.float32)
    full, full_grads = run_ours(c, backend)
    module = registry.load(backend)
    seen = []
    original = module.lse_backward

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "lse_backward", spy)
    part, part_grads = run_ours(c, backend, grad_k=False)
    assert seen and all(kw["needs_dk"] is False and kw["needs_dq"] is True for kw in seen), seen
    assert part_grads["k"] is None
    for name in OUT_NAMES:
        assert torch.equal(part[name].detach(), full[name].detach()), name
    for name in ("q", "scale"):
        assert torch.equal(part_grads[name], full_grads[name]), f"d{name} changed without dk"
    # dbias may be summed in another order without dk (blockwise: a row sum instead of the
    # last column of dk's product): the same to float32 rounding
    torch.testing.assert_close(part_grads["col_bias"], full_grads["col_bias"], rtol=4e-7, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lse_backward_op_returns_empty_for_unneeded(backend):
    """The backward op itself: needs_dq / needs_dk / needs_dbias False give (0,) outputs."""
    c = make_case("strip_index", torch.float32)
    args = (c["q"], c["k"], c["scale"], c["bias"], c["offset"], True, c["index"], None, None, True, True, False,
            backend)
    row, col, _, pl = ops.lse(*args)
    g = torch.randn(c["n"])
    full = ops.lse_backward(g, torch.randn(c["m"]), g, g, c["q"], c["k"], c["scale"], c["bias"], c["offset"],
                            c["index"], None, None, row, col, pl, True, True, True, False, backend)
    none = ops.lse_backward(g, torch.randn(c["m"]), g, g, c["q"], c["k"], c["scale"], c["bias"], c["offset"],
                            c["index"], None, None, row, col, pl, False, False, False, False, backend)
    assert [tuple(x.shape) for x in full] == [(c["n"], c["d"]), (c["m"], c["d"]), (), (c["m"],)]
    assert [tuple(x.shape) for x in none] == [(0,), (0,), (), (0,)]


@pytest.mark.parametrize("backend", ["dense", "blockwise-rows5", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_lse_deterministic_is_bitwise_reproducible(backend, dtype):
    c = make_case("nonneg_upstream", dtype)
    first, first_grads = run_ours(c, backend, deterministic=True)
    again, again_grads = run_ours(c, backend, deterministic=True)
    for name in OUT_NAMES:
        assert torch.equal(first[name].detach(), again[name].detach()), name
    for name, g in first_grads.items():
        assert torch.equal(g, again_grads[name]), f"d{name} differs between two deterministic runs"


@pytest.mark.parametrize("backend", ["dense", "blockwise", "triton"])
def test_lse_fully_masked_row_is_minus_inf_never_nan(backend):
    """q = k of one row with its self-pair excluded: nothing is allowed. Every log-sum-exp is
    -inf (not NaN), the positive sum 0, and a nonzero upstream gradient gives finite (zero up to
    the blockwise exp floor) gradients."""
    q = torch.randn(1, 4, requires_grad=True)
    s = torch.tensor(2.0, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    with poison_outputs():
        row, col, ps, pl = ops.lse(q, q, s, b, 0, True, torch.tensor([0]), None, None, True, True, False, backend)
        assert row.item() == -math.inf and col.item() == -math.inf and pl.item() == -math.inf
        assert ps.item() == 0.0
        grads = torch.autograd.grad([row, col, ps, pl], [q, s, b], [torch.ones(1)] * 4)
    for g in grads:
        assert torch.isfinite(g).all() and g.abs().max() < 1e-20, g


@pytest.mark.parametrize("backend", ["dense", "blockwise-rows5", "triton"])
def test_lse_nan_propagation(backend):
    """A NaN in query row i: row_lse_i and every column LSE are NaN, the other rows are not; in
    the backward (row term only) dq_i, every dk_j and dscale are NaN, dq_r (r != i) finite.
    A NaN upstream gradient g_i does the same to the gradients."""
    op_backend, ctx = _backend_ctx(backend)
    n, m, d, i = 11, 9, 5, 3
    q, k = torch.randn(n, d), torch.randn(m, d)
    bad_q = q.clone()
    bad_q[i, 2] = math.nan
    others = torch.arange(n) != i
    with poison_outputs(), ctx:
        row, col, _, _ = ops.lse(bad_q, k, torch.tensor(1.5), None, None, True, None, None, None, False, False,
                                 False, op_backend)
        assert torch.isnan(row[i]) and torch.isfinite(row[others]).all()
        assert torch.isnan(col).all()
        for qq, g in ((bad_q, torch.rand(n) + 0.1), (q, torch.rand(n).index_fill_(0, torch.tensor([i]), math.nan))):
            qi, ki = qq.clone().requires_grad_(), k.clone().requires_grad_()
            si = torch.tensor(1.5, requires_grad=True)
            r = ops.lse(qi, ki, si, None, None, False, None, None, None, False, False, False, op_backend)[0]
            dq, dk, ds = torch.autograd.grad(r, [qi, ki, si], g)
            assert torch.isnan(dq[i]).all() and torch.isfinite(dq[others]).all()
            assert torch.isnan(dk).all(axis=1).all() and torch.isnan(ds)


# ----------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------
def _op_args(c, backend, grad=True):
    q = c["q"].clone().requires_grad_(grad)
    k = c["k"].clone().requires_grad_(grad)
    s = c["scale"].clone().requires_grad_(grad)
    b = None if c["bias"] is None else c["bias"].clone().requires_grad_(grad)
    return (q, k, s, b, c["offset"], c["col"], c["index"], c["row_labels"], c["col_labels"], c["psum"], c["plse"],
            False, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["col_bias", "strip_index", "labels_lse_only"])
def test_opcheck_lse(backend, name):
    torch.library.opcheck(ops.lse.default, _op_args(make_case(name, torch.float32), backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_lse_backward(backend):
    c = make_case("strip_labels", torch.float32)
    q, k, s, b = c["q"], c["k"], c["scale"], c["bias"]
    row, col, _, pl = ops.lse(*_op_args(c, backend, grad=False))
    n, m = c["n"], c["m"]
    args = (torch.randn(n), torch.randn(m), torch.randn(n), torch.randn(n), q, k, s, b, c["offset"], None,
            c["row_labels"], c["col_labels"], row, col, pl, True, True, True, False, backend)
    torch.library.opcheck(ops.lse_backward.default, args)
    # without optional terms: (0,) upstream gradients, nothing but dq needed
    args = (torch.randn(n), torch.empty(0), torch.empty(0), torch.empty(0), q, k, s, None, None, None, None, None,
            row, torch.empty(0), torch.empty(0), True, False, False, True, backend)
    torch.library.opcheck(ops.lse_backward.default, args)


def _feat(*shape, scale=0.5, grad=True):
    return (torch.randn(*shape) * scale).requires_grad_(grad)


def _t(x, grad=True):
    return torch.tensor(x, dtype=torch.float32, requires_grad=grad)


def _loss_op_cases(backend, deterministic=False):
    """name -> (op, args, float64 reference of the same inputs). Scales are 1 / temperature."""
    n, d = 7, 5
    q, k, queue = _feat(n, d), _feat(n, d), _feat(11, d)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0])
    s = _t(1 / 0.2)
    views = _feat(n, 2, d)
    det = deterministic
    x = lambda t: t.detach().double()  # noqa: E731
    return {
        "info_nce": (ops.info_nce.default, (q, k, s, None, True, False, "none", det, backend),
                     lambda: R.info_nce_ref(x(q), x(k), 1 / x(s), reduction="none")),
        "info_nce_sym": (ops.info_nce.default, (q, k, s, None, True, True, "mean", det, backend),
                         lambda: R.info_nce_ref(x(q), x(k), 1 / x(s), symmetric=True)),
        "moco": (ops.info_nce.default, (q, k, s, queue, False, False, "sum", det, backend),
                 lambda: R.info_nce_ref(x(q), x(k), 1 / x(s), queue=x(queue), in_batch_negatives=False,
                                        reduction="sum")),
        "moco_in_batch": (ops.info_nce.default, (q, k, s, queue, True, False, "mean", det, backend),
                          lambda: R.info_nce_ref(x(q), x(k), 1 / x(s), queue=x(queue))),
        "clip_loss": (ops.clip_loss.default, (q, k, s, det, backend), lambda: R.clip_loss_ref(x(q), x(k), x(s))),
        "nt_xent": (ops.nt_xent.default, (q, k, s, True, "none", det, backend),
                    lambda: R.nt_xent_ref(x(q), x(k), 1 / x(s), reduction="none")),
        "nt_xent_raw": (ops.nt_xent.default, (q, k, s, False, "mean", det, backend),
                        lambda: R.nt_xent_ref(x(q), x(k), 1 / x(s), normalize=False)),
        "supcon": (ops.supcon.default, (q, labels, s, True, det, backend),
                   lambda: R.supcon_ref(x(q), labels, 1 / x(s))),
        "supcon_views": (ops.supcon.default, (views, labels, s, False, det, backend),
                         lambda: R.supcon_ref(x(views), labels, 1 / x(s), normalize=False)),
        "nca": (ops.nca.default, (q, labels, _t(0.8), False, "none", det, backend),
                lambda: R.nca_ref(x(q), labels, 0.8, reduction="none")),
        "nca_normalized": (ops.nca.default, (q, labels, _t(3.0), True, "mean", det, backend),
                           lambda: R.nca_ref(x(q), labels, 3.0, normalize=True)),
        "n_pair": (ops.n_pair.default, (q, k, 0.01, det, backend), lambda: R.n_pair_ref(x(q), x(k), 0.01)),
        "uniformity": (ops.uniformity.default, (q, _t(2.0), det, backend), lambda: R.uniformity_ref(x(q), 2.0)),
    }


LOSS_OP_NAMES = list(_loss_op_cases("dense"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", LOSS_OP_NAMES)
def test_loss_op_matches_reference(backend, name):
    op, args, ref = _loss_op_cases(backend)[name]
    with poison_outputs():
        got = op(*args)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        up = R.upstream(got.shape, 3)
        g_got = torch.autograd.grad(got, leaves, up.to(got.dtype))
    leaves64 = [a.detach().double().requires_grad_() for a in leaves]
    swap = {id(a): b for a, b in zip(leaves, leaves64)}
    args64 = [swap.get(id(a), a) for a in args]
    # the reference reads the float64 leaves through the same closure: rebuild it on them
    expected = _reference_on(name, args64)
    g_ref = torch.autograd.grad(expected, leaves64, up)
    R.assert_within("loss", got, expected, 2e-6 * (expected.detach().abs() + 1))
    for leaf, a, b in zip(leaves, g_got, g_ref):
        assert a.dtype == leaf.dtype
        R.assert_within("grad", a, b, 1e-5 * (b.abs() + b.abs().max() + 1e-6))


def _reference_on(name, a):
    """The float64 reference of loss-op case ``name`` evaluated on the op's argument list ``a``."""
    if name.startswith("info_nce") or name.startswith("moco"):
        q, k, s, queue, in_batch, sym, red = a[:7]
        return R.info_nce_ref(q, k, 1 / s, queue=queue, in_batch_negatives=in_batch, symmetric=sym, reduction=red)
    if name == "clip_loss":
        return R.clip_loss_ref(a[0], a[1], a[2])
    if name.startswith("nt_xent"):
        return R.nt_xent_ref(a[0], a[1], 1 / a[2], normalize=a[3], reduction=a[4])
    if name.startswith("supcon"):
        return R.supcon_ref(a[0], a[1], 1 / a[2], normalize=a[3])
    if name.startswith("nca"):
        return R.nca_ref(a[0], a[1], a[2], normalize=a[3], reduction=a[4])
    if name == "n_pair":
        return R.n_pair_ref(a[0], a[1], a[2])
    return R.uniformity_ref(a[0], a[1])


@pytest.mark.parametrize("name", LOSS_OP_NAMES)
def test_opcheck_loss_ops(name):
    op, args, _ = _loss_op_cases("blockwise", deterministic=name.startswith("n"))[name]
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) matches eager
# ----------------------------------------------------------------------------------------------
def _compile_cases():
    n, d = 6, 8
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    bw = dict(backend="blockwise")
    return {
        "info_nce": (lambda q, k, t: csrc_triton.info_nce(q, k, temperature=t, symmetric=True, **bw),
                     (_feat(n, d), _feat(n, d), _t(0.2))),
        "moco": (lambda q, k, queue, t: csrc_triton.info_nce(q, k, temperature=t, queue=queue,
                                                             in_batch_negatives=False, reduction="sum", **bw),
                 (_feat(n, d), _feat(n, d), _feat(10, d), _t(0.2))),
        "clip_loss": (lambda a, b, s: csrc_triton.clip_loss(a, b, s.exp(), deterministic=True, **bw),
                      (_feat(n, d), _feat(n, d), _t(2.0))),
        "nt_xent": (lambda z1, z2: csrc_triton.nt_xent(z1, z2, temperature=0.5, **bw), (_feat(n, d), _feat(n, d))),
        "supcon": (lambda f, t: csrc_triton.supcon(f, labels, temperature=t, **bw), (_feat(n, 2, d), _t(0.1))),
        "nca": (lambda x, s: csrc_triton.nca(x, labels, scale=s, reduction="sum", **bw), (_feat(n, d), _t(0.7))),
        "n_pair": (lambda a, p: csrc_triton.n_pair(a, p, l2_reg=0.01, **bw), (_feat(n, d), _feat(n, d))),
        "uniformity": (lambda x, t: csrc_triton.uniformity(x, t=t, **bw), (_feat(n, d), _t(2.0))),
    }


# Inductor's C++ codegen costs tens of seconds on a 2-core CPU: it compiles one loss; the others
# go through the same Dynamo capture (fullgraph) and AOTAutograd with fake tensors, run eagerly.
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
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_got, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# gradcheck in float64 on the blockwise path, blocks of 2 rows
# ----------------------------------------------------------------------------------------------
def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_()


def _gradcheck_cases():
    n, d = 5, 3
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    q, k, queue = _f64(n, d), _f64(n, d), _f64(6, d)
    labels = torch.tensor([0, 1, 0, 2, 1])
    kw = dict(backend="blockwise")
    return {
        "info_nce": (lambda q, k, t: csrc_triton.info_nce(q, k, temperature=t, reduction="none", **kw), (q, k, t)),
        "info_nce_sym": (lambda q, k, t: csrc_triton.info_nce(q, k, temperature=t, symmetric=True,
                                                              reduction="none", **kw), (q, k, t)),
        "moco": (lambda q, k, u, t: csrc_triton.info_nce(q, k, temperature=t, queue=u, in_batch_negatives=False,
                                                         **kw), (q, k, queue, t)),
        "moco_in_batch": (lambda q, k, u, t: csrc_triton.info_nce(q, k, temperature=t, queue=u, reduction="sum",
                                                                  **kw), (q, k, queue, t)),
        "clip_loss": (lambda a, b, s: csrc_triton.clip_loss(a, b, s, **kw), (q, k, t)),
        "nt_xent": (lambda a, b, t: csrc_triton.nt_xent(a, b, temperature=t, reduction="none", **kw), (q, k, t)),
        "nt_xent_raw": (lambda a, b, t: csrc_triton.nt_xent(a, b, temperature=t, normalize=False, **kw), (q, k, t)),
        "supcon": (lambda f, t: csrc_triton.supcon(f, labels, temperature=t, **kw), (_f64(n, 2, d), t)),
        "supcon_2d": (lambda f, t: csrc_triton.supcon(f, labels, temperature=t, **kw), (_f64(n, d), t)),
        "nca": (lambda x, s: csrc_triton.nca(x, labels, scale=s, reduction="none", **kw), (q, t)),
        "nca_normalized": (lambda x, s: csrc_triton.nca(x, labels, scale=s, normalize=True, **kw), (q, t)),
        "n_pair": (lambda a, p: csrc_triton.n_pair(a, p, l2_reg=0.3, **kw), (q, k)),
        "uniformity": (lambda x, t: csrc_triton.uniformity(x, t=t, **kw), (q, t)),
    }


@pytest.mark.parametrize("name", list(_gradcheck_cases()))
def test_gradcheck_blockwise_float64(name):
    fn, args = _gradcheck_cases()[name]
    with blockwise_rows(2):
        out = fn(*args)
        assert out.dtype == torch.float64, f"float64 inputs gave a {out.dtype} loss"
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["strip_index", "strip_labels", "labels_lse_only"])
def test_gradcheck_lse_float64(backend, name):
    """gradcheck of the core op itself (every output, every differentiable input)."""
    c = make_case(name, torch.float64)
    c = dict(c, q=c["q"][:7], n=7, row_labels=None if c["row_labels"] is None else c["row_labels"][:7],
             index=None if c["index"] is None else c["index"][:7])

    def fn(q, k, s, b):
        outs = ops.lse(q, k, s, b, c["offset"], c["col"], c["index"], c["row_labels"], c["col_labels"], c["psum"],
                       c["plse"], False, backend)
        # -inf entries (empty positive sets) have no finite difference: replace by 0
        return tuple(torch.where(torch.isinf(o), torch.zeros_like(o), o) for o in outs if o.numel())

    args = tuple(x.clone().requires_grad_() for x in (c["q"], c["k"], c["scale"], c["bias"]))
    with blockwise_rows(2):
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-6)
