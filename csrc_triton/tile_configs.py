"""Tile configurations for the LSE kernels in :mod:`csrc_triton.triton_lse`.

Per (device family, input dtype family): a forward configuration for row statistics only, one
for the heavier forward variants (column statistics and/or positives by labels), and a backward
configuration. Every variant the launchers can produce is compiled without a GPU by
:mod:`csrc_triton.static_check` (registers, spills, shared memory, ``wgmma`` use on sm_90); the
full sm_90 table is in docs/kernels.md. Every shipped sm_90 variant compiles with zero spills.

Why these sizes (sm_90)
-----------------------
Forward (a program walks a rectangle of BLOCK_M x BLOCK_N tiles, D in BLOCK_D chunks):

* The tile product runs on ``wgmma``: a warpgroup is 4 warps and one instruction covers 64 rows,
  so BLOCK_M is a multiple of 64 and ``num_warps`` of 4. BLOCK_D = 64 bf16 = 128-byte rows, the
  swizzle wgmma's shared-memory operands want.
* Row statistics only: 128 x 128 with 8 warps: the fp32 accumulator is 64 registers per
  thread, the exponentiated tile as many again; 250 registers, 96 KiB of shared memory for 3
  stages.
* Column statistics or labels: every per-column vector costs as many registers per thread as
  the tile has columns per thread (32 at BLOCK_N = 128), and the column merge keeps five of them
  live; at 128 x 128 these variants spilled 60-236 bytes, at 128 x 64 they use 220-247
  registers and 72 KiB.
* fp32 inputs are multiplied in IEEE fp32 (``input_precision="ieee"``) so that results match
  PyTorch's fp32 matmul; that path uses FMA units, not tensor cores: 64 x 64 x 32 tiles.

Backward (a program owns BLOCK_N keys, or BLOCK_M queries in the "rows" kernel, and one
BLOCK_DO-wide chunk of the output D): it holds the output accumulator (64 x 128 fp32), the
recomputed tile and G, so 64 x 64 tiles (64 rows = one ``wgmma`` slab, and the M side of the
dK = G^T Q product). Each extra output chunk repeats the recompute (FLOP count in
:mod:`csrc_triton.triton_lse`), so BLOCK_DO is as large as registers allow: 128. The "wide" form
(D > 2 BLOCK_DO) loops over the output D inside the program with ``block_do_wide`` = 64: at 128
its labels variant spilled 20 bytes. fp32: 64 x 64 x 32 with BLOCK_DO = 32 and 2 stages; with
one stage ``ptxas`` capped some variants at 64-128 registers and spilled.

sm_80 (``python -m csrc_triton.static_check --arch 80``): bf16/fp16 compile without spills
(``block_do_wide`` = 64 as on sm_90; at 128 the wide form spilled 150-220 bytes); fp32 still
spills 4-16 bytes in 7 of its 48 variants, where ``ptxas`` caps registers at 128-168 on its own
(no tile shape tried removed all of them). The generic configurations are not checked.

Interpreter (``TRITON_INTERPRET=1`` on CPU): 16 x 16 tiles, the smallest ``tl.dot`` accepts, so
tests exercise many tiles, masks and the cross-program merges; the interpreter's cost is per
executed operation, so BLOCK_D = 32 and BLOCK_DO = 64 (32 wide) keep the D loops short.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Tiles of the forward LSE kernel.

    block_m, block_n: the S tile (rows of Q, rows of K); block_d: the D chunk of each tile product;
    min_programs: split the columns across programs until the grid has at least this many.
    """

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    min_programs: int = 264


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the backward kernel.

    block_m, block_n, block_d: the recomputed S tile and its D chunk; block_do: width of the chunk
    of the output D (dQ, dK columns) a program owns; min_programs: split the rows across programs
    until the grid has at least this many.
    """

    block_m: int
    block_n: int
    block_d: int
    block_do: int
    num_warps: int
    num_stages: int
    min_programs: int = 264
    block_do_wide: int | None = None  # output chunk of the "wide" fused form; None: block_do

    @property
    def wide_block_do(self) -> int:
        return self.block_do_wide or self.block_do


class TileConfigs(NamedTuple):
    """The configurations of one (device family, dtype family).

    forward: row statistics only (InfoNCE, MoCo, positives by index); forward_full: with column
    statistics and/or positives by labels (more live state per tile; None: same as forward)."""

    forward: ForwardConfig
    backward: BackwardConfig
    forward_full: ForwardConfig | None = None

    def forward_for(self, compute_col: bool, labels: bool) -> ForwardConfig:
        return self.forward_full if (compute_col or labels) and self.forward_full else self.forward


# name -> TileConfigs; looked up per dtype family ("16" for bf16/fp16, "32" for fp32).
CONFIGS: dict[str, TileConfigs] = {
    # Registers / spills / shared memory: docs/kernels.md (csrc_triton.static_check, ptxas of
    # Triton 3.6, every variant of every kernel).
    "sm90-16": TileConfigs(
        ForwardConfig(block_m=128, block_n=128, block_d=64, num_warps=8, num_stages=3),
        BackwardConfig(block_m=64, block_n=64, block_d=64, block_do=128, num_warps=8, num_stages=3,
                       block_do_wide=64),
        ForwardConfig(block_m=128, block_n=64, block_d=64, num_warps=8, num_stages=3),
    ),
    "sm90-32": TileConfigs(
        ForwardConfig(block_m=64, block_n=64, block_d=32, num_warps=4, num_stages=2),
        BackwardConfig(block_m=64, block_n=64, block_d=32, block_do=32, num_warps=8, num_stages=2),
        ForwardConfig(block_m=64, block_n=64, block_d=32, num_warps=8, num_stages=2),
    ),
    "sm80-16": TileConfigs(
        ForwardConfig(block_m=128, block_n=64, block_d=64, num_warps=8, num_stages=3, min_programs=216),
        BackwardConfig(block_m=32, block_n=64, block_d=64, block_do=128, num_warps=8, num_stages=2,
                       min_programs=216, block_do_wide=64),
    ),
    "sm80-32": TileConfigs(
        ForwardConfig(block_m=64, block_n=64, block_d=32, num_warps=4, num_stages=2, min_programs=216),
        BackwardConfig(block_m=64, block_n=64, block_d=32, block_do=32, num_warps=8, num_stages=2,
                       min_programs=216),
        ForwardConfig(block_m=64, block_n=64, block_d=32, num_warps=8, num_stages=2, min_programs=216),
    ),
    # Other CUDA devices (Turing, consumer parts with ~100 KiB of shared memory): conservative.
    "generic-16": TileConfigs(
        ForwardConfig(block_m=64, block_n=64, block_d=32, num_warps=4, num_stages=2, min_programs=128),
        BackwardConfig(block_m=32, block_n=64, block_d=32, block_do=64, num_warps=4, num_stages=1,
                       min_programs=128),
    ),
    "generic-32": TileConfigs(
        ForwardConfig(block_m=32, block_n=64, block_d=32, num_warps=4, num_stages=1, min_programs=128),
        BackwardConfig(block_m=32, block_n=32, block_d=32, block_do=64, num_warps=4, num_stages=1,
                       min_programs=128),
    ),
    # Interpreter: smallest legal tl.dot tiles; min_programs > 1 so that small test problems
    # still split their rows / columns across programs and exercise the merges.
    "interpreter": TileConfigs(
        ForwardConfig(block_m=16, block_n=16, block_d=32, num_warps=1, num_stages=1, min_programs=4),
        BackwardConfig(block_m=16, block_n=16, block_d=32, block_do=64, num_warps=1, num_stages=1,
                       min_programs=4, block_do_wide=32),
    ),
}


def config_name(device: torch.device, dtype: torch.dtype, interpret: bool) -> str:
    """The key of :data:`CONFIGS` for tensors of ``dtype`` on ``device``."""
    if interpret or device.type != "cuda":
        return "interpreter"
    family = "32" if dtype == torch.float32 else "16"
    major, _minor = torch.cuda.get_device_capability(device)
    if major == 9:
        return f"sm90-{family}"
    if major == 8:
        return f"sm80-{family}"
    return f"generic-{family}"


def get_configs(device: torch.device, dtype: torch.dtype, interpret: bool) -> TileConfigs:
    """The tile configurations for ``dtype`` tensors on ``device``."""
    return CONFIGS[config_name(device, dtype, interpret)]
