"""Image folders read into memory: class folders for classification, image/mask folders for
segmentation, and a lazily decoding dataset for images too large to hold decoded.

Layouts (extensions `IMAGE_EXTENSIONS`, case-insensitive; hidden files and folders are ignored):

    class folders         <root>/<split>/<class>/**/*.{png,jpg,jpeg}    splits: train, test, [val]
                          (e.g. CIFAR-10 exported as images; labels index the sorted train classes)
    segmentation folders  <root>/<split>/images/<name>.{png,jpg,jpeg}
                          <root>/<split>/masks/<name>.png               integer class ids, same size

Decoding is PIL's. Whatever the file's mode, images come out as RGB uint8:
grayscale ("L", "1", 16-bit "I;16"/"I", scaled by 1/257) is repeated over three channels,
palette images are expanded, images with an alpha channel (RGBA, LA, palette with transparency)
are composited over a white background, CMYK/YCbCr are converted by PIL. Masks must be
single-channel integer images ("L", "P", "1", "I", "I;16"): a palette PNG's indices are the class
ids; RGB masks are refused (map colours to ids first).

A file PIL cannot decode is skipped with a `warnings.warn` naming it (`strict=True`: a
`BadImageError` naming it); every other problem of the data (missing or empty folders, a class
folder without images, test classes unknown to train, images of different sizes without
`size`, a mask missing, of another size than its image, of a value outside the classes and not
`ignore_index`, or not single-channel) is a `ValueError` naming the path and the value, raised
before anything is returned.

Example:
    >>> train, skipped = load_class_folders("data/cifar10", "train", workers=2, progress=True)
    >>> test, _ = load_class_folders("data/cifar10", "test")   # labels index train's classes
    >>> train.images.shape, train.classes[:3]
    (torch.Size([50000, 3, 32, 32]), ['airplane', 'automobile', 'bird'])
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from os import PathLike
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

__all__ = [
    "IMAGE_EXTENSIONS", "BadImageError", "ImageSet", "class_folder_splits", "scan_class_folder",
    "load_class_folders", "ClassFolderDataset", "load_segmentation_folders", "decode_image",
    "decode_mask",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
"""Extensions of the image files the loaders read (compared case-insensitively)."""

_MASK_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")


class BadImageError(ValueError):
    """A file could not be decoded as an image (raised in strict mode). Names the file.

    Attributes: path (Path), reason (str).
    """

    def __init__(self, path: str | PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image '{self.path}': {reason}")


@dataclass
class ImageSet:
    """An in-memory split: what the recipes train and evaluate on.

    images: uint8 (N, 3, H, W), RGB.
    labels: int64 (N,), the many-class label in 0..len(classes)-1 (zeros for segmentation sets).
    classes: class names (empty for segmentation sets).
    binary: int64 (N,) 0/1 binary label (generated data), or None.
    masks: int64 (N, H, W) class ids in 0..len(seg_classes)-1, or ignore_index; or None.
    seg_classes: names of the mask ids, or None.
    ignore_index: mask value of void pixels.
    paths: source file of each image (folder sets), or None.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    binary: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    seg_classes: list[str] | None = None
    ignore_index: int = 255
    paths: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        im = self.images
        if not isinstance(im, torch.Tensor) or im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] != 3:
            raise ValueError(f"ImageSet: images={_describe(im)}; expected a uint8 tensor (N, 3, H, W)")
        n = im.shape[0]
        for name in ("labels", "binary"):
            value = getattr(self, name)
            if value is None and name == "binary":
                continue
            if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or tuple(value.shape) != (n,):
                raise ValueError(f"ImageSet: {name}={_describe(value)}; expected an int64 tensor ({n},)")
        if self.masks is not None:
            m = self.masks
            if (not isinstance(m, torch.Tensor) or m.dtype != torch.int64
                    or tuple(m.shape) != (n, im.shape[2], im.shape[3])):
                raise ValueError(f"ImageSet: masks={_describe(m)}; expected an int64 tensor "
                                 f"({n}, {im.shape[2]}, {im.shape[3]})")
        if self.paths is not None and len(self.paths) != n:
            raise ValueError(f"ImageSet: {len(self.paths)} paths for {n} images; expected one per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: torch.Tensor) -> "ImageSet":
        """The rows selected by `index` (int64 positions or a bool mask of length N), in order."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            if tuple(index.shape) != (len(self),):
                raise ValueError(f"ImageSet.subset: bool index of shape {tuple(index.shape)}; "
                                 f"expected ({len(self)},)")
            index = index.nonzero().flatten()
        elif index.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"ImageSet.subset: index of dtype {index.dtype}; expected integer or bool")
        index = index.to(torch.int64).flatten()
        if len(index) and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise ValueError(f"ImageSet.subset: index values in [{int(index.min())}, {int(index.max())}]; "
                             f"expected positions in [0, {len(self)})")
        pick = index.tolist()
        return replace(
            self,
            images=self.images[index],
            labels=self.labels[index],
            binary=None if self.binary is None else self.binary[index],
            masks=None if self.masks is None else self.masks[index],
            classes=list(self.classes),
            seg_classes=None if self.seg_classes is None else list(self.seg_classes),
            paths=None if self.paths is None else [self.paths[i] for i in pick],
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor(dtype={value.dtype}, shape={tuple(value.shape)})"
    return repr(value) if value is None else type(value).__name__


# ----------------------------------------------------------------------------- decoding


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _to_rgb(img: Image.Image) -> np.ndarray:
    """PIL image of any mode -> (H, W, 3) uint8 RGB."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode.startswith("I") or mode == "F":
        # 16-bit PNGs ("I;16*", or "I" in older Pillow) hold 0..65535: v8 = round(v16 / 257).
        # A mode-"I" image whose values fit in 8 bits is taken as 8-bit; "F" in [0, 1] is scaled.
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
            arr = arr / 257.0
        elif mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:4] / 255.0
        # composite over white: c = a * c + (1 - a) * 255
        return np.clip(np.rint(rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)), 0, 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _resize_rgb(arr: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3): PIL bilinear, whose kernel widens when downscaling
    (antialiased)."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def _resize_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) -> (size, size) by nearest neighbour at pixel centres: never a new value."""
    h, w = mask.shape
    if h == size and w == size:
        return mask
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def decode_image(path: str | PathLike, size: int | None = None) -> np.ndarray:
    """Decode one image file to (H, W, 3) uint8 RGB ((size, size, 3) when `size` is given).

    Raises BadImageError (a ValueError) naming the file when PIL cannot read it.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            arr = _to_rgb(img)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadImageError(path, f"{type(err).__name__}: {err}") from err
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImageError(path, f"decoded to an array of shape {arr.shape}")
    return arr if size is None else _resize_rgb(arr, size)


def decode_mask(path: str | PathLike) -> np.ndarray:
    """Decode one mask file to (H, W) int64 class ids (a palette PNG gives its indices).

    Raises BadImageError when PIL cannot read the file, ValueError naming the file and its mode
    when it is not a single-channel integer image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img) if mode in _MASK_MODES else None
    except Exception as err:
        raise BadImageError(path, f"{type(err).__name__}: {err}") from err
    if arr is None:
        raise ValueError(f"mask '{path}' has mode {mode!r}; expected a single-channel integer image "
                         f"(one of {', '.join(_MASK_MODES)}) holding class ids; RGB/RGBA colour masks "
                         "must be converted to class ids first")
    return arr.astype(np.int64)


