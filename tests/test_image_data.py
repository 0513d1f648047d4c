"""Class and segmentation folder readers on temporary folders: formats, errors, skipping."""
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from modalities.image.data import (
    BadImageError,
    ClassFolderDataset,
    ImageSet,
    class_folder_splits,
    load_class_folders,
    load_segmentation_folders,
    scan_class_folder,
)

RNG = np.random.default_rng(0)


def rgb(h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def make_classes(root, layout, size=8):
    """layout: {split: {class: n_images}}; returns {path: (h, w, 3) array}."""
    written = {}
    seed = 0
    for split, classes in layout.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                arr = rgb(size, size, seed)
                written[save(root / split / name / f"{i}.png", arr)] = arr
    return written


def as_hwc(t):
    return t.permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- class folders


def test_class_folders_layout_val_and_labels(tmp_path):
    written = make_classes(tmp_path, {"train": {"cat": 2, "ant": 3}, "test": {"cat": 1}, "val": {"ant": 1}})
    splits = class_folder_splits(tmp_path)
    assert set(splits) == {"train", "test", "val"}
    train, skipped = load_class_folders(tmp_path, "train")
    assert skipped == [] and train.classes == ["ant", "cat"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1]
    assert train.images.shape == (5, 3, 8, 8) and train.images.dtype == torch.uint8
    for i, path in enumerate(train.paths):
        np.testing.assert_array_equal(as_hwc(train.images[i]), written[type(tmp_path)(path)])
    test, _ = load_class_folders(tmp_path, "test")      # labels index train's classes
    assert test.classes == ["ant", "cat"] and test.labels.tolist() == [1]
    val, _ = load_class_folders(tmp_path, "val")
    assert val.labels.tolist() == [0]
    # without val
    (tmp_path / "val" / "ant" / "0.png").unlink()
    (tmp_path / "val" / "ant").rmdir()
    (tmp_path / "val").rmdir()
    assert set(class_folder_splits(tmp_path)) == {"train", "test"}
    with pytest.raises(ValueError, match="split='val'"):
        load_class_folders(tmp_path, "val")


def test_workers_and_nested_and_extensions(tmp_path):
    make_classes(tmp_path, {"train": {"a": 3, "b": 2}, "test": {"a": 1}})
    save(tmp_path / "train" / "b" / "deep" / "x.PNG", rgb(8, 8, 99))
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image")
    save(tmp_path / "train" / "b" / ".hidden.png", rgb(8, 8, 98))
    serial, _ = load_class_folders(tmp_path, "train")
    threaded, _ = load_class_folders(tmp_path, "train", workers=2, progress=False)
    assert len(serial) == 6 and serial.paths[-1].endswith("deep/x.PNG")
    assert torch.equal(serial.images, threaded.images) and serial.paths == threaded.paths


def test_modes_converted_to_rgb(tmp_path):
    d = tmp_path / "train" / "c"
    gray = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
    save(d / "0_gray.png", gray)
    rgba = RNG.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    save(d / "1_rgba.png", rgba)
    palette = Image.fromarray(RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    palette = palette.convert("P", palette=Image.Palette.ADAPTIVE, colors=7)
    palette.save(d / "2_palette.png")
    deep = RNG.integers(0, 65536, (6, 5), dtype=np.uint16)
    save(d / "3_gray16.png", deep)
    colour = np.zeros((6, 5, 3), dtype=np.uint8)
    colour[..., 0], colour[..., 1], colour[..., 2] = 200, 100, 30
    save(d / "4_photo.jpg", colour, quality=95)
    assert Image.open(d / "3_gray16.png").mode in ("I;16", "I")
    make_classes(tmp_path, {"test": {"c": 1}}, size=6)
    data, skipped = load_class_folders(tmp_path, "train")
    assert skipped == [] and data.images.shape == (5, 3, 6, 5)
    img = [as_hwc(x).astype(np.int64) for x in data.images]
    np.testing.assert_array_equal(img[0], np.repeat(gray[:, :, None], 3, 2))
    alpha = rgba[..., 3:].astype(np.float64) / 255
    expected = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha))
    np.testing.assert_allclose(img[1], expected, atol=1)        # composited over white
    np.testing.assert_array_equal(img[1][0, 0], [255, 255, 255])
    np.testing.assert_array_equal(img[1][0, 1], rgba[0, 1, :3])
    np.testing.assert_array_equal(img[2], np.asarray(palette.convert("RGB")))
    np.testing.assert_array_equal(img[3], np.repeat(np.rint(deep / 257.0)[:, :, None], 3, 2))
    assert np.abs(img[4] - colour.astype(np.int64)).max() <= 4     # JPEG is lossy


