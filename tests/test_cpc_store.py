"""The int16 audio store: exact round trip, reuse and refusal, bad files, worker processes,
rank shards, in-memory and pread reads, and the scale benchmark's RSS poller."""
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from cpc.data import BadAudioError
from cpc.store import AudioStore, prepare_store, shard_indices, store_key


def _utt(path, uid, speaker="s"):
    return SimpleNamespace(id=uid, path=Path(path), speaker=speaker, split=None, labels={})


def _pcm16_files(tmp_path, lengths, seed=0):
    """PCM_16 WAV files holding known int16 samples (full range, both extremes included)."""
    rng = np.random.default_rng(seed)
    utts, truth = [], []
    for i, n in enumerate(lengths):
        q = rng.integers(-32768, 32768, size=n, dtype=np.int64).astype(np.int16)
        q[:2] = np.array([-32768, 32767], dtype=np.int16)[:n]
        path = tmp_path / f"f{i}.wav"
        sf.write(path, q, 16000, subtype="PCM_16")
        utts.append(_utt(path, f"u{i}", speaker=f"s{i % 3}"))
        truth.append(q)
    return utts, truth


def test_pcm16_round_trip_is_exact_and_index_matches(tmp_path):
    utts, truth = _pcm16_files(tmp_path, [1000, 1, 4321])
    report = prepare_store(utts, tmp_path / "store")
    assert not report.reused and report.n_utterances == 3
    assert report.total_samples == 1000 + 1 + 4321
    raw = np.fromfile(tmp_path / "store" / "audio.i16", dtype="<i2")
    np.testing.assert_array_equal(raw, np.concatenate(truth))
    with np.load(tmp_path / "store" / "index.npz") as idx:
        assert idx["offsets"].tolist() == [0, 1000, 1001]
        assert idx["lengths"].tolist() == [1000, 1, 4321]
        assert idx["kept"].tolist() == [0, 1, 2]
    meta = json.loads((tmp_path / "store" / "store.json").read_text())
    assert meta["ids"] == ["u0", "u1", "u2"] and meta["key"] == report.key
    for max_bytes in (10**9, 0):  # in RAM, then pread
        store = AudioStore(tmp_path / "store", max_bytes_in_memory=max_bytes)
        assert store.in_memory == (max_bytes > 0)
        assert store.resident_bytes == (2 * 5322 if max_bytes else 0)
        for i, q in enumerate(truth):
            # the reference: libsndfile's own float decoding of the file (int16 / 32768)
            ref = sf.read(utts[i].path, dtype="float32")[0]
            np.testing.assert_array_equal(store.read(i).numpy(), ref)
            np.testing.assert_array_equal(store.read(i).numpy(), q.astype(np.float64) / 32768)
        np.testing.assert_array_equal(store.read(2, 100, 50).numpy(), truth[2][100:150] / 32768)


def test_quantisation_rounds_and_clips(tmp_path):
    wave = np.array([0.5 / 32768, 1.6 / 32768, -1.0, 1.0, -1.4 / 32768], dtype=np.float32)
    path = tmp_path / "f.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    prepare_store([_utt(path, "a")], tmp_path / "store")
    got = np.fromfile(tmp_path / "store" / "audio.i16", dtype="<i2").tolist()
    # round-half-even(x * 32768), then clip to int16: 0.5 -> 0, 1.6 -> 2, 1.0 -> 32767
    assert got == [0, 2, -32768, 32767, -1]


def test_key_reuse_and_refusals(tmp_path):
    utts, _ = _pcm16_files(tmp_path, [800, 900])
    first = prepare_store(utts, tmp_path / "store")
    again = prepare_store(utts, tmp_path / "store")
    assert again.reused and again.key == first.key and again.total_samples == first.total_samples
    assert store_key(utts[:1]) != first.key
    assert store_key(utts, sample_rate=8000) != first.key
    with pytest.raises(ValueError, match="holds a store of other audio.*another folder"):
        prepare_store(utts[:1], tmp_path / "store")
    # a changed file changes the key
    os.utime(utts[0].path, ns=(1, 1))
    assert store_key(utts) != first.key
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty.*notes.txt.*delete it"):
        prepare_store(utts, tmp_path / "other")
    (tmp_path / "empty").mkdir()
    assert prepare_store(utts, tmp_path / "empty").n_utterances == 2
    # an interrupted build (no store.json) is never taken for a store, nor left in the folder
    half = tmp_path / "half"
    half.mkdir()
    (half / "audio.i16").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="holds no complete audio store"):
        AudioStore(half)
    assert not list(tmp_path.glob(".store.tmp-*"))


