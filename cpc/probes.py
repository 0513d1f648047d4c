"""Linear probes on frozen features, reported on held-out utterances (Oord et al. 2018, §3.1).

Every feature kind (CPC context, MFCC, a randomly initialised CPC model) goes through the same
probe: features standardised with the training split's mean and variance, then a softmax
regression trained full-batch with Adam for a fixed number of iterations and a fixed weight
decay, from a seeded initialisation. Frame-level probes (phones) use one feature vector per
10 ms frame; utterance-level probes (speaker, manifest label columns) mean-pool the frames.

The probe itself lives in :mod:`recipes.common.evaluation`, shared with the image and CLIP
recipes; it is re-exported here unchanged (same algorithm, same defaults, same numbers).
"""
from __future__ import annotations

from typing import Sequence

import torch

from recipes.common.evaluation import ProbeConfig, ProbeResult, linear_probe

__all__ = ["ProbeConfig", "ProbeResult", "frame_probe_data", "linear_probe"]


def frame_probe_data(features: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-utterance frame features ``(S_i, D)`` with frame labels ``(L_i,)``, keeping the
    first ``min(S_i, L_i)`` frames of each (the two differ by at most a frame or two at the
    end, where the audio's length is not a multiple of 10 ms)."""
    xs, ys = [], []
    for f, y in zip(features, labels):
        n = min(f.shape[0], y.shape[0])
        xs.append(f[:n])
        ys.append(y[:n].long())
    return torch.cat(xs), torch.cat(ys)
