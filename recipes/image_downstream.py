"""How fast does each pre-training converge downstream? Binary classification, many-class
classification and segmentation, with 1 %, 10 % and 100 % of the labels, on the frozen encoder
and fine-tuned, for every pre-trained checkpoint given and for the same backbone at random init;
the metric is recorded after every epoch.

    python -m recipes.simclr_images --out runs/simclr          # pre-train first
    python -m recipes.image_downstream --checkpoints runs/simclr
    python -m recipes.image_downstream --checkpoints runs/simclr,runs/byol --fractions 0.1,1 \\
        --modes frozen --tasks multiclass,segmentation --epochs 20

Each checkpoint is a pre-training run folder (or its ``checkpoint.pt``); its configuration says
which backbone to build and which data it was trained on, and by default the study uses the same
data (``--data`` / ``--seg-data`` to use other folders). ``random_init`` is the first
checkpoint's backbone at the exact weights its pre-training started from.

Tasks: ``multiclass`` (the class labels), ``binary`` (the generated shapes' binary label, or,
for class folders, ``--binary-classes a,b``: those classes against the rest), ``segmentation``
(a light decoder on the backbone's feature maps, mIoU). Label fractions are class-stratified
random subsets of the training split (at least one image per class), the same subset for every
pre-training. ``frozen`` trains only the head (on features computed once); ``finetune`` trains
the encoder and the head with augmentation.

Outputs in ``--out``: config.json, downstream.json (every curve), downstream_<task>.png (one
panel per mode and fraction, one line per pre-training), train.log, and a table at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from recipes.common import distributed as D
from recipes.common.checkpoint import load_checkpoint
from recipes.common.cli import cli_main
from recipes.common.config import apply_values, check_int, read_config_file
from recipes.common.logging import RunLog, format_table
from recipes.common.rundir import prepare_run_dir, write_config
from recipes.image_setup import ImagePretrainConfig, MethodSettings, cifar_stem, load_data

TASKS = ("binary", "multiclass", "segmentation")
MODES = ("frozen", "finetune")


@dataclass
class DownstreamConfig:
    checkpoints: list[str] = field(default_factory=list)
    data: str | None = None
    seg_data: str | None = None
    binary_classes: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    modes: list[str] = field(default_factory=lambda: list(MODES))
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    epochs: int = 8
    frozen_lr: float = 1e-2
    finetune_lr: float = 1e-3
    segmentation_lr: float = 1e-2
    batch_size: int = 128
    out: str = "runs/image_downstream"
    device: str = "auto"
    seed: int = 0
    threads: int = 0
    workers: int = 0
    strict: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipes.image_downstream",
        description="Downstream convergence of pre-trained image encoders against random init: "
        "binary, many-class and segmentation heads with label fractions, frozen and "
        "fine-tuned, the metric after every epoch; curves in one JSON and one plot per task.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoints", help="comma-separated pre-training run folders of "
                   "recipes.simclr_images (or their checkpoint.pt files); required.")
    p.add_argument("--data", help="class folders to use instead of the first checkpoint's "
                   "training data (<data>/train/<class>/..., <data>/test/<class>/...).")
    p.add_argument("--seg-data", help="segmentation folders to use instead of the first "
                   "checkpoint's (<seg-data>/{train,test}/{images,masks}).")
    p.add_argument("--binary-classes", help="for class folders: comma-separated class names "
                   "that form the positive class of the binary task (the rest are negative).")
    p.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASKS)} (default all).")
    p.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)} (default both).")
    p.add_argument("--fractions", help="comma-separated label fractions in (0, 1] "
                   "(default 0.01,0.1,1).")
    p.add_argument("--epochs", type=int, help="training epochs of every downstream run (the "
                   "metric is recorded after each; default 8).")
    p.add_argument("--batch-size", type=int, help="downstream batch size (default 128).")
    p.add_argument("--device", help="'cpu', 'cuda', 'cuda:N' or 'auto'.")
    p.add_argument("--seed", type=int, help="seed of the label subsets, heads and batches.")
    p.add_argument("--workers", type=int, help="image decoding workers for folder data.")
    p.add_argument("--strict", action="store_true", default=None, help="an unreadable image is "
                   "an error instead of a skipped file with a warning.")
    p.add_argument("--config", help="YAML or JSON file of DownstreamConfig fields; flags "
                   "override it.")
    p.add_argument("--out", help="output folder (default runs/image_downstream).")
    p.add_argument("--overwrite", action="store_true", help="replace an existing study in --out.")
    p.add_argument("--quiet", action="store_true", help="no progress display.")
    return p


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [s.strip() for s in text.split(",") if s.strip()]


def parse_fractions(values: Sequence[Any]) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = float("nan")
        if not (math.isfinite(f) and 0.0 < f <= 1.0):
            raise ValueError(f"--fractions: {v!r} is not a label fraction; expected numbers in "
                             "(0, 1], e.g. 0.01,0.1,1")
        out.append(f)
    return out


def config_from_args(args: argparse.Namespace) -> DownstreamConfig:
    config = DownstreamConfig()
    if args.config:
        apply_values(config, read_config_file(args.config), "config.")
    overrides = {
        "checkpoints": _split(args.checkpoints), "data": args.data, "seg_data": args.seg_data,
        "binary_classes": _split(args.binary_classes), "tasks": _split(args.tasks),
        "modes": _split(args.modes), "fractions": _split(args.fractions), "epochs": args.epochs,
        "batch_size": args.batch_size, "device": args.device, "seed": args.seed,
        "workers": args.workers, "strict": args.strict, "out": args.out,
    }
    apply_values(config, {k: v for k, v in overrides.items() if v is not None}, "--")
    validate(config)
    return config


def validate(config: DownstreamConfig) -> None:
    if not config.checkpoints:
        raise ValueError("--checkpoints: expected at least one pre-training run folder or "
                         "checkpoint (e.g. --checkpoints runs/simclr_images)")
    for c in config.checkpoints:
        if not _checkpoint_path(c).is_file():
            raise ValueError(f"--checkpoints: {c!r} is neither a run folder with a "
                             "checkpoint.pt nor a checkpoint file")
    for name, allowed in (("tasks", TASKS), ("modes", MODES)):
        values = getattr(config, name)
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"--{name}={','.join(values)!r}: expected a comma-separated subset "
                             f"of {','.join(allowed)}")
    config.fractions = parse_fractions(config.fractions)
    if not config.fractions:
        raise ValueError("--fractions: expected at least one label fraction in (0, 1]")
    for name in ("epochs", "batch_size"):
        check_int(f"--{name.replace('_', '-')}", getattr(config, name))
    for name in ("data", "seg_data"):
        v = getattr(config, name)
        if v is not None and not Path(v).is_dir():
            raise ValueError(f"--{name.replace('_', '-')}={v!r}: no such folder")


def _checkpoint_path(path: str) -> Path:
    p = Path(path)
    return p / "checkpoint.pt" if p.is_dir() else p


def _pretrain_config(saved: dict[str, Any]) -> ImagePretrainConfig:
    config = ImagePretrainConfig()
    values = dict(saved)
    settings = values.pop("settings", {})
    apply_values(config, values, "checkpoint config.")
    config.settings = MethodSettings(**settings)
    return config


def _encoder(config: ImagePretrainConfig, state: dict[str, torch.Tensor]):
    from modalities.image.backbones import build_backbone

    enc = build_backbone(config.backbone, cifar_stem=cifar_stem(config), width=config.width)
    enc.load_state_dict(state)
    return enc


def label_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A class-stratified random subset of ``round(fraction * N)`` indices (at least one per
    class), sorted; the whole split for ``fraction == 1``."""
    n = labels.numel()
    if fraction >= 1.0:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        k = max(1, int(round(fraction * idx.numel())))
        chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:k]])
    return torch.cat(chosen).sort().values


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    info = D.DistInfo()
    device = D.resolve_device(config.device, info, threads=config.threads)
    started = time.perf_counter()

    # ---- checkpoints and their configurations, checked before any data is read
    encoders: dict[str, tuple[ImagePretrainConfig, dict]] = {}
    first_config = None
    for c in config.checkpoints:
        state = load_checkpoint(_checkpoint_path(c))
        pc = _pretrain_config(state["config"])
        enc_state = state["encoder"]
        name = f"{pc.method} ({Path(c).name})" if len(config.checkpoints) > 1 else pc.method
        if name in encoders:
            name = f"{name} [{len(encoders)}]"
        encoders[name] = (pc, enc_state)
        if first_config is None:
            first_config = pc
            encoders_random = ("random_init", (pc, state["initial_encoder"]))
        elif pc.image_size != first_config.image_size:
            raise ValueError(f"--checkpoints: {c!r} was trained at image_size={pc.image_size}, "
                             f"the first at {first_config.image_size}; expected one image size")
    encoders = {**encoders, encoders_random[0]: encoders_random[1]}
    data_config = dataclasses.replace(
        first_config, data=config.data if config.data is not None else first_config.data,
        seg_data=config.seg_data if config.seg_data is not None else first_config.seg_data,
        strict=config.strict, workers=config.workers)
    if config.data is not None and config.seg_data is None:
        data_config.seg_data = None
    out = prepare_run_dir(config.out, resume=False, overwrite=args.overwrite)
    log = RunLog(out / "train.log", quiet=args.quiet)
    write_config(out, config.to_dict())

    data = load_data(data_config, progress=not args.quiet)
    log(f"downstream study on {device}: {data.source}")
    log(f"pre-trainings: {', '.join(encoders)}; tasks {config.tasks}, modes {config.modes}, "
        f"fractions {config.fractions}, {config.epochs} epochs each")
    tasks = _task_data(config, data)
    for task in config.tasks:
        if task not in tasks:
            raise ValueError(f"--tasks includes {task!r} but {_why_missing(task, data)}")

    from modalities.image.transforms import eval_transform, simclr_transform
    from recipes.common.evaluation import train_classifier, train_segmentation

    size = first_config.image_size
    results: dict[str, Any] = {"tasks": {}, "meta": {
        "source": data.source, "eval_split": data.eval_split, "epochs": config.epochs,
        "device": str(device), "pretrainings": list(encoders)}}
    n_runs = len(config.tasks) * len(config.modes) * len(config.fractions) * len(encoders)
    bar = log.progress(n_runs, "downstream runs", unit="run", every=1)
    for task in config.tasks:
        train_x, train_y, test_x, test_y, n_classes, metric = tasks[task]
        task_res: dict[str, Any] = {"metric": metric, "num_classes": n_classes, "panels": {}}
        for mode in config.modes:
            for fraction in config.fractions:
                # the same subset for every pre-training; stratified on the class labels
                strat = data.train.labels if task != "segmentation" else \
                    torch.zeros(train_x.shape[0], dtype=torch.long)
                idx = label_subset(strat, fraction, config.seed)
                panel = f"{mode}, {_pct(fraction)} labels ({idx.numel()} images)"
                curves = {}
                for name, (pc, state) in encoders.items():
                    enc = _encoder(pc, state)
                    t0 = time.perf_counter()
                    if task == "segmentation":
                        curve = train_segmentation(
                            enc, n_classes, (train_x[idx], train_y[idx]), (test_x, test_y),
                            epochs=config.epochs, frozen=mode == "frozen",
                            lr=config.segmentation_lr if mode == "frozen" else config.finetune_lr,
                            batch_size=config.batch_size, ignore_index=data.seg_train.ignore_index,
                            device=device, seed=config.seed, progress=False)
                    else:
                        curve = train_classifier(
                            enc, enc.feature_dim, (train_x[idx], train_y[idx]), (test_x, test_y),
                            num_classes=n_classes, epochs=config.epochs,
                            frozen=mode == "frozen",
                            lr=config.frozen_lr if mode == "frozen" else config.finetune_lr,
                            batch_size=config.batch_size,
                            train_transform=simclr_transform(size, crop_scale=(0.5, 1.0),
                                                             jitter_p=0.0, gray_p=0.0),
                            eval_transform=eval_transform(size), device=device,
                            seed=config.seed, progress=False)
                    curves[name] = {"epochs": list(curve.epochs),
                                    "metric": [float(m) for m in curve.metric],
                                    "seconds": round(time.perf_counter() - t0, 1)}
                    bar.update(1, task=task, mode=mode, fraction=fraction, run=name,
                               final=curves[name]["metric"][-1])
                task_res["panels"][panel] = {"mode": mode, "fraction": fraction,
                                             "n_train": int(idx.numel()), "curves": curves}
        results["tasks"][task] = task_res
        (out / "downstream.json").write_text(json.dumps(results, indent=2) + "\n")
    bar.close()
    _plots(results, out)
    results["meta"]["total_seconds"] = round(time.perf_counter() - started, 1)
    (out / "downstream.json").write_text(json.dumps(results, indent=2) + "\n")
    _report(results, log)
    return {"out": str(out), "results": results}


