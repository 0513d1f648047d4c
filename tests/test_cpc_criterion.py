"""CPC criterion against a naive dense per-step InfoNCE (F.cross_entropy), for every
negative-sampling mode, with padding masks; loss and gradients."""
import pytest
import torch
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
    with pytest.raises(ValueError, match="negatives='nope'"):
        CPCCriterion("nope")
    crit = CPCCriterion("speaker")
    with pytest.raises(ValueError, match="speakers=None"):
        crit(torch.randn(2, 3, 5, 4), torch.randn(3, 5, 4))
