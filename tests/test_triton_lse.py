"""Tests of the Triton backend (csrc_triton/triton_lse.py) through Triton's interpreter.

Ground truth: :func:`reference`, a dense implementation of the contract of
csrc_triton/backend.py written from its formulas, evaluated in float64 on the same (rounded)
inputs. Forward statistics and the fp32 reductions (dscale, dbias) are held to fp32-level
tolerances whatever the input dtype (accumulation is fp32). dq/dk follow Cut Cross-Entropy's
rule: |truth - kernel| <= |truth - PyTorch in the same dtype| + tol * magnitude. Outputs are
poisoned with NaN before each run, so an element the kernels never write fails the test.

Interpreter tiles are 16 x 16 (BLOCK_D 32, BLOCK_DO 64): 130 x 70 problems span 9 x 5 tiles,
D = 60 and 130 several D chunks, and the small min_programs splits rows and columns across
programs so that every cross-program merge runs.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from csrc_triton._alloc import poison_outputs
from csrc_triton.backend import LseGrads, LseStats
from csrc_triton.tile_configs import BackwardConfig, ForwardConfig
from csrc_triton.triton_lse import backward_plan, forward_grid, lse_backward, lse_forward

INF = math.inf
# dq/dk: slack (times the largest |truth|) on top of PyTorch's own error in the input dtype.
_GRAD_TOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 1e-3}
# Statistics, dscale, dbias: |error| <= _STAT_TOL * (1 + magnitude), whatever the input dtype
# (fp32 accumulation; observed errors are 1e-8 to 3e-7 of the magnitude).
_STAT_TOL = 1e-6


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    with warnings.catch_warnings():
        # The interpreter evaluates log(0) and exp overflow on masked lanes (results discarded).
        warnings.filterwarnings("ignore", message="divide by zero encountered in log2")
        warnings.filterwarnings("ignore", message="overflow encountered in exp2")
        warnings.filterwarnings("ignore", message="invalid value encountered")
        warnings.filterwarnings("ignore", message="All-NaN slice encountered")
        # The interpreter converts 1-element loop bounds with int(array) (NumPy >= 1.25 warns).
        warnings.filterwarnings("ignore", message="Conversion of an array with ndim > 0", category=DeprecationWarning)
        yield


# --------------------------------------------------------------------------------------------
# The contract, densely (csrc_triton/backend.py)
# --------------------------------------------------------------------------------------------


def reference(q, k, scale, *, col_bias=None, self_offset=None, positive_index=None, row_labels=None,
              col_labels=None, g=None, h=None, w=None, u=None, dtype=torch.float64):
    """Stats and gradients of the contract in ``dtype``, with S materialised.

    Z = s q k^T + b; allowed = j != i + self_offset; P(i) by index or labels (allowed only);
    G = [allowed](g e^(Z - r) + h e^(Z - c)) + [P](w + u e^(Z - plse)), a term with a zero
    upstream gradient or a -inf statistic contributing exactly 0."""
    q, k, s = q.to(dtype), k.to(dtype), scale.to(dtype)
    n, m = q.shape[0], k.shape[0]
    dot = q @ k.T
    z = s * dot + (0 if col_bias is None else col_bias.to(dtype)[None, :])
    i, j = torch.arange(n)[:, None], torch.arange(m)[None, :]
    allowed = torch.ones(n, m, dtype=torch.bool) if self_offset is None else j != i + self_offset
    if positive_index is not None:
        pos = j == positive_index[:, None]
    elif row_labels is not None:
        pos = row_labels[:, None] == col_labels[None, :]
    else:
        pos = torch.zeros(n, m, dtype=torch.bool)
    pos &= allowed
    z_allowed = z.masked_fill(~allowed, -INF)
    row, col = z_allowed.logsumexp(1), z_allowed.logsumexp(0)
    psum = torch.where(pos, z, 0.0).sum(1)
    plse = z.masked_fill(~pos, -INF).logsumexp(1)

    def term(mask, grad, stat, row_side):
        grad = grad.to(dtype)
        live = (grad != 0) & (stat != -INF)
        grad, stat, live = (x[:, None] if row_side else x[None, :] for x in (grad, stat, live))
        return torch.where(mask & live, grad * (z - stat).exp(), 0.0)

    grad = torch.zeros_like(z)
    if g is not None:
        grad = grad + term(allowed, g, row, True)
    if h is not None:
        grad = grad + term(allowed, h, col, False)
    if w is not None:
        grad = grad + torch.where(pos, w.to(dtype)[:, None], 0.0)
    if u is not None:
        grad = grad + term(pos, u, plse, True)
    return dict(row_lse=row, col_lse=col, positive_sum=psum, positive_lse=plse, dq=s * grad @ k,
                dk=s * grad.T @ q, dscale=(grad * dot).sum(), dbias=grad.sum(0),
                magnitude_dscale=(grad * dot).abs().sum(), magnitude_z=z.abs().max(),
                magnitude_psum=torch.where(pos, z.abs(), 0.0).sum(1).max() if n else z.new_zeros(()),
                magnitude_dbias=grad.abs().sum(0).max())


# --------------------------------------------------------------------------------------------
# Running the backend
# --------------------------------------------------------------------------------------------


def _features(n, m, d, dtype, *, seed=0, normalize=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(m, d, generator=gen, dtype=torch.float64)
    if normalize:  # cosine similarities, as contrastive losses use
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    return q.to(dtype), k.to(dtype)


def _upstream(length, gen, zeros=True):
    """A random upstream gradient with some exact zeros (terms that must contribute 0)."""
    x = torch.randn(length, generator=gen)
    if zeros:
        x[::5] = 0.0
    return x


def run(q, k, scale, *, col_bias=None, self_offset=None, compute_col=False, positive_index=None, row_labels=None,
        col_labels=None, positive_sum=False, positive_lse=False, needs_dq=True, needs_dk=True, needs_dbias=False,
        deterministic=False, seed=0, zeros=True, wide=None, shift_range=None, fwd_config=None, bwd_config=None):
    """Forward and backward with poisoned outputs and random upstream gradients; returns
    (stats, grads, upstream gradients)."""
    gen = torch.Generator().manual_seed(seed + 100)
    n, m = q.shape[0], k.shape[0]
    scale = torch.tensor(scale, dtype=torch.float32)
    positives = dict(positive_index=positive_index, row_labels=row_labels, col_labels=col_labels)
    extra = {} if shift_range is None else dict(shift_range=shift_range)
    with poison_outputs():
        stats = lse_forward(q, k, scale, col_bias=col_bias, self_offset=self_offset, compute_col=compute_col,
                            positive_sum=positive_sum, positive_lse=positive_lse, config=fwd_config, **positives,
                            **extra)
        up = dict(g=_upstream(n, gen, zeros), h=_upstream(m, gen, zeros) if compute_col else None,
                  w=_upstream(n, gen, zeros) if positive_sum else None,
                  u=_upstream(n, gen, zeros) if positive_lse else None)
        grads = lse_backward(q, k, scale, stats, grad_row=up["g"], grad_col=up["h"], grad_positive_sum=up["w"],
                             grad_positive_lse=up["u"], col_bias=col_bias, self_offset=self_offset,
                             needs_dq=needs_dq, needs_dk=needs_dk, needs_dbias=needs_dbias,
                             deterministic=deterministic, config=bwd_config, wide=wide, **positives)
    return stats, grads, up


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check(q, k, scale, *, col_bias=None, self_offset=None, compute_col=False, positive_index=None,
          row_labels=None, col_labels=None, positive_sum=False, positive_lse=False, needs_dq=True, needs_dk=True,
          needs_dbias=False, deterministic=False, **kwargs):
    """Run the backend and compare every output with the float64 reference."""
    flags = dict(col_bias=col_bias, self_offset=self_offset, positive_index=positive_index, row_labels=row_labels,
                 col_labels=col_labels)
    stats, grads, up = run(q, k, scale, compute_col=compute_col, positive_sum=positive_sum,
                           positive_lse=positive_lse, needs_dq=needs_dq, needs_dk=needs_dk, needs_dbias=needs_dbias,
                           deterministic=deterministic, **flags, **kwargs)
    n, m = q.shape[0], k.shape[0]
    assert isinstance(stats, LseStats) and isinstance(grads, LseGrads)
    s = torch.tensor(scale, dtype=torch.float32)
    truth = reference(q, k, s, **flags, **up)

    # Forward: shapes, dtypes, -inf where the truth has it, fp32-level accuracy.
    expected_shapes = dict(row_lse=n, col_lse=m if compute_col else 0, positive_sum=n if positive_sum else 0,
                           positive_lse=n if positive_lse else 0)
    for name, length in expected_shapes.items():
        ours = getattr(stats, name)
        assert ours.dtype == torch.float32 and ours.shape == (length,), (name, ours.dtype, ours.shape)
        if not length:
            continue
        want = truth[name]
        assert not ours.isnan().any(), f"{name}: NaN (an element never written?)"
        assert torch.equal(ours.isneginf(), want.isneginf()), f"{name}: -inf pattern differs"
        finite = want.isfinite()
        magnitude = truth["magnitude_psum" if name == "positive_sum" else "magnitude_z"].item()
        err = _max_err(ours[finite], want[finite])
        assert err <= _STAT_TOL * (1.0 + magnitude), f"{name}: error {err:.3g} (magnitude {magnitude:.3g})"

    # Backward.
    assert (grads.dq is None) == (not needs_dq) and (grads.dk is None) == (not needs_dk)
    assert (grads.dbias is None) == (not needs_dbias)
    assert grads.dscale.dtype == torch.float32 and grads.dscale.shape == ()
    low = None
    for name, ours in (("dq", grads.dq), ("dk", grads.dk)):
        if ours is None:
            continue
        want = truth[name]
        assert ours.dtype == q.dtype and ours.shape == want.shape, (name, ours.dtype, ours.shape)
        assert not ours.isnan().any(), f"{name}: NaN (an element never written?)"
        if low is None:  # PyTorch's error in the input dtype (same formulas, same dtype)
            low = reference(q, k, s, **flags, **up, dtype=q.dtype)
        budget = _max_err(low[name], want) + _GRAD_TOL[q.dtype] * want.abs().max().item()
        err = _max_err(ours, want)
        assert err <= budget + 1e-12, f"{name}: error {err:.3g} > budget {budget:.3g} ({q.dtype})"
    err = abs(grads.dscale.item() - truth["dscale"].item())
    assert err <= _STAT_TOL * (1.0 + truth["magnitude_dscale"].item()), f"dscale: error {err:.3g}"
    if needs_dbias:
        assert grads.dbias.dtype == torch.float32 and grads.dbias.shape == (m,)
        err = _max_err(grads.dbias, truth["dbias"])
        assert err <= _STAT_TOL * (1.0 + truth["magnitude_dbias"].item()), f"dbias: error {err:.3g}"
    return stats, grads


# --------------------------------------------------------------------------------------------
# Feature coverage: every feature at least once on a multi-tile problem, not the full product
# --------------------------------------------------------------------------------------------


def _labels(length, classes, seed):
    return torch.randint(0, classes, (length,), generator=torch.Generator().manual_seed(seed))


CASES = {
    # CLIP-like: symmetric, index positives (the diagonal), positive_sum and positive_lse terms.
    "clip_index_bf16": dict(shape=(130, 70, 60), dtype=torch.bfloat16, scale=14.3, compute_col=True,
                            positive_index=lambda n, m: torch.arange(n) % m, positive_sum=True,
                            positive_lse=True),
    # NT-Xent-like: q is k, self excluded (offset 0), partner at i + n/2, fp32, deterministic.
    "ntxent_offset0_fp32": dict(shape=(130, 130, 60), dtype=torch.float32, scale=2.0, self_offset=0, same=True,
                                positive_index=lambda n, m: (torch.arange(n) + n // 2) % n, positive_sum=True,
                                deterministic=True),
    # SupCon-like: labels, self excluded, both positive statistics, column term, bias, fp16.
    "supcon_labels_fp16": dict(shape=(130, 70, 60), dtype=torch.float16, scale=10.0, self_offset=0,
                               compute_col=True, labels=5, positive_sum=True, positive_lse=True, bias=True,
                               needs_dbias=True),
    # Distributed strip: 40 local rows against 130 global keys, own keys at offset 50; D = 130
    # (wide backward), labels positives, deterministic, keys frozen.
    "strip_offset50_bf16": dict(shape=(40, 130, 130), dtype=torch.bfloat16, scale=14.3, self_offset=50,
                                compute_col=True, labels=3, positive_sum=True, bias=True, deterministic=True,
                                needs_dk=False, needs_dbias=True),
    # MoCo-like: a long queue, index positives with some rows without one (-1, out of range),
    # frozen keys, positive_lse only, negative offset.
    "moco_queue_fp32": dict(shape=(33, 150, 20), dtype=torch.float32, scale=5.0, self_offset=-7,
                            positive_index=lambda n, m: torch.where(torch.arange(n) % 4 == 0, -1,
                                                                    torch.where(torch.arange(n) % 7 == 0, m + 3,
                                                                                torch.arange(n) * 3 % m)),
                            positive_lse=True, needs_dk=False),
    # NCA / uniformity: a column bias, symmetric, nothing else, dq only via the rows kernel.
    "bias_symmetric_bf16": dict(shape=(70, 130, 130), dtype=torch.bfloat16, scale=3.0, compute_col=True, bias=True,
                                needs_dk=False, needs_dbias=True, deterministic=False),
    # Large logits (scale 100, unnormalised): tiles whose statistics spread beyond the
    # single-shift range, so both forward schemes run; labels and dk only.
    "scale100_spread_bf16": dict(shape=(48, 40, 16), dtype=torch.bfloat16, scale=100.0, normalize=False,
                                 compute_col=True, labels=4, positive_lse=True, needs_dq=False),
    # Tiny and odd.
    "one_by_one_fp32": dict(shape=(1, 1, 1), dtype=torch.float32, scale=1.0, compute_col=True),
    "odd_small_fp16": dict(shape=(7, 13, 3), dtype=torch.float16, scale=14.3, compute_col=True, self_offset=2,
                           positive_index=lambda n, m: torch.arange(n) + 2, positive_sum=True),
}


def _case_inputs(case):
    n, m, d = case["shape"]
    q, k = _features(n, m, d, case["dtype"], seed=n + m + d, normalize=case.get("normalize", True))
    if case.get("normalize") is False:
        q, k = q * 0.6, k * 0.6
    if case.get("same"):
        k = q
    kwargs = {key: case[key] for key in ("compute_col", "self_offset", "positive_sum", "positive_lse", "needs_dq",
                                         "needs_dk", "needs_dbias", "deterministic") if key in case}
    if "positive_index" in case:
        kwargs["positive_index"] = case["positive_index"](n, m)
    if "labels" in case:
        kwargs["row_labels"] = _labels(n, case["labels"], 1)
        kwargs["col_labels"] = _labels(m, case["labels"], 2)
        if case.get("self_offset") == 0 and n <= m:
            kwargs["col_labels"][:n] = kwargs["row_labels"]  # own key carries own label
    if case.get("bias"):
        kwargs["col_bias"] = -0.5 * case["scale"] * (k.double() ** 2).sum(1).float()  # b_j = -s'|k_j|^2
    return q, k, kwargs


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
    case = CASES[name]
    q, k, kwargs = _case_inputs(case)
    check(q, k, case["scale"], **kwargs)


def test_both_forward_exp_schemes_agree_with_the_reference():
    """The single-shift forward (one exponential per logit) and the two-shift one (forced with
    a negative range) both match the truth, on tiles with small and with large spreads."""
    case = CASES["scale100_spread_bf16"]
    q, k, kwargs = _case_inputs(case)
    stats_one, _ = check(q, k, case["scale"], **kwargs)
    stats_two, _ = check(q, k, case["scale"], shift_range=-1.0, **kwargs)
    # Within fp32 rounding of each other, not identical (different exponentials).
    assert _max_err(stats_one.row_lse, stats_two.row_lse) <= 1e-4
    # The spread of this problem exceeds the single-shift range somewhere (both schemes ran).
    z = 100.0 * (q.double() @ k.double().T) * math.log2(math.e)
    tile_spread = max((z[r:r + 16, c:c + 16].max() - z[r:r + 16, c:c + 16].amax(dim=1).min()).item()
                      for r in range(0, 48, 16) for c in range(0, 40, 16))
    assert tile_spread > 64, tile_spread


@pytest.mark.parametrize("wide", [False, True], ids=["dk-in-registers", "wide"])
def test_fused_backward_forms(wide):
    """Both forms of the non-deterministic fused kernel on D = 130 (three output chunks of 64 in
    the interpreter; the default picks "wide" there, so the chunked grid is forced once)."""
    q, k = _features(37, 45, 130, torch.float16, seed=4)
    check(q, k, 14.3, compute_col=True, positive_index=torch.arange(37), positive_sum=True, wide=wide)


def test_deterministic_matches_fast_path_and_is_reproducible():
    q, k = _features(50, 66, 40, torch.bfloat16, seed=5)
    kwargs = dict(compute_col=True, row_labels=_labels(50, 4, 3), col_labels=_labels(66, 4, 4), positive_sum=True,
                  positive_lse=True, needs_dbias=True, col_bias=torch.randn(66))
    _, fast = check(q, k, 7.0, **kwargs)
    _, det = check(q, k, 7.0, deterministic=True, **kwargs)
    _, again = run(q, k, 7.0, deterministic=True, **kwargs)[:2]
    for name in ("dq", "dk", "dscale", "dbias"):
        assert torch.equal(getattr(det, name), getattr(again, name)), name
        assert _max_err(getattr(det, name), getattr(fast, name)) <= 2e-2 * getattr(fast, name).abs().max().item()


def test_gradient_flags_skip_outputs():
    q, k = _features(20, 30, 16, torch.float32, seed=6)
    for needs_dq, needs_dk, needs_dbias in ((False, False, False), (False, True, False), (True, False, True)):
        for deterministic in (False, True):
            check(q, k, 3.0, compute_col=True, needs_dq=needs_dq, needs_dk=needs_dk, needs_dbias=needs_dbias,
                  deterministic=deterministic, col_bias=torch.randn(30) if needs_dbias else None)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(19, 40, generator=gen).T  # (40, 19), strides (1, 40)
    k = torch.randn(33, 38, generator=gen)[:, ::2]  # (33, 19), stride 2 along D
    check(q, k, 2.5, compute_col=True, self_offset=1, positive_index=torch.arange(40) % 33, positive_sum=True)


def test_rows_with_nothing_allowed_and_no_positives():
    """A single key excluded for the single query: row_lse = -inf, positive_sum = 0,
    positive_lse = -inf, gradients 0 (never NaN); no positives at all: the same."""
    q, k = _features(1, 1, 8, torch.float32)
    stats, grads = check(q, k, 3.0, self_offset=0, compute_col=True, positive_index=torch.zeros(1, dtype=torch.long),
                         positive_sum=True, positive_lse=True)
    assert stats.row_lse.isneginf().all() and stats.col_lse.isneginf().all()
    assert (stats.positive_sum == 0).all() and stats.positive_lse.isneginf().all()
    assert (grads.dq == 0).all() and (grads.dk == 0).all() and grads.dscale == 0
    q, k = _features(9, 5, 8, torch.float32)
    stats, _ = check(q, k, 3.0, positive_sum=True, positive_lse=True)
    assert (stats.positive_sum == 0).all() and stats.positive_lse.isneginf().all()


def test_nan_inputs_propagate():
    """A NaN in q_3 makes row 3's statistics NaN, and every column's (row 3 is in each); the
    other rows stay finite. Gradients are NaN where the reference's are."""
    q, k = _features(21, 18, 20, torch.float32)
    q[3, 4] = float("nan")
    scale = torch.tensor(14.3)
    labels = _labels(21, 3, 7), _labels(18, 3, 8)
    stats = lse_forward(q, k, scale, col_bias=None, self_offset=None, compute_col=True, positive_index=None,
                        row_labels=labels[0], col_labels=labels[1], positive_sum=True, positive_lse=True)
    others = torch.arange(21) != 3
    assert stats.row_lse[3].isnan() and stats.row_lse[others].isfinite().all()
    assert stats.col_lse.isnan().all()
    assert stats.positive_sum[3].isnan() and stats.positive_sum[others].isfinite().all()
    g = torch.ones(21)
    grads = lse_backward(q, k, scale, stats, grad_row=g, grad_col=None, grad_positive_sum=None,
                         grad_positive_lse=None, col_bias=None, self_offset=None, positive_index=None,
                         row_labels=None, col_labels=None, needs_dq=True, needs_dk=True, needs_dbias=True,
                         deterministic=False)
    truth = reference(q, k, scale, g=g)
    for name in ("dq", "dk", "dbias"):
        assert torch.equal(getattr(grads, name).isnan(), truth[name].isnan()), name
    assert grads.dscale.isnan()


