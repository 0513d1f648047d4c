"""Utterance sources: manifests, LibriSpeech folders, alignments, holdout splits."""
import json
from pathlib import Path

import pytest
import torch

from modalities.audio import (Utterance, holdout_split, read_alignments, read_id_list, read_manifest,
                              scan_librispeech)


def test_csv_manifest_relative_paths_and_labels(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    manifest = tmp_path / "data" / "list.csv"
    manifest.write_text("path,speaker,split,emotion,id\n"
                        "a/one.wav,alice,train,happy,\n"
                        "/abs/two.flac,bob,test,sad,utt2\n"
                        "three.wav,,,,\n")
    utts = read_manifest(manifest)
    assert [u.id for u in utts] == ["one", "utt2", "three"]
    assert utts[0].path == (tmp_path / "data" / "a" / "one.wav").resolve()
    assert utts[1].path == Path("/abs/two.flac")
    assert utts[0].speaker == "alice" and utts[0].split == "train"
    assert utts[0].labels == {"emotion": "happy"}
    assert utts[2].speaker is None and utts[2].split is None and utts[2].labels == {}
    assert all(u.path.is_absolute() for u in utts)


def test_csv_manifest_with_byte_order_mark(tmp_path: Path) -> None:
    manifest = tmp_path / "excel.csv"
    manifest.write_bytes("path,speaker\nx.wav,s1\n".encode("utf-8-sig"))
    assert read_manifest(manifest)[0].speaker == "s1"


def test_jsonl_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "list.jsonl"
    rows = [{"path": "x/1.wav", "speaker": 7, "split": "test", "age": 31},
            {"path": "x/2.wav", "id": "second"}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    utts = read_manifest(manifest)
    assert utts[0] == Utterance("1", (tmp_path / "x" / "1.wav").resolve(), "7", "test", {"age": "31"})
    assert utts[1].id == "second" and utts[1].speaker is None


def test_manifest_errors_name_file_line_and_column(tmp_path: Path) -> None:
    bad_split = tmp_path / "bad_split.csv"
    bad_split.write_text("path,split\na.wav,train\nb.wav,dev\n")
    with pytest.raises(ValueError, match=r"bad_split.csv, line 3: column 'split' has value 'dev'"):
        read_manifest(bad_split)
    no_path = tmp_path / "no_path.csv"
    no_path.write_text("file,speaker\na.wav,x\n")
    with pytest.raises(ValueError, match=r"no_path.csv, line 1: no 'path' column.*'file'"):
        read_manifest(no_path)
    empty_path = tmp_path / "empty_path.jsonl"
    empty_path.write_text('{"path": "a.wav"}\n{"path": ""}\n')
    with pytest.raises(ValueError, match=r"empty_path.jsonl, line 2: column 'path' is empty"):
        read_manifest(empty_path)
    missing_key = tmp_path / "missing_key.jsonl"
    missing_key.write_text('{"file": "a.wav"}\n')
    with pytest.raises(ValueError, match=r"missing_key.jsonl, line 1: no 'path' key"):
        read_manifest(missing_key)
    duplicate = tmp_path / "dup.csv"
    duplicate.write_text("path,id\nx/a.wav,u1\ny/a.wav,u1\n")
    with pytest.raises(ValueError, match=r"dup.csv, line 3: column 'id' value 'u1' repeats line 2"):
        read_manifest(duplicate)
    same_file = tmp_path / "same_file.csv"  # the same file twice: stems repeat, so do the paths
    same_file.write_text("path\nx/a.wav\nb.wav\nx/../x/a.wav\n")
    with pytest.raises(ValueError, match=r"same_file.csv, line 4: id 'x/a.wav' \(the relative path; "
                       r"no 'id' column value\) repeats line 2"):
        read_manifest(same_file)


def _speech_commands_tree(root: Path) -> list[str]:
    """A Speech Commands-style tree: <word>/<speaker>_nohash_<n>.wav, names reused across words."""
    rel = []
    for word in ("yes", "no", "_background_noise_"):
        for name in ("0a7c2a8d_nohash_0.wav", "0a7c2a8d_nohash_1.wav", "bd76a7fd_nohash_0.wav"):
            if word == "_background_noise_" and name != "bd76a7fd_nohash_0.wav":
                continue
            (root / word).mkdir(parents=True, exist_ok=True)
            (root / word / name).write_bytes(b"")
            rel.append(f"{word}/{name}")
    (root / "testing_list.txt").write_text("no/0a7c2a8d_nohash_1.wav\nyes/bd76a7fd_nohash_0.wav\n")
    return rel


def test_speech_commands_layout_gets_relative_path_ids(tmp_path: Path) -> None:
    rel = _speech_commands_tree(tmp_path / "sc")
    manifest = tmp_path / "sc" / "manifest.csv"
    manifest.write_text("path,speaker,word\n" + "".join(f"{p},{p.split('/')[1].split('_')[0]},{p.split('/')[0]}\n"
                                                       for p in rel))
    utts = read_manifest(manifest)
    assert [u.id for u in utts] == rel  # unique although every stem occurs under several words
    assert len({u.id for u in utts}) == len(rel) == 7
    assert utts[1].path == (tmp_path / "sc" / "yes" / "0a7c2a8d_nohash_1.wav").resolve()
    assert utts[3].labels == {"word": "no"} and utts[3].speaker == "0a7c2a8d"
    # the corpus's own test list names utterances by these ids
    test_ids = set(read_id_list(tmp_path / "sc" / "testing_list.txt"))
    assert test_ids <= {u.id for u in utts} and len(test_ids) == 2
    # absolute paths under the manifest's folder get the same ids; a "./" prefix changes nothing
    abs_manifest = tmp_path / "sc" / "abs.jsonl"
    abs_manifest.write_text("".join(json.dumps({"path": str(tmp_path / "sc" / p) if i % 2 else f"./{p}"}) + "\n"
                                    for i, p in enumerate(rel)))
    assert [u.id for u in read_manifest(abs_manifest)] == rel
    # a manifest one level up: ids relative to *its* folder
    up = tmp_path / "up.csv"
    up.write_text("path\n" + "".join(f"sc/{p}\n" for p in rel))
    assert [u.id for u in read_manifest(up)] == [f"sc/{p}" for p in rel]
    # an explicit id column still wins, row by row; the other rows take relative paths
    mixed = tmp_path / "sc" / "mixed.csv"
    mixed.write_text("path,id\n" + "".join(f"{p},{'first' if i == 0 else ''}\n" for i, p in enumerate(rel)))
    assert [u.id for u in read_manifest(mixed)] == ["first"] + rel[1:]


def test_unique_stems_keep_stem_ids(tmp_path: Path) -> None:
    # LibriSpeech-style nested paths: stems unique, ids unchanged from before (alignment files
    # and the CPC paper's split lists name utterances by stem)
    manifest = tmp_path / "libri.csv"
    manifest.write_text("path\n19/198/19-198-0001.flac\n103/1240/103-1240-0000.flac\n")
    assert [u.id for u in read_manifest(manifest)] == ["19-198-0001", "103-1240-0000"]
    # one repeated stem switches the whole manifest to relative paths
    manifest.write_text("path\n19/198/19-198-0001.flac\n103/1240/103-1240-0000.flac\nextra/19-198-0001.wav\n")
    assert [u.id for u in read_manifest(manifest)] == ["19/198/19-198-0001.flac", "103/1240/103-1240-0000.flac",
                                                         "extra/19-198-0001.wav"]
    # rows with an id column value do not count towards the stem check
    manifest.write_text("path,id\n19/198/19-198-0001.flac,\nextra/19-198-0001.wav,other\n")
    assert [u.id for u in read_manifest(manifest)] == ["19-198-0001", "other"]


def test_scan_librispeech(tmp_path: Path) -> None:
    for spk, chapter, n in [("19", "198", 2), ("103", "1240", 1)]:
        folder = tmp_path / spk / chapter
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{spk}-{chapter}-{i:04d}.flac").write_bytes(b"")
        (folder / f"{spk}-{chapter}.trans.txt").write_text("transcript\n")
    utts = scan_librispeech(tmp_path)
    assert [u.id for u in utts] == ["103-1240-0000", "19-198-0000", "19-198-0001"]
    assert [u.speaker for u in utts] == ["103", "19", "19"]
    assert utts[1].labels == {"chapter": "198"} and utts[1].split is None
    assert utts[1].path == (tmp_path / "19" / "198" / "19-198-0000.flac").resolve()
    with pytest.raises(ValueError, match="one level down"):
        scan_librispeech(tmp_path.parent)
    with pytest.raises(ValueError, match="not a folder"):
        scan_librispeech(tmp_path / "nope")


def test_read_alignments(tmp_path: Path) -> None:
    path = tmp_path / "phones.txt"
    path.write_text("19-198-0001 0 0 3 3 12\n\n103-1240-0000 5\n")
    ali = read_alignments(path)
    assert list(ali) == ["19-198-0001", "103-1240-0000"]
    assert ali["19-198-0001"].dtype == torch.int64
    assert ali["19-198-0001"].tolist() == [0, 0, 3, 3, 12]
    small = read_alignments(path, dtype=torch.int16, ids=["103-1240-0000", "absent"])
    assert list(small) == ["103-1240-0000"] and small["103-1240-0000"].dtype == torch.int16
    assert small["103-1240-0000"].tolist() == [5]
    path.write_text("a 1 2\nb 1 x\n")
    with pytest.raises(ValueError, match=r"phones.txt, line 2: label 'x'"):
        read_alignments(path)
    path.write_text("a 1 2\nb 1 40000\nb 3\n")
    with pytest.raises(ValueError, match=r"line 2: label 40000 of 'b' does not fit torch.int16; "
                                         r"expected labels in \[-32768, 32767\]"):
        read_alignments(path, dtype=torch.int16)
    with pytest.raises(ValueError, match=r"line 3: utterance 'b' appears twice"):
        read_alignments(path, ids=["a"])  # skipped lines are still checked for repeats
    with pytest.raises(ValueError, match=r"dtype=torch.float32: expected an integer torch dtype"):
        read_alignments(path, dtype=torch.float32)


def test_holdout_split_deterministic_and_uses_given_splits(tmp_path: Path) -> None:
    utts = [Utterance(f"u{i:03d}", tmp_path / f"u{i}.wav") for i in range(500)]
    train, test = holdout_split(utts)
    assert (train, test) == holdout_split(list(utts))
    assert len(train) + len(test) == 500 and 70 <= len(test) <= 130
    assert {u.id for u in train}.isdisjoint(u.id for u in test)
    # per-utterance rule: a subset splits the same way
    sub_train, sub_test = holdout_split(utts[:100])
    assert {u.id for u in sub_test} == {u.id for u in test if u.id < "u100"}
    assert holdout_split(utts, seed=1) != (train, test)
    assert holdout_split(utts, test_fraction=0.0) == (utts, [])
    given = [Utterance("a", tmp_path, split="test"), Utterance("b", tmp_path, split="train")]
    assert holdout_split(given) == ([given[1]], [given[0]])
    with pytest.raises(ValueError, match="test_fraction"):
        holdout_split(utts, test_fraction=1.5)
