"""modalities.multimodal.scenes: the generated captioned scenes (determinism, held-out
combinations, captions that describe the drawn objects, the files and their readers)."""
import json
import re

import numpy as np
import pytest
import torch

from modalities.multimodal import scenes
from modalities.multimodal.data import load_pairs
from modalities.multimodal.scenes import (
    COLOURS, HELDOUT, POSITIONS, SCENES_VERSION, SHAPES, ensure_scenes, generate_scenes, load_zeroshot,
    render_scenes, scene_class_names,
)

SMALL = dict(n_train=40, n_validation=12, n_test=12, n_zeroshot_per_class=2, image_size=32, seed=3)


def test_image_i_depends_only_on_seed_split_and_i():
    a, ca, xa = render_scenes(30, split="train", seed=1)
    b, cb, xb = render_scenes(50, split="train", seed=1, chunk=7)
    assert torch.equal(a, b[:30]) and ca == cb[:30]
    assert all(np.array_equal(xa[k], xb[k][:30]) for k in xa)
    c, _, _ = render_scenes(30, split="train", seed=2)
    d, _, _ = render_scenes(30, split="test", seed=1)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_heldout_combinations_never_in_train():
    assert sorted(c for c, _ in HELDOUT) == sorted(COLOURS) and sorted(s for _, s in HELDOUT) == sorted(SHAPES)
    held = {COLOURS_INDEX[c] * len(SHAPES) + SHAPES.index(s) for c, s in HELDOUT}
    _, _, train = render_scenes(3000, split="train")
    drawn = set(train["combo"][:, 0].tolist()) | set(train["combo"][train["n_objects"] > 1, 1].tolist())
    assert not drawn & held and len(drawn) == 30  # the other 30 all appear
    assert not train["heldout"].any()
    # every colour and every shape is still seen in training
    assert {k // len(SHAPES) for k in drawn} == set(range(6)) and {k % len(SHAPES) for k in drawn} == set(range(6))
    _, _, test = render_scenes(1000, split="test")
    combos = test["combo"].copy()
    combos[test["n_objects"] == 1, 1] = -1
    has_held = np.isin(combos, list(held)).any(axis=1)
    assert np.array_equal(has_held, test["heldout"]) and 0.1 < has_held.mean() < 0.5
    kinds = np.bincount(test["kind"], minlength=3) / 1000  # one / two / pair: 40 / 20 / 40 %
    assert np.allclose(kinds, [0.4, 0.2, 0.4], atol=0.06)


COLOURS_INDEX = {c: i for i, c in enumerate(COLOURS)}
_SHAPE_WORDS = {s: {w for pair in scenes._SHAPE_WORDS[s] for w in pair} for s in SHAPES}
_POSITION_WORDS = {p: set(scenes._POSITION_WORDS[p]) for p in POSITIONS}


def test_captions_describe_the_drawn_objects():
    _, captions, attrs = render_scenes(400, split="validation")
    names = list(POSITIONS)
    for j, caps in enumerate(captions):
        assert 2 <= len(caps) <= 5 and len(set(caps)) == len(caps)
        objects = [(list(COLOURS)[k // 6], SHAPES[k % 6], int(attrs["size"][j, o]), names[attrs["position"][j, o]])
                   for o, k in enumerate(attrs["combo"][j][: attrs["n_objects"][j]])]
        for text in caps:
            assert text == text.strip() and "  " not in text and "{" not in text
            assert not re.search(r"\ba [aeiou]", text) and not re.search(r"\ban [^aeiou]", text)
            for colour, shape, size, position in objects:
                assert colour in text
                assert any(w in text for w in _SHAPE_WORDS[shape]), (text, shape)
            # no colour, shape word or position of an object that is not there
            for colour in COLOURS:
                assert (colour in text) == any(colour == o[0] for o in objects), (text, objects)
            for position, words in _POSITION_WORDS.items():
                if any(w in text for w in words):
                    assert any(position == o[3] for o in objects), (text, objects)
            if attrs["kind"][j] == 1:
                assert re.match(r"(two|2|a pair of|there are two|a photo of two) ", text), text
            for size_name, words in (("small", ("small", "little", "tiny")), ("large", ("large", "big"))):
                if any(re.search(rf"\b{w}\b", text) for w in words):
                    assert any(scenes._SIZE_NAMES[o[2]] == size_name for o in objects), (text, objects)


def test_pixels_at_an_object_centre_have_its_colour():
    classes = np.arange(36)
    images, _, attrs = render_scenes(36, split="zeroshot", zeroshot_class=classes, image_size=64)
    anchors = list(POSITIONS.values())
    for j in range(36):
        colour, shape = list(COLOURS)[j // 6], SHAPES[j % 6]
        if shape == "ring":  # the centre is the hole
            continue
        x, y = anchors[attrs["position"][j, 0]]
        # the 3 x 3 pixels around the anchor (position jitter 0.03 x 64 px < 2 px; the triangle's
        # and star's centres are inside them)
        patch = images[j, :, int(y * 64) - 1:int(y * 64) + 2, int(x * 64) - 1:int(x * 64) + 2].float() / 255
        median = patch.flatten(1).median(dim=1).values
        # brightness 0.82-1.08, channel jitter 0.05, shading 12 %, noise: within 0.3 of the base
        # colour, and nearer to it than to any other of the six
        distance = {name: float((median - torch.tensor(rgb)).abs().max()) for name, rgb in COLOURS.items()}
        assert distance[colour] < 0.3 and min(distance, key=distance.get) == colour, (colour, shape, median)


def test_generate_and_read_back(tmp_path):
    info = generate_scenes(tmp_path / "s", **SMALL)
    root = info.root
    assert sorted(p.name for p in root.iterdir()) == ["scenes.json", "test", "train", "validation", "zeroshot"]
    meta = json.loads((root / "scenes.json").read_text())
    assert meta["version"] == SCENES_VERSION and meta["params"] == SMALL
    assert meta["heldout_classes"] == [f"{c} {s}" for c, s in HELDOUT]
    pairs = load_pairs(root, image_size=32, cache_dir=tmp_path / "cache")
    assert list(pairs) == ["train", "validation", "test"]
    for split in ("train", "test"):
        images, captions, attrs = render_scenes(SMALL[f"n_{split}"], split=split, image_size=32, seed=3)
        got = pairs[split]
        assert torch.equal(got.images, images)  # PNG is lossless: the very pixels
        assert [[got.captions[c] for c in got.captions_of(i)] for i in range(got.n_images)] == captions
        assert got.attributes["heldout"] == attrs["heldout"].tolist()
        assert set(got.attributes) == {"scene", "objects", "heldout"}
    zs_images, labels, classes, heldout = load_zeroshot(root / "zeroshot", image_size=32)
    assert sorted(classes) == sorted(scene_class_names()) and len(labels) == 72
    assert torch.bincount(labels, minlength=36).tolist() == [2] * 36
    assert heldout is not None and heldout.tolist() == [classes[k] in meta["heldout_classes"] for k in labels]
    assert int(heldout.sum()) == 12
    # each zero-shot image is its class's render (index = class * per_class + k)
    ref, _, _ = render_scenes(72, split="zeroshot", image_size=32, seed=3,
                              zeroshot_class=np.repeat(np.arange(36), 2))
    for i, k in enumerate(labels.tolist()):
        c = scene_class_names().index(classes[k])
        assert torch.equal(zs_images[i], ref[2 * c]) or torch.equal(zs_images[i], ref[2 * c + 1])


def test_zeroshot_without_scenes_json_and_errors(tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "zs" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(tmp_path / "zs" / name / "0.png")
    images, labels, classes, heldout = load_zeroshot(tmp_path / "zs", image_size=8)
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 1] and heldout is None
    assert images.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="does not exist"):
        load_zeroshot(tmp_path / "missing", image_size=8)
    (tmp_path / "zs" / "dog" / "0.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"1 of 2 images .* do not decode: '.*dog/0\.png'"):
        load_zeroshot(tmp_path / "zs", image_size=8)
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(tmp_path / "flat" / "0.png")
    with pytest.raises(ValueError, match="no class folders"):
        load_zeroshot(tmp_path / "flat", image_size=8)


def test_ensure_scenes_caches_by_version_and_parameters(tmp_path):
    root = ensure_scenes(tmp_path, **SMALL)
    assert root.parent == tmp_path and SCENES_VERSION in root.name
    stamp = (root / "scenes.json").stat().st_mtime_ns
    assert ensure_scenes(tmp_path, **SMALL) == root
    assert (root / "scenes.json").stat().st_mtime_ns == stamp  # not regenerated
    other = ensure_scenes(tmp_path, **{**SMALL, "seed": 4})
    assert other != root
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([root.name, other.name])  # no temporaries left
    # a folder that lost its scenes.json (interrupted) is regenerated
    (root / "scenes.json").unlink()
    assert ensure_scenes(tmp_path, **SMALL) == root and (root / "scenes.json").is_file()


def test_version_follows_the_parameters(monkeypatch):
    assert scenes._version() == SCENES_VERSION
    monkeypatch.setitem(scenes._PARAMS, "position_jitter", 0.04)
    assert scenes._version() != SCENES_VERSION


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="n_train=0"):
        generate_scenes(tmp_path, **{**SMALL, "n_train": 0})
    with pytest.raises(ValueError, match="image_size=8"):
        render_scenes(2, image_size=8)
    with pytest.raises(ValueError, match="zeroshot_class of shape"):
        render_scenes(2, zeroshot_class=np.array([0, 36]))
    with pytest.raises(ValueError, match="seed=-1"):
        ensure_scenes(tmp_path, **{**SMALL, "seed": -1})
