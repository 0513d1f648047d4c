"""Public contrastive losses. Each one is a thin, validated front end to an op in
``torch.ops.contrastive``; the N x M logits are never stored (backend "triton" or "blockwise").

Notation: Q (N, D) queries, K (M, D) keys, s the logit scale (1 / temperature, or CLIP's
``logit_scale``), S = s Q K^T, r_i = log sum_j exp(S_ij), c_j = log sum_i exp(S_ij).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _validate as check
from . import distributed as dist_
from . import loss_ops  # noqa: F401  (registers torch.ops.contrastive.*)
from .ops import resolve_backend

TEMPERATURE = "temperature: logits are divided by it"
#: The shared words of every docstring about the two options every loss here takes.
COMMON_ARGS = """
        deterministic: bitwise-reproducible gradients run to run (the Triton backward then uses
            no floating-point atomics; the CPU backends always are).
        process_group: a ``torch.distributed`` group of R > 1 ranks: this rank's rows are the
            queries/anchors, the keys/negatives are the whole global batch (every rank's rows,
            in rank order). Each rank computes only its own strip of the similarity matrix. The
            returned value is R times this rank's share of the global loss, so its mean over
            ranks is the loss of one process on the concatenated batch, and DDP's averaged
            gradients are exactly that loss's gradients. Every rank must pass the same shapes."""


def _dispatch(name: str, impl, args: tuple, group: object | None, *shaped: tuple[str, Tensor]) -> Tensor:
    """The registered single-process op, or the distributed composite for a group of R > 1."""
    if dist_.world(group)[1] == 1:
        return getattr(torch.ops.contrastive, name)(*args)
    for arg_name, x in shaped:
        dist_.check_same_shape(arg_name, x, group)
    return impl(*args, group=group)


