"""modalities.image.methods: every method's training step on a fixed batch, the EMA target and
MoCo's queue, the gradient-cache contract (``loss`` on detached leaves of ``forward``'s outputs
gives the direct graph's gradients), row-wise ``forward``, exact resume from ``state_dict``, bad
arguments, and a 2-process gloo job in which every method's loss and parameter gradients,
averaged over the ranks, equal one process's on the concatenated batch (float64, modules in
eval mode so that BatchNorm is per sample).
"""
from __future__ import annotations

import math
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from modalities.image.backbones import build_backbone
from modalities.image.methods import (
    LABELLED_METHODS,
    METHODS,
    TARGET_METHODS,
    Method,
    MethodConfig,
    MoCo,
    build_method,
)

B = 8  # images per batch
SIZE = 16  # pixels
NUM_CLASSES = 4
SPAWN_TIMEOUT_S = 120.0


def _config(name: str, **overrides) -> MethodConfig:
    opts = dict(name=name, projection_dim=16, projection_hidden=32, queue_size=32)
    opts.update(overrides)
    return MethodConfig(**opts)


def _method(name: str, seed: int = 0, **overrides) -> Method:
    torch.manual_seed(seed)
    return build_method(_config(name, **overrides), build_backbone("small_cnn", width=4), num_classes=NUM_CLASSES)


