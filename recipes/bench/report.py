"""Output: the printed tables, the JSON file, the tagged CSV rows and the PNG plots.

Nothing here measures or judges: the tables give the numbers and the ratios between them
(backend / dense, ours / peer); which of them meet a goal is for the README to say.

Files, in ``--out``:
- ``bench_<losses>_<device>_<dtype>_d<D>_<UTC stamp>.{json,txt,png}`` for the backend benchmark,
  ``compare_pml_...`` for ``--compare pml``;
- ``bench_kernels.csv`` / ``compare_pml.csv``: one row per measurement (per pair for the
  comparison), appended, tagged with date, commit, device and versions;
- ``static_sm90.json`` for ``--static``.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from . import cases
from .config import REPO_ROOT, BenchConfig

CSV_FIELDS = ["date", "git_commit", "device", "device_name", "torch", "triton", "python", "loss",
              "backend", "n", "m", "d", "dtype", "search", "status", "median_s", "p20_s", "p80_s",
              "flops", "flops_per_s", "peak_mem_bytes", "mem_beyond_inputs_bytes",
              "child_maxrss_bytes", "gemm_flops_per_s", "gemm_fraction", "repeats_done",
              "cpu_per_wall", "cpu_median_s", "load_average_at_start",
              "checked", "message"]
COMPARE_CSV_FIELDS = ["date", "git_commit", "device", "device_name", "torch", "triton", "python",
                      "pml", "loss", "n", "d", "dtype", "per_class", "backend", "peer",
                      "same_loss", "ours_status", "peer_status", "ours_s", "peer_s", "time_ratio",
                      "ours_peak_bytes", "peer_peak_bytes", "peak_ratio", "ours_beyond_bytes",
                      "peer_beyond_bytes", "beyond_ratio", "ratio_is_bound", "bound", "checked"]
BACKEND_COLORS = {"triton": "tab:green", "blockwise": "tab:blue", "dense": "tab:orange"}


# --------------------------------------------------------------------------------------------
# Environment tags
# --------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    """GPU name, or the CPU model with its core count and memory."""
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


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(cfg: BenchConfig) -> dict[str, Any]:
    """Device, versions, date, commit and load: the tags of every CSV row."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    env = {
        "device": cfg.device, "device_name": device_name(cfg.device),
        "torch": torch.__version__, "triton": triton_version,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }
    if cfg.compare == "pml":
        from importlib.metadata import PackageNotFoundError, version

        try:
            env["pml"] = version("pytorch-metric-learning")
        except PackageNotFoundError:
            env["pml"] = "not installed"
    return env


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    return f"{b / 1e9:.2f}G" if b >= 1e9 else f"{b / 1e6:.1f}M"


