"""What the CLIP recipe (``python -m recipes.clip_pairs``) is configured with: one dataclass,
presets, validation of every setting before any data is read, prompt templates, and the data
it names (caption folders through :func:`modalities.multimodal.data.load_pairs`, or the
generated captioned scenes).

Presets:
- ``cpu-quick``: what fits the no-argument run in 10 minutes on a 2-core CPU: the generated
  scenes (6000 train / 500 validation / 1000 test images of 32 px, 2-5 captions each, and a
  zero-shot folder of 36 colour-shape classes x 20 images), the small CNN image tower and
  BERT-tiny, projection 64, max 24 tokens, batch 128, AdamW 2e-3 with 50 warm-up steps and a
  cosine schedule over 30 epochs (1380 steps) within a 360 s training budget, then retrieval,
  zero-shot and linear-probe evaluation of the trained model and of its exact initial weights.
  Measured on this 2-core machine with nothing else running (commit of the README's table):
  all 1380 steps in 226 s (782 pairs/s), 4 min 5 s in all; test i2t R@1 67.6 % / t2i R@1
  54.5 % (chance 0.1 %), zero-shot top-1 98.1 % (90.0 % on the held-out colour-shape
  combinations; chance 2.8 %), linear probe 98.9 % (initial weights 30.0 %). On a busy machine
  the budget ends training early (278 steps at load average 5: zero-shot 66.9 %, held-out
  42.5 %). The ViT-tiny image tower learnt far less in the time (about 7 times slower a step on
  CPU, and it collapsed at this learning rate: effective rank about 2 after 400 steps), so the
  default is the small CNN, whose model is saved in the tilecontrast format
  (``--image-model vit-tiny`` exports to transformers).
- ``gpu``: OpenCLIP-style settings for real caption data on one GPU: ViT-small and
  BERT-small towers, batch 1024, AdamW (beta2 0.98, eps 1e-6, weight decay 0.2 on matrices
  only, as CLIP), lr 5e-4 with 500 warm-up steps, 30 epochs.
- ``auto`` (the default): ``gpu`` on CUDA, ``cpu-quick`` on CPU; the resolved preset is
  printed at start.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipes.common.config import check_number, layered_config

PRESETS = ("auto", "cpu-quick", "gpu")
LOSSES = ("clip", "siglip")
POOLINGS = ("pooler", "cls", "mean")
BACKENDS = ("auto", "triton", "blockwise", "dense")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass
class ClipConfig:
    preset: str = "auto"
    # data
    data: str | None = None            # caption data (load_pairs); None: the generated scenes
    zeroshot: str | None = None        # labelled class folders; None: the scenes' (generated)
    templates: str | None = None       # a file (one template a line) or ';'-separated; None: CLIP's
    skip_bad_images: bool = False
    image_size: int = 32
    workers: int = 0
    scenes_train: int = 6000           # generated scenes (no --data)
    scenes_validation: int = 500
    scenes_test: int = 1000
    scenes_zeroshot_per_class: int = 20
    scenes_seed: int = 0               # the data's seed, independent of the training seed
    scenes_cache: str | None = None    # None: <out>/scenes
    crop_min_scale: float = 1.0        # mild random resized crop (no flips); 1.0: none
    # model
    text_model: str = "bert-tiny"      # a name of modalities.text.TEXT_SIZES or a local directory
    image_model: str = "small_cnn"     # modalities.multimodal.IMAGE_TOWERS or a local ViT directory
    text_pooling: str = "pooler"
    max_length: int = 32
    vocab_size: int = 4000             # WordPiece vocabulary trained when the text model has none
    tokenizer: str | None = None       # a saved tokenizer folder to use instead (e.g. a run's)
    projection_dim: int = 128
    loss: str = "clip"
    max_logit_scale: float = 100.0
    backend: str = "auto"              # the loss's backend
    # optimisation
    batch_size: int = 256              # pairs per step over all processes
    chunk_size: int = 0                # gradient caching: pairs per chunk and process; 0: off
    epochs: int = 30
    steps: int = 0                     # optimizer steps; 0: epochs x steps per epoch
    stop_after: int = 0                # stop (checkpointed) after this many steps in total
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100                  # warm-up steps (linear), then cosine to zero
    train_seconds: float = 0.0         # stop training after this long (checkpointed); 0: no limit
    device: str = "auto"
    seed: int = 0
    threads: int = 0
    # logging and evaluation
    out: str = "runs/clip_pairs"
    log_every: int = 10
    eval_every: int = 200              # validation retrieval and diagnostics every this many steps
    checkpoint_every: int = 200
    diagnostics_samples: int = 512
    eval_batch_size: int = 512
    linear_probe: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CPU_QUICK: dict[str, Any] = {
    "image_model": "small_cnn", "text_model": "bert-tiny", "image_size": 32, "max_length": 24,
    "vocab_size": 1000, "projection_dim": 64, "batch_size": 128, "epochs": 30,
    "lr": 2e-3, "weight_decay": 0.05, "warmup": 50, "train_seconds": 360.0,
    "eval_every": 50, "checkpoint_every": 100, "crop_min_scale": 1.0,
}

GPU: dict[str, Any] = {
    "image_model": "vit-small", "text_model": "bert-small", "max_length": 32, "vocab_size": 8000,
    "projection_dim": 256, "batch_size": 1024, "epochs": 30, "lr": 5e-4, "weight_decay": 0.2,
    "warmup": 500, "eval_every": 500, "checkpoint_every": 500, "workers": 8,
    "scenes_train": 50000, "scenes_validation": 1000, "scenes_test": 2000,
}


def preset_values(name: str) -> dict[str, Any]:
    if name == "cpu-quick":
        return dict(CPU_QUICK)
    if name == "gpu":
        return dict(GPU)
    raise ValueError(f"preset={name!r}: expected one of {PRESETS}")


def build_config(file_values: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None, *, cuda: bool = False) -> ClipConfig:
    """The preset, then ``file_values`` (``--config``), then ``overrides`` (flags; None values
    ignored); validated."""
    config = layered_config(ClipConfig(), PRESETS, preset_values, file_values, overrides,
                            cuda=cuda, gpu_preset="gpu", cpu_preset="cpu-quick")
    validate(config)
    return config


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: expected an integer >= {low}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(config: ClipConfig) -> None:
    """Every setting checked before any data is read or any model is built; errors name the flag,
    the value and what was expected."""
    from modalities.text.tower import TEXT_SIZES, check_model_dir

    for name in ("image_size", "max_length", "vocab_size", "projection_dim", "batch_size",
                 "epochs", "log_every", "eval_every", "checkpoint_every", "diagnostics_samples",
                 "eval_batch_size", "scenes_train", "scenes_validation", "scenes_test",
                 "scenes_zeroshot_per_class"):
        _int(_flag(name), getattr(config, name), 1)
    for name in ("chunk_size", "steps", "stop_after", "warmup", "workers", "threads", "seed",
                 "scenes_seed"):
        _int(_flag(name), getattr(config, name), 0)
    check_number("--lr", config.lr, zero=False)
    check_number("--max-logit-scale", config.max_logit_scale, zero=False)
    for name in ("weight_decay", "train_seconds"):
        check_number(_flag(name), getattr(config, name), zero=True)
    if config.image_size < 16:
        raise ValueError(f"--image-size={config.image_size!r}: expected at least 16 pixels")
    if config.max_length < 4:
        raise ValueError(f"--max-length={config.max_length!r}: expected at least 4 tokens "
                         "([CLS], a word, [SEP] and room to spare)")
    if config.vocab_size < 16:
        raise ValueError(f"--vocab-size={config.vocab_size!r}: expected at least 16 (5 special "
                         "tokens and the words)")
    if not (isinstance(config.crop_min_scale, (int, float)) and not isinstance(
            config.crop_min_scale, bool) and 0.25 <= config.crop_min_scale <= 1):
        raise ValueError(f"crop_min_scale={config.crop_min_scale!r}: expected a number in "
                         "[0.25, 1] (captions name positions: crops must stay mild; 1 = no crop)")
    if config.loss not in LOSSES:
        raise ValueError(f"--loss={config.loss!r}: expected one of {LOSSES}")
    if config.text_pooling not in POOLINGS:
        raise ValueError(f"--text-pooling={config.text_pooling!r}: expected one of {POOLINGS}")
    if config.backend not in BACKENDS:
        raise ValueError(f"backend={config.backend!r}: expected one of {BACKENDS}")
    if not isinstance(config.device, str) or not (
            config.device in ("auto", "cpu", "cuda") or config.device.startswith("cuda:")):
        raise ValueError(f"--device={config.device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if config.stop_after and config.steps and config.stop_after > config.steps:
        raise ValueError(f"--stop-after={config.stop_after}: expected at most --steps="
                         f"{config.steps}")
    if not isinstance(config.text_model, str) or not config.text_model:
        raise ValueError(f"--text-model={config.text_model!r}: expected a name of "
                         f"{tuple(TEXT_SIZES)} or a local directory")
    if config.text_model not in TEXT_SIZES:
        check_model_dir(config.text_model, "--text-model")
    _check_image_model(config.image_model)
    for name in ("data", "zeroshot"):
        value = getattr(config, name)
        if value is not None and not Path(value).exists():
            raise ValueError(f"{_flag(name)}={value!r}: no such file or folder")
    if config.zeroshot is not None and not Path(config.zeroshot).is_dir():
        raise ValueError(f"--zeroshot={config.zeroshot!r}: expected a folder of class folders "
                         "(<dir>/<class name>/*.png)")
    if config.tokenizer is not None:
        from modalities.text.tokenizer import has_tokenizer

        if not has_tokenizer(config.tokenizer):
            raise ValueError(f"--tokenizer={config.tokenizer!r}: no saved tokenizer there "
                             "(expected a folder with tokenizer.json or vocab.txt)")
    if config.templates is not None:
        parse_templates(config.templates)
    if config.scenes_cache is not None and Path(config.scenes_cache).exists() \
            and not Path(config.scenes_cache).is_dir():
        raise ValueError(f"scenes_cache={config.scenes_cache!r} is a file; expected a folder")


def _check_image_model(spec: Any) -> None:
    try:
        from modalities.multimodal.towers import IMAGE_TOWERS
    except ImportError:  # the towers module is not there: the spec's names
        IMAGE_TOWERS = ("small_cnn", "resnet18", "resnet50", "vit-tiny", "vit-small")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--image-model={spec!r}: expected one of {IMAGE_TOWERS} or a local "
                         "ViT directory")
    if spec in IMAGE_TOWERS:
        return
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"--image-model={spec!r}: neither one of {IMAGE_TOWERS} nor an "
                         "existing directory (models are never downloaded: give a local "
                         "save_pretrained ViT folder)")
    from modalities.text.tower import check_model_dir

    check_model_dir(path, "--image-model")


def parse_templates(text: str) -> list[str]:
    """Prompt templates from a file (one a line; blank lines and lines starting with '#'
    ignored) or a ';'-separated string; each must hold exactly one ``{}``.

    Example:
        >>> parse_templates("a photo of a {}.;a picture of a {}.")
        ['a photo of a {}.', 'a picture of a {}.']
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--templates={text!r}: expected a file or ';'-separated templates "
                         "such as 'a photo of a {}.'")
    path = Path(text)
    if "{}" not in text and not path.is_file():
        raise ValueError(f"--templates={text!r}: no such file, and no '{{}}' in it; expected a "
                         "file of templates or ';'-separated templates with '{}'")
    if "{}" not in text or path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines()]
        parts = [line for line in lines if line and not line.startswith("#")]
        where = f"--templates={text!r} (file)"
    else:
        parts = [p.strip() for p in text.split(";") if p.strip()]
        where = f"--templates={text!r}"
    if not parts:
        raise ValueError(f"{where}: no templates in it; expected at least one")
    for p in parts:
        if p.count("{}") != 1:
            raise ValueError(f"{where}: template {p!r} has {p.count('{}')} '{{}}'; expected "
                             "exactly one, where the class name goes")
    return parts


