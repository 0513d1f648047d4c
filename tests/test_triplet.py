"""triplet_margin (batch-hard, batch-all, semi-hard) against float64 references written from the
definitions: a materialised distance matrix from row differences, explicit loops or masks over
anchors, positives and negatives (Hermans et al. 2017; Schroff et al. 2015 as TF Addons'
``triplet_semihard_loss``). Every backend, every mining x distance x soft, every dtype.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from csrc_triton import distances
from csrc_triton._alloc import poison_outputs
from csrc_triton.triplet import TripletMarginLoss, triplet_margin

MININGS = ["batch_hard", "batch_all", "semi_hard"]
DIST = ["euclidean", "squared", "cosine"]
CPU_BACKENDS = ["blockwise", "dense"]
MARGIN = 0.5
DTYPES_16 = [torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------------------------
# References (float64, from the definitions; no code shared with csrc_triton)
# ----------------------------------------------------------------------------------------------
def ref_distances(x: torch.Tensor, distance: str) -> torch.Tensor:
    """(N, N) from row differences; torch's norm gives gradient 0 at 0 (the diagonal)."""
    if distance == "cosine":
        u = F.normalize(x, dim=1)
        return 1.0 - u @ u.T
    diff = x[:, None, :] - x[None, :, :]
    if distance == "squared":
        return (diff * diff).sum(-1)
    return torch.linalg.vector_norm(diff, dim=-1)


def ref_triplet(x, labels, *, mining, distance, margin=MARGIN, soft=False, reduction="mean"):
    d = ref_distances(x, distance)
    n = x.shape[0]
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool)
    pos, neg = same & ~eye, ~same

    def hinge(dp, dn):
        return F.softplus(dp - dn) if soft else torch.relu(dp - dn + margin)

    if mining == "batch_hard":
        per = []
        for a in range(n):
            if pos[a].any() and neg[a].any():
                per.append(hinge(d[a][pos[a]].max(), d[a][neg[a]].min()))
            else:
                per.append(d.new_zeros(()))  # left out of the mean; 0 in "none"
        per = torch.stack(per)
        count = (pos.any(1) & neg.any(1)).sum()
    elif mining == "batch_all":
        # every (a, p, n); mean over the triplets with a positive loss
        z = d[:, :, None] - d[:, None, :] + margin
        valid = pos[:, :, None] & neg[:, None, :]
        z = torch.where(valid, z, torch.zeros_like(z))
        per = torch.relu(z).sum(dim=(1, 2))
        count = (valid & (z > 0)).sum()
    else:
        per = []
        for a in range(n):
            for p in range(n):
                if not pos[a, p]:
                    continue
                farther = neg[a] & (d[a] > d[a, p])
                dn = d[a][farther].min() if farther.any() else d[a][neg[a]].max()
                per.append(hinge(d[a, p], dn))
        per = torch.stack(per)
        count = per.shape[0]
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / max(int(count), 1)


