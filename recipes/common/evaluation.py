"""Evaluation of learned representations, shared by the speech, image and CLIP recipes.

* :func:`extract_features`: a frozen encoder's pooled features for a set of images.
* :func:`knn_top1` / :func:`knn_predict`: weighted k-nearest-neighbour classification on cosine
  similarity (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination", §3.4; the k = 200, T = 0.1 monitor of solo-learn and lightly).
* :func:`linear_probe`: softmax regression on frozen, standardised features (moved here from
  ``cpc.probes``; the CPC recipe uses it with the default Adam solver, unchanged, so CPC's
  numbers are too), with an L-BFGS solver that reaches the optimum of the same objective as
  scikit-learn's ``LogisticRegression``.
* :func:`confusion_matrix`, :func:`miou`, :func:`pixel_accuracy`: segmentation metrics
  (Long et al. 2015, "Fully Convolutional Networks for Semantic Segmentation", §5).
* :func:`train_classifier` and :func:`train_segmentation`: downstream training with the metric
  recorded after every epoch (:class:`Curve`), on a frozen encoder or fine-tuned, for the
  convergence study of ``recipes.image_downstream``.

These functions are evaluation, not the training hot path: they synchronise with the device
where a Python number is returned (documented per function).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Curve",
    "LinearProbeModel",
    "ProbeConfig",
    "ProbeResult",
    "PROBE_SOLVERS",
    "Rows",
    "confusion_matrix",
    "extract_features",
    "fit_linear_probe",
    "knn_predict",
    "knn_top1",
    "linear_probe",
    "miou",
    "pixel_accuracy",
    "train_classifier",
    "train_segmentation",
]

PROBE_SOLVERS = ("adam", "lbfgs")


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor | torch.utils.data.Dataset,
                     transform: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                     batch_size: int = 512, device: str | torch.device = "cpu",
                     workers: int = 0) -> torch.Tensor:
    """Pooled features of a frozen encoder, in evaluation mode, batch by batch.

    Args:
        encoder: maps a float batch (B, 3, h, w) to (B, D); it must already live on ``device``.
            It is put in ``eval()`` mode for the extraction (BatchNorm uses its running
            statistics, nothing is updated) and given back in the mode it had.
        images: uint8 (N, 3, H, W), or a dataset whose items are ``(image uint8 (3, H, W),
            label)`` (e.g. ``ClassFolderDataset`` for images too big to hold decoded), read with
            a ``DataLoader`` of ``workers`` processes.
        transform: deterministic callable applied to a whole uint8 batch (B, 3, H, W), returning
            a float batch (e.g. ``modalities.image.transforms.eval_transform(size)``: resize,
            scale to [0, 1], normalise). None: ``x / 255``.
        batch_size: images per forward pass.
        device: where the forward passes run.

    Returns:
        float32 (N, D) on the CPU.

    Example:
        >>> feats = extract_features(backbone, test_set.images, eval_transform(32))
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder: expected an nn.Module, got {type(encoder).__name__}")
    _check_positive_int("batch_size", batch_size)
    if isinstance(images, torch.Tensor):
        _check_images("images", images)
        batches = (images[s:s + batch_size] for s in range(0, images.shape[0], batch_size))
        n = images.shape[0]
    elif isinstance(images, torch.utils.data.Dataset):
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False,
                                             num_workers=workers)
        batches = (batch[0] for batch in loader)
        n = len(images)  # type: ignore[arg-type]
    else:
        raise TypeError(f"images: expected a uint8 tensor (N, 3, H, W) or a Dataset, got "
                        f"{type(images).__name__}")
    if n == 0:
        raise ValueError("images: expected at least one image, got 0")
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for batch in batches:
            x = _apply_batch_transform(transform, batch.to(device, non_blocking=True))
            feats = encoder(x)
            if feats.dim() != 2 or feats.shape[0] != x.shape[0]:
                raise ValueError(f"encoder output shape {tuple(feats.shape)} for a batch of "
                                 f"{x.shape[0]} images: expected (B, D) pooled features")
            out.append(feats.float().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out)


def _apply_batch_transform(transform: Callable | None, x: torch.Tensor) -> torch.Tensor:
    if transform is None:
        return x.float().div_(255.0)
    y = transform(x)
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise TypeError(f"transform returned {type(y).__name__}"
                        f"{'' if not isinstance(y, torch.Tensor) else ' of ' + str(y.dtype)}: "
                        "expected a float tensor batch")
    return y


