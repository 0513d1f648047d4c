"""Train CPC (Oord et al. 2018) on speech, then probe its frozen features.

    python -m recipes.cpc_speech                      # generated corpus, CPU-sized preset
    python -m recipes.cpc_speech --data LibriSpeech/train-clean-100 --alignments phones.txt
    torchrun --nproc_per_node 8 -m recipes.cpc_speech --data ... --device cuda

With no arguments the run generates the synthetic corpus in ``<out>/corpus``, resolves the
``auto`` preset to ``cpu-quick`` on a CPU (printed at start; see :mod:`recipes.cpc_config`), trains for
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
negatives from the whole batch, Adam 2e-4, 50 random frames per utterance in the phone probe; probes on a deterministic 80/20 split by utterance unless a
manifest gives a ``split`` column, e.g. one built from the paper's train/test split files.)

Under torchrun, ``--negatives batch`` draws each process's negatives from its own batch (as
CPC_audio does); ``--negatives global`` draws them from the batches of every process (the keys
are gathered with exact gradients through ``csrc_triton.info_nce(..., process_group=...)``),
so that R processes with batch B each compute the loss and the gradients of one process with
batch R x B. In one process ``global`` is ``batch``.

Outputs in ``--out``: config.json (resolved), checkpoint.pt (atomic), metrics.jsonl,
train.log, probes.json, training.png, probes.png, summary.json. An ``--out`` that already holds
a run is refused unless ``--resume`` (continue it; a changed configuration is refused, the
differing fields named, unless ``--override-config``) or ``--overwrite`` (replace it). Progress
is a bar on a terminal and one plain line per logging interval in a file or a pipe.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from recipes.cpc_config import CPCSpeechConfig, build_config, read_config_file
from cpc.criterion import CPCCriterion
from cpc.data import (BadAudioError, SpeakerBalancedBatchSampler, WindowDataset, load_utterances,
                      resolve_utterances)
from cpc.model import CPCModel, count_parameters
from recipes.common.evaluation import ProbeConfig, linear_probe
from recipes.common import distributed as D
from recipes.common.checkpoint import restore_training, rng_state, save_checkpoint
from recipes.common.cli import add_resume_arguments, cli_main
from recipes.common.logging import MetricsLog, RunLog, format_table
from recipes.common.plots import plot_probes, plot_training
from recipes.common.rundir import open_run, write_config

CHECKPOINT = "checkpoint.pt"
FEATURE_KINDS = ("cpc", "mfcc", "random_init")
# settings a resumed run may change without changing what training computes up to its stop:
# the schedule does not depend on ``steps`` (see lr_at), and the probes run after training
RESUMABLE = ("steps", "train_seconds", "device", "threads", "out", "log_every",
             "checkpoint_every", "preset", "alignments", "probe_labels", "probe",
             "probe_max_seconds", "probe_frames_per_utterance")
BUILTIN_PROBES = ("phone", "speaker")


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
    add_resume_arguments(p)
    p.add_argument("--config", help="YAML or JSON file with CPCSpeechConfig fields (nested "
                   "'model' and 'probe' mappings); flags given on the command line override it.")
    p.add_argument("--preset", choices=["auto", "paper", "cpu-quick"], help="base settings: "
                   "'paper' (Oord et al.), 'cpu-quick' (fits 10 min on 2 CPU cores), 'auto' "
                   "(paper on CUDA, cpu-quick on CPU; the default).")
    p.add_argument("--probe", help="comma-separated manifest label columns to probe at the "
                   "utterance level (e.g. 'gender,accent'); 'speaker' (always probed when the "
                   "utterances have speakers) and 'phone' (with alignments) are accepted too. "
                   "Unknown labels are refused before any audio is read.")
    p.add_argument("--strict", action="store_true", default=None, help="make an unreadable "
                   "or empty audio file an error instead of a skipped file (with a warning).")
    p.add_argument("--seed", type=int, help="seed for initialisation, batches and probes.")
    p.add_argument("--negatives", choices=["batch", "sequence", "speaker", "global"],
                   help="where each step's negatives come from: all positions of this "
                   "process's batch, the same sequence, the sequences of the same speaker, or "
                   "'global': all positions of the batches of every process under torchrun "
                   "(keys gathered across ranks with exact gradients; the loss and gradients "
                   "of one process on the concatenated batch). Without torchrun (one process) "
                   "'global' is 'batch'. Default: the preset's (paper: batch, cpu-quick: "
                   "speaker).")
    p.add_argument("--lr", type=float, help="Adam learning rate.")
    p.add_argument("--no-probes", action="store_true", help="train only; skip the probes.")
    p.add_argument("--quiet", action="store_true", help="no progress display (a bar on a "
                   "terminal, otherwise one plain line per logging interval).")
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


def check_probe_labels(requested: Sequence[str], utts: Sequence, has_alignments: bool,
                       source: str) -> list[str]:
    """The ``--probe`` labels checked against what the utterances carry, before any audio is
    decoded; returns the manifest label columns to probe (``speaker`` and ``phone`` are
    built-in probes, run whenever their labels exist, so they are dropped from the list).

    Raises ``ValueError`` naming every unknown label and the labels available (``speaker`` when
    the utterances have speakers, ``phone`` with an alignment file, the manifest's columns).

    Example:
        >>> check_probe_labels(["speaker", "digit"], utts, False, "manifest m.csv")
        ['digit']
    """
    columns = {k for u in utts for k in u.labels}
    available = set(columns)
    if any(u.speaker is not None for u in utts):
        available.add("speaker")
    if has_alignments:
        available.add("phone")
    unknown = [label for label in requested if label not in available]
    if unknown:
        raise ValueError(f"--probe {','.join(requested)}: unknown label(s) {unknown} in "
                         f"{source}; expected labels from {sorted(available)}")
    return [label for label in dict.fromkeys(requested) if label not in BUILTIN_PROBES]


def lr_at(step: int, config: CPCSpeechConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then constant (independent of ``steps``, so a run
    extended with --resume --steps N follows the same schedule)."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    info = D.setup(config.device)
    try:
        return _run(config, args, info)
    finally:
        D.cleanup(info)


def _run(config: CPCSpeechConfig, args: argparse.Namespace, info: D.DistInfo) -> dict[str, Any]:
    started = time.perf_counter()
    device = D.resolve_device(config.device, info, threads=config.threads)
    if config.alignments and not Path(config.alignments).is_file():
        raise ValueError(f"alignments={config.alignments!r}: no such file; expected a phone "
                         "alignment file in the CPC paper's format")
    # the run folder first: an existing run is refused (or resumed, or replaced) before the
    # corpus is generated in it or any audio is read
    out, log, checkpoint = open_run(config.out, info, resume=args.resume,
                                    overwrite=args.overwrite, quiet=args.quiet,
                                    config=config.to_dict(), resumable=RESUMABLE,
                                    override_config=args.override_config, checkpoint=CHECKPOINT)
    # tqdm bars inside the data helpers only on a terminal; in a file or a pipe the
    # RunLog progress lines say the same
    bars = info.is_main and not args.quiet and sys.stdout.isatty()
    auto = " (auto-selected for a CPU; --preset paper for the paper's settings)" \
        if config.preset == "cpu-quick" and args.preset is None else ""
    log(f"CPC speech run: preset '{config.preset}'{auto} on {device}"
        + (f", {info.world_size} processes" if info.enabled else ""))
    log(json.dumps(config.to_dict(), indent=2))
    if info.is_main:
        write_config(out, config.to_dict())

    # ---- data
    t0 = time.perf_counter()
    if info.is_main:
        utts, phones_path, source = resolve_utterances(
            data=config.data, manifest=config.manifest, out=out,
            corpus_speakers=config.corpus_speakers, corpus_utterances=config.corpus_utterances,
            corpus_seconds=config.corpus_seconds, seed=config.seed, progress=bars)
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
    if not args.no_probes:  # every probe label known before any audio is decoded
        check_probe_labels(config.probe_labels, train_utts, phones_path is not None, source)
    train_utts, train_waves, train_report = load_utterances(
        train_utts, strict=config.strict, progress=bars)
    if not train_utts:
        raise ValueError(f"{source}: no readable training audio; expected at least one file")
    data_seconds = time.perf_counter() - t0
    log(f"data: {source}: {len(utts)} utterances, {len(train_utts)} train / "
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
    # "global" gathers the keys over every rank (the default group); other modes ignore it
    criterion = CPCCriterion(config.negatives, config.temperature, similarity=config.similarity,
                             process_group=torch.distributed.group.WORLD if info.enabled else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    log(f"model: {count_parameters(model) / 1e6:.2f}M parameters; "
         f"{dataset.n_short} training utterances shorter than the window (padded, masked)")

    metrics = MetricsLog(out / "metrics.jsonl")
    start_step = 0
    if checkpoint is not None:
        start_step = restore_training(checkpoint, metrics, info.is_main, model=model,
                                      optimizer=optimizer, sampler=sampler)
        initial_state = checkpoint["initial_model"]
        log(f"resumed at step {start_step}")
    else:  # a new run: open_run made sure --out held no earlier run
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
    bar = log.progress(config.steps, "training", initial=min(start_step, config.steps),
                       every=config.log_every)
    last: dict[str, Any] = {}
    windows_seen = 0
    batches = iter(sampler)
    stopped_early = False
    for step in range(start_step, config.steps):
        if config.train_seconds and D.time_is_up(t_train, config.train_seconds, info, device):
            stopped_early = True
            save(step)
            log(f"training time limit ({config.train_seconds:.0f}s) reached after "
                f"{step} steps")
            break
        indices = next(batches)
        batch = dataset.collate(indices, step, seed=config.seed, rank=info.rank)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        done = step + 1
        logging = done % config.log_every == 0 or done == config.steps or done == start_step + 1
        z, c, predictions = train_model(batch.wave.to(device), predict=True)
        out_loss = criterion(predictions, z, batch.lengths.to(device), batch.speakers.to(device),
                             accuracy=logging)
        optimizer.zero_grad(set_to_none=True)
        out_loss.loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        windows_seen += len(indices) * info.world_size
        if logging:
            # means over ranks: with "global" negatives each rank's loss is R x its share,
            # so the mean is the loss of the global batch
            loss = D.all_reduce_mean(out_loss.loss.detach(), info)
            step_loss = D.all_reduce_mean(out_loss.step_loss, info)
            acc = D.all_reduce_mean(out_loss.step_accuracy, info)
            last = {"step": done, "loss": float(loss), "lr": lr_at(step, config),
                    "step_loss": [round(float(x), 6) for x in step_loss],
                    "step_accuracy": [round(float(x), 4) for x in acc],
                    "elapsed_s": round(time.perf_counter() - t_train, 2)}
            if info.is_main:
                metrics.write(last)
        # the postfix of the last logged step (logging steps are multiples of log_every)
        bar.update(1, **({"loss": last["loss"], "acc1": last["step_accuracy"][0]}
                         if last else {}))
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done)
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
                config, model.eval(), random_model, train_utts, train_waves,
                test_utts, phones_path, log, device)
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
    return {"summary": summary, "probes": results, "out": str(out), "model": model}


@torch.no_grad()
def _features(utts: Sequence, waves: Sequence[torch.Tensor], models: dict[str, CPCModel],
              frame_index: Sequence[torch.Tensor | None], max_samples: int,
              device: torch.device, log: RunLog | None = None, desc: str = "probe features"
              ) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor | None]]]:
    """Per kind: (mean-pooled features (D,) per utterance, frame features at ``frame_index``
    per utterance, or None where the utterance has no frame labels). Only the selected frames
    are kept, so probing a large corpus stays within memory."""
    from modalities.audio import mfcc

    out = {k: ([], []) for k in FEATURE_KINDS}
    # a bar on a terminal, plain lines in a file or pipe (log=None: silent)
    bar = (log or RunLog(None, enabled=False)).progress(len(utts), desc, unit="utt")
    for i in range(len(utts)):
        wave = waves[i][:max_samples] if max_samples else waves[i]
        for kind in FEATURE_KINDS:
            if kind == "mfcc":
                f = mfcc(wave).float()
            else:
                f = models[kind].features(wave[None].to(device))[0].float().cpu()
            out[kind][0].append(f.mean(0))
            idx = frame_index[i]
            out[kind][1].append(None if idx is None else f[idx.clamp(max=f.shape[0] - 1)])
        bar.update(1)
    bar.close()
    return out


def _frame_index(utts: Sequence, waves: Sequence[torch.Tensor], alignments, cap: int,
                 max_samples: int, seed: int) -> list[torch.Tensor | None]:
    """Which frames of each utterance enter the frame-level probe: all labelled frames, or a
    seeded random subset of ``cap`` of them; the same frames for every feature kind."""
    index: list[torch.Tensor | None] = []
    for i, (utt, wave) in enumerate(zip(utts, waves)):
        if alignments is None or utt.id not in alignments:
            index.append(None)
            continue
        n_samples = min(wave.numel(), max_samples) if max_samples else wave.numel()
        n = min(n_samples // 160, alignments[utt.id].numel())
        if cap and n > cap:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            index.append(torch.randperm(n, generator=gen)[:cap].sort().values)
        else:
            index.append(torch.arange(n))
    return index


def run_probes(config: CPCSpeechConfig, cpc_model: CPCModel, random_model: CPCModel,
               train_utts: Sequence, train_waves: Sequence[torch.Tensor], test_utts: Sequence,
               phones_path: Path | None, log: RunLog | None = None,
               device: torch.device | None = None
               ) -> tuple[dict[str, dict[str, dict]], list]:
    """Linear probes on held-out utterances for every feature kind; returns
    ``{kind: {label: ProbeResult dict}}`` and the files skipped while reading test audio.
    ``log`` (a :class:`recipes.common.logging.RunLog`) shows the feature extraction's progress.

    Feature kinds: ``cpc`` (the trained context network's output c_t, as in the paper),
    ``random_init`` (the same model with the exact weights training started from) and ``mfcc``
    (13 MFCC + deltas + delta-deltas). Every kind goes through the same probe
    (:func:`recipes.common.evaluation.linear_probe`, same settings, same frames and utterances)."""
    from modalities.audio import read_alignments

    device = device or torch.device("cpu")
    test_utts, test_waves, report = load_utterances(test_utts, strict=config.strict)
    max_samples = int(config.probe_max_seconds * 16000)
    alignments = None
    if phones_path is not None and Path(phones_path).is_file():
        alignments = read_alignments(phones_path)
    cap = config.probe_frames_per_utterance
    tr_idx = _frame_index(train_utts, train_waves, alignments, cap, max_samples, config.seed)
    te_idx = _frame_index(test_utts, test_waves, alignments, cap, max_samples, config.seed + 1)
    models = {"cpc": cpc_model.to(device).eval(), "random_init": random_model.to(device).eval()}
    tr = _features(train_utts, train_waves, models, tr_idx, max_samples, device, log,
                   "probe features (train)")
    te = _features(test_utts, test_waves, models, te_idx, max_samples, device, log,
                   "probe features (held out)")
    probe_cfg = ProbeConfig(**asdict(config.probe))
    results: dict[str, dict[str, dict]] = {k: {} for k in FEATURE_KINDS}

    tasks: list[tuple[str, str]] = []
    if alignments is not None:
        tasks.append(("phone", "frame"))
    if any(u.speaker is not None for u in train_utts):
        tasks.append(("speaker", "utterance"))
    for label in config.probe_labels:
        if label in BUILTIN_PROBES:  # probed above whenever its labels exist
            continue
        if not any(label in u.labels for u in train_utts):
            raise ValueError(f"--probe {label!r}: no manifest column of that name; expected "
                             f"one of {sorted({k for u in train_utts for k in u.labels})}")
        tasks.append((label, "utterance"))

    for label, level in tasks:
        for kind in FEATURE_KINDS:
            if level == "frame":
                tr_i = [i for i, x in enumerate(tr_idx) if x is not None]
                te_i = [i for i, x in enumerate(te_idx) if x is not None]
                if not tr_i or not te_i:
                    break
                xtr = torch.cat([tr[kind][1][i] for i in tr_i])
                ytr = torch.cat([alignments[train_utts[i].id][tr_idx[i]] for i in tr_i])
                xte = torch.cat([te[kind][1][i] for i in te_i])
                yte = torch.cat([alignments[test_utts[i].id][te_idx[i]] for i in te_i])
            else:
                def pooled(pools, utts):
                    keep = [i for i, u in enumerate(utts) if _label(u, label) is not None]
                    if not keep:
                        return None, []
                    return (torch.stack([pools[i] for i in keep]),
                            [_label(utts[i], label) for i in keep])
                xtr, ytr = pooled(tr[kind][0], train_utts)
                xte, yte = pooled(te[kind][0], test_utts)
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
    return cli_main(run, argv, (ValueError, FileNotFoundError, BadAudioError))


if __name__ == "__main__":
    sys.exit(main())
