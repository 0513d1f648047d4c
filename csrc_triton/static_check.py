"""Compile the shipped LSE kernel configurations for a GPU architecture without a GPU.

For every (kernel, tile configuration, dtype) this compiles the Triton kernel ahead of time for
``sm_<arch>`` (Triton's own pipeline: TTIR -> TTGIR -> LLVM -> PTX), then runs Triton's bundled
``ptxas -v`` on the PTX to read registers per thread and spill bytes, reads shared memory from
the compiled metadata, and greps the PTX for ``wgmma.mma_async`` (Hopper's warpgroup tensor-core
instruction; its absence on sm_90 for bf16/fp16 means the tile products fell back to
``mma.sync``). fp32 inputs use IEEE products (``input_precision="ieee"``), which run on FMA units
and are expected to show no tensor-core instruction at all.

Usage::

    from csrc_triton.static_check import static_report, format_table
    print(format_table(static_report()))

Works with ``TRITON_INTERPRET=1`` set (tests): there every ``@triton.jit`` function is an
interpreter function, so the compilation runs in a child Python process without it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_lse
from .tile_configs import CONFIGS, BackwardConfig, ForwardConfig

_TRITON_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_FAMILY = {"bf16": "16", "fp16": "16", "fp32": "32"}
_ARCH_PREFIX = {90: "sm90", 80: "sm80"}


def _ptxas_path(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    path = get_ptxas(arch).path
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"Triton's bundled ptxas not found (got {path!r})")
    return path


def _ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` on ``ptx`` (``sm_90a`` for Hopper: wgmma)."""
    gpu_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        result = subprocess.run(
            [_ptxas_path(arch), "-v", "--gpu-name", gpu_name, src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": int(registers.group(1)) if registers else -1,
        "spill_stores": int(spills.group(1)) if spills else 0,
        "spill_loads": int(spills.group(2)) if spills else 0,
    }


def _source(fn, signature: dict[str, str], constexprs: dict) -> tuple[ASTSource, dict]:
    """The ASTSource Triton's JIT would build for contiguous inputs with D a multiple of 16
    (e.g. D = 768) and 16-byte aligned buffers: unit strides become constexpr 1 (the JIT
    specialises integers equal to 1), and pointers, row strides and D carry divisibility 16
    (what lets loads vectorise and the software pipeliner use cp.async)."""
    constexprs = dict(constexprs, stride_qd=1, stride_kd=1)
    signature = dict(signature)
    signature.update({name: "constexpr" for name in constexprs})
    aligned = [name for name, ty in signature.items()
               if ty.startswith("*") or name in ("D", "stride_qn", "stride_kn")]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), constexprs


def _forward_source(cfg: ForwardConfig, dtype: str) -> tuple[ASTSource, dict]:
    t = _TRITON_DTYPE[dtype]
    signature = {
        "q_ptr": f"*{t}", "k_ptr": f"*{t}", "scale_ptr": "*fp32",
        "row_max_ptr": "*fp32", "row_sum_ptr": "*fp32", "col_stats_ptr": "*i64",
        "N": "i32", "M": "i32", "D": "i32",
        "stride_qn": "i32", "stride_qd": "i32", "stride_kn": "i32", "stride_kd": "i32",
        "col_blocks_per_split": "i32",
    }
    constexprs = {
        "EXCLUDE_DIAGONAL": False, "COMPUTE_COL": True,
        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "UPCAST": False,
        "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d,
    }
    return _source(triton_lse._lse_forward_kernel, signature, constexprs)


def _backward_source(cfg: BackwardConfig, dtype: str, wide: bool = False) -> tuple[ASTSource, dict]:
    t = _TRITON_DTYPE[dtype]
    signature = {
        "q_ptr": f"*{t}", "k_ptr": f"*{t}", "scale_ptr": "*fp32",
        "row_lse_ptr": "*fp32", "col_lse_ptr": "*fp32", "grad_row_ptr": "*fp32", "grad_col_ptr": "*fp32",
        "dq_acc_ptr": "*fp32", "dk_ptr": f"*{t}", "dscale_part_ptr": "*fp32",
        "grad_pos_ptr": "*fp32", "row_labels_ptr": "*i64", "col_labels_ptr": "*i64",
        "N": "i32", "M": "i32", "D": "i32",
        "stride_qn": "i32", "stride_qd": "i32", "stride_kn": "i32", "stride_kd": "i32",
        "row_blocks_per_split": "i32", "positive_offset": "i32",
    }
    constexprs = {
        # The heaviest common case: CLIP (row and column terms, diagonal positives folded in).
        "EXCLUDE_DIAGONAL": False, "HAS_COL": True, "DK_ATOMIC": wide, "WIDE": wide, "POSITIVES": 1,
        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "UPCAST": False,
        "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d, "BLOCK_DO": cfg.block_do,
    }
    return _source(triton_lse._lse_backward_kernel, signature, constexprs)


