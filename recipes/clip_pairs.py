"""Contrastive text/image pre-training (CLIP, Radford et al. 2021; or SigLIP, Zhai et al. 2023)
of a dual encoder on captioned images, then retrieval, zero-shot and linear-probe evaluation of
the trained model against its own initial weights.

    python -m recipes.clip_pairs                          # generated scenes, CPU preset (~10 min)
    python -m recipes.clip_pairs --loss siglip --out runs/siglip
    python -m recipes.clip_pairs --data /data/flickr30k --image-size 224 --preset gpu \
        --image-model vit-small --text-model bert-small --device cuda
    torchrun --nproc_per_node 4 -m recipes.clip_pairs --data /data/flickr30k --device cuda

The model (:class:`modalities.multimodal.DualEncoder`): an image tower (torchvision ResNet /
small CNN, or a Hugging Face ViT) and a text tower (a Hugging Face BERT-style encoder), linear
projections without bias to ``--projection-dim``, L2 normalisation and a learnable logit scale
(initialised to 1/0.07 and clamped at 100 after each step, as CLIP/OpenCLIP). The loss is the
engine's fused ``csrc_triton.clip_loss`` (or ``csrc_triton.siglip``): the N x N logits are never
stored. ``--chunk-size C`` adds gradient caching (:mod:`recipes.common.grad_cache`): both towers
embed C pairs at a time, so the batch is bounded by the O(N) loss, not by activations.

Data: ``--data`` names an ``imagefolder`` (``metadata.jsonl``/``metadata.csv`` with
``file_name`` and ``text``; several captions per image), a ``datasets.save_to_disk`` folder or
a CSV / JSON-lines manifest (:func:`modalities.multimodal.data.load_pairs`). Without it, the
generated captioned scenes (:mod:`modalities.multimodal.scenes`, cached in ``<out>/scenes``)
with their zero-shot folder, some colour-shape combinations of which never appear in training.
Each epoch every training image is used once, with one of its captions drawn from (seed, epoch,
image), so resuming is exact. Augmentation: none, or a mild random resized crop
(``crop_min_scale``) without flips (captions name positions).

Tokenizer: the ``--text-model`` directory's own, or a WordPiece vocabulary trained on the
training captions (Hugging Face ``tokenizers``), saved in ``<out>/tokenizer``.

Under torchrun each process embeds its share of the ``--batch-size`` pairs of a step; the loss
gathers the features of every process through the engine's ``process_group`` path (exact
gradients) and the parameter gradients are averaged with one flat all-reduce, so R processes
compute the step of one process with the whole batch.

Evaluation: every ``--eval-every`` steps, retrieval R@1 on the validation split and the
learning-behaviour diagnostics (logit scale, alignment of matched pairs, uniformity and
effective rank of both towers' embeddings); at the end, on the test split, image-to-text and
text-to-image Recall@1/5/10 with every caption counted (the Flickr/COCO protocol), zero-shot
top-1 on the zero-shot folder with prompt templates (CLIP's "a photo of a {}.", averaged over
``--templates``), on its held-out combinations separately when known, and a linear probe on the
image tower's features (a fixed stratified half of the zero-shot folder to train, the other to
test), for the trained model and for the exact weights it started from (``random_init``), with
chance levels.

Outputs in ``--out``: config.json, checkpoint.pt (atomic, weights_only), metrics.jsonl, train.log,
eval.json, summary.json, results.txt (the final table), tokenizer/, model/ (Hugging Face
``VisionTextDualEncoderModel`` + processor when the towers allow, else the tilecontrast format:
:func:`modalities.multimodal.hf.save_dual_encoder`), training.png, diagnostics.png, spectra.png,
eval.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# The recipe never downloads: models are built from configs or read from local folders, data
# from local folders. Hugging Face libraries read these when first imported (below, lazily);
# a user's explicit setting wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from recipes.clip_setup import (ClipConfig, build_config, load_data, templates_of)  # noqa: E402
from recipes.common import distributed as D
from recipes.common.checkpoint import (restore_training, rng_state, save_checkpoint,
                                       stop_if_diverged)
from recipes.common.cli import add_resume_arguments, cli_main
from recipes.common.config import read_config_file
from recipes.common.logging import MetricsLog, RunLog, format_table
from recipes.common.rundir import open_run, write_config
from recipes.common.schedule import lr_at, set_lr

CHECKPOINT = "checkpoint.pt"
# settings a resumed run may change without changing what it computes up to its stop
RESUMABLE = ("stop_after", "train_seconds", "device", "workers", "threads", "out", "log_every",
             "checkpoint_every", "eval_batch_size", "scenes_cache", "preset")
KS = (1, 5, 10)
# distinct streams of (seed, epoch/step, ...) for the sampler's draws
_TAG_ORDER, _TAG_CAPTION, _TAG_CROP = 0xC1, 0xC2, 0xC3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipes.clip_pairs",
        description="Train a CLIP-style text/image dual encoder (Hugging Face towers, the fused "
        "clip_loss or siglip loss, optional gradient caching, DDP under torchrun), log the "
        "learning-behaviour diagnostics, then evaluate retrieval (R@1/5/10 both ways), zero-shot "
        "classification and a linear probe against the same towers at their initial weights. "
        "With no arguments: generated captioned scenes and a CPU preset that finishes in about "
        "10 minutes on 2 cores.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="caption data: an imagefolder (train/ validation/ test/ with "
                   "metadata.jsonl or metadata.csv: file_name, text), a datasets.save_to_disk "
                   "folder, or a .csv/.jsonl manifest (image path, caption[, split]). Default: "
                   "the generated captioned scenes (cached in <out>/scenes).")
    g.add_argument("--zeroshot", metavar="DIR", help="labelled class folders "
                   "(<DIR>/<class name>/*.png) for zero-shot classification and the linear "
                   "probe; the class folder names are the class names put into the templates. "
                   "Default: the scenes' zero-shot folder when --data is not given, none "
                   "otherwise.")
    g.add_argument("--templates", help="zero-shot prompt templates: a file (one a line) or "
                   "';'-separated, each with one '{}' for the class name; their normalised text "
                   "embeddings are averaged (default: 'a photo of a {}.').")
    g.add_argument("--skip-bad-images", action="store_true", default=None, help="skip images "
                   "that do not decode (warned with their count and names) instead of stopping "
                   "with an error.")
    g.add_argument("--image-size", type=int, help="side of the square images in pixels "
                   "(shorter side resized, centre crop; cpu-quick: 32).")
    g.add_argument("--workers", type=int, help="processes decoding the images (0: in this one).")
    m = p.add_argument_group("model")
    m.add_argument("--text-model", help="text tower: bert-tiny, bert-mini, bert-small (built from "
                   "a config, random init) or a local save_pretrained directory (its tokenizer "
                   "is used when it has one).")
    m.add_argument("--image-model", help="image tower: small_cnn, resnet18, resnet50 "
                   "(torchvision), vit-tiny, vit-small (Hugging Face ViT from a config) or a local "
                   "ViT directory.")
    m.add_argument("--text-pooling", help="text features: 'pooler' (default): "
                   "BERT's pooler (dense+tanh on [CLS], exportable to transformers); 'cls': "
                   "the [CLS] state; 'mean': the mean over the attention mask.")
    m.add_argument("--max-length", type=int, help="tokens per caption ([CLS] and [SEP] "
                   "included); longer captions are truncated (counted once at start).")
    m.add_argument("--vocab-size", type=int, help="size of the WordPiece vocabulary trained on "
                   "the training captions when the text model brings no tokenizer.")
    m.add_argument("--tokenizer", metavar="DIR", help="a saved tokenizer to use (e.g. an "
                   "earlier run's <out>/tokenizer) instead of the text model's or a new one: "
                   "WordPiece training breaks ties in an unspecified order, so two runs that "
                   "train their own may number the tokens differently.")
    m.add_argument("--projection-dim", type=int, help="dimension of the shared embedding space.")
    m.add_argument("--loss", help="clip (default): symmetric InfoNCE "
                   "(csrc_triton.clip_loss); siglip: pairwise sigmoid loss with a learnable bias "
                   "(csrc_triton.siglip).")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, help="pairs per step over all processes (each of R "
                   "processes embeds batch/R).")
    o.add_argument("--chunk-size", type=int, help="gradient caching: embed this many pairs at a "
                   "time per process (activation memory of one chunk, same gradients); 0 = off.")
    o.add_argument("--epochs", type=int, help="passes over the training images; ignored when "
                   "--steps is given.")
    o.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs).")
    o.add_argument("--stop-after", type=int, help="stop after this many steps in total, "
                   "checkpointed, as if interrupted (no final evaluation; the schedule still "
                   "spans --steps/--epochs); continue with --resume.")
    o.add_argument("--lr", type=float, help="peak learning rate of AdamW (after warm-up; cosine "
                   "decay to zero).")
    o.add_argument("--weight-decay", type=float, help="AdamW weight decay, on weight matrices "
                   "only (not on biases, norms, the logit scale and bias), as CLIP.")
    o.add_argument("--warmup", type=int, help="linear warm-up steps.")
    o.add_argument("--train-seconds", type=float, help="stop training after this many seconds "
                   "(checkpointed, then evaluated; 0 = no limit).")
    o.add_argument("--device", help="'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available).")
    o.add_argument("--seed", type=int, help="seed of initialisation, batches, captions and crops.")
    r = p.add_argument_group("run")
    r.add_argument("--preset", choices=["auto", "cpu-quick", "gpu"], help="base settings: "
                   "'cpu-quick' (about 10 min on 2 CPU cores), 'gpu' (OpenCLIP-style settings "
                   "for real data on one GPU), 'auto' (gpu on CUDA, cpu-quick otherwise; the "
                   "default).")
    r.add_argument("--config", help="YAML or JSON file of ClipConfig fields "
                   "(recipes/clip_setup.py); flags override it.")
    r.add_argument("--out", help="output folder (default runs/clip_pairs).")
    r.add_argument("--eval-every", type=int, help="validation retrieval and diagnostics every "
                   "this many steps.")
    add_resume_arguments(r)
    r.add_argument("--quiet", action="store_true", help="no progress display.")
    return p


def config_from_args(args: argparse.Namespace) -> ClipConfig:
    file_values = read_config_file(args.config) if args.config else {}
    overrides = {
        "data": args.data, "zeroshot": args.zeroshot, "templates": args.templates,
        "skip_bad_images": args.skip_bad_images, "image_size": args.image_size,
        "workers": args.workers, "text_model": args.text_model, "image_model": args.image_model,
        "text_pooling": args.text_pooling, "max_length": args.max_length,
        "vocab_size": args.vocab_size, "tokenizer": args.tokenizer,
        "projection_dim": args.projection_dim, "loss": args.loss,
        "batch_size": args.batch_size, "chunk_size": args.chunk_size, "epochs": args.epochs,
        "steps": args.steps, "stop_after": args.stop_after, "lr": args.lr,
        "weight_decay": args.weight_decay, "warmup": args.warmup,
        "train_seconds": args.train_seconds, "device": args.device, "seed": args.seed,
        "preset": args.preset, "out": args.out, "eval_every": args.eval_every,
    }
    return build_config(file_values, overrides, cuda=torch.cuda.is_available())


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    info = D.setup(config.device)
    try:
        if config.batch_size % info.world_size:
            raise ValueError(f"--batch-size={config.batch_size}: expected a multiple of the "
                             f"{info.world_size} processes (each embeds an equal share)")
        return train(config, args, info)
    finally:
        D.cleanup(info)


# ------------------------------------------------------------------------------------------
# sampling: a pure function of (seed, step), so a resumed run draws what an uninterrupted one would


class PairSampler:
    """The global batch of a step: image indices (an epoch's permutation seeded by (seed,
    epoch), cut into ``batch_size`` blocks; the last partial block dropped), one caption per
    image drawn from (seed, epoch, image), and the crop boxes from (seed, step)."""

    def __init__(self, caption_image: torch.Tensor, n_images: int, batch_size: int, seed: int,
                 crop_min_scale: float) -> None:
        if n_images < batch_size:
            raise ValueError(f"--batch-size={batch_size}: the training split has only {n_images} "
                             "images; expected a batch of at most that many pairs")
        self.n, self.batch_size, self.seed = n_images, batch_size, seed
        self.crop_min_scale = crop_min_scale
        self.steps_per_epoch = n_images // batch_size
        order = torch.argsort(caption_image, stable=True)       # captions grouped by image
        self.by_image = order
        self.count = torch.bincount(caption_image, minlength=n_images)
        self.offset = torch.cumsum(self.count, 0) - self.count
        self._epoch: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        from modalities.image.sampling import mix_seed

        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, _TAG_ORDER))
            perm = torch.randperm(self.n, generator=g)
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, _TAG_CAPTION))
            u = torch.rand(self.n, generator=g, dtype=torch.float64)
            pick = (u * self.count).long().clamp(max=self.count - 1)
            caption = self.by_image[self.offset + pick]
            self._epoch = (epoch, perm, caption)
        return self._epoch[1], self._epoch[2]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image indices (B,), caption indices (B,)) of global step ``step``."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm, caption = self._draws(epoch)
        images = perm[pos * self.batch_size:(pos + 1) * self.batch_size]
        return images, caption[images]

    def crops(self, step: int) -> torch.Tensor | None:
        """(B, 2, 3) affine crop boxes for ``F.affine_grid``, or None without augmentation: a
        box of area fraction s ~ U[crop_min_scale, 1] and aspect ratio r (log-uniform in
        [3/4, 4/3]), w = sqrt(s r), h = sqrt(s / r) (fractions of the side, at most 1), its
        centre uniform where the box fits."""
        if self.crop_min_scale >= 1.0:
            return None
        from modalities.image.sampling import mix_seed

        g = torch.Generator().manual_seed(mix_seed(self.seed, step, _TAG_CROP))
        u = torch.rand(self.batch_size, 4, generator=g, dtype=torch.float64)
        s = self.crop_min_scale + (1.0 - self.crop_min_scale) * u[:, 0]
        r = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])
        w = torch.sqrt(s * r).clamp(max=1.0)
        h = torch.sqrt(s / r).clamp(max=1.0)
        cx = (2 * u[:, 2] - 1) * (1 - w)          # centre in [-1 + w, 1 - w] (grid coordinates)
        cy = (2 * u[:, 3] - 1) * (1 - h)
        theta = torch.zeros(self.batch_size, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 2] = w, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        return theta.float()


def pixels(images: torch.Tensor, image_size: int, theta: torch.Tensor | None = None
           ) -> torch.Tensor:
    """uint8 (n, 3, S, S) -> normalised float (n, 3, image_size, image_size): the crop boxes
    ``theta`` resampled bilinearly (training), then eval_transform's scaling and normalisation."""
    from modalities.image.transforms import eval_transform

    if theta is None:
        return eval_transform(image_size)(images)
    x = images.float().div_(255.0)
    grid = torch.nn.functional.affine_grid(theta.to(x.device), [x.shape[0], 3, image_size,
                                                                 image_size], align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                        align_corners=False)
    return eval_transform(image_size)(x)


