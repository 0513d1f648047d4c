"""Self-supervised pre-training on images (SimCLR and its family), with the learning-behaviour
diagnostics logged while it trains and the encoder evaluated against the same backbone at
random init.

    python -m recipes.simclr_images                       # generated shapes, CPU preset (~10 min)
    python -m recipes.simclr_images --method byol --out runs/byol
    python -m recipes.simclr_images --temperature 0.05,0.1,0.5,1      # a temperature sweep
    python -m recipes.simclr_images --data /data/cifar10 --preset cifar --device cuda
    torchrun --nproc_per_node 4 -m recipes.simclr_images --data /data/cifar10 --device cuda

Every method trains the same backbone on the same augmentations; only ``--method`` changes:
``simclr`` (NT-Xent), ``moco`` (InfoNCE against a queue of momentum-encoder keys), ``supcon``,
``triplet`` (batch-hard, P classes x K images per batch), ``drlim``, ``nca``, ``byol``,
``simsiam``, ``barlow``, ``vicreg`` and ``supervised`` (cross-entropy, the baseline). The losses
are :mod:`csrc_triton`'s fused ones; under torchrun the negatives of every contrastive method
come from the batches of every process (gathered with exact gradients), and Barlow Twins /
VICReg take their batch statistics over the global batch. BatchNorm statistics stay per
process (and per chunk with ``--chunk-size``).

``--chunk-size C`` turns on gradient caching (:mod:`recipes.common.grad_cache`): the batch is
embedded C views at a time, so the batch size is limited by the O(N) fused loss rather than by
the activations.

Evaluation: weighted kNN (k = 200, T = 0.1, on cosine similarity; InstDisc / solo-learn) on the
held-out split every ``knn_every_epochs`` epochs, and at the end a linear probe on frozen
features and a segmentation head on the frozen backbone (mIoU), for the trained encoder and for
the exact weights it started from (``random_init``); kNN on raw pixels as a floor. The
downstream convergence study (label fractions, fine-tuning) is ``python -m
recipes.image_downstream``.

Outputs in ``--out``: config.json, checkpoint.pt (atomic, weights_only), metrics.jsonl (training
records and ``"kind": "diagnostics"`` records), train.log, eval.json, summary.json, and the plots
training.png, diagnostics.png, spectra.png (sweep.json and sweep.png for a temperature sweep,
one sub-folder per temperature).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from recipes.common import distributed as D
from recipes.common.checkpoint import (restore_training, rng_state, save_checkpoint,
                                       stop_if_diverged)
from recipes.common.cli import add_resume_arguments, cli_main
from recipes.common.config import read_config_file
from recipes.common.logging import MetricsLog, RunLog, format_table
from recipes.common.rundir import open_run, prepare_run_dir, write_config
from recipes.common.schedule import lr_at, set_lr
from recipes.image_setup import (LABELLED_BATCHES, TEMPERATURE_METHODS, ImagePretrainConfig, build_config, cifar_stem,
                                 load_data, parse_temperatures)

CHECKPOINT = "checkpoint.pt"
# settings a resumed run may change without changing what it computes up to its stop
RESUMABLE = ("stop_after", "train_seconds", "device", "workers", "threads", "out", "log_every",
             "checkpoint_every")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipes.simclr_images",
        description="Pre-train an image encoder with SimCLR or one of its family on one "
        "backbone and one set of augmentations, log the learning-behaviour diagnostics "
        "(positive/negative cosine, alignment, uniformity, singular-value spectra, effective "
        "rank, kNN accuracy), then evaluate it (kNN, linear probe, segmentation mIoU) against "
        "the same backbone at random init. With no arguments: generated shapes and a CPU "
        "preset that finishes in about 10 minutes on 2 cores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="class folders: <data>/train/<class>/*.png|jpg and "
                   "<data>/test/<class>/... (a 'val' split is used for evaluation when present). "
                   "Default: the generated shapes dataset.")
    p.add_argument("--seg-data", help="segmentation folders: <seg-data>/{train,test}/images/"
                   "<name>.png|jpg with masks/<name>.png of integer class ids. Default: the "
                   "generated shapes' masks when --data is not given; none otherwise.")
    p.add_argument("--ignore-index", type=int, help="mask value of void pixels (default 255).")
    p.add_argument("--method", help="simclr, moco, supcon, triplet, drlim, nca, byol, simsiam, "
                   "barlow, vicreg or supervised (default simclr).")
    p.add_argument("--backbone", help="small_cnn, resnet18 or resnet50 (default: the "
                   "preset's; cpu-quick: small_cnn, cifar: resnet18).")
    p.add_argument("--cifar-stem", dest="cifar_stem", action="store_true", default=None,
                   help="ResNet stem for small images: 3x3 conv stride 1, no max-pool "
                   "(default: on for --image-size <= 64).")
    p.add_argument("--no-cifar-stem", dest="cifar_stem", action="store_false",
                   help="ImageNet stem (7x7 conv stride 2 and max-pool) at any size.")
    p.add_argument("--image-size", type=int, help="side of the square training images in "
                   "pixels (images are resized to it; default 32).")
    p.add_argument("--batch-size", type=int, help="images per step and per process (each "
                   "image gives two views, one for --method supervised).")
    p.add_argument("--chunk-size", type=int, help="gradient caching: embed this many views at a "
                   "time (activation memory of one chunk, same gradients up to BatchNorm's "
                   "per-chunk statistics); 0 = off.")
    p.add_argument("--epochs", type=int, help="pre-training epochs (passes over the training "
                   "split); ignored when --steps is given.")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs).")
    p.add_argument("--stop-after", type=int, help="stop after this many steps in total, "
                   "checkpointed, as if interrupted (the schedule still spans --steps/--epochs); "
                   "continue with --resume.")
    p.add_argument("--temperature", help="temperature of the softmax losses; a comma-separated "
                   "list runs a sweep (one run per value in <out>/temperature_<t>) and plots "
                   "uniformity and the spectra per temperature.")
    p.add_argument("--lr", type=float, help="peak learning rate (after warm-up; cosine decay "
                   "to zero).")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], help="optimizer (default: the "
                   "preset's).")
    p.add_argument("--device", help="'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available).")
    p.add_argument("--workers", type=int, help="DataLoader worker processes for augmentation.")
    add_resume_arguments(p)
    p.add_argument("--config", help="YAML or JSON file of ImagePretrainConfig fields "
                   "(recipes/image_setup.py; nested 'settings' for the method); flags override it.")
    p.add_argument("--preset", choices=["auto", "cpu-quick", "cifar"], help="base settings: "
                   "'cpu-quick' (10 min on 2 CPU cores), 'cifar' (solo-learn/lightly CIFAR-10 "
                   "ResNet-18 settings), 'auto' (cifar on CUDA, cpu-quick on CPU; the default).")
    p.add_argument("--out", help="output folder (default runs/simclr_images).")
    p.add_argument("--seed", type=int, help="seed of initialisation, batches and augmentation.")
    p.add_argument("--strict", action="store_true", default=None, help="an unreadable image is "
                   "an error instead of a skipped file with a warning.")
    p.add_argument("--train-seconds", type=float, help="stop pre-training after this many "
                   "seconds (checkpointed; 0 = no limit; cpu-quick: 300).")
    p.add_argument("--quiet", action="store_true", help="no progress display.")
    return p


def config_from_args(args: argparse.Namespace) -> tuple[ImagePretrainConfig, list[float] | None]:
    file_values = read_config_file(args.config) if args.config else {}
    temperatures = parse_temperatures(args.temperature) if args.temperature else None
    overrides = {
        "data": args.data, "seg_data": args.seg_data, "ignore_index": args.ignore_index,
        "method": args.method, "backbone": args.backbone, "cifar_stem": args.cifar_stem,
        "image_size": args.image_size, "batch_size": args.batch_size,
        "chunk_size": args.chunk_size, "epochs": args.epochs, "steps": args.steps,
        "stop_after": args.stop_after, "lr": args.lr, "optimizer": args.optimizer,
        "device": args.device, "workers": args.workers, "preset": args.preset, "out": args.out,
        "seed": args.seed, "strict": args.strict, "train_seconds": args.train_seconds,
    }
    if temperatures and len(temperatures) == 1:
        overrides["settings"] = {"temperature": temperatures[0]}
    config = build_config(file_values, overrides, cuda=torch.cuda.is_available())
    if temperatures and len(temperatures) > 1:
        if config.method not in TEMPERATURE_METHODS:
            raise ValueError(f"--temperature={args.temperature!r}: --method {config.method} has "
                             f"no temperature; expected a method among {TEMPERATURE_METHODS}")
    return config, temperatures if temperatures and len(temperatures) > 1 else None


# ------------------------------------------------------------------------------------------


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    config, sweep = config_from_args(args)
    info = D.setup(config.device)
    try:
        if sweep is None:
            return pretrain(config, args, info)
        return temperature_sweep(config, sweep, args, info)
    finally:
        D.cleanup(info)


def temperature_sweep(config: ImagePretrainConfig, temperatures: list[float],
                      args: argparse.Namespace, info: D.DistInfo) -> dict[str, Any]:
    import dataclasses

    from recipes.common.plots import plot_temperature_sweep

    root = prepare_run_dir(config.out, resume=False, overwrite=args.overwrite,
                           main=info.is_main) if args.resume is None else Path(config.out)
    if info.is_main:
        write_config(root, config.to_dict())
    results: dict[str, Any] = {}
    for t in temperatures:
        sub = dataclasses.replace(config, out=str(root / f"temperature_{t:g}"),
                                  settings=dataclasses.replace(config.settings, temperature=t))
        res = pretrain(sub, args, info, sweep_root=root)
        if info.is_main:
            last = res["last_diagnostics"]
            results[f"{t:g}"] = {
                "temperature": t, "knn_top1": res["eval"]["trained"]["knn_top1"],
                "linear_top1": res["eval"]["trained"].get("linear_top1"),
                "uniformity": last.get("uniformity"), "alignment": last.get("alignment"),
                "positive_cosine": last.get("positive_cosine"),
                "negative_cosine": last.get("negative_cosine"),
                "projection_effective_rank": last.get("projection_effective_rank"),
                "feature_effective_rank": last.get("feature_effective_rank"),
                "spectrum": last.get("projection_spectrum"),
                "feature_spectrum": last.get("feature_spectrum"),
            }
    if info.is_main:
        (root / "sweep.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_temperature_sweep({float(k): v for k, v in results.items()}, root / "sweep.png")
        rows = [[k, f"{100 * v['knn_top1']:.1f}%", _fmt(v["uniformity"]), _fmt(v["alignment"]),
                 _fmt(v["positive_cosine"]), _fmt(v["negative_cosine"]),
                 _fmt(v["projection_effective_rank"])] for k, v in results.items()]
        print("\ntemperature sweep (diagnostics on held-out images at the end of training)")
        print(format_table(["T", "kNN top-1", "uniformity", "alignment", "cos+", "cos-",
                            "eff. rank z"], rows))
    return {"sweep": results, "out": str(root)}


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


# ------------------------------------------------------------------------------------------


def _build(config: ImagePretrainConfig, num_classes: int):
    from modalities.image.backbones import build_backbone
    from modalities.image.methods import MethodConfig, build_method

    torch.manual_seed(config.seed)
    backbone = build_backbone(config.backbone, cifar_stem=cifar_stem(config), width=config.width)
    fields = {f for f in MethodConfig.__dataclass_fields__}
    values = {k: v for k, v in vars(config.settings).items() if k in fields}
    method = build_method(MethodConfig(name=config.method, **values), backbone,
                          num_classes=num_classes)
    return method


def _loader(config: ImagePretrainConfig, data, method, info: D.DistInfo):
    from modalities.image.sampling import (AugmentedViews, ClassBalancedBatchSampler,
                                           EpochBatchSampler, collate_views)
    from modalities.image.transforms import simclr_transform

    train = data.train
    if config.method in LABELLED_BATCHES:
        k = 2 if method.n_views == 2 else 4
        p = config.batch_size // k
        n_classes = len(train.classes)
        if p > n_classes:  # fewer classes than P: more images per class instead
            p, k = n_classes, config.batch_size // n_classes
        sampler = ClassBalancedBatchSampler(train.labels, p, k, seed=config.seed,
                                            rank=info.rank, world_size=info.world_size)
    else:
        sampler = EpochBatchSampler(len(train), config.batch_size, seed=config.seed,
                                    rank=info.rank, world_size=info.world_size)
    views = AugmentedViews(train.images, train.labels,
                           simclr_transform(config.image_size,
                                            crop_scale=(config.crop_min_scale, 1.0)),
                           n_views=method.n_views, seed=config.seed)
    return sampler, views, collate_views


def pretrain(config: ImagePretrainConfig, args: argparse.Namespace, info: D.DistInfo,
             sweep_root: Path | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    device = D.resolve_device(config.device, info, threads=config.threads)
    out, log, checkpoint = open_run(config.out, info, resume=args.resume,
                                    overwrite=args.overwrite and sweep_root is None,
                                    quiet=args.quiet, config=config.to_dict(),
                                    resumable=RESUMABLE, override_config=args.override_config,
                                    checkpoint=CHECKPOINT)

    auto = " (auto-selected for a CPU; --preset cifar for the CIFAR-10 settings)" \
        if config.preset == "cpu-quick" and args.preset is None else ""
    budget = (f", at most {config.train_seconds:.0f}s of pre-training: about 10 minutes in all "
              "on 2 CPU cores") if config.preset == "cpu-quick" and config.train_seconds else ""
    log(f"image pre-training: method '{config.method}', preset '{config.preset}'{auto}{budget}; "
        f"on {device}" + (f", {info.world_size} processes" if info.enabled else ""))
    log(json.dumps(config.to_dict(), indent=2))
    if info.is_main:
        write_config(out, config.to_dict())

    # ---- data
    t0 = time.perf_counter()
    data = load_data(config, progress=info.is_main and not args.quiet)
    log(f"data: {data.source} ({time.perf_counter() - t0:.1f}s)")
    for path, reason in data.skipped[:10]:
        log(f"  skipped {path}: {reason}")

    # ---- model
    method = _build(config, len(data.train.classes)).to(device)
    initial_encoder = {k: v.detach().cpu().clone()
                       for k, v in method.encoder.state_dict().items()}
    method.process_group = torch.distributed.group.WORLD if info.enabled else None
    sampler, views, collate = _loader(config, data, method, info)
    steps_per_epoch = sampler.steps_per_epoch
    total = config.steps or config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    params = [p for p in method.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    n_params = sum(p.numel() for p in method.encoder.parameters())
    log(f"model: {config.backbone} ({n_params / 1e6:.2f}M parameters, "
        f"{'CIFAR' if cifar_stem(config) else 'ImageNet'} stem), {config.method}; {total} steps "
        f"of {config.batch_size * info.world_size} images ({steps_per_epoch} per epoch)"
        + (f", gradient caching in chunks of {config.chunk_size} views" if config.chunk_size
           else ""))

    metrics = MetricsLog(out / "metrics.jsonl")
    start = 0
    if checkpoint is not None:
        start = restore_training(checkpoint, metrics, info.is_main, method=method,
                                 optimizer=optimizer)
        initial_encoder = checkpoint["initial_encoder"]
        log(f"resumed from step {start}")
    sampler.load_state_dict({"epoch": start // steps_per_epoch,
                             "position": start % steps_per_epoch})

    train_model = method
    if info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None)

    def save(step: int) -> None:
        if info.is_main:
            save_checkpoint({"step": step, "config": config.to_dict(),
                             "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                             "encoder": method.encoder.state_dict(),
                             "initial_encoder": initial_encoder, "rng": rng_state(),
                             "classes": list(data.train.classes)}, out / CHECKPOINT)

    evaluator = _Evaluator(config, data, device)
    loader = torch.utils.data.DataLoader(views, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=config.workers,
                                         persistent_workers=config.workers > 0)
    batches = iter(loader)
    end = min(total, config.stop_after) if config.stop_after else total
    knn_every = config.knn_every_epochs * steps_per_epoch
    diag_every = config.diagnostics_every or knn_every
    bar = log.progress(end, "pre-training", initial=start, every=config.log_every)
    t_train = time.perf_counter()
    images_seen = 0
    last: dict[str, Any] = {}
    last_diag: dict[str, Any] = {}
    stopped_by_time = False
    step = start
    if start == 0 and info.is_main:
        last_diag = evaluator.diagnostics(method, 0, knn=True)
        metrics.write(last_diag)
    for step in range(start, end):
        if config.train_seconds and D.time_is_up(t_train, config.train_seconds, info, device):
            stopped_by_time = True
            save(step)
            log(f"pre-training time limit ({config.train_seconds:.0f}s) reached after {step} steps")
            break
        x, labels = next(batches)
        lr = lr_at(step, total, warmup, config.lr)
        set_lr(optimizer, lr)
        method.train()
        loss, stats, _, _ = train_step(method, train_model, x.to(device), labels.to(device),
                                       config.chunk_size or None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.on_step_end(step, total)
        images_seen += x.shape[0] * info.world_size
        done = step + 1
        if done % config.log_every == 0 or done == end or done == start + 1:
            loss_all = D.all_reduce_mean(loss, info)
            last = {"step": done, "epoch": round(done / steps_per_epoch, 3),
                    "loss": float(loss_all), "lr": lr,
                    "elapsed_s": round(time.perf_counter() - t_train, 2)}
            last.update({k: float(v) for k, v in stats.items()})
            stop_if_diverged(last["loss"], done, save)
            if info.is_main:
                metrics.write(last)
        bar.update(1, loss=last.get("loss", float("nan")))
        if done % diag_every == 0 or done == end:
            if info.is_main:
                last_diag = evaluator.diagnostics(method, done, knn=done % knn_every == 0
                                                  or done == end)
                metrics.write(last_diag)
        if done % config.checkpoint_every == 0 or done == end:
            save(done)
    else:
        step = end
    bar.close()
    train_seconds = time.perf_counter() - t_train
    steps_done = step
    D.barrier(info)

    summary: dict[str, Any] = {
        "method": config.method, "preset": config.preset, "backbone": config.backbone,
        "device": str(device), "world_size": info.world_size, "source": data.source,
        "steps": total, "steps_done": steps_done, "start_step": start,
        "stopped_by_time_limit": stopped_by_time, "train_seconds": round(train_seconds, 1),
        "images_per_second": round(images_seen / train_seconds, 1) if train_seconds else None,
        "final_loss": last.get("loss"), "skipped_files": len(data.skipped),
    }
    result: dict[str, Any] = {"out": str(out), "summary": summary, "eval": {},
                              "last_diagnostics": last_diag, "method": method}
    if info.is_main:
        if steps_done and (not last_diag or last_diag.get("step") != steps_done):
            last_diag = evaluator.diagnostics(method, steps_done, knn=True)
            metrics.write(last_diag)
            result["last_diagnostics"] = last_diag
        random_encoder = _build(config, len(data.train.classes)).encoder
        random_encoder.load_state_dict(initial_encoder)
        t_eval = time.perf_counter()
        evaluation = evaluator.final(method.encoder, random_encoder.to(device), log)
        summary["eval_seconds"] = round(time.perf_counter() - t_eval, 1)
        evaluation["meta"] = {"eval_split": data.eval_split, "steps_done": steps_done,
                              "knn_k": config.knn_k, "knn_temperature": config.knn_temperature}
        (out / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
        result["eval"] = evaluation
        _plots(metrics.read(), out, config)
        summary["total_seconds"] = round(time.perf_counter() - started, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _report(summary, evaluation, log)
    return result


def train_step(method, train_model, x: torch.Tensor, labels: torch.Tensor,
               chunk_size: int | None) -> tuple[torch.Tensor, dict, dict, dict | None]:
    """One step's gradients (the optimizer step is the caller's). ``x`` (B, V, 3, h, w) becomes
    view-major rows (V*B, 3, h, w): rows [v*B, (v+1)*B) are view v. The target branch (moco,
    byol) embeds them without gradients (in chunks of ``chunk_size``); the online branch and the
    loss go through :func:`recipes.common.grad_cache.grad_cache_step` (``train_model`` is the
    DDP-wrapped method under torchrun). Returns ``(loss detached, stats, online outputs
    detached, target outputs or None)``: the embeddings the loss saw."""
    from recipes.common.grad_cache import Tower, grad_cache_step

    b, v = x.shape[:2]
    rows = x.transpose(0, 1).reshape(v * b, *x.shape[2:])
    target = None
    if method.uses_target:
        step = chunk_size or rows.shape[0]
        parts = [method.forward_target(rows[i:i + step]) for i in range(0, rows.shape[0], step)]
        target = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def loss_fn(outputs):
        return method.loss(outputs[0], target, labels, v)

    no_sync = getattr(train_model, "no_sync", None)
    loss, stats, outputs = grad_cache_step(
        [Tower(train_model, rows, method, forward_no_grad=method, no_sync=no_sync)],
        loss_fn, chunk_size)
    return loss, stats, outputs[0], target


class _Evaluator:
    """kNN and diagnostics during training, and the final evaluation, on fixed data."""

    def __init__(self, config: ImagePretrainConfig, data, device: torch.device) -> None:
        from modalities.image.sampling import AugmentedViews
        from modalities.image.transforms import eval_transform, simclr_transform

        self.config, self.data, self.device = config, data, device
        self.eval_tf = eval_transform(config.image_size)
        n = min(config.diagnostics_samples, len(data.test))
        gen = torch.Generator().manual_seed(config.seed + 17)
        self.diag_index = torch.randperm(len(data.test), generator=gen)[:n]
        aug = AugmentedViews(data.test.images[self.diag_index], data.test.labels[self.diag_index],
                             simclr_transform(config.image_size,
                                              crop_scale=(config.crop_min_scale, 1.0)), n_views=2,
                             seed=config.seed + 1)
        pairs = torch.stack([aug[(i, 0)][0] for i in range(n)])  # (n, 2, 3, h, w), fixed
        self.diag_views = (pairs[:, 0], pairs[:, 1])

    @torch.no_grad()
    def _outputs(self, method, x: torch.Tensor) -> dict[str, torch.Tensor]:
        bs = self.config.eval_batch_size
        parts = [method(x[i:i + bs].to(self.device)) for i in range(0, x.shape[0], bs)]
        return {k: torch.cat([p[k] for p in parts]).float().cpu() for k in parts[0]}

    def _features(self, encoder, images):
        from recipes.common.evaluation import extract_features

        return extract_features(encoder, images, self.eval_tf,
                                batch_size=self.config.eval_batch_size, device=self.device)

    def knn(self, encoder) -> float:
        from recipes.common.evaluation import knn_top1

        tr = self._features(encoder, self.data.train.images)
        te = self._features(encoder, self.data.test.images)
        return knn_top1(tr, self.data.train.labels, te, self.data.test.labels,
                        k=self.config.knn_k, temperature=self.config.knn_temperature,
                        num_classes=len(self.data.train.classes))

    def diagnostics(self, method, step: int, knn: bool) -> dict[str, Any]:
        from recipes.common.diagnostics import representation_report

        was_training = method.training
        method.eval()
        o1 = self._outputs(method, self.diag_views[0])
        o2 = self._outputs(method, self.diag_views[1])
        key = "projection" if "projection" in o1 else "feature"
        report = representation_report(o1["feature"], o1[key], o2[key])
        record: dict[str, Any] = {"step": step, "kind": "diagnostics", "space": key}
        record.update(report)
        if knn:
            record["knn_top1"] = self.knn(method.encoder)
        method.train(was_training)
        return record

    def final(self, encoder, random_encoder, log: RunLog) -> dict[str, Any]:
        from recipes.common.evaluation import (ProbeConfig, knn_top1, linear_probe,
                                               train_segmentation)

        c, d = self.config, self.data
        out: dict[str, Any] = {}
        raw_tr = d.train.images.flatten(1).float()
        raw_te = d.test.images.flatten(1).float()
        out["raw_pixels"] = {"knn_top1": knn_top1(raw_tr, d.train.labels, raw_te, d.test.labels,
                                                  k=c.knn_k, temperature=c.knn_temperature,
                                                  num_classes=len(d.train.classes))}
        for name, enc in (("trained", encoder), ("random_init", random_encoder)):
            enc.eval()
            tr = self._features(enc, d.train.images)
            te = self._features(enc, d.test.images)
            res: dict[str, Any] = {"knn_top1": knn_top1(
                tr, d.train.labels, te, d.test.labels, k=c.knn_k, temperature=c.knn_temperature,
                num_classes=len(d.train.classes))}
            if c.linear_probe:
                # L-BFGS to the optimum of the L2-regularised softmax regression (the objective
                # of scikit-learn's LogisticRegression), so every encoder is probed to the end
                probe = ProbeConfig(solver="lbfgs", penalize_bias=False, iterations=200,
                                    weight_decay=1e-4, seed=c.seed)
                res["linear_top1"] = linear_probe(tr, d.train.labels, te, d.test.labels,
                                                  probe).accuracy
            if c.segmentation_epochs and d.seg_train is not None:
                log(f"segmentation head on the frozen {name} backbone "
                    f"({c.segmentation_epochs} epochs)")
                n_seg = len(d.seg_train)
                keep = torch.arange(n_seg)
                if c.segmentation_train_images and c.segmentation_train_images < n_seg:
                    gen = torch.Generator().manual_seed(c.seed + 29)
                    keep = torch.randperm(n_seg, generator=gen)[:c.segmentation_train_images]
                curve = train_segmentation(
                    enc, len(d.seg_train.seg_classes),
                    (d.seg_train.images[keep], d.seg_train.masks[keep]),
                    (d.seg_test.images, d.seg_test.masks), epochs=c.segmentation_epochs,
                    frozen=True, lr=1e-2, batch_size=128, ignore_index=d.seg_train.ignore_index,
                    device=self.device, seed=c.seed, progress=False,
                    head_width=c.segmentation_head_width)
                res["miou"] = curve.metric[-1]
                res["miou_per_epoch"] = list(curve.metric)
                res["segmentation_train_images"] = int(keep.numel())
                per_class = curve.extra.get("per_class_iou")
                if per_class:
                    res["iou_per_class"] = {
                        name: (None if v != v else v)  # NaN (class absent) as null in JSON
                        for name, v in zip(d.seg_train.seg_classes, per_class[-1])}
            out[name] = res
        return out


def _plots(records: list[dict], out: Path, config: ImagePretrainConfig) -> None:
    from recipes.common.plots import plot_curves, plot_spectra

    train = [r for r in records if r.get("kind") is None and "loss" in r]
    diag = [r for r in records if r.get("kind") == "diagnostics"]
    plot_curves(train, ["loss", "lr"], out / "training.png",
                title=f"{config.method}: pre-training")
    plot_curves(diag, ["positive_cosine", "negative_cosine", "alignment", "uniformity",
                       "feature_effective_rank", "projection_effective_rank", "knn_top1"],
                out / "diagnostics.png", title=f"{config.method}: learning behaviour "
                "(held-out images)")
    if diag:
        spectra = {}
        for r, when in ((diag[0], "start"), (diag[-1], "end")):
            for space in ("feature", "projection"):
                if r.get(f"{space}_spectrum"):
                    spectra[f"{space}, step {r['step']} ({when})"] = r[f"{space}_spectrum"]
        plot_spectra(spectra, out / "spectra.png",
                     title=f"{config.method}: singular values of held-out embeddings")


def _report(summary: dict[str, Any], evaluation: dict[str, Any], log: RunLog) -> None:
    log("")
    log(f"pre-training: {summary['steps_done']} of {summary['steps']} steps in "
        f"{summary['train_seconds']}s ({summary['images_per_second']} images/s), final loss "
        f"{summary['final_loss']}" + (" (stopped by the time limit)"
                                      if summary["stopped_by_time_limit"] else ""))
    keys = ["knn_top1", "linear_top1", "miou"]
    rows = []
    for name in ("trained", "random_init", "raw_pixels"):
        if name in evaluation:
            rows.append([name] + [f"{100 * evaluation[name][k]:.1f}%" if k in evaluation[name]
                                  else "-" for k in keys])
    log(f"\nevaluation on the held-out split ({evaluation['meta']['eval_split']})")
    log(format_table(["encoder"] + keys, rows))
    log(f"\ntotal wall time {summary.get('total_seconds')}s")


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(run, argv, (ValueError, FileNotFoundError, FloatingPointError))


if __name__ == "__main__":
    sys.exit(main())
