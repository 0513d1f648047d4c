"""Batches that resume exactly and augmentations that do not depend on the worker drawing them.

A batch is a list of keys (index, epoch). `EpochBatchSampler` (every image once per epoch) and
`ClassBalancedBatchSampler` (P classes x K images, for triplet/NCA/SupCon) derive each epoch's
order from (seed, epoch) alone, so `state_dict()` = {"epoch", "position"} is all a resumed run
needs to yield the very batches the interrupted one would have. `AugmentedViews` seeds torch's
CPU generator from (seed, epoch, index) around the transform, so the views of an image are a
pure function of those three numbers: the same with 0 or 8 DataLoader workers, after a resume,
or under a different global seed.

Example:
    >>> sampler = EpochBatchSampler(len(train), 256, seed=0, rank=rank, world_size=world)
    >>> views = AugmentedViews(train.images, train.labels, simclr_transform(32), n_views=2, seed=0)
    >>> loader = DataLoader(views, batch_sampler=sampler, collate_fn=collate_views, num_workers=2)
    >>> for step, (x, y) in zip(range(total_steps), loader):     # x: (B, 2, 3, 32, 32)
    ...     ...
    ...     checkpoint["sampler"] = sampler.state_for_step(step + 1)   # not state_dict(): see below
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["mix_seed", "EpochBatchSampler", "ClassBalancedBatchSampler", "AugmentedViews", "collate_views"]

_M64 = (1 << 64) - 1
_TAG_EPOCH, _TAG_BALANCED = 0x45504F43, 0x42414C41  # separate streams for the two samplers


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mix_seed(*values: int) -> int:
    """A 63-bit seed hashing the integers `values` (splitmix64 chained): nearby inputs such as
    (seed, epoch, i) and (seed, epoch, i + 1) give unrelated seeds. Pure Python, deterministic."""
    h = 0x2545F4914F6CDD1D
    for v in values:
        h = _splitmix64(h ^ (int(v) & _M64))
    return h >> 1


def _check_int(cls: str, name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{cls}: {name}={value!r}; expected an integer >= {low}")
    return value


def _check_rank(cls: str, rank: int, world_size: int) -> None:
    _check_int(cls, "world_size", world_size, 1)
    _check_int(cls, "rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"{cls}: rank={rank!r}; expected 0 <= rank < world_size={world_size}")


class _Resumable(torch.utils.data.Sampler):
    """Shared state machinery: epoch plans from (seed, epoch), a position inside the epoch."""

    steps_per_epoch: int
    epoch: int
    position: int

    def _batch(self, epoch: int, position: int) -> list[tuple[int, int]]:
        raise NotImplementedError

    def __len__(self) -> int:
        """Batches per epoch (the iterator itself goes on over epochs forever)."""
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Endless batches from the current (epoch, position); the state advances as batches are
        handed out, so `state_dict()` names the next batch this iterator will yield."""
        while True:
            batch = self._batch(self.epoch, self.position)
            self.position += 1
            if self.position == self.steps_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            yield batch

    def batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """All of this rank's batches of `epoch`, without touching the iterator's state."""
        return [self._batch(epoch, p) for p in range(self.steps_per_epoch)]

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "position"} of the next batch the iterator yields.

        Under a DataLoader with workers the iterator runs ahead of training by the prefetched
        batches, so checkpoint `state_for_step(steps_done)` instead (exact whatever prefetching)."""
        return {"epoch": self.epoch, "position": self.position}

    def state_for_step(self, step: int) -> dict[str, int]:
        """The state after `step` batches consumed from a fresh sampler (epoch 0, position 0)."""
        _check_int(type(self).__name__, "step", step, 0)
        return {"epoch": step // self.steps_per_epoch, "position": step % self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next batch yielded is batch `position` of epoch `epoch`."""
        name = type(self).__name__
        if not isinstance(state, dict) or set(state) < {"epoch", "position"}:
            raise ValueError(f"{name}.load_state_dict: state={state!r}; expected a dict with 'epoch' and 'position'")
        epoch = _check_int(name, "state['epoch']", state["epoch"], 0)
        position = _check_int(name, "state['position']", state["position"], 0)
        if position > self.steps_per_epoch:
            raise ValueError(f"{name}.load_state_dict: state['position']={position}; expected at most "
                             f"steps_per_epoch={self.steps_per_epoch} (was the batch size or data changed?)")
        self.epoch, self.position = epoch, position
        if position == self.steps_per_epoch:   # the end of an epoch is the start of the next
            self.epoch, self.position = epoch + 1, 0