# ----------------------------------------------------------------------------------------------
# Weighted kNN
# ----------------------------------------------------------------------------------------------
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, *,
                k: int = 200, temperature: float = 0.1, num_classes: int | None = None,
                chunk: int = 1024) -> torch.Tensor:
    r"""Weighted kNN class predictions on cosine similarity (Wu et al. 2018, §3.4).

    For a test row q, with s_j = cos(q, x_j) over the training rows and N_k(q) its k most
    similar training rows:

        score_c(q) = sum_{j in N_k(q), y_j = c} exp(s_j / T),     prediction = argmax_c score_c

    (computed as exp((s_j - max_j s_j) / T), the same argmax, so T = 0.01 does not overflow).
    Ties are broken deterministically: among training rows equally similar at the k-th place
    the lowest training indices are kept; among classes with equal scores the lowest class id
    wins. k is clipped to N (k >= N: every training row votes). Memory O(chunk x N): test rows
    are processed ``chunk`` at a time (measured: about 2 x chunk x N x 4 bytes beyond the
    inputs at N = 50,000).

    Args:
        train_x: (N, D) float features; train_y: (N,) int64 labels in [0, num_classes).
        test_x: (M, D) float features, same D and device.
        k: neighbours, >= 1. temperature: T > 0.
        num_classes: None: ``train_y.max() + 1``.
        chunk: test rows per block.

    Returns:
        int64 (M,) predicted class ids, on test_x's device. float64 inputs are computed in
        float64, others in float32. Rows containing NaN get an unspecified prediction (use
        :func:`knn_top1`, which returns NaN for them).

    Example:
        >>> pred = knn_predict(train_feats, train_labels, test_feats, k=200, temperature=0.1)
    """
    _check_features("train_x", train_x)
    _check_features("test_x", test_x)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x.shape={tuple(train_x.shape)}, test_x.shape="
                         f"{tuple(test_x.shape)}: expected the same feature dimension")
    n = train_x.shape[0]
    if n == 0:
        raise ValueError("train_x: expected at least one training row, got 0")
    _check_labels("train_y", train_y, n)
    _check_positive_int("k", k)
    _check_positive_int("chunk", chunk)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature={temperature!r}: expected a finite number > 0")
    classes = _num_classes(num_classes, train_y)
    k = min(k, n)
    dtype = torch.float64 if train_x.dtype == torch.float64 else torch.float32
    train = F.normalize(train_x.to(dtype), dim=1)
    test = F.normalize(test_x.to(device=train.device, dtype=dtype), dim=1)
    labels = train_y.to(train.device)
    preds = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T                       # (c, N) cosine
        # k + 1 values: the (k+1)-th equal to the k-th means ties straddle the k-th place, where
        # topk's choice among equal values is unspecified
        values, index = sim.topk(min(k + 1, n), dim=1)                   # descending
        overflow = values[:, k] == values[:, k - 1] if k < n else None
        values, index = values[:, :k], index[:, :k]
        top = values[:, :1]
        votes = torch.zeros(sim.shape[0], classes, dtype=dtype, device=sim.device)
        votes.scatter_add_(1, labels[index], torch.exp((values - top) / temperature))
        if overflow is not None and bool(overflow.any()):
            rows = overflow.nonzero()[:, 0]                              # rare: exact duplicates
            votes[rows] = _tied_votes(sim[rows], values[rows], labels, k, temperature, classes)
        preds.append(votes.argmax(1))                                    # first max: lowest id
    if not preds:
        return torch.zeros(0, dtype=torch.long, device=train.device)
    return torch.cat(preds)


def _tied_votes(sim: torch.Tensor, values: torch.Tensor, labels: torch.Tensor, k: int,
                temperature: float, classes: int) -> torch.Tensor:
    """Votes of rows whose k-th place is shared by equal similarities: every training row more
    similar than the k-th value, then the lowest-indexed rows equal to it until k are taken."""
    kth = values[:, k - 1:k]
    needed = k - (values > kth).sum(1, keepdim=True)                     # places left for ties
    tied = sim == kth
    chosen = (sim > kth) | (tied & (tied.to(torch.int32).cumsum(1) <= needed))
    weight = torch.exp((sim - values[:, :1]) / temperature).masked_fill_(~chosen, 0.0)
    votes = torch.zeros(sim.shape[0], classes, dtype=sim.dtype, device=sim.device)
    return votes.index_add_(1, labels, weight)                           # votes[:, y_j] += w[:, j]


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
             test_y: torch.Tensor, *, k: int = 200, temperature: float = 0.1,
             num_classes: int | None = None, chunk: int = 1024) -> float:
    """Top-1 accuracy (a fraction) of :func:`knn_predict` on ``(test_x (M, D), test_y (M,))``.

    ``num_classes`` None: ``max(train_y.max(), test_y.max()) + 1``; a test class absent from
    training is never predicted (an error). NaN or infinite features anywhere: NaN (the
    representation diverged; a chance-level number would hide it). Synchronises (returns a
    Python float).

    Example:
        >>> acc = knn_top1(train_feats, train_labels, test_feats, test_labels)  # k=200, T=0.1
    """
    _check_features("train_x", train_x)
    _check_labels("train_y", train_y, train_x.shape[0])
    _check_features("test_x", test_x)
    _check_labels("test_y", test_y, test_x.shape[0])
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError(f"train_x.shape={tuple(train_x.shape)}, test_x.shape="
                         f"{tuple(test_x.shape)}: expected at least one row in each")
    top = max(int(train_y.max()), int(test_y.max())) + 1
    if num_classes is None:
        num_classes = top
    elif isinstance(num_classes, int) and not isinstance(num_classes, bool) and top > num_classes:
        raise ValueError(f"labels contain class id {top - 1}: expected ids in "
                         f"[0, num_classes={num_classes})")
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature,
                       num_classes=num_classes, chunk=chunk)
    if not (bool(torch.isfinite(train_x).all()) and bool(torch.isfinite(test_x).all())):
        return float("nan")
    return (pred == test_y.to(pred.device)).double().mean().item()


# ----------------------------------------------------------------------------------------------
# Linear probe (softmax regression on frozen features)
# ----------------------------------------------------------------------------------------------
@dataclass
class ProbeConfig:
    """Settings of :func:`linear_probe`.

    The objective, for standardised features x_i and labels y_i (N rows, C classes):

        L(W, b) = mean_i CE(W^T x_i + b, y_i) + (weight_decay / 2) ||W||^2
                  [+ (weight_decay / 2) ||b||^2 if penalize_bias]

    solver "adam": full-batch Adam (``weight_decay`` as Adam's L2 term, which is the gradient
    of the penalty above), ``iterations`` steps of size ``lr`` from a seeded initialisation
    N(0, 0.01^2); the toolkit's CPC probe (defaults unchanged, bias penalised). Fast and
    fixed-cost, but it stops short of the optimum on separable data.
    solver "lbfgs": L-BFGS with strong-Wolfe line search in float64, at most ``iterations``
    iterations (``lr`` unused), from zero: converges to the optimum of L, the objective
    scikit-learn's ``LogisticRegression(C=...)`` minimises with C = 1 / (weight_decay * N) for
    three or more classes and C = 2 / (weight_decay * N) for two (sklearn fits one weight
    vector w = w_1 - w_0; the softmax optimum has w_0 = -w_1, so its penalty is ||w||^2 / 2),
    with ``penalize_bias=False`` (sklearn never penalises the intercept with lbfgs).
    """

    iterations: int = 300
    lr: float = 0.05
    weight_decay: float = 1e-4
    seed: int = 0
    solver: str = "adam"
    penalize_bias: bool = True

    def __post_init__(self) -> None:
        _check_positive_int("iterations", self.iterations)
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name}={value!r}: expected a finite number "
                                 f"{'> 0' if name == 'lr' else '>= 0'}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: expected an integer")
        if self.solver not in PROBE_SOLVERS:
            raise ValueError(f"solver={self.solver!r}: expected one of {PROBE_SOLVERS}")
        if not isinstance(self.penalize_bias, bool):
            raise ValueError(f"penalize_bias={self.penalize_bias!r}: expected a bool")


