"""What the image recipes share: the run configuration (one dataclass, presets, validation
before any work) and the datasets it names (class folders, segmentation folders, or the
generated shapes).

Presets:
- ``cpu-quick``: what fits the no-argument run in 10 minutes on a 2-core CPU: the generated
  shapes (8000 train / 1000 test images of 32 px, 10 classes, masks), the small CNN, batch 256,
  crops of at least 25 % of the image (SimCLR's 8 % often misses the one shape of a 32 px
  scene), AdamW 2e-3 with a cosine schedule, at most 300 s of pre-training, then kNN, linear
  probe and segmentation evaluation (a 2000-image subset, 4 epochs) of the trained encoder and
  of the same backbone at random init.
- ``cifar``: solo-learn's / lightly's CIFAR-10 settings for ResNet-18 (CIFAR stem): batch 256,
  SGD with momentum 0.9 (LARS in solo-learn; plain SGD here), lr 0.3, weight decay 1e-4,
  10 warm-up epochs, cosine to zero, 200 epochs (lightly's kNN anchor), projection hidden 2048.
- ``auto`` (the default): ``cifar`` on CUDA, ``cpu-quick`` on CPU; the resolved preset is
  printed at start.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes.common.config import check_int, check_number, layered_config

PRESETS = ("auto", "cpu-quick", "cifar")
OPTIMIZERS = ("adamw", "sgd")
LABELLED_BATCHES = ("triplet", "nca", "drlim")  # need several images per class in a batch
TEMPERATURE_METHODS = ("simclr", "moco", "supcon", "nca")  # softmax losses with a temperature


@dataclass
class MethodSettings:
    """Mirrors :class:`modalities.image.methods.MethodConfig` (copied into it at build time;
    kept here as plain values so a config file can set them)."""

    projection_dim: int = 128
    projection_hidden: int = 512
    temperature: float = 0.2
    queue_size: int = 4096
    momentum: float = 0.99
    momentum_final: float = 1.0
    triplet_margin: float = 0.2
    drlim_margin: float = 1.0
    barlow_lambda: float = 0.0051


@dataclass
class ImagePretrainConfig:
    preset: str = "auto"
    # data
    data: str | None = None  # class folders: <data>/{train,test[,val]}/<class>/*.png
    seg_data: str | None = None  # segmentation folders: <seg_data>/{train,test}/{images,masks}
    out: str = "runs/simclr_images"
    image_size: int = 32
    strict: bool = False
    ignore_index: int = 255
    synthetic_train: int = 8000  # generated data (no --data)
    synthetic_test: int = 1000
    workers: int = 0
    crop_min_scale: float = 0.08  # RandomResizedCrop's smallest area fraction (SimCLR: 0.08)
    # model and method
    method: str = "simclr"
    backbone: str = "resnet18"
    cifar_stem: bool | None = None  # None: CIFAR stem when image_size <= 64
    width: int = 32  # small_cnn channels
    settings: MethodSettings = field(default_factory=MethodSettings)
    # optimisation
    batch_size: int = 256  # images per step and per process (each gives n_views views)
    chunk_size: int = 0  # gradient caching: views embedded per chunk; 0 = off
    epochs: int = 200
    steps: int = 0  # optimizer steps; 0: epochs x steps per epoch
    stop_after: int = 0  # stop (checkpointed) after this many steps in total; 0: run to the end
    optimizer: str = "sgd"
    lr: float = 0.3
    weight_decay: float = 1e-4
    warmup_epochs: float = 10.0
    train_seconds: float = 0.0  # stop pre-training after this long (checkpointed); 0: no limit
    device: str = "auto"
    seed: int = 0
    threads: int = 0
    # logging and evaluation
    log_every: int = 10
    checkpoint_every: int = 500
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_every_epochs: int = 1
    diagnostics_every: int = 0  # steps; 0: at every kNN evaluation
    diagnostics_samples: int = 512
    linear_probe: bool = True
    segmentation_epochs: int = 8  # frozen-backbone segmentation head; 0: skip
    segmentation_train_images: int = 0  # images the head trains on (random subset); 0: all
    segmentation_head_width: int = 64
    eval_batch_size: int = 512

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_values(name: str) -> dict[str, Any]:
    if name == "cpu-quick":
        return {
            "backbone": "small_cnn", "width": 32, "batch_size": 256, "epochs": 100,
            "crop_min_scale": 0.25,
            "optimizer": "adamw", "lr": 2e-3, "weight_decay": 1e-4, "warmup_epochs": 1.0,
            "train_seconds": 300.0, "knn_every_epochs": 2, "checkpoint_every": 100,
            "segmentation_epochs": 4, "segmentation_train_images": 2000,
            "segmentation_head_width": 32, "eval_batch_size": 500,
            "settings": {"projection_hidden": 256, "queue_size": 2048},
        }
    if name == "cifar":
        return {"backbone": "resnet18", "batch_size": 256, "epochs": 200, "optimizer": "sgd",
                "lr": 0.3, "weight_decay": 1e-4, "warmup_epochs": 10.0, "workers": 8,
                "settings": {"projection_hidden": 2048}}
    raise ValueError(f"preset={name!r}: expected one of {PRESETS}")


def build_config(file_values: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None, *, cuda: bool = False
                 ) -> ImagePretrainConfig:
    """The preset, then ``file_values``, then ``overrides`` (None values ignored); validated."""
    config = layered_config(ImagePretrainConfig(), PRESETS, preset_values, file_values,
                            overrides, cuda=cuda, gpu_preset="cifar", cpu_preset="cpu-quick")
    config.settings = MethodSettings(**dataclasses.asdict(config.settings))
    validate(config)
    return config


def validate(config: ImagePretrainConfig) -> None:
    """Every setting checked before any data is read or any step is trained."""
    from modalities.image.backbones import BACKBONES
    from modalities.image.methods import METHODS

    if config.method not in METHODS:
        raise ValueError(f"method={config.method!r}: expected one of {METHODS}")
    if config.backbone not in BACKBONES:
        raise ValueError(f"backbone={config.backbone!r}: expected one of {BACKBONES}")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={config.optimizer!r}: expected one of {OPTIMIZERS}")
    for name in ("image_size", "batch_size", "epochs", "log_every", "checkpoint_every", "knn_k",
                 "knn_every_epochs", "diagnostics_samples", "eval_batch_size", "width",
                 "synthetic_train", "synthetic_test", "segmentation_head_width"):
        check_int(name, getattr(config, name))
    for name in ("chunk_size", "steps", "stop_after", "workers", "threads", "diagnostics_every",
                 "segmentation_epochs", "segmentation_train_images", "seed"):
        check_int(name, getattr(config, name), zero=True)
    if config.image_size < 16:
        raise ValueError(f"image_size={config.image_size!r}: expected at least 16 pixels")
    for name in ("lr", "knn_temperature"):
        check_number(name, getattr(config, name))
    for name in ("weight_decay", "warmup_epochs", "train_seconds"):
        check_number(name, getattr(config, name), zero=True)
    if not (isinstance(config.crop_min_scale, (int, float)) and 0 < config.crop_min_scale <= 1):
        raise ValueError(f"crop_min_scale={config.crop_min_scale!r}: expected a number in (0, 1]")
    s = config.settings
    for name in ("projection_dim", "projection_hidden", "queue_size"):
        check_int(f"settings.{name}", getattr(s, name))
    for name in ("temperature", "triplet_margin", "drlim_margin", "barlow_lambda"):
        check_number(f"settings.{name}", getattr(s, name))
    for name in ("momentum", "momentum_final"):
        v = getattr(s, name)
        if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            raise ValueError(f"settings.{name}={v!r}: expected a number in [0, 1]")
    if not isinstance(config.ignore_index, int) or not 0 <= config.ignore_index <= 255:
        raise ValueError(f"ignore_index={config.ignore_index!r}: expected an integer in [0, 255]")
    for name in ("data", "seg_data"):
        value = getattr(config, name)
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"{name}={value!r}: no such folder")
    if config.method in LABELLED_BATCHES and config.batch_size % 2:
        raise ValueError(f"batch_size={config.batch_size!r}: --method {config.method} draws P "
                         "classes x K images per batch; expected an even batch size")


def cifar_stem(config: ImagePretrainConfig) -> bool:
    return config.image_size <= 64 if config.cifar_stem is None else bool(config.cifar_stem)


def parse_temperatures(text: str) -> list[float]:
    """``"0.05,0.1,0.5,1"`` -> [0.05, 0.1, 0.5, 1.0]; each must be a positive number."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--temperature={text!r}: {part!r} is not a positive number; "
                             "expected one temperature or a comma-separated list")
        values.append(value)
    if len(set(values)) != len(values):
        raise ValueError(f"--temperature={text!r}: expected distinct temperatures")
    return values


