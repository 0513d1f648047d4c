"""Augmentations and evaluation transforms on uint8 CHW tensors (`torchvision.transforms.v2`).

Inputs are uint8 (3, H, W) RGB tensors (as `ImageSet.images[i]`); outputs are float32,
scaled to [0, 1] and normalised per channel: x = (v / 255 - mean) / std.

- `simclr_transform`: SimCLR's augmentation (Chen et al. 2020, appendix A): random resized crop,
  horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale with p = 0.2, and a
  Gaussian blur (kernel ~10 % of the side, sigma in [0.1, 2.0], p = 0.5) for images of 96 px and
  more (the paper drops it for CIFAR's 32 px).
- `eval_transform`: resize when needed, scale, normalise. Also works on batches (N, 3, H, W) and
  on float inputs already in [0, 1].
- `seg_train_transform` / `seg_eval_transform`: (image, mask) pairs. Geometric operations are
  drawn once and applied to both (the mask as a `tv_tensors.Mask`, always resampled by nearest
  neighbour, so no new label value ever appears; areas a rotation brings in are `ignore_index`);
  photometric operations touch the image only.

Randomness comes from torch's global CPU generator (as in torchvision); `sampling.AugmentedViews`
seeds it per (seed, epoch, index) so the views do not depend on the worker that draws them.

Example:
    >>> aug = simclr_transform(32)
    >>> view = aug(train.images[0])               # float32 (3, 32, 32)
    >>> x = eval_transform(32)(train.images[:8])  # float32 (8, 3, 32, 32)
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "DEFAULT_MEAN", "DEFAULT_STD", "simclr_transform", "eval_transform", "seg_train_transform",
    "seg_eval_transform", "blur_kernel_size",
]

DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean used to normalise (ImageNet's, as torchvision's and solo-learn's recipes)."""
DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation used to normalise (ImageNet's)."""


def _check_size(fn: str, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"{fn}: size={size!r}; expected an integer number of pixels >= 8")


def _check_prob(fn: str, name: str, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{fn}: {name}={p!r}; expected a probability in [0, 1]")


def _check_scale(fn: str, scale: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: crop_scale={scale!r}; expected (min, max) area fractions") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{fn}: crop_scale={scale!r}; expected 0 < min <= max <= 1")
    return lo, hi


def _check_norm(fn: str, mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"{fn}: mean={mean!r}, std={std!r}; expected 3 values each, std > 0")
    return mean, std


def _check_jitter(fn: str, jitter: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        b, c, s, h = (float(v) for v in jitter)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: jitter={jitter!r}; expected (brightness, contrast, saturation, hue)") from None
    if min(b, c, s, h) < 0 or h > 0.5:
        raise ValueError(f"{fn}: jitter={jitter!r}; expected non-negative strengths and hue <= 0.5")
    return b, c, s, h


def blur_kernel_size(size: int) -> int:
    """SimCLR's blur kernel: about 10 % of the image side, odd, at least 3 (23 at 224 px)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def simclr_transform(size: int, *, crop_scale: Sequence[float] = (0.08, 1.0),
                     jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1), jitter_p: float = 0.8,
                     gray_p: float = 0.2, blur: bool | None = None, blur_p: float = 0.5,
                     flip_p: float = 0.5, mean: Sequence[float] = DEFAULT_MEAN,
                     std: Sequence[float] = DEFAULT_STD) -> Callable[[torch.Tensor], torch.Tensor]:
    """SimCLR's view: uint8 (3, H, W) -> float32 (3, size, size), any H, W (32 px to 224 px and up).

    RandomResizedCrop(size, scale=crop_scale, ratio=(3/4, 4/3), bilinear, antialias) ->
    horizontal flip (flip_p) -> ColorJitter(*jitter) with jitter_p -> grayscale with gray_p ->
    GaussianBlur(kernel `blur_kernel_size(size)`, sigma in [0.1, 2.0]) with blur_p when
    blur is True, or blur is None and size >= 96 -> to float in [0, 1] -> Normalize(mean, std).

    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
    ICML 2020, appendix A: colour distortion of strength s is ColorJitter(0.8 s, 0.8 s, 0.8 s,
    0.2 s); s = 0.5, their CIFAR-10 setting, gives the default (0.4, 0.4, 0.4, 0.1).

    Example:
        >>> aug = simclr_transform(224)            # with blur
        >>> views = torch.stack([aug(img), aug(img)])
    """
    fn = "simclr_transform"
    _check_size(fn, size)
    scale = _check_scale(fn, crop_scale)
    b, c, s, h = _check_jitter(fn, jitter)
    for name, p in (("jitter_p", jitter_p), ("gray_p", gray_p), ("blur_p", blur_p), ("flip_p", flip_p)):
        _check_prob(fn, name, p)
    if blur is not None and not isinstance(blur, bool):
        raise ValueError(f"{fn}: blur={blur!r}; expected True, False or None (None: blur when size >= 96)")
    mean, std = _check_norm(fn, mean, std)
    ops: list = [
        v2.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(p=flip_p),
        v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=jitter_p),
        v2.RandomGrayscale(p=gray_p),
    ]
    if blur or (blur is None and size >= 96):
        ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=blur_p))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


class _Eval:
    """Resize to (size, size) when needed, scale to [0, 1], normalise; (3, H, W) or (N, 3, H, W)."""

    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"eval_transform: image of shape {getattr(image, 'shape', type(image))}; "
                             "expected a (3, H, W) or (N, 3, H, W) tensor")
        x = TF.to_dtype(image.as_subclass(torch.Tensor), torch.float32, scale=True)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = TF.resize(x, [self.size, self.size], antialias=True)
        return TF.normalize(x, self.mean, self.std)

    def __repr__(self) -> str:
        return f"eval_transform(size={self.size}, mean={self.mean}, std={self.std})"


def eval_transform(size: int, *, mean: Sequence[float] = DEFAULT_MEAN,
                   std: Sequence[float] = DEFAULT_STD) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (or float in [0, 1]) (3, H, W) / (N, 3, H, W) -> float32 (..., 3, size, size):
    bilinear antialiased resize when (H, W) != (size, size), x = (v / 255 - mean) / std.

    Example:
        >>> feats = encoder(eval_transform(32)(test.images[:512]))
    """
    _check_size("eval_transform", size)
    mean, std = _check_norm("eval_transform", mean, std)
    return _Eval(size, mean, std)


def _nearest_resize(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(..., H, W) -> (..., size, size) by nearest neighbour at pixel centres (never a new value)."""
    h, w = mask.shape[-2:]
    if (h, w) == (size, size):
        return mask
    rows = ((torch.arange(size, dtype=torch.float64) + 0.5) * h / size).long().clamp_(max=h - 1)
    cols = ((torch.arange(size, dtype=torch.float64) + 0.5) * w / size).long().clamp_(max=w - 1)
    return mask[..., rows[:, None], cols[None, :]]


def _check_pair(fn: str, image: torch.Tensor, mask: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"{fn}: image of shape {getattr(image, 'shape', type(image))}; "
                         "expected a (3, H, W) or (N, 3, H, W) tensor")
    if (not isinstance(mask, torch.Tensor) or mask.dim() != image.dim() - 1
            or tuple(mask.shape[-2:]) != tuple(image.shape[-2:])):
        raise ValueError(f"{fn}: mask of shape {getattr(mask, 'shape', type(mask))} for an image of shape "
                         f"{tuple(image.shape)}; expected (H, W) (or (N, H, W)) of the image's size")
    if mask.dtype.is_floating_point or mask.dtype == torch.bool:
        raise ValueError(f"{fn}: mask of dtype {mask.dtype}; expected an integer tensor of class ids")


class _SegTrain:
    """Joint geometric ops on (Image, Mask), then photometric ops and normalisation on the image."""

    def __init__(self, size: int, joint: v2.Transform, photometric: v2.Transform, mean: list[float],
                 std: list[float]) -> None:
        self.size, self.joint, self.photometric, self.mean, self.std = size, joint, photometric, mean, std

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair("seg_train_transform", image, mask)
        if image.dim() != 3:
            raise ValueError(f"seg_train_transform: image of shape {tuple(image.shape)}; expected one "
                             "(3, H, W) image (augmentations are drawn per image)")
        img, msk = self.joint(tv_tensors.Image(image), tv_tensors.Mask(mask.to(torch.int64)))
        img = self.photometric(img)
        x = TF.normalize(TF.to_dtype(img.as_subclass(torch.Tensor), torch.float32, scale=True),
                         self.mean, self.std)
        return x, msk.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"seg_train_transform(size={self.size}, joint={self.joint}, photometric={self.photometric})"


def seg_train_transform(size: int, *, crop_scale: Sequence[float] = (0.25, 1.0), flip_p: float = 0.5,
                        degrees: float = 0.0, jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
                        jitter_p: float = 0.8, gray_p: float = 0.2, ignore_index: int = 255,
                        mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD
                        ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(image uint8 (3, H, W), mask int (H, W)) -> (float32 (3, size, size), int64 (size, size)).

    Joint (drawn once, applied to both; the mask by nearest neighbour): RandomResizedCrop(size,
    scale=crop_scale), horizontal flip (flip_p), and a rotation in [-degrees, degrees] when
    degrees > 0 (areas it brings in: 0 in the image, `ignore_index` in the mask). Image only:
    ColorJitter(*jitter) with jitter_p, grayscale with gray_p, scale to [0, 1], Normalize.

    Example:
        >>> aug = seg_train_transform(32)
        >>> x, y = aug(seg.images[0], seg.masks[0])
    """
    fn = "seg_train_transform"
    _check_size(fn, size)
    scale = _check_scale(fn, crop_scale)
    b, c, s, h = _check_jitter(fn, jitter)
    for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("gray_p", gray_p)):
        _check_prob(fn, name, p)
    if isinstance(degrees, bool) or not isinstance(degrees, (int, float)) or not 0 <= degrees <= 180:
        raise ValueError(f"{fn}: degrees={degrees!r}; expected a number in [0, 180]")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{fn}: ignore_index={ignore_index!r}; expected an integer")
    mean, std = _check_norm(fn, mean, std)
    joint: list = [v2.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3), antialias=True),
                   v2.RandomHorizontalFlip(p=flip_p)]
    if degrees > 0:
        joint.append(v2.RandomRotation(degrees, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}))
    photometric = v2.Compose([
        v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=jitter_p),
        v2.RandomGrayscale(p=gray_p),
    ])
    return _SegTrain(size, v2.Compose(joint), photometric, mean, std)


class _SegEval:
    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        self.size, self.image = size, _Eval(size, mean, std)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair("seg_eval_transform", image, mask)
        return self.image(image), _nearest_resize(mask.as_subclass(torch.Tensor), self.size).to(torch.int64)

    def __repr__(self) -> str:
        return f"seg_eval_transform(size={self.size})"


def seg_eval_transform(size: int, *, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD
                       ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(image (3, H, W) or (N, 3, H, W), mask (H, W) or (N, H, W)) -> (float32 image, int64 mask)
    at (size, size): the image as `eval_transform`, the mask by nearest neighbour at pixel centres
    (unchanged when already that size).

    Example:
        >>> x, y = seg_eval_transform(32)(seg.images[:64], seg.masks[:64])
    """
    _check_size("seg_eval_transform", size)
    mean, std = _check_norm("seg_eval_transform", mean, std)
    return _SegEval(size, mean, std)
