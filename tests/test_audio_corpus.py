"""The generated speech corpus: deterministic, idempotent, consistent labels."""
import dataclasses
import filecmp
import json
from pathlib import Path

import pytest
import torch

import modalities.audio.corpus as corpus_module
from modalities.audio import (CORPUS_VERSION, FRAME_HOP, SAMPLE_RATE, corpus_cache_dir, corpus_key,
                              corpus_version, generate_corpus, load_audio, read_alignments, read_manifest,
                              read_phone_set)

SMALL = dict(n_speakers=3, utterances_per_speaker=4, seconds=(1.0, 1.5), n_phones=8, seed=3, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("corpus_a"), **SMALL)


def test_files_labels_and_coverage(corpus: Path) -> None:
    root = corpus.parent
    utts = read_manifest(corpus)
    alignments = read_alignments(root / "phones.txt")
    phone_set = read_phone_set(root / "phone_set.txt")
    assert len(utts) == 12 and len(phone_set) == 8 and phone_set[0] == "sil"
    assert sorted({u.speaker for u in utts}) == ["spk00", "spk01", "spk02"]
    assert {u.labels["gender"] for u in utts} == {"F", "M"}
    assert [u.split for u in utts if u.speaker == "spk00"] == ["train"] * 3 + ["test"]
    assert set(alignments) == {u.id for u in utts}
    seen = set()
    for u in utts:
        wave = load_audio(u.path)
        assert 1.0 * SAMPLE_RATE <= len(wave) <= 1.5 * SAMPLE_RATE
        assert 0.01 < wave.pow(2).mean().sqrt() < 0.5
        labels = alignments[u.id]
        assert len(labels) == len(wave) // FRAME_HOP
        assert labels[0] == 0 and labels[-1] == 0  # framed by silence
        seen |= set(labels.tolist())
    assert seen == set(range(8))
    info = json.loads((root / "corpus.json").read_text())
    assert info["params"]["seed"] == 3 and info["phone_set"] == phone_set


def test_same_seed_gives_byte_identical_files(corpus: Path, tmp_path: Path) -> None:
    other = generate_corpus(tmp_path / "b", **SMALL)
    a, b = corpus.parent, other.parent
    names = ["manifest.csv", "phones.txt", "phone_set.txt", "corpus.json"]
    names += [f"wav/{p.name}" for p in sorted((a / "wav").iterdir())]
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names)


def test_reuse_when_parameters_match_and_regenerate_otherwise(tmp_path: Path) -> None:
    params = dict(SMALL, n_speakers=2, utterances_per_speaker=2)
    manifest = generate_corpus(tmp_path, **params)
    wav = sorted((tmp_path / "wav").iterdir())[0]
    stamp = wav.stat().st_mtime_ns
    assert generate_corpus(tmp_path, **params) == manifest
    assert wav.stat().st_mtime_ns == stamp  # reused, not rewritten
    generate_corpus(tmp_path, **dict(params, seed=4))
    assert json.loads((tmp_path / "corpus.json").read_text())["params"]["seed"] == 4
    wav.unlink()  # an incomplete corpus is regenerated
    generate_corpus(tmp_path, **dict(params, seed=4))
    assert wav.exists()


def test_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_phones=99"):
        generate_corpus(tmp_path, n_phones=99, progress=False)
    with pytest.raises(ValueError, match="seconds"):
        generate_corpus(tmp_path, seconds=(3.0, 2.0), progress=False)
    with pytest.raises(ValueError, match="n_speakers=0"):
        generate_corpus(tmp_path, n_speakers=0, progress=False)


def test_different_speakers_differ_in_pitch(corpus: Path) -> None:
    info = json.loads((corpus.parent / "corpus.json").read_text())
    f0 = {s["name"]: s["f0"] for s in info["speakers"]}
    assert f0["spk00"] > 160 > f0["spk01"]  # female, male
    assert len({round(s["formant_scale"], 3) for s in info["speakers"]}) == 3
    assert torch.tensor(list(f0.values())).std() > 10


def test_version_is_a_content_hash_of_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    assert corpus_version() == CORPUS_VERSION == corpus_version()  # stable within a process
    assert CORPUS_VERSION.startswith(f"{corpus_module._REVISION}-") and len(CORPUS_VERSION.split("-")[1]) == 12
    versions = {CORPUS_VERSION}
    with monkeypatch.context() as m:  # one vowel's formants
        aa = corpus_module.PHONES[1]
        changed = dataclasses.replace(aa, formants=(740.0, *aa.formants[1:]))
        m.setattr(corpus_module, "PHONES", (corpus_module.PHONES[0], changed, *corpus_module.PHONES[2:]))
        versions.add(corpus_version())
    with monkeypatch.context() as m:  # the synthesis code
        m.setattr(corpus_module, "_reverberate", lambda wave, rng: wave)
        versions.add(corpus_version())
    with monkeypatch.context() as m:  # a synthesis constant
        m.setattr(corpus_module, "_HOP", 64)
        versions.add(corpus_version())
    with monkeypatch.context() as m:
        m.setattr(corpus_module, "_REVISION", 99)
        versions.add(corpus_version())
    assert len(versions) == 5
    assert corpus_version() == CORPUS_VERSION  # restored


def test_cache_key_and_folder_follow_version_and_arguments(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    args = {k: v for k, v in SMALL.items() if k != "progress"}
    folder = corpus_cache_dir(tmp_path, **args)
    assert folder == corpus_cache_dir(tmp_path, **dict(args, seconds=[1, 1.5]))  # same values, same key
    assert folder.parent == tmp_path and folder.name == f"synth-{corpus_key(**args)}"
    others = {corpus_cache_dir(tmp_path, **dict(args, **change))
              for change in ({"seed": 4}, {"n_phones": 9}, {"n_speakers": 2}, {"utterances_per_speaker": 5},
                             {"seconds": (1.0, 1.6)})}
    assert len(others) == 5 and folder not in others
    with monkeypatch.context() as m:  # a changed generator: new version, new cache folder
        m.setattr(corpus_module, "_REVISION", 99)
        assert corpus_cache_dir(tmp_path, **args) != folder
    with pytest.raises(ValueError, match="n_phones=99"):
        corpus_key(n_phones=99)


def test_stale_corpus_is_regenerated_not_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    params = dict(SMALL, n_speakers=1, utterances_per_speaker=2)
    generate_corpus(tmp_path, **params)
    info = json.loads((tmp_path / "corpus.json").read_text())
    assert info["version"] == CORPUS_VERSION
    assert info["key"] == corpus_key(**{k: v for k, v in params.items() if k != "progress"})
    wav = sorted((tmp_path / "wav").iterdir())[0]
    before = wav.read_bytes()
    with monkeypatch.context() as m:  # the synthesis changes (one vowel's formants), same arguments
        aa = corpus_module.PHONES[1]
        moved = dataclasses.replace(aa, formants=(900.0, 1500.0, 2600.0))
        m.setattr(corpus_module, "PHONES", (corpus_module.PHONES[0], moved, *corpus_module.PHONES[2:]))
        new_version = corpus_version()
        generate_corpus(tmp_path, **params)
    info = json.loads((tmp_path / "corpus.json").read_text())
    assert info["version"] == new_version != CORPUS_VERSION
    assert wav.read_bytes() != before  # written anew by the changed generator