def info_nce(
    query: Tensor,
    key: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    queue: Tensor | None = None,
    in_batch_negatives: bool = True,
    symmetric: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    deterministic: bool = False,
    process_group: object | None = None,
) -> Tensor:
    r"""InfoNCE (van den Oord et al. 2018, "Representation Learning with Contrastive Predictive
    Coding"), a drop-in for ``F.cross_entropy(query @ key.T / t, arange(N))`` that never
    materialises the N x M logits.

    The positive of query i is key i; its negatives are every other key (``in_batch_negatives``)
    and every row of ``queue``:

        loss_i = log( sum_{j in negatives(i) + {i}} exp(S_ij) ) - S_ii,     S = query key^T / t

    ``queue=q, in_batch_negatives=False`` is MoCo's loss (He et al. 2020): logits
    ``[q_i . k_i, q_i . queue_j ...] / t`` with target 0. ``symmetric=True`` adds the
    key-to-query direction (column log-sum-exp) and averages the two (no queue allowed).
    Features are not normalised here.

    Args:
        query: (N, D) float32, bfloat16 or float16 (float64 on the CPU backends).
        key: (N, D), same dtype and device; row i is the positive of query i.
        temperature: positive float, or 0-dim tensor (its gradient is computed when it
            requires grad; a float32 tensor with bf16 features is fine).
        queue: optional (Q, D) extra negatives, e.g. a MoCo memory queue (no gradient flows
            into a queue that does not require grad).
        in_batch_negatives: use the other keys of the batch as negatives.
        symmetric: average with the key-to-query loss.
        reduction: "mean", "sum" or "none" (shape (N,)).
        backend: "auto" (triton on CUDA, blockwise on CPU), "triton", "blockwise" or "dense".{common}

    Returns:
        A float32 scalar (or (N,) with ``reduction="none"``). NaN in the inputs gives NaN.

    Example:
        >>> q = torch.nn.functional.normalize(torch.randn(256, 128), dim=1)
        >>> k = torch.nn.functional.normalize(q + 0.1 * torch.randn(256, 128), dim=1)
        >>> loss = info_nce(q, k, temperature=0.1)
    """
    check.pair("query", query, "key", key)
    scale = 1.0 / check.positive_scalar("temperature", temperature, query.device, query.dtype, what=TEMPERATURE,
                                        reciprocal=True)
    check.reduction(reduction)
    resolve_backend(backend, query.device, query.dtype)
    if queue is not None:
        check.features("queue", queue)
        check.same_kind("query", query, "queue", queue, same_rows=False)
        if symmetric:
            raise ValueError("symmetric=True cannot be combined with a queue: the queue has no queries of its own")
    elif not in_batch_negatives:
        raise ValueError("in_batch_negatives=False needs a queue of negatives (queue=None leaves none)")
    args = (query, key, scale, queue, in_batch_negatives, symmetric, reduction, bool(deterministic), backend)
    return _dispatch("info_nce", loss_ops.info_nce_impl, args, process_group, ("query", query))


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: float | Tensor,
    *,
    backend: str = "auto",
    deterministic: bool = False,
    process_group: object | None = None,
) -> Tensor:
    r"""Symmetric CLIP loss (Radford et al. 2021), as OpenCLIP's ``ClipLoss`` computes it:

        S = logit_scale * image_features @ text_features^T
        loss = ( CE(S, arange(N)) + CE(S^T, arange(N)) ) / 2
             = ( mean_i (r_i - S_ii) + mean_j (c_j - S_jj) ) / 2

    Both directions come from one pass over the tiles. ``logit_scale`` is the multiplier itself
    (``model.logit_scale.exp()``), a float or a 0-dim tensor; gradients flow to all three inputs.

    Args:
        image_features: (N, D). text_features: (N, D), same dtype and device.
        logit_scale: positive float or 0-dim tensor.
        backend: "auto", "triton", "blockwise" or "dense".{common}

    Example:
        >>> img = torch.nn.functional.normalize(torch.randn(64, 512), dim=1)
        >>> txt = torch.nn.functional.normalize(torch.randn(64, 512), dim=1)
        >>> loss = clip_loss(img, txt, logit_scale=torch.tensor(100.0))
    """
    check.pair("image_features", image_features, "text_features", text_features)
    scale = check.positive_scalar(
        "logit_scale", logit_scale, image_features.device, image_features.dtype, what="the logit multiplier"
    )
    resolve_backend(backend, image_features.device, image_features.dtype)
    args = (image_features, text_features, scale, bool(deterministic), backend)
    return _dispatch("clip_loss", loss_ops.clip_loss_impl, args, process_group, ("image_features", image_features))


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    *,
    temperature: float | Tensor = 0.5,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    deterministic: bool = False,
    process_group: object | None = None,
) -> Tensor:
    r"""NT-Xent, SimCLR's loss (Chen et al. 2020), over the 2N views z = [z1; z2]:

        loss_i = log sum_{j != i} exp(S_ij) - S_{i, i+-N},     S = z z^T / t,  i in 0..2N-1

    Each view's positive is its partner view; its negatives are the other 2N - 2 views.

    Args:
        z1, z2: (N, D) the two views' embeddings, same dtype and device.
        temperature: positive float or 0-dim tensor.
        normalize: L2-normalise the rows first (SimCLR's cosine similarity).
        reduction: "mean" over the 2N views, "sum", or "none" (shape (2N,)).
        backend: "auto", "triton", "blockwise" or "dense".{common}

    Example:
        >>> z1, z2 = torch.randn(128, 64), torch.randn(128, 64)
        >>> loss = nt_xent(z1, z2, temperature=0.5)
    """
    check.pair("z1", z1, "z2", z2)
    scale = 1.0 / check.positive_scalar("temperature", temperature, z1.device, z1.dtype, what=TEMPERATURE,
                                        reciprocal=True)
    check.reduction(reduction)
    resolve_backend(backend, z1.device, z1.dtype)
    args = (z1, z2, scale, bool(normalize), reduction, bool(deterministic), backend)
    return _dispatch("nt_xent", loss_ops.nt_xent_impl, args, process_group, ("z1", z1))


