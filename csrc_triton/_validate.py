"""Argument checks for the public losses: each error names the argument, its value and what
was expected. Checks that read tensor values are skipped while ``torch.compile`` traces."""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

FEATURE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def features(name: str, x: object, *, ndims: tuple[int, ...] = (2,)) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ndims:
        shapes = " or ".join({2: "(N, D)", 3: "(N, V, D)"}[d] for d in ndims)
        raise ValueError(f"{name} must have shape {shapes}, got shape {tuple(x.shape)}")
    if x.dtype not in FEATURE_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); at least one row is needed")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has feature dimension D=0 (shape {tuple(x.shape)}); expected D >= 1")
    return x


def same_kind(ref_name: str, ref: Tensor, name: str, x: Tensor, *, same_rows: bool) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on device {x.device} but {ref_name} is on {ref.device}; expected the same device")
    if x.dtype != ref.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; expected the same dtype "
            "(cast both, or run under torch.autocast)"
        )
    if x.shape[-1] != ref.shape[-1]:
        raise ValueError(
            f"{name} has feature dimension D={x.shape[-1]} (shape {tuple(x.shape)}) but {ref_name} "
            f"has D={ref.shape[-1]} (shape {tuple(ref.shape)}); expected the same D"
        )
    if same_rows and x.shape[0] != ref.shape[0]:
        raise ValueError(
            f"{name} has {x.shape[0]} rows but {ref_name} has {ref.shape[0]}; row i of each is a "
            "positive pair, so expected the same number of rows"
        )


def pair(a_name: str, a: object, b_name: str, b: object) -> None:
    """Two (N, D) feature tensors whose row i is a positive pair: same dtype, device, N and D."""
    features(a_name, a)
    features(b_name, b)
    same_kind(a_name, a, b_name, b, same_rows=True)  # type: ignore[arg-type]


def positive_scalar(name: str, value: object, device: torch.device, dtype: torch.dtype, *, what: str) -> Tensor:
    """A finite, positive float or one-element floating tensor, returned as a 0-dim tensor.

    A float32 tensor with bfloat16/float16 features is the normal mixed-precision case: the
    result is float32 (float64 for float64 features), and gradients flow back to ``value``.
    """
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if isinstance(value, bool) or not isinstance(value, (Real, Tensor)):
        raise TypeError(f"{name} must be a positive float or a 0-dim tensor ({what}), got {type(value).__name__}")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar ({what}), got a tensor of shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor ({what}), got dtype {value.dtype}")
        if value.device != device and value.device.type != "meta":
            raise ValueError(f"{name} is on device {value.device} but the features are on {device}")
        if not _tracing():
            v = float(value.detach().reshape(()))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and positive ({what}), got {v}")
        return value.reshape(()).to(acc)
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be finite and positive ({what}), got {v}")
    return torch.tensor(v, dtype=acc, device=device)


def reduction(value: object) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction={value!r} is not one of {REDUCTIONS}")
    return value  # type: ignore[return-value]


def labels(value: object, n: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of integer class ids, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), one per sample, got shape {tuple(value.shape)}")
    return value
