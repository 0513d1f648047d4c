"""torch.distributed setup for recipes run under torchrun (or any launcher that sets RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT): gloo on CPU, NCCL on CUDA."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> DistInfo:
    """Initialise the process group when WORLD_SIZE > 1; a no-op otherwise. ``device`` picks
    the backend: NCCL for 'cuda...' (and for 'auto' where CUDA is available), else gloo."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def resolve_device(device: str, info: DistInfo, threads: int = 0) -> torch.device:
    """The ``torch.device`` of this process: 'auto' is 'cuda' where available, else 'cpu';
    'cuda' under torchrun is this rank's GPU (``cuda:<local_rank>``). ``threads`` > 0 also sets
    the CPU threads of this process (``torch.set_num_threads``). ``ValueError`` for CUDA on a
    machine without it."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and info.enabled:
        device = f"cuda:{info.local_rank}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine; expected 'cpu'")
    if threads:
        torch.set_num_threads(threads)
    return torch.device(device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out / info.world_size


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def time_is_up(t0: float, limit: float, info: DistInfo, device: torch.device) -> bool:
    """Whether ``limit`` seconds have passed since ``t0`` (``time.perf_counter``); rank 0
    decides for every rank, so all stop at the same step."""
    import time

    up = torch.tensor([float(time.perf_counter() - t0 >= limit)], device=device)
    if info.enabled:
        dist.broadcast(up, src=0)
    return bool(up.item())


def all_reduce_gradients(module_or_params: torch.nn.Module | Iterable[torch.nn.Parameter],
                         info: DistInfo) -> None:
    """Average the ``.grad`` of every parameter over the ranks, for models not wrapped in DDP
    (the CLIP recipe's towers, whose loss gathers features across ranks itself):

        grad <- (1 / world_size) * sum_r grad_r

    One flat all-reduce per dtype (the gradients are copied into one buffer, reduced, copied
    back), not one call per tensor. A parameter that requires grad but has none on this rank
    contributes zeros (and gets the average), so every rank issues the same collective. A
    no-op in one process.

    Example:
        >>> loss.backward(); all_reduce_gradients(model, info); optimizer.step()
    """
    if not info.enabled:
        return
    if isinstance(module_or_params, torch.nn.Module):
        params = list(module_or_params.parameters())
    else:
        params = list(module_or_params)
    params = [p for p in params if p.requires_grad]
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat /= info.world_size
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
