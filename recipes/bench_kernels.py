"""Benchmark of the contrastive-loss backends: time, memory, FLOP/s and the largest batch that fits.

    python -m recipes.bench_kernels                                   # moderate default run
    python -m recipes.bench_kernels --sizes 32768 --backends blockwise,dense --dim 128
    python -m recipes.bench_kernels --sizes 65536 --backends blockwise
    python -m recipes.bench_kernels --static                          # sm_90 compile report only

Every measurement (one backend, one N) runs in its own child process, so that

- peak memory is that measurement's alone: on CPU the child's peak resident set size (VmHWM,
  reset with /proc/self/clear_refs once the inputs exist, and the kernel's own ``ru_maxrss`` for
  the child seen by the parent via ``wait4``); on CUDA ``torch.cuda.max_memory_allocated``;
- running out of memory kills only the child; the parent also watches the child's RSS and kills
  it when it passes ``--mem-budget-gb``, and kills it when it passes ``--time-budget-s``.

Work is counted as 8·N·M·D flops for every loss: the forward is one GEMM-sized pass (2NMD) that
yields the row and column log-sum-exps, and the backward recomputes the tiles and forms dQ and
dK (6NMD) -- the minimum for a symmetric loss (see DESIGN.md). N x M is the shape of the
similarity matrix S; M = N here. For ``nt_xent`` N counts views: z1 and z2 have N/2 rows each.

Before any timing, each backend is checked against ``dense`` on a small odd-sized problem (loss
and every gradient); the benchmark refuses to run when a backend disagrees (``--no-check`` skips
the check and marks the results UNCHECKED).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

LOSSES = ("clip", "info_nce", "nt_xent", "supcon")
BACKENDS = ("triton", "blockwise", "dense")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DEFAULT_CPU_SIZES = (1024, 2048, 4096, 8192)
DEFAULT_CUDA_SIZES = (4096, 8192, 16384, 32768, 65536)
RESULT_MARK = "BENCH_RESULT "
REPO_ROOT = Path(__file__).resolve().parent.parent
# Dense materialises S plus its softmax and their gradients: about 16 bytes per logit
# (DESIGN.md). Used to predict memory before the first measurement of a backend.
DENSE_BYTES_PER_LOGIT = 16


@dataclasses.dataclass
class BenchConfig:
    """Everything one benchmark run depends on; printed at start and saved in the JSON."""

    backends: tuple[str, ...]
    sizes: tuple[int, ...]
    dim: int = 128
    dtype: str = "fp32"
    loss: str = "clip"
    device: str = "cpu"
    repeats: int = 5
    max_n_search: int = 16384
    mem_budget_gb: float = 20.0
    time_budget_s: float = 900.0
    out: str = "bench_results"
    static: bool = False
    check: bool = True
    warmup: int = 1
    seed: int = 0
    scale: float | None = None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds '(default: X)' only where the help text does not already state its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.bench_kernels",
        description=(
            "Time and measure the contrastive-loss backends (forward+backward). Reports the median "
            "time and quantiles, peak memory, achieved FLOP/s counted as 8*N*M*D, and the largest N "
            "that fits; writes a JSON file, appends tagged rows to a CSV and plots time and memory "
            "against N. Each measurement runs in a child process."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--backends", default=None,
        help="comma-separated backends to measure, from triton, blockwise, dense "
             "(default: blockwise,dense on CPU; triton,blockwise,dense on CUDA). "
             "triton on CPU needs TRITON_INTERPRET=1 and is very slow.")
    parser.add_argument(
        "--sizes", default=None,
        help="comma-separated batch sizes N (M = N; for nt_xent N counts views, so it must be even) "
             f"(default: {','.join(map(str, DEFAULT_CPU_SIZES))} on CPU, "
             f"{','.join(map(str, DEFAULT_CUDA_SIZES))} on CUDA)")
    parser.add_argument("--dim", type=int, default=128, help="feature dimension D")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="dtype of the features (the scale/temperature stays fp32)")
    parser.add_argument("--loss", default="clip", choices=LOSSES,
                        help="which loss to measure: clip_loss, info_nce, nt_xent or supcon")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument(
        "--repeats", type=int, default=5,
        help="timed forward+backward repetitions per measurement on CPU (fewer for big sizes: "
             "repeats stop once the next would end past 20 s of timing; at least 1); on CUDA do_bench picks its own "
             "count and this is ignored")
    parser.add_argument(
        "--max-n-search", type=int, default=16384,
        help="largest-N search: from the largest size measured, double N and measure again until "
             "this N, out of memory, or a budget (measured or predicted) stops it; 0 disables "
             "the search")
    parser.add_argument(
        "--mem-budget-gb", type=float, default=None,
        help="memory budget per measurement in GB (10^9 bytes): a child whose RSS (CPU) passes it "
             "is killed, and a size predicted to pass it is not started "
             "(default: 20 on CPU, the device's total memory on CUDA)")
    parser.add_argument(
        "--time-budget-s", type=float, default=900.0,
        help="wall-clock budget per measurement in seconds: a child that runs longer is killed, "
             "and a search size predicted to take longer is not started")
    parser.add_argument("--out", default="bench_results",
                        help="results directory for the JSON, the CSV (appended) and the PNG plot")
    parser.add_argument(
        "--static", action="store_true",
        help="compile every shipped Triton kernel configuration for sm_90 without a GPU "
             "(csrc_triton.static_check.static_report), print its table (registers, spills, "
             "shared memory, wgmma) and write it to static_sm90.json; with no --sizes/--backends "
             "given, only this is done")
    parser.add_argument(
        "--check", action=argparse.BooleanOptionalAction, default=True,
        help="before timing, check each backend against dense on a small odd-sized problem "
             "(loss and all gradients) and refuse to benchmark if any disagrees; --no-check skips "
             "it and marks the results UNCHECKED")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed full-size iterations before timing on CPU (sizes above "
                             "8192 get only a small-size warmup)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    parser.add_argument(
        "--scale", type=float, default=None,
        help="multiplier of the logits (features are unit vectors): clip's logit_scale, or "
             "1/temperature for the other losses (default: each loss's usual value: clip 1/0.07, "
             "info_nce 1/0.07, nt_xent 1/0.5, supcon 1/0.1); CLIP training drives logit_scale "
             "up to 100, where many exp arguments fall below -87")
    return parser


def _fail(argument: str, value: Any, expected: str) -> None:
    raise SystemExit(f"bench_kernels: error: {argument}={value!r}: expected {expected}")


def config_from_args(argv: list[str] | None = None) -> tuple[BenchConfig, bool]:
    """Parse argv into a validated BenchConfig; the flag says whether to measure at all."""
    args = build_parser().parse_args(argv)
    import torch

    device = args.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        _fail("--device", device, "'cpu' or 'cuda'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        _fail("--device", device, "a CUDA device, but torch.cuda.is_available() is False")
    on_cuda = device.startswith("cuda")

    if args.backends is None:
        backends = ["triton", "blockwise", "dense"] if on_cuda else ["blockwise", "dense"]
    else:
        backends = _csv_list(args.backends)
        if not backends:
            _fail("--backends", args.backends, f"a comma-separated subset of {','.join(BACKENDS)}")
        for name in backends:
            if name not in BACKENDS:
                _fail("--backends", name, f"one of {', '.join(BACKENDS)}")
        if len(set(backends)) != len(backends):
            _fail("--backends", args.backends, "each backend at most once")
    if "triton" in backends and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        _fail("--backends", "triton",
              "a CUDA device, or TRITON_INTERPRET=1 in the environment to run Triton's "
              "interpreter on CPU")

    if args.sizes is None:
        sizes = list(DEFAULT_CUDA_SIZES if on_cuda else DEFAULT_CPU_SIZES)
    else:
        sizes = []
        for part in _csv_list(args.sizes):
            try:
                sizes.append(int(part))
            except ValueError:
                _fail("--sizes", part, "positive integers separated by commas")
        if not sizes:
            _fail("--sizes", args.sizes, "at least one positive integer")
    for n in sizes:
        if n < 1:
            _fail("--sizes", n, "a positive integer")
        if args.loss == "nt_xent" and n % 2:
            _fail("--sizes", n, "an even N for nt_xent (N counts the views of N/2 pairs)")
    sizes = sorted(set(sizes))
    if args.dim < 1:
        _fail("--dim", args.dim, "a positive integer")
    if args.repeats < 1:
        _fail("--repeats", args.repeats, "an integer >= 1")
    if args.warmup < 0:
        _fail("--warmup", args.warmup, "an integer >= 0")
    if args.max_n_search < 0:
        _fail("--max-n-search", args.max_n_search, "0 (no search) or a positive N")
    if args.scale is not None and not (math.isfinite(args.scale) and args.scale > 0):
        _fail("--scale", args.scale, "a finite positive number")
    if args.time_budget_s <= 0:
        _fail("--time-budget-s", args.time_budget_s, "a positive number of seconds")
    mem_budget = args.mem_budget_gb
    if mem_budget is None:
        if on_cuda:
            mem_budget = torch.cuda.get_device_properties(device).total_memory / 1e9
        else:
            mem_budget = 20.0
    if not mem_budget > 0:
        _fail("--mem-budget-gb", mem_budget, "a positive number of GB")

    measure = not (args.static and args.sizes is None and args.backends is None)
    cfg = BenchConfig(
        backends=tuple(backends), sizes=tuple(sizes), dim=args.dim, dtype=args.dtype,
        loss=args.loss, device=device, repeats=args.repeats, max_n_search=args.max_n_search,
        mem_budget_gb=float(mem_budget), time_budget_s=args.time_budget_s, out=args.out,
        static=args.static, check=args.check, warmup=args.warmup, seed=args.seed,
        scale=args.scale,
    )
    return cfg, measure


# --------------------------------------------------------------------------------------------
# Problems: inputs and the call of each loss (shared by the check and the child processes)
# --------------------------------------------------------------------------------------------


def flop_count(n: int, m: int, d: int) -> int:
    """Work of a symmetric loss forward+backward: 2NMD forward + 6NMD backward."""
    return 8 * n * m * d


DEFAULT_SCALE = {"clip": 1 / 0.07, "info_nce": 1 / 0.07, "nt_xent": 1 / 0.5, "supcon": 1 / 0.1}


def make_problem(loss: str, n: int, d: int, dtype, device, seed: int, scale: float | None = None):
    """Leaf inputs (requiring grad) and a closure ``call(backend) -> scalar loss``.

    ``n`` is the side of the N x N similarity matrix (views, for nt_xent); ``scale`` multiplies
    the logits (clip's logit_scale, 1/temperature otherwise), None for the loss's usual value.
    """
    if loss in DEFAULT_SCALE and scale is None:
        scale = DEFAULT_SCALE[loss]
    import torch
    import torch.nn.functional as F

    import csrc_triton

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def features(rows: int) -> torch.Tensor:
        x = F.normalize(torch.randn(rows, d, generator=gen), dim=-1)
        return x.to(device=device, dtype=dtype).requires_grad_(True)

    if loss == "clip":
        image, text = features(n), features(n)
        logit_scale = torch.tensor(scale, device=device, requires_grad=True)
        leaves = [image, text, logit_scale]

        def call(backend: str):
            return csrc_triton.clip_loss(image, text, logit_scale, backend=backend)
    elif loss == "info_nce":
        query, key = features(n), features(n)
        leaves = [query, key]

        def call(backend: str):
            return csrc_triton.info_nce(query, key, temperature=1 / scale, backend=backend)
    elif loss == "nt_xent":
        half = max(n // 2, 1)
        z1, z2 = features(half), features(half)
        leaves = [z1, z2]

        def call(backend: str):
            return csrc_triton.nt_xent(z1, z2, temperature=1 / scale, normalize=False,
                                       backend=backend)
    elif loss == "supcon":
        feats = features(n)
        # About four members per class, so most anchors have positives; a few singletons remain
        # when n is not a multiple of the class count.
        n_classes = max(n // 4, 1)
        labels = (torch.randperm(n, generator=gen) % n_classes).to(device)
        leaves = [feats]

        def call(backend: str):
            return csrc_triton.supcon(feats, labels, temperature=1 / scale, normalize=False,
                                      backend=backend)
    else:
        raise ValueError(f"loss={loss!r}: expected one of {', '.join(LOSSES)}")
    return leaves, call


# --------------------------------------------------------------------------------------------
# Correctness check (in this process, before any timing)
# --------------------------------------------------------------------------------------------

CHECK_N = 131  # odd, not a multiple of any tile size
# Allowed relative-RMS error beyond what dense itself makes in the same dtype.
CHECK_TOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}


def _rel_rms(x, ref) -> float:
    import torch

    x, ref = x.double(), ref.double()
    denom = torch.sqrt(torch.mean(ref * ref)).item()
    err = torch.sqrt(torch.mean((x - ref) ** 2)).item()
    if not math.isfinite(err):
        return math.inf
    return err / denom if denom > 0 else err


def _loss_and_grads(loss: str, n: int, d: int, dtype, device, seed: int, backend: str,
                    scale: float | None = None):
    import torch

    leaves, call = make_problem(loss, n, d, dtype, device, seed, scale)
    value = call(backend)
    upstream = torch.randn((), generator=torch.Generator().manual_seed(seed + 1)).item()
    (value * upstream).backward()
    grads = [leaf.grad.detach().clone() if leaf.grad is not None else torch.zeros_like(leaf)
             for leaf in leaves]
    return value.detach().reshape(1), grads


def correctness_check(cfg: BenchConfig) -> list[dict]:
    """Each backend vs dense on a small odd problem: loss and all gradients.

    Truth is dense in float64; a backend passes where its relative RMS error is at most twice
    dense's own error in the benchmark dtype plus a dtype tolerance (the habit of Cut
    Cross-Entropy's tests: no worse than PyTorch itself in that precision).
    """
    import torch

    dtype = getattr(torch, DTYPES[cfg.dtype])
    d = min(cfg.dim, 130)
    n = CHECK_N + (CHECK_N % 2 if cfg.loss == "nt_xent" else 0)
    truth = _loss_and_grads(cfg.loss, n, d, torch.float64, cfg.device, cfg.seed, "dense",
                            cfg.scale)
    dense_same = _loss_and_grads(cfg.loss, n, d, dtype, cfg.device, cfg.seed, "dense", cfg.scale)
    names = ["loss"] + [f"grad[{i}]" for i in range(len(truth[1]))]
    truth_all = [truth[0], *truth[1]]
    dense_all = [dense_same[0], *dense_same[1]]
    reports = []
    for backend in cfg.backends:
        report: dict[str, Any] = {"backend": backend, "n": n, "d": d, "dtype": cfg.dtype,
                                  "passed": True, "errors": {}, "message": ""}
        try:
            got = _loss_and_grads(cfg.loss, n, d, dtype, cfg.device, cfg.seed, backend, cfg.scale)
        except Exception as exc:  # a backend that cannot run cannot be benchmarked either
            report["passed"] = False
            report["message"] = f"{type(exc).__name__}: {exc}"
            reports.append(report)
            continue
        bad = []
        for name, g, t, ref in zip(names, [got[0], *got[1]], truth_all, dense_all):
            if g.shape != t.shape:
                bad.append(f"{name}: shape {tuple(g.shape)} != {tuple(t.shape)}")
                continue
            err, ref_err = _rel_rms(g, t), _rel_rms(ref, t)
            allowed = 2 * ref_err + CHECK_TOL[cfg.dtype]
            report["errors"][name] = {"rel_rms": err, "dense_rel_rms": ref_err, "allowed": allowed}
            if not err <= allowed:
                bad.append(f"{name}: relative RMS error {err:.3g} > allowed {allowed:.3g}")
        if bad:
            report["passed"] = False
            report["message"] = "; ".join(bad)
        reports.append(report)
    return reports


# --------------------------------------------------------------------------------------------
# Child process: one measurement
# --------------------------------------------------------------------------------------------


def _proc_status_kb(key: str, pid: str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _quantiles(times: list[float]) -> dict[str, float]:
    import statistics

    ordered = sorted(times)

    def q(p: float) -> float:
        if len(ordered) == 1:
            return ordered[0]
        pos = p * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"median_s": statistics.median(ordered), "p20_s": q(0.2), "p80_s": q(0.8),
            "min_s": ordered[0], "max_s": ordered[-1]}


def _measure_cpu(spec: dict) -> dict:
    import torch

    dtype = getattr(torch, DTYPES[spec["dtype"]])
    n, d = spec["n"], spec["d"]
    out: dict[str, Any] = {"rss_start_bytes": (_proc_status_kb("VmRSS") or 0) * 1024}

    # Lazy initialisation (thread pools, kernels, first-call dispatch) on a small problem, so a
    # big size needs no full-size warmup.
    small_leaves, small_call = make_problem(spec["loss"], min(n, 256), d, dtype, "cpu", 1,
                                            spec.get("scale"))
    small_call(spec["backend"]).backward()
    del small_leaves, small_call
    # RSS of the runtime alone (torch, its kernels libraries and thread pools, now initialised)
    out["rss_runtime_bytes"] = (_proc_status_kb("VmRSS") or 0) * 1024

    leaves, call = make_problem(spec["loss"], n, d, dtype, "cpu", spec["seed"], spec.get("scale"))
    rss_inputs = (_proc_status_kb("VmRSS") or 0) * 1024
    hwm_before = (_proc_status_kb("VmHWM") or 0) * 1024
    reset = _reset_peak_rss()

    cpu_times: list[float] = []

    def step() -> float:
        for leaf in leaves:
            leaf.grad = None
        c0, t0 = time.process_time(), time.perf_counter()
        call(spec["backend"]).backward()
        t1 = time.perf_counter()
        cpu_times.append(time.process_time() - c0)
        return t1 - t0

    warmup = spec["warmup"] if n <= 8192 else 0
    for _ in range(warmup):
        step()
    cpu_times.clear()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < spec["repeats"]:
        times.append(step())
        # Few repeats for big sizes: stop once a further repeat would end past 20 s of timing.
        if time.perf_counter() - started + times[-1] > 20.0:
            break
    hwm_after = (_proc_status_kb("VmHWM") or 0) * 1024
    peak_during = hwm_after if reset else max(hwm_after, hwm_before)
    out.update(_quantiles(times))
    out.update({
        "times_s": times,
        "rss_inputs_bytes": rss_inputs,
        "peak_mem_bytes": max(peak_during, hwm_before),
        "mem_beyond_inputs_bytes": max(peak_during - rss_inputs, 0),
        "peak_reset": reset,
        "repeats_done": len(times),
        # CPU seconds per wall second while timing: about torch.get_num_threads() when the
        # process had the cores to itself, less when other processes competed for them.
        "cpu_per_wall": sum(cpu_times) / sum(times),
        "cpu_median_s": sorted(cpu_times)[len(cpu_times) // 2],
        "threads": torch.get_num_threads(),
    })
    return out


def _measure_cuda(spec: dict) -> dict:
    import torch
    from triton.testing import do_bench

    dev = torch.device(spec["device"])
    torch.cuda.set_device(dev)
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    n, d = spec["n"], spec["d"]
    leaves, call = make_problem(spec["loss"], n, d, dtype, dev, spec["seed"], spec.get("scale"))

    def step() -> None:
        call(spec["backend"]).backward()

    for leaf in leaves:
        leaf.grad = None
    step()  # compile / autotune outside the memory and time measurements
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    mem_inputs = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(dev)
    grads_bytes = sum(leaf.grad.numel() * leaf.grad.element_size() for leaf in leaves)
    median, p20, p80 = do_bench(step, quantiles=[0.5, 0.2, 0.8], grad_to_none=leaves)
    times_ms = [median, p20, p80]

    # cuBLAS GEMM of the same shape (N x D @ D x M, same dtype): 2NMD flops. At very large N the
    # N x M output cannot exist, so a column slice (output <= 4 GiB) measures the same rate.
    a = torch.randn(n, d, device=dev, dtype=dtype)
    m_cols = min(n, max(1, (4 << 30) // (n * a.element_size())))
    b = torch.randn(m_cols, d, device=dev, dtype=dtype)
    gemm_ms = do_bench(lambda: torch.mm(a, b.T))
    gemm_flops_per_s = 2 * n * m_cols * d / (gemm_ms * 1e-3)
    return {
        "median_s": times_ms[0] * 1e-3, "p20_s": times_ms[1] * 1e-3, "p80_s": times_ms[2] * 1e-3,
        "min_s": None, "max_s": None, "times_s": [],
        "rss_inputs_bytes": None,
        "mem_inputs_bytes": mem_inputs,
        "peak_mem_bytes": peak,
        "mem_beyond_inputs_bytes": max(peak - mem_inputs, 0),
        "mem_beyond_inputs_and_grads_bytes": max(peak - mem_inputs - grads_bytes, 0),
        "gemm_flops_per_s": gemm_flops_per_s,
        "gemm_shape": [n, d, m_cols],
        "repeats_done": None,
    }


def _worker() -> None:
    """Entry point of a child: read the spec from argv, print one result line."""
    spec = json.loads(sys.argv[1])
    import torch

    torch.manual_seed(spec["seed"])
    try:
        if spec["device"].startswith("cuda"):
            try:
                result = _measure_cuda(spec)
            except torch.cuda.OutOfMemoryError as exc:
                result = {"status": "oom", "message": str(exc).splitlines()[0]}
        else:
            result = _measure_cpu(spec)
        result.setdefault("status", "ok")
    except MemoryError as exc:
        result = {"status": "oom", "message": f"MemoryError: {exc}"}
    except RuntimeError as exc:
        text = str(exc)
        status = "oom" if ("out of memory" in text.lower() or "can't allocate" in text.lower()) \
            else "error"
        result = {"status": status, "message": f"RuntimeError: {text.splitlines()[0] if text else ''}"}
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_child(spec: dict, mem_budget_bytes: float, time_budget_s: float) -> dict:
    """Run one measurement in a child process, watching its memory and time."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"]
                                          if env.get("PYTHONPATH") else "")
    code = "from recipes.bench_kernels import _worker; _worker()"
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(REPO_ROOT))
    chunks: dict[str, list[str]] = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda s=s, k=k: chunks[k].append(s.read()), daemon=True)
               for s, k in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for t in readers:
        t.start()
    started = time.monotonic()
    killed_for = None
    max_seen_rss = 0
    status_code, usage = None, None
    while True:
        pid, status_code, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        rss = (_proc_status_kb("VmRSS", str(proc.pid)) or 0) * 1024
        max_seen_rss = max(max_seen_rss, rss)
        if killed_for is None and not spec["device"].startswith("cuda") and rss > mem_budget_bytes:
            killed_for = "over-mem-budget"
            proc.send_signal(signal.SIGKILL)
        elif killed_for is None and time.monotonic() - started > time_budget_s:
            killed_for = "over-time-budget"
            proc.send_signal(signal.SIGKILL)
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status_code)
    for t in readers:
        t.join(timeout=5)
    wall = time.monotonic() - started
    stdout, stderr = "".join(chunks["out"]), "".join(chunks["err"])
    result: dict[str, Any] = {}
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
    if killed_for is not None:
        limit = (f"{mem_budget_bytes / 1e9:.1f} GB" if killed_for == "over-mem-budget"
                 else f"{time_budget_s:.0f} s")
        result = {"status": killed_for, "message": f"killed at the budget ({limit})"}
    elif not result:
        if proc.returncode == -signal.SIGKILL:
            result = {"status": "oom", "message": "child killed by SIGKILL (out of memory)"}
        else:
            tail = stderr.strip().splitlines()[-3:]
            result = {"status": "error",
                      "message": f"child exited with {proc.returncode}: " + " | ".join(tail)}
    result["wall_s"] = wall
    # ru_maxrss is in KiB on Linux: the child's peak RSS as the kernel counts it.
    result["child_maxrss_bytes"] = usage.ru_maxrss * 1024 if usage is not None else None
    result["max_polled_rss_bytes"] = max_seen_rss
    return result


