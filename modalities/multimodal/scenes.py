"""Generated captioned scenes: coloured shapes with several captions each, and a held-out set of
(colour, shape) combinations for a compositional zero-shot test.

A scene is a small RGB image (32 px by default) holding one or two objects on a dark, softly
graded background:

- object: one of 6 `COLOURS` x 6 `SHAPES`, "small" or "large" (bounding radius 0.12 or 0.20 of
  the image side, +-10 %), at one of 5 `POSITIONS` (left, right, top, bottom, centre: fixed
  anchors +-0.03), slightly rotated (+-12 degrees from the upright pose), the colour's brightness
  and channels jittered, a gentle shading;
- scene kinds: "one" (40 %: one object, any position), "two" (20 %: two identical objects, same
  colour, shape and size, at two different side positions: a count), "pair" (40 %: two objects
  of different (colour, shape), each its own size, at two different side positions; the centre
  is left out of two-object scenes so that two large objects never overlap much);
- captions: 2-5 per image, from `_TEMPLATES` (several phrasings per kind, some omitting the size
  or the position) with synonyms ("small"/"little"/"tiny", "large"/"big", "circle"/"disc",
  "cross"/"plus sign", "ring"/"donut", "on the left"/"on the left side"/...), e.g.
  "a small red circle on the left", "two large blue squares",
  "there is a green triangle at the top and a yellow ring on the right";
- held out: 6 (colour, shape) combinations `HELDOUT` (one per colour and one per shape, so every
  colour and every shape is still seen in training) never appear in the train split; the
  validation and test splits and the zero-shot folder draw from all 36 combinations.

Files (`generate_scenes(root, ...)`):

    root/train/000000.png ... + metadata.jsonl     imagefolder splits: one row per image,
    root/validation/...                            {"file_name", "text": [captions], "scene",
    root/test/...                                  "objects", "heldout"}
    root/zeroshot/<colour> <shape>/000000.png      single-object images of each of the 36
                                                   classes, a labelled class folder (--zeroshot)
    root/scenes.json                               version, parameters, held-out combinations,
                                                   class names, counts (written last)

`heldout` is true when the scene holds a held-out combination (never in train). Read the
splits with `modalities.multimodal.data.load_pairs(root, ...)` (the `heldout` column comes back
in `CaptionPairs.attributes`) and the zero-shot folder with `load_zeroshot`.

Determinism: every random number is a counter-based hash (splitmix64, the helpers of
`modalities.image.synthetic`) of (seed, split, image index, slot [, pixel]), so image i and its
captions depend only on (seed, split, i) and the image size: never on n, on chunking or on any
global generator. `SCENES_VERSION` hashes the parameters and the drawing code.

Measured (shared 2-core CPU, 32 px, seed 0). Raw pixels, single-object scenes (4000 train /
1000 test; logistic regression on standardised pixels, C = 0.1 / cosine kNN, k = 10): colour
0.994 / 0.917 (chance 0.167), shape 0.791 / 0.540 (0.167), size 0.913 / 0.890 (0.5), position
0.962 / 0.997 (0.2), the 36 classes 0.841 / 0.421 (0.028): colour alone is nearly linear in the
pixels, the shape much less, and binding colour to shape in two-object scenes is what a caption
needs. A small dual encoder (5-layer CNN of width 32 + a 2-layer transformer of width 64 over
words, CLIP loss, batch 256, AdamW 2e-3) after 171 steps (7 minutes on the loaded shared
cores) on 8000 train scenes: test retrieval (1000 images, 3576 captions) i2t R@1 / R@5 / R@10 =
0.399 / 0.751 / 0.866, t2i 0.323 / 0.745 / 0.885 (chance R@1 0.001); i2t R@1 on test images
holding a held-out combination 0.356 vs 0.410 on the others; zero-shot 36-way top-1 ("a photo of
a <colour> <shape>") 0.660 over all classes, 0.483 on the 6 held-out classes (their colour right
every time, their shape in 48 %), 0.695 on the seen ones (chance 0.028). Generating 8000 + 1000 +
1000 scenes and 720 zero-shot images as PNG takes about 7 s; `load_pairs` reads them back in
about 7 s (about 5 s with the Arrow cache warm).

Example:
    >>> from modalities.multimodal.scenes import ensure_scenes, load_zeroshot
    >>> from modalities.multimodal.data import load_pairs
    >>> root = ensure_scenes("~/.cache/tilecontrast", n_train=8000, n_validation=1000,
    ...                      n_test=1000, n_zeroshot_per_class=20)
    >>> pairs = load_pairs(root, image_size=32)
    >>> images, labels, classes, heldout = load_zeroshot(root / "zeroshot", image_size=32)
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# The counter-based hashing and the shapes' signed distances are the synthetic shapes' own
# (private helpers reused, not copied).
from modalities.image.synthetic import (
    _keys, _slot_hash, _stream_key, _to_unit, _uniform_bits, shape_signed_distance,
)

__all__ = [
    "COLOURS", "SHAPES", "POSITIONS", "SIZES", "HELDOUT", "SCENES_VERSION", "SceneInfo",
    "generate_scenes", "ensure_scenes", "load_zeroshot", "render_scenes", "scene_class_names",
]

_REVISION = 1  # bump with any change of the drawing or caption code

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.88, 0.14, 0.12),
    "orange": (0.98, 0.55, 0.08),
    "yellow": (0.96, 0.90, 0.16),
    "green": (0.16, 0.72, 0.22),
    "blue": (0.18, 0.38, 0.98),
    "purple": (0.62, 0.22, 0.82),
}
"""Colour names and their base RGB in [0, 1]."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
"""Shape names (outlines from `modalities.image.synthetic.shape_signed_distance`)."""

POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.21, 0.5), "right": (0.79, 0.5), "top": (0.5, 0.21), "bottom": (0.5, 0.79),
    "centre": (0.5, 0.5),
}
"""Position names and their anchors (x, y) in image units (y down)."""

SIZES: dict[str, float] = {"small": 0.12, "large": 0.20}
"""Size names and the bounding radius in image units."""

HELDOUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("orange", "ring"), ("yellow", "square"),
    ("green", "star"), ("blue", "circle"), ("purple", "cross"),
)
"""(colour, shape) combinations never in train: one per colour and one per shape."""

_COLOUR_NAMES = list(COLOURS)
_POSITION_NAMES = list(POSITIONS)
_SIDE_POSITIONS = [p for p in _POSITION_NAMES if p != "centre"]
_SIDE_PAIRS = [(a, b) for a in range(len(_SIDE_POSITIONS)) for b in range(len(_SIDE_POSITIONS)) if a != b]
_SIZE_NAMES = list(SIZES)

# Every range the generator draws from (also hashed into SCENES_VERSION).
_PARAMS = {
    "colours": COLOURS,
    "shapes": list(SHAPES),
    "positions": POSITIONS,
    "sizes": SIZES,
    "heldout": [list(c) for c in HELDOUT],
    "kind_p": {"one": 0.4, "two": 0.2, "pair": 0.4},
    "position_jitter": 0.03,        # +- in image units
    "scale_jitter": 0.10,           # radius x (1 +- this)
    "rotation_jitter_deg": 12.0,
    "base_rotation": {"circle": 0.0, "square": 45.0, "triangle": -90.0, "star": -90.0,
                      "cross": 0.0, "ring": 0.0},   # degrees: upright square/triangle/star
    "ring_param": 1.0,              # the thickest ring of synthetic's range (visible when small)
    "brightness": (0.82, 1.08),     # object colour x this
    "channel_jitter": 0.05,         # + uniform(-j, j) per channel
    "shading": 0.12,                # 1 +- this across the object
    "background_value": (0.08, 0.40),
    "background_chroma": 0.06,
    "background_gradient": (0.0, 0.15),  # lightness difference across the image
    "noise_sigma": (0.0, 0.03),
    "captions": (2, 5),
}

# Parameter slots (columns of the per-image uniforms).
_S_KIND, _S_COMBO_A, _S_COMBO_B, _S_SIZE_A, _S_SIZE_B, _S_POS, _S_POS_PAIR = 0, 1, 2, 3, 4, 5, 6
_S_JIT = 7                 # 4 slots: (x, y) of object A and B
_S_ROT = 11                # 2 slots
_S_SCALE = 13              # 2 slots
_S_COLOUR = 15             # 4 slots per object: brightness, r, g, b
_S_SHAPE_PARAM = 23        # 2 slots
_S_BG = 25                 # value, hue, chroma, gradient amount, gradient angle
_S_NOISE = 30
_S_SHADE = 31              # 2 slots: shading angle per object
_N_SLOTS = 33
_N_CAPTION_SLOTS = 96

_PARAM_SLOTS = _slot_hash(np.arange(_N_SLOTS))
_CAPTION_SLOTS = _slot_hash(np.arange(_N_CAPTION_SLOTS) + (1 << 16))
_PIXEL_SLOT_CACHE: dict[int, np.ndarray] = {}