def _grid(rows: list[list[str]], left: set[int]) -> list[str]:
    """Columns padded to width; columns in ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j in left else c.rjust(w)
                               for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _vs_dense(cfg: BenchConfig, r: dict, dense: dict | None, checked: bool) -> tuple[str, str]:
    """(time / dense, peak memory / dense) as text; '<' marks a bound from a killed dense run."""
    if dense is None:
        return "-", "-"
    if dense["status"] == "ok":
        t = f"{r['median_s'] / dense['median_s']:.2f}" if checked else "-"
        return t, f"{r['peak_mem_bytes'] / dense['peak_mem_bytes']:.3f}"
    if dense["status"] == "over-time-budget":
        # killed at the budget: its time is above the budget and its peak above what it reached
        t = f"<{r['median_s'] / cfg.time_budget_s:.2f}" if checked else "-"
        reached = dense.get("child_maxrss_bytes")
        m = f"<{r['peak_mem_bytes'] / reached:.3f}" if reached and not cfg.on_cuda else "-"
        return t, m
    if dense["status"] == "over-mem-budget":
        return "-", f"<{r['peak_mem_bytes'] / (cfg.mem_budget_gb * 1e9):.3f}"
    return "-", "-"


def rss_breakdown(r: dict) -> str:
    """'runtime X + inputs Y + beyond inputs Z GB' for a CPU record ('' when unknown)."""
    runtime, inputs = r.get("rss_runtime_bytes"), r.get("rss_inputs_bytes")
    if not runtime or not inputs:
        return f"beyond inputs {r['mem_beyond_inputs_bytes'] / 1e9:.3f} GB"
    return (f"runtime {runtime / 1e9:.3f} + inputs {(inputs - runtime) / 1e9:.3f} + beyond "
            f"inputs {r['mem_beyond_inputs_bytes'] / 1e9:.3f} GB")


def format_results(cfg: BenchConfig, env: dict, result: dict, checked: bool) -> str:
    """The backend benchmark's tables: one per loss, then the largest N of each backend."""
    on_cuda = cfg.on_cuda
    records = result["records"]
    lines = [
        f"forward+backward, D={cfg.dim}, {cfg.dtype}, on {env['device_name']} "
        f"(torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']})"
        + ("" if checked else "   [UNCHECKED: --no-check]"),
        ("memory: torch.cuda.max_memory_allocated; 'beyond in' = peak - allocated after inputs"
         if on_cuda else
         "memory: peak RSS of the measuring process; 'beyond in' = peak RSS - RSS once the "
         "inputs exist"),
    ]
    for loss in cfg.losses:
        case = cases.get(loss)
        if loss in result.get("not_available", {}):
            lines += ["", f"{loss}: {result['not_available'][loss]}; nothing measured"]
            continue
        scale = case.resolve_scale(cfg.scale)
        lines += ["", f"{loss}: {case.summary}"
                  + (f"; scale ({case.scale_meaning}) {scale:.4g}" if scale is not None else "")
                  + (f"; K = {cfg.per_class} per class" if case.labelled else "")
                  + f"; FLOPs counted as {case.flop_formula}, M = N"]
        mine = [r for r in records if r["loss"] == loss]
        dense = {r["n"]: r for r in mine if r["backend"] == "dense"}
        head = ["backend", "N", "median s", "p20 s", "p80 s", "GFLOP/s", "peak mem",
                "beyond in", "t/dense", "mem/dense"]
        head += ["GEMM TF/s", "of GEMM"] if on_cuda else ["cpu s", "cpu/wall"]
        head += ["status"]
        rows = [head]
        for r in mine:
            row = [r["backend"] + ("*" if r["search"] else ""), str(r["n"])]
            if r["status"] == "ok":
                d = dense.get(r["n"]) if r["backend"] != "dense" else r
                t_ratio, m_ratio = _vs_dense(cfg, r, d, checked)
                row += [f"{r['median_s']:.4g}", f"{r['p20_s']:.4g}", f"{r['p80_s']:.4g}",
                        f"{r['flops_per_s'] / 1e9:.3g}", fmt_bytes(r["peak_mem_bytes"]),
                        fmt_bytes(r["mem_beyond_inputs_bytes"]), t_ratio, m_ratio]
                if on_cuda:
                    g = r.get("gemm_flops_per_s")
                    row += [f"{g / 1e12:.0f}" if g else "-",
                            f"{100 * r['gemm_fraction']:.0f}%" if r.get("gemm_fraction") else "-"]
                else:
                    row.append(f"{r['cpu_median_s']:.4g}" if r.get("cpu_median_s") else "-")
                    row.append(f"{r['cpu_per_wall']:.2f}" if r.get("cpu_per_wall") else "-")
                row.append("ok")
            else:
                row += ["-"] * (len(head) - 3)
                row.append(f"{r['status']}: {r.get('message', '')}"[:90])
            rows.append(row)
        lines += _grid(rows, left={0, len(head) - 1})
        if not on_cuda:
            for r in mine:
                if r["status"] == "ok":
                    lines.append(f"  {r['backend']} N={r['n']}: peak RSS "
                                 f"{r['peak_mem_bytes'] / 1e9:.3f} GB = {rss_breakdown(r)}")
    lines.append("(* = largest-N search; '<' = bound from a dense run killed at a budget)")
    if not on_cuda:
        lines.append(f"cpu s = median CPU seconds (all threads) per iteration; cpu/wall = CPU "
                     f"seconds per wall second while timing ({env['threads']} threads); well "
                     "below the thread count means other processes shared the cores and the "
                     "times are inflated.")
        contended = [r for r in records if r["status"] == "ok" and r.get("cpu_per_wall")
                     and r["cpu_per_wall"] < 0.75 * min(env["threads"], os.cpu_count() or 1)]
        if contended:
            lines.append(f"WARNING: {len(contended)} measurement(s) ran on a shared CPU "
                         f"(1-min load average {env.get('load_average_at_start') or 0:.1f} on "
                         f"{os.cpu_count()} cores at start).")
    if result.get("largest_n"):
        lines += ["", f"Largest N that fits (memory budget {cfg.mem_budget_gb:.1f} GB, time "
                      f"budget {cfg.time_budget_s:.0f} s per measurement):"]
        for loss, per_backend in result["largest_n"].items():
            for backend, info in per_backend.items():
                n = info["n"]
                shown = "none" if n is None else (f">= {n}" if info["at_least"] else str(n))
                pred = info.get("predicted_n_at_mem_budget")
                lines.append(f"  {loss:<14} {backend:<10} {shown:<10} stopped by: "
                             f"{info['stopped_by']}"
                             + (f"; predicted from the memory fit: {pred}"
                                if pred and not on_cuda else ""))
    return "\n".join(lines)


