"""Configuration of a CPC speech run: one dataclass, printed at start and saved with the run
and in every checkpoint; loadable from YAML or JSON.

Resolution order (later wins): the preset's values, then the ``--config`` file, then explicit
command-line flags.

Presets:
- ``paper``: Oord et al. 2018 / CPC_audio's training setup: 512-channel encoder, GRU 256,
  12 linear predictors, 20480-sample windows, Adam at 2e-4, batch 8 per process, negatives
  from the whole batch (the paper's "mixed speaker" setting of its 64.6 % phone result).
- ``cpu-quick``: what fits the no-argument run in 10 minutes on a 2-core CPU: the same
  architecture (5 strided convs, GRU 256, 12 linear predictors, same-speaker negatives, 2 speakers x 8 sequences per batch) with a
  128-channel encoder (16x fewer encoder FLOPs) and channel-wise normalisation, 5120-sample
  windows, batch 16, Adam at 1e-3 with 50 warm-up steps and gradient clipping, and a training
  time limit of 420 s (``train_seconds``; the steps actually done are reported). Same
  objective, same probes.
- ``auto`` (the default): ``paper`` on CUDA, ``cpu-quick`` on CPU. The resolved preset is
  printed at start.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cpc.model import CPCModelConfig
from recipes.common.evaluation import ProbeConfig
from recipes.common.config import check_int, layered_config
from recipes.common.config import read_config_file  # noqa: F401  (the recipe imports it from here)

PRESETS = ("auto", "paper", "cpu-quick")


@dataclass
class CPCSpeechConfig:
    preset: str = "auto"
    # data
    data: str | None = None  # LibriSpeech folder
    manifest: str | None = None  # CSV / JSON lines
    alignments: str | None = None  # CPC-format phone alignments, for the phone probe
    out: str = "runs/cpc_speech"
    strict: bool = False
    corpus_speakers: int = 8  # generated corpus (no --data / --manifest)
    corpus_utterances: int = 24
    corpus_seconds: list[float] = field(default_factory=lambda: [2.0, 4.0])
    # training
    steps: int = 100000
    batch_size: int = 8  # per process
    speakers_per_batch: int = 4
    window: int = 20480  # samples
    lr: float = 2e-4
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0: off
    negatives: str = "batch"  # batch (paper's headline) | sequence | speaker | global (all ranks)
    temperature: float = 1.0
    similarity: str = "dot"  # dot (paper) | cosine (see cpc.criterion)
    model: CPCModelConfig = field(default_factory=CPCModelConfig)
    device: str = "auto"
    seed: int = 0
    threads: int = 0  # torch.set_num_threads; 0: leave torch's default
    train_seconds: float = 0.0  # stop training after this long (checkpointed); 0: no limit
    log_every: int = 10
    checkpoint_every: int = 1000
    # evaluation
    probe_labels: list[str] = field(default_factory=list)  # manifest label columns
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    probe_max_seconds: float = 0.0  # cut utterances longer than this for probing; 0: whole
    probe_frames_per_utterance: int = 0  # frame probe: random frames kept per utterance; 0: all

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_values(name: str) -> dict[str, Any]:
    if name == "paper":
        # 100 h of LibriSpeech is 36M frames: keep 50 random frames per utterance for the
        # frame-level probe (about 1.4M frames), the same frames for every feature kind
        return {"probe_frames_per_utterance": 50}
    if name == "cpu-quick":
        return {
            "steps": 3000,
            "train_seconds": 420.0,
            # same-speaker negatives: on the generated corpus, batch negatives let the loss
            # fall through speaker cues (pitch) and the features collapsed in our runs
            "negatives": "speaker",
            "batch_size": 16,
            # 2 speakers x 8 sequences: more same-speaker negatives per group and half the
            # info_nce calls of 4 x 4 (measured: 6.6 vs 4-5 steps/s; phone probe 80.5 % vs 79.1 %)
            "speakers_per_batch": 2,
            "window": 5120,
            "lr": 1e-3,
            "warmup_steps": 50,
            "grad_clip": 1.0,
            "log_every": 10,
            "checkpoint_every": 100,
            "model": {"encoder_channels": 128, "encoder_norm": "channel"},
        }
    raise ValueError(f"preset={name!r}: expected one of {PRESETS}")


def build_config(file_values: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None, *, cuda: bool = False
                 ) -> CPCSpeechConfig:
    """Preset, then ``file_values``, then ``overrides`` (None values ignored)."""
    config = layered_config(CPCSpeechConfig(), PRESETS, preset_values, file_values, overrides,
                            cuda=cuda, gpu_preset="paper", cpu_preset="cpu-quick")
    # re-run the nested validations on the final values
    config.model = CPCModelConfig(**dataclasses.asdict(config.model))
    config.probe = ProbeConfig(**dataclasses.asdict(config.probe))
    validate(config)
    return config


def validate(config: CPCSpeechConfig) -> None:
    from cpc.criterion import NEGATIVE_MODES

    positive = ("steps", "batch_size", "speakers_per_batch", "window", "log_every",
                "checkpoint_every", "corpus_speakers", "corpus_utterances")
    for name in positive:
        check_int(name, getattr(config, name))
    if config.window % 160:
        raise ValueError(f"window={config.window!r}: expected a multiple of 160 (one frame is "
                         "160 samples)")
    if config.window // 160 <= config.model.prediction_steps:
        raise ValueError(f"window={config.window!r}: expected more than "
                         f"{config.model.prediction_steps} frames (prediction_steps) per window")
    if config.negatives not in NEGATIVE_MODES:
        raise ValueError(f"negatives={config.negatives!r}: expected one of {NEGATIVE_MODES}")
    if not config.lr > 0:
        raise ValueError(f"lr={config.lr!r}: expected a positive number")
    if config.data is not None and config.manifest is not None:
        raise ValueError(f"data={config.data!r} and manifest={config.manifest!r}: expected at "
                         "most one source")
    if isinstance(config.probe_labels, str):
        config.probe_labels = [s for s in config.probe_labels.split(",") if s]