def _batch(n_views: int, seed: int = 1, images: int = B, dtype=torch.float32):
    """View-major rows (n_views * images, 3, SIZE, SIZE) and labels (images,): two images per
    class, so that positives exist beyond an image's own views."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_views * images, 3, SIZE, SIZE, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.arange(images) % NUM_CLASSES
    return x, labels


def _first_conv(method: Method) -> nn.Conv2d:
    return next(m for m in method.encoder.modules() if isinstance(m, nn.Conv2d))


def _step(method: Method, x, labels):
    online = method(x)
    target = method.forward_target(x)
    return online, target, method.loss(online, target, labels, method.n_views)


@pytest.mark.parametrize("name", METHODS)
def test_step_gives_finite_loss_and_gradients_everywhere(name):
    method = _method(name)
    x, labels = _batch(method.n_views)
    online, target, (loss, stats) = _step(method, x, labels)
    n = x.shape[0]
    assert tuple(online["feature"].shape) == (n, method.encoder.feature_dim)
    for key in method.online_keys:
        assert online[key].shape[0] == n and online[key].requires_grad
    assert (target is not None) == (name in TARGET_METHODS) == method.uses_target
    if target is not None:
        assert not target["projection"].requires_grad
        assert target["projection"].shape == online["projection"].shape
    assert method.needs_labels == (name in LABELLED_METHODS)
    assert method.n_views == (1 if name == "supervised" else 2)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(stats) >= {"loss"} and float(stats["loss"]) == float(loss.detach())
    for key, value in stats.items():
        assert not isinstance(value, torch.Tensor) or (value.dim() == 0 and not value.requires_grad), key
    loss.backward()
    assert _first_conv(method).weight.grad.abs().sum() > 0
    # every trainable parameter takes part (DDP needs no find_unused_parameters)
    for pname, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        else:
            assert p.grad is None, pname


@pytest.mark.parametrize("name", TARGET_METHODS)
def test_ema_target_changes_only_in_on_step_end(name):
    method = _method(name, momentum=0.99, momentum_final=1.0)
    pairs = ((method.encoder, method.target_encoder), (method.projector, method.target_projector))
    for online_mod, target_mod in pairs:
        for (n1, p), (n2, t) in zip(online_mod.named_parameters(), target_mod.named_parameters()):
            assert n1 == n2 and torch.equal(p, t) and not t.requires_grad
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    x, labels = _batch(2)
    _, _, (loss, _) = _step(method, x, labels)
    before = {k: v.clone() for k, v in method.state_dict().items() if k.startswith("target_")}
    online_before = _first_conv(method).weight.detach().clone()
    loss.backward()
    optimizer.step()
    for key, value in method.state_dict().items():
        if key.startswith("target_"):
            assert torch.equal(value, before[key]), f"{key} changed in backward / optimizer.step"
    assert not torch.equal(_first_conv(method).weight, online_before)
    method(_batch(2, seed=5)[0])  # online BatchNorm statistics move away from the target's
    for key, value in method.state_dict().items():
        if key.startswith("target_"):
            assert torch.equal(value, before[key]), f"{key} changed in the online forward"

    step, total = 3, 10
    method.on_step_end(step, total)
    m = 1 - (1 - 0.99) * (math.cos(math.pi * step / total) + 1) / 2  # BYOL's schedule, written out
    assert method.current_momentum == pytest.approx(m, rel=1e-14)
    after, online = method.state_dict(), method.state_dict()
    last_bias = f"projector.net.{len(method.projector.net) - 1}.bias"
    for key in ("encoder.stages.0.0.0.weight", last_bias, "encoder.stages.1.1.running_mean"):
        t_key = "target_" + key
        expected = m * before[t_key] + (1 - m) * online[key]
        torch.testing.assert_close(after[t_key], expected, rtol=1e-6, atol=1e-8)
        assert not torch.equal(after[t_key], before[t_key])
    _, _, (_, stats) = _step(method, x, labels)
    assert float(stats["momentum"]) == pytest.approx(m, rel=1e-14)  # the stat reports the last m


def _unit_keys(method: Method, x) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(method.forward_target(x)["projection"], dim=1)


def test_moco_queue_pointer_and_contents():
    method = _method("moco", queue_size=12)
    assert isinstance(method, MoCo)
    torch.testing.assert_close(method.queue.norm(dim=1), torch.ones(12))
    assert int(method.queue_ptr) == 0
    initial = method.queue.clone()

    x, labels = _batch(2, seed=1)
    _, target, _ = _step(method, x, labels)
    keys = F.normalize(target["projection"], dim=1)[B:]  # view 1 (rows B .. 2B - 1)
    method.on_step_end(0, 10)
    assert int(method.queue_ptr) == 8
    torch.testing.assert_close(method.queue[:8], keys, rtol=0, atol=0)
    torch.testing.assert_close(method.queue[8:], initial[8:], rtol=0, atol=0)

    x2, _ = _batch(2, seed=2)
    _, target2, _ = _step(method, x2, labels)
    keys2 = F.normalize(target2["projection"], dim=1)[B:]
    method.on_step_end(1, 10)
    assert int(method.queue_ptr) == 4  # (8 + 8) mod 12: wrapped around
    torch.testing.assert_close(method.queue[8:], keys2[:4], rtol=0, atol=0)
    torch.testing.assert_close(method.queue[:4], keys2[4:], rtol=0, atol=0)
    torch.testing.assert_close(method.queue[4:8], keys[4:], rtol=0, atol=0)

    method.on_step_end(2, 10)  # no loss since the last step: nothing to enqueue
    assert int(method.queue_ptr) == 4

    method.enqueue(torch.arange(15 * 16, dtype=torch.float32).view(15, 16))  # more rows than the queue
    assert int(method.queue_ptr) == 4  # (4 + 12) mod 12
    torch.testing.assert_close(method.queue[4:], torch.arange(3 * 16, 11 * 16, dtype=torch.float32).view(8, 16))
    torch.testing.assert_close(method.queue[:4], torch.arange(11 * 16, 15 * 16, dtype=torch.float32).view(4, 16))


def test_moco_loss_against_cross_entropy_with_the_queue():
    """MoCo's symmetric loss written with dense logits [q.k+, q.queue] / t and target 0."""
    method = _method("moco", temperature=0.3)
    x, labels = _batch(2)
    online, target, (loss, _) = _step(method, x, labels)
    q = F.normalize(online["projection"].detach().double(), dim=1)
    k = F.normalize(target["projection"].double(), dim=1)
    queue = method.queue.double()

    def one_direction(q_, k_):
        logits = torch.cat([(q_ * k_).sum(1, keepdim=True), q_ @ queue.T], dim=1) / 0.3
        return F.cross_entropy(logits, torch.zeros(q_.shape[0], dtype=torch.int64))

    expected = (one_direction(q[:B], k[B:]) + one_direction(q[B:], k[:B])) / 2
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_loss_on_detached_leaves_gives_the_direct_gradients(name):
    """The gradient cache's contract: loss(leaves), its gradients w.r.t. the leaves pushed back
    through forward's graph, equal the direct loss.backward() (BatchNorm in training mode: the
    same batch gives the same statistics both times)."""
    method = _method(name)
    x, labels = _batch(method.n_views)
    online, target, (loss, _) = _step(method, x, labels)
    loss.backward()
    direct = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad(set_to_none=True)

    online = method(x)
    leaves = {k: v.detach().requires_grad_() for k, v in online.items()}
    cached, _ = method.loss(leaves, target, labels, method.n_views)
    torch.testing.assert_close(cached, loss.detach(), rtol=0, atol=0)
    grads = torch.autograd.grad(cached, list(leaves.values()), allow_unused=True)
    used = [(online[k], g) for k, g in zip(leaves, grads) if g is not None]
    assert used, "the loss uses none of forward's outputs"
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    cached_grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    assert cached_grads.keys() == direct.keys()
    for n, g in direct.items():
        torch.testing.assert_close(cached_grads[n], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} {n}: {m}")


