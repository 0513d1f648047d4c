"""Where utterances come from: a LibriSpeech folder, a manifest file, and phone alignments.

An `Utterance` is a pointer to one audio file plus what is known about it (speaker, split,
utterance-level labels). Frame-level phone labels live apart, in the alignment format of the
CPC paper (Oord et al. 2018): one line per utterance, its id then one integer per 10 ms frame.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from os import PathLike
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "Utterance", "SPLITS", "scan_librispeech", "read_manifest", "read_alignments", "LabelRangeError",
    "read_id_list", "holdout_split",
]

SPLITS = ("train", "test")
"""Allowed values of `Utterance.split` (besides None)."""

_RESERVED = ("id", "path", "speaker", "split")


@dataclass(frozen=True)
class Utterance:
    """One audio file and what is known about it.

    Attributes:
        id: unique name; LibriSpeech: the file stem ("19-198-0001"); manifest: the `id` column,
            else the path's stem when the stems are unique, else the path relative to the
            manifest's folder (see `read_manifest`).
        path: absolute path of the audio file.
        speaker: speaker name, or None when unknown.
        split: "train", "test", or None when the source does not say.
        labels: any other utterance-level labels (manifest columns), as strings.
    """

    id: str
    path: Path
    speaker: str | None = None
    split: str | None = None
    labels: dict[str, str] = field(default_factory=dict, compare=True, hash=False)


def scan_librispeech(root: str | PathLike) -> list[Utterance]:
    """List a LibriSpeech-layout folder: `root/<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac`.

    Args:
        root: a subset folder such as `LibriSpeech/train-clean-100` (the one holding the
            speaker folders).

    Returns:
        Utterances sorted by id; speaker = the top folder's name, split = None,
        labels = {"chapter": <chapter folder name>}.

    Raises:
        ValueError: `root` is not a folder or holds no `*/*/*.flac`.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"scan_librispeech: root='{root}' is not a folder; expected a LibriSpeech "
                         "subset folder holding <speaker>/<chapter>/*.flac")
    files = sorted(root.glob("*/*/*.flac"))
    if not files:
        deeper = sorted({p.parents[2].name for p in root.glob("*/*/*/*.flac")})
        hint = f"; found them one level down, in {deeper}: pass one of those" if deeper else ""
        raise ValueError(f"scan_librispeech: no <speaker>/<chapter>/*.flac under '{root}'{hint}")
    utts = [Utterance(id=f.stem, path=f, speaker=f.parent.parent.name, split=None,
                      labels={"chapter": f.parent.name}) for f in files]
    utts.sort(key=lambda u: u.id)
    _check_unique_ids(utts, str(root))
    return utts


def _check_unique_ids(utts: Sequence[Utterance], where: str) -> None:
    seen: set[str] = set()
    for u in utts:
        if u.id in seen:
            raise ValueError(f"{where}: utterance id '{u.id}' occurs more than once; ids must be unique")
        seen.add(u.id)


def _utterance_from_row(row: dict[str, Any], manifest: Path, line: int) -> Utterance:
    """Build one Utterance from a manifest row; errors name the file, line and column."""
    where = f"{manifest}, line {line}"

    def text(column: str) -> str | None:
        value = row.get(column)
        if value is None:
            return None
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: column '{column}' has a nested value {value!r}; "
                             "expected a string or number")
        value = str(value).strip()
        return value or None

    raw_path = text("path")
    if raw_path is None:
        raise ValueError(f"{where}: column 'path' is empty; expected the audio file's path")
    path = Path(raw_path).expanduser()
    if not path.is_absolute():
        path = manifest.parent / path
    path = path.resolve()
    split = text("split")
    if split is not None and split not in SPLITS:
        raise ValueError(f"{where}: column 'split' has value {split!r}; "
                         f"expected one of {list(SPLITS)} or empty")
    labels = {}
    for key, value in row.items():
        if key in _RESERVED or key is None:
            continue
        value = text(key)
        if value is not None:
            labels[str(key)] = value
    # id "" = no id given (a given id is never empty: empty cells read as None); read_manifest
    # fills it in once it has seen every row
    return Utterance(id=text("id") or "", path=path, speaker=text("speaker"),
                     split=split, labels=labels)


