"""Throughput and memory of one training step of the CLIP dual encoder (CLIP or SigLIP loss),
with and without gradient caching, and issue 8's scale target.

    python -m recipes.bench_clip              # 3 tower pairs x 32, 128 pairs x chunks off, 32
                                              #   x clip, siglip
    python -m recipes.bench_clip --quick      # small_cnn+bert-tiny only, a few minutes
    python -m recipes.bench_clip --scale      # issue 8: 32768 pairs in 6 GB, beside the
                                              #   largest OpenCLIP-style batch in 6 GB
    python -m recipes.bench_clip --towers resnet18+bert-mini --batch-sizes 128,512 \\
        --chunk-size 0,128 --losses clip

Inputs are synthetic: random uint8 images (``--image-size``, 32 px) and random token ids
(``--text-length``, 32 tokens: [CLS], random ids of a ``--vocab-size`` vocabulary, [SEP], no
padding), so nothing is read from disk. A tower pair is ``IMAGE+TEXT``: an image tower of
:func:`modalities.multimodal.build_image_tower` and a text size of
:data:`modalities.text.TEXT_SIZES` (BERT built from a config; "pooler" pooling), joined by
:class:`modalities.multimodal.DualEncoder` with ``--projection-dim`` outputs.

Sweep (the default): for every (tower pair, batch, chunk, loss) a fresh child process builds the
dual encoder and an AdamW optimizer and times the full training step (:func:`clip_train_step`,
the step issue 8's spec gives ``recipes.clip_pairs``): both towers embedded (in chunks of
``--chunk-size`` pairs through :func:`recipes.common.grad_cache.grad_cache_step`, or in one pass
with 0; the uint8 images normalised inside the image tower's forward, one chunk at a time), the
loss (``DualEncoder.loss``: the fused ``csrc_triton.clip_loss`` or ``csrc_triton.siglip``) and
its backward, ``optimizer.step()`` and the logit-scale clamp.
Reported per row:

- median and min seconds per step; ``pairs_per_second`` = batch / median;
- ``loss_share``: the loss's forward + backward timed alone on the step's own embeddings (made
  leaves), over the step time;
- peak memory: on CPU the child's peak resident set size (VmHWM right after the timed steps: the
  Python/torch/transformers runtime, the model, AdamW's state, the inputs and the step);
  ``child_maxrss_bytes`` is the kernel's ``ru_maxrss`` of the child from ``wait4`` (it can also
  count the parent's pages at the child's start, so it is informational); on CUDA
  ``torch.cuda.max_memory_allocated``.

``--losses`` also accepts ``openclip``: the plain OpenCLIP-style loss on dense logits
(:func:`openclip_dense_loss`), the baseline of ``--scale``.

``--scale`` (issue 8's target): one step at a global batch of 32768 pairs (small_cnn+bert-tiny,
32 px, 32 tokens) with gradient caching (chunks of ``--chunk-size`` pairs, default 1024) and the
fused CLIP loss, its peak RSS set against ``--target-gb`` (6) and its time; then, in the same
run, the largest batch that the plain OpenCLIP-style step (dense logits
``logit_scale * img @ txt.T``, ``(CE(rows) + CE(cols)) / 2`` with ``F.cross_entropy``, full
activations, no caching) fits under the same cap: doubling from ``--search-start`` pairs, then
``--search-steps`` bisection steps between the largest batch that fitted and the smallest that
did not (:func:`largest_fitting`). Every try runs in a child killed once its RSS passes the cap;
a try whose own VmHWM ends above the cap (a spike between two polls) does not fit either.

Outputs in ``--out`` (default ``runs/bench_clip``): ``clip_<tag>.json`` and ``clip_<tag>.md``
(sweep), ``clip_scale_<tag>.json`` and ``clip_scale_<tag>.md`` (``--scale``): configuration,
environment (device, versions, threads, date, commit, the load average at start and end), the
exact command, one row per measurement, the table. The tag is the device (cpu, cuda), followed by
``_t<N>`` for ``--threads N``.

The CPU cores may be shared: ``cpu_per_wall`` well below the thread count, or a load average
above the core count, flags rows whose times depend on the neighbours; ``--threads 1`` gives
numbers that depend less on them.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from recipes.bench.flags import RaisingParser, int_list, positive, resolve_device
from recipes.bench.harness import (RESULT_MARK, mem_available_bytes, proc_status_kb, quantiles,
                                   run_reported)
from recipes.bench.report import device_name, fmt_bytes, git_commit
from recipes.common.logging import format_table

PROG = "python -m recipes.bench_clip"
#: image towers and text sizes of the interface spec (the real lists, when the modules import,
#: are checked too: see :func:`_tower_names`)
IMAGE_TOWER_NAMES = ("small_cnn", "resnet18", "resnet50", "vit-tiny", "vit-small")
TEXT_TOWER_NAMES = ("bert-tiny", "bert-mini", "bert-small")
DEFAULT_TOWERS = ("small_cnn+bert-tiny", "vit-tiny+bert-tiny", "resnet18+bert-mini")
DEFAULT_BATCH_SIZES = (32, 128)
DEFAULT_CHUNK_SIZES = (0, 32)
#: "clip" and "siglip": DualEncoder.loss (the fused ops); "openclip": dense logits + CE
LOSSES = ("clip", "siglip", "openclip")
DEFAULT_LOSSES = ("clip", "siglip")
#: --quick: a sweep of the small pair only
QUICK = {"towers": ("small_cnn+bert-tiny",), "batch_sizes": (16, 64), "chunk_sizes": (0, 16),
         "losses": ("clip", "siglip"), "repeats": 2, "warmup": 1}
#: --scale: issue 8's target (32768 pairs, small towers, 32 px, 32 tokens, 6 GB)
SCALE = {"towers": ("small_cnn+bert-tiny",), "batch_sizes": (32768,), "chunk_sizes": (1024,),
         "losses": ("clip",), "repeats": 1, "warmup": 0}
#: special token ids of modalities.text.train_wordpiece: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3,
#: [MASK] 4; the random ids are drawn above them
CLS_ID, SEP_ID, FIRST_WORD_ID = 2, 3, 5
#: the loss alone is timed at least this many times (median reported)
LOSS_REPEATS_MIN = 3
#: bisection batches are multiples of this many pairs
SEARCH_GRANULARITY = 16

#: the columns of every row (JSON), in this order
ROW_FIELDS = [
    "mode", "towers", "image_tower", "text_tower", "loss", "image_size", "text_length",
    "projection_dim", "batch", "chunk", "status", "message",
    "seconds_per_step_median", "seconds_per_step_min", "pairs_per_second",
    "loss_seconds_median", "loss_share",
    "peak_mem_bytes", "peak_mem_kind", "child_maxrss_bytes", "max_polled_rss_bytes",
    "rss_ready_bytes", "parameters", "repeats", "warmup", "cpu_per_wall", "wall_s",
    "device", "device_name", "torch", "threads", "date", "git_commit",
]


# --------------------------------------------------------------------------------------------
# Configuration and validation
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BenchClipConfig:
    """Everything one benchmark run depends on (printed at start, saved in the JSON).

    ``towers`` are ``"IMAGE+TEXT"`` pairs; ``batch_sizes`` and ``chunk_sizes`` count pairs
    (chunk 0: the plain one-shot step)."""

    towers: tuple[str, ...] = DEFAULT_TOWERS
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    chunk_sizes: tuple[int, ...] = DEFAULT_CHUNK_SIZES
    losses: tuple[str, ...] = DEFAULT_LOSSES
    image_size: int = 32
    text_length: int = 32
    vocab_size: int = 4000
    projection_dim: int = 128
    repeats: int = 2
    warmup: int = 1
    device: str = "cpu"
    threads: int = 0
    seed: int = 0
    out: str = "runs/bench_clip"
    mem_budget_gb: float = 14.0
    time_budget_s: float = 1800.0
    scale: bool = False
    target_gb: float = 6.0
    search_start: int = 512
    search_steps: int = 3

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")


def build_parser() -> argparse.ArgumentParser:
    p = RaisingParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog="Sweep defaults: --towers " + ",".join(DEFAULT_TOWERS) + " --batch-sizes "
        "32,128 --chunk-size 0,32 --losses clip,siglip --repeats 2 --warmup 1. --quick: "
        "small_cnn+bert-tiny, 16,64, 0,16. --scale: small_cnn+bert-tiny, 32768 pairs, "
        "chunk 1024, clip, 1 step, against --target-gb 6.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--towers", help="comma-separated IMAGE+TEXT tower pairs, IMAGE among "
                   f"{', '.join(IMAGE_TOWER_NAMES)} and TEXT among {', '.join(TEXT_TOWER_NAMES)}")
    p.add_argument("--batch-sizes", help="comma-separated global batch sizes in pairs")
    p.add_argument("--chunk-size", help="comma-separated gradient-cache chunk sizes in pairs; "
                   "0 = no caching")
    p.add_argument("--losses", help=f"comma-separated losses among {', '.join(LOSSES)} "
                   "(openclip: dense logits + F.cross_entropy; default clip,siglip)")
    p.add_argument("--image-size", type=int, default=32, help="side of the images in pixels "
                   "(default 32)")
    p.add_argument("--text-length", type=int, default=32, help="tokens per caption, [CLS] and "
                   "[SEP] included (default 32)")
    p.add_argument("--vocab-size", type=int, default=4000, help="vocabulary of the text tower "
                   "(default 4000, the recipe's WordPiece size)")
    p.add_argument("--projection-dim", type=int, default=128, help="shared embedding dimension "
                   "(default 128)")
    p.add_argument("--repeats", type=int, help="timed steps per row (median reported)")
    p.add_argument("--warmup", type=int, help="untimed steps first")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child "
                   "(0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    p.add_argument("--out", default="runs/bench_clip", help="folder of the clip_* files "
                   "(default runs/bench_clip)")
    p.add_argument("--mem-budget-gb", type=float, default=None, help="a child is killed once its "
                   "RSS passes this (default: 60%% of MemAvailable at start; --scale's dense "
                   "search uses --target-gb instead)")
    p.add_argument("--time-budget-s", type=float, default=None, help="a child is killed after "
                   "this many seconds (default 1800; --scale: 7200)")
    p.add_argument("--quick", action="store_true", help="a small sweep (small_cnn+bert-tiny; "
                   "batches 16,64; chunks 0,16; clip, siglip)")
    p.add_argument("--scale", action="store_true", help="issue 8's target: one cached step at "
                   "32768 pairs with the fused loss against --target-gb, beside the largest "
                   "OpenCLIP-style batch within the same cap")
    p.add_argument("--target-gb", type=float, default=6.0, help="--scale: the peak-RSS target "
                   "and the cap of the dense search (default 6)")
    p.add_argument("--search-start", type=int, default=512, help="--scale: first batch of the "
                   "dense search, doubled while it fits (default 512)")
    p.add_argument("--search-steps", type=int, default=3, help="--scale: bisection steps after "
                   "the doubling (default 3)")
    return p


def _name_list(flag: str, text: str, allowed: Sequence[str]) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(","))
    for name in names:
        if name not in allowed:
            raise ValueError(f"{flag} {text!r}: {name!r} is not one of {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{flag} {text!r}: a value is repeated")
    return names


def _tower_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The image towers and text sizes the modules know (the spec's lists while they are not
    importable)."""
    try:
        from modalities.multimodal.towers import IMAGE_TOWERS
        images = tuple(IMAGE_TOWERS)
    except ImportError:
        images = IMAGE_TOWER_NAMES
    try:
        from modalities.text.tower import TEXT_SIZES
        texts = tuple(TEXT_SIZES)
    except ImportError:
        texts = TEXT_TOWER_NAMES
    return images, texts