class EpochBatchSampler(_Resumable):
    """Batches of keys (index, epoch); each epoch a fresh permutation seeded by (seed, epoch).

    Rank r of world_size takes the strided shard perm[r::world_size] of the epoch's permutation,
    then cuts it into batches of batch_size.
    - drop_last=True: the permutation is cut to a multiple of world_size * batch_size, so every
      rank gets steps_per_epoch = n // (world_size * batch_size) full batches; the shards of the
      ranks are disjoint, and the images left out change every epoch.
    - drop_last=False: the permutation is padded cyclically with its own head to a multiple of
      world_size (as DistributedSampler), so every rank has the same number of batches, the last
      one possibly short; shards are disjoint and cover all images when n % world_size == 0.

    Args:
        n: dataset size; batch_size: images per batch on each rank; seed: any integer.

    Attributes: epoch, position (next batch), steps_per_epoch.

    Example:
        >>> s = EpochBatchSampler(10, 4, seed=0)
        >>> next(iter(s))            # 4 keys (index, epoch 0); 2 batches per epoch
        [(8, 0), (9, 0), (0, 0), (3, 0)]
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True) -> None:
        name = "EpochBatchSampler"
        _check_int(name, "n", n, 1)
        _check_int(name, "batch_size", batch_size, 1)
        _check_rank(name, rank, world_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{name}: seed={seed!r}; expected an integer")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, bool(drop_last)
        if self.drop_last:
            self.steps_per_epoch = n // (world_size * batch_size)
            if self.steps_per_epoch == 0:
                raise ValueError(f"{name}: n={n} images cannot fill one batch of batch_size={batch_size} on "
                                 f"each of world_size={world_size} ranks; lower the batch size or pass drop_last=False")
            self._per_rank = self.steps_per_epoch * batch_size
        else:
            self._per_rank = math.ceil(n / world_size)
            self.steps_per_epoch = math.ceil(self._per_rank / batch_size)
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, torch.Tensor] | None = None

    def shard(self, epoch: int) -> torch.Tensor:
        """This rank's indices for `epoch`, in order (int64 (per_rank,))."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, _TAG_EPOCH))
        perm = torch.randperm(self.n, generator=gen)
        total = self._per_rank * self.world_size
        if total <= self.n:
            perm = perm[:total]
        else:
            perm = torch.cat([perm, perm[: total - self.n]])
        shard = perm[self.rank::self.world_size]
        self._cache = (epoch, shard)
        return shard

    def _batch(self, epoch: int, position: int) -> list[tuple[int, int]]:
        rows = self.shard(epoch)[position * self.batch_size:(position + 1) * self.batch_size]
        return [(i, epoch) for i in rows.tolist()]