def supcon(
    features: Tensor,
    labels: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    normalize: bool = True,
    backend: str = "auto",
    deterministic: bool = False,
    process_group: object | None = None,
) -> Tensor:
    r"""Supervised contrastive loss, L_out of Khosla et al. 2020 (eq. 2):

        loss_i = log sum_{a != i} exp(S_ia) - (1 / |P(i)|) sum_{p in P(i)} S_ip,   S = z z^T / t

    over all N * V views, where P(i) are the other views with i's label. The mean over P(i)
    equals s z_i . (class sum - z_i) / |P(i)|, computed in O(N D) outside the tiles. Anchors
    without a positive are left out of the mean; if none has one, ValueError.

    Args:
        features: (N, D), or (N, V, D) with V views per sample.
        labels: (N,) integer class ids (one per sample, shared by its views).
        temperature: positive float or 0-dim tensor.
        normalize: L2-normalise the rows first.
        backend: "auto", "triton", "blockwise" or "dense".{common}

    Example:
        >>> feats = torch.randn(32, 2, 128)           # 32 samples, 2 views
        >>> labels = torch.randint(0, 4, (32,))
        >>> loss = supcon(feats, labels, temperature=0.1)
    """
    check.features("features", features, ndims=(2, 3))
    check.labels(labels, features.shape[0], features.device)
    scale = 1.0 / check.positive_scalar("temperature", temperature, features.device, features.dtype,
                                        what=TEMPERATURE, reciprocal=True)
    resolve_backend(backend, features.device, features.dtype)
    views = features.shape[1] if features.dim() == 3 else 1
    if views == 1 and dist_.world(process_group)[1] == 1:
        check.some_positive("supcon", labels, labels)
    args = (features, labels, scale, bool(normalize), bool(deterministic), backend)
    return _dispatch("supcon", loss_ops.supcon_impl, args, process_group, ("features", features))


def nca(
    embeddings: Tensor,
    labels: Tensor,
    *,
    scale: float | Tensor = 1.0,
    normalize: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    deterministic: bool = False,
    process_group: object | None = None,
) -> Tensor:
    r"""Neighbourhood Components Analysis (Goldberger et al. 2004), as a loss on embeddings:

        p_ij = exp(-s ||x_i - x_j||^2) / sum_{k != i} exp(-s ||x_i - x_k||^2)      (j != i)
        loss_i = -log sum_{j in P(i)} p_ij,      P(i) = {j != i : labels_j = labels_i}

    averaged over the anchors that have a positive. Both log-sum-exps come from one tiled pass:
    -s||x_i - x_j||^2 = 2s x_i.x_j - s|x_j|^2 - s|x_i|^2, where the last term cancels, so the
    engine runs with scale 2s, a per-column bias -s|x_j|^2 and the label mask. Never stores
    the N x N distances; 2N^2 D flops forward, 4N^2 D backward.

    Args:
        embeddings: (N, D) float32, bfloat16, float16 (float64 on the CPU backends).
        labels: (N,) integer class ids.
        scale: s > 0, the softmax scale on squared distances (pytorch-metric-learning's
            ``softmax_scale``); float or 0-dim tensor (gets a gradient if it requires one).
        normalize: L2-normalise the rows first.
        reduction: "mean" over anchors with a positive, "sum", or "none" ((N,), 0 for anchors
            without a positive).
        backend: "auto", "triton", "blockwise" or "dense".{common}

    Example:
        >>> x = torch.randn(512, 64, requires_grad=True)
        >>> loss = nca(x, torch.randint(0, 16, (512,)), scale=0.5)
    """
    check.features("embeddings", embeddings)
    check.labels(labels, embeddings.shape[0], embeddings.device)
    s = check.positive_scalar("scale", scale, embeddings.device, embeddings.dtype,
                              what="the softmax scale on squared distances")
    check.reduction(reduction)
    resolve_backend(backend, embeddings.device, embeddings.dtype)
    if dist_.world(process_group)[1] == 1:
        check.some_positive("nca", labels, labels)
    args = (embeddings, labels, s, bool(normalize), reduction, bool(deterministic), backend)
    return _dispatch("nca", loss_ops.nca_impl, args, process_group, ("embeddings", embeddings))


