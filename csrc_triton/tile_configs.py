"""Tile configurations for the LSE kernels in :mod:`csrc_triton.triton_lse`.

One forward and one backward configuration per (device family, input dtype). The numbers are
chosen from the resource budget of each architecture, and checked without a GPU by
:mod:`csrc_triton.static_check` (registers, spills, shared memory, ``wgmma`` use on sm_90).

Why these sizes
---------------
Forward (one program = one BLOCK_M x BLOCK_N tile row, looping over column tiles and, inside,
over D in BLOCK_D chunks):

* Hopper (sm_90): the tile product runs on ``wgmma``. A warpgroup is 4 warps and one
  ``wgmma`` instruction covers 64 rows of the output, so BLOCK_M must be a multiple of 64 and
  ``num_warps`` a multiple of 4. With BLOCK_M = BLOCK_N = 128 and 8 warps (2 warpgroups,
  64 rows each) the fp32 accumulator is 128*128*4 B / 256 threads = 64 registers per thread;
  the online log-sum-exp adds the exp'd tile for the row and for the column statistics, which
  fills the 255-register budget of 8 warps exactly, without spills. Each pipeline stage holds
  a Q chunk (128 x 64) and a K chunk (64 x 128) in bf16/fp16: 32 KiB, so 3 stages use 96 KiB
  of the 228 KiB of shared memory. BLOCK_D = 64 bf16 = 128 B rows: the 128-byte swizzle
  that wgmma's shared-memory operands want.
* Ampere (sm_80): ``mma.sync`` with 16 x 8 x 16 fragments; no warpgroup constraint. 128 x 64
  tiles with 8 warps and 3 stages (16 KiB per stage, 48 KiB of the 164 KiB), 184 registers.
* fp32 inputs are multiplied in IEEE fp32 (``input_precision="ieee"``) so that results match
  PyTorch's fp32 matmul; that path uses FMA, not tensor cores, so smaller tiles (64 x 64,
  BLOCK_D = 32) keep the register file and shared memory (4 B per element) in budget.

Backward (one program = one column block of BLOCK_N keys and one BLOCK_DO-wide chunk of the
output D, looping over row blocks): it holds the dK accumulator (BLOCK_N x BLOCK_DO fp32), the
K chunk used for dQ (BLOCK_N x BLOCK_DO) and the recomputed S tile (BLOCK_M x BLOCK_N fp32) at
the same time, plus the dQ contribution tile before its atomic add, so it uses 64 x 64 S tiles
on Hopper (64 rows = one ``wgmma`` slab; BLOCK_N = 64 is also the M side of the dK = G^T Q
product) and BLOCK_DO = 128. Each extra D chunk of the output repeats the S recompute (see the
FLOP count in :mod:`csrc_triton.triton_lse`), so BLOCK_DO is as large as registers allow
without spilling (256 spills). For D > 2 * BLOCK_DO the "wide" variant of the same kernel, with
the same tiles, loops over the output D inside the program instead (no recompute; dK added
atomically): on sm_90 it needs 230 registers and 144 KiB of shared memory (its inner loop is
pipelined too), without spills.

Interpreter (``TRITON_INTERPRET=1`` on CPU): 16 x 16 S tiles, the smallest ``tl.dot`` accepts,
so tests exercise many tiles, masks and the cross-program merges; the interpreter's cost is per
executed operation, so BLOCK_D = 32 and BLOCK_DO = 64 keep the D loops short.
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
                       min_programs=216),
    ),
    "sm80-32": TileConfigs(
        ForwardConfig(block_m=64, block_n=64, block_d=32, num_warps=4, num_stages=2, min_programs=216),
        BackwardConfig(block_m=32, block_n=64, block_d=32, block_do=64, num_warps=8, num_stages=1,
                       min_programs=216),
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
