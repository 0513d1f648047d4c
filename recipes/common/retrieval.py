"""Evaluation of a text/image dual encoder: cross-modal retrieval and zero-shot classification.

* :func:`retrieval_recall`: image-to-text and text-to-image Recall@K with every caption counted,
  the protocol of Flickr30k / COCO retrieval (Karpathy and Fei-Fei 2015, "Deep Visual-Semantic
  Alignments for Generating Image Descriptions"; the CLIP paper's Table 13): an image query is a
  hit at K when *any* of its captions is among the K captions most similar to it; a caption
  query is a hit when its image is among the K most similar images.
* :func:`prompt_embeddings`, :func:`zero_shot_predict`, :func:`zero_shot_top1`: CLIP's zero-shot
  classifier (Radford et al. 2021, §3.1.4): each class name is put in prompt templates ("a
  photo of a {}."), the normalised text embeddings of its prompts are averaged and normalised
  again (prompt ensembling), and an image is given the class of the most similar prompt
  embedding.

Ties are broken uniformly at random *in expectation*: a query whose right answer shares its
score with other candidates counts as the probability that a random order of the tied
candidates puts a right answer within the top K. A collapsed encoder (every score equal) so
scores chance, never 0 % or 100 %, and the result does not depend on the sort's tie order.

Similarities are computed in tiles of queries, so memory is O(tile x candidates), never the
full n_images x n_captions matrix. These are evaluation functions: they return Python numbers
(they synchronise with the device).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_TEMPLATES",
    "prompt_embeddings",
    "retrieval_recall",
    "retrieval_chance",
    "zero_shot_predict",
    "zero_shot_top1",
]

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
"""CLIP's basic prompt (Radford et al. 2021, §3.1.4)."""

# elements of one similarity tile (queries x candidates): 4M floats = 16 MB
_TILE_ELEMENTS = 1 << 22


def _check_embeddings(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor (n, D), got {type(x).__name__}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: shape {tuple(x.shape)}, dtype {x.dtype}: expected a float "
                         "(n, D) tensor")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one row, got 0")
    return x


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks={ks!r}: expected a non-empty sequence of positive integers")
    return ks


def _hit_probability(greater: torch.Tensor, tied: torch.Tensor, right_tied: torch.Tensor,
                     k: int) -> torch.Tensor:
    """P(a right answer is in the top k) when ``greater`` wrong candidates score strictly above
    the best right answer, ``tied`` wrong ones score the same, and ``right_tied`` (>= 1) right
    answers share that best score; the tied group is put in a uniformly random order.

    With m = k - greater free places: 0 if m <= 0; else 1 - P(the first m of the tied group are
    all wrong) = 1 - prod_{i<m} (tied - i) / (tied + right_tied - i)  (1 when m > tied).
    """
    g = greater.double()
    e = tied.double()
    p = right_tied.double()
    m = (k - g).clamp(min=0)
    miss = torch.ones_like(g)
    for i in range(k):                       # i-th tied place is wrong, given the ones before
        active = (i < m)
        factor = ((e - i).clamp(min=0) / (e + p - i).clamp(min=1))
        miss = torch.where(active, miss * factor, miss)
    return torch.where(m > 0, 1.0 - miss, torch.zeros_like(g))


