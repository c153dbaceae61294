"""The augmentation pipeline every task uses: albumentations, reproducible from a seed, reseeded in each loader worker.

albumentations keeps its own random generator; DataLoader workers are forked with a
copy of it, so without a reseed every worker (and every epoch's new workers) would
repeat the same augmentations. ``SeededCompose`` reseeds from the worker's torch seed
(and the run's seed), the way ``torch.utils.data`` seeds its own generators.
"""

from __future__ import annotations

from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
from torch.utils.data import get_worker_info

__all__ = ["SeededCompose"]


class SeededCompose:
    """``albumentations.Compose`` over ``ops``, seeded with ``seed`` and reseeded once in each DataLoader worker.

    Masks are resampled by nearest neighbour at pixel centres (``INTER_NEAREST_EXACT``):
    ``INTER_NEAREST`` samples half a pixel off (up to 1.5 px after a resize), so labels
    and instance masks would drift from their boxes.

    Args:
        ops: albumentations transforms (at least one).
        seed: seed for reproducible augmentation (combined with the worker's seed), or ``None``.
        compose_kwargs: more ``A.Compose`` arguments (e.g. ``bbox_params``).
    """

    def __init__(self, ops: Sequence[Any], *, seed: int | None = None, **compose_kwargs: Any) -> None:
        if not ops:
            raise ValueError("SeededCompose needs at least one transform; use no pipeline for none")
        self.seed = seed
        self._worker_seed: int | None = None
        self.compose = A.Compose(list(ops), mask_interpolation=cv2.INTER_NEAREST_EXACT, seed=seed, **compose_kwargs)

    def set_random_seed(self, seed: int) -> None:
        """Reseed the pipeline's generator (what a worker does with its own seed)."""
        self.compose.set_random_seed(seed)

    def __call__(self, **data: Any) -> dict[str, Any]:
        """Run the pipeline on ``data`` (``image=``, ``mask=``, ``masks=``, ``bboxes=``, ...), reseeding first in a new worker."""
        info = get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            entropy = [info.seed] if self.seed is None else [self.seed, info.seed]
            self.compose.set_random_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        return self.compose(**data)

    def __repr__(self) -> str:
        return repr(self.compose)
