"""A generated image dataset: shapes on cluttered, textured backgrounds.

Every image is a small RGB scene with one main shape, whose class is the many-class label.
The class is carried by the outline alone; everything else is a nuisance drawn independently
of the class:

- shape: one of the 10 `SHAPE_CLASSES`, its bounding circle's diameter 30-70 % of the image
  side, uniformly rotated, placed anywhere it fits; ring thickness and star depth vary;
- fill: solid, stripes, checker, dots or per-pixel noise, turning with the shape, under a linear
  shading gradient; a random colour A kept at RGB distance >= 0.5 from the background under the
  shape, modulated towards a second random colour by 20-45 % (textures vary the fill without
  breaking the silhouette);
- background: a solid colour, a linear gradient, smooth colour noise (a coarse random grid
  around a base colour, upsampled) or low-contrast stripes/checker, in random colours;
- clutter: up to three distractors drawn behind the shape with 40-90 % opacity: thin line
  segments and small soft blobs, smaller and fuzzier than any main shape, so they are not
  shapes of the classes (masks count them as background);
- sensor noise of a random level.

Colours have a uniform random lightness (0.05-0.95) and hue and a moderate random chroma (the
contrast rule shifts a fill's lightness away from the background's, whatever the class), so
colour statistics say nothing about the class: raw pixels and random features do poorly, while
a network that learns outlines invariant to colour, position, scale and rotation (what SimCLR's
crops and colour jitter teach) does well.

History (measured on a shared 2-core CPU, small CNN of width 32, SimCLR batch 256, AdamW 2e-3,
kNN k = 200 on 5000 / 1000 images): revision 1 (12 classes with ellipse and hexagon, contrasty
textures, colours uniform in the RGB cube) was not learnable in minutes: a supervised small CNN
on 8000 clean images reached 16 % test accuracy, SimCLR's kNN stayed at chance. Revision 2
(10 classes, textures and clutter of lower contrast) was learnable with labels, but SimCLR,
matching views by their saturated colours, gained 0.4 points of kNN in 160 steps. Revision 3
(this one: moderate chroma) gains: kNN 0.162 -> 0.216, linear probe 0.209 -> 0.334 after 431
steps (7 minutes); with SimCLR's crops limited to 25-100 % of the area (instead of 8-100 %, so
that a crop keeps most of the shape) 0.162 -> 0.261 and 0.209 -> 0.390 after 269 steps. With
colours reduced to grey it would be 0.158 -> 0.284 and 0.235 -> 0.431 after 282 steps (colour
is the shortcut SimCLR's jitter only partly removes); lowering only the backgrounds' chroma did
not help. A cosine kNN on raw pixels (2000 train / 500 test, 32 px) scores 0.24 (k = 1), 0.20
(k = 20), 0.19 (k = 200); chance is 0.10.

Labels:
- `labels`: the shape class, 0..len(SHAPE_CLASSES)-1, balanced: every block of
  len(SHAPE_CLASSES) consecutive images holds each class once, in a random order;
- `binary`: 1 if the shape's outline contains a curved arc (circle, ring, half disc, crescent,
  heart), 0 if it is made of straight edges only (triangle, square, star, cross, arrow): a
  property of the outline, not of any pixel's colour;
- `masks` (H, W) int64: 0 for background and clutter, c + 1 for the pixels whose centre lies
  inside the main shape of class c (`seg_classes = ["background"] + SHAPE_CLASSES`).

Determinism: every random number is a counter-based hash (splitmix64) of (seed, split, image
index, parameter slot [, pixel]), so image i depends only on (seed, split, i) and the size, never
on torch's or NumPy's global generators, on n, or on how the work is chunked.

Rendering is vectorised NumPy over chunks of images; shapes are signed-distance functions in the
shape's own frame (unit bounding radius), anti-aliased by coverage = clip(0.5 - d / pixel, 0, 1).

Example:
    >>> from modalities.image.synthetic import generate_shapes
    >>> train = generate_shapes(2000, size=32, seed=0, split="train")
    >>> train.images.shape, train.labels[:5], train.masks.shape
    (torch.Size([2000, 3, 32, 32]), tensor([...]), torch.Size([2000, 32, 32]))
"""
from __future__ import annotations

import hashlib
import inspect
import json
import zlib
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from .data import ImageSet

__all__ = [
    "SHAPE_CLASSES", "CURVED_CLASSES", "SHAPES_VERSION", "generate_shapes", "write_shapes_folders",
    "shape_signed_distance",
]

