"""Which sizes to run: the requested ones, then the largest N that fits, with predictions.

Before starting a child, its peak memory and time are predicted from the measurements already
made for the same (loss, side, backend): a power law y ~ N^p through the two largest successful
sizes, with p clamped to a plausible range (memory beyond the inputs: [0, 2], or [0, p_peer]
for a peer, p_peer its ``memory_exponent``, 3 where PML builds cubic masks; time: [1, 2], or
[1, p_peer]). With no measurement yet, dense is assumed to need :data:`DENSE_BYTES_PER_LOGIT`
bytes per logit, a peer its own ``bytes_beyond``, and a tiled backend four times its inputs.
A size predicted over the memory budget, or over the memory available right now, is not
started (status ``skipped-predicted-mem``); a search size predicted over the time budget
neither.

Largest-N search (``--max-n-search``): from the largest size that succeeded, double N and
measure again until the cap, a failure, or a prediction stops it. A requested size that failed
above the largest success bounds the answer exactly, so no search is needed then.
"""
from __future__ import annotations

import math
import sys
from typing import Any

from . import cases, harness
from .config import DTYPE_BYTES, BenchConfig

# Dense materialises S plus its softmax and their gradients: about 16 bytes per logit
# (DESIGN.md). Used to predict memory before the first measurement of a backend.
DENSE_BYTES_PER_LOGIT = 16


