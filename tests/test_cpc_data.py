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


def _store_with(tmp_path, waves_i16):
    from cpc.store import prepare_store

    utts = []
    for i, q in enumerate(waves_i16):
        path = tmp_path / f"w{i}.wav"
        sf.write(path, q, 16000, subtype="PCM_16")
        utts.append(_utt(path, i))
    prepare_store(utts, tmp_path / "store")
    return tmp_path / "store"


def test_list_ram_store_and_pread_store_give_identical_batches(tmp_path):
    from cpc.store import AudioStore

    rng = np.random.default_rng(1)
    lengths = [5000, 1000, 3333, 9000, 1600, 200]  # long, short (padded) and exact-window waves
    q = [rng.integers(-32768, 32768, n).astype(np.int16) for n in lengths]
    folder = _store_with(tmp_path, q)
    speakers = ["a", "b", "a", "c", "b", None]
    chosen = [5, 0, 3, 1, 4]  # a shard: dataset item j is store utterance chosen[j]
    waves = [torch.from_numpy(q[i].astype(np.float32) / 32768) for i in chosen]
    spk = [speakers[i] for i in chosen]
    in_list = WindowDataset(waves, spk, window=1600)
    ram = AudioStore(folder, indices=chosen)
    disk = AudioStore(folder, indices=chosen, max_bytes_in_memory=0)
    assert ram.in_memory and not disk.in_memory
    datasets = [in_list, WindowDataset.from_store(ram, chosen, spk, window=1600),
                WindowDataset.from_store(disk, chosen, spk, window=1600)]
    assert [d.n_short for d in datasets] == [2, 2, 2]
    sampler = SpeakerBalancedBatchSampler(spk, batch_size=6, speakers_per_batch=2, seed=4)
    for step in range(6):
        idx = sampler.batch(step)
        a, b, c = (d.collate(idx, step, seed=4, rank=1) for d in datasets)
        for other in (b, c):
            assert torch.equal(a.wave, other.wave) and torch.equal(a.lengths, other.lengths)
            assert torch.equal(a.speakers, other.speakers) and a.indices == other.indices
        # the windows are slices of the true samples (independent check of the store path)
        for row, j in enumerate(idx):
            full = q[chosen[j]].astype(np.float32) / 32768
            n = min(len(full), 1600)
            got = c.wave[row].numpy()
            assert (got[n:] == 0).all()
            starts = [s for s in range(len(full) - n + 1) if np.array_equal(full[s:s + n], got[:n])]
            assert starts, (step, row)


def test_from_store_validation(tmp_path):
    from cpc.store import AudioStore

    folder = _store_with(tmp_path, [np.zeros(2000, np.int16) + 3])
    store = AudioStore(folder)
    with pytest.raises(ValueError, match="len\\(indices\\)=1 != len\\(speakers\\)=2"):
        WindowDataset.from_store(store, [0], ["a", "b"], window=1600)
    with pytest.raises(ValueError, match="indices: 4 out of range"):
        WindowDataset.from_store(store, [4], ["a"], window=1600)
    with pytest.raises(ValueError, match="window=100"):
        WindowDataset.from_store(store, [0], ["a"], window=100)


def test_prefetcher_yields_the_inline_batches_and_tracks_position():
    from cpc.data import BatchPrefetcher

    gen = torch.Generator().manual_seed(0)
    waves = [torch.randn(int(n), generator=gen) for n in (4000, 900, 7000, 2500)]
    spk = ["a", "b", "b", "c"]
    ds = WindowDataset(waves, spk, window=1600)
    sampler = SpeakerBalancedBatchSampler(spk, 4, 2, seed=9, rank=2)
    sampler.position = 3
    with BatchPrefetcher(ds, sampler, seed=9, rank=2, depth=2) as pre:
        got = [next(pre) for _ in range(5)]
        assert sampler.position == 8
    assert [s for s, _ in got] == [3, 4, 5, 6, 7]
    for step, batch in got:
        ref = ds.collate(sampler.batch(step), step, seed=9, rank=2)
        assert torch.equal(batch.wave, ref.wave) and batch.indices == ref.indices
        assert torch.equal(batch.lengths, ref.lengths)
    assert not pre._thread.is_alive()
    with pytest.raises(ValueError, match="depth=0"):
        BatchPrefetcher(ds, sampler, seed=0, rank=0, depth=0)


def test_prefetcher_reraises_errors_from_its_thread():
    from cpc.data import BatchPrefetcher

    class Broken(WindowDataset):
        def collate(self, indices, step, seed=0, rank=0):
            if step == 1:
                raise OSError("disk gone")
            return super().collate(indices, step, seed, rank)

    ds = Broken([torch.zeros(3200)], ["a"], window=1600)
    pre = BatchPrefetcher(ds, SpeakerBalancedBatchSampler(["a"], 2), seed=0, rank=0)
    assert next(pre)[0] == 0
    with pytest.raises(OSError, match="disk gone"):
        next(pre)
    pre.close()