SHAPE_CLASSES: list[str] = [
    "circle", "ring", "half_disc", "crescent", "heart",
    "triangle", "square", "star", "cross", "arrow",
]
"""The shape classes; index c is label c and mask id c + 1."""

CURVED_CLASSES: frozenset[str] = frozenset(SHAPE_CLASSES[:5])
"""Classes whose outline contains a curved arc: `binary` = 1 for them, 0 for the others."""

SHAPE_LIBRARY: tuple[str, ...] = (
    "circle", "ellipse", "ring", "half_disc", "crescent", "heart",
    "triangle", "square", "hexagon", "star", "cross", "arrow",
)
"""Every outline `shape_signed_distance` draws (ellipse and hexagon are left out of the classes:
at 32 px they are too close to the circle to tell apart)."""

_REVISION = 3  # bump with any change of the rendering code below

# Every range the generator draws from (also hashed into SHAPES_VERSION).
_PARAMS = {
    "classes": SHAPE_CLASSES,
    "curved": sorted(CURVED_CLASSES),
    "scale": (0.30, 0.70),         # bounding-circle diameter / image side
    "ellipse_aspect": (0.45, 0.65),
    "ring_half_width": (0.17, 0.25),
    "star_inner": (0.38, 0.5),
    "value": (0.05, 0.95),         # colours: lightness uniform in this range, random hue,
    "chroma": (0.0, 0.22),         # chroma (channel spread) uniform in this range: shapes, clutter
    "background_chroma": (0.0, 0.22),  # the same for the backgrounds
    "fill_kinds": ["solid", "stripes", "checker", "dots", "noise"],
    "fill_contrast": (0.2, 0.45),  # second fill colour: this far from the first towards a random one
    "fill_freq": (1.0, 2.6),       # texture cycles per unit shape radius
    "min_period_px": 3.0,          # textures never finer than this
    "shading": (0.0, 0.3),
    "background_kinds": ["solid", "gradient", "smooth_noise", "texture"],
    "background_grid": 4,
    "background_grid_amplitude": (0.25, 0.6),  # smooth noise: cell colours around the base colour
    "background_freq": (1.5, 5.0),  # cycles per image side
    "background_contrast": (0.1, 0.4),
    "min_contrast": 0.5,           # RGB distance of the fill colour from the background under it
    "clutter_slots": 3,
    "clutter_p": 0.6,
    "clutter_opacity": (0.4, 0.9),
    "line_length": (0.15, 0.4),
    "line_half_width": (0.01, 0.025),
    "blob_radius": (0.03, 0.07),
    "noise_sigma": (0.0, 0.04),
}

_N_CLUTTER = _PARAMS["clutter_slots"]
_GRID = _PARAMS["background_grid"]

# Parameter slots: column k of the per-image uniform draws.
_S_CX, _S_CY, _S_SCALE, _S_ROT, _S_SHAPE = 0, 1, 2, 3, 4
_S_FILL_KIND, _S_COL_A, _S_COL_B = 5, 6, 9           # colours take 3 slots each
_S_FILL_FREQ, _S_FILL_ANGLE, _S_FILL_PHASE, _S_FILL_PHASE2 = 12, 13, 14, 15
_S_SHADE_ANGLE, _S_SHADE = 16, 17
_S_BG_KIND, _S_BG_C0, _S_BG_C1 = 18, 19, 22
_S_BG_ANGLE, _S_BG_FREQ, _S_BG_CONTRAST, _S_BG_CHECKER, _S_BG_PHASE = 25, 26, 27, 28, 29
_S_NOISE, _S_JITTER = 30, 31                          # jitter: 3 slots
_S_CLUTTER = 34                                       # 11 slots per clutter item
_S_GRID = _S_CLUTTER + 11 * _N_CLUTTER                # 3 * GRID * GRID slots
_N_SLOTS = _S_GRID + 3 * _GRID * _GRID

# ----------------------------------------------------------------------------- counter-based RNG

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele, Lea & Flood 2014) on a uint64 array: a bijective hash."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _MUL1
        z = (z ^ (z >> np.uint64(27))) * _MUL2
        return z ^ (z >> np.uint64(31))