def fit_power(points: list[tuple[int, float]], n: int, lo: float, hi: float,
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


def predict(cfg: BenchConfig, loss: str, backend: str, n: int, done: list[dict],
            side: str = "ours") -> dict[str, float | None]:
    """Predicted peak memory (bytes) and time (s) of one measurement from earlier ones."""
    case = cases.get(loss)
    ok = [r for r in done if r["loss"] == loss and r["backend"] == backend
          and r.get("side", "ours") == side and r["status"] == "ok"]
    # the feature tensors and their gradients
    inputs = 2 * case.feature_rows(n) * cfg.dim * DTYPE_BYTES[cfg.dtype]
    base = max((r.get("rss_start_bytes") or 0 for r in ok), default=0)
    peer = case.peer if side != "ours" else None
    exponent = peer.memory_exponent if peer is not None else 2.0
    beyond = fit_power([(r["n"], r["mem_beyond_inputs_bytes"]) for r in ok], n, 0.0, exponent,
                       exponent if backend == "dense" or peer is not None else 1.0)
    if beyond is None:
        if peer is not None:
            beyond = peer.bytes_beyond(n, cfg.per_class)
        elif backend == "dense":
            beyond = DENSE_BYTES_PER_LOGIT * n * n
        else:
            beyond = 4 * inputs
    seconds = fit_power([(r["n"], r["median_s"]) for r in ok], n, 1.0, max(exponent, 2.0), 2.0)
    return {"mem_bytes": base + inputs + beyond, "time_s": seconds}


def guard(cfg: BenchConfig, guess: dict, search: bool) -> dict | None:
    """A 'skipped-predicted-*' result when a prediction says not to start, else None."""
    budget = cfg.mem_budget_gb * 1e9
    if cfg.on_cuda:
        return None if not (search and guess["time_s"] and guess["time_s"] > cfg.time_budget_s) \
            else {"status": "skipped-predicted-time",
                  "message": f"predicted {guess['time_s']:.0f} s > budget "
                             f"{cfg.time_budget_s:.0f} s"}
    available = harness.mem_available_bytes()
    if guess["mem_bytes"] > budget:
        return {"status": "skipped-predicted-mem",
                "message": f"predicted {guess['mem_bytes'] / 1e9:.3g} GB > budget "
                           f"{cfg.mem_budget_gb:.1f} GB"}
    if available is not None and guess["mem_bytes"] > available:
        # A shared machine: do not push other processes into the OOM killer.
        return {"status": "skipped-predicted-mem",
                "message": f"predicted {guess['mem_bytes'] / 1e9:.3g} GB > "
                           f"{available / 1e9:.1f} GB available now"}
    if search and guess["time_s"] is not None and guess["time_s"] > cfg.time_budget_s:
        return {"status": "skipped-predicted-time",
                "message": f"predicted {guess['time_s']:.0f} s > budget {cfg.time_budget_s:.0f} s"}
    return None


def child_spec(cfg: BenchConfig, loss: str, backend: str, n: int, side: str = "ours") -> dict:
    """The JSON spec of one child measurement (see :mod:`recipes.bench.harness`)."""
    return {"loss": loss, "side": side, "backend": backend, "n": n, "d": cfg.dim,
            "dtype": cfg.dtype, "device": cfg.device, "repeats": cfg.repeats,
            "warmup": cfg.warmup, "seed": cfg.seed, "scale": cfg.scale,
            "per_class": cfg.per_class}


def make_record(cfg: BenchConfig, loss: str, backend: str, n: int, search: bool, child: dict,
                side: str = "ours") -> dict:
    """One row of results: what was measured, the work, and the child's numbers."""
    case = cases.get(loss)
    rec: dict[str, Any] = {"loss": loss, "side": side, "backend": backend, "n": n, "m": n,
                           "d": cfg.dim, "dtype": cfg.dtype, "search": search,
                           "flops": case.flops(n, cfg.dim) if side == "ours" else None,
                           "flop_formula": case.flop_formula if side == "ours" else None}
    rec.update(child)
    if rec.get("status") == "ok" and rec.get("median_s") and rec["flops"]:
        rec["flops_per_s"] = rec["flops"] / rec["median_s"]
        if rec.get("gemm_flops_per_s"):
            rec["gemm_fraction"] = rec["flops_per_s"] / rec["gemm_flops_per_s"]
    return rec


def measure(cfg: BenchConfig, loss: str, backend: str, n: int, search: bool,
            records: list[dict], side: str = "ours") -> dict:
    """Predict, then run (or skip) one measurement; appends and returns its record."""
    guess = predict(cfg, loss, backend, n, records, side)
    child = guard(cfg, guess, search)
    if child is None:
        child = harness.run_child(child_spec(cfg, loss, backend, n, side),
                                  cfg.mem_budget_gb * 1e9, cfg.time_budget_s)
    rec = make_record(cfg, loss, backend, n, search, child, side)
    rec["predicted_mem_bytes"] = guess["mem_bytes"]
    rec["predicted_time_s"] = guess["time_s"]
    records.append(rec)
    return rec


def run_benchmark(cfg: BenchConfig, losses: tuple[str, ...] | None = None) -> dict:
    """Measure every (loss, backend, size), then search for the largest N of each.

    Returns ``{"records": [...], "largest_n": {loss: {backend: {...}}}}``.
    """
    from tqdm import tqdm

    losses = cfg.losses if losses is None else losses
    records: list[dict] = []
    largest: dict[str, dict[str, dict]] = {}
    bar = tqdm(total=len(losses) * len(cfg.backends) * len(cfg.sizes), desc="measurements",
               unit="run", file=sys.stderr, mininterval=1.0)

    def run(loss: str, backend: str, n: int, search: bool) -> dict:
        bar.set_postfix_str(f"{loss} {backend} N={n}")
        rec = measure(cfg, loss, backend, n, search, records)
        bar.update(1)
        return rec

    for loss in losses:
        for backend in cfg.backends:
            for n in cfg.sizes:
                run(loss, backend, n, search=False)

    for loss in losses:
        step = 2 if cases.get(loss).even_n else 1
        largest[loss] = {}
        for backend in cfg.backends:
            mine = [r for r in records if r["loss"] == loss and r["backend"] == backend]
            ok = [r["n"] for r in mine if r["status"] == "ok"]
            stop = None
            best = max(ok) if ok else None
            larger_failed = sorted((r["n"], r["status"], r.get("message", "")) for r in mine
                                   if r["status"] != "ok" and (best is None or r["n"] > best))
            if larger_failed:
                # a requested size above the largest success already failed: no search needed
                stop = "N={}: {} ({})".format(*larger_failed[0])
            elif best is not None and cfg.max_n_search > best:
                n = best * 2
                while n <= cfg.max_n_search and n % step == 0:
                    bar.total += 1
                    bar.refresh()
                    rec = run(loss, backend, n, search=True)
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
            largest[loss][backend] = {
                "n": best, "at_least": capped, "stopped_by": reason,
                "predicted_n_at_mem_budget": predicted_max_n(cfg, loss, backend, records)}
    bar.close()
    return {"records": records, "largest_n": largest}


def predicted_max_n(cfg: BenchConfig, loss: str, backend: str, records: list[dict]) -> int | None:
    """Largest power-of-two N whose predicted memory fits the budget (from the measured fit)."""
    if not any(r["loss"] == loss and r["backend"] == backend and r["status"] == "ok"
               for r in records):
        return None
    n, best = 1024, None
    while n <= 1 << 26:
        if predict(cfg, loss, backend, n, records)["mem_bytes"] <= cfg.mem_budget_gb * 1e9:
            best = n
        else:
            break
        n *= 2
    return best
