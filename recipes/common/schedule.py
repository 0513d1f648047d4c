"""The learning-rate schedule of the pre-training recipes (clip_pairs, simclr_images): linear
warm-up, then cosine decay to zero (Loshchilov & Hutter, "SGDR", 2017, without restarts; the
schedule of SimCLR and CLIP). A pure function of the step, so a resumed run follows the same
curve as an uninterrupted one."""
from __future__ import annotations

import math

import torch


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``:

        lr(s) = base * (s + 1) / warmup                         for s < warmup
        lr(s) = base * (1 + cos(pi * min(1, p))) / 2,  p = (s - warmup) / max(1, total - warmup)

    Example:
        >>> lr_at(0, 100, 10, 1.0), lr_at(10, 100, 10, 1.0), lr_at(100, 100, 10, 1.0)
        (0.1, 1.0, 0.0)
    """
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``optimizer`` the learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
