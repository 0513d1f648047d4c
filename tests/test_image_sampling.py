"""Batch samplers: epochs, rank shards, exact resume, P x K class-balanced batches."""
import itertools

import pytest
import torch

from modalities.image.sampling import ClassBalancedBatchSampler, EpochBatchSampler, collate_views, mix_seed


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def indices(batch):
    return [i for i, _ in batch]


def test_epochs_are_permutations_with_epoch_keys():
    s = EpochBatchSampler(12, 4, seed=3)
    assert s.steps_per_epoch == 3 and len(s) == 3
    batches = take(s, 9)
    assert all(len(b) == 4 for b in batches)
    orders = []
    for epoch in range(3):
        keys = [k for b in batches[3 * epoch:3 * epoch + 3] for k in b]
        assert {e for _, e in keys} == {epoch}
        assert sorted(i for i, _ in keys) == list(range(12))
        orders.append([i for i, _ in keys])
    assert orders[0] != orders[1] != orders[2]
    assert s.state_dict() == {"epoch": 3, "position": 0}
    assert EpochBatchSampler(12, 4, seed=3).batches(1) == batches[3:6]   # a function of (seed, epoch)
    assert EpochBatchSampler(12, 4, seed=4).batches(0) != batches[:3]


def test_drop_last():
    s = EpochBatchSampler(10, 4, seed=0)
    assert s.steps_per_epoch == 2
    epoch0 = s.batches(0)
    assert [len(b) for b in epoch0] == [4, 4] and len(set(indices(epoch0[0] + epoch0[1]))) == 8
    s = EpochBatchSampler(10, 4, seed=0, drop_last=False)
    assert [len(b) for b in s.batches(0)] == [4, 4, 2]
    assert sorted(i for b in s.batches(0) for i in indices(b)) == list(range(10))
    with pytest.raises(ValueError, match="batch_size=8"):
        EpochBatchSampler(10, 8, seed=0, world_size=2)


@pytest.mark.parametrize("n,batch,world,drop_last", [(24, 4, 3, True), (25, 4, 3, True), (12, 5, 3, False),
                                                      (40, 3, 2, False)])
def test_rank_shards_disjoint_and_covering(n, batch, world, drop_last):
    for epoch in range(2):
        shards = [[i for b in EpochBatchSampler(n, batch, seed=1, rank=r, world_size=world,
                                                drop_last=drop_last).batches(epoch) for i in indices(b)]
                  for r in range(world)]
        lengths = {len(EpochBatchSampler(n, batch, seed=1, rank=r, world_size=world,
                                         drop_last=drop_last).batches(epoch)) for r in range(world)}
        assert len(lengths) == 1                       # every rank takes the same number of steps
        flat = [i for shard in shards for i in shard]
        assert len(flat) == len(set(flat))             # disjoint
        if drop_last:
            assert len(flat) == n // (world * batch) * world * batch
        else:
            assert sorted(flat) == list(range(n))      # covering (n % world == 0)


@pytest.mark.parametrize("make", [
    lambda: EpochBatchSampler(23, 5, seed=9, rank=1, world_size=2),
    lambda: ClassBalancedBatchSampler(torch.arange(40) % 7, p=3, k=2, seed=9, rank=1, world_size=2),
])
def test_resume_yields_the_same_batches(make):
    reference = take(make(), 20)
    for cut in (1, 3, 4, 9):
        first = make()
        it = iter(first)
        head = [next(it) for _ in range(cut)]
        state = first.state_dict()
        assert state == first.state_for_step(cut)
        resumed = make()
        resumed.load_state_dict(dict(state))
        assert head + take(resumed, 20 - cut) == reference, cut
    s = make()
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict({"epoch": 0, "position": s.steps_per_epoch + 1})
    with pytest.raises(ValueError, match="expected a dict"):
        s.load_state_dict({"epoch": 0})


def test_class_balanced_p_by_k():
    labels = torch.tensor([0] * 10 + [1] * 6 + [2] * 3 + [5] * 8 + [9] * 1)   # class 9 has one image
    s = ClassBalancedBatchSampler(labels, p=3, k=4, seed=0)
    assert s.steps_per_epoch == 28 // 12 and s.batch_size == 12
    seen = set()
    for batch in take(s, 40):
        idx = torch.tensor(indices(batch))
        groups = labels[idx].view(3, 4)
        assert (groups == groups[:, :1]).all()                 # K of each class, class-major
        assert len(set(groups[:, 0].tolist())) == 3             # P distinct classes
        for g, cls in zip(idx.view(3, 4), groups[:, 0].tolist()):
            if cls != 9 and cls != 2:                           # enough images: K distinct ones
                assert len(set(g.tolist())) == 4
        seen.update(idx.tolist())
    assert seen == set(range(len(labels)))
    ranks = [ClassBalancedBatchSampler(labels, p=3, k=4, seed=0, rank=r, world_size=2).batches(0)
             for r in range(2)]
    assert ranks[0] != ranks[1]


def test_class_balanced_errors():
    with pytest.raises(ValueError, match="1 class"):
        ClassBalancedBatchSampler(torch.zeros(10, dtype=torch.long), p=1, k=2, seed=0)
    with pytest.raises(ValueError, match="p=4.*3 classes"):
        ClassBalancedBatchSampler(torch.arange(9) % 3, p=4, k=2, seed=0)
    with pytest.raises(ValueError, match="k=0"):
        ClassBalancedBatchSampler(torch.arange(9) % 3, p=2, k=0, seed=0)
    with pytest.raises(ValueError, match="rank=2"):
        EpochBatchSampler(10, 2, seed=0, rank=2, world_size=2)


def test_mix_seed_and_collate():
    seeds = {mix_seed(0, e, i) for e in range(10) for i in range(100)}
    assert len(seeds) == 1000 and all(0 <= s < 2 ** 63 for s in seeds)
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3) != mix_seed(1, 3, 2)
    views, labels = collate_views([(torch.zeros(2, 3, 4, 4), 1), (torch.ones(2, 3, 4, 4), 5)])
    assert views.shape == (2, 2, 3, 4, 4) and labels.tolist() == [1, 5] and labels.dtype == torch.int64