def n_pair(
    anchors: Tensor,
    positives: Tensor,
    *,
    l2_reg: float = 0.002,
    backend: str = "auto",
    deterministic: bool = False,
    process_group: object | None = None,
) -> Tensor:
    r"""Multi-class N-pair loss (Sohn 2016, "Improved Deep Metric Learning with Multi-class
    N-pair Loss Objective"):

        loss = mean_i log(1 + sum_{j != i} exp(f_i.f+_j - f_i.f+_i))
               + l2_reg * mean over the 2N embeddings of |f|^2

    The first term is InfoNCE at temperature 1 over the in-batch positives (one tiled pass).
    16-bit inputs are computed in float32, so the two terms' gradients are summed before the
    one rounding to the input dtype.

    Args:
        anchors, positives: (N, D), row i of each a positive pair (one pair per class).
        l2_reg: weight of the embedding-norm regulariser, >= 0.
        backend: "auto", "triton", "blockwise" or "dense".{common}

    Example:
        >>> loss = n_pair(torch.randn(128, 64), torch.randn(128, 64))
    """
    check.pair("anchors", anchors, "positives", positives)
    l2 = check.non_negative("l2_reg", l2_reg, what="weight of the squared-norm regulariser")
    resolve_backend(backend, anchors.device, anchors.dtype)
    args = (anchors, positives, l2, bool(deterministic), backend)
    return _dispatch("n_pair", loss_ops.n_pair_impl, args, process_group, ("anchors", anchors))


def uniformity(
    x: Tensor,
    *,
    t: float | Tensor = 2.0,
    backend: str = "auto",
    deterministic: bool = False,
    process_group: object | None = None,
) -> Tensor:
    r"""Uniformity of embeddings on the hypersphere (Wang and Isola 2020):

        uniformity = log mean_{i != j} exp(-t ||x_i - x_j||^2)

    as one tiled pass of the engine (scale 2t, column bias -t|x_j|^2, the row term -t|x_i|^2
    added after), so it runs on 10^6 embeddings in O(N D) memory. The rows are used as given
    (Wang and Isola apply it to L2-normalised features: normalise first). With a process group,
    every rank returns the uniformity of the global batch. 16-bit inputs are computed in
    float32: x enters as queries, keys, bias and row term, whose gradients largely cancel, and
    they must be summed before the one rounding to the input dtype.

    Args:
        x: (N, D), N >= 2 (over the whole group).
        t: positive float or 0-dim tensor.
        backend: "auto", "triton", "blockwise" or "dense".{common}

    Example:
        >>> z = torch.nn.functional.normalize(torch.randn(4096, 128), dim=1)
        >>> u = uniformity(z, t=2.0)      # about -3.9 for uniform points in 128-D
    """
    check.features("x", x)
    tt = check.positive_scalar("t", t, x.device, x.dtype, what="the Gaussian potential's scale")
    resolve_backend(backend, x.device, x.dtype)
    if x.shape[0] * dist_.world(process_group)[1] < 2:
        raise ValueError(f"uniformity needs at least 2 rows in x (pairs i != j), got shape {tuple(x.shape)}")
    args = (x, tt, bool(deterministic), backend)
    return _dispatch("uniformity", loss_ops.uniformity_impl, args, process_group, ("x", x))