# ------------------------------------------------------------------------------------------
# model, step


def build_model(config: ClipConfig, vocab_size: int):
    """The dual encoder at its initial weights (seeded by ``config.seed``)."""
    from modalities.multimodal.model import DualEncoder
    from modalities.multimodal.towers import build_image_tower
    from modalities.text.tower import TextTower, build_text_model

    torch.manual_seed(config.seed)
    image_tower = build_image_tower(config.image_model, image_size=config.image_size)
    text_model = build_text_model(config.text_model, vocab_size=vocab_size,
                                  max_length=config.max_length)
    text_tower = TextTower(text_model, pooling=config.text_pooling)
    return DualEncoder(image_tower, text_tower, projection_dim=config.projection_dim,
                       loss=config.loss, max_logit_scale=config.max_logit_scale)


def build_optimizer(model: torch.nn.Module, config: ClipConfig) -> torch.optim.Optimizer:
    """AdamW (beta2 0.98, eps 1e-6, as CLIP) with weight decay on weight matrices only; biases,
    norms, the logit scale and bias are not decayed (OpenCLIP's exclusion rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "logit" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr,
                             betas=(0.9, 0.98), eps=1e-6)


def train_step(model, images: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor, chunk_size: int | None, *,
               image_transform: Callable[..., torch.Tensor] | None = None,
               crops: torch.Tensor | None = None,
               loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
               process_group: Any = None, backend: str = "auto"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's gradients of one step (the optimizer step and the gradient all-reduce are
    the caller's): both towers through :func:`recipes.common.grad_cache.grad_cache_step`
    (chunks of ``chunk_size`` pairs, None: one shot), the dual encoder's loss on the
    embeddings (gathered across processes through ``process_group``).

    ``images`` are the image tower's pixel values, or (with ``image_transform``) what
    ``image_transform(images_chunk)`` / ``image_transform(images_chunk, crops_chunk)`` turns
    into them chunk by chunk, so that e.g. uint8 images become float pixels one chunk at a
    time (at 32768 pairs of 32 px the float batch alone is 400 MB). ``loss(img, txt)`` replaces
    ``model.loss`` (the benchmark's dense baseline). Returns (loss detached, image embeddings,
    text embeddings) as the loss saw them (detached)."""
    from recipes.common.grad_cache import Tower, grad_cache_step

    def image_forward(x: torch.Tensor, *extra: torch.Tensor) -> dict[str, torch.Tensor]:
        if image_transform is not None:
            x = image_transform(x, *extra)
        return {"embedding": model.encode_image(x)}

    def text_forward(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embedding": model.encode_text(ids, mask)}

    def loss_fn(outputs):
        img, txt = outputs[0]["embedding"], outputs[1]["embedding"]
        if loss is not None:
            return loss(img, txt), None
        return model.loss(img, txt, process_group=process_group, backend=backend), None

    if crops is not None and image_transform is None:
        raise ValueError("crops were given without an image_transform to apply them")
    image_inputs = images if crops is None else (images, crops)
    towers = [Tower(image_forward, image_inputs, module=model.image_tower),
              Tower(text_forward, (input_ids, attention_mask), module=model.text_tower)]
    value, _, outputs = grad_cache_step(towers, loss_fn, chunk_size)
    return value, outputs[0]["embedding"], outputs[1]["embedding"]


# ------------------------------------------------------------------------------------------
# training


def _tokenizer(config: ClipConfig, train_captions: list[str], out: Path, resume: bool,
               info: D.DistInfo, log: RunLog):
    """The text model directory's tokenizer, the run's own (resume), or one trained on the
    training captions and saved in <out>/tokenizer."""
    from modalities.text.tokenizer import has_tokenizer, load_tokenizer, train_wordpiece

    own = out / "tokenizer"
    if config.tokenizer is not None:
        log(f"tokenizer: {config.tokenizer} (--tokenizer)")
        return load_tokenizer(config.tokenizer), str(config.tokenizer)
    if Path(config.text_model).is_dir() and has_tokenizer(config.text_model):
        log(f"tokenizer: {config.text_model}'s own")
        return load_tokenizer(config.text_model), f"{config.text_model}"
    if resume and has_tokenizer(own):
        log(f"tokenizer: {own} (saved by the run)")
        return load_tokenizer(own), str(own)
    if Path(config.text_model).is_dir():
        log(f"warning: --text-model {config.text_model} has no tokenizer; training a WordPiece "
            "vocabulary on the captions (its token embeddings were learnt for other ids)")
    if info.is_main:
        t0 = time.perf_counter()
        tok = train_wordpiece(train_captions, vocab_size=config.vocab_size,
                              max_length=config.max_length)
        tok.save_pretrained(str(own))
        log(f"tokenizer: WordPiece trained on {len(train_captions)} training captions "
            f"({len(tok)} tokens, {time.perf_counter() - t0:.1f}s), saved in {own}")
    D.barrier(info)
    return load_tokenizer(own), str(own)


def train(config: ClipConfig, args: argparse.Namespace, info: D.DistInfo) -> dict[str, Any]:
    from modalities.text.tokenizer import tokenize

    started = time.perf_counter()
    device = D.resolve_device(config.device, info, threads=config.threads)
    resume = args.resume is not None
    out, log, checkpoint = open_run(config.out, info, resume=args.resume,
                                    overwrite=args.overwrite, quiet=args.quiet,
                                    config=config.to_dict(), resumable=RESUMABLE,
                                    override_config=args.override_config, checkpoint=CHECKPOINT)

    auto = " (auto-selected for a CPU; --preset gpu for the GPU settings)" \
        if config.preset == "cpu-quick" and args.preset is None else ""
    budget = (f", at most {config.train_seconds:.0f}s of training: about 10 minutes in all on "
              "2 CPU cores") if config.preset == "cpu-quick" and config.train_seconds else ""
    log(f"CLIP pre-training: loss '{config.loss}', preset '{config.preset}'{auto}{budget}; on "
        f"{device}" + (f", {info.world_size} processes" if info.enabled else ""))
    log(json.dumps(config.to_dict(), indent=2))
    if info.is_main:
        write_config(out, config.to_dict())

    # ---- data (rank 0 generates the scenes first; the others then find them cached)
    t0 = time.perf_counter()
    if info.is_main and config.data is None:
        from recipes.clip_setup import ensure_data

        log("generating / finding the captioned scenes ...")
        ensure_data(config)
    D.barrier(info)
    data = load_data(config, progress=info.is_main and not args.quiet)
    log(f"data: {data.source} ({time.perf_counter() - t0:.1f}s); monitoring on the "
        f"{data.monitor_split} split, final evaluation on the {data.test_split} split")
    for note in data.notes:
        log(f"warning: {note}")
    if data.zeroshot_source:
        log(f"zero-shot / linear-probe folder: {data.zeroshot_source}")
    templates = templates_of(config)

    # ---- tokenizer and tokens (every caption tokenised once)
    tokenizer, tokenizer_source = _tokenizer(config, list(data.train.captions), out, resume,
                                             info, log)
    tokens = {}
    truncated = total_captions = 0
    for name, pairs in (("train", data.train), ("monitor", data.monitor), ("test", data.test)):
        batch = tokenize(tokenizer, list(pairs.captions), config.max_length)
        tokens[name] = (batch.input_ids, batch.attention_mask)
        truncated += batch.truncated
        total_captions += len(pairs.captions)
    if truncated:
        log(f"note: {truncated} of {total_captions} captions are longer than --max-length="
            f"{config.max_length} tokens and were truncated (cut on the right, [SEP] kept)")

    # ---- model
    model = build_model(config, len(tokenizer)).to(device)
    initial_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, config)
    sampler = PairSampler(data.train.caption_image, len(data.train.images), config.batch_size,
                          config.seed, config.crop_min_scale)
    steps_per_epoch = sampler.steps_per_epoch
    total = config.steps or config.epochs * steps_per_epoch
    if config.stop_after and config.stop_after > total:
        raise ValueError(f"--stop-after={config.stop_after}: expected at most the {total} steps "
                         "of the schedule")
    process_group = torch.distributed.group.WORLD if info.enabled else None
    local = config.batch_size // info.world_size
    n_img = sum(p.numel() for p in model.image_tower.parameters())
    n_txt = sum(p.numel() for p in model.text_tower.parameters())
    log(f"model: image tower {config.image_model} ({n_img / 1e6:.2f}M parameters), text tower "
        f"{config.text_model} ({n_txt / 1e6:.2f}M, pooling '{config.text_pooling}'), projection "
        f"{config.projection_dim}, loss {config.loss}; {total} steps of {config.batch_size} pairs "
        f"({steps_per_epoch} per epoch)" + (f", {local} per process" if info.enabled else "")
        + (f", gradient caching in chunks of {config.chunk_size}" if config.chunk_size else ""))

    metrics = MetricsLog(out / "metrics.jsonl")
    start = 0
    if checkpoint is not None:
        start = restore_training(checkpoint, metrics, info.is_main, model=model,
                                 optimizer=optimizer)
        initial_model = checkpoint["initial_model"]
        log(f"resumed from step {start}")

    def save(step: int) -> None:
        if info.is_main:
            save_checkpoint({"step": step, "config": config.to_dict(),
                             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "initial_model": initial_model, "rng": rng_state(),
                             "tokenizer": tokenizer_source}, out / CHECKPOINT)

    evaluator = _Evaluator(config, data, tokens, device, tokenizer, templates)
    end = min(total, config.stop_after) if config.stop_after else total
    bar = log.progress(end, "training", initial=start, every=config.log_every)
    t_train = time.perf_counter()
    pairs_seen = 0
    last: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    stopped_by_time = False
    train_ids, train_mask = tokens["train"]
    images_u8 = data.train.images
    if start == 0 and info.is_main:
        last_eval = evaluator.monitor(model, 0)
        metrics.write(last_eval)
    step = start
    for step in range(start, end):
        if config.train_seconds and D.time_is_up(t_train, config.train_seconds, info, device):
            stopped_by_time = True
            save(step)
            log(f"training time limit ({config.train_seconds:.0f}s) reached after {step} steps")
            break
        img_idx, cap_idx = sampler.batch(step)
        theta = sampler.crops(step)
        mine = slice(info.rank * local, (info.rank + 1) * local)
        img_idx, cap_idx = img_idx[mine], cap_idx[mine]
        x = images_u8[img_idx].to(device)  # uint8: made float pixels chunk by chunk in the step
        ids, mask = train_ids[cap_idx].to(device), train_mask[cap_idx].to(device)
        lr = lr_at(step, total, config.warmup, config.lr)
        set_lr(optimizer, lr)
        model.train()
        loss, _, _ = train_step(model, x, ids, mask, config.chunk_size or None,
                                image_transform=lambda u8, th=None: pixels(u8, config.image_size, th),
                                crops=None if theta is None else theta[mine].to(device),
                                process_group=process_group, backend=config.backend)
        D.all_reduce_gradients(model, info)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
        pairs_seen += config.batch_size
        done = step + 1
        if done % config.log_every == 0 or done == end or done == start + 1:
            loss_all = D.all_reduce_mean(loss, info)
            elapsed = time.perf_counter() - t_train
            last = {"step": done, "epoch": round(done / steps_per_epoch, 3),
                    "loss": float(loss_all), "lr": lr,
                    "logit_scale": float(model.scale().detach()),
                    "elapsed_s": round(elapsed, 2),
                    "pairs_per_s": round(pairs_seen / elapsed, 1) if elapsed else None}
            if config.loss == "siglip" and getattr(model, "logit_bias", None) is not None:
                last["logit_bias"] = float(model.logit_bias.detach())
            stop_if_diverged(last["loss"], done, save)
            if info.is_main:
                metrics.write(last)
        bar.update(1, loss=last.get("loss", float("nan")))
        if done % config.eval_every == 0 or done == total:
            if info.is_main:
                last_eval = evaluator.monitor(model, done)
                metrics.write(last_eval)
        if done % config.checkpoint_every == 0 or done == end:
            save(done)
    else:
        step = end
    bar.close()
    train_seconds = time.perf_counter() - t_train
    steps_done = step
    D.barrier(info)

    summary: dict[str, Any] = {
        "loss": config.loss, "preset": config.preset, "image_model": config.image_model,
        "text_model": config.text_model, "device": str(device), "world_size": info.world_size,
        "source": data.source, "steps": total, "steps_done": steps_done, "start_step": start,
        "stopped_by_time_limit": stopped_by_time, "train_seconds": round(train_seconds, 1),
        "pairs_per_second": round(pairs_seen / train_seconds, 1) if train_seconds else None,
        "final_loss": last.get("loss"), "truncated_captions": truncated,
    }
    result: dict[str, Any] = {"out": str(out), "summary": summary, "eval": {}, "model": model,
                              "last_monitor": last_eval}
    interrupted = bool(config.stop_after) and steps_done == config.stop_after < total
    if interrupted:
        log(f"stopped after {steps_done} steps (--stop-after); continue with --resume "
            "(no final evaluation yet)")
        return result
    if info.is_main:
        if steps_done and last_eval.get("step") != steps_done:
            last_eval = evaluator.monitor(model, steps_done)
            metrics.write(last_eval)
            result["last_monitor"] = last_eval
        initial = build_model(config, len(tokenizer))
        initial.load_state_dict(initial_model)
        t_eval = time.perf_counter()
        evaluation = evaluator.final(model, initial.to(device), log)
        summary["eval_seconds"] = round(time.perf_counter() - t_eval, 1)
        evaluation["meta"].update({"steps_done": steps_done, "tokenizer": tokenizer_source,
                                   "initial_weights": "random init" if not any(
                                       Path(s).is_dir() for s in (config.text_model,
                                                                  config.image_model))
                                   else "the local towers' weights before training"})
        fmt = _save_model(model, tokenizer, out / "model", config, log)
        evaluation["meta"]["model_format"] = fmt
        summary["model_format"] = fmt
        (out / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
        result["eval"] = evaluation
        _plots(metrics.read(), evaluation, out, config)
        summary["total_seconds"] = round(time.perf_counter() - started, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        table = _report(summary, evaluation, log)
        (out / "results.txt").write_text(table + "\n")
    D.barrier(info)
    return result


def _save_model(model, tokenizer, path: Path, config: ClipConfig, log: RunLog) -> str:
    from modalities.image.transforms import DEFAULT_MEAN, DEFAULT_STD
    from modalities.multimodal.hf import exportable, save_dual_encoder

    ok, reason = exportable(model)
    fmt = save_dual_encoder(model, tokenizer, path, image_size=config.image_size,
                            mean=DEFAULT_MEAN, std=DEFAULT_STD)
    if fmt == "transformers":
        log(f"model saved in {path} in transformers format (VisionTextDualEncoderModel + "
            "VisionTextDualEncoderProcessor: opens with transformers alone)")
    else:
        why = f": not exportable to transformers: {reason}" if not ok else ""
        log(f"model saved in {path} in the tilecontrast format (modalities.multimodal.hf."
            f"load_dual_encoder reads it){why}")
    return fmt


# ------------------------------------------------------------------------------------------
# evaluation


class _Evaluator:
    """Validation retrieval and diagnostics during training, and the final evaluation."""

    def __init__(self, config: ClipConfig, data, tokens: dict, device: torch.device, tokenizer,
                 templates: list[str]) -> None:
        self.config, self.data, self.tokens, self.device = config, data, tokens, device
        self.tokenizer, self.templates = tokenizer, templates
        mon = data.monitor
        n = len(mon.images)
        gen = torch.Generator().manual_seed(config.seed + 17)
        self.diag_images = torch.randperm(n, generator=gen)[:min(config.diagnostics_samples, n)]
        # each diagnostic image's first caption: its matched pair
        n_cap = len(mon.caption_image)
        first = torch.full((n,), n_cap, dtype=torch.int64).scatter_reduce(
            0, mon.caption_image, torch.arange(n_cap), "amin")
        self.diag_captions = first[self.diag_images]

    @torch.no_grad()
    def images(self, model, images_u8: torch.Tensor, *, features: bool = False) -> torch.Tensor:
        bs = self.config.eval_batch_size
        fn = model.image_features if features else model.encode_image
        parts = [fn(pixels(images_u8[i:i + bs].to(self.device), self.config.image_size)).float()
                 .cpu() for i in range(0, images_u8.shape[0], bs)]
        return torch.cat(parts)

    @torch.no_grad()
    def texts(self, model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bs = self.config.eval_batch_size
        parts = [model.encode_text(ids[i:i + bs].to(self.device), mask[i:i + bs].to(self.device))
                 .float().cpu() for i in range(0, ids.shape[0], bs)]
        return torch.cat(parts)

    def encode_prompts(self, model):
        from modalities.text.tokenizer import tokenize

        def encode(texts: list[str]) -> torch.Tensor:
            b = tokenize(self.tokenizer, texts, self.config.max_length)
            return self.texts(model, b.input_ids, b.attention_mask)

        return encode

    def monitor(self, model, step: int) -> dict[str, Any]:
        from recipes.common.diagnostics import (alignment, effective_rank, singular_values,
                                                uniformity)
        from recipes.common.retrieval import retrieval_recall

        was_training = model.training
        model.eval()
        mon = self.data.monitor
        ids, mask = self.tokens["monitor"]
        img = self.images(model, mon.images)
        txt = self.texts(model, ids, mask)
        r = retrieval_recall(img, txt, mon.caption_image, ks=KS)
        di, dt = img[self.diag_images], txt[self.diag_captions]
        s_img, s_txt = singular_values(di), singular_values(dt)
        with torch.no_grad():
            val_loss = float(model.loss(di.to(self.device), dt.to(self.device),
                                        backend=self.config.backend))
        record: dict[str, Any] = {
            "step": step, "kind": "monitor", "split": self.data.monitor_split,
            "val_i2t_r1": r["i2t_r1"], "val_t2i_r1": r["t2i_r1"],
            "val_i2t_r5": r["i2t_r5"], "val_t2i_r5": r["t2i_r5"],
            "val_loss": val_loss, "logit_scale": float(model.scale().detach()),
            "alignment": alignment(di, dt),
            "image_uniformity": uniformity(di) if len(di) > 1 else math.nan,
            "text_uniformity": uniformity(dt) if len(dt) > 1 else math.nan,
            "image_effective_rank": effective_rank(s_img),
            "text_effective_rank": effective_rank(s_txt),
            "image_spectrum": s_img.tolist(), "text_spectrum": s_txt.tolist(),
        }
        if getattr(model, "logit_bias", None) is not None:
            record["logit_bias"] = float(model.logit_bias.detach())
        model.train(was_training)
        return record

    def final(self, trained, initial, log: RunLog) -> dict[str, Any]:
        from recipes.common.evaluation import ProbeConfig, linear_probe
        from recipes.common.retrieval import (prompt_embeddings, retrieval_chance,
                                              retrieval_recall, zero_shot_top1)

        c, d = self.config, self.data
        test = d.test
        ids, mask = self.tokens["test"]
        chance: dict[str, Any] = retrieval_chance(test.caption_image, len(test.images), KS)
        meta: dict[str, Any] = {
            "test_split": d.test_split, "test_images": len(test.images),
            "test_captions": len(test.captions), "ks": list(KS),
            "retrieval": "Flickr/COCO protocol: i2t hit when any of the image's captions is in "
                         "the top K; t2i over every caption; ties broken at random in expectation",
        }
        probe_split = None
        if d.zeroshot is not None:
            zs_images, zs_labels, class_names, heldout = d.zeroshot
            n_classes = len(class_names)
            chance["zeroshot_top1"] = 1.0 / n_classes
            meta.update({"zeroshot": d.zeroshot_source, "zeroshot_classes": n_classes,
                         "zeroshot_images": int(len(zs_labels)), "templates": self.templates})
            if heldout is not None and bool(heldout.any()):
                chance["zeroshot_top1_heldout"] = 1.0 / n_classes
                if bool((~heldout).any()):
                    chance["zeroshot_top1_seen"] = 1.0 / n_classes
                meta["zeroshot_heldout_images"] = int(heldout.sum())
                meta["zeroshot_heldout_classes"] = sorted(
                    {class_names[i] for i in zs_labels[heldout].tolist()})
            if c.linear_probe:
                probe_split = _stratified_halves(zs_labels, c.seed)
                chance["linear_probe_top1"] = 1.0 / n_classes
                meta["linear_probe"] = ("L-BFGS softmax regression (weight decay 1e-4) on the "
                                        "image tower's features; a fixed stratified half of the "
                                        "zero-shot folder to train, the other half to test "
                                        f"({int(probe_split.sum())} / "
                                        f"{int((~probe_split).sum())} images)")
        out: dict[str, Any] = {}
        for name, model in (("trained", trained), ("random_init", initial)):
            model.eval()
            res: dict[str, Any] = retrieval_recall(self.images(model, test.images),
                                                   self.texts(model, ids, mask), test.caption_image,
                                                   ks=KS)
            if d.zeroshot is not None:
                img = self.images(model, zs_images)
                weights = prompt_embeddings(self.encode_prompts(model), class_names,
                                            self.templates)
                res["zeroshot_top1"] = zero_shot_top1(img, zs_labels, weights)
                if heldout is not None and bool(heldout.any()):
                    res["zeroshot_top1_heldout"] = zero_shot_top1(img, zs_labels, weights,
                                                                  mask=heldout)
                    if bool((~heldout).any()):
                        res["zeroshot_top1_seen"] = zero_shot_top1(img, zs_labels, weights,
                                                                   mask=~heldout)
                if probe_split is not None:
                    feats = self.images(model, zs_images, features=True)
                    probe = ProbeConfig(solver="lbfgs", penalize_bias=False, iterations=200,
                                        weight_decay=1e-4, seed=c.seed)
                    res["linear_probe_top1"] = linear_probe(
                        feats[probe_split], zs_labels[probe_split], feats[~probe_split],
                        zs_labels[~probe_split], probe).accuracy
            res["logit_scale"] = float(model.scale().detach())
            out[name] = res
        out["chance"] = chance
        out["meta"] = meta
        return out


def _stratified_halves(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """bool (n,): True for the probe's training half, a fixed (seed) half of each class (the
    larger half when odd), so every class is on both sides when it has two images or more."""
    gen = torch.Generator().manual_seed(seed + 31)
    train = torch.zeros(len(labels), dtype=torch.bool)
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        train[idx[:(len(idx) + 1) // 2]] = True
    return train


def _plots(records: list[dict], evaluation: dict[str, Any], out: Path, config: ClipConfig) -> None:
    from recipes.common.plots import plot_curves, plot_probes, plot_spectra

    train = [r for r in records if r.get("kind") is None and "loss" in r]
    mon = [r for r in records if r.get("kind") == "monitor"]
    keys = ["loss", "lr", "logit_scale"] + (["logit_bias"] if config.loss == "siglip" else [])
    plot_curves(train, keys, out / "training.png", title=f"{config.loss}: training")
    plot_curves(mon, ["val_i2t_r1", "val_t2i_r1", "val_loss", "logit_scale", "alignment",
                      "image_uniformity", "text_uniformity", "image_effective_rank",
                      "text_effective_rank"], out / "diagnostics.png",
                title=f"{config.loss}: learning behaviour (held-out pairs)")
    if mon:
        spectra = {}
        for r, when in ((mon[0], "start"), (mon[-1], "end")):
            for tower in ("image", "text"):
                if r.get(f"{tower}_spectrum"):
                    spectra[f"{tower}, step {r['step']} ({when})"] = r[f"{tower}_spectrum"]
        plot_spectra(spectra, out / "spectra.png",
                     title=f"{config.loss}: singular values of held-out embeddings")
    keys = [k for k in _metric_keys(evaluation) if k in evaluation.get("trained", {})]
    bars = {name: {k: evaluation[name][k] for k in keys if k in evaluation[name]}
            for name in ("trained", "random_init", "chance") if name in evaluation}
    plot_probes(bars, out / "eval.png", title=f"{config.loss}: evaluation on held-out data")


def _metric_keys(evaluation: dict[str, Any]) -> list[str]:
    keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS]
    return keys + ["zeroshot_top1", "zeroshot_top1_heldout", "zeroshot_top1_seen",
                   "linear_probe_top1"]


def _report(summary: dict[str, Any], evaluation: dict[str, Any], log: RunLog) -> str:
    log("")
    log(f"training: {summary['steps_done']} of {summary['steps']} steps in "
        f"{summary['train_seconds']}s ({summary['pairs_per_second']} pairs/s), final loss "
        f"{summary['final_loss']}" + (" (stopped by the time limit)"
                                      if summary["stopped_by_time_limit"] else ""))
    rows = []
    for key in _metric_keys(evaluation):
        if key not in evaluation.get("trained", {}):
            continue
        row = [key]
        for name in ("trained", "random_init", "chance"):
            v = evaluation.get(name, {}).get(key)
            row.append("-" if v is None else f"{100 * v:.1f}%")
        rows.append(row)
    meta = evaluation["meta"]
    title = (f"evaluation: retrieval on the {meta['test_split']} split ({meta['test_images']} "
             f"images, {meta['test_captions']} captions)"
             + (f"; zero-shot and linear probe on {meta['zeroshot']}" if "zeroshot" in meta
                else ""))
    table = format_table(["metric", "trained", "random init", "chance"], rows)
    log("\n" + title)
    log(table)
    log(f"\nmodel: {summary.get('model_format')} format; total wall time "
        f"{summary.get('total_seconds')}s")
    return title + "\n" + table


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(run, argv, (ValueError, FileNotFoundError, FloatingPointError))


if __name__ == "__main__":
    sys.exit(main())