# --------------------------------------------------------------------------------------------
# Predictions for the search and the memory guard
# --------------------------------------------------------------------------------------------


def _fit_power(points: list[tuple[int, float]], n: int, lo: float, hi: float,
               default_exp: float) -> float | None:
    """Predict y(n) from the two largest measured (N, y) points with y ~ N^p, p in [lo, hi]."""
    points = sorted(p for p in points if p[1] and p[1] > 0)
    if not points:
        return None
    n2, y2 = points[-1]
    exp = default_exp
    if len(points) >= 2:
        n1, y1 = points[-2]
        if n2 > n1:
            exp = math.log(y2 / y1) / math.log(n2 / n1)
    exp = min(max(exp, lo), hi)
    return y2 * (n / n2) ** exp


def predict(cfg: BenchConfig, backend: str, n: int, done: list[dict]) -> dict:
    """Predicted peak memory (bytes) and time (s) of (backend, n) from earlier measurements."""
    ok = [r for r in done if r["backend"] == backend and r["status"] == "ok"]
    inputs = 2 * n * cfg.dim * DTYPE_BYTES[cfg.dtype] * 2  # two feature tensors and their grads
    base = max((r.get("rss_start_bytes") or 0 for r in ok), default=0)
    beyond = _fit_power([(r["n"], r["mem_beyond_inputs_bytes"]) for r in ok], n, 0.0, 2.0,
                        2.0 if backend == "dense" else 1.0)
    if beyond is None:
        beyond = DENSE_BYTES_PER_LOGIT * n * n if backend == "dense" else 4 * inputs
    seconds = _fit_power([(r["n"], r["median_s"]) for r in ok], n, 1.0, 2.0, 2.0)
    return {"mem_bytes": base + inputs + beyond, "time_s": seconds}


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError):
        pass
    return f"{model} ({os.cpu_count()} cores{mem})"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(cfg: BenchConfig) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": cfg.device, "device_name": _device_name(cfg.device),
        "torch": torch.__version__, "triton": triton_version,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


