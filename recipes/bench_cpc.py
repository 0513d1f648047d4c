"""CPC throughput and memory per process: the data pipeline alone and training, per preset, so a
user can see whether the loader keeps up with the model.

    python -m recipes.bench_cpc                               # CPU; paper, cpu-quick, cpc_audio
    python -m recipes.bench_cpc --preset cpc_audio --device cuda
    python -m recipes.bench_cpc --preset cpc_audio --data /data/LibriSpeech/train-clean-100

Two measurements per preset, each in a fresh child process (one process is one rank):

- ``loader``: windows per second of the training data pipeline: the preset's speaker-balanced
  sampler, random windows read from the int16 audio store (``cpc.store``; in RAM under
  ``--max-audio-memory-mb``, else read from disk window by window) and a background prefetcher,
  as in ``recipes.cpc_speech``; nothing else runs.
- ``train``: windows per second of the preset's forward + backward + Adam step (its model,
  criterion, batch and window) on random audio.

Peak memory per process: the child's peak resident set size (VmHWM) on CPU, plus
``torch.cuda.max_memory_allocated`` on CUDA. The audio comes from ``--data`` (a LibriSpeech
folder) or, by default, a generated LibriSpeech-shaped tree (``--utterances`` utterances of
10-15 s, ``modalities.audio.librishaped``) decoded once into a store in a temporary folder.

Prints a table and writes ``<out>/bench_cpc.json`` and ``bench_cpc.md`` (rows tagged with
device, torch version, threads and date).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from recipes.common.logging import format_table

PRESETS = ("paper", "cpu-quick", "cpc_audio")
RESULT_MARK = "BENCH_CPC "


def _config(preset: str, overrides: dict[str, Any]):
    from recipes.cpc_config import build_config

    return build_config(None, {"preset": preset, **{k: v for k, v in overrides.items()
                                                    if v is not None}})


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _stamp(device: torch.device) -> dict[str, Any]:
    return {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def bench_loader(spec: dict[str, Any]) -> dict[str, Any]:
    """Windows per second of sampler + store reads + prefetcher for ``spec["batches"]`` batches."""
    from cpc.data import BatchPrefetcher, SpeakerBalancedBatchSampler, WindowDataset
    from cpc.store import AudioStore

    config = _config(spec["preset"], spec["overrides"])
    speakers = spec["speakers"]
    positions = list(range(len(speakers)))
    store = AudioStore(spec["store"], indices=positions,
                       max_bytes_in_memory=spec["max_audio_memory_mb"] * 2 ** 20)
    dataset = WindowDataset.from_store(store, positions, speakers, config.window)
    sampler = SpeakerBalancedBatchSampler(speakers, config.batch_size, config.speakers_per_batch,
                                          seed=0)
    prefetch = BatchPrefetcher(dataset, sampler, seed=0, rank=0, depth=max(1, config.prefetch))
    try:
        next(prefetch)  # the thread started and one batch made
        t0 = time.perf_counter()
        for _ in range(spec["batches"]):
            next(prefetch)
        seconds = time.perf_counter() - t0
    finally:
        prefetch.close()
    return {"preset": spec["preset"], "mode": "loader", "batch": config.batch_size,
            "window": config.window, "windows_per_second": spec["batches"] * config.batch_size
            / seconds, "seconds_per_step": seconds / spec["batches"],
            "audio_in_memory": store.in_memory,
            "resident_audio_mb": round(store.resident_bytes / 2 ** 20, 1)}


def bench_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Median seconds of the preset's training step on random audio."""
    from cpc.model import CPCModel, count_parameters, encoder_flops
    from recipes.cpc_speech import make_criterion, step_generator

    config = _config(spec["preset"], spec["overrides"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = CPCModel(config.model).to(device)
    criterion = make_criterion(config)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    batch = config.batch_size
    wave = torch.randn(batch, config.window, device=device) * 0.1
    speakers = torch.arange(batch, device=device) * config.speakers_per_batch // batch
    times = []
    for i in range(spec["warmup"] + spec["repeats"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        z, c, pred = model(wave, predict=True)
        loss = criterion(pred, z, None, speakers, accuracy=False,
                         generator=step_generator(0, i, 0, device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"preset": spec["preset"], "mode": "train", "batch": batch, "window": config.window,
            "parameters": count_parameters(model), "negatives": config.negatives,
            "n_negatives": config.n_negatives, "seconds_per_step": median,
            "seconds_per_step_min": min(times), "windows_per_second": batch / median,
            "encoder_gflop_per_window_fwd":
                encoder_flops(config.window, config.model.encoder_channels) / 1e9}


def _child(spec: dict[str, Any]) -> None:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    row = bench_loader(spec) if spec["mode"] == "loader" else bench_train(spec)
    row["peak_rss_mb"] = round(_peak_rss_mb() or float("nan"), 1)
    if device.type == "cuda":
        row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    row.update(_stamp(device))
    print(RESULT_MARK + json.dumps(row), flush=True)


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "recipes.bench_cpc", "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"bench_cpc child {spec['preset']}/{spec['mode']} failed "
                       f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _utterances(args: argparse.Namespace, tmp: Path) -> tuple[list, str]:
    from modalities.audio import scan_librispeech

    if args.data:
        return scan_librispeech(args.data), f"LibriSpeech folder {args.data}"
    from modalities.audio.librishaped import make_librispeech_tree

    per = max(1, args.utterances // args.speakers)
    root = make_librispeech_tree(tmp / "tree", speakers=args.speakers,
                                 utterances_per_speaker=per, seed=0)
    return scan_librispeech(root), (f"generated LibriSpeech-shaped tree, {args.speakers} speakers "
                                    f"x {per} utterances of 10-15 s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.bench_cpc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when "
                   "available)")
    p.add_argument("--preset", "--models", dest="presets", default=",".join(PRESETS),
                   help=f"comma-separated presets to measure, from {', '.join(PRESETS)} "
                   "(their model, criterion, batch and window; see recipes/cpc_config.py)")
    p.add_argument("--modes", default="loader,train", help="comma-separated: loader (the data "
                   "pipeline alone), train (the training step alone)")
    p.add_argument("--batch-size", type=int, help="windows per step (default: the preset's)")
    p.add_argument("--window", type=int, help="samples per window (default: the preset's)")
    p.add_argument("--data", help="LibriSpeech folder whose audio the loader reads (default: a "
                   "generated LibriSpeech-shaped tree)")
    p.add_argument("--utterances", type=int, default=48, help="utterances of the generated "
                   "tree")
    p.add_argument("--speakers", type=int, default=8, help="speakers of the generated tree")
    p.add_argument("--max-audio-memory-mb", type=int, default=4000, help="the loader's audio "
                   "held in RAM; 0 reads every window from disk")
    p.add_argument("--workers", type=int, default=0, help="processes decoding into the store")
    p.add_argument("--batches", type=int, default=50, help="loader batches timed")
    p.add_argument("--repeats", type=int, default=3, help="timed training steps (median "
                   "reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's "
                   "default)")
    p.add_argument("--out", default="runs/bench_cpc", help="folder for bench_cpc.json and .md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0
    presets = [m.strip() for m in args.presets.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    checks = [(f"--preset {name!r}", name in PRESETS, f"one of {', '.join(PRESETS)}")
              for name in presets]
    checks += [(f"--modes {m!r}", m in ("loader", "train"), "loader or train") for m in modes]
    for flag in ("batch_size", "window", "utterances", "speakers", "batches", "repeats"):
        value = getattr(args, flag)
        if value is not None:
            checks.append((f"--{flag.replace('_', '-')} {value!r}", value > 0, "a positive "
                           "integer"))
    for flag in ("max_audio_memory_mb", "workers", "warmup", "threads"):
        value = getattr(args, flag)
        checks.append((f"--{flag.replace('_', '-')} {value!r}", value >= 0, "an integer >= 0"))
    if args.data:
        checks.append((f"--data {args.data!r}", Path(args.data).is_dir(), "a LibriSpeech folder"))
    if not presets or not modes:
        checks.append(("--preset/--modes", False, "at least one preset and one mode"))
    for flag, ok, expected in checks:
        if not ok:
            print(f"error: {flag}: expected {expected}", file=sys.stderr)
            return 2
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device!r}: CUDA is not available; expected cpu",
              file=sys.stderr)
        return 2
    overrides = {"batch_size": args.batch_size, "window": args.window}
    try:
        for name in presets:  # every preset's settings valid before any work
            _config(name, overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_cpc_") as tmp_name:
        tmp = Path(tmp_name)
        store_info: dict[str, Any] = {}
        speakers: list = []
        if "loader" in modes:
            from cpc.store import prepare_store

            utts, source = _utterances(args, tmp)
            report = prepare_store(utts, tmp / "store", workers=args.workers)
            kept = set(json.loads((tmp / "store" / "store.json").read_text())["ids"])
            speakers = [u.speaker for u in utts if u.id in kept]
            store_info = {"source": source, "utterances": report.n_utterances,
                          "hours": round(report.total_samples / 16000 / 3600, 3),
                          "prepare_seconds": round(report.seconds, 2), "workers": args.workers}
            print(f"store: {source}: {report.n_utterances} utterances, "
                  f"{store_info['hours']} h, decoded in {report.seconds:.1f}s", flush=True)
        for name in presets:
            for mode in modes:
                spec = {"preset": name, "mode": mode, "device": device, "overrides": overrides,
                        "store": str(tmp / "store"), "speakers": speakers,
                        "max_audio_memory_mb": args.max_audio_memory_mb,
                        "batches": args.batches, "repeats": args.repeats, "warmup": args.warmup,
                        "threads": args.threads}
                row = _run_child(spec)
                if mode == "loader":
                    row.update(store_info)
                rows.append(row)
                print(f"{name} {mode}: {row['windows_per_second']:.1f} windows/s, peak RSS "
                      f"{row['peak_rss_mb']:.0f} MB", flush=True)
    table = _table(rows)
    print()
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cpc.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "bench_cpc.md").write_text(table + "\n")
    print(f"\nwrote {out / 'bench_cpc.json'} and {out / 'bench_cpc.md'}")
    return 0


def _table(rows: list[dict[str, Any]]) -> str:
    train = {r["preset"]: r["windows_per_second"] for r in rows if r["mode"] == "train"}
    body = []
    for r in rows:
        headroom = ""
        if r["mode"] == "loader" and r["preset"] in train:
            headroom = f"{r['windows_per_second'] / train[r['preset']]:.1f}x"
        memory = f"{r['peak_rss_mb']:.0f}"
        if r.get("peak_cuda_mb") is not None:
            memory += f" (CUDA {r['peak_cuda_mb']:.0f})"
        where = ""
        if r["mode"] == "loader":
            where = "RAM" if r.get("audio_in_memory") else "disk (pread)"
        body.append([r["preset"], r["mode"], f"{r['batch']} x {r['window']}",
                     f"{r['seconds_per_step'] * 1000:.1f}", f"{r['windows_per_second']:.1f}",
                     headroom, memory, where, f"{r['device']} ({r['threads']} threads)"])
    return format_table(["preset", "mode", "batch x window", "ms/step", "windows/s",
                         "loader / train", "peak RSS MB", "audio", "device"], body)


if __name__ == "__main__":
    sys.exit(main())