def test_large_logits_do_not_overflow():
    """scale 100 on aligned vectors: S_ii = 100; exp(100) overflows fp32 unless shifted."""
    q = torch.nn.functional.normalize(torch.randn(20, 16), dim=1).bfloat16()
    stats = lse_forward(q, q, torch.tensor(100.0), col_bias=None, self_offset=None, compute_col=True,
                        positive_index=None, row_labels=None, col_labels=None, positive_sum=False,
                        positive_lse=False)
    assert stats.row_lse.isfinite().all() and (stats.row_lse >= 99.0).all() and (stats.col_lse >= 99.0).all()


# --------------------------------------------------------------------------------------------
# Launch geometry and validation
# --------------------------------------------------------------------------------------------


def test_forward_grid_bounds_the_workspaces():
    """Column statistics: row groups x column splits reach min_programs with workspaces of
    about 16 sqrt(P N M) bytes; without them one row block per program."""
    config = ForwardConfig(block_m=128, block_n=64, block_d=64, num_warps=8, num_stages=3)
    for n, m in ((65536, 65536), (4_194_304, 4_194_304), (256, 65536), (1_048_576, 4096)):
        groups, per_group, splits, per_split = forward_grid(n, m, True, config)
        assert groups * per_group >= -(-n // 128) and splits * per_split >= -(-m // 64)
        assert groups * splits >= min(config.min_programs, -(-n // 128) * -(-m // 64))
        workspace = 8 * (splits * n + groups * m)
        assert workspace <= 3 * 16 * math.sqrt(config.min_programs * n * m) + 8 * (n + m), (n, m, workspace)
    assert forward_grid(1000, 1000, False, config)[:2] == (8, 1)


def test_backward_plan_uses_no_float_atomics_when_deterministic():
    config = BackwardConfig(block_m=64, block_n=64, block_d=64, block_do=128, num_warps=8, num_stages=3)
    for d in (64, 768):
        for needs in range(8):
            needs_dq, needs_dk, needs_dbias = (bool(needs >> bit & 1) for bit in range(3))
            plan = backward_plan(4096, 4096, d, config, needs_dq=needs_dq, needs_dk=needs_dk,
                                 needs_dbias=needs_dbias, deterministic=True)
            for launch in plan:
                assert launch["kernel"] == "rows" or (not launch["NEEDS_DQ"] and not launch["WIDE"]
                                                      and launch["dk_mode"] != 1), launch
            assert any(launch["kernel"] == "rows" for launch in plan) == needs_dq


def _kwargs(**overrides):
    base = dict(col_bias=None, self_offset=None, compute_col=False, positive_index=None, row_labels=None,
                col_labels=None, positive_sum=False, positive_lse=False)
    return base | overrides


@pytest.mark.parametrize("args, overrides, error, match", [
    ((torch.zeros(3), torch.zeros(4, 2)), {}, ValueError, "2-D"),
    ((torch.zeros(3, 2), torch.zeros(4, 5)), {}, ValueError, "same D"),
    ((torch.zeros(3, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)), {}, ValueError, "dtype"),
    ((torch.zeros(3, 2), torch.zeros(4, 2).half()), {}, ValueError, "dtype"),
    ((torch.zeros(3, 2), torch.zeros(4, 2)), dict(col_bias=torch.zeros(3)), ValueError, "col_bias"),
    ((torch.zeros(3, 2), torch.zeros(4, 2)), dict(self_offset=1.5), TypeError, "self_offset"),
    ((torch.zeros(3, 2), torch.zeros(4, 2)), dict(compute_col=1), TypeError, "compute_col"),
    ((torch.zeros(3, 2), torch.zeros(4, 2)), dict(positive_index=torch.zeros(4, dtype=torch.long)), ValueError,
     "positive_index"),
    ((torch.zeros(3, 2), torch.zeros(4, 2)), dict(positive_index=torch.zeros(3)), ValueError, "integers"),
    ((torch.zeros(3, 2), torch.zeros(4, 2)), dict(row_labels=torch.zeros(3, dtype=torch.long)), ValueError,
     "together"),
    ((torch.zeros(3, 2), torch.zeros(4, 2)), dict(positive_index=torch.zeros(3, dtype=torch.long),
                                                  row_labels=torch.zeros(3, dtype=torch.long),
                                                  col_labels=torch.zeros(4, dtype=torch.long)), ValueError, "not both"),
])
def test_forward_rejects_bad_arguments(args, overrides, error, match):
    with pytest.raises(error, match=match):
        lse_forward(*args, torch.tensor(1.0), **_kwargs(**overrides))


def test_backward_rejects_bad_arguments():
    q, k = torch.zeros(3, 2), torch.zeros(4, 2)
    stats = lse_forward(q, k, torch.tensor(1.0), **_kwargs())
    base = dict(grad_row=torch.ones(3), grad_col=None, grad_positive_sum=None, grad_positive_lse=None,
                col_bias=None, self_offset=None, positive_index=None, row_labels=None, col_labels=None,
                needs_dq=True, needs_dk=True, needs_dbias=False, deterministic=False)
    with pytest.raises(ValueError, match="grad_row"):
        lse_backward(q, k, torch.tensor(1.0), stats, **(base | dict(grad_row=torch.ones(4))))
    with pytest.raises(ValueError, match="col_lse"):  # a column term needs the column statistics
        lse_backward(q, k, torch.tensor(1.0), stats, **(base | dict(grad_col=torch.ones(4))))
    with pytest.raises(ValueError, match="positive_lse"):
        lse_backward(q, k, torch.tensor(1.0), stats, **(base | dict(grad_positive_lse=torch.ones(3))))
    with pytest.raises(TypeError, match="deterministic"):
        lse_backward(q, k, torch.tensor(1.0), stats, **(base | dict(deterministic=None)))
    with pytest.raises(TypeError, match="stats"):
        lse_backward(q, k, torch.tensor(1.0), stats.row_lse, **base)
