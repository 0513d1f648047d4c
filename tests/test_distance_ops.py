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
    torch.library.opcheck(
        ops.triplet_semi_hard_mine, (x, x, labels, labels, 0, "euclidean", "blockwise"),
        test_utils=("test_schema", "test_faketensor"),
    )


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
