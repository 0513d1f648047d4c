"""CPC criterion against a naive dense per-step InfoNCE (F.cross_entropy), for every
negative-sampling mode, with padding masks; loss and gradients. ``negatives="global"``: in one
process it is "batch"; with 2 gloo processes (one spawn, ``file://`` store) the ranks' mean loss,
their gradients / R, the accuracy and the query counts equal one process on the concatenated
batch (float64 at 1e-10, float32 at 1e-5; no padding, padding with a rank that has no query
for a step, and steps without any query), and DistributedDataParallel over it gives the
one-process parameter gradients."""
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from cpc.criterion import CPCCriterion, sample_negatives


def naive_cpc_loss(pred, z, lengths, speakers, mode, temperature=1.0):
    """One cross-entropy per query, its candidates listed explicitly. Queries: t < P (the
    predictions' frames) with t + k < length."""
    steps, batch, pframes, _ = pred.shape
    frames = z.shape[1]
    step_losses = []
    for k in range(1, steps + 1):
        queries = [(b, t) for b in range(batch) for t in range(min(pframes, frames - k))
                   if t + k < lengths[b]]
        terms = []
        for b, t in queries:
            if mode == "batch":
                cands = queries
            elif mode == "sequence":
                cands = [(b2, t2) for b2, t2 in queries if b2 == b]
            else:
                cands = [(b2, t2) for b2, t2 in queries if speakers[b2] == speakers[b]]
            keys = torch.stack([z[b2, t2 + k] for b2, t2 in cands])
            logits = keys @ pred[k - 1, b, t] / temperature
            target = cands.index((b, t))
            terms.append(F.cross_entropy(logits[None], torch.tensor([target])))
        step_losses.append(torch.stack(terms).mean())
    return torch.stack(step_losses).mean(), torch.stack(step_losses)


