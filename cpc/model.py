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
- ``predictor="transformer"``: instead of one linear map per step, one small transformer layer
  (causal self-attention over the context sequence followed by a linear map) per step, as in
  CPC_audio's ``rnnMode=transformer``; more capacity for the predictions, so the context
  features need to carry less step-specific structure.
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
    """Architecture. Defaults are the paper's."""

    encoder_channels: int = 512
    encoder_norm: str = "none"  # "none" (paper) or "channel"
    context: str = "gru"  # "gru" (paper) or "lstm"
    context_dim: int = 256
    prediction_steps: int = 12
    predictor: str = "linear"  # "linear" (paper) or "transformer"
    predictor_heads: int = 4

    def __post_init__(self) -> None:
        _choice("encoder_norm", self.encoder_norm, ("none", "channel"))
        _choice("context", self.context, ("gru", "lstm"))
        _choice("predictor", self.predictor, ("linear", "transformer"))
        for name in ("encoder_channels", "context_dim", "prediction_steps", "predictor_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if self.predictor == "transformer" and self.context_dim % self.predictor_heads:
            raise ValueError(
                f"predictor_heads={self.predictor_heads}: expected a divisor of "
                f"context_dim={self.context_dim}"
            )


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


class CausalTransformerStep(nn.Module):
    """One transformer layer with causal attention, then a linear map to the encoder size."""

    def __init__(self, dim: int, out_dim: int, heads: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.out = nn.Linear(dim, out_dim)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        steps = c.shape[1]
        mask = torch.triu(torch.full((steps, steps), float("-inf"), device=c.device), 1)
        return self.out(self.layer(c, src_mask=mask))


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
        else:
            self.predictors = nn.ModuleList(
                CausalTransformerStep(config.context_dim, config.encoder_channels,
                                      config.predictor_heads)
                for _ in range(config.prediction_steps)
            )

    def forward(self, wave: torch.Tensor, predict: bool = False):
        """``(z, c)``, or ``(z, c, predictions)`` with ``predict=True`` (one call, so that
        DistributedDataParallel sees every parameter used in ``forward``)."""
        z = self.encoder(wave)
        c, _ = self.context(z)
        if predict:
            return z, c, self.predict(c)
        return z, c

    def predict(self, c: torch.Tensor) -> torch.Tensor:
        return torch.stack([p(c) for p in self.predictors])

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
