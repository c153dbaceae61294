"""Segmenter evaluation: one confusion matrix over a data set, summed over ranks, as torchvision's reference does.

``evaluate_segmenter`` runs a model (or any callable that maps a normalised batch to
logits) over a data set, counts (ground truth, prediction) pairs in a
:class:`~segmentation.metrics.ConfusionMatrix` (the ignore index is not counted) and,
under ``torchrun``, sums the matrices of all ranks (each rank scores every
``world``-th image), so every rank ends with the numbers of the whole set.
``seg_metrics`` flattens the matrix into the ``val/...`` numbers a run records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from engine import distributed as dist_utils

from .data import IGNORE_INDEX
from .metrics import ConfusionMatrix

__all__ = ["evaluate_segmenter", "format_seg_metrics", "seg_metrics"]

logger = logging.getLogger(__name__)


def _logits(output: Any) -> torch.Tensor:
    return output["out"] if isinstance(output, dict) else output


@torch.no_grad()
def evaluate_segmenter(
    model: Callable[[torch.Tensor], Any],
    dataset: Dataset,
    *,
    num_classes: int,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    ignore_index: int = IGNORE_INDEX,
    progress: bool = False,
) -> ConfusionMatrix:
    """The confusion matrix of ``model`` on ``dataset``, summed over every rank.

    Every rank must call it (a rank with no image still takes part in the sum).

    Args:
        model: a segmenter (``{"out": logits}``) or a callable returning logits
            (N, C, h, w) for a normalised batch (N, 3, H, W); logits of another size are
            resized to the masks' bilinearly. An ``nn.Module`` is put in eval mode for
            the run and given back in the mode it had.
        dataset: ``(image, mask)`` samples with the evaluation transform.
        num_classes: labels ``0..num_classes-1``.
        device: where to run.
        batch_size: images loaded together; those of one size run as one batch (images
            are never padded, so the numbers do not depend on the batch size).
        workers: loader processes.
        amp_dtype: autocast dtype, or ``None`` for full precision.
        channels_last: feed channels-last batches.
        ignore_index: ground-truth label that is not counted.
        progress: show a progress bar (rank 0).

    Returns:
        The reduced matrix (``cm.summary(names)``, ``print(cm)``, ``cm.table(names)``);
        ``cm.images`` is the number of images counted over all ranks.
    """
    device = torch.device(device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    shard = Subset(dataset, range(rank, len(dataset), world))
    # Samples stay a list: each size is stacked on its own, so no image is ever padded. Padding would
    # change the predictions near the border (the padded area has activations of its own after the
    # first layer), making the numbers depend on the batch size; torchvision evaluates one image at a time.
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=list,
                        pin_memory=device.type == "cuda")
    was_training = getattr(model, "training", None)
    if isinstance(model, torch.nn.Module):
        model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images_seen = 0
    try:
        for samples in tqdm(loader, desc="eval", disable=not progress or rank != 0, dynamic_ncols=True, leave=False):
            sizes: dict[tuple[int, ...], list[int]] = {}
            for i, (image, _) in enumerate(samples):
                sizes.setdefault(tuple(image.shape), []).append(i)
            for group in sizes.values():
                images = torch.stack([samples[i][0] for i in group]).to(device, memory_format=memory_format)
                masks = torch.stack([samples[i][1] for i in group]).to(device)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    logits = _logits(model(images))
                if logits.shape[-2:] != masks.shape[-2:]:
                    logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
                cm.update(masks, logits.argmax(1))
                images_seen += len(group)
    finally:
        if isinstance(model, torch.nn.Module) and was_training:
            model.train()
    cm.reduce_from_all_processes()
    cm.images = sum(dist_utils.all_gather_object(images_seen))
    skipped = getattr(dataset, "num_skipped", 0)
    if skipped:
        logger.warning("evaluation: %d samples were unreadable and replaced by the next readable one (each file is named above)", skipped)
    return cm


def seg_metrics(cm: ConfusionMatrix, class_names: Sequence[str], prefix: str = "val/") -> dict[str, float | None]:
    """The numbers a run records: mIoU, global pixel accuracy, mean class accuracy and each class's IoU, in percent.

    Args:
        cm: a (reduced) confusion matrix.
        class_names: one name per label.
        prefix: prepended to every key.

    Returns:
        ``{"val/mIoU", "val/pixel_acc", "val/mean_acc", "val/IoU/<name>"...}``; ``None``
        where a value is undefined (a class neither present nor predicted).
    """
    summary = cm.summary(class_names)
    out: dict[str, float | None] = {f"{prefix}{k}": summary[k] for k in ("mIoU", "pixel_acc", "mean_acc")}
    out.update({f"{prefix}IoU/{name}": value for name, value in summary["IoU"].items()})
    return out


def format_seg_metrics(metrics: dict[str, Any]) -> str:
    """``val/mIoU 61.23  val/pixel_acc 95.10  val/mean_acc 70.00``: the headline numbers on one line."""
    keys = [k for k in metrics if k.rsplit("/", 1)[-1] in ("mIoU", "pixel_acc", "mean_acc")]
    return "  ".join(f"{k} {metrics[k]:.2f}" if metrics[k] is not None else f"{k} n/a" for k in keys)