@pytest.mark.parametrize("name", METHODS)
def test_forward_is_row_wise(name):
    """In eval mode (BatchNorm per sample) forward on chunks of rows, concatenated, is forward on
    all rows: what a gradient cache relies on."""
    method = _method(name).eval()
    x, _ = _batch(2)
    with torch.no_grad():
        whole = method(x)
        parts = [method(chunk) for chunk in x.split(5)]
        for key, value in whole.items():
            torch.testing.assert_close(torch.cat([p[key] for p in parts]), value, rtol=1e-5, atol=1e-6)
        target = method.forward_target(x)
        if target is not None:
            parts = [method.forward_target(chunk)["projection"] for chunk in x.split(5)]
            torch.testing.assert_close(torch.cat(parts), target["projection"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["moco", "byol"])
def test_state_dict_restores_target_and_queue_exactly(name, tmp_path):
    method = _method(name, seed=0)
    x, labels = _batch(2)
    _, _, (loss, _) = _step(method, x, labels)
    loss.backward()
    method.on_step_end(0, 5)
    path = tmp_path / "state.pt"
    torch.save(method.state_dict(), path)
    restored = _method(name, seed=123)
    restored.load_state_dict(torch.load(path, weights_only=True))
    state = method.state_dict()
    assert any(k.startswith("target_encoder.") for k in state)
    if name == "moco":
        assert {"queue", "queue_ptr"} <= state.keys() and int(restored.queue_ptr) == B
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_nt_xent_and_supcon_definitions():
    """SimCLR against NT-Xent written densely; SupCon's positives are the other view and the
    images of the same label."""
    method = _method("simclr", temperature=0.5)
    x, labels = _batch(2)
    online, _, (loss, _) = _step(method, x, labels)
    z = F.normalize(online["projection"].detach().double(), dim=1)
    sim = z @ z.T / 0.5
    sim.fill_diagonal_(float("-inf"))
    partner = (torch.arange(2 * B) + B) % (2 * B)
    torch.testing.assert_close(loss.double(), F.cross_entropy(sim, partner), rtol=1e-5, atol=1e-6)

    method = _method("supcon", temperature=0.5)
    online, _, (loss, _) = _step(method, x, labels)
    z = F.normalize(online["projection"].detach().double(), dim=1)
    y = labels.repeat(2)
    sim = z @ z.T / 0.5
    eye = torch.eye(2 * B, dtype=torch.bool)
    log_prob = sim - torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    positives = (y[:, None] == y[None, :]) & ~eye
    expected = -((log_prob * positives).sum(1) / positives.sum(1)).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="MethodConfig.name='simclrr' is not one of"):
        MethodConfig(name="simclrr")
    with pytest.raises(ValueError, match="temperature must be finite and > 0.*0"):
        MethodConfig(temperature=0.0)
    with pytest.raises(ValueError, match=r"momentum must be finite and >= 0.0 and <= 1.0.*1.5"):
        MethodConfig(momentum=1.5)
    with pytest.raises(ValueError, match="vicreg_weights must be 3 numbers"):
        MethodConfig(vicreg_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="loss_backend='cuda'"):
        MethodConfig(loss_backend="cuda")
    with pytest.raises(TypeError, match="queue_size must be an int"):
        MethodConfig(queue_size=10.0)
    assert MethodConfig(vicreg_weights=[1, 2, 3]).to_dict()["vicreg_weights"] == [1.0, 2.0, 3.0]
    backbone = build_backbone("small_cnn", width=4)
    with pytest.raises(ValueError, match="num_classes=None.*supervised"):
        build_method(MethodConfig(name="supervised"), backbone)
    with pytest.raises(TypeError, match="config must be a MethodConfig"):
        build_method({"name": "simclr"}, backbone)

    x, labels = _batch(2)
    simclr = _method("simclr")
    out = simclr(x)
    with pytest.raises(ValueError, match="n_views=3: simclr compares exactly 2 views"):
        simclr.loss(out, None, None, 3)
    with pytest.raises(ValueError, match="15 rows, which is not n_views=2"):
        simclr.loss({"projection": out["projection"][:15]}, None, None, 2)
    with pytest.raises(ValueError, match="missing"):
        simclr.loss({"feature": out["feature"]}, None, None, 2)
    supcon = _method("supcon")
    out = supcon(x)
    with pytest.raises(TypeError, match="labels: supcon needs a tensor"):
        supcon.loss(out, None, None, 2)
    with pytest.raises(ValueError, match=r"labels must have shape \(8,\).*\(16,\)"):
        supcon.loss(out, None, labels.repeat(2), 2)
    with pytest.raises(TypeError, match="integer tensor"):
        supcon.loss(out, None, labels.float(), 2)
    byol = _method("byol")
    with pytest.raises(ValueError, match="target: byol needs the dict that forward_target returns"):
        byol.loss(byol(x), None, None, 2)


