"""Classifier evaluation: top-1 / top-5 as torchvision's reference measures them, and the weights to evaluate.

``evaluate_classifier`` is exact under ``torchrun`` (every rank scores every ``world``-th
image, counts are summed); ``load_classifier_weights`` takes torchvision's ImageNet file,
a ``tools/train_cls.py`` file or a plain state dict.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from backbones.resnet import ResNet, resnet
from backbones.weights import IMAGENET_WEIGHTS, WeightsError, load_pretrained, normalize_state_dict, read_checkpoint
from classification.checkpoint import load_classifier
from classification.data import ImageFolder
from engine import distributed as dist_utils

from .config import BACKBONES

__all__ = ["accuracy", "evaluate_classifier", "format_accuracy", "load_classifier_weights"]


def accuracy(logits: torch.Tensor, targets: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many samples have their label among the ``k`` highest scores, for each ``k``.

    With fewer classes than ``k``, every sample counts (top-k of C <= k classes is all of them).

    Args:
        logits: N x C scores.
        targets: N labels.
        topk: the ``k`` values.

    Returns:
        One count per ``k`` (divide by N for the accuracy).
    """
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred == targets[:, None]
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in topk]


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: ImageFolder,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of ``model`` on ``dataset``.

    Under ``torchrun`` every rank scores every ``world``-th image and the counts are
    summed, so the result is exact (no padded duplicates) and equal to one process's.

    Args:
        model: a classifier whose outputs follow ``dataset.classes``.
        dataset: the split, with the evaluation transform.
        device: where to run.
        batch_size: images per batch.
        workers: loader processes.
        amp_dtype: autocast dtype, or ``None`` for full precision.
        channels_last: feed channels-last batches.
        progress: show a progress bar (rank 0).

    Returns:
        ``{"top1", "top5", "loss", "images"}``.
    """
    device = torch.device(device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    top1 = top5 = count = 0
    loss_sum = 0.0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, targets in tqdm(loader, desc="eval", disable=not progress or rank != 0, dynamic_ncols=True, leave=False):
        images = images.to(device, memory_format=memory_format)
        targets = targets.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images).float()
        loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        c1, c5 = accuracy(logits, targets, (1, 5))
        top1, top5, count = top1 + c1, top5 + c5, count + len(targets)
    model.train(was_training)
    totals = [sum(x) for x in zip(*dist_utils.all_gather_object((top1, top5, count, loss_sum)))]
    n = max(totals[2], 1)
    return {"top1": 100.0 * totals[0] / n, "top5": 100.0 * totals[1] / n, "loss": totals[3] / n, "images": int(totals[2])}


def format_accuracy(result: dict[str, float]) -> str:
    """``top1 90.00  loss 0.3000``: accuracies with two decimals, losses with four."""
    return "  ".join(f"{k} {v:.2f}" if "top" in k else f"{k} {v:.4f}" for k, v in result.items())


def _infer_depth(state: dict[str, torch.Tensor], source: str) -> int:
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("layer3.")}
    for depth, layers in {18: 2, 34: 6}.items():
        if len(blocks) == layers:
            return depth
    raise WeightsError(f"{source} is not a ResNet-18/34 state dict (layer3 has {len(blocks)} blocks; 2 or 6 expected)")


def load_classifier_weights(weights: str, *, backbone: str | None = None, download: bool = True) -> tuple[ResNet, list[str] | None, str]:
    """A classifier to evaluate: torchvision's ImageNet file, a ``train_cls.py`` file, or a plain state dict.

    Args:
        weights: ``"imagenet"`` (torchvision's ``IMAGENET1K_V1`` for ``backbone``), or a
            checkpoint path. Files from ``tools/train_cls.py`` carry their architecture
            and class names; other files give the depth by their keys.
        backbone: ``"resnet18"`` / ``"resnet34"``; required for ``"imagenet"``; for a
            file, a check against what the file holds.
        download: for ``"imagenet"``, fetch the file into the torch hub cache when missing.

    Returns:
        ``(model in eval mode, class names or None, a description)``; with no class
        names the outputs follow the sorted class folders.

    Raises:
        WeightsError: unreadable, unrecognised or mismatched weights.
    """
    if weights == "imagenet":
        if backbone is None:
            raise WeightsError("--weights imagenet needs --backbone resnet18 or resnet34")
        depth = BACKBONES[backbone]
        model = resnet(depth)
        load_pretrained(model, "imagenet", strict=True, download=download)
        return model.eval(), None, f"torchvision ImageNet {backbone} ({IMAGENET_WEIGHTS[depth].file_name})"
    raw = read_checkpoint(weights)
    if isinstance(raw, dict) and {"model", "arch", "classes"} <= set(raw):
        if backbone is not None and backbone != raw["arch"]:
            raise WeightsError(f"{weights} holds a {raw['arch']} classifier, not a {backbone}; drop --backbone or pass --backbone {raw['arch']}")
        model = load_classifier(raw)
        return model, list(raw["classes"]), f"{raw['arch']} classifier {weights}"
    state = normalize_state_dict(raw)
    depth = _infer_depth(state, str(weights))
    if backbone is not None and BACKBONES[backbone] != depth:
        raise WeightsError(f"{weights} holds a resnet{depth} state dict, not a {backbone}")
    if "fc.weight" not in state:
        raise WeightsError(f"{weights} has no classifier (fc.weight): it is a trunk, not a classifier to evaluate")
    model = resnet(depth, num_classes=int(state["fc.weight"].shape[0]))
    load_pretrained(model, state, strict=True)
    return model.eval(), None, f"resnet{depth} state dict {weights}"
