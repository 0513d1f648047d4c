"""The LibriSpeech-shaped synthetic tree: layout, alignments, determinism, splits, refusals."""
import hashlib
from collections import defaultdict

import pytest
import soundfile as sf

from modalities.audio import read_alignments, read_id_list, scan_librispeech
from modalities.audio.librishaped import N_LABELS, make_librispeech_tree


def _tree(tmp_path, name="tree", **kw):
    args = dict(speakers=3, utterances_per_speaker=5, seconds=(0.5, 1.0), seed=1)
    args.update(kw)
    return make_librispeech_tree(tmp_path / name, **args)


def test_layout_is_librispeech_and_alignments_match_durations(tmp_path):
    root = _tree(tmp_path)
    utts = scan_librispeech(root)
    assert len(utts) == 15 and {u.speaker for u in utts} == {"1000", "1001", "1002"}
    for u in utts:
        spk, chapter, _ = u.id.split("-")
        assert u.path == root / spk / chapter / f"{u.id}.flac" and u.speaker == spk
    assert len({u.labels["chapter"] for u in utts if u.speaker == "1000"}) == 2
    align = read_alignments(root / "alignments.txt")
    assert sorted(align) == sorted(u.id for u in utts)
    for u in utts:
        info = sf.info(u.path)
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "FLAC")
        assert 0.5 * 16000 - 160 <= info.frames <= 1.0 * 16000 + 160
        labels = align[u.id]
        assert info.frames == 160 * len(labels)  # one label per 10 ms frame
        assert 0 <= int(labels.min()) and int(labels.max()) < N_LABELS
        # segments of 5..15 frames (the last may be cut short)
        runs, count = [], 1
        for a, b in zip(labels[:-1].tolist(), labels[1:].tolist()):
            if a == b:
                count += 1
            else:
                runs.append(count)
                count = 1
        assert all(r >= 5 for r in runs)  # equal neighbours only merge segments, never split


def test_splits_disjoint_covering_every_speaker_in_both(tmp_path):
    root = _tree(tmp_path, speakers=4, utterances_per_speaker=6)
    train, test = read_id_list(root / "train_split.txt"), read_id_list(root / "test_split.txt")
    ids = {u.id for u in scan_librispeech(root)}
    assert not set(train) & set(test) and set(train) | set(test) == ids
    sides = defaultdict(set)
    for name, ids_ in (("train", train), ("test", test)):
        for i in ids_:
            sides[i.split("-")[0]].add(name)
    assert all(v == {"train", "test"} for v in sides.values()) and len(sides) == 4
    assert 0.1 <= len(test) / len(ids) <= 0.45


def test_deterministic_for_a_seed_and_workers(tmp_path):
    def digest(root):
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root)).encode() + sf.read(p, dtype="int16")[0].tobytes()
                         if p.suffix == ".flac" else p.read_bytes())
        return h.hexdigest()

    a = digest(_tree(tmp_path, "a", utterances_per_speaker=2))
    b = digest(_tree(tmp_path, "b", utterances_per_speaker=2, workers=2))
    c = digest(_tree(tmp_path, "c", utterances_per_speaker=2, seed=2))
    assert a == b and a != c


def test_refusals(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        _tree(tmp_path, "full")
    (tmp_path / "empty").mkdir()
    assert _tree(tmp_path, "empty", speakers=1, utterances_per_speaker=2).is_dir()
    for kw, match in ((dict(speakers=0), "speakers=0"),
                      (dict(utterances_per_speaker=1), "utterances_per_speaker=1"),
                      (dict(seconds=(2.0, 1.0)), "seconds="),
                      (dict(workers=-1), "workers=-1")):
        with pytest.raises(ValueError, match=match):
            _tree(tmp_path, "bad", **kw)
