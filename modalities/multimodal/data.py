"""Image-caption pairs read through Hugging Face `datasets`, decoded once into memory.

Sources (`load_pairs(source, ...)`):

    imagefolder     <root>/{train,validation,test}/... images + metadata.jsonl or metadata.csv
                    (split folders as `datasets` names them: val/, valid/, dev/ are "validation");
                    or images + metadata at the root with a `split` column (or no split at all:
                    everything is "train"). Read with `load_dataset("imagefolder", data_dir=root)`.
    save_to_disk    a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`: an
                    image column (feature `datasets.Image`, paths or embedded bytes) and a text
                    column; a plain Dataset is "train" unless it has a `split` column.
                    Read with `datasets.load_from_disk`.
    manifest        a .csv, .jsonl (or .json lines) file of (image path, caption[, split]); image
                    paths relative to the manifest's folder (or absolute). Read with
                    `load_dataset("csv" | "json", data_files=manifest)`.

Columns: the caption column is the first of `TEXT_COLUMNS` ("text", "caption", "captions") that is
present; the image path column of a manifest is the first of `IMAGE_PATH_COLUMNS`. A caption cell
is a string or a list of strings; several rows may name the same image. Either way the captions
are grouped by image (in order of first appearance), so `CaptionPairs.captions_of(i)` lists every
caption of image i. The optional `split` column takes "train", "validation" (aliases "val",
"valid", "dev") or "test". Other scalar columns of the metadata are kept per image in
`CaptionPairs.attributes` (the generated scenes use this for their `heldout` flag).

What `datasets` does with the metadata (datasets 5.2, checked): a list column gives one row per
image with the list; several rows of one `file_name` give several rows with the same image path;
an image file with no metadata row is left out without a word (this module warns, naming them);
a row whose file does not exist is kept (decoding then fails, naming the file); split folders
other than the recognised names (e.g. a `zeroshot/` class folder next to `train/`) are ignored.

Images are decoded with PIL once (a thread pool with `workers` > 0, as `modalities.image.data`
does), converted to RGB by `modalities.image.data`'s rules (alpha over white, 16-bit scaled),
and resized so the shorter side is `image_size` with a centre crop (bilinear, antialiased), into
one uint8 (n, 3, S, S) tensor. JPEG files are decoded at a reduced scale (PIL's `draft`) when
that still leaves the shorter side >= S.

Errors (ValueError naming the file, row, column or split): the source does not exist or is not
a known kind; no caption column (the message lists the columns found); a row without a caption
or with an empty caption (row number and image named); an image that does not decode (every
such file listed; with `skip_bad=True` they are dropped with their captions and a warning gives
the count and names instead); an empty split; no train split (when every split is asked for);
a split asked for that the source does not have (the available ones named); an unknown value
in a split column. All caption checks run before any image is decoded.

Example:
    >>> from modalities.multimodal.data import load_pairs
    >>> pairs = load_pairs("data/flickr8k", image_size=64, workers=2, progress=True)
    >>> train = pairs["train"]
    >>> train.images.shape, len(train.captions), train.captions_of(0)
    (torch.Size([6000, 3, 64, 64]), 30000, [0, 1, 2, 3, 4])
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

# _map (the thread-pool decoding loop) and _to_rgb (mode conversion) are private helpers of the
# image data module; they are reused here rather than copied.
from modalities.image.data import BadImageError, _map, _to_rgb

__all__ = [
    "CaptionPairs", "load_pairs", "decode_resize", "TEXT_COLUMNS", "IMAGE_PATH_COLUMNS",
    "SPLIT_ALIASES",
]

TEXT_COLUMNS = ("text", "caption", "captions")
"""Caption column names, in order of preference."""

IMAGE_PATH_COLUMNS = ("file_name", "image", "image_path", "path", "filepath", "file")
"""Image path column names of a .csv / .jsonl manifest, in order of preference."""

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}
"""Accepted split names (folder names, DatasetDict keys, `split` column values, `split=`)."""

_SPLIT_ORDER = ("train", "validation", "test")
_META_NAMES = ("metadata.jsonl", "metadata.csv")


# ----------------------------------------------------------------------------- the container


@dataclass
class CaptionPairs:
    """One split of image-caption pairs, decoded.

    images: uint8 (n_images, 3, S, S) RGB.
    captions: every caption (n_captions >= n_images), grouped by image in image order.
    caption_image: int64 (n_captions,), the image index of each caption.
    image_files: source path (or "row r" for an embedded image without a path) of each image.
    attributes: per-image values of the other scalar metadata columns ({column: list of
        n_images values}); empty when there are none.
    """

    images: torch.Tensor
    captions: list[str]
    caption_image: torch.Tensor
    image_files: list[str]
    attributes: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        im = self.images
        if not isinstance(im, torch.Tensor) or im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] != 3:
            raise ValueError(f"CaptionPairs: images={_describe(im)}; expected a uint8 tensor (n, 3, S, S)")
        n = int(im.shape[0])
        ci = self.caption_image
        if (not isinstance(ci, torch.Tensor) or ci.dtype != torch.int64
                or tuple(ci.shape) != (len(self.captions),)):
            raise ValueError(f"CaptionPairs: caption_image={_describe(ci)}; expected an int64 tensor "
                             f"({len(self.captions)},), one image index per caption")
        if len(self.captions) and (int(ci.min()) < 0 or int(ci.max()) >= n):
            raise ValueError(f"CaptionPairs: caption_image values in [{int(ci.min())}, {int(ci.max())}]; "
                             f"expected image indices in [0, {n})")
        if len(self.image_files) != n:
            raise ValueError(f"CaptionPairs: {len(self.image_files)} image_files for {n} images; "
                             "expected one per image")
        counts = torch.bincount(ci, minlength=n) if len(self.captions) else torch.zeros(n, dtype=torch.int64)
        if n and int(counts.min()) == 0:
            i = int((counts == 0).nonzero()[0])
            raise ValueError(f"CaptionPairs: image {i} ('{self.image_files[i]}') has no caption; "
                             "expected at least one caption per image")
        for name, values in self.attributes.items():
            if len(values) != n:
                raise ValueError(f"CaptionPairs: attribute {name!r} has {len(values)} values for "
                                 f"{n} images; expected one per image")
        # caption indices of each image, in caption order
        order = torch.argsort(ci, stable=True)
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).tolist()
        self._order = order.tolist()

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def captions_of(self, i: int) -> list[int]:
        """Indices into `captions` of image i's captions (in caption order)."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -self.n_images <= i < self.n_images:
            raise ValueError(f"CaptionPairs.captions_of: i={i!r}; expected an image index in "
                             f"[0, {self.n_images})")
        i = int(i) % self.n_images
        return self._order[self._offsets[i]:self._offsets[i + 1]]

    def subset(self, image_index: torch.Tensor | list[int]) -> "CaptionPairs":
        """The images at `image_index` (int64 positions, in that order, no repeats) with all
        their captions; caption_image is renumbered."""
        index = torch.as_tensor(image_index, dtype=torch.int64).flatten()
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.n_images):
            raise ValueError(f"CaptionPairs.subset: image_index values in [{int(index.min())}, "
                             f"{int(index.max())}]; expected positions in [0, {self.n_images})")
        if len(torch.unique(index)) != len(index):
            raise ValueError("CaptionPairs.subset: image_index repeats an image; expected distinct positions")
        picks = index.tolist()
        captions, caption_image = [], []
        for new, old in enumerate(picks):
            for c in self.captions_of(old):
                captions.append(self.captions[c])
                caption_image.append(new)
        return CaptionPairs(
            images=self.images[index].clone(),
            captions=captions,
            caption_image=torch.tensor(caption_image, dtype=torch.int64),
            image_files=[self.image_files[i] for i in picks],
            attributes={k: [v[i] for i in picks] for k, v in self.attributes.items()},
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor(dtype={value.dtype}, shape={tuple(value.shape)})"
    return repr(value) if value is None else type(value).__name__


# ----------------------------------------------------------------------------- decoding


def decode_resize(source: str | PathLike | bytes, size: int, name: str | None = None) -> np.ndarray:
    """Decode an image file (path) or encoded bytes to (size, size, 3) uint8 RGB: shorter side
    resized to `size` (bilinear, antialiased), centre crop.

    Raises BadImageError (a ValueError) naming the file (or `name`) when PIL cannot read it.

    Example:
        >>> decode_resize("photo.jpg", 64).shape
        (64, 64, 3)
    """
    label = name if name is not None else ("<bytes>" if isinstance(source, bytes) else str(source))
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            # JPEG: decode at 1/2, 1/4 or 1/8 scale when the result still covers (size, size)
            img.draft(img.mode, (size, size))
            img.load()
            arr = _to_rgb(img)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadImageError(label, f"{type(err).__name__}: {err}") from err
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImageError(label, f"decoded to an array of shape {arr.shape}")
    h, w = arr.shape[:2]
    if h == size and w == size:
        return arr
    side = min(h, w)
    # centre square of the shorter side, resampled to size x size in one step
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    out = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.uint8)


