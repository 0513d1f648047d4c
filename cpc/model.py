"""The CPC model of Oord et al. 2018 ("Representation Learning with Contrastive Predictive
Coding"): a strided convolutional encoder on raw 16 kHz audio, an autoregressive context
network, and one predictor per future step.

Shapes: a batch of waves ``(B, T)`` gives encoded frames ``z`` of shape ``(B, T // 160, C)``
(one frame per 10 ms) and context features ``c`` of shape ``(B, T // 160, H)``.

Options beyond the paper (each off by default, each named after what it changes):

- ``encoder_norm="channel"``: normalise every frame over its channels (mean 0, variance 1,
  then a learned per-channel scale and bias) after each convolution. This is CPC_audio's
  ``layerNorm`` mode; it makes training stable without batch statistics, so padding frames
  and small batches do not leak into other sequences. ``"none"`` is the paper.
- ``context="lstm"``: an LSTM context network instead of the paper's GRU (CPC_audio's default).
- ``predictor="transformer"``: instead of one linear map per step, one transformer layer per
  step exactly as CPC_audio's ``rnnMode=transformer`` (its ``TransformerLayer``: 8-head causal
  self-attention with bias-free projections and a learned relative-position term, post-LN
  residual blocks, a 2048-unit feed-forward block, dropout 0.1); it predicts from the first
  W = sequence_frames - K frames of c, needs context_dim == encoder_channels, and exports to
  CPC_audio's checkpoint by a plain rename (:mod:`cpc.export`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# (kernel, stride, padding) per convolution; padding as in CPC_audio so that a wave of T
# samples gives exactly T // 160 frames when T is a multiple of 160.
ENCODER_LAYERS: tuple[tuple[int, int, int], ...] = (
    (10, 5, 3),
    (8, 4, 2),
    (4, 2, 1),
    (4, 2, 1),
    (4, 2, 1),
)
DOWNSAMPLING = 160


@dataclass
class CPCModelConfig:
    """Architecture. Defaults are the paper's.

    Transformer predictor (``predictor="transformer"``, CPC_audio's ``rnnMode=transformer``):
    ``sequence_frames`` is the number of frames of a training window (window // 160; CPC_audio's
    ``sizeWindow // 160``) and must exceed ``prediction_steps``: the layer attends over exactly
    W = sequence_frames - prediction_steps frames. ``context_dim`` must equal
    ``encoder_channels`` (the layer maps c to predictions of z in the same space).
    ``predictor_heads`` (8), ``predictor_ff`` (2048) and ``predictor_dropout`` (0.1, on the
    attention weights and the feed-forward hidden layer) are CPC_audio's values.
    ``prediction_dropout``: dropout probability on each step's prediction (CPC_audio's
    ``--dropout``, which uses 0.5), for every predictor kind; 0 disables it.
    """

    encoder_channels: int = 512
    encoder_norm: str = "none"  # "none" (paper) or "channel"
    context: str = "gru"  # "gru" (paper) or "lstm"
    context_dim: int = 256
    prediction_steps: int = 12
    predictor: str = "linear"  # "linear" (paper) or "transformer"
    predictor_heads: int = 8
    predictor_ff: int = 2048
    predictor_dropout: float = 0.1
    sequence_frames: int = 0
    prediction_dropout: float = 0.0

    def __post_init__(self) -> None:
        _choice("encoder_norm", self.encoder_norm, ("none", "channel"))
        _choice("context", self.context, ("gru", "lstm"))
        _choice("predictor", self.predictor, ("linear", "transformer"))
        for name in ("encoder_channels", "context_dim", "prediction_steps", "predictor_heads",
                     "predictor_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if not isinstance(self.sequence_frames, int) or self.sequence_frames < 0:
            raise ValueError(f"sequence_frames={self.sequence_frames!r}: expected an integer >= 0")
        for name in ("predictor_dropout", "prediction_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r}: expected a probability in [0, 1)")
        if self.predictor == "transformer":
            if self.context_dim != self.encoder_channels:
                raise ValueError(
                    f"context_dim={self.context_dim}, encoder_channels={self.encoder_channels}: "
                    "predictor='transformer' needs context_dim == encoder_channels (as CPC_audio)")
            if self.context_dim % self.predictor_heads:
                raise ValueError(
                    f"predictor_heads={self.predictor_heads}: expected a divisor of "
                    f"context_dim={self.context_dim}")
            if self.sequence_frames <= self.prediction_steps:
                raise ValueError(
                    f"sequence_frames={self.sequence_frames}: predictor='transformer' needs the "
                    f"frames per training window (window // 160), more than "
                    f"prediction_steps={self.prediction_steps}")

    @property
    def prediction_frames(self) -> int | None:
        """W, the frames predicted from by the transformer (None for the linear predictor)."""
        if self.predictor == "transformer":
            return self.sequence_frames - self.prediction_steps
        return None


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {allowed}")


class ChannelNorm(nn.Module):
    """Normalise each frame over channels: (x - mean_c) / sqrt(var_c + eps) * w + b.

    Input ``(B, C, T)``. Unbiased variance, as CPC_audio's ``ChannelNorm``, so exported weights
    mean the same thing there.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class Encoder(nn.Module):
    """Five strided 1-D convolutions with ReLU: ``(B, T)`` -> ``(B, T // 160, C)``."""

    def __init__(self, channels: int = 512, norm: str = "none") -> None:
        super().__init__()
        _choice("norm", norm, ("none", "channel"))
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        in_ch = 1
        for kernel, stride, padding in ENCODER_LAYERS:
            self.convs.append(nn.Conv1d(in_ch, channels, kernel, stride=stride, padding=padding))
            self.norms.append(ChannelNorm(channels) if norm == "channel" else nn.Identity())
            in_ch = channels
        self.channels = channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # He initialisation with zero biases. With PyTorch's default (uniform, std 1/sqrt(3 fan_in))
        # each ReLU layer shrinks the signal about 2.5x while the biases keep their size, so after
        # five layers the output is a constant bias pattern plus a small residue of the input:
        # measured on the generated corpus, the time variation of z is 6x smaller than with He
        # init, and CPC training then collapses it further instead of learning.
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() != 2:
            raise ValueError(f"wave.shape={tuple(wave.shape)}: expected (batch, samples)")
        x = wave.unsqueeze(1)
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return x.transpose(1, 2)


def receptive_field() -> tuple[int, int]:
    """(receptive field in samples, hop in samples) of one encoder frame."""
    field_, jump = 1, 1
    for kernel, stride, _ in ENCODER_LAYERS:
        field_ += (kernel - 1) * jump
        jump *= stride
    return field_, jump


class RelativeCausalAttention(nn.Module):
    """Scaled dot-product attention over a fixed-length sequence with a causal mask and a
    learned relative-position term (CPC_audio's ``ScaledDotProductAttention(relpos=True)``).

    For queries q_i, keys k_j, values v_j ``(N, W, d)`` (N = batch x heads) the weights are

        A_ij = softmax_j((q_i . k_j + q_i . P[:, W - 1 - (i - j)]) / sqrt(d))  for j <= i,
        A_ij = 0                                                                for j > i,

    with ``P = Krelpos`` of shape ``(d, W)`` (column W - 1 - r scores a key r frames back),
    then dropout on A and output ``A v``. W is fixed at construction: the sequence must have
    exactly W frames.
    """

    def __init__(self, frames: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.frames = frames
        self.drop = nn.Dropout(dropout)
        self.Krelpos = nn.Parameter(torch.empty(head_dim, frames))
        bound = 1.0 / math.sqrt(head_dim)  # CPC_audio's init: U(-1/sqrt(d), 1/sqrt(d))
        nn.init.uniform_(self.Krelpos, -bound, bound)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, w, d = q.shape
        if w != self.frames:
            raise ValueError(f"q.shape={tuple(q.shape)}: expected {self.frames} frames")
        scores = q @ k.transpose(1, 2)
        # relative term: rel[n, i, j] = (q_i . P)[W - 1 - i + j], gathered on the causal part
        qp = q @ self.Krelpos  # (N, W, W): column m scores relative distance W - 1 - m
        i = torch.arange(w, device=q.device)
        col = (w - 1 - i[:, None] + i[None, :]).clamp(max=w - 1)  # j > i: masked below
        scores = scores + qp.gather(2, col.expand(n, w, w))
        causal = i[None, :] > i[:, None]
        scores = (scores / math.sqrt(d)).masked_fill(causal, float("-inf"))
        return self.drop(torch.softmax(scores, dim=2)) @ v


class MultiHeadRelativeAttention(nn.Module):
    """Multi-head causal self-attention with bias-free projections (CPC_audio's
    ``MultiHeadAttention(abspos=False)``): ``Wo(concat_h Att(Wq x_h, Wk x_h, Wv x_h))``, the
    relative-position matrix shared by the heads."""

    def __init__(self, frames: int, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.Wo = nn.Linear(dim, dim, bias=False)
        self.Wk = nn.Linear(dim, dim, bias=False)
        self.Wq = nn.Linear(dim, dim, bias=False)
        self.Wv = nn.Linear(dim, dim, bias=False)
        self.Att = RelativeCausalAttention(frames, dim // heads, dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, W, C) -> (B * h, W, C / h)
        b, w, c = x.shape
        return x.view(b, w, self.heads, c // self.heads).transpose(1, 2).reshape(
            b * self.heads, w, c // self.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, w, c = x.shape
        y = self.Att(self._split(self.Wq(x)), self._split(self.Wk(x)), self._split(self.Wv(x)))
        y = y.view(b, self.heads, w, c // self.heads).transpose(1, 2).reshape(b, w, c)
        return self.Wo(y)


class FeedForward(nn.Module):
    """``lin2(dropout(relu(lin1(x))))``."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.drop(F.relu(self.lin1(x))))


class TransformerPredictorLayer(nn.Module):
    """CPC_audio's ``TransformerLayer`` (``rnnMode=transformer``): post-LayerNorm residual
    blocks ``y = LN(x + MHA(x))``, ``out = LN(y + FF(y))`` on a sequence of exactly ``frames``
    frames (Vaswani et al. 2017, with a learned relative-position term instead of absolute
    positions). Input and output ``(B, frames, dim)``."""

    def __init__(self, frames: int, dim: int, heads: int = 8, ff_dim: int = 2048,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.multihead = MultiHeadRelativeAttention(frames, dim, heads, dropout)
        self.ln_multihead = nn.LayerNorm(dim)
        self.ffnetwork = FeedForward(dim, ff_dim, dropout)
        self.ln_ffnetwork = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_multihead(x + self.multihead(x))
        return self.ln_ffnetwork(y + self.ffnetwork(y))


class CPCModel(nn.Module):
    """Encoder + context network + per-step predictors.

    ``forward(wave)`` returns ``(z, c)``: encoded frames ``(B, S, C)`` and context
    ``(B, S, H)``. ``predict(c)`` returns ``(K, B, S, C)``: the prediction of z_{t+k} made
    from c_t for k = 1..K.
    """

    def __init__(self, config: CPCModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CPCModelConfig()
        self.encoder = Encoder(config.encoder_channels, config.encoder_norm)
        rnn = nn.GRU if config.context == "gru" else nn.LSTM
        self.context = rnn(config.encoder_channels, config.context_dim, batch_first=True)
        if config.predictor == "linear":
            self.predictors = nn.ModuleList(
                nn.Linear(config.context_dim, config.encoder_channels, bias=False)
                for _ in range(config.prediction_steps)
            )
        else:  # one layer per step, in a Sequential as CPC_audio's buildTransformerAR
            self.predictors = nn.ModuleList(
                nn.Sequential(TransformerPredictorLayer(
                    config.prediction_frames, config.context_dim, config.predictor_heads,
                    config.predictor_ff, config.predictor_dropout))
                for _ in range(config.prediction_steps)
            )
        self.prediction_drop = nn.Dropout(config.prediction_dropout)

    def forward(self, wave: torch.Tensor, predict: bool = False):
        """``(z, c)``, or ``(z, c, predictions)`` with ``predict=True`` (one call, so that
        DistributedDataParallel sees every parameter used in ``forward``)."""
        z = self.encoder(wave)
        c, _ = self.context(z)
        if predict:
            return z, c, self.predict(c)
        return z, c

    def predict(self, c: torch.Tensor) -> torch.Tensor:
        """Predictions ``(K, B, P, C)`` of z_{t+k} from c_t, k = 1..K.

        Linear predictor: P = S (every frame of c). Transformer: c must have exactly
        ``sequence_frames`` frames and P = W = sequence_frames - K: step k predicts from
        ``c[:, :W]`` (CPC_audio's window), so every query t < W has its positives t + k < S.
        ``prediction_dropout`` applies to each step's output in training mode.
        """
        if c.dim() != 3 or c.shape[2] != self.config.context_dim:
            raise ValueError(f"c.shape={tuple(c.shape)}: expected (batch, frames, "
                             f"{self.config.context_dim})")
        if self.config.predictor == "transformer":
            if c.shape[1] != self.config.sequence_frames:
                raise ValueError(
                    f"c.shape={tuple(c.shape)}: predictor='transformer' expects exactly "
                    f"sequence_frames={self.config.sequence_frames} frames")
            c = c[:, :self.config.prediction_frames].contiguous()  # read by K predictors
        return torch.stack([self.prediction_drop(p(c)) for p in self.predictors])

    @torch.no_grad()
    def features(self, wave: torch.Tensor, kind: str = "context") -> torch.Tensor:
        """Frozen features ``(B, S, D)``: ``"context"`` (c, the paper's probe input) or
        ``"encoder"`` (z)."""
        _choice("kind", kind, ("context", "encoder"))
        z, c = self(wave)
        return c if kind == "context" else z


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def encoder_flops(samples: int, channels: int = 512) -> float:
    """Multiply-adds x 2 of the encoder's convolutions for one wave of ``samples``."""
    total, length, in_ch = 0.0, samples, 1
    for kernel, stride, padding in ENCODER_LAYERS:
        length = (length + 2 * padding - kernel) // stride + 1
        total += 2.0 * length * channels * in_ch * kernel
        in_ch = channels
    return total