def templates_of(config: ClipConfig) -> list[str]:
    return parse_templates(config.templates) if config.templates else list(DEFAULT_TEMPLATES)


# ------------------------------------------------------------------------------------------
# data


@dataclass
class ClipData:
    """The splits a run uses (``CaptionPairs``): ``train``, ``monitor`` (validation retrieval
    during training: the validation split, else the test split), ``test`` (the final
    evaluation: the test split, else the validation split); the zero-shot folder (images uint8,
    labels, class names, held-out mask or None) when there is one; where it all came from."""

    train: Any
    monitor: Any
    test: Any
    monitor_split: str
    test_split: str
    zeroshot: tuple | None
    source: str
    zeroshot_source: str | None = None
    notes: list = dataclasses.field(default_factory=list)   # the readers' warnings (skipped files)


def scenes_root(config: ClipConfig) -> Path:
    """Where the generated scenes are cached (``scenes_cache``, default ``<out>/scenes``)."""
    return Path(config.scenes_cache) if config.scenes_cache else Path(config.out) / "scenes"


def ensure_data(config: ClipConfig) -> Path | None:
    """Generate the scenes (cached, atomic) when no ``--data`` is given; returns their folder.
    Run it on rank 0 first, then on every rank (a cheap no-op once they exist)."""
    if config.data is not None:
        return None
    from modalities.multimodal.scenes import ensure_scenes

    return Path(ensure_scenes(scenes_root(config), n_train=config.scenes_train,
                              n_validation=config.scenes_validation, n_test=config.scenes_test,
                              n_zeroshot_per_class=config.scenes_zeroshot_per_class,
                              image_size=config.image_size, seed=config.scenes_seed))


