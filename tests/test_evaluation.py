"""Tests of ``recipes.common.evaluation``: feature extraction, weighted kNN, the linear probe,
segmentation metrics and the downstream training curves.

Ground truth:
* kNN: scikit-learn's ``KNeighborsClassifier`` (brute force, cosine metric, a weight callable
  giving the same exp(cos / T) weights; sklearn's cosine distance is 1 - cos) on features
  without ties, and a float64 brute-force reference written here (stable sort by similarity,
  then training index; vote; lowest class on ties) on features with ties.
* Linear probe: scikit-learn's ``LogisticRegression`` on the same objective. Ours minimises
  mean_i CE + (wd / 2) ||W||^2 (bias unpenalised with ``penalize_bias=False``); sklearn
  minimises C sum_i CE + ||W||^2 / 2, i.e. mean CE + ||W||^2 / (2 C N): C = 1 / (wd N) for
  three or more classes. For two classes sklearn fits one vector w = w_1 - w_0, and the softmax
  optimum has w_0 = -w_1, so its penalty is (wd / 2) ||w||^2 / 2: C = 2 / (wd N).
  The CPC probe (default config) is compared bit for bit with a transcription of the code it
  was before the move.
* mIoU: a confusion matrix written out by hand.
* Downstream training: a tiny conv encoder stand-in on a colour task a linear head separates.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from recipes.common.evaluation import (
    Curve,
    ProbeConfig,
    Rows,
    confusion_matrix,
    extract_features,
    fit_linear_probe,
    knn_predict,
    knn_top1,
    linear_probe,
    miou,
    pixel_accuracy,
    train_classifier,
    train_segmentation,
)


# ----------------------------------------------------------------------------------------------
# Stand-ins: a tiny backbone (the Backbone interface) and a segmentation head
# ----------------------------------------------------------------------------------------------
class TinyEncoder(nn.Module):
    feature_dim = 16
    map_channels = [8, 16]
    map_strides = [1, 2]

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        with torch.no_grad():   # channel 0 = 10 relu(patch mean - 0.5): bright pixels,
            conv = self.block1[0]  # so the toy tasks are linearly separable in frozen features
            conv.weight[0] = 10.0 / 27
            conv.bias[0] = -5.0

    def forward_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.block1(x)
        return [a, self.block2(a)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_maps(x)[-1].mean((2, 3))


class TinyHead(nn.Module):
    """1x1 convolutions on each map, upsampled to the first map's resolution and summed."""

    def __init__(self, map_channels, map_strides, num_classes, width=64) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in map_channels)

    def forward(self, maps, size=None):
        size = maps[0].shape[-2:]       # stride 1: the input's size
        return sum(F.interpolate(conv(m), size=size, mode="bilinear", align_corners=False)
                   for conv, m in zip(self.convs, maps))


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def colour_task(n: int, seed: int, size: int = 12):
    """Class 1: a bright square on a dark background (random position); class 0: dark. Masks:
    1 on the square, 0 elsewhere, a border row ignored (255)."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, size, size, generator=g) * 60).to(torch.uint8)
    labels = torch.randint(0, 2, (n,), generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        if labels[i]:
            r, c = torch.randint(0, size - 5, (2,), generator=g).tolist()
            images[i, :, r:r + 5, c:c + 5] = 220
            masks[i, r:r + 5, c:c + 5] = 1
    masks[:, 0, :] = 255
    return images, labels, masks


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# extract_features
# ----------------------------------------------------------------------------------------------
def test_extract_features_eval_mode_batches_and_restores():
    enc = TinyEncoder()
    enc.train()
    with torch.no_grad():                     # non-trivial running statistics
        enc(torch.randn(8, 3, 12, 12) * 3 + 1)
    before = state(enc)
    images = (torch.rand(11, 3, 12, 12) * 255).to(torch.uint8)
    feats = extract_features(enc, images, to_float, batch_size=4)
    assert feats.dtype == torch.float32 and feats.shape == (11, 16)
    assert enc.training and same_state(before, state(enc))
    enc.eval()
    with torch.no_grad():
        expected = enc(images.float() / 255)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
    # None: x / 255; a dataset of (image, label) items gives the same features
    torch.testing.assert_close(extract_features(enc, images, None, batch_size=5), expected,
                               rtol=1e-5, atol=1e-6)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(11, dtype=torch.long))
    torch.testing.assert_close(extract_features(enc, dataset, to_float, batch_size=3), expected,
                               rtol=1e-5, atol=1e-6)


def test_extract_features_bad_input():
    enc = TinyEncoder()
    with pytest.raises(ValueError, match="uint8"):
        extract_features(enc, torch.rand(2, 3, 8, 8), to_float)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(enc, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), batch_size=0)
    with pytest.raises(TypeError, match="float tensor"):
        extract_features(enc, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), lambda x: x)
    with pytest.raises(TypeError, match="encoder"):
        extract_features(lambda x: x, torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------
# Weighted kNN
# ----------------------------------------------------------------------------------------------
def clustered(n: int, d: int, c: int, seed: int, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return (centres[y] + spread * torch.randn(n, d, generator=g)).double(), y


def knn_reference(train_x, train_y, test_x, k, temperature, num_classes):
    """float64 brute force: cosine similarities, neighbours by (similarity descending, training
    index ascending), weights exp(s / T), vote, lowest class id among equal scores."""
    tr = train_x.double().numpy()
    te = test_x.double().numpy()
    tr = tr / np.linalg.norm(tr, axis=1, keepdims=True)
    te = te / np.linalg.norm(te, axis=1, keepdims=True)
    labels = train_y.numpy()
    preds = []
    for q in te:
        sims = tr @ q
        order = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[:min(k, len(sims))]
        votes = np.zeros(num_classes)
        for j in order:
            votes[labels[j]] += math.exp(sims[j] / temperature)
        preds.append(int(np.argmax(votes)))          # numpy: first maximum
    return np.array(preds)


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (7, 0.1), (50, 0.5), (20, 0.02)])
def test_knn_matches_sklearn(k, temperature):
    sklearn_neighbors = pytest.importorskip("sklearn.neighbors")
    train_x, train_y = clustered(300, 12, 6, seed=1, spread=1.2)
    test_x, test_y = clustered(120, 12, 6, seed=2, spread=1.2)
    ours = knn_predict(train_x.float(), train_y, test_x.float(), k=k, temperature=temperature, chunk=37)
    clf = sklearn_neighbors.KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute",
        weights=lambda dist: np.exp((1.0 - dist) / temperature))
    theirs = clf.fit(train_x.numpy(), train_y.numpy()).predict(test_x.numpy())
    assert np.array_equal(ours.numpy(), theirs)
    acc = knn_top1(train_x.float(), train_y, test_x.float(), test_y, k=k, temperature=temperature)
    assert acc == pytest.approx(float((theirs == test_y.numpy()).mean()), abs=1e-12)
    assert 1.0 / 6 < acc <= 1.0        # the clusters are learnable: far above chance


def test_knn_matches_reference_with_ties_and_large_k():
    # duplicated training rows make similarities tie at the k-th place; k > N votes with all
    train_x, train_y = clustered(40, 5, 4, seed=4)
    # copies and power-of-two multiples: exactly equal cosines in any precision
    train_x = torch.cat([train_x, train_x[:15], 4.0 * train_x[5:25]])
    train_y = torch.cat([train_y, torch.randint(0, 4, (15,)), train_y[5:25].flip(0)])
    test_x = torch.cat([clustered(30, 5, 4, seed=5)[0], train_x[:10]])
    for k in (1, 2, 3, 6, 33, 75, 500):
        for dtype in (torch.float64, torch.float32):
            ours = knn_predict(train_x.to(dtype), train_y, test_x.to(dtype), k=k, temperature=0.1, chunk=8)
            ref = knn_reference(train_x, train_y, test_x, k, 0.1, 4)
            assert np.array_equal(ours.numpy(), ref), (k, dtype)


def test_knn_tie_rules_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    # two training rows equally similar to q at the first place: k=1 keeps the lower index
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert knn_predict(x, torch.tensor([3, 1, 0]), q, k=1).item() == 3
    assert knn_predict(x, torch.tensor([1, 3, 0]), q, k=1).item() == 1
    # k=2: both vote with equal weight, classes 3 and 1 tie: the lower class id wins
    assert knn_predict(x, torch.tensor([3, 1, 0]), q, k=2).item() == 1
    # k clipped to N: all three vote; class 0's single far row cannot outvote
    assert knn_predict(x, torch.tensor([0, 0, 2]), q, k=10).item() == 0


def test_knn_top1_values_nan_and_errors():
    x, y = clustered(50, 6, 3, seed=6)
    assert knn_top1(x, y, x, y, k=1) == 1.0                      # each row finds itself
    bad = x.clone()
    bad[3, 2] = float("nan")
    assert math.isnan(knn_top1(bad, y, x, y))
    assert math.isnan(knn_top1(x, y, bad, y))
    # a test class never seen in training counts as an error
    assert knn_top1(x, torch.zeros_like(y), x[:4], torch.tensor([0, 0, 5, 0]), k=3) == 0.75
    with pytest.raises(ValueError, match="k=0"):
        knn_top1(x, y, x, y, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_top1(x, y, x, y, temperature=0.0)
    with pytest.raises(ValueError, match="num_classes=2"):
        knn_top1(x, y, x, y, num_classes=2)
    with pytest.raises(ValueError, match="train_y"):
        knn_top1(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="feature dimension"):
        knn_top1(x, y, x[:, :4], y)
    with pytest.raises(TypeError, match="train_y"):
        knn_top1(x, y.tolist(), x, y)


# ----------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------
def old_cpc_probe(train_x, train_y, test_x, test_y, iterations=300, lr=0.05, weight_decay=1e-4, seed=0):
    """cpc.probes.linear_probe as it was before the move (commit 666ab67), transcribed."""
    keys = lambda labels: labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)  # noqa: E731
    classes = sorted(set(keys(train_y)))
    index = {c: i for i, c in enumerate(classes)}
    ytr = torch.tensor([index[c] for c in keys(train_y)])
    yte = torch.tensor([index.get(c, -1) for c in keys(test_y)])
    xtr = train_x.double()
    mean = xtr.mean(0)
    std = xtr.std(0, unbiased=False).clamp_min(1e-6)
    xtr = ((xtr - mean) / std).float()
    xte = ((test_x.double() - mean) / std).float()
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(xtr.shape[1], len(classes), generator=gen) * 0.01).requires_grad_()
    bias = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(xtr @ weight + bias, ytr).backward()
        opt.step()
    with torch.no_grad():
        train_acc = ((xtr @ weight + bias).argmax(1) == ytr).float().mean().item()
        test_acc = ((xte @ weight + bias).argmax(1) == yte).float().mean().item()
    return test_acc, train_acc, len(classes)


def test_cpc_probe_unchanged():
    import cpc.probe

    assert cpc.probe.linear_probe is linear_probe  # the CPC recipe's probes go through cpc.probe
    x, y = clustered(260, 20, 7, seed=7, spread=2.0)
    names = [f"spk{int(v)}" for v in y]
    for cfg in (ProbeConfig(), ProbeConfig(iterations=40, lr=0.1, weight_decay=1e-3, seed=3)):
        got = linear_probe(x[:200].float(), names[:200], x[200:].float(), names[200:] , cfg)
        want = old_cpc_probe(x[:200].float(), names[:200], x[200:].float(), names[200:],
                             cfg.iterations, cfg.lr, cfg.weight_decay, cfg.seed)
        assert (got.accuracy, got.train_accuracy, got.n_classes) == want
        assert (got.n_train, got.n_test) == (200, 60)
        assert set(got.as_dict()) == {"accuracy", "train_accuracy", "n_train", "n_test", "n_classes"}


def standardised(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    mean = ref.mean(0)
    std = ref.std(0, unbiased=False).clamp_min(1e-6)
    return ((x - mean) / std).numpy()


CASES = {
    # (n_train, dim, classes, spread): separable training sets (the optimum is far from 0 at a
    # small weight decay) and overlapping classes
    "separable_multiclass": (200, 64, 5, 2.5),
    "overlapping_multiclass": (500, 16, 5, 2.5),
    "separable_binary": (150, 48, 2, 2.5),
    "overlapping_binary": (500, 8, 2, 3.0),
}


def probe_case(name: str):
    n, d, c, spread = CASES[name]
    x, y = clustered(n + 800, d, c, seed=11 + d, spread=spread)
    return x[:n], y[:n], x[n:], y[n:], c


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("weight_decay", [1e-4, 1e-2])
def test_linear_probe_lbfgs_matches_sklearn(case, weight_decay):
    linear_model = pytest.importorskip("sklearn.linear_model")
    xtr, ytr, xte, yte, c = probe_case(case)
    n = xtr.shape[0]
    C = (2.0 if c == 2 else 1.0) / (weight_decay * n)
    sk = linear_model.LogisticRegression(C=C, tol=1e-10, max_iter=10000)
    sk.fit(standardised(xtr, xtr), ytr.numpy())
    theirs = sk.predict(standardised(xte, xtr))
    cfg = ProbeConfig(solver="lbfgs", weight_decay=weight_decay, penalize_bias=False)
    probe = fit_linear_probe(xtr, ytr, cfg)
    ours = np.array(probe.predict(xte))
    assert (ours == theirs).mean() >= 0.99
    result = linear_probe(xtr, ytr, xte, yte, cfg)
    assert abs(result.accuracy - (theirs == yte.numpy()).mean()) <= 0.01
    # the same optimum: weights (the difference of the two class vectors for binary) and the
    # intercepts up to the constant softmax ignores
    W, b = probe.weight.numpy(), probe.bias.numpy()
    if c == 2:
        W, b = (W[:, 1] - W[:, 0])[None, :], np.array([b[1] - b[0]])
        coef, intercept = sk.coef_, sk.intercept_
    else:
        W, b = W.T, b - b.mean()
        coef, intercept = sk.coef_, sk.intercept_ - sk.intercept_.mean()
    scale = np.abs(coef).max()
    assert np.abs(W - coef).max() <= 1e-4 * scale
    assert np.abs(b - intercept).max() <= 1e-4 * max(scale, np.abs(intercept).max())


@pytest.mark.parametrize("case", ["overlapping_multiclass", "overlapping_binary"])
def test_linear_probe_adam_default_iterations_matches_sklearn_on_overlapping_classes(case):
    # Adam with its 300 default iterations reaches the optimum when classes overlap (the
    # optimum is near the origin); on separable training sets at weight decay 1e-4 it stops
    # short (95-96 % agreement measured), hence the lbfgs solver for the image recipes.
    linear_model = pytest.importorskip("sklearn.linear_model")
    xtr, ytr, xte, yte, c = probe_case(case)
    wd = 1e-4
    C = (2.0 if c == 2 else 1.0) / (wd * xtr.shape[0])
    sk = linear_model.LogisticRegression(C=C, tol=1e-10, max_iter=10000)
    theirs = sk.fit(standardised(xtr, xtr), ytr.numpy()).predict(standardised(xte, xtr))
    cfg = ProbeConfig(weight_decay=wd, penalize_bias=False)
    ours = np.array(fit_linear_probe(xtr, ytr, cfg).predict(xte))
    assert (ours == theirs).mean() >= 0.98
    acc = linear_probe(xtr, ytr, xte, yte, cfg).accuracy
    assert abs(acc - (theirs == yte.numpy()).mean()) <= 0.01


def test_linear_probe_penalize_bias_changes_only_the_bias_term():
    xtr, ytr, _, _, _ = probe_case("overlapping_multiclass")
    ytr = ytr.clamp(max=1)      # unbalanced classes: the bias matters
    free = fit_linear_probe(xtr, ytr, ProbeConfig(solver="lbfgs", weight_decay=1.0, penalize_bias=False))
    tied = fit_linear_probe(xtr, ytr, ProbeConfig(solver="lbfgs", weight_decay=1.0, penalize_bias=True))
    # optimality of the unpenalised bias: the mean softmax equals the class frequencies
    p = torch.softmax(free.logits(xtr), 1).mean(0)
    freq = torch.bincount(ytr, minlength=2).double() / ytr.numel()
    torch.testing.assert_close(p, freq, rtol=0, atol=1e-7)
    assert (tied.bias[1] - tied.bias[0]).abs() < (free.bias[1] - free.bias[0]).abs()


def test_linear_probe_nan_unseen_and_errors():
    x, y = clustered(60, 4, 3, seed=8, spread=3.0)
    bad = x.clone()
    bad[0, 0] = float("inf")
    r = linear_probe(bad, y, x, y)
    assert math.isnan(r.accuracy) and math.isnan(r.train_accuracy) and r.n_classes == 3
    # test labels absent from training are errors
    r = linear_probe(x[:40], y[:40] * 0, x[40:], y[40:] * 0 + 9, ProbeConfig(solver="lbfgs"))
    assert r.accuracy == 0.0 and r.train_accuracy == 1.0
    with pytest.raises(ValueError, match="solver='sgd'"):
        ProbeConfig(solver="sgd")
    with pytest.raises(ValueError, match="iterations=0"):
        ProbeConfig(iterations=0)
    with pytest.raises(ValueError, match="weight_decay=-1"):
        ProbeConfig(weight_decay=-1.0)
    with pytest.raises(ValueError, match="expected .N, D. and .M, D."):
        linear_probe(x, y, x[:, :2], y)
    with pytest.raises(ValueError, match="len.train_y.=59"):
        linear_probe(x, y[:-1], x, y)


class CountingRows(Rows):
    """Rows over a tensor that records every read (so a test sees what was held at once)."""

    def __init__(self, x: torch.Tensor):
        self.reads: list[tuple[int, int]] = []

        def read(a: int, b: int) -> np.ndarray:
            self.reads.append((a, b))
            return x[a:b].float().numpy().copy()  # float32 arrays, as the CPC store gives

        super().__init__((int(x.shape[0]), int(x.shape[1])), read)


@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
@pytest.mark.parametrize("chunk", [1, 13, 1000])
def test_linear_probe_chunked_is_the_whole_split_fit(solver, chunk):
    # 150 training rows: 1-row chunks, a ragged last chunk (13) and one chunk (1000); the
    # objective, its gradient and the statistics are sums over chunks, so the fit is the
    # whole-split fit up to the order of the sums
    xtr, ytr, xte, yte, _ = probe_case("overlapping_multiclass")
    xtr, ytr = xtr[:150].float(), ytr[:150]
    xte = xte.float()
    cfg = ProbeConfig(solver=solver, iterations=60 if solver == "adam" else 100,
                      weight_decay=1e-2, penalize_bias=False)
    whole = fit_linear_probe(xtr, ytr, cfg)
    src = CountingRows(xtr)
    part = fit_linear_probe(src, ytr, cfg, chunk_rows=chunk)
    assert src.reads and max(b - a for a, b in src.reads) <= chunk
    torch.testing.assert_close(part.mean, whole.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(part.std, whole.std, rtol=1e-12, atol=0)
    # lbfgs in float64: equal to rounding; adam in float32 (its historical dtype): float32 sums
    # in another order, 60 steps of lr 0.05
    tol = dict(rtol=1e-7, atol=1e-8) if solver == "lbfgs" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(part.weight, whole.weight, **tol)
    torch.testing.assert_close(part.bias, whole.bias, **tol)
    assert part.classes == whole.classes
    torch.testing.assert_close(part.predict_index(xte, chunk_rows=chunk), whole.predict_index(xte))
    r_whole = linear_probe(xtr, ytr, xte, yte, cfg)
    test_src = CountingRows(xte)
    r_part = linear_probe(CountingRows(xtr), ytr, test_src, yte, cfg, chunk_rows=chunk)
    assert max(b - a for a, b in test_src.reads) <= chunk
    assert r_part.as_dict() == r_whole.as_dict()


def test_linear_probe_integer_tensor_labels_match_python_labels():
    # the vectorised label path (tensors) and the dict path (lists) give the same probe; unseen
    # test labels count as errors on both
    x, y = clustered(120, 6, 4, seed=21, spread=2.0)
    y = y * 10 - 5                      # negative, sparse class ids
    yte = y[80:].clone()
    yte[:5] = 99                        # never seen in training
    cfg = ProbeConfig(solver="lbfgs", weight_decay=1e-2)
    a = linear_probe(x[:80], y[:80], x[80:], yte, cfg)
    b = linear_probe(x[:80], y[:80].tolist(), x[80:], yte.tolist(), cfg)
    assert a.as_dict() == b.as_dict()
    assert fit_linear_probe(x[:80], y[:80], cfg).classes == [-5, 5, 15, 25]
    # string training labels against integer test labels: nothing matches
    names = [f"c{int(v)}" for v in y[:80]]
    assert linear_probe(x[:80], names, x[80:], yte, cfg).accuracy == 0.0


def test_linear_probe_rows_errors_and_nan_in_a_later_chunk():
    x, y = clustered(40, 3, 2, seed=5, spread=3.0)
    kept = x.clone()  # float64: Rows.of reads views of it, which the fit must not change
    fit_linear_probe(Rows.of(kept), y, ProbeConfig(solver="lbfgs", iterations=5), chunk_rows=7)
    fit_linear_probe(kept, y, ProbeConfig(iterations=5), chunk_rows=7)
    assert torch.equal(kept, x)
    bad = x.clone()
    bad[33, 1] = float("nan")
    r = linear_probe(Rows.of(bad), y, x, y, chunk_rows=8)
    assert math.isnan(r.accuracy) and math.isnan(r.train_accuracy)
    with pytest.raises(ValueError, match="chunk_rows=0: expected None or an integer >= 1"):
        linear_probe(x, y, x, y, chunk_rows=0)
    with pytest.raises(ValueError, match="chunk_rows=True"):
        fit_linear_probe(x, y, chunk_rows=True)
    wrong = Rows((40, 3), lambda a, b: x[a:b, :2])
    with pytest.raises(ValueError, match=r"Rows.read\(0, 40\) returned shape \(40, 2\): expected \(40, 3\)"):
        fit_linear_probe(wrong, y)
    with pytest.raises(ValueError, match="shape=.40,.: expected .N, D."):
        Rows((40,), lambda a, b: x[a:b])
    with pytest.raises(ValueError, match="test_x.shape=.40,.: expected .N, D."):
        linear_probe(x, y, x[:, 0], y)


# ----------------------------------------------------------------------------------------------
# Segmentation metrics
# ----------------------------------------------------------------------------------------------
def test_confusion_matrix_and_miou_by_hand():
    I = 255  # noqa: E741
    target = torch.tensor([[[0, 0, 1, 1],
                            [0, 2, 2, I]],
                           [[1, 1, 1, 0],
                            [I, I, 2, 0]]])
    pred = torch.tensor([[[0, 1, 1, 1],
                          [0, 2, 0, 3]],       # the 3 sits on an ignored pixel: not counted
                         [[1, 1, 0, 0],
                          [2, 0, 2, 0]]])
    # rows: target 0..4, columns: prediction 0..4 (class 4 appears nowhere)
    # target 0 (5 px): pred 0,1,0,0,0      -> [4, 1, 0, 0, 0]
    # target 1 (5 px): pred 1,1,1,1,0      -> [1, 4, 0, 0, 0]
    # target 2 (3 px): pred 2,0,2          -> [1, 0, 2, 0, 0]
    expected = torch.tensor([[4, 1, 0, 0, 0],
                             [1, 4, 0, 0, 0],
                             [1, 0, 2, 0, 0],
                             [0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0]])
    cm = confusion_matrix(pred, target, num_classes=5, ignore_index=255)
    assert cm.dtype == torch.int64 and torch.equal(cm, expected)
    per_class, mean = miou(cm)
    # IoU_0 = 4 / (5 + 6 - 4) = 4/7; IoU_1 = 4 / (5 + 5 - 4) = 4/6; IoU_2 = 2 / (3 + 2 - 2) = 2/3
    # class 3: predicted only on an ignored pixel, so absent from both: NaN like class 4
    assert per_class[:3] == pytest.approx([4 / 7, 4 / 6, 2 / 3], abs=1e-15)
    assert math.isnan(per_class[3]) and math.isnan(per_class[4])
    assert mean == pytest.approx((4 / 7 + 4 / 6 + 2 / 3) / 3, abs=1e-15)
    assert pixel_accuracy(cm) == pytest.approx(10 / 13, abs=1e-15)
    # a class predicted but never in the target counts, with IoU 0
    cm2 = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 0]), num_classes=2, ignore_index=None)
    assert torch.equal(cm2, torch.tensor([[1, 2], [0, 0]]))
    per_class, mean = miou(cm2)
    assert per_class == pytest.approx([1 / 3, 0.0]) and mean == pytest.approx(1 / 6)
    assert math.isnan(miou(torch.zeros(3, 3, dtype=torch.long))[1])


def test_confusion_matrix_errors():
    t = torch.tensor([0, 1, 7])
    with pytest.raises(ValueError, match="target contains class id 7"):
        confusion_matrix(torch.tensor([0, 1, 1]), t, num_classes=3)
    with pytest.raises(ValueError, match="pred contains class id 3"):
        confusion_matrix(torch.tensor([0, 3, 1]), torch.tensor([0, 1, 2]), num_classes=3)
    with pytest.raises(TypeError, match="argmax"):
        confusion_matrix(torch.rand(3), torch.tensor([0, 1, 2]), num_classes=3)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1, 2]), num_classes=3)
    with pytest.raises(ValueError, match="square"):
        miou(torch.zeros(2, 3))


# ----------------------------------------------------------------------------------------------
# Downstream training curves
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)
    return colour_task(96, seed=1), colour_task(48, seed=2)


@pytest.mark.parametrize("frozen", [True, False])
def test_train_classifier_learns_deterministic_and_leaves_encoder(task, frozen):
    (xtr, ytr, _), (xte, yte, _) = task
    enc = TinyEncoder()
    enc.train()
    before = state(enc)
    rng = torch.get_rng_state()
    kwargs = dict(num_classes=2, epochs=3, frozen=frozen, lr=0.05, batch_size=16,
                  eval_transform=to_float, seed=5, keep_model=True)
    curve = train_classifier(enc, 16, (xtr, ytr), (xte, yte), **kwargs)
    assert isinstance(curve, Curve) and curve.epochs == [1, 2, 3] and len(curve.metric) == 3
    assert curve.metric[-1] >= 0.95
    assert len(curve.extra["train_loss"]) == 3 and curve.extra["frozen"] is frozen
    # the caller's encoder: same parameters and BatchNorm buffers, same mode; RNG untouched
    assert same_state(before, state(enc)) and enc.training
    assert torch.equal(rng, torch.get_rng_state())
    # frozen: the trained copy of the encoder equals the original; fine-tuned: it moved
    assert same_state(before, state(curve.model[0])) is frozen
    again = train_classifier(enc, 16, (xtr, ytr), (xte, yte), **kwargs)
    assert again.metric == curve.metric and again.extra["train_loss"] == curve.extra["train_loss"]


def test_train_classifier_uses_train_transform_per_image(task):
    (xtr, ytr, _), (xte, yte, _) = task
    calls = []

    def augment(img: torch.Tensor) -> torch.Tensor:
        assert img.shape == (3, 12, 12) and img.dtype == torch.uint8
        calls.append(1)
        return to_float(img.flip(-1) if torch.rand(()) < 0.5 else img)

    curve = train_classifier(TinyEncoder(), 16, (xtr[:40], ytr[:40]), (xte, yte), num_classes=2,
                             epochs=2, frozen=False, lr=0.01, batch_size=16, train_transform=augment,
                             eval_transform=to_float, seed=0)
    assert len(calls) == 80 and curve.epochs == [1, 2]


def test_train_classifier_bad_input(task):
    (xtr, ytr, _), (xte, yte, _) = task
    enc = TinyEncoder()
    with pytest.raises(ValueError, match="train labels contain class id 1"):
        train_classifier(enc, 16, (xtr, ytr), (xte, yte), num_classes=1, eval_transform=to_float)
    with pytest.raises(ValueError, match="feature_dim=8"):
        train_classifier(enc, 8, (xtr, ytr), (xte, yte), num_classes=2, epochs=1, eval_transform=to_float)
    with pytest.raises(ValueError, match="epochs=0"):
        train_classifier(enc, 16, (xtr, ytr), (xte, yte), num_classes=2, epochs=0, eval_transform=to_float)
    with pytest.raises(ValueError, match="lr=-0.1"):
        train_classifier(enc, 16, (xtr, ytr), (xte, yte), num_classes=2, lr=-0.1, eval_transform=to_float)
    with pytest.raises(ValueError, match="test images"):
        train_classifier(enc, 16, (xtr, ytr), (xte.float(), yte), num_classes=2, eval_transform=to_float)


def seg_eval(images, masks):
    return to_float(images), masks


@pytest.mark.parametrize("frozen", [True, False])
def test_train_segmentation_learns_deterministic_and_leaves_encoder(task, frozen):
    (xtr, _, mtr), (xte, _, mte) = task
    enc = TinyEncoder()
    before = state(enc)
    kwargs = dict(epochs=3, frozen=frozen, lr=0.3 if frozen else 0.1, batch_size=8, ignore_index=255,
                  head_factory=TinyHead, eval_transform=seg_eval, seed=3, keep_model=True)
    curve = train_segmentation(enc, 2, (xtr, mtr), (xte, mte), **kwargs)
    assert curve.epochs == [1, 2, 3] and curve.metric_name == "miou"
    assert curve.metric[-1] >= 0.85
    assert len(curve.extra["per_class_iou"][-1]) == 2
    assert same_state(before, state(enc))
    assert same_state(before, state(curve.model["encoder"])) is frozen
    again = train_segmentation(enc, 2, (xtr, mtr), (xte, mte), **kwargs)
    assert again.metric == curve.metric


def test_train_segmentation_metric_is_miou_of_the_predictions(task):
    # after training, recompute the last epoch's mIoU from the kept model by hand
    (xtr, _, mtr), (xte, _, mte) = task
    curve = train_segmentation(TinyEncoder(), 2, (xtr, mtr), (xte, mte), epochs=1, lr=0.05,
                               batch_size=32, head_factory=TinyHead, eval_transform=seg_eval,
                               keep_model=True)
    model = curve.model
    with torch.no_grad():
        pred = model["head"](model["encoder"].forward_maps(to_float(xte))).argmax(1)
    keep = mte != 255
    ious = []
    for c in range(2):
        inter = ((pred == c) & (mte == c) & keep).sum().item()
        union = (((pred == c) | (mte == c)) & keep).sum().item()
        ious.append(inter / union)
    assert curve.metric[0] == pytest.approx(sum(ious) / 2, abs=1e-12)


def test_train_segmentation_bad_input(task):
    (xtr, _, mtr), (xte, _, mte) = task
    bad = mtr.clone()
    bad[0, 3, 3] = 7
    with pytest.raises(ValueError, match="train masks contain 7"):
        train_segmentation(TinyEncoder(), 2, (xtr, bad), (xte, mte), head_factory=TinyHead)
    with pytest.raises(ValueError, match="test masks"):
        train_segmentation(TinyEncoder(), 2, (xtr, mtr), (xte, mte[:, :5]), head_factory=TinyHead)
    with pytest.raises(TypeError, match="forward_maps"):
        train_segmentation(nn.Linear(2, 2), 2, (xtr, mtr), (xte, mte), head_factory=TinyHead)


def test_defaults_wire_up_with_the_image_modules():
    # the default eval transforms (modalities.image.transforms) and segmentation head
    # (modalities.image.heads) on a real backbone and generated shapes: runs, shapes, ranges
    from modalities.image.backbones import build_backbone
    from modalities.image.synthetic import generate_shapes
    from modalities.image.transforms import seg_train_transform, simclr_transform

    train_set = generate_shapes(24, size=16, seed=0, split="train")
    test_set = generate_shapes(12, size=16, seed=0, split="test")
    net = build_backbone("small_cnn", cifar_stem=True, width=8)
    curve = train_classifier(net, net.feature_dim, (train_set.images, train_set.labels),
                             (test_set.images, test_set.labels), num_classes=len(train_set.classes),
                             epochs=1, frozen=False, batch_size=12,
                             train_transform=simclr_transform(16, crop_scale=(0.5, 1.0)))
    assert curve.epochs == [1] and 0.0 <= curve.metric[0] <= 1.0
    k = len(train_set.seg_classes)
    curve = train_segmentation(net, k, (train_set.images, train_set.masks),
                               (test_set.images, test_set.masks), epochs=1, frozen=False,
                               batch_size=12, head_width=8, train_transform=seg_train_transform(16))
    assert curve.epochs == [1] and 0.0 <= curve.metric[0] <= 1.0
    assert len(curve.extra["per_class_iou"][0]) == k


def test_progress_through_a_run_log(task, tmp_path):
    from recipes.common.logging import RunLog

    (xtr, ytr, _), (xte, yte, _) = task
    log = RunLog(tmp_path / "log.txt")
    enc = TinyEncoder()
    curve = train_classifier(enc, 16, (xtr, ytr), (xte, yte), num_classes=2, epochs=2,
                             lr=0.05, eval_transform=to_float, progress=log, name="binary")
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [line.split(" top1=")[0] for line in lines] == ["binary: 1/2", "binary: 2/2"]
    assert float(lines[-1].split("top1=")[1]) == pytest.approx(curve.metric[-1], abs=1e-4)
    # a tqdm bar instead: the same run
    assert train_classifier(enc, 16, (xtr, ytr), (xte, yte), num_classes=2, epochs=2, lr=0.05,
                            eval_transform=to_float, progress=True).metric == curve.metric