def _check_size_arg(fn: str, size: int | None) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
        raise ValueError(f"{fn}: size={size!r}; expected None or a positive integer (pixels)")


def _check_workers(fn: str, workers: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"{fn}: workers={workers!r}; expected a non-negative integer")


def _map(fn: Callable, items: Sequence, workers: int, progress: bool, desc: str) -> Iterable:
    """fn over items in order, in a thread pool when workers > 0 (PIL and zlib release the GIL
    while decoding); with a tqdm bar when progress."""
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="img")
    try:
        if workers > 0 and len(items) > 1:
            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                for result in pool.map(fn, items):
                    bar.update(1)
                    yield result
            finally:  # on an error, drop the files not decoded yet instead of decoding them all
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for item in items:
                result = fn(item)
                bar.update(1)
                yield result
    finally:
        bar.close()


def _skip(path: Path, err: BadImageError, strict: bool, skipped: list[tuple[str, str]]) -> None:
    if strict:
        raise err
    warnings.warn(f"skipping unreadable image '{path}': {err.reason}", stacklevel=3)
    skipped.append((str(path), err.reason))


# ----------------------------------------------------------------------------- class folders


def _visible_dirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def class_folder_splits(root: str | PathLike) -> dict[str, Path]:
    """The split folders of a class-folder root: {"train": ..., "test": ..., "val": ... if present}.

    Raises ValueError naming the path when the root is missing or not a folder, when train or
    test is missing, or when a split holds no class folder.
    """
    root = Path(root)
    if not root.exists():
        raise ValueError(f"class folders: root '{root}' does not exist; expected "
                         "<root>/train/<class>/*.png and <root>/test/<class>/*.png")
    if not root.is_dir():
        raise ValueError(f"class folders: root '{root}' is not a folder")
    splits: dict[str, Path] = {}
    for split in ("train", "test", "val"):
        path = root / split
        if not path.is_dir():
            if split == "val":
                continue
            raise ValueError(f"class folders: '{path}' is missing; expected the splits train and test "
                             f"(and optionally val) under '{root}', each holding <class>/*.png")
        if not _visible_dirs(path):
            raise ValueError(f"class folders: '{path}' holds no class folder; expected "
                             f"{path}/<class>/*.png")
        splits[split] = path
    return splits


