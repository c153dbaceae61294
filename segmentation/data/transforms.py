"""Augmentation and tensors for (image, class map) pairs: seeded albumentations ops, ImageNet normalisation, padded batches."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch

# albumentations asks PyPI for a newer version at import time unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402

from engine.augment import SeededCompose  # noqa: E402
from engine.images import IMAGENET_MEAN, IMAGENET_STD, image_to_tensor  # noqa: E402

from .labels import IGNORE_INDEX

__all__ = ["denormalize", "normalize_image", "SegmentationTransform", "build_seg_transforms", "collate_fn"]

logger = logging.getLogger(__name__)

Transform = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """An ImageNet-normalised CHW float image back to uint8 CHW (for drawing).

    Args:
        image: CHW float tensor as the data sets return it.
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device)[:, None, None]
    return ((image * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def normalize_image(image: np.ndarray) -> torch.Tensor:
    tensor = image_to_tensor(image)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return tensor.sub_(mean).div_(std)


class SegmentationTransform:
    """Apply albumentations ops to an image and its class map together, then make tensors.

    Call signature: ``transform(image, mask) -> (image, mask)`` with ``image`` an H x W x
    3 RGB uint8 array and ``mask`` an H x W integer array; returns the ImageNet-normalised
    float32 CHW image and the int64 H x W mask. Masks are resampled by nearest neighbour
    (pixel centres), so labels are never blended.

    Randomness: each DataLoader worker reseeds the pipeline from its torch seed
    (albumentations keeps its own generator, which forked workers would otherwise share).

    Args:
        ops: albumentations transforms; empty for none.
        seed: seed for reproducible augmentation (combined with the worker seed).
    """

    def __init__(self, ops: Sequence[Any] = (), *, seed: int | None = None) -> None:
        self.pipeline = SeededCompose(ops, seed=seed) if ops else None

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape[:2] != mask.shape[:2]:
            raise ValueError(f"image size {image.shape[:2]} and mask size {mask.shape[:2]} differ")
        if self.pipeline is not None:
            out = self.pipeline(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return normalize_image(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pipeline={self.pipeline!r})"


def build_seg_transforms(
    train: bool = True,
    *,
    crop_size: int = 512,
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: int | None = None,
    hflip_prob: float = 0.5,
    resize: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    seed: int | None = None,
) -> SegmentationTransform:
    """The training or evaluation transform for the segmentation data sets.

    Training: (optionally) the short side to ``base_size``, a random rescale by a factor
    drawn from ``scale_range``, padding to ``crop_size`` (image with 0, mask with
    ``ignore_index``, on the bottom and right as torchvision's references pad), a random
    ``crop_size`` square crop and a horizontal flip. With ``base_size`` this is
    torchvision's ``RandomResize(0.5 * base, 2 * base)``; without, the scale is relative to
    each image. Evaluation: no augmentation, or the short side resized to ``resize``.

    Args:
        train: the training transform (else the evaluation one).
        crop_size: side of the square training crops.
        scale_range: range of the random rescale factor.
        base_size: short side before the rescale (``None``: the image's own).
        hflip_prob: probability of a horizontal flip.
        resize: evaluation only: short side to resize to (``None``: keep the size).
        ignore_index: label that padded mask pixels get.
        seed: makes augmentation reproducible; ``None`` draws fresh entropy.
    """
    for name, value in (("crop_size", crop_size), ("base_size", base_size), ("resize", resize)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {tuple(scale_range)}")
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
    if not train:
        return SegmentationTransform([A.SmallestMaxSize(max_size=resize)] if resize else [], seed=seed)
    if resize is not None:
        raise ValueError("resize is an evaluation option; training crops come from crop_size, base_size and scale_range")
    ops: list[Any] = []
    if base_size is not None:
        ops.append(A.SmallestMaxSize(max_size=base_size))
    ops += [
        A.RandomScale(scale_limit=(low - 1.0, high - 1.0), p=1.0),
        A.PadIfNeeded(min_height=crop_size, min_width=crop_size, position="top_left",
                      border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index),
        A.RandomCrop(height=crop_size, width=crop_size),
        A.HorizontalFlip(p=hflip_prob),
    ]
    return SegmentationTransform(ops, seed=seed)


def collate_fn(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples of different sizes: images padded with 0, masks with 255 (torchvision's references).

    Args:
        batch: ``(image, mask)`` pairs as the data sets return them.

    Returns:
        ``(images (N, 3, H, W), masks (N, H, W))`` with H, W the largest of the batch.
    """
    images, masks = zip(*batch)
    height = max(m.shape[-2] for m in masks)
    width = max(m.shape[-1] for m in masks)
    out_images = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    out_masks = masks[0].new_full((len(masks), height, width), IGNORE_INDEX)
    for i, (image, mask) in enumerate(zip(images, masks)):
        out_images[i, :, : image.shape[-2], : image.shape[-1]] = image
        out_masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
    return out_images, out_masks
