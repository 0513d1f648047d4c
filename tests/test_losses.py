"""Accuracy of the public contrastive losses (InfoNCE / MoCo, CLIP, NT-Xent, SupCon) against the
float64 dense references in ``tests/reference.py``, and where NaN must and must not appear.

Acceptance rule (``reference.check_loss``, after Cut Cross-Entropy): for the loss and every
gradient, elementwise, |truth - out| <= |truth - torch| + tol, where truth is the reference in
float64 on the same (already rounded) inputs and torch is the same reference in the dtype under
test for 16-bit feature gradients, in float32 for the loss value and scalar-parameter gradients
(both accumulated in float32 whatever the feature dtype). Every call runs with the backends'
outputs poisoned with NaN and backpropagates a random upstream gradient.

The NaN and metric losses (NCA, N-pair, uniformity) are in ``test_metric_losses.py``.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn as nn

import csrc_triton
from csrc_triton._testing import blockwise_rows, poison_outputs

import reference as R
from reference import check_loss, clip_loss_ref, info_nce_ref, nt_xent_ref, supcon_ref
from reference import param_id as _id

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU_BACKENDS = ["dense", "blockwise"]
ALL_BACKENDS = ["dense", "blockwise", "triton"]

# (N, D): deliberately unaligned, a single row and a single feature included.
CPU_SHAPES = [(1, 3), (7, 1), (7, 60), (129, 130), (257, 60)]
# Triton runs through the interpreter (16 x 16 tiles, D in chunks of 32 / 64), so few cases:
# one tiny float32, one 16-bit spanning a few tiles, one 130 x 70 multi-tile (ragged everywhere).
TRITON_CASES = [(torch.float32, (7, 1)), (torch.float16, (37, 70)), (torch.bfloat16, (130, 70))]
# losses over the 2N views of N pairs: 65 pairs give the 130 rows
TRITON_PAIR_CASES = [(torch.float32, (7, 1)), (torch.float16, (19, 70)), (torch.bfloat16, (65, 70))]


def _cases(cpu_shapes, triton_cases):
    out = []
    for backend in CPU_BACKENDS:
        for dtype in DTYPES:
            for shape in cpu_shapes:
                out.append(pytest.param(backend, dtype, shape, id=f"{backend}-{_id(dtype)}-{_id(shape)}"))
    for dtype, shape in triton_cases:
        out.append(pytest.param("triton", dtype, shape, id=f"triton-{_id(dtype)}-{_id(shape)}"))
    return out


def _pairs(n, d, dtype, *, corr=0.8, normalized=False):
    """Query/key pairs with correlated positives, dot products of order 1."""
    q = torch.randn(n, d)
    k = corr * q + (1 - corr**2) ** 0.5 * torch.randn(n, d)
    if normalized:
        q = q / q.norm(dim=1, keepdim=True)
        k = k / k.norm(dim=1, keepdim=True)
    else:
        q, k = q / d**0.5, k / d**0.5
    return q.to(dtype), k.to(dtype)


def _temperature(value, as_tensor):
    return torch.tensor(value, dtype=torch.float32) if as_tensor else value


# ----------------------------------------------------------------------------------------------
# InfoNCE and MoCo
# ----------------------------------------------------------------------------------------------
def _info_nce_impl(backend, **opts):
    def f(query, key, temperature, queue=None):
        return csrc_triton.info_nce(query, key, temperature=temperature, queue=queue, backend=backend, **opts)

    return f


def _info_nce_ref(**opts):
    def f(query, key, temperature, queue=None):
        return info_nce_ref(query, key, temperature=temperature, queue=queue, **opts)

    return f


@pytest.mark.parametrize("backend,dtype,shape", _cases(CPU_SHAPES, TRITON_CASES))
def test_info_nce_per_query(backend, dtype, shape):
    n, d = shape
    q, k = _pairs(n, d, dtype)
    args = dict(query=q, key=k, temperature=_temperature(0.1, True))
    out = check_loss(_info_nce_impl(backend, reduction="none"), _info_nce_ref(reduction="none"), args,
                     ["query", "key", "temperature"], dtype)
    assert out.shape == (n,)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_info_nce_reduced_float_temperature(backend, reduction, dtype):
    if backend == "triton" and (reduction == "sum" or dtype != torch.float32):
        pytest.skip("interpreter time: covered on the CPU backends")
    q, k = _pairs(37, 19, dtype)
    check_loss(_info_nce_impl(backend, reduction=reduction), _info_nce_ref(reduction=reduction),
               dict(query=q, key=k, temperature=0.07), ["query", "key"], dtype)


def _moco_cases():
    out = []
    for backend in CPU_BACKENDS:
        for dtype in DTYPES:
            for in_batch in (False, True):
                for reduction in ("none", "mean"):
                    out.append(pytest.param(backend, dtype, in_batch, reduction, (23, 40, 301),
                                            id=f"{backend}-{_id(dtype)}-inbatch{in_batch}-{reduction}"))
    out.append(pytest.param("triton", torch.float32, False, "none", (9, 24, 50), id="triton-float32-moco"))
    out.append(pytest.param("triton", torch.bfloat16, True, "none", (9, 24, 50), id="triton-bfloat16-inbatch"))
    # multi-tile: 130 queries against a queue of 70 (queue tiles ragged) in 70 dimensions
    out.append(pytest.param("triton", torch.bfloat16, False, "mean", (130, 70, 70), id="triton-bfloat16-moco-130"))
    return out


@pytest.mark.parametrize("backend,dtype,in_batch_negatives,reduction,shape", _moco_cases())
def test_moco_queue(backend, dtype, in_batch_negatives, reduction, shape):
    n, d, m = shape
    q, k = _pairs(n, d, dtype)
    queue = (torch.randn(m, d) / d**0.5).to(dtype)
    args = dict(query=q, key=k, temperature=_temperature(0.2, True), queue=queue)
    check_loss(_info_nce_impl(backend, reduction=reduction, in_batch_negatives=in_batch_negatives),
               _info_nce_ref(reduction=reduction, in_batch_negatives=in_batch_negatives),
               args, ["query", "key", "queue", "temperature"], dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_moco_is_exactly_moco(backend):
    """queue=q, in_batch_negatives=False is MoCo's loss as its paper's pseudocode writes it:
    logits [q_i.k_i, q_i.queue_j ...] / t, cross-entropy with target 0."""
    n, d, m = 6, 8, 20
    q = nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    k = nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    queue = nn.functional.normalize(torch.randn(m, d, dtype=torch.float64), dim=1)
    t = 0.07
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,kc->nk", q, queue)
    logits = torch.cat([l_pos, l_neg], dim=1) / t
    expected = nn.functional.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
    got = csrc_triton.info_nce(q.float(), k.float(), temperature=t, queue=queue.float(), in_batch_negatives=False,
                               backend=backend)
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", ["blockwise", "triton"])
@pytest.mark.parametrize("in_batch_negatives", [False, True])
def test_moco_frozen_queue_gets_no_gradient(backend, in_batch_negatives, monkeypatch):
    """A queue that does not require grad gets none, and the backend is never asked for the
    queue's dk (its GEMM is skipped); the in-batch keys still get theirs."""
    from csrc_triton import backend as registry

    module = registry.load(backend)
    calls = []
    original = module.lse_backward

    def spy(q, k, *args, **kwargs):
        calls.append((k.shape[0], kwargs["needs_dk"]))
        return original(q, k, *args, **kwargs)

    monkeypatch.setattr(module, "lse_backward", spy)
    q, k = _pairs(9, 12, torch.float32)
    q.requires_grad_()
    k.requires_grad_()
    queue = torch.randn(31, 12) / 12**0.5
    loss = csrc_triton.info_nce(q, k, temperature=0.2, queue=queue, in_batch_negatives=in_batch_negatives,
                                backend=backend)
    loss.backward()
    assert queue.grad is None
    assert q.grad is not None and k.grad is not None and torch.isfinite(k.grad).all() and k.grad.abs().sum() > 0
    queue_calls = [needs_dk for rows, needs_dk in calls if rows == 31]
    assert queue_calls == [False], calls
    if in_batch_negatives:
        assert [needs_dk for rows, needs_dk in calls if rows == 9] == [True], calls


