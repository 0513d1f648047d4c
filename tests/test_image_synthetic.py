"""The generated shapes dataset: labels, masks, determinism, nuisance statistics, folder export."""
import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modalities.image.data import load_class_folders, load_segmentation_folders
from modalities.image.synthetic import (
    CURVED_CLASSES,
    SHAPE_CLASSES,
    SHAPE_LIBRARY,
    SHAPES_VERSION,
    generate_shapes,
    shape_signed_distance,
    write_shapes_folders,
)

K = len(SHAPE_CLASSES)


@pytest.fixture(scope="module")
def shapes32():
    return generate_shapes(600, size=32, seed=0, split="train")


def test_contents(shapes32):
    d = shapes32
    assert K >= 10 and len(set(SHAPE_CLASSES)) == K
    assert d.images.dtype == torch.uint8 and d.images.shape == (600, 3, 32, 32)
    assert d.labels.dtype == torch.int64 and d.binary.dtype == torch.int64 and d.masks.dtype == torch.int64
    assert d.masks.shape == (600, 32, 32)
    assert d.classes == SHAPE_CLASSES and d.seg_classes == ["background"] + SHAPE_CLASSES
    # balanced: every block of K consecutive images holds each class once
    blocks = d.labels[: 600 // K * K].view(-1, K)
    assert torch.equal(blocks.sort(dim=1).values, torch.arange(K).expand_as(blocks))
    # binary = curved outline, a function of the class only
    curved = torch.tensor([name in CURVED_CLASSES for name in SHAPE_CLASSES])
    assert torch.equal(d.binary, curved[d.labels].long())
    assert 0.4 < d.binary.float().mean() < 0.6
    # masks: 0 background, label + 1 on the shape, and every shape visible
    for i in range(len(d)):
        values = set(d.masks[i].unique().tolist())
        assert values == {0, int(d.labels[i]) + 1}, (i, values)


def test_scale_position_and_area(shapes32):
    d = shapes32
    size = 32
    for i in range(len(d)):
        ys, xs = torch.nonzero(d.masks[i], as_tuple=True)
        extent = max(int(ys.max() - ys.min()), int(xs.max() - xs.min())) + 1
        # bounding-circle diameter 30-70 % of the side: the mask never spans more than 70 % + 1 px
        assert extent <= 0.7 * size + 1, (i, extent)
        assert extent >= 0.3 * size * 0.5, (i, extent)  # the thinnest shapes span half their circle
    frac = (d.masks > 0).float().mean(dim=(1, 2))
    assert 0.01 < frac.min() and frac.max() < 0.45


@pytest.mark.parametrize("cls", SHAPE_LIBRARY)
def test_signed_distance_fits_unit_disc(cls):
    g = torch.linspace(-1.3, 1.3, 521).numpy()
    x, y = np.meshgrid(g, g)
    for param in (0.0, 0.999):
        d = shape_signed_distance(cls, x.astype(np.float32), y.astype(np.float32), np.float32(param))
        r = np.sqrt(x ** 2 + y ** 2)[d < 0]
        assert 0.95 <= r.max() <= 1.005, (cls, param, r.max())
        # the distance estimate has slope ~1 across the outline (what anti-aliasing assumes)
        inside_ring = np.abs(d) < 0.02
        assert inside_ring.any()


def test_deterministic_prefix_and_rng_independent():
    torch.manual_seed(1)
    np.random.seed(1)
    a = generate_shapes(30, size=24, seed=5, split="val")
    torch.manual_seed(2)
    np.random.seed(2)
    torch.rand(100)
    b = generate_shapes(13, size=24, seed=5, split="val", chunk=1)
    for name in ("images", "labels", "binary", "masks"):
        assert torch.equal(getattr(a, name)[:13], getattr(b, name)), name
    c = generate_shapes(13, size=24, seed=6, split="val")
    e = generate_shapes(13, size=24, seed=5, split="train")
    assert not torch.equal(c.images, b.images) and not torch.equal(e.images, b.images)


@pytest.mark.parametrize("size", [16, 256])
def test_sizes(size):
    d = generate_shapes(3, size=size, seed=0)
    assert d.images.shape == (3, 3, size, size) and d.masks.shape == (3, size, size)
    assert all((d.masks[i] > 0).any() for i in range(3))


def test_colour_independent_of_class():
    d = generate_shapes(1200, size=32, seed=3)
    img = d.images.float() / 255
    shape = (d.masks > 0).unsqueeze(1).float()
    fill = (img * shape).sum(dim=(2, 3)) / shape.sum(dim=(2, 3))          # (N, 3) mean shape colour
    background = (img * (1 - shape)).sum(dim=(2, 3)) / (1 - shape).sum(dim=(2, 3))
    for colour in (fill, background):
        overall = colour.mean(0)
        for c in range(K):
            per_class = colour[d.labels == c].mean(0)
            # 100 images per class; colour std ~0.25, so the class mean's std is ~0.025
            assert (per_class - overall).abs().max() < 0.09, (SHAPE_CLASSES[c], per_class, overall)


def test_raw_pixels_knn_far_from_perfect():
    train = generate_shapes(2000, size=32, seed=0, split="train")
    test = generate_shapes(500, size=32, seed=0, split="test")

    def feats(images):
        x = images.float().flatten(1)
        return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)

    sim = feats(test.images) @ feats(train.images).T
    top = sim.topk(20, dim=1)
    votes = torch.zeros(500, K).scatter_add_(1, train.labels[top.indices], (top.values / 0.1).exp())
    acc = (votes.argmax(1) == test.labels).float().mean().item()
    assert acc < 0.3, acc   # chance is 0.1; measured 0.20


