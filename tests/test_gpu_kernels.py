"""Compiled Triton kernels on a CUDA GPU, with the shipped tile configurations.

Skipped without CUDA. Triton's interpreter is chosen when Triton is first imported, and
tests/conftest.py turns it on for the CPU suite; so on a CUDA machine the normal run
(``python -m pytest``) runs this file again in a child process with ``TRITON_INTERPRET=0``
(``test_compiled_kernels_in_a_child_process``), or directly::

    TRITON_INTERPRET=0 python -m pytest tests/test_gpu_kernels.py -q

What runs compiled here and cannot be checked by the interpreter: many waves of programs (the
grid and the cross-program merges at real tile sizes), N much larger than M (thousands of row
groups merging one column's statistics), N x D and M x D above 2^31 elements (64-bit offsets),
NaN propagation (compiled ``tl.max`` drops NaN), bitwise reproducibility of
``deterministic=True``, and capture in a CUDA graph (no host synchronisation).

Ground truth is float64 on the GPU, computed block by block (at most 256 MiB of logits at a
time: :func:`reference_stats`, :func:`reference_grads`), from the formulas of
csrc_triton/backend.py. Tolerances: statistics, dscale and dbias at fp32 level; dq/dk by an
error model of one rounding of G to the input dtype plus one rounding of the output,
|err| <= u (|truth| + s (|G| |k|)) with u twice the unit roundoff of bf16 / fp16 (2^-7, 2^-10), and
2^-16 for fp32 (IEEE products; the fp32 sums over M terms and the atomics' order).

``TILECONTRAST_GPU_TESTS_DRY_RUN=1`` runs the same tests on CPU through the interpreter at
small sizes (checks this file's own logic on machines without a GPU).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

DRY_RUN = os.environ.get("TILECONTRAST_GPU_TESTS_DRY_RUN", "0") not in ("", "0")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
COMPILED = HAS_CUDA and not INTERPRETING
DEVICE = "cpu" if DRY_RUN else "cuda"

needs_compiled = pytest.mark.skipif(
    not (COMPILED or (DRY_RUN and INTERPRETING)),
    reason="needs a CUDA GPU and compiled kernels (TRITON_INTERPRET=0); "
           + ("CUDA is available: the suite runs this file in a child process" if HAS_CUDA
              else "no CUDA device here"))
needs_cuda_only = pytest.mark.skipif(not COMPILED, reason="needs a CUDA GPU with compiled kernels")

if COMPILED or DRY_RUN:
    from csrc_triton._alloc import poison_outputs
    from csrc_triton.triton_lse import lse_backward, lse_forward

INF = math.inf
_UNIT = {torch.float32: 2.0**-16, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
_STAT_TOL = 4e-6


def size(gpu: int, dry: int) -> int:
    return dry if DRY_RUN else gpu


def _free_gib() -> float:
    if not HAS_CUDA:
        return 0.0
    free, _total = torch.cuda.mem_get_info()
    return free / 2**30


# --------------------------------------------------------------------------------------------
# Chunked float64 reference of the contract
# --------------------------------------------------------------------------------------------


def _masks(rows, cols, *, self_offset, positive_index, row_labels, col_labels):
    """allowed and positive masks of the (rows x cols) block."""
    i, j = rows[:, None], cols[None, :]
    allowed = torch.ones(len(rows), len(cols), dtype=torch.bool, device=rows.device) if self_offset is None \
        else j != i + self_offset
    if positive_index is not None:
        pos = j == positive_index[rows][:, None]
    elif row_labels is not None:
        pos = row_labels[rows][:, None] == col_labels[cols][None, :]
    else:
        pos = torch.zeros_like(allowed)
    return allowed, pos & allowed


def _blocks(length, step):
    return [torch.arange(start, min(length, start + step), device=DEVICE) for start in range(0, length, step)]


def _block_sizes(n, m, d):
    """Row and column block sizes of the reference: at most 2^25 float64 logits (256 MiB) and
    2^24 float64 features per block."""
    cols = max(1, min(m, 8192, 2**24 // d))
    rows = max(1, min(n, 2**25 // cols, 2**24 // d))
    return rows, cols


def _block(q, k, scale, bias, rows, cols, flags):
    """dot, Z, allowed, positive on one block, in float64."""
    dot = q[rows].double() @ k[cols].double().T
    z = scale.double() * dot
    if bias is not None:
        z = z + bias[cols].double()[None, :]
    return (dot, z, *_masks(rows, cols, **flags))


def reference_stats(q, k, scale, *, col_bias=None, self_offset=None, positive_index=None, row_labels=None,
                    col_labels=None):
    """row_lse, col_lse, positive_sum, positive_lse (float64) and max|Z|, block by block."""
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    flags = dict(self_offset=self_offset, positive_index=positive_index, row_labels=row_labels,
                 col_labels=col_labels)
    f64 = dict(dtype=torch.float64, device=q.device)
    row, plse, col = (torch.full((x,), -INF, **f64) for x in (n, n, m))
    psum, psum_mag = torch.zeros(n, **f64), torch.zeros(n, **f64)
    z_max = 0.0
    row_step, col_step = _block_sizes(n, m, d)
    for rows in _blocks(n, row_step):
        for cols in _blocks(m, col_step):
            _, z, allowed, pos = _block(q, k, scale, col_bias, rows, cols, flags)
            z_allowed = z.masked_fill(~allowed, -INF)
            row[rows] = torch.logaddexp(row[rows], z_allowed.logsumexp(1))
            col[cols] = torch.logaddexp(col[cols], z_allowed.logsumexp(0))
            psum[rows] += torch.where(pos, z, 0.0).sum(1)
            psum_mag[rows] += torch.where(pos, z.abs(), 0.0).sum(1)
            plse[rows] = torch.logaddexp(plse[rows], z.masked_fill(~pos, -INF).logsumexp(1))
            z_max = max(z_max, z.abs().max().item())
    return dict(row_lse=row, col_lse=col, positive_sum=psum, positive_lse=plse, magnitude_z=z_max,
                magnitude_psum=psum_mag.max().item())


def _grad_block(z, allowed, pos, rows, cols, stats, up):
    """G on a (rows x cols) block of logits, from the float64 statistics and upstream gradients."""
    def term(mask, grad, stat, row_side):
        if grad is None:
            return 0.0
        grad = grad.double()[rows if row_side else cols]
        stat = stat[rows if row_side else cols]
        live = (grad != 0) & (stat != -INF)
        grad, stat, live = (x[:, None] if row_side else x[None, :] for x in (grad, stat, live))
        return torch.where(mask & live, grad * (z - stat).exp(), 0.0)

    grad = term(allowed, up["g"], stats["row_lse"], True) + term(allowed, up["h"], stats["col_lse"], False)
    if up["w"] is not None:
        grad = grad + torch.where(pos, up["w"].double()[rows][:, None], 0.0)
    grad = grad + term(pos, up["u"], stats["positive_lse"], True)
    return grad


def reference_grads(q, k, scale, stats, up, *, col_bias=None, self_offset=None, positive_index=None,
                    row_labels=None, col_labels=None, dq_rows=None, dk_cols=None, full=True):
    """dq on ``dq_rows`` (default all), dk and dbias on ``dk_cols`` (default all), and (``full``)
    dscale and dbias over everything, with the error-model magnitudes s (|G| |k|), s (|G|^T |q|),
    sum |G dot| and sum_i |G_ij|; float64, block by block."""
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    device = q.device
    s = scale.double()
    flags = dict(self_offset=self_offset, positive_index=positive_index, row_labels=row_labels,
                 col_labels=col_labels)
    all_rows, all_cols = torch.arange(n, device=device), torch.arange(m, device=device)
    dq_rows = all_rows if dq_rows is None else dq_rows
    dk_cols = all_cols if dk_cols is None else dk_cols
    f64 = dict(dtype=torch.float64, device=device)
    out = dict(dq=torch.zeros(len(dq_rows), d, **f64), dq_mag=torch.zeros(len(dq_rows), d, **f64),
               dk=torch.zeros(len(dk_cols), d, **f64), dk_mag=torch.zeros(len(dk_cols), d, **f64),
               dbias=torch.zeros(m, **f64), dbias_mag=torch.zeros(m, **f64), dscale=0.0, dscale_mag=0.0)
    row_step, col_step = _block_sizes(n, m, d)
    for index in _blocks(len(dq_rows), row_step):  # dq_i = s sum_j G_ij k_j
        rows = dq_rows[index]
        for cols in _blocks(m, col_step):
            _, z, allowed, pos = _block(q, k, scale, col_bias, rows, cols, flags)
            grad = _grad_block(z, allowed, pos, rows, cols, stats, up)
            out["dq"][index] += s * grad @ k[cols].double()
            out["dq_mag"][index] += s.abs() * grad.abs() @ k[cols].double().abs()
    for index in _blocks(len(dk_cols), col_step):  # dk_j = s sum_i G_ij q_i
        cols = dk_cols[index]
        for rows in _blocks(n, row_step):
            _, z, allowed, pos = _block(q, k, scale, col_bias, rows, cols, flags)
            grad = _grad_block(z, allowed, pos, rows, cols, stats, up)
            out["dk"][index] += s * grad.T @ q[rows].double()
            out["dk_mag"][index] += s.abs() * grad.abs().T @ q[rows].double().abs()
    if full:  # dscale = sum_ij G_ij q_i.k_j, dbias_j = sum_i G_ij
        for rows in _blocks(n, row_step):
            for cols in _blocks(m, col_step):
                dot, z, allowed, pos = _block(q, k, scale, col_bias, rows, cols, flags)
                grad = _grad_block(z, allowed, pos, rows, cols, stats, up)
                out["dscale"] += (grad * dot).sum().item()
                out["dscale_mag"] += (grad * dot).abs().sum().item()
                out["dbias"][cols] += grad.sum(0)
                out["dbias_mag"][cols] += grad.abs().sum(0)
    else:
        out["dscale"] = out["dbias"] = None
    return out


# --------------------------------------------------------------------------------------------
# Running and checking
# --------------------------------------------------------------------------------------------


def _upstream(length, gen):
    x = torch.randn(length, generator=gen, device=DEVICE)
    x[::7] = 0.0  # terms with a zero upstream gradient contribute exactly 0
    return x


def run(q, k, scale, *, compute_col, positive_sum, positive_lse, needs_dq=True, needs_dk=True, needs_dbias=False,
        deterministic=False, up=None, seed=0, **flags):
    scale = torch.tensor(scale, dtype=torch.float32, device=q.device)
    with poison_outputs():
        stats = lse_forward(q, k, scale, compute_col=compute_col, positive_sum=positive_sum,
                            positive_lse=positive_lse, **flags)
        if up is None:
            gen = torch.Generator(device=DEVICE).manual_seed(seed)
            n, m = q.shape[0], k.shape[0]
            up = dict(g=_upstream(n, gen), h=_upstream(m, gen) if compute_col else None,
                      w=_upstream(n, gen) if positive_sum else None, u=_upstream(n, gen) if positive_lse else None)
        grads = lse_backward(q, k, scale, stats, grad_row=up["g"], grad_col=up["h"], grad_positive_sum=up["w"],
                             grad_positive_lse=up["u"], needs_dq=needs_dq, needs_dk=needs_dk,
                             needs_dbias=needs_dbias, deterministic=deterministic, **flags)
    return scale, stats, grads, up


def _assert_close(name, ours, want, budget):
    ours = ours.double()
    assert not ours.isnan().any(), f"{name}: NaN (unwritten or wrongly propagated)"
    assert torch.equal(ours.isneginf(), want.isneginf()), f"{name}: -inf pattern differs"
    finite = want.isfinite()
    err = (ours[finite] - want[finite]).abs()
    budget = budget[finite] if isinstance(budget, torch.Tensor) and budget.dim() else budget
    bad = err > budget
    if bad.any():
        worst = err.flatten().argmax()
        there = budget if isinstance(budget, float) else budget.flatten()[worst].item()
        raise AssertionError(f"{name}: {int(bad.sum())} entries over budget, worst error "
                             f"{err.flatten()[worst].item():.3g} (budget there {there:.3g})")


def check_stats(stats, truth, *, compute_col, positive_sum, positive_lse, rows=None):
    mag = 1.0 + truth["magnitude_z"]
    sel = slice(None) if rows is None else rows
    _assert_close("row_lse", stats.row_lse[sel], truth["row_lse"][sel], _STAT_TOL * mag)
    if compute_col:
        _assert_close("col_lse", stats.col_lse, truth["col_lse"], _STAT_TOL * mag)
    if positive_sum:
        _assert_close("positive_sum", stats.positive_sum[sel], truth["positive_sum"][sel],
                      _STAT_TOL * (1.0 + truth["magnitude_psum"]))
    if positive_lse:
        _assert_close("positive_lse", stats.positive_lse[sel], truth["positive_lse"][sel], _STAT_TOL * mag)


def check_grads(grads, ref, dtype, *, dq_rows=None, dk_cols=None):
    unit = _UNIT[dtype]
    if grads.dq is not None:
        dq = grads.dq if dq_rows is None else grads.dq[dq_rows]
        _assert_close("dq", dq, ref["dq"], unit * (ref["dq"].abs() + ref["dq_mag"]) + 1e-30)
    if grads.dk is not None:
        dk = grads.dk if dk_cols is None else grads.dk[dk_cols]
        _assert_close("dk", dk, ref["dk"], unit * (ref["dk"].abs() + ref["dk_mag"]) + 1e-30)
    if ref["dscale"] is not None:
        err = abs(grads.dscale.item() - ref["dscale"])
        assert err <= 1e-5 * (1.0 + ref["dscale_mag"]), f"dscale: error {err:.3g} of {ref['dscale_mag']:.3g}"
        if grads.dbias is not None:
            _assert_close("dbias", grads.dbias, ref["dbias"], 1e-5 * (1.0 + ref["dbias_mag"]))


def _features(n, m, d, dtype, seed=0, normalize=True):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(n, d, generator=gen, device=DEVICE, dtype=torch.float32)
    k = torch.randn(m, d, generator=gen, device=DEVICE, dtype=torch.float32)
    if normalize:
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    return q.to(dtype), k.to(dtype)


def _labels(length, classes, seed):
    return torch.randint(0, classes, (length,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def full_check(q, k, scale, *, compute_col, positive_sum=False, positive_lse=False, needs_dq=True, needs_dk=True,
               needs_dbias=False, deterministic=False, **flags):
    scale_t, stats, grads, up = run(q, k, scale, compute_col=compute_col, positive_sum=positive_sum,
                                    positive_lse=positive_lse, needs_dq=needs_dq, needs_dk=needs_dk,
                                    needs_dbias=needs_dbias, deterministic=deterministic, **flags)
    truth = reference_stats(q, k, scale_t, **flags)
    check_stats(stats, truth, compute_col=compute_col, positive_sum=positive_sum, positive_lse=positive_lse)
    ref = reference_grads(q, k, scale_t, truth, up, **flags)
    check_grads(grads, ref, q.dtype)
    return stats, grads, up


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_many_waves_every_feature(dtype):
    """N = M = 6144 at D = 128: ~50 x 96 forward tiles on 264+ programs, several waves; labels
    positives with both statistics, a column term, a bias, the self pair excluded; fast and
    deterministic backward."""
    n, d = size(6144, 70), size(128, 60)
    q, k = _features(n, n, d, dtype, seed=1)
    flags = dict(col_bias=(-0.1 * (k.float() ** 2).sum(1)).contiguous(), self_offset=0,
                 row_labels=_labels(n, 17, 1), col_labels=_labels(n, 17, 1), positive_index=None)
    for deterministic in (False, True):
        full_check(q, k, 14.3, compute_col=True, positive_sum=True, positive_lse=True, needs_dbias=True,
                   deterministic=deterministic, **flags)


@needs_compiled
def test_index_positives_wide_d():
    """D = 768 (the wide fused form, and the owner kernels with six output chunks when
    deterministic), positives on the diagonal, CLIP-like."""
    n, d = size(4096, 40), size(768, 130)
    q, k = _features(n, n, d, torch.bfloat16, seed=2)
    flags = dict(positive_index=torch.arange(n, device=DEVICE), col_bias=None, self_offset=None,
                 row_labels=None, col_labels=None)
    for deterministic in (False, True):
        full_check(q, k, 100.0, compute_col=True, positive_sum=True, positive_lse=True, deterministic=deterministic,
                   **flags)


@needs_compiled
def test_tall_queries_column_contention():
    """N = 262,144 queries, M = 256 keys: 2,048 row blocks all merging the same 256 columns'
    statistics (the old compare-and-swap hot spot), and dk summed over 4,096 row splits' worth
    of rows; then the transposed shape (MoCo: few queries, a long frozen queue)."""
    n, m, d = size(262_144, 300), size(256, 20), size(64, 16)
    q, k = _features(n, m, d, torch.bfloat16, seed=3)
    flags = dict(col_bias=None, self_offset=None, positive_index=None, row_labels=None, col_labels=None)
    scale_t, stats, grads, up = run(q, k, 10.0, compute_col=True, positive_sum=False, positive_lse=False, **flags)
    truth = reference_stats(q, k, scale_t, **flags)
    check_stats(stats, truth, compute_col=True, positive_sum=False, positive_lse=False)
    rows = torch.cat([torch.arange(0, 64), torch.arange(n - 64, n)]).unique().to(DEVICE)
    ref = reference_grads(q, k, scale_t, truth, up, dq_rows=rows, **flags)
    check_grads(grads, ref, q.dtype, dq_rows=rows)

    n, m = size(512, 20), size(65536, 300)
    q, k = _features(n, m, size(128, 16), torch.bfloat16, seed=4)
    full_check(q, k, 5.0, compute_col=False, positive_lse=True, needs_dk=False,
               positive_index=torch.arange(n, device=DEVICE) * 7, col_bias=None, self_offset=None,
               row_labels=None, col_labels=None)


@needs_compiled
@pytest.mark.parametrize("big", ["queries", "keys"])
def test_more_than_2_31_elements(big):
    """4,194,304 x 768 bf16 (6 GiB, 3.2e9 elements > 2^31) on one side: statistics of sampled
    rows and all columns, dq of the first and last rows, dk of sampled keys, dscale and dbias,
    against a chunked float64 reference. Offsets of the last rows exceed 2^31 elements."""
    n_big, n_small, d = size(4_194_304, 200), size(1024, 24), size(768, 40)
    if not DRY_RUN and _free_gib() < 60:
        pytest.skip(f"needs ~60 GiB of free GPU memory, {_free_gib():.0f} GiB free")
    n, m = (n_big, n_small) if big == "queries" else (n_small, n_big)
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    q = torch.randn(n, d, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(m, d, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    q.mul_(1.0 / math.sqrt(d))
    k.mul_(1.0 / math.sqrt(d))
    flags = dict(col_bias=torch.randn(m, generator=gen, device=DEVICE), self_offset=None, positive_index=None,
                 row_labels=None, col_labels=None)
    scale_t, stats, grads, up = run(q, k, 8.0, compute_col=True, positive_sum=False, positive_lse=False,
                                    needs_dbias=True, **flags)
    truth = reference_stats(q, k, scale_t, **flags)
    check_stats(stats, truth, compute_col=True, positive_sum=False, positive_lse=False)

    def edge(length):  # the first and last 32 indices (the last ones at offsets beyond 2^31 elements)
        index = torch.cat([torch.arange(0, 32), torch.arange(length - 32, length)])
        return index.clamp(0, length - 1).unique().to(DEVICE)

    ref = reference_grads(q, k, scale_t, truth, up, dq_rows=edge(n), dk_cols=edge(m), **flags)
    check_grads(grads, ref, q.dtype, dq_rows=edge(n), dk_cols=edge(m))


@needs_compiled
def test_nan_inputs_propagate_compiled():
    """A NaN in q_3 makes row 3 and every column NaN (compiled tl.max drops NaN; the sums carry
    it); a NaN in k_5 makes column 5 and every row NaN; other entries stay finite. Gradients
    are NaN exactly where the float64 reference's are."""
    n, m, d = size(1000, 40), size(700, 30), size(128, 20)
    for side in ("q", "k"):
        q, k = _features(n, m, d, torch.bfloat16, seed=6)
        (q if side == "q" else k)[3 if side == "q" else 5, 7] = float("nan")
        flags = dict(col_bias=None, self_offset=None, positive_index=None, row_labels=_labels(n, 3, 2),
                     col_labels=_labels(m, 3, 3))
        scale_t, stats, grads, up = run(q, k, 14.3, compute_col=True, positive_sum=True, positive_lse=True,
                                        needs_dbias=False, **flags)
        truth = reference_stats(q, k, scale_t, **flags)
        for name in ("row_lse", "col_lse", "positive_sum", "positive_lse"):
            ours = getattr(stats, name)
            assert torch.equal(ours.isnan(), truth[name].isnan()), f"{side}: {name} NaN pattern"
            assert ours.isnan().any(), f"{side}: {name} lost the NaN"
        ref = reference_grads(q, k, scale_t, truth, up, **flags)
        for name in ("dq", "dk"):
            assert torch.equal(getattr(grads, name).isnan(), ref[name].isnan()), f"{side}: {name} NaN pattern"
        assert grads.dscale.isnan()


