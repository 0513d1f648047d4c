"""modalities.multimodal.data: image-caption pairs read through `datasets` from temporary
folders (imagefolder with metadata.jsonl / metadata.csv, save_to_disk, CSV / JSON-lines
manifests), the decoding and resizing, and every bad-input message."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from modalities.multimodal.data import CaptionPairs, decode_resize, load_pairs

# solid colours, one per image, so a decoded image tells which file it came from
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _png(path, colour, size=(12, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, dtype=np.uint8)).save(path)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _colour_of(image):
    """(3, S, S) uint8 solid image -> its colour tuple."""
    assert (image == image[:, :1, :1]).all()
    return tuple(int(v) for v in image[:, 0, 0])


def _imagefolder(root, splits=("train", "test"), list_captions=True):
    for s, split in enumerate(splits):
        rows = []
        for i in range(3):
            _png(root / split / f"{i}.png", COLOURS[(s + i) % len(COLOURS)])
            caps = [f"{split} image {i} caption {k}" for k in range(i + 1)]
            if list_captions:
                rows.append({"file_name": f"{i}.png", "text": caps})
            else:
                rows.extend({"file_name": f"{i}.png", "text": c} for c in caps)
        _jsonl(root / split / "metadata.jsonl", rows)
    return root


def _check_grouped(pairs, split, offset=0):
    assert pairs.n_images == 3 and pairs.n_captions == 6
    assert pairs.images.dtype == torch.uint8 and tuple(pairs.images.shape) == (3, 3, 8, 8)
    for i in range(3):
        caps = [pairs.captions[c] for c in pairs.captions_of(i)]
        assert caps == [f"{split} image {i} caption {k}" for k in range(i + 1)]
        assert _colour_of(pairs.images[i]) == COLOURS[(offset + i) % len(COLOURS)]
        assert pairs.image_files[i].endswith(f"{split}/{i}.png")
    assert pairs.caption_image.tolist() == [0, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("list_captions", [True, False], ids=["list", "rows"])
def test_imagefolder_groups_captions_by_image(tmp_path, list_captions):
    root = _imagefolder(tmp_path / "d", list_captions=list_captions)
    out = load_pairs(root, image_size=8, cache_dir=tmp_path / "cache")
    assert list(out) == ["train", "test"]
    _check_grouped(out["train"], "train", 0)
    _check_grouped(out["test"], "test", 1)
    assert any((tmp_path / "cache").iterdir())  # datasets wrote its Arrow files where asked


def test_metadata_csv_split_column_and_aliases(tmp_path):
    root = tmp_path / "d"
    for i in range(4):
        _png(root / f"{i}.png", COLOURS[i])
    (root / "metadata.csv").write_text(
        'file_name,caption,split\n0.png,zero,train\n1.png,"one, a",val\n1.png,one b,val\n'
        '2.png,42,train\n3.png,three,test\n')
    out = load_pairs(root, image_size=4)
    assert list(out) == ["train", "validation", "test"]
    assert out["train"].captions == ["zero", "42"]  # a numeric caption is text
    assert out["validation"].captions == ["one, a", "one b"] and out["validation"].n_images == 1
    assert _colour_of(out["test"].images[0]) == COLOURS[3]
    # a split folder named val/ is "validation" too
    root2 = _imagefolder(tmp_path / "e", splits=("train", "val"))
    assert list(load_pairs(root2, image_size=8)) == ["train", "validation"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one split folder read alone: the others are not "uncaptioned"
        only_val = load_pairs(root2, image_size=8, split="validation")
    assert list(only_val) == ["validation"] and only_val["validation"].image_files[0].endswith("val/0.png")
    # one split asked for, by an alias
    only = load_pairs(root, image_size=4, split="dev")
    assert list(only) == ["validation"]


def test_save_to_disk_dataset_dict_and_plain_dataset(tmp_path):
    import datasets

    files = []
    for i in range(3):
        _png(tmp_path / "img" / f"{i}.png", COLOURS[i])
        files.append(str(tmp_path / "img" / f"{i}.png"))
    features = datasets.Features({"image": datasets.Image(),
                                  "captions": datasets.List(datasets.Value("string"))})
    train = datasets.Dataset.from_dict(
        {"image": files, "captions": [["a", "b"], ["c"], ["d", "e"]]}, features=features)
    test = datasets.Dataset.from_dict({"image": files[:1], "captions": [["x"]]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "saved"))
    out = load_pairs(tmp_path / "saved", image_size=6)
    assert list(out) == ["train", "test"]
    assert out["train"].captions == ["a", "b", "c", "d", "e"]
    assert out["train"].caption_image.tolist() == [0, 0, 1, 2, 2]
    assert [_colour_of(im) for im in out["train"].images] == COLOURS[:3]
    # a plain Dataset whose images are embedded bytes, several rows per image
    blobs = [{"bytes": open(files[i], "rb").read(), "path": None} for i in (0, 1, 0)]
    rows = datasets.Dataset.from_dict(
        {"image": blobs, "text": ["p", "q", "r"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    rows.save_to_disk(str(tmp_path / "plain"))
    plain = load_pairs(tmp_path / "plain", image_size=6)["train"]
    assert plain.n_images == 2 and plain.captions == ["p", "r", "q"]
    assert [_colour_of(im) for im in plain.images] == COLOURS[:2]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_relative_paths(tmp_path, kind):
    for i in range(3):
        _png(tmp_path / "pics" / f"{i}.png", COLOURS[i])
    rows = [("pics/0.png", "red", "train"), ("pics/1.png", "green", "train"), ("pics/0.png", "red again", "train"),
            ("pics/2.png", "blue", "test")]
    path = tmp_path / f"manifest.{kind}"
    if kind == "csv":
        path.write_text("image,text,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    else:
        _jsonl(path, [{"image": a, "text": b, "split": c} for a, b, c in rows])
    out = load_pairs(path, image_size=5, workers=2)
    assert out["train"].captions == ["red", "red again", "green"]
    assert [_colour_of(im) for im in out["train"].images] == COLOURS[:2]
    assert out["test"].captions == ["blue"]


def test_decode_resize_shorter_side_and_centre_crop(tmp_path):
    # 30 x 10: the centre 10 x 10 square is green, the sides red
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[:, :] = (255, 0, 0)
    arr[:, 10:20] = (0, 255, 0)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = decode_resize(tmp_path / "wide.png", 5)
    assert out.shape == (5, 5, 3)
    assert (out[:, 1:4] == (0, 255, 0)).all()  # interior of the crop: only the centre square
    # an image already of the size is returned untouched; RGBA is composited over white
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    assert (decode_resize(tmp_path / "clear.png", 4) == 255).all()
    # JPEG through PIL's draft mode: still (S, S, 3) and close to the colour
    big = np.full((256, 192, 3), (10, 200, 30), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    small = decode_resize(tmp_path / "big.jpg", 16)
    assert small.shape == (16, 16, 3)
    assert np.abs(small.astype(int) - (10, 200, 30)).max() <= 6


def test_workers_give_the_same_pairs(tmp_path):
    root = _imagefolder(tmp_path / "d", list_captions=False)
    a = load_pairs(root, image_size=8)["train"]
    b = load_pairs(root, image_size=8, workers=2)["train"]
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert torch.equal(a.caption_image, b.caption_image)


def test_subset_and_container_checks():
    pairs = CaptionPairs(images=torch.zeros(3, 3, 2, 2, dtype=torch.uint8), captions=["a", "b", "c", "d"],
                         caption_image=torch.tensor([2, 0, 2, 1]), image_files=["x", "y", "z"],
                         attributes={"k": [10, 11, 12]})
    assert pairs.captions_of(2) == [0, 2] and pairs.captions_of(0) == [1]
    sub = pairs.subset([2, 1])
    assert sub.captions == ["a", "c", "d"] and sub.caption_image.tolist() == [0, 0, 1]
    assert sub.image_files == ["z", "y"] and sub.attributes == {"k": [12, 11]}
    with pytest.raises(ValueError, match="image 1 .'y'. has no caption"):
        CaptionPairs(images=torch.zeros(2, 3, 2, 2, dtype=torch.uint8), captions=["a"],
                     caption_image=torch.tensor([0]), image_files=["x", "y"])
    with pytest.raises(ValueError, match="captions_of: i=3"):
        pairs.captions_of(3)


# ----------------------------------------------------------------------------- bad input


def test_undecodable_image_is_named_and_skip_bad_warns(tmp_path):
    root = _imagefolder(tmp_path / "d")
    (root / "train" / "1.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"1 of 3 images .* do not decode: '.*train/1\.png'") as err:
        load_pairs(root, image_size=8)
    assert "skip_bad" in str(err.value)
    with pytest.warns(UserWarning, match=r"skipping 1 of 3 images .*train/1\.png"):
        out = load_pairs(root, image_size=8, skip_bad=True)
    train = out["train"]
    assert train.n_images == 2 and train.captions == ["train image 0 caption 0"] + [
        f"train image 2 caption {k}" for k in range(3)]  # image 1's captions went with it
    assert train.caption_image.tolist() == [0, 1, 1, 1]
    assert [_colour_of(im) for im in train.images] == [COLOURS[0], COLOURS[2]]


def test_row_for_a_missing_file_is_named(tmp_path):
    root = _imagefolder(tmp_path / "d", splits=("train",))
    with open(root / "train" / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "ghost.png", "text": ["boo"]}) + "\n")
    with pytest.raises(ValueError, match=r"ghost\.png"):
        load_pairs(root, image_size=8)


def test_row_without_caption_names_row_and_file(tmp_path):
    root = tmp_path / "d"
    for i in range(3):
        _png(root / "train" / f"{i}.png", COLOURS[i])
    _jsonl(root / "train" / "metadata.jsonl", [{"file_name": "0.png", "text": "a"}, {"file_name": "1.png", "text": "b"},
                                               {"file_name": "2.png"}])
    with pytest.raises(ValueError, match=r"row 2 of split 'train'.*'.*train/2\.png'.* has no caption"):
        load_pairs(root, image_size=8)


def test_empty_caption_text(tmp_path):
    root = tmp_path / "d"
    for i in range(2):
        _png(root / "train" / f"{i}.png", COLOURS[i])
    _jsonl(root / "train" / "metadata.jsonl", [{"file_name": "0.png", "text": ["a", "  "]},
                                               {"file_name": "1.png", "text": ["b"]}])
    with pytest.raises(ValueError, match=r"caption 1 of row 0 .*0\.png.* empty caption"):
        load_pairs(root, image_size=8)
    _jsonl(root / "train" / "metadata.jsonl", [{"file_name": "0.png", "text": []},
                                               {"file_name": "1.png", "text": ["b"]}])
    with pytest.raises(ValueError, match=r"row 0 .*0\.png.* empty list of captions"):
        load_pairs(root, image_size=8)


def test_empty_split(tmp_path):
    # a manifest with a header and no rows: its (train) split is empty
    (tmp_path / "m.csv").write_text("file_name,text\n")
    with pytest.raises(ValueError, match=r"the manifest '.*m\.csv' is empty"):
        load_pairs(tmp_path / "m.csv", image_size=4)
    # a split none of whose images decodes is empty even with skip_bad
    root = _imagefolder(tmp_path / "d")
    for i in range(3):
        (root / "test" / f"{i}.png").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="skipping 3 of 3"), \
            pytest.raises(ValueError, match=r"split 'test' .* is empty: none of its 3 images decodes"):
        load_pairs(root, image_size=8, skip_bad=True)


def test_missing_caption_column_names_the_columns_found(tmp_path):
    root = tmp_path / "d"
    _png(root / "train" / "0.png", COLOURS[0])
    _jsonl(root / "train" / "metadata.jsonl", [{"file_name": "0.png", "description": "a"}])
    with pytest.raises(ValueError, match=r"no caption column .* found the columns \['image', 'description'\]"):
        load_pairs(root, image_size=8)
    manifest = tmp_path / "m.csv"
    manifest.write_text("picture,text\nx.png,a\n")
    with pytest.raises(ValueError, match=r"no image path column .* found the columns \['picture', 'text'\]"):
        load_pairs(manifest, image_size=8)


def test_missing_source_and_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match=r"source '.*nowhere\.csv' does not exist"):
        load_pairs(tmp_path / "nowhere.csv", image_size=8)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown kind"):
        load_pairs(tmp_path / "notes.txt", image_size=8)


def test_split_that_does_not_exist_names_the_available_ones(tmp_path):
    root = _imagefolder(tmp_path / "d")
    with pytest.raises(ValueError, match=r"split='validation'; .* has the splits \['train', 'test'\]"):
        load_pairs(root, image_size=8, split="validation")
    with pytest.raises(ValueError, match=r"split='holdout'; expected None or one of"):
        load_pairs(root, image_size=8, split="holdout")


def test_no_train_split_and_unknown_split_value(tmp_path):
    root = _imagefolder(tmp_path / "d", splits=("test",))
    with pytest.raises(ValueError, match=r"no train split \(found \['test'\]\)"):
        load_pairs(root, image_size=8)
    manifest = tmp_path / "m.jsonl"
    _png(tmp_path / "0.png", COLOURS[0])
    _jsonl(manifest, [{"file_name": "0.png", "text": "a", "split": "restval"}])
    with pytest.raises(ValueError, match=r"split 'restval' .* row 0 .* not a known split name"):
        load_pairs(manifest, image_size=8)


def test_image_without_metadata_row_is_not_silently_dropped(tmp_path):
    root = _imagefolder(tmp_path / "d", splits=("train",))
    _png(root / "train" / "extra.png", COLOURS[4])
    with pytest.warns(UserWarning, match=r"1 image files .* no row .*extra\.png"):
        out = load_pairs(root, image_size=8)
    assert out["train"].n_images == 3


def test_mixed_caption_types_are_a_clear_error(tmp_path):
    root = tmp_path / "d"
    for i in range(2):
        _png(root / "train" / f"{i}.png", COLOURS[i])
    _jsonl(root / "train" / "metadata.jsonl",
           [{"file_name": "0.png", "text": ["a"]}, {"file_name": "1.png", "text": "b"}])
    with pytest.raises(ValueError, match=r"`datasets` could not read the imagefolder"):
        load_pairs(root, image_size=8)


def test_argument_checks(tmp_path):
    root = _imagefolder(tmp_path / "d")
    with pytest.raises(ValueError, match="image_size=0"):
        load_pairs(root, image_size=0)
    with pytest.raises(ValueError, match="workers=-1"):
        load_pairs(root, image_size=8, workers=-1)
    with pytest.raises(TypeError, match="source=3"):
        load_pairs(3, image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean folder loads without any warning
        load_pairs(root, image_size=8)