def load_data(config: ClipConfig, *, progress: bool = False) -> ClipData:
    """The caption splits and the zero-shot folder, decoded once at ``image_size``."""
    import warnings

    from modalities.multimodal.data import load_pairs

    generated = config.data is None
    root = ensure_data(config) if generated else Path(config.data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_pairs(root, image_size=config.image_size, skip_bad=config.skip_bad_images,
                            workers=config.workers, progress=progress)
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if "train" not in splits:
        raise ValueError(f"--data={str(root)!r}: no train split (found {sorted(splits)}); "
                         "expected a train/ folder or split column")
    monitor_split = "validation" if "validation" in splits else "test"
    test_split = "test" if "test" in splits else "validation"
    if monitor_split not in splits or test_split not in splits:
        raise ValueError(f"--data={str(root)!r}: only a train split; expected a test or "
                         "validation split as well to evaluate retrieval on")
    for name, pairs in splits.items():
        if len(pairs.images) == 0 or len(pairs.captions) == 0:
            raise ValueError(f"--data={str(root)!r}: the {name} split is empty; expected images "
                             "with captions")
    zs_dir = Path(config.zeroshot) if config.zeroshot else (root / "zeroshot" if generated
                                                            else None)
    zeroshot = None
    if zs_dir is not None:
        zeroshot = _load_zeroshot(zs_dir, config.image_size)
        if len(zeroshot[0]) == 0:
            raise ValueError(f"--zeroshot={str(zs_dir)!r}: no images; expected "
                             "<dir>/<class name>/*.png")
    counts = ", ".join(f"{len(p.images)} {n} images / {len(p.captions)} captions"
                       for n, p in splits.items())
    what = "generated scenes" if generated else "caption data"
    source = f"{what} {root} ({counts}; {config.image_size} px)"
    return ClipData(splits["train"], splits[monitor_split], splits[test_split], monitor_split,
                    test_split, zeroshot, source,
                    None if zs_dir is None else f"{zs_dir} ({len(zeroshot[0])} images, "
                    f"{len(zeroshot[2])} classes)", notes)


def _load_zeroshot(folder: Path, image_size: int) -> tuple:
    """(images uint8 (n, 3, S, S), labels int64 (n,), class names, held-out mask or None)."""
    try:
        from modalities.multimodal.data import load_zeroshot
    except ImportError:
        from modalities.multimodal.scenes import load_zeroshot
    return load_zeroshot(folder, image_size=image_size)