def _relative_id(path: Path, folder: Path) -> str:
    """The path relative to `folder`, "/"-separated, suffix kept ("right/0a7c2a8d_nohash_0.wav").

    Computed on the lexically normalised path (symlinks not followed), so a manifest of links
    still gets the names it lists; a path outside `folder` keeps its absolute form.
    """
    normal = Path(os.path.normpath(folder / path))  # `path` absolute: folder / path == path
    try:
        return normal.relative_to(os.path.normpath(folder)).as_posix()
    except ValueError:
        return normal.as_posix()


def _read_rows(manifest: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """Yield (line number, row) from a CSV (header first) or JSON lines / JSON array file."""
    suffix = manifest.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        text = manifest.read_text(encoding="utf-8-sig")
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{manifest}: not valid JSON ({err})") from err
            for i, row in enumerate(rows, start=1):
                if not isinstance(row, dict):
                    raise ValueError(f"{manifest}, item {i}: {row!r} is not an object; "
                                     "expected {\"path\": ..., ...}")
                yield i, row
            return
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{manifest}, line {line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{manifest}, line {line_no}: {row!r} is not an object; "
                                 "expected {\"path\": ..., ...}")
            if "path" not in row:
                raise ValueError(f"{manifest}, line {line_no}: no 'path' key; found keys {sorted(row)}")
            yield line_no, row
        return
    with manifest.open(newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM (Excel)
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "path" not in header:
            raise ValueError(f"{manifest}, line 1: no 'path' column in the header; found columns "
                             f"{header}; expected a CSV header naming at least 'path'")
        reader.fieldnames = header
        for row in reader:
            if None in row:  # more fields than header columns
                raise ValueError(f"{manifest}, line {reader.line_num}: {len(header) + len(row[None])} "
                                 f"fields; the header has {len(header)} columns")
            yield reader.line_num, row


def read_manifest(path: str | PathLike) -> list[Utterance]:
    """Read a manifest of audio files: CSV with a header, or JSON lines (`.jsonl`, `.json`).

    Columns: `path` (required; absolute, or relative to the manifest's folder), optional `id`,
    `speaker`, `split` ("train" / "test" / empty); every other column becomes an utterance-level
    label (string). Empty cells mean "unknown".

    Ids of rows with no `id`: the path's stem ("19-198-0001") when no two such rows share a
    stem, so LibriSpeech-style names, alignment files and split lists keep working; otherwise,
    for every such row, the path relative to the manifest's folder, "/"-separated with its
    suffix ("right/0a7c2a8d_nohash_0.wav": the form of Speech Commands' `testing_list.txt`,
    so that list can serve as a split file). Absolute paths outside the manifest's folder keep
    their absolute form. The choice is made for the whole manifest: adding one file whose stem
    repeats another switches all stem ids to relative paths (give an `id` column to pin them).

    Example (Speech Commands, manifest at the dataset root)::

        path,speaker
        right/0a7c2a8d_nohash_0.wav,0a7c2a8d
        left/0a7c2a8d_nohash_0.wav,0a7c2a8d      -> ids "right/0a7c2a8d_nohash_0.wav", ...

    Returns:
        Utterances in file order.

    Raises:
        ValueError: naming the file, line and column of the first bad row (no `path` column,
            empty path, bad split value, duplicate id), or an empty manifest.
    """
    manifest = Path(path).expanduser().resolve()
    if not manifest.is_file():
        raise ValueError(f"read_manifest: path='{manifest}' is not a file; expected a CSV or JSON lines manifest")
    rows: list[tuple[int, Utterance, str]] = []  # (line, utterance, path as written)
    for line, row in _read_rows(manifest):
        utt = _utterance_from_row(row, manifest, line)
        rows.append((line, utt, str(row.get("path")).strip()))
    if not rows:
        raise ValueError(f"{manifest}: the manifest lists no utterances")
    # Rows without an id: the stem when no two such rows share one (LibriSpeech, the generated
    # corpus: ids as before), else the relative path for all of them (Speech Commands reuses
    # "<speaker>_nohash_<n>.wav" under every word folder).
    stems = [u.path.stem for _, u, _ in rows if u.id == ""]
    by_stem = len(set(stems)) == len(stems)
    utts: list[Utterance] = []
    first_line: dict[str, int] = {}
    for line, utt, written in rows:
        if utt.id == "":
            new_id = utt.path.stem if by_stem else _relative_id(Path(written).expanduser(), manifest.parent)
            utt = replace(utt, id=new_id)
            how = "the path stem" if by_stem else "the relative path"
            what = f"id {utt.id!r} ({how}; no 'id' column value)"
        else:
            what = f"column 'id' value {utt.id!r}"
        if utt.id in first_line:
            raise ValueError(f"{manifest}, line {line}: {what} repeats line {first_line[utt.id]}; "
                             "ids must be unique (the same file listed twice?)")
        first_line[utt.id] = line
        utts.append(utt)
    return utts


class LabelRangeError(ValueError):
    """A label of an alignment file outside the requested integer dtype's range."""


def read_alignments(path: str | PathLike, *, dtype: torch.dtype = torch.int64,
                    ids: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read frame-level labels in the CPC paper's format (`converted_aligned_phones.txt`).

    Each non-empty line: an utterance id, then one integer label per 10 ms frame, separated by
    white space.

    Args:
        dtype: the integer dtype of the label tensors; a narrower one (``torch.int16``: 2
            bytes per frame instead of 8, about 72 MB instead of 290 MB for train-clean-100)
            when memory matters. A label outside its range is an error.
        ids: read only these utterances' lines (the others are skipped unparsed, though a
            repeated id is still an error); None: every line.

    Returns:
        {id: (frames,) tensor of ``dtype``}, in file order.

    Raises:
        ValueError: naming the file and line of a non-integer label, a line without labels,
            a repeated id, or a label out of ``dtype``'s range (:class:`LabelRangeError`, a
            ValueError); or a ``dtype`` that is not an integer type.
    """
    if not isinstance(dtype, torch.dtype) or dtype.is_floating_point or dtype.is_complex \
            or dtype == torch.bool:
        raise ValueError(f"read_alignments: dtype={dtype!r}: expected an integer torch dtype "
                         "such as torch.int16 or torch.int64")
    keep = None if ids is None else set(ids)
    low, high = torch.iinfo(dtype).min, torch.iinfo(dtype).max
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"read_alignments: path='{path}' is not a file; expected an alignment text file")
    out: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            utt_id, tokens = parts[0], parts[1:]
            if not tokens:
                raise ValueError(f"{path}, line {line_no}: utterance '{utt_id}' has no labels; "
                                 "expected '<id> <label> <label> ...'")
            if utt_id in seen:
                raise ValueError(f"{path}, line {line_no}: utterance '{utt_id}' appears twice")
            seen.add(utt_id)
            if keep is not None and utt_id not in keep:
                continue
            try:
                labels = [int(t) for t in tokens]
            except ValueError:
                bad = next(t for t in tokens if not t.lstrip("+-").isdigit())
                raise ValueError(f"{path}, line {line_no}: label {bad!r} of '{utt_id}' is not an "
                                 "integer; expected integer labels, one per 10 ms frame") from None
            lo, hi = min(labels), max(labels)
            if lo < low or hi > high:
                bad = lo if lo < low else hi
                raise LabelRangeError(f"{path}, line {line_no}: label {bad} of '{utt_id}' does "
                                      f"not fit {dtype}; expected labels in [{low}, {high}] "
                                      "(pass a wider dtype)")
            out[utt_id] = torch.tensor(labels, dtype=dtype)
    return out


def read_id_list(path: str | PathLike) -> list[str]:
    """Read a list of utterance ids, one per line (the CPC paper's `train_split.txt`/`test_split.txt`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"read_id_list: path='{path}' is not a file; expected one utterance id per line")
    return [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _hash_unit(text: str) -> float:
    """A number in [0, 1) from a string, identical on every machine and run (unlike hash())."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def holdout_split(utts: Sequence[Utterance], test_fraction: float = 0.2,
                  seed: int = 0) -> tuple[list[Utterance], list[Utterance]]:
    """Split utterances into (train, test), keeping their order.

    When any utterance has a `split`, that decides: "train" to train, "test" to test, and
    utterances with no split are assigned by the hash rule below. Otherwise an utterance goes to
    test when sha256(f"{seed}:{id}"), read as a number in [0, 1), is below `test_fraction`:
    deterministic, stable across runs and machines, and independent of the other utterances.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"holdout_split: test_fraction={test_fraction!r}; expected a number in [0, 1]")
    train: list[Utterance] = []
    test: list[Utterance] = []
    for u in utts:
        split = u.split
        if split is None:
            split = "test" if _hash_unit(f"{seed}:{u.id}") < test_fraction else "train"
        elif split not in SPLITS:
            raise ValueError(f"holdout_split: utterance '{u.id}' has split={split!r}; expected one of {list(SPLITS)} or None")
        (test if split == "test" else train).append(u)
    return train, test