@needs_compiled
@pytest.mark.parametrize("shape", [(3000, 5000, 128), (200, 70000, 64), (9000, 300, 768)],
                         ids=["square", "long-queue", "tall-wide"])
def test_deterministic_is_bitwise_reproducible(shape):
    """deterministic=True twice: dq, dk, dscale, dbias bitwise equal; shapes whose grids split the
    other side across programs (fp32 partials) and a wide D."""
    n, m, d = (size(x, y) for x, y in zip(shape, (50, 80, 40)))
    q, k = _features(n, m, d, torch.bfloat16, seed=7)
    flags = dict(col_bias=torch.randn(m, device=DEVICE), self_offset=0, positive_index=None,
                 row_labels=_labels(n, 5, 4), col_labels=_labels(m, 5, 5))
    runs = [run(q, k, 14.3, compute_col=True, positive_sum=True, positive_lse=True, needs_dbias=True,
                deterministic=True, seed=1, **flags) for _ in range(2)]
    for name in ("dq", "dk", "dscale", "dbias"):
        assert torch.equal(getattr(runs[0][2], name), getattr(runs[1][2], name)), name
    for name in ("row_lse", "col_lse", "positive_sum", "positive_lse"):  # the forward is deterministic too
        assert torch.equal(getattr(runs[0][1], name), getattr(runs[1][1], name)), name