def _fmt_ratio(value: float | None, bound: bool) -> str:
    if value is None:
        return "-"
    return ("<" if bound else "") + f"{value:.3g}"


def format_comparison(cfg: BenchConfig, env: dict, rows: list[dict], gates: list[dict],
                      not_available: dict[str, str], checked: bool,
                      records: tuple[dict, ...] | list[dict] = ()) -> str:
    """The side-by-side table (ours / theirs) with each loss's gate verdict and settings."""
    lines = [
        f"ours vs pytorch-metric-learning {env.get('pml', '?')}, forward+backward, D={cfg.dim}, "
        f"{cfg.dtype}, P x K labels with K={cfg.per_class}, on {env['device_name']} "
        f"(torch {env['torch']}, commit {env['git_commit']})"
        + ("" if checked else "   [UNCHECKED: --no-check]"),
        ("memory: peak RSS of each measuring process (its own runtime included); 'beyond' = "
         "peak RSS - RSS once the inputs exist" if not cfg.on_cuda else
         "memory: torch.cuda.max_memory_allocated; 'beyond' = peak - allocated after inputs"),
        "ratios are ours / theirs: below 1 means ours is faster or smaller; '<' = upper bound "
        "(theirs stopped at a budget)",
    ]
    head = ["loss", "N", "backend", "ours s", "theirs s", "t ratio", "ours peak", "theirs peak",
            "peak ratio", "ours beyond", "theirs beyond", "beyond ratio", "note"]
    table = [head]
    for row in rows:
        bound = row["ratio_is_bound"]
        note = "" if row["same_loss"] else "different loss"
        if row["ours_status"] != "ok":
            note = f"ours: {row['ours_status']}"
        elif row["peer_status"] != "ok":
            note = row["bound"]
        table.append([
            row["loss"], str(row["n"]), row["backend"],
            f"{row['ours_s']:.4g}" if row["ours_s"] else "-",
            f"{row['peer_s']:.4g}" if row["peer_s"] else "-",
            _fmt_ratio(row.get("time_ratio"), bound),
            fmt_bytes(row["ours_peak_bytes"]), fmt_bytes(row["peer_peak_bytes"]),
            _fmt_ratio(row.get("peak_ratio"), bound),
            fmt_bytes(row["ours_beyond_bytes"]), fmt_bytes(row["peer_beyond_bytes"]),
            _fmt_ratio(row.get("beyond_ratio"), False), note[:110]])
    if len(table) > 1:
        lines += [""] + _grid(table, left={0, 2, len(head) - 1})
    contended = [r for r in records if r.get("status") == "ok" and r.get("cpu_per_wall")
                 and r["cpu_per_wall"] < 0.75 * min(r.get("threads") or 1, os.cpu_count() or 1)]
    if contended:
        lines.append(f"WARNING: {len(contended)} of the measurements ran on a shared CPU "
                     "(CPU seconds per wall second well below the thread count): their times "
                     "are inflated, and the ratios are noisy.")
    lines += ["", "Counterparts and gate (our dense backend vs theirs, float64, "
                  "loss and every gradient):"]
    for g in gates:
        case = cases.get(g["loss"])
        lines.append(f"  {g['loss']}: {case.peer.settings if case.peer else '-'}")
        lines.append(f"    gate: {g['message']}")
    for loss, reason in not_available.items():
        lines.append(f"  {loss}: {reason}; nothing measured")
    return "\n".join(lines)