def _pct(f: float) -> str:
    return f"{100 * f:g}%"


def _why_missing(task: str, data) -> str:
    if task == "binary":
        return ("the data has no binary label; expected the generated shapes or "
                "--binary-classes naming the positive classes")
    return "there is no segmentation data; expected --seg-data or the generated shapes"


def _task_data(config: DownstreamConfig, data) -> dict[str, tuple]:
    """``task -> (train images, train targets, test images, test targets, classes, metric)``."""
    tasks: dict[str, tuple] = {}
    tr, te = data.train, data.test
    tasks["multiclass"] = (tr.images, tr.labels, te.images, te.labels, len(tr.classes), "top1")
    if config.binary_classes:
        unknown = [c for c in config.binary_classes if c not in tr.classes]
        if unknown:
            raise ValueError(f"--binary-classes: {unknown} are not classes of the data; expected "
                             f"names among {tr.classes}")
        positive = torch.tensor([tr.classes.index(c) for c in config.binary_classes])
        tasks["binary"] = (tr.images, torch.isin(tr.labels, positive).long(), te.images,
                           torch.isin(te.labels, positive).long(), 2, "top1")
    elif tr.binary is not None and te.binary is not None:
        tasks["binary"] = (tr.images, tr.binary, te.images, te.binary, 2, "top1")
    if data.seg_train is not None:
        tasks["segmentation"] = (data.seg_train.images, data.seg_train.masks,
                                 data.seg_test.images, data.seg_test.masks,
                                 len(data.seg_train.seg_classes), "miou")
    return tasks


def _plots(results: dict[str, Any], out: Path) -> None:
    from recipes.common.plots import plot_downstream

    for task, res in results["tasks"].items():
        panels = {panel: {name: (c["epochs"], c["metric"]) for name, c in p["curves"].items()}
                  for panel, p in res["panels"].items()}
        plot_downstream(panels, out / f"downstream_{task}.png",
                        title=f"{task}: {res['metric']} on the held-out split after each epoch")


def _report(results: dict[str, Any], log: RunLog) -> None:
    names = results["meta"]["pretrainings"]
    rows = []
    for task, res in results["tasks"].items():
        for panel, p in res["panels"].items():
            rows.append([task, p["mode"], _pct(p["fraction"])]
                        + [f"{100 * p['curves'][n]['metric'][-1]:.1f}%" for n in names])
    log(f"\ndownstream metric after {results['meta']['epochs']} epochs "
        "(top-1 for classification, mIoU for segmentation)")
    log(format_table(["task", "mode", "labels"] + names, rows))
    log(f"\ntotal wall time {results['meta'].get('total_seconds')}s")


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
