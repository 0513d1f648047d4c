"""Compile every shipped LSE kernel variant for a GPU architecture, without a GPU.

For every kernel, every constexpr variant the launchers of :mod:`csrc_triton.triton_lse` can
produce, and every input dtype, this compiles the Triton kernel ahead of time for ``sm_<arch>``
(Triton's own pipeline: TTIR -> TTGIR -> LLVM -> PTX) with the shipped tile configuration, runs
Triton's bundled ``ptxas -v`` on the PTX to read registers per thread and spill bytes, reads
shared memory from the compiled metadata, and greps the PTX for ``wgmma.mma_async`` (Hopper's
warpgroup tensor-core instruction; its absence on sm_90 for bf16/fp16 means the tile products
fell back to ``mma.sync``). fp32 inputs use IEEE products (``input_precision="ieee"``), which run
on FMA units and show no tensor-core instruction at all.

Variants:
  * forward: COMPUTE_COL x LABELS (4);
  * backward "fused" (column owner): every (NEEDS_DQ, NEEDS_DK, WIDE) that
    :func:`csrc_triton.triton_lse.backward_plan` can return, x HAS_COL x POS (none, index,
    labels);
  * backward "rows" (query owner, dq in registers): HAS_COL x POS;
  * the positive-index row-dot kernel, the statistics merge (with and without labels) and the
    split sum (one per output dtype).
  * SigLIP (:mod:`csrc_triton.triton_siglip`, ``family="siglip"``): the forward, every
    (NEEDS_DQ, NEEDS_DK, WIDE) of its "cols" backward kernel that its ``backward_plan`` can
    return, and its "rows" kernel, per dtype, with the same shipped tile configurations.
Runtime scalars (self offset, flags, splits) are compiled as the JIT compiles them, not
specialised (``triton_lse.RUNTIME_SCALARS``); inputs are assumed contiguous with D a multiple
of 16 and 16-byte aligned buffers (what the JIT specialises for D = 768).

Usage::

    python -m csrc_triton.static_check            # every variant (LSE and SigLIP), sm_90, a table
    python -m csrc_triton.static_check --family siglip
    python -m csrc_triton.static_check --subset   # the representative ones the tests compile

    from csrc_triton.static_check import static_report, format_table
    print(format_table(static_report()))

Works with ``TRITON_INTERPRET=1`` set (tests): there every ``@triton.jit`` function is an
interpreter function, so the compilation runs in a child Python process without it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_lse, triton_siglip
from .tile_configs import CONFIGS, BackwardConfig, ForwardConfig

DTYPES = ("bf16", "fp16", "fp32")
_FAMILY = {"bf16": "16", "fp16": "16", "fp32": "32"}
_ARCH_PREFIX = {90: "sm90", 80: "sm80"}
# Pointer arguments in the input dtype, and int64 ones; every other pointer is fp32.
_INPUT_DTYPE_PTRS = {"q_ptr", "k_ptr", "dq_ptr", "dk_ptr"}
_INT64_PTRS = {"row_labels_ptr", "col_labels_ptr", "row_key_ptr", "index_ptr"}
_FLOAT_SCALARS = {"shift_range"}
_ALIGNED_INTS = {"D", "stride_qn", "stride_kn"}


@dataclasses.dataclass(frozen=True)
class Job:
    """One compilation: a kernel, its constexpr flags, input dtype and launch options."""

    kernel: str  # "forward", "fused", "rows", "positive_index", "merge", "sum_splits"
    flags: tuple[tuple[str, object], ...]  # constexpr flags (name, value)
    dtype: str  # input dtype (sum_splits: output dtype)
    blocks: tuple[tuple[str, int], ...]  # BLOCK_* constexprs
    num_warps: int
    num_stages: int
    config: str  # tile configuration name ("" for the epilogue kernels)
    arch: int = 90

    def label(self) -> str:
        return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.flags) or "-"


_KERNELS = {
    "forward": lambda: triton_lse._lse_forward_kernel,
    "fused": lambda: triton_lse._lse_backward_kernel,
    "rows": lambda: triton_lse._lse_backward_rows_kernel,
    "positive_index": lambda: triton_lse._positive_index_kernel,
    "merge": lambda: triton_lse._merge_stats_kernel,
    "sum_splits": lambda: triton_lse._sum_splits_kernel,
    "siglip_forward": lambda: triton_siglip._siglip_forward_kernel,
    "siglip_cols": lambda: triton_siglip._siglip_backward_cols_kernel,
    "siglip_rows": lambda: triton_siglip._siglip_backward_rows_kernel,
}
#: kernels with tile products (DOT_PRECISION / UPCAST constexprs, wgmma expected for 16-bit)
TILE_KERNELS = ("forward", "fused", "rows", "siglip_forward", "siglip_cols", "siglip_rows")
FAMILIES = ("lse", "siglip", "all")


def fused_variants() -> list[tuple[bool, bool, bool]]:
    """Every (NEEDS_DQ, NEEDS_DK, WIDE) of the fused backward kernel that the launcher can
    produce, read from :func:`triton_lse.backward_plan` itself over all its inputs."""
    found = set()
    config = BackwardConfig(block_m=64, block_n=64, block_d=64, block_do=128, num_warps=8, num_stages=3)
    for d in (64, 768):  # narrow and wide output D
        for needs in range(16):
            needs_dq, needs_dk, needs_dbias, deterministic = (bool(needs >> bit & 1) for bit in range(4))
            plan = triton_lse.backward_plan(4096, 4096, d, config, needs_dq=needs_dq, needs_dk=needs_dk,
                                            needs_dbias=needs_dbias, deterministic=deterministic)
            for launch in plan:
                if launch["kernel"] == "fused":
                    found.add((launch["NEEDS_DQ"], launch["NEEDS_DK"], launch["WIDE"]))
    return sorted(found, reverse=True)


def _in_subset(job: Job) -> bool:
    """The variants the test suite compiles (~30 s on 2 cores): for bf16 every forward variant,
    every fused-kernel output form with labels positives and a column term, the two fused
    variants and the rows variant that the full report shows at the 255-register ceiling
    (index positives), and the small kernels; for fp32 the extremes of each kernel. fp16
    compiles the same code as bf16 (same registers in the full report)."""
    flags = dict(job.flags)
    if job.kernel == "merge":
        return flags["LABELS"]
    if job.dtype == "bf16":
        if job.kernel == "fused":
            if flags["HAS_COL"] and flags["POS"] == 2:
                return True
            wide_index = (flags["NEEDS_DQ"], flags["NEEDS_DK"], flags["WIDE"]) in ((True, True, True),
                                                                                  (False, True, False))
            return not flags["HAS_COL"] and flags["POS"] == 1 and wide_index
        if job.kernel == "rows":
            return flags["HAS_COL"] and flags["POS"] == 1
        return True
    if job.dtype == "fp32":
        if job.kernel == "forward":
            return flags["COMPUTE_COL"] == flags["LABELS"]
        if job.kernel == "fused":
            return flags["HAS_COL"] and flags["POS"] == 2 and flags["NEEDS_DQ"] and flags["NEEDS_DK"]
        if job.kernel == "rows":
            return flags["HAS_COL"] and flags["POS"] == 2
    return False


def _config_names(arch: int, dtypes: Sequence[str]) -> list[tuple[str, str]]:
    """(dtype, :data:`csrc_triton.tile_configs.CONFIGS` name) for each dtype on ``sm_<arch>``;
    ValueError for a dtype outside :data:`DTYPES`."""
    prefix = _ARCH_PREFIX.get(arch, "generic")
    names = []
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtypes must be among {DTYPES}; got {dtype!r}")
        names.append((dtype, f"{prefix}-{_FAMILY[dtype]}"))
    return names


def variants(arch: int = 90, dtypes: Sequence[str] = DTYPES, subset: bool = False) -> list[Job]:
    """The compilation jobs: every shipped variant (what the launchers can produce, x dtypes),
    or (``subset``) the representative ones of :func:`_in_subset`."""
    jobs: list[Job] = []
    for dtype, name in _config_names(arch, dtypes):
        configs = CONFIGS[name]
        bwd = configs.backward

        def bwd_blocks(block_do: int) -> tuple:
            return (("BLOCK_M", bwd.block_m), ("BLOCK_N", bwd.block_n), ("BLOCK_D", bwd.block_d),
                    ("BLOCK_DO", block_do))

        for compute_col in (False, True):
            for labels in (False, True):
                fwd = configs.forward_for(compute_col, labels)
                fwd_blocks = (("BLOCK_M", fwd.block_m), ("BLOCK_N", fwd.block_n), ("BLOCK_D", fwd.block_d))
                jobs.append(Job("forward", (("COMPUTE_COL", compute_col), ("LABELS", labels)), dtype, fwd_blocks,
                                fwd.num_warps, fwd.num_stages, name, arch))
        for has_col in (False, True):
            for pos in (0, 1, 2):
                for needs_dq, needs_dk, wide in fused_variants():
                    jobs.append(Job("fused", (("HAS_COL", has_col), ("POS", pos), ("NEEDS_DQ", needs_dq),
                                              ("NEEDS_DK", needs_dk), ("WIDE", wide)),
                                    dtype, bwd_blocks(bwd.wide_block_do if wide else bwd.block_do),
                                    bwd.num_warps, bwd.num_stages, name, arch))
                jobs.append(Job("rows", (("HAS_COL", has_col), ("POS", pos)), dtype, bwd_blocks(bwd.block_do),
                                bwd.num_warps, bwd.num_stages, name, arch))
        jobs.append(Job("positive_index", (), dtype,
                        (("BLOCK_R", triton_lse._INDEX_BLOCK_R), ("BLOCK_D", triton_lse._INDEX_BLOCK_D)), 4, 3, "",
                        arch))
        jobs.append(Job("sum_splits", (), dtype, (("BLOCK", triton_lse._EPILOGUE_BLOCK),), 4, 3, "", arch))
    for labels in (False, True):
        jobs.append(Job("merge", (("LABELS", labels),), "fp32", (("BLOCK", triton_lse._MERGE_BLOCK),), 4, 3, "",
                        arch))
    return [job for job in jobs if _in_subset(job)] if subset else jobs


def siglip_cols_variants() -> list[tuple[bool, bool, bool]]:
    """Every (NEEDS_DQ, NEEDS_DK, WIDE) of SigLIP's "cols" backward kernel, read from
    :func:`triton_siglip.backward_plan` over all its inputs."""
    found = set()
    config = BackwardConfig(block_m=64, block_n=64, block_d=64, block_do=128, num_warps=8, num_stages=3)
    for d in (64, 768):
        for needs in range(8):
            needs_dx, needs_dy, deterministic = (bool(needs >> bit & 1) for bit in range(3))
            for launch in triton_siglip.backward_plan(4096, 4096, d, config, needs_dx=needs_dx, needs_dy=needs_dy,
                                                      deterministic=deterministic):
                if launch["kernel"] == "cols":
                    found.add((launch["NEEDS_DQ"], launch["NEEDS_DK"], launch["WIDE"]))
    return sorted(found, reverse=True)


def siglip_variants(arch: int = 90, dtypes: Sequence[str] = DTYPES, subset: bool = False) -> list[Job]:
    """SigLIP's kernels (:mod:`csrc_triton.triton_siglip`) with the shipped configurations: the
    forward (row-statistics configuration), the "cols" backward variants and the "rows" kernel,
    per dtype (``subset``: bf16 only, the fused and deterministic forms at narrow and wide D)."""
    jobs: list[Job] = []
    for dtype, name in _config_names(arch, dtypes):
        fwd, bwd = triton_siglip.siglip_configs(name)
        jobs.append(Job("siglip_forward", (), dtype,
                        (("BLOCK_M", fwd.block_m), ("BLOCK_N", fwd.block_n), ("BLOCK_D", fwd.block_d)),
                        fwd.num_warps, fwd.num_stages, name, arch))
        for needs_dq, needs_dk, wide in siglip_cols_variants():
            block_do = bwd.wide_block_do if wide else bwd.block_do
            jobs.append(Job("siglip_cols", (("NEEDS_DQ", needs_dq), ("NEEDS_DK", needs_dk), ("WIDE", wide)), dtype,
                            (("BLOCK_M", bwd.block_m), ("BLOCK_N", bwd.block_n), ("BLOCK_D", bwd.block_d),
                             ("BLOCK_DO", block_do)), bwd.num_warps, bwd.num_stages, name, arch))
        jobs.append(Job("siglip_rows", (), dtype,
                        (("BLOCK_M", bwd.block_m), ("BLOCK_N", bwd.block_n), ("BLOCK_D", bwd.block_d),
                         ("BLOCK_DO", bwd.block_do)), bwd.num_warps, bwd.num_stages, name, arch))
    if subset:
        keep = {("siglip_forward", ()), ("siglip_rows", ()),
                ("siglip_cols", (("NEEDS_DQ", True), ("NEEDS_DK", True), ("WIDE", False))),
                ("siglip_cols", (("NEEDS_DQ", True), ("NEEDS_DK", True), ("WIDE", True)))}
        jobs = [job for job in jobs if job.dtype == "bf16" and (job.kernel, job.flags) in keep]
    return jobs


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
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {
        "registers": int(registers.group(1)) if registers else -1,
        "spill_stores": int(spills.group(1)) if spills else 0,
        "spill_loads": int(spills.group(2)) if spills else 0,
        "stack_bytes": int(stack.group(1)) if stack else 0,
    }


def _pointer_type(name: str, dtype: str, kernel: str) -> str:
    if kernel == "sum_splits" and name == "out_ptr":
        return f"*{dtype}"
    if name in _INPUT_DTYPE_PTRS:
        return f"*{dtype}"
    if name in _INT64_PTRS:
        return "*i64"
    return "*fp32"


def _source(job: Job) -> ASTSource:
    """The ASTSource Triton's JIT builds for this variant with contiguous inputs, D a multiple of
    16 and 16-byte aligned buffers: unit strides are constexpr 1 (the JIT specialises integers
    equal to 1), pointers, row strides and D carry divisibility 16; runtime scalars are plain
    (``do_not_specialize``)."""
    fn = _KERNELS[job.kernel]()
    constexprs: dict = dict(job.flags) | dict(job.blocks)
    if job.kernel in TILE_KERNELS:
        constexprs["DOT_PRECISION"] = "ieee" if job.dtype == "fp32" else "tf32"
        constexprs["UPCAST"] = False
    if "stride_qd" in fn.arg_names:
        constexprs.update(stride_qd=1, stride_kd=1)
    signature: dict[str, str] = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = _pointer_type(name, job.dtype, job.kernel)
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    missing = [p for p in fn.arg_names if p not in signature]
    if missing:
        raise RuntimeError(f"{job.kernel}: no type for {missing}")
    aligned = [name for name, ty in signature.items() if ty.startswith("*") or name in _ALIGNED_INTS]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _compile_in_process(job: Job) -> dict:
    src = _source(job)
    target = GPUTarget("cuda", job.arch, 32)  # (backend, capability, warp size)
    compiled = triton.compile(src, target=target,
                              options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    ptx = compiled.asm["ptx"]
    usage = _ptxas_usage(ptx, job.arch)
    blocks = dict(job.blocks)
    tiles = "x".join(str(v) for k, v in blocks.items() if k != "BLOCK_DO")
    if "BLOCK_DO" in blocks:
        tiles += f" do{blocks['BLOCK_DO']}"
    return {
        "kernel": job.kernel,
        "variant": job.label(),
        "config": job.config,
        "dtype": job.dtype,
        "tiles": tiles,
        "warps": job.num_warps,
        "stages": job.num_stages,
        **usage,
        "shared_bytes": int(compiled.metadata.shared),
        "wgmma": "wgmma.mma_async" in ptx,
        "mma_sync": "mma.sync" in ptx,
        "ex2": ptx.count("ex2.approx"),
    }


def _compile_all(jobs: Sequence[Job], workers: int) -> list[dict]:
    if workers <= 1 or len(jobs) <= 1:
        return [_compile_in_process(job) for job in jobs]
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_in_process, jobs))


def compile_jobs(jobs: Sequence[Job], workers: int | None = None) -> list[dict]:
    """Compile each job (in parallel over ``workers`` processes, default: the CPU count); under
    the interpreter, in a child process without it."""
    workers = workers or os.cpu_count() or 1
    if not triton.knobs.runtime.interpret:
        return _compile_all(jobs, workers)
    # With TRITON_INTERPRET=1, every @triton.jit function (ours and triton.language's own, such
    # as tl.cdiv or the reduction combiners) was created as an interpreter function and cannot
    # be compiled; a fresh interpreter-free Python process can.
    payload = json.dumps({"workers": workers, "jobs": [dataclasses.asdict(job) for job in jobs]})
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "csrc_triton.static_check", "--json-jobs"], input=payload,
                            capture_output=True, text=True, env=env, cwd=root)
    if result.returncode != 0:
        raise RuntimeError(f"compiling in a child process failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _job_from_dict(data: dict) -> Job:
    return Job(kernel=data["kernel"], flags=tuple(tuple(f) for f in data["flags"]), dtype=data["dtype"],
               blocks=tuple(tuple(b) for b in data["blocks"]), num_warps=data["num_warps"],
               num_stages=data["num_stages"], config=data["config"], arch=data["arch"])


def compile_one(kernel: str, flags: dict, config: ForwardConfig | BackwardConfig, dtype: str, arch: int = 90) -> dict:
    """Compile one variant of ``kernel`` ("forward", "fused", "rows") with a tile ``config``;
    return its report row."""
    blocks = [("BLOCK_M", config.block_m), ("BLOCK_N", config.block_n), ("BLOCK_D", config.block_d)]
    if isinstance(config, BackwardConfig):
        blocks.append(("BLOCK_DO", config.block_do))
    job = Job(kernel, tuple(flags.items()), dtype, tuple(blocks), config.num_warps, config.num_stages, "custom", arch)
    return compile_jobs([job], workers=1)[0]


def static_report(arch: int = 90, dtypes: Sequence[str] = DTYPES, subset: bool = False,
                  workers: int | None = None, family: str = "lse") -> list[dict]:
    """One row per compiled variant (see :func:`variants`): registers, spill bytes
    (stores/loads), stack frame, shared memory bytes, whether the tile products use ``wgmma``,
    and the number of ``ex2`` instructions in the PTX.

    Args:
        arch: compute capability as an int (90 = Hopper sm_90a, 80 = Ampere).
        dtypes: any of "bf16", "fp16", "fp32"; each is compiled with its dtype family's config.
        subset: only the representative variants (what the test suite compiles).
        workers: compiler processes (default: the CPU count).
        family: "lse" (the log-sum-exp engine's kernels), "siglip" (SigLIP's) or "all".
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    jobs = variants(arch, dtypes, subset) if family in ("lse", "all") else []
    if family in ("siglip", "all"):
        jobs += siglip_variants(arch, dtypes, subset)
    return compile_jobs(jobs, workers)


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of :func:`static_report` rows."""
    columns = [("kernel", "kernel"), ("variant", "variant"), ("dtype", "dtype"), ("tiles", "tiles"),
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
    if "--json-jobs" in sys.argv:  # child process of compile_jobs
        payload = json.loads(sys.stdin.read())
        jobs = [_job_from_dict(job) for job in payload["jobs"]]
        print(json.dumps(_compile_all(jobs, payload["workers"])))
        return
    parser = argparse.ArgumentParser(description="Compile every shipped LSE kernel variant for a GPU "
                                                 "architecture (no GPU needed) and report registers, spills, "
                                                 "shared memory and wgmma use.")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default 90: sm_90a)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated (default: all)")
    parser.add_argument("--subset", action="store_true", help="only the representative variants the tests compile")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--family", default="all", choices=FAMILIES,
                        help="which kernels: the LSE engine's, SigLIP's, or all (default)")
    args = parser.parse_args()
    rows = static_report(args.arch, args.dtypes.split(","), args.subset, family=args.family)
    print(format_table(rows))
    spilling = [row for row in rows if row["spill_stores"] or row["spill_loads"]]
    print(f"\n{len(rows)} variants compiled for sm_{args.arch}; {len(spilling)} spill.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if spilling:
        sys.exit(1)


if __name__ == "__main__":
    _main()