def _record(cfg: BenchConfig, backend: str, n: int, search: bool, child: dict) -> dict:
    rec: dict[str, Any] = {"loss": cfg.loss, "backend": backend, "n": n, "m": n, "d": cfg.dim,
                           "dtype": cfg.dtype, "search": search,
                           "flops": flop_count(n, n, cfg.dim)}
    rec.update(child)
    if rec.get("status") == "ok" and rec.get("median_s"):
        rec["flops_per_s"] = rec["flops"] / rec["median_s"]
        if rec.get("gemm_flops_per_s"):
            rec["gemm_fraction"] = rec["flops_per_s"] / rec["gemm_flops_per_s"]
    return rec


def run_benchmark(cfg: BenchConfig) -> dict:
    """Measure every (backend, size), then search for the largest N; return all records."""
    from tqdm import tqdm

    mem_budget = cfg.mem_budget_gb * 1e9
    records: list[dict] = []
    largest: dict[str, dict] = {}
    bar = tqdm(total=len(cfg.backends) * len(cfg.sizes), desc="measurements", unit="run",
               file=sys.stderr, mininterval=1.0)

    def measure(backend: str, n: int, search: bool) -> dict:
        bar.set_postfix_str(f"{backend} N={n}")
        guess = predict(cfg, backend, n, records)
        available = None if cfg.device.startswith("cuda") else _mem_available_bytes()
        if not cfg.device.startswith("cuda") and guess["mem_bytes"] > mem_budget:
            child = {"status": "skipped-predicted-mem",
                     "message": f"predicted {guess['mem_bytes'] / 1e9:.1f} GB > budget "
                                f"{cfg.mem_budget_gb:.1f} GB"}
        elif available is not None and guess["mem_bytes"] > available:
            # A shared machine: do not push other processes into the OOM killer.
            child = {"status": "skipped-predicted-mem",
                     "message": f"predicted {guess['mem_bytes'] / 1e9:.1f} GB > "
                                f"{available / 1e9:.1f} GB available now"}
        elif search and guess["time_s"] is not None and guess["time_s"] > cfg.time_budget_s:
            child = {"status": "skipped-predicted-time",
                     "message": f"predicted {guess['time_s']:.0f} s > budget "
                                f"{cfg.time_budget_s:.0f} s"}
        else:
            spec = {"loss": cfg.loss, "backend": backend, "n": n, "d": cfg.dim,
                    "dtype": cfg.dtype, "device": cfg.device, "repeats": cfg.repeats,
                    "warmup": cfg.warmup, "seed": cfg.seed, "scale": cfg.scale}
            child = run_child(spec, mem_budget, cfg.time_budget_s)
        rec = _record(cfg, backend, n, search, child)
        rec["predicted_mem_bytes"] = guess["mem_bytes"]
        rec["predicted_time_s"] = guess["time_s"]
        records.append(rec)
        bar.update(1)
        return rec

    for backend in cfg.backends:
        for n in cfg.sizes:
            measure(backend, n, search=False)

    for backend in cfg.backends:
        ok = [r["n"] for r in records if r["backend"] == backend and r["status"] == "ok"]
        stop = None
        best = max(ok) if ok else None
        larger_failed = sorted((r["n"], r["status"], r.get("message", "")) for r in records
                               if r["backend"] == backend and r["status"] != "ok"
                               and (best is None or r["n"] > best))
        if larger_failed:
            # a requested size above the largest success already failed: no need to search
            stop = "N={}: {} ({})".format(*larger_failed[0])
        elif best is not None and cfg.max_n_search > best:
            n = best * 2
            while n <= cfg.max_n_search:
                bar.total += 1
                bar.refresh()
                rec = measure(backend, n, search=True)
                if rec["status"] != "ok":
                    stop = f"N={n}: {rec['status']} ({rec.get('message', '')})"
                    break
                best = n
                n *= 2
        if best is None:
            reason = "no size succeeded" + (f"; {stop}" if stop else "")
        elif stop is not None:
            reason = stop
        elif cfg.max_n_search == 0:
            reason = "search disabled (--max-n-search 0)"
        elif cfg.max_n_search < 2 * best:
            reason = f"no search: --max-n-search {cfg.max_n_search} < 2 x {best}"
        else:
            reason = f"search cap --max-n-search {cfg.max_n_search} reached"
        capped = best is not None and stop is None
        largest[backend] = {"n": best, "at_least": capped, "stopped_by": reason,
                            "predicted_n_at_mem_budget": _predicted_max_n(cfg, backend, records)}
    bar.close()
    return {"records": records, "largest_n": largest}


