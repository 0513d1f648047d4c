"""Triton kernels of the SigLIP loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training"), tiled: the N x M logits are never stored.

Notation: x (N, D) image features (queries), y (M, D) text features (keys), t = ``scale``, b =
``bias`` (both 0-dim, read by the kernels: no host synchronisation), ``offset``: row i's positive
is column i + offset (0 in one process, rank * B when a rank's rows meet the global texts).

    s_ij = t x_i . y_j + b,     z_ij = +1 if j == i + offset else -1
    row_loss_i = sum_j softplus(-z_ij s_ij)                                   (N,) fp32

softplus(v) = max(v, 0) + log1p(e^-|v|) never overflows. log1p(e) for e = e^-|v| in (0, 1] is
2 atanh(w) = 2 (w + w^3/3 + ... + w^15/15), w = e / (2 + e) <= 1/3: the truncation is below
(1/9)^8 / 17 < 2e-9 relative, and no log of a number near 1 is taken (``log(1 + e)`` loses all
relative precision once e < 2^-24, and the GPU's approximate ``lg2`` has an absolute error of
2^-22 near 1). Cost per logit: one ``ex2``, one division, 8 FMAs.

Backward, for an upstream gradient u (N,) of the row losses (recomputing each tile):

    G_ij = d/ds_ij = -z_ij sigmoid(-z_ij s_ij) u_i
    dx = t G y,   dy = t G^T x,   dt = sum_ij G_ij (x_i . y_j),   db = sum_ij G_ij

sigmoid(v) = (1 if v >= 0 else e) / (1 + e), e = e^-|v| (never overflows): one ``ex2`` and one
division per logit.

Kernels (the structure of :mod:`csrc_triton.triton_lse`, whose tile helpers are shared):
  * forward, grid (row blocks, column splits): a program walks its column range for one row
    block, accumulating the row sums in fp32 registers, and writes one (splits, N) partial; a
    fixed-order sum over the splits gives the row losses (deterministic, no atomics). 2NMD flops.
  * backward "cols" (grid: key blocks, output-D chunks, row splits): dy_j = t sum_i G_ij x_i in
    registers; with NEEDS_DQ also dx (fp32 atomics: the fast path, ``deterministic=False``);
    WIDE (D > 2 BLOCK_DO, both gradients): every tile once, a loop over the output chunks with
    dx and dy added atomically.
  * backward "rows" (grid: query blocks, output-D chunks, column splits): dx_i = t sum_j G_ij y_j
    in registers (no atomics).
  Flops (n_do = ceil(D / BLOCK_DO)): fused 2NMD n_do + 4NMD (6NMD at D <= BLOCK_DO; wide: 6NMD),
  so 8NMD with the forward; ``deterministic=True`` runs "rows" for dx and "cols" for dy, each
  2NMD n_do + 2NMD, with fixed-order sums of fp32 partials and no floating-point atomic:
  bitwise reproducible. dt and db are per-program partials summed in a fixed order, always.

Precision: tile products accumulate in fp32 (fp32 inputs: IEEE products, as PyTorch's fp32
matmul); G is formed in fp32 and rounded to a 16-bit input dtype for the dx / dy tensor-core
products (as PyTorch's own 16-bit backward rounds its gradient); dt and db from the fp32 G. A
NaN input gives NaN losses and gradients where the float64 formula has them (nothing here
drops NaN: no max/min over the tile).

Example::

    rows = siglip_forward(x, y, torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda"), offset=0)
    dx, dy, dt, db = siglip_backward(x, y, scale, bias, grad_rows, offset=0, needs_dx=True, needs_dy=True,
                                     deterministic=False)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._alloc import empty
from .tile_configs import CONFIGS, BackwardConfig, ForwardConfig, config_name
from .triton_lse import (
    _EPILOGUE_BLOCK,
    _apply_grad_cols,
    _backward_offsets,
    _dot_precision,
    _interpreting,
    _narrow_dq_keys,
    _rows_dq_step,
    _splits,
    _store_dk,
    _store_dq,
    _sum_kernel,
    _sum_splits_kernel,
    _tile_dot,
    _tile_safe,
)

__all__ = ["siglip_forward", "siglip_backward", "backward_plan", "forward_grid"]

_LOG2E = tl.constexpr(1.4426950408889634)

# Runtime scalars Triton must not specialise (an integer equal to 1 would become a constant):
# the compiled variants are exactly the constexpr combinations static_check compiles.
RUNTIME_SCALARS = ("pos_offset", "needs_scalars", "dk_mode", "direct", "col_blocks_per_split",
                   "row_blocks_per_split", "splits")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Tiles: the LSE engine's (csrc_triton.tile_configs: the row-statistics forward, the backward),
#: except where SigLIP's kernels need their own. sm_90 fp32 (IEEE products on FMA units, so
#: registers hold whole fp32 tiles): with the LSE shapes ptxas capped the forward and five of
#: the seven backward variants at 128 registers and spilled 8-44 bytes; these compile with no
#: spill (python -m csrc_triton.static_check --family siglip). 16-bit: no spill with the shared ones.
SIGLIP_OVERRIDES: dict[str, tuple[ForwardConfig, BackwardConfig]] = {
    "sm90-32": (ForwardConfig(block_m=64, block_n=64, block_d=32, num_warps=8, num_stages=2),
                BackwardConfig(block_m=32, block_n=64, block_d=32, block_do=32, num_warps=4, num_stages=2,
                               block_do_wide=16)),
}


def siglip_configs(name: str) -> tuple[ForwardConfig, BackwardConfig]:
    """(forward, backward) tiles of SigLIP's kernels for a :data:`csrc_triton.tile_configs.CONFIGS` name."""
    if name in SIGLIP_OVERRIDES:
        return SIGLIP_OVERRIDES[name]
    return CONFIGS[name].forward, CONFIGS[name].backward


