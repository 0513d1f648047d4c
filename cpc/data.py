"""Training data for CPC: utterances loaded once (or read from a ``cpc.store`` audio store),
random fixed-size windows, padding masks for utterances shorter than a window, a
speaker-balanced batch sampler and a background batch prefetcher.

Every batch is a pure function of ``(seed, step, rank)``: the sampler draws the speakers, the
utterances and the window offsets of step ``s`` from a generator seeded with those three
numbers. Resuming at step ``s`` therefore needs no saved sampler state beyond ``s`` itself, and
gives exactly the batches of an uninterrupted run; DDP ranks draw different batches.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

FRAME_HOP = 160


class BadAudioError(RuntimeError):
    """An unreadable or empty audio file met with ``strict=True``."""


@dataclass
class LoadReport:
    """What happened while loading a list of utterances."""

    loaded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def load_utterances(utterances: Sequence, *, strict: bool = False, sample_rate: int = 16000,
                    progress: bool = False) -> tuple[list, list[torch.Tensor], LoadReport]:
    """Read every utterance's audio (``modalities.audio.load_audio``).

    An unreadable or empty file is skipped with a warning and listed in the report; with
    ``strict=True`` it raises :class:`BadAudioError` naming the file instead.
    Returns the kept utterances, their waves (float32 (T,)) and the report.
    """
    from modalities.audio import AudioReadError, load_audio

    kept, waves, report = [], [], LoadReport()
    iterator = utterances
    if progress:
        from tqdm import tqdm

        iterator = tqdm(utterances, desc="loading audio", unit="utt", leave=False)
    for utt in iterator:
        try:
            wave = load_audio(utt.path, sample_rate=sample_rate)
            if wave.numel() == 0:
                raise AudioReadError(f"{utt.path}: no samples")
        except (AudioReadError, OSError, RuntimeError, ValueError) as err:
            if strict:
                raise BadAudioError(
                    f"audio file {str(utt.path)!r} (utterance {utt.id!r}) could not be used: "
                    f"{err}; expected a readable, non-empty audio file (run without --strict to "
                    "skip such files)"
                ) from err
            warnings.warn(f"skipping unreadable or empty audio file {str(utt.path)!r}: {err}",
                          stacklevel=2)
            report.skipped.append((str(utt.path), str(err)))
            continue
        kept.append(utt)
        waves.append(wave.float().reshape(-1))
        report.loaded += 1
    return kept, waves, report


def _generator(*numbers: int) -> torch.Generator:
    digest = hashlib.sha256(",".join(str(int(n)) for n in numbers).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class SpeakerBalancedBatchSampler:
    """Batches of utterance indices with the same number of utterances from each of
    ``speakers_per_batch`` speakers drawn uniformly without replacement (utterances within a
    speaker drawn uniformly, with replacement only when a speaker has too few).

    Utterances without a speaker count as their own speaker. Iteration starts at
    ``position`` (a step count) and never ends; ``state_dict``/``load_state_dict`` carry it.
    """

    def __init__(self, speakers: Sequence[str | None], batch_size: int,
                 speakers_per_batch: int = 4, seed: int = 0, rank: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
        if speakers_per_batch < 1:
            raise ValueError(f"speakers_per_batch={speakers_per_batch!r}: expected >= 1")
        if len(speakers) == 0:
            raise ValueError("speakers=[]: expected at least one utterance")
        by_speaker: dict[str, list[int]] = {}
        for i, spk in enumerate(speakers):
            by_speaker.setdefault(spk if spk is not None else f"\0utt{i}", []).append(i)
        self.speaker_names = sorted(by_speaker)
        self.members = [by_speaker[s] for s in self.speaker_names]
        self.batch_size = batch_size
        self.speakers_per_batch = min(speakers_per_batch, len(self.members), batch_size)
        self.seed = seed
        self.rank = rank
        self.position = 0

    def batch(self, step: int) -> list[int]:
        gen = _generator(self.seed, step, self.rank, 1)
        chosen = torch.randperm(len(self.members), generator=gen)[: self.speakers_per_batch]
        base, extra = divmod(self.batch_size, self.speakers_per_batch)
        out: list[int] = []
        for j, s in enumerate(chosen.tolist()):
            members = self.members[s]
            count = base + (1 if j < extra else 0)
            if count <= len(members):
                picks = torch.randperm(len(members), generator=gen)[:count]
            else:
                picks = torch.randint(len(members), (count,), generator=gen)
            out.extend(members[p] for p in picks.tolist())
        return out

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            batch = self.batch(self.position)
            self.position += 1
            yield batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


@dataclass
class WindowBatch:
    wave: torch.Tensor  # (B, window) float32, zero past each length
    lengths: torch.Tensor  # (B,) valid frames (valid samples // 160)
    speakers: torch.Tensor  # (B,) speaker index
    indices: list[int]


class WindowDataset:
    """Random windows of ``window`` samples, from in-memory waves or from an audio store.

    ``WindowDataset(waves, speakers, window)`` takes a list of float32 waves;
    :meth:`from_store` reads from a :class:`cpc.store.AudioStore` instead, fetching only each
    window's samples. Window starts are drawn from the lengths alone with the same generator
    calls in both cases, so a run's batches do not depend on where the audio lives.

    A wave shorter than the window is used whole: zero-padded to the window, with its valid
    frame count in ``lengths`` so the criterion masks the padding (never dropped).
    """

    def __init__(self, waves: Sequence[torch.Tensor], speakers: Sequence[str | None],
                 window: int = 20480) -> None:
        if len(waves) != len(speakers):
            raise ValueError(f"len(waves)={len(waves)} != len(speakers)={len(speakers)}")
        self.waves: list[torch.Tensor] | None = list(waves)
        self.store = None
        self.store_indices: list[int] | None = None
        self._setup([int(w.numel()) for w in self.waves], speakers, window)

    @classmethod
    def from_store(cls, store, indices: Sequence[int], speakers: Sequence[str | None],
                   window: int = 20480) -> "WindowDataset":
        """A dataset over utterances ``indices`` of ``store`` (dataset item j = store utterance
        ``indices[j]``, speaker ``speakers[j]``)."""
        indices = [int(i) for i in indices]
        if len(indices) != len(speakers):
            raise ValueError(f"len(indices)={len(indices)} != len(speakers)={len(speakers)}")
        bad = [i for i in indices if not 0 <= i < store.n]
        if bad:
            raise ValueError(f"indices: {bad[0]} out of range; expected positions in [0, {store.n})")
        self = cls.__new__(cls)
        self.waves = None
        self.store = store
        self.store_indices = indices
        self._setup([int(store.lengths[i]) for i in indices], speakers, window)
        return self

    def _setup(self, lengths: list[int], speakers: Sequence[str | None], window: int) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < FRAME_HOP \
                or window % FRAME_HOP:
            raise ValueError(f"window={window!r}: expected a positive multiple of {FRAME_HOP}")
        self.window = window
        self.lengths = lengths
        names = sorted({s if s is not None else "" for s in speakers})
        index = {n: i for i, n in enumerate(names)}
        self.speaker_ids = torch.tensor([index[s if s is not None else ""] for s in speakers],
                                        dtype=torch.long)
        self.n_short = sum(1 for n in lengths if n < window)

    def __len__(self) -> int:
        return len(self.lengths)

    def _samples(self, index: int, start: int, count: int) -> torch.Tensor:
        if self.waves is not None:
            return self.waves[index][start:start + count]
        return self.store.read(self.store_indices[index], start, count)

    def window_at(self, index: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
        n = self.lengths[index]
        if n >= self.window:
            start = int(torch.randint(n - self.window + 1, (1,), generator=gen))
            return self._samples(index, start, self.window), self.window // FRAME_HOP
        wave = self._samples(index, 0, n)
        out = torch.zeros(self.window, dtype=wave.dtype)
        out[:n] = wave
        return out, n // FRAME_HOP

    def collate(self, indices: list[int], step: int, seed: int = 0, rank: int = 0) -> WindowBatch:
        gen = _generator(seed, step, rank, 2)
        windows, lengths = [], []
        for i in indices:
            w, n = self.window_at(i, gen)
            windows.append(w)
            lengths.append(n)
        return WindowBatch(
            wave=torch.stack(windows),
            lengths=torch.tensor(lengths, dtype=torch.long),
            speakers=self.speaker_ids[indices],
            indices=list(indices),
        )


class BatchPrefetcher:
    """Batches built ``depth`` steps ahead in a background thread.

    Iterating yields ``(step, WindowBatch)`` for steps ``sampler.position``,
    ``sampler.position + 1``, ... with exactly the batches
    ``dataset.collate(sampler.batch(step), step, seed=seed, rank=rank)`` built inline; after each
    yield ``sampler.position`` is ``step + 1`` (so a checkpoint saves the consumer's position,
    not the thread's). Reads by ``os.pread`` and tensor copies release the GIL, so the thread
    overlaps the training step. An exception in the thread is re-raised in the consumer.
    ``close()`` (or leaving a ``with`` block) stops the thread.

    Example::

        with BatchPrefetcher(dataset, sampler, seed=0, rank=0) as batches:
            for step, batch in batches:
                ...
    """

    def __init__(self, dataset: WindowDataset, sampler: SpeakerBalancedBatchSampler, *,
                 seed: int, rank: int, depth: int = 2) -> None:
        import queue
        import threading

        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth={depth!r}: expected a positive integer")
        self.dataset, self.sampler = dataset, sampler
        self.seed, self.rank, self.depth = seed, rank, depth
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._start = int(sampler.position)
        self._thread = threading.Thread(target=self._work, name="cpc-batch-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        step = self._start
        try:
            while not self._stop.is_set():
                batch = self.dataset.collate(self.sampler.batch(step), step,
                                             seed=self.seed, rank=self.rank)
                if not self._put((step, batch, None)):
                    return
                step += 1
        except BaseException as err:  # handed to the consumer
            self._put((step, None, err))

    def __iter__(self) -> "BatchPrefetcher":
        return self

    def __next__(self) -> tuple[int, WindowBatch]:
        import queue

        while True:
            if self._stop.is_set():
                raise StopIteration
            try:
                step, batch, err = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("batch prefetch thread ended without a batch") from None
        if err is not None:
            self.close()
            raise err
        self.sampler.position = step + 1
        return step, batch

    def close(self) -> None:
        import queue

        self._stop.set()
        while True:  # unblock a put waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)

    def __enter__(self) -> "BatchPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def resolve_utterances(*, data: str | Path | None, manifest: str | Path | None,
                       out: str | Path, corpus_speakers: int = 8,
                       corpus_utterances: int = 24, corpus_seconds=(2.0, 4.0), seed: int = 0,
                       progress: bool = True) -> tuple[list, Path | None, str]:
    """The utterances of a run: a LibriSpeech folder, a manifest, or (neither) the generated
    corpus in ``<out>/corpus``. Returns (utterances, alignment file or None, description)."""
    from modalities import audio

    if data is not None and manifest is not None:
        raise ValueError(f"data={str(data)!r} and manifest={str(manifest)!r}: expected at most one")
    if data is not None:
        root = Path(data)
        if not root.is_dir():
            raise ValueError(f"data={str(data)!r}: expected a LibriSpeech folder (speaker/chapter/*.flac)")
        utts = audio.scan_librispeech(root)
        return utts, None, f"LibriSpeech folder {root}"
    if manifest is not None:
        path = Path(manifest)
        if not path.is_file():
            raise ValueError(f"manifest={str(manifest)!r}: expected a CSV or JSON-lines file")
        return audio.read_manifest(path), None, f"manifest {path}"
    corpus_dir = Path(out) / "corpus"
    path = audio.generate_corpus(corpus_dir, n_speakers=corpus_speakers,
                                 utterances_per_speaker=corpus_utterances,
                                 seconds=tuple(corpus_seconds), seed=seed,
                                 progress=progress)
    phones = corpus_dir / "phones.txt"
    return audio.read_manifest(path), phones if phones.is_file() else None, \
        f"generated corpus {corpus_dir}"