def test_bad_files_skipped_or_strict(tmp_path):
    utts, truth = _pcm16_files(tmp_path, [500, 600])
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.int16), 16000, subtype="PCM_16")
    mixed = [utts[0], _utt(garbage, "g"), _utt(empty, "e"), utts[1]]
    with pytest.raises(BadAudioError, match="garbage.wav"):
        prepare_store(mixed, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".strict.tmp-*"))
    calls = []
    with pytest.warns(UserWarning, match="skipping unreadable"):
        report = prepare_store(mixed, tmp_path / "store", progress=lambda d, t: calls.append((d, t)))
    assert [p for p, _ in report.skipped] == [str(garbage), str(empty)]
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    store = AudioStore(tmp_path / "store")
    assert store.ids == ["u0", "u1"] and store.kept.tolist() == [0, 3]
    np.testing.assert_array_equal(store.read(1).numpy(), truth[1] / 32768)


def test_worker_processes_write_the_same_store(tmp_path):
    utts, _ = _pcm16_files(tmp_path, [300 + 7 * i for i in range(9)])
    prepare_store(utts, tmp_path / "serial")
    prepare_store(utts, tmp_path / "pool", workers=2)
    for name in ("audio.i16", "store.json"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "pool" / name).read_bytes()


def test_argument_validation(tmp_path):
    utts, _ = _pcm16_files(tmp_path, [100])
    with pytest.raises(ValueError, match="workers=-1"):
        prepare_store(utts, tmp_path / "s", workers=-1)
    with pytest.raises(ValueError, match="sample_rate=0"):
        prepare_store(utts, tmp_path / "s", sample_rate=0)
    prepare_store(utts, tmp_path / "s")
    with pytest.raises(ValueError, match="indices: 5 out of range"):
        AudioStore(tmp_path / "s", indices=[5])
    with pytest.raises(ValueError, match="max_bytes_in_memory=-1"):
        AudioStore(tmp_path / "s", max_bytes_in_memory=-1)
    store = AudioStore(tmp_path / "s")
    with pytest.raises(ValueError, match="range inside utterance 0 of 100"):
        store.read(0, 90, 20)
    with pytest.raises(ValueError, match="i=1"):
        store.read(1)


def test_store_opened_for_a_shard_loads_only_that_shard(tmp_path):
    utts, truth = _pcm16_files(tmp_path, [100, 200, 300, 400])
    prepare_store(utts, tmp_path / "s")
    store = AudioStore(tmp_path / "s", indices=[1, 3])
    assert store.in_memory and store.resident_bytes == 2 * (200 + 400)
    np.testing.assert_array_equal(store.read(3).numpy(), truth[3] / 32768)
    with pytest.raises(ValueError, match="not among the indices"):
        store.read(0)
    assert not AudioStore(tmp_path / "s", indices=[1, 3], max_bytes_in_memory=1199).in_memory