def _configs(device: torch.device, dtype: torch.dtype) -> tuple[ForwardConfig, BackwardConfig]:
    return siglip_configs(config_name(device, dtype, _interpreting()))
_INT32_LIMIT = 2**31
_MAX_D = 2**20


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _softplus(v):
    """max(v, 0) + log1p(e^-|v|), log1p(e) = 2 atanh(e / (2 + e)) by its series (module docstring)."""
    e = tl.exp2(-tl.abs(v) * _LOG2E)
    w = e / (2.0 + e)
    w2 = w * w
    p = 1.0 / 15.0
    p = p * w2 + 1.0 / 13.0
    p = p * w2 + 1.0 / 11.0
    p = p * w2 + 1.0 / 9.0
    p = p * w2 + 1.0 / 7.0
    p = p * w2 + 1.0 / 5.0
    p = p * w2 + 1.0 / 3.0
    p = p * w2 + 1.0
    return tl.where(v > 0.0, v, 0.0) + 2.0 * w * p


@triton.jit
def _signed_logits(dot, scale, bias, offs_m, offs_n, pos_offset):
    """v_ij = -z_ij s_ij: s_ij on the negatives, -s_ij on the positive j == i + offset."""
    s = dot * scale + bias
    positive = offs_n[None, :] == (offs_m + pos_offset)[:, None]
    return tl.where(positive, -s, s), positive


@triton.jit
def _grad_tile(dot, scale, bias, offs_m, offs_n, row_ok, col_ok, pos_offset, u):
    """G_ij = -z_ij sigmoid(-z_ij s_ij) u_i on the tile (0 outside the matrix), fp32."""
    v, positive = _signed_logits(dot, scale, bias, offs_m, offs_n, pos_offset)
    e = tl.exp2(-tl.abs(v) * _LOG2E)
    sig = tl.where(v >= 0.0, 1.0, e) / (1.0 + e)  # a NaN v gives a NaN e, hence a NaN sigmoid
    g = tl.where(positive, -sig, sig) * u[:, None]
    return tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=RUNTIME_SCALARS)
