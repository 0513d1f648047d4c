"""Baseline frame features (MFCC, log-mel) framed exactly like CPC's encoder output.

Framing: one frame per 10 ms hop (160 samples at 16 kHz), `frames = T // hop`. Frame i
describes samples [i * hop, (i + 1) * hop): its 25 ms analysis window is centred on the middle
of that hop, at sample i * hop + hop / 2, so frame i lines up with CPC frame i and with label i
of a frame-level alignment. The signal is reflect-padded at both ends for the edge frames.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import torchaudio

__all__ = ["mfcc", "log_mel", "frame_hop"]

_LOG_FLOOR = 1e-6  # floor on mel power before the log: about -60 dB below full scale


def frame_hop(sample_rate: int) -> int:
    """Samples per 10 ms frame at `sample_rate` (160 at 16 kHz)."""
    if int(sample_rate) != sample_rate or sample_rate <= 0 or sample_rate % 100:
        raise ValueError(f"sample_rate={sample_rate!r}; expected a positive integer multiple of 100 Hz")
    return int(sample_rate) // 100


def _window_length(sample_rate: int) -> int:
    return int(round(0.025 * sample_rate))  # 25 ms analysis window (400 samples at 16 kHz)


@functools.lru_cache(maxsize=16)
def _mel_transform(sample_rate: int, n_mels: int) -> torchaudio.transforms.MelSpectrogram:
    n_fft = _window_length(sample_rate)
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, hop_length=frame_hop(sample_rate), n_mels=n_mels,
        center=False, power=2.0, f_min=20.0, f_max=sample_rate / 2, mel_scale="htk")


@functools.lru_cache(maxsize=16)
def _mfcc_transform(sample_rate: int, n_mfcc: int, n_mels: int) -> torchaudio.transforms.MFCC:
    n_fft = _window_length(sample_rate)
    return torchaudio.transforms.MFCC(
        sample_rate=sample_rate, n_mfcc=n_mfcc, log_mels=True,
        melkwargs=dict(n_fft=n_fft, hop_length=frame_hop(sample_rate), n_mels=n_mels,
                       center=False, power=2.0, f_min=20.0, f_max=sample_rate / 2, mel_scale="htk"))


def _frame_ready(wave: torch.Tensor, sample_rate: int, name: str) -> tuple[torch.Tensor, int, bool]:
    """Check `wave` and pad it so that an un-centred STFT yields exactly T // hop frames.

    Returns (padded (B, T + n_fft - hop) float32, number of frames, whether the input was 1-D).
    """
    if not isinstance(wave, torch.Tensor):
        raise TypeError(f"{name}: wave has type {type(wave).__name__}; expected a torch.Tensor")
    if wave.dim() not in (1, 2):
        raise ValueError(f"{name}: wave has shape {tuple(wave.shape)}; expected (T,) or (B, T)")
    if not wave.is_floating_point():
        raise ValueError(f"{name}: wave has dtype {wave.dtype}; expected a floating-point waveform")
    unbatched = wave.dim() == 1
    batch = wave.unsqueeze(0) if unbatched else wave
    hop, n_fft = frame_hop(sample_rate), _window_length(sample_rate)
    frames = batch.shape[-1] // hop
    if frames == 0:
        return batch, 0, unbatched
    # Window of frame i covers [i*hop + hop/2 - n_fft/2, i*hop + hop/2 + n_fft/2).
    left = (n_fft - hop) // 2
    right = n_fft - hop - left
    padded = F.pad(batch.float().unsqueeze(1), (left, right), mode="reflect").squeeze(1)
    return padded, frames, unbatched


def log_mel(wave: torch.Tensor, sample_rate: int = 16000, n_mels: int = 40) -> torch.Tensor:
    """Log mel filterbank energies, one frame per 10 ms.

    Args:
        wave: (T,) or (B, T) float waveform at `sample_rate`.
        sample_rate: Hz, a multiple of 100.
        n_mels: number of mel bands (20 Hz to Nyquist, HTK mel scale).

    Returns:
        (T // hop, n_mels) or (B, T // hop, n_mels) float32, natural log of mel power.
    """
    padded, frames, unbatched = _frame_ready(wave, sample_rate, "log_mel")
    if frames == 0:
        out = padded.new_zeros(padded.shape[0], 0, n_mels, dtype=torch.float32)
    else:
        mel = _mel_transform(int(sample_rate), int(n_mels)).to(padded.device)(padded)  # (B, n_mels, frames')
        out = torch.log(mel[..., :frames].clamp_min(_LOG_FLOOR)).transpose(1, 2)
    return out[0] if unbatched else out


def mfcc(wave: torch.Tensor, sample_rate: int = 16000, n_mfcc: int = 13,
         with_deltas: bool = True) -> torch.Tensor:
    """Mel-frequency cepstral coefficients, one frame per 10 ms (aligned with CPC frames).

    Args:
        wave: (T,) or (B, T) float waveform at `sample_rate`.
        sample_rate: Hz, a multiple of 100.
        n_mfcc: cepstral coefficients per frame (from 40 mel bands; at most 40).
        with_deltas: append first and second time derivatives (5-frame regression).

    Returns:
        (T // hop, F) or (B, T // hop, F) float32 with F = n_mfcc, or 3 * n_mfcc with deltas.
    """
    n_mels = 40
    if not 1 <= n_mfcc <= n_mels:
        raise ValueError(f"mfcc: n_mfcc={n_mfcc!r}; expected 1..{n_mels}")
    width = 3 * n_mfcc if with_deltas else n_mfcc
    padded, frames, unbatched = _frame_ready(wave, sample_rate, "mfcc")
    if frames == 0:
        out = padded.new_zeros(padded.shape[0], 0, width, dtype=torch.float32)
    else:
        coeffs = _mfcc_transform(int(sample_rate), int(n_mfcc), n_mels).to(padded.device)(padded)
        coeffs = coeffs[..., :frames]  # (B, n_mfcc, frames)
        if with_deltas:
            delta = torchaudio.functional.compute_deltas(coeffs, win_length=5)
            delta2 = torchaudio.functional.compute_deltas(delta, win_length=5)
            coeffs = torch.cat([coeffs, delta, delta2], dim=1)
        out = coeffs.transpose(1, 2).contiguous()
    return out[0] if unbatched else out
