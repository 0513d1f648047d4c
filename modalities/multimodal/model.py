"""The contrastive text/image dual encoder (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023).

    x_i = normalize(W_v f(image_i)),   y_j = normalize(W_t g(text_j))      (n, projection_dim)
    t = min(exp(logit_scale), max_logit_scale)
    CLIP:    loss = (CE(t X Y^T, arange n) + CE(t Y X^T, arange n)) / 2        csrc_triton.clip_loss
    SigLIP:  loss = (1/n) sum_ij softplus(-z_ij (t x_i . y_j + b)), z = 2 I - 1  csrc_triton.siglip

f is the image tower (torchvision backbone or ViT), g the text tower (a transformers encoder and
its pooling); W_v, W_t are bias-free linear projections, as in
``transformers.VisionTextDualEncoderModel`` (so a ViT + "pooler" + CLIP model exports to it,
see :mod:`modalities.multimodal.hf`). The temperature is learnt as its log: CLIP initialises
t = 1/0.07 and clamps it at 100; SigLIP initialises t = 10 and b = -10 (the paper's choice,
which starts the n^2 - n negative pairs near probability 0 instead of 1/2).

The fused losses never materialise the n x n logits: memory O(n) for the loss; with gradient
caching (``recipes.common.grad_cache``) the activations are one chunk's, so n can be large.

Example:
    >>> model = DualEncoder(build_image_tower("vit-tiny", image_size=32),
    ...                     TextTower(build_text_model("bert-tiny", vocab_size=4000, max_length=32)))
    >>> img, txt = model.encode_image(pixels), model.encode_text(ids, mask)
    >>> loss = model.loss(img, txt); loss.backward(); opt.step(); model.clamp_logit_scale_()
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalities.multimodal.towers import ImageTower
from modalities.text.tower import TextTower

__all__ = ["DUAL_ENCODER_LOSSES", "DualEncoder"]

DUAL_ENCODER_LOSSES: tuple[str, ...] = ("clip", "siglip")
# initial temperatures t = exp(logit_scale): CLIP's 1/0.07 (Radford et al. 2021, Sec. 2.5),
# SigLIP's 10 with bias -10 (Zhai et al. 2023, Sec. 3.2)
_INIT_LOG_SCALE = {"clip": math.log(1 / 0.07), "siglip": math.log(10.0)}
SIGLIP_BIAS_INIT = -10.0


class DualEncoder(nn.Module):
    """Image tower + text tower + bias-free projections + a learnt logit scale (and, for SigLIP, bias).

    Args:
        image_tower: an :class:`~modalities.multimodal.towers.ImageTower`.
        text_tower: a :class:`~modalities.text.tower.TextTower`.
        projection_dim: width D of the shared embedding space.
        loss: "clip" (symmetric InfoNCE) or "siglip" (pairwise sigmoid).
        logit_scale_init: the parameter's initial value, log t (OpenCLIP's ``init_logit_scale``);
            None: log(1/0.07) for CLIP, log(10) for SigLIP. At most log(max_logit_scale).
        max_logit_scale: the largest t (100, as CLIP).

    Attributes:
        visual_projection: nn.Linear(image_tower.feature_dim, D, bias=False).
        text_projection: nn.Linear(text_tower.hidden_size, D, bias=False).
        logit_scale: nn.Parameter, 0-dim, log t.
        logit_bias: nn.Parameter, 0-dim, b (SigLIP only; None for CLIP).
    """

    def __init__(self, image_tower: ImageTower, text_tower: TextTower, *, projection_dim: int = 128,
                 loss: str = "clip", logit_scale_init: float | None = None, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        if not isinstance(image_tower, ImageTower):
            raise TypeError(f"image_tower must be an ImageTower (build_image_tower), got {type(image_tower).__name__}")
        if not isinstance(text_tower, TextTower):
            raise TypeError(f"text_tower must be a TextTower, got {type(text_tower).__name__}")
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 1:
            raise ValueError(f"projection_dim={projection_dim!r}; expected a positive integer")
        if loss not in DUAL_ENCODER_LOSSES:
            raise ValueError(f"loss={loss!r}; expected one of {DUAL_ENCODER_LOSSES}")
        if (isinstance(max_logit_scale, bool) or not isinstance(max_logit_scale, (int, float))
                or not math.isfinite(max_logit_scale) or max_logit_scale <= 0):
            raise ValueError(f"max_logit_scale={max_logit_scale!r}; expected a positive finite number (CLIP: 100)")
        init = _INIT_LOG_SCALE[loss] if logit_scale_init is None else logit_scale_init
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise ValueError(f"logit_scale_init={logit_scale_init!r}; expected a finite float (log of the "
                             "temperature's inverse, e.g. log(1/0.07) = 2.659) or None")
        if init > math.log(max_logit_scale) + 1e-6:
            raise ValueError(f"logit_scale_init={init!r} exceeds log(max_logit_scale) = "
                             f"{math.log(max_logit_scale):.4f}; expected the log of a scale <= {max_logit_scale}")
        self.image_tower, self.text_tower = image_tower, text_tower
        self.projection_dim, self.loss_name, self.max_logit_scale = projection_dim, loss, float(max_logit_scale)
        self.visual_projection = nn.Linear(image_tower.feature_dim, projection_dim, bias=False)
        self.text_projection = nn.Linear(text_tower.hidden_size, projection_dim, bias=False)
        # CLIP's projection init: N(0, width^-1/2), which keeps the projected norms near the input's
        for proj in (self.visual_projection, self.text_projection):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(init)))
        self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_BIAS_INIT)) if loss == "siglip" else None

    # ---- features and embeddings
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(n, 3, S, S) normalised images -> (n, feature_dim): the tower's output before projection."""
        return self.image_tower(pixel_values)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(n, L) ids and mask -> (n, hidden_size): the pooled text tower output before projection."""
        return self.text_tower(input_ids, attention_mask)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """(n, 3, S, S) normalised images -> (n, projection_dim), unit rows."""
        return F.normalize(self.visual_projection(self.image_tower(pixel_values)), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(n, L) ids and mask -> (n, projection_dim), unit rows."""
        return F.normalize(self.text_projection(self.text_tower(input_ids, attention_mask)), dim=-1)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Both embeddings: ((n, D) image, (m, D) text), unit rows."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)

    # ---- the logit scale
    def scale(self) -> Tensor:
        """t = min(exp(logit_scale), max_logit_scale), 0-dim; the gradient is exp(logit_scale)
        below the cap and 0 at it."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """logit_scale <- min(logit_scale, log max_logit_scale), in place: call after each
        optimiser step (OpenCLIP does), so the parameter never drifts above the cap where its
        gradient is zero."""
        self.logit_scale.clamp_(max=math.log(self.max_logit_scale))

    # ---- the loss
    def loss(self, image_emb: Tensor, text_emb: Tensor, *, process_group: object | None = None,
             backend: str = "auto") -> Tensor:
        """The contrastive loss of paired rows (image i with text i), scalar.

        CLIP: ``csrc_triton.clip_loss(image_emb, text_emb, self.scale())``; SigLIP:
        ``csrc_triton.siglip(image_emb, text_emb, self.scale(), self.logit_bias)``. Under
        ``process_group`` each rank passes its own rows; the engine gathers the others' (with
        exact gradients).

        Args:
            image_emb, text_emb: (n, D) the embeddings (normalised: ``encode_image`` / ``encode_text``).
            process_group: a torch.distributed group, or None for one process.
            backend: the engine backend ("auto", "triton", "blockwise", "dense").
        """
        import csrc_triton

        if self.loss_name == "clip":
            return csrc_triton.clip_loss(image_emb, text_emb, self.scale(), backend=backend,
                                         process_group=process_group)
        siglip = getattr(csrc_triton, "siglip", None)
        if not callable(siglip):  # not exported (or the submodule itself): import the function lazily
            try:
                from csrc_triton.siglip import siglip
            except ImportError as err:
                raise RuntimeError("loss='siglip' needs csrc_triton.siglip, which is not available in this "
                                   f"installation ({err})") from err
        return siglip(image_emb, text_emb, self.scale(), self.logit_bias, backend=backend,
                      process_group=process_group)

    def describe(self) -> dict[str, Any]:
        """JSON-able architecture (towers, projection width, loss, cap) for saving."""
        text = self.text_tower
        return {"projection_dim": self.projection_dim, "loss": self.loss_name,
                "max_logit_scale": self.max_logit_scale, "image_tower": self.image_tower.describe(),
                "text_tower": {"pooling": text.pooling, "max_length": text.max_length,
                               "model_type": getattr(text.model.config, "model_type", None)}}

    def extra_repr(self) -> str:
        return f"projection_dim={self.projection_dim}, loss={self.loss_name!r}, max_logit_scale={self.max_logit_scale}"