@dataclass
class ProbeResult:
    accuracy: float
    train_accuracy: float
    n_train: int
    n_test: int
    n_classes: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Rows:
    """Rows of an (N, D) feature matrix read a chunk at a time, so that a probe never holds
    more than one chunk of features (plus O(N) labels): :func:`fit_linear_probe` and
    :func:`linear_probe` accept one wherever they accept a tensor.

    ``read(start, stop)`` returns rows ``[start, stop)`` as a tensor (any floating dtype) or an
    array; ``shape`` is (N, D). ``Rows.of(tensor)`` wraps an in-memory matrix.

    Example:
        >>> src = Rows((n, d), lambda a, b: torch.from_numpy(np.fromfile(f, np.float32,
        ...            (b - a) * d, offset=4 * a * d).reshape(b - a, d)))
        >>> linear_probe(src, labels, test_x, test_labels, chunk_rows=65536)
    """

    def __init__(self, shape: tuple[int, int], read: Callable[[int, int], Any],
                 device: torch.device | str = "cpu") -> None:
        if len(shape) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                  for v in shape):
            raise ValueError(f"shape={shape!r}: expected (N, D) of integers >= 0")
        self.shape = (int(shape[0]), int(shape[1]))
        self._read = read
        self.device = torch.device(device)

    @classmethod
    def of(cls, x: "torch.Tensor | Rows") -> "Rows":
        if isinstance(x, Rows):
            return x
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"features of shape {tuple(getattr(x, 'shape', ()))}: expected an "
                             f"(N, D) tensor or a Rows")
        return cls((int(x.shape[0]), int(x.shape[1])), lambda a, b: x[a:b], x.device)

    def read(self, start: int, stop: int) -> torch.Tensor:
        x = self._read(start, stop)
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
        if tuple(x.shape) != (stop - start, self.shape[1]):
            raise ValueError(f"Rows.read({start}, {stop}) returned shape {tuple(x.shape)}: "
                             f"expected {(stop - start, self.shape[1])}")
        return x.to(self.device)

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, int]]:
        n = self.shape[0]
        for start in range(0, n, chunk_rows):
            yield start, min(n, start + chunk_rows)