@pytest.mark.parametrize("mode", ["batch", "sequence", "speaker"])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_naive_dense(mode, padded):
    torch.manual_seed(1)
    steps, batch, frames, dim = 3, 5, 9, 7
    pred = torch.randn(steps, batch, frames, dim, dtype=torch.float64, requires_grad=True)
    z = torch.randn(batch, frames, dim, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([9, 6, 9, 4, 7]) if padded else torch.full((batch,), frames)
    speakers = torch.tensor([3, 1, 3, 1, 0])
    crit = CPCCriterion(mode, temperature=0.5, accuracy_rows=10_000)
    out = crit(pred, z, lengths, speakers)
    out.loss.backward()
    g_pred, g_z = pred.grad.clone(), z.grad.clone()
    pred.grad = z.grad = None
    ref, ref_steps = naive_cpc_loss(pred, z, lengths.tolist(), speakers.tolist(), mode, 0.5)
    ref.backward()
    torch.testing.assert_close(out.loss, ref.to(out.loss.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.step_loss, ref_steps.detach().float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_pred, pred.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_z, z.grad, rtol=1e-5, atol=1e-7)
    if padded:
        # padded frames are neither queries nor keys: they get no gradient at all
        for b, n in enumerate(lengths.tolist()):
            assert g_z[b, n:].abs().sum() == 0
            assert g_pred[:, b, max(n - 1, 0):].abs().sum() == 0


@pytest.mark.parametrize("mode", ["batch", "speaker"])
def test_full_pool_mean_similarity_fewer_prediction_frames_and_sum(mode):
    """similarity="mean" is q.k / C; predictions with P < S frames (the transformer's W);
    step_reduction="sum" is the sum of the step means."""
    torch.manual_seed(6)
    steps, batch, frames, dim = 3, 4, 10, 6
    pred = torch.randn(steps, batch, frames - steps, dim, dtype=torch.float64, requires_grad=True)
    z = torch.randn(batch, frames, dim, dtype=torch.float64, requires_grad=True)
    lengths, speakers = torch.tensor([10, 7, 9, 5]), torch.tensor([0, 1, 0, 1])
    out = CPCCriterion(mode, temperature=0.2, similarity="mean", step_reduction="sum")(
        pred, z, lengths, speakers)
    ref, ref_steps = naive_cpc_loss(pred / dim, z, lengths.tolist(), speakers.tolist(), mode, 0.2)
    torch.testing.assert_close(out.loss, ref * steps, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.step_loss, ref_steps.detach().float())
    g = torch.autograd.grad(out.loss, (pred, z))
    g_ref = torch.autograd.grad(ref * steps, (pred, z))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # queries t < P = S - K only
    assert out.step_queries.tolist() == [
        sum(min(frames - steps, n - k) for n in lengths.tolist()) for k in (1, 2, 3)]


def test_accuracy_is_one_when_predictions_equal_keys():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(4, 10, 16), dim=-1) * 5  # self-dot is the unique max
    steps = 3
    pred = torch.stack([torch.cat([z[:, k:], torch.zeros(4, k, 16)], 1)
                        for k in range(1, steps + 1)])
    out = CPCCriterion("batch")(pred, z)
    assert torch.all(out.step_accuracy == 1.0)
    assert out.step_queries.tolist() == [36, 32, 28]


def test_speaker_mode_needs_speakers_and_bad_mode_named():
    with pytest.raises(ValueError, match="negatives='nope'.*'global'"):
        CPCCriterion("nope")
    with pytest.raises(TypeError, match="process_group='world'"):
        CPCCriterion("global", process_group="world")
    with pytest.raises(ValueError, match="n_negatives=8: sampled negatives are not supported "
                                         "with negatives='global'"):
        CPCCriterion("global", n_negatives=8)
    with pytest.raises(ValueError, match="n_negatives=-1"):
        CPCCriterion(n_negatives=-1)
    with pytest.raises(ValueError, match="exclude_near=-2"):
        CPCCriterion(n_negatives=4, exclude_near=-2)
    with pytest.raises(ValueError, match="exclude_near=2: only with sampled"):
        CPCCriterion(exclude_near=2)
    with pytest.raises(ValueError, match="step_reduction='max'"):
        CPCCriterion(step_reduction="max")
    with pytest.raises(ValueError, match="similarity='l2'"):
        CPCCriterion(similarity="l2")
    with pytest.raises(ValueError, match=r"predictions.shape=\(2, 3, 6, 4\).*P <= S"):
        CPCCriterion()(torch.randn(2, 3, 6, 4), torch.randn(3, 5, 4))
    with pytest.raises(TypeError, match="generator=3"):
        CPCCriterion(n_negatives=2)(torch.randn(2, 3, 5, 4), torch.randn(3, 5, 4), generator=3)
    crit = CPCCriterion("speaker")
    with pytest.raises(ValueError, match="speakers=None"):
        crit(torch.randn(2, 3, 5, 4), torch.randn(3, 5, 4))


# --------------------------------------------------------------------------------------------
# sampled negatives (n_negatives > 0): the draw, then the loss on the same draw
# --------------------------------------------------------------------------------------------
def _draw(lengths, groups, queries, n, steps, exclude_near, seed):
    return sample_negatives(torch.tensor(lengths), torch.tensor(groups), queries, n, steps,
                            exclude_near, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("exclude_near", [None, 0, 2])
def test_sample_negatives_properties(exclude_near):
    """Within the group, within the drawn sequence's valid length (an empty sequence never
    drawn), never the query's own time t (mod the length), never within exclude_near frames of
    a positive in the query's own sequence, and roughly uniform over sequences and times."""
    lengths, groups, steps = [40, 25, 33, 0, 40], [0, 1, 0, 0, 0], 4
    queries, n = 30, 400
    idx = _draw(lengths, groups, queries, n, steps, exclude_near, seed=7)
    assert idx.shape == (5, queries, n, 2) and idx.dtype == torch.long
    seq, time = idx.unbind(-1)
    L, G = torch.tensor(lengths), torch.tensor(groups)
    b = torch.arange(5)[:, None, None].expand_as(seq)
    t = torch.arange(queries)[None, :, None].expand_as(seq)
    assert (time >= 0).all()  # every sequence drawn here has allowed frames
    assert (G[seq] == G[b]).all()
    assert (time < L[seq]).all()
    assert not (seq == 3).any()  # no valid frame
    query = t + 1 < L[b]  # positions that are queries for some step
    assert not (query & (time == t % L[seq])).any()
    own = query & (seq == b)
    if exclude_near is not None:
        lo, hi = t + 1 - exclude_near, t + steps + exclude_near
        assert not (own & (time >= lo) & (time <= hi)).any()
        lo = torch.minimum(lo, t)  # t itself is never drawn either (CPC_audio's rule)
        assert (own & (time == hi + 1)).any() and (own & (time == lo - 1)).any()  # tight
    else:
        assert (own & (time == t + 1)).any()  # CPC_audio: the positive's frames may be drawn
    assert (seq[1] == 1).all()  # alone in its group
    # uniform over the group's sequences: 0, 2, 4 for b = 0 (12000 draws, 1/3 each)
    counts = torch.bincount(seq[0].flatten(), minlength=5)[[0, 2, 4]].double()
    assert ((counts / counts.sum() - 1 / 3).abs() < 0.03).all(), counts
    if exclude_near is None:  # uniform over the 39 offsets (t' - t) mod 40 of sequence 0
        sel = seq[0] == 0
        offsets = (time[0][sel] - t[0][sel]) % 40
        hist = torch.bincount(offsets, minlength=40).double()
        assert hist[0] == 0
        expected = sel.sum() / 39
        chi2 = float(((hist[1:] - expected) ** 2 / expected).sum())
        assert chi2 < 80, chi2  # 38 degrees of freedom: mean 38, sd 8.7


def test_sample_negatives_drops_when_nothing_is_allowed():
    """A sequence alone in its group ("sequence" mode) shorter than the excluded interval has
    no allowed frame for some queries: time -1 exactly there."""
    idx = _draw([8], [0], 7, 16, 4, 2, seed=1)
    time = idx[..., 1]
    for t in range(7):  # forbidden [t - 1, t + 6] clipped to [0, 7]: allowed 8 - 8 or fewer
        allowed = [x for x in range(8) if not (t - 1 <= x <= t + 6) and x != t]
        if allowed:
            assert set(time[0, t].tolist()) <= set(allowed)
        else:
            assert (time[0, t] == -1).all()
    assert (time == -1).any() and (time >= 0).any()


def test_sample_negatives_reproducible_with_a_generator():
    a = _draw([20, 15, 20], [0, 0, 1], 10, 8, 3, None, seed=3)
    b = _draw([20, 15, 20], [0, 0, 1], 10, 8, 3, None, seed=3)
    c = _draw([20, 15, 20], [0, 0, 1], 10, 8, 3, None, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def naive_sampled_loss(pred, z, lengths, idx, temperature, similarity, reduction):
    """Float64 reference from the same draw: for each query (b, t), t < P, t + k < length_b,
    cross-entropy over [q . z_{b,t+k}, q . z_{b',t'} for each kept negative] / temperature
    (/ C for "mean"); per-step mean; sum or mean over steps. Also the strict-max accuracy."""
    steps, batch, pframes, dim = pred.shape
    scale = 1.0 / dim if similarity == "mean" else 1.0
    step_losses, step_acc = [], []
    for k in range(1, steps + 1):
        terms, correct = [], []
        for b in range(batch):
            for t in range(pframes):
                if t + k >= lengths[b] or t + k >= z.shape[1]:
                    continue
                q = pred[k - 1, b, t]
                cands = [z[b, t + k]] + [z[b2, t2] for b2, t2 in idx[b, t].tolist() if t2 >= 0]
                logits = torch.stack([q @ c for c in cands]) * scale / temperature
                terms.append(-torch.log_softmax(logits, 0)[0])
                correct.append(all(bool(logits[0] > x) for x in logits[1:]))  # none: True
        step_losses.append(torch.stack(terms).mean() if terms else pred.new_zeros(()))
        step_acc.append(sum(correct) / len(correct) if correct else float("nan"))
    losses = torch.stack(step_losses)
    loss = losses.sum() if reduction == "sum" else losses.mean()
    return loss, losses, torch.tensor(step_acc)


SAMPLED_CASES = [  # mode, exclude_near, similarity, reduction, P = S - K (transformer) or S
    ("batch", None, "mean", "sum", True),
    ("sequence", 1, "dot", "mean", False),
    ("speaker", 0, "mean", "mean", True),
    ("speaker", None, "dot", "sum", False),
]


@pytest.mark.parametrize("mode,exclude_near,similarity,reduction,short", SAMPLED_CASES)
def test_sampled_loss_matches_reference_on_the_same_draw(mode, exclude_near, similarity,
                                                        reduction, short):
    torch.manual_seed(8)
    steps, batch, frames, dim, n_neg = 3, 4, 12, 5, 6
    pframes = frames - steps if short else frames
    pred = torch.randn(steps, batch, pframes, dim, dtype=torch.float64, requires_grad=True)
    z = torch.randn(batch, frames, dim, dtype=torch.float64)
    z = (z + 0.7 * F.pad(pred[0].detach(), (0, 0, 0, frames - pframes))).requires_grad_()
    lengths, speakers = torch.tensor([12, 7, 10, 5]), torch.tensor([4, 2, 4, 2])
    crit = CPCCriterion(mode, temperature=0.3, accuracy_rows=10_000, similarity=similarity,
                        n_negatives=n_neg, exclude_near=exclude_near, step_reduction=reduction)
    out = crit(pred, z, lengths, speakers, generator=torch.Generator().manual_seed(21))
    groups = {"batch": torch.zeros(batch, dtype=torch.long), "sequence": torch.arange(batch),
              "speaker": speakers}[mode]
    idx = sample_negatives(lengths, groups, pframes, n_neg, steps, exclude_near,
                           torch.Generator().manual_seed(21))
    if mode == "sequence":
        assert (idx[..., 0] == torch.arange(batch)[:, None, None]).all()
    ref, ref_steps, ref_acc = naive_sampled_loss(pred, z, lengths.tolist(), idx, 0.3,
                                                 similarity, reduction)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.step_loss, ref_steps.detach().float())
    torch.testing.assert_close(out.step_accuracy, ref_acc.float(), equal_nan=True)
    assert 0 < float(ref_acc[0]) < 1  # neither vacuous nor saturated
    assert out.step_queries.tolist() == [
        sum(max(0, min(pframes, n - k)) for n in lengths.tolist()) for k in (1, 2, 3)]
    up = torch.rand((), dtype=torch.float64) + 0.5
    g = torch.autograd.grad(out.loss * up, (pred, z))
    g_ref = torch.autograd.grad(ref * up, (pred, z))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for b, n in enumerate(lengths.tolist()):  # padding: neither positive nor negative
        assert g[1][b, n:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sampled_lower_precision_accumulates_in_float32(dtype):
    """Inputs in float32 / bfloat16 / float16: the loss at float32-level tolerance of the
    float64 reference on the same (rounded) inputs, the gradients within one rounding to the
    input dtype of it (the products and the log-softmax run in float32)."""
    torch.manual_seed(10)
    steps, batch, frames, dim = 2, 3, 10, 8
    pred = torch.randn(steps, batch, frames, dim).to(dtype).requires_grad_()
    z = torch.randn(batch, frames, dim).to(dtype).requires_grad_()
    lengths = torch.tensor([10, 6, 9])
    crit = CPCCriterion("batch", temperature=0.5, n_negatives=5)
    out = crit(pred, z, lengths, generator=torch.Generator().manual_seed(2))
    assert out.loss.dtype == torch.float32
    idx = sample_negatives(lengths, torch.zeros(batch, dtype=torch.long), frames, 5, steps, None,
                           torch.Generator().manual_seed(2))
    p64 = pred.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_()
    ref, _, _ = naive_sampled_loss(p64, z64, lengths.tolist(), idx, 0.5, "dot", "mean")
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(out.loss, (pred, z))
    g_ref = torch.autograd.grad(ref, (p64, z64))
    ulp = torch.finfo(dtype).eps
    for a, b in zip(g, g_ref):
        assert a.dtype == dtype
        assert ((a.double() - b).abs() <= ulp * b.abs() + 1e-6).all()


def test_sampled_generator_drives_the_draw_and_sum_is_k_times_mean():
    torch.manual_seed(9)
    pred, z = torch.randn(3, 2, 10, 4), torch.randn(2, 10, 4)
    crit = CPCCriterion("batch", n_negatives=5)
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a, b, c = (crit(pred, z, generator=gen(s)).loss for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    total = CPCCriterion("batch", n_negatives=5, step_reduction="sum")(pred, z, generator=gen(1))
    torch.testing.assert_close(total.loss, 3 * a)
    torch.testing.assert_close(total.loss, total.step_loss.sum())


def test_sampled_accuracy_ties_count_as_wrong_and_exact_keys_are_right():
    z = torch.ones(2, 8, 4)  # every logit equal: a tie, never counted as correct
    out = CPCCriterion("batch", n_negatives=4)(torch.ones(2, 2, 8, 4), z,
                                               generator=torch.Generator().manual_seed(0))
    assert torch.all(out.step_accuracy == 0)
    torch.manual_seed(0)
    z = F.normalize(torch.randn(2, 12, 16), dim=-1) * 5  # self-dot is the unique max
    pred = torch.stack([torch.cat([z[:, k:], torch.zeros(2, k, 16)], 1) for k in (1, 2)])
    # exclude_near=0: the positive's own frame is never a negative, so every query is right
    out = CPCCriterion("sequence", n_negatives=8, exclude_near=0)(
        pred, z, generator=torch.Generator().manual_seed(0))
    assert torch.all(out.step_accuracy == 1)
    # CPC_audio's rule alone draws the positive's own frame as a negative at times: a tie
    out = CPCCriterion("sequence", n_negatives=8)(pred, z,
                                                  generator=torch.Generator().manual_seed(0))
    assert torch.all(out.step_accuracy < 1)


# --------------------------------------------------------------------------------------------
# negatives="global": batch negatives across the ranks of a process group
# --------------------------------------------------------------------------------------------
def test_global_in_one_process_is_batch():
    """Without a process group, "global" is exactly "batch" (loss, accuracy, gradients)."""
    torch.manual_seed(2)
    pred = torch.randn(3, 4, 8, 6, requires_grad=True)
    z = torch.randn(4, 8, 6, requires_grad=True)
    lengths = torch.tensor([8, 5, 8, 3])
    outs, grads = [], []
    for mode in ("batch", "global"):
        out = CPCCriterion(mode, temperature=0.5)(pred, z, lengths)
        outs.append(out)
        grads.append(torch.autograd.grad(out.loss, (pred, z)))
    assert torch.equal(outs[0].loss, outs[1].loss)
    assert torch.equal(outs[0].step_accuracy, outs[1].step_accuracy)
    assert torch.equal(outs[0].step_queries, outs[1].step_queries)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _global_inputs(case: str, dtype: torch.dtype):
    """The concatenated batch of a case (rank r's sequences are rows r*B .. (r+1)*B - 1) and a
    random upstream gradient."""
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    steps, batch, frames, dim = 3, GLOBAL_RANKS * GLOBAL_BATCH, 9, 5
    pred = torch.randn(steps, batch, frames, dim, generator=gen)
    z = 0.5 * pred[0] + torch.randn(batch, frames, dim, generator=gen)  # predictable keys
    if case == "fewer":  # predictions over P = 6 < S = 9 frames (the transformer's W)
        pred = pred[:, :, :6].contiguous()
    lengths = torch.tensor([v for rank in GLOBAL_LENGTHS[case] for v in rank])
    upstream = 0.5 + torch.rand((), generator=gen)
    return pred.to(dtype), z.to(dtype), lengths, upstream.to(dtype)


GLOBAL_RANKS, GLOBAL_BATCH = 2, 3
#: each rank's sequence lengths per case. "full": no padding, every rank the same counts (no
#: padding rows); "padded": different counts per rank, and rank 1 has no query at all for step
#: 3 (all its rows are padding); "short": no rank has a query for steps 2 and 3; "fewer":
#: predictions over 6 of the 9 frames.
GLOBAL_LENGTHS = {
    "full": ([9, 9, 9], [9, 9, 9]),
    "padded": ([9, 6, 8], [3, 2, 3]),
    "short": ([2, 1, 2], [1, 2, 1]),
    "fewer": ([9, 7, 8], [9, 5, 9]),
}
GLOBAL_CRITERIA = {"dot": dict(temperature=0.5), "cosine": dict(temperature=0.1, similarity="cosine")}
GLOBAL_TOL = {"float64": 1e-10, "float32": 1e-5}


class _TinyCPC(nn.Module):
    """A differentiable stand-in for the CPC model: z = W x, predictions_k = P_k z."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 5)
        self.predictors = nn.Linear(5, 3 * 5)

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)  # (B, S, 5)
        b, s, _ = z.shape
        return z, self.predictors(z).view(b, s, 3, 5).permute(2, 0, 1, 3)  # (K, B, S, C)


def _ddp_inputs():
    gen = torch.Generator().manual_seed(11)
    return torch.randn(GLOBAL_RANKS * GLOBAL_BATCH, 9, 4, generator=gen, dtype=torch.float64)


def _tiny_model() -> nn.Module:
    torch.manual_seed(5)
    return _TinyCPC().double()


def _global_worker(rank: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=GLOBAL_RANKS, timeout=timedelta(seconds=60))
    rows = slice(rank * GLOBAL_BATCH, (rank + 1) * GLOBAL_BATCH)
    results = {}
    try:
        for case in GLOBAL_LENGTHS:
            for dtype_name in GLOBAL_TOL:
                pred, z, lengths, up = _global_inputs(case, getattr(torch, dtype_name))
                pred = pred[:, rows].clone().requires_grad_()
                z = z[rows].clone().requires_grad_()
                for sim, kwargs in GLOBAL_CRITERIA.items():
                    crit = CPCCriterion("global", accuracy_rows=10_000, **kwargs)  # default group
                    out = crit(pred, z, lengths[rows])
                    g_pred, g_z = torch.autograd.grad(out.loss * up, (pred, z))
                    results[case, dtype_name, sim] = dict(
                        loss=out.loss.detach(), step_loss=out.step_loss, acc=out.step_accuracy,
                        queries=out.step_queries, g_pred=g_pred, g_z=g_z)
        # ranks that disagree on C: a ValueError on every rank, no hang
        try:
            CPCCriterion("global")(torch.randn(3, 2, 6, 4 + rank), torch.randn(2, 6, 4 + rank))
            results["mismatch"] = None
        except ValueError as err:
            results["mismatch"] = str(err)
        # a DDP model: its averaged parameter gradients, and the parameters after one step
        model = _tiny_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        z, pred = ddp(_ddp_inputs()[rows])
        crit = CPCCriterion("global", temperature=0.5, process_group=dist.group.WORLD)
        crit(pred, z, torch.tensor(GLOBAL_LENGTHS["padded"][rank])).loss.backward()
        results["ddp"] = {name: p.grad.clone() for name, p in model.named_parameters()}
        opt.step()
        results["ddp params"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    finally:
        torch.save(results, Path(folder) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def global_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cpc_gloo")
    ctx = mp.spawn(_global_worker, args=(str(folder),), nprocs=GLOBAL_RANKS, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail("the gloo processes did not finish within 120 s (a hang)")
    return [torch.load(folder / f"rank{r}.pt") for r in range(GLOBAL_RANKS)]


def _close(got, want, rtol, what):
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("sim", list(GLOBAL_CRITERIA))
@pytest.mark.parametrize("dtype_name", list(GLOBAL_TOL))
@pytest.mark.parametrize("case", list(GLOBAL_LENGTHS))
def test_global_matches_one_process_on_the_concatenated_batch(global_ranks, case, dtype_name, sim):
    """Each rank returns R x its share (see cpc.criterion): the ranks' mean loss is the loss of
    one process on the concatenated batch with "batch" negatives, and grad_r / R (what DDP's
    averaging makes of it) is that loss's gradient of rank r's rows."""
    pred, z, lengths, up = _global_inputs(case, getattr(torch, dtype_name))
    pred.requires_grad_()
    z.requires_grad_()
    ref = CPCCriterion("batch", accuracy_rows=10_000, **GLOBAL_CRITERIA[sim])(pred, z, lengths)
    g_pred, g_z = torch.autograd.grad(ref.loss * up, (pred, z))
    ranks = [res[case, dtype_name, sim] for res in global_ranks]
    rtol, what = GLOBAL_TOL[dtype_name], f"{case}, {dtype_name}, {sim}"
    _close(torch.stack([r["loss"] for r in ranks]).mean(), ref.loss.detach(), rtol, f"{what}: loss")
    # step_loss is reported in float32 whatever the dtype
    _close(torch.stack([r["step_loss"] for r in ranks]).mean(0), ref.step_loss, max(rtol, 1e-6),
           f"{what}: step losses")
    _close(torch.cat([r["g_pred"] for r in ranks], dim=1) / GLOBAL_RANKS, g_pred, rtol, f"{what}: d pred")
    _close(torch.cat([r["g_z"] for r in ranks], dim=0) / GLOBAL_RANKS, g_z, rtol, f"{what}: d z")
    assert g_z.abs().max() > 0
    for r in ranks:  # the group's accuracy and query counts, on every rank
        assert r["queries"].tolist() == ref.step_queries.tolist()
        torch.testing.assert_close(r["acc"], ref.step_accuracy, rtol=0, atol=0, equal_nan=True)
    if case != "short":  # the accuracy is not vacuous: some queries are ranked first, some not
        assert 0 < float(ref.step_accuracy[0]) < 1 or case in ("full", "fewer")
    if case == "padded":  # padded frames get no gradient (the last valid query is at length-2)
        for b, n in enumerate(lengths.tolist()):
            r, row = divmod(b, GLOBAL_BATCH)
            assert global_ranks[r][case, dtype_name, sim]["g_z"][row, n:].abs().sum() == 0


def test_global_under_ddp_gives_the_one_process_gradient(global_ranks):
    """DistributedDataParallel over the "global" criterion: the averaged parameter gradients
    equal the gradients of one process on the concatenated batch, and every rank ends the
    optimizer step with the same parameters."""
    model = _tiny_model()
    z, pred = model(_ddp_inputs())
    lengths = torch.tensor([v for rank in GLOBAL_LENGTHS["padded"] for v in rank])
    CPCCriterion("batch", temperature=0.5)(pred, z, lengths).loss.backward()
    for name, p in model.named_parameters():
        for r, res in enumerate(global_ranks):
            _close(res["ddp"][name], p.grad, 1e-10, f"rank {r}: gradient of {name}")
    for name in global_ranks[0]["ddp params"]:
        assert torch.equal(global_ranks[0]["ddp params"][name], global_ranks[1]["ddp params"][name]), name


def test_global_ranks_with_different_features_raise_on_every_rank(global_ranks):
    for r, res in enumerate(global_ranks):
        assert res["mismatch"] is not None, f"rank {r} did not raise"
        assert f"predictions.shape=(3, 2, 6, {4 + r}) on rank {r}" in res["mismatch"]
        assert "[(3, 4), (3, 5)]" in res["mismatch"], res["mismatch"]
