"""One measurement in its own child process: time, peak memory, budgets.

Each (loss, side, backend, N) runs in a fresh Python process so that

- peak memory is that measurement's alone: on CPU the child's peak resident set size (VmHWM,
  reset through ``/proc/self/clear_refs`` once the inputs exist), with the kernel's own
  ``ru_maxrss`` of the child seen by the parent through ``wait4``; on CUDA
  ``torch.cuda.max_memory_allocated``;
- running out of memory kills only the child; the parent polls the child's RSS every 20 ms and
  kills it (SIGKILL) once it passes the memory budget, and kills it once it runs past the time
  budget.

A measurement is described by a JSON-able ``spec`` dict: ``loss`` (a case name), ``side``
("ours", or "pml" for the peer library's loss on the same inputs), ``backend`` (ours), ``n``,
``d``, ``dtype``, ``device``, ``repeats``, ``warmup``, ``seed``, ``scale``, ``per_class``.
The child prints one line ``BENCH_RESULT {json}``.
"""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from .config import DTYPES, REPO_ROOT

RESULT_MARK = "BENCH_RESULT "
#: a measurement's timed repetitions stop once the next would end past this much timing
TIMING_WINDOW_S = 20.0
#: sizes above this get only a small-size warm-up (a full-size one would double their cost)
FULL_WARMUP_MAX_N = 8192
#: how often the parent samples the child's RSS
POLL_S = 0.02


def proc_status_kb(key: str, pid: str = "self") -> int | None:
    """A ``/proc/<pid>/status`` field in KiB (VmRSS, VmHWM), None where unreadable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def mem_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo: what can be allocated now without swapping others out."""
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


def quantiles(times: list[float]) -> dict[str, float]:
    """Median, p20, p80 (linear interpolation), min and max of the timings."""
    ordered = sorted(times)

    def q(p: float) -> float:
        if len(ordered) == 1:
            return ordered[0]
        pos = p * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"median_s": statistics.median(ordered), "p20_s": q(0.2), "p80_s": q(0.8),
            "min_s": ordered[0], "max_s": ordered[-1]}


def _problem(spec: dict, n: int, device: Any, seed: int):
    """The measured call of ``spec`` at size ``n``: (leaves, zero-argument step returning loss)."""
    import torch

    from . import cases

    case = cases.get(spec["loss"])
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    peer = spec.get("side", "ours") != "ours"
    problem = case.problem(n, spec["d"], dtype, device, seed, spec.get("scale"),
                           spec.get("per_class", 4), with_peer=peer)
    if peer:
        return problem.leaves, problem.peer_call
    backend = spec["backend"]
    return problem.leaves, lambda: problem.call(backend)


