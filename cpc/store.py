"""A compact audio store for CPC training at corpus scale: every utterance decoded once (by a
``prepare`` step, optionally in worker processes) into one int16 file, then read window by
window.

Why: decoding a corpus to float32 in every rank costs 4 bytes per sample per rank (about 18 GB
per rank for LibriSpeech train-clean-100). The store holds 2 bytes per sample on disk, written
once; a rank reads only the utterances of its shard (:func:`shard_indices`), into RAM when they
fit ``max_bytes_in_memory`` (CPC_audio's ``--max_size_loaded``), else sample ranges by
``os.pread`` on demand, so its resident memory does not grow with the corpus.

Layout of a store folder::

    audio.i16    every kept utterance's samples, int16 little-endian, concatenated in order
    index.npz    offsets (int64, samples), lengths (int64, samples), kept (int64 positions
                 of the kept utterances in the list given to prepare_store)
    store.json   format, key, sample_rate, n_utterances, total_samples, ids, skipped

Quantisation: a decoded sample ``x`` (float32 in [-1, 1], ``modalities.audio.load_audio``) is
stored as ``clip(round(x * 32768), -32768, 32767)`` and read back as ``q / 32768``. libsndfile
decodes 16-bit PCM (LibriSpeech FLAC, the generated corpora) as ``int16 / 32768``, so for those
sources the round trip is exact: the samples read back are bit-identical to ``load_audio``'s.
Sources with more bits, float sources, multi-channel files (averaged) and resampled files lose
what lies below 1/32768 (about -90 dBFS), as 16-bit audio does.

Example::

    report = prepare_store(utterances, "runs/x/store", workers=4)
    store = AudioStore(report.folder, indices=shard_indices(speakers, rank, world_size))
    window = store.read(i, start=16000, count=20480)   # float32 (20480,)
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["STORE_FORMAT", "StoreReport", "pread_exact", "store_key", "prepare_store", "shard_indices",
           "AudioStore"]

STORE_FORMAT = 1
"""Version of the store layout; part of every key, so a layout change never reuses a store."""

_AUDIO, _INDEX, _META = "audio.i16", "index.npz", "store.json"


@dataclass
class StoreReport:
    """What :func:`prepare_store` did."""

    folder: Path
    key: str
    reused: bool
    n_utterances: int
    total_samples: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0


def _check_sample_rate(sample_rate: int) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate={sample_rate!r}: expected a positive integer (Hz)")


def pread_exact(fd: int, dest: np.ndarray, offset: int, name: Any = "file") -> None:
    """Fill the contiguous array ``dest`` with the bytes of ``fd`` from byte ``offset`` on
    (``os.preadv`` until done, no memory map); ``OSError`` naming ``name`` on a short file."""
    view = memoryview(dest).cast("B")
    done = 0
    while done < view.nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"{name}: short read at byte {offset + done}")
        done += n


def store_key(utterances: Sequence, sample_rate: int = 16000) -> str:
    """sha256 hex digest identifying a store's content: over STORE_FORMAT, ``sample_rate`` and,
    per utterance in order, its id, absolute path, file size and mtime (ns). Any change of a file
    or of the list changes the key. A missing file hashes as size -1, mtime -1."""
    _check_sample_rate(sample_rate)
    h = hashlib.sha256(f"cpc-store\0{STORE_FORMAT}\0{sample_rate}\0".encode())
    for utt in utterances:
        path = os.path.abspath(os.fspath(utt.path))
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{utt.id}\0{path}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _quantise(wave: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16: clip(round(x * 32768), -32768, 32767) (exact for int16/32768)."""
    scaled = np.rint(wave.astype(np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def _decode(path: str, sample_rate: int) -> tuple[np.ndarray | None, str | None]:
    """Decode one file to int16 (run in the parent or in a worker process)."""
    from modalities.audio import AudioReadError, load_audio

    try:
        wave = load_audio(path, sample_rate=sample_rate)
        if wave.numel() == 0:
            raise AudioReadError(f"{path}: no samples")
    except (AudioReadError, OSError, RuntimeError, ValueError) as err:
        return None, str(err)
    return _quantise(wave.reshape(-1).numpy()), None


def _read_meta(folder: Path) -> dict | None:
    """The store.json of a complete store in ``folder``, else None."""
    try:
        meta = json.loads((folder / _META).read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            return None
        size = (folder / _AUDIO).stat().st_size
        if size != 2 * int(meta["total_samples"]) or not (folder / _INDEX).is_file():
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_store(utterances: Sequence, folder: str | os.PathLike, *, workers: int = 0,
                  strict: bool = False, sample_rate: int = 16000,
                  progress: Callable[[int, int], None] | None = None) -> StoreReport:
    """Decode ``utterances`` once into a store folder (see the module docstring for the layout).

    Args:
        utterances: objects with ``id`` and ``path`` (``modalities.audio.Utterance``).
        folder: the store folder. A complete store there with the same :func:`store_key` is
            reused (nothing decoded); another store, or a non-empty folder that is not a store,
            is refused (ValueError). Built in ``.<name>.tmp-<pid>`` beside it, then renamed, so
            a half-written store never counts.
        workers: decoding processes (0: in this process). At most ``4 * workers`` utterances
            are in flight; the parent writes them in input order, so memory does not grow with
            the corpus.
        strict: an unreadable or empty file raises ``cpc.data.BadAudioError``; else it is
            skipped with a warning and listed in ``skipped``.
        sample_rate: rate the audio is decoded at (resampled where a file differs).
        progress: ``progress(n_done, n_total)`` called as utterances are written.
    """
    from .data import BadAudioError

    t0 = time.perf_counter()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers={workers!r}: expected an integer >= 0")
    _check_sample_rate(sample_rate)
    if progress is not None and not callable(progress):
        raise ValueError(f"progress={progress!r}: expected None or a callable (n_done, n_total)")
    utterances = list(utterances)
    for i, utt in enumerate(utterances):
        if not hasattr(utt, "id") or not hasattr(utt, "path"):
            raise ValueError(f"utterances[{i}]={utt!r}: expected an object with 'id' and 'path'")
    folder = Path(folder).expanduser().absolute()
    key = store_key(utterances, sample_rate)

    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"store folder '{folder}' exists and is not a folder; pass another "
                             "folder or delete it")
        meta = _read_meta(folder)
        if meta is not None:
            if meta.get("key") == key:
                return StoreReport(folder, key, True, int(meta["n_utterances"]),
                                   int(meta["total_samples"]),
                                   [tuple(s) for s in meta.get("skipped", [])],
                                   time.perf_counter() - t0)
            raise ValueError(f"store folder '{folder}' holds a store of other audio (key "
                             f"{meta.get('key')}, expected {key} for these utterances); pass "
                             "another folder or delete it")
        found = sorted(p.name for p in folder.iterdir())
        if found:
            raise ValueError(f"store folder '{folder}' is not empty and holds no complete store "
                             f"(found {found[:5]}{' ...' if len(found) > 5 else ''}; expected key "
                             f"{key}); pass another folder or delete it")

    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    offsets: list[int] = []
    lengths: list[int] = []
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    total = 0
    n_total = len(utterances)
    try:
        with open(tmp / _AUDIO, "wb") as out:
            def write(pos: int, samples: np.ndarray | None, err: str | None) -> None:
                nonlocal total
                utt = utterances[pos]
                if samples is None:
                    if strict:
                        raise BadAudioError(
                            f"audio file {str(utt.path)!r} (utterance {utt.id!r}) could not be "
                            f"used: {err}; expected a readable, non-empty audio file (run "
                            "without --strict to skip such files)")
                    warnings.warn(f"skipping unreadable or empty audio file {str(utt.path)!r}: "
                                  f"{err}", stacklevel=3)
                    skipped.append((str(utt.path), str(err)))
                else:
                    out.write(samples.astype("<i2", copy=False).tobytes())
                    offsets.append(total)
                    lengths.append(int(samples.size))
                    kept.append(pos)
                    total += int(samples.size)
                if progress is not None:
                    progress(pos + 1, n_total)

            if workers == 0:
                for pos, utt in enumerate(utterances):
                    write(pos, *_decode(os.fspath(utt.path), sample_rate))
            else:
                # forkserver/spawn: a forked child of a process that has started torch threads
                # can deadlock.
                method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() \
                    else "spawn"
                with ProcessPoolExecutor(max_workers=workers,
                                         mp_context=multiprocessing.get_context(method)) as pool:
                    pending: deque = deque()
                    nxt = 0
                    try:
                        while nxt < n_total or pending:
                            while nxt < n_total and len(pending) < 4 * workers:
                                pending.append((nxt, pool.submit(
                                    _decode, os.fspath(utterances[nxt].path), sample_rate)))
                                nxt += 1
                            pos, fut = pending.popleft()
                            write(pos, *fut.result())
                    except BaseException:
                        for _, fut in pending:
                            fut.cancel()
                        raise
        np.savez(tmp / _INDEX, offsets=np.asarray(offsets, dtype=np.int64),
                 lengths=np.asarray(lengths, dtype=np.int64), kept=np.asarray(kept, dtype=np.int64))
        meta = {"format": STORE_FORMAT, "key": key, "sample_rate": sample_rate,
                "n_utterances": len(kept), "total_samples": total,
                "ids": [str(utterances[p].id) for p in kept],
                "skipped": [list(s) for s in skipped]}
        # store.json last: its presence (with a matching audio size) marks a complete store
        (tmp / _META).write_text(json.dumps(meta), encoding="utf-8")
        if folder.exists():
            folder.rmdir()  # checked empty above
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            # another process (a rank on another node of a shared filesystem) finished the
            # same store first: use it if it is the same audio
            other = _read_meta(folder)
            if other is None or other.get("key") != key:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return StoreReport(folder, key, True, int(other["n_utterances"]),
                               int(other["total_samples"]),
                               [tuple(x) for x in other.get("skipped", [])],
                               time.perf_counter() - t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StoreReport(folder, key, False, len(kept), total, skipped, time.perf_counter() - t0)


def shard_indices(speakers: Sequence[str | None], rank: int, world_size: int) -> list[int]:
    """Utterance positions rank ``rank`` of ``world_size`` trains on (sorted).

    Whole speakers per rank: speakers sorted by name, speaker j to rank ``j % world_size`` (an
    utterance without speaker is its own speaker). With fewer speakers than ranks, utterance i
    goes to rank ``i % world_size`` instead. Every utterance lies in exactly one shard.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: expected a positive integer")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r}: expected an integer in [0, {world_size})")
    by_speaker: dict[str, list[int]] = {}
    for i, spk in enumerate(speakers):
        by_speaker.setdefault(spk if spk is not None else f"\0utt{i}", []).append(i)
    names = sorted(by_speaker)
    if len(names) < world_size:
        return list(range(rank, len(speakers), world_size))
    out = [i for j, name in enumerate(names) if j % world_size == rank for i in by_speaker[name]]
    return sorted(out)


class AudioStore:
    """Read access to a store written by :func:`prepare_store`.

    Args:
        folder: the store folder.
        indices: positions (into the store's kept utterances) this process reads; None = all.
        max_bytes_in_memory: when the int16 bytes of those utterances fit, they are read into
            one int16 array (``in_memory=True``); otherwise every :meth:`read` is an ``os.pread``
            of the requested samples (no memory map: touched pages of a map count as resident).

    Attributes: ``n`` (kept utterances), ``ids``, ``lengths`` (int64 samples, all kept
    utterances), ``sample_rate``, ``in_memory``, ``resident_bytes`` (audio bytes held in RAM).
    """

    def __init__(self, folder: str | os.PathLike, *, indices: Sequence[int] | None = None,
                 max_bytes_in_memory: int = 4 * 10**9) -> None:
        if isinstance(max_bytes_in_memory, bool) or not isinstance(max_bytes_in_memory, int) \
                or max_bytes_in_memory < 0:
            raise ValueError(f"max_bytes_in_memory={max_bytes_in_memory!r}: expected an integer >= 0")
        self.folder = Path(folder).expanduser().absolute()
        meta = _read_meta(self.folder)
        if meta is None:
            raise ValueError(f"store folder '{self.folder}' holds no complete audio store "
                             f"({_META}, {_INDEX}, {_AUDIO}); expected a folder written by "
                             "cpc.store.prepare_store")
        with np.load(self.folder / _INDEX) as index:
            self._offsets = index["offsets"].astype(np.int64)
            self.lengths = index["lengths"].astype(np.int64)
            self.kept = index["kept"].astype(np.int64)
        self.ids = [str(i) for i in meta["ids"]]
        self.n = len(self.ids)
        self.sample_rate = int(meta["sample_rate"])
        self.key = str(meta["key"])
        if len(self.lengths) != self.n or len(self._offsets) != self.n:
            raise ValueError(f"store folder '{self.folder}': index.npz and store.json disagree "
                             f"({len(self.lengths)} vs {self.n} utterances); expected a complete store")
        if indices is None:
            chosen = np.arange(self.n, dtype=np.int64)
            self._allowed = None
        else:
            chosen = np.asarray(list(indices), dtype=np.int64).reshape(-1)
            bad = chosen[(chosen < 0) | (chosen >= self.n)]
            if bad.size:
                raise ValueError(f"indices: {int(bad[0])} out of range; expected positions in "
                                 f"[0, {self.n}) of the store's utterances")
            chosen = np.unique(chosen)
            self._allowed = np.zeros(self.n, dtype=bool)
            self._allowed[chosen] = True
        self._fd = os.open(self.folder / _AUDIO, os.O_RDONLY)
        need = 2 * int(self.lengths[chosen].sum())
        self.in_memory = need <= max_bytes_in_memory
        self._ram: np.ndarray | None = None
        self._local: np.ndarray | None = None
        if self.in_memory:
            # one int16 array; _local[i] = where utterance i starts in it (-1: not loaded)
            self._ram = np.empty(need // 2, dtype="<i2")  # the file's byte order
            self._local = np.full(self.n, -1, dtype=np.int64)
            pos = 0
            for i in chosen.tolist():
                count = int(self.lengths[i])
                self._pread_into(self._ram[pos:pos + count], int(self._offsets[i]))
                self._local[i] = pos
                pos += count
            os.close(self._fd)
            self._fd = -1
        self.resident_bytes = int(self._ram.nbytes) if self._ram is not None else 0

    def _pread_into(self, dest: np.ndarray, sample_offset: int) -> None:
        pread_exact(self._fd, dest, 2 * sample_offset, self.folder / _AUDIO)

    def read(self, i: int, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Samples ``start:start+count`` of utterance ``i`` as float32 (count,) = int16 / 32768
        (``count=None``: to the end)."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.n:
            raise ValueError(f"i={i!r}: expected an utterance position in [0, {self.n})")
        i = int(i)
        if self._allowed is not None and not self._allowed[i]:
            raise ValueError(f"i={i}: not among the indices this store was opened for")
        length = int(self.lengths[i])
        if count is None:
            count = length - start
        if start < 0 or count < 0 or start + count > length:
            raise ValueError(f"start={start!r}, count={count!r}: expected a range inside "
                             f"utterance {i} of {length} samples")
        if self._ram is not None:
            base = int(self._local[i]) + start
            samples = self._ram[base:base + count]
        else:
            samples = np.empty(count, dtype="<i2")
            self._pread_into(samples, int(self._offsets[i]) + start)
        # int16 / 32768 with a power-of-two scale: exact in float32
        return torch.from_numpy(samples.astype(np.float32) * np.float32(1.0 / 32768.0))

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"AudioStore('{self.folder}', n={self.n}, in_memory={self.in_memory}, "
                f"resident_bytes={self.resident_bytes})")