@pytest.mark.parametrize("backend,dtype,n", [
    *[pytest.param(b, dt, 131, id=f"{b}-{_id(dt)}") for b in CPU_BACKENDS for dt in DTYPES],
    pytest.param("triton", torch.float32, 21, id="triton-float32"),
    pytest.param("triton", torch.bfloat16, 130, id="triton-bfloat16-130"),
])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_info_nce_symmetric(backend, dtype, n, reduction):
    if backend == "triton" and reduction != "none":
        pytest.skip("interpreter time: reductions are covered on the CPU backends")
    d = 70 if n == 130 else 33
    q, k = _pairs(n, d, dtype)
    args = dict(query=q, key=k, temperature=_temperature(0.1, True))
    out = check_loss(_info_nce_impl(backend, reduction=reduction, symmetric=True),
                     _info_nce_ref(reduction=reduction, symmetric=True), args, ["query", "key", "temperature"], dtype)
    if reduction == "none":
        assert out.shape == (n,)


@pytest.mark.parametrize("backend", ["blockwise", "triton"])
@pytest.mark.parametrize("which", ["query", "key", "temperature", "query+key"])
def test_info_nce_partial_requires_grad(backend, which):
    """MoCo detaches its keys: every combination of which inputs want gradients."""
    q, k = _pairs(11, 16, torch.float32)
    args = dict(query=q, key=k, temperature=_temperature(0.1, True))
    check_loss(_info_nce_impl(backend, reduction="none", symmetric=True),
               _info_nce_ref(reduction="none", symmetric=True), args, which.split("+"), torch.float32)