def _stream_key(seed: int, split: str, stream: int) -> np.uint64:
    """One 64-bit key per (seed, split, stream); streams separate images from label blocks."""
    split_code = zlib.crc32(split.encode("utf-8"))
    with np.errstate(over="ignore"):
        z = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        z = _mix(z ^ np.uint64(split_code))
        z = _mix(z + np.uint64(stream) * _GOLDEN)
    return z[0]


def _keys(stream_key: np.uint64, index: np.ndarray) -> np.ndarray:
    """(n,) uint64 key of each counter in `index`."""
    with np.errstate(over="ignore"):
        return _mix(stream_key + (index.astype(np.uint64) + np.uint64(1)) * _GOLDEN)


def _slot_hash(slots: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix(slots.astype(np.uint64) * _GOLDEN + np.uint64(0x632BE59BD9B4E019))


def _uniform_bits(keys: np.ndarray, slot_hashes: np.ndarray) -> np.ndarray:
    """(n, m) uint64 hash of each (key, slot) pair."""
    with np.errstate(over="ignore"):
        return _mix(keys[:, None] ^ slot_hashes[None, :])


def _to_unit(bits: np.ndarray, shift: int, width: int) -> np.ndarray:
    """`width` bits of `bits` starting at `shift`, as float32 uniforms in [0, 1)."""
    mask = np.uint64((1 << width) - 1)
    return ((bits >> np.uint64(shift)) & mask).astype(np.float32) * np.float32(1.0 / (1 << width))


_PARAM_SLOTS = _slot_hash(np.arange(_N_SLOTS))
_PIXEL_SLOT_CACHE: dict[int, np.ndarray] = {}


def _pixel_slots(size: int) -> np.ndarray:
    if size not in _PIXEL_SLOT_CACHE:
        _PIXEL_SLOT_CACHE[size] = _slot_hash(np.arange(size * size) + (1 << 20))
    return _PIXEL_SLOT_CACHE[size]


# ----------------------------------------------------------------------------- shapes


def _length(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y)


def _polygon(x: np.ndarray, y: np.ndarray, sides: int) -> np.ndarray:
    """Regular polygon with circumradius 1 and a vertex at angle 0: max over edges of
    (p . n_k) - apothem, apothem = cos(pi / sides) (exact inside, a lower bound outside)."""
    apothem = np.float32(np.cos(np.pi / sides))
    d = None
    for k in range(sides):
        a = np.pi * (2 * k + 1) / sides  # edge normals sit half-way between vertices
        e = x * np.float32(np.cos(a)) + y * np.float32(np.sin(a))
        d = e if d is None else np.maximum(d, e)
    return d - apothem


def _box(x: np.ndarray, y: np.ndarray, hx: float, hy: float) -> np.ndarray:
    return np.maximum(np.abs(x) - np.float32(hx), np.abs(y) - np.float32(hy))


def shape_signed_distance(shape: str | int, x: np.ndarray, y: np.ndarray, param: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) to `shape` in its own frame.

    shape: a name of `SHAPE_LIBRARY`, or a class index into `SHAPE_CLASSES`.

    The frame's unit is the shape's bounding radius: every shape fits in the unit disc and
    touches (or nearly touches) its boundary. x, y: float32 arrays, broadcastable with `param`
    (one uniform in [0, 1) per image, for the class's own free parameter: ellipse aspect, ring
    thickness, star depth). The distance is exact or a close first-order estimate near the
    outline (that is all the anti-aliasing needs).
    """
    if isinstance(shape, str):
        name = shape
    elif isinstance(shape, (int, np.integer)) and 0 <= shape < len(SHAPE_CLASSES):
        name = SHAPE_CLASSES[int(shape)]
    else:
        raise ValueError(f"shape_signed_distance: shape={shape!r}; expected a class index in "
                         f"[0, {len(SHAPE_CLASSES)}) or a name in {SHAPE_LIBRARY}")
    if name == "circle":
        return _length(x, y) - 1
    if name == "ellipse":
        lo, hi = _PARAMS["ellipse_aspect"]
        b = np.float32(lo) + np.float32(hi - lo) * param  # semi-minor axis; semi-major 1
        # g = |(x, y / b)|; d ~ (g - 1) / |grad g|, |grad g| = |(x, y / b^2)| / g
        g = _length(x, y / b)
        grad = _length(x, y / (b * b)) / np.maximum(g, 1e-6)
        return (g - 1) / np.maximum(grad, 1e-6)
    if name == "ring":
        lo, hi = _PARAMS["ring_half_width"]
        w = np.float32(lo) + np.float32(hi - lo) * param
        return np.abs(_length(x, y) - (1 - w)) - w
    if name == "half_disc":
        # the half disc of radius 0.9 shifted so its bounding circle is centred at the origin
        yy = y + np.float32(0.38)
        return np.maximum(_length(x, yy) - np.float32(0.9), -yy)
    if name == "crescent":
        # a unit disc minus a disc of radius 0.78 centred 0.42 to the right
        return np.maximum(_length(x, y) - 1, np.float32(0.78) - _length(x - np.float32(0.42), y))
    if name == "heart":
        # a diamond |x| + |y| <= h with two discs on its upper edges' midpoints, centred
        h = np.float32(0.79)
        yy = y + np.float32(0.2)
        diamond = (np.abs(x) + np.abs(yy) - h) * np.float32(np.sqrt(0.5))
        lobe = _length(np.abs(x) - h / 2, yy - h / 2) - h * np.float32(np.sqrt(0.5))
        return np.minimum(diamond, lobe)
    if name == "triangle":
        return _polygon(x, y, 3)
    if name == "square":
        return _polygon(x, y, 4)
    if name == "hexagon":
        return _polygon(x, y, 6)
    if name == "star":
        lo, hi = _PARAMS["star_inner"]
        inner = np.float32(lo) + np.float32(hi - lo) * param
        # fold the angle into one half spike [0, pi/5]; the outline there is the segment from
        # the outer vertex (1, 0) to the inner vertex inner * (cos pi/5, sin pi/5)
        wedge = np.float32(2 * np.pi / 5)
        phi = np.mod(np.arctan2(y, x), wedge)
        phi = np.minimum(phi, wedge - phi)
        r = _length(x, y)
        px, py = r * np.cos(phi), r * np.sin(phi)
        vx, vy = inner * np.float32(np.cos(np.pi / 5)), inner * np.float32(np.sin(np.pi / 5))
        ex, ey = vx - 1, vy                 # edge direction
        norm = np.sqrt(ex * ex + ey * ey)
        nx, ny = -ey / norm, ex / norm      # outward normal (n . (1, 0) > 0)
        nx, ny = np.where(nx < 0, -nx, nx), np.where(nx < 0, -ny, ny)
        return (px - 1) * nx + py * ny
    if name == "cross":
        w, arm = 0.3, float(np.sqrt(1 - 0.3 ** 2))
        return np.minimum(_box(x, y, arm, w), _box(x, y, w, arm))
    if name == "arrow":
        shaft = np.maximum(np.maximum(np.float32(-0.97) - x, x - np.float32(0.25)),
                           np.abs(y) - np.float32(0.17))
        # head: the triangle (1, 0), (0.2, +-0.5)
        slant = (np.float32(0.5) * (x - 1) + np.float32(0.8) * np.abs(y)) / np.float32(np.hypot(0.5, 0.8))
        head = np.maximum(np.float32(0.2) - x, slant)
        return np.minimum(shaft, head)
    raise ValueError(f"shape_signed_distance: shape={shape!r}; expected a name in {SHAPE_LIBRARY}")


# ----------------------------------------------------------------------------- rendering


def _soft(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0, out=x)


def _colours(u3: np.ndarray, chroma: str = "chroma") -> np.ndarray:
    """(..., 3) uniforms -> (..., 3) RGB in [0, 1]: lightness v, hue h, chroma c from the three
    uniforms; rgb = clip(v + c * (cos h, cos(h - 2 pi / 3), cos(h + 2 pi / 3)))."""
    f32 = np.float32
    lo, hi = _PARAMS["value"]
    v = f32(lo) + f32(hi - lo) * u3[..., 0]
    h = u3[..., 1] * f32(2 * np.pi)
    lo, hi = _PARAMS[chroma]
    c = f32(lo) + f32(hi - lo) * u3[..., 2]
    offsets = np.stack([np.cos(h), np.cos(h - f32(2 * np.pi / 3)), np.cos(h + f32(2 * np.pi / 3))], axis=-1)
    return np.clip(v[..., None] + c[..., None] * offsets, 0, 1).astype(f32)


def _contrast_colour(colour: np.ndarray, reference: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """Move `colour` (n, 3) away from `reference` (n, 3) where they are closer than the minimum
    contrast: all channels shift by 0.4-0.55 towards the far end of the lightness range (up for
    a dark reference, down for a light one), so the contrast survives grayscale; the rule does
    not look at the class."""
    close = np.linalg.norm(colour - reference, axis=1) < _PARAMS["min_contrast"]
    step = np.float32(0.4) + np.float32(0.15) * jitter[:, None]
    up = reference.mean(axis=1, keepdims=True) < 0.5
    moved = np.clip(np.where(up, colour + step, colour - step), 0, 1)
    return np.where(close[:, None], moved, colour).astype(np.float32)


def _render(keys: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render images for per-image keys (n,) and classes (n,): (uint8 (n, 3, S, S), int64 (n, S, S))."""
    n, s = len(keys), size
    f32 = np.float32
    u = _to_unit(_uniform_bits(keys, _PARAM_SLOTS), 40, 24)         # (n, slots) in [0, 1)
    pix_bits = _uniform_bits(keys, _pixel_slots(s))                 # (n, S*S)
    fill_noise = _to_unit(pix_bits, 0, 21).reshape(n, s, s)
    sensor = (_to_unit(pix_bits, 21, 21) + _to_unit(pix_bits, 42, 21) - 1).reshape(n, 1, s, s)
    del pix_bits

    coord = (np.arange(s, dtype=f32) + f32(0.5)) / f32(s)           # pixel centres in (0, 1)
    X, Y = coord[None, None, :], coord[None, :, None]               # (1, 1, S), (1, S, 1)

    def col(slot: int, chroma: str = "chroma") -> np.ndarray:
        return _colours(u[:, slot:slot + 3], chroma)

    # --- background (n, 3, S, S)
    c0, c1 = col(_S_BG_C0, "background_chroma"), col(_S_BG_C1, "background_chroma")
    kind = np.minimum((u[:, _S_BG_KIND] * 4).astype(np.int64), 3)
    t = np.zeros((n, s, s), dtype=f32)
    ang = u[:, _S_BG_ANGLE] * f32(2 * np.pi)
    dx, dy = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
    along = (X - f32(0.5)) * dx + (Y - f32(0.5)) * dy               # (n, S, S)
    g = kind == 1
    t[g] = np.clip(along[g] * f32(1.2) + f32(0.5), 0, 1)            # linear gradient
    g = kind == 3
    if g.any():
        lo, hi = _PARAMS["background_freq"]
        freq = (f32(lo) + f32(hi - lo) * u[g, _S_BG_FREQ])[:, None, None] * f32(2 * np.pi)
        phase = u[g, _S_BG_PHASE][:, None, None] * f32(2 * np.pi)
        wave = np.sin(along[g] * freq + phase)
        across = (X - f32(0.5)) * -dy[g] + (Y - f32(0.5)) * dx[g]
        checker = u[g, _S_BG_CHECKER] < 0.5
        wave = np.where(checker[:, None, None], wave * np.sin(across * freq), wave)
        lo, hi = _PARAMS["background_contrast"]
        contrast = (f32(lo) + f32(hi - lo) * u[g, _S_BG_CONTRAST])[:, None, None]
        t[g] = _soft(f32(0.5) + f32(1.5) * wave) * contrast
    img = c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * t[:, None]
    g = kind == 2
    if g.any():  # smooth colour noise: a GRID x GRID grid of colours, bilinearly upsampled
        lo, hi = _PARAMS["background_grid_amplitude"]
        amplitude = (f32(lo) + f32(hi - lo) * u[g, _S_BG_CONTRAST])[:, None, None, None]
        cells = _colours(u[g, _S_GRID:_S_GRID + 3 * _GRID * _GRID].reshape(-1, _GRID, _GRID, 3),
                         "background_chroma")
        # cells: the base colour moved towards random colours by `amplitude`
        grid = c0[g][:, :, None, None] + (cells.transpose(0, 3, 1, 2) - c0[g][:, :, None, None]) * amplitude
        pos = np.clip(coord * (_GRID - 1), 0, _GRID - 1)
        lo_i = np.minimum(pos.astype(np.int64), _GRID - 2)
        frac = (pos - lo_i).astype(f32)
        interp = np.zeros((s, _GRID), dtype=f32)                    # (S, GRID) weights
        interp[np.arange(s), lo_i] = 1 - frac
        interp[np.arange(s), lo_i + 1] = frac
        img[g] = np.einsum("yi,ncij,xj->ncyx", interp, grid, interp, optimize=True)
    img = img.astype(f32, copy=False)

    # --- clutter behind the shape
    for m in range(_N_CLUTTER):
        base = _S_CLUTTER + 11 * m
        active = u[:, base] < _PARAMS["clutter_p"]
        if not active.any():
            continue
        is_line = u[:, base + 1] < 0.5
        x0, y0 = u[:, base + 2], u[:, base + 3]
        a = u[:, base + 4] * f32(2 * np.pi)
        cl = col(base + 7)
        alpha = np.zeros((n, s, s), dtype=f32)
        lo, hi = _PARAMS["clutter_opacity"]
        opacity = (f32(lo) + f32(hi - lo) * u[:, base + 10])[:, None, None]
        for line in (True, False):
            g = active & (is_line == line)
            if not g.any():
                continue
            px, py = X - x0[g, None, None], Y - y0[g, None, None]
            if line:   # segment from (x0, y0) along angle a, soft edges one pixel wide
                lo, hi = _PARAMS["line_length"]
                length = (f32(lo) + f32(hi - lo) * u[g, base + 5])[:, None, None]
                lo, hi = _PARAMS["line_half_width"]
                half = (f32(lo) + f32(hi - lo) * u[g, base + 6])[:, None, None]
                ex, ey = np.cos(a[g])[:, None, None], np.sin(a[g])[:, None, None]
                proj = np.clip(px * ex + py * ey, 0, length)
                d = _length(px - proj * ex, py - proj * ey) - half
                alpha[g] = _soft(f32(0.5) - d * f32(s)) * opacity[g]
            else:      # soft blob: a Gaussian bump of radius r
                lo, hi = _PARAMS["blob_radius"]
                r = (f32(lo) + f32(hi - lo) * u[g, base + 5])[:, None, None]
                alpha[g] = opacity[g] * np.exp(-(px * px + py * py) / (2 * r * r))
        img += (cl[:, :, None, None] - img) * alpha[:, None]

    # --- main shape
    lo, hi = _PARAMS["scale"]
    radius = (f32(lo) + f32(hi - lo) * u[:, _S_SCALE]) / 2          # bounding radius, image units
    cx = radius + (1 - 2 * radius) * u[:, _S_CX]                    # fully inside the image
    cy = radius + (1 - 2 * radius) * u[:, _S_CY]
    rot = u[:, _S_ROT] * f32(2 * np.pi)
    cr, sr = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
    r3 = radius[:, None, None]
    # shape frame: q = R(-rot) (p - c) / radius
    qx = ((X - cx[:, None, None]) * cr + (Y - cy[:, None, None]) * sr) / r3
    qy = (-(X - cx[:, None, None]) * sr + (Y - cy[:, None, None]) * cr) / r3
    dist = np.empty((n, s, s), dtype=f32)
    for c in np.unique(labels):
        g = labels == c
        dist[g] = shape_signed_distance(int(c), qx[g], qy[g], u[g, _S_SHAPE][:, None, None])
    dist *= r3                                                      # image units
    coverage = _soft(f32(0.5) - dist * f32(s))
    mask = np.where(dist < 0, labels[:, None, None] + 1, 0).astype(np.int64)

    # fill: colour A, far enough from the background under the shape; colour B part of the way
    # from A to a random colour (textures modulate the fill without breaking the silhouette)
    weight = coverage / np.maximum(coverage.sum(axis=(1, 2), keepdims=True), f32(1e-6))
    bg_under = np.einsum("ncyx,nyx->nc", img, weight)
    col_a = _contrast_colour(col(_S_COL_A), bg_under, u[:, _S_JITTER])
    lo, hi = _PARAMS["fill_contrast"]
    towards = (f32(lo) + f32(hi - lo) * u[:, _S_JITTER + 1])[:, None]
    col_b = col_a + (col(_S_COL_B) - col_a) * towards
    fill_kind = np.minimum((u[:, _S_FILL_KIND] * 5).astype(np.int64), 4)
    lo, hi = _PARAMS["fill_freq"]
    # cycles per unit radius, capped so that a period spans at least min_period_px pixels
    cap = radius * s / _PARAMS["min_period_px"]
    freq = np.minimum(f32(lo) + f32(hi - lo) * u[:, _S_FILL_FREQ], cap)
    ta = u[:, _S_FILL_ANGLE] * f32(2 * np.pi)
    tx = qx * np.cos(ta)[:, None, None] + qy * np.sin(ta)[:, None, None]
    ty = -qx * np.sin(ta)[:, None, None] + qy * np.cos(ta)[:, None, None]
    w = (freq * f32(2 * np.pi))[:, None, None]
    ph = (u[:, _S_FILL_PHASE] * f32(2 * np.pi))[:, None, None]
    ph2 = (u[:, _S_FILL_PHASE2] * f32(2 * np.pi))[:, None, None]
    tex = np.zeros((n, s, s), dtype=f32)
    g = fill_kind == 1
    tex[g] = _soft(f32(0.5) + np.sin(tx[g] * w[g] + ph[g]))
    g = fill_kind == 2
    tex[g] = _soft(f32(0.5) + f32(2) * np.sin(tx[g] * w[g] + ph[g]) * np.sin(ty[g] * w[g] + ph2[g]))
    g = fill_kind == 3
    if g.any():
        fx = tx[g] * freq[g, None, None] + u[g, _S_FILL_PHASE, None, None]
        fy = ty[g] * freq[g, None, None] + u[g, _S_FILL_PHASE2, None, None]
        d = _length(fx - np.floor(fx) - f32(0.5), fy - np.floor(fy) - f32(0.5))
        period_px = (radius[g] * s / freq[g])[:, None, None]
        tex[g] = _soft(f32(0.5) + (f32(0.3) - d) * period_px)
    g = fill_kind == 4
    tex[g] = fill_noise[g]
    fill = col_a[:, :, None, None] + (col_b - col_a)[:, :, None, None] * tex[:, None]
    lo, hi = _PARAMS["shading"]
    shade_a = u[:, _S_SHADE_ANGLE] * f32(2 * np.pi)
    strength = (f32(lo) + f32(hi - lo) * u[:, _S_SHADE])[:, None, None]
    shade = 1 + strength * (qx * np.cos(shade_a)[:, None, None] + qy * np.sin(shade_a)[:, None, None])
    fill *= shade[:, None]
    img += (fill - img) * coverage[:, None]

    # --- sensor noise, quantisation
    lo, hi = _PARAMS["noise_sigma"]
    sigma = (f32(lo) + f32(hi - lo) * u[:, _S_NOISE])[:, None, None, None]
    img += sensor * sigma * f32(np.sqrt(6.0))   # triangular noise, variance 1/6 before scaling
    img = np.clip(img * f32(255) + f32(0.5), 0, 255).astype(np.uint8)
    return img, mask


def _version() -> str:
    sources = []
    for fn in (shape_signed_distance, _render, _colours, _contrast_colour, _polygon, _stream_key, _keys,
               _mix, _slot_hash, _uniform_bits, _to_unit, _block_labels):
        try:
            sources.append(inspect.getsource(fn))
        except (OSError, TypeError):  # no source available (frozen install): parameters only
            sources.append(fn.__name__)
    blob = json.dumps({"revision": _REVISION, "params": _PARAMS, "slots": _N_SLOTS,
                       "code": sources}, sort_keys=True)
    return f"{_REVISION}-{hashlib.sha1(blob.encode('utf-8')).hexdigest()[:12]}"


def _block_labels(seed: int, split: str, index: np.ndarray) -> np.ndarray:
    """Balanced classes: block b = i // K holds each class once, in a per-block random order."""
    k = len(SHAPE_CLASSES)
    blocks = index // k
    unique_blocks, inverse = np.unique(blocks, return_inverse=True)
    draws = _to_unit(_uniform_bits(_keys(_stream_key(seed, split, 1), unique_blocks),
                                   _slot_hash(np.arange(k))), 40, 24)
    perms = np.argsort(draws, axis=1, kind="stable")
    return perms[inverse, index % k].astype(np.int64)


# ----------------------------------------------------------------------------- public API

def _check_size(fn: str, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= size <= 1024:
        raise ValueError(f"{fn}: size={size!r}; expected an integer number of pixels in [16, 1024]")


def generate_shapes(n: int, *, size: int = 32, seed: int = 0, split: str = "train",
                    chunk: int | None = None) -> ImageSet:
    """Generate `n` shape scenes (see the module docstring for what they hold).

    Args:
        n: number of images (>= 0).
        size: image side in pixels (16 to 1024; 16 to 256 are the intended range).
        seed: any non-negative integer.
        split: any name; different splits are independent draws ("train", "test", "val").
        chunk: images rendered per vectorised step (default: about 128k pixels per step);
            the output does not depend on it.

    Returns:
        ImageSet with images uint8 (n, 3, size, size), labels int64 (n,) in [0, 12), binary int64
        (n,), masks int64 (n, size, size) in [0, 13), classes = SHAPE_CLASSES, seg_classes =
        ["background"] + SHAPE_CLASSES, ignore_index 255 (unused: every pixel is labelled).

    Deterministic in (n, size, seed, split), independent of global RNGs; image i depends only on
    (seed, split, i), so generate_shapes(10) is a prefix of generate_shapes(20).

    Example:
        >>> data = generate_shapes(100, size=32, seed=0, split="test")
        >>> data.images.dtype, data.binary.float().mean()  # about half the classes are curved
        (torch.uint8, tensor(0.5...))
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"generate_shapes: n={n!r}; expected a non-negative integer")
    _check_size("generate_shapes", size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"generate_shapes: seed={seed!r}; expected a non-negative integer")
    if not isinstance(split, str) or not split:
        raise ValueError(f"generate_shapes: split={split!r}; expected a non-empty string")
    if chunk is None:
        chunk = max(1, (1 << 17) // (size * size))
    elif isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"generate_shapes: chunk={chunk!r}; expected a positive integer")
    n, size = int(n), int(size)
    index = np.arange(n, dtype=np.int64)
    labels = _block_labels(int(seed), split, index)
    keys = _keys(_stream_key(int(seed), split, 0), index)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    masks = torch.empty((n, size, size), dtype=torch.int64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        img, mask = _render(keys[start:stop], labels[start:stop], size)
        images[start:stop] = torch.from_numpy(img)
        masks[start:stop] = torch.from_numpy(mask)
    curved = np.array([name in CURVED_CLASSES for name in SHAPE_CLASSES], dtype=np.int64)
    return ImageSet(
        images=images,
        labels=torch.from_numpy(labels),
        classes=list(SHAPE_CLASSES),
        binary=torch.from_numpy(curved[labels]),
        masks=masks,
        seg_classes=["background"] + list(SHAPE_CLASSES),
        ignore_index=255,
    )


def write_shapes_folders(root: str | PathLike, *, n_train: int, n_test: int, size: int = 32,
                         seed: int = 0, segmentation: bool = True) -> Path:
    """Export generated shapes as PNG folders in the layouts the folder loaders read.

    Writes
        <root>/classes/{train,test}/<class>/<i>.png               (the many-class labels)
        <root>/segmentation/{train,test}/images/<i>.png           (when segmentation)
        <root>/segmentation/{train,test}/masks/<i>.png            (8-bit, 0 = background, c + 1)
        <root>/shapes.json                                        (version, sizes, seed)
    with i zero-padded to 6 digits. Returns Path(root). Existing files of the same names are
    overwritten; nothing else is removed.

    Example:
        >>> root = write_shapes_folders("/tmp/shapes", n_train=200, n_test=100)
        >>> from modalities.image.data import load_class_folders
        >>> train, skipped = load_class_folders(root / "classes", "train")
    """
    from PIL import Image

    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"write_shapes_folders: {name}={value!r}; expected a positive integer")
    _check_size("write_shapes_folders", size)
    root = Path(root)
    for split, n in (("train", n_train), ("test", n_test)):
        data = generate_shapes(int(n), size=size, seed=seed, split=split)
        images = data.images.permute(0, 2, 3, 1).numpy()
        masks = data.masks.numpy().astype(np.uint8)
        for cls in sorted(set(data.labels.tolist())):  # only classes present: no empty folder
            (root / "classes" / split / SHAPE_CLASSES[cls]).mkdir(parents=True, exist_ok=True)
        if segmentation:
            for sub in ("images", "masks"):
                (root / "segmentation" / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(len(data)):
            name = f"{i:06d}.png"
            picture = Image.fromarray(images[i])
            picture.save(root / "classes" / split / SHAPE_CLASSES[int(data.labels[i])] / name)
            if segmentation:
                picture.save(root / "segmentation" / split / "images" / name)
                Image.fromarray(masks[i]).save(root / "segmentation" / split / "masks" / name)
    meta = {"version": SHAPES_VERSION, "n_train": int(n_train), "n_test": int(n_test),
            "size": int(size), "seed": int(seed), "classes": SHAPE_CLASSES,
            "seg_classes": ["background"] + SHAPE_CLASSES}
    (root / "shapes.json").write_text(json.dumps(meta, indent=1) + "\n")
    return root


SHAPES_VERSION: str = _version()
"""Changes whenever the synthesis changes: revision number + hash of the parameters and code."""