def parse_towers(text: str) -> tuple[str, ...]:
    """``"small_cnn+bert-tiny,resnet18+bert-mini"`` -> the pairs, each checked (ValueError
    naming ``--towers``)."""
    images, texts = _tower_names()
    pairs = tuple(s.strip() for s in text.split(","))
    for pair in pairs:
        parts = pair.split("+")
        if len(parts) != 2:
            raise ValueError(f"--towers {text!r}: {pair!r} is not IMAGE+TEXT, e.g. "
                             "small_cnn+bert-tiny")
        if parts[0] not in images:
            raise ValueError(f"--towers {text!r}: image tower {parts[0]!r} is not one of "
                             f"{', '.join(images)}")
        if parts[1] not in texts:
            raise ValueError(f"--towers {text!r}: text tower {parts[1]!r} is not one of "
                             f"{', '.join(texts)}")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"--towers {text!r}: a pair is repeated")
    return pairs


def config_from_args(argv: Sequence[str] | None) -> BenchClipConfig:
    """Parse and check every flag before any work; ValueError names the flag and the value."""
    args = build_parser().parse_args(argv)
    if args.quick and args.scale:
        raise ValueError("--quick and --scale: expected one of them, not both")
    base = SCALE if args.scale else QUICK if args.quick else {}

    towers = (parse_towers(args.towers) if args.towers is not None
              else base.get("towers", DEFAULT_TOWERS))
    batches = (int_list("--batch-sizes", args.batch_sizes, minimum=2)
               if args.batch_sizes is not None else base.get("batch_sizes", DEFAULT_BATCH_SIZES))
    chunks = (int_list("--chunk-size", args.chunk_size, minimum=0)
              if args.chunk_size is not None else base.get("chunk_sizes", DEFAULT_CHUNK_SIZES))
    losses = (_name_list("--losses", args.losses, LOSSES) if args.losses is not None
              else base.get("losses", DEFAULT_LOSSES))
    if not 16 <= args.image_size <= 512:
        raise ValueError(f"--image-size {args.image_size}: expected 16 to 512 pixels")
    if not 3 <= args.text_length <= 512:
        raise ValueError(f"--text-length {args.text_length}: expected 3 to 512 tokens ([CLS], "
                         "at least one word, [SEP]; BERT's position limit is 512)")
    if args.vocab_size < 16:
        raise ValueError(f"--vocab-size {args.vocab_size}: expected at least 16 (5 special "
                         "tokens and words)")
    if args.projection_dim < 1:
        raise ValueError(f"--projection-dim {args.projection_dim}: expected a positive integer")
    repeats = base.get("repeats", 2) if args.repeats is None else args.repeats
    warmup = base.get("warmup", 1) if args.warmup is None else args.warmup
    if repeats < 1:
        raise ValueError(f"--repeats {repeats}: expected a positive integer")
    if warmup < 0:
        raise ValueError(f"--warmup {warmup}: expected a non-negative integer")
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: expected a non-negative integer "
                         "(0: torch's default)")
    positive("--mem-budget-gb", args.mem_budget_gb)
    positive("--time-budget-s", args.time_budget_s)
    positive("--target-gb", args.target_gb)
    if args.search_start < 2:
        raise ValueError(f"--search-start {args.search_start}: expected an integer >= 2")
    if args.search_steps < 0:
        raise ValueError(f"--search-steps {args.search_steps}: expected a non-negative integer")

    largest = max(batches)
    if args.chunk_size is None:  # a default chunk that splits no batch given is dropped
        chunks = tuple(c for c in chunks if c < largest) or (0,)
    for c in chunks:
        if c == 1:
            raise ValueError(f"--chunk-size {c}: a chunk of 1 pair cannot be normalised by "
                             "BatchNorm in training mode; expected 0 or at least 2")
        if c and c >= largest:
            raise ValueError(f"--chunk-size {c}: not smaller than the largest batch "
                             f"({largest} pairs); such a chunk does not split any batch (it "
                             "would time the one-shot step again)")
        for b in batches:
            if c and c < b and b % c == 1:
                raise ValueError(f"--chunk-size {c}: batch {b} would leave a last chunk of 1 "
                                 "pair, which BatchNorm cannot normalise in training mode; "
                                 "expected a chunk size leaving at least 2 pairs per chunk")
    if args.scale:
        if len(towers) != 1 or len(batches) != 1 or len(chunks) != 1 or chunks[0] == 0 \
                or len(losses) != 1 or losses[0] == "openclip":
            raise ValueError(
                "--scale: expected one tower pair, one batch size, one positive chunk size and "
                f"one fused loss (clip or siglip), got --towers {','.join(towers)} --batch-sizes "
                f"{','.join(map(str, batches))} --chunk-size {','.join(map(str, chunks))} "
                f"--losses {','.join(losses)}")

    device = resolve_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r}: exists and is not a folder")
    mem_budget = args.mem_budget_gb
    if mem_budget is None:
        available = mem_available_bytes()
        mem_budget = round(0.6 * available / 1e9, 1) if available else 14.0
    time_budget = args.time_budget_s or (7200.0 if args.scale else 1800.0)
    return BenchClipConfig(
        towers=tuple(towers), batch_sizes=tuple(batches), chunk_sizes=tuple(chunks),
        losses=tuple(losses), image_size=args.image_size, text_length=args.text_length,
        vocab_size=args.vocab_size, projection_dim=args.projection_dim, repeats=repeats,
        warmup=warmup, device=device, threads=args.threads, seed=args.seed, out=str(out),
        mem_budget_gb=mem_budget, time_budget_s=time_budget, scale=args.scale,
        target_gb=args.target_gb, search_start=args.search_start,
        search_steps=args.search_steps)