def test_info_nce_default_temperature():
    q, k = _pairs(10, 8, torch.float32)
    got = csrc_triton.info_nce(q, k)
    expected = info_nce_ref(q.double(), k.double(), temperature=0.07)
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=2e-6)


def test_info_nce_no_normalisation_inside():
    """Scaling the query by 3 must change the loss (logits are q @ k.T / t as given)."""
    q, k = _pairs(10, 8, torch.float32)
    a = csrc_triton.info_nce(q, k, temperature=0.5, backend="blockwise")
    b = csrc_triton.info_nce(3 * q, k, temperature=0.5, backend="blockwise")
    expected = info_nce_ref(3 * q.double(), k.double(), temperature=0.5)
    torch.testing.assert_close(b.double(), expected, rtol=2e-6, atol=2e-6)
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------
def _clip_impl(backend):
    def f(image_features, text_features, logit_scale):
        return csrc_triton.clip_loss(image_features, text_features, logit_scale, backend=backend)

    return f


@pytest.mark.parametrize("backend,dtype,shape", _cases(CPU_SHAPES, TRITON_CASES))
def test_clip_loss(backend, dtype, shape):
    n, d = shape
    a, b = _pairs(n, d, dtype, normalized=True)
    args = dict(image_features=a, text_features=b, logit_scale=torch.tensor(14.3))
    out = check_loss(_clip_impl(backend), clip_loss_ref, args, ["image_features", "text_features", "logit_scale"],
                     dtype)
    assert out.shape == ()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_clip_loss_float_logit_scale(backend):
    a, b = _pairs(19, 12, torch.float32, normalized=True)
    check_loss(_clip_impl(backend), clip_loss_ref, dict(image_features=a, text_features=b, logit_scale=10.0),
               ["image_features", "text_features"], torch.float32)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