# ----------------------------------------------------------------------------- reading rows


@dataclass
class _Rows:
    """The raw rows of one split (nothing decoded)."""

    sources: list          # path str or bytes per row
    names: list[str]       # what messages call the image of each row
    keys: list             # grouping key per row: images of equal key are one image
    texts: list            # raw caption cell per row
    row_ids: list[int]     # row number (0-based) in the dataset or manifest, for messages
    extra: dict[str, list] = field(default_factory=dict)


@contextmanager
def _quiet_datasets(progress: bool) -> Iterator[None]:
    """datasets' own progress bars follow `progress`; restored afterwards."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    if was and not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was and not progress:
            datasets.enable_progress_bars()


def _source_kind(source: Path) -> str:
    if source.is_dir():
        if (source / "dataset_dict.json").is_file() or (source / "state.json").is_file():
            return "save_to_disk"
        return "imagefolder"
    suffix = source.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".json"):
        return "json"
    raise ValueError(f"load_pairs: source='{source}' is a file of unknown kind; expected an imagefolder "
                     "directory, a save_to_disk directory, or a .csv / .jsonl manifest")


def _pick_column(columns: list[str], candidates: tuple[str, ...], what: str, where: str) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"load_pairs: no {what} column in {where}; found the columns {columns}, expected one "
                     f"of {list(candidates)}")


def _normalise_split(name: str, where: str) -> str:
    key = str(name).strip().lower()
    if key not in SPLIT_ALIASES:
        raise ValueError(f"load_pairs: split {name!r} in {where} is not a known split name; expected one "
                         f"of {sorted(SPLIT_ALIASES)} (train / validation / test)")
    return SPLIT_ALIASES[key]


def _image_cells(ds: Any, column: str) -> list[dict]:
    """The undecoded {"bytes", "path"} cells of a `datasets.Image` column."""
    import datasets

    return list(ds.cast_column(column, datasets.Image(decode=False))[column])


def _rows_from_dataset(ds: Any, where: str, image_column: str | None = None) -> tuple[_Rows, list[str]]:
    """Rows of a Dataset whose images are a `datasets.Image` column."""
    import datasets

    columns = list(ds.column_names)
    if image_column is None:
        image_columns = [c for c in columns if isinstance(ds.features[c], datasets.Image)]
        if not image_columns:
            raise ValueError(f"load_pairs: no image column (feature datasets.Image) in {where}; found the "
                             f"columns {columns} with features {dict(ds.features)}")
        image_column = "image" if "image" in image_columns else image_columns[0]
    text_column = _pick_column(columns, TEXT_COLUMNS, "caption", where)
    sources, names, keys = [], [], []
    for r, cell in enumerate(_image_cells(ds, image_column)):
        data, path = (cell or {}).get("bytes"), (cell or {}).get("path")
        if data is not None:
            sources.append(data)
            keys.append(("bytes", hashlib.sha1(data).hexdigest()))
            names.append(f"{path} (row {r} of {where})" if path else f"row {r} of {where}")
        elif path is not None:
            sources.append(path)
            keys.append(("path", os.path.abspath(path)))
            names.append(str(path))
        else:
            sources.append(None)
            keys.append(("row", r))
            names.append(f"row {r} of {where}")
    texts = list(ds[text_column])
    extra = {c: list(ds[c]) for c in columns if c not in (image_column, text_column)}
    return _Rows(sources, names, keys, texts, list(range(len(texts))), extra), columns


def _rows_from_manifest(path: Path, kind: str, cache_dir: str | None) -> tuple[_Rows, list[str]]:
    import datasets

    where = f"the manifest '{path}'"
    if kind == "csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            first = next((row for row in reader if row), None)
        if header and first is None:
            raise ValueError(f"load_pairs: {where} is empty (a header and no rows); expected one row per "
                             "(image, caption) pair")
        if not header:
            raise ValueError(f"load_pairs: {where} is empty; expected a header row naming an image path "
                             f"column ({', '.join(IMAGE_PATH_COLUMNS)}) and a caption column "
                             f"({', '.join(TEXT_COLUMNS)})")
        # every column read as text: a caption "42" stays a string, an empty cell is a missing one
        features = datasets.Features({name: datasets.Value("string") for name in header})
        ds = _load("csv", where, data_files=str(path), features=features, cache_dir=cache_dir)
    else:
        with path.open(encoding="utf-8") as f:
            if not any(line.strip() for line in f):
                raise ValueError(f"load_pairs: {where} is empty; expected one JSON object per line with an "
                                 "image path and a caption")
        ds = _load("json", where, data_files=str(path), cache_dir=cache_dir)
    ds = ds["train"]
    columns = list(ds.column_names)
    path_column = _pick_column(columns, IMAGE_PATH_COLUMNS, "image path", where)
    text_column = _pick_column(columns, TEXT_COLUMNS, "caption", where)
    base = path.parent
    sources, names, keys = [], [], []
    for r, value in enumerate(ds[path_column]):
        if value is None or not str(value).strip():
            line = r + 2 if kind == "csv" else r + 1
            raise ValueError(f"load_pairs: row {r} (line {line}) of {where} has no image path in column "
                             f"{path_column!r}")
        p = Path(str(value).strip())
        p = p if p.is_absolute() else base / p
        sources.append(str(p))
        keys.append(("path", os.path.abspath(p)))
        names.append(str(p))
    texts = list(ds[text_column])
    extra = {c: list(ds[c]) for c in columns if c not in (path_column, text_column)}
    return _Rows(sources, names, keys, texts, list(range(len(texts))), extra), columns


def _load(builder: str, where: str, **kwargs: Any) -> Any:
    """datasets.load_dataset with its errors (a list/string mix in a JSON column, an unreadable
    CSV, no data files) turned into a ValueError naming the source."""
    import datasets

    try:
        return datasets.load_dataset(builder, **kwargs)
    except Exception as err:  # ArrowInvalid, DatasetGenerationError, FileNotFoundError, ...
        cause = err
        while cause.__cause__ is not None and str(cause) == str(err):
            cause = cause.__cause__
        raise ValueError(f"load_pairs: `datasets` could not read {where}: {type(err).__name__}: {err}"
                         + (f" ({type(cause).__name__}: {cause})" if cause is not err else "")) from err


def _uncaptioned_images(root: Path, used: set[str]) -> list[str]:
    """Image files under a folder holding a metadata file that no metadata row names (datasets'
    imagefolder drops them without a word)."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = set(ImageFolder.EXTENSIONS)
    missing: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if not any(m in filenames for m in _META_NAMES):
            continue
        for sub_dir, sub_dirs, sub_files in os.walk(dirpath):
            sub_dirs[:] = sorted(d for d in sub_dirs if not d.startswith("."))
            for f in sorted(sub_files):
                if f.startswith(".") or Path(f).suffix.lower() not in extensions:
                    continue
                full = os.path.abspath(os.path.join(sub_dir, f))
                if full not in used:
                    missing.append(full)
        dirnames[:] = []  # the subtree is done
    return missing