def make_batch(n, d, n_classes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(dtype)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    labels[:2] = labels[2]  # at least one positive pair
    return x, labels


def run(x, labels, backend, *, upstream=None, **kw):
    """Loss and gradient under poisoned outputs; ``upstream`` weights a "none" loss."""
    xi = x.clone().requires_grad_()
    with poison_outputs():
        loss = triplet_margin(xi, labels, backend=backend, **kw)
        total = loss if upstream is None else (loss * upstream.to(loss.dtype)).sum()
        (grad,) = torch.autograd.grad(total, [xi])
    return loss.detach(), grad


def reference(x, labels, *, upstream=None, dtype=torch.float64, **kw):
    xi = x.to(dtype).clone().requires_grad_()
    loss = ref_triplet(xi, labels, **kw)
    total = loss if upstream is None else (loss * upstream.to(loss.dtype)).sum()
    (grad,) = torch.autograd.grad(total, [xi])
    return loss.detach(), grad


def n_items(x, labels, kw):
    """Length of the "none" output (anchors, or positive pairs for semi_hard)."""
    return ref_triplet(x.double(), labels, **ref_kwargs(kw)).shape[0]


def soft_cases():
    for mining in MININGS:
        for soft in (False, True):
            if soft and mining == "batch_all":
                continue
            yield mining, soft


def kwargs_for(mining, distance, soft, reduction):
    kw = dict(mining=mining, distance=distance, soft=soft, reduction=reduction)
    if not soft:
        kw["margin"] = MARGIN
    return kw


def ref_kwargs(kw):
    out = dict(kw)
    out.setdefault("margin", MARGIN)
    return out


def check(loss, grad, x, labels, kw, upstream, dtype):
    ref_loss, ref_grad = reference(x, labels, upstream=upstream, **ref_kwargs(kw))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == ref_loss.shape
    # forward: fp32 accumulation whatever the input dtype (inputs are the same rounded values)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    assert grad.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        gtol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(grad.double(), ref_grad, rtol=gtol, atol=gtol * ref_grad.abs().max().item())
    else:
        # no worse than PyTorch itself in that dtype (Cut Cross-Entropy's rule), plus the one
        # unavoidable rounding of the result to the dtype (eps |g|) and a tiny absolute floor
        _, same_dtype = reference(x, labels, upstream=upstream, dtype=dtype, **ref_kwargs(kw))
        eps = torch.finfo(dtype).eps
        budget = (ref_grad - same_dtype.double()).abs() + eps * ref_grad.abs() + 1e-6 * ref_grad.abs().max()
        excess = (grad.double() - ref_grad).abs() - budget
        assert excess.max() <= 0, f"gradient worse than torch in {dtype} by {excess.max().item():.3g}"


# ----------------------------------------------------------------------------------------------
# Values and gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *DTYPES_16], ids=str)
@pytest.mark.parametrize("distance", DIST)
@pytest.mark.parametrize("mining,soft", list(soft_cases()))
def test_cpu_backends_none_with_upstream(backend, dtype, distance, mining, soft, monkeypatch):
    monkeypatch.setattr(distances, "BLOCK_ROWS", 7)  # many blocks, a ragged last one
    x, labels = make_batch(23, 6, 5, dtype)
    kw = kwargs_for(mining, distance, soft, "none")
    n_out = n_items(x, labels, kw)
    upstream = torch.randn(n_out)
    loss, grad = run(x, labels, backend, upstream=upstream, **kw)
    check(loss, grad, x, labels, kw, upstream, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mining,soft", list(soft_cases()))
@pytest.mark.parametrize("n_classes", [4, 2], ids=["small-classes", "large-classes"])
def test_cpu_backends_reductions(backend, reduction, mining, soft, n_classes):
    # 2 classes of about 10: the blockwise backend's binary search (K > 8) instead of compares
    x, labels = make_batch(19, 5, n_classes, torch.float32, seed=1)
    kw = kwargs_for(mining, "euclidean", soft, reduction)
    loss, grad = run(x, labels, backend, **kw)
    check(loss, grad, x, labels, kw, None, torch.float32)


@pytest.mark.parametrize("distance", DIST)
@pytest.mark.parametrize("mining,soft", list(soft_cases()))
def test_triton_fp32(distance, mining, soft):
    x, labels = make_batch(37, 20, 7, torch.float32, seed=2)
    kw = kwargs_for(mining, distance, soft, "none")
    upstream = torch.randn(n_items(x, labels, kw))
    loss, grad = run(x, labels, "triton", upstream=upstream, **kw)
    check(loss, grad, x, labels, kw, upstream, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES_16, ids=str)
@pytest.mark.parametrize("mining", MININGS)
def test_triton_16bit(dtype, mining):
    x, labels = make_batch(29, 24, 6, dtype, seed=3)
    kw = kwargs_for(mining, "euclidean", False, "mean")
    loss, grad = run(x, labels, "triton", **kw)
    check(loss, grad, x, labels, kw, None, dtype)


@pytest.mark.parametrize("backend", ["triton", "blockwise"])
@pytest.mark.parametrize("mining", MININGS)
def test_multi_tile_130x70_classes(backend, mining, monkeypatch):
    """130 rows, 70 classes (many anchors without a positive): several 64-wide Triton tiles
    with ragged edges, several blockwise blocks; D = 70 spans two 64-wide D chunks."""
    monkeypatch.setattr(distances, "BLOCK_ROWS", 48)
    x, labels = make_batch(130, 70, 70, torch.float32, seed=4)
    kw = kwargs_for(mining, "euclidean", False, "none")
    upstream = torch.randn(n_items(x, labels, kw))
    loss, grad = run(x, labels, backend, upstream=upstream, **kw)
    check(loss, grad, x, labels, kw, upstream, torch.float32)


# ----------------------------------------------------------------------------------------------
# Semantics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
def test_anchors_without_positive_are_left_out(backend):
    """batch_hard's mean is over anchors with a positive and a negative; "none" gives 0."""
    x, _ = make_batch(6, 4, 2, torch.float32)
    labels = torch.tensor([0, 0, 1, 2, 3, 3])
    per = triplet_margin(x, labels, margin=MARGIN, reduction="none", backend=backend)
    assert per[2] == 0 and per[3] == 0
    mean = triplet_margin(x, labels, margin=MARGIN, backend=backend)
    torch.testing.assert_close(mean, per.sum() / 4)


def test_batch_all_without_active_triplet_is_zero():
    """Well separated classes: no triplet has a positive loss, mean is 0 (not NaN) and the
    gradient is 0."""
    x = torch.tensor([[0.0, 0.0], [0.01, 0.0], [10.0, 0.0], [10.01, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    for backend in CPU_BACKENDS + ["triton"]:
        loss = triplet_margin(x, labels, mining="batch_all", margin=0.1, backend=backend)
        (g,) = torch.autograd.grad(loss, [x])
        assert loss.item() == 0.0 and torch.all(g == 0)


def test_semi_hard_margin_is_not_part_of_the_choice():
    """TF Addons picks the nearest negative with d_an > d_ap (no margin), so a negative in
    (d_ap, d_ap + margin) is still chosen; with none farther, the farthest negative."""
    # 1-D: anchor 0 at 0, its positive at 1, negatives at 1.5 and 3 (and the reverse pairs)
    x = torch.tensor([[0.0], [1.0], [1.5], [3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    per = triplet_margin(x, labels, mining="semi_hard", margin=1.0, reduction="none", backend="blockwise")
    # pairs in order (0,1), (1,0), (2,3), (3,2):
    #  (0,1): d_ap = 1, negatives at 1.5 and 3 -> 1.5 (inside the margin): relu(1 - 1.5 + 1) = 0.5
    #  (1,0): d_ap = 1, negatives at 0.5, 2 -> 2: relu(1 - 2 + 1) = 0
    #  (2,3): d_ap = 1.5, negatives at 1.5, 0.5: none farther -> farthest 1.5: relu(1.5 - 1.5 + 1) = 1
    #  (3,2): d_ap = 1.5, negatives at 3, 2 -> 2: relu(1.5 - 2 + 1) = 0.5
    torch.testing.assert_close(per, torch.tensor([0.5, 0.0, 1.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("mining", MININGS)
def test_nan_input_gives_nan(backend, mining):
    x, labels = make_batch(12, 4, 3, torch.float32, seed=5)
    x[5, 1] = float("nan")
    xi = x.clone().requires_grad_()
    loss = triplet_margin(xi, labels, mining=mining, margin=MARGIN, backend=backend)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(xi.grad).any()


def test_module_and_composite_op_match_the_function():
    x, labels = make_batch(17, 5, 4, torch.float32, seed=6)
    for mining in MININGS:
        f = triplet_margin(x, labels, mining=mining, margin=0.3, distance="cosine", backend="blockwise")
        m = TripletMarginLoss(mining=mining, margin=0.3, distance="cosine", backend="blockwise")(x, labels)
        o = torch.ops.contrastive.triplet_margin(x, labels, 0.3, mining, "cosine", False, "mean", "blockwise")
        assert torch.equal(f, m) and torch.equal(f, o)
    assert "semi_hard" in repr(TripletMarginLoss(mining="semi_hard"))


def test_auto_backend_is_blockwise_on_cpu():
    x, labels = make_batch(15, 4, 3, torch.float32, seed=7)
    assert torch.equal(triplet_margin(x, labels), triplet_margin(x, labels, backend="blockwise"))


# ----------------------------------------------------------------------------------------------
# pytorch-metric-learning (the peer the benchmark compares against)
# ----------------------------------------------------------------------------------------------
def test_matches_pytorch_metric_learning_batch_hard():
    """PML's TripletMarginLoss + BatchHardMiner with an unnormalised L2 distance and a
    MeanReducer is batch-hard's mean. (PML's defaults differ: LpDistance normalises the
    embeddings, and AvgNonZeroReducer averages over the non-zero triplets only.)"""
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances as pdist
    from pytorch_metric_learning import losses, miners, reducers

    x, labels = make_batch(40, 8, 6, torch.float32, seed=8)
    dist = pdist.LpDistance(normalize_embeddings=False)
    xp = x.clone().requires_grad_()
    triplets = miners.BatchHardMiner(distance=dist)(xp, labels)
    ref = losses.TripletMarginLoss(margin=MARGIN, distance=dist, reducer=reducers.MeanReducer())(xp, labels, triplets)
    ref.backward()
    loss, grad = run(x, labels, "blockwise", margin=MARGIN)
    assert pml is not None
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, xp.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(margin=-0.1), ValueError, "margin"),
        (dict(margin=float("nan")), ValueError, "margin"),
        (dict(margin="1"), TypeError, "margin"),
        (dict(mining="hardest"), ValueError, "mining='hardest'"),
        (dict(distance="manhattan"), ValueError, "distance='manhattan'"),
        (dict(soft=True, margin=0.2), ValueError, "soft=True with margin=0.2"),
        (dict(soft=True, mining="batch_all"), ValueError, "batch_all"),
        (dict(soft=1), TypeError, "soft"),
        (dict(reduction="avg"), ValueError, "reduction='avg'"),
        (dict(backend="cuda"), ValueError, "backend='cuda'"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    x, labels = make_batch(8, 3, 2, torch.float32)
    with pytest.raises(exc, match=match):
        triplet_margin(x, labels, **kwargs)


def test_bad_inputs():
    x, labels = make_batch(8, 3, 2, torch.float32)
    with pytest.raises(TypeError, match="embeddings must be a torch.Tensor"):
        triplet_margin(x.tolist(), labels)
    with pytest.raises(ValueError, match=r"embeddings must have shape \(N, D\)"):
        triplet_margin(x[None], labels)
    with pytest.raises(TypeError, match="float32, bfloat16, float16 or float64"):
        triplet_margin(x.to(torch.int32), labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(8,\)"):
        triplet_margin(x, labels[:5])
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        triplet_margin(x, labels.float())
    with pytest.raises(ValueError, match="no anchor has a positive"):
        triplet_margin(x, torch.arange(8))
    with pytest.raises(ValueError, match="no\\s+anchor has a negative"):
        triplet_margin(x, torch.zeros(8, dtype=torch.long))
    with pytest.raises(TypeError, match="float64"):
        triplet_margin(x.double(), labels, backend="triton")
