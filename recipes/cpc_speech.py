"""Train CPC (Oord et al. 2018) on speech, then probe its frozen features.

    python -m recipes.cpc_speech                      # generated corpus, CPU-sized preset
    python -m recipes.cpc_speech --data LibriSpeech/train-clean-100 --alignments phones.txt
    torchrun --nproc_per_node 8 -m recipes.cpc_speech --data ... --device cuda

With no arguments the run generates the synthetic corpus in ``<out>/corpus``, resolves the
``auto`` preset to ``cpu-quick`` on a CPU (printed at start; see :mod:`recipes.cpc_config`), trains
its 2800 steps (stopping early only past ``train_seconds``), probes, prints the table and writes
the plots: about 7.5 minutes on 2 CPU cores.

The paper's protocol on LibriSpeech train-clean-100 (64.6 % phone, 97.4 % speaker accuracy
with linear probes in the paper), on 8 GPUs: train on the paper's ``train_split.txt``, probe
and validate on ``test_split.txt``, phone labels from ``converted_aligned_phones.txt`` (utterance
id, then one phone index per 10 ms):

    torchrun --nproc_per_node 8 -m recipes.cpc_speech --preset paper --device cuda \
        --data /data/LibriSpeech/train-clean-100 \
        --train-split train_split.txt --test-split test_split.txt \
        --alignments converted_aligned_phones.txt --steps 200000 --out runs/cpc_librispeech

(presets: see :mod:`recipes.cpc_config`, which states where ``paper`` departs from the paper
and from CPC_audio, and ``cpc_audio`` for CPC_audio's defaults. Without split files the probes
use a deterministic 80/20 split by utterance unless a manifest gives a ``split`` column.)

Data: every utterance is decoded once into an int16 store (:mod:`cpc.store`, ``--store``,
default ``<out>/audio_store``); each rank trains on its shard of speakers, in RAM up to
``--max-audio-memory-mb``, else read window by window from disk.

Under torchrun, ``--negatives batch`` draws each process's negatives from its own batch (as
CPC_audio does); ``--negatives global`` draws them from the batches of every process (the keys
are gathered with exact gradients through ``csrc_triton.info_nce(..., process_group=...)``),
so that R processes with batch B each compute the loss and the gradients of one process with
batch R x B. In one process ``global`` is ``batch``.

Outputs in ``--out``: config.json (resolved), checkpoint.pt (atomic, written by rank 0 and
broadcast by it on ``--resume``), metrics.jsonl (training lines and per-checkpoint validation
per step k), train.log, probes.json (with skipped probes and why), training.png,
validation.png, probes.png, summary.json, audio_store/ (unless ``--store``), and with
``--export cpc_audio`` cpc_audio.pt. An ``--out`` that already holds
a run is refused unless ``--resume`` (continue it; a changed configuration is refused, the
differing fields named, unless ``--override-config``) or ``--overwrite`` (replace it). Progress
is a bar on a terminal and one plain line per logging interval in a file or a pipe.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from recipes.cpc_config import CPCSpeechConfig, build_config, read_config_file
from cpc.criterion import CPCCriterion
from cpc.data import (BadAudioError, BatchPrefetcher, SpeakerBalancedBatchSampler, WindowDataset,
                      _generator, resolve_utterances)
from cpc.export import export_cpc_audio
from cpc.model import CPCModel, count_parameters
from cpc.probe import ProbeSplit, run_probes
from cpc.store import AudioStore, prepare_store, shard_indices
from modalities.audio import LabelRangeError, read_alignments
from recipes.common.evaluation import ProbeConfig
from recipes.common import distributed as D
from recipes.common.checkpoint import restore_training, rng_state, save_checkpoint
from recipes.common.cli import add_resume_arguments, cli_main
from recipes.common.logging import MetricsLog, format_table
from recipes.common.plots import plot_probes, plot_step_curves, plot_training
from recipes.common.rundir import open_run, write_config

CHECKPOINT = "checkpoint.pt"
# settings a resumed run may change without changing what training computes up to its stop:
# the schedule does not depend on ``steps`` (see lr_at), and the probes run after training
RESUMABLE = ("steps", "train_seconds", "device", "threads", "out", "log_every",
             "checkpoint_every", "preset", "store", "max_audio_memory_mb", "max_probe_memory_mb",
             "workers", "prefetch",
             "val_windows", "export", "alignments", "probe_labels", "probe",
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
    p.add_argument("--preset", choices=["auto", "paper", "cpu-quick", "cpc_audio"],
                   help="base settings: 'paper' (Oord et al.), 'cpc_audio' (facebookresearch/"
                   "CPC_audio's defaults: LSTM context, transformer predictors, 128 sampled "
                   "same-speaker negatives, summed step losses), 'cpu-quick' (fits 10 min on 2 "
                   "CPU cores), 'auto' (paper on CUDA, cpu-quick on CPU; the default). See "
                   "recipes/cpc_config.py for every value and where each departs from the paper.")
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
                   "'global' is 'batch'. Default: the preset's (paper and cpu-quick: batch; "
                   "cpc_audio: speaker).")
    p.add_argument("--n-negatives", type=int, help="negatives sampled per query, as CPC_audio "
                   "draws them (a random sequence of the query's group, a random frame of it; "
                   "cpc_audio preset: 128); 0: every frame of the group is a negative (the "
                   "fused loss). Not with --negatives global.")
    p.add_argument("--exclude-near", type=int, help="with sampled negatives: never draw a "
                   "negative from the query's own sequence within this many frames of any "
                   "step's positive (default: no exclusion, as CPC_audio).")
    p.add_argument("--step-reduction", choices=["mean", "sum"], help="how the K per-step "
                   "losses make the loss: 'sum' (CPC_audio) or 'mean' (paper and cpu-quick "
                   "presets).")
    p.add_argument("--lr", type=float, help="Adam learning rate.")
    p.add_argument("--train-split", help="file of utterance ids to train on, one per line (the "
                   "CPC paper's train_split.txt); needs --test-split. Utterances in neither list "
                   "are left out.")
    p.add_argument("--test-split", help="file of held-out utterance ids (the CPC paper's "
                   "test_split.txt): probe test set and validation windows.")
    p.add_argument("--store", help="folder of the int16 audio store every utterance is decoded "
                   "into once (reused by later runs over the same files, refused if it holds "
                   "other files). Default: <out>/audio_store.")
    p.add_argument("--max-audio-memory-mb", type=int, help="audio each process holds in RAM "
                   "(its shard of the training utterances, as int16); a larger shard is read "
                   "from the store window by window instead (CPC_audio's --max_size_loaded); 0: "
                   "always from disk. Default 4000.")
    p.add_argument("--max-probe-memory-mb", type=int, help="probe features held in RAM (the "
                   "kept frames and utterance means of the three feature kinds, float32); more "
                   "are written to files under <out>/probe_features and the probes read them "
                   "back a chunk at a time, so memory while probing stays flat; 0: always on "
                   "disk. Default 2000.")
    p.add_argument("--workers", type=int, help="processes decoding audio into the store; 0: "
                   "in this process; -1 (default): up to 8 when there are more than 256 "
                   "utterances, else 0.")
    p.add_argument("--val-windows", type=int, help="held-out windows scored at every "
                   "checkpoint (loss and accuracy per prediction step, in metrics.jsonl and "
                   "validation.png); 0: off. Default 64.")
    p.add_argument("--export", choices=["cpc_audio"], help="after training, also write "
                   "<out>/cpc_audio.pt in facebookresearch/CPC_audio's checkpoint layout "
                   "(config, weights, criterion with every predictor).")
    p.add_argument("--no-probes", action="store_true", help="train only; skip the probes.")
    p.add_argument("--probe-frames", type=int, help="frame-level (phone) probe: random labelled "
                   "frames kept per utterance, the same for every feature kind; 0: all (the "
                   "cpu-quick preset). The paper and cpc_audio presets keep 50, which bounds the "
                   "probe's memory on large corpora.")
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
        "n_negatives": args.n_negatives, "exclude_near": args.exclude_near,
        "step_reduction": args.step_reduction, "train_split": args.train_split,
        "test_split": args.test_split, "store": args.store,
        "max_audio_memory_mb": args.max_audio_memory_mb, "workers": args.workers,
        "max_probe_memory_mb": args.max_probe_memory_mb,
        "val_windows": args.val_windows, "export": args.export,
        "probe_frames_per_utterance": args.probe_frames,
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
    train_utts, test_utts, split_note = split_utterances(utts, config)
    if not args.no_probes:  # every probe label known before any audio is decoded
        check_probe_labels(config.probe_labels, train_utts, phones_path is not None, source)
    log(f"data: {source}: {len(utts)} utterances, {split_note}, "
        f"{len(set(u.speaker for u in utts))} speakers")

    # every utterance decoded once into the int16 store (rank 0 first; the other ranks then
    # find it on a shared filesystem, or build their own identical copy on a local one)
    store_dir = Path(config.store) if config.store else out / "audio_store"
    all_utts = train_utts + test_utts
    workers = config.workers if config.workers >= 0 else \
        (min(8, os.cpu_count() or 1) if len(all_utts) > 256 else 0)
    if info.is_main:
        bar = log.progress(len(all_utts), "decoding audio into the store", unit="utt")
        report = prepare_store(all_utts, store_dir, workers=workers, strict=config.strict,
                               progress=lambda done, total: bar.update(done - bar.n))
        bar.close()
    D.barrier(info)
    if not info.is_main:
        report = prepare_store(all_utts, store_dir, workers=workers, strict=config.strict)
    position = {utt_id: i for i, utt_id in enumerate(_store_ids(store_dir))}
    train_utts = [u for u in train_utts if u.id in position]
    test_utts = [u for u in test_utts if u.id in position]
    if not train_utts:
        raise ValueError(f"{source}: no readable training audio; expected at least one file")
    data_seconds = time.perf_counter() - t0
    log(f"audio store {store_dir}: {report.n_utterances} utterances, "
        f"{report.total_samples / 16000 / 3600:.2f} h, "
        f"{'reused' if report.reused else f'written in {report.seconds:.1f}s'}"
        + (f", {len(report.skipped)} unreadable files skipped" if report.skipped else "")
        + f" ({data_seconds:.1f}s)")

    # this process trains on its shard (whole speakers per rank), held in RAM up to the cap
    shard = [train_utts[i] for i in
             shard_indices([u.speaker for u in train_utts], info.rank, info.world_size)]
    cap = config.max_audio_memory_mb * 2 ** 20
    shard_positions = [position[u.id] for u in shard]
    train_store = AudioStore(store_dir, indices=shard_positions, max_bytes_in_memory=cap)
    dataset = WindowDataset.from_store(train_store, shard_positions, [u.speaker for u in shard],
                                       config.window)
    sampler = SpeakerBalancedBatchSampler([u.speaker for u in shard], config.batch_size,
                                          config.speakers_per_batch, seed=config.seed,
                                          rank=info.rank)
    log(f"rank {info.rank}: {len(shard)} training utterances, audio "
        + (f"in memory ({train_store.resident_bytes / 2 ** 20:.0f} MB)" if train_store.in_memory
           else f"read from disk window by window (more than --max-audio-memory-mb "
                f"{config.max_audio_memory_mb})"))

    # ---- model
    torch.manual_seed(config.seed)
    model = CPCModel(config.model).to(device)
    initial_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # "global" gathers the keys over every rank (the default group); other modes ignore it
    criterion = make_criterion(config, process_group=torch.distributed.group.WORLD
                               if info.enabled else None)
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

    val = None
    if info.is_main and config.val_windows and test_utts:
        # read once, window by window (cap 0: nothing else of the held-out audio in RAM)
        val_store = AudioStore(store_dir, indices=[position[u.id] for u in test_utts],
                               max_bytes_in_memory=0)
        val = Validation(config, test_utts, val_store, [position[u.id] for u in test_utts], device)
        del val_store

    def save(step: int) -> None:
        if not info.is_main:
            return
        save_checkpoint({
            "step": step,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "initial_model": initial_state,
            # batches are a function of (seed, step, rank): the step is the sampler's state
            # (the prefetcher's own position runs ahead of training)
            "sampler": {"position": step},
            "rng": rng_state(),
        }, out / CHECKPOINT)
        if val is not None and step > start_step:
            record = val.evaluate(model, step)
            metrics.write(record)
            log(f"validation at step {step}: loss {record['val_loss']:.4f}, accuracy per k "
                + " ".join(f"{a:.2f}" for a in record["val_step_accuracy"]))
            model.train()

    # ---- training
    t_train = time.perf_counter()
    model.train()
    bar = log.progress(config.steps, "training", initial=min(start_step, config.steps),
                       every=config.log_every)
    last: dict[str, Any] = {}
    windows_seen = 0
    batches = BatchPrefetcher(dataset, sampler, seed=config.seed, rank=info.rank,
                              depth=config.prefetch) if config.prefetch else None
    stopped_early = False
    step = start_step
    try:
        for step in range(start_step, config.steps):
            if config.train_seconds and D.time_is_up(t_train, config.train_seconds, info, device):
                stopped_early = True
                save(step)
                log(f"training time limit ({config.train_seconds:.0f}s) reached after "
                    f"{step} steps")
                break
            if batches is not None:
                drawn, batch = next(batches)
                assert drawn == step, (drawn, step)
                indices = batch.indices
            else:
                indices = sampler.batch(step)
                batch = dataset.collate(indices, step, seed=config.seed, rank=info.rank)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            done = step + 1
            logging = done % config.log_every == 0 or done == config.steps or done == start_step + 1
            z, c, predictions = train_model(batch.wave.to(device), predict=True)
            out_loss = criterion(predictions, z, batch.lengths.to(device), batch.speakers.to(device),
                                 accuracy=logging,
                                 generator=step_generator(config.seed, step, info.rank, device))
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
    finally:
        if batches is not None:
            batches.close()
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
        "skipped_files": len(report.skipped),
        "skipped": report.skipped,
        "split": split_note,
        "store": {"folder": str(store_dir), "utterances": report.n_utterances,
                  "hours": round(report.total_samples / 16000 / 3600, 3),
                  "audio_in_memory": train_store.in_memory,
                  "resident_audio_mb": round(train_store.resident_bytes / 2 ** 20, 1)},
        "short_utterances_padded": dataset.n_short,
        "train_seconds": round(train_seconds, 1),
        "windows_per_second": round(windows_seen / train_seconds, 2) if train_seconds else None,
        "final_loss": last.get("loss"),
        "final_step_accuracy": last.get("step_accuracy"),
    }
    records = metrics.read() if info.is_main else []
    validation = [r for r in records if "val_loss" in r]
    if validation:
        summary["validation"] = validation[-1]
    results: dict[str, Any] = {}
    if info.is_main:
        if config.export == "cpc_audio":
            path = export_cpc_audio(
                model, out / "cpc_audio.pt", window=config.window, negatives=config.negatives,
                n_negatives=config.n_negatives, lr=config.lr, warmup_steps=config.warmup_steps,
                steps=summary["steps_done"], batch_size=config.batch_size,
                similarity=config.similarity, step_reduction=config.step_reduction,
                training_config=config.to_dict(), seed=config.seed, world_size=info.world_size)
            summary["export"] = str(path)
            log(f"exported the model in CPC_audio's checkpoint layout: {path}")
        if not args.no_probes:
            t_probe = time.perf_counter()
            del dataset, train_store  # the probe store below holds what it needs
            random_model = CPCModel(config.model)
            random_model.load_state_dict(initial_state)
            # each utterance is read once: straight from disk, nothing held
            probe_store = AudioStore(store_dir, max_bytes_in_memory=0)
            alignments = _probe_alignments(phones_path, [u.id for u in train_utts + test_utts])
            results, skipped_probes = run_probes(
                cpc_model=model.eval(), random_model=random_model,
                train=_probe_split(train_utts, probe_store, position),
                test=_probe_split(test_utts, probe_store, position), alignments=alignments,
                probe_labels=config.probe_labels, probe_config=ProbeConfig(**asdict(config.probe)),
                frames_per_utterance=config.probe_frames_per_utterance,
                max_seconds=config.probe_max_seconds, seed=config.seed, device=device, log=log,
                work_dir=out / "probe_features",
                max_feature_bytes=config.max_probe_memory_mb * 2 ** 20,
                # on a CPU one long padded batch costs more than it saves (measured: 20 s of
                # audio per batch was no slower than one utterance at a time, 160 s was 1.6x)
                batch_seconds=160.0 if device.type == "cuda" else 20.0)
            summary["skipped_probes"] = skipped_probes
            summary["probe_seconds"] = round(time.perf_counter() - t_probe, 1)
            (out / "probes.json").write_text(json.dumps(
                {**results, "skipped": skipped_probes}, indent=2) + "\n")
            accuracies = {kind: {label: r["accuracy"] for label, r in results[kind].items()}
                          for kind in results}
            if any(accuracies.values()):
                plot_probes(accuracies, out / "probes.png")
        plot_training(records, out / "training.png")
        if validation:
            plot_step_curves(validation, ["val_step_loss", "val_step_accuracy"],
                             out / "validation.png", title="held-out windows at each checkpoint")
        summary["total_seconds"] = round(time.perf_counter() - started, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_report(summary, results)
    return {"summary": summary, "probes": results, "out": str(out), "model": model}


def _store_ids(folder: Path) -> list[str]:
    """The ids of the utterances a prepared store holds, in store order (``store.json``)."""
    return json.loads((Path(folder) / "store.json").read_text())["ids"]


def _probe_split(utts: Sequence, store: AudioStore, position: dict[str, int]) -> ProbeSplit:
    pos = [position[u.id] for u in utts]
    return ProbeSplit(utterances=list(utts), read=lambda i: store.read(pos[i]),
                      lengths=[int(store.lengths[p]) for p in pos])


def _probe_alignments(path: str | Path | None, ids: Sequence[str]) -> dict | None:
    """The phone labels of the probe utterances only, as int16 (2 bytes a frame: about 72 MB
    for train-clean-100 instead of 290 MB as int64); int64 when a label does not fit."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return read_alignments(path, dtype=torch.int16, ids=ids)
    except LabelRangeError:
        return read_alignments(path, dtype=torch.int64, ids=ids)