def _predicted_max_n(cfg: BenchConfig, backend: str, records: list[dict]) -> int | None:
    """Largest power-of-two N whose predicted memory fits the budget (from the measured fit)."""
    if not any(r["backend"] == backend and r["status"] == "ok" for r in records):
        return None
    n, best = 1024, None
    while n <= 1 << 26:
        if predict(cfg, backend, n, records)["mem_bytes"] <= cfg.mem_budget_gb * 1e9:
            best = n
        else:
            break
        n *= 2
    return best


# --------------------------------------------------------------------------------------------
# Targets (issue 2)
# --------------------------------------------------------------------------------------------


def _ok(records: list[dict], backend: str, n: int) -> dict | None:
    for r in records:
        if r["backend"] == backend and r["n"] == n and r["status"] == "ok":
            return r
    return None


def _rss_breakdown(r: dict) -> str:
    """' (runtime X + inputs Y + beyond inputs Z GB)' for a CPU record, '' when unknown."""
    runtime, inputs = r.get("rss_runtime_bytes"), r.get("rss_inputs_bytes")
    if not runtime or not inputs:
        return f" (beyond inputs {r['mem_beyond_inputs_bytes'] / 1e9:.3f} GB)"
    return (f" (runtime {runtime / 1e9:.3f} + inputs {(inputs - runtime) / 1e9:.3f} + beyond "
            f"inputs {r['mem_beyond_inputs_bytes'] / 1e9:.3f} GB)")