@dataclass
class LinearProbeModel:
    """A fitted probe: ``logits(x) = ((x - mean) / std) @ weight + bias`` over ``classes``
    (the sorted distinct training labels)."""

    weight: torch.Tensor   # (D, C) float32 (adam) or float64 (lbfgs)
    bias: torch.Tensor     # (C,)
    mean: torch.Tensor     # (D,) float64
    std: torch.Tensor      # (D,) float64
    classes: list

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.mean) / self.std).to(self.weight.dtype)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(M, D) features -> (M, C) logits."""
        return self.standardise(x) @ self.weight + self.bias

    def predict_index(self, x: "torch.Tensor | Rows", chunk_rows: int | None = None
                      ) -> torch.Tensor:
        """(M,) int64 positions in ``classes`` (first maximum on ties); a :class:`Rows` or
        ``chunk_rows`` is predicted a chunk at a time."""
        if isinstance(x, torch.Tensor) and chunk_rows is None:
            return self.logits(x).argmax(1)
        src = Rows.of(x)
        step = chunk_rows or max(1, src.shape[0])
        out = [self.logits(src.read(a, b).to(self.mean.device)).argmax(1)
               for a, b in src.chunks(step)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=self.mean.device)

    def predict(self, x: "torch.Tensor | Rows", chunk_rows: int | None = None) -> list:
        """Predicted labels (values from ``classes``)."""
        return [self.classes[i] for i in self.predict_index(x, chunk_rows).tolist()]


def _check_chunk_rows(chunk_rows: Any) -> None:
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows={chunk_rows!r}: expected None or an integer >= 1")


def _label_index(labels: Sequence, classes: list | None = None
                 ) -> tuple[list, torch.Tensor]:
    """(sorted distinct labels, int64 positions of ``labels`` in them; -1 for a label not in
    ``classes`` when given). Integer tensors take a vectorised path (no Python list of N)."""
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point() \
            and not labels.is_complex() and labels.dtype != torch.bool:
        y = labels.reshape(-1).long()
        if classes is None:
            known = torch.unique(y)  # sorted
            classes = known.tolist()
        else:
            known = torch.tensor(classes, dtype=torch.long, device=y.device) \
                if classes and all(isinstance(c, int) and not isinstance(c, bool) for c in classes) \
                else None
            if known is None:  # classes of another type: no integer label is among them
                return classes, torch.full_like(y, -1)
        known = known.to(y.device)
        pos = torch.searchsorted(known, y).clamp(max=max(len(classes) - 1, 0))
        hit = known[pos] == y if len(classes) else torch.zeros_like(y, dtype=torch.bool)
        return classes, torch.where(hit, pos, torch.full_like(pos, -1))
    keys = _keys(labels)
    if classes is None:
        classes = sorted(set(keys))
    index = {c: i for i, c in enumerate(classes)}
    return classes, torch.tensor([index.get(c, -1) for c in keys], dtype=torch.long)


def fit_linear_probe(train_x: "torch.Tensor | Rows", train_y: Sequence,
                     config: ProbeConfig | None = None, *, chunk_rows: int | None = None
                     ) -> LinearProbeModel:
    """Fit the softmax regression of :class:`ProbeConfig` on ``(train_x (N, D), train_y)``.
    Labels may be any sortable hashable values. Features are standardised with the training
    split's mean and (population) standard deviation, clamped at 1e-6.

    ``chunk_rows``: when set (or ``train_x`` is a :class:`Rows`), the statistics, every
    objective evaluation and every gradient are sums over chunks of at most ``chunk_rows``
    rows, read from ``train_x`` and standardised one at a time: the same objective and solver
    steps (equal up to the order of float64 sums), with memory independent of N apart from
    the labels. None with a tensor: the whole split at once.

    Example:
        >>> probe = fit_linear_probe(feats, labels, ProbeConfig(solver="lbfgs"))
        >>> probe.predict(test_feats)[:3]
    """
    config = config or ProbeConfig()
    if not isinstance(config, ProbeConfig):
        raise TypeError(f"config: expected a ProbeConfig, got {type(config).__name__}")
    _check_chunk_rows(chunk_rows)
    if isinstance(train_x, torch.Tensor) and train_x.dim() != 2 or \
            not isinstance(train_x, (torch.Tensor, Rows)):
        raise ValueError(f"train_x.shape={tuple(getattr(train_x, 'shape', ()))}: expected (N, D)")
    n = int(train_x.shape[0])
    if len(train_y) != n:
        raise ValueError(f"len(train_y)={len(train_y)}: expected {n} (rows of train_x)")
    if n == 0:
        raise ValueError("empty probe split: expected training and test examples")
    device = train_x.device
    classes, ytr = _label_index(train_y)
    ytr = ytr.to(device)

    if isinstance(train_x, torch.Tensor) and chunk_rows is None:
        xtr = train_x.double()
        mean = xtr.mean(0)
        std = xtr.std(0, unbiased=False).clamp_min(1e-6)
        xtr = (xtr - mean) / std
        if config.solver == "adam":
            x32 = xtr.float()
            weight, bias = _fit_adam(lambda: [(x32, ytr)], n, int(xtr.shape[1]),
                                     len(classes), config, device, whole=True)
        else:
            weight, bias = _fit_lbfgs(lambda: [(xtr, ytr)], n, int(xtr.shape[1]), len(classes),
                                      config, device, whole=True)
        return LinearProbeModel(weight.detach(), bias.detach(), mean, std, classes)

    src = Rows.of(train_x)
    step = chunk_rows or n
    d = src.shape[1]
    total = torch.zeros(d, dtype=torch.float64, device=device)
    for a, b in src.chunks(step):
        total += src.read(a, b).double().sum(0)
    mean = total / n
    squares = torch.zeros(d, dtype=torch.float64, device=device)
    for a, b in src.chunks(step):
        # a float64 copy of the chunk, centred in place: one chunk-sized buffer at a time
        squares += src.read(a, b).to(torch.float64, copy=True).sub_(mean).square_().sum(0)
    std = (squares / n).sqrt().clamp_min(1e-6)
    dtype = torch.float32 if config.solver == "adam" else torch.float64

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for a, b in src.chunks(step):
            x = src.read(a, b).to(torch.float64, copy=True).sub_(mean).div_(std)
            yield x.to(dtype), ytr[a:b]

    fit = _fit_adam if config.solver == "adam" else _fit_lbfgs
    weight, bias = fit(batches, n, d, len(classes), config, device, whole=False)
    return LinearProbeModel(weight.detach(), bias.detach(), mean, std, classes)


def _data_loss(batches: Callable[[], Any], n: int, weight: torch.Tensor, bias: torch.Tensor,
               whole: bool) -> torch.Tensor:
    """Mean cross-entropy over all rows, backpropagated chunk by chunk (the graph of one chunk
    at a time); returns the detached value."""
    if whole:
        ((x, y),) = list(batches())
        loss = F.cross_entropy(x @ weight + bias, y)
        loss.backward()
        return loss.detach()
    value = torch.zeros((), dtype=weight.dtype, device=weight.device)
    for x, y in batches():
        loss = F.cross_entropy(x @ weight + bias, y, reduction="sum") / n
        loss.backward()
        value += loss.detach()
    return value


def _fit_adam(batches: Callable[[], Any], n: int, d: int, n_classes: int, config: ProbeConfig,
              device: torch.device, whole: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # The CPC probe as it always was (penalize_bias=True: one parameter group, Adam's L2 on both).
    gen = torch.Generator().manual_seed(config.seed)
    weight = (torch.randn(d, n_classes, generator=gen) * 0.01).to(device).requires_grad_()
    bias = torch.zeros(n_classes, device=device, requires_grad=True)
    if config.penalize_bias:
        groups: Any = [weight, bias]
    else:
        groups = [{"params": [weight]}, {"params": [bias], "weight_decay": 0.0}]
    opt = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    with torch.enable_grad():
        for _ in range(config.iterations):
            opt.zero_grad(set_to_none=True)
            _data_loss(batches, n, weight, bias, whole)
            opt.step()
    return weight, bias


def _fit_lbfgs(batches: Callable[[], Any], n: int, d: int, n_classes: int, config: ProbeConfig,
               device: torch.device, whole: bool) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(d, n_classes, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=config.iterations,
                            max_eval=2 * config.iterations, tolerance_grad=1e-10,
                            tolerance_change=1e-15, history_size=20, line_search_fn="strong_wolfe")
    half_decay = 0.5 * config.weight_decay

    def objective() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        penalty = half_decay * weight.square().sum()
        if config.penalize_bias:
            penalty = penalty + half_decay * bias.square().sum()
        penalty.backward()
        return _data_loss(batches, n, weight, bias, whole) + penalty.detach()

    with torch.enable_grad():
        opt.step(objective)
    return weight, bias


def _all_finite(x: "torch.Tensor | Rows", chunk_rows: int | None) -> bool:
    if isinstance(x, torch.Tensor) and chunk_rows is None:
        return bool(torch.isfinite(x).all())
    src = Rows.of(x)
    return all(bool(torch.isfinite(src.read(a, b)).all())
               for a, b in src.chunks(chunk_rows or max(1, src.shape[0])))


def linear_probe(train_x: "torch.Tensor | Rows", train_y: Sequence,
                 test_x: "torch.Tensor | Rows", test_y: Sequence,
                 config: ProbeConfig | None = None, *, chunk_rows: int | None = None
                 ) -> ProbeResult:
    """Train a softmax regression on ``(train_x (N, D), train_y)`` and report its accuracy on
    ``(test_x (M, D), test_y)`` (fractions). Labels may be any hashable values; a test label
    never seen in training counts as an error. The objective and solvers are those of
    :class:`ProbeConfig`; the default is the CPC probe's full-batch Adam (Oord et al. 2018,
    §3.1). NaN or infinite features: accuracies NaN. Synchronises (Python floats).

    Features may be :class:`Rows` read a chunk of ``chunk_rows`` at a time (see
    :func:`fit_linear_probe`): memory is then one chunk plus O(N + M) labels.

    Example:
        >>> r = linear_probe(train_feats, train_labels, test_feats, test_labels)
        >>> r.accuracy, r.train_accuracy
    """
    config = config or ProbeConfig()
    _check_chunk_rows(chunk_rows)
    for name, x in (("train_x", train_x), ("test_x", test_x)):
        if not isinstance(x, (torch.Tensor, Rows)) or len(x.shape) != 2:
            raise ValueError(f"{name}.shape={tuple(getattr(x, 'shape', ()))}: expected (N, D) "
                             f"(a tensor or Rows)")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x.shape={tuple(train_x.shape)}, test_x.shape="
                         f"{tuple(test_x.shape)}: expected (N, D) and (M, D)")
    if len(train_y) != train_x.shape[0] or len(test_y) != test_x.shape[0]:
        raise ValueError(f"len(train_y)={len(train_y)}, len(test_y)={len(test_y)}: expected "
                         f"{train_x.shape[0]} and {test_x.shape[0]}")
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("empty probe split: expected training and test examples")
    if not (_all_finite(train_x, chunk_rows) and _all_finite(test_x, chunk_rows)):
        return ProbeResult(float("nan"), float("nan"), int(train_x.shape[0]), int(test_x.shape[0]),
                           len(_label_index(train_y)[0]))
    probe = fit_linear_probe(train_x, train_y, config, chunk_rows=chunk_rows)
    _, ytr = _label_index(train_y, probe.classes)
    _, yte = _label_index(test_y, probe.classes)
    train_acc = (probe.predict_index(train_x, chunk_rows) == ytr.to(train_x.device)).float().mean().item()
    test_acc = (probe.predict_index(test_x, chunk_rows) == yte.to(test_x.device)).float().mean().item()
    return ProbeResult(test_acc, train_acc, int(train_x.shape[0]), int(test_x.shape[0]),
                       len(probe.classes))


def _keys(labels: Sequence) -> list:
    if isinstance(labels, torch.Tensor):
        return labels.tolist()
    return list(labels)


# ----------------------------------------------------------------------------------------------
# Segmentation metrics
# ----------------------------------------------------------------------------------------------
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = 255) -> torch.Tensor:
    """Confusion counts over pixels (or any elements): ``C[t, p]`` = number of elements whose
    target is t and prediction p; elements whose target is ``ignore_index`` are left out.

    Args:
        pred: integer class ids, any shape, in [0, num_classes).
        target: integer class ids, same shape, in [0, num_classes) or ``ignore_index``.
        num_classes: K >= 1. ignore_index: None for no void label.

    Returns:
        int64 (K, K) on pred's device (rows: target, columns: prediction). Values are checked
        (one synchronisation): a value out of range raises ValueError naming it.

    Example:
        >>> cm = confusion_matrix(logits.argmax(1), masks, num_classes=11)
        >>> per_class, mean = miou(cm)
    """
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"pred, target: expected tensors, got {type(pred).__name__} and "
                        f"{type(target).__name__}")
    if pred.is_floating_point() or target.is_floating_point() or pred.is_complex() \
            or pred.dtype == torch.bool or target.dtype == torch.bool:
        raise TypeError(f"pred.dtype={pred.dtype}, target.dtype={target.dtype}: expected integer "
                        "class ids (take logits.argmax(1) first)")
    if pred.shape != target.shape:
        raise ValueError(f"pred.shape={tuple(pred.shape)}, target.shape={tuple(target.shape)}: "
                         "expected the same shape")
    _check_positive_int("num_classes", num_classes)
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).to(pred.device).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel():
        for name, v in (("target", target), ("pred", pred)):
            lo, hi = int(v.min()), int(v.max())
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                extra = "" if name == "pred" else f" or ignore_index={ignore_index}"
                raise ValueError(f"{name} contains class id {bad}: expected ids in "
                                 f"[0, num_classes={num_classes}){extra}")
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes
                          ).reshape(num_classes, num_classes)


def miou(confusion: torch.Tensor) -> tuple[list[float], float]:
    """Per-class intersection over union and their mean (Long et al. 2015, §5):

        IoU_c = C_cc / (sum_p C_cp + sum_t C_tc - C_cc)

    A class absent from both target and prediction (row and column all zero) has IoU NaN and
    is left out of the mean; the mean of no class is NaN.

    Returns:
        (per-class IoU as Python floats, mean IoU)
    """
    if not isinstance(confusion, torch.Tensor) or confusion.dim() != 2 \
            or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion.shape={tuple(getattr(confusion, 'shape', ()))}: expected a "
                         "square (K, K) matrix from confusion_matrix")
    c = confusion.double().cpu()
    inter = c.diagonal()
    union = c.sum(0) + c.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.nan)
    present = ~torch.isnan(iou)
    mean = iou[present].mean().item() if bool(present.any()) else float("nan")
    return iou.tolist(), mean


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """Fraction of counted elements whose prediction equals the target (NaN if none)."""
    c = confusion.double()
    total = c.sum().item()
    return c.diagonal().sum().item() / total if total else float("nan")


# ----------------------------------------------------------------------------------------------
# Downstream training curves
# ----------------------------------------------------------------------------------------------
@dataclass
class Curve:
    """A downstream metric after every epoch: ``metric[i]`` after epoch ``epochs[i]`` (1..E).

    ``extra`` holds other per-epoch series (``train_loss``, ``seconds``, ``per_class_iou``...)
    and settings; ``model`` is the trained model when ``keep_model=True`` was asked (never
    serialised by :meth:`as_dict`)."""

    epochs: list[int]
    metric: list[float]
    name: str = ""
    metric_name: str = "top1"
    extra: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def final(self) -> float:
        return self.metric[-1] if self.metric else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metric_name": self.metric_name, "epochs": list(self.epochs),
                "metric": list(self.metric), "extra": dict(self.extra)}


def train_classifier(encoder: nn.Module, feature_dim: int,
                     train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                     *, num_classes: int, epochs: int = 10, frozen: bool = True, lr: float = 1e-3,
                     batch_size: int = 256,
                     train_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     eval_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     device: str | torch.device = "cpu", seed: int = 0, progress: Any = False,
                     weight_decay: float = 0.0, name: str = "classifier",
                     keep_model: bool = False) -> Curve:
    """Train a linear classifier on an encoder's pooled features; test top-1 after every epoch.

    frozen=True (linear evaluation): features of train and test images are extracted once with
    ``eval_transform`` by the frozen encoder, standardised with the training features' mean and
    standard deviation (so encoders whose features differ in scale, e.g. random init against
    pre-trained, are compared at the same learning rate), and a ``Linear(feature_dim,
    num_classes)`` head is trained on them with mini-batches. frozen=False (fine-tuning, as in
    SimCLR's semi-supervised evaluation, Chen et al. 2020 §B.5): a deep copy of the encoder and
    the head are trained together, in train mode, on ``train_transform``-augmented images.
    Both: AdamW (``lr``, ``weight_decay``), cross-entropy, learning rate on a cosine schedule
    over all steps (per step), a fresh permutation each epoch. The caller's encoder is never
    modified (a deep copy is moved to ``device``; parameters and BatchNorm buffers untouched).
    Deterministic for a ``seed``: the RNG is forked (the caller's global RNG state is left as
    it was) and seeded; transforms that draw from torch's global RNG are reproduced too.

    Args:
        encoder: (B, 3, h, w) float -> (B, feature_dim).
        train, test: (images uint8 (N, 3, H, W), labels int64 (N,) in [0, num_classes)).
        train_transform: fine-tuning only; per image, uint8 (3, H, W) -> float (3, h, w),
            random (e.g. crop and flip). None: ``eval_transform`` (no augmentation).
        eval_transform: deterministic, on a uint8 batch (B, 3, H, W) -> float batch. None:
            ``modalities.image.transforms.eval_transform(H)`` (the pre-training normalisation).
        progress: per-epoch progress: a ``recipes.common.logging.RunLog`` (the recipe's own
            display), True (a tqdm bar) or False.

    Returns:
        :class:`Curve` with ``epochs`` 1..E, ``metric`` test top-1 (fractions) and ``extra``:
        ``train_loss`` (mean per epoch), ``seconds`` (cumulative wall time), ``frozen``, ``lr``,
        ``n_train``.

    Example:
        >>> curve = train_classifier(backbone, 512, (x_tr, y_tr), (x_te, y_te), num_classes=10,
        ...                          epochs=20, frozen=True, lr=1e-2)
        >>> curve.metric[-1]
    """
    _check_module(encoder)
    _check_positive_int("feature_dim", feature_dim)
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    _check_lr(lr, weight_decay)
    x_tr, y_tr = _check_split("train", train, num_classes)
    x_te, y_te = _check_split("test", test, num_classes)
    if eval_transform is None:
        eval_transform = _default_eval_transform(x_tr.shape[-1])
    device = torch.device(device)
    start = time.perf_counter()
    curve = Curve([], [], name=name, metric_name="top1",
                  extra={"train_loss": [], "seconds": [], "frozen": bool(frozen), "lr": lr,
                         "n_train": int(x_tr.shape[0])})
    with _seeded(seed, device):
        gen = torch.Generator().manual_seed(seed)
        enc = copy.deepcopy(encoder).to(device)
        head = nn.Linear(feature_dim, num_classes).to(device)
        if frozen:
            enc.requires_grad_(False)
            f_tr = extract_features(enc, x_tr, eval_transform, batch_size=max(batch_size, 256),
                                    device=device).to(device)
            f_te = extract_features(enc, x_te, eval_transform, batch_size=max(batch_size, 256),
                                    device=device).to(device)
            if f_tr.shape[1] != feature_dim:
                raise ValueError(f"feature_dim={feature_dim}: the encoder outputs "
                                 f"{f_tr.shape[1]} features")
            mean = f_tr.mean(0)
            std = f_tr.std(0, unbiased=False).clamp_min(1e-6)
            f_tr, f_te = (f_tr - mean) / std, (f_te - mean) / std
            params = list(head.parameters())
        else:
            enc.train()
            params = list(enc.parameters()) + list(head.parameters())
        steps_per_epoch = _n_batches(x_tr.shape[0], batch_size)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = _cosine(opt, epochs * steps_per_epoch)
        bar = _progress(epochs, progress, name)
        for epoch in range(1, epochs + 1):
            losses = []
            for index in _batches(x_tr.shape[0], batch_size, gen):
                if frozen:
                    logits = head(f_tr[index])
                else:
                    x = _train_images(x_tr[index], train_transform, eval_transform).to(device)
                    feats = enc(x)
                    if feats.shape[-1] != feature_dim:
                        raise ValueError(f"feature_dim={feature_dim}: the encoder outputs "
                                         f"{feats.shape[-1]} features")
                    logits = head(feats)
                loss = F.cross_entropy(logits, y_tr[index].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.detach())
            with torch.no_grad():
                if frozen:
                    pred = head(f_te).argmax(1)
                else:
                    pred = head(extract_features(enc, x_te, eval_transform, batch_size=max(batch_size, 256),
                                                 device=device).to(device)).argmax(1)
                top1 = (pred.cpu() == y_te).double().mean().item()
            curve.epochs.append(epoch)
            curve.metric.append(top1)
            curve.extra["train_loss"].append(torch.stack(losses).mean().item())
            curve.extra["seconds"].append(time.perf_counter() - start)
            bar.update(top1=top1)
        bar.close()
    if keep_model:
        curve.model = nn.Sequential(enc, head).eval()
    return curve


def train_segmentation(encoder: nn.Module, num_classes: int,
                       train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                       *, epochs: int = 10, frozen: bool = True, lr: float = 1e-3, batch_size: int = 64,
                       ignore_index: int = 255, device: str | torch.device = "cpu", seed: int = 0,
                       progress: Any = False, head_factory: Callable[..., nn.Module] | None = None,
                       train_transform: Callable | None = None, eval_transform: Callable | None = None,
                       weight_decay: float = 0.0, head_width: int = 64, name: str = "segmentation",
                       keep_model: bool = False) -> Curve:
    """Train a segmentation head on an encoder's feature maps; test mIoU after every epoch.

    The head is ``head_factory(encoder.map_channels, encoder.map_strides, num_classes,
    width=head_width)`` (default: ``modalities.image.heads.SegmentationHead``, a light
    FCN/U-Net-style decoder), called as ``head(encoder.forward_maps(x), size=(H, W))`` (maps at
    increasing stride, the input's size) and returning logits (B, K, H, W); logits at another
    resolution are upsampled bilinearly to the mask's. Loss: per-pixel cross-entropy, ``ignore_index`` pixels left out.
    frozen=True: the encoder copy stays in eval mode without gradients, only the head trains;
    frozen=False: encoder copy and head are fine-tuned together. AdamW with a per-step cosine
    schedule; the caller's encoder is never modified; deterministic for a ``seed`` (RNG forked
    and seeded).

    Args:
        encoder: a backbone with ``forward_maps``, ``map_channels`` and ``map_strides``.
        num_classes: K (mask ids 0..K-1).
        train, test: (images uint8 (N, 3, H, W), masks int64 (N, H, W) in [0, K) or
            ``ignore_index``).
        train_transform: per sample, ``(image uint8 (3, H, W), mask (H, W)) -> (float image,
            mask)`` with the same geometry for both (e.g. ``seg_train_transform``). None:
            ``eval_transform``.
        eval_transform: deterministic, on a batch ``(images uint8 (B, 3, H, W), masks (B, H, W))
            -> (float images, masks)``. None: ``modalities.image.transforms.seg_eval_transform(H)``.

    Returns:
        :class:`Curve` with ``metric`` the test mIoU per epoch (classes absent from both the
        test masks and the predictions left out) and ``extra``: ``per_class_iou`` (a list per
        epoch), ``pixel_accuracy``, ``train_loss``, ``seconds``, ``frozen``, ``lr``, ``n_train``.

    Example:
        >>> curve = train_segmentation(backbone, 11, (x_tr, m_tr), (x_te, m_te), epochs=10)
    """
    _check_module(encoder)
    for attr in ("forward_maps", "map_channels", "map_strides"):
        if not hasattr(encoder, attr):
            raise TypeError(f"encoder ({type(encoder).__name__}) has no {attr!r}: expected a "
                            "backbone with forward_maps, map_channels and map_strides")
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    _check_lr(lr, weight_decay)
    x_tr, m_tr = _check_seg_split("train", train, num_classes, ignore_index)
    x_te, m_te = _check_seg_split("test", test, num_classes, ignore_index)
    if head_factory is None:
        from modalities.image.heads import SegmentationHead
        head_factory = SegmentationHead
    if eval_transform is None:
        from modalities.image.transforms import seg_eval_transform
        eval_transform = seg_eval_transform(x_tr.shape[-1])
    device = torch.device(device)
    start = time.perf_counter()
    curve = Curve([], [], name=name, metric_name="miou",
                  extra={"per_class_iou": [], "pixel_accuracy": [], "train_loss": [], "seconds": [],
                         "frozen": bool(frozen), "lr": lr, "n_train": int(x_tr.shape[0])})
    with _seeded(seed, device):
        gen = torch.Generator().manual_seed(seed)
        enc = copy.deepcopy(encoder).to(device)
        head = head_factory(list(enc.map_channels), list(enc.map_strides), num_classes,
                            width=head_width).to(device)
        if frozen:
            enc.requires_grad_(False)
            enc.eval()
            params = list(head.parameters())
        else:
            enc.train()
            params = list(enc.parameters()) + list(head.parameters())
        head.train()
        steps_per_epoch = _n_batches(x_tr.shape[0], batch_size)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = _cosine(opt, epochs * steps_per_epoch)
        bar = _progress(epochs, progress, name)

        def logits_of(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
            if frozen:
                with torch.no_grad():
                    maps = enc.forward_maps(x)
            else:
                maps = enc.forward_maps(x)
            out = head(maps, size=size)
            if out.shape[-2:] != size:
                out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
            return out

        for epoch in range(1, epochs + 1):
            losses = []
            for index in _batches(x_tr.shape[0], batch_size, gen):
                x, m = _train_pairs(x_tr[index], m_tr[index], train_transform, eval_transform)
                x, m = x.to(device), m.to(device).long()
                loss = F.cross_entropy(logits_of(x, tuple(m.shape[-2:])), m, ignore_index=ignore_index)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.detach())
            enc_mode = enc.training
            enc.eval()
            head.eval()
            cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
            with torch.no_grad():
                for s in range(0, x_te.shape[0], batch_size):
                    x, m = eval_transform(x_te[s:s + batch_size].to(device),
                                          m_te[s:s + batch_size].to(device))
                    pred = logits_of(x, tuple(m.shape[-2:])).argmax(1)
                    cm += confusion_matrix(pred, m, num_classes, ignore_index).cpu()
            enc.train(enc_mode)
            head.train()
            per_class, mean = miou(cm)
            curve.epochs.append(epoch)
            curve.metric.append(mean)
            curve.extra["per_class_iou"].append(per_class)
            curve.extra["pixel_accuracy"].append(pixel_accuracy(cm))
            curve.extra["train_loss"].append(torch.stack(losses).mean().item())
            curve.extra["seconds"].append(time.perf_counter() - start)
            bar.update(miou=mean)
        bar.close()
    if keep_model:
        curve.model = nn.ModuleDict({"encoder": enc, "head": head}).eval()
    return curve


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Fork torch's RNG (CPU, and the CUDA device in use), seed it, restore it on exit."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: expected an integer")
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch's index batches; a last batch of one row joins the previous batch
    (BatchNorm cannot normalise a single pooled row in train mode)."""
    batches = list(torch.randperm(n, generator=gen).split(batch_size))
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches[-2] = torch.cat(batches[-2:])
        batches.pop()
    return batches


def _n_batches(n: int, batch_size: int) -> int:
    count = -(-n // batch_size)
    return count - 1 if count > 1 and n % batch_size == 1 else count


def _cosine(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    # lr_t = lr * (1 + cos(pi t / T)) / 2 for step t of T
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps)))


