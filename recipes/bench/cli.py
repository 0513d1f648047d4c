"""Command line of the kernel benchmark: ``python -m recipes.bench_kernels``.

Every flag is checked before any work: a bad value stops the run with an error naming the flag,
the value and what was expected. Then, in order: the static sm_90 report (``--static``), the
correctness gates (:mod:`recipes.bench.gate`), the measurements (:mod:`recipes.bench.search`, or
:mod:`recipes.bench.compare` with ``--compare``), the tables and files
(:mod:`recipes.bench.report`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any, NoReturn

from . import cases
from .config import (BACKENDS, DEFAULT_CPU_SIZES, DEFAULT_CUDA_SIZES, DEFAULT_PER_CLASS, DTYPES,
                     PEERS, BenchConfig)

PROG = "python -m recipes.bench_kernels"


def _csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds '(default: X)' only where the help text does not already state its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.nargs == 0:
            return text  # a switch (nargs 0) needs no "(default: False)"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; ``--help`` explains every flag."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Time and measure the tiled contrastive losses (forward+backward) per backend, or "
            "side by side with pytorch-metric-learning (--compare pml). Reports the median time "
            "and quantiles, peak memory, achieved FLOP/s (each loss's count, e.g. 8*N*M*D for "
            "the softmax losses) and the largest N that fits; writes a JSON file, appends "
            "tagged rows to a CSV and plots time and memory against N. Each measurement runs "
            "in its own child process. Nothing is timed unless each backend first matches a "
            "float64 reference (and, with --compare, our loss matches the peer's)."
        ),
        epilog="Losses: " + ", ".join(cases.LOSSES) + " (--list-losses describes them).",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--loss", default=None,
        help="comma-separated losses to measure, or 'all' (default: clip; with --compare, "
             "every loss that has a counterpart). A loss whose function this checkout lacks is "
             "reported as not available, never measured.")
    parser.add_argument(
        "--list-losses", action="store_true",
        help="print every loss the benchmark knows (call, FLOP count, pytorch-metric-learning "
             "counterpart, whether this checkout has it) and exit")
    parser.add_argument(
        "--backends", default=None,
        help="comma-separated backends to measure, from triton, blockwise, dense "
             "(default: blockwise,dense on CPU, triton,blockwise,dense on CUDA; with --compare "
             "blockwise on CPU, triton on CUDA). triton on CPU needs TRITON_INTERPRET=1 and is "
             "very slow.")
    parser.add_argument(
        "--compare", default=None, choices=PEERS,
        help="measure each loss side by side with its counterpart in this library, on the same "
             "inputs: pml = pytorch-metric-learning (must be installed); reports time, peak "
             "memory and the ratios ours/theirs (default: no comparison)")
    parser.add_argument(
        "--sizes", default=None,
        help="comma-separated sizes N, the side of the N x N similarity matrix (views for "
             "nt_xent, so even; pairs for n_pair) "
             f"(default: {','.join(map(str, DEFAULT_CPU_SIZES))} on CPU, "
             f"{','.join(map(str, DEFAULT_CUDA_SIZES))} on CUDA)")
    parser.add_argument("--dim", type=int, default=128, help="feature dimension D")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="dtype of the features (the scale/temperature stays fp32)")
    parser.add_argument(
        "--per-class", type=int, default=DEFAULT_PER_CLASS,
        help="K, samples per class of the labelled losses' P x K batches (P = N // K classes; "
             "the N mod K leftover joins the last class)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument(
        "--repeats", type=int, default=5,
        help="timed forward+backward repetitions per measurement on CPU (fewer for big sizes: "
             "repeats stop once the next would end past 20 s of timing; at least 1); on CUDA "
             "do_bench picks its own count and this is ignored")
    parser.add_argument(
        "--max-n-search", type=int, default=16384,
        help="largest-N search: from the largest size measured, double N and measure again "
             "until this N, out of memory, or a budget (measured or predicted) stops it; 0 "
             "disables the search; not used with --compare")
    parser.add_argument(
        "--mem-budget-gb", type=float, default=None,
        help="memory budget per measurement in GB (10^9 bytes): a child whose RSS (CPU) passes "
             "it is killed, and a size predicted to pass it is not started "
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
             "shared memory, wgmma) and write it to static_sm90.json; with no --sizes, "
             "--backends, --loss or --compare given, only this is done")
    parser.add_argument(
        "--check", action=argparse.BooleanOptionalAction, default=True,
        help="before timing, check each backend against a float64 dense reference on a small "
             "odd-sized problem (loss and all gradients), and with --compare our loss against "
             "the peer's, and refuse to benchmark if any disagrees; --no-check skips it and "
             "marks the results UNCHECKED")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed full-size iterations before timing on CPU (sizes above "
                             "8192 get only a small-size warmup)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    parser.add_argument(
        "--scale", type=float, default=None,
        help="multiplier of the logits (features are unit vectors): clip's logit_scale, "
             "1/temperature for info_nce, nt_xent and supcon, nca's scale, uniformity's t "
             "(default: each loss's usual value: clip 1/0.07, info_nce 1/0.07, nt_xent 1/0.5, "
             "supcon 1/0.1, nca 1, uniformity 2); not accepted for losses without one "
             "(triplet_margin*, drlim, n_pair)")
    return parser


def _fail(argument: str, value: Any, expected: str) -> NoReturn:
    raise SystemExit(f"bench_kernels: error: {argument}={value!r}: expected {expected}")


def _losses(args: argparse.Namespace) -> list[str]:
    if args.loss is None:
        return list(cases.with_peer(args.compare)) if args.compare else ["clip"]
    names = _csv_list(args.loss)
    if names == ["all"]:
        return list(cases.with_peer(args.compare)) if args.compare else list(cases.LOSSES)
    if not names:
        _fail("--loss", args.loss, f"a comma-separated subset of {', '.join(cases.LOSSES)}, "
                                   "or 'all'")
    for name in names:
        if name not in cases.CASES:
            _fail("--loss", name, f"one of {', '.join(cases.LOSSES)}, or 'all'")
    if len(set(names)) != len(names):
        _fail("--loss", args.loss, "each loss at most once")
    if args.compare:
        lacking = [n for n in names if n not in cases.with_peer(args.compare)]
        if lacking:
            _fail("--loss", ",".join(lacking),
                  f"losses with a {args.compare} counterpart with --compare {args.compare}: "
                  f"{', '.join(cases.with_peer(args.compare))}")
    return names


def config_from_args(argv: list[str] | None = None) -> tuple[BenchConfig, bool]:
    """Parse argv into a validated BenchConfig; the flag says whether to measure at all."""
    args = build_parser().parse_args(argv)
    if args.list_losses:
        for row in cases.describe():
            print(f"{row['loss']:<26} {'available' if row['available'] else row['reason']}\n"
                  f"    {row['call']}\n    FLOPs {row['flops']}; pytorch-metric-learning: "
                  f"{row['peer']}")
        raise SystemExit(0)
    import torch

    device = args.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        _fail("--device", device, "'cpu', 'cuda' or 'cuda:<index>'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        _fail("--device", device, "a CUDA device, but torch.cuda.is_available() is False")
    on_cuda = device.startswith("cuda")

    if args.compare == "pml":
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            _fail("--compare", args.compare, "pytorch-metric-learning installed "
                  "(python -m pip install -c constraints.txt pytorch-metric-learning)")
    losses = _losses(args)

    if args.backends is None:
        if args.compare:
            backends = ["triton"] if on_cuda else ["blockwise"]
        else:
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
    even = [name for name in losses if cases.get(name).even_n]
    for n in sizes:
        if n < 2:
            _fail("--sizes", n, "an integer >= 2 (a similarity matrix with off-diagonal pairs)")
        if even and n % 2:
            _fail("--sizes", n, f"an even N for {', '.join(even)} (N counts the views of N/2 "
                                "pairs)")
    sizes = sorted(set(sizes))
    if args.dim < 1:
        _fail("--dim", args.dim, "a positive integer")
    if args.per_class < 2:
        _fail("--per-class", args.per_class, "an integer >= 2 (each sample needs a positive)")
    if args.repeats < 1:
        _fail("--repeats", args.repeats, "an integer >= 1")
    if args.warmup < 0:
        _fail("--warmup", args.warmup, "an integer >= 0")
    if args.max_n_search < 0:
        _fail("--max-n-search", args.max_n_search, "0 (no search) or a positive N")
    if args.scale is not None:
        if not (math.isfinite(args.scale) and args.scale > 0):
            _fail("--scale", args.scale, "a finite positive number")
        without = [name for name in losses if cases.get(name).default_scale is None]
        if without:
            _fail("--scale", args.scale, f"no --scale with {', '.join(without)}, which have no "
                                         "logit multiplier")
    if not (math.isfinite(args.time_budget_s) and args.time_budget_s > 0):
        _fail("--time-budget-s", args.time_budget_s, "a positive number of seconds")
    mem_budget = args.mem_budget_gb
    if mem_budget is None:
        mem_budget = (torch.cuda.get_device_properties(device).total_memory / 1e9 if on_cuda
                      else 20.0)
    if not (math.isfinite(mem_budget) and mem_budget > 0):
        _fail("--mem-budget-gb", mem_budget, "a positive number of GB")

    measure = not (args.static and args.sizes is None and args.backends is None
                   and args.loss is None and args.compare is None)
    cfg = BenchConfig(
        backends=tuple(backends), sizes=tuple(sizes), dim=args.dim, dtype=args.dtype,
        losses=tuple(losses), device=device, repeats=args.repeats,
        max_n_search=0 if args.compare else args.max_n_search,
        mem_budget_gb=float(mem_budget), time_budget_s=args.time_budget_s, out=args.out,
        static=args.static, check=args.check, warmup=args.warmup, seed=args.seed,
        scale=args.scale, compare=args.compare, per_class=args.per_class,
    )
    return cfg, measure


def run_gates(cfg: BenchConfig, losses: tuple[str, ...]) -> list[dict]:
    """Backend gates (and peer gates with --compare) for the available losses; CheckFailed if
    any fails, naming each failure."""
    from .gate import CheckFailed, backend_gate, peer_gate

    reports: list[dict] = []
    for loss in losses:
        for r in backend_gate(cfg, loss):
            reports.append({"kind": "backend", **r})
            print(f"check {loss} {r['backend']:<10} vs dense float64 (N={r.get('n')}, "
                  f"D={r.get('d')}, {cfg.dtype}): "
                  + ("passed" if r["passed"] else f"FAILED: {r['message']}"), flush=True)
        if cfg.compare:
            r = peer_gate(cfg, loss)
            reports.append({"kind": "peer", **r})
            print(f"check {loss} vs {r['peer']} (float64, N={r['n']}): "
                  + ("passed: " if r["passed"] else "FAILED: ") + r["message"], flush=True)
    failed = [r for r in reports if r["passed"] is False]
    if failed:
        raise CheckFailed(
            "bench_kernels: refusing to benchmark: the correctness gate failed for "
            + ", ".join(f"loss={r['loss']!r} " + (f"backend={r['backend']!r}"
                                                  if r["kind"] == "backend" else
                                                  f"vs {r['peer']}")
                        + f" ({r['message']})" for r in failed)
            + "; fix it, leave that loss out (--loss), or pass --no-check to measure unchecked")
    return reports


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark as the command line says; returns a summary (records, paths, table)."""
    from . import compare, report, search

    cfg, measure = config_from_args(argv)
    print("BenchConfig(" + ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items())
          + ")", flush=True)
    if not measure:
        print("--static without --sizes/--backends/--loss/--compare: compile report only, no "
              "measurements")
    static_rows = report.run_static(cfg) if cfg.static else None
    summary: dict[str, Any] = {"config": cfg, "static": static_rows}
    if not measure:
        summary["static_summary"] = report.static_summary(static_rows or [])
        return summary

    not_available: dict[str, str] = {}
    for loss in cfg.losses:
        ok, reason = cases.get(loss).available()
        if not ok:
            not_available[loss] = reason
            print(f"{loss}: {reason}; it is not measured", flush=True)
    losses = tuple(loss for loss in cfg.losses if loss not in not_available)
    summary["not_available"] = not_available
    if not losses:
        print("nothing to measure: none of the requested losses is in this checkout")
        summary.update({"records": [], "check": None})
        return summary

    gates = run_gates(cfg, losses) if cfg.check else None
    env = report.environment(cfg)
    if cfg.compare:
        result = compare.run_comparison(cfg, losses)
        result["not_available"] = not_available
        rows = compare.pair_rows(cfg, result["records"])
        peer_gates = [g for g in (gates or []) if g["kind"] == "peer"]
        if not cfg.check:
            # the declared settings still belong next to the numbers
            peer_gates = [{"loss": loss, "message": "not run (--no-check)"} for loss in losses]
        text = report.format_comparison(cfg, env, rows, peer_gates, not_available, cfg.check,
                                        result["records"])
        print(text)
        paths = report.write_comparison(cfg, env, result, rows, gates or [], text, cfg.check)
        summary["pairs"] = rows
    else:
        result = search.run_benchmark(cfg, losses)
        result["not_available"] = not_available
        text = report.format_results(cfg, env, result, checked=cfg.check)
        if static_rows:
            text += "\n\nStatic sm_90: " + "; ".join(report.static_summary(static_rows))
        print(text)
        paths = report.write_outputs(cfg, env, result, gates, text, checked=cfg.check)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    summary.update({"environment": env, "check": gates, "paths": paths, "table": text,
                    **result})
    return summary