def _siglip_forward_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr,
    ws_ptr,  # fp32 (splits, N): partial row sums
    N, M, D,
    stride_qn, stride_qd, stride_kn, stride_kd,
    pos_offset, col_blocks_per_split,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (row block, column split): sum_j softplus(-z_ij s_ij) over its column blocks."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)

    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_offs = local_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    kt_offs = local_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    q_step = BLOCK_D * stride_qd
    k_step = BLOCK_D * stride_kd

    row0 = pid_m * BLOCK_M
    offs_m = row0 + local_m
    row_ok = offs_m < N
    q_block = q_ptr + row0.to(tl.int64) * stride_qn
    first_cb = split * col_blocks_per_split
    last_cb = tl.minimum(first_cb + col_blocks_per_split, tl.cdiv(M, BLOCK_N))
    col0 = first_cb * BLOCK_N
    k_block = k_ptr + col0.to(tl.int64) * stride_kn
    acc = tl.zeros([BLOCK_M], tl.float32)
    for _cb in range(first_cb, last_cb):
        offs_n = col0 + local_n
        col_ok = offs_n < M
        dot = _tile_dot(q_block, k_block, q_offs, kt_offs, q_step, k_step, row_ok, col_ok, offs_d, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)
        v, _positive = _signed_logits(dot, scale, bias, offs_m, offs_n, pos_offset)
        loss = _softplus(v)
        acc += tl.sum(tl.where(row_ok[:, None] & col_ok[None, :], loss, 0.0), axis=1)
        col0 += BLOCK_N
        k_block += BLOCK_N * stride_kn
    tl.store(ws_ptr + split.to(tl.int64) * N + offs_m, acc, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=RUNTIME_SCALARS)