# --------------------------------------------------------------------------------------------
# The measured step (shared with the child processes)
# --------------------------------------------------------------------------------------------


def synthetic_pairs(n: int, *, image_size: int, text_length: int, vocab_size: int,
                    seed: int = 0, device: str | torch.device = "cpu"
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` random pairs: uint8 images (n, 3, S, S), token ids (n, L) int64 = [CLS], L - 2
    ids uniform in [5, vocab_size), [SEP], and an all-ones attention mask (n, L) int64 (every
    caption is full length: the towers' cost does not depend on the padding anyway).

    Example:
        >>> images, ids, mask = synthetic_pairs(8, image_size=32, text_length=32, vocab_size=4000)
    """
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), generator=gen,
                           dtype=torch.uint8)
    ids = torch.randint(FIRST_WORD_ID, vocab_size, (n, text_length), generator=gen)
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    mask = torch.ones(n, text_length, dtype=torch.int64)
    return images.to(device), ids.to(device), mask.to(device)


def build_bench_model(towers: str, *, image_size: int, text_length: int, vocab_size: int,
                      projection_dim: int = 128, loss: str = "clip", seed: int = 0
                      ) -> torch.nn.Module:
    """The recipe's dual encoder for ``towers`` = ``"IMAGE+TEXT"``: an image tower
    (:func:`modalities.multimodal.build_image_tower`), a BERT text tower built from its config
    (:func:`modalities.text.build_text_model`, "pooler" pooling, no dropout), and
    :class:`modalities.multimodal.DualEncoder` (the SigLIP parameters for ``loss="siglip"``);
    weights seeded by ``seed``."""
    from modalities.multimodal.model import DualEncoder
    from modalities.multimodal.towers import build_image_tower
    from modalities.text.tower import TextTower, build_text_model

    image_name, text_name = towers.split("+")
    torch.manual_seed(seed)
    image_tower = build_image_tower(image_name, image_size=image_size)
    text_model = build_text_model(text_name, vocab_size=vocab_size, max_length=text_length)
    text_tower = TextTower(text_model, pooling="pooler")
    return DualEncoder(image_tower, text_tower, projection_dim=projection_dim,
                       loss="siglip" if loss == "siglip" else "clip")


def openclip_dense_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """The plain CLIP loss as OpenCLIP's ``ClipLoss`` computes it on one process: the dense
    logits S = logit_scale * image_emb @ text_emb^T (N x N, kept for the backward), then
    ``(F.cross_entropy(S, arange(N)) + F.cross_entropy(S^T, arange(N))) / 2``. The baseline
    whose N x N memory the fused ``csrc_triton.clip_loss`` removes.

    Example:
        >>> img = F.normalize(torch.randn(8, 16), dim=1)
        >>> txt = F.normalize(torch.randn(8, 16), dim=1)
        >>> loss = openclip_dense_loss(img, txt, torch.tensor(14.3))
    """
    logits = logit_scale * image_emb @ text_emb.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _loss_of(model: torch.nn.Module, loss: str) -> Callable[[Tensor, Tensor], Tensor]:
    if loss == "openclip":
        return lambda img, txt: openclip_dense_loss(img, txt, model.scale())
    return lambda img, txt: model.loss(img, txt)


def clip_train_step(model: torch.nn.Module, images: Tensor, input_ids: Tensor,
                    attention_mask: Tensor, optimizer: torch.optim.Optimizer, *,
                    chunk_size: int | None, normalize: Callable[[Tensor], Tensor],
                    loss: str = "clip") -> tuple[Tensor, Tensor, Tensor]:
    """One training step of the dual encoder: :func:`recipes.clip_pairs.train_step` (both
    towers through gradient caching, the loss on the embeddings), the optimizer step, the
    gradients cleared and ``model.clamp_logit_scale_()``, as the recipe runs them.

    ``images`` uint8 (N, 3, S, S) are normalised (``normalize``) chunk by chunk inside the image
    tower's forward (the recipe does the same), so the float images exist for one chunk at a
    time. ``loss``: "clip"/"siglip" use ``model.loss`` (the fused op of the model's loss);
    "openclip" uses :func:`openclip_dense_loss` on ``model.scale()``.

    Returns ``(loss detached, image embeddings (N, P), text embeddings (N, P))``, detached: the
    embeddings the loss saw, so that its cost can be timed on them alone.
    """
    from recipes.clip_pairs import train_step

    value, img, txt = train_step(model, images, input_ids, attention_mask, chunk_size,
                                 image_transform=normalize, loss=_loss_of(model, loss))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.clamp_logit_scale_()
    return value, img, txt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_step(spec: dict) -> dict:
    """Child: time ``warmup + repeats`` steps, read the peak memory, then (``time_loss``) the
    loss alone on the last step's embeddings."""
    from modalities.image.transforms import eval_transform

    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build_bench_model(spec["towers"], image_size=spec["image_size"],
                              text_length=spec["text_length"], vocab_size=spec["vocab_size"],
                              projection_dim=spec["projection_dim"], loss=spec["loss"],
                              seed=spec["seed"]).to(device)
    model.train()
    # AdamW as CLIP trains (its state: two moments per parameter)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  weight_decay=0.1)
    images, ids, mask = synthetic_pairs(spec["batch"], image_size=spec["image_size"],
                                        text_length=spec["text_length"],
                                        vocab_size=spec["vocab_size"], seed=spec["seed"] + 1,
                                        device=device)
    normalize = eval_transform(spec["image_size"])
    chunk = spec["chunk"] or None
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()),
                           "rss_ready_bytes": (proc_status_kb("VmRSS") or 0) * 1024}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []
    last = None
    for i in range(spec["warmup"] + spec["repeats"]):
        _sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        last = clip_train_step(model, images, ids, mask, optimizer, chunk_size=chunk,
                               normalize=normalize, loss=spec["loss"])
        _sync(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_mem_kind"] = "cuda_max_memory_allocated"
    else:
        # VmHWM: the process's peak RSS so far (runtime + model + AdamW + inputs + the steps)
        out["peak_mem_bytes"] = (proc_status_kb("VmHWM") or 0) * 1024
        out["peak_mem_kind"] = "rss"
    value, image_emb, text_emb = last
    if not math.isfinite(float(value)):
        raise FloatingPointError(f"loss={float(value)} after {len(times) + spec['warmup']} steps")

    loss_times: list[float] = []
    if spec.get("time_loss", True):
        # the loss alone, forward + backward, on the embeddings the last step fed it
        loss_fn = _loss_of(model, spec["loss"])
        img = image_emb.detach().requires_grad_(True)
        txt = text_emb.detach().requires_grad_(True)
        budget = max(statistics.median(times), 1.0)
        started = time.perf_counter()
        while len(loss_times) < max(spec["repeats"], LOSS_REPEATS_MIN):
            img.grad = txt.grad = None
            model.zero_grad(set_to_none=True)
            _sync(device)
            t0 = time.perf_counter()
            loss_fn(img, txt).backward()
            _sync(device)
            loss_times.append(time.perf_counter() - t0)
            if time.perf_counter() - started > budget:  # a loss slower than the step: enough
                break
    q = quantiles(times)
    out.update({
        "seconds_per_step_median": q["median_s"], "seconds_per_step_min": q["min_s"],
        "times_s": times,
        "loss_seconds_median": statistics.median(loss_times) if loss_times else None,
        # CPU seconds per wall second while timing: about the thread count when the process had
        # the cores to itself, less when other processes competed for them
        "cpu_per_wall": sum(cpu_times) / sum(times) if device.type == "cpu" else None,
        "threads": torch.get_num_threads(), "final_loss": float(value),
    })
    return out


def worker() -> None:
    """Entry point of a child: read the spec from argv, print one result line."""
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        result = _measure_step(spec)
        result["status"] = "ok"
    except MemoryError as exc:
        result = {"status": "oom", "message": f"MemoryError: {exc}"}
    except (RuntimeError, FloatingPointError, ValueError, TypeError, ImportError) as exc:
        text = str(exc)
        first = text.splitlines()[0] if text else type(exc).__name__
        oom = "out of memory" in text.lower() or "can't allocate" in text.lower()
        result = {"status": "oom" if oom else "error", "message": f"{type(exc).__name__}: {first}"}
    print(RESULT_MARK + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# Parent: children watched for memory and time
# --------------------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, flush=True)


def run_measurement(spec: dict, kill_rss_bytes: float, time_budget_s: float, *,
                    report_every_s: float | None = None) -> dict:
    """One measurement in a child process running this module's :func:`worker`, watched for
    memory and time (:func:`recipes.bench.harness.run_reported`)."""
    return run_reported(spec, kill_rss_bytes, time_budget_s, worker_module="recipes.bench_clip",
                        report_every_s=report_every_s)


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment(cfg: BenchClipConfig) -> dict[str, Any]:
    """The tags of every row: device, versions, threads, date, commit, load."""
    try:
        import transformers
        hf = transformers.__version__
    except ImportError:
        hf = "not installed"
    return {
        "device": cfg.device, "device_name": device_name(cfg.device),
        "torch": torch.__version__, "transformers": hf, "python": platform.python_version(),
        "threads": cfg.threads or torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "cpu_count": os.cpu_count(),
        "load_average_at_start": _load(),
    }


def _step_spec(cfg: BenchClipConfig, towers: str, batch: int, chunk: int, loss: str, *,
               repeats: int | None = None, warmup: int | None = None,
               time_loss: bool = True) -> dict:
    return {"kind": "step", "towers": towers, "loss": loss, "image_size": cfg.image_size,
            "text_length": cfg.text_length, "vocab_size": cfg.vocab_size,
            "projection_dim": cfg.projection_dim, "batch": batch, "chunk": chunk,
            "repeats": cfg.repeats if repeats is None else repeats,
            "warmup": cfg.warmup if warmup is None else warmup, "device": cfg.device,
            "threads": cfg.threads, "seed": cfg.seed, "time_loss": time_loss}


def _row(cfg: BenchClipConfig, env: dict, spec: dict, result: dict, mode: str) -> dict:
    """One table/JSON row in the :data:`ROW_FIELDS` columns."""
    ok = result.get("status") == "ok"
    median = result.get("seconds_per_step_median") if ok else None
    loss_s = result.get("loss_seconds_median") if ok else None
    image_tower, text_tower = spec["towers"].split("+")
    row = {
        "mode": mode, "towers": spec["towers"], "image_tower": image_tower,
        "text_tower": text_tower, "loss": spec["loss"], "image_size": spec["image_size"],
        "text_length": spec["text_length"], "projection_dim": spec["projection_dim"],
        "batch": spec["batch"], "chunk": spec["chunk"], "status": result.get("status", "error"),
        "message": result.get("message", ""),
        "seconds_per_step_median": median,
        "seconds_per_step_min": result.get("seconds_per_step_min") if ok else None,
        "pairs_per_second": spec["batch"] / median if median else None,
        "loss_seconds_median": loss_s,
        "loss_share": loss_s / median if (loss_s is not None and median) else None,
        # a killed child has no measured peak: only its status
        "peak_mem_bytes": result.get("peak_mem_bytes") if ok else None,
        "peak_mem_kind": result.get("peak_mem_kind", "cuda_max_memory_allocated"
                                    if cfg.on_cuda else "rss"),
        "child_maxrss_bytes": result.get("child_maxrss_bytes"),
        "max_polled_rss_bytes": result.get("max_polled_rss_bytes"),
        "rss_ready_bytes": result.get("rss_ready_bytes"),
        "parameters": result.get("parameters"),
        "repeats": spec["repeats"], "warmup": spec["warmup"],
        "cpu_per_wall": result.get("cpu_per_wall"), "wall_s": result.get("wall_s"),
        "device": env["device"], "device_name": env["device_name"], "torch": env["torch"],
        "threads": result.get("threads", env["threads"]), "date": env["date"],
        "git_commit": env["git_commit"],
    }
    assert list(row) == ROW_FIELDS
    return row


# --------------------------------------------------------------------------------------------
# The largest batch under a cap
# --------------------------------------------------------------------------------------------


def largest_fitting(fits: Callable[[int], bool | None], start: int, limit: int, steps: int,
                    granularity: int = SEARCH_GRANULARITY) -> tuple[int | None, int | None]:
    """The largest batch ``b <= limit`` with ``fits(b)``, searched by doubling from ``start``
    (halving while ``start`` does not fit), then ``steps`` bisection steps between the largest
    batch that fitted and the smallest that did not, on multiples of ``granularity``.

    ``fits(b)`` returns True, False, or None for a try that neither fitted nor ran out of the
    cap (an error, the time budget): the search stops there. Assumes fitting is monotone in b.
    Returns ``(largest that fitted or None, smallest that did not or None)``.

    Example:
        >>> largest_fitting(lambda b: b <= 5000, 512, 32768, 3)  # 512 .. 4096, 8192, then
        (4608, 5120)                                              # 6144, 5120, 4608
    """
    lo: int | None = None
    hi: int | None = None
    b = min(start, limit)
    first = fits(b)
    if first is None:
        return None, None
    if first:
        lo = b
        while lo < limit:
            b = min(2 * lo, limit)
            ok = fits(b)
            if ok is None:
                return lo, None
            if not ok:
                hi = b
                break
            lo = b
    else:
        hi = b
        while b > 2:
            b //= 2
            ok = fits(b)
            if ok is None:
                return None, hi
            if ok:
                lo = b
                break
            hi = b
    if lo is None or hi is None:
        return lo, hi
    for _ in range(steps):
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo or mid >= hi:
            mid = (lo + hi) // 2  # below the granularity: plain bisection
            if mid <= lo:
                break
        ok = fits(mid)
        if ok is None:
            break
        if ok:
            lo = mid
        else:
            hi = mid
    return lo, hi


# --------------------------------------------------------------------------------------------
# Tables and files
# --------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _status(r: dict) -> str:
    return r["status"] if r["status"] == "ok" else f"{r['status']} ({r['message']})"


SWEEP_HEADER = ["towers", "loss", "batch", "chunk", "s/step med", "s/step min", "pairs/s",
                "loss share", "peak RSS", "cpu/wall", "status"]


def sweep_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The sweep's header and cells: one line per row."""
    body = [[r["towers"], r["loss"], str(r["batch"]), str(r["chunk"] or "off"),
             _f(r["seconds_per_step_median"], ".3f"), _f(r["seconds_per_step_min"], ".3f"),
             _f(r["pairs_per_second"], ".1f"), _share(r["loss_share"]),
             fmt_bytes(r["peak_mem_bytes"]) if r["peak_mem_bytes"] else "-",
             _f(r["cpu_per_wall"], ".2f"), _status(r)] for r in rows]
    return SWEEP_HEADER, body


def scale_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """--scale's header and cells: the cached fused step beside the largest dense one, then
    every dense try."""
    cap = result["target_bytes"]
    header = ["step", "batch", "chunk", "loss", "s/step", "pairs/s", "loss share", "peak RSS",
              f"within {cap / 1e9:g} GB", "cpu/wall"]

    def line(name: str, r: dict | None) -> list[str]:
        if r is None:
            return [name, "-", "-", "-", "-", "-", "-", "-", "no batch fits", "-"]
        ok = r["status"] == "ok"
        within = "-" if not ok else ("yes" if _peak_of(r) <= cap else "NO")
        return [name, str(r["batch"]), str(r["chunk"] or "off"),
                "fused " + r["loss"] if r["loss"] != "openclip" else "dense (OpenCLIP)",
                _f(r["seconds_per_step_median"], ".1f"), _f(r["pairs_per_second"], ".1f"),
                _share(r["loss_share"]),
                fmt_bytes(r["peak_mem_bytes"]) if ok else r["status"], within,
                _f(r["cpu_per_wall"], ".2f")]

    body = [line("gradient caching + fused loss", result["cached"]),
            line("OpenCLIP-style, largest fitting", result["dense_largest"])]
    for r in result["dense_search"]:
        body.append(line("  dense try", r))
    return header, body


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub pipe table."""
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def markdown_report(result: dict, header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """The results file a person reads: what ran, where, and the table."""
    env, cfg = result["environment"], result["config"]
    lines = [f"# {PROG} ({result['mode']})", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {env['device_name']}, {env['threads']} torch threads per child; torch "
             f"{env['torch']}, transformers {env['transformers']}, Python {env['python']}; "
             f"commit {env['git_commit']}; {env['date']}. Load average (1 min) "
             f"{_f(env['load_average_at_start'], '.2f')} at start, "
             f"{_f(env.get('load_average_at_end'), '.2f')} at the end, on {env['cpu_count']} "
             "cores.", "",
             f"Inputs: random uint8 images of {cfg['image_size']} px, {cfg['text_length']} "
             f"random tokens per caption (vocabulary {cfg['vocab_size']}), projection "
             f"{cfg['projection_dim']}; AdamW; peak memory = "
             + ("the child's peak RSS (VmHWM)." if env["device"] == "cpu"
                else "torch.cuda.max_memory_allocated."), ""]
    if result["mode"] == "scale":
        c, d = result["cached"], result["dense_largest"]
        lines += [f"Target: one step at {c['batch']} pairs within {result['target_bytes'] / 1e9:g} "
                  f"GB of peak RSS: **{'met' if result['cached_within_target'] else 'missed'}**"
                  + (f" ({fmt_bytes(c['peak_mem_bytes'])}, {c['seconds_per_step_median']:.0f} s)"
                     if c["status"] == "ok" else f" ({c['status']}: {c['message']})") + ". "
                  + ("Largest OpenCLIP-style batch within the same cap: "
                     + (f"**{d['batch']}** pairs" if d else "none")
                     + (f" ({result['dense_smallest_not_fitting']} pairs did not fit)"
                        if result["dense_smallest_not_fitting"] else
                        " (the search stops at the cached step's batch)" if d else "") + "."), ""]
    lines += [markdown_table(header, body), ""]
    for s in result.get("skipped", []):
        lines.append(f"Skipped {s['towers']}, batch {s['batch']}, chunk {s['chunk']}: "
                     f"{s['reason']}.")
    return "\n".join(lines).rstrip() + "\n"


def file_tag(cfg: BenchClipConfig) -> str:
    """``<device>``, then ``_t<threads>`` when --threads is given."""
    tag = "cuda" if cfg.on_cuda else "cpu"
    if cfg.threads:
        tag += f"_t{cfg.threads}"
    return tag


# --------------------------------------------------------------------------------------------
# The two modes
# --------------------------------------------------------------------------------------------


def run_sweep(cfg: BenchClipConfig) -> dict[str, Any]:
    """One child per (tower pair, batch, chunk, loss); returns the JSON document."""
    env = environment(cfg)
    kill = cfg.mem_budget_gb * 1e9
    rows, skipped = [], []
    for towers in cfg.towers:
        for b in cfg.batch_sizes:
            for c in cfg.chunk_sizes:
                if c and c >= b:
                    skipped.append({"towers": towers, "batch": b, "chunk": c,
                                    "reason": f"chunk {c} >= {b} pairs"})
                    continue
                for loss in cfg.losses:
                    spec = _step_spec(cfg, towers, b, c, loss)
                    row = _row(cfg, env, spec, run_measurement(spec, kill, cfg.time_budget_s),
                               "sweep")
                    rows.append(row)
                    what = (f"{row['pairs_per_second']:.1f} pairs/s, loss "
                            f"{_share(row['loss_share'])} of the step, peak "
                            f"{fmt_bytes(row['peak_mem_bytes'])}" if row["status"] == "ok"
                            else f"{row['status']}: {row['message']}")
                    _say(f"{towers}, {loss}, batch {b}, chunk {c or 'off'}: {what} "
                         f"({row['wall_s']:.0f}s)")
    env["load_average_at_end"] = _load()
    return {"tool": PROG, "mode": "sweep", "config": dataclasses.asdict(cfg),
            "environment": env, "rows": rows, "skipped": skipped}


def _peak_of(row: dict) -> float:
    """The peak RSS a try is judged by: its own VmHWM and the parent's polls, whichever is
    higher (a spike between two polls still shows in VmHWM)."""
    return max(row["peak_mem_bytes"] or 0, row["max_polled_rss_bytes"] or 0)


def run_scale(cfg: BenchClipConfig) -> dict[str, Any]:
    """Issue 8's target: the cached fused step at the big batch, then the largest batch of the
    plain OpenCLIP-style step under the same cap."""
    env = environment(cfg)
    towers, batch, chunk, loss = (cfg.towers[0], cfg.batch_sizes[0], cfg.chunk_sizes[0],
                                  cfg.losses[0])
    cap = cfg.target_gb * 1e9
    # the cached step runs to completion (killed only at the machine's safety budget), so that
    # its peak is a number even when it misses the target
    safety = max(cfg.mem_budget_gb * 1e9, cap)
    _say(f"cached step: {towers}, {batch} pairs of {cfg.image_size} px / {cfg.text_length} "
         f"tokens, chunks of {chunk} pairs, fused {loss} loss, one step ...")
    spec = _step_spec(cfg, towers, batch, chunk, loss)
    cached = _row(cfg, env, spec, run_measurement(spec, safety, cfg.time_budget_s,
                                                  report_every_s=60.0), "scale")
    _say(f"  {cached['status']}: " + (
        f"{cached['seconds_per_step_median']:.1f} s/step, peak "
        f"{fmt_bytes(cached['peak_mem_bytes'])}, loss {_share(cached['loss_share'])} of the step"
        if cached["status"] == "ok" else cached["message"]))

    search: list[dict] = []

    def fits(b: int) -> bool | None:
        s = _step_spec(cfg, towers, b, 0, "openclip", repeats=1, warmup=0, time_loss=False)
        r = _row(cfg, env, s, run_measurement(s, cap, cfg.time_budget_s), "scale-dense")
        search.append(r)
        if r["status"] == "ok":
            ok: bool | None = _peak_of(r) <= cap
            if not ok:
                r["message"] = f"peak {fmt_bytes(_peak_of(r))} above the cap"
        elif r["status"] in ("over-mem-budget", "oom"):
            ok = False
        else:
            ok = None
        _say(f"  dense, {b} pairs: " + (
            f"peak {fmt_bytes(r['peak_mem_bytes'])}, {r['seconds_per_step_median']:.1f} s, "
            + ("fits" if ok else "above the cap")
            if r["status"] == "ok" else f"{r['status']} ({r['message']})"))
        return ok

    _say(f"OpenCLIP-style step (dense logits, full activations) within {cfg.target_gb:g} GB: "
         f"doubling from {cfg.search_start} pairs, then {cfg.search_steps} bisection steps")
    lo, hi = largest_fitting(fits, cfg.search_start, batch, cfg.search_steps)
    largest = next((r for r in search if r["batch"] == lo and r["status"] == "ok"), None)
    env["load_average_at_end"] = _load()
    return {"tool": PROG, "mode": "scale", "config": dataclasses.asdict(cfg), "environment": env,
            "target_bytes": cap,
            "cached_within_target": (cached["status"] == "ok" and _peak_of(cached) <= cap),
            "cached": cached, "dense_largest": largest, "dense_smallest_not_fitting": hi,
            "dense_search": search, "rows": [cached] + search}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_from_args(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    note = ("" if cfg.on_cuda else f"; children killed past {cfg.mem_budget_gb:g} GB of RSS or "
            f"{cfg.time_budget_s:.0f} s")
    _say(f"{PROG}: on {cfg.device} ({device_name(cfg.device)}){note}")
    _say(json.dumps(dataclasses.asdict(cfg)))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.scale:
        result = run_scale(cfg)
        header, body = scale_table(result)
        path = out / f"clip_scale_{file_tag(cfg)}.json"
    else:
        result = run_sweep(cfg)
        header, body = sweep_table(result["rows"])
        path = out / f"clip_{file_tag(cfg)}.json"
    result["command"] = " ".join([PROG] + [shlex.quote(a) for a in argv])
    _say("")
    _say(format_table(header, body))
    for s in result.get("skipped", []):
        _say(f"skipped {s['towers']}, batch {s['batch']}, chunk {s['chunk']}: {s['reason']}")
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown_report(result, header, body))
    _say(f"\nwrote {path} and {path.with_suffix('.md')}")
    # a child that broke (not one that ran out of a budget or of memory) fails the run
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
