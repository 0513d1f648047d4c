"""Reading audio files into mono float32 tensors at a fixed sample rate.

Files are read with `soundfile` (libsndfile: WAV, FLAC, OGG, ...) and resampled with
`torchaudio.functional.resample`; `torchaudio.load` is deliberately not used (it needs
TorchCodec, which is not part of the toolkit's stack).
"""
from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

__all__ = ["SAMPLE_RATE", "FRAME_HOP", "AudioReadError", "load_audio", "resample"]

SAMPLE_RATE = 16000
"""The toolkit's audio rate in Hz: every waveform handed to a model is at this rate."""

FRAME_HOP = 160
"""Samples per CPC frame at `SAMPLE_RATE`: one frame (and one alignment label) per 10 ms."""


class AudioReadError(RuntimeError):
    """An audio file could not be read, or holds no samples. The message names the file.

    Raised as `AudioReadError(path, reason)`; `AudioReadError(message)` also works (then
    `path` is None and the message is used as given).
    """

    def __init__(self, path: str | PathLike, reason: str | None = None) -> None:
        if reason is None:
            self.path, self.reason = None, str(path)
            super().__init__(str(path))
            return
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read audio file '{self.path}': {reason}")


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Resample along the last axis. wave: (..., T) float -> (..., ceil(T * new_rate / orig_rate)).

    Uses torchaudio's band-limited sinc interpolation (Hann window); returns `wave` itself when
    the rates are equal.
    """
    for name, value in (("orig_rate", orig_rate), ("new_rate", new_rate)):
        if int(value) != value or value <= 0:
            raise ValueError(f"resample: {name}={value!r}; expected a positive integer (Hz)")
    if orig_rate == new_rate:
        return wave
    return torchaudio.functional.resample(wave, int(orig_rate), int(new_rate))


def load_audio(path: str | PathLike, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Read an audio file as a mono float32 waveform at `sample_rate`.

    Args:
        path: any file libsndfile reads (WAV, FLAC, OGG/Vorbis, ...).
        sample_rate: rate of the returned waveform in Hz; the file is resampled if it differs.

    Returns:
        (T,) float32 tensor in [-1, 1] (integer PCM is scaled), channels averaged.

    Raises:
        AudioReadError: the file is missing, not audio, corrupt, or holds 0 samples.
    """
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"load_audio: sample_rate={sample_rate!r}; expected a positive integer (Hz)")
    path = Path(path)
    if not path.is_file():
        raise AudioReadError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C)
    except Exception as err:  # libsndfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioReadError(path, f"{type(err).__name__}: {err}") from err
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioReadError(path, "the file holds 0 samples")
    mono = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float32)))
    return resample(mono, int(file_rate), int(sample_rate)).to(torch.float32).contiguous()
