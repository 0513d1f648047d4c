"""Saving and loading a :class:`~modalities.multimodal.model.DualEncoder`.

Two formats, chosen by :func:`exportable`:

1. ``"transformers"`` (HF ViT image tower, text pooling "pooler", loss "clip"): a
   ``transformers.VisionTextDualEncoderModel`` and its ``VisionTextDualEncoderProcessor``, so the
   trained model opens with ``transformers`` alone::

       model = VisionTextDualEncoderModel.from_pretrained(out_dir)
       processor = VisionTextDualEncoderProcessor.from_pretrained(out_dir)
       inputs = processor(text=captions, images=images, return_tensors="pt",
                          padding="max_length", max_length=32, truncation=True)
       logits_per_image = model(**inputs).logits_per_image     # = t * img @ txt.T

   Files: config.json + model.safetensors (``vision_model`` = our ViTModel incl. its pooler,
   ``text_model`` = our text encoder incl. its pooler, ``visual_projection``,
   ``text_projection``, ``logit_scale`` = log t, clamped at log max_logit_scale),
   preprocessor_config.json / processor_config.json (a ``CLIPImageProcessor``: shorter side
   resized to image_size, bilinear, centre crop, as ``modalities.multimodal.data`` loads
   images; rescale by 1/255; normalise with our mean and std, i.e.
   ``modalities.image.transforms.eval_transform``), the tokenizer's files (tokenizer.json,
   tokenizer_config.json), and tilecontrast.json (below).

2. ``"tilecontrast"`` (everything else: torchvision image towers, "cls"/"mean" pooling, SigLIP):

   ====================  =========================================================================
   tilecontrast.json     {"format": "tilecontrast", "version": 1, "image_size", "mean", "std",
                         "projection_dim", "loss", "max_logit_scale",
                         "image_tower": {"kind": "torchvision", "name", "cifar_stem", "width", ...}
                                        or {"kind": "hf", "config": the ViTConfig dict, ...},
                         "text_tower": {"pooling", "max_length", "model_type"}}
   text_config/          the text encoder's config.json (``AutoModel.from_config`` rebuilds it)
   model.safetensors     ``DualEncoder.state_dict()``: keys ``image_tower.model.*`` (the backbone's
                         or ViTModel's own keys), ``text_tower.model.*`` (the encoder's own keys),
                         ``visual_projection.weight`` (D, feature_dim), ``text_projection.weight``
                         (D, hidden), ``logit_scale`` (0-dim, log t), ``logit_bias`` (0-dim,
                         SigLIP only); BatchNorm running statistics included
   tokenizer.json, ...   the tokenizer (``AutoTokenizer.from_pretrained(out_dir)`` reads it)
   ====================  =========================================================================

:func:`load_dual_encoder` reads both (never downloading) and returns the model, the tokenizer
and the info of tilecontrast.json (for a foreign ``VisionTextDualEncoderModel`` directory without
one: format, image size, mean and std from its processor).

Example:
    >>> fmt = save_dual_encoder(model, tok, "runs/clip/final", image_size=32,
    ...                         mean=DEFAULT_MEAN, std=DEFAULT_STD)
    >>> model2, tok2, info = load_dual_encoder("runs/clip/final")
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from modalities.multimodal.model import DualEncoder
from modalities.multimodal.towers import ImageTower, image_tower_from_description
from modalities.text.tower import TextTower

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["FORMAT_VERSION", "INFO_FILE", "exportable", "load_dual_encoder", "save_dual_encoder"]

INFO_FILE = "tilecontrast.json"
FORMAT_VERSION = 1


def exportable(model: DualEncoder) -> tuple[bool, str]:
    """Whether ``model`` is a ``VisionTextDualEncoderModel``: (True, "") or (False, the reason)."""
    if not isinstance(model, DualEncoder):
        raise TypeError(f"model must be a DualEncoder, got {type(model).__name__}")
    image, text = model.image_tower, model.text_tower
    if image.kind != "hf":
        return False, (f"the image tower is a torchvision backbone ({image.spec}); VisionTextDualEncoderModel "
                       "needs a transformers vision model (use a ViT: vit-tiny, vit-small or a local ViT)")
    vcfg = image.model.config
    if image.feature_dim != vcfg.hidden_size:
        return False, (f"the ViT's pooler_output_size ({image.feature_dim}) differs from its hidden_size "
                       f"({vcfg.hidden_size}); VisionTextDualEncoderModel projects from hidden_size")
    if text.pooling != "pooler":
        return False, (f"the text tower pools with {text.pooling!r}; VisionTextDualEncoderModel projects the "
                       "text model's pooler output (pooling='pooler')")
    if model.loss_name != "clip":
        return False, (f"the loss is {model.loss_name!r}: VisionTextDualEncoderModel's logits have no place for "
                       "SigLIP's learnt bias")
    if not hasattr(text.model, "save_pretrained"):
        return False, f"the text model {type(text.model).__name__} is not a transformers PreTrainedModel"
    return True, ""


def _check_norm(name: str, values: Sequence[float]) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name}={values!r}; expected 3 per-channel floats") from None
    if len(out) != 3 or (name == "std" and min(out) <= 0):
        raise ValueError(f"{name}={values!r}; expected 3 per-channel floats" + (", > 0" if name == "std" else ""))
    return out


def _image_processor(image_size: int, mean: list[float], std: list[float]) -> Any:
    """A CLIPImageProcessor doing what the recipe's data path does: shorter side resized
    (bilinear) to S, centre crop S x S (``modalities.multimodal.data.decode_resize``), / 255,
    normalised (``eval_transform``). Same geometry, not bit-identical pixels on images of
    another size (the crop box and resampling round differently: on a random 112 x 80 image
    at S = 32 the two differ by 0.05 on average in normalised units); equal on images already
    S x S (tested)."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": image_size},
                              resample=PILImageResampling.BILINEAR, do_center_crop=True,
                              crop_size={"height": image_size, "width": image_size},
                              do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                              image_mean=mean, image_std=std, do_convert_rgb=True)


