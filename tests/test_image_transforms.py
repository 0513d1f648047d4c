"""Augmentations: shapes and dtypes, SimCLR's blur rule, mask-safe segmentation transforms, and
views that are a pure function of (seed, epoch, index)."""
import math

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from modalities.image.sampling import AugmentedViews, EpochBatchSampler, collate_views
from modalities.image.transforms import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    blur_kernel_size,
    eval_transform,
    seg_eval_transform,
    seg_train_transform,
    simclr_transform,
)

MEAN = torch.tensor(DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(DEFAULT_STD).view(3, 1, 1)


@pytest.fixture
def one_thread():
    """Per-image ops on one thread (threads only add synchronisation, see AugmentedViews)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def blurs(transform):
    """The GaussianBlur ops inside a (nested) v2 pipeline."""
    found = []

    def walk(t):
        if isinstance(t, v2.GaussianBlur):
            found.append(t)
        for child in getattr(t, "transforms", []):
            walk(child)

    walk(transform)
    return found


@pytest.mark.parametrize("in_size,out_size", [(32, 32), (224, 224), (32, 224), (250, 96)])
def test_simclr_shapes_and_dtype(in_size, out_size, one_thread):
    aug = simclr_transform(out_size)
    x = images(1, in_size)[0]
    y = aug(x)
    assert y.dtype == torch.float32 and y.shape == (3, out_size, out_size)
    # normalised range: (0 - mean) / std .. (1 - mean) / std
    assert (y >= (0 - MEAN) / STD - 1e-5).all() and (y <= (1 - MEAN) / STD + 1e-5).all()
    assert not torch.equal(aug(x), aug(x))   # random


def test_blur_only_at_96_px_or_forced():
    assert blurs(simclr_transform(32)) == [] and blurs(simclr_transform(64)) == []
    assert len(blurs(simclr_transform(96))) == 1 and len(blurs(simclr_transform(224))) == 1
    assert len(blurs(simclr_transform(32, blur=True))) == 1
    assert blurs(simclr_transform(224, blur=False)) == []
    (b,) = blurs(simclr_transform(224))
    assert list(b.kernel_size) == [23, 23] and list(b.sigma) == [0.1, 2.0]
    assert blur_kernel_size(96) == 9 and blur_kernel_size(32) == 3


def test_eval_transform_values_and_batches():
    ev = eval_transform(32)
    x = images(4, 32)
    y = ev(x)
    assert y.shape == (4, 3, 32, 32) and y.dtype == torch.float32
    expected = (x.double() / 255 - MEAN.double()) / STD.double()
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ev(x[0]), y[0])
    torch.testing.assert_close(ev(x.float() / 255), y, rtol=0, atol=1e-5)   # float input in [0, 1]
    # resize only when needed: a constant image stays constant
    const = torch.full((3, 224, 224), 200, dtype=torch.uint8)
    out = eval_transform(96)(const)
    assert out.shape == (3, 96, 96)
    torch.testing.assert_close(out, ((200 / 255 - MEAN) / STD).expand(3, 96, 96), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="expected a \\(3, H, W\\)"):
        ev(torch.zeros(2, 32, 32))


@pytest.mark.parametrize("bad", [dict(size=4), dict(crop_scale=(0.5, 0.1)), dict(jitter_p=1.5),
                                 dict(jitter=(0.4, 0.4, 0.4, 0.7)), dict(blur="yes"), dict(std=(1, 0, 1))])
def test_bad_arguments(bad):
    kwargs = dict(size=32) | bad
    size = kwargs.pop("size")
    with pytest.raises(ValueError, match=next(iter(bad))):
        simclr_transform(size, **kwargs)


# ----------------------------------------------------------------------------- segmentation

PALETTE = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 255, 255]],
                       dtype=torch.uint8)


def blocky_pair(size, block, seed):
    """An image of constant blocks whose colour is PALETTE[class]; mask = class: the mask is a
    function of the image's pixels."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, len(PALETTE), (size // block, size // block), generator=g)
    mask = cells.repeat_interleave(block, 0).repeat_interleave(block, 1)
    image = PALETTE[mask].permute(2, 0, 1).contiguous()
    return image, mask


def uniform_interior(mask, radius):
    """Pixels whose (2 radius + 1)^2 neighbourhood holds one mask value."""
    m = mask.float()[None, None]
    pool = torch.nn.functional.max_pool2d
    hi = pool(m, 2 * radius + 1, 1, radius)
    lo = -pool(-m, 2 * radius + 1, 1, radius)
    interior = (hi == lo)[0, 0]
    interior[:radius], interior[-radius:], interior[:, :radius], interior[:, -radius:] = False, False, False, False
    return interior


@pytest.mark.parametrize("in_size,out_size,degrees", [(64, 32, 0.0), (32, 32, 30.0), (64, 96, 20.0)])
def test_seg_train_keeps_mask_aligned(in_size, out_size, degrees, one_thread):
    aug = seg_train_transform(out_size, jitter_p=0.0, gray_p=0.0, degrees=degrees, ignore_index=255)
    # bilinear resampling of the image mixes colours up to one input pixel from an edge, that is
    # up to out / (in * sqrt(0.25 * 3/4)) output pixels for the smallest crop: compare further in
    radius = math.ceil(out_size / (in_size * math.sqrt(0.25 * 0.75))) + (1 if degrees else 0)
    compared = 0
    for seed in range(8):
        image, mask = blocky_pair(in_size, in_size // 4, seed)
        torch.manual_seed(seed)
        x, y = aug(image, mask)
        assert x.shape == (3, out_size, out_size) and x.dtype == torch.float32
        assert y.shape == (out_size, out_size) and y.dtype == torch.int64
        pixels = ((x * STD + MEAN) * 255).round().clamp(0, 255).long()    # back to uint8 values
        inside = uniform_interior(y, radius) & (y != 255)
        compared += int(inside.sum())
        expected = PALETTE[y[inside]].long()                             # (P, 3)
        got = pixels.permute(1, 2, 0)[inside]
        assert (got - expected).abs().le(2).all(), seed
        if degrees:
            # areas brought in by the rotation: ignore_index in the mask, black in the image
            void = uniform_interior(y == 255, radius) & (y == 255)
            assert pixels.permute(1, 2, 0)[void].le(2).all()
    assert compared > 0.03 * 8 * out_size ** 2     # enough pixels compared (hundreds)


@pytest.mark.parametrize("in_size,out_size", [(48, 17), (20, 64), (32, 32)])
def test_seg_masks_never_interpolated(in_size, out_size, one_thread):
    aug = seg_train_transform(out_size, degrees=45.0, ignore_index=250)
    g = torch.Generator().manual_seed(in_size)
    for trial in range(10):
        mask = torch.randint(0, 4, (in_size, in_size), generator=g) * 3 + 1        # values 1, 4, 7, 10
        image = images(1, in_size, trial)[0]
        x, y = aug(image, mask)
        assert set(y.unique().tolist()) <= {1, 4, 7, 10, 250}
    ev = seg_eval_transform(out_size)
    x, y = ev(images(3, in_size), torch.randint(0, 4, (3, in_size, in_size), generator=g) * 3 + 1)
    assert x.shape == (3, 3, out_size, out_size) and y.shape == (3, out_size, out_size)
    assert set(y.unique().tolist()) <= {1, 4, 7, 10}


def test_seg_eval_nearest_and_identity():
    image, mask = blocky_pair(32, 8, 0)
    x, y = seg_eval_transform(32)(image, mask)
    assert torch.equal(y, mask)
    torch.testing.assert_close(x, eval_transform(32)(image))
    x, y = seg_eval_transform(16)(image, mask)
    assert torch.equal(y, mask[1::2, 1::2])       # centres of 2x2 cells (nearest at pixel centres)
    with pytest.raises(ValueError, match="mask"):
        seg_eval_transform(16)(image, mask[:8])
    with pytest.raises(ValueError, match="dtype"):
        seg_train_transform(16)(image, mask.float())


def test_seg_photometric_on_image_only():
    aug = seg_train_transform(32, crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=1.0, gray_p=1.0)
    image, mask = blocky_pair(32, 8, 3)
    torch.manual_seed(0)
    x, y = aug(image, mask)
    assert torch.equal(y, mask)                       # geometry identity: mask untouched
    grey = x * STD + MEAN
    torch.testing.assert_close(grey[0], grey[1], atol=1e-6, rtol=0)   # grayscale hit the image
    assert not torch.allclose(x, eval_transform(32)(image))


# ----------------------------------------------------------------------------- AugmentedViews


def loader_batches(dataset, sampler, workers, n_batches):
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_views, num_workers=workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n_batches:
            break
    return out


def test_views_pure_function_of_seed_epoch_index():
    data = images(12, 32)
    labels = torch.arange(12) % 3
    ds = AugmentedViews(data, labels, simclr_transform(32), n_views=2, seed=7)
    torch.manual_seed(123)
    serial = loader_batches(ds, EpochBatchSampler(12, 4, seed=1), 0, 6)   # two epochs of 3
    torch.manual_seed(999)
    parallel = loader_batches(ds, EpochBatchSampler(12, 4, seed=1), 2, 6)
    for (xa, ya), (xb, yb) in zip(serial, parallel):
        assert xa.shape == (4, 2, 3, 32, 32) and xa.dtype == torch.float32
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # direct access agrees, differs across epochs and views, and leaves the global RNG alone
    state = torch.get_rng_state()
    first = ds[(5, 0)][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, ds[(5, 0)][0]) and torch.equal(first, ds[5][0])
    assert not torch.equal(first, ds[(5, 1)][0])
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first, AugmentedViews(data, labels, simclr_transform(32), seed=8)[(5, 0)][0])
    single = AugmentedViews(data, labels, simclr_transform(32), n_views=1)[(0, 0)]
    assert single[0].shape == (1, 3, 32, 32) and single[1] == 0


def test_views_from_lazy_dataset(tmp_path):
    from PIL import Image

    from modalities.image.data import ClassFolderDataset

    data = images(3, 16)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(data[i].permute(1, 2, 0).numpy()).save(paths[-1])
    lazy = AugmentedViews(ClassFolderDataset(paths, [0, 1, 1]), None, eval_transform(16), n_views=1)
    eager = AugmentedViews(data, [0, 1, 1], eval_transform(16), n_views=1)
    for i in range(3):
        assert torch.equal(lazy[(i, 2)][0], eager[(i, 2)][0]) and lazy[i][1] == eager[i][1]
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        AugmentedViews(data, [0, 1], eval_transform(16))
    # an unreadable file: the next image stands in, with its own label
    paths[0].write_bytes(b"broken")
    lazy = AugmentedViews(ClassFolderDataset(paths, [0, 1, 1]), None, eval_transform(16), n_views=1)
    with pytest.warns(UserWarning, match="0.png"):
        views, label = lazy[(0, 0)]
    assert torch.equal(views, eager[(1, 0)][0]) and label == 1
