"""Semantic segmentation metrics from one confusion matrix, as torchvision's references compute them.

``ConfusionMatrix`` counts (ground truth, prediction) pairs with ``torch.bincount``; rows
are the ground truth, columns the prediction. Pixels whose ground truth is the ignore
index (255) are not counted. Under ``torchrun`` each rank counts its own images and
``reduce_from_all_processes`` sums the matrices (``torch.distributed.all_reduce``), so
every rank then holds the numbers of the whole evaluation set.

From the matrix: global pixel accuracy (diagonal over total), per-class accuracy (diagonal
over row), per-class IoU (diagonal over row + column - diagonal) and mIoU. A class that
appears neither in the ground truth nor in the predictions has no IoU (``nan``) and is
left out of the mean (torchvision's reference averages it in as ``nan``, making the whole
mean ``nan``; MMSegmentation leaves it out, as here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """A running confusion matrix of ``num_classes`` labels.

    >>> cm = ConfusionMatrix(21)
    >>> cm.update(masks, model(images)["out"])   # masks (N, H, W), logits (N, 21, H, W)
    >>> cm.reduce_from_all_processes()
    >>> print(cm)                                # torchvision's print-out
    >>> cm.summary(class_names)["mIoU"]

    Args:
        num_classes: labels ``0..num_classes-1``.
        ignore_index: ground-truth label that is not counted.
        device: where the matrix lives (the device of the first update otherwise does
            not matter: counts are moved to the matrix).
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255, device: str | torch.device = "cpu") -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is one of the labels 0..{num_classes - 1}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        """Count one batch.

        Args:
            target: ground-truth labels, any shape (e.g. (N, H, W)).
            prediction: predicted labels of the same shape, or logits with one more
                dimension at index 1 (N, C, H, W), which are reduced with ``argmax``.

        Raises:
            ValueError: shapes differ, or the ground truth holds a label outside
                ``0..num_classes-1`` that is not the ignore index.
        """
        if prediction.is_floating_point() and prediction.dim() == target.dim() + 1:
            prediction = prediction.argmax(1)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(prediction.shape)} differs from target shape {tuple(target.shape)}")
        n = self.num_classes
        target = target.to(torch.int64).flatten()
        prediction = prediction.to(device=target.device, dtype=torch.int64).flatten()
        keep = target != self.ignore_index
        target, prediction = target[keep], prediction[keep]
        if target.numel():
            low, high = int(target.min()), int(target.max())
            if low < 0 or high >= n:
                bad = target[(target < 0) | (target >= n)].unique()[:8].tolist()
                raise ValueError(f"ground truth holds labels {bad}, outside 0..{n - 1} and not the ignore index {self.ignore_index}")
            if int(prediction.min()) < 0 or int(prediction.max()) >= n:
                raise ValueError(f"predictions hold labels outside 0..{n - 1}")
        counts = torch.bincount(n * target + prediction, minlength=n * n).reshape(n, n)
        self.mat += counts.to(self.mat.device)

    def reset(self) -> None:
        """Zero the counts."""
        self.mat.zero_()

    def reduce_from_all_processes(self) -> None:
        """Sum the matrices of every rank (no-op without an initialised process group).

        Every rank must call it, also one that counted nothing.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        mat = self.mat
        if dist.get_backend() == "nccl" and mat.device.type != "cuda":
            mat = mat.to(torch.device("cuda", torch.cuda.current_device()))
        dist.barrier()
        dist.all_reduce(mat)
        self.mat.copy_(mat)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(global accuracy, per-class accuracy, per-class IoU)`` as fractions (``nan`` where undefined)."""
        h = self.mat.double()
        diag = torch.diag(h)
        acc_global = diag.sum() / h.sum()
        acc = diag / h.sum(1)
        iu = diag / (h.sum(1) + h.sum(0) - diag)
        return acc_global, acc, iu

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """The numbers in percent, JSON-ready (``None`` for undefined ones).

        Args:
            class_names: one name per label (default the label numbers).

        Returns:
            ``{"pixel_acc", "mean_acc", "mIoU", "IoU": {name: value}, "acc": {name: value}}``.
        """
        names = self._names(class_names)
        acc_global, acc, iu = self.compute()

        def pct(value: torch.Tensor | float) -> float | None:
            value = float(value)
            return None if math.isnan(value) else round(100.0 * value, 4)

        return {
            "pixel_acc": pct(acc_global),
            "mean_acc": pct(_nanmean(acc)),
            "mIoU": pct(_nanmean(iu)),
            "IoU": {name: pct(v) for name, v in zip(names, iu.tolist())},
            "acc": {name: pct(v) for name, v in zip(names, acc.tolist())},
        }

    def table(self, class_names: Sequence[str] | None = None) -> str:
        """A per-class table (label, name, IoU, accuracy, ground-truth pixels) and the mIoU line."""
        names = self._names(class_names)
        _, acc, iu = self.compute()
        pixels = self.mat.sum(1).tolist()
        width = max(5, *(len(n) for n in names))
        lines = [f"{'label':>5}  {'class':<{width}}  {'IoU':>6}  {'acc':>6}  {'pixels':>10}"]
        for label, (name, i, a, p) in enumerate(zip(names, iu.tolist(), acc.tolist(), pixels)):
            lines.append(f"{label:>5}  {name:<{width}}  {_fmt(i):>6}  {_fmt(a):>6}  {p:>10}")
        lines.append(f"mean IoU: {_fmt(float(_nanmean(iu)))}")
        return "\n".join(lines)

    def _names(self, class_names: Sequence[str] | None) -> list[str]:
        if class_names is None:
            return [str(i) for i in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        return [str(n) for n in class_names]

    def __str__(self) -> str:
        acc_global, acc, iu = self.compute()
        return (
            "global correct: {}\naverage row correct: {}\nIoU: {}\nmean IoU: {}"
        ).format(_fmt(float(acc_global)), [_fmt(v) for v in acc.tolist()], [_fmt(v) for v in iu.tolist()], _fmt(float(_nanmean(iu))))


def _nanmean(values: torch.Tensor) -> torch.Tensor:
    return values.nanmean() if not bool(values.isnan().all()) else values.new_tensor(float("nan"))


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100.0 * value:.1f}"
