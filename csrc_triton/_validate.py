"""Argument checks for the public losses: each error names the argument, its value and what
was expected. Checks that read tensor values are skipped while ``torch.compile`` traces."""
from __future__ import annotations

import math
from collections.abc import Callable
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


def _host_readable(x: Tensor) -> bool:
    """Reading x's value costs no device synchronisation (and is allowed while tracing)."""
    return x.device.type == "cpu" and not _tracing()


def positive_scalar(
    name: str, value: object, device: torch.device, dtype: torch.dtype, *, what: str, reciprocal: bool = False
) -> Tensor:
    """A finite, positive float or one-element floating tensor, returned as a 0-dim tensor.

    A float32 tensor with bfloat16/float16 features is the normal mixed-precision case: the
    result is float32 (float64 for float64 features), and gradients flow back to ``value``.
    ``reciprocal``: the value divides the logits (a temperature), so 1 / value must be finite
    in the features' dtype too. A tensor's value is checked only where reading it needs no
    device synchronisation (CPU tensors): on CUDA the losses stay capturable in a CUDA graph.
    """
    return _scalar(name, value, device, dtype, "a positive float", what,
                   lambda v: _check_positive(name, v, dtype, what, reciprocal))


def finite_scalar(name: str, value: object, device: torch.device, dtype: torch.dtype, *, what: str) -> Tensor:
    """A finite float or one-element floating tensor of any sign (a logit bias), returned as a
    0-dim tensor in the accumulation dtype, checked as :func:`positive_scalar` checks."""

    def check_finite(v: float) -> None:
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite ({what}), got {v}")

    return _scalar(name, value, device, dtype, "a float", what, check_finite)


def _scalar(name: str, value: object, device: torch.device, dtype: torch.dtype, kind: str, what: str,
            check_value: Callable[[float], None]) -> Tensor:
    """The checks shared by the scalar arguments: ``kind`` names what a float must be in the
    TypeError, ``check_value`` checks a value that can be read without device synchronisation."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if isinstance(value, bool) or not isinstance(value, (Real, Tensor)):
        raise TypeError(f"{name} must be {kind} or a 0-dim tensor ({what}), got {type(value).__name__}")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar ({what}), got a tensor of shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor ({what}), got dtype {value.dtype}")
        if value.device != device and value.device.type != "meta":
            raise ValueError(f"{name} is on device {value.device} but the features are on {device}")
        if _host_readable(value):
            check_value(float(value.detach().reshape(())))
        return value.reshape(()).to(acc)
    v = float(value)
    check_value(v)
    return torch.tensor(v, dtype=acc, device=device)


def _check_positive(name: str, v: float, dtype: torch.dtype, what: str, reciprocal: bool) -> None:
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be finite and positive ({what}), got {v}")
    if reciprocal:
        largest = torch.finfo(dtype).max
        if 1.0 / v > largest:
            raise ValueError(
                f"{name}={v!r} is too small: its reciprocal {1.0 / v:.3g} overflows {dtype} "
                f"(largest {largest:.3g}); expected {name} > {1.0 / largest:.3g}"
            )


def non_negative(name: str, value: object, *, what: str) -> float:
    """A finite float >= 0 (margins, regularisation weights)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float ({what}), got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be finite and >= 0 ({what}), got {v}")
    return v


def reduction(value: object) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction={value!r} is not one of {REDUCTIONS}")
    return value  # type: ignore[return-value]


def labels(value: object, n: int, device: torch.device | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of integer class ids, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), one per sample, got shape {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"labels are on device {value.device} but the features are on {device}; expected the same device")
    return value


def some_positive(loss: str, row_labels: Tensor, col_labels: Tensor, *, self_counts: int = 1) -> None:
    """ValueError if no row has a positive: a column with its label other than itself.

    Checked only where it needs no device synchronisation (CPU tensors, not while tracing).
    """
    if not _host_readable(row_labels):
        return
    from .positives import label_counts

    if not bool((label_counts(row_labels.long(), col_labels.long()) > self_counts).any()):
        raise ValueError(
            f"{loss}: no anchor has a positive (every label occurs once in labels); "
            "expected at least two samples of some class"
        )
