"""Self-supervised, metric-learning and supervised methods on one backbone and one set of
augmentations, each a few lines on top of the losses of :mod:`csrc_triton`:

    method      paper                                   loss (csrc_triton)       labels  target
    simclr      Chen et al. 2020 (SimCLR)               nt_xent                  -       -
    moco        Chen et al. 2020 (MoCo v2)              info_nce(queue=...)      -       EMA + queue
    supcon      Khosla et al. 2020                      supcon                   yes     -
    triplet     Hermans et al. 2017 (batch-hard)        triplet_margin           yes     -
    drlim       Hadsell et al. 2006                     drlim                    yes     -
    nca         Goldberger et al. 2004                  nca                      yes     -
    byol        Grill et al. 2020                       byol                     -       EMA
    simsiam     Chen and He 2021                        simsiam                  -       -
    barlow      Zbontar et al. 2021                     barlow_twins             -       -
    vicreg      Bardes et al. 2022                      vicreg                   -       -
    supervised  cross-entropy baseline                  F.cross_entropy          yes     -

The training step, for a batch of B images with V views (V = 2; 1 for ``supervised``)::

    x = views.transpose(0, 1).reshape(V * B, 3, h, w)   # view-major: rows v*B .. (v+1)*B - 1 = view v
    online = method(x)                                  # {"feature", "projection", ...}, row-wise
    target = method.forward_target(x)                   # EMA branch (moco, byol), no grad; else None
    loss, stats = method.loss(online, target, labels, V)
    loss.backward(); optimizer.step()
    method.on_step_end(step, total_steps)               # EMA update, MoCo's queue

``forward`` is row-wise (BatchNorm's batch statistics aside), so a gradient cache may call it on
chunks of rows and concatenate; ``loss`` is a function of the tensors it is given (and MoCo's
queue buffer), so it may be fed detached leaves of ``forward``'s outputs.

Across processes (``method.process_group``, set by the recipe; None: this process alone): every
loss that draws negatives or batch statistics from the batch uses the global batch, with the
scaling convention of :mod:`csrc_triton.distributed` (the mean over ranks of the returned loss,
and the DDP-averaged gradients, are those of one process on the concatenated batch). The
per-sample losses (byol, simsiam, supervised, MoCo's queue-only InfoNCE) need nothing: the DDP
average of the ranks' means is the global mean.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import csrc_triton
from csrc_triton import distributed as dist_
from csrc_triton.ops import BACKENDS

from .backbones import Backbone
from .heads import PredictionHead, ProjectionHead
from .momentum import cosine_momentum, update_momentum

METHODS = ("simclr", "moco", "supcon", "triplet", "drlim", "nca", "byol", "simsiam", "barlow",
           "vicreg", "supervised")
#: methods whose loss needs the class labels (the recipe feeds them, and may sample P x K batches)
LABELLED_METHODS = ("supcon", "triplet", "drlim", "nca", "supervised")
#: methods with an EMA target network (``forward_target`` returns its outputs)
TARGET_METHODS = ("moco", "byol")
#: each method's projection head from its paper / official code: (Linear layers, BatchNorm after
#: the hidden layers, BatchNorm without affine on the output). SimCLR: Linear-BN-ReLU-Linear;
#: MoCo v2 and SupCon: Linear-ReLU-Linear; SimSiam's CIFAR projector: 2 layers with an output
#: BN; Barlow Twins and VICReg: 3 layers. The metric-learning losses use SimCLR's head.
HEAD_DEFAULTS: dict[str, tuple[int, bool, bool]] = {
    "simclr": (2, True, False),
    "moco": (2, False, False),
    "supcon": (2, False, False),
    "triplet": (2, True, False),
    "drlim": (2, True, False),
    "nca": (2, True, False),
    "byol": (2, True, False),
    "simsiam": (2, True, True),
    "barlow": (3, True, False),
    "vicreg": (3, True, False),
}
TRIPLET_MININGS = ("batch_hard", "batch_all", "semi_hard")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
def _number(name: str, value: object, *, minimum: float = 0.0, strict: bool = False,
            maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"MethodConfig.{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    too_small = v <= minimum if strict else v < minimum
    if not math.isfinite(v) or too_small or (maximum is not None and v > maximum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        if maximum is not None:
            bound += f" and <= {maximum}"
        raise ValueError(f"MethodConfig.{name} must be finite and {bound}, got {value!r}")
    return v


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MethodConfig.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"MethodConfig.{name} must be >= 1, got {value}")
    return value


@dataclass
class MethodConfig:
    """Everything a method needs besides the backbone. Defaults follow the papers' CIFAR
    settings where they have one, with heads narrowed for CPUs (hidden 512 instead of 2048+).

    Attributes:
        name: one of :data:`METHODS`.
        projection_dim: output size of the projection head (and of the predictor).
        projection_hidden: hidden width of the projection head.
        projection_layers: Linear layers of the projection head; None: the method's own
            (:data:`HEAD_DEFAULTS`: 3 for barlow and vicreg, 2 otherwise).
        prediction_hidden: hidden width of the BYOL/SimSiam predictor; None: projection_hidden.
        temperature: of nt_xent (simclr), info_nce (moco; MoCo v2 uses 0.2) and supcon.
        queue_size: MoCo's queue of negative keys (rows).
        momentum, momentum_final: the EMA momentum's cosine schedule (moco, byol), from
            ``momentum`` at step 0 to ``momentum_final`` at the last step (BYOL's CIFAR 0.99 -> 1).
        moco_symmetric: MoCo's loss in both directions, (L(q1, k2) + L(q2, k1)) / 2 (as
            solo-learn's MoCo v2+ and MoCo v3); False: the paper's L(q1, k2) alone.
        triplet_margin: margin of the batch-hard triplet loss on L2-normalised projections.
        triplet_mining: "batch_hard" (Hermans et al.), "batch_all" or "semi_hard".
        drlim_margin: DrLIM's margin.
        drlim_normalize: DrLIM on L2-normalised projections (the margin then lives on the unit
            sphere's scale, as the triplet loss's); False: on the raw projections, as the paper.
        nca_scale: s of NCA's softmax over -s ||x_i - x_j||^2 on L2-normalised projections;
            None: 1 / (2 temperature), the same sharpness as the contrastive losses, since
            -s ||x_i - x_j||^2 = 2 s cos(x_i, x_j) - 2 s for unit rows.
        barlow_lambda: Barlow Twins' off-diagonal weight (the paper's 0.0051).
        vicreg_weights: VICReg's (invariance, variance, covariance) weights (25, 25, 1).
        loss_backend: backend of the tiled losses: "auto", "triton", "blockwise" or "dense".
    """

    name: str = "simclr"
    projection_dim: int = 128
    projection_hidden: int = 512
    projection_layers: int | None = None
    prediction_hidden: int | None = None
    temperature: float = 0.2
    queue_size: int = 4096
    momentum: float = 0.99
    momentum_final: float = 1.0
    moco_symmetric: bool = True
    triplet_margin: float = 0.2
    triplet_mining: str = "batch_hard"
    drlim_margin: float = 1.0
    drlim_normalize: bool = True
    nca_scale: float | None = None
    barlow_lambda: float = 0.0051
    vicreg_weights: tuple[float, float, float] = (25.0, 25.0, 1.0)
    loss_backend: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in METHODS:
            raise ValueError(f"MethodConfig.name={self.name!r} is not one of {METHODS}")
        _count("projection_dim", self.projection_dim)
        _count("projection_hidden", self.projection_hidden)
        if self.projection_layers is not None:
            _count("projection_layers", self.projection_layers)
        if self.prediction_hidden is not None:
            _count("prediction_hidden", self.prediction_hidden)
        _number("temperature", self.temperature, strict=True)
        _count("queue_size", self.queue_size)
        _number("momentum", self.momentum, maximum=1.0)
        _number("momentum_final", self.momentum_final, maximum=1.0)
        _number("triplet_margin", self.triplet_margin)
        if self.triplet_mining not in TRIPLET_MININGS:
            raise ValueError(f"MethodConfig.triplet_mining={self.triplet_mining!r} is not one of {TRIPLET_MININGS}")
        _number("drlim_margin", self.drlim_margin)
        if self.nca_scale is not None:
            _number("nca_scale", self.nca_scale, strict=True)
        _number("barlow_lambda", self.barlow_lambda)
        weights = tuple(self.vicreg_weights) if isinstance(self.vicreg_weights, (list, tuple)) else None
        if weights is None or len(weights) != 3:
            raise ValueError(
                "MethodConfig.vicreg_weights must be 3 numbers (invariance, variance, covariance), "
                f"got {self.vicreg_weights!r}"
            )
        self.vicreg_weights = tuple(_number(f"vicreg_weights[{i}]", w) for i, w in enumerate(weights))
        for flag in ("moco_symmetric", "drlim_normalize"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"MethodConfig.{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.loss_backend not in BACKENDS:
            raise ValueError(f"MethodConfig.loss_backend={self.loss_backend!r} is not one of {BACKENDS}")

    def to_dict(self) -> dict:
        """Plain types only (for JSON and ``torch.load(weights_only=True)``)."""
        d = dataclasses.asdict(self)
        d["vicreg_weights"] = list(d["vicreg_weights"])
        return d


# ----------------------------------------------------------------------------------------------
# The base class
# ----------------------------------------------------------------------------------------------
class Method(nn.Module):
    """A training method on an online backbone ``encoder`` (the network evaluated downstream).

    Attributes:
        name: the method's name (one of :data:`METHODS`).
        n_views: views per image it is trained with (2; ``supervised``: 1).
        needs_labels: whether ``loss`` needs the labels.
        uses_target: whether ``forward_target`` returns a target branch (moco, byol).
        encoder: the online :class:`~modalities.image.backbones.Backbone`.
        process_group: a ``torch.distributed`` group to take the negatives / batch statistics
            from (set by the recipe under DDP; None: this process alone).
        config: the :class:`MethodConfig`.

    The tensors ``loss`` takes are view-major: rows [v B, (v + 1) B) of every output are view v
    of the B images, labels (B,) are per image.
    """

    name: str = ""
    n_views: int = 2
    needs_labels: bool = False
    uses_target: bool = False
    #: the views ``loss`` accepts: exactly n_views (pair losses), or any number >= 1
    any_views: bool = False
    #: the output keys ``loss`` reads from ``online``
    online_keys: tuple[str, ...] = ("projection",)

    def __init__(self, config: MethodConfig, encoder: Backbone) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.process_group: object | None = None

    # -- the interface ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Online outputs for images x (n, 3, h, w): "feature" (n, feature_dim) and the method's
        own ("projection" (n, projection_dim), "prediction", "logits"), with autograd."""
        raise NotImplementedError

    @torch.no_grad()
    def forward_target(self, x: Tensor) -> dict[str, Tensor] | None:
        """Target-branch outputs for images x (EMA networks of moco and byol), without
        gradients; None for the methods that have none."""
        return self._target(x) if self.uses_target else None

    def loss(self, online: dict[str, Tensor], target: dict[str, Tensor] | None, labels: Tensor | None,
             n_views: int) -> tuple[Tensor, dict[str, float | Tensor]]:
        """(scalar loss, stats of detached scalars) from view-major outputs (rows [v B, (v + 1) B)
        = view v) and labels (B,) (required by the labelled methods, ignored by the others)."""
        batch = self._check_loss_args(online, target, labels, n_views)
        value, stats = self._loss(online, target, labels, n_views, batch)
        return value, {"loss": value.detach(), **stats}

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called after ``optimizer.step()`` with the 0-based index of that step and the run's
        number of steps. A no-op here; moco and byol update their EMA target (and queue)."""

    # -- for subclasses ---------------------------------------------------------------------------
    def _target(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - only for uses_target
        raise NotImplementedError

    def _loss(self, online: dict[str, Tensor], target: dict[str, Tensor] | None, labels: Tensor | None,
              n_views: int, batch: int) -> tuple[Tensor, dict[str, float | Tensor]]:
        raise NotImplementedError

    def _check_loss_args(self, online: object, target: object, labels: object, n_views: object) -> int:
        """Validate the arguments of ``loss`` from shapes alone; returns the images per view B."""
        if isinstance(n_views, bool) or not isinstance(n_views, int):
            raise TypeError(f"n_views must be an int, got {type(n_views).__name__} {n_views!r}")
        if self.any_views:
            if n_views < 1:
                raise ValueError(f"n_views={n_views}: {self.name} needs at least 1 view per image")
        elif n_views != self.n_views:
            raise ValueError(f"n_views={n_views}: {self.name} compares exactly {self.n_views} views per image")
        if not isinstance(online, dict):
            raise TypeError(f"online must be the dict that forward returns, got {type(online).__name__}")
        missing = [k for k in self.online_keys if k not in online]
        if missing:
            raise ValueError(
                f"online is missing {missing} (has {sorted(online)}); {self.name} needs {list(self.online_keys)}"
            )
        rows = online[self.online_keys[0]].shape[0]
        if rows == 0 or rows % n_views:
            raise ValueError(
                f"online[{self.online_keys[0]!r}] has {rows} rows, which is not n_views={n_views} times a "
                "positive number of images (rows are view-major: view v in rows v*B .. (v+1)*B - 1)"
            )
        for k in self.online_keys:
            if online[k].shape[0] != rows:
                raise ValueError(f"online[{k!r}] has {online[k].shape[0]} rows but online[{self.online_keys[0]!r}] "
                                 f"has {rows}; expected the same")
        batch = rows // n_views
        if self.uses_target:
            if not isinstance(target, dict) or "projection" not in target:
                raise ValueError(
                    f"target: {self.name} needs the dict that forward_target returns, got {type(target).__name__}"
                )
            if target["projection"].shape != online["projection"].shape:
                raise ValueError(
                    f"target['projection'] has shape {tuple(target['projection'].shape)} but online['projection'] "
                    f"has {tuple(online['projection'].shape)}; expected the same (same images)"
                )
        if self.needs_labels:
            if not isinstance(labels, Tensor):
                raise TypeError(f"labels: {self.name} needs a tensor of class labels (B,), got {type(labels).__name__}")
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise TypeError(f"labels must be an integer tensor of class ids, got dtype {labels.dtype}")
            if labels.shape != (batch,):
                raise ValueError(
                    f"labels must have shape ({batch},), one per image ({rows} rows / n_views={n_views}), "
                    f"got shape {tuple(labels.shape)}"
                )
        return batch

    @staticmethod
    def _views(x: Tensor, n_views: int) -> list[Tensor]:
        """View-major rows (V B, ...) -> [view 0 (B, ...), ..., view V-1]."""
        return list(x.reshape(n_views, x.shape[0] // n_views, *x.shape[1:]).unbind(0))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n_views={self.n_views}"


class _ProjectionMethod(Method):
    """encoder -> projection head; ``forward`` gives "feature" and "projection"."""

    def __init__(self, config: MethodConfig, encoder: Backbone) -> None:
        super().__init__(config, encoder)
        layers, batch_norm, last_bn = HEAD_DEFAULTS[self.name]
        self.projector = ProjectionHead(
            encoder.feature_dim, config.projection_hidden, config.projection_dim,
            layers=config.projection_layers or layers, batch_norm=batch_norm, last_batch_norm=last_bn,
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feature = self.encoder(x)
        return {"feature": feature, "projection": self.projector(feature)}


class _MomentumMethod(_ProjectionMethod):
    """A projection method with an EMA target copy of (encoder, projector): its parameters do not
    require gradients and change only in ``on_step_end``, by
    target <- m target + (1 - m) online, m = cosine_momentum(step, total_steps, momentum,
    momentum_final). The last m used is the buffer ``last_momentum`` (so a resumed run reports
    the same), reported as the stat "momentum"."""

    uses_target = True

    def __init__(self, config: MethodConfig, encoder: Backbone) -> None:
        super().__init__(config, encoder)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.register_buffer("last_momentum", torch.tensor(float(config.momentum), dtype=torch.float64))

    @property
    def current_momentum(self) -> float:
        """The momentum of the last EMA update (``config.momentum`` before the first)."""
        return float(self.last_momentum)

    def _momentum_stats(self) -> dict[str, Tensor]:
        return {"momentum": self.last_momentum.detach().clone()}

    def _target(self, x: Tensor) -> dict[str, Tensor]:
        feature = self.target_encoder(x)
        return {"feature": feature, "projection": self.target_projector(feature)}

    def on_step_end(self, step: int, total_steps: int) -> None:
        m = cosine_momentum(step, total_steps, self.config.momentum, self.config.momentum_final)
        update_momentum(self.encoder, self.target_encoder, m)
        update_momentum(self.projector, self.target_projector, m)
        self.last_momentum.fill_(m)


# ----------------------------------------------------------------------------------------------
# Contrastive: SimCLR, MoCo v2
# ----------------------------------------------------------------------------------------------
class SimCLR(_ProjectionMethod):
    r"""SimCLR (Chen, Kornblith, Norouzi and Hinton 2020, "A Simple Framework for Contrastive
    Learning of Visual Representations"): NT-Xent over the 2B projected views, each view's
    positive its partner, its negatives the other 2B - 2 views (of every rank under DDP):

        loss = mean_i [ log sum_{j != i} exp(cos(z_i, z_j) / t) - cos(z_i, z_{i +- B}) / t ]

    Projection head Linear-BN-ReLU-Linear; ``csrc_triton.nt_xent`` never stores the 2B x 2B
    similarities.
    """

    name = "simclr"

    def _loss(self, online, target, labels, n_views, batch):
        z1, z2 = self._views(online["projection"], n_views)
        value = csrc_triton.nt_xent(z1, z2, temperature=self.config.temperature, normalize=True,
                                    backend=self.config.loss_backend, process_group=self.process_group)
        return value, {}


class MoCo(_MomentumMethod):
    r"""MoCo v2 (Chen, Fan, Girshick and He 2020, "Improved Baselines with Momentum Contrastive
    Learning"; He et al. 2020, "Momentum Contrast"): queries q = normalise(g(f(x))) from the
    online network, keys k from its EMA copy (no gradient), negatives from a queue of the keys of
    past steps:

        L(q, k) = mean_i [ log( exp(q_i . k_i / t) + sum_j exp(q_i . queue_j / t) ) - q_i . k_i / t ]
        loss = (L(q1, k2) + L(q2, k1)) / 2       (moco_symmetric; else L(q1, k2))

    with ``csrc_triton.info_nce(queue=..., in_batch_negatives=False)``, t = temperature (0.2 in
    MoCo v2), a 2-layer MLP head without BatchNorm. The momentum follows a cosine schedule from
    ``momentum`` to ``momentum_final`` (solo-learn's MoCo v2+; the paper's fixed 0.999 is
    ``momentum=momentum_final=0.999``).

    Queue: ``queue`` (queue_size, projection_dim), a buffer of unit rows initialised at random
    (as MoCo's), ``queue_ptr`` the next row to write. ``loss`` keeps the normalised keys of view 1
    (k2, the positives of L(q1, k2), B per image batch, as MoCo enqueues); ``on_step_end``
    all-gathers them from every rank (rank order, no gradient) and writes them at ``queue_ptr``,
    wrapping around, so every rank holds the same queue. (MoCo's shuffling BN is not done:
    BatchNorm statistics are per rank.)
    """

    name = "moco"

    def __init__(self, config: MethodConfig, encoder: Backbone) -> None:
        super().__init__(config, encoder)
        self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, config.projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))
        self._pending_keys: Tensor | None = None

    def _loss(self, online, target, labels, n_views, batch):
        q1, q2 = self._views(F.normalize(online["projection"], dim=1), n_views)
        k1, k2 = self._views(F.normalize(target["projection"].detach(), dim=1), n_views)
        queue = self.queue.to(q1.dtype)
        opts = dict(temperature=self.config.temperature, queue=queue, in_batch_negatives=False,
                    backend=self.config.loss_backend)
        value = csrc_triton.info_nce(q1, k2, **opts)
        if self.config.moco_symmetric:
            value = (value + csrc_triton.info_nce(q2, k1, **opts)) / 2
        self._pending_keys = k2
        return value, self._momentum_stats()

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write the rows of ``keys`` (n, projection_dim) into the queue at ``queue_ptr`` (mod
        queue_size) and advance the pointer by n; with n > queue_size only the last queue_size
        rows are written. No host synchronisation (the pointer stays a tensor)."""
        size = self.queue.shape[0]
        if keys.dim() != 2 or keys.shape[1] != self.queue.shape[1]:
            raise ValueError(f"keys must have shape (n, {self.queue.shape[1]}), got shape {tuple(keys.shape)}")
        keys = keys[-size:]
        n = keys.shape[0]
        rows = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def on_step_end(self, step: int, total_steps: int) -> None:
        super().on_step_end(step, total_steps)
        if self._pending_keys is not None:
            self.enqueue(dist_.gather_constant(self._pending_keys, self.process_group))
            self._pending_keys = None


# ----------------------------------------------------------------------------------------------
# Supervised metric learning: SupCon, triplet, DrLIM, NCA
# ----------------------------------------------------------------------------------------------
class _LabelledProjectionMethod(_ProjectionMethod):
    needs_labels = True
    any_views = True

    @staticmethod
    def _rows_and_labels(online: dict[str, Tensor], labels: Tensor, n_views: int) -> tuple[Tensor, Tensor]:
        """Every view's row, each with its image's label (view-major: labels repeated V times)."""
        return online["projection"], labels.to(torch.int64).repeat(n_views)


class SupCon(_LabelledProjectionMethod):
    r"""Supervised contrastive learning (Khosla et al. 2020, "Supervised Contrastive Learning",
    L_out, eq. 2) over all V B views: the positives of a view are the other views of its image
    and every view of the images with its label,

        loss_i = log sum_{a != i} exp(z_i . z_a / t) - mean_{p in P(i)} z_i . z_p / t

    on L2-normalised projections (a Linear-ReLU-Linear head, as the paper's code);
    ``csrc_triton.supcon``.
    """

    name = "supcon"

    def _loss(self, online, target, labels, n_views, batch):
        z, y = self._rows_and_labels(online, labels, n_views)
        value = csrc_triton.supcon(z, y, temperature=self.config.temperature, normalize=True,
                                   backend=self.config.loss_backend, process_group=self.process_group)
        return value, {}


class Triplet(_LabelledProjectionMethod):
    r"""Batch-hard triplet loss (Hermans, Beyer and Leibe 2017, "In Defense of the Triplet Loss for
    Person Re-Identification") on L2-normalised projections, every view a row with its image's
    label (a P x K class-balanced sampler gives each anchor positives beyond its own views):

        loss = mean_a relu( max_{p: y_p = y_a} ||z_a - z_p|| - min_{n: y_n != y_a} ||z_a - z_n|| + margin )

    ``csrc_triton.triplet_margin(mining="batch_hard")`` (``triplet_mining`` selects batch_all or
    semi_hard instead).
    """

    name = "triplet"

    def _loss(self, online, target, labels, n_views, batch):
        z, y = self._rows_and_labels(online, labels, n_views)
        value = csrc_triton.triplet_margin(
            F.normalize(z, dim=1), y, margin=self.config.triplet_margin, mining=self.config.triplet_mining,
            distance="euclidean", backend=self.config.loss_backend, process_group=self.process_group,
        )
        return value, {}


class DrLIM(_LabelledProjectionMethod):
    r"""DrLIM's contrastive loss (Hadsell, Chopra and LeCun 2006, "Dimensionality Reduction by
    Learning an Invariant Mapping") over all ordered pairs of the V B views, similar when their
    labels agree:

        L_ij = y_ij d_ij^2 / 2 + (1 - y_ij) relu(margin - d_ij)^2 / 2,   d_ij = ||z_i - z_j||

    averaged over the pairs; on L2-normalised projections by default (``drlim_normalize``).
    ``csrc_triton.drlim``.
    """

    name = "drlim"

    def _loss(self, online, target, labels, n_views, batch):
        z, y = self._rows_and_labels(online, labels, n_views)
        if self.config.drlim_normalize:
            z = F.normalize(z, dim=1)
        value = csrc_triton.drlim(z, y, margin=self.config.drlim_margin, backend=self.config.loss_backend,
                                  process_group=self.process_group)
        return value, {}


class NCA(_LabelledProjectionMethod):
    r"""Neighbourhood Components Analysis (Goldberger, Roweis, Hinton and Salakhutdinov 2004) as a
    loss on L2-normalised projections of all V B views:

        loss_i = -log sum_{j in P(i)} softmax_{k != i}( -s ||z_i - z_k||^2 )_j

    s = ``nca_scale`` (None: 1 / (2 temperature)). ``csrc_triton.nca``.
    """

    name = "nca"

    def _loss(self, online, target, labels, n_views, batch):
        z, y = self._rows_and_labels(online, labels, n_views)
        scale = self.config.nca_scale if self.config.nca_scale is not None else 0.5 / self.config.temperature
        value = csrc_triton.nca(z, y, scale=scale, normalize=True, backend=self.config.loss_backend,
                                process_group=self.process_group)
        return value, {}


# ----------------------------------------------------------------------------------------------
# Non-contrastive: BYOL, SimSiam, Barlow Twins, VICReg
# ----------------------------------------------------------------------------------------------
class _PredictorMixin:
    """BYOL's and SimSiam's predictor q on top of the projection: adds ``"prediction"``."""

    def __init__(self, config: MethodConfig, encoder: Backbone) -> None:
        super().__init__(config, encoder)  # type: ignore[call-arg]
        self.predictor = PredictionHead(config.projection_dim, config.prediction_hidden or config.projection_hidden,
                                        config.projection_dim)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = super().forward(x)  # type: ignore[misc]
        out["prediction"] = self.predictor(out["projection"])
        return out


class BYOL(_PredictorMixin, _MomentumMethod):
    r"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent"): an online encoder, projector and
    predictor q; a target encoder and projector, EMAs of the online ones (cosine schedule from
    ``momentum``, 0.99 on CIFAR, to 1); the symmetrised loss

        loss = mean_i || q(z1)_i^ - t2_i^ ||^2 + || q(z2)_i^ - t1_i^ ||^2,    v^ = v / ||v||

    with no gradient into the targets t (``csrc_triton.byol``). Per-sample: nothing to gather
    under DDP.
    """

    name = "byol"
    online_keys = ("projection", "prediction")

    def _loss(self, online, target, labels, n_views, batch):
        p1, p2 = self._views(online["prediction"], n_views)
        t1, t2 = self._views(target["projection"], n_views)
        return csrc_triton.byol(p1, p2, t1, t2), self._momentum_stats()


class SimSiam(_PredictorMixin, _ProjectionMethod):
    r"""SimSiam (Chen and He 2021, "Exploring Simple Siamese Representation Learning"): one
    network, a projector (with an output BatchNorm) and a predictor h; the loss

        loss = mean_i -( cos(h(z1)_i, sg(z2_i)) + cos(h(z2)_i, sg(z1_i)) ) / 2

    with a stop-gradient on the projections (``csrc_triton.simsiam``). Stats: ``output_std``, the
    per-dimension standard deviation of the normalised projections averaged over dimensions
    (the paper's collapse monitor: about 1 / sqrt(projection_dim) when healthy, 0 when collapsed).
    """

    name = "simsiam"
    online_keys = ("projection", "prediction")

    def _loss(self, online, target, labels, n_views, batch):
        p1, p2 = self._views(online["prediction"], n_views)
        z1, z2 = self._views(online["projection"], n_views)
        value = csrc_triton.simsiam(p1, p2, z1, z2)
        with torch.no_grad():
            output_std = F.normalize(z1.float(), dim=1).std(dim=0).mean() if batch > 1 else z1.new_zeros(())
        return value, {"output_std": output_std}


class _BatchStatisticsMethod(_ProjectionMethod):
    """A loss of batch statistics of the two views' projections (Barlow Twins, VICReg).

    Under a process group the statistics are the global batch's: every rank gathers all ranks'
    rows with ``csrc_triton.distributed.gather_rows`` (exact gradients: the backward
    reduce-scatters each rank's gradient of the gathered rows to their owners) and computes the
    loss L of the global batch. Every rank returns L itself, so the mean over ranks is L; each
    rank's gradient of its own rows is the sum over ranks of dL/d(its rows) = R dL/d(its rows),
    and DDP's average of the parameter gradients, (1/R) sum_r R dL/dtheta|_(rank r's rows), is
    dL/dtheta: the convention of :mod:`csrc_triton.distributed`. (Each rank computes the whole
    D x D statistic on the R B rows: O(R B D^2) work, small next to the backbone for D ~ 10^2-10^3.)
    """

    def _global_views(self, online: dict[str, Tensor], n_views: int) -> tuple[Tensor, Tensor]:
        z1, z2 = self._views(online["projection"], n_views)
        if dist_.world(self.process_group)[1] > 1:
            dist_.check_same_shape("projection", online["projection"], self.process_group)
            z1, z2 = dist_.gather_rows(z1, self.process_group), dist_.gather_rows(z2, self.process_group)
        return z1, z2


class BarlowTwins(_BatchStatisticsMethod):
    r"""Barlow Twins (Zbontar, Jing, Misra, LeCun and Deny 2021, "Barlow Twins: Self-Supervised
    Learning via Redundancy Reduction"): the cross-correlation C of the batch-standardised views
    is pushed to the identity,

        loss = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2,    lambda = barlow_lambda

    (``csrc_triton.barlow_twins``), over the global batch under DDP; 3-layer projector.
    """

    name = "barlow"

    def _loss(self, online, target, labels, n_views, batch):
        z1, z2 = self._global_views(online, n_views)
        return csrc_triton.barlow_twins(z1, z2, lambd=self.config.barlow_lambda), {}


class VICReg(_BatchStatisticsMethod):
    r"""VICReg (Bardes, Ponce and LeCun 2022, "VICReg: Variance-Invariance-Covariance
    Regularization for Self-Supervised Learning"):

        loss = lambda MSE(z1, z2) + mu (v(z1) + v(z2)) / 2 + nu (c(z1) + c(z2))

    v the hinge on each dimension's standard deviation, c the off-diagonal covariance penalty
    (``csrc_triton.vicreg``), (lambda, mu, nu) = ``vicreg_weights``; the variance and covariance
    over the global batch under DDP, as the official code; 3-layer projector.
    """

    name = "vicreg"

    def _loss(self, online, target, labels, n_views, batch):
        z1, z2 = self._global_views(online, n_views)
        sim, var, cov = self.config.vicreg_weights
        return csrc_triton.vicreg(z1, z2, sim=sim, var=var, cov=cov), {}


# ----------------------------------------------------------------------------------------------
# Supervised baseline
# ----------------------------------------------------------------------------------------------
class Supervised(Method):
    r"""The supervised baseline: a linear classifier on the backbone's features, trained with
    cross-entropy on one augmented view per image (every view's row, with its image's label,
    when given more):

        loss = mean_i -log softmax(W f_i + b)_{y_i}

    Stats: ``accuracy``, the top-1 accuracy of the batch (a detached tensor, no host
    synchronisation).
    """

    name = "supervised"
    n_views = 1
    needs_labels = True
    any_views = True
    online_keys = ("logits",)

    def __init__(self, config: MethodConfig, encoder: Backbone, num_classes: int) -> None:
        super().__init__(config, encoder)
        self.classifier = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feature = self.encoder(x)
        return {"feature": feature, "logits": self.classifier(feature)}

    def _loss(self, online, target, labels, n_views, batch):
        logits = online["logits"]
        y = labels.to(torch.int64).repeat(n_views)
        # 16-bit logits (autocast) in float32; float32 and float64 as they are
        value = F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, y)
        accuracy = (logits.detach().argmax(dim=1) == y).float().mean()
        return value, {"accuracy": accuracy}


_REGISTRY: dict[str, type[Method]] = {
    cls.name: cls for cls in (SimCLR, MoCo, SupCon, Triplet, DrLIM, NCA, BYOL, SimSiam, BarlowTwins, VICReg)
}


def build_method(config: MethodConfig, backbone: Backbone, *, num_classes: int | None = None) -> Method:
    """The method ``config.name`` on ``backbone`` (which becomes its online ``encoder``).

    Args:
        config: a :class:`MethodConfig`.
        backbone: a :class:`~modalities.image.backbones.Backbone` (anything with ``feature_dim``
            and ``forward(x) -> (n, feature_dim)``); EMA methods deep-copy it for their target.
        num_classes: classes of the supervised baseline's classifier (required by it, >= 2).

    Example:
        >>> from modalities.image.backbones import build_backbone
        >>> method = build_method(MethodConfig(name="simclr", temperature=0.5), build_backbone("small_cnn"))
        >>> x = torch.randn(16, 3, 32, 32)                     # 8 images x 2 views, view-major
        >>> loss, stats = method.loss(method(x), method.forward_target(x), None, 2)
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be a MethodConfig, got {type(config).__name__}")
    if not isinstance(backbone, nn.Module) or not isinstance(getattr(backbone, "feature_dim", None), int):
        raise TypeError(
            f"backbone must be an nn.Module with an int feature_dim (a Backbone), got {type(backbone).__name__}"
        )
    if config.name == "supervised":
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r}: the supervised baseline needs the number of classes (>= 2)")
        return Supervised(config, backbone, num_classes)
    return _REGISTRY[config.name](config, backbone)


__all__ = [
    "BYOL", "BarlowTwins", "DrLIM", "HEAD_DEFAULTS", "LABELLED_METHODS", "METHODS", "Method", "MethodConfig", "MoCo",
    "NCA", "SimCLR", "SimSiam", "SupCon", "Supervised", "TARGET_METHODS", "Triplet", "VICReg", "build_method",
]