def evaluate_targets(cfg: BenchConfig, records: list[dict], static_rows: list[dict] | None
                     ) -> list[dict]:
    """The issue-2 targets whose sizes were run, each met or not with its numbers."""
    out: list[dict] = []
    if cfg.loss == "clip" and cfg.dtype == "fp32" and cfg.dim == 128 and cfg.device == "cpu":
        blk = _ok(records, "blockwise", 32768)
        den_any = [r for r in records if r["n"] == 32768 and r["backend"] == "dense"]
        den = den_any[0] if den_any else None
        ran = [r for r in records if r["n"] == 32768 and r["backend"] in ("blockwise", "dense")]
        if blk and den and den["status"] in ("ok", "over-time-budget"):
            # A dense run killed at the time budget still bounds the ratios: its time is above
            # the budget and its peak RSS (kernel's ru_maxrss of the child) above what it reached.
            killed = den["status"] != "ok"
            den_t = cfg.time_budget_s if killed else den["median_s"]
            den_m = den.get("child_maxrss_bytes") if killed else den["peak_mem_bytes"]
            rel = "<=" if killed else "="
            t_ratio = blk["median_s"] / den_t
            out.append({"target": "CPU N=M=32768: blockwise time <= 0.5 x dense",
                        "met": t_ratio <= 0.5,
                        "numbers": f"blockwise {blk['median_s']:.2f} s, dense "
                                   f"{'> ' if killed else ''}{den_t:.2f} s (ratio {rel} "
                                   f"{t_ratio:.2f})"})
            if den_m:
                m_ratio = blk["peak_mem_bytes"] / den_m
                beyond = ""
                if not killed:
                    beyond = (f"; beyond inputs {blk['mem_beyond_inputs_bytes'] / 1e9:.3f} vs "
                              f"{den['mem_beyond_inputs_bytes'] / 1e9:.2f} GB "
                              f"({100 * blk['mem_beyond_inputs_bytes'] / max(den['mem_beyond_inputs_bytes'], 1):.1f}%)")
                out.append({"target": "CPU N=M=32768: blockwise peak memory <= 5% of dense",
                            "met": m_ratio <= 0.05,
                            "numbers": f"peak RSS blockwise {blk['peak_mem_bytes'] / 1e9:.3f} GB"
                                       f"{_rss_breakdown(blk)}, "
                                       f"dense {'>= ' if killed else ''}{den_m / 1e9:.2f} GB "
                                       f"({rel} {100 * m_ratio:.1f}%){beyond}"})
        elif len(ran) == 2:
            out.append({"target": "CPU N=M=32768: blockwise vs dense", "met": False,
                        "numbers": "; ".join(f"{r['backend']}: {r['status']} {r.get('message', '')}"
                                             for r in ran)})
        blk64 = [r for r in records if r["backend"] == "blockwise" and r["n"] == 65536]
        if blk64:
            r = blk64[0]
            if r["status"] == "ok":
                out.append({"target": "CPU N=M=65536: blockwise <= 90 s", "met": r["median_s"] <= 90,
                            "numbers": f"{r['median_s']:.1f} s"})
                out.append({"target": "CPU N=M=65536: blockwise peak RSS <= 1.5 GB",
                            "met": r["peak_mem_bytes"] <= 1.5e9,
                            "numbers": f"{r['peak_mem_bytes'] / 1e9:.2f} GB"
                                       f"{_rss_breakdown(r)}"})
            else:
                out.append({"target": "CPU N=M=65536: blockwise <= 90 s, peak RSS <= 1.5 GB",
                            "met": False, "numbers": f"{r['status']}: {r.get('message', '')}"})
    if cfg.device.startswith("cuda") and cfg.dtype == "bf16":
        for r in records:
            if r["backend"] != "triton" or r["status"] != "ok":
                continue
            if r["n"] == 65536 and cfg.dim == 768 and cfg.loss in ("clip",):
                out.append({"target": "GPU N=M=65536 D=768 bf16: <= 50 ms (>= 530 TFLOP/s)",
                            "met": r["median_s"] <= 0.050,
                            "numbers": f"{r['median_s'] * 1e3:.1f} ms, "
                                       f"{r['flops_per_s'] / 1e12:.0f} TFLOP/s"})
            if cfg.dim >= 512 and r.get("gemm_fraction") is not None:
                out.append({"target": f"GPU N={r['n']} D={cfg.dim}: >= 65% of cuBLAS bf16",
                            "met": r["gemm_fraction"] >= 0.65,
                            "numbers": f"{100 * r['gemm_fraction']:.0f}%"})
            if r["n"] == 4194304 and cfg.dim == 768:
                out.append({"target": "GPU N=M=4194304 D=768 completes", "met": True,
                            "numbers": f"{r['median_s']:.2f} s"})
            beyond = r.get("mem_beyond_inputs_and_grads_bytes")
            if beyond is not None and r["n"] >= 65536:
                out.append({"target": f"GPU N={r['n']}: memory beyond inputs+grads "
                                       "<= 16 B/row + bounded workspace",
                            "met": None,
                            "numbers": f"{beyond / 1e6:.1f} MB = {beyond / r['n']:.1f} B/row "
                                       "(compare across N: the per-row part must stay <= 16 B)"})
    if static_rows:
        spill_keys = [k for k in static_rows[0] if "spill" in k.lower()]
        wgmma_keys = [k for k in static_rows[0] if "wgmma" in k.lower()]
        if spill_keys and wgmma_keys:
            spilling = [r for r in static_rows if any(r.get(k) for k in spill_keys)]
            # fp32 tiles use IEEE products on the FMA units by design (no tensor cores), so the
            # wgmma target is judged on the 16-bit configurations; fp32 is reported beside it.
            half = [r for r in static_rows if r.get("dtype") in ("bf16", "fp16")]
            judged = half if half else static_rows
            no_wgmma = [r for r in judged if not all(r.get(k) for k in wgmma_keys)]
            fp32 = [r for r in static_rows if r.get("dtype") == "fp32"]
            fp32_note = (f"; fp32 (IEEE, FMA by design): {sum(bool(r.get(wgmma_keys[0])) for r in fp32)}"
                         f" of {len(fp32)} use wgmma" if fp32 and half else "")
            out.append({"target": "Static sm_90: every shipped config, zero spills",
                        "met": not spilling,
                        "numbers": f"{len(spilling)} of {len(static_rows)} configs spill"
                                   + (" (" + ", ".join(
                                       f"{r.get('kernel', '?')}/{r.get('dtype', '?')}"
                                       for r in spilling[:6]) + ")" if spilling else "")})
            out.append({"target": "Static sm_90: tile products use wgmma"
                                  + (" (bf16/fp16 configs)" if half else ""),
                        "met": not no_wgmma,
                        "numbers": f"{len(no_wgmma)} of {len(judged)} configs without wgmma"
                                   + fp32_note})
    return out