# ----------------------------------------------------------------------------------------------
# Two processes (gloo): the global batch's loss and gradients
# ----------------------------------------------------------------------------------------------
WORLD = 2
LOCAL = 4  # images per rank


def _ddp_inputs():
    """The global batch: (views, images) and labels, float64; labels cross ranks."""
    gen = torch.Generator().manual_seed(7)
    views = torch.randn(2, WORLD * LOCAL, 3, SIZE, SIZE, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 3, 2, 3])  # every class on both ranks but one
    return views, labels


def _ddp_case(name: str, views: torch.Tensor, labels: torch.Tensor, group) -> dict:
    method = _method(name).double().eval()
    method.process_group = group
    n_views = method.n_views
    x = views[:n_views].reshape(-1, 3, SIZE, SIZE)  # view-major
    online = method(x)
    target = method.forward_target(x)
    loss, _ = method.loss(online, target, labels, n_views)
    loss.backward()
    result = {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in method.named_parameters()
                                                if p.grad is not None}}
    if isinstance(method, MoCo):
        method.on_step_end(0, 10)
        result["queue"], result["queue_ptr"] = method.queue.clone(), method.queue_ptr.clone()
    return result


def _ddp_worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    results: dict = {}
    try:
        views, labels = _ddp_inputs()
        mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
        for name in METHODS:
            try:
                results[name] = _ddp_case(name, views[:, mine], labels[mine], dist.group.WORLD)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
    finally:
        torch.save(results, Path(folder) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_job(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("gloo_methods")
    ctx = mp.spawn(_ddp_worker, args=(str(folder),), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"{WORLD} gloo processes did not finish within {SPAWN_TIMEOUT_S:.0f} s (a hang)")
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", METHODS)
def test_two_ranks_match_one_process_on_the_concatenated_batch(ddp_job, name):
    ranks = [job[name] for job in ddp_job]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"{name}: rank {r} raised:\n{res['error']}"
    views, labels = _ddp_inputs()
    single = _ddp_case(name, views, labels, None)
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), single["loss"], rtol=1e-10, atol=0)
    assert all(r["grads"].keys() == single["grads"].keys() for r in ranks)
    assert single["grads"], name
    # an absolute floor from the largest gradient: some gradients are 0 in exact arithmetic
    # (a bias before a BatchNorm-like standardisation, as Barlow Twins') and rounding-sized here
    scale = max(float(g.abs().max()) for g in single["grads"].values())
    for pname, g in single["grads"].items():
        # what DDP does: average the ranks' gradients
        mean = torch.stack([r["grads"][pname] for r in ranks]).mean(0)
        torch.testing.assert_close(mean, g, rtol=1e-9, atol=1e-11 * scale,
                                   msg=lambda m: f"{name} {pname}: {m}")
    if name == "moco":  # every rank enqueued every rank's keys, in rank order
        for r in ranks:
            torch.testing.assert_close(r["queue"], single["queue"], rtol=1e-10, atol=1e-12)
            assert int(r["queue_ptr"]) == int(single["queue_ptr"]) == WORLD * LOCAL
