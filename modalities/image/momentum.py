"""The momentum (EMA) encoder of MoCo and BYOL: a cosine schedule for the momentum and the
in-place exponential moving average of an online network into its target copy.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn


def _unit_interval(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number in [0, 1] (a momentum), got {type(value).__name__} {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in [0, 1] (a momentum), got {value!r}")
    return v


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    r"""BYOL's momentum schedule (Grill et al. 2020, Sec. 3.2):

        tau_k = final - (final - base) (cos(pi k / K) + 1) / 2,     k = step, K = total_steps

    so tau_0 = base and tau_K = final (BYOL: base 0.996 on ImageNet, 0.99 on CIFAR, final 1).
    Steps beyond K keep ``final``.

    Args:
        step: k >= 0, the optimizer step just taken (0-based).
        total_steps: K >= 1.
        base, final: momenta in [0, 1].

    Example:
        >>> cosine_momentum(0, 100, 0.99), cosine_momentum(50, 100, 0.99), cosine_momentum(100, 100, 0.99)
        (0.99, 0.995, 1.0)
    """
    for name, value in (("step", step), ("total_steps", total_steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    base, final = _unit_interval("base", base), _unit_interval("final", final)
    progress = min(step, total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def update_momentum(online: nn.Module, target: nn.Module, m: float) -> None:
    r"""target <- m target + (1 - m) online, in place, for every parameter and every
    floating-point buffer (BatchNorm's running mean and variance); integer buffers (BatchNorm's
    ``num_batches_tracked``) are copied. The two modules must have the same structure (the target
    is a deep copy of the online module): ValueError naming the first difference otherwise.

    Written as ``target.lerp_(online, 1 - m)`` = t + (1 - m)(o - t), the same value; m = 1 leaves
    the target as it is, m = 0 copies the online network.

    Example:
        >>> import copy
        >>> online = torch.nn.Linear(4, 4)
        >>> target = copy.deepcopy(online).requires_grad_(False)
        >>> update_momentum(online, target, 0.99)
    """
    m = _unit_interval("m", m)
    online_params, target_params = dict(online.named_parameters()), dict(target.named_parameters())
    online_buffers, target_buffers = dict(online.named_buffers()), dict(target.named_buffers())
    for kind, a, b in (("parameters", online_params, target_params), ("buffers", online_buffers, target_buffers)):
        if a.keys() != b.keys():
            missing = sorted(set(a) ^ set(b))
            raise ValueError(
                f"online and target modules must have the same {kind} (target a copy of online); "
                f"{kind} in one only: {missing[:5]}"
            )
        for name, o in a.items():
            if o.shape != b[name].shape:
                raise ValueError(
                    f"online and target {name} differ in shape: {tuple(o.shape)} and {tuple(b[name].shape)}"
                )
    weight = 1.0 - m
    for name, o in online_params.items():
        target_params[name].lerp_(o.detach(), weight)
    for name, o in online_buffers.items():
        t = target_buffers[name]
        if t.is_floating_point():
            t.lerp_(o, weight)
        else:
            t.copy_(o)


__all__ = ["cosine_momentum", "update_momentum"]