# ------------------------------------------------------------------------------------------
# data


@dataclass
class ImageData:
    """The splits a run uses: ``train`` and ``test`` classification sets (``test`` is the
    ``val`` split when the folder has one, so the test split stays untouched), and optional
    segmentation sets; ``source`` says where they came from."""

    train: Any
    test: Any
    seg_train: Any = None
    seg_test: Any = None
    source: str = ""
    skipped: list = field(default_factory=list)
    eval_split: str = "test"


def load_data(config: ImagePretrainConfig, *, progress: bool = False) -> ImageData:
    """Class folders (``--data``) or the generated shapes; segmentation folders
    (``--seg-data``), or the generated shapes' masks when the classification data is generated
    too. Images are decoded into memory at ``image_size``."""
    if config.data is None:
        from modalities.image.synthetic import SHAPES_VERSION, generate_shapes

        train = generate_shapes(config.synthetic_train, size=config.image_size, seed=config.seed,
                                split="train")
        test = generate_shapes(config.synthetic_test, size=config.image_size, seed=config.seed,
                               split="test")
        data = ImageData(train, test, source=f"generated shapes {SHAPES_VERSION} "
                         f"({len(train)} train / {len(test)} test, {config.image_size} px, "
                         f"{len(train.classes)} classes)")
        if config.seg_data is None:
            data.seg_train, data.seg_test = train, test
    else:
        from modalities.image.data import class_folder_splits, load_class_folders

        splits = class_folder_splits(config.data)
        kw = dict(size=config.image_size, strict=config.strict, workers=config.workers,
                  progress=progress)
        train, skipped = load_class_folders(config.data, "train", **kw)
        eval_split = "val" if "val" in splits else "test"
        test, skipped_test = load_class_folders(config.data, eval_split, classes=train.classes,
                                                **kw)
        data = ImageData(train, test, source=f"{config.data} ({len(train)} train / {len(test)} "
                         f"{eval_split}, {len(train.classes)} classes)",
                         skipped=skipped + skipped_test, eval_split=eval_split)
    if config.seg_data is not None:
        from modalities.image.data import load_segmentation_folders

        kw = dict(size=config.image_size, ignore_index=config.ignore_index, strict=config.strict,
                  workers=config.workers, progress=progress)
        seg_train, s1 = load_segmentation_folders(config.seg_data, "train", **kw)
        seg_test, s2 = load_segmentation_folders(
            config.seg_data, "test", num_classes=len(seg_train.seg_classes), **kw)
        data.seg_train, data.seg_test = seg_train, seg_test
        data.skipped += s1 + s2
        data.source += f"; segmentation {config.seg_data} ({len(seg_train)} / {len(seg_test)})"
    return data
