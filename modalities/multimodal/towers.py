"""Image towers for the dual encoder: torchvision backbones or a Hugging Face ViT.

    spec          what it builds (random init, nothing downloaded)              feature_dim
    small_cnn     modalities.image.backbones.SmallCNN (width 32)                 256
    resnet18      torchvision ResNet-18                                          512
    resnet50      torchvision ResNet-50                                          2048
    vit-tiny      transformers ViTModel: 4 layers, hidden 192, 3 heads, MLP 768   192
    vit-small     transformers ViTModel: 6 layers, hidden 384, 6 heads, MLP 1536  384
    a directory   ViTModel.from_pretrained(dir, local_files_only=True)          its hidden size

The torchvision backbones take the CIFAR stem (3 x 3 stride-1 first convolution, no max-pool)
for images of 64 px and less, and give globally average-pooled features. A ViT (Dosovitskiy et
al. 2021, "An Image is Worth 16x16 Words") gives its pooler output, tanh(W h_[CLS] + b) after
the final layer norm: what ``transformers.VisionTextDualEncoderModel`` projects, so an HF image
tower exports to it. Its patch size is chosen for the image: the largest of 32, 16, 8, 4, 2, 1
that divides the side and leaves a grid of at least 8 x 8 patches (4 px patches for 32 px
images: 64 tokens; 16 px for 224 px: 14 x 14). Dropout 0 (deterministic, so gradient caching is
exact). A local ViT saved at another resolution gets its position embeddings resized once to
the requested image size (bicubic, as ViT's ``interpolate_pos_encoding`` does) and its config's
``image_size`` updated.

Example:
    >>> tower = build_image_tower("vit-tiny", image_size=32)
    >>> tower(torch.randn(4, 3, 32, 32)).shape, tower.kind
    (torch.Size([4, 192]), 'hf')
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from modalities.image.backbones import BACKBONES, Backbone, build_backbone
from modalities.text.tower import check_model_dir

__all__ = ["IMAGE_TOWERS", "VIT_SIZES", "ImageTower", "build_image_tower", "image_tower_from_description",
           "vit_patch_size"]

VIT_SIZES: dict[str, dict[str, int]] = {
    "vit-tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768),
    "vit-small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
}
"""Named ViT sizes: the ``ViTConfig`` fields each sets (image and patch size come from the image size)."""

IMAGE_TOWERS: tuple[str, ...] = BACKBONES + tuple(VIT_SIZES)


def vit_patch_size(image_size: int) -> int:
    """The largest of 32, 16, 8, 4, 2, 1 dividing ``image_size`` with at least 8 patches a side."""
    for patch in (32, 16, 8, 4, 2):
        if image_size % patch == 0 and image_size // patch >= 8:
            return patch
    return 1


def _check_image_size(image_size: object) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be an int (pixels), got {type(image_size).__name__} {image_size!r}")
    if image_size < 8:
        raise ValueError(f"image_size={image_size}; expected an integer number of pixels >= 8")
    return image_size


class ImageTower(nn.Module):
    """An image encoder: (n, 3, S, S) normalised float images -> (n, feature_dim).

    Attributes:
        model: the torchvision :class:`~modalities.image.backbones.Backbone` or the ``ViTModel``.
        kind: "torchvision" or "hf".
        feature_dim: width of the output.
        image_size: the side S the tower was built for.
        spec: what built it (a name of :data:`IMAGE_TOWERS` or the directory).

    Build it with :func:`build_image_tower`; ``describe()`` gives what
    :func:`image_tower_from_description` needs to rebuild the architecture (without weights).
    """

    def __init__(self, model: nn.Module, *, kind: str, image_size: int, spec: str) -> None:
        super().__init__()
        if kind not in ("torchvision", "hf"):
            raise ValueError(f"kind={kind!r}; expected 'torchvision' or 'hf'")
        self.model, self.kind, self.image_size, self.spec = model, kind, _check_image_size(image_size), str(spec)
        if kind == "torchvision":
            if not isinstance(model, Backbone):
                raise TypeError(f"kind='torchvision' needs a modalities.image Backbone, got {type(model).__name__}")
            self.feature_dim = int(model.feature_dim)
        else:
            config = getattr(model, "config", None)
            if getattr(config, "model_type", None) != "vit":
                raise TypeError(f"kind='hf' needs a transformers ViTModel, got {type(model).__name__}")
            if getattr(model, "pooler", None) is None:
                raise ValueError("the ViTModel has no pooler (add_pooling_layer=False); the tower uses its pooler "
                                 "output, as VisionTextDualEncoderModel does")
            self.feature_dim = int(config.pooler_output_size or config.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(n, 3, S, S) normalised float images -> (n, feature_dim) features."""
        if not isinstance(pixel_values, Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if (pixel_values.dim() != 4 or pixel_values.shape[1] != 3
                or tuple(pixel_values.shape[2:]) != (self.image_size, self.image_size)):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}; expected (n, 3, {self.image_size}, "
                             f"{self.image_size}) (the image size the tower was built for)")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values of dtype {pixel_values.dtype}; expected normalised float images "
                            "(modalities.image.transforms.eval_transform)")
        if self.kind == "torchvision":
            return self.model(pixel_values)
        return self.model(pixel_values=pixel_values, return_dict=True).pooler_output

    def describe(self) -> dict[str, Any]:
        """JSON-able architecture: torchvision {kind, name, cifar_stem, width, image_size}; hf
        {kind, image_size, config: the ViTConfig as a dict}."""
        if self.kind == "torchvision":
            return {"kind": "torchvision", "name": self.model.name, "cifar_stem": bool(self.model.cifar_stem),
                    "width": int(self.model.map_channels[0]), "image_size": self.image_size, "spec": self.spec}
        return {"kind": "hf", "image_size": self.image_size, "spec": self.spec,
                "config": self.model.config.to_dict()}

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, spec={self.spec!r}, feature_dim={self.feature_dim}, image_size={self.image_size}"


