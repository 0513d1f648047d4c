"""load_audio (reading, resampling, mixing down, errors) and the MFCC / log-mel framing."""
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from modalities.audio import FRAME_HOP, SAMPLE_RATE, AudioReadError, load_audio, log_mel, mfcc


def _sine(rate: int, seconds: float, freq: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def _peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave.numpy() * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
def test_resampling_keeps_duration_and_frequency(tmp_path: Path, rate: int) -> None:
    path = tmp_path / f"sine_{rate}.wav"
    sf.write(path, _sine(rate, 1.0, 440.0), rate, subtype="PCM_16")
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert abs(len(wave) - SAMPLE_RATE) <= 1
    assert abs(_peak_hz(wave, SAMPLE_RATE) - 440.0) < 2.0
    assert 0.45 < wave.abs().max().item() < 0.55  # 16-bit PCM scaled to [-1, 1]


def test_other_target_rate_and_flac(tmp_path: Path) -> None:
    path = tmp_path / "sine.flac"
    sf.write(path, _sine(16000, 0.5, 1000.0), 16000)
    wave = load_audio(path, sample_rate=8000)
    assert abs(len(wave) - 4000) <= 1
    assert abs(_peak_hz(wave, 8000) - 1000.0) < 4.0


def test_stereo_is_averaged_to_mono(tmp_path: Path) -> None:
    left = _sine(16000, 0.25, 300.0)
    stereo = np.stack([left, -0.5 * left], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.shape == (4000,)
    torch.testing.assert_close(wave, torch.from_numpy(0.25 * left).float(), atol=1e-6, rtol=0)


def test_empty_file_raises_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0), 16000, subtype="PCM_16")
    with pytest.raises(AudioReadError, match="empty.wav.*0 samples"):
        load_audio(path)


def test_garbage_and_missing_files_raise_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.wav"
    path.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioReadError, match="garbage.wav") as info:
        load_audio(path)
    assert info.value.path == path and isinstance(info.value, RuntimeError)
    with pytest.raises(AudioReadError, match="missing.flac.*no such file"):
        load_audio(tmp_path / "missing.flac")


@pytest.mark.parametrize("n_samples", [160, 319, 320, 16000, 16159])
def test_feature_framing_is_one_frame_per_hop(n_samples: int) -> None:
    wave = torch.randn(n_samples)
    frames = n_samples // FRAME_HOP
    assert mfcc(wave).shape == (frames, 39)
    assert mfcc(wave, n_mfcc=20, with_deltas=False).shape == (frames, 20)
    assert log_mel(wave).shape == (frames, 40)
    assert log_mel(wave, n_mels=64).shape == (frames, 64)


def test_features_batched_equal_unbatched_and_short_input() -> None:
    batch = torch.randn(3, 4000)
    out = mfcc(batch)
    assert out.shape == (3, 25, 39)
    torch.testing.assert_close(out[1], mfcc(batch[1]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(log_mel(batch)[2], log_mel(batch[2]), atol=1e-4, rtol=1e-4)
    assert mfcc(torch.randn(100)).shape == (0, 39)
    assert log_mel(torch.randn(2, 100)).shape == (2, 0, 40)


def test_feature_frames_line_up_with_cpc_frames() -> None:
    # A burst inside hop i is loudest in frame i: frame i is centred on that hop.
    wave = torch.zeros(16000)
    for i in (10, 40, 77):
        wave[i * FRAME_HOP + 60:i * FRAME_HOP + 100] = torch.randn(40)
        energy = log_mel(wave).sum(dim=1)
        assert int(energy.argmax()) == i
        wave.zero_()


def test_feature_argument_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        mfcc(torch.zeros(2, 2, 400))
    with pytest.raises(ValueError, match="n_mfcc"):
        mfcc(torch.zeros(400), n_mfcc=0)
    with pytest.raises(ValueError, match="sample_rate"):
        log_mel(torch.zeros(400), sample_rate=22050)
