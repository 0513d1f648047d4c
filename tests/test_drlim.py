"""DrLIM (Hadsell, Chopra and LeCun 2006) against a float64 reference written from the
definition: every ordered pair i != j, y_ij d^2 / 2 + (1 - y_ij) relu(margin - d)^2 / 2 with d
the Euclidean distance of the rows, averaged over the N (N - 1) pairs.
"""
from __future__ import annotations

import math

import pytest
import torch

from csrc_triton import distances
from csrc_triton._alloc import poison_outputs
from csrc_triton.triplet import DrLIMLoss, drlim

CPU_BACKENDS = ["blockwise", "dense"]
# the blockwise backend lists the pairs within the margin when few (sparse) or runs dense blocks
BLOCKWISE_PATHS = {"sparse": 1, "dense": 10**15}
DTYPES_16 = [torch.bfloat16, torch.float16]


def ref_drlim(x, labels, margin=1.0, reduction="mean"):
    n = x.shape[0]
    diff = x[:, None, :] - x[None, :, :]
    d = torch.linalg.vector_norm(diff, dim=-1)  # gradient 0 at d = 0 (torch's convention)
    same = (labels[:, None] == labels[None, :]).to(x.dtype)
    off_diagonal = 1.0 - torch.eye(n, dtype=x.dtype)
    pair = same * (diff * diff).sum(-1) / 2 + (1 - same) * torch.relu(margin - d) ** 2 / 2
    per_anchor = (pair * off_diagonal).sum(dim=1)
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor.sum() / (n * (n - 1))


