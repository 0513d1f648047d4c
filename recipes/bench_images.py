"""Throughput and memory of one image pre-training step (SimCLR and its family), with and
without gradient caching.

    python -m recipes.bench_images            # small_cnn, resnet18, resnet50 x 64, 256 images
    python -m recipes.bench_images --quick    # small_cnn only, about a minute
    python -m recipes.bench_images --single   # issue 7's target: 8192 images, 4 GB
    python -m recipes.bench_images --backbones resnet18 --batch-sizes 64,256,1024 --chunk-size 0,256

Sweep (the default): for every (backbone, batch, chunk) a fresh child process builds the method
(backbone + projection head, :func:`modalities.image.methods.build_method`) and an SGD optimizer,
and times the full training step the recipe runs (:func:`pretrain_step`): the augmented views
arrive as a ready tensor (B, V, 3, h, w), are made view-major, embedded (in chunks of
``--chunk-size`` views with :func:`recipes.common.grad_cache.grad_cache_step`, or in one pass
with 0), the loss is computed and back-propagated, and the optimizer steps. Reported per row:

- median and min seconds per step, ``images_per_second`` = B / median (images, not views);
- ``loss_share``: the loss's forward + backward timed alone on the step's own embeddings (made
  leaves), divided by the step time. The fused loss is O(N) in memory and should be a small
  share: if it were the bottleneck, the share would approach 1;
- ``loader_images_per_second``: the data pipeline alone (generated images, SimCLR's augmentation
  through :class:`~modalities.image.sampling.AugmentedViews` and a ``DataLoader`` with
  ``--workers`` workers), measured once per batch size in its own child. A loader slower than the
  step starves the model (with ``--workers 0`` the augmentation runs on the training process's
  cores, so its time adds to the step's);
- peak memory: on CPU the child's peak resident set size (VmHWM read right after the timed steps,
  which includes the Python/torch runtime, the model, the optimizer state and the input views;
  ``child_maxrss_bytes`` is the kernel's ``ru_maxrss`` of the whole child, from ``wait4``); on
  CUDA ``torch.cuda.max_memory_allocated`` over the steps.

The parent polls each child's RSS (:mod:`recipes.bench.harness` helpers) and kills it once it
passes ``--mem-budget-gb`` or runs past ``--time-budget-s``; such a row is reported with its
status, never with a number.

``--single`` is issue 7's gradient-caching target: SimCLR at a batch of 8192 images (16384 views)
of 32 px on ResNet-18 with the CIFAR stem, one full step with gradient caching (chunks of
``--chunk-size`` views, default 256), its peak RSS set against ``--target-gb`` (4 GB); beside it
the same step without caching at the largest batch that stays within the same budget, found by
doubling from ``--search-start`` (256) images in children killed once their RSS passes it (and
by halving, should 256 images not fit).

Outputs in ``--out`` (default ``docs/bench``): ``images_<tag>.json`` (configuration,
environment, one row per measurement, tagged with device name, torch version, threads and date),
``images_<tag>.png`` (images/s and peak memory against the batch, one line per backbone and
chunking) and rows appended to ``images_<device>.csv``; ``--single`` writes
``images_single_<tag>.json`` and appends to the same CSV. The tag is the device (cpu, cuda),
followed by ``_<method>`` for a method other than simclr and ``_t<N>`` for ``--threads N``.

On a CPU shared with other processes, two threads per process stall at every parallel region
whenever the other core is taken (the loss of 512 views measured 3 ms on a quiet machine and
0.3 s on a loaded one); ``cpu_per_wall`` well below the thread count flags such rows, and
``--threads 1`` gives numbers that depend far less on the neighbours.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from recipes.bench.flags import RaisingParser, int_list, positive, resolve_device
from recipes.bench.harness import (RESULT_MARK, mem_available_bytes, proc_status_kb,
                                   quantiles, run_reported)
from recipes.bench.report import device_name, fmt_bytes, git_commit
from recipes.common.logging import format_table

PROG = "python -m recipes.bench_images"
DEFAULT_BACKBONES = ("small_cnn", "resnet18", "resnet50")
DEFAULT_BATCH_SIZES = (64, 256)
DEFAULT_CHUNK_SIZES = (0, 256)
#: --quick: settings of a sweep that finishes in about a minute on 2 CPU cores
QUICK = {"backbones": ("small_cnn",), "batch_sizes": (32, 128), "chunk_sizes": (0, 64),
         "repeats": 2, "warmup": 1}
#: --single: issue 7's target (SimCLR, ResNet-18 CIFAR stem, 8192 images of 32 px, 4 GB)
SINGLE = {"backbones": ("resnet18",), "batch_sizes": (8192,), "chunk_sizes": (256,),
          "repeats": 1, "warmup": 0}
#: classes of the labels fed to the labelled methods (supcon, triplet, ...): image i has class
#: i mod 10, so every class of a batch of >= 20 images has at least two members
BENCH_CLASSES = 10
#: the loss alone is timed at least this many times (median reported)
LOSS_REPEATS_MIN = 3

#: the columns of every row of images_<device>.json (and of the CSV, in this order)
ROW_FIELDS = [
    "mode", "backbone", "cifar_stem", "method", "image_size", "batch", "views", "chunk",
    "status", "message",
    "seconds_per_step_median", "seconds_per_step_min", "images_per_second",
    "loss_seconds_median", "loss_share",
    "loader_images_per_second", "loader_workers",
    "peak_mem_bytes", "peak_mem_kind", "child_maxrss_bytes", "max_polled_rss_bytes",
    "rss_ready_bytes", "parameters", "repeats", "warmup", "cpu_per_wall", "wall_s",
    "device", "device_name", "torch", "threads", "date", "git_commit",
]


# --------------------------------------------------------------------------------------------
# Configuration and validation
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BenchImagesConfig:
    """Everything one benchmark run depends on (printed at start, saved in the JSON).

    ``chunk_sizes`` are in views (rows the encoder sees at once); 0 is the plain one-shot step.
    """

    backbones: tuple[str, ...] = DEFAULT_BACKBONES
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    chunk_sizes: tuple[int, ...] = DEFAULT_CHUNK_SIZES
    image_size: int = 32
    method: str = "simclr"
    cifar_stem: bool | None = None
    optimizer: str = "sgd"
    repeats: int = 3
    warmup: int = 1
    device: str = "cpu"
    threads: int = 0
    workers: int = 0
    seed: int = 0
    out: str = "docs/bench"
    mem_budget_gb: float = 16.0
    time_budget_s: float = 1800.0
    single: bool = False
    target_gb: float = 4.0
    search_start: int = 256
    loader: bool = True

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def stem(self) -> bool:
        """The CIFAR stem (3x3 conv, no max-pool) unless asked otherwise: on for <= 64 px."""
        return self.image_size <= 64 if self.cifar_stem is None else self.cifar_stem


def build_parser() -> argparse.ArgumentParser:
    p = RaisingParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog="Sweep defaults: --backbones small_cnn,resnet18,resnet50 --batch-sizes "
        "64,256 --chunk-size 0,256 --repeats 3 --warmup 1. --quick: small_cnn, 32,128, "
        "0,64, 2 repeats. --single: resnet18, 8192, chunk 256, 1 repeat, no warm-up.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", help="comma-separated backbones among small_cnn, resnet18, "
                   "resnet50")
    p.add_argument("--batch-sizes", help="comma-separated batch sizes in images (each image "
                   "gives 2 views; 1 for --method supervised)")
    p.add_argument("--image-size", type=int, default=32, help="side of the views in pixels "
                   "(default 32)")
    p.add_argument("--method", default="simclr", help="the method whose step is timed "
                   "(default simclr; any of modalities.image.methods.METHODS)")
    p.add_argument("--chunk-size", help="comma-separated gradient-cache chunk sizes in views; "
                   "0 = no caching. A chunk not smaller than a batch's views is skipped for that "
                   "batch (it would be the one-shot step)")
    p.add_argument("--cifar-stem", dest="cifar_stem", action="store_true", default=None,
                   help="ResNet CIFAR stem (default: on for --image-size <= 64)")
    p.add_argument("--no-cifar-stem", dest="cifar_stem", action="store_false",
                   help="ResNet ImageNet stem at any size")
    p.add_argument("--optimizer", default="sgd", help="sgd (momentum 0.9, weight decay 1e-4, "
                   "the CIFAR preset's) or adamw (default sgd)")
    p.add_argument("--repeats", type=int, help="timed steps per row (median reported)")
    p.add_argument("--warmup", type=int, help="untimed steps first")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child "
                   "(0: torch's default)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the data "
                   "pipeline measurement (default 0)")
    p.add_argument("--no-loader", dest="loader", action="store_false",
                   help="skip the data pipeline measurement")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    p.add_argument("--out", default="docs/bench", help="folder of the images_* files "
                   "(default docs/bench)")
    p.add_argument("--mem-budget-gb", type=float, default=None, help="a child is killed once "
                   "its RSS passes this (default: 60%% of MemAvailable at start; --single: the "
                   "search for the largest uncached batch uses --target-gb instead)")
    p.add_argument("--time-budget-s", type=float, default=None, help="a child is killed after "
                   "this many seconds (default 1800; --single: 7200)")
    p.add_argument("--quick", action="store_true", help="a small sweep (small_cnn; batches "
                   "32,128; chunks 0,64; 2 repeats) to check a machine in about a minute")
    p.add_argument("--single", action="store_true", help="issue 7's target: one cached step at "
                   "a batch of 8192 images on resnet18 (CIFAR stem) against --target-gb, beside "
                   "the largest uncached batch within the same budget")
    p.add_argument("--target-gb", type=float, default=4.0, help="--single: the peak-RSS target "
                   "and the budget of the uncached search (default 4)")
    p.add_argument("--search-start", type=int, default=256, help="--single: first batch of the "
                   "uncached search, doubled while it fits (default 256)")
    return p


def config_from_args(argv: Sequence[str] | None) -> BenchImagesConfig:
    """Parse and check every flag before any work; ValueError names the flag and the value."""
    from modalities.image.backbones import BACKBONES
    from modalities.image.methods import METHODS

    args = build_parser().parse_args(argv)
    if args.quick and args.single:
        raise ValueError("--quick and --single: expected one of them, not both")
    base = SINGLE if args.single else QUICK if args.quick else {}

    if args.backbones is not None:
        names = tuple(s.strip() for s in args.backbones.split(","))
        for name in names:
            if name not in BACKBONES:
                raise ValueError(f"--backbones {args.backbones!r}: {name!r} is not one of "
                                 f"{', '.join(BACKBONES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"--backbones {args.backbones!r}: a backbone is repeated")
    else:
        names = base.get("backbones", DEFAULT_BACKBONES)
    batches = (int_list("--batch-sizes", args.batch_sizes, minimum=2)
               if args.batch_sizes is not None else base.get("batch_sizes", DEFAULT_BATCH_SIZES))
    chunks = (int_list("--chunk-size", args.chunk_size, minimum=0)
              if args.chunk_size is not None else base.get("chunk_sizes", DEFAULT_CHUNK_SIZES))
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r}: expected one of {', '.join(METHODS)}")
    if not 16 <= args.image_size <= 1024:
        raise ValueError(f"--image-size {args.image_size}: expected 16 to 1024 pixels")
    if args.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"--optimizer {args.optimizer!r}: expected sgd or adamw")
    repeats = base.get("repeats", 3) if args.repeats is None else args.repeats
    warmup = base.get("warmup", 1) if args.warmup is None else args.warmup
    if repeats < 1:
        raise ValueError(f"--repeats {repeats}: expected a positive integer")
    if warmup < 0:
        raise ValueError(f"--warmup {warmup}: expected a non-negative integer")
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: expected a non-negative integer "
                         "(0: torch's default)")
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers}: expected a non-negative integer")
    positive("--mem-budget-gb", args.mem_budget_gb)
    positive("--time-budget-s", args.time_budget_s)
    positive("--target-gb", args.target_gb)
    if args.search_start < 2:
        raise ValueError(f"--search-start {args.search_start}: expected an integer >= 2")

    views_per_image = 1 if args.method == "supervised" else 2
    max_views = max(batches) * views_per_image
    if args.chunk_size is None:  # a default chunk that splits no batch given is dropped
        chunks = tuple(c for c in chunks if c < max_views) or (0,)
    for c in chunks:
        if c and c >= max_views:
            raise ValueError(
                f"--chunk-size {c}: not smaller than the views of the largest batch "
                f"({views_per_image} x {max(batches)} = {max_views}); such a chunk does not "
                "split any batch (it would time the one-shot step again)")
        # BatchNorm in training mode needs >= 2 rows per channel: no chunk of a single view
        for b in batches:
            views = b * views_per_image
            if c and c < views and (c == 1 or views % c == 1):
                raise ValueError(
                    f"--chunk-size {c}: the {views} views of batch {b} would leave a last chunk "
                    "of 1 view, which BatchNorm cannot normalise in training mode; expected a "
                    "chunk size leaving at least 2 views in every chunk")
    if args.single:
        if len(names) != 1 or len(batches) != 1 or len(chunks) != 1 or chunks[0] == 0:
            raise ValueError(
                f"--single: expected one backbone, one batch size and one positive chunk size, "
                f"got --backbones {','.join(names)} --batch-sizes "
                f"{','.join(map(str, batches))} --chunk-size {','.join(map(str, chunks))}")

    device = resolve_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r}: exists and is not a folder")
    mem_budget = args.mem_budget_gb
    if mem_budget is None:
        available = mem_available_bytes()
        mem_budget = round(0.6 * available / 1e9, 1) if available else 16.0
    time_budget = args.time_budget_s or (7200.0 if args.single else 1800.0)
    return BenchImagesConfig(
        backbones=tuple(names), batch_sizes=tuple(batches), chunk_sizes=tuple(chunks),
        image_size=args.image_size, method=args.method, cifar_stem=args.cifar_stem,
        optimizer=args.optimizer, repeats=repeats, warmup=warmup, device=device,
        threads=args.threads, workers=args.workers, seed=args.seed, out=str(out),
        mem_budget_gb=mem_budget, time_budget_s=time_budget, single=args.single,
        target_gb=args.target_gb, search_start=args.search_start,
        loader=args.loader and not args.single)


# --------------------------------------------------------------------------------------------
# The measured step (shared with the child processes)
# --------------------------------------------------------------------------------------------


def build_bench_method(backbone: str, *, method: str = "simclr", cifar_stem: bool = True,
                       seed: int = 0) -> torch.nn.Module:
    """The method the recipe trains: ``build_backbone`` + ``build_method`` with the paper's
    defaults (:class:`~modalities.image.methods.MethodConfig`), weights seeded by ``seed``."""
    from modalities.image.backbones import build_backbone
    from modalities.image.methods import MethodConfig, build_method

    torch.manual_seed(seed)
    encoder = build_backbone(backbone, cifar_stem=cifar_stem)
    return build_method(MethodConfig(name=method), encoder, num_classes=BENCH_CLASSES)


def pretrain_step(method: torch.nn.Module, views: torch.Tensor, labels: torch.Tensor,
                  chunk_size: int | None, optimizer: torch.optim.Optimizer, step: int = 0,
                  total_steps: int = 1) -> tuple[torch.Tensor, Any, dict, dict | None]:
    """One training step as ``recipes.simclr_images`` runs it (its :func:`train_step`, then the
    optimizer step and the method's ``on_step_end``).

    ``views`` (B, V, 3, h, w) are made view-major rows (V B, 3, h, w) (rows v B .. (v+1) B - 1 =
    view v); the target branch (moco, byol) embeds them without gradients; the online branch and
    the loss go through :func:`recipes.common.grad_cache.grad_cache_step` (``chunk_size`` views
    at a time, None: one pass); then ``optimizer.step()`` and the method's ``on_step_end``.

    Returns ``(loss detached, stats, online outputs detached, target outputs or None)``: the
    embeddings the loss saw, so that its cost can be timed on them alone.
    """
    from recipes.simclr_images import train_step

    loss, stats, online, target = train_step(method, method, views, labels, chunk_size)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.on_step_end(step, total_steps)
    return loss, stats, online, target


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_step(spec: dict) -> dict:
    """Child: time ``warmup + repeats`` steps, then the loss alone on the last step's outputs."""
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    method = build_bench_method(spec["backbone"], method=spec["method"],
                                cifar_stem=spec["cifar_stem"], seed=spec["seed"]).to(device)
    method.train()
    params = [p for p in method.parameters() if p.requires_grad]
    if spec["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    b, v, s = spec["batch"], method.n_views, spec["image_size"]
    gen = torch.Generator(device=device).manual_seed(spec["seed"] + 1)
    views = torch.randn(b, v, 3, s, s, generator=gen, device=device)  # normalised views
    labels = torch.arange(b, device=device) % BENCH_CLASSES
    chunk = spec["chunk"] or None
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in method.parameters()),
                           "rss_ready_bytes": (proc_status_kb("VmRSS") or 0) * 1024}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total = spec["warmup"] + spec["repeats"]
    times, cpu_times = [], []
    last = None
    for i in range(total):
        _sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        last = pretrain_step(method, views, labels, chunk, optimizer, i, total)
        _sync(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_mem_kind"] = "cuda_max_memory_allocated"
    else:
        # VmHWM is the process's peak RSS so far: runtime + model + optimizer + inputs + step
        out["peak_mem_bytes"] = (proc_status_kb("VmHWM") or 0) * 1024
        out["peak_mem_kind"] = "rss"
    loss, _, online, target = last
    if not math.isfinite(float(loss)):
        raise FloatingPointError(f"loss={float(loss)} after {total} steps")

    # The loss alone, forward + backward, on the embeddings the last step fed it.
    leaves = {k: t.detach().requires_grad_(t.is_floating_point()) for k, t in online.items()}
    loss_times = []
    budget = max(statistics.median(times), 1.0)
    started = time.perf_counter()
    while len(loss_times) < max(spec["repeats"], LOSS_REPEATS_MIN):
        for t in leaves.values():
            t.grad = None
        _sync(device)
        t0 = time.perf_counter()
        value, _ = method.loss(leaves, target, labels, v)
        value.backward()
        _sync(device)
        loss_times.append(time.perf_counter() - t0)
        if time.perf_counter() - started > budget:  # a loss slower than the step: enough
            break
    q = quantiles(times)
    out.update({
        "seconds_per_step_median": q["median_s"], "seconds_per_step_min": q["min_s"],
        "times_s": times, "loss_seconds_median": statistics.median(loss_times),
        # CPU seconds per wall second while timing: about the thread count when the process had
        # the cores to itself, less when other processes competed for them
        "cpu_per_wall": sum(cpu_times) / sum(times) if device.type == "cpu" else None,
        "threads": torch.get_num_threads(), "final_loss": float(loss),
    })
    return out


def _measure_loader(spec: dict) -> dict:
    """Child: images/s of generated images -> AugmentedViews (SimCLR's augmentation) ->
    DataLoader(num_workers=workers) -> collate_views, with no model."""
    from modalities.image.sampling import AugmentedViews, EpochBatchSampler, collate_views
    from modalities.image.synthetic import generate_shapes
    from modalities.image.transforms import simclr_transform

    b, workers = spec["batch"], spec["workers"]
    # with W workers the first W batches are produced in parallel from a cold start: skip them,
    # then time enough batches (4 per worker) that prefetching cannot hide the rate
    warm = max(1, workers)
    timed = 4 * max(1, workers)
    n = max(b, min(b * (warm + timed), 4096))
    data = generate_shapes(n, size=spec["image_size"], seed=spec["seed"])
    views = AugmentedViews(data.images, data.labels, simclr_transform(spec["image_size"]),
                           n_views=spec["n_views"], seed=spec["seed"])
    sampler = EpochBatchSampler(n, b, seed=spec["seed"])
    loader = torch.utils.data.DataLoader(views, batch_sampler=sampler, collate_fn=collate_views,
                                         num_workers=workers)
    it = iter(loader)
    for _ in range(warm):
        next(it)
    t0 = time.perf_counter()
    for _ in range(timed):
        x, _ = next(it)
    seconds = time.perf_counter() - t0
    del it
    return {"loader_images_per_second": b * timed / seconds, "loader_seconds": seconds,
            "loader_batches": timed, "view_shape": list(x.shape[1:])}


def worker() -> None:
    """Entry point of a child: read the spec from argv, print one result line."""
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        result = _measure_loader(spec) if spec["kind"] == "loader" else _measure_step(spec)
        result["status"] = "ok"
    except MemoryError as exc:
        result = {"status": "oom", "message": f"MemoryError: {exc}"}
    except (RuntimeError, FloatingPointError, ValueError) as exc:
        text = str(exc)
        first = text.splitlines()[0] if text else type(exc).__name__
        oom = "out of memory" in text.lower() or "can't allocate" in text.lower()
        result = {"status": "oom" if oom else "error", "message": f"{type(exc).__name__}: {first}"}
    print(RESULT_MARK + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# Parent: children watched for memory and time
# --------------------------------------------------------------------------------------------


def run_measurement(spec: dict, kill_rss_bytes: float, time_budget_s: float, *,
                    report_every_s: float | None = None) -> dict:
    """One measurement in a child process running this module's :func:`worker`, watched for
    memory and time (:func:`recipes.bench.harness.run_reported`)."""
    return run_reported(spec, kill_rss_bytes, time_budget_s, worker_module="recipes.bench_images",
                        report_every_s=report_every_s)


def environment(cfg: BenchImagesConfig) -> dict[str, Any]:
    """The tags of every row: device, versions, threads, date, commit, load."""
    threads = cfg.threads or torch.get_num_threads()
    return {
        "device": cfg.device, "device_name": device_name(cfg.device),
        "torch": torch.__version__, "python": platform.python_version(), "threads": threads,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _step_spec(cfg: BenchImagesConfig, backbone: str, batch: int, chunk: int, *,
               repeats: int | None = None, warmup: int | None = None) -> dict:
    return {"kind": "step", "backbone": backbone, "method": cfg.method, "cifar_stem": cfg.stem,
            "image_size": cfg.image_size, "batch": batch, "chunk": chunk,
            "repeats": cfg.repeats if repeats is None else repeats,
            "warmup": cfg.warmup if warmup is None else warmup, "device": cfg.device,
            "threads": cfg.threads, "optimizer": cfg.optimizer, "seed": cfg.seed}


def _row(cfg: BenchImagesConfig, env: dict, spec: dict, result: dict, mode: str,
         loader: dict | None) -> dict:
    """One table/JSON row in the :data:`ROW_FIELDS` columns."""
    views = spec["batch"] * (1 if cfg.method == "supervised" else 2)
    ok = result.get("status") == "ok"
    median = result.get("seconds_per_step_median") if ok else None
    loss_s = result.get("loss_seconds_median") if ok else None
    peak = result.get("peak_mem_bytes")  # None for a killed child: it has no measured peak
    row = {
        "mode": mode, "backbone": spec["backbone"], "cifar_stem": spec["cifar_stem"],
        "method": cfg.method, "image_size": cfg.image_size, "batch": spec["batch"],
        "views": views, "chunk": spec["chunk"], "status": result.get("status", "error"),
        "message": result.get("message", ""),
        "seconds_per_step_median": median,
        "seconds_per_step_min": result.get("seconds_per_step_min") if ok else None,
        "images_per_second": spec["batch"] / median if median else None,
        "loss_seconds_median": loss_s,
        "loss_share": loss_s / median if (loss_s is not None and median) else None,
        "loader_images_per_second": (loader or {}).get("loader_images_per_second"),
        "loader_workers": cfg.workers if loader is not None else None,
        "peak_mem_bytes": peak if ok else None,
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
# Tables, files, plot
# --------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_rows(rows: list[dict]) -> str:
    """The sweep's table: one line per row, peak memory in GB/MB, the loss share in %."""
    header = ["backbone", "batch", "views", "chunk", "s/step med", "s/step min", "images/s",
              "loss share", "loader img/s", "peak mem", "cpu/wall", "status"]
    body = []
    for r in rows:
        body.append([
            r["backbone"], r["batch"], r["views"], r["chunk"] or "off",
            _f(r["seconds_per_step_median"], ".3f"), _f(r["seconds_per_step_min"], ".3f"),
            _f(r["images_per_second"], ".1f"),
            "-" if r["loss_share"] is None else f"{100 * r['loss_share']:.2f}%",
            _f(r["loader_images_per_second"], ".0f"),
            fmt_bytes(r["peak_mem_bytes"]) if r["peak_mem_bytes"] else "-",
            _f(r["cpu_per_wall"], ".2f"),
            r["status"] if r["status"] == "ok" else f"{r['status']} ({r['message']})"])
    return format_table(header, body)


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows (columns :data:`ROW_FIELDS`), writing the header to a new file."""
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=ROW_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def plot_rows(rows: list[dict], path: Path, title: str, budget_gb: float | None = None) -> None:
    """Images/s and peak memory against the batch, one line per (backbone, chunking)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.3))
    keys = sorted({(r["backbone"], r["chunk"]) for r in rows}, key=lambda k: (k[0], k[1]))
    colors = {b: c for b, c in zip(sorted({k[0] for k in keys}),
                                   ["tab:blue", "tab:orange", "tab:green", "tab:red"])}
    for backbone, chunk in keys:
        ok = sorted((r for r in rows if r["backbone"] == backbone and r["chunk"] == chunk
                     and r["status"] == "ok"), key=lambda r: r["batch"])
        if not ok:
            continue
        label = f"{backbone}, " + (f"chunks of {chunk} views" if chunk else "no caching")
        # cached runs: dashed lines and hollow squares, so a lone point is told apart too
        style = dict(linestyle="--", marker="s", markerfacecolor="none") if chunk else \
            dict(linestyle="-", marker="o")
        xs = [r["batch"] for r in ok]
        ax_t.plot(xs, [r["images_per_second"] for r in ok], color=colors[backbone],
                  label=label, **style)
        ax_m.plot(xs, [r["peak_mem_bytes"] / 1e9 for r in ok], color=colors[backbone],
                  label=label, **style)
    batches = sorted({r["batch"] for r in rows})
    if budget_gb:
        ax_m.axhline(budget_gb, color="grey", linestyle=":", linewidth=1,
                     label=f"kill budget {budget_gb:g} GB")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("batch (images; 2 views each)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_t.set_ylabel("images per second (median step)")
    kind = rows[0]["peak_mem_kind"] if rows else "rss"
    ax_m.set_ylabel("GB (" + ("max_memory_allocated" if kind.startswith("cuda") else
                              "peak RSS of the child") + ")")
    ax_t.set_title("training step throughput", fontsize=9)
    ax_m.set_title("peak memory", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _say(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------------------------
# The two modes
# --------------------------------------------------------------------------------------------


def run_sweep(cfg: BenchImagesConfig) -> dict[str, Any]:
    """The data pipeline once per batch size, then one child per (backbone, batch, chunk);
    returns the JSON document (config, environment, rows, skipped combinations)."""
    env = environment(cfg)
    kill = cfg.mem_budget_gb * 1e9
    n_views = 1 if cfg.method == "supervised" else 2
    loaders: dict[int, dict | None] = {}
    if cfg.loader:
        for b in cfg.batch_sizes:
            spec = {"kind": "loader", "batch": b, "image_size": cfg.image_size,
                    "workers": cfg.workers, "n_views": n_views, "seed": cfg.seed,
                    "threads": cfg.threads, "device": "cpu"}
            res = run_measurement(spec, kill, cfg.time_budget_s)
            if res.get("status") != "ok":
                _say(f"data pipeline, batch {b}: {res.get('status')} ({res.get('message')})")
                loaders[b] = None
            else:
                loaders[b] = res
                _say(f"data pipeline, batch {b}, {cfg.workers} workers: "
                     f"{res['loader_images_per_second']:.0f} images/s")
    rows, skipped = [], []
    for backbone in cfg.backbones:
        for b in cfg.batch_sizes:
            for c in cfg.chunk_sizes:
                if c and c >= b * n_views:
                    skipped.append({"backbone": backbone, "batch": b, "chunk": c,
                                    "reason": f"chunk {c} >= {b * n_views} views"})
                    continue
                spec = _step_spec(cfg, backbone, b, c)
                res = run_measurement(spec, kill, cfg.time_budget_s)
                row = _row(cfg, env, spec, res, "sweep", loaders.get(b))
                rows.append(row)
                what = (f"{row['images_per_second']:.1f} images/s, loss "
                        f"{100 * row['loss_share']:.2f}% of the step, peak "
                        f"{fmt_bytes(row['peak_mem_bytes'])}" if row["status"] == "ok"
                        else f"{row['status']}: {row['message']}")
                _say(f"{backbone}, batch {b}, chunk {c or 'off'}: {what} "
                     f"({row['wall_s']:.0f}s)")
    return {"tool": PROG, "mode": "sweep", "config": dataclasses.asdict(cfg),
            "environment": env, "rows": rows, "skipped": skipped}


def run_single(cfg: BenchImagesConfig) -> dict[str, Any]:
    """Issue 7's target: the cached step at the big batch, and the uncached step at the
    largest batch within the same budget."""
    env = environment(cfg)
    backbone, batch, chunk = cfg.backbones[0], cfg.batch_sizes[0], cfg.chunk_sizes[0]
    target = cfg.target_gb * 1e9
    # the cached step is measured to completion (killed only at the machine's safety budget),
    # so that its peak is a number even when it misses the target
    safety = max(cfg.mem_budget_gb * 1e9, target)
    _say(f"cached step: {backbone}, {batch} images ({2 * batch} views) of {cfg.image_size} px, "
         f"chunks of {chunk} views, one step ...")
    spec = _step_spec(cfg, backbone, batch, chunk)
    cached = _row(cfg, env, spec, run_measurement(spec, safety, cfg.time_budget_s,
                                                  report_every_s=120.0), "single", None)
    _say(f"  {cached['status']}: " + (
        f"{cached['seconds_per_step_median']:.1f} s/step, "
        f"peak {fmt_bytes(cached['peak_mem_bytes'])}"
        if cached["status"] == "ok" else cached["message"]))

    search: list[dict] = []

    def attempt(b: int) -> dict:
        s = _step_spec(cfg, backbone, b, 0, repeats=1, warmup=0)
        r = _row(cfg, env, s, run_measurement(s, target, cfg.time_budget_s), "single-uncached",
                 None)
        search.append(r)
        _say(f"  uncached, {b} images: {r['status']}" + (
            f", peak {fmt_bytes(r['peak_mem_bytes'])}, {r['seconds_per_step_median']:.1f} s"
            if r["status"] == "ok" else f" ({r['message']})"))
        return r

    _say(f"uncached search within {cfg.target_gb:g} GB, doubling from {cfg.search_start} images")
    largest = None
    b = cfg.search_start
    first = attempt(b)
    if first["status"] == "ok":
        largest = first
        while b * 2 <= batch:
            b *= 2
            r = attempt(b)
            if r["status"] != "ok":
                break
            largest = r
    elif first["status"] == "over-mem-budget":
        while b > 2:  # the start does not fit: halve until one does
            b //= 2
            r = attempt(b)
            if r["status"] == "ok":
                largest = r
                break
            if r["status"] != "over-mem-budget":
                break
    return {"tool": PROG, "mode": "single", "config": dataclasses.asdict(cfg), "environment": env,
            "target_bytes": target,
            "cached_within_target": (cached["status"] == "ok"
                                     and cached["peak_mem_bytes"] <= target),
            "cached": cached, "uncached_largest": largest, "uncached_search": search,
            "rows": [cached] + search}


def format_single(result: dict) -> str:
    """--single's table: the cached step beside the largest uncached one, then the search."""
    c, u = result["cached"], result["uncached_largest"]
    target = result["target_bytes"]
    header = ["step", "batch", "views", "chunk", "s/step", "images/s", "loss share", "peak mem",
              f"within {target / 1e9:g} GB"]

    def line(name: str, r: dict | None) -> list[str]:
        if r is None:
            return [name, "-", "-", "-", "-", "-", "-", "-", "no batch fits"]
        ok = r["status"] == "ok"
        return [name, str(r["batch"]), str(r["views"]), str(r["chunk"] or "off"),
                _f(r["seconds_per_step_median"], ".1f"), _f(r["images_per_second"], ".1f"),
                "-" if r["loss_share"] is None else f"{100 * r['loss_share']:.2f}%",
                fmt_bytes(r["peak_mem_bytes"]) if ok else f"{r['status']}",
                ("yes" if r["peak_mem_bytes"] <= target else "NO") if ok else "-"]

    text = format_table(header, [line("gradient caching", c),
                                 line("no caching, largest fitting", u)])
    tried = ", ".join(f"{r['batch']}: {'ok' if r['status'] == 'ok' else r['status']}"
                      for r in result["uncached_search"])
    return text + f"\nuncached batches tried: {tried}"


def file_tag(cfg: BenchImagesConfig) -> str:
    """``<device>``, then ``_<method>`` unless simclr and ``_t<threads>`` when --threads is
    given, so that runs of other settings do not replace the default run's files."""
    tag = "cuda" if cfg.on_cuda else "cpu"
    if cfg.method != "simclr":
        tag += f"_{cfg.method}"
    if cfg.threads:
        tag += f"_t{cfg.threads}"
    return tag


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    env_note = ("" if cfg.on_cuda else
                f"; children killed past {cfg.mem_budget_gb:g} GB of RSS or "
                f"{cfg.time_budget_s:.0f} s")
    _say(f"{PROG}: {cfg.method} on {cfg.device} ({device_name(cfg.device)}){env_note}")
    _say(json.dumps(dataclasses.asdict(cfg)))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if cfg.on_cuda else "cpu"
    if cfg.single:
        result = run_single(cfg)
        table = format_single(result)
        path = out / f"images_single_{file_tag(cfg)}.json"
    else:
        result = run_sweep(cfg)
        table = format_rows(result["rows"])
        path = out / f"images_{file_tag(cfg)}.json"
        plot_rows(result["rows"], path.with_suffix(".png"),
                  f"{cfg.method}, {cfg.image_size} px, {result['environment']['device_name']}, "
                  f"{result['environment']['threads']} threads",
                  None if cfg.on_cuda else cfg.mem_budget_gb)
    _say("")
    _say(table)
    for s in result.get("skipped", []):
        _say(f"skipped {s['backbone']}, batch {s['batch']}, chunk {s['chunk']}: {s['reason']}")
    path.write_text(json.dumps(result, indent=2) + "\n")
    append_csv(out / f"images_{dev}.csv", result["rows"])
    _say(f"\nwrote {path}")
    # a child that broke (not one that ran out of a budget or of memory) fails the run
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
