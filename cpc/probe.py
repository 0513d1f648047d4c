"""Linear probes of frozen CPC features (Oord et al. 2018, §3.1), at corpus scale.

The paper evaluates CPC by training linear classifiers on frozen features: phone labels per
10 ms frame and speaker identity per utterance (mean-pooled context features c_t). This module
extracts the features of three kinds for every probe utterance and runs the probes:

- ``cpc``: the trained model's context features c_t;
- ``random_init``: the same architecture with the exact weights training started from;
- ``mfcc``: 13 MFCC + deltas + delta-deltas (``modalities.audio.mfcc``), framed like CPC.

Extraction is batched on the training device (:func:`encode_batch` runs padded batches exactly:
padding never changes a valid frame), and only what the probes need is kept: per utterance the
mean over its valid frames and the frames of its frame index (the phone probe). Those arrays are
sized in advance from the lengths, so when their total exceeds ``max_feature_bytes`` they are
written to raw float32 files instead of RAM (same numbers either way), and the probes read them
back a chunk at a time: memory while probing does not grow with the number of frames.

A probe that cannot be fitted is skipped with its reason instead of reported: e.g. with a
speaker-disjoint split no held-out speaker occurs in training, and a classifier over the
training speakers would score 0 % for every feature kind whatever the features hold.

Example:
    >>> split = ProbeSplit(utts, read=lambda i: waves[i], lengths=[w.numel() for w in waves])
    >>> results, skipped = run_probes(cpc_model=model, random_model=init_model, train=split,
    ...                               test=test_split, alignments=None,
    ...                               probe_labels=["speaker"], probe_config=ProbeConfig())
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cpc.model import DOWNSAMPLING, CPCModel
from cpc.store import pread_exact
from recipes.common.evaluation import ProbeConfig, Rows, linear_probe
from recipes.common.logging import RunLog

__all__ = ["FEATURE_KINDS", "BUILTIN_PROBES", "ProbeSplit", "encode_batch", "frame_index",
           "run_probes"]

FEATURE_KINDS = ("cpc", "mfcc", "random_init")
BUILTIN_PROBES = ("phone", "speaker")
SAMPLE_RATE = 16000


# ----------------------------------------------------------------------------------------------
# Batched, exact encoding
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_batch(model: CPCModel, wave: torch.Tensor, lengths: torch.Tensor,
                 kind: str = "context") -> torch.Tensor:
    """Frozen features of a zero-padded batch, frame for frame those of each utterance alone.

    Convolution l maps a valid length L to ``(L + 2 p_l - k_l) // s_l + 1`` frames (what the
    unpadded convolution produces). Its output frame j reads inputs ``[j s - p, j s - p + k)``,
    which for j below that length reach at most p positions past L: alone they are the conv's
    zero padding; in a batch they are the row's padded tail, which after a layer holds
    ``relu(bias)``, not 0. So after every layer the activations beyond that layer's valid length
    are set to 0, and the next layer's last valid frames read what they read alone. The
    GRU/LSTM is causal, so valid frames stay exact after it. The encoder is run here layer by
    layer (``model.encoder.convs`` / ``.norms``, as :class:`cpc.model.Encoder` composes them).

    Args:
        model: a :class:`cpc.model.CPCModel` (its device is used).
        wave: (B, T) float waves, zero-padded (samples past ``lengths[b]`` are ignored).
        lengths: (B,) integer valid samples per row, in [0, T] (checked when on the CPU; a
            CUDA tensor is not read back, so the call does not synchronise).
        kind: "context" (c_t, the paper's probe input) or "encoder" (z_t).

    Returns:
        (B, T // 160, D) float on the model's device; for every b, frames
        ``[0, lengths[b] // 160)`` equal ``model.features(wave[b, :lengths[b]][None], kind)``
        up to float rounding; frames past ``lengths[b] // 160`` are 0.

    Example:
        >>> feats = encode_batch(model, padded, torch.tensor([16000, 12345]))  # (2, 100, 256)
    """
    if not isinstance(model, CPCModel):
        raise TypeError(f"model: expected a CPCModel, got {type(model).__name__}")
    if kind not in ("context", "encoder"):
        raise ValueError(f"kind={kind!r}: expected 'context' or 'encoder'")
    if not isinstance(wave, torch.Tensor) or wave.dim() != 2 or not wave.is_floating_point():
        raise ValueError(f"wave: shape {tuple(getattr(wave, 'shape', ()))}, dtype "
                         f"{getattr(wave, 'dtype', type(wave).__name__)}: expected a float "
                         "(batch, samples) tensor")
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 \
            or lengths.is_floating_point() or lengths.shape[0] != wave.shape[0]:
        raise ValueError(f"lengths: shape {tuple(getattr(lengths, 'shape', ()))}, dtype "
                         f"{getattr(lengths, 'dtype', type(lengths).__name__)}: expected an "
                         f"integer ({wave.shape[0]},) tensor")
    device = next(model.parameters()).device
    x = wave.to(device)
    n = lengths.to(device=device, dtype=torch.long)
    total = x.shape[1]
    if lengths.device.type == "cpu" and lengths.numel() \
            and (int(lengths.min()) < 0 or int(lengths.max()) > total):
        raise ValueError(f"lengths={lengths.tolist()}: expected values in [0, {total}] "
                         "(samples of wave)")
    encoder = model.encoder
    x = (x * _valid(n, total)).unsqueeze(1)                             # (B, 1, T)
    for conv, norm in zip(encoder.convs, encoder.norms):
        kernel, stride, padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        x = F.relu_(norm(conv(x)))  # in place: no grad here, one activation less at peak
        # valid length after this layer, as the unpadded conv computes it (floor division)
        n = torch.div(n + 2 * padding - kernel, stride, rounding_mode="floor").add_(1).clamp_(min=0)
        x.mul_(_valid(n, x.shape[-1]).unsqueeze(1))
    frames = total // DOWNSAMPLING
    z = x.transpose(1, 2)[:, :frames]                                   # (B, S, C)
    if z.shape[1] < frames:  # not reached with the encoder's padding; kept for safety
        z = F.pad(z, (0, 0, 0, frames - z.shape[1]))
    out = z if kind == "encoder" else model.context(z)[0]
    valid = _valid(torch.div(lengths.to(device=device, dtype=torch.long), DOWNSAMPLING,
                             rounding_mode="floor"), frames)
    return out * valid.unsqueeze(-1)


def _valid(n: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) float mask: 1 where position < n[b]."""
    return (torch.arange(size, device=n.device) < n[:, None]).float()


# ----------------------------------------------------------------------------------------------
# Splits and frame selection
# ----------------------------------------------------------------------------------------------
@dataclass
class ProbeSplit:
    """The utterances of one probe split, read on demand.

    ``read(i)`` returns the float32 (T,) 16 kHz wave of ``utterances[i]``; ``lengths[i]`` is T,
    known without reading (it sizes the batches and the feature arrays before any audio is
    decoded; a wave of another length is an error).
    """

    utterances: Sequence[Any]             # modalities.audio.Utterance
    read: Callable[[int], torch.Tensor]
    lengths: Sequence[int]

    def __post_init__(self) -> None:
        if not callable(self.read):
            raise TypeError(f"read: expected a callable i -> wave, got {type(self.read).__name__}")
        if len(self.lengths) != len(self.utterances):
            raise ValueError(f"len(lengths)={len(self.lengths)}: expected "
                             f"{len(self.utterances)} (one per utterance)")
        for i, n in enumerate(self.lengths):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"lengths[{i}]={n!r}: expected a non-negative integer "
                                 "(samples)")


def frame_index(utterances: Sequence[Any], lengths: Sequence[int],
                alignments: dict[str, torch.Tensor] | None, cap: int, max_samples: int,
                seed: int) -> list[torch.Tensor | None]:
    """Which frames of each utterance enter the frame-level probe (the recipe's rule): for an
    utterance with an alignment, n = min(samples // 160, alignment frames) with samples cut at
    ``max_samples`` (0: no cut); all n frames, or, when ``cap`` and n > cap, ``cap`` of them
    drawn by ``torch.randperm(n)`` seeded with ``seed * 1_000_003 + i`` (i: position in the
    split), sorted. None where the utterance has no alignment. The same frames serve every
    feature kind."""
    index: list[torch.Tensor | None] = []
    for i, (utt, samples) in enumerate(zip(utterances, lengths)):
        if alignments is None or utt.id not in alignments:
            index.append(None)
            continue
        n_samples = min(int(samples), max_samples) if max_samples else int(samples)
        n = min(n_samples // DOWNSAMPLING, alignments[utt.id].numel())
        if cap and n > cap:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            index.append(torch.randperm(n, generator=gen)[:cap].sort().values)
        else:
            index.append(torch.arange(n))
    return index


def _label(utt: Any, label: str) -> str | None:
    return utt.speaker if label == "speaker" else utt.labels.get(label)


# ----------------------------------------------------------------------------------------------
# Feature storage: RAM or pwrite/pread files, sized in advance
# ----------------------------------------------------------------------------------------------
class _Store:
    """float32 (rows, dim) arrays by (kind, split, level): np.empty in RAM, or raw row-major
    float32 files under a private folder of ``work_dir`` written with ``os.pwrite`` and read
    back with ``os.pread`` (no memory map, so resident memory never holds more of them than
    the rows being written or read). :meth:`close` removes the folder, and ``work_dir`` too
    when it was created here and is left empty."""

    def __init__(self, shapes: dict[tuple[str, str, str], tuple[int, int]], on_disk: bool,
                 work_dir: str | Path | None) -> None:
        self.folder: Path | None = None
        self.created: Path | None = None  # work_dir when made here: removed again if empty
        self.shapes = dict(shapes)
        self.arrays: dict[tuple[str, str, str], np.ndarray] = {}
        self.fds: dict[tuple[str, str, str], int] = {}
        if on_disk:
            if work_dir is not None and not Path(work_dir).exists():
                Path(work_dir).mkdir(parents=True)
                self.created = Path(work_dir)
            self.folder = Path(tempfile.mkdtemp(prefix="probe_features_",
                                                dir=None if work_dir is None else str(work_dir)))
        for key, (rows, dim) in self.shapes.items():
            if self.folder is not None:
                fd = os.open(self.folder / f"{'_'.join(key)}.f32", os.O_RDWR | os.O_CREAT, 0o600)
                self.fds[key] = fd
                os.ftruncate(fd, 4 * rows * dim)
            else:
                self.arrays[key] = np.empty((rows, dim), dtype=np.float32)

    def write(self, key: tuple[str, str, str], start: int, values: np.ndarray) -> None:
        """Rows ``[start, start + len(values))`` of ``key``."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        if key not in self.fds:
            self.arrays[key][start:start + values.shape[0]] = values
            return
        view = memoryview(values).cast("B")
        offset, done = 4 * start * self.shapes[key][1], 0
        while done < len(view):
            done += os.pwrite(self.fds[key], view[done:], offset + done)

    def read(self, key: tuple[str, str, str], start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``key`` (a view in RAM, a fresh array from disk)."""
        if key not in self.fds:
            return self.arrays[key][start:stop]
        dim = self.shapes[key][1]
        out = np.empty((stop - start, dim), dtype=np.float32)
        pread_exact(self.fds[key], out, 4 * start * dim,
                    self.folder / f"{'_'.join(key)}.f32" if self.folder else key)
        return out

    def rows(self, key: tuple[str, str, str]) -> Rows:
        return Rows(self.shapes[key], lambda a, b: torch.from_numpy(self.read(key, a, b)))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.arrays.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        if self.created is not None:
            try:
                self.created.rmdir()  # only when empty
            except OSError:
                pass
            self.created = None


def _batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Utterance indices sorted by length (longest first), grouped so that a batch's padded
    size (rows x longest) stays within ``budget`` samples; an utterance longer than the budget
    forms its own batch."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def _extract(split: ProbeSplit, name: str, models: dict[str, CPCModel],
             index: list[torch.Tensor | None], offsets: np.ndarray, pooled_ok: np.ndarray,
             store: _Store, max_samples: int, budget: int, device: torch.device,
             log: RunLog, desc: str) -> None:
    """Fill ``store``'s arrays of one split: row i of (kind, name, "utt") the mean of utterance
    i's valid frames; rows ``offsets[i]:offsets[i+1]`` of (kind, name, "frame") its frames at
    ``index[i]``."""
    from modalities.audio import mfcc

    lengths = [min(int(n), max_samples) if max_samples else int(n) for n in split.lengths]
    bar = log.progress(len(lengths), desc, unit="utt")
    for batch in _batches(lengths, budget):
        waves = []
        for i in batch:
            wave = split.read(i)
            if not isinstance(wave, torch.Tensor) or wave.dim() != 1 \
                    or wave.numel() != int(split.lengths[i]):
                raise ValueError(
                    f"{name} utterance {i} ({getattr(split.utterances[i], 'id', '?')}): read "
                    f"returned shape {tuple(getattr(wave, 'shape', ()))}: expected "
                    f"({int(split.lengths[i])},) as given in lengths")
            waves.append(wave[:lengths[i]].float())
        longest = lengths[batch[0]]
        padded = torch.zeros(len(batch), longest)
        for row, wave in enumerate(waves):
            padded[row, :wave.numel()] = wave
        n_samples = torch.tensor([lengths[i] for i in batch])
        n_frames = n_samples // DOWNSAMPLING
        for kind in FEATURE_KINDS:
            if kind == "mfcc":  # per utterance on the CPU: its reflect padding is per wave
                feats = [mfcc(w).float() for w in waves]
                pooled = torch.stack([f.mean(0) if f.shape[0] else f.new_zeros(f.shape[1])
                                      for f in feats])
                frames = [f[index[i].clamp(max=max(f.shape[0] - 1, 0))]
                          if index[i] is not None else None for f, i in zip(feats, batch)]
            else:
                f = encode_batch(models[kind], padded.to(device), n_samples.to(device))
                # frames past n_frames are 0, so the sum over all frames is the valid sum
                pooled = (f.sum(1) / n_frames.to(f.device).clamp(min=1)[:, None].float()).cpu()
                picked = [f[row, index[i]] if index[i] is not None else None
                          for row, i in enumerate(batch)]
                rows = [p for p in picked if p is not None]
                flat = torch.cat(rows).float().cpu() if rows else None
                frames, at = [], 0
                for p in picked:
                    if p is None:
                        frames.append(None)
                    else:
                        frames.append(flat[at:at + p.shape[0]])
                        at += p.shape[0]
            for row, i in enumerate(batch):
                if pooled_ok[i]:
                    store.write((kind, name, "utt"), i, pooled[row:row + 1].numpy())
                if frames[row] is not None and frames[row].shape[0]:
                    store.write((kind, name, "frame"), int(offsets[i]), frames[row].numpy())
        for _ in batch:  # one by one, so that plain-line progress keeps its interval
            bar.update(1)
    bar.close()


# ----------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------
@dataclass
class _Task:
    label: str
    level: str                         # "frame" or "utterance"
    train_rows: Any = None             # utterance indices (utterance level)
    test_rows: Any = None
    ytr: Any = None
    yte: Any = None
    unseen: float = 0.0


def _plan(train: ProbeSplit, test: ProbeSplit, alignments: dict[str, torch.Tensor] | None,
          probe_labels: Sequence[str], tr_idx: list, te_idx: list, tr_ok: np.ndarray,
          te_ok: np.ndarray) -> tuple[list[_Task], dict[str, str]]:
    """The probes of the recipe (phone, speaker, then manifest labels) with their labels, and
    the reasons of those that cannot be fitted."""
    tasks: list[_Task] = []
    skipped: dict[str, str] = {}
    if alignments is not None:
        tr = [alignments[train.utterances[i].id][x] for i, x in enumerate(tr_idx) if x is not None]
        te = [alignments[test.utterances[i].id][x] for i, x in enumerate(te_idx) if x is not None]
        tasks.append(_Task("phone", "frame",
                           ytr=torch.cat(tr) if tr else torch.zeros(0, dtype=torch.long),
                           yte=torch.cat(te) if te else torch.zeros(0, dtype=torch.long)))
    labels: list[str] = []
    if any(u.speaker is not None for u in train.utterances):
        labels.append("speaker")
    for label in probe_labels:
        if label in BUILTIN_PROBES:  # probed above whenever its labels exist
            continue
        if not any(label in u.labels for u in train.utterances):
            raise ValueError(f"probe_labels: {label!r} is no manifest column of the training "
                             f"utterances; expected one of "
                             f"{sorted({k for u in train.utterances for k in u.labels})}")
        labels.append(label)
    for label in labels:
        rows_tr = [i for i, u in enumerate(train.utterances)
                   if tr_ok[i] and _label(u, label) is not None]
        rows_te = [i for i, u in enumerate(test.utterances)
                   if te_ok[i] and _label(u, label) is not None]
        tasks.append(_Task(label, "utterance", rows_tr, rows_te,
                           [_label(train.utterances[i], label) for i in rows_tr],
                           [_label(test.utterances[i], label) for i in rows_te]))
    runnable = []
    for task in tasks:
        reason = _skip_reason(task)
        if reason is None:
            runnable.append(task)
        else:
            skipped[task.label] = reason
    return runnable, skipped


def _skip_reason(task: _Task) -> str | None:
    """Why ``task`` cannot be fitted (None: it can); sets ``task.unseen``."""
    what = {"phone": "phone labels", "speaker": "speakers"}.get(task.label,
                                                                f"'{task.label}' labels")
    unit = "frames" if task.level == "frame" else "utterances"
    ytr = task.ytr.tolist() if isinstance(task.ytr, torch.Tensor) else list(task.ytr)
    yte = task.yte.tolist() if isinstance(task.yte, torch.Tensor) else list(task.yte)
    if not ytr:
        return f"no labelled training {unit}"
    if not yte:
        return f"no labelled held-out {unit}"
    seen = set(ytr)
    if len(seen) < 2:
        return f"only {len(seen)} class in training ({what}: {sorted(seen)[:5]}); expected 2 or more"
    unseen = sum(y not in seen for y in yte)
    if unseen == len(yte):
        held = len(set(yte))
        detail = " (speaker-disjoint split)" if task.label == "speaker" else ""
        return f"none of the {held} held-out {what} occurs in training{detail}"
    task.unseen = unseen / len(yte)
    return None


def _check_args(cpc_model: Any, random_model: Any, train: Any, test: Any, alignments: Any,
                probe_labels: Any, probe_config: Any, frames_per_utterance: Any,
                max_seconds: Any, seed: Any, max_feature_bytes: Any,
                batch_seconds: Any, probe_chunk_bytes: Any) -> None:
    for name, model in (("cpc_model", cpc_model), ("random_model", random_model)):
        if not isinstance(model, CPCModel):
            raise TypeError(f"{name}: expected a CPCModel, got {type(model).__name__}")
    for name, split in (("train", train), ("test", test)):
        if not isinstance(split, ProbeSplit):
            raise TypeError(f"{name}: expected a ProbeSplit, got {type(split).__name__}")
    if alignments is not None and not isinstance(alignments, dict):
        raise TypeError(f"alignments: expected a dict id -> (frames,) tensor or None, got "
                        f"{type(alignments).__name__}")
    if isinstance(probe_labels, str) or not all(isinstance(s, str) for s in probe_labels):
        raise ValueError(f"probe_labels={probe_labels!r}: expected a sequence of label names")
    if not isinstance(probe_config, ProbeConfig):
        raise TypeError(f"probe_config: expected a ProbeConfig, got {type(probe_config).__name__}")
    for name, value in (("frames_per_utterance", frames_per_utterance), ("seed", seed),
                        ("max_feature_bytes", max_feature_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}: expected a non-negative integer")
    if isinstance(probe_chunk_bytes, bool) or not isinstance(probe_chunk_bytes, int) \
            or probe_chunk_bytes < 1:
        raise ValueError(f"probe_chunk_bytes={probe_chunk_bytes!r}: expected an integer >= 1")
    for name, value, low in (("max_seconds", max_seconds, ">= 0"),
                             ("batch_seconds", batch_seconds, "> 0")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0 or (low == "> 0" and value == 0):
            raise ValueError(f"{name}={value!r}: expected a finite number {low}")


def run_probes(*, cpc_model: CPCModel, random_model: CPCModel, train: ProbeSplit,
               test: ProbeSplit, alignments: dict[str, torch.Tensor] | None,
               probe_labels: Sequence[str], probe_config: ProbeConfig,
               frames_per_utterance: int = 0, max_seconds: float = 0.0, seed: int = 0,
               device: torch.device | str = "cpu", log: RunLog | None = None,
               work_dir: str | Path | None = None, max_feature_bytes: int = 2 * 10**9,
               batch_seconds: float = 160.0, probe_chunk_bytes: int = 2**26
               ) -> tuple[dict, dict]:
    """Linear probes of ``cpc``, ``mfcc`` and ``random_init`` features, trained on ``train``
    and scored on ``test`` with :func:`recipes.common.evaluation.linear_probe`.

    Probes, in order: ``phone`` (frame level: frames of :func:`frame_index`, ``seed`` for
    train, ``seed + 1`` for test) when ``alignments`` is given; ``speaker`` (mean-pooled
    features per utterance) when training utterances have speakers; then each manifest label
    column of ``probe_labels`` ("phone"/"speaker" there are the built-ins). Every kind sees the
    same examples. Utterance features are the mean over the valid frames ``[0, T // 160)``
    (T cut at ``max_seconds``); an utterance shorter than one frame has none and enters no
    utterance probe.

    A probe that cannot be fitted is not run and goes into ``skipped`` with its reason (one log
    line each): no labelled example on one side, fewer than 2 training classes, or no
    held-out example whose label occurs in training (e.g. a speaker-disjoint split). When
    only some held-out labels are unseen the probe runs and its result gains
    ``unseen_test_fraction`` (held-out examples whose label is not in training, each an error).

    Features are extracted in batches of at most ``batch_seconds`` of padded audio, sorted by
    length, on ``device`` (:func:`encode_batch`); MFCC per utterance on the CPU. They are kept
    in RAM, or in raw float32 files under ``work_dir`` (a temporary folder when None; removed
    at the end) when their total size exceeds ``max_feature_bytes``: written and read with
    ``pwrite``/``pread``, never memory-mapped. The frame probe reads its features a chunk at a
    time (``probe_chunk_bytes`` of float64 standardised rows: :class:`~recipes.common.
    evaluation.Rows`), so with features on disk a probe holds one chunk, the utterance-level
    features (one row per utterance) and the labels, whatever the number of frames.

    Returns:
        ``(results, skipped)``: ``{kind: {label: ProbeResult.as_dict()}}`` for every kind of
        :data:`FEATURE_KINDS`, and ``{label: reason}``.

    Raises:
        ValueError: a bad argument, or a label of ``probe_labels`` that no training utterance
            has (before any audio is read).
    """
    _check_args(cpc_model, random_model, train, test, alignments, probe_labels, probe_config,
                frames_per_utterance, max_seconds, seed, max_feature_bytes, batch_seconds,
                probe_chunk_bytes)
    log = log or RunLog(None, enabled=False)
    device = torch.device(device)
    max_samples = int(round(max_seconds * SAMPLE_RATE))
    budget = max(1, int(round(batch_seconds * SAMPLE_RATE)))

    def cut(split: ProbeSplit) -> list[int]:
        return [min(int(n), max_samples) if max_samples else int(n) for n in split.lengths]

    tr_ok = np.array([n >= DOWNSAMPLING for n in cut(train)], dtype=bool)
    te_ok = np.array([n >= DOWNSAMPLING for n in cut(test)], dtype=bool)
    tr_idx = frame_index(train.utterances, train.lengths, alignments, frames_per_utterance,
                         max_samples, seed)
    te_idx = frame_index(test.utterances, test.lengths, alignments, frames_per_utterance,
                         max_samples, seed + 1)
    tasks, skipped = _plan(train, test, alignments, probe_labels, tr_idx, te_idx, tr_ok, te_ok)
    for label, reason in skipped.items():
        log(f"probe {label}: skipped: {reason}")
    results: dict[str, dict[str, dict]] = {k: {} for k in FEATURE_KINDS}
    if not tasks:
        return results, skipped
    if not any(t.level == "frame" for t in tasks):  # no frame features needed
        tr_idx = [None] * len(tr_idx)
        te_idx = [None] * len(te_idx)

    from modalities.audio import mfcc
    models = {"cpc": cpc_model.to(device).eval(), "random_init": random_model.to(device).eval()}
    dims = {"cpc": cpc_model.config.context_dim, "random_init": random_model.config.context_dim,
            "mfcc": mfcc(torch.zeros(2 * DOWNSAMPLING)).shape[-1]}
    offsets = {}
    shapes: dict[tuple[str, str, str], tuple[int, int]] = {}
    for name, split, idx in (("train", train, tr_idx), ("test", test, te_idx)):
        counts = [0 if x is None else x.numel() for x in idx]
        offsets[name] = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        for kind in FEATURE_KINDS:
            shapes[(kind, name, "utt")] = (len(split.utterances), dims[kind])
            shapes[(kind, name, "frame")] = (int(offsets[name][-1]), dims[kind])
    total_bytes = sum(4 * a * b for a, b in shapes.values())
    on_disk = total_bytes > max_feature_bytes
    store = _Store(shapes, on_disk, work_dir)
    if on_disk:
        log(f"probe features: {total_bytes / 1e9:.2f} GB > max_feature_bytes="
            f"{max_feature_bytes / 1e9:.2f} GB: written to files in {store.folder} and "
            f"read back a chunk at a time")
    try:
        _extract(train, "train", models, tr_idx, offsets["train"], tr_ok, store, max_samples,
                 budget, device, log, "probe features (train)")
        _extract(test, "test", models, te_idx, offsets["test"], te_ok, store, max_samples,
                 budget, device, log, "probe features (held out)")
        for task in tasks:
            for kind in FEATURE_KINDS:
                if task.level == "frame":
                    xtr: Any = store.rows((kind, "train", "frame"))
                    xte: Any = store.rows((kind, "test", "frame"))
                else:  # one row per utterance: small, gathered in RAM
                    key_tr, key_te = (kind, "train", "utt"), (kind, "test", "utt")
                    xtr = torch.from_numpy(store.read(key_tr, 0, store.shapes[key_tr][0])[task.train_rows])
                    xte = torch.from_numpy(store.read(key_te, 0, store.shapes[key_te][0])[task.test_rows])
                chunk = max(1, probe_chunk_bytes // (8 * int(xtr.shape[1])))
                result = linear_probe(xtr, task.ytr, xte, task.yte, probe_config,
                                      chunk_rows=chunk).as_dict()
                if task.unseen:
                    result["unseen_test_fraction"] = task.unseen
                results[kind][task.label] = result
    finally:
        store.close()
    return results, skipped
