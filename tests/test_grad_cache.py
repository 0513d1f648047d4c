"""recipes.common.grad_cache: the cached step's gradients equal the one-shot step's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import csrc_triton
from recipes.common.grad_cache import Tower, grad_cache_step


class RowWiseNet(nn.Module):
    """Conv net without batch-coupled layers, with dropout (random) and a counter buffer."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(6, 5)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls += 1
        h = torch.relu(self.norm(self.conv(x))).mean((2, 3))
        return {"feature": h, "projection": self.proj(self.drop(h))}


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _simclr_loss(outputs):
    z = outputs[0]["projection"]
    b = z.shape[0] // 2
    loss = csrc_triton.nt_xent(z[:b], z[b:], temperature=0.3, backend="dense")
    return loss, {"rows": z.shape[0]}


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunked_gradients_equal_one_shot(chunk):
    torch.manual_seed(0)
    model = RowWiseNet().double()
    x = torch.randn(14, 3, 9, 9, dtype=torch.float64)
    loss_ref, _, out_ref = grad_cache_step([Tower(model, x, model)], _simclr_loss, None)
    ref = _grads(model)
    model.zero_grad()
    loss, aux, out = grad_cache_step([Tower(model, x, model)], _simclr_loss, chunk)
    assert aux == {"rows": 14}
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0]["projection"], out_ref[0]["projection"], rtol=1e-12,
                               atol=1e-12)
    for g, r in zip(_grads(model), ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert not loss.requires_grad


def test_two_towers_clip_gradients():
    """Two encoders of different inputs (image-like and token-like) under one CLIP loss."""
    torch.manual_seed(1)
    image_net = RowWiseNet().double()
    text_net = nn.EmbeddingBag(50, 5, mode="mean").double()

    def text_forward(ids, offsets_mask):
        # ids (n, L) and a 0/1 mask (n, L): mean of the embeddings of the unmasked tokens
        emb = text_net.weight[ids] * offsets_mask[..., None]
        return {"projection": emb.sum(1) / offsets_mask.sum(1, keepdim=True)}

    images = torch.randn(11, 3, 8, 8, dtype=torch.float64)
    ids = torch.randint(0, 50, (11, 6))
    mask = (torch.rand(11, 6) > 0.3).double()
    mask[:, 0] = 1

    def loss_fn(outs):
        return csrc_triton.clip_loss(outs[0]["projection"], outs[1]["projection"], 5.0,
                                     backend="dense"), None

    towers = lambda: [Tower(image_net, images, image_net),  # noqa: E731
                      Tower(text_forward, (ids, mask), text_net)]
    grad_cache_step(towers(), loss_fn, None)
    ref = _grads(image_net) + _grads(text_net)
    image_net.zero_grad()
    text_net.zero_grad()
    grad_cache_step(towers(), loss_fn, 4)
    for g, r in zip(_grads(image_net) + _grads(text_net), ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_dropout_replays_the_same_masks_and_rng_continues():
    """With dropout the cached step equals the autograd step of the chunked forward drawn from
    the same RNG state, and leaves the RNG where that forward would have."""
    model = RowWiseNet(dropout=0.5).double()
    x = torch.randn(10, 3, 8, 8, dtype=torch.float64)

    torch.manual_seed(5)
    chunks = [model(x[i:i + 4]) for i in range(0, 10, 4)]
    out = {k: torch.cat([c[k] for c in chunks]) for k in ("feature", "projection")}
    _simclr_loss([out])[0].backward()
    ref = _grads(model)
    after_ref = torch.rand(3)

    model.zero_grad()
    torch.manual_seed(5)
    grad_cache_step([Tower(model, x, model)], _simclr_loss, 4)
    after = torch.rand(3)
    for g, r in zip(_grads(model), ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert torch.equal(after, after_ref)


def test_buffers_updated_once_batchnorm():
    """BatchNorm running statistics end as after one pass over the chunks, not two."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(6))
    x = torch.randn(12, 3, 6, 6)
    net(x[:2])  # materialise the lazy layer
    bn = net[1]
    bn.reset_running_stats()
    reference = nn.BatchNorm2d(4)
    with torch.no_grad():
        for i in range(0, 12, 5):
            reference(net[0](x[i:i + 5]))
    grad_cache_step([Tower(lambda t: {"projection": net(t)}, x, net)],
                    lambda o: (o[0]["projection"].square().mean(), None), 5)
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
    torch.testing.assert_close(bn.running_var, reference.running_var)
    assert int(bn.num_batches_tracked) == 3


def test_bad_chunk_size_and_outputs():
    model = RowWiseNet()
    x = torch.randn(4, 3, 5, 5)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            grad_cache_step([Tower(model, x, model)], _simclr_loss, bad)
    with pytest.raises(TypeError, match=r"towers\[0\]"):
        grad_cache_step([Tower(lambda t: [t], x)], _simclr_loss, 2)
    with pytest.raises(ValueError, match="towers"):
        grad_cache_step([], _simclr_loss, 2)