@needs_compiled
def test_single_and_double_shift_forward_agree():
    """Scale 100 on unnormalised features: tiles beyond the single-shift range take two
    exponentials per logit; forcing that everywhere (shift_range=-1) changes results only at
    fp32 rounding, and both match the reference."""
    n, m, d = size(2048, 40), size(2048, 40), size(64, 16)
    q, k = _features(n, m, d, torch.bfloat16, seed=8, normalize=False)
    q, k = q * 0.3, k * 0.3
    scale = torch.tensor(100.0, device=DEVICE)
    kwargs = dict(col_bias=None, self_offset=None, compute_col=True, positive_index=None, row_labels=None,
                  col_labels=None, positive_sum=False, positive_lse=False)
    one = lse_forward(q, k, scale, **kwargs)
    two = lse_forward(q, k, scale, shift_range=-1.0, **kwargs)
    truth = reference_stats(q, k, scale)
    for stats in (one, two):
        check_stats(stats, truth, compute_col=True, positive_sum=False, positive_lse=False)


@needs_cuda_only
def test_forward_and_backward_capture_in_a_cuda_graph():
    """No host synchronisation per call: forward + backward capture in a CUDA graph, and a
    replay on new data equals an eager run."""
    n, m, d = 1024, 1536, 128
    q, k = _features(n, m, d, torch.bfloat16, seed=9)
    scale = torch.tensor(14.3, device=DEVICE)
    labels = _labels(n, 7, 6), _labels(m, 7, 7)
    g, h, w = (torch.randn(x, device=DEVICE) for x in (n, m, n))
    kwargs = dict(col_bias=None, self_offset=0, positive_index=None, row_labels=labels[0], col_labels=labels[1])

    def step():
        stats = lse_forward(q, k, scale, compute_col=True, positive_sum=True, positive_lse=False, **kwargs)
        grads = lse_backward(q, k, scale, stats, grad_row=g, grad_col=h, grad_positive_sum=w, grad_positive_lse=None,
                             needs_dq=True, needs_dk=True, needs_dbias=False, deterministic=True, **kwargs)
        return stats, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    new_q, new_k = _features(n, m, d, torch.bfloat16, seed=10)
    q.copy_(new_q)
    k.copy_(new_k)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(captured[0], eager[0]):
        assert torch.equal(a, b)
    for a, b in zip(captured[1], eager[1]):
        assert (a is None and b is None) or torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# SigLIP (csrc_triton.triton_siglip): row sums of softplus(-z s) and their gradients