def test_generation_speed():
    generate_shapes(64, size=32)
    start = time.process_time()
    generate_shapes(1000, size=32, seed=1)
    rate = 1000 / max(time.process_time() - start, 1e-9)
    assert rate > 1000, rate  # CPU time, so other processes do not count; measured ~3500/s


def test_version():
    assert isinstance(SHAPES_VERSION, str) and re.fullmatch(r"[0-9]+-[0-9a-f]{12}", SHAPES_VERSION)
    assert set(SHAPE_CLASSES) <= set(SHAPE_LIBRARY)
    # any generator parameter is part of the version
    from modalities.image import synthetic
    assert synthetic._version() == SHAPES_VERSION
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(synthetic._PARAMS, "scale", (0.3, 0.71))
        assert synthetic._version() != SHAPES_VERSION
    with pytest.raises(ValueError, match="shape=10"):
        shape_signed_distance(10, np.zeros(1), np.zeros(1), np.zeros(1))


@pytest.mark.parametrize("kwargs", [dict(n=-1), dict(n=2, size=8), dict(n=2, size=32.0), dict(n=2, seed=-1),
                                    dict(n=2, split=""), dict(n=2, chunk=0)])
def test_bad_arguments(kwargs):
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=next(iter(kwargs), "n")):
        generate_shapes(n, **kwargs)


def test_write_folders_round_trip(tmp_path):
    root = write_shapes_folders(tmp_path / "shapes", n_train=20, n_test=9, size=24, seed=2)
    assert (root / "shapes.json").is_file()
    for split, n in (("train", 20), ("test", 9)):
        data = generate_shapes(n, size=24, seed=2, split=split)
        loaded, skipped = load_class_folders(root / "classes", split)
        assert skipped == []
        # the loader orders by class folder (sorted names), then file name
        names = [loaded.classes[int(c)] for c in loaded.labels]
        index = [int(p.rsplit("/", 1)[1][:-4]) for p in loaded.paths]
        assert sorted(index) == list(range(n))
        assert names == [SHAPE_CLASSES[int(data.labels[i])] for i in index]
        assert torch.equal(loaded.images, data.images[index])
        seg, skipped = load_segmentation_folders(root / "segmentation", split, num_classes=K + 1)
        assert skipped == [] and seg.seg_classes == [str(c) for c in range(K + 1)]
        assert torch.equal(seg.images, data.images) and torch.equal(seg.masks, data.masks)