class _LossModule(nn.Module):
    """Module form of a loss function: the options are fixed at construction, the tensors are
    passed to ``forward``. Options are validated at the first call, by the function."""

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, Tensor))


class InfoNCELoss(_LossModule):
    """Module form of :func:`info_nce`; ``forward(query, key, queue=None)``."""

    def __init__(self, temperature: float | Tensor = 0.07, *, in_batch_negatives: bool = True,
                 symmetric: bool = False, reduction: str = "mean", backend: str = "auto",
                 deterministic: bool = False, process_group: object | None = None) -> None:
        super().__init__(temperature=temperature, in_batch_negatives=in_batch_negatives, symmetric=symmetric,
                         reduction=reduction, backend=backend, deterministic=deterministic,
                         process_group=process_group)

    def forward(self, query: Tensor, key: Tensor, queue: Tensor | None = None) -> Tensor:
        return info_nce(query, key, queue=queue, **self.options)


class ClipLoss(_LossModule):
    """Module form of :func:`clip_loss`; ``forward(image_features, text_features, logit_scale)``."""

    def __init__(self, *, backend: str = "auto", deterministic: bool = False,
                 process_group: object | None = None) -> None:
        super().__init__(backend=backend, deterministic=deterministic, process_group=process_group)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: float | Tensor) -> Tensor:
        return clip_loss(image_features, text_features, logit_scale, **self.options)


class NTXentLoss(_LossModule):
    """Module form of :func:`nt_xent`; ``forward(z1, z2)``."""

    def __init__(self, temperature: float | Tensor = 0.5, *, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", deterministic: bool = False, process_group: object | None = None) -> None:
        super().__init__(temperature=temperature, normalize=normalize, reduction=reduction, backend=backend,
                         deterministic=deterministic, process_group=process_group)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent(z1, z2, **self.options)


class SupConLoss(_LossModule):
    """Module form of :func:`supcon`; ``forward(features, labels)``."""

    def __init__(self, temperature: float | Tensor = 0.1, *, normalize: bool = True, backend: str = "auto",
                 deterministic: bool = False, process_group: object | None = None) -> None:
        super().__init__(temperature=temperature, normalize=normalize, backend=backend,
                         deterministic=deterministic, process_group=process_group)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return supcon(features, labels, **self.options)


class NCALoss(_LossModule):
    """Module form of :func:`nca`; ``forward(embeddings, labels)``."""

    def __init__(self, scale: float | Tensor = 1.0, *, normalize: bool = False, reduction: str = "mean",
                 backend: str = "auto", deterministic: bool = False, process_group: object | None = None) -> None:
        super().__init__(scale=scale, normalize=normalize, reduction=reduction, backend=backend,
                         deterministic=deterministic, process_group=process_group)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return nca(embeddings, labels, **self.options)


class NPairLoss(_LossModule):
    """Module form of :func:`n_pair`; ``forward(anchors, positives)``."""

    def __init__(self, l2_reg: float = 0.002, *, backend: str = "auto", deterministic: bool = False,
                 process_group: object | None = None) -> None:
        super().__init__(l2_reg=l2_reg, backend=backend, deterministic=deterministic, process_group=process_group)

    def forward(self, anchors: Tensor, positives: Tensor) -> Tensor:
        return n_pair(anchors, positives, **self.options)


class UniformityLoss(_LossModule):
    """Module form of :func:`uniformity`; ``forward(x)``."""

    def __init__(self, t: float | Tensor = 2.0, *, backend: str = "auto", deterministic: bool = False,
                 process_group: object | None = None) -> None:
        super().__init__(t=t, backend=backend, deterministic=deterministic, process_group=process_group)

    def forward(self, x: Tensor) -> Tensor:
        return uniformity(x, **self.options)


for _fn in (info_nce, clip_loss, nt_xent, supcon, nca, n_pair, uniformity):
    _fn.__doc__ = _fn.__doc__.replace("{common}", COMMON_ARGS)
