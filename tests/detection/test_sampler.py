"""Aspect-ratio grouping: every index once per epoch, one group per batch, equal steps on every DDP rank."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

from detection.data import GroupedBatchSampler, collate_fn, create_aspect_ratio_groups


class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _group_ids(n: int, num_groups: int, seed: int) -> list[int]:
    return torch.randint(num_groups, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(("n", "batch_size", "num_groups"), [(1, 4, 2), (10, 4, 2), (37, 4, 2), (50, 6, 5), (64, 8, 1), (9, 16, 3)])
def test_every_index_once_and_one_group_per_batch(n: int, batch_size: int, num_groups: int) -> None:
    group_ids = _group_ids(n, num_groups, seed=n)
    sampler = RandomSampler(range(n), generator=torch.Generator().manual_seed(0))
    batch_sampler = GroupedBatchSampler(sampler, group_ids, batch_size)
    for _ in range(3):
        batches = list(batch_sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(n))
        assert all(len({group_ids[i] for i in batch}) == 1 for batch in batches)
        assert all(1 <= len(batch) <= batch_size for batch in batches)
        assert len(batches) == len(batch_sampler)


def test_full_batches_when_groups_divide_evenly() -> None:
    group_ids = [0] * 8 + [1] * 8
    batches = list(GroupedBatchSampler(SequentialSampler(range(16)), group_ids, 4))
    # 4 full batches reach the fixed count ceil(16 / 4) + 2 - 1 = 5 only by splitting one.
    assert sorted(map(len, batches)) == [2, 2, 4, 4, 4]
    assert batches[0] == [0, 1] and batches[1] == [2, 3]


@pytest.mark.parametrize("n", [40, 41])
def test_shards_with_two_replicas(n: int) -> None:
    group_ids = _group_ids(n, 2, seed=1)
    samplers = [DistributedSampler(_Sized(n), num_replicas=2, rank=rank, shuffle=True, seed=3) for rank in range(2)]
    batch_samplers = [GroupedBatchSampler(s, group_ids, batch_size=4) for s in samplers]
    orders = []
    for epoch in range(3):
        per_rank = []
        for batch_sampler in batch_samplers:
            batch_sampler.set_epoch(epoch)
            batches = list(batch_sampler)
            assert len(batches) == len(batch_sampler)
            assert all(len({group_ids[i] for i in batch}) == 1 for batch in batches)
            per_rank.append(batches)
        # Equal step counts on both ranks, or DDP would hang on the last all-reduce.
        assert len(per_rank[0]) == len(per_rank[1])
        indices = [i for batches in per_rank for batch in batches for i in batch]
        counts = Counter(indices)
        assert set(counts) == set(range(n))
        # DistributedSampler pads an odd count with one repeated index; nothing else repeats.
        assert sum(counts.values()) == 2 * math.ceil(n / 2) and max(counts.values()) <= 2
        assert len(set(i for b in per_rank[0] for i in b) & set(i for b in per_rank[1] for i in b)) == (n % 2)
        orders.append(per_rank[0])
    assert orders[0] != orders[1]


def test_equal_steps_even_with_skewed_shards() -> None:
    # Rank 0 gets only group 0, rank 1 gets a mix: natural batch counts would differ.
    group_ids = [0, 0] * 6 + [0, 1] * 6
    samplers = [DistributedSampler(_Sized(24), num_replicas=2, rank=rank, shuffle=False) for rank in range(2)]
    lengths = [len(list(GroupedBatchSampler(s, group_ids, batch_size=4))) for s in samplers]
    assert lengths[0] == lengths[1] == 4


def test_aspect_ratio_groups() -> None:
    ratios = [0.5, 0.99, 1.0, 1.5, 3.0]
    assert create_aspect_ratio_groups(ratios) == [0, 0, 1, 1, 1]
    assert create_aspect_ratio_groups(ratios, k=2) == [1, 2, 3, 4, 5]  # edges 0.5, 0.71, 1, 1.41, 2

    class _Dataset:
        def aspect_ratios(self) -> list[float]:
            return ratios

    assert create_aspect_ratio_groups(_Dataset()) == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="k must be >= 0"):
        create_aspect_ratio_groups(ratios, k=-1)


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        GroupedBatchSampler(SequentialSampler(range(3)), [0, 0, 0], 0)


def test_collate_keeps_lists() -> None:
    batch = [(torch.zeros(3, 4, 5), {"boxes": torch.zeros(0, 4)}), (torch.zeros(3, 6, 2), {"boxes": torch.ones(1, 4)})]
    images, targets = collate_fn(batch)
    assert [tuple(i.shape) for i in images] == [(3, 4, 5), (3, 6, 2)]
    assert [len(t["boxes"]) for t in targets] == [0, 1]