def _train_images(images: torch.Tensor, train_transform: Callable | None,
                  eval_transform: Callable) -> torch.Tensor:
    if train_transform is None:
        return _apply_batch_transform(eval_transform, images)
    return torch.stack([train_transform(img) for img in images])


def _train_pairs(images: torch.Tensor, masks: torch.Tensor, train_transform: Callable | None,
                 eval_transform: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    if train_transform is None:
        return eval_transform(images, masks)
    pairs = [train_transform(img, mask) for img, mask in zip(images, masks)]
    return torch.stack([p[0] for p in pairs]), torch.stack([torch.as_tensor(p[1]) for p in pairs])


def _default_eval_transform(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    from modalities.image.transforms import eval_transform
    return eval_transform(size)


class _progress:
    """Per-epoch progress: ``progress`` a ``recipes.common.logging.RunLog`` (its display: a bar
    on a terminal, plain lines elsewhere), True (a tqdm bar) or False (nothing)."""

    def __init__(self, total: int, progress: Any, name: str) -> None:
        self.bar: Any = None
        self.run_log = callable(getattr(progress, "progress", None))
        if self.run_log:
            self.bar = progress.progress(total, name, unit="epoch", every=1)
        elif progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=name, unit="epoch", leave=False)

    def update(self, **postfix: Any) -> None:
        if self.bar is None:
            return
        if self.run_log:
            self.bar.update(1, **postfix)
        else:
            self.bar.update(1)
            self.bar.set_postfix(postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_module(encoder: Any) -> None:
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder: expected an nn.Module, got {type(encoder).__name__}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")


def _check_lr(lr: Any, weight_decay: Any) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr={lr!r}: expected a finite number > 0")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r}: expected a finite number >= 0")


def _check_features(name: str, x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor (N, D), got {type(x).__name__}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: shape {tuple(x.shape)}, dtype {x.dtype}: expected a float "
                         "(N, D) tensor")


def _check_labels(name: str, y: Any, n: int) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected an int64 tensor, got {type(y).__name__}")
    if y.dtype != torch.long or y.dim() != 1 or (n >= 0 and y.shape[0] != n):
        raise ValueError(f"{name}: shape {tuple(y.shape)}, dtype {y.dtype}: expected int64 "
                         f"({n},) class ids")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} contains {int(y.min())}: expected class ids >= 0")