def _imagefolder_files(root: Path, wanted: str | None = None) -> dict[str, Any]:
    """load_dataset arguments for an imagefolder: split folders directly under root named as in
    SPLIT_ALIASES -> explicit data_files patterns (one glob per split: datasets' own inference
    globs the tree once per known split keyword, about 20 s for 10k files on 2 cores); any other
    layout -> data_dir, datasets' inference. `wanted`: only that split's folders when it has some."""
    by_split: dict[str, list[str]] = {}
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        key = child.name.lower()
        if child.is_dir() and key in SPLIT_ALIASES:
            by_split.setdefault(SPLIT_ALIASES[key], []).append(f"{child.name}/**")
    if not by_split:
        return {"data_dir": str(root)}
    if wanted in by_split:
        by_split = {wanted: by_split[wanted]}
    return {"data_dir": str(root), "data_files": by_split}


def _read_source(source: Path, cache_dir: str | None, wanted: str | None = None
                 ) -> dict[str, tuple[_Rows, str]]:
    """{split: (rows, where)} of every split of the source (an imagefolder with split folders:
    only `wanted`'s, when given and present); nothing decoded."""
    import datasets

    kind = _source_kind(source)
    out: dict[str, tuple[_Rows, str]] = {}
    if kind in ("csv", "json"):
        rows, _ = _rows_from_manifest(source, kind, cache_dir)
        return _split_by_column({"train": (rows, f"the manifest '{source}'")}, explicit=False)
    if kind == "save_to_disk":
        try:
            loaded = datasets.load_from_disk(str(source))
        except Exception as err:
            raise ValueError(f"load_pairs: `datasets.load_from_disk` could not read '{source}': "
                             f"{type(err).__name__}: {err}") from err
        if isinstance(loaded, datasets.DatasetDict):
            for name, ds in loaded.items():
                where = f"split {name!r} of the saved dataset '{source}'"
                split = _normalise_split(name, f"the saved dataset '{source}'")
                if split in out:
                    raise ValueError(f"load_pairs: the saved dataset '{source}' has two splits that mean "
                                     f"{split!r} ({list(loaded)}); expected one")
                out[split] = (_rows_from_dataset(ds, where)[0], where)
            return _split_by_column(out, explicit=True)
        where = f"the saved dataset '{source}'"
        return _split_by_column({"train": (_rows_from_dataset(loaded, where)[0], where)}, explicit=False)
    # imagefolder
    files = _imagefolder_files(source, wanted)
    loaded = _load("imagefolder", f"the imagefolder '{source}'", cache_dir=cache_dir, **files)
    used: set[str] = set()
    for name, ds in loaded.items():
        where = f"split {name!r} of the imagefolder '{source}'"
        split = _normalise_split(name, f"the imagefolder '{source}'")
        rows, _ = _rows_from_dataset(ds, where, image_column="image" if "image" in ds.column_names else None)
        rows.extra.pop("label", None)  # a class label inferred from folder names is not a caption
        used.update(k[1] for k in rows.keys if k[0] == "path")
        out[split] = (rows, where)
    folders = [source / p[:-3] for ps in files.get("data_files", {}).values() for p in ps] or [source]
    missing = [f for folder in folders for f in _uncaptioned_images(folder, used)]
    if missing:
        shown = ", ".join(f"'{p}'" for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        warnings.warn(f"load_pairs: {len(missing)} image files in '{source}' have no row in their folder's "
                      f"metadata file and are left out: {shown}", stacklevel=3)
    return _split_by_column(out, explicit=False)


def _split_by_column(splits: dict[str, tuple[_Rows, str]], explicit: bool) -> dict[str, tuple[_Rows, str]]:
    """Rows with a `split` column go to the split it names (a missing value: the split they were
    read as). `explicit`: the splits were named by the source itself (DatasetDict keys), so a
    column naming another split is a conflict only when both hold rows."""
    parts: dict[str, list[tuple[_Rows, str]]] = {}
    for split, (rows, where) in splits.items():
        values = rows.extra.pop("split", None)
        if values is None:
            parts.setdefault(split, []).append((rows, where))
            continue
        picks: dict[str, list[int]] = {}
        for r, value in enumerate(values):
            target = split if value is None else _normalise_split(value, f"column 'split', row {r} of {where}")
            picks.setdefault(target, []).append(r)
        for target, index in picks.items():
            part = _Rows(
                sources=[rows.sources[i] for i in index], names=[rows.names[i] for i in index],
                keys=[rows.keys[i] for i in index], texts=[rows.texts[i] for i in index],
                row_ids=[rows.row_ids[i] for i in index],
                extra={k: [v[i] for i in index] for k, v in rows.extra.items()},
            )
            parts.setdefault(target, []).append((part, where))
    out: dict[str, tuple[_Rows, str]] = {}
    for target, pieces in parts.items():
        if len(pieces) == 1:
            out[target] = pieces[0]
            continue
        wheres = sorted({w for _, w in pieces})
        if explicit:
            raise ValueError(f"load_pairs: split {target!r} is named both by a split key and by the 'split' "
                             f"column of another ({'; '.join(wheres)}); expected one or the other")
        merged = _Rows([], [], [], [], [], {k: [] for k in pieces[0][0].extra})
        for part, _ in pieces:
            for attr in ("sources", "names", "keys", "texts", "row_ids"):
                getattr(merged, attr).extend(getattr(part, attr))
            for k in merged.extra:
                merged.extra[k].extend(part.extra.get(k, [None] * len(part.texts)))
        out[target] = (merged, " and ".join(wheres))
    return out


# ----------------------------------------------------------------------------- grouping and checks


def _captions_of_row(cell: Any, r: int, name: str, where: str) -> list[str]:
    """The captions of one row, stripped; ValueError for a missing or empty one."""
    if cell is None:
        raise ValueError(f"load_pairs: row {r} of {where} (image '{name}') has no caption; expected a "
                         "caption string or a list of them")
    cells = cell if isinstance(cell, (list, tuple)) else [cell]
    if not cells:
        raise ValueError(f"load_pairs: row {r} of {where} (image '{name}') has an empty list of captions; "
                         "expected at least one caption")
    out = []
    for k, text in enumerate(cells):
        label = f"caption {k} of row {r}" if isinstance(cell, (list, tuple)) else f"row {r}"
        if text is None:
            raise ValueError(f"load_pairs: {label} of {where} (image '{name}') is missing; expected a string")
        if isinstance(text, (dict, list, tuple, bytes)):
            raise ValueError(f"load_pairs: {label} of {where} (image '{name}') is a {type(text).__name__}; "
                             "expected a string")
        text = str(text).strip()
        if not text:
            raise ValueError(f"load_pairs: {label} of {where} (image '{name}') is an empty caption; "
                             "expected non-empty text")
        out.append(text)
    return out


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, np.integer, np.floating, np.bool_))