def save_dual_encoder(model: DualEncoder, tokenizer: "PreTrainedTokenizerBase", out_dir: str | os.PathLike, *,
                      image_size: int, mean: Sequence[float], std: Sequence[float]) -> str:
    """Write ``model`` and ``tokenizer`` to ``out_dir`` (created; files there are replaced).

    Args:
        model: the dual encoder.
        tokenizer: its tokenizer (a ``transformers`` tokenizer with ``save_pretrained``).
        out_dir: the directory.
        image_size, mean, std: the evaluation preprocessing (side in pixels; per-channel mean and
            std of ``eval_transform``), recorded in the processor and tilecontrast.json.

    Returns:
        "transformers" (a VisionTextDualEncoderModel + processor) or "tilecontrast" (see the
        module docstring), as :func:`exportable` decides.
    """
    if not isinstance(model, DualEncoder):
        raise TypeError(f"model must be a DualEncoder, got {type(model).__name__}")
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size != model.image_tower.image_size:
        raise ValueError(f"image_size={image_size!r}; expected the image tower's {model.image_tower.image_size}")
    mean, std = _check_norm("mean", mean), _check_norm("std", std)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok, _ = exportable(model)
    info: dict[str, Any] = {"format": "transformers" if ok else "tilecontrast", "version": FORMAT_VERSION,
                            "image_size": image_size, "mean": mean, "std": std, **model.describe()}
    # what transformers sees is the clamped scale: the cap is not part of its model
    log_scale = min(float(model.logit_scale.detach()), math.log(model.max_logit_scale))
    if ok:
        from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

        vit, text = model.image_tower.model, model.text_tower.model
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            vit.config, text.config, projection_dim=model.projection_dim, logit_scale_init_value=log_scale)
        # its random init would consume the global generator: saving must not change a run's RNG
        with torch.random.fork_rng(devices=[]):
            hf = VisionTextDualEncoderModel(config)
        with torch.no_grad():
            hf.vision_model.load_state_dict(vit.state_dict(), strict=True)
            hf.text_model.load_state_dict(text.state_dict(), strict=True)
            hf.visual_projection.weight.copy_(model.visual_projection.weight)
            hf.text_projection.weight.copy_(model.text_projection.weight)
            hf.logit_scale.fill_(log_scale)
        hf.save_pretrained(str(out))
        processor = VisionTextDualEncoderProcessor(image_processor=_image_processor(image_size, mean, std),
                                                   tokenizer=tokenizer)
        processor.save_pretrained(str(out))
    else:
        from safetensors.torch import save_file

        model.text_tower.model.config.save_pretrained(str(out / "text_config"))
        # clone: safetensors refuses tensors sharing storage; contiguous CPU copies always save
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
        state["logit_scale"] = torch.tensor(log_scale)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "tilecontrast": "dual_encoder"})
        tokenizer.save_pretrained(str(out))
    tmp = out / (INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, out / INFO_FILE)
    return info["format"]