def _pixel_slots(size: int) -> np.ndarray:
    if size not in _PIXEL_SLOT_CACHE:
        _PIXEL_SLOT_CACHE[size] = _slot_hash(np.arange(size * size) + (1 << 24))
    return _PIXEL_SLOT_CACHE[size]


def scene_class_names() -> list[str]:
    """The 36 zero-shot classes "<colour> <shape>", colour-major."""
    return [f"{c} {s}" for c in _COLOUR_NAMES for s in SHAPES]


def _combo_index(colour: str, shape: str) -> int:
    return _COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


_HELDOUT_INDEX = sorted(_combo_index(c, s) for c, s in HELDOUT)
_TRAIN_COMBOS = np.array([k for k in range(len(COLOURS) * len(SHAPES)) if k not in _HELDOUT_INDEX])
_ALL_COMBOS = np.arange(len(COLOURS) * len(SHAPES))


# ----------------------------------------------------------------------------- drawing scenes


@dataclass
class _Layout:
    """Per-image scene attributes (arrays of length n)."""

    kind: np.ndarray       # 0 one, 1 two (identical), 2 pair (different)
    combo: np.ndarray      # (n, 2) colour * 6 + shape of objects A, B
    size: np.ndarray       # (n, 2) 0 small, 1 large
    position: np.ndarray   # (n, 2) index into POSITIONS
    n_objects: np.ndarray  # 1 or 2


def _layout(u: np.ndarray, allowed: np.ndarray, forced: np.ndarray | None) -> _Layout:
    """Scene attributes from the uniforms u (n, slots); `forced` (n,) fixes a single object's
    combination (zero-shot classes)."""
    n = len(u)
    p = _PARAMS["kind_p"]
    kind = np.where(u[:, _S_KIND] < p["one"], 0, np.where(u[:, _S_KIND] < p["one"] + p["two"], 1, 2))
    k = len(allowed)
    ia = np.minimum((u[:, _S_COMBO_A] * k).astype(np.int64), k - 1)
    # B: another allowed combination, uniformly among the k - 1 others
    ib = (ia + 1 + np.minimum((u[:, _S_COMBO_B] * (k - 1)).astype(np.int64), k - 2)) % k
    combo = np.stack([allowed[ia], allowed[ib]], axis=1)
    size = np.stack([(u[:, _S_SIZE_A] < 0.5), (u[:, _S_SIZE_B] < 0.5)], axis=1).astype(np.int64)
    one_pos = np.minimum((u[:, _S_POS] * len(POSITIONS)).astype(np.int64), len(POSITIONS) - 1)
    pair = np.array(_SIDE_PAIRS)[np.minimum((u[:, _S_POS_PAIR] * len(_SIDE_PAIRS)).astype(np.int64),
                                            len(_SIDE_PAIRS) - 1)]
    side_index = np.array([_POSITION_NAMES.index(s) for s in _SIDE_POSITIONS])
    position = np.where((kind == 0)[:, None], np.stack([one_pos, one_pos], axis=1), side_index[pair])
    if forced is not None:
        kind = np.zeros(n, dtype=np.int64)
        combo[:, 0] = forced
    two = kind == 1
    combo[two, 1] = combo[two, 0]       # a count: the same object twice
    size[two, 1] = size[two, 0]
    n_objects = np.where(kind == 0, 1, 2)
    return _Layout(kind.astype(np.int64), combo, size, position, n_objects)