def test_corrupt_file_skipped_or_strict(tmp_path):
    make_classes(tmp_path, {"train": {"a": 2, "b": 1}, "test": {"a": 1}})
    bad = tmp_path / "train" / "a" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    truncated = tmp_path / "train" / "b" / "cut.png"
    save(truncated, rgb(16, 16, 7))
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.warns(UserWarning) as record:
        data, skipped = load_class_folders(tmp_path, "train", size=8)
    messages = " ".join(str(w.message) for w in record)
    assert str(bad) in messages and str(truncated) in messages
    assert [p for p, _ in skipped] == [str(bad), str(truncated)]
    assert len(data) == 3 and data.labels.tolist() == [0, 0, 1]
    with pytest.raises(BadImageError, match=re.escape(str(bad))):
        load_class_folders(tmp_path, "train", size=8, strict=True)


def test_sizes_must_agree_or_resize(tmp_path):
    make_classes(tmp_path, {"train": {"a": 2}, "test": {"a": 1}})
    odd = save(tmp_path / "train" / "b" / "big.png", rgb(12, 10, 5))
    with pytest.raises(ValueError, match=re.escape(str(odd)) + r".*12x10.*8x8.*--image-size"):
        load_class_folders(tmp_path, "train")
    data, _ = load_class_folders(tmp_path, "train", size=6)
    assert data.images.shape == (3, 3, 6, 6)
    # same size: untouched
    same, _ = load_class_folders(tmp_path, "test", size=8)
    direct, _ = load_class_folders(tmp_path, "test")
    assert torch.equal(same.images, direct.images)


def test_class_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_class_folders(missing, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty / "train")) + ".*missing"):
        class_folder_splits(empty)
    (empty / "train").mkdir()
    (empty / "test").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty / "train")) + ".*no class folder"):
        class_folder_splits(empty)
    root = tmp_path / "r"
    make_classes(root, {"train": {"a": 1, "b": 1}, "test": {"a": 1}})
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(root / "train" / "c")) + ".*no image"):
        load_class_folders(root, "train")
    (root / "train" / "c" / "readme.txt").unlink()
    (root / "train" / "c").rmdir()
    make_classes(root, {"test": {"zebra": 1, "yak": 1}})
    with pytest.raises(ValueError, match=r"\['yak', 'zebra'\].*not among the training classes"):
        load_class_folders(root, "test")
    with pytest.raises(ValueError, match="yak"):
        scan_class_folder(root / "test", ["a", "b"])
    with pytest.raises(ValueError, match="size=0"):
        load_class_folders(root, "train", size=0)
    with pytest.raises(ValueError, match="workers=-1"):
        load_class_folders(root, "train", workers=-1)


def test_all_unreadable(tmp_path):
    make_classes(tmp_path, {"test": {"a": 1}})
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable image"):
        load_class_folders(tmp_path, "train")


def test_class_folder_dataset(tmp_path):
    written = make_classes(tmp_path, {"train": {"a": 2, "b": 1}})
    paths, labels, classes = scan_class_folder(tmp_path / "train")
    bad = tmp_path / "train" / "a" / "1.png"
    bad.write_bytes(b"broken")
    ds = ClassFolderDataset(paths, labels)
    image, label = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8) and label == 0
    np.testing.assert_array_equal(as_hwc(image), written[paths[0]])
    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        image, label = ds[1]            # the next readable image instead, with its label
    np.testing.assert_array_equal(as_hwc(image), written[paths[2]])
    assert label == 1
    with pytest.raises(BadImageError, match=re.escape(str(bad))):
        ClassFolderDataset(paths, labels, strict=True)[1]
    out, _ = ClassFolderDataset(paths, labels, transform=lambda x: x.float() / 255, size=4)[2]
    assert out.shape == (3, 4, 4) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="2 labels for 3 paths"):
        ClassFolderDataset(paths, labels[:2])


def test_imageset_subset_and_checks():
    s = ImageSet(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.arange(4), ["a"] * 4,
                 binary=torch.tensor([0, 1, 0, 1]), masks=torch.zeros(4, 2, 2, dtype=torch.int64),
                 paths=["p0", "p1", "p2", "p3"])
    t = s.subset(torch.tensor([3, 1]))
    assert t.labels.tolist() == [3, 1] and t.binary.tolist() == [1, 1] and t.paths == ["p3", "p1"]
    assert len(s.subset(torch.tensor([True, False, True, False]))) == 2
    with pytest.raises(ValueError, match="index values"):
        s.subset(torch.tensor([4]))
    with pytest.raises(ValueError, match="images"):
        ImageSet(torch.zeros(4, 3, 2, 2), torch.arange(4), [])
    with pytest.raises(ValueError, match="labels"):
        ImageSet(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.arange(3), [])


# ----------------------------------------------------------------------------- segmentation


def make_seg(root, split, n=3, size=(6, 7), values=(0, 1, 2)):
    images, masks = {}, {}
    for i in range(n):
        img = rgb(*size, seed=100 + i)
        mask = np.random.default_rng(i).choice(values, size=size).astype(np.uint8)
        save(root / split / "images" / f"im{i}.png", img)
        save(root / split / "masks" / f"im{i}.png", mask)
        images[f"im{i}"], masks[f"im{i}"] = img, mask
    return images, masks


