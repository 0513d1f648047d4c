"""A LibriSpeech-shaped tree of cheap synthetic speech, for exercising memory and the CPC
pipeline at scale (many speakers, thousands of 10-15 s utterances) without the real corpus.

The audio is NOT meant to be learnt well and is not a speech model: each utterance is a chain
of "phone" segments of 50-150 ms (5-15 frames of 10 ms), each segment a label in
``0..n_labels-1`` rendered as a few harmonics of a speaker-specific pitch, weighted by two
label-specific spectral peaks, plus a little noise. It is a fraction of a second to make per
utterance (vectorised numpy, FLAC encoding), so trees of hundreds of utterances take seconds.
For a corpus built to be learnt (formant voices, coarticulation), see
``modalities.audio.generate_corpus``.

Layout (what ``modalities.audio.scan_librispeech`` reads)::

    root/<speaker>/<chapter>/<speaker>-<chapter>-<nnnn>.flac   16 kHz mono PCM_16 FLAC
    root/alignments.txt     "<utt id> <label> <label> ..." one integer per 10 ms frame (the CPC
                            paper's converted_aligned_phones.txt format)
    root/train_split.txt    utterance ids, one per line (~80 %, by a hash of the id)
    root/test_split.txt     the others (~20 %); every speaker occurs in both

Example::

    root = make_librispeech_tree("/tmp/libri", speakers=20, utterances_per_speaker=40)
    utts = scan_librispeech(root)
"""
from __future__ import annotations

import hashlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from os import PathLike
from pathlib import Path

import numpy as np

__all__ = ["make_librispeech_tree", "N_LABELS"]

N_LABELS = 24
"""Number of "phone" labels of the generated segments (0..N_LABELS-1)."""

_RATE = 16000
_HOP = 160
_HARMONICS = 12


def _rng(*numbers: int) -> np.random.Generator:
    return np.random.default_rng([int(n) for n in numbers])


def _label_peaks(seed: int) -> np.ndarray:
    """(N_LABELS, 2) spectral peak frequencies in Hz, shared by every speaker."""
    rng = _rng(seed, 7919)
    first = rng.uniform(300.0, 900.0, N_LABELS)
    second = rng.uniform(1000.0, 2600.0, N_LABELS)
    return np.stack([first, second], axis=1)


