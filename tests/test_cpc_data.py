"""Training windows, padding of short utterances, the speaker-balanced sampler, bad files."""
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from cpc.data import (BadAudioError, SpeakerBalancedBatchSampler, WindowDataset,
                      load_utterances)


def test_windows_are_slices_and_short_waves_are_padded_and_masked():
    long_wave = torch.arange(5000, dtype=torch.float32)
    short_wave = torch.arange(1000, dtype=torch.float32) + 1
    ds = WindowDataset([long_wave, short_wave], ["a", "b"], window=1600)
    assert ds.n_short == 1
    batch = ds.collate([0, 1, 0], step=3, seed=7)
    assert batch.wave.shape == (3, 1600)
    for row in (0, 2):
        start = int(batch.wave[row, 0])
        torch.testing.assert_close(batch.wave[row], long_wave[start:start + 1600])
    torch.testing.assert_close(batch.wave[1, :1000], short_wave)
    assert batch.wave[1, 1000:].abs().sum() == 0
    assert batch.lengths.tolist() == [10, 1000 // 160, 10]
    assert batch.speakers.tolist() == [0, 1, 0]


def test_windows_depend_only_on_seed_and_step():
    wave = torch.randn(20000)
    ds = WindowDataset([wave], ["a"], window=1600)
    a = ds.collate([0] * 4, step=5, seed=1).wave
    b = ds.collate([0] * 4, step=5, seed=1).wave
    c = ds.collate([0] * 4, step=6, seed=1).wave
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_window_must_be_frame_multiple():
    with pytest.raises(ValueError, match="window=1000"):
        WindowDataset([torch.zeros(10)], ["a"], window=1000)


def test_sampler_balances_speakers():
    speakers = ["a"] * 30 + ["b"] * 5 + ["c"] * 12 + ["d"] * 3 + ["e"] * 8
    sampler = SpeakerBalancedBatchSampler(speakers, batch_size=8, speakers_per_batch=4, seed=0)
    chosen = Counter()
    for step in range(400):
        batch = sampler.batch(step)
        per_speaker = Counter(speakers[i] for i in batch)
        assert len(batch) == 8
        assert sorted(per_speaker.values()) == [2, 2, 2, 2]
        chosen.update(per_speaker.keys())
    # each of the 5 speakers is drawn in about 4/5 of the batches, whatever its size
    assert all(abs(n / 400 - 0.8) < 0.1 for n in chosen.values()), chosen


def test_sampler_iteration_resumes_at_position():
    sampler = SpeakerBalancedBatchSampler(["a", "b", "a", "b", "c"], 4, 2, seed=3)
    it = iter(sampler)
    first = [next(it) for _ in range(5)]
    other = SpeakerBalancedBatchSampler(["a", "b", "a", "b", "c"], 4, 2, seed=3)
    other.load_state_dict({"position": 2})
    assert [next(iter(other)) for _ in range(1)] == [first[2]]
    assert sampler.state_dict() == {"position": 5}
    assert SpeakerBalancedBatchSampler(["a"] * 4, 4, 2, seed=3, rank=1).batch(0) is not None


def _utt(path, i):
    return SimpleNamespace(id=f"u{i}", path=Path(path), speaker="s", split=None, labels={})


def test_bad_files_skipped_with_warning_or_strict_error(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, np.random.default_rng(0).standard_normal(3200).astype("float32") * 0.1, 16000)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype="float32"), 16000)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all")
    utts = [_utt(good, 0), _utt(empty, 1), _utt(garbage, 2), _utt(tmp_path / "missing.wav", 3)]
    with pytest.warns(UserWarning, match="skipping"):
        kept, waves, report = load_utterances(utts)
    assert [u.id for u in kept] == ["u0"] and waves[0].shape == (3200,)
    assert report.loaded == 1 and report.n_skipped == 3
    with pytest.raises(BadAudioError, match="empty.wav"):
        load_utterances(utts, strict=True)
