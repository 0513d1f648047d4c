"""Train CPC (Oord et al. 2018) on speech, then probe its frozen features.

    python -m recipes.cpc_speech                      # generated corpus, CPU-sized preset
    python -m recipes.cpc_speech --data LibriSpeech/train-clean-100 --alignments phones.txt
    torchrun --nproc_per_node 8 -m recipes.cpc_speech --data ... --device cuda

With no arguments the run generates the synthetic corpus in ``<out>/corpus``, resolves the
``auto`` preset to ``cpu-quick`` on a CPU (printed at start; see :mod:`cpc.config`), trains for
at most ``train_seconds``, probes, prints the table and writes the plots: about 10 minutes on
2 CPU cores.

The paper's protocol on LibriSpeech train-clean-100 (64.6 % phone, 97.4 % speaker accuracy
with linear probes in the paper), on 8 GPUs; ``converted_aligned_phones.txt`` is the CPC
paper's frame-level alignment file (utterance id, then one phone index per 10 ms):

    torchrun --nproc_per_node 8 -m recipes.cpc_speech --preset paper --device cuda \
        --data /data/LibriSpeech/train-clean-100 \
        --alignments /data/LibriSpeech/converted_aligned_phones.txt \
        --batch-size 8 --window 20480 --steps 200000 --out runs/cpc_librispeech

(paper preset: 512-channel encoder without normalisation, GRU 256, 12 linear predictors,
same-speaker negatives, Adam 2e-4; probes on a deterministic 80/20 split by utterance unless a
manifest gives a ``split`` column, e.g. one built from the paper's train/test split files.)

Outputs in ``--out``: config.json (resolved), checkpoint.pt (atomic), metrics.jsonl,
probes.json, training.png, probes.png, summary.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from cpc.config import CPCSpeechConfig, build_config, read_config_file
from cpc.criterion import CPCCriterion
from cpc.data import (BadAudioError, SpeakerBalancedBatchSampler, WindowDataset, load_utterances,
                      resolve_utterances)
from cpc.model import CPCModel, CPCModelConfig, count_parameters
from cpc.probes import ProbeConfig, frame_probe_data, linear_probe
from recipes.common import distributed as D
from recipes.common.checkpoint import (load_checkpoint, rng_state, save_checkpoint,
                                       set_rng_state)
from recipes.common.logging import MetricsLog, format_table
from recipes.common.plots import plot_probes, plot_training

CHECKPOINT = "checkpoint.pt"
FEATURE_KINDS = ("cpc", "mfcc", "random_init")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipes.cpc_speech",
        description="Train Contrastive Predictive Coding on speech and evaluate its frozen "
        "features with linear probes (phone, speaker, manifest labels) against MFCC and "
        "random-init baselines. With no arguments: generates a synthetic corpus in "
        "<out>/corpus and runs a CPU-sized preset in about 10 minutes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", help="LibriSpeech folder (speaker/chapter/*.flac) to train and "
                   "probe on. Default: none (see --manifest; neither = generated corpus).")
    p.add_argument("--manifest", help="CSV (with header) or JSON-lines manifest: a 'path' "
                   "column (absolute or relative to the manifest), optional 'speaker', 'split' "
                   "(train/test) and label columns.")
    p.add_argument("--alignments", help="phone alignment file in the CPC paper's format (utt "
                   "id then one integer label per 10 ms frame) for the frame-level phone probe. "
                   "The generated corpus brings its own.")
    p.add_argument("--out", help="output folder for config, checkpoints, metrics, probes and "
                   "plots (default from the config: runs/cpc_speech).")
    p.add_argument("--steps", type=int, help="training steps (optimizer updates).")
    p.add_argument("--batch-size", type=int, help="windows per step and per process.")
    p.add_argument("--window", type=int, help="training window in samples at 16 kHz "
                   "(multiple of 160; 20480 = 1.28 s in the paper). Shorter utterances are "
                   "zero-padded and masked.")
    p.add_argument("--device", help="'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available).")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint (default: <out>/checkpoint.pt); on CPU with "
                   "the same seed the losses equal those of an uninterrupted run.")
    p.add_argument("--config", help="YAML or JSON file with CPCSpeechConfig fields (nested "
                   "'model' and 'probe' mappings); flags given on the command line override it.")
    p.add_argument("--preset", choices=["auto", "paper", "cpu-quick"], help="base settings: "
                   "'paper' (Oord et al.), 'cpu-quick' (fits 10 min on 2 CPU cores), 'auto' "
                   "(paper on CUDA, cpu-quick on CPU; the default).")
    p.add_argument("--probe", help="comma-separated manifest label columns to probe at the "
                   "utterance level, besides 'speaker' (e.g. 'gender,accent').")
    p.add_argument("--strict", action="store_true", default=None, help="make an unreadable "
                   "or empty audio file an error instead of a skipped file (with a warning).")
    p.add_argument("--seed", type=int, help="seed for initialisation, batches and probes.")
    p.add_argument("--negatives", choices=["batch", "sequence", "speaker"], help="where each "
                   "step's negatives come from: all positions of the batch, the same sequence, "
                   "or the sequences of the same speaker.")
    p.add_argument("--lr", type=float, help="Adam learning rate.")
    p.add_argument("--no-probes", action="store_true", help="train only; skip the probes.")
    p.add_argument("--quiet", action="store_true", help="no progress bars.")
    return p


def config_from_args(args: argparse.Namespace) -> CPCSpeechConfig:
    file_values = read_config_file(args.config) if args.config else {}
    overrides = {
        "data": args.data, "manifest": args.manifest, "alignments": args.alignments,
        "out": args.out, "steps": args.steps, "batch_size": args.batch_size,
        "window": args.window, "device": args.device, "preset": args.preset,
        "strict": args.strict, "seed": args.seed, "negatives": args.negatives, "lr": args.lr,
        "probe_labels": [s.strip() for s in args.probe.split(",") if s.strip()]
        if args.probe else None,
    }
    return build_config(file_values, overrides, cuda=torch.cuda.is_available())


def _log(info: D.DistInfo, *parts: Any) -> None:
    if info.is_main:
        print(*parts, flush=True)


def _time_is_up(t0: float, limit: float, info: D.DistInfo, device: torch.device) -> bool:
    """Whether the training time limit is reached; rank 0 decides for all ranks."""
    up = torch.tensor([float(time.perf_counter() - t0 >= limit)], device=device)
    if info.enabled:
        torch.distributed.broadcast(up, src=0)
    return bool(up.item())


def lr_at(step: int, config: CPCSpeechConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then constant (independent of ``steps``, so a run
    extended with --resume --steps N follows the same schedule)."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    info = D.setup(config.device if config.device != "auto" else
                   ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return _run(config, args, info)
    finally:
        D.cleanup(info)


def _run(config: CPCSpeechConfig, args: argparse.Namespace, info: D.DistInfo) -> dict[str, Any]:
    started = time.perf_counter()
    device = D.resolve_device(config.device, info)
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet and info.is_main
    _log(info, f"CPC speech run: preset '{config.preset}' on {device}"
         + (f", {info.world_size} processes" if info.enabled else ""))
    _log(info, json.dumps(config.to_dict(), indent=2))
    if info.is_main:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    # ---- data
    t0 = time.perf_counter()
    if info.is_main:
        utts, phones_path, source = resolve_utterances(
            data=config.data, manifest=config.manifest, out=out,
            corpus_speakers=config.corpus_speakers, corpus_utterances=config.corpus_utterances,
            corpus_seconds=config.corpus_seconds, seed=config.seed, progress=progress)
    D.barrier(info)
    if not info.is_main:  # the corpus exists now; generating again is a cheap no-op
        utts, phones_path, source = resolve_utterances(
            data=config.data, manifest=config.manifest, out=out,
            corpus_speakers=config.corpus_speakers, corpus_utterances=config.corpus_utterances,
            corpus_seconds=config.corpus_seconds, seed=config.seed, progress=False)
    if config.alignments:
        phones_path = Path(config.alignments)
    if not utts:
        raise ValueError(f"{source}: no utterances found; expected audio files")
    from modalities.audio import holdout_split

    train_utts, test_utts = holdout_split(utts, test_fraction=0.2, seed=config.seed)
    train_utts, train_waves, train_report = load_utterances(
        train_utts, strict=config.strict, progress=progress)
    if not train_utts:
        raise ValueError(f"{source}: no readable training audio; expected at least one file")
    data_seconds = time.perf_counter() - t0
    _log(info, f"data: {source}: {len(utts)} utterances, {len(train_utts)} train / "
         f"{len(test_utts)} held out, {len(set(u.speaker for u in utts))} speakers "
         f"({data_seconds:.1f}s)")

    dataset = WindowDataset(train_waves, [u.speaker for u in train_utts], config.window)
    sampler = SpeakerBalancedBatchSampler([u.speaker for u in train_utts], config.batch_size,
                                          config.speakers_per_batch, seed=config.seed,
                                          rank=info.rank)

    # ---- model
    torch.manual_seed(config.seed)
    model = CPCModel(config.model).to(device)
    initial_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    criterion = CPCCriterion(config.negatives, config.temperature)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    _log(info, f"model: {count_parameters(model) / 1e6:.2f}M parameters; "
         f"{dataset.n_short} training utterances shorter than the window (padded, masked)")

    metrics = MetricsLog(out / "metrics.jsonl")
    start_step = 0
    if args.resume is not None:
        path = out / CHECKPOINT if args.resume == "auto" else Path(args.resume)
        state = load_checkpoint(path, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        initial_state = state["initial_model"]
        start_step = int(state["step"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        if info.is_main:
            metrics.truncate_after(start_step)
        _log(info, f"resumed from {path} at step {start_step}")
    elif info.is_main and metrics.path.exists():
        metrics.path.unlink()
    else:
        sampler.position = 0

    train_model = model
    if info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(step: int) -> None:
        if not info.is_main:
            return
        save_checkpoint({
            "step": step,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "initial_model": initial_state,
            "sampler": sampler.state_dict(),
            "rng": rng_state(),
        }, out / CHECKPOINT)

    # ---- training
    t_train = time.perf_counter()
    model.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=min(start_step, config.steps), desc="training",
                   unit="step", dynamic_ncols=True)
    last: dict[str, Any] = {}
    windows_seen = 0
    batches = iter(sampler)
    stopped_early = False
    for step in range(start_step, config.steps):
        if config.train_seconds and _time_is_up(t_train, config.train_seconds, info, device):
            stopped_early = True
            save(step)
            _log(info, f"\ntraining time limit ({config.train_seconds:.0f}s) reached after "
                 f"{step} steps")
            break
        indices = next(batches)
        batch = dataset.collate(indices, step, seed=config.seed, rank=info.rank)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        z, c, predictions = train_model(batch.wave.to(device), predict=True)
        out_loss = criterion(predictions, z, batch.lengths.to(device), batch.speakers.to(device))
        optimizer.zero_grad(set_to_none=True)
        out_loss.loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        windows_seen += len(indices) * info.world_size
        done = step + 1
        if done % config.log_every == 0 or done == config.steps or done == start_step + 1:
            loss = D.all_reduce_mean(out_loss.loss.detach(), info)
            acc = D.all_reduce_mean(out_loss.step_accuracy, info)
            last = {"step": done, "loss": float(loss), "lr": lr_at(step, config),
                    "step_loss": [round(float(x), 6) for x in out_loss.step_loss],
                    "step_accuracy": [round(float(x), 4) for x in acc],
                    "elapsed_s": round(time.perf_counter() - t_train, 2)}
            if info.is_main:
                metrics.write(last)
        if bar is not None:
            bar.update(1)
            if last:
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc1=last["step_accuracy"][0])
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t_train
    D.barrier(info)

    summary: dict[str, Any] = {
        "source": source,
        "preset": config.preset,
        "device": str(device),
        "world_size": info.world_size,
        "steps": config.steps,
        "steps_done": (step if stopped_early else config.steps) if config.steps > start_step
        else start_step,
        "stopped_by_time_limit": stopped_early,
        "start_step": start_step,
        "train_utterances": len(train_utts),
        "held_out_utterances": len(test_utts),
        "skipped_files": train_report.n_skipped,
        "skipped": train_report.skipped,
        "short_utterances_padded": dataset.n_short,
        "train_seconds": round(train_seconds, 1),
        "windows_per_second": round(windows_seen / train_seconds, 2) if train_seconds else None,
        "final_loss": last.get("loss"),
        "final_step_accuracy": last.get("step_accuracy"),
    }
    results: dict[str, Any] = {}
    if info.is_main:
        if not args.no_probes:
            t_probe = time.perf_counter()
            random_model = CPCModel(config.model)
            random_model.load_state_dict(initial_state)
            results, probe_skipped = run_probes(
                config, model.to("cpu").eval(), random_model.eval(), train_utts, train_waves,
                test_utts, phones_path, progress)
            summary["skipped_files"] += len(probe_skipped)
            summary["skipped"] += probe_skipped
            summary["probe_seconds"] = round(time.perf_counter() - t_probe, 1)
            (out / "probes.json").write_text(json.dumps(results, indent=2) + "\n")
            accuracies = {kind: {label: r["accuracy"] for label, r in results[kind].items()}
                          for kind in results}
            plot_probes(accuracies, out / "probes.png")
        plot_training(metrics.read(), out / "training.png")
        summary["total_seconds"] = round(time.perf_counter() - started, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_report(summary, results)
    return {"summary": summary, "probes": results, "out": str(out)}


@torch.no_grad()
def _features(utts: Sequence, waves: Sequence[torch.Tensor], cpc_model: CPCModel,
              random_model: CPCModel, max_samples: int, progress: bool
              ) -> dict[str, list[torch.Tensor]]:
    from modalities.audio import mfcc

    feats: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURE_KINDS}
    iterator = range(len(utts))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="probe features", unit="utt", leave=False)
    for i in iterator:
        wave = waves[i]
        if max_samples:
            wave = wave[:max_samples]
        feats["cpc"].append(cpc_model.features(wave[None])[0])
        feats["random_init"].append(random_model.features(wave[None])[0])
        feats["mfcc"].append(mfcc(wave).float())
    return feats


def run_probes(config: CPCSpeechConfig, cpc_model: CPCModel, random_model: CPCModel,
               train_utts: Sequence, train_waves: Sequence[torch.Tensor], test_utts: Sequence,
               phones_path: Path | None, progress: bool
               ) -> tuple[dict[str, dict[str, dict]], list]:
    """Linear probes on held-out utterances for every feature kind; returns
    ``{kind: {label: ProbeResult dict}}`` and the files skipped while reading test audio."""
    from modalities.audio import read_alignments

    test_utts, test_waves, report = load_utterances(test_utts, strict=config.strict)
    max_samples = int(config.probe_max_seconds * 16000)
    tr = _features(train_utts, train_waves, cpc_model, random_model, max_samples, progress)
    te = _features(test_utts, test_waves, cpc_model, random_model, max_samples, progress)
    probe_cfg = ProbeConfig(**asdict(config.probe))
    results: dict[str, dict[str, dict]] = {k: {} for k in FEATURE_KINDS}

    tasks: list[tuple[str, str]] = []
    alignments = None
    if phones_path is not None and Path(phones_path).is_file():
        alignments = read_alignments(phones_path)
        tasks.append(("phone", "frame"))
    if any(u.speaker is not None for u in train_utts):
        tasks.append(("speaker", "utterance"))
    for label in config.probe_labels:
        if not any(label in u.labels for u in train_utts):
            raise ValueError(f"--probe {label!r}: no manifest column of that name; expected "
                             f"one of {sorted({k for u in train_utts for k in u.labels})}")
        tasks.append((label, "utterance"))

    for label, level in tasks:
        for kind in FEATURE_KINDS:
            if level == "frame":
                tr_i = [i for i, u in enumerate(train_utts) if u.id in alignments]
                te_i = [i for i, u in enumerate(test_utts) if u.id in alignments]
                if not tr_i or not te_i:
                    break
                xtr, ytr = frame_probe_data([tr[kind][i] for i in tr_i],
                                            [alignments[train_utts[i].id] for i in tr_i])
                xte, yte = frame_probe_data([te[kind][i] for i in te_i],
                                            [alignments[test_utts[i].id] for i in te_i])
            else:
                def pooled(feats, utts):
                    keep = [i for i, u in enumerate(utts) if _label(u, label) is not None]
                    return (torch.stack([feats[i].mean(0) for i in keep]),
                            [_label(utts[i], label) for i in keep])
                xtr, ytr = pooled(tr[kind], train_utts)
                xte, yte = pooled(te[kind], test_utts)
                if len(ytr) == 0 or len(yte) == 0:
                    break
            results[kind][label] = linear_probe(xtr, ytr, xte, yte, probe_cfg).as_dict()
    return results, report.skipped


def _label(utt, label: str) -> str | None:
    return utt.speaker if label == "speaker" else utt.labels.get(label)


def print_report(summary: dict[str, Any], results: dict[str, dict[str, dict]]) -> None:
    print()
    print(f"training: {summary['steps_done']} steps in {summary['train_seconds']}s "
          f"({summary['windows_per_second']} windows/s), final loss {summary['final_loss']}")
    acc = summary.get("final_step_accuracy")
    if acc:
        print("prediction accuracy per step k: " + " ".join(f"{a:.2f}" for a in acc))
    if summary["skipped_files"]:
        print(f"skipped {summary['skipped_files']} unreadable or empty audio files:")
        for path, reason in summary["skipped"][:10]:
            print(f"  {path}: {reason}")
    if results and any(results.values()):
        labels = sorted({label for kind in results for label in results[kind]},
                        key=lambda s: (s != "phone", s != "speaker", s))
        rows = [[kind] + [f"{100 * results[kind][l]['accuracy']:.1f}%"
                          if l in results[kind] else "-" for l in labels]
                for kind in results]
        print()
        print("linear probe accuracy on held-out utterances")
        print(format_table(["features"] + labels, rows))
    print(f"\ntotal wall time {summary.get('total_seconds')}s")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(argv)
    except (ValueError, FileNotFoundError, BadAudioError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