# --------------------------------------------------------------------------------------------
def _siglip_reference(x, y, scale, bias, offset, up):
    """Row losses, dx, dy, dt, db and the error-model magnitudes, float64 on the device (dense:
    the sizes here are at most 8192 x 8192)."""
    xd, yd = x.double(), y.double()
    dot = xd @ yd.T
    s = scale * dot + bias
    i = torch.arange(x.shape[0], device=x.device)[:, None]
    j = torch.arange(y.shape[0], device=x.device)[None, :]
    z = torch.where(j == i + offset, 1.0, -1.0).double()
    v = -z * s
    rows = (v.clamp_min(0) + torch.log1p(torch.exp(-v.abs()))).sum(1)
    g = -z * torch.sigmoid(v) * up.double()[:, None]
    return dict(rows=rows, rows_mag=(v.abs() + math.log(2.0)).sum(1), dx=scale * g @ yd,
                dx_mag=abs(scale) * g.abs() @ yd.abs(), dy=scale * g.T @ xd, dy_mag=abs(scale) * g.abs().T @ xd.abs(),
                dt=(g * dot).sum().item(), dt_mag=(g * dot).abs().sum().item(), db=g.sum().item(),
                db_mag=g.abs().sum().item())


def _siglip_run(x, y, scale, bias, offset, up, deterministic):
    from csrc_triton.triton_siglip import siglip_backward, siglip_forward

    t = torch.tensor(scale, device=x.device)
    b = torch.tensor(bias, device=x.device)
    with poison_outputs():
        rows = siglip_forward(x, y, t, b, offset=offset)
        grads = siglip_backward(x, y, t, b, up, offset=offset, needs_dx=True, needs_dy=True,
                                deterministic=deterministic)
    return rows, grads