def test_shard_indices_whole_speakers_round_robin():
    speakers = ["b", "a", "c", None, "a", "b", None, "d"]
    # speakers sorted: "\0utt3", "\0utt6", "a", "b", "c", "d" -> ranks 0,1,0,1,0,1 for 2 ranks
    assert shard_indices(speakers, 0, 2) == [1, 2, 3, 4]
    assert shard_indices(speakers, 1, 2) == [0, 5, 6, 7]
    shards = [shard_indices(speakers, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(8))
    for s in shards:  # a speaker never in two shards
        for t in shards:
            if s is not t:
                assert not {speakers[i] for i in s if speakers[i]} & {speakers[i] for i in t if speakers[i]}
    # fewer speakers than ranks: utterances round-robin
    assert shard_indices(["a", "a", "b", "b", "a"], 1, 3) == [1, 4]
    with pytest.raises(ValueError, match="rank=2"):
        shard_indices(speakers, 2, 2)
    with pytest.raises(ValueError, match="world_size=0"):
        shard_indices(speakers, 0, 0)


# --- the scale benchmark's measuring parts, on a dummy child process -----------------------

def test_rss_poller_sees_a_child_and_its_descendant_allocate():
    from recipes.bench_cpc_scale import run_measured

    code = ("import subprocess, sys, time\n"
            "print('phase-a', flush=True); a = bytearray(40 << 20); a[::4096] = b'x' * len(a[::4096])\n"
            "time.sleep(0.4); del a\n"
            "print('phase-b', flush=True)\n"
            "subprocess.run([sys.executable, '-c', \"import time; b = bytearray(120 << 20); "
            "b[::4096] = b'y' * len(b[::4096]); time.sleep(0.5)\"])\n")
    result = run_measured([sys.executable, "-c", code],
                          phase_of=lambda line: {"phase-a": "a", "phase-b": "b"}.get(line.strip()))
    assert result["returncode"] == 0
    peaks = result["peak_rss_mb"]
    assert peaks["a"] >= 40 and peaks["b"] >= 120 + peaks["a"] * 0  # the grandchild counted
    assert peaks["overall"] >= peaks["b"] and peaks["b"] > peaks["a"]
    assert result["seconds"] > 0.8
    assert 120 <= result["peak_pss_mb"] <= peaks["overall"] + 1


def test_bench_table_and_flag_validation():
    from recipes.bench_cpc_scale import format_table, parse_args

    rows = [{"size": 200, "utterances": 200, "hours": 0.69, "store_gb": 0.08,
             "peak_rss_mb": {"prepare": 300.0, "train": 500.0, "probe": 450.0, "overall": 510.0},
             "rank_peak_mb": 480.0, "seconds": 61.2}]  # no peak_pss_mb: shown as "-"
    table = format_table(rows)
    assert "| 200 | 200 | 0.69 | 0.080 | 300 | 500 | 450 | 510 | - | 480 | 61.2 |" in table
    with pytest.raises(SystemExit):
        parse_args(["--sizes", "0,10"])
    with pytest.raises(SystemExit):
        parse_args(["--steps", "-1"])
    with pytest.raises(SystemExit):
        parse_args(["--sizes", "20,40", "--speakers-per-size", "2"])
    with pytest.raises(SystemExit):
        parse_args(["--sizes", "20", "--speakers-per-size", "11"])
    args = parse_args(["--sizes", "20,40", "--steps", "2"])
    assert args.sizes == [20, 40] and args.steps == 2 and args.speakers_per_size == [2, 2]
    assert not args.no_probes and parse_args(["--no-probes"]).no_probes


def test_a_store_finished_first_by_another_process_is_used(tmp_path, monkeypatch):
    import cpc.store as store_mod

    utts, truth = _pcm16_files(tmp_path, [700, 300])
    real_rename = os.rename

    def racing_rename(src, dst):
        # another process completes the same store while this one is writing its copy
        if Path(dst) == tmp_path / "store":
            monkeypatch.setattr(store_mod.os, "rename", real_rename)
            prepare_store(utts, tmp_path / "other")
            real_rename(tmp_path / "other", dst)
            raise OSError(39, "Directory not empty")
        return real_rename(src, dst)

    monkeypatch.setattr(store_mod.os, "rename", racing_rename)
    report = prepare_store(utts, tmp_path / "store")
    assert report.reused and not list(tmp_path.glob(".store.tmp-*"))
    np.testing.assert_array_equal(AudioStore(tmp_path / "store").read(1).numpy(), truth[1] / 32768)


def test_pread_exact_reads_at_offsets_and_names_a_short_file(tmp_path):
    from cpc.store import pread_exact

    path = tmp_path / "x.bin"
    np.arange(10, dtype=np.float32).tofile(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        out = np.empty(4, dtype=np.float32)
        pread_exact(fd, out, 4 * 3, path)
        assert out.tolist() == [3.0, 4.0, 5.0, 6.0]
        with pytest.raises(OSError, match=r"x.bin: short read at byte 40"):
            pread_exact(fd, np.empty(4, dtype=np.float32), 4 * 8, path)
    finally:
        os.close(fd)
