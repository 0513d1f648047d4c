"""The distance ops ``torch.ops.contrastive.*`` (triplet_hard_mine, triplet_semi_hard_mine,
triplet_batch_all, drlim_dissimilar and their backward ops): opcheck, gradcheck, torch.compile,
the mining rules (ties, NaN, "none" = -1), the backend registry and cross-backend agreement.
"""
from __future__ import annotations

import math

import pytest
import torch

from csrc_triton import distances
from csrc_triton._alloc import poison_outputs
from csrc_triton.distances import REGISTRY, load
from csrc_triton.triplet import drlim, triplet_margin

ops = torch.ops.contrastive
ALL = ["blockwise", "dense", "triton"]
CPU = ["blockwise", "dense"]
PROTOCOL = ("mine_hard", "mine_semi_hard", "batch_all_forward", "batch_all_backward", "drlim_forward", "drlim_backward")


def batch(n=21, d=5, classes=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[:2] = labels[2]
    return x, labels


def test_registry_backends_implement_the_protocol():
    for name in REGISTRY:
        backend = load(name)
        assert backend.name == name
        for method in PROTOCOL:
            assert callable(getattr(backend, method)), (name, method)


# ----------------------------------------------------------------------------------------------
# Mining rules
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_hard_mining_ties_and_missing(backend):
    """Ties go to the first candidate in (label, index) order; -1 when there is none."""
    x = torch.tensor(
        [[0.0, 0.0],  # 0: label 5
         [1.0, 0.0],  # 1: label 5, tied farthest positive of 0 with 2
         [0.0, 1.0],  # 2: label 5
         [3.0, 0.0],  # 3: label 9, tied nearest negative of 0 with 4 (label 7: first in label order)
         [0.0, 3.0],  # 4: label 7
         [9.0, 9.0]]  # 5: label 8, alone: no positive
    )
    labels = torch.tensor([5, 5, 5, 9, 7, 8])
    with poison_outputs():
        pos, neg = ops.triplet_hard_mine(x, x, labels, labels, 0, "squared", False, backend)
    assert pos.dtype == torch.int64 and pos.tolist()[0] == 1 and neg.tolist()[0] == 4
    # anchor 5's nearest negatives are 3 (label 9) and 4 (label 7), both at squared distance
    # 117: label order puts 4 first
    assert pos.tolist()[5] == -1 and neg.tolist()[5] == 4
    assert pos.tolist()[1] == 2  # 1's positives: 0 (d^2 = 1), 2 (d^2 = 2)
    # the same without self exclusion: each anchor may pick itself only if it is the farthest
    pos_all, _ = ops.triplet_hard_mine(x, x, labels, labels, None, "squared", False, backend)
    assert pos_all.tolist()[5] == 5


@pytest.mark.parametrize("backend", ALL)
def test_hard_mining_nan_wins(backend):
    x, labels = batch(seed=1)
    x[7] = float("nan")
    pos, neg = ops.triplet_hard_mine(x, x, labels, labels, 0, "euclidean", False, backend)
    for i in range(x.shape[0]):
        if i == 7:
            continue
        if labels[i] == labels[7]:
            assert pos[i] == 7
        else:
            assert neg[i] == 7


@pytest.mark.parametrize("distance", ["euclidean", "squared", "cosine"])
def test_backends_agree_on_mined_indices(distance, monkeypatch):
    monkeypatch.setattr(distances, "BLOCK_ROWS", 16)
    x, labels = batch(n=133, d=40, classes=30, seed=2)
    if distance == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    results = {b: ops.triplet_hard_mine(x, x, labels, labels, 0, distance, False, b) for b in ALL}
    far = {b: ops.triplet_hard_mine(x, x, labels, labels, 0, distance, True, b) for b in ALL}
    semi = {b: ops.triplet_semi_hard_mine(x, x, labels, labels, 0, distance, b) for b in ALL}
    for b in ("blockwise", "triton"):
        for ours, ref in zip(results[b], results["dense"]):
            assert torch.equal(ours, ref), b
        for ours, ref in zip(far[b], far["dense"]):
            assert torch.equal(ours, ref), b
        for ours, ref in zip(semi[b], semi["dense"]):
            assert torch.equal(ours, ref), b


@pytest.mark.parametrize("backend", ALL)
def test_semi_hard_slots(backend):
    """positive_index (N, K): slot r of anchor i is its r-th same-label candidate in index
    order, -1 for itself and past its class; negative_index -1 exactly where there is none."""
    labels = torch.tensor([0, 1, 0, 0, 1, 2])
    x, _ = batch(n=6, d=3, seed=3)
    with poison_outputs():
        pos, neg = ops.triplet_semi_hard_mine(x, x, labels, labels, 0, "euclidean", backend)
    assert pos.tolist() == [[-1, 2, 3], [-1, 4, -1], [0, -1, 3], [0, 2, -1], [1, -1, -1], [-1, -1, -1]]
    assert torch.equal(neg >= 0, pos >= 0)
    assert bool((labels[neg[neg >= 0]] != labels[torch.nonzero(neg >= 0)[:, 0]]).all())


# ----------------------------------------------------------------------------------------------
# opcheck, gradcheck, torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_opcheck(backend):
    x, labels = batch(n=13, d=4, seed=4)
    xg = x.clone().requires_grad_()
    cases = [
        (ops.triplet_hard_mine, (x, x, labels, labels, 0, "euclidean", False, backend)),
        (ops.triplet_batch_all, (xg, None, labels, labels, 0, 0.5, "squared", backend)),
        (ops.triplet_batch_all, (xg, x.clone().requires_grad_(), labels, labels, 0, 0.5, "cosine", backend)),
        (ops.drlim_dissimilar, (xg, None, labels, labels, 1.0, backend)),
        (ops.drlim_dissimilar, (xg, x.clone().requires_grad_(), labels, labels, 1.0, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_opcheck_semi_hard_dynamic_shape():
    x, labels = batch(n=13, d=4, seed=5)
    # the fake kernel's K is an unbacked size (the largest class count)
    torch.library.opcheck(ops.triplet_semi_hard_mine, (x, x, labels, labels, 0, "euclidean", "blockwise"))


@pytest.mark.parametrize("distance", ["euclidean", "squared", "cosine"])
def test_gradcheck_float64(distance):
    x, labels = batch(n=9, d=3, classes=3, dtype=torch.float64, seed=6)
    xg = x.clone().requires_grad_()
    torch.autograd.gradcheck(
        lambda t: ops.triplet_batch_all(t, None, labels, labels, 0, 0.7, distance, "blockwise")[0], (xg,)
    )
    y = x.flip(0).clone().requires_grad_()
    torch.autograd.gradcheck(lambda a, b: ops.drlim_dissimilar(a, b, labels, labels.flip(0), 1.5, "blockwise"), (xg, y))


def test_compile_fullgraph_batch_hard_and_drlim():
    """The public losses trace whole (value checks are skipped while tracing) and match eager."""
    x, labels = batch(n=24, d=6, seed=7)

    def losses(t, lab):
        return (
            triplet_margin(t, lab, margin=0.3, backend="blockwise")
            + triplet_margin(t, lab, margin=0.3, mining="batch_all", distance="cosine", backend="blockwise")
            + drlim(t, lab, margin=1.0, backend="blockwise")
        )

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = losses(xe, labels)
    traced = compiled(xc, labels)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(xc.grad, xe.grad)


_STATIC_COMPILE = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from csrc_triton import triton_distance as td

rows = dict(x_ptr="*bf16", y_ptr="*bf16", x_sq_ptr="*fp32", y_sq_ptr="*fp32", row_labels_ptr="*i64",
            col_labels_ptr="*i64", self_col_ptr="*i64", pos_out_ptr="*i64", neg_out_ptr="*i64",
            grad_ptr="*fp32", sorted_ptr="*fp32", prefix_ptr="*fp32", pos_count_ptr="*i32", hist_ptr="*i32",
            prod_ptr="*fp32", sum_ptr="*fp32", bucket_ptr="*i64", far_ptr="*i64", margin="fp32")
tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, UPCAST=False, DOT_PRECISION="tf32")
jobs = [
    (td._mine_hard_kernel, dict(tiles, FARTHEST_NEGATIVE=False, DISTANCE=0)),
    (td._pair_backward_kernel, dict(tiles, BLOCK_DO=64, COLUMN_OWNED=False, MODE=1, STEPS=4, DISTANCE=0)),
    (td._semi_hard_kernel, dict(tiles, STEPS=4, DISTANCE=2)),
]
for fn, constexprs in jobs:
    signature = {a: ("constexpr" if a in constexprs else rows.get(a, "i32")) for a in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    assert ".entry" in compiled.asm["ptx"], fn.__name__
print("compiled", len(jobs))
'''


def test_kernels_compile_for_sm90():
    """The interpreter is lenient; the real compiler (Triton 3.6 down to PTX for sm_90, no GPU
    needed) must accept the kernels too: hard mining, the batch-all backward (binary search,
    integer atomics), semi-hard mining (packed int64 atomic minima), bf16 tiles."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _STATIC_COMPILE], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 3" in done.stdout
