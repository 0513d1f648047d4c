"""Tests of ``recipes.common.diagnostics`` against float64 references written here from the
formulas (Wang and Isola 2020 eq. 4-5; Roy and Vetterli 2007 eq. 2), with explicit loops over
pairs where the implementation uses sums, and spectra known in closed form.

Tolerances: the implementation computes in float64 on the very rows given (inputs of any
dtype are upcast exactly), so dense results agree with the references to a few float64
ulps of the terms summed (1e-12 relative here). The tiled path of uniformity
(csrc_triton.uniformity, fp32 accumulation) is held to 1e-5.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from recipes.common.diagnostics import (
    alignment,
    effective_rank,
    positive_negative_cosine,
    representation_report,
    singular_values,
    uniformity,
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def unit_rows(z: torch.Tensor) -> np.ndarray:
    a = z.double().numpy()
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def pair(n: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g) * 3
    z2 = z1 + 2.0 * torch.randn(n, d, generator=g)
    return z1.to(dtype), z2.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1, 2, 3.5])
def test_alignment_matches_formula(dtype, alpha):
    z1, z2 = pair(37, 9, dtype)
    u1, u2 = unit_rows(z1), unit_rows(z2)
    ref = sum(np.linalg.norm(u1[i] - u2[i]) ** alpha for i in range(37)) / 37
    assert alignment(z1, z2, alpha) == pytest.approx(ref, rel=1e-12)
    # identical pairs: 0; antipodal pairs: 2^alpha
    assert alignment(z1, z1, alpha) == pytest.approx(0.0, abs=1e-12)
    assert alignment(z1, -z1, alpha) == pytest.approx(2.0 ** alpha, rel=1e-12)


def uniformity_reference(z: torch.Tensor, t: float) -> float:
    u = unit_rows(z)
    n = len(u)
    terms = [math.exp(-t * float(np.sum((u[i] - u[j]) ** 2)))
             for i, j in itertools.product(range(n), range(n)) if i != j]
    return math.log(sum(terms) / len(terms))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.5, 2.0, 7.0])
def test_uniformity_matches_formula(dtype, t):
    z = pair(41, 6, dtype, seed=1)[0]
    ref = uniformity_reference(z, t)
    assert uniformity(z, t) == pytest.approx(ref, rel=1e-12, abs=1e-13)
    # the tiled engine (used above dense_max_rows rows) evaluates the same formula in fp32
    assert uniformity(z, t, dense_max_rows=0) == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_uniformity_limits_and_nan():
    # collapsed: 0; two antipodal points: -4t; NaN in, NaN out (both paths)
    z = torch.randn(1, 5).repeat(6, 1) * torch.arange(1, 7.0)[:, None]
    assert uniformity(z) == pytest.approx(0.0, abs=1e-12)
    assert uniformity(torch.tensor([[1.0, 0.0], [-2.0, 0.0]]), t=2) == pytest.approx(-8.0, abs=1e-12)
    bad = torch.randn(10, 4)
    bad[2, 1] = float("nan")
    assert math.isnan(uniformity(bad)) and math.isnan(uniformity(bad, dense_max_rows=0))
    assert math.isnan(alignment(bad, torch.randn(10, 4)))


def test_positive_negative_cosine_brute_force():
    for n, d, dtype in ((1, 3, torch.float64), (2, 3, torch.float32), (23, 7, torch.bfloat16)):
        z1, z2 = pair(n, d, dtype, seed=n)
        z1[0] = 0.0                                   # a zero row: cosine 0 with everything
        with np.errstate(invalid="ignore"):
            views = np.nan_to_num(np.concatenate([unit_rows(z1), unit_rows(z2)]))  # 0/0 -> 0
        pos = [float(views[i] @ views[i + n]) for i in range(n)]
        neg = [float(views[a] @ views[b]) for a in range(2 * n) for b in range(2 * n)
               if a != b and abs(a - b) != n]
        got_pos, got_neg = positive_negative_cosine(z1, z2)
        assert got_pos == pytest.approx(sum(pos) / n, rel=1e-12, abs=1e-14)
        if n == 1:
            assert not neg and math.isnan(got_neg)
        else:
            assert len(neg) == 2 * n * (2 * n - 2)
            assert got_neg == pytest.approx(sum(neg) / len(neg), rel=1e-12, abs=1e-14)


def test_singular_values_of_centred_rows():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    shifted = x + 100.0 * torch.randn(1, 8, generator=g, dtype=torch.float64)   # a mean offset
    ref = np.linalg.svd(x.numpy() - x.numpy().mean(0), compute_uv=False)
    for data in (x, shifted):
        s = singular_values(data)
        assert s.dtype == torch.float64 and s.shape == (8,)
        assert torch.all(s[:-1] >= s[1:])
        np.testing.assert_allclose(s.numpy(), ref, rtol=1e-9, atol=1e-9 * ref[0])
    # a known spectrum: orthogonal directions scaled by 5, 3, 1 in 6 dimensions (centred rows)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    rows = torch.cat([torch.diag(torch.tensor([5.0, 3.0, 1.0, 0, 0, 0], dtype=torch.float64)),
                      -torch.diag(torch.tensor([5.0, 3.0, 1.0, 0, 0, 0], dtype=torch.float64))]) @ q
    s = singular_values(rows)      # each direction +-v: singular value sqrt(2) * scale
    np.testing.assert_allclose(s.numpy(), math.sqrt(2) * np.array([5, 3, 1, 0, 0, 0]), atol=1e-12)
    assert torch.isnan(singular_values(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))).all()


def test_effective_rank_known_spectra():
    for k in (1, 2, 5, 64):
        assert effective_rank(torch.cat([torch.full((k,), 3.7), torch.zeros(10)])) == pytest.approx(k, rel=1e-12)
    # p = (1/2, 1/4, 1/4): H = 1.5 log 2, erank = 2^1.5
    assert effective_rank([2.0, 1.0, 1.0]) == pytest.approx(2 ** 1.5, rel=1e-12)
    ref = np.array([4.0, 2.0, 1.0, 0.5, 0.25])
    p = ref / ref.sum()
    assert effective_rank(torch.tensor(ref)) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert effective_rank([0.0, 0.0]) == 0.0
    assert math.isnan(effective_rank([1.0, float("nan")]))
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank([1.0, -0.5])
    with pytest.raises(ValueError, match="at least one"):
        effective_rank([])


def test_representation_report_consistent():
    z1, z2 = pair(24, 10, torch.float32, seed=5)
    feats = torch.randn(24, 16)
    r = representation_report(feats, z1, z2)
    assert r["alignment"] == alignment(z1, z2)
    assert r["uniformity"] == pytest.approx(0.5 * (uniformity(z1) + uniformity(z2)), rel=1e-15)
    assert (r["positive_cosine"], r["negative_cosine"]) == positive_negative_cosine(z1, z2)
    assert r["feature_spectrum"] == singular_values(feats).tolist()
    assert r["projection_spectrum"] == singular_values(z1).tolist()
    assert r["feature_effective_rank"] == effective_rank(singular_values(feats))
    assert r["projection_effective_rank"] == effective_rank(singular_values(z1))
    assert r["feature_uniformity"] == uniformity(feats)
    assert (r["n"], r["feature_dim"], r["projection_dim"]) == (24, 16, 10)
    only = representation_report(feats)
    assert "alignment" not in only and only["feature_spectrum"] == r["feature_spectrum"]
    import json
    json.dumps(r)                                   # plain Python values


def test_bad_input():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same"):
        alignment(z, torch.randn(5, 3))
    with pytest.raises(ValueError, match="alpha=0"):
        alignment(z, z, alpha=0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        uniformity(z[:1])
    with pytest.raises(ValueError, match="t=-1"):
        uniformity(z, t=-1)
    with pytest.raises(ValueError, match="float"):
        uniformity(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="tensor"):
        singular_values(np.ones((3, 3)))
    with pytest.raises(ValueError, match="both or neither"):
        representation_report(z, z, None)
    with pytest.raises(ValueError, match="same number of rows"):
        representation_report(z, torch.randn(5, 2), torch.randn(5, 2))