def test_segmentation_roundtrip_palette_and_resize(tmp_path):
    images, masks = make_seg(tmp_path, "train", values=(0, 1, 2, 255))
    # a palette mask: its indices are the class ids
    pal = Image.fromarray(masks["im1"]).convert("P")
    pal.putpalette([v for c in range(256) for v in (c, 255 - c, 7)])
    pal.save(tmp_path / "train" / "masks" / "im1.png")
    assert Image.open(tmp_path / "train" / "masks" / "im1.png").mode == "P"
    data, skipped = load_segmentation_folders(tmp_path, "train")
    assert skipped == [] and data.seg_classes == ["0", "1", "2"] and data.classes == []
    assert data.masks.dtype == torch.int64 and data.images.shape == (3, 3, 6, 7)
    assert torch.equal(data.labels, torch.zeros(3, dtype=torch.int64)) and data.ignore_index == 255
    for i in range(3):
        np.testing.assert_array_equal(data.masks[i].numpy(), masks[f"im{i}"])
        np.testing.assert_array_equal(as_hwc(data.images[i]), images[f"im{i}"])
    assert load_segmentation_folders(tmp_path, "train", num_classes=5)[0].seg_classes == [str(c) for c in range(5)]
    small, _ = load_segmentation_folders(tmp_path, "train", size=4, workers=2)
    assert small.images.shape == (3, 3, 4, 4) and small.masks.shape == (3, 4, 4)
    for i in range(3):   # nearest neighbour: only values present before
        assert set(small.masks[i].unique().tolist()) <= set(np.unique(masks[f"im{i}"]).tolist())


def test_segmentation_errors(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "none"))):
        load_segmentation_folders(tmp_path / "none", "train")
    (tmp_path / "train" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "train" / "masks")) + ".*missing"):
        load_segmentation_folders(tmp_path, "train")
    (tmp_path / "train" / "masks").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "train" / "images")) + ".*no image"):
        load_segmentation_folders(tmp_path, "train")
    make_seg(tmp_path, "train")
    lonely = save(tmp_path / "train" / "images" / "lonely.jpg", rgb(6, 7, 1))
    with pytest.raises(ValueError, match="no mask for '" + re.escape(str(lonely))):
        load_segmentation_folders(tmp_path, "train")
    lonely.unlink()
    # mask size differs from its image: both sizes named
    wrong = save(tmp_path / "train" / "masks" / "im2.png", np.zeros((5, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(wrong)) + r".*5x7.*6x7"):
        load_segmentation_folders(tmp_path, "train")
    # a value outside the classes and not the ignore index
    bad = save(tmp_path / "train" / "masks" / "im2.png", np.full((6, 7), 7, dtype=np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(bad)) + r".*value 7.*num_classes=3"):
        load_segmentation_folders(tmp_path, "train", num_classes=3)
    assert load_segmentation_folders(tmp_path, "train")[0].seg_classes == [str(c) for c in range(8)]
    ok = np.full((6, 7), 255, dtype=np.uint8)
    ok[0, 0] = 1
    save(tmp_path / "train" / "masks" / "im2.png", ok)
    data, _ = load_segmentation_folders(tmp_path, "train", num_classes=3)
    assert int(data.masks[2, 1, 1]) == 255
    with pytest.raises(ValueError, match=r"value 2.*ignore_index=0"):
        load_segmentation_folders(tmp_path, "train", num_classes=2, ignore_index=0)
    # an RGB mask is refused
    rgb_mask = save(tmp_path / "train" / "masks" / "im2.png", np.zeros((6, 7, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(rgb_mask)) + ".*mode 'RGB'"):
        load_segmentation_folders(tmp_path, "train")


def test_segmentation_corrupt_and_sizes(tmp_path):
    make_seg(tmp_path, "test", n=3)
    broken = tmp_path / "test" / "masks" / "im0.png"
    broken.write_bytes(b"nope")
    with pytest.warns(UserWarning, match=re.escape(str(broken))):
        data, skipped = load_segmentation_folders(tmp_path, "test")
    assert len(data) == 2 and skipped[0][0] == str(broken) and data.paths[0].endswith("im1.png")
    with pytest.raises(BadImageError, match=re.escape(str(broken))):
        load_segmentation_folders(tmp_path, "test", strict=True)
    other = save(tmp_path / "test" / "images" / "im1.png", rgb(9, 9, 3))
    save(tmp_path / "test" / "masks" / "im1.png", np.zeros((9, 9), dtype=np.uint8))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=re.escape(str(other)) + ".*--image-size"):
        load_segmentation_folders(tmp_path, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data, _ = load_segmentation_folders(tmp_path, "test", size=8)
    assert data.images.shape == (2, 3, 8, 8) and data.masks.shape == (2, 8, 8)