def _measure_cpu(spec: dict) -> dict:
    import torch

    n = spec["n"]
    out: dict[str, Any] = {"rss_start_bytes": (proc_status_kb("VmRSS") or 0) * 1024}

    # Lazy initialisation (thread pools, kernels, first-call dispatch, the peer library's
    # imports) on a small problem, so a big size needs no full-size warm-up.
    _small_leaves, small_step = _problem(spec, min(n, 256), "cpu", 1)
    small_step().backward()
    del _small_leaves, small_step
    # RSS of the runtime alone (torch, its kernel libraries and thread pools, now initialised)
    out["rss_runtime_bytes"] = (proc_status_kb("VmRSS") or 0) * 1024

    leaves, loss_of = _problem(spec, n, "cpu", spec["seed"])
    rss_inputs = (proc_status_kb("VmRSS") or 0) * 1024
    hwm_before = (proc_status_kb("VmHWM") or 0) * 1024
    reset = _reset_peak_rss()

    cpu_times: list[float] = []

    def step() -> float:
        for leaf in leaves:
            leaf.grad = None
        c0, t0 = time.process_time(), time.perf_counter()
        loss_of().backward()
        t1 = time.perf_counter()
        cpu_times.append(time.process_time() - c0)
        return t1 - t0

    warmup = spec["warmup"] if n <= FULL_WARMUP_MAX_N else 0
    for _ in range(warmup):
        step()
    cpu_times.clear()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < spec["repeats"]:
        times.append(step())
        if time.perf_counter() - started + times[-1] > TIMING_WINDOW_S:
            break
    hwm_after = (proc_status_kb("VmHWM") or 0) * 1024
    peak_during = hwm_after if reset else max(hwm_after, hwm_before)
    out.update(quantiles(times))
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
    leaves, loss_of = _problem(spec, n, dev, spec["seed"])

    def step() -> None:
        loss_of().backward()

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
    grads_bytes = sum(leaf.grad.numel() * leaf.grad.element_size() for leaf in leaves
                      if leaf.grad is not None)
    median, p20, p80 = do_bench(step, quantiles=[0.5, 0.2, 0.8], grad_to_none=leaves)
    out = {
        "median_s": median * 1e-3, "p20_s": p20 * 1e-3, "p80_s": p80 * 1e-3,
        "min_s": None, "max_s": None, "times_s": [],
        "rss_inputs_bytes": None,
        "mem_inputs_bytes": mem_inputs,
        "peak_mem_bytes": peak,
        "mem_beyond_inputs_bytes": max(peak - mem_inputs, 0),
        "mem_beyond_inputs_and_grads_bytes": max(peak - mem_inputs - grads_bytes, 0),
        "repeats_done": None,
    }
    if spec.get("side", "ours") == "ours":
        # cuBLAS GEMM of the same shape (N x D @ D x M, same dtype): 2NMD flops. At very large
        # N the N x M output cannot exist, so a column slice (output <= 4 GiB) gives the rate.
        a = torch.randn(n, d, device=dev, dtype=dtype)
        m_cols = min(n, max(1, (4 << 30) // (n * a.element_size())))
        b = torch.randn(m_cols, d, device=dev, dtype=dtype)
        gemm_ms = do_bench(lambda: torch.mm(a, b.T))
        out["gemm_flops_per_s"] = 2 * n * m_cols * d / (gemm_ms * 1e-3)
        out["gemm_shape"] = [n, d, m_cols]
    return out


def worker() -> None:
    """Entry point of a child: read the spec from argv, print one result line."""
    spec = json.loads(sys.argv[1])
    import torch

    from .cases import NotAvailable

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
    except NotAvailable as exc:
        result = {"status": "not-available", "message": str(exc)}
    except MemoryError as exc:
        result = {"status": "oom", "message": f"MemoryError: {exc}"}
    except RuntimeError as exc:
        text = str(exc)
        lowered = text.lower()
        status = "oom" if ("out of memory" in lowered or "can't allocate" in lowered) else "error"
        first = text.splitlines()[0] if text else ""
        result = {"status": status, "message": f"RuntimeError: {first}"}
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_child(spec: dict, mem_budget_bytes: float, time_budget_s: float, *,
              worker_module: str = "recipes.bench.harness",
              on_poll: Callable[[float, int, int], None] | None = None) -> dict:
    """Run one measurement in a child process, watching its memory and time.

    The child runs ``worker()`` of ``worker_module`` with ``spec`` as JSON in argv[1] and prints
    its result after ``RESULT_MARK``. ``on_poll(elapsed_s, rss, max_rss)`` is called at every
    poll (progress reports of long steps).

    Returns the child's result dict (``status`` "ok" with the numbers, or "oom", "error",
    "not-available", "over-mem-budget", "over-time-budget"), plus ``wall_s``,
    ``child_maxrss_bytes`` (the kernel's peak RSS of the child) and ``max_polled_rss_bytes``.
    The RSS budget applies on CPU only (on CUDA the device memory is the limit).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"]
                                          if env.get("PYTHONPATH") else "")
    code = f"from {worker_module} import worker; worker()"
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
    status_code, usage = 0, None
    on_cuda = spec["device"].startswith("cuda")
    while True:
        pid, status_code, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        rss = (proc_status_kb("VmRSS", str(proc.pid)) or 0) * 1024
        max_seen_rss = max(max_seen_rss, rss)
        if on_poll is not None:
            on_poll(time.monotonic() - started, rss, max_seen_rss)
        if killed_for is None and not on_cuda and rss > mem_budget_bytes:
            killed_for = "over-mem-budget"
            proc.send_signal(signal.SIGKILL)
        elif killed_for is None and time.monotonic() - started > time_budget_s:
            killed_for = "over-time-budget"
            proc.send_signal(signal.SIGKILL)
        time.sleep(POLL_S)
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


def run_reported(spec: dict, kill_rss_bytes: float, time_budget_s: float, *, worker_module: str,
                 report_every_s: float | None = None) -> dict:
    """:func:`run_child` for the training-step benchmarks (``recipes.bench_images``,
    ``recipes.bench_clip``): the child (``worker()`` of ``worker_module``) is killed (SIGKILL)
    once its RSS passes ``kill_rss_bytes`` (CPU only) or it runs past ``time_budget_s``; with
    ``report_every_s``, the elapsed time and the child's RSS are printed that often (long
    single steps), and a killed child's result gets a ``message`` saying which budget it passed.

    Returns the child's result (``status`` "ok", "oom", "error", "over-mem-budget",
    "over-time-budget") plus ``wall_s``, ``child_maxrss_bytes`` (the kernel's peak RSS of the
    child, ``ru_maxrss`` from ``wait4``) and ``max_polled_rss_bytes``.
    """
    from .report import fmt_bytes

    next_report = [report_every_s]

    def on_poll(elapsed: float, rss: int, max_rss: int) -> None:
        if next_report[0] is not None and elapsed >= next_report[0]:
            print(f"  ... {elapsed:.0f} s, RSS {fmt_bytes(rss)} (max so far {fmt_bytes(max_rss)})",
                  flush=True)
            next_report[0] += report_every_s

    result = run_child(spec, kill_rss_bytes, time_budget_s, worker_module=worker_module,
                       on_poll=on_poll)
    if result.get("status") == "over-mem-budget":
        result["message"] = f"killed: RSS passed {kill_rss_bytes / 1e9:.2f} GB"
    elif result.get("status") == "over-time-budget":
        result["message"] = f"killed: ran past {time_budget_s:.0f} s"
    return result