def _group(rows: _Rows, where: str) -> tuple[list[int], list[str], list[int], dict[str, list]]:
    """(first row of each image, captions grouped by image, their image index, attributes)."""
    if not rows.texts:
        raise ValueError(f"load_pairs: {where} is empty; expected at least one image with a caption")
    image_of_key: dict[Any, int] = {}
    first_row: list[int] = []
    per_image: list[list[str]] = []
    for i, (key, cell) in enumerate(zip(rows.keys, rows.texts)):
        texts = _captions_of_row(cell, rows.row_ids[i], rows.names[i], where)
        j = image_of_key.setdefault(key, len(first_row))
        if j == len(first_row):
            first_row.append(i)
            per_image.append([])
        per_image[j].extend(texts)
    captions = [t for texts in per_image for t in texts]
    caption_image = [j for j, texts in enumerate(per_image) for _ in texts]
    attributes = {name: [values[i] for i in first_row] for name, values in rows.extra.items()
                  if all(_is_scalar(v) for v in values)}
    return first_row, captions, caption_image, attributes


def _decode_split(rows: _Rows, first_row: list[int], size: int, skip_bad: bool, workers: int,
                  progress: bool, where: str) -> tuple[list[int], torch.Tensor | None, list[tuple[str, str]]]:
    """Decode each image once: (kept image indices, uint8 (kept, 3, S, S), bad [(name, reason)])."""
    def work(j: int) -> np.ndarray | BadImageError:
        i = first_row[j]
        if rows.sources[i] is None:
            return BadImageError(rows.names[i], "the image cell holds neither bytes nor a path")
        try:
            return decode_resize(rows.sources[i], size, name=rows.names[i])
        except BadImageError as err:
            return err

    out = torch.empty((len(first_row), 3, size, size), dtype=torch.uint8)
    kept: list[int] = []
    bad: list[tuple[str, str]] = []
    for j, image in enumerate(_map(work, range(len(first_row)), workers, progress, f"decoding {where}")):
        if isinstance(image, BadImageError):
            bad.append((str(image.path), image.reason))
            continue
        out[len(kept)] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        kept.append(j)
    if len(kept) < len(first_row):
        out = out[:len(kept)].clone()
    return kept, out, bad