def split_utterances(utts: Sequence, config: CPCSpeechConfig) -> tuple[list, list, str]:
    """(train, held out, a line saying how): the split files when given (``--train-split`` /
    ``--test-split``: the CPC paper's lists of utterance ids), else the manifest's ``split``
    column where it has one, else a deterministic 80/20 split by a hash of the id
    (:func:`modalities.audio.holdout_split`).

    With split files, utterances listed in neither are left out and counted; an id listed in
    both files, or files that match no utterance, raise ``ValueError`` naming the file."""
    from modalities.audio import holdout_split, read_id_list

    if config.train_split is None:
        train, test = holdout_split(utts, test_fraction=0.2, seed=config.seed)
        return train, test, f"{len(train)} train / {len(test)} held out"
    train_ids = set(read_id_list(config.train_split))
    test_ids = set(read_id_list(config.test_split))
    both = sorted(train_ids & test_ids)
    if both:
        raise ValueError(f"train_split={config.train_split!r} and test_split={config.test_split!r}: "
                         f"{len(both)} ids are in both (e.g. {both[:3]}); expected disjoint lists")
    train = [u for u in utts if u.id in train_ids]
    test = [u for u in utts if u.id in test_ids]
    for name, path, chosen, ids in (("train_split", config.train_split, train, train_ids),
                                    ("test_split", config.test_split, test, test_ids)):
        if not chosen:
            example = sorted(ids)[:3]
            raise ValueError(f"{name}={path!r}: none of its {len(ids)} ids (e.g. {example}) is an "
                             f"utterance of the data (ids like {[u.id for u in utts[:3]]}); "
                             "expected ids of these utterances")
    known = {u.id for u in utts}
    missing = len((train_ids | test_ids) - known)
    left = len(utts) - len(train) - len(test)
    note = f"{len(train)} train / {len(test)} held out by the split files"
    if missing:
        note += f" ({missing} listed ids not in the data)"
    if left:
        note += f" ({left} utterances in neither list left out)"
    return train, test, note