def test_clip_loss_large_logit_scale_low_precision(backend, dtype):
    """logit_scale = 100 (CLIP's clamp) in bf16/fp16: finite and no worse than torch."""
    n = 24 if backend == "triton" else 200
    a, b = _pairs(n, 64, dtype, normalized=True, corr=0.5)
    args = dict(image_features=a, text_features=b, logit_scale=torch.tensor(100.0))
    out = check_loss(_clip_impl(backend), clip_loss_ref, args, ["image_features", "text_features", "logit_scale"],
                     dtype)
    assert torch.isfinite(out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clip_is_symmetric_info_nce(backend):
    a, b = _pairs(30, 16, torch.float32, normalized=True)
    c = csrc_triton.clip_loss(a, b, torch.tensor(20.0), backend=backend)
    s = csrc_triton.info_nce(a, b, temperature=1 / 20.0, symmetric=True, backend=backend)
    torch.testing.assert_close(c, s, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# NT-Xent
# ----------------------------------------------------------------------------------------------
def _nt_xent_impl(backend, **opts):
    def f(z1, z2, temperature):
        return csrc_triton.nt_xent(z1, z2, temperature=temperature, backend=backend, **opts)

    return f


def _nt_xent_ref(**opts):
    def f(z1, z2, temperature):
        return nt_xent_ref(z1, z2, temperature=temperature, **opts)

    return f


@pytest.mark.parametrize("backend,dtype,shape", _cases(CPU_SHAPES, TRITON_PAIR_CASES))
def test_nt_xent_per_view(backend, dtype, shape):
    n, d = shape
    z1, z2 = _pairs(n, d, dtype)
    z1, z2 = 2 * z1, 2 * z2  # unnormalised inputs; the loss normalises them
    args = dict(z1=z1, z2=z2, temperature=_temperature(0.5, True))
    # the normalised rows are rounded to the input dtype before the tiles: the dtype's rule
    out = check_loss(_nt_xent_impl(backend, reduction="none"), _nt_xent_ref(reduction="none"), args,
                     ["z1", "z2", "temperature"], dtype, accumulated=False, normalized=True)
    assert out.shape == (2 * n,)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("normalize", [True, False])
def test_nt_xent_mean(backend, dtype, normalize):
    if backend == "triton" and (normalize or dtype == torch.float16):
        pytest.skip("interpreter time: covered by test_nt_xent_per_view and the CPU backends")
    n, d = (23, 17) if backend == "triton" else (150, 17)
    z1, z2 = _pairs(n, d, dtype)
    check_loss(_nt_xent_impl(backend, normalize=normalize), _nt_xent_ref(normalize=normalize),
               dict(z1=z1, z2=z2, temperature=0.3), ["z1", "z2"], dtype, accumulated=not normalize,
               normalized=normalize)


def test_nt_xent_default_temperature_and_sum():
    z1, z2 = _pairs(12, 8, torch.float32)
    got = csrc_triton.nt_xent(z1, z2)
    torch.testing.assert_close(got.double(), nt_xent_ref(z1.double(), z2.double(), temperature=0.5),
                               rtol=2e-6, atol=2e-6)
    got = csrc_triton.nt_xent(z1, z2, reduction="sum")
    torch.testing.assert_close(got.double(), nt_xent_ref(z1.double(), z2.double(), temperature=0.5, reduction="sum"),
                               rtol=2e-6, atol=2e-6)


# ----------------------------------------------------------------------------------------------
# SupCon
# ----------------------------------------------------------------------------------------------
def _supcon_impl(backend, **opts):
    def f(features, labels, temperature):
        return csrc_triton.supcon(features, labels, temperature=temperature, backend=backend, **opts)

    return f


def _supcon_ref(**opts):
    def f(features, labels, temperature):
        return supcon_ref(features, labels, temperature=temperature, **opts)

    return f


def _labels_with_singletons(n, gen_seed=7):
    """Labels where some classes appear once (anchors without positives when V = 1)."""
    g = torch.Generator().manual_seed(gen_seed)
    labels = torch.randint(0, max(1, n // 3), (n,), generator=g)
    for j in range(0, n, 4):
        labels[j] = 1000 + j  # a guaranteed singleton
    return labels


SUPCON_LAYOUTS = {
    # name: (N, V, D) with V = 0 meaning a 2-D (N, D) input
    "2d": [(7, 0, 3), (130, 0, 60), (257, 0, 130)],
    "v2": [(1, 2, 3), (64, 2, 60), (129, 2, 1)],
    "v3": [(7, 3, 130), (50, 3, 17)],
}
TRITON_SUPCON = [(torch.float32, (7, 0, 3)), (torch.float16, (19, 2, 70)), (torch.bfloat16, (65, 2, 70)),
                 (torch.float32, (7, 3, 1))]


def _supcon_cases():
    out = []
    for backend in CPU_BACKENDS:
        for dtype in DTYPES:
            for layout, shapes in SUPCON_LAYOUTS.items():
                for shape in shapes:
                    out.append(pytest.param(backend, dtype, shape, id=f"{backend}-{_id(dtype)}-{layout}-{_id(shape)}"))
    for dtype, shape in TRITON_SUPCON:
        out.append(pytest.param("triton", dtype, shape, id=f"triton-{_id(dtype)}-{_id(shape)}"))
    return out


@pytest.mark.parametrize("backend,dtype,shape", _supcon_cases())
def test_supcon(backend, dtype, shape):
    n, v, d = shape
    feats = torch.randn(n, v, d) if v else torch.randn(n, d)
    labels = _labels_with_singletons(n)
    if v == 0:
        assert (torch.bincount(labels - labels.min()) == 1).any()  # some anchors lack positives
    args = dict(features=feats.to(dtype), labels=labels, temperature=_temperature(0.1, True))
    out = check_loss(_supcon_impl(backend), _supcon_ref(), args, ["features", "temperature"], dtype,
                     accumulated=False, normalized=True)
    assert out.shape == ()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_supcon_unnormalized_float_temperature(backend, label_dtype):
    n = 30 if backend == "triton" else 90
    feats = (torch.randn(n, 2, 10) / 10**0.5).float()
    labels = torch.randint(0, 7, (n,)).to(label_dtype)
    check_loss(_supcon_impl(backend, normalize=False), _supcon_ref(normalize=False),
               dict(features=feats, labels=labels, temperature=0.2), ["features"], torch.float32)


def test_supcon_anchors_without_positive_are_left_out():
    """A singleton sample's anchor is left out of the mean, but it still serves as a negative."""
    feats = torch.randn(9, 16, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3])
    got = csrc_triton.supcon(feats.float(), labels, backend="blockwise")
    torch.testing.assert_close(got.double(), supcon_ref(feats, labels), rtol=2e-6, atol=2e-6)
    feats2 = torch.cat([feats, torch.randn(1, 16, dtype=torch.float64)])
    labels2 = torch.cat([labels, torch.tensor([9])])
    got2 = csrc_triton.supcon(feats2.float(), labels2, backend="blockwise")
    torch.testing.assert_close(got2.double(), supcon_ref(feats2, labels2), rtol=2e-6, atol=2e-6)
    assert not torch.allclose(got, got2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_supcon_distinct_labels_two_views_is_nt_xent(backend):
    """With every label distinct and V = 2, SupCon L_out is NT-Xent."""
    z = torch.randn(20, 2, 12)
    s = csrc_triton.supcon(z, torch.arange(20), temperature=0.3, backend=backend)
    x = csrc_triton.nt_xent(z[:, 0], z[:, 1], temperature=0.3, backend=backend)
    torch.testing.assert_close(s, x, rtol=1e-6, atol=1e-6)


def test_supcon_default_temperature():
    feats = torch.randn(16, 2, 8)
    labels = torch.randint(0, 4, (16,))
    got = csrc_triton.supcon(feats, labels)
    torch.testing.assert_close(got.double(), supcon_ref(feats.double(), labels, temperature=0.1), rtol=2e-6,
                               atol=2e-6)


# ----------------------------------------------------------------------------------------------
# Low temperature in bf16
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss", ["info_nce", "nt_xent", "supcon"])
def test_small_temperature_bf16(backend, loss):
    dtype = torch.bfloat16
    n = 20 if backend == "triton" else 160
    t = torch.tensor(0.01)
    if loss == "info_nce":
        q, k = _pairs(n, 32, dtype, normalized=True, corr=0.9)
        args = dict(query=q, key=k, temperature=t)
        impl, ref, names = _info_nce_impl(backend, symmetric=True), _info_nce_ref(symmetric=True), ["query", "key",
                                                                                                     "temperature"]
    elif loss == "nt_xent":
        z1, z2 = _pairs(n, 32, dtype, corr=0.9)
        args = dict(z1=z1, z2=z2, temperature=t)
        impl, ref, names = _nt_xent_impl(backend), _nt_xent_ref(), ["z1", "z2", "temperature"]
    else:
        feats = torch.randn(n, 2, 32).to(dtype)
        args = dict(features=feats, labels=torch.randint(0, 5, (n,)), temperature=t)
        impl, ref, names = _supcon_impl(backend), _supcon_ref(), ["features", "temperature"]
    out = check_loss(impl, ref, args, names, dtype, accumulated=loss == "info_nce", normalized=loss != "info_nce")
    assert torch.isfinite(out)


# ----------------------------------------------------------------------------------------------
# Blockwise with many blocks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_blockwise_many_blocks_all_losses(dtype):
    n, d = 23, 13
    q, k = _pairs(n, d, dtype)
    queue = (torch.randn(31, d) / d**0.5).to(dtype)
    t = _temperature(0.15, True)
    with blockwise_rows(5):
        check_loss(_info_nce_impl("blockwise", reduction="none"), _info_nce_ref(reduction="none"),
                   dict(query=q, key=k, temperature=t), ["query", "key", "temperature"], dtype)
        check_loss(_info_nce_impl("blockwise", reduction="none", symmetric=True),
                   _info_nce_ref(reduction="none", symmetric=True),
                   dict(query=q, key=k, temperature=t), ["query", "key", "temperature"], dtype)
        check_loss(_info_nce_impl("blockwise", reduction="none", in_batch_negatives=False),
                   _info_nce_ref(reduction="none", in_batch_negatives=False),
                   dict(query=q, key=k, temperature=t, queue=queue), ["query", "key", "queue", "temperature"], dtype)
        check_loss(_info_nce_impl("blockwise", reduction="mean"), _info_nce_ref(reduction="mean"),
                   dict(query=q, key=k, temperature=t, queue=queue), ["query", "key", "queue", "temperature"], dtype)
        check_loss(_clip_impl("blockwise"), clip_loss_ref,
                   dict(image_features=q, text_features=k, logit_scale=torch.tensor(7.0)),
                   ["image_features", "text_features", "logit_scale"], dtype)
        check_loss(_nt_xent_impl("blockwise", reduction="none"), _nt_xent_ref(reduction="none"),
                   dict(z1=q, z2=k, temperature=t), ["z1", "z2", "temperature"], dtype, accumulated=False,
                   normalized=True)
        check_loss(_supcon_impl("blockwise"), _supcon_ref(),
                   dict(features=torch.randn(n, 2, d).to(dtype), labels=_labels_with_singletons(n), temperature=t),
                   ["features", "temperature"], dtype, accumulated=False, normalized=True)
        check_loss(_supcon_impl("blockwise"), _supcon_ref(),
                   dict(features=torch.randn(n, d).to(dtype), labels=_labels_with_singletons(n), temperature=t),
                   ["features", "temperature"], dtype, accumulated=False, normalized=True)


def test_blockwise_block_size_does_not_change_result():
    q, k = _pairs(40, 9, torch.float32)
    results = []
    for rows in (None, 1, 3, 40, 1000):
        with blockwise_rows(rows) if rows else contextlib.nullcontext():
            results.append(csrc_triton.info_nce(q, k, temperature=0.1, symmetric=True, reduction="none",
                                                backend="blockwise"))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# deterministic=
# ----------------------------------------------------------------------------------------------
def _loss_calls(backend, deterministic):
    torch.manual_seed(11)  # the same inputs on every call
    n, d = 24, 20
    q, k = _pairs(n, d, torch.float32)
    queue = torch.randn(19, d) / d**0.5
    labels = _labels_with_singletons(n)
    t = torch.tensor(0.2, requires_grad=True)
    kw = dict(backend=backend, deterministic=deterministic)
    return {
        "info_nce": (lambda a, b: csrc_triton.info_nce(a, b, temperature=t, symmetric=True, **kw), (q, k)),
        "moco": (lambda a, b: csrc_triton.info_nce(a, b, temperature=t, queue=queue, **kw), (q, k)),
        "clip_loss": (lambda a, b: csrc_triton.clip_loss(a, b, 1 / t, **kw), (q, k)),
        "nt_xent": (lambda a, b: csrc_triton.nt_xent(a, b, temperature=t, **kw), (q, k)),
        "supcon": (lambda a, b: csrc_triton.supcon(torch.stack([a, b], 1), labels, temperature=t, **kw), (q, k)),
    }, t


@pytest.mark.parametrize("backend", ["blockwise", "triton"])
@pytest.mark.parametrize("loss", ["info_nce", "moco", "clip_loss", "nt_xent", "supcon"])
def test_deterministic_option(backend, loss, monkeypatch):
    """deterministic=True reaches every backward call of the backend, gives bitwise equal
    results run to run, and the same values as the default."""
    from csrc_triton import backend as registry

    module = registry.load(backend)
    flags = []
    original = module.lse_backward

    def spy(*args, **kwargs):
        flags.append(kwargs["deterministic"])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "lse_backward", spy)
    results = []
    for deterministic in (True, True, False):
        flags.clear()
        calls, t = _loss_calls(backend, deterministic)
        fn, (a, b) = calls[loss]
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = fn(a, b)
        results.append([out.detach(), *torch.autograd.grad(out, [a, b, t])])
        assert flags and all(f is deterministic for f in flags), (deterministic, flags)
    for x, y in zip(results[0], results[1]):
        assert torch.equal(x, y)
    for x, y in zip(results[0], results[2]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# NaN: where it must appear, and where it must not
# ----------------------------------------------------------------------------------------------
# With one NaN feature in row i of one input, which outputs must be NaN follows from which
# logits the row enters (S = s Q K^T, softmax over rows, column softmax for symmetric losses):
#
# info_nce, NaN in query i: S_i. is NaN, so loss_i, dq_i, every dk_j (the softmax of row i
#   reaches every key), every dqueue_j and dt are NaN; row r != i never sees q_i: loss_r and
#   dq_r stay finite.
# info_nce, NaN in key i: column i is NaN in every row, so every row's log-sum-exp is NaN:
#   everything is NaN.
# symmetric info_nce / CLIP, NaN in query i: every column log-sum-exp includes row i: all NaN.
# MoCo (no in-batch negatives), NaN in query i or key i: only row i's logits [q_i.k_i,
#   q_i.queue] are NaN: loss_i, dq_i, dk_i, every dqueue_j (row i's softmax reaches the whole
#   queue) and dt are NaN; dq_r, dk_r, loss_r (r != i) finite. NaN in queue row j: everything.
# NT-Xent and SupCon: view i is a negative of every other view: everything is NaN.
ROW = 2


def _nan_setup(loss, where, backend):
    n, d = 7, 6
    q, k = _pairs(n, d, torch.float32)
    queue = torch.randn(9, d) / d**0.5
    inputs = {"query": q, "key": k, "queue": queue}
    inputs[where] = inputs[where].clone()
    inputs[where][ROW, 3] = math.nan
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    t = torch.tensor(0.3, requires_grad=True)
    kw = dict(backend=backend, reduction="none")
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 3])
    a, b, u = leaves["query"], leaves["key"], leaves["queue"]
    fns = {
        "info_nce": lambda: csrc_triton.info_nce(a, b, temperature=t, **kw),
        "info_nce_queue": lambda: csrc_triton.info_nce(a, b, temperature=t, queue=u, **kw),
        "moco": lambda: csrc_triton.info_nce(a, b, temperature=t, queue=u, in_batch_negatives=False, **kw),
        "symmetric": lambda: csrc_triton.info_nce(a, b, temperature=t, symmetric=True, **kw),
        "clip_loss": lambda: csrc_triton.clip_loss(a, b, 1 / t, backend=backend),
        "nt_xent": lambda: csrc_triton.nt_xent(a, b, temperature=t, **kw),
        "supcon": lambda: csrc_triton.supcon(torch.stack([a, b], 1), labels, temperature=t, backend=backend),
    }
    used = {"info_nce": ("query", "key"), "symmetric": ("query", "key"), "clip_loss": ("query", "key"),
            "nt_xent": ("query", "key"), "supcon": ("query", "key")}.get(loss, ("query", "key", "queue"))
    return fns[loss], {name: leaves[name] for name in used}, t


# (loss, NaN input) -> the rows of each output that stay finite (None: every row is NaN)
NAN_CASES = {
    ("info_nce", "query"): "row-local-query",
    ("info_nce_queue", "query"): "row-local-query",
    ("info_nce", "key"): None,
    ("symmetric", "query"): None,
    ("clip_loss", "query"): None,
    ("moco", "query"): "row-local",
    ("moco", "key"): "row-local",
    ("moco", "queue"): None,
    ("nt_xent", "query"): None,
    ("nt_xent", "key"): None,
    ("supcon", "key"): None,
}


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("loss,where", list(NAN_CASES))
def test_nan_where_the_maths_says(backend, loss, where):
    if backend == "triton" and loss not in ("info_nce", "moco", "clip_loss"):
        pytest.skip("interpreter time: the same backend paths as info_nce / clip_loss")
    fn, leaves, t = _nan_setup(loss, where, backend)
    with poison_outputs():
        out = fn()
        grads = dict(zip([*leaves, "t"], torch.autograd.grad(out.sum(), [*leaves.values(), t])))
    others = torch.arange(7) != ROW
    pattern = NAN_CASES[(loss, where)]
    assert torch.isnan(grads["t"]), "the temperature's gradient must be NaN"
    if pattern is None:
        assert torch.isnan(out).all(), out
        for name, g in grads.items():
            assert torch.isnan(g).all(), f"d{name} should be NaN everywhere: {g}"
        return
    assert torch.isnan(out[ROW]) and torch.isfinite(out[others]).all(), out
    assert torch.isnan(grads["query"][ROW]).all() and torch.isfinite(grads["query"][others]).all()
    assert torch.isnan(grads["queue"]).all() if "queue" in grads else True
    if pattern == "row-local-query":  # in-batch keys: row i's softmax reaches every key
        assert torch.isnan(grads["key"]).all()
    else:  # MoCo: key i enters row i only
        assert torch.isnan(grads["key"][ROW]).all() and torch.isfinite(grads["key"][others]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", ["info_nce", "moco", "clip_loss", "nt_xent", "supcon"])
def test_nan_input_gives_nan_mean_loss(loss, backend):
    a, b = torch.randn(6, 8).requires_grad_(), torch.randn(6, 8)
    with torch.no_grad():
        a[2, 3] = float("nan")
    kw = dict(backend=backend)
    if loss == "info_nce":
        out = csrc_triton.info_nce(a, b, **kw)
    elif loss == "moco":
        out = csrc_triton.info_nce(a, b, queue=torch.randn(9, 8), in_batch_negatives=False, **kw)
    elif loss == "clip_loss":
        out = csrc_triton.clip_loss(a, b, torch.tensor(10.0), **kw)
    elif loss == "nt_xent":
        out = csrc_triton.nt_xent(a, b, **kw)
    else:
        out = csrc_triton.supcon(torch.stack([a, b], 1), torch.tensor([0, 1, 0, 1, 2, 2]), **kw)
    assert torch.isnan(out), f"loss {out.item()} with a NaN input"
    out.backward()
    assert torch.isnan(a.grad[2]).all()


# ----------------------------------------------------------------------------------------------
# Autocast with features from nn.Linear
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("loss", ["info_nce", "clip_loss", "nt_xent", "supcon"])
def test_autocast_bf16_from_linear(backend, loss):
    if backend == "triton" and loss in ("nt_xent", "supcon"):
        pytest.skip("interpreter time: autocast is handled before the backend; info_nce / clip cover triton")
    n, d_in, d = (12, 10, 16) if backend == "triton" else (64, 20, 32)
    torch.manual_seed(3)
    lin_a, lin_b = nn.Linear(d_in, d), nn.Linear(d_in, d)
    xa, xb = torch.randn(n, d_in), torch.randn(n, d_in)
    labels = torch.randint(0, 6, (n,))
    t = torch.tensor(0.1)
    scale = torch.tensor(10.0, requires_grad=True)

    with poison_outputs(), torch.autocast("cpu", dtype=torch.bfloat16):
        fa, fb = lin_a(xa), lin_b(xb)
        assert fa.dtype == torch.bfloat16
        fa.retain_grad()
        fb.retain_grad()
        if loss == "info_nce":
            out = csrc_triton.info_nce(fa, fb, temperature=t, backend=backend)
            ref = lambda a, b: info_nce_ref(a, b, temperature=0.1)  # noqa: E731
        elif loss == "clip_loss":
            out = csrc_triton.clip_loss(fa, fb, scale, backend=backend)
            ref = lambda a, b: clip_loss_ref(a, b, 10.0)  # noqa: E731
        elif loss == "nt_xent":
            out = csrc_triton.nt_xent(fa, fb, temperature=t, backend=backend)
            ref = lambda a, b: nt_xent_ref(a, b, temperature=0.1)  # noqa: E731
        else:
            out = csrc_triton.supcon(torch.stack([fa, fb], dim=1), labels, temperature=t, backend=backend)
            ref = lambda a, b: supcon_ref(torch.stack([a, b], dim=1), labels, temperature=0.1)  # noqa: E731
    assert out.dtype == torch.float32
    with poison_outputs():
        out.backward()

    a64, b64 = fa.detach().double().requires_grad_(), fb.detach().double().requires_grad_()
    truth = ref(a64, b64)
    truth.backward()
    a16, b16 = fa.detach().clone().requires_grad_(), fb.detach().clone().requires_grad_()
    low = ref(a16, b16)
    low.backward()
    assert torch.isfinite(out)
    R.assert_no_worse_than_torch("loss", out, truth, low, torch.bfloat16)
    R.assert_no_worse_than_torch("d/d features_a", fa.grad, a64.grad, a16.grad, torch.bfloat16)
    R.assert_no_worse_than_torch("d/d features_b", fb.grad, b64.grad, b16.grad, torch.bfloat16)
    for p in (lin_a.weight, lin_b.weight, lin_a.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    if loss == "clip_loss":
        assert scale.grad is not None and torch.isfinite(scale.grad)


# ----------------------------------------------------------------------------------------------
# Backend selection and modules
# ----------------------------------------------------------------------------------------------
def test_auto_is_blockwise_on_cpu(monkeypatch):
    """On CPU tensors, backend='auto' runs the blockwise backend (and not the dense one)."""
    from csrc_triton import blockwise, dense

    ran = []
    for module, name in ((blockwise, "blockwise"), (dense, "dense")):
        original = module.lse_forward
        monkeypatch.setattr(module, "lse_forward",
                            lambda *a, _o=original, _n=name, **kw: (ran.append(_n), _o(*a, **kw))[1])
    q, k = _pairs(16, 8, torch.float32)
    auto = csrc_triton.info_nce(q, k, temperature=0.1, reduction="none", backend="auto")
    assert ran == ["blockwise"], ran
    block = csrc_triton.info_nce(q, k, temperature=0.1, reduction="none", backend="blockwise")
    assert torch.equal(auto, block)


def test_modules_match_functional():
    q, k = _pairs(14, 10, torch.float32)
    t = 0.2
    m = csrc_triton.InfoNCELoss(temperature=t, reduction="sum")
    assert isinstance(m, nn.Module)
    torch.testing.assert_close(m(q, k), csrc_triton.info_nce(q, k, temperature=t, reduction="sum"), rtol=0, atol=0)
    torch.testing.assert_close(m(q, k).double(), info_nce_ref(q.double(), k.double(), temperature=t, reduction="sum"),
                               rtol=2e-6, atol=2e-6)
    sym = csrc_triton.InfoNCELoss(temperature=t, symmetric=True, deterministic=True)
    torch.testing.assert_close(sym(q, k).double(), info_nce_ref(q.double(), k.double(), temperature=t, symmetric=True),
                               rtol=2e-6, atol=2e-6)

    scale = torch.tensor(12.0, requires_grad=True)
    out = csrc_triton.ClipLoss()(q, k, scale)
    torch.testing.assert_close(out.double(), clip_loss_ref(q.double(), k.double(), 12.0), rtol=2e-6, atol=2e-6)
    out.backward()
    assert scale.grad is not None

    nt = csrc_triton.NTXentLoss(temperature=0.3, normalize=False)
    torch.testing.assert_close(nt(q, k).double(), nt_xent_ref(q.double(), k.double(), temperature=0.3,
                                                              normalize=False), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(csrc_triton.NTXentLoss()(q, k).double(), nt_xent_ref(q.double(), k.double()),
                               rtol=2e-6, atol=2e-6)

    feats = torch.randn(14, 2, 10)
    labels = torch.randint(0, 4, (14,))
    torch.testing.assert_close(csrc_triton.SupConLoss(temperature=0.25)(feats, labels).double(),
                               supcon_ref(feats.double(), labels, temperature=0.25), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(csrc_triton.SupConLoss()(feats, labels).double(), supcon_ref(feats.double(), labels),
                               rtol=2e-6, atol=2e-6)


def test_info_nce_module_takes_the_queue_in_forward():
    """The MoCo queue changes every step: it is a forward argument of InfoNCELoss."""
    q, k = _pairs(8, 6, torch.float32)
    queue = torch.randn(20, 6) / 6**0.5
    module = csrc_triton.InfoNCELoss(temperature=0.1, in_batch_negatives=False)
    got = module(q, k, queue=queue)
    expected = info_nce_ref(q.double(), k.double(), temperature=0.1, queue=queue.double(), in_batch_negatives=False)
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=2e-6)
    got_positional = module(q, k, queue)
    assert torch.equal(got, got_positional)
    with pytest.raises(ValueError, match="queue"):
        module(q, k)  # no in-batch negatives and no queue: nothing to contrast with
