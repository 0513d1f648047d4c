"""Linear probes on frozen features, reported on held-out utterances (Oord et al. 2018, §3.1).

Every feature kind (CPC context, MFCC, a randomly initialised CPC model) goes through the same
probe: features standardised with the training split's mean and variance, then a softmax
regression trained full-batch with Adam for a fixed number of iterations and a fixed weight
decay, from a seeded initialisation. Frame-level probes (phones) use one feature vector per
10 ms frame; utterance-level probes (speaker, manifest label columns) mean-pool the frames.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass
class ProbeConfig:
    iterations: int = 300
    lr: float = 0.05
    weight_decay: float = 1e-4
    seed: int = 0


@dataclass
class ProbeResult:
    accuracy: float
    train_accuracy: float
    n_train: int
    n_test: int
    n_classes: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def linear_probe(train_x: torch.Tensor, train_y: Sequence, test_x: torch.Tensor,
                 test_y: Sequence, config: ProbeConfig | None = None) -> ProbeResult:
    """Train a softmax regression on ``(train_x (N, D), train_y)`` and report its accuracy on
    ``(test_x (M, D), test_y)``. Labels may be any hashable values; a test label never seen in
    training counts as an error."""
    config = config or ProbeConfig()
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x.shape={tuple(train_x.shape)}, test_x.shape="
                         f"{tuple(test_x.shape)}: expected (N, D) and (M, D)")
    if len(train_y) != train_x.shape[0] or len(test_y) != test_x.shape[0]:
        raise ValueError(f"len(train_y)={len(train_y)}, len(test_y)={len(test_y)}: expected "
                         f"{train_x.shape[0]} and {test_x.shape[0]}")
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("empty probe split: expected training and test examples")
    classes = sorted(set(_keys(train_y)))
    index = {c: i for i, c in enumerate(classes)}
    ytr = torch.tensor([index[c] for c in _keys(train_y)])
    yte = torch.tensor([index.get(c, -1) for c in _keys(test_y)])

    xtr = train_x.double()
    mean = xtr.mean(0)
    std = xtr.std(0, unbiased=False).clamp_min(1e-6)
    xtr = ((xtr - mean) / std).float()
    xte = ((test_x.double() - mean) / std).float()

    gen = torch.Generator().manual_seed(config.seed)
    weight = (torch.randn(xtr.shape[1], len(classes), generator=gen) * 0.01).requires_grad_()
    bias = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=config.lr, weight_decay=config.weight_decay)
    with torch.enable_grad():
        for _ in range(config.iterations):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(xtr @ weight + bias, ytr).backward()
            opt.step()
    with torch.no_grad():
        train_acc = ((xtr @ weight + bias).argmax(1) == ytr).float().mean().item()
        test_acc = ((xte @ weight + bias).argmax(1) == yte).float().mean().item()
    return ProbeResult(test_acc, train_acc, int(xtr.shape[0]), int(xte.shape[0]), len(classes))


def _keys(labels: Sequence) -> list:
    if isinstance(labels, torch.Tensor):
        return labels.tolist()
    return list(labels)


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
