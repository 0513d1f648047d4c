"""recipes.common.retrieval: Recall@K against a hand-computed case (ties, several captions per
image), against a brute-force sort on random data, chance levels; zero-shot prompt ensembling
and accuracy on a toy problem; validation."""
from __future__ import annotations

import math

import pytest
import torch

from recipes.common.retrieval import (prompt_embeddings, retrieval_chance, retrieval_recall,
                                      zero_shot_predict, zero_shot_top1)


def _hand_case():
    """3 images, 5 captions (image 0: captions 0, 1; image 1: caption 2; image 2: captions 3, 4).
    Scores (x 1/16) image x caption:
        image 0: 1 5 9 5 8
        image 1: 3 3 3 3 3
        image 2: 8 1 0 8 8
    Each image row is padded with integer coordinates (its own dimensions) to norm 16 exactly,
    and the captions are one-hot, so the cosines are these exact binary fractions and the ties
    are exact."""
    scores = [[1, 5, 9, 5, 8], [3, 3, 3, 3, 3], [8, 1, 0, 8, 8]]
    pads = [[7, 3, 1, 1], [13, 5, 4, 1], [7, 3, 2, 1]]        # sum of squares = 256 - |scores|^2
    img = torch.zeros(3, 5 + 12)
    for i, (s, p) in enumerate(zip(scores, pads)):
        img[i, :5] = torch.tensor(s, dtype=torch.float32)
        img[i, 5 + 4 * i:9 + 4 * i] = torch.tensor(p, dtype=torch.float32)
        assert img[i].square().sum() == 256
    txt = torch.zeros(5, 17)
    txt[torch.arange(5), torch.arange(5)] = 1.0
    caption_image = torch.tensor([0, 0, 1, 2, 2])
    return img, txt, caption_image


def test_hand_computed_recall_with_ties_and_several_captions():
    img, txt, caption_image = _hand_case()
    # i2t, per image (g wrong captions above the best right one, e tied wrong, p tied right):
    #   image 0: best right 5 (caption 1); wrong 9, 8 above, 5 tied -> g=2, e=1, p=1
    #            R@1 0, R@2 0, R@3 1 - 1/2 = 0.5
    #   image 1: all five tied -> g=0, e=4, p=1: R@1 1/5, R@2 1 - 4/5*3/4 = 0.4, R@3 0.6
    #   image 2: best right 8 (captions 3 and 4), wrong 8 tied -> g=0, e=1, p=2:
    #            R@1 1 - 1/3, R@2 1, R@3 1
    # t2i, per caption (column; its image's score against the others):
    #   c0 (image 0): 1 vs 3, 8 -> R@1 0, R@2 0, R@3 1
    #   c1 (image 0): 5 vs 3, 1 -> 1, 1, 1
    #   c2 (image 1): 3 vs 9, 0 -> 0, 1, 1
    #   c3 (image 2): 8 vs 5, 3 -> 1, 1, 1
    #   c4 (image 2): 8 vs 8 (tied), 3 -> 0.5, 1, 1
    want = {
        "i2t_r1": (0 + 0.2 + 2 / 3) / 3, "i2t_r2": (0 + 0.4 + 1) / 3, "i2t_r3": (0.5 + 0.6 + 1) / 3,
        "t2i_r1": (0 + 1 + 0 + 1 + 0.5) / 5, "t2i_r2": 4 / 5, "t2i_r3": 1.0,
    }
    for tile in (1 << 22, 1, 7):        # one tile, one query per tile, uneven tiles
        got = retrieval_recall(img, txt, caption_image, ks=(1, 2, 3), tile_elements=tile)
        assert list(got) == list(want)
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-12), (k, tile)


def _brute_force(img, txt, caption_image, ks):
    """Sort-based reference without ties (random data): rank = position after a full sort."""
    s = torch.nn.functional.normalize(img.double(), dim=1) @ \
        torch.nn.functional.normalize(txt.double(), dim=1).T
    out = {}
    order = s.argsort(dim=1, descending=True)
    for k in ks:
        hits = [any(caption_image[c] == i for c in order[i, :k].tolist()) for i in range(len(img))]
        out[f"i2t_r{k}"] = sum(hits) / len(img)
    order_t = s.T.argsort(dim=1, descending=True)
    for k in ks:
        hits = [int(caption_image[c]) in order_t[c, :k].tolist() for c in range(len(txt))]
        out[f"t2i_r{k}"] = sum(hits) / len(txt)
    return out


def test_random_data_matches_a_full_sort():
    gen = torch.Generator().manual_seed(0)
    n_img = 37
    caption_image = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (50,), generator=gen)])
    img = torch.randn(n_img, 8, generator=gen)
    txt = img[caption_image] + 1.5 * torch.randn(len(caption_image), 8, generator=gen)
    ks = (1, 5, 10)
    want = _brute_force(img, txt, caption_image, ks)
    got = retrieval_recall(img, txt, caption_image, ks, tile_elements=100)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert 0 < got["i2t_r1"] < got["i2t_r5"] < got["i2t_r10"] < 1    # not a degenerate case