def _siglip_check(x, y, scale, bias, offset, deterministic, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    up = _upstream(x.shape[0], gen)
    rows, (dx, dy, dt, db) = _siglip_run(x, y, scale, bias, offset, up, deterministic)
    ref = _siglip_reference(x, y, scale, bias, offset, up)
    _assert_close("siglip rows", rows, ref["rows"], _STAT_TOL * (1.0 + ref["rows_mag"]))
    unit = _UNIT[x.dtype]
    _assert_close("siglip dx", dx, ref["dx"], unit * (ref["dx"].abs() + ref["dx_mag"]) + 1e-30)
    _assert_close("siglip dy", dy, ref["dy"], unit * (ref["dy"].abs() + ref["dy_mag"]) + 1e-30)
    assert abs(dt.item() - ref["dt"]) <= 1e-5 * (1.0 + ref["dt_mag"]), (dt.item(), ref["dt"])
    assert abs(db.item() - ref["db"]) <= 1e-5 * (1.0 + ref["db_mag"]), (db.item(), ref["db"])
    return rows, (dx, dy, dt, db), up


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [128, 768], ids=["narrow", "wide"])
def test_siglip_many_waves(dtype, d):
    """N = M = 4096 at D = 128 (fused kernel, dy in registers) and D = 768 (wide form; six
    output chunks when deterministic), t = 10, b = -10 (SigLIP's initialisation); both backward
    paths against float64."""
    n, d = size(4096, 70), size(d, 60 if d == 128 else 130)
    x, y = _features(n, n, d, dtype, seed=11)
    for deterministic in (False, True):
        _siglip_check(x, y, 10.0, -10.0, 0, deterministic)