# --------------------------------------------------------------------------------------------
# Output: table, JSON, CSV, plot
# --------------------------------------------------------------------------------------------


def _fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    return f"{b / 1e9:.2f}G" if b >= 1e9 else f"{b / 1e6:.1f}M"


def format_results(cfg: BenchConfig, env: dict, result: dict, checked: bool) -> str:
    on_cuda = cfg.device.startswith("cuda")
    records = result["records"]
    dense = {r["n"]: r for r in records if r["backend"] == "dense" and r["status"] == "ok"}
    lines = [
        f"{cfg.loss} forward+backward, D={cfg.dim}, {cfg.dtype}, logit multiplier "
        f"{cfg.scale if cfg.scale is not None else DEFAULT_SCALE[cfg.loss]:.4g}, on {env['device_name']} "
        f"(torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']})"
        + ("" if checked else "   [UNCHECKED: --no-check]"),
        "FLOP convention: 8*N*M*D per forward+backward (2NMD forward, 6NMD backward), M = N.",
        ("memory: torch.cuda.max_memory_allocated; 'beyond inputs' = peak - allocated after inputs"
         if on_cuda else
         "memory: peak RSS of the measuring process; 'beyond inputs' = peak RSS - RSS once the "
         "inputs exist"),
    ]
    head = ["backend", "N", "median s", "p20 s", "p80 s", "GFLOP/s", "peak mem", "beyond in",
            "t/dense", "mem/dense"]
    if on_cuda:
        head += ["GEMM TF/s", "of GEMM"]
    else:
        head += ["cpu s", "cpu/wall"]
    head += ["status"]
    rows = [head]
    for r in records:
        row = [r["backend"] + ("*" if r["search"] else ""), str(r["n"])]
        if r["status"] == "ok":
            d = dense.get(r["n"])
            row += [f"{r['median_s']:.4g}", f"{r['p20_s']:.4g}", f"{r['p80_s']:.4g}",
                    f"{r['flops_per_s'] / 1e9:.3g}", _fmt_bytes(r["peak_mem_bytes"]),
                    _fmt_bytes(r["mem_beyond_inputs_bytes"]),
                    f"{r['median_s'] / d['median_s']:.2f}" if d and checked else "-",
                    f"{r['peak_mem_bytes'] / d['peak_mem_bytes']:.3f}" if d else "-"]
            if on_cuda:
                g = r.get("gemm_flops_per_s")
                row += [f"{g / 1e12:.0f}" if g else "-",
                        f"{100 * r['gemm_fraction']:.0f}%" if r.get("gemm_fraction") else "-"]
            else:
                row.append(f"{r['cpu_median_s']:.4g}" if r.get("cpu_median_s") else "-")
                row.append(f"{r['cpu_per_wall']:.2f}" if r.get("cpu_per_wall") else "-")
            row.append("ok")
        else:
            row += ["-"] * (8 + 2)
            row.append(f"{r['status']}: {r.get('message', '')}"[:70])
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if 0 < j < len(head) - 1 else c.ljust(w)
                               for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("(* = largest-N search)")
    if not on_cuda:
        lines.append(f"cpu s = median CPU seconds (all threads) per iteration; cpu/wall = CPU "
                     f"seconds per wall second while timing ({env['threads']} threads); well below the thread count means other processes shared the "
                     "cores and the times are inflated.")
        contended = [r for r in records if r["status"] == "ok" and r.get("cpu_per_wall")
                     and r["cpu_per_wall"] < 0.75 * min(env["threads"], os.cpu_count() or 1)]
        if contended:
            lines.append(f"WARNING: {len(contended)} measurement(s) ran on a shared CPU "
                         f"(1-min load average {env.get('load_average_at_start') or 0:.1f} on "
                         f"{os.cpu_count()} cores at start).")
    lines.append("")
    lines.append(f"Largest N that fits (memory budget {cfg.mem_budget_gb:.1f} GB, time budget "
                 f"{cfg.time_budget_s:.0f} s per measurement):")
    for backend, info in result["largest_n"].items():
        n = info["n"]
        shown = "none" if n is None else (f">= {n}" if info["at_least"] else str(n))
        pred = info.get("predicted_n_at_mem_budget")
        lines.append(f"  {backend:<10} {shown:<10} stopped by: {info['stopped_by']}"
                     + (f"; predicted from the memory fit: {pred}" if pred and not on_cuda else ""))
    return "\n".join(lines)


