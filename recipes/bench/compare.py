"""Side by side against a peer library (``--compare pml``): same N, D, dtype and inputs.

For each loss with a counterpart (:attr:`recipes.bench.cases.Case.peer`) and each N, our loss
(every backend of ``--backends``) and the peer's loss run in separate child processes on inputs
built from the same seed, so both see the same tensors. Each gets the same treatment: a small
warm-up, the timed forward + backward repetitions, peak RSS (CPU) or peak allocated memory
(CUDA), and the same budgets and memory predictions (a peer size predicted not to fit is not
started, and is reported as such rather than as a number).

:func:`pair_rows` turns the records into one row per (loss, N, backend): ours / theirs for the
median time, the peak memory and the memory beyond the inputs.
"""
from __future__ import annotations

import sys
from typing import Any

from . import cases, search
from .config import BenchConfig


def run_comparison(cfg: BenchConfig, losses: tuple[str, ...]) -> dict[str, Any]:
    """Measure ours and the peer's loss at every size; returns ``{"records": [...]}``."""
    from tqdm import tqdm

    records: list[dict] = []
    bar = tqdm(total=len(losses) * len(cfg.sizes) * (len(cfg.backends) + 1),
               desc="measurements", unit="run", file=sys.stderr, mininterval=1.0)
    for loss in losses:
        for n in cfg.sizes:
            for backend in cfg.backends:
                bar.set_postfix_str(f"{loss} ours/{backend} N={n}")
                search.measure(cfg, loss, backend, n, False, records, side="ours")
                bar.update(1)
            bar.set_postfix_str(f"{loss} {cfg.compare} N={n}")
            search.measure(cfg, loss, cfg.compare, n, False, records, side=cfg.compare)
            bar.update(1)
    bar.close()
    return {"records": records}


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours and theirs else None


def pair_rows(cfg: BenchConfig, records: list[dict]) -> list[dict[str, Any]]:
    """One row per (loss, N, our backend): both sides' numbers and ours/theirs ratios.

    When the peer did not run to the end (killed at a budget, out of memory, or skipped by the
    memory prediction), ``bound`` says what is still known: its time is above the time budget,
    or its memory above the budget / what it reached; the ratios are then upper bounds
    (``ratio_is_bound``) or absent.
    """
    rows = []
    peers = {(r["loss"], r["n"]): r for r in records if r["side"] != "ours"}
    for r in records:
        if r["side"] != "ours":
            continue
        theirs = peers.get((r["loss"], r["n"]))
        case = cases.get(r["loss"])
        row: dict[str, Any] = {
            "loss": r["loss"], "n": r["n"], "backend": r["backend"],
            "peer": case.peer.name if case.peer else None,
            "same_loss": case.peer.same_loss if case.peer else None,
            "ours_status": r["status"], "peer_status": theirs["status"] if theirs else None,
            "ours_s": r.get("median_s"), "peer_s": theirs.get("median_s") if theirs else None,
            "ours_peak_bytes": r.get("peak_mem_bytes"),
            "peer_peak_bytes": theirs.get("peak_mem_bytes") if theirs else None,
            "ours_beyond_bytes": r.get("mem_beyond_inputs_bytes"),
            "peer_beyond_bytes": theirs.get("mem_beyond_inputs_bytes") if theirs else None,
            "ratio_is_bound": False, "bound": "",
        }
        if r["status"] == "ok" and theirs is not None and theirs["status"] == "ok":
            row["time_ratio"] = _ratio(r["median_s"], theirs["median_s"])
            row["peak_ratio"] = _ratio(r["peak_mem_bytes"], theirs["peak_mem_bytes"])
            row["beyond_ratio"] = _ratio(r["mem_beyond_inputs_bytes"],
                                         theirs["mem_beyond_inputs_bytes"])
        elif r["status"] == "ok" and theirs is not None:
            row["ratio_is_bound"] = True
            status = theirs["status"]
            if status == "over-time-budget":
                row["time_ratio"] = _ratio(r["median_s"], cfg.time_budget_s)
                row["bound"] = f"{case.peer.name} ran past the {cfg.time_budget_s:.0f} s budget"
                reached = theirs.get("child_maxrss_bytes")
                if reached and not cfg.on_cuda:
                    row["peak_ratio"] = _ratio(r["peak_mem_bytes"], reached)
                    row["bound"] += f", reaching {reached / 1e9:.2f} GB"
            elif status == "over-mem-budget":
                # killed once its RSS passed the budget: its peak is above the budget
                row["peak_ratio"] = _ratio(r["peak_mem_bytes"], cfg.mem_budget_gb * 1e9)
                row["bound"] = f"{case.peer.name}: {status} ({theirs.get('message', '')})"
            else:
                row["bound"] = f"{case.peer.name}: {status} ({theirs.get('message', '')})"
        rows.append(row)
    return rows