def static_summary(rows: list[dict]) -> list[str]:
    """Counts from the static sm_90 report: configurations that spill, and those without wgmma."""
    if not rows:
        return []
    spill_keys = [k for k in rows[0] if "spill" in k.lower()]
    wgmma_keys = [k for k in rows[0] if "wgmma" in k.lower()]
    lines = []
    if spill_keys:
        spilling = [r for r in rows if any(r.get(k) for k in spill_keys)]
        lines.append(f"spills: {len(spilling)} of {len(rows)} configs spill"
                     + (" (" + ", ".join(f"{r.get('kernel', '?')}/{r.get('dtype', '?')}"
                                         for r in spilling[:6]) + ")" if spilling else ""))
    if wgmma_keys:
        # fp32 tiles use IEEE products on the FMA units by design (no tensor cores), so wgmma
        # is counted separately for the 16-bit configurations and for fp32.
        half = [r for r in rows if r.get("dtype") in ("bf16", "fp16")]
        fp32 = [r for r in rows if r.get("dtype") == "fp32"]
        judged = half if half else rows
        without = [r for r in judged if not all(r.get(k) for k in wgmma_keys)]
        text = (f"wgmma: {len(without)} of {len(judged)} "
                + ("bf16/fp16 " if half else "") + "configs without wgmma")
        if fp32 and half:
            text += (f"; fp32 (IEEE products on FMA units by design): "
                     f"{sum(bool(r.get(wgmma_keys[0])) for r in fp32)} of {len(fp32)} use wgmma")
        lines.append(text)
    return lines


def run_static(cfg: BenchConfig) -> list[dict]:
    """Compile every shipped Triton configuration for sm_90; print and write the report."""
    from csrc_triton.static_check import format_table, static_report

    rows = static_report(arch=90, dtypes=("bf16", "fp16", "fp32"))
    print("Static compile report for sm_90 (no GPU needed):")
    print(format_table(rows))
    for line in static_summary(rows):
        print(line)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "static_sm90.json").write_text(json.dumps(rows, indent=2, default=str))
    return rows


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _stem(cfg: BenchConfig, kind: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dev = "cuda" if cfg.on_cuda else "cpu"
    losses = "-".join(cfg.losses) if len(cfg.losses) <= 3 else f"{len(cfg.losses)}losses"
    return f"{kind}_{losses}_{dev}_{cfg.dtype}_d{cfg.dim}_{stamp}"


def _append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(row)


def write_outputs(cfg: BenchConfig, env: dict, result: dict, gates: list[dict] | None,
                  table: str, checked: bool) -> dict[str, Path]:
    """The backend benchmark's JSON, table, CSV rows and plot; returns their paths."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(cfg, "bench")
    paths = {"json": out / f"{stem}.json", "csv": out / "bench_kernels.csv",
             "png": out / f"{stem}.png", "table": out / f"{stem}.txt"}
    payload = {"config": dataclasses.asdict(cfg), "environment": env, "checked": checked,
               "check": gates,
               "flop_formulas": {loss: cases.get(loss).flop_formula for loss in cfg.losses},
               **result}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str))
    paths["table"].write_text(table + "\n")
    _append_csv(paths["csv"], CSV_FIELDS,
                [{**env, **r, "checked": checked} for r in result["records"]])
    plot(cfg, env, result["records"], paths["png"])
    return paths


def write_comparison(cfg: BenchConfig, env: dict, result: dict, rows: list[dict],
                     gates: list[dict], table: str, checked: bool) -> dict[str, Path]:
    """The comparison's JSON, table, CSV rows (one per pair) and plot; returns their paths."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(cfg, f"compare_{cfg.compare}")
    paths = {"json": out / f"{stem}.json", "csv": out / f"compare_{cfg.compare}.csv",
             "png": out / f"{stem}.png", "table": out / f"{stem}.txt"}
    settings = {loss: {"ours": cases.get(loss).summary, "peer": cases.get(loss).peer.settings,
                       "same_loss": cases.get(loss).peer.same_loss,
                       "difference": cases.get(loss).peer.difference}
                for loss in cfg.losses if cases.get(loss).peer is not None}
    payload = {"config": dataclasses.asdict(cfg), "environment": env, "checked": checked,
               "gates": gates, "settings": settings, "pairs": rows, **result}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str))
    paths["table"].write_text(table + "\n")
    _append_csv(paths["csv"], COMPARE_CSV_FIELDS,
                [{**env, **row, "d": cfg.dim, "dtype": cfg.dtype, "per_class": cfg.per_class,
                  "checked": checked} for row in rows])
    plot_comparison(cfg, env, result["records"], paths["png"])
    return paths