def format_targets(targets: list[dict]) -> str:
    if not targets:
        return ""
    lines = ["Targets (issue 2):"]
    for t in targets:
        verdict = {True: "MET", False: "NOT MET", None: "REPORTED"}[t["met"]]
        lines.append(f"  [{verdict:>8}] {t['target']}: {t['numbers']}")
    return "\n".join(lines)


CSV_FIELDS = ["date", "git_commit", "device", "device_name", "torch", "triton", "python", "loss",
              "backend", "n", "m", "d", "dtype", "search", "status", "median_s", "p20_s", "p80_s",
              "flops", "flops_per_s", "peak_mem_bytes", "mem_beyond_inputs_bytes",
              "child_maxrss_bytes", "gemm_flops_per_s", "gemm_fraction", "repeats_done",
              "cpu_per_wall", "cpu_median_s", "load_average_at_start",
              "checked", "message"]


def write_outputs(cfg: BenchConfig, env: dict, result: dict, checks: list[dict] | None,
                  targets: list[dict], table: str, checked: bool) -> dict[str, Path]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dev = "cuda" if cfg.device.startswith("cuda") else "cpu"
    stem = f"bench_{cfg.loss}_{dev}_{cfg.dtype}_d{cfg.dim}_{stamp}"
    paths = {"json": out / f"{stem}.json", "csv": out / "bench_kernels.csv",
             "png": out / f"{stem}.png", "table": out / f"{stem}.txt"}
    payload = {"config": dataclasses.asdict(cfg), "environment": env, "checked": checked,
               "check": checks, "flop_convention": "8*N*M*D", **result, "targets": targets}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str))
    paths["table"].write_text(table + "\n")
    new = not paths["csv"].exists()
    with paths["csv"].open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in result["records"]:
            writer.writerow({**env, **r, "checked": checked})
    plot(cfg, env, result["records"], paths["png"])
    return paths