@needs_compiled
def test_siglip_rank_strip_and_saturation():
    """A rank's strip: 1024 images against 4096 texts, positives at offset 2048; t = 100
    (clamped CLIP scale) so most terms are far in the softplus tail."""
    n, m, d = size(1024, 40), size(4096, 90), size(256, 40)
    x, y = _features(n, m, d, torch.bfloat16, seed=12)
    _siglip_check(x, y, 100.0, -10.0, size(2048, 30), deterministic=False)


@needs_compiled
def test_siglip_deterministic_bitwise_and_nan():
    n, d = size(3000, 50), size(768, 130)
    x, y = _features(n, n, d, torch.bfloat16, seed=13)
    up = _upstream(n, torch.Generator(device=DEVICE).manual_seed(1))
    first = _siglip_run(x, y, 10.0, -10.0, 0, up, True)
    second = _siglip_run(x, y, 10.0, -10.0, 0, up, True)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)
    x[3, 7] = float("nan")  # row 3's loss and dx, every dy, dt, db NaN; other rows finite
    rows, (dx, dy, dt, db) = _siglip_run(x, y, 10.0, -10.0, 0, up, False)
    others = torch.arange(n, device=DEVICE) != 3
    assert rows[3].isnan() and rows[others].isfinite().all()
    assert dx[3].isnan().all() and dx[others].isfinite().all()
    assert dy.isnan().all() and dt.isnan() and db.isnan()


@pytest.mark.skipif(not HAS_CUDA or not INTERPRETING or DRY_RUN,
                    reason="runs only on a CUDA machine whose suite has Triton's interpreter on")
def test_compiled_kernels_in_a_child_process():
    """The suite's conftest turns the interpreter on; the compiled tests above then run here,
    in a child process with TRITON_INTERPRET=0."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x",
                             "-p", "no:cacheprovider"], env=env, cwd=root, capture_output=True, text=True,
                            timeout=3000)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