@torch.no_grad()
def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor,
                     caption_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10), *,
                     tile_elements: int = _TILE_ELEMENTS) -> dict[str, float]:
    """Recall@K of image-to-text and text-to-image retrieval, every caption counted.

    Scores are cosine similarities s(i, c) = <image_i, caption_c> / (|image_i| |caption_c|).

        i2t_rK = mean over images i of  [any caption of i ranks in the top K captions for i]
        t2i_rK = mean over captions c of [image(c) ranks in the top K images for c]

    with ties broken uniformly at random in expectation (see the module docstring).

    Args:
        image_emb: (n_images, D) image embeddings (normalised here).
        text_emb: (n_captions, D) caption embeddings, same D.
        caption_image: int64 (n_captions,): the image index of each caption; every image must
            have at least one caption.
        ks: the K of Recall@K.
        tile_elements: most similarity scores held at once (queries per tile = this / candidates).

    Returns:
        ``{"i2t_r1": ..., "i2t_r5": ..., "t2i_r1": ...}`` fractions in [0, 1]; every value NaN
        when an embedding is not finite.

    Example:
        >>> r = retrieval_recall(model.encode_image(x), model.encode_text(ids, mask),
        ...                      pairs.caption_image)
        >>> r["i2t_r1"], r["t2i_r5"]
    """
    _check_embeddings("image_emb", image_emb)
    _check_embeddings("text_emb", text_emb)
    ks = _check_ks(ks)
    n_img, n_cap = image_emb.shape[0], text_emb.shape[0]
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"image_emb.shape={tuple(image_emb.shape)}, text_emb.shape="
                         f"{tuple(text_emb.shape)}: expected the same embedding dimension")
    if not isinstance(caption_image, torch.Tensor) or caption_image.dim() != 1 \
            or caption_image.dtype not in (torch.int64, torch.int32) \
            or caption_image.shape[0] != n_cap:
        raise ValueError(f"caption_image: {getattr(caption_image, 'shape', type(caption_image))}"
                         f": expected an integer tensor ({n_cap},), one image index per caption")
    caption_image = caption_image.to(device=text_emb.device, dtype=torch.int64)
    if n_cap and (int(caption_image.min()) < 0 or int(caption_image.max()) >= n_img):
        raise ValueError(f"caption_image: values in [{int(caption_image.min())}, "
                         f"{int(caption_image.max())}]: expected image indices in [0, {n_img})")
    counts = torch.bincount(caption_image, minlength=n_img)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(f"caption_image: images {missing} have no caption; expected at least "
                         "one caption per image")
    if not isinstance(tile_elements, int) or tile_elements < 1:
        raise ValueError(f"tile_elements={tile_elements!r}: expected a positive integer")
    names = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks]
    if not (bool(torch.isfinite(image_emb).all()) and bool(torch.isfinite(text_emb).all())):
        return {name: math.nan for name in names}

    img = F.normalize(image_emb.float(), dim=1)
    txt = F.normalize(text_emb.float().to(img.device), dim=1)
    caption_image = caption_image.to(img.device)
    i2t = {k: torch.zeros((), dtype=torch.float64, device=img.device) for k in ks}
    t2i = {k: torch.zeros((), dtype=torch.float64, device=img.device) for k in ks}

    # image queries against every caption
    rows = max(1, tile_elements // n_cap)
    for start in range(0, n_img, rows):
        idx = torch.arange(start, min(start + rows, n_img), device=img.device)
        s = img[idx] @ txt.T                                        # (t, n_cap)
        right = caption_image[None, :] == idx[:, None]
        best = s.masked_fill(~right, -math.inf).amax(1, keepdim=True)
        greater = ((s > best) & ~right).sum(1)
        tied = ((s == best) & ~right).sum(1)
        right_tied = ((s == best) & right).sum(1)
        for k in ks:
            i2t[k] += _hit_probability(greater, tied, right_tied, k).sum()

    # caption queries against every image
    rows = max(1, tile_elements // n_img)
    for start in range(0, n_cap, rows):
        stop = min(start + rows, n_cap)
        s = txt[start:stop] @ img.T                                 # (t, n_img)
        target = caption_image[start:stop]
        right = torch.zeros_like(s, dtype=torch.bool)
        right[torch.arange(stop - start, device=s.device), target] = True
        best = s.gather(1, target[:, None])
        greater = ((s > best) & ~right).sum(1)
        tied = ((s == best) & ~right).sum(1)
        for k in ks:
            t2i[k] += _hit_probability(greater, tied, torch.ones_like(tied), k).sum()

    out = {f"i2t_r{k}": float(i2t[k]) / n_img for k in ks}
    out.update({f"t2i_r{k}": float(t2i[k]) / n_cap for k in ks})
    return {name: out[name] for name in names}


def retrieval_chance(caption_image: torch.Tensor, n_images: int,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K of a retriever that ranks the candidates in a uniformly random order: for an
    image with p of the C captions, P(one of them in the top K) = 1 - C(C - p, K) / C(C, K); for a
    caption, K / n_images.

    Example:
        >>> retrieval_chance(pairs.caption_image, len(pairs.images))["t2i_r1"]   # 1 / n_images
    """
    ks = _check_ks(ks)
    caption_image = torch.as_tensor(caption_image, dtype=torch.int64)
    n_cap = int(caption_image.numel())
    counts = torch.bincount(caption_image, minlength=n_images)
    zeros = torch.zeros(n_images, dtype=torch.int64)
    out = {}
    for k in ks:
        # every candidate tied: greater = 0, tied = the other captions, right_tied = p
        out[f"i2t_r{k}"] = float(_hit_probability(zeros, n_cap - counts, counts, k).mean())
    for k in ks:
        out[f"t2i_r{k}"] = min(1.0, k / n_images)
    return out


# ----------------------------------------------------------------------------------------------
# Zero-shot classification
# ----------------------------------------------------------------------------------------------
def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        templates = (templates,)
    templates = tuple(templates)
    if not templates:
        raise ValueError("templates=(): expected at least one prompt template such as "
                         "'a photo of a {}.'")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"templates: {t!r}: expected a string with exactly one '{{}}' where "
                             "the class name goes, e.g. 'a photo of a {}.'")
    return templates


@torch.no_grad()
def prompt_embeddings(encode_text: Callable[[list[str]], torch.Tensor],
                      class_names: Sequence[str],
                      templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """CLIP's zero-shot weights: for each class c,

        w_c = normalise( mean_t normalise(encode_text(template_t.format(c))) )

    Args:
        encode_text: list of n strings -> (n, D) embeddings (e.g. tokenise, then
            ``DualEncoder.encode_text``); called once with every prompt.
        class_names: C names, put into the templates as they are.
        templates: strings with one ``{}``.

    Returns:
        float32 (C, D), unit rows, on the device of ``encode_text``'s output.

    Example:
        >>> w = prompt_embeddings(lambda t: model.encode_text(*tok(t)), ["circle", "square"])
    """
    templates = _check_templates(templates)
    names = list(class_names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"class_names={names[:5]!r}: expected at least one non-empty string")
    prompts = [t.format(name) for name in names for t in templates]
    emb = encode_text(prompts)
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(prompts):
        raise ValueError(f"encode_text returned {getattr(emb, 'shape', type(emb))} for "
                         f"{len(prompts)} prompts: expected ({len(prompts)}, D)")
    emb = F.normalize(emb.float(), dim=1).reshape(len(names), len(templates), -1).mean(1)
    return F.normalize(emb, dim=1)


@torch.no_grad()
def zero_shot_predict(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """int64 (n,): argmax_c cos(image_i, w_c) (the first class on ties). ``image_emb`` (n, D),
    ``class_emb`` (C, D) from :func:`prompt_embeddings`."""
    _check_embeddings("image_emb", image_emb)
    _check_embeddings("class_emb", class_emb)
    if image_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(f"image_emb.shape={tuple(image_emb.shape)}, class_emb.shape="
                         f"{tuple(class_emb.shape)}: expected the same embedding dimension")
    img = F.normalize(image_emb.float(), dim=1)
    w = F.normalize(class_emb.float().to(img.device), dim=1)
    return (img @ w.T).argmax(1)


@torch.no_grad()
def zero_shot_top1(image_emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor,
                   mask: torch.Tensor | None = None) -> float:
    """Top-1 accuracy of the zero-shot classifier (fraction), over the images where ``mask``
    (bool (n,)) is True (all by default); NaN when an embedding is not finite or the mask
    selects nothing.

    Example:
        >>> w = prompt_embeddings(encode, class_names, ["a photo of a {}."])
        >>> zero_shot_top1(model.encode_image(x), labels, w)
    """
    _check_embeddings("image_emb", image_emb)
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != image_emb.shape[0]:
        raise ValueError(f"labels: shape {tuple(labels.shape)}: expected ({image_emb.shape[0]},)")
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != labels.shape:
            raise ValueError(f"mask: shape {tuple(mask.shape)}: expected {tuple(labels.shape)}")
    if not (bool(torch.isfinite(image_emb).all()) and bool(torch.isfinite(class_emb).all())):
        return math.nan
    pred = zero_shot_predict(image_emb, class_emb).cpu()
    correct = pred == labels.cpu()
    if mask is not None:
        correct = correct[mask.cpu()]
    if correct.numel() == 0:
        return math.nan
    return float(correct.double().mean())