class ClassBalancedBatchSampler(_Resumable):
    """Batches of P classes x K images (for triplet batch-hard, NCA, SupCon), as keys (index, epoch).

    Each batch lists K images of its first class, then K of the second, and so on. Per epoch
    (seeded by (seed, epoch)): every class's images are shuffled, each (step, rank) draws P
    distinct classes uniformly, and each class hands out its shuffled images in turn, K at a
    time, cycling when it runs out: a class with fewer than K images repeats images within a
    batch (sampling with replacement); other classes give K distinct images. Ranks draw
    different batches from one shared plan.

    Args:
        labels: (N,) integer labels (any values; the classes are the distinct ones).
        p, k: classes per batch and images per class.
        seed: any integer.
        steps_per_epoch: default max(1, N // (p * k * world_size)).

    Raises ValueError when fewer than 2 classes are present or p exceeds the number of classes.

    Example:
        >>> s = ClassBalancedBatchSampler(train.labels, p=16, k=4, seed=0)   # batches of 64
    """

    def __init__(self, labels: Sequence[int] | torch.Tensor, p: int, k: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, steps_per_epoch: int | None = None) -> None:
        name = "ClassBalancedBatchSampler"
        _check_int(name, "p", p, 1)
        _check_int(name, "k", k, 1)
        _check_rank(name, rank, world_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{name}: seed={seed!r}; expected an integer")
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"{name}: labels of dtype {labels.dtype} and shape {tuple(labels.shape)}; "
                             "expected a 1-D integer tensor")
        classes, inverse = torch.unique(labels, sorted=True, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"{name}: labels hold {len(classes)} class(es); expected at least 2")
        if p > len(classes):
            raise ValueError(f"{name}: p={p} classes per batch but labels hold only {len(classes)} classes")
        self.classes = classes
        self.members = [torch.nonzero(inverse == c).flatten() for c in range(len(classes))]
        self.p, self.k, self.seed, self.rank, self.world_size = p, k, seed, rank, world_size
        if steps_per_epoch is None:
            steps_per_epoch = max(1, len(labels) // (p * k * world_size))
        self.steps_per_epoch = _check_int(name, "steps_per_epoch", steps_per_epoch, 1)
        self.batch_size = p * k
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, torch.Tensor] | None = None

    def plan(self, epoch: int) -> torch.Tensor:
        """Every rank's batches of `epoch`: int64 (steps_per_epoch, world_size, p, k) indices."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, _TAG_BALANCED))
        n_classes = len(self.members)
        slots = self.steps_per_epoch * self.world_size
        # P distinct classes per (step, rank): the first P of a random permutation of the classes
        choice = torch.rand(slots, n_classes, generator=gen).argsort(dim=1)[:, : self.p].reshape(-1)
        plan = torch.empty(slots * self.p, self.k, dtype=torch.int64)
        offsets = torch.arange(self.k)
        for c, members in enumerate(self.members):
            order = members[torch.randperm(len(members), generator=gen)]
            uses = torch.nonzero(choice == c).flatten()   # its turns, in (step, rank, slot) order
            if len(uses):
                turn = torch.arange(len(uses))[:, None] * self.k + offsets[None, :]
                plan[uses] = order[turn % len(members)]
        plan = plan.reshape(self.steps_per_epoch, self.world_size, self.p, self.k)
        self._cache = (epoch, plan)
        return plan

    def _batch(self, epoch: int, position: int) -> list[tuple[int, int]]:
        return [(i, epoch) for i in self.plan(epoch)[position, self.rank].reshape(-1).tolist()]


class AugmentedViews(torch.utils.data.Dataset):
    """n_views augmented views of each image, a pure function of (seed, epoch, index).

    __getitem__((index, epoch)) -> (views float (n_views, 3, h, w), label int); a plain int index
    means epoch 0. Around the transform, torch's CPU generator is seeded with
    mix_seed(seed, epoch, index) and restored afterwards (torch.random.fork_rng), so neither the
    worker count, nor a resume, nor the caller's global seed changes the views; the epoch does.

    Args:
        images: uint8 (N, 3, H, W) tensor, or a dataset with `load(i)` -> uint8 (3, H, W) and
            `labels` (e.g. `data.ClassFolderDataset`, decoded lazily).
        labels: (N,) integers; None takes `images.labels`.
        transform: uint8 (3, H, W) -> float (3, h, w), e.g. `simclr_transform(32)`; it must draw
            its randomness from torch's CPU generator (torchvision's transforms do).
        n_views: views per image (2 for SimCLR-style methods, 1 for the supervised baseline).
        seed: any integer.
    """

    def __init__(self, images: torch.Tensor | Any, labels: Sequence[int] | torch.Tensor | None,
                 transform: Callable[[torch.Tensor], torch.Tensor], n_views: int = 2, seed: int = 0) -> None:
        name = "AugmentedViews"
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"{name}: images of dtype {images.dtype} and shape {tuple(images.shape)}; "
                                 "expected uint8 (N, 3, H, W)")
        elif not (hasattr(images, "load") and hasattr(images, "__len__")):
            raise TypeError(f"{name}: images of type {type(images).__name__}; expected a uint8 tensor "
                            "(N, 3, H, W) or a dataset with load(i) (e.g. ClassFolderDataset)")
        if labels is None:
            labels = getattr(images, "labels", None)
            if labels is None:
                raise ValueError(f"{name}: labels=None and images has no labels attribute")
        labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
        if len(labels) != len(images):
            raise ValueError(f"{name}: {len(labels)} labels for {len(images)} images; expected one per image")
        if not callable(transform):
            raise TypeError(f"{name}: transform of type {type(transform).__name__}; expected a callable")
        _check_int(name, "n_views", n_views, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{name}: seed={seed!r}; expected an integer")
        self.images, self.labels, self.transform = images, labels, transform
        self._load_returns_index = (not isinstance(images, torch.Tensor)
                                    and "return_index" in inspect.signature(images.load).parameters)
        self.n_views, self.seed = n_views, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, int]:
        index, epoch = (key, 0) if isinstance(key, int) else (int(key[0]), int(key[1]))
        label_index = index
        if isinstance(self.images, torch.Tensor):
            image = self.images[index]
        else:
            if self._load_returns_index:  # another image may stand in for an unreadable one
                image, label_index = self.images.load(index, return_index=True)
            else:
                image = self.images.load(index)
        # Per-image ops on small tensors lose more to intra-op thread synchronisation than they
        # gain (about 15x slower with 2 threads on a busy 2-core machine): run them on one thread.
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
                views = torch.stack([self.transform(image) for _ in range(self.n_views)])
        finally:
            if threads > 1:
                torch.set_num_threads(threads)
        return views, int(self.labels[label_index])


def collate_views(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(views (V, 3, h, w), label), ...] -> (views (B, V, 3, h, w), labels int64 (B,)).

    The method's view-major rows are `views.transpose(0, 1).reshape(V * B, 3, h, w)`."""
    if not batch:
        raise ValueError("collate_views: empty batch")
    views = torch.stack([item[0] for item in batch])
    labels = torch.tensor([int(item[1]) for item in batch], dtype=torch.int64)
    return views, labels
