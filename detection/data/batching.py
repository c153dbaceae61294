"""Batching: aspect-ratio grouping (after torchvision's reference) and the detection collate function."""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["GroupedBatchSampler", "collate_fn", "create_aspect_ratio_groups"]

logger = logging.getLogger(__name__)


class _HasAspectRatios(Protocol):
    def aspect_ratios(self) -> Sequence[float]: ...


def create_aspect_ratio_groups(dataset_or_aspect_ratios: _HasAspectRatios | Sequence[float], k: int = 0) -> list[int]:
    """Group id per image from its width / height, as torchvision's reference does.

    Bin edges are ``2 ** linspace(-1, 1, 2k + 1)``; ``k=0`` gives two groups,
    portrait (w/h < 1) and landscape or square (w/h >= 1).

    Args:
        dataset_or_aspect_ratios: an object with ``aspect_ratios()`` (e.g.
            :class:`~detection.data.CocoDetection`) or the ratios themselves.
        k: bins per side of 1; ``2k + 2`` groups in all for ``k > 0``.

    Returns:
        One group id per data set index.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if hasattr(dataset_or_aspect_ratios, "aspect_ratios"):
        ratios = dataset_or_aspect_ratios.aspect_ratios()
    else:
        ratios = dataset_or_aspect_ratios
    bins = (2.0 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    groups = np.digitize(np.asarray(ratios, dtype=np.float64), bins).tolist()
    logger.info("aspect ratio bins %s, images per group %s", bins, dict(sorted(Counter(groups).items())))
    return groups


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose images all come from one group (e.g. one aspect-ratio bin).

    Every index the wrapped sampler yields appears in exactly one batch; the
    partial batch left in each group at the end of an epoch is yielded too,
    never dropped or padded.

    The number of batches per epoch is fixed in advance:
    ``min(n, ceil(n / batch_size) + G - 1)`` for ``n = len(sampler)`` and ``G``
    groups, which bounds what the grouping can produce; the largest batches
    are split in two until it is reached. Every DDP rank thus runs the same
    number of steps even though a ``DistributedSampler`` gives each rank a
    different mix of groups every epoch (unequal step counts deadlock DDP).

    Args:
        sampler: yields data set indices, e.g. ``RandomSampler`` or
            ``DistributedSampler`` (call its ``set_epoch`` every epoch, or
            this sampler's, which forwards it).
        group_ids: group id per data set index.
        batch_size: images per batch (at most).
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.num_groups = len(set(self.group_ids))

    def set_epoch(self, epoch: int) -> None:
        """Forward ``set_epoch`` to the wrapped sampler when it has one (DistributedSampler)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return min(n, math.ceil(n / self.batch_size) + max(self.num_groups, 1) - 1)

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        batches: list[list[int]] = []
        for index in self.sampler:
            group = self.group_ids[index]
            buffers[group].append(index)
            if len(buffers[group]) == self.batch_size:
                batches.append(buffers.pop(group))
        batches.extend(buffers[group] for group in sorted(buffers))
        target = len(self)
        while len(batches) < target:
            k = max(range(len(batches)), key=lambda j: len(batches[j]))
            half = len(batches[k]) // 2
            batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
        yield from batches


def collate_fn(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Keep variably sized images and their targets as lists (torchvision detectors take lists).

    Args:
        batch: ``(image, target)`` pairs from the data set.

    Returns:
        ``(images, targets)``.
    """
    return [image for image, _ in batch], [target for _, target in batch]
