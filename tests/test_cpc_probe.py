"""cpc.probe: batched exact encoding, probes equal to the per-utterance path, RAM and disk
storage, probes that cannot be fitted."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cpc.model import CPCModel, CPCModelConfig
from cpc.probe import FEATURE_KINDS, ProbeSplit, encode_batch, frame_index, run_probes
from modalities.audio import Utterance, mfcc
from recipes.common.evaluation import ProbeConfig, linear_probe
from recipes.common.logging import RunLog

PROBE = ProbeConfig(iterations=10)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: one intra-op thread is faster, and much faster on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, **kw) -> CPCModel:
    torch.manual_seed(seed)
    return CPCModel(CPCModelConfig(encoder_channels=16, context_dim=16, prediction_steps=2,
                                   **kw)).eval()


def padded(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wave = torch.zeros(len(lengths), max(lengths))
    for b, n in enumerate(lengths):
        wave[b, :n] = torch.randn(n, generator=gen)
    return wave


# ----------------------------------------------------------------------------------------------
# encode_batch
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm,context", [("none", "gru"), ("channel", "lstm")])
@pytest.mark.parametrize("kind", ["context", "encoder"])
@pytest.mark.parametrize("lengths", [[4799, 1600, 3333, 319, 2000, 170], [2501]])
def test_encode_batch_equals_each_utterance_alone(norm, context, kind, lengths):
    model = tiny_model(encoder_norm=norm, context=context)
    wave = padded(lengths)
    out = encode_batch(model, wave, torch.tensor(lengths), kind)
    assert out.shape == (len(lengths), max(lengths) // 160, 16)
    for b, n in enumerate(lengths):
        alone = model.features(wave[b, :n][None], kind)[0][:n // 160]
        torch.testing.assert_close(out[b, :n // 160], alone, rtol=1e-5, atol=1e-5)
        assert (out[b, n // 160:] == 0).all()


def test_encode_batch_masking_is_needed():
    # the naive padded forward differs in the last valid frames of the shorter rows: the
    # comparison above can fail
    model = tiny_model()
    lengths = [4800, 1700]
    wave = padded(lengths)
    naive = model.features(wave, "encoder")[1, :1700 // 160]
    alone = model.features(wave[1, :1700][None], "encoder")[0][:1700 // 160]
    assert (naive - alone).abs().max() > 1e-3
    ours = encode_batch(model, wave, torch.tensor(lengths), "encoder")[1, :1700 // 160]
    torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-5)


def test_encode_batch_ignores_samples_past_length():
    model = tiny_model()
    wave = padded([3200, 2000])
    noisy = wave.clone()
    noisy[1, 2000:] = 5.0
    lengths = torch.tensor([3200, 2000])
    torch.testing.assert_close(encode_batch(model, noisy, lengths), encode_batch(model, wave, lengths))


def test_encode_batch_validates():
    model = tiny_model()
    wave = padded([800, 800])
    with pytest.raises(ValueError, match="kind='pooled'"):
        encode_batch(model, wave, torch.tensor([800, 800]), "pooled")
    with pytest.raises(ValueError, match="lengths"):
        encode_batch(model, wave, torch.tensor([800]))
    with pytest.raises(ValueError, match=r"lengths=\[800, 900\]"):
        encode_batch(model, wave, torch.tensor([800, 900]))
    with pytest.raises(ValueError, match="wave"):
        encode_batch(model, wave[0], torch.tensor([800]))
    with pytest.raises(TypeError, match="model"):
        encode_batch(torch.nn.Linear(2, 2), wave, torch.tensor([800, 800]))


# ----------------------------------------------------------------------------------------------
# A tiny corpus and the per-utterance reference
# ----------------------------------------------------------------------------------------------
def corpus(n_train=12, n_test=6, test_speakers=None, seed=0):
    """Utterances of 0.1-0.5 s from 3 speakers with a 'word' label and random 3-phone
    alignments (the last test utterance has none)."""
    gen = torch.Generator().manual_seed(seed)
    speakers = ["s0", "s1", "s2"]

    def make(prefix, n, spk_list):
        utts, waves = [], []
        for i in range(n):
            length = int(torch.randint(1600, 8000, (), generator=gen))
            uid = f"{prefix}{i}"
            utts.append(Utterance(uid, path=f"/none/{uid}.wav", speaker=spk_list[i % len(spk_list)],
                                  labels={"word": "ab"[i % 2]}))
            waves.append(0.1 * torch.randn(length, generator=gen))
        return utts, waves

    tr_utts, tr_waves = make("tr", n_train, speakers)
    te_utts, te_waves = make("te", n_test, test_speakers or speakers)
    alignments = {u.id: torch.randint(0, 3, (w.numel() // 160 + 2,), generator=gen)
                  for u, w in zip(tr_utts + te_utts[:-1], tr_waves + te_waves[:-1])}
    return tr_utts, tr_waves, te_utts, te_waves, alignments


def split(utts, waves, reads=None):
    def read(i):
        if reads is not None:
            reads.append(i)
        return waves[i]
    return ProbeSplit(utts, read, [w.numel() for w in waves])


def reference(models, tr, te, alignments, labels, cap, max_seconds, seed):
    """The per-utterance path written from the spec: each wave cut, each kind's features of
    the utterance alone, mean over frames [0, T // 160), frames drawn with randperm seeded
    seed * 1_000_003 + i (train: seed, test: seed + 1), then linear_probe."""
    max_samples = int(max_seconds * 16000)

    def feats(utts, waves, split_seed):
        pooled = {k: [] for k in FEATURE_KINDS}
        frames = {k: [] for k in FEATURE_KINDS}
        phones = []
        for i, (u, w) in enumerate(zip(utts, waves)):
            w = w[:max_samples] if max_samples else w
            idx = None
            if u.id in alignments:
                n = min(w.numel() // 160, alignments[u.id].numel())
                idx = torch.arange(n)
                if cap and n > cap:
                    g = torch.Generator().manual_seed(split_seed * 1_000_003 + i)
                    idx = torch.randperm(n, generator=g)[:cap].sort().values
                phones.append(alignments[u.id][idx])
            for kind in FEATURE_KINDS:
                f = mfcc(w) if kind == "mfcc" else models[kind].features(w[None])[0]
                f = f[:w.numel() // 160]
                pooled[kind].append(f.mean(0))
                if idx is not None:
                    frames[kind].append(f[idx])
        return pooled, frames, torch.cat(phones)

    ptr, ftr, ytr_phone = feats(*tr, seed)
    pte, fte, yte_phone = feats(*te, seed + 1)
    out = {k: {} for k in FEATURE_KINDS}
    for kind in FEATURE_KINDS:
        out[kind]["phone"] = linear_probe(torch.cat(ftr[kind]), ytr_phone, torch.cat(fte[kind]),
                                          yte_phone, PROBE).as_dict()
        for label in labels:
            get = (lambda u: u.speaker) if label == "speaker" else (lambda u: u.labels[label])
            out[kind][label] = linear_probe(torch.stack(ptr[kind]), [get(u) for u in tr[0]],
                                            torch.stack(pte[kind]), [get(u) for u in te[0]],
                                            PROBE).as_dict()
    return out


def assert_results_close(ours, ref):
    assert list(ours) == list(ref)
    for kind in ref:
        assert list(ours[kind]) == list(ref[kind]), kind
        for label, r in ref[kind].items():
            for key, value in r.items():
                assert ours[kind][label][key] == pytest.approx(value, abs=1e-6), (kind, label, key)


def test_run_probes_equals_per_utterance_path():
    tr_utts, tr_waves, te_utts, te_waves, ali = corpus()
    cpc, rnd = tiny_model(1), tiny_model(2)
    results, skipped = run_probes(
        cpc_model=cpc, random_model=rnd, train=split(tr_utts, tr_waves),
        test=split(te_utts, te_waves), alignments=ali, probe_labels=["speaker", "word"],
        probe_config=PROBE, frames_per_utterance=7, max_seconds=0.3, seed=5,
        batch_seconds=0.9)  # several batches of several utterances
    assert skipped == {}
    ref = reference({"cpc": cpc, "random_init": rnd}, (tr_utts, tr_waves), (te_utts, te_waves),
                    ali, ["speaker", "word"], cap=7, max_seconds=0.3, seed=5)
    assert_results_close(results, ref)
    assert results["cpc"]["phone"]["n_train"] == 7 * len(tr_utts)
    assert results["cpc"]["speaker"]["n_test"] == len(te_utts)


def test_frame_index_rule_and_seeds():
    utts = [Utterance(f"u{i}", path="/x") for i in range(4)]
    lengths = [3200, 1000, 4000, 16000]
    ali = {"u0": torch.zeros(30), "u1": torch.zeros(30), "u3": torch.zeros(12)}
    idx = frame_index(utts, lengths, ali, cap=8, max_samples=0, seed=3)
    g = torch.Generator().manual_seed(3 * 1_000_003 + 0)
    assert idx[0].tolist() == torch.randperm(20, generator=g)[:8].sort().values.tolist()
    assert idx[1].tolist() == list(range(6))          # n = 1000 // 160 = 6 <= cap: all
    assert idx[2] is None                             # no alignment
    g = torch.Generator().manual_seed(3 * 1_000_003 + 3)
    assert idx[3].tolist() == torch.randperm(12, generator=g)[:8].sort().values.tolist()
    other = frame_index(utts, lengths, ali, cap=8, max_samples=0, seed=4)
    assert other[0].tolist() != idx[0].tolist()
    cut = frame_index(utts, lengths, ali, cap=0, max_samples=800, seed=3)
    assert cut[0].tolist() == list(range(5)) and cut[3].tolist() == list(range(5))


def test_disk_path_equals_ram_path(tmp_path, monkeypatch):
    import cpc.probe as probe_module

    tr_utts, tr_waves, te_utts, te_waves, ali = corpus(seed=1)
    kwargs = dict(train=split(tr_utts, tr_waves), test=split(te_utts, te_waves),
                  alignments=ali, probe_labels=["word"], probe_config=PROBE,
                  frames_per_utterance=0, seed=0, batch_seconds=1.0)
    ram, _ = run_probes(cpc_model=tiny_model(1), random_model=tiny_model(2), **kwargs)
    opened = []
    real_open = os.open

    def spy(path, *args, **kw):
        if str(path).endswith(".f32"):
            opened.append(Path(path))
        return real_open(path, *args, **kw)

    def no_memmap(*args, **kw):
        raise AssertionError("probe features must not be memory-mapped")

    monkeypatch.setattr(probe_module.os, "open", spy)
    monkeypatch.setattr(np.lib.format, "open_memmap", no_memmap)
    monkeypatch.setattr(np, "memmap", no_memmap)
    work = tmp_path / "work"
    disk, _ = run_probes(cpc_model=tiny_model(1), random_model=tiny_model(2), work_dir=work,
                         max_feature_bytes=1000, **kwargs)
    assert len(opened) == 12  # 3 kinds x 2 splits x 2 levels
    assert all(str(p).startswith(str(work)) for p in opened)
    assert not work.exists()  # files deleted at the end, and the folder made for them
    assert disk == ram
    work.mkdir()
    (work / "keep.txt").write_text("x")
    again, _ = run_probes(cpc_model=tiny_model(1), random_model=tiny_model(2), work_dir=work,
                          max_feature_bytes=1000, **kwargs)
    assert len(opened) == 24 and again == ram
    assert [p.name for p in work.iterdir()] == ["keep.txt"]  # a folder given is left as it was
    assert set(ram["cpc"]) == {"phone", "speaker", "word"}


@pytest.mark.parametrize("on_disk", [False, True])
def test_frame_probe_reads_one_chunk_at_a_time(tmp_path, monkeypatch, on_disk):
    # probe_chunk_bytes bounds what the frame probe holds: every read of frame features is at
    # most chunk_bytes // (8 * dim) rows (float64 standardised rows), on disk and in RAM
    import cpc.probe as probe_module

    tr_utts, tr_waves, te_utts, te_waves, ali = corpus(seed=2)
    reads = []
    real_read = probe_module._Store.read

    def spy(self, key, start, stop):
        reads.append((key, start, stop, self.shapes[key]))
        return real_read(self, key, start, stop)

    monkeypatch.setattr(probe_module._Store, "read", spy)
    chunk_bytes = 8 * 16 * 5  # 5 rows of a 16-dim feature, fewer of the 39-dim MFCC
    results, _ = run_probes(
        cpc_model=tiny_model(1), random_model=tiny_model(2), train=split(tr_utts, tr_waves),
        test=split(te_utts, te_waves), alignments=ali, probe_labels=[], probe_config=PROBE,
        work_dir=tmp_path / "w", max_feature_bytes=0 if on_disk else 10**9,
        probe_chunk_bytes=chunk_bytes)
    frame_reads = [(k, a, b, shape) for k, a, b, shape in reads if k[2] == "frame"]
    assert {k[0] for k, *_ in frame_reads} == set(FEATURE_KINDS)
    for key, a, b, (rows, dim) in frame_reads:
        assert 0 < b - a <= max(1, chunk_bytes // (8 * dim)) and b <= rows
    assert max(shape[0] for *_, shape in frame_reads) > 5  # more frames than one chunk
    assert results["cpc"]["phone"]["n_train"] == frame_reads[0][3][0]
    with pytest.raises(ValueError, match="probe_chunk_bytes=0: expected an integer >= 1"):
        run_probes(cpc_model=tiny_model(1), random_model=tiny_model(2),
                   train=split(tr_utts, tr_waves), test=split(te_utts, te_waves),
                   alignments=ali, probe_labels=[], probe_config=PROBE, probe_chunk_bytes=0)


def test_speaker_disjoint_split_is_skipped_not_zero(tmp_path):
    tr_utts, tr_waves, te_utts, te_waves, ali = corpus(test_speakers=["x0", "x1"])
    log = RunLog(tmp_path / "train.log")
    results, skipped = run_probes(
        cpc_model=tiny_model(1), random_model=tiny_model(2), train=split(tr_utts, tr_waves),
        test=split(te_utts, te_waves), alignments=ali, probe_labels=["speaker"],
        probe_config=PROBE, log=log)
    assert skipped == {"speaker": "none of the 2 held-out speakers occurs in training "
                                  "(speaker-disjoint split)"}
    for kind in FEATURE_KINDS:
        assert "speaker" not in results[kind] and "phone" in results[kind]
    text = (tmp_path / "train.log").read_text()
    assert "probe speaker: skipped: none of the 2 held-out speakers" in text
    assert "probe features (train): 12/12" in text and "probe features (held out): 6/6" in text


def test_some_unseen_labels_give_unseen_fraction():
    # held-out speakers alternate s0, x9, s1: 2 of 6 utterances from a speaker never trained on
    tr_utts, tr_waves, te_utts, te_waves, ali = corpus(test_speakers=["s0", "x9", "s1"])
    results, skipped = run_probes(
        cpc_model=tiny_model(1), random_model=tiny_model(2), train=split(tr_utts, tr_waves),
        test=split(te_utts, te_waves), alignments=None, probe_labels=[], probe_config=PROBE)
    assert skipped == {}
    for kind in FEATURE_KINDS:
        r = results[kind]["speaker"]
        assert r["unseen_test_fraction"] == pytest.approx(2 / 6)
        assert r["accuracy"] <= 4 / 6 + 1e-9
        assert set(results[kind]) == {"speaker"}   # no alignments: no phone probe
    full, _ = run_probes(
        cpc_model=tiny_model(1), random_model=tiny_model(2), train=split(tr_utts, tr_waves),
        test=split(*corpus()[2:4]), alignments=None, probe_labels=[], probe_config=PROBE)
    assert "unseen_test_fraction" not in full["cpc"]["speaker"]


def test_other_unfittable_probes_are_skipped():
    tr_utts, tr_waves, te_utts, te_waves, _ = corpus()
    for u in tr_utts:
        u.labels["word"] = "a"                # one training class
        u.labels["tone"] = "x"
    for u in te_utts:
        u.labels.pop("word")                  # "tone" absent: no labelled held-out example
    ali = {u.id: torch.zeros(60, dtype=torch.long) for u in te_utts}  # none for training
    reads = []
    results, skipped = run_probes(
        cpc_model=tiny_model(1), random_model=tiny_model(2), train=split(tr_utts, tr_waves, reads),
        test=split(te_utts, te_waves, reads), alignments=ali, probe_labels=["word", "tone"],
        probe_config=PROBE)
    assert skipped == {"phone": "no labelled training frames",
                       "word": "no labelled held-out utterances",
                       "tone": "no labelled held-out utterances"}
    assert set(results["mfcc"]) == {"speaker"}
    for u in te_utts:
        u.labels["word"] = "a"
    _, skipped = run_probes(
        cpc_model=tiny_model(1), random_model=tiny_model(2), train=split(tr_utts, tr_waves),
        test=split(te_utts, te_waves), alignments=None, probe_labels=["word", "speaker", "phone"],
        probe_config=PROBE)
    assert skipped == {"word": "only 1 class in training ('word' labels: ['a']); expected 2 or "
                               "more"}


def test_nothing_to_probe_reads_no_audio():
    tr_utts, tr_waves, te_utts, te_waves, _ = corpus()
    tr_utts = [dataclasses.replace(u, speaker=None) for u in tr_utts]
    te_utts = [dataclasses.replace(u, speaker=None) for u in te_utts]
    reads = []
    results, skipped = run_probes(
        cpc_model=tiny_model(1), random_model=tiny_model(2), train=split(tr_utts, tr_waves, reads),
        test=split(te_utts, te_waves, reads), alignments=None, probe_labels=[],
        probe_config=PROBE)
    assert results == {k: {} for k in FEATURE_KINDS} and skipped == {} and reads == []


def test_bad_arguments_raise_before_reading():
    tr_utts, tr_waves, te_utts, te_waves, _ = corpus()
    reads = []
    base = dict(cpc_model=tiny_model(1), random_model=tiny_model(2),
                train=split(tr_utts, tr_waves, reads), test=split(te_utts, te_waves, reads),
                alignments=None, probe_labels=[], probe_config=PROBE)
    with pytest.raises(ValueError, match=r"'digit'.*expected one of \['word'\]"):
        run_probes(**{**base, "probe_labels": ["digit"]})
    for name, value in [("frames_per_utterance", -1), ("max_seconds", float("nan")),
                        ("batch_seconds", 0), ("seed", 1.5), ("max_feature_bytes", -2)]:
        with pytest.raises(ValueError, match=name):
            run_probes(**{**base, name: value})
    with pytest.raises(TypeError, match="train"):
        run_probes(**{**base, "train": tr_waves})
    with pytest.raises(TypeError, match="probe_config"):
        run_probes(**{**base, "probe_config": {}})
    assert reads == []
    with pytest.raises(ValueError, match="lengths"):
        ProbeSplit(tr_utts, lambda i: tr_waves[i], [1600])
    with pytest.raises(ValueError, match=r"lengths\[0\]=-1"):
        ProbeSplit(tr_utts[:1], lambda i: tr_waves[i], [-1])
    wrong = ProbeSplit(tr_utts, lambda i: tr_waves[i][:100], [w.numel() for w in tr_waves])
    with pytest.raises(ValueError, match="read returned shape"):
        run_probes(**{**base, "train": wrong})


def test_utterance_shorter_than_a_frame_enters_no_utterance_probe():
    tr_utts, tr_waves, te_utts, te_waves, _ = corpus()
    tr_waves[3] = tr_waves[3][:150]  # no 10 ms frame: no features to pool
    results, _ = run_probes(
        cpc_model=tiny_model(1), random_model=tiny_model(2), train=split(tr_utts, tr_waves),
        test=split(te_utts, te_waves), alignments=None, probe_labels=["word"],
        probe_config=PROBE)
    for kind in FEATURE_KINDS:
        assert results[kind]["speaker"]["n_train"] == len(tr_utts) - 1
        assert results[kind]["word"]["n_train"] == len(tr_utts) - 1
        assert results[kind]["speaker"]["accuracy"] == results[kind]["speaker"]["accuracy"]  # no NaN