def _resize_positions(model: nn.Module, image_size: int) -> nn.Module:
    """A copy of a ViT for ``image_size``: its position embeddings resized once (bicubic on the
    patch grid, the [CLS] position unchanged, as ViT's ``interpolate_pos_encoding`` does), the
    other weights unchanged, the config's ``image_size`` updated (a rebuild, so every size the
    model caches at construction is the new one)."""
    from transformers import ViTModel

    config = model.config
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    if image_size % patch:
        raise ValueError(f"image_size={image_size} is not a multiple of the ViT's patch size {patch}")
    emb = model.embeddings
    tokens = 1 + (image_size // patch) ** 2
    with torch.no_grad():
        dummy = torch.zeros(1, tokens, config.hidden_size, dtype=emb.position_embeddings.dtype)
        positions = emb.interpolate_pos_encoding(dummy, image_size, image_size).clone()
    state = model.state_dict()
    state["embeddings.position_embeddings"] = positions
    config.image_size = image_size
    resized = ViTModel(config, add_pooling_layer=True)
    resized.load_state_dict(state, strict=True)
    return resized


def build_image_tower(spec: str, *, image_size: int) -> ImageTower:
    """An image tower by name (random init, no download) or from a local ViT directory.

    Args:
        spec: a name of :data:`IMAGE_TOWERS`, or a directory written by ``save_pretrained`` of a
            ViT (``ViTModel`` / ``ViTForImageClassification``; config.json + weights).
        image_size: the side S of the (square) input images.

    Raises:
        ValueError: an unknown name that is no directory, a missing or incomplete directory, a
            directory holding a model other than a ViT (each naming ``--image-model``).

    Example:
        >>> build_image_tower("resnet18", image_size=32).feature_dim
        512
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"--image-model must be a str (one of {IMAGE_TOWERS} or a directory), "
                        f"got {type(spec).__name__}")
    image_size = _check_image_size(image_size)
    spec = os.fspath(spec)
    if spec in BACKBONES:
        return ImageTower(build_backbone(spec, cifar_stem=image_size <= 64), kind="torchvision",
                          image_size=image_size, spec=spec)
    if spec in VIT_SIZES:
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(image_size=image_size, patch_size=vit_patch_size(image_size), hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, **VIT_SIZES[spec])
        return ImageTower(ViTModel(config, add_pooling_layer=True), kind="hf", image_size=image_size, spec=spec)
    if not os.path.exists(spec) and os.sep not in spec and not spec.startswith("."):
        raise ValueError(f"--image-model {spec!r} is neither one of {IMAGE_TOWERS} nor an existing directory "
                         "(models are never downloaded: give a local save_pretrained ViT folder)")
    path = check_model_dir(spec, "--image-model")
    from transformers import AutoConfig, ViTModel

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type != "vit":
        raise ValueError(f"--image-model {str(path)!r} holds a {config.model_type!r} model; expected a ViT "
                         "(model_type 'vit') or one of " + ", ".join(IMAGE_TOWERS))
    config.hidden_dropout_prob, config.attention_probs_dropout_prob = 0.0, 0.0
    model = ViTModel.from_pretrained(str(path), config=config, add_pooling_layer=True, local_files_only=True)
    if model.config.image_size != image_size:
        model = _resize_positions(model, image_size)
    return ImageTower(model, kind="hf", image_size=image_size, spec=str(path))


def image_tower_from_description(desc: dict[str, Any]) -> ImageTower:
    """Rebuild the architecture :meth:`ImageTower.describe` wrote (random weights, no download)."""
    kind = desc.get("kind")
    if kind == "torchvision":
        net = build_backbone(desc["name"], cifar_stem=bool(desc["cifar_stem"]), width=int(desc.get("width", 32)))
        return ImageTower(net, kind="torchvision", image_size=int(desc["image_size"]),
                          spec=desc.get("spec", desc["name"]))
    if kind == "hf":
        from transformers import ViTConfig, ViTModel

        config = ViTConfig.from_dict(dict(desc["config"]))
        return ImageTower(ViTModel(config, add_pooling_layer=True), kind="hf", image_size=int(desc["image_size"]),
                          spec=desc.get("spec", "vit"))
    raise ValueError(f"image tower description of kind={kind!r}; expected 'torchvision' or 'hf'")