def plot(cfg: BenchConfig, env: dict, records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on_cuda = cfg.device.startswith("cuda")
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend in cfg.backends:
        ok = sorted((r for r in records if r["backend"] == backend and r["status"] == "ok"),
                    key=lambda r: r["n"])
        if not ok:
            continue
        ns = [r["n"] for r in ok]
        med = [r["median_s"] for r in ok]
        color = {"triton": "tab:green", "blockwise": "tab:blue", "dense": "tab:orange"}[backend]
        ax_t.errorbar(ns, med, yerr=[[m - r["p20_s"] for m, r in zip(med, ok)],
                                     [r["p80_s"] - m for m, r in zip(med, ok)]],
                      marker="o", capsize=3, color=color, label=backend)
        ax_m.plot(ns, [r["peak_mem_bytes"] / 1e9 for r in ok], marker="o", color=color,
                  label=f"{backend} peak")
        ax_m.plot(ns, [max(r["mem_beyond_inputs_bytes"], 1) / 1e9 for r in ok], marker="x",
                  color=color, linestyle="--", label=f"{backend} beyond inputs")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (= M)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_t.set_ylabel("forward+backward time (s), median, p20-p80")
    ax_m.set_ylabel("GB (" + ("max_memory_allocated" if on_cuda else "peak RSS") + ")")
    ax_m.axhline(cfg.mem_budget_gb, color="grey", linestyle=":", linewidth=1)
    fig.suptitle(f"{cfg.loss}, D={cfg.dim}, {cfg.dtype}, {env['device_name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_static(cfg: BenchConfig) -> list[dict]:
    from csrc_triton.static_check import format_table, static_report

    rows = static_report(arch=90, dtypes=("bf16", "fp16", "fp32"))
    print("Static compile report for sm_90 (no GPU needed):")
    print(format_table(rows))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "static_sm90.json").write_text(json.dumps(rows, indent=2, default=str))
    return rows


class CheckFailed(SystemExit):
    """Raised (exit status 3) when a backend disagrees with dense: no speed-up is reported."""


def main(argv: list[str] | None = None) -> dict:
    cfg, measure = config_from_args(argv)
    print("BenchConfig(" + ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items())
          + ")", flush=True)
    if not measure:
        print("--static without --sizes/--backends: compile report only, no measurements")
    static_rows = run_static(cfg) if cfg.static else None
    summary: dict[str, Any] = {"config": cfg, "static": static_rows}
    if not measure:
        targets = evaluate_targets(cfg, [], static_rows)
        if targets:
            print(format_targets(targets))
        summary["targets"] = targets
        return summary

    checks = None
    if cfg.check:
        checks = correctness_check(cfg)
        for c in checks:
            print(f"check {c['backend']:<10} vs dense (N={c['n']}, D={c['d']}, {c['dtype']}): "
                  + ("passed" if c["passed"] else f"FAILED: {c['message']}"), flush=True)
        failed = [c for c in checks if not c["passed"]]
        if failed:
            raise CheckFailed(
                "bench_kernels: refusing to benchmark: the correctness check against dense failed "
                "for " + ", ".join(f"backend={c['backend']!r} ({c['message']})" for c in failed)
                + "; fix the backend or pass --no-check to measure it unchecked")

    env = environment(cfg)
    result = run_benchmark(cfg)
    table = format_results(cfg, env, result, checked=cfg.check)
    targets = evaluate_targets(cfg, result["records"], static_rows)
    text = table + ("\n\n" + format_targets(targets) if targets else "")
    print(text)
    paths = write_outputs(cfg, env, result, checks, targets, text, checked=cfg.check)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    summary.update({"environment": env, "check": checks, "targets": targets, "paths": paths,
                    "table": text, **result})
    return summary


if __name__ == "__main__":
    main()