def _siglip_backward_cols_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, grad_ptr,
    dq_acc_ptr,  # (N, D) fp32 zeroed: dx added atomically (NEEDS_DQ)
    dk_ptr,  # (M, D) in y's dtype: direct store (dk_mode 0)
    dk_acc_ptr,  # fp32 (M, D) zeroed for atomics (dk_mode 1) or (splits, M, D) partials (dk_mode 2)
    dscale_part_ptr, dbias_part_ptr,  # (splits * key blocks,) fp32 each
    N, M, D,
    stride_qn, stride_qd, stride_kn, stride_kd,
    pos_offset, needs_scalars, dk_mode, row_blocks_per_split,
    NEEDS_DQ: tl.constexpr,
    NEEDS_DK: tl.constexpr,
    WIDE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """Program (key block, output-D chunk, row split): dy = t G^T x in registers; dx atomically
    (NEEDS_DQ); partial sums of G * dot (dt) and G (db)."""
    pid_n = tl.program_id(0)
    pid_do = tl.program_id(1)
    split = tl.program_id(2)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)

    col0 = pid_n * BLOCK_N
    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    offs_n = col0 + local_n
    col_ok = offs_n < M
    offs_d = tl.arange(0, BLOCK_D)
    offs_do = pid_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    k_block = k_ptr + col0.to(tl.int64) * stride_kn
    kt_offs, q_offs, q_out_offs, k_out_offs, dq_offs, dk_offs = _backward_offsets(
        local_m, local_n, offs_d, offs_do, D, stride_qn, stride_qd, stride_kn, stride_kd)
    q_step = BLOCK_D * stride_qd
    k_step = BLOCK_D * stride_kd

    k_out = _narrow_dq_keys(k_block, k_out_offs, col_ok, do_ok, NEEDS_DQ and not WIDE, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    dscale = tl.zeros([BLOCK_N], tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    dk_block = dk_acc_ptr + col0.to(tl.int64) * D

    first_rb = split * row_blocks_per_split
    last_rb = tl.minimum(first_rb + row_blocks_per_split, tl.cdiv(N, BLOCK_M))
    row0 = first_rb * BLOCK_M
    q_block = q_ptr + row0.to(tl.int64) * stride_qn
    dq_block = dq_acc_ptr + row0.to(tl.int64) * D
    for _rb in range(first_rb, last_rb):
        offs_m = row0 + local_m
        row_ok = offs_m < N
        u = tl.load(grad_ptr + offs_m, mask=row_ok, other=0.0)
        dot = _tile_dot(q_block, k_block, q_offs, kt_offs, q_step, k_step, row_ok, col_ok, offs_d, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)
        G = _grad_tile(dot, scale, bias, offs_m, offs_n, row_ok, col_ok, pos_offset, u)
        if pid_do == 0:
            if needs_scalars != 0:
                # dt = sum_ij G_ij (x_i . y_j);  db = sum_ij G_ij
                dscale += tl.sum(G * dot, axis=0)
                dbias += tl.sum(G, axis=0)
        # q = x, k = y, s = t: dy_j += t sum_i G_ij x_i, dx_i += t sum_j G_ij y_j
        dk = _apply_grad_cols(G, dk, k_out, scale, q_block, k_block, dq_block, dk_block, q_out_offs, k_out_offs,
                              dq_offs, dk_offs, offs_do, row_ok, col_ok, do_ok, D, stride_qd, stride_kd,
                              NEEDS_DQ, NEEDS_DK, WIDE, UPCAST, DOT_PRECISION, BLOCK_DO)
        row0 += BLOCK_M
        q_block += BLOCK_M * stride_qn
        dq_block += BLOCK_M * D

    if NEEDS_DK and not WIDE:
        _store_dk(dk, scale, dk_ptr, dk_block, dk_offs, col0, col_ok, do_ok, dk_mode, split, M, D)
    if pid_do == 0:
        if needs_scalars != 0:
            slot = split * tl.num_programs(0) + pid_n
            tl.store(dscale_part_ptr + slot, tl.sum(dscale, axis=0))
            tl.store(dbias_part_ptr + slot, tl.sum(dbias, axis=0))


@triton.jit(do_not_specialize=RUNTIME_SCALARS)
def _siglip_backward_rows_kernel(
    q_ptr, k_ptr, scale_ptr, bias_ptr, grad_ptr,
    dq_ptr,  # (N, D) in x's dtype: direct store (one split)
    dq_part_ptr,  # (splits, N, D) fp32 partials (several splits)
    dscale_part_ptr, dbias_part_ptr,  # (splits * query blocks,) fp32 each
    N, M, D,
    stride_qn, stride_qd, stride_kn, stride_kd,
    pos_offset, needs_scalars, direct, col_blocks_per_split,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """Program (query block, output-D chunk, column split): dx = t G y in registers, no atomics."""
    pid_m = tl.program_id(0)
    pid_do = tl.program_id(1)
    split = tl.program_id(2)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)

    row0 = pid_m * BLOCK_M
    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    offs_m = row0 + local_m
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_do = pid_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    q_block = q_ptr + row0.to(tl.int64) * stride_qn
    kt_offs, q_offs, _q_out_offs, k_out_offs, dq_offs, _dk_offs = _backward_offsets(
        local_m, local_n, offs_d, offs_do, D, stride_qn, stride_qd, stride_kn, stride_kd)
    q_step = BLOCK_D * stride_qd
    k_step = BLOCK_D * stride_kd

    u = tl.load(grad_ptr + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    dscale = tl.zeros([BLOCK_M], tl.float32)
    dbias = tl.zeros([BLOCK_M], tl.float32)
    first_cb = split * col_blocks_per_split
    last_cb = tl.minimum(first_cb + col_blocks_per_split, tl.cdiv(M, BLOCK_N))
    col0 = first_cb * BLOCK_N
    k_block = k_ptr + col0.to(tl.int64) * stride_kn
    for _cb in range(first_cb, last_cb):
        offs_n = col0 + local_n
        col_ok = offs_n < M
        dot = _tile_dot(q_block, k_block, q_offs, kt_offs, q_step, k_step, row_ok, col_ok, offs_d, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)
        G = _grad_tile(dot, scale, bias, offs_m, offs_n, row_ok, col_ok, pos_offset, u)
        if pid_do == 0:
            if needs_scalars != 0:
                dscale += tl.sum(G * dot, axis=1)
                dbias += tl.sum(G, axis=1)
        # dx_i += sum_j G_ij y_j   (times t after the loop)
        dq = _rows_dq_step(G, dq, k_block, k_out_offs, col_ok, do_ok, UPCAST, DOT_PRECISION)
        col0 += BLOCK_N
        k_block += BLOCK_N * stride_kn

    _store_dq(dq, scale, dq_ptr, dq_part_ptr, dq_offs, row0, row_ok, do_ok, direct, split, N, D)
    if pid_do == 0:
        if needs_scalars != 0:
            slot = split * tl.num_programs(0) + pid_m
            tl.store(dscale_part_ptr + slot, tl.sum(dscale, axis=0))
            tl.store(dbias_part_ptr + slot, tl.sum(dbias, axis=0))


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------
def _check(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, offset: int) -> None:
    for name, v in (("x", x), ("y", y), ("scale", scale), ("bias", bias)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(v).__name__}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be (N, D) and (M, D) with the same D; got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(x.shape[0], y.shape[0], x.shape[1]) < 1:
        raise ValueError(f"N, M and D must be >= 1; got x {tuple(x.shape)}, y {tuple(y.shape)}")
    if max(x.shape[0], y.shape[0]) >= _INT32_LIMIT // 2 or x.shape[1] >= _MAX_D:
        raise ValueError(f"N and M must be < 2^30 and D < 2^20 (int32 offsets in a tile); "
                         f"got x {tuple(x.shape)}, y {tuple(y.shape)}")
    if x.dtype not in _DTYPES or y.dtype != x.dtype:
        raise ValueError(f"x and y must share a dtype in {_DTYPES} for backend 'triton'; got {x.dtype}, {y.dtype}")
    if len({x.device, y.device, scale.device, bias.device}) != 1:
        raise ValueError(f"x, y, scale and bias must be on one device; got {x.device}, {y.device}, "
                         f"{scale.device}, {bias.device}")
    if scale.numel() != 1 or bias.numel() != 1:
        raise ValueError(f"scale and bias must be 0-dim; got shapes {tuple(scale.shape)}, {tuple(bias.shape)}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int; got {offset!r}")


def _offset_arg(offset: int, n: int, m: int) -> int:
    """Offsets outside [-n, m] put no positive in the matrix: clamped (keeps them int32)."""
    return max(-n, min(m, offset))


def forward_grid(n: int, m: int, config: ForwardConfig) -> tuple[int, int, int]:
    """(row blocks, column splits, column blocks per split) of the forward kernel."""
    row_blocks = triton.cdiv(n, config.block_m)
    splits, per_split = _splits(triton.cdiv(m, config.block_n), row_blocks, config.min_programs)
    return row_blocks, splits, per_split


def siglip_forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, offset: int,
                   config: ForwardConfig | None = None) -> Tensor:
    """Row losses sum_j softplus(-z_ij (t x_i . y_j + b)), (N,) float32 (module docstring).

    Args:
        x: (N, D), y: (M, D), one dtype among float32, bfloat16, float16, on one CUDA device (or
            CPU under Triton's interpreter).
        scale, bias: 0-dim floating tensors on that device (t and b).
        offset: row i's positive is column i + offset (none outside [0, M)).
        config: tile override (tests).
    """
    _check(x, y, scale, bias, offset)
    n, d = x.shape
    m = y.shape[0]
    device = x.device
    if config is None:
        config = _configs(device, x.dtype)[0]
    scale = scale.reshape(()).to(torch.float32)
    bias = bias.reshape(()).to(torch.float32)
    x = _tile_safe(x, config.block_m)
    y = _tile_safe(y, config.block_n)
    row_blocks, splits, per_split = forward_grid(n, m, config)
    ws = torch.empty(splits, n, dtype=torch.float32, device=device)
    _siglip_forward_kernel[(row_blocks, splits)](
        x, y, scale, bias, ws, n, m, d, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        _offset_arg(offset, n, m), per_split,
        DOT_PRECISION=_dot_precision(x.dtype), UPCAST=_interpreting() and x.dtype == torch.bfloat16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    rows = empty(n, dtype=torch.float32, device=device)
    _sum_splits_kernel[(triton.cdiv(n, _EPILOGUE_BLOCK),)](ws, rows, n, splits, BLOCK=_EPILOGUE_BLOCK)
    return rows


def backward_plan(n: int, m: int, d: int, config: BackwardConfig, *, needs_dx: bool, needs_dy: bool,
                  deterministic: bool, wide: bool | None = None) -> list[dict]:
    """The kernel launches of one backward call: kernel ("cols" or "rows"), its constexpr flags,
    grid, splits, blocks per split, dy's output mode and whether it computes dt / db (exactly
    one launch does). Shared by :func:`siglip_backward` and :mod:`csrc_triton.static_check`.

    deterministic: "rows" for dx, "cols" (no atomics) for dy, dt, db. Otherwise dx and dy in one
    "cols" launch (wide when D > 2 BLOCK_DO), dx alone in "rows" unless D is wide."""
    if wide is None:
        wide = d > 2 * config.block_do
    row_blocks = triton.cdiv(n, config.block_m)
    col_blocks = triton.cdiv(m, config.block_n)
    do_chunks = triton.cdiv(d, config.block_do)

    def cols(needs_dx_: bool, needs_dy_: bool, wide_: bool) -> dict:
        do_blocks = do_chunks if (needs_dy_ and not wide_) else 1
        splits, per_split = _splits(row_blocks, col_blocks * do_blocks, config.min_programs)
        if not needs_dy_ or (splits == 1 and not wide_):
            dk_mode = 0
        elif wide_ or not deterministic:
            dk_mode = 1  # fp32 atomics
        else:
            dk_mode = 2  # per-split partials, summed in order
        return dict(kernel="cols", NEEDS_DQ=needs_dx_, NEEDS_DK=needs_dy_, WIDE=wide_,
                    BLOCK_DO=config.wide_block_do if wide_ else config.block_do,
                    grid=(col_blocks, do_blocks, splits), splits=splits, per_split=per_split, dk_mode=dk_mode,
                    scalars=True)

    def rows(scalars: bool) -> dict:
        splits, per_split = _splits(col_blocks, row_blocks * do_chunks, config.min_programs)
        return dict(kernel="rows", BLOCK_DO=config.block_do, grid=(row_blocks, do_chunks, splits), splits=splits,
                    per_split=per_split, scalars=scalars)

    if deterministic:
        plan = [rows(False)] if needs_dx else []
        return plan + [cols(False, needs_dy, False)]
    if needs_dx and needs_dy:
        return [cols(True, True, wide)]
    if needs_dx:
        return [cols(True, False, True)] if wide else [rows(True)]
    return [cols(False, needs_dy, wide and needs_dy)]


def siglip_backward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, grad_rows: Tensor, *, offset: int,
                    needs_dx: bool, needs_dy: bool, deterministic: bool, config: BackwardConfig | None = None,
                    wide: bool | None = None) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    """Gradients of sum_i u_i row_loss_i (u = ``grad_rows``, (N,)) with respect to x, y, t, b.

    Returns (dx (N, D) in x's dtype or None, dy (M, D) in y's dtype or None, dt 0-dim float32,
    db 0-dim float32). ``deterministic``: no floating-point atomics, bitwise reproducible.
    ``config``, ``wide``: test knobs (tiles; force or forbid the wide fused form).
    """
    _check(x, y, scale, bias, offset)
    n, d = x.shape
    m = y.shape[0]
    device = x.device
    if not isinstance(grad_rows, Tensor) or tuple(grad_rows.shape) != (n,) or grad_rows.device != device:
        raise ValueError(f"grad_rows must be a ({n},) tensor on {device}")
    if config is None:
        config = _configs(device, x.dtype)[1]
    f32 = dict(dtype=torch.float32, device=device)
    scale = scale.reshape(()).to(torch.float32)
    bias = bias.reshape(()).to(torch.float32)
    u = grad_rows.to(torch.float32).contiguous()
    x = _tile_safe(x, config.block_m)
    y = _tile_safe(y, config.block_n)
    dummy = torch.empty(1, **f32)
    offset = _offset_arg(offset, n, m)
    dx = empty(n, d, dtype=x.dtype, device=device) if needs_dx else None
    dy = empty(m, d, dtype=y.dtype, device=device) if needs_dy else None
    dscale = empty(dtype=torch.float32, device=device)
    dbias = empty(dtype=torch.float32, device=device)
    constexprs = dict(DOT_PRECISION=_dot_precision(x.dtype), UPCAST=_interpreting() and x.dtype == torch.bfloat16,
                      BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
                      num_warps=config.num_warps, num_stages=config.num_stages)
    strides = (x.stride(0), x.stride(1), y.stride(0), y.stride(1))

    for launch in backward_plan(n, m, d, config, needs_dx=needs_dx, needs_dy=needs_dy, deterministic=deterministic,
                                wide=wide):
        splits, grid = launch["splits"], launch["grid"]
        parts = launch["splits"] * grid[0] if launch["scalars"] else 1
        dscale_part, dbias_part = torch.empty(parts, **f32), torch.empty(parts, **f32)
        if launch["kernel"] == "rows":
            direct = splits == 1
            dq_part = dummy if direct else torch.empty(splits, n, d, **f32)
            _siglip_backward_rows_kernel[grid](
                x, y, scale, bias, u, dx, dq_part, dscale_part, dbias_part, n, m, d, *strides,
                offset, int(launch["scalars"]), int(direct), launch["per_split"],
                BLOCK_DO=launch["BLOCK_DO"], **constexprs)
            if not direct:
                _sum_splits_kernel[(triton.cdiv(n * d, _EPILOGUE_BLOCK),)](
                    dq_part, dx, n * d, splits, BLOCK=_EPILOGUE_BLOCK)
        else:
            dk_mode = launch["dk_mode"]
            dq_acc = torch.zeros(n, d, **f32) if launch["NEEDS_DQ"] else dummy
            if launch["NEEDS_DK"] and dk_mode == 1:
                dk_acc = torch.zeros(m, d, **f32)
            elif launch["NEEDS_DK"] and dk_mode == 2:
                dk_acc = torch.empty(splits, m, d, **f32)
            else:
                dk_acc = dummy
            dk_direct = dy if (launch["NEEDS_DK"] and dk_mode == 0) else dummy
            _siglip_backward_cols_kernel[grid](
                x, y, scale, bias, u, dq_acc, dk_direct, dk_acc, dscale_part, dbias_part, n, m, d, *strides,
                offset, int(launch["scalars"]), dk_mode, launch["per_split"],
                NEEDS_DQ=launch["NEEDS_DQ"], NEEDS_DK=launch["NEEDS_DK"], WIDE=launch["WIDE"],
                BLOCK_DO=launch["BLOCK_DO"], **constexprs)
            if launch["NEEDS_DQ"]:
                _sum_splits_kernel[(triton.cdiv(n * d, _EPILOGUE_BLOCK),)](dq_acc, dx, n * d, 1, BLOCK=_EPILOGUE_BLOCK)
            if launch["NEEDS_DK"] and dk_mode != 0:
                _sum_splits_kernel[(triton.cdiv(m * d, _EPILOGUE_BLOCK),)](
                    dk_acc, dy, m * d, splits if dk_mode == 2 else 1, BLOCK=_EPILOGUE_BLOCK)
        if launch["scalars"]:
            _sum_kernel[(1,)](dscale_part, dscale, parts, BLOCK=_EPILOGUE_BLOCK)
            _sum_kernel[(1,)](dbias_part, dbias, parts, BLOCK=_EPILOGUE_BLOCK)
    return dx, dy, dscale, dbias