def make_criterion(config: CPCSpeechConfig, process_group: object | None = None,
                   accuracy_rows: int = 256, negatives: str | None = None) -> CPCCriterion:
    """The training objective of ``config`` ("global" negatives gather over ``process_group``;
    ``negatives`` overrides the config's mode)."""
    return CPCCriterion(negatives or config.negatives, config.temperature,
                        accuracy_rows=accuracy_rows,
                        similarity=config.similarity, process_group=process_group,
                        n_negatives=config.n_negatives, exclude_near=config.exclude_near,
                        step_reduction=config.step_reduction)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of step ``step``'s sampled negatives on ``rank``: a function of the three
    numbers, so a resumed run draws what an uninterrupted one draws."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(_generator(seed, step, rank, 3).initial_seed()))
    return gen


class Validation:
    """Held-out windows scored at every checkpoint: the loss and the accuracy of each
    prediction step k on ``windows`` fixed windows of the held-out utterances (cut once, with a
    fixed seed, sorted by speaker so "speaker" negatives have company), with fixed negative
    draws, on rank 0 only (negatives "global" are scored as "batch")."""

    def __init__(self, config: CPCSpeechConfig, utts: Sequence, store: AudioStore,
                 positions: Sequence[int], device: torch.device) -> None:
        order = sorted(range(len(utts)), key=lambda i: (str(utts[i].speaker), utts[i].id))
        dataset = WindowDataset.from_store(store, list(positions), [u.speaker for u in utts],
                                           config.window)
        picks = [order[i % len(order)] for i in range(config.val_windows)]
        self.batches = [dataset.collate(picks[i:i + config.batch_size], step=0,
                                        seed=config.seed + 7919)
                        for i in range(0, len(picks), config.batch_size)]
        negatives = "batch" if config.negatives == "global" else config.negatives
        self.criterion = make_criterion(config, accuracy_rows=10 ** 9, negatives=negatives)
        self.seed, self.device = config.seed, device

    @torch.no_grad()
    def evaluate(self, model: CPCModel, step: int) -> dict[str, Any]:
        model.eval()
        gen = step_generator(self.seed, -1, 0, self.device)
        loss_sum = acc_sum = None
        queries = None
        for batch in self.batches:
            z, c, predictions = model(batch.wave.to(self.device), predict=True)
            out = self.criterion(predictions, z, batch.lengths.to(self.device),
                                 batch.speakers.to(self.device), generator=gen)
            n = out.step_queries.double()
            loss_k = out.step_loss.double().cpu() * n
            acc_k = torch.nan_to_num(out.step_accuracy.double().cpu()) * n
            loss_sum = loss_k if loss_sum is None else loss_sum + loss_k
            acc_sum = acc_k if acc_sum is None else acc_sum + acc_k
            queries = n if queries is None else queries + n
        step_loss = (loss_sum / queries.clamp(min=1)).tolist()
        reduce = sum if self.criterion.step_reduction == "sum" else (lambda v: sum(v) / len(v))
        return {"step": step, "val_loss": round(float(reduce(step_loss)), 6),
                "val_step_loss": [round(x, 6) for x in step_loss],
                "val_step_accuracy": [round(x, 4) for x in (acc_sum / queries.clamp(min=1)).tolist()],
                "val_windows": sum(len(b.indices) for b in self.batches)}


def print_report(summary: dict[str, Any], results: dict[str, dict[str, dict]]) -> None:
    print()
    print(f"training: {summary['steps_done']} steps in {summary['train_seconds']}s "
          f"({summary['windows_per_second']} windows/s), final loss {summary['final_loss']}")
    acc = summary.get("final_step_accuracy")
    if acc:
        print("prediction accuracy per step k: " + " ".join(f"{a:.2f}" for a in acc))
    val = summary.get("validation")
    if val:
        print(f"held-out windows at step {val['step']}: loss {val['val_loss']:.4f}, accuracy "
              "per step k: " + " ".join(f"{a:.2f}" for a in val["val_step_accuracy"]))
    for label, reason in (summary.get("skipped_probes") or {}).items():
        print(f"probe {label!r} skipped: {reason}")
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