def compile_one(kernel: str, config: ForwardConfig | BackwardConfig, dtype: str, arch: int = 90) -> dict:
    """Compile one kernel ("forward", "backward" or "backward-wide") in one configuration; return
    its report row."""
    return _compile_many([(kernel, config, dtype, arch)])[0]


def _compile_many(jobs: Sequence[tuple[str, ForwardConfig | BackwardConfig, str, int]]) -> list[dict]:
    """Compile each (kernel, config, dtype, arch). Under the interpreter, in a child process."""
    if not triton.knobs.runtime.interpret:
        return [_compile_in_process(*job) for job in jobs]
    # With TRITON_INTERPRET=1, every @triton.jit function (ours and triton.language's own, such
    # as tl.cdiv or the reduction combiners) was created as an interpreter function and cannot
    # be compiled; a fresh interpreter-free Python process can.
    payload = json.dumps([{"kernel": k, "config": dataclasses.asdict(c), "dtype": d, "arch": a}
                          for k, c, d, a in jobs])
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "csrc_triton.static_check", "--json-jobs"], input=payload,
                            capture_output=True, text=True, env=env, cwd=root)
    if result.returncode != 0:
        raise RuntimeError(f"compiling in a child process failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _compile_in_process(kernel: str, config: ForwardConfig | BackwardConfig, dtype: str, arch: int) -> dict:
    if kernel == "forward":
        src, _ = _forward_source(config, dtype)
    else:
        src, _ = _backward_source(config, dtype, wide=kernel == "backward-wide")
    target = GPUTarget("cuda", arch, 32)  # (backend, capability, warp size)
    compiled = triton.compile(src, target=target,
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    ptx = compiled.asm["ptx"]
    usage = _ptxas_usage(ptx, arch)
    tiles = f"{config.block_m}x{config.block_n}x{config.block_d}"
    if isinstance(config, BackwardConfig):
        tiles += f" do{config.block_do}"
    return {
        "kernel": kernel,
        "tiles": tiles,
        "warps": config.num_warps,
        "stages": config.num_stages,
        "dtype": dtype,
        **usage,
        "shared_bytes": int(compiled.metadata.shared),
        "wgmma": "wgmma.mma_async" in ptx,
        "mma_sync": "mma.sync" in ptx,
    }


def static_report(arch: int = 90, dtypes: Sequence[str] | Iterable[str] = ("bf16", "fp16", "fp32")) -> list[dict]:
    """One row per (kernel, shipped config for ``arch``, dtype): registers, spill bytes
    (stores/loads), shared memory bytes, and whether the tile products use ``wgmma``.

    Kernels: "forward" (row + column LSE), "backward" (dK in registers, grid over output-D
    chunks, used when D <= 2 * block_do) and "backward-wide" (loop over the output D, dK by
    atomics, used for wider D); backward variants compiled with row, column and positive terms.

    Args:
        arch: compute capability as an int (90 = Hopper sm_90a, 80 = Ampere).
        dtypes: any of "bf16", "fp16", "fp32"; each is compiled with its dtype family's config.
    """
    prefix = _ARCH_PREFIX.get(arch, "generic")
    jobs, names = [], []
    for dtype in dtypes:
        if dtype not in _TRITON_DTYPE:
            raise ValueError(f"dtypes must be among {tuple(_TRITON_DTYPE)}; got {dtype!r}")
        forward, backward = CONFIGS[f"{prefix}-{_FAMILY[dtype]}"]
        for kernel, config in (("forward", forward), ("backward", backward), ("backward-wide", backward)):
            jobs.append((kernel, config, dtype, arch))
            names.append(f"{prefix}-{_FAMILY[dtype]}")
    rows = _compile_many(jobs)
    for row, name in zip(rows, names):
        row["config"] = name
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of :func:`static_report` rows."""
    columns = [("kernel", "kernel"), ("config", "config"), ("dtype", "dtype"), ("tiles", "tiles MxNxD"),
               ("warps", "warps"), ("stages", "stages"), ("registers", "regs"),
               ("spill_stores", "spill st B"), ("spill_loads", "spill ld B"),
               ("shared_bytes", "smem B"), ("wgmma", "wgmma")]
    cells = [[title for _, title in columns]]
    for row in rows:
        cells.append([("yes" if row.get(key) else "no") if key == "wgmma" else str(row.get(key, ""))
                      for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _main() -> None:
    if "--json-jobs" in sys.argv:  # child process of _compile_many
        jobs = json.loads(sys.stdin.read())
        rows = []
        for job in jobs:
            cls = ForwardConfig if job["kernel"] == "forward" else BackwardConfig
            rows.append(_compile_in_process(job["kernel"], cls(**job["config"]), job["dtype"], job["arch"]))
        print(json.dumps(rows))
    else:
        print(format_table(static_report()))


if __name__ == "__main__":
    _main()