def _read_info(path: Path) -> dict[str, Any] | None:
    f = path / INFO_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{f}: not valid JSON ({err})") from err


def load_dual_encoder(path: str | os.PathLike) -> tuple[DualEncoder, "PreTrainedTokenizerBase", dict[str, Any]]:
    """Read a directory written by :func:`save_dual_encoder` (either format), or any local
    ``VisionTextDualEncoderModel`` directory with a tokenizer; never downloads.

    Returns:
        (model in eval mode, tokenizer, info): info holds "format", "image_size", "mean", "std",
        "projection_dim", "loss", "max_logit_scale" and the towers' descriptions.

    Raises:
        ValueError: a missing directory or a missing file of the format (naming it).
    """
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"path {str(p)!r} is not a directory (missing); expected a saved dual encoder")
    info = _read_info(p)
    fmt = info.get("format") if info else None
    if fmt is None:
        config_file = p / "config.json"
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
        if model_type == "vision-text-dual-encoder":
            fmt = "transformers"
        else:
            raise ValueError(f"path {str(p)!r} holds neither {INFO_FILE} nor a VisionTextDualEncoderModel config.json")
    from transformers import AutoTokenizer

    if fmt == "transformers":
        model, info = _load_transformers(p, info)
    elif fmt == "tilecontrast":
        model = _load_tilecontrast(p, info)
    else:
        raise ValueError(f"{p / INFO_FILE}: format={fmt!r}; expected 'transformers' or 'tilecontrast'")
    tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    return model.eval(), tokenizer, info


def _load_transformers(p: Path, info: dict[str, Any] | None) -> tuple[DualEncoder, dict[str, Any]]:
    from transformers import VisionTextDualEncoderModel

    for name in ("config.json", "model.safetensors"):
        if not (p / name).is_file() and not (name == "model.safetensors" and (p / "pytorch_model.bin").is_file()):
            raise ValueError(f"{str(p)!r}: {name} is missing (a VisionTextDualEncoderModel directory needs it)")
    hf = VisionTextDualEncoderModel.from_pretrained(str(p), local_files_only=True)
    vcfg = hf.config.vision_config
    if getattr(vcfg, "model_type", None) != "vit":
        raise ValueError(f"{str(p)!r}: the vision model is {vcfg.model_type!r}; only ViT image towers are supported")
    image_size = int(vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0])
    if info is None:  # a foreign VisionTextDualEncoderModel: the preprocessing from its processor
        pre = p / "preprocessor_config.json"
        proc = json.loads(pre.read_text()) if pre.is_file() else {}
        if "image_processor" in proc:
            proc = proc["image_processor"]
        info = {"format": "transformers", "version": FORMAT_VERSION, "image_size": image_size,
                "mean": proc.get("image_mean", [0.5, 0.5, 0.5]), "std": proc.get("image_std", [0.5, 0.5, 0.5]),
                "projection_dim": hf.config.projection_dim, "loss": "clip", "max_logit_scale": 100.0}
    image = ImageTower(hf.vision_model, kind="hf", image_size=image_size, spec=str(p))
    text = TextTower(hf.text_model, pooling="pooler")
    max_scale = float(info.get("max_logit_scale", 100.0))
    log_scale = min(float(hf.logit_scale.detach()), math.log(max_scale))
    model = DualEncoder(image, text, projection_dim=int(hf.config.projection_dim), loss="clip",
                        logit_scale_init=log_scale, max_logit_scale=max_scale)
    with torch.no_grad():
        model.visual_projection.weight.copy_(hf.visual_projection.weight)
        model.text_projection.weight.copy_(hf.text_projection.weight)
    return model, info


def _load_tilecontrast(p: Path, info: dict[str, Any]) -> DualEncoder:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    for name in ("model.safetensors", "text_config/config.json"):
        if not (p / name).is_file():
            raise ValueError(f"{str(p)!r}: {name} is missing (the tilecontrast dual-encoder format needs it)")
    try:
        image = image_tower_from_description(info["image_tower"])
        text_config = AutoConfig.from_pretrained(str(p / "text_config"), local_files_only=True)
        text = TextTower(AutoModel.from_config(text_config), pooling=info["text_tower"]["pooling"])
        model = DualEncoder(image, text, projection_dim=int(info["projection_dim"]), loss=info["loss"],
                            max_logit_scale=float(info["max_logit_scale"]))
    except KeyError as err:
        raise ValueError(f"{p / INFO_FILE}: the key {err} is missing") from err
    model.load_state_dict(load_file(str(p / "model.safetensors")), strict=True)
    return model
