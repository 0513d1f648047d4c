"""Small numeric helpers shared by the backends and the op layer."""
from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def finite_or_zero(x: Tensor) -> Tensor:
    """Shift for exp(x_ij - shift_i): -inf (nothing allowed) becomes 0 so that exp(-inf - 0) = 0."""
    return torch.where(torch.isinf(x) & (x < 0), torch.zeros_like(x), x)