def _synth(speaker: int, utt: int, seconds: tuple[float, float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One utterance: (int16 samples, int64 frame labels), len(samples) == 160 * len(labels)."""
    rng = _rng(seed, speaker, utt)
    n_frames = int(round(rng.uniform(*seconds) * _RATE / _HOP))
    durations, labels = [], []
    total = 0
    while total < n_frames:
        d = int(rng.integers(5, 16))  # 50-150 ms
        durations.append(min(d, n_frames - total))
        labels.append(int(rng.integers(N_LABELS)))
        total += durations[-1]
    frame_labels = np.repeat(np.asarray(labels, dtype=np.int64), durations)
    f0 = _rng(seed, speaker, 101).uniform(90.0, 240.0)  # speaker pitch, Hz
    peaks = _label_peaks(seed)
    k = np.arange(1, _HARMONICS + 1)
    freqs = f0 * k  # (H,)
    # amplitude of harmonic k under label l: two Gaussian bumps around the label's peaks
    amp = (np.exp(-0.5 * ((freqs[None, :] - peaks[:, :1]) / 150.0) ** 2)
           + 0.6 * np.exp(-0.5 * ((freqs[None, :] - peaks[:, 1:]) / 250.0) ** 2)
           + 0.02)  # (L, H)
    n = n_frames * _HOP
    phase = rng.uniform(0, 2 * np.pi, _HARMONICS)
    # per frame, not per sample: the label's harmonic weights, broadcast over the frame's 160
    # samples (float32 throughout: this is the hot loop of the generator)
    weights = amp[frame_labels].astype(np.float32)  # (frames, H)
    t = (np.arange(n, dtype=np.float64) / _RATE).reshape(n_frames, _HOP)
    wave = np.zeros((n_frames, _HOP), dtype=np.float32)
    for h in range(_HARMONICS):
        if freqs[h] < _RATE / 2:
            arg = np.mod(freqs[h] * t, 1.0).astype(np.float32)  # cycles, reduced in float64
            wave += weights[:, h:h + 1] * np.sin(np.float32(2 * np.pi) * arg + np.float32(phase[h]))
    wave = wave.reshape(-1)
    wave /= np.abs(wave).max() + 1e-9
    wave = 0.5 * wave + 0.01 * rng.standard_normal(n, dtype=np.float32)
    q = np.clip(np.rint(wave * 32767), -32768, 32767).astype(np.int16)
    return q, frame_labels


def _write_one(path: str, speaker: int, utt: int, seconds: tuple[float, float],
               seed: int) -> np.ndarray:
    import soundfile as sf

    q, labels = _synth(speaker, utt, seconds, seed)
    sf.write(path, q, _RATE, format="FLAC", subtype="PCM_16")
    return labels


def _hash_unit(text: str) -> float:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: expected an integer >= {low}")


def make_librispeech_tree(root: str | PathLike, *, speakers: int, utterances_per_speaker: int,
                          seconds: tuple[float, float] = (10.0, 15.0),
                          chapters_per_speaker: int = 2, seed: int = 0,
                          workers: int = 0) -> Path:
    """Write a LibriSpeech-shaped tree of synthetic utterances (see the module docstring).

    Args:
        root: folder to create (an existing one is refused unless empty).
        speakers: number of speakers (folders named 1000, 1001, ...).
        utterances_per_speaker: >= 2 (every speaker has utterances in both splits); spread
            round-robin over ``chapters_per_speaker`` chapters.
        seconds: (low, high) utterance duration, drawn uniformly.
        seed: everything (audio, labels, splits) is a function of the arguments.
        workers: processes writing files (0: this process).

    Returns:
        ``root`` as an absolute path.
    """
    _check_int("speakers", speakers, 1)
    _check_int("utterances_per_speaker", utterances_per_speaker, 2)
    _check_int("chapters_per_speaker", chapters_per_speaker, 1)
    _check_int("seed", seed, 0)
    _check_int("workers", workers, 0)
    try:
        low, high = (float(s) for s in seconds)
    except (TypeError, ValueError):
        raise ValueError(f"seconds={seconds!r}: expected (low, high) in seconds") from None
    if not 0.05 <= low <= high:
        raise ValueError(f"seconds={seconds!r}: expected 0.05 <= low <= high")
    root = Path(root).expanduser().absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"root='{root}' exists and is not an empty folder; expected a new or "
                         "empty folder")
    root.mkdir(parents=True, exist_ok=True)

    jobs = []  # (id, path, speaker index, utterance index)
    for s in range(speakers):
        spk = str(1000 + s)
        for u in range(utterances_per_speaker):
            chapter = str(10000 + s * chapters_per_speaker + u % chapters_per_speaker)
            n = u // chapters_per_speaker
            uid = f"{spk}-{chapter}-{n:04d}"
            folder = root / spk / chapter
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((uid, str(folder / f"{uid}.flac"), s, u))
    span = (low, high)
    if workers == 0:
        labels = [_write_one(p, s, u, span, seed) for _, p, s, u in jobs]
    else:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            labels = list(pool.map(_write_one, [j[1] for j in jobs], [j[2] for j in jobs],
                                   [j[3] for j in jobs], [span] * len(jobs), [seed] * len(jobs),
                                   chunksize=8))
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0])
    with open(root / "alignments.txt", "w", encoding="utf-8") as f:
        for i in order:
            f.write(jobs[i][0] + " " + " ".join(map(str, labels[i].tolist())) + "\n")
    # ~80/20 by a hash of the id; a speaker all on one side gives its extreme-hash utterance over
    test = {jobs[i][0]: _hash_unit(f"{seed}:{jobs[i][0]}") < 0.2 for i in order}
    for s in range(speakers):
        ids = [j[0] for j in jobs if j[2] == s]
        if all(test[i] for i in ids):
            test[max(ids, key=lambda i: _hash_unit(f"{seed}:{i}"))] = False
        elif not any(test[i] for i in ids):
            test[min(ids, key=lambda i: _hash_unit(f"{seed}:{i}"))] = True
    ids_sorted = [jobs[i][0] for i in order]
    (root / "train_split.txt").write_text("".join(i + "\n" for i in ids_sorted if not test[i]),
                                          encoding="utf-8")
    (root / "test_split.txt").write_text("".join(i + "\n" for i in ids_sorted if test[i]),
                                         encoding="utf-8")
    return root
