"""The one interface every backend of the log-sum-exp engine implements.

Backends are modules (``csrc_triton.triton_lse``, ``csrc_triton.blockwise``,
``csrc_triton.dense``) that satisfy :class:`LseBackend`; :mod:`csrc_triton.ops` picks one by
name from :data:`REGISTRY` and never special-cases it.

Notation and convention (shared by all backends, and the documentation of record)
--------------------------------------------------------------------------------
q (N, D) queries, k (M, D) keys, same dtype (float32, bfloat16, float16; float64 on the CPU
backends) and device; s = ``scale`` (0-dim, float32, or float64 for float64 inputs);
b = ``col_bias`` (M,) in the accumulation dtype, or None for b = 0.

    Z_ij = s q_i . k_j + b_j
    allowed(i, j) = not (self_offset is not None and j == i + self_offset)

``self_offset`` says where row i's own key is (its self-similarity, excluded): 0 when q is k;
``rank * B`` when a rank's B local rows are compared with the keys of every rank; None when
nothing is excluded.

Positives P(i), a subset of the allowed entries of row i, given in one of two ways (or none):
    * ``positive_index`` (N,) int64: P(i) = {positive_index[i]} (a negative value: no positive);
    * ``row_labels`` (N,) and ``col_labels`` (M,) int64: P(i) = {j : col_labels[j] == row_labels[i]}.

Forward outputs (accumulation dtype: float32, float64 for float64 inputs):
    row_lse_i      = log sum_{allowed j} exp(Z_ij)           (N,)   -inf for a row with none
    col_lse_j      = log sum_{allowed i} exp(Z_ij)           (M,)   only if ``compute_col``
    positive_sum_i = sum_{j in P(i)} Z_ij                    (N,)   0 if P(i) is empty;
                                                                    only if ``positive_sum``
    positive_lse_i = log sum_{j in P(i)} exp(Z_ij)           (N,)   -inf if P(i) is empty;
                                                                    only if ``positive_lse``
An output that was not asked for is an empty (0,) tensor.

Backward: for upstream gradients g (row_lse), h (col_lse), w (positive_sum), u (positive_lse),

    G_ij = [allowed] ( g_i exp(Z_ij - row_lse_i) + h_j exp(Z_ij - col_lse_j) )
         + [j in P(i)] ( w_i + u_i exp(Z_ij - positive_lse_i) )

where a term whose upstream gradient is 0 contributes exactly 0 (also where its statistic is
-inf), and a NaN statistic or NaN upstream gradient makes the gradients NaN. Then

    dq = s G k,   dk = s G^T q,   dscale = sum_ij G_ij (q_i . k_j),   dbias_j = sum_i G_ij.

Every term of G is summed in the accumulation dtype (so the positive terms cancel the softmax
terms before any 16-bit rounding), and dq/dk are accumulated in it and cast once. The CPU
backends also multiply G by k and q in the accumulation dtype; the Triton kernels round G to a
16-bit input dtype for the tensor-core products, as PyTorch's own 16-bit backward rounds the
softmax gradient (so 16-bit Triton gradients are held to "no worse than PyTorch in that
dtype", the CPU backends to one rounding).
``needs_dq``/``needs_dk``/``needs_dbias`` False: that output is not computed (returned as None)
and its workspace is not allocated. ``deterministic``: dq, dk, dscale and dbias are bitwise
reproducible run to run (no floating-point atomics); the CPU backends always are.
"""
from __future__ import annotations

from types import ModuleType
from typing import NamedTuple, Protocol

from torch import Tensor


class LseStats(NamedTuple):
    row_lse: Tensor
    col_lse: Tensor
    positive_sum: Tensor
    positive_lse: Tensor


class LseGrads(NamedTuple):
    dq: Tensor | None
    dk: Tensor | None
    dscale: Tensor
    dbias: Tensor | None


class LseBackend(Protocol):
    """What :mod:`csrc_triton.ops` needs of a backend (see the module docstring for the maths)."""

    def lse_forward(
        self,
        q: Tensor,
        k: Tensor,
        scale: Tensor,
        *,
        col_bias: Tensor | None,
        self_offset: int | None,
        compute_col: bool,
        positive_index: Tensor | None,
        row_labels: Tensor | None,
        col_labels: Tensor | None,
        positive_sum: bool,
        positive_lse: bool,
    ) -> LseStats: ...

    def lse_backward(
        self,
        q: Tensor,
        k: Tensor,
        scale: Tensor,
        stats: LseStats,
        *,
        grad_row: Tensor,
        grad_col: Tensor | None,
        grad_positive_sum: Tensor | None,
        grad_positive_lse: Tensor | None,
        col_bias: Tensor | None,
        self_offset: int | None,
        positive_index: Tensor | None,
        row_labels: Tensor | None,
        col_labels: Tensor | None,
        needs_dq: bool,
        needs_dk: bool,
        needs_dbias: bool,
        deterministic: bool,
    ) -> LseGrads: ...


#: backend name -> module path; imported on first use (the Triton one needs triton).
REGISTRY: dict[str, str] = {
    "triton": "csrc_triton.triton_lse",
    "blockwise": "csrc_triton.blockwise",
    "dense": "csrc_triton.dense",
}


def load(name: str) -> ModuleType:
    """The backend module registered as ``name`` (it satisfies :class:`LseBackend`)."""
    import importlib

    return importlib.import_module(REGISTRY[name])