def scan_class_folder(split_dir: str | PathLike, classes: list[str] | None = None
                      ) -> tuple[list[Path], list[int], list[str]]:
    """List the images of one split: (paths, labels, classes), sorted and deterministic.

    Args:
        split_dir: <root>/<split>, holding one sub-folder per class (searched recursively).
        classes: the class list labels index (train's, for the other splits); None: the
            split's own sorted class folder names.

    Raises ValueError naming the path for a missing folder, no class folders, a class folder
    with no image, or class folders not in `classes` (naming them).
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise ValueError(f"scan_class_folder: '{split_dir}' is not a folder")
    class_dirs = _visible_dirs(split_dir)
    if not class_dirs:
        raise ValueError(f"scan_class_folder: '{split_dir}' holds no class folder; expected "
                         f"{split_dir}/<class>/*.png")
    found = [d.name for d in class_dirs]
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        unknown = [name for name in found if name not in classes]
        if unknown:
            raise ValueError(f"scan_class_folder: class folders {unknown} in '{split_dir}' are not "
                             f"among the training classes {classes}")
    index = {name: i for i, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for class_dir in class_dirs:
        files = []
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image_file(Path(f)))
        if not files:
            raise ValueError(f"scan_class_folder: class folder '{class_dir}' holds no image "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        paths.extend(files)
        labels.extend([index[class_dir.name]] * len(files))
    return paths, labels, classes


def _decode_all(paths: Sequence[Path], size: int | None, strict: bool, workers: int, progress: bool,
                desc: str, masks: Sequence[Path] | None = None
                ) -> tuple[list[int], torch.Tensor | None, list[np.ndarray] | None, list[tuple[str, str]]]:
    """Decode images (and masks) into one preallocated uint8 tensor.

    Returns (kept positions, images (kept, 3, S, S), masks list or None, skipped)."""
    def work(i: int) -> tuple[np.ndarray | BadImageError, np.ndarray | BadImageError | None]:
        # native size first: the size checks below name the file's own size
        try:
            image = decode_image(paths[i])
        except BadImageError as err:
            return err, None
        if masks is None:
            return image, None
        try:
            return image, decode_mask(masks[i])
        except BadImageError as err:
            return image, err

    skipped: list[tuple[str, str]] = []
    kept: list[int] = []
    out: torch.Tensor | None = None
    mask_list: list[np.ndarray] | None = [] if masks is not None else None
    first: tuple[Path, tuple[int, int]] | None = None
    for i, (image, mask) in enumerate(_map(work, range(len(paths)), workers, progress, desc)):
        if isinstance(image, BadImageError):
            _skip(paths[i], image, strict, skipped)
            continue
        if isinstance(mask, BadImageError):
            _skip(masks[i], mask, strict, skipped)
            continue
        hw = (int(image.shape[0]), int(image.shape[1]))
        if mask is not None and tuple(mask.shape) != hw:
            raise ValueError(f"mask '{masks[i]}' is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image "
                             f"'{paths[i]}' is {hw[0]}x{hw[1]}; expected the same size")
        if size is None:
            if first is None:
                first = (paths[i], hw)
            elif hw != first[1]:
                raise ValueError(f"image '{paths[i]}' is {hw[0]}x{hw[1]} (HxW) but '{first[0]}' is "
                                 f"{first[1][0]}x{first[1][1]}; images of different sizes need a "
                                 "common size: pass size= (--image-size)")
        else:
            image = _resize_rgb(image, size)
            if mask is not None:
                mask = _resize_nearest(mask, size)
        if out is None:
            out = torch.empty((len(paths), 3, image.shape[0], image.shape[1]), dtype=torch.uint8)
        out[len(kept)] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        kept.append(i)
        if mask_list is not None:
            mask_list.append(mask)
    if out is not None and len(kept) < len(paths):
        out = out[:len(kept)].clone()
    return kept, out, mask_list, skipped


def load_class_folders(root: str | PathLike, split: str, *, size: int | None = None,
                       classes: list[str] | None = None, strict: bool = False, workers: int = 0,
                       progress: bool = False) -> tuple[ImageSet, list[tuple[str, str]]]:
    """Decode every image of one split of class folders into memory.

    Args:
        root: the folder holding train/, test/ and optionally val/.
        split: "train", "test" or "val".
        size: resize every image to (size, size) (bilinear, antialiased) when it differs; None:
            all images must already share one size.
        classes: the class list labels index; None: train's sorted class folder names (for every
            split, so test labels agree with train's).
        strict: an unreadable file raises BadImageError instead of being skipped with a warning.
        workers: > 0 decodes in a thread pool of that many threads.
        progress: show a tqdm bar.

    Returns:
        (ImageSet with images uint8 (N, 3, H, W), labels int64 (N,), classes, paths;
         skipped: [(path, reason)] of the unreadable files).

    Raises:
        ValueError naming the path (and value) for every bad-input case listed in the module
        docstring; BadImageError in strict mode.
    """
    _check_size_arg("load_class_folders", size)
    _check_workers("load_class_folders", workers)
    splits = class_folder_splits(root)
    if split not in splits:
        raise ValueError(f"load_class_folders: split={split!r}; '{root}' has the splits {sorted(splits)}")
    if classes is None:
        classes = [d.name for d in _visible_dirs(splits["train"])]
    paths, labels, classes = scan_class_folder(splits[split], classes)
    kept, images, _, skipped = _decode_all(paths, size, strict, workers, progress, f"decoding {split}")
    if images is None:
        raise ValueError(f"load_class_folders: no readable image in '{splits[split]}' "
                         f"({len(skipped)} unreadable files)")
    return ImageSet(
        images=images,
        labels=torch.tensor([labels[i] for i in kept], dtype=torch.int64),
        classes=list(classes),
        paths=[str(paths[i]) for i in kept],
    ), skipped


class ClassFolderDataset(torch.utils.data.Dataset):
    """Images decoded on access (for large images, e.g. 224 px, that do not fit decoded).

    __getitem__(i) -> (transform(image) if transform else image uint8 (3, H, W), label int).
    An unreadable file raises BadImageError with strict=True; otherwise a warning names it
    (once per process) and the next readable image (i + 1, i + 2, ... cyclically) is returned.

    Args:
        paths, labels: e.g. from `scan_class_folder`.
        transform: a callable on the uint8 (3, H, W) image.
        strict: see above.
        size: resize to (size, size) when given and different (bilinear, antialiased).

    Example:
        >>> paths, labels, classes = scan_class_folder("data/imagenet100/train")
        >>> ds = ClassFolderDataset(paths, labels, transform=eval_transform(224), size=256)
    """

    def __init__(self, paths: Sequence[str | PathLike], labels: Sequence[int] | torch.Tensor,
                 transform: Callable | None = None, strict: bool = False, size: int | None = None) -> None:
        _check_size_arg("ClassFolderDataset", size)
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
        if len(self.labels) != len(self.paths):
            raise ValueError(f"ClassFolderDataset: {len(self.labels)} labels for {len(self.paths)} "
                             "paths; expected one label per path")
        if not self.paths:
            raise ValueError("ClassFolderDataset: paths is empty; expected at least one image")
        self.transform = transform
        self.strict = strict
        self.size = size
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, *, return_index: bool = False) -> torch.Tensor | tuple[torch.Tensor, int]:
        """The uint8 (3, H, W) image at `index` (or the next readable one, see the class doc);
        with return_index, also the index of the image returned (whose label applies)."""
        n = len(self.paths)
        for step in range(n):
            used = (index + step) % n
            path = self.paths[used]
            try:
                arr = decode_image(path, self.size)
            except BadImageError as err:
                if self.strict:
                    raise
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping unreadable image '{path}': {err.reason}", stacklevel=2)
                continue
            image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
            return (image, used) if return_index else image
        raise BadImageError(self.paths[index % n], "no readable image in the whole dataset")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, used = self.load(int(index), return_index=True)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[used])


# ----------------------------------------------------------------------------- segmentation


def load_segmentation_folders(root: str | PathLike, split: str, *, size: int | None = None,
                              num_classes: int | None = None, ignore_index: int = 255,
                              strict: bool = False, workers: int = 0, progress: bool = False
                              ) -> tuple[ImageSet, list[tuple[str, str]]]:
    """Decode <root>/<split>/images/* and their masks <root>/<split>/masks/<name>.png.

    Args:
        root, split: the folder layout of the module docstring.
        size: resize to (size, size): images bilinear (antialiased), masks nearest; None: all
            images must share one size.
        num_classes: mask ids must lie in [0, num_classes) or equal ignore_index; None: inferred
            as 1 + the largest mask value other than ignore_index over the whole split.
        ignore_index: the void label, kept as is.
        strict, workers, progress: as in `load_class_folders`.

    Returns:
        (ImageSet with images uint8 (N, 3, H, W), masks int64 (N, H, W), labels zeros, classes
         [], seg_classes ["0", ..., "K-1"], ignore_index, paths; skipped [(path, reason)]).
        An unreadable image or mask skips the pair.

    Raises:
        ValueError naming the path and value: missing folders, no image, an image without a mask,
        two images of one name, mask size != image size, a mask value outside [0, num_classes)
        and != ignore_index, a mask that is not a single-channel integer image.
    """
    fn = "load_segmentation_folders"
    _check_size_arg(fn, size)
    _check_workers(fn, workers)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise ValueError(f"{fn}: ignore_index={ignore_index!r}; expected an integer")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
                                    or num_classes < 1):
        raise ValueError(f"{fn}: num_classes={num_classes!r}; expected None or a positive integer")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{fn}: root '{root}' does not exist or is not a folder; expected "
                         "<root>/<split>/images and <root>/<split>/masks")
    split_dir = root / split
    image_dir, mask_dir = split_dir / "images", split_dir / "masks"
    for path in (split_dir, image_dir, mask_dir):
        if not path.is_dir():
            raise ValueError(f"{fn}: '{path}' is missing; expected <root>/<split>/images/<name>.png "
                             "and <root>/<split>/masks/<name>.png")
    images = sorted((p for p in image_dir.iterdir() if p.is_file() and _is_image_file(p)), key=lambda p: p.name)
    if not images:
        raise ValueError(f"{fn}: '{image_dir}' holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    mask_files = {p.stem: p for p in sorted(mask_dir.iterdir(), key=lambda p: p.name)
                  if p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith(".")}
    seen: dict[str, Path] = {}
    masks: list[Path] = []
    missing: list[str] = []
    for path in images:
        if path.stem in seen:
            raise ValueError(f"{fn}: '{path}' and '{seen[path.stem]}' share the name {path.stem!r}; "
                             "expected one image per mask name")
        seen[path.stem] = path
        if path.stem not in mask_files:
            missing.append(str(path))
        else:
            masks.append(mask_files[path.stem])
    if missing:
        shown = ", ".join(f"'{p}'" for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{fn}: no mask for {shown}; expected '{mask_dir}/<name>.png' for each image")
    orphans = sorted(set(mask_files) - set(seen))
    if orphans:
        warnings.warn(f"{fn}: {len(orphans)} masks in '{mask_dir}' have no image (e.g. "
                      f"'{mask_files[orphans[0]]}'); ignored", stacklevel=2)

    kept, stacked, mask_list, skipped = _decode_all(images, size, strict, workers, progress,
                                                    f"decoding {split}", masks=masks)
    if stacked is None:
        raise ValueError(f"{fn}: no readable image/mask pair in '{split_dir}' ({len(skipped)} unreadable files)")
    # value checks over the whole split before returning
    largest = -1
    for i, mask in zip(kept, mask_list):
        valid = mask[mask != ignore_index]
        if valid.size == 0:
            continue
        lo, hi = int(valid.min()), int(valid.max())
        if lo < 0:
            raise ValueError(f"{fn}: mask '{masks[i]}' holds the value {lo}; expected class ids >= 0 "
                             f"or ignore_index={ignore_index}")
        if num_classes is not None and hi >= num_classes:
            raise ValueError(f"{fn}: mask '{masks[i]}' holds the value {hi}; expected class ids in "
                             f"[0, {num_classes}) (num_classes={num_classes}) or ignore_index={ignore_index}")
        largest = max(largest, hi)
    if num_classes is None:
        if largest < 0:
            raise ValueError(f"{fn}: every mask pixel in '{mask_dir}' equals ignore_index={ignore_index}; "
                             "cannot infer num_classes")
        num_classes = largest + 1
    n = len(kept)
    return ImageSet(
        images=stacked,
        labels=torch.zeros(n, dtype=torch.int64),
        classes=[],
        masks=torch.from_numpy(np.stack(mask_list)).to(torch.int64),
        seg_classes=[str(c) for c in range(int(num_classes))],
        ignore_index=int(ignore_index),
        paths=[str(images[i]) for i in kept],
    ), skipped