def make_batch(n, d, n_classes, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    # rows at distances around the margin: both halves of the loss are active
    x = (scale * torch.randn(n, d, generator=g) / math.sqrt(d)).to(dtype)
    return x, torch.randint(0, n_classes, (n,), generator=g)


def run(x, labels, backend, upstream=None, **kw):
    xi = x.clone().requires_grad_()
    with poison_outputs():
        loss = drlim(xi, labels, backend=backend, **kw)
        total = loss if upstream is None else (loss * upstream.to(loss.dtype)).sum()
        (grad,) = torch.autograd.grad(total, [xi])
    return loss.detach(), grad


def reference(x, labels, upstream=None, dtype=torch.float64, **kw):
    xi = x.to(dtype).clone().requires_grad_()
    loss = ref_drlim(xi, labels, **kw)
    total = loss if upstream is None else (loss * upstream.to(loss.dtype)).sum()
    (grad,) = torch.autograd.grad(total, [xi])
    return loss.detach(), grad


def check(x, labels, loss, grad, dtype, upstream=None, **kw):
    ref_loss, ref_grad = reference(x, labels, upstream, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    assert grad.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        gtol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(grad.double(), ref_grad, rtol=gtol, atol=gtol * ref_grad.abs().max().item())
    else:
        _, same_dtype = reference(x, labels, upstream, dtype=dtype, **kw)
        budget = (
            (ref_grad - same_dtype.double()).abs()
            + torch.finfo(dtype).eps * ref_grad.abs()
            + 1e-6 * ref_grad.abs().max()
        )
        excess = (grad.double() - ref_grad).abs() - budget
        assert excess.max() <= 0, f"gradient worse than torch in {dtype} by {excess.max().item():.3g}"


@pytest.mark.parametrize("backend", ["blockwise-sparse", "blockwise-dense", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *DTYPES_16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cpu_backends(backend, dtype, reduction, monkeypatch):
    monkeypatch.setattr(distances, "BLOCK_ROWS", 6)
    backend, _, path = backend.partition("-")
    if path:
        monkeypatch.setattr(distances, "SPARSE_FRACTION", BLOCKWISE_PATHS[path])
    x, labels = make_batch(25, 7, 4, dtype)
    upstream = torch.randn(25) if reduction == "none" else None
    loss, grad = run(x, labels, backend, upstream, margin=1.2, reduction=reduction)
    check(x, labels, loss, grad, dtype, upstream, margin=1.2, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, *DTYPES_16], ids=str)
def test_triton(dtype):
    x, labels = make_batch(41, 20, 5, dtype, seed=1)
    upstream = torch.randn(41)
    loss, grad = run(x, labels, "triton", upstream, margin=1.2, reduction="none")
    check(x, labels, loss, grad, dtype, upstream, margin=1.2, reduction="none")


@pytest.mark.parametrize("backend", ["triton", "blockwise"])
def test_multi_tile_130x70_classes(backend, monkeypatch):
    # rows spread so that some blocks list their few near pairs and others run dense
    monkeypatch.setattr(distances, "SPARSE_FRACTION", 4)
    """130 rows in 70 classes, D = 70 (two output-D chunks of the Triton backward)."""
    monkeypatch.setattr(distances, "BLOCK_ROWS", 48)
    x, labels = make_batch(130, 70, 70, torch.float32, seed=2)
    upstream = torch.randn(130)
    loss, grad = run(x, labels, backend, upstream, margin=1.3, reduction="none")
    check(x, labels, loss, grad, torch.float32, upstream, margin=1.3, reduction="none")


@pytest.fixture(params=["blockwise-sparse", "blockwise-dense", "dense", "triton"])
def any_backend(request, monkeypatch):
    backend, _, path = request.param.partition("-")
    if path:
        monkeypatch.setattr(distances, "SPARSE_FRACTION", BLOCKWISE_PATHS[path])
    return backend


def test_coincident_dissimilar_rows_have_zero_gradient(any_backend):
    backend = any_backend
    """d = 0 between rows of different labels: the loss is margin^2 / 2 per ordered pair and
    the gradient is 0 (torch's norm convention), not NaN or inf."""
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 2, 2])
    loss = drlim(x, labels, margin=2.0, reduction="sum", backend=backend)
    (g,) = torch.autograd.grad(loss, [x])
    torch.testing.assert_close(loss, torch.tensor(4.0))  # two ordered pairs at d = 0: 2 * 2^2 / 2
    assert torch.all(g == 0)


def test_margin_zero_keeps_only_the_similar_half(any_backend):
    backend = any_backend
    x, labels = make_batch(16, 5, 3, torch.float32, seed=3)
    loss, grad = run(x, labels, backend, margin=0.0)
    check(x, labels, loss, grad, torch.float32, margin=0.0)


def test_nan_input_gives_nan(any_backend):
    backend = any_backend
    x, labels = make_batch(12, 4, 3, torch.float32, seed=4)
    x[3, 0] = float("nan")
    loss, grad = run(x, labels, backend)
    assert torch.isnan(loss)
    assert torch.isnan(grad).any()


def test_module_and_composite_op():
    x, labels = make_batch(20, 6, 3, torch.float32, seed=5)
    f = drlim(x, labels, margin=0.7, backend="blockwise")
    assert torch.equal(DrLIMLoss(margin=0.7, backend="blockwise")(x, labels), f)
    assert torch.equal(torch.ops.contrastive.drlim(x, labels, 0.7, "mean", "blockwise"), f)


def test_matches_pytorch_metric_learning_contrastive_loss():
    """PML's ContrastiveLoss(pos_margin=0, neg_margin=m) with an unnormalised L2 distance gives
    per pair d (similar) and relu(m - d) (dissimilar), unsquared, averaged over the non-zero
    pairs by default. With a DoNothingReducer its per-pair terms, squared, halved and summed
    over N (N - 1), are DrLIM's loss."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances as pdist
    from pytorch_metric_learning import losses, reducers

    x, labels = make_batch(30, 6, 4, torch.float32, seed=6)
    xp = x.clone().requires_grad_()
    terms = losses.ContrastiveLoss(
        pos_margin=0.0, neg_margin=1.1, distance=pdist.LpDistance(normalize_embeddings=False),
        reducer=reducers.DoNothingReducer(),
    )(xp, labels)
    pos, neg = terms["pos_loss"]["losses"], terms["neg_loss"]["losses"]
    assert pos.numel() + neg.numel() == 30 * 29  # every ordered pair i != j
    ref = ((pos**2).sum() + (neg**2).sum()) / 2 / (30 * 29)
    ref.backward()
    loss, grad = run(x, labels, "blockwise", margin=1.1)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, xp.grad, rtol=1e-4, atol=1e-7)


def test_validation():
    x, labels = make_batch(8, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="margin must be finite and >= 0"):
        drlim(x, labels, margin=-1.0)
    with pytest.raises(TypeError, match="margin"):
        drlim(x, labels, margin=None)
    with pytest.raises(ValueError, match="at least 2 rows"):
        drlim(x[:1], labels[:1])
    with pytest.raises(ValueError, match="reduction='mean '"):
        drlim(x, labels, reduction="mean ")
    with pytest.raises(ValueError, match=r"labels must have shape \(8,\)"):
        drlim(x, labels[None])
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        drlim(x, labels.bool())
    with pytest.raises(TypeError, match="float64"):
        drlim(x.double(), labels, backend="triton")


def test_rows_without_a_close_dissimilar_pair(any_backend, monkeypatch):
    """Clusters far apart (beyond the margin) with mixed labels inside, plus isolated rows: the
    blockwise backend skips the rows with no dissimilar pair within the margin and processes
    the others (as lists or dense); values and gradients as the reference."""
    monkeypatch.setattr(distances, "BLOCK_ROWS", 5)
    g = torch.Generator().manual_seed(7)
    centers = 10.0 * torch.arange(6, dtype=torch.float32)[:, None] * torch.ones(1, 3)
    which = torch.randint(0, 6, (23,), generator=g)
    x = centers[which] + 0.4 * torch.randn(23, 3, generator=g)
    x[:4] = 100.0 + 10.0 * torch.arange(4, dtype=torch.float32)[:, None]  # isolated rows
    labels = torch.randint(0, 3, (23,), generator=g)
    upstream = torch.randn(23, generator=g)
    loss, grad = run(x, labels, any_backend, upstream, margin=1.0, reduction="none")
    check(x, labels, loss, grad, torch.float32, upstream, margin=1.0, reduction="none")