def test_collapsed_encoder_scores_chance():
    n_img = 6
    caption_image = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])
    img = torch.ones(n_img, 4)
    txt = torch.ones(len(caption_image), 4)
    got = retrieval_recall(img, txt, caption_image, ks=(1, 3))
    chance = retrieval_chance(caption_image, n_img, ks=(1, 3))
    for k in got:
        assert got[k] == pytest.approx(chance[k], abs=1e-12), k
    # image 2 has 3 of the 10 captions: 1 - C(7,3)/C(10,3) = 1 - 35/120
    per_image_r3 = [1 - (8 * 7 * 6) / (10 * 9 * 8), 1 - (9 * 8 * 7) / (10 * 9 * 8),
                    1 - 35 / 120, 1 - (9 * 8 * 7) / (10 * 9 * 8), 1 - (9 * 8 * 7) / (10 * 9 * 8),
                    1 - (8 * 7 * 6) / (10 * 9 * 8)]
    assert chance["i2t_r3"] == pytest.approx(sum(per_image_r3) / 6, abs=1e-12)
    assert chance["t2i_r1"] == pytest.approx(1 / 6) and chance["t2i_r3"] == pytest.approx(0.5)


def test_perfect_retrieval_and_nan():
    img = torch.eye(4)
    caption_image = torch.tensor([0, 1, 2, 3, 0, 2])
    txt = img[caption_image]
    got = retrieval_recall(img, txt, caption_image)
    assert all(v == 1.0 for v in got.values()) and list(got)[0] == "i2t_r1"
    bad = img.clone()
    bad[1, 0] = float("nan")
    assert all(math.isnan(v) for v in retrieval_recall(bad, txt, caption_image).values())


@pytest.mark.parametrize("kwargs, named", [
    ({"caption_image": torch.tensor([0, 0, 1])}, "images [2] have no caption"),
    ({"caption_image": torch.tensor([0, 1, 5])}, "expected image indices in [0, 3)"),
    ({"caption_image": torch.tensor([0, 1])}, "caption_image"),
    ({"ks": (0, 5)}, "ks=(0, 5)"),
    ({"text_emb": torch.randn(3, 5)}, "same embedding dimension"),
    ({"image_emb": torch.randn(0, 4)}, "image_emb: expected at least one row"),
])
def test_retrieval_validation(kwargs, named):
    args = {"image_emb": torch.randn(3, 4), "text_emb": torch.randn(3, 4),
            "caption_image": torch.tensor([0, 1, 2])}
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        retrieval_recall(**args)
    assert named in str(err.value)


# ---- zero-shot


def _toy_encoder():
    """Text embeddings: the class word's axis, plus a template-specific offset: template A
    leans towards the next class's axis, template B towards the previous one, so each template
    alone is biased and their average is not."""
    classes = ["red", "green", "blue"]
    axes = {c: torch.eye(4)[i] for i, c in enumerate(classes)}

    def encode(texts):
        rows = []
        for t in texts:
            word = next(c for c in classes if c in t)
            i = classes.index(word)
            v = axes[word].clone()
            if t.startswith("a photo"):
                v[(i + 1) % 3] += 0.9
            else:
                v[(i - 1) % 3] += 0.9
            rows.append(v)
        return torch.stack(rows)

    return classes, encode


def test_prompt_embeddings_average_normalised_prompts():
    classes, encode = _toy_encoder()
    templates = ["a photo of a {}.", "{} thing"]
    w = prompt_embeddings(encode, classes, templates)
    a = torch.nn.functional.normalize(encode(["a photo of a green."]), dim=1)[0]
    b = torch.nn.functional.normalize(encode(["green thing"]), dim=1)[0]
    want = (a + b) / (a + b).norm()
    torch.testing.assert_close(w[1], want)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(3))


def test_zero_shot_toy_problem_and_template_ensembling():
    classes, encode = _toy_encoder()
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat(20)
    # images: the class axis, tilted towards the *previous* class (what template A misses)
    img = torch.eye(4)[labels] + 0.6 * torch.eye(4)[(labels - 1) % 3] \
        + 0.05 * torch.randn(60, 4, generator=gen)
    single = prompt_embeddings(encode, classes, ["a photo of a {}."])
    both = prompt_embeddings(encode, classes, ["a photo of a {}.", "{} thing"])
    assert zero_shot_top1(img, labels, both) == 1.0
    # template A alone: its class c direction (axis c + 0.9 axis c+1) is closer to images of
    # class c+1 (axis c+1 + 0.6 axis c) than to images of class c -> every image wrong
    assert zero_shot_top1(img, labels, single) == 0.0
    pred = zero_shot_predict(img, both)
    assert pred.dtype == torch.int64 and torch.equal(pred, labels)
    mask = labels == 2
    assert zero_shot_top1(img, labels, both, mask=mask) == 1.0
    assert math.isnan(zero_shot_top1(img, labels, both, mask=torch.zeros(60, dtype=torch.bool)))
    bad = img.clone()
    bad[0, 0] = float("inf")
    assert math.isnan(zero_shot_top1(bad, labels, both))


@pytest.mark.parametrize("templates, named", [
    ([], "expected at least one prompt template"),
    (["a photo of a"], "exactly one '{}'"),
    (["{} and {}"], "exactly one '{}'"),
])
def test_zero_shot_validation(templates, named):
    classes, encode = _toy_encoder()
    with pytest.raises(ValueError) as err:
        prompt_embeddings(encode, classes, templates)
    assert named in str(err.value)
    with pytest.raises(ValueError, match="labels"):
        zero_shot_top1(torch.randn(4, 4), torch.zeros(3, dtype=torch.long), torch.randn(3, 4))