def _render(keys: np.ndarray, layout: _Layout, s: int) -> np.ndarray:
    """uint8 (n, 3, S, S) images of the scenes described by `layout`."""
    n = len(keys)
    f32 = np.float32
    u = _to_unit(_uniform_bits(keys, _PARAM_SLOTS), 40, 24)
    pix = _uniform_bits(keys, _pixel_slots(s))
    # triangular sensor noise in [-1, 1] (variance 1/6)
    sensor = (_to_unit(pix, 0, 21) + _to_unit(pix, 21, 21) - 1).reshape(n, 1, s, s)
    del pix
    coord = (np.arange(s, dtype=f32) + f32(0.5)) / f32(s)
    X, Y = coord[None, None, :], coord[None, :, None]

    # background: a grey of low chroma, graded linearly across the image
    lo, hi = _PARAMS["background_value"]
    value = f32(lo) + f32(hi - lo) * u[:, _S_BG]
    hue = u[:, _S_BG + 1] * f32(2 * np.pi)
    chroma = f32(_PARAMS["background_chroma"]) * u[:, _S_BG + 2]
    offsets = np.stack([np.cos(hue), np.cos(hue - f32(2 * np.pi / 3)), np.cos(hue + f32(2 * np.pi / 3))], 1)
    base = value[:, None] + chroma[:, None] * offsets                       # (n, 3)
    lo, hi = _PARAMS["background_gradient"]
    amount = f32(lo) + f32(hi - lo) * u[:, _S_BG + 3]
    ang = u[:, _S_BG + 4] * f32(2 * np.pi)
    along = (X - f32(0.5)) * np.cos(ang)[:, None, None] + (Y - f32(0.5)) * np.sin(ang)[:, None, None]
    img = base[:, :, None, None] + (amount[:, None, None] * along)[:, None]  # (n, 3, S, S)
    img = img.astype(f32)

    colour_table = np.array(list(COLOURS.values()), dtype=f32)
    anchors = np.array(list(POSITIONS.values()), dtype=f32)
    radii = np.array(list(SIZES.values()), dtype=f32)
    jitter = f32(_PARAMS["position_jitter"])
    for obj in range(2):
        active = layout.n_objects > obj
        if not active.any():
            continue
        idx = np.nonzero(active)[0]
        ua = u[idx]
        combo = layout.combo[idx, obj]
        shape = combo % len(SHAPES)
        colour = colour_table[combo // len(SHAPES)]
        lo, hi = _PARAMS["brightness"]
        colour = colour * (f32(lo) + f32(hi - lo) * ua[:, _S_COLOUR + 4 * obj])[:, None]
        cj = f32(_PARAMS["channel_jitter"])
        colour = np.clip(colour + cj * (2 * ua[:, _S_COLOUR + 4 * obj + 1:_S_COLOUR + 4 * obj + 4] - 1), 0, 1)
        sj = f32(_PARAMS["scale_jitter"])
        radius = radii[layout.size[idx, obj]] * (1 + sj * (2 * ua[:, _S_SCALE + obj] - 1))
        centre = anchors[layout.position[idx, obj]] + jitter * (2 * ua[:, _S_JIT + 2 * obj:_S_JIT + 2 * obj + 2] - 1)
        base_rot = np.array([_PARAMS["base_rotation"][name] for name in SHAPES], dtype=f32)[shape]
        rot = np.deg2rad(base_rot + f32(_PARAMS["rotation_jitter_deg"]) * (2 * ua[:, _S_ROT + obj] - 1)).astype(f32)
        cr, sr = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
        r3 = radius[:, None, None]
        dx, dy = X - centre[:, 0, None, None], Y - centre[:, 1, None, None]
        qx = (dx * cr + dy * sr) / r3                                       # shape frame
        qy = (-dx * sr + dy * cr) / r3
        dist = np.empty((len(idx), s, s), dtype=f32)
        for k, name in enumerate(SHAPES):
            g = shape == k
            if not g.any():
                continue
            param = (np.full(int(g.sum()), _PARAMS["ring_param"] * 0.999, dtype=f32) if name == "ring"
                     else ua[g, _S_SHAPE_PARAM + obj])[:, None, None]
            dist[g] = shape_signed_distance(name, qx[g], qy[g], param)
        # coverage of each pixel: clip(0.5 - d / pixel, 0, 1), d in image units
        coverage = np.clip(f32(0.5) - dist * r3 * f32(s), 0, 1)
        sa = ua[:, _S_SHADE + obj] * f32(2 * np.pi)
        shade = 1 + f32(_PARAMS["shading"]) * (qx * np.cos(sa)[:, None, None] + qy * np.sin(sa)[:, None, None])
        fill = np.clip(colour[:, :, None, None] * shade[:, None], 0, 1)
        img[idx] += (fill - img[idx]) * coverage[:, None]

    lo, hi = _PARAMS["noise_sigma"]
    sigma = (f32(lo) + f32(hi - lo) * u[:, _S_NOISE])[:, None, None, None]
    img += sensor * sigma * f32(np.sqrt(6.0))
    return np.clip(img * f32(255) + f32(0.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- captions

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_SHAPE_WORDS = {
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "ring": (("ring", "rings"), ("donut", "donuts")),
}
_POSITION_WORDS = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "centre": ("in the centre", "in the middle", "in the center"),
}
# {a}: "a"/"an"; per object: {size}, {colour}, {shape}, {pos}; counts: {shapes} (plural)
_TEMPLATES = {
    "one": (
        "{a} {size} {colour} {shape} {pos}",
        "there is {a} {size} {colour} {shape} {pos}",
        "{pos}, {a} {size} {colour} {shape}",
        "{a} {colour} {shape}",
        "{a} {size} {colour} {shape}",
        "{a} {colour} {shape} {pos}",
        "a photo of {a} {size} {colour} {shape}",
        "an image with {a} {colour} {shape} {pos}",
    ),
    "two": (
        "two {size} {colour} {shapes}",
        "two {colour} {shapes}",
        "a pair of {size} {colour} {shapes}",
        "two {size} {colour} {shapes}, one {pos1} and one {pos2}",
        "there are two {colour} {shapes}, {pos1} and {pos2}",
        "a photo of two {size} {colour} {shapes}",
        "2 {colour} {shapes}",
    ),
    "pair": (
        "{a1} {size1} {colour1} {shape1} {pos1} and {a2} {size2} {colour2} {shape2} {pos2}",
        "there is {a1} {colour1} {shape1} {pos1} and {a2} {colour2} {shape2} {pos2}",
        "{a1} {colour1} {shape1} and {a2} {colour2} {shape2}",
        "{a1} {size1} {colour1} {shape1} and {a2} {size2} {colour2} {shape2}",
        "{pos1} {a1} {colour1} {shape1}, {pos2} {a2} {colour2} {shape2}",
        "a photo of {a1} {colour1} {shape1} and {a2} {colour2} {shape2}",
        "{a1} {colour1} {shape1} {pos1}, {a2} {size2} {colour2} {shape2} {pos2}",
    ),
}
_KINDS = ("one", "two", "pair")


class _Draws:
    """Uniforms of one image's caption slots, taken in order."""

    def __init__(self, u: list[float]) -> None:
        self.u, self.i = u, 0

    def next(self) -> float:
        value = self.u[self.i % len(self.u)]
        self.i += 1
        return value

    def pick(self, options: tuple) -> object:
        return options[min(int(self.next() * len(options)), len(options) - 1)]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _captions(layout: _Layout, j: int, u: list[float]) -> list[str]:
    """2-5 distinct captions of image j (templates drawn without replacement); u: the image's
    caption uniforms."""
    d = _Draws(u)
    kind = _KINDS[int(layout.kind[j])]
    lo, hi = _PARAMS["captions"]
    n_captions = lo + min(int(d.next() * (hi - lo + 1)), hi - lo)
    templates = _TEMPLATES[kind]
    keys = u[1:1 + len(templates)]
    order = sorted(range(len(templates)), key=lambda t: (keys[t], t))   # a random template order
    d.i = 1 + len(templates)
    # objects in the order the captions name them (pairs: either order; one: the first only)
    objs = [0] if kind == "one" else [0, 1] if kind == "two" or d.next() < 0.5 else [1, 0]
    out: list[str] = []
    for t in order:
        if len(out) == n_captions:
            break
        fields: dict[str, str] = {}
        for slot, obj in enumerate(objs, start=1):
            combo = int(layout.combo[j, obj])
            colour, shape = _COLOUR_NAMES[combo // len(SHAPES)], SHAPES[combo % len(SHAPES)]
            singular, plural = d.pick(_SHAPE_WORDS[shape])
            size = d.pick(_SIZE_WORDS[_SIZE_NAMES[int(layout.size[j, obj])]])
            pos = d.pick(_POSITION_WORDS[_POSITION_NAMES[int(layout.position[j, obj])]])
            fields.update({f"size{slot}": size, f"colour{slot}": colour, f"shape{slot}": singular,
                           f"shapes{slot}": plural, f"pos{slot}": pos})
        fields.update({k[:-1]: v for k, v in fields.items() if k.endswith("1")})  # {size} = {size1}
        template = templates[t]
        tokens = template.split(" ")
        for a, nxt in zip(tokens, tokens[1:]):
            if a in ("{a}", "{a1}", "{a2}"):  # "an" before a vowel: "an orange ring"
                fields[a[1:-1]] = _article(nxt.format(**fields))
        text = template.format(**fields)
        if text not in out:
            out.append(text)
    return out


def _describe(layout: _Layout, j: int) -> str:
    parts = []
    for obj in range(int(layout.n_objects[j])):
        combo = int(layout.combo[j, obj])
        parts.append(f"{_SIZE_NAMES[int(layout.size[j, obj])]} {_COLOUR_NAMES[combo // len(SHAPES)]} "
                     f"{SHAPES[combo % len(SHAPES)]} {_POSITION_NAMES[int(layout.position[j, obj])]}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- public API


def _version() -> str:
    sources = []
    for fn in (_layout, _render, _captions, _Draws, _article, shape_signed_distance, _stream_key, _keys,
               _uniform_bits, _to_unit, _slot_hash):
        try:
            sources.append(inspect.getsource(fn))
        except (OSError, TypeError):  # no source available (frozen install): parameters only
            sources.append(getattr(fn, "__name__", repr(fn)))
    blob = json.dumps({"revision": _REVISION, "params": _PARAMS, "templates": _TEMPLATES,
                       "words": [_SIZE_WORDS, _SHAPE_WORDS, _POSITION_WORDS], "slots": _N_SLOTS,
                       "code": sources}, sort_keys=True)
    return f"{_REVISION}-{hashlib.sha1(blob.encode('utf-8')).hexdigest()[:12]}"


SCENES_VERSION: str = _version()
"""Changes whenever the scenes change: revision number + hash of the parameters and code."""


def _check_int(fn: str, name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        expected = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{fn}: {name}={value!r}; expected an integer {expected}")
    return int(value)


def render_scenes(n: int, *, split: str = "train", image_size: int = 32, seed: int = 0,
                  zeroshot_class: np.ndarray | None = None, chunk: int | None = None
                  ) -> tuple[torch.Tensor, list[list[str]], dict[str, np.ndarray]]:
    """Draw `n` scenes of one split in memory (what `generate_scenes` writes to files).

    Args:
        n: number of images.
        split: "train" (held-out combinations excluded) or any other name (all 36 drawn);
            different splits are independent draws.
        image_size: side in pixels (16 to 1024).
        seed: any non-negative integer.
        zeroshot_class: (n,) class indices into `scene_class_names()`: single-object scenes of
            those classes (the zero-shot folder); None: scenes of every kind.
        chunk: images per vectorised step (default about 128k pixels); the output does not
            depend on it.

    Returns:
        (images uint8 (n, 3, S, S), captions (n lists of 2-5 strings), attributes: "kind" (n,)
         0 one / 1 two / 2 pair, "combo" (n, 2), "size" (n, 2), "position" (n, 2), "n_objects",
         "heldout" (n,) bool: the scene holds a held-out combination).

    Example:
        >>> images, captions, attrs = render_scenes(4, split="test")
        >>> images.shape, captions[0][0]
        (torch.Size([4, 3, 32, 32]), '...')
    """
    fn = "render_scenes"
    n = _check_int(fn, "n", n, 0)
    size = _check_int(fn, "image_size", image_size, 16, 1024)
    seed = _check_int(fn, "seed", seed, 0)
    if not isinstance(split, str) or not split:
        raise ValueError(f"{fn}: split={split!r}; expected a non-empty string")
    if zeroshot_class is not None:
        zeroshot_class = np.asarray(zeroshot_class, dtype=np.int64)
        if zeroshot_class.shape != (n,) or (n and (zeroshot_class.min() < 0 or zeroshot_class.max() >= 36)):
            raise ValueError(f"{fn}: zeroshot_class of shape {zeroshot_class.shape}; expected ({n},) class "
                             "indices in [0, 36)")
    if chunk is None:
        chunk = max(1, (1 << 17) // (size * size))
    chunk = _check_int(fn, "chunk", chunk, 1)
    allowed = _TRAIN_COMBOS if split == "train" else _ALL_COMBOS
    keys = _keys(_stream_key(seed, split, 0), np.arange(n, dtype=np.int64))
    u = _to_unit(_uniform_bits(keys, _PARAM_SLOTS), 40, 24)
    layout = _layout(u, allowed, zeroshot_class)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sub = _Layout(*(getattr(layout, f)[start:stop] for f in ("kind", "combo", "size", "position", "n_objects")))
        images[start:stop] = torch.from_numpy(_render(keys[start:stop], sub, size))
    cap_u = _to_unit(_uniform_bits(keys, _CAPTION_SLOTS), 40, 24).tolist()
    captions = [_captions(layout, j, cap_u[j]) for j in range(n)]
    held = np.isin(layout.combo, _HELDOUT_INDEX)
    held[:, 1] &= layout.n_objects > 1
    attrs = {"kind": layout.kind, "combo": layout.combo, "size": layout.size, "position": layout.position,
             "n_objects": layout.n_objects, "heldout": held.any(axis=1)}
    return images, captions, attrs


@dataclass
class SceneInfo:
    """What `generate_scenes` wrote (also in root/scenes.json)."""

    root: Path
    version: str
    params: dict
    heldout: list[tuple[str, str]]
    classes: list[str]
    heldout_classes: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def generate_scenes(root: str | PathLike, *, n_train: int, n_validation: int, n_test: int,
                    n_zeroshot_per_class: int, image_size: int = 32, seed: int = 0) -> SceneInfo:
    """Write the captioned scenes (layout in the module docstring) under `root`.

    Args:
        root: output folder (created; files of the same names are overwritten, nothing removed).
        n_train, n_validation, n_test: images per split (>= 1).
        n_zeroshot_per_class: single-object images per class in root/zeroshot/ (>= 1; 36 classes).
        image_size: side in pixels (16 to 1024).
        seed: any non-negative integer.

    Returns:
        SceneInfo (root, version, params, held-out combinations, class names, counts).

    Example:
        >>> info = generate_scenes("/tmp/scenes", n_train=2000, n_validation=200, n_test=200,
        ...                        n_zeroshot_per_class=10)
        >>> sorted(p.name for p in info.root.iterdir())
        ['scenes.json', 'test', 'train', 'validation', 'zeroshot']
    """
    fn = "generate_scenes"
    counts = {"train": _check_int(fn, "n_train", n_train, 1),
              "validation": _check_int(fn, "n_validation", n_validation, 1),
              "test": _check_int(fn, "n_test", n_test, 1)}
    per_class = _check_int(fn, "n_zeroshot_per_class", n_zeroshot_per_class, 1)
    size = _check_int(fn, "image_size", image_size, 16, 1024)
    seed = _check_int(fn, "seed", seed, 0)
    root = Path(root).expanduser()
    params = dict(n_train=counts["train"], n_validation=counts["validation"], n_test=counts["test"],
                  n_zeroshot_per_class=per_class, image_size=size, seed=seed)
    written: dict[str, dict[str, int]] = {}
    for split, n in counts.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, captions, attrs = render_scenes(n, split=split, image_size=size, seed=seed)
        pixels = images.permute(0, 2, 3, 1).numpy()
        layout = _layout_view(attrs)
        lines = []
        for i in range(n):
            name = f"{i:06d}.png"
            _save_png(pixels[i], folder / name)
            lines.append(json.dumps({"file_name": name, "text": captions[i], "scene": _KINDS[int(attrs["kind"][i])],
                                     "objects": _describe(layout, i),
                                     "heldout": bool(attrs["heldout"][i])}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        written[split] = {"images": n, "captions": sum(len(c) for c in captions),
                          "heldout_images": int(attrs["heldout"].sum())}
    classes = scene_class_names()
    labels = np.repeat(np.arange(len(classes)), per_class)
    images, _, _ = render_scenes(len(labels), split="zeroshot", image_size=size, seed=seed, zeroshot_class=labels)
    pixels = images.permute(0, 2, 3, 1).numpy()
    for c, name in enumerate(classes):
        (root / "zeroshot" / name).mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(labels.tolist()):
        _save_png(pixels[i], root / "zeroshot" / classes[label] / f"{i % per_class:06d}.png")
    written["zeroshot"] = {"images": len(labels), "classes": len(classes)}
    heldout_classes = [f"{c} {s}" for c, s in HELDOUT]
    info = SceneInfo(root=root, version=SCENES_VERSION, params=params, heldout=[tuple(c) for c in HELDOUT],
                     classes=classes, heldout_classes=heldout_classes, counts=written)
    meta = asdict(info)
    del meta["root"]  # the folder may be renamed (ensure_scenes)
    meta.update(colours=list(COLOURS), shapes=list(SHAPES), positions=list(POSITIONS), sizes=list(SIZES))
    (root / "scenes.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return info


def _layout_view(attrs: dict[str, np.ndarray]) -> _Layout:
    return _Layout(attrs["kind"], attrs["combo"], attrs["size"], attrs["position"], attrs["n_objects"])


def ensure_scenes(cache_root: str | PathLike, *, n_train: int, n_validation: int, n_test: int,
                  n_zeroshot_per_class: int, image_size: int = 32, seed: int = 0) -> Path:
    """The scenes folder for these parameters under `cache_root`, generated once.

    The folder is cache_root/scenes-<SCENES_VERSION>-<hash of the parameters>; it is generated in
    a temporary sibling and renamed into place, so a reader never sees a partial folder and two
    processes racing both end with the same complete one.

    Example:
        >>> root = ensure_scenes("/tmp/cache", n_train=2000, n_validation=200, n_test=200,
        ...                      n_zeroshot_per_class=10)
        >>> (root / "scenes.json").is_file()
        True
    """
    params = dict(n_train=n_train, n_validation=n_validation, n_test=n_test,
                  n_zeroshot_per_class=n_zeroshot_per_class, image_size=image_size, seed=seed)
    for name, value in params.items():
        _check_int("ensure_scenes", name, value, 0 if name == "seed" else 1)
    cache_root = Path(cache_root).expanduser()
    tag = hashlib.sha1(json.dumps(params, sort_keys=True).encode("utf-8")).hexdigest()[:10]
    final = cache_root / f"scenes-{SCENES_VERSION}-{tag}"
    if _complete(final, params):
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_root))
    try:
        generate_scenes(tmp, **params)
        if final.exists() and not _complete(final, params):
            shutil.rmtree(final, ignore_errors=True)  # a leftover that is not a finished folder
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final, params):  # another process won the race: its folder is complete
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _complete(folder: Path, params: dict) -> bool:
    try:
        meta = json.loads((folder / "scenes.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("version") == SCENES_VERSION and meta.get("params") == params


def load_zeroshot(folder: str | PathLike, *, image_size: int, workers: int = 0, progress: bool = False,
                  cache_dir: str | PathLike | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
    """A labelled class folder (<folder>/<class name>/*.png) read through `datasets`.

    The class names are the prompts' subjects (folder names such as "red circle", "dog").

    Args:
        folder: the class folder root (e.g. <scenes root>/zeroshot, or any ImageFolder-style
            folder of one split).
        image_size: S (shorter side resized to S, centre crop, as `load_pairs`).
        workers, progress, cache_dir: as in `load_pairs`.

    Returns:
        (images uint8 (n, 3, S, S), labels int64 (n,) indexing class_names, class_names (sorted
         folder names, as `datasets` orders them), heldout: bool (n,), True for the images of a
         held-out (colour, shape) class, when scenes.json is found in the folder or its parent;
         else None).

    Raises:
        ValueError naming the folder: missing, no class folders, several splits, images that do
        not decode (listed).
    """
    from .data import SPLIT_ALIASES, _bad_list, _load, _quiet_datasets, decode_resize
    from modalities.image.data import BadImageError, _map
    import datasets

    fn = "load_zeroshot"
    size = _check_int(fn, "image_size", image_size, 1, 4096)
    workers = _check_int(fn, "workers", workers, 0)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{fn}: folder '{folder}' does not exist or is not a folder; expected "
                         "<folder>/<class name>/*.png")
    with _quiet_datasets(progress):
        # class folders (no split folder inside): one explicit pattern (datasets' inference globs
        # the tree once per split keyword)
        split_dirs = [p.name for p in folder.iterdir() if p.is_dir() and p.name.lower() in SPLIT_ALIASES]
        files = {"data_files": {"train": "**"}} if not split_dirs else {}
        loaded = _load("imagefolder", f"the class folder '{folder}'", data_dir=str(folder),
                       cache_dir=None if cache_dir is None else str(cache_dir), **files)
    if len(loaded) != 1:
        raise ValueError(f"{fn}: '{folder}' holds the splits {list(loaded)}; expected one split of class "
                         "folders, <folder>/<class name>/*.png (pass the split's folder)")
    ds = next(iter(loaded.values()))
    if "label" not in ds.column_names or not isinstance(ds.features["label"], datasets.ClassLabel):
        raise ValueError(f"{fn}: '{folder}' has no class folders (columns found: {ds.column_names}); "
                         "expected <folder>/<class name>/*.png")
    class_names = list(ds.features["label"].names)
    labels = torch.tensor(list(ds["label"]), dtype=torch.int64)
    cells = list(ds.cast_column("image", datasets.Image(decode=False))["image"])
    if not cells:
        raise ValueError(f"{fn}: '{folder}' holds no image")

    def work(i: int) -> np.ndarray | BadImageError:
        cell = cells[i]
        src = cell.get("bytes") or cell.get("path")
        try:
            return decode_resize(src, size, name=cell.get("path"))
        except BadImageError as err:
            return err

    images = torch.empty((len(cells), 3, size, size), dtype=torch.uint8)
    bad = []
    for i, image in enumerate(_map(work, range(len(cells)), workers, progress, "decoding zero-shot")):
        if isinstance(image, BadImageError):
            bad.append((str(image.path), image.reason))
        else:
            images[i] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if bad:
        raise ValueError(f"{fn}: {len(bad)} of {len(cells)} images in '{folder}' do not decode: {_bad_list(bad)}")
    heldout = None
    for meta_path in (folder / "scenes.json", folder.parent / "scenes.json"):
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"{fn}: '{meta_path}' is not valid JSON: {err}") from err
            held = set(meta.get("heldout_classes", []))
            class_held = torch.tensor([name in held for name in class_names], dtype=torch.bool)
            heldout = class_held[labels]
            break
    return images, labels, class_names, heldout
