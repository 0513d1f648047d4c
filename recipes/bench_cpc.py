"""Training throughput of CPC: windows per second, forward + backward + optimizer step, for
the paper's model (and the cpu-quick preset's) on this machine.

    python -m recipes.bench_cpc                       # CPU, paper model, batch 8 x 20480
    python -m recipes.bench_cpc --device cuda --batch-size 32

Prints a table and writes ``<out>/bench_cpc.json`` (rows tagged with device, torch version,
threads and date).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from recipes.cpc_config import preset_values
from cpc.criterion import CPCCriterion
from cpc.model import CPCModel, CPCModelConfig, count_parameters, encoder_flops
from recipes.common.logging import format_table


def _model_config(name: str) -> CPCModelConfig:
    return CPCModelConfig(**preset_values(name).get("model", {}))


def bench(model_name: str, *, device: torch.device, batch: int, window: int, repeats: int,
          warmup: int, negatives: str) -> dict:
    torch.manual_seed(0)
    model = CPCModel(_model_config(model_name)).to(device)
    criterion = CPCCriterion(negatives)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    wave = torch.randn(batch, window, device=device) * 0.1
    speakers = torch.arange(batch, device=device) // max(1, batch // 4)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        z, c, pred = model(wave, predict=True)
        loss = criterion(pred, z, None, speakers).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "model": model_name, "parameters": count_parameters(model), "batch": batch,
        "window": window, "negatives": negatives, "seconds_per_step_median": median,
        "seconds_per_step_min": min(times), "windows_per_second": batch / median,
        "encoder_gflop_per_window_fwd": encoder_flops(window, model.config.encoder_channels) / 1e9,
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.bench_cpc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--models", default="paper,cpu-quick",
                   help="comma-separated presets whose model to time (paper, cpu-quick)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step")
    p.add_argument("--window", type=int, default=20480, help="samples per window")
    p.add_argument("--negatives", default="speaker", choices=["batch", "sequence", "speaker"])
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="runs/bench_cpc", help="folder for bench_cpc.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in ("paper", "cpu-quick"):
            print(f"error: --models {name!r}: expected paper or cpu-quick", file=sys.stderr)
            return 2
        rows.append(bench(name, device=device, batch=args.batch_size, window=args.window,
                          repeats=args.repeats, warmup=args.warmup, negatives=args.negatives))
        r = rows[-1]
        print(f"{name}: {r['windows_per_second']:.2f} windows/s", flush=True)
    print()
    print(format_table(
        ["model", "params (M)", "batch x window", "s/step (median)", "windows/s", "device"],
        [[r["model"], f"{r['parameters'] / 1e6:.2f}", f"{r['batch']} x {r['window']}",
          f"{r['seconds_per_step_median']:.3f}", f"{r['windows_per_second']:.2f}",
          f"{r['device']} ({r['threads']} threads)"] for r in rows]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cpc.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {out / 'bench_cpc.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