def _log_axes(axes, xlabel: str) -> None:
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)


def plot(cfg: BenchConfig, env: dict, records: list[dict], path: Path) -> None:
    """Time (median, p20-p80) and memory against N: one row of two panels per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [loss for loss in cfg.losses if any(r["loss"] == loss for r in records)] or \
        list(cfg.losses[:1])
    fig, axes = plt.subplots(len(losses), 2, figsize=(11, 4.2 * len(losses)), squeeze=False)
    for (ax_t, ax_m), loss in zip(axes, losses):
        for backend in cfg.backends:
            ok = sorted((r for r in records if r["loss"] == loss and r["backend"] == backend
                         and r["status"] == "ok"), key=lambda r: r["n"])
            if not ok:
                continue
            ns = [r["n"] for r in ok]
            med = [r["median_s"] for r in ok]
            color = BACKEND_COLORS.get(backend, "tab:gray")
            ax_t.errorbar(ns, med, yerr=[[m - r["p20_s"] for m, r in zip(med, ok)],
                                         [r["p80_s"] - m for m, r in zip(med, ok)]],
                          marker="o", capsize=3, color=color, label=backend)
            ax_m.plot(ns, [r["peak_mem_bytes"] / 1e9 for r in ok], marker="o", color=color,
                      label=f"{backend} peak")
            ax_m.plot(ns, [max(r["mem_beyond_inputs_bytes"], 1) / 1e9 for r in ok], marker="x",
                      color=color, linestyle="--", label=f"{backend} beyond inputs")
        _log_axes((ax_t, ax_m), "N (= M)")
        ax_t.set_ylabel("forward+backward time (s), median, p20-p80")
        ax_m.set_ylabel("GB (" + ("max_memory_allocated" if cfg.on_cuda else "peak RSS") + ")")
        ax_m.axhline(cfg.mem_budget_gb, color="grey", linestyle=":", linewidth=1)
        ax_t.set_title(f"{loss}: time", fontsize=9)
        ax_m.set_title(f"{loss}: memory", fontsize=9)
    fig.suptitle(f"D={cfg.dim}, {cfg.dtype}, {env['device_name']}", fontsize=9)
    # leave a strip of 0.4 inch at the top for the suptitle
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(cfg: BenchConfig, env: dict, records: list[dict], path: Path) -> None:
    """Time and peak memory against N: ours solid, the peer dashed, one colour per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, loss in enumerate(cfg.losses):
        color = colors[i % len(colors)]
        sides = [("ours", b, "-", "o") for b in cfg.backends] + [(cfg.compare, cfg.compare,
                                                                  "--", "x")]
        for side, backend, style, marker in sides:
            ok = sorted((r for r in records if r["loss"] == loss and r["side"] == side
                         and r["backend"] == backend and r["status"] == "ok"),
                        key=lambda r: r["n"])
            if not ok:
                continue
            label = f"{loss} {'ours/' + backend if side == 'ours' else side}"
            ns = [r["n"] for r in ok]
            ax_t.plot(ns, [r["median_s"] for r in ok], linestyle=style, marker=marker,
                      color=color, label=label)
            ax_m.plot(ns, [r["peak_mem_bytes"] / 1e9 for r in ok], linestyle=style,
                      marker=marker, color=color, label=label)
    _log_axes((ax_t, ax_m), "N")
    ax_t.set_ylabel("forward+backward time (s), median")
    ax_m.set_ylabel("GB (" + ("max_memory_allocated" if cfg.on_cuda else "peak RSS") + ")")
    fig.suptitle(f"ours vs {cfg.compare}, D={cfg.dim}, {cfg.dtype}, {env['device_name']}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
