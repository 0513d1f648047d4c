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

from cpc.criterion import CPCCriterion


def naive_cpc_loss(pred, z, lengths, speakers, mode, temperature=1.0):
    """One cross-entropy per query, its candidates listed explicitly."""
    steps, batch, frames, _ = pred.shape
    step_losses = []
    for k in range(1, steps + 1):
        queries = [(b, t) for b in range(batch) for t in range(frames - k)
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
    crit = CPCCriterion("speaker")
    with pytest.raises(ValueError, match="speakers=None"):
        crit(torch.randn(2, 3, 5, 4), torch.randn(3, 5, 4))


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
    lengths = torch.tensor([v for rank in GLOBAL_LENGTHS[case] for v in rank])
    upstream = 0.5 + torch.rand((), generator=gen)
    return pred.to(dtype), z.to(dtype), lengths, upstream.to(dtype)


GLOBAL_RANKS, GLOBAL_BATCH = 2, 3
#: each rank's sequence lengths per case. "full": no padding, every rank the same counts (no
#: padding rows); "padded": different counts per rank, and rank 1 has no query at all for step
#: 3 (all its rows are padding); "short": no rank has a query for steps 2 and 3.
GLOBAL_LENGTHS = {
    "full": ([9, 9, 9], [9, 9, 9]),
    "padded": ([9, 6, 8], [3, 2, 3]),
    "short": ([2, 1, 2], [1, 2, 1]),
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
        assert 0 < float(ref.step_accuracy[0]) < 1 or case == "full"
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
