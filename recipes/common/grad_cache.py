"""Gradient caching: a batch of any size with the activation memory of one chunk.

A contrastive loss couples every sample of the batch, so the batch cannot simply be split into
micro-batches whose gradients are summed. It can be split in the encoder, though, because the
loss depends on the encoder only through the embeddings (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup"):

1. embed the batch chunk by chunk under ``torch.no_grad`` (no activations kept);
2. compute the loss on the concatenated embeddings, made leaves that require grad, and
   back-propagate it to them: dL/dz for every sample (the fused loss keeps this O(N));
3. embed each chunk again with autograd and back-propagate ``dL/dz`` of its rows into the
   encoder; the parameter gradients add up to exactly those of the one-shot step.

Memory is O(N) for the embeddings and one chunk's activations; the price is a second forward.

Exactness, and what it needs from the encoder:
* the forward must be row-wise, so that a chunk's embeddings do not depend on the other
  chunks. BatchNorm in training mode is not (its statistics are per chunk, as they are per rank
  under DDP): the cached step then equals the one-shot step *of that chunking*;
* random layers (dropout) must draw the same numbers in both passes: the RNG state of the
  devices involved is recorded before each chunk in pass 1 and restored for pass 2, then put
  back to where pass 1 left it;
* buffers updated by the forward (BatchNorm running statistics) would be updated twice; they
  are saved after pass 1 and restored after pass 2.

Under DDP, pass 2's backward calls of every chunk but the last run inside ``no_sync()`` so the
gradients are all-reduced once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import Tensor, nn

Outputs = dict[str, Tensor]


@dataclass
class Tower:
    """One encoder and the batch it embeds.

    ``forward(inputs) -> {name: (n, ...) tensor}`` runs with autograd (the DDP-wrapped module
    under torchrun); ``forward_no_grad`` is used for pass 1 (default: ``forward``; pass the
    unwrapped module to skip DDP's buffer broadcast). ``inputs`` is a tensor or a tuple of
    tensors sliced along dim 0 (e.g. token ids and attention mask). ``module`` holds the
    buffers to protect from a second update and the parameters' devices; ``no_sync`` is the
    DDP module's ``no_sync`` (or None)."""

    forward: Callable[..., Outputs]
    inputs: Tensor | tuple[Tensor, ...]
    module: nn.Module | None = None
    forward_no_grad: Callable[..., Outputs] | None = None
    no_sync: Callable[[], ContextManager] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        first = self.inputs[0] if isinstance(self.inputs, tuple) else self.inputs
        return int(first.shape[0])

    def chunk(self, start: int, stop: int) -> tuple[Tensor, ...]:
        if isinstance(self.inputs, tuple):
            return tuple(t[start:stop] for t in self.inputs)
        return (self.inputs[start:stop],)


def _check_outputs(out: Any, where: str) -> Outputs:
    if isinstance(out, Tensor):
        out = {"embedding": out}
    if not isinstance(out, dict) or not all(isinstance(v, Tensor) for v in out.values()):
        raise TypeError(f"{where}: expected the forward to return a dict of tensors, got "
                        f"{type(out).__name__}")
    return out


def _cat(chunks: list[Outputs]) -> Outputs:
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


def _devices(module: nn.Module | None, inputs: tuple[Tensor, ...]) -> list[int]:
    tensors = list(inputs) + (list(module.parameters()) if module is not None else [])
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


class _RngState:
    """The CPU generator and the given CUDA devices' generators."""

    def __init__(self, cuda_devices: Sequence[int]) -> None:
        self.cuda_devices = list(cuda_devices)
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.cuda_devices, self.cuda):
            torch.cuda.set_rng_state(s, d)


def grad_cache_step(towers: Sequence[Tower],
                    loss_fn: Callable[[list[Outputs]], tuple[Tensor, Any]],
                    chunk_size: int | None) -> tuple[Tensor, Any, list[Outputs]]:
    """Back-propagate ``loss_fn`` of the towers' embeddings into the towers' parameters.

    ``loss_fn(outputs)`` gets one dict per tower (rows of the whole batch) and returns
    ``(scalar loss, aux)``. ``chunk_size=None`` (or at least every tower's rows) is the plain
    one-shot step. Returns ``(loss detached, aux, outputs detached)``; the gradients are left in
    the parameters' ``.grad`` (accumulated, as ``backward`` does).
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive integer or None")
    if not towers:
        raise ValueError("towers=[]: expected at least one encoder")
    if chunk_size is None or all(t.rows <= chunk_size for t in towers):
        outputs = [_check_outputs(t.forward(*t.chunk(0, t.rows)), f"towers[{i}]")
                   for i, t in enumerate(towers)]
        loss, aux = loss_fn(outputs)
        loss.backward()
        return loss.detach(), aux, [{k: v.detach() for k, v in o.items()} for o in outputs]

    # ---- pass 1: embeddings without activations, RNG recorded per chunk
    rng: list[list[_RngState]] = []
    pass1: list[Outputs] = []
    for i, t in enumerate(towers):
        fwd = t.forward_no_grad or t.forward
        devices = _devices(t.module, t.chunk(0, 1))
        states, chunks = [], []
        with torch.no_grad():
            for start in range(0, t.rows, chunk_size):
                states.append(_RngState(devices))
                chunks.append(_check_outputs(fwd(*t.chunk(start, start + chunk_size)),
                                             f"towers[{i}]"))
        rng.append(states)
        pass1.append(_cat(chunks))
    after_pass1 = _RngState(sorted({d for s in rng for d in s[0].cuda_devices}))
    buffers = [{n: b.detach().clone() for n, b in t.module.named_buffers()}
               if t.module is not None else {} for t in towers]

    # ---- the loss on leaves: dL/d(embeddings)
    leaves = [{k: v.detach().requires_grad_(v.is_floating_point()) for k, v in o.items()}
              for o in pass1]
    with torch.enable_grad():
        loss, aux = loss_fn(leaves)
    loss.backward()

    # ---- pass 2: re-embed each chunk with autograd and push its slice of dL/dz
    for i, t in enumerate(towers):
        grads = {k: v.grad for k, v in leaves[i].items() if v.grad is not None}
        if not grads:
            continue
        starts = list(range(0, t.rows, chunk_size))
        for j, start in enumerate(starts):
            rng[i][j].restore()
            last = j == len(starts) - 1
            sync = contextlib.nullcontext() if (last or t.no_sync is None) else t.no_sync()
            with sync:
                out = _check_outputs(t.forward(*t.chunk(start, start + chunk_size)),
                                     f"towers[{i}]")
                names = [k for k in grads if out[k].requires_grad]
                if names:
                    torch.autograd.backward([out[k] for k in names],
                                            [grads[k][start:start + chunk_size] for k in names])
        if t.module is not None:
            with torch.no_grad():
                for n, b in t.module.named_buffers():
                    b.copy_(buffers[i][n])
    after_pass1.restore()
    return loss.detach(), aux, pass1