def _bad_list(bad: list[tuple[str, str]], limit: int = 10) -> str:
    shown = "; ".join(f"'{name}' ({reason})" for name, reason in bad[:limit])
    return shown + (f"; and {len(bad) - limit} more" if len(bad) > limit else "")


# ----------------------------------------------------------------------------- public API


def load_pairs(source: str | PathLike, *, image_size: int, split: str | None = None,
               skip_bad: bool = False, workers: int = 0, progress: bool = False,
               cache_dir: str | PathLike | None = None) -> dict[str, CaptionPairs]:
    """Read image-caption pairs through `datasets` and decode every image once.

    Args:
        source: an imagefolder directory, a `save_to_disk` directory, or a .csv / .jsonl manifest
            (layouts in the module docstring).
        image_size: S, the side of the decoded images (shorter side resized to S, centre crop).
        split: one split to load ("train", "validation" (or "val", "dev"), "test"); None: all of
            them, and a train split is required.
        skip_bad: drop images that do not decode (with their captions) and warn with their count
            and names; False: raise, listing them.
        workers: > 0 decodes in a thread pool of that many threads.
        progress: show progress bars (datasets' and the decoding's).
        cache_dir: the `datasets` cache for the Arrow files it writes (None: datasets' default,
            HF_DATASETS_CACHE).

    Returns:
        {split: CaptionPairs} with keys among "train", "validation", "test" (in that order).

    Raises:
        ValueError naming the file, row, column or split for every bad input listed in the module
        docstring (BadImageError, a ValueError, is not raised: undecodable images are collected
        and reported together).
    """
    fn = "load_pairs"
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not 1 <= image_size <= 4096:
        raise ValueError(f"{fn}: image_size={image_size!r}; expected an integer number of pixels in [1, 4096]")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"{fn}: workers={workers!r}; expected a non-negative integer")
    if split is not None and (not isinstance(split, str) or split.strip().lower() not in SPLIT_ALIASES):
        raise ValueError(f"{fn}: split={split!r}; expected None or one of {sorted(SPLIT_ALIASES)}")
    if not isinstance(source, (str, PathLike)):
        raise TypeError(f"{fn}: source={source!r}; expected a path (str or os.PathLike)")
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"{fn}: source '{path}' does not exist; expected an imagefolder directory, a "
                         "save_to_disk directory, or a .csv / .jsonl manifest")
    cache = None if cache_dir is None else str(cache_dir)
    wanted = None if split is None else SPLIT_ALIASES[split.strip().lower()]
    with _quiet_datasets(progress):
        splits = _read_source(path, cache, wanted)
    available = [s for s in _SPLIT_ORDER if s in splits]
    if wanted is not None:
        if wanted not in splits:
            raise ValueError(f"{fn}: split={split!r}; '{path}' has the splits {available}")
        chosen = [wanted]
    else:
        if "train" not in splits:
            raise ValueError(f"{fn}: '{path}' has no train split (found {available}); expected a train/ "
                             "folder, a 'train' key or 'split' value, or a single unsplit set")
        chosen = available

    # every caption check before any decoding
    grouped = {s: _group(splits[s][0], splits[s][1]) for s in chosen}
    out: dict[str, CaptionPairs] = {}
    for s in chosen:
        rows, where = splits[s]
        first_row, captions, caption_image, attributes = grouped[s]
        kept, images, bad = _decode_split(rows, first_row, int(image_size), skip_bad, workers, progress, where)
        if bad and not skip_bad:
            raise ValueError(f"{fn}: {len(bad)} of {len(first_row)} images of {where} do not decode: "
                             f"{_bad_list(bad)}; pass skip_bad=True (--skip-bad-images) to leave them out")
        if bad:
            warnings.warn(f"{fn}: skipping {len(bad)} of {len(first_row)} images of {where} that do not "
                          f"decode (and their captions): {_bad_list(bad)}", stacklevel=2)
        if not kept:
            raise ValueError(f"{fn}: {where} is empty: none of its {len(first_row)} images decodes")
        if len(kept) < len(first_row):
            new_index = {old: new for new, old in enumerate(kept)}
            pairs = [(t, new_index[j]) for t, j in zip(captions, caption_image) if j in new_index]
            captions = [t for t, _ in pairs]
            caption_image = [j for _, j in pairs]
            attributes = {k: [v[j] for j in kept] for k, v in attributes.items()}
        out[s] = CaptionPairs(
            images=images,
            captions=captions,
            caption_image=torch.tensor(caption_image, dtype=torch.int64),
            image_files=[rows.names[first_row[j]] for j in kept],
            attributes=attributes,
        )
    return out