def _num_classes(num_classes: int | None, labels: torch.Tensor) -> int:
    top = int(labels.max()) + 1
    if num_classes is None:
        return top
    _check_positive_int("num_classes", num_classes)
    if top > num_classes:
        raise ValueError(f"labels contain class id {top - 1}: expected ids in "
                         f"[0, num_classes={num_classes})")
    return num_classes


def _check_images(name: str, images: Any) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a uint8 tensor (N, 3, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"{name}: shape {tuple(images.shape)}, dtype {images.dtype}: expected "
                         "uint8 (N, 3, H, W)")


def _check_split(split: str, data: Any, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{split}: expected a pair (images, labels), got {type(data).__name__}")
    images, labels = data
    _check_images(f"{split} images", images)
    if images.shape[0] == 0:
        raise ValueError(f"{split}: expected at least one image, got 0")
    _check_labels(f"{split} labels", labels, images.shape[0])
    if int(labels.max()) >= num_classes:
        raise ValueError(f"{split} labels contain class id {int(labels.max())}: expected ids in "
                         f"[0, num_classes={num_classes})")
    return images, labels.cpu()


def _check_seg_split(split: str, data: Any, num_classes: int, ignore_index: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{split}: expected a pair (images, masks), got {type(data).__name__}")
    images, masks = data
    _check_images(f"{split} images", images)
    if images.shape[0] == 0:
        raise ValueError(f"{split}: expected at least one image, got 0")
    if not isinstance(masks, torch.Tensor) or masks.is_floating_point() \
            or tuple(masks.shape) != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"{split} masks: shape {tuple(getattr(masks, 'shape', ()))}, dtype "
                         f"{getattr(masks, 'dtype', type(masks).__name__)}: expected integer "
                         f"{(images.shape[0], *images.shape[2:])} (N, H, W) like the images")
    valid = masks[masks != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
        raise ValueError(f"{split} masks contain {bad}: expected class ids in "
                         f"[0, num_classes={num_classes}) or ignore_index={ignore_index}")
    return images, masks
