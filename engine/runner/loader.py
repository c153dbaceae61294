"""What a run trains on: a task's data sets, the batches of each epoch (resume skips the done ones) and the iteration plan."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .. import distributed as dist_utils

__all__ = ["EpochBatches", "TrainData", "plan_iterations", "seed_worker"]


class EpochBatches:
    """The batches of one epoch, minus the ones a resumed run already did.

    Args:
        batch_sampler: yields lists of sample indices.
        skip: batches already trained in this epoch.
        limit: batches in an epoch (equal on every rank).
    """

    def __init__(self, batch_sampler: Any, skip: int, limit: int) -> None:
        self.batch_sampler, self.skip, self.limit = batch_sampler, skip, limit

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.limit:
                break
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(self.limit - self.skip, 0)


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's generators in a loader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def plan_iterations(batch_sampler: Any, cfg: dict[str, Any]) -> tuple[int, int, int]:
    """``(iters_per_epoch, total_iters, stop_at)`` for a run, equal on every rank.

    Args:
        batch_sampler: this rank's batches of one epoch.
        cfg: config with ``epochs`` and ``max_iters`` (``None``: the whole schedule).
    """
    # Ranks must agree on the iteration count or DDP would wait forever at the end of an epoch.
    iters_per_epoch = dist_utils.all_reduce_min(len(batch_sampler))
    total_iters = iters_per_epoch * cfg["epochs"]
    stop_at = min(total_iters, cfg["max_iters"]) if cfg["max_iters"] else total_iters
    return iters_per_epoch, total_iters, stop_at


@dataclass
class TrainData:
    """A task's data sets, sampling and iteration plan; tasks subclass it to add their own fields.

    Attributes:
        root: the data folder.
        train_set: the training set (``num_skipped`` / ``reset_skipped`` when it skips bad files).
        val_set: the validation set.
        sampler: the distributed sampler under the batches.
        batch_sampler: yields this rank's batches of one epoch.
        iters_per_epoch: batches per epoch (equal on every rank).
        total_iters: iterations of the whole schedule (``epochs`` x ``iters_per_epoch``).
        stop_at: where this run stops (``max_iters`` cuts the schedule short).
        collate_fn: how samples become a batch (``None``: PyTorch's default).
    """

    root: Path
    train_set: Any
    val_set: Any
    sampler: DistributedSampler
    batch_sampler: Any
    iters_per_epoch: int
    total_iters: int
    stop_at: int
    collate_fn: Callable[[list[Any]], Any] | None = None

    def epoch_of(self, iteration: int) -> int:
        """The 0-based epoch that iteration number ``iteration`` (1-based) belongs to."""
        return max(iteration - 1, 0) // self.iters_per_epoch

    def batches(self, epoch: int, skip: int) -> EpochBatches:
        """``epoch``'s batches of sample indices after its first ``skip`` (a function of the seed and epoch)."""
        self.sampler.set_epoch(epoch)
        return EpochBatches(self.batch_sampler, skip, self.iters_per_epoch)

    def loader(self, epoch: int, skip: int, *, seed: int, rank: int, workers: int, pin_memory: bool) -> DataLoader:
        """The loader for ``epoch``, starting after its first ``skip`` batches (for resume).

        Args:
            epoch: the epoch (reseeds the sampler's shuffle).
            skip: batches of this epoch already trained.
            seed: the run's seed (worker augmentation seeds derive from it).
            rank: this process's rank.
            workers: loader processes.
            pin_memory: pin host memory (CUDA).
        """
        generator = torch.Generator().manual_seed(seed * 1000 + epoch * 10 + rank)
        return DataLoader(
            self.train_set, batch_sampler=self.batches(epoch, skip), num_workers=workers, collate_fn=self.collate_fn,
            pin_memory=pin_memory, worker_init_fn=seed_worker, generator=generator, persistent_workers=False,
        )
