"""Training augmentation presets built on albumentations; boxes, masks and labels move together.

Presets (``train=True``; with ``train=False`` every preset only converts to tensors,
because the detector's own transform does the evaluation resize):

- ``"none"``: no augmentation.
- ``"hflip"``: horizontal flip with probability ``hflip_prob``.
- ``"multiscale"``: short side drawn from ``min_size``, long side capped at
  ``max_size`` (torchvision's ``RandomShortestSize``), then the flip.
- ``"lsj"``: large-scale jitter: fit into ``lsj_size`` x ``lsj_size``, rescale by a
  factor drawn from ``lsj_scale``, pad with the mean pixel / crop at random to
  ``lsj_size`` x ``lsj_size``, then the flip.

Normalisation is left to the model (torchvision's ``GeneralizedRCNNTransform``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

# albumentations asks PyPI for a newer version at import time unless told not to;
# runs must not touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402

from engine.augment import SeededCompose
from engine.images import image_to_tensor

__all__ = ["PRESETS", "DetectionTransform", "build_transforms"]

PRESETS: tuple[str, ...] = ("none", "hflip", "multiscale", "lsj")
# Padding with the ImageNet mean pixel makes padded areas zero after the model's normalisation.
MEAN_PIXEL: tuple[int, int, int] = (124, 116, 104)


class CappedSmallestMaxSize(A.SmallestMaxSize):
    """Short side drawn from ``max_size`` candidates, long side capped at ``long_side_cap``.

    torchvision's ``RandomShortestSize``; albumentations' ``LongestMaxSize``
    would also upscale, so it cannot serve as the cap.
    """

    long_side_cap: float = float("inf")

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        scale = super().get_params_dependent_on_data(params, data)["scale"]
        height, width = params["shape"][:2]
        return {"scale": min(scale, self.long_side_cap / max(height, width))}


def _capped_shortest_size(sizes: Sequence[int], max_size: int) -> CappedSmallestMaxSize:
    resize = CappedSmallestMaxSize(max_size=list(sizes), area_for_downscale="image")
    resize.long_side_cap = float(max_size)
    return resize


def _boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes (pixel edges) of N masks; empty masks give zero boxes."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for k, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if len(rows):
            boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


class DetectionTransform:
    """Apply an albumentations pipeline to an image and its objects, and make tensors.

    Call signature::

        transform(image, boxes, labels, masks=None) -> dict

    with ``image`` an H x W x 3 RGB uint8 array, ``boxes`` (N, 4) float xyxy
    pixels inside the image, ``labels`` (N,) ints and ``masks`` (N, H, W) uint8
    or ``None``. Returns ``image`` (float32 CHW in [0, 1]), ``boxes`` (float32
    (M, 4)), ``labels`` (int64 (M,)), ``keep`` (int64 (M,), which input objects
    survived, in order) and, when masks were given, ``masks`` (uint8 (M, H', W')).

    Objects cropped away disappear from boxes, labels and masks alike; an
    output box is at least ``min_box_size`` pixels wide and high and lies inside
    the image, and an output mask is never empty. When the pipeline crops and
    masks are given, boxes are recomputed from the cropped masks (as detectron2
    does for LSJ), so that a cropped box always fits its mask.

    Randomness: each DataLoader worker reseeds the pipeline from its torch
    seed (albumentations keeps its own generator, which forked workers would
    otherwise share, repeating augmentations across workers and epochs).

    Args:
        ops: albumentations transforms; empty for none.
        crops: whether ``ops`` may crop.
        min_box_size: smallest output box side in pixels.
        seed: seed for reproducible augmentation (combined with the worker seed).
    """

    def __init__(self, ops: Sequence[Any], *, crops: bool = False, min_box_size: float = 1.0, seed: int | None = None):
        self.crops = crops
        self.min_box_size = min_box_size
        self.pipeline = None
        if ops:
            bbox_params = A.BboxParams(format="pascal_voc", label_fields=["indices"], clip=True)
            self.pipeline = SeededCompose(ops, seed=seed, bbox_params=bbox_params)

    def __call__(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        masks: np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)  # a copy: clipped in place below
        labels = np.asarray(labels, dtype=np.int64)
        indices = np.arange(len(boxes))
        if self.pipeline is not None:
            data: dict[str, Any] = {"image": image, "bboxes": boxes, "indices": indices}
            if masks is not None and len(masks):
                data["masks"] = masks
            out = self.pipeline(**data)
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            indices = np.asarray(out["indices"], dtype=np.int64)
            if masks is not None:
                if len(masks):
                    masks = np.asarray(out["masks"], dtype=np.uint8)[indices]
                else:
                    masks = np.zeros((0, *image.shape[:2]), dtype=np.uint8)
                if self.crops:
                    boxes = _boxes_from_masks(masks)

        height, width = image.shape[:2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        valid = (boxes[:, 2] - boxes[:, 0] >= self.min_box_size) & (boxes[:, 3] - boxes[:, 1] >= self.min_box_size)
        if masks is not None:
            valid &= masks.any(axis=(1, 2))
        result = {
            "image": image_to_tensor(image),
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes[valid])),
            "labels": torch.from_numpy(labels[indices[valid]]),
            "keep": torch.from_numpy(indices[valid]),
        }
        if masks is not None:
            result["masks"] = torch.from_numpy(np.ascontiguousarray(masks[valid]))
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pipeline={self.pipeline!r}, crops={self.crops}, min_box_size={self.min_box_size})"


def build_transforms(
    preset: str = "none",
    *,
    train: bool = True,
    min_size: int | Sequence[int] = tuple(range(480, 801, 32)),
    max_size: int = 1333,
    lsj_size: int = 1024,
    lsj_scale: tuple[float, float] = (0.1, 2.0),
    hflip_prob: float = 0.5,
    min_box_size: float = 1.0,
    seed: int | None = None,
) -> DetectionTransform:
    """Build the transform callable for :class:`detection.data.CocoDetection`.

    Args:
        preset: one of ``"none"``, ``"hflip"``, ``"multiscale"``, ``"lsj"``.
        train: ``False`` gives the evaluation transform (tensor conversion only).
        min_size: short-side candidates for ``"multiscale"`` (one is drawn per image).
        max_size: cap on the long side for ``"multiscale"``.
        lsj_size: output side of ``"lsj"`` (square crops).
        lsj_scale: range of the ``"lsj"`` rescale factor, relative to fitting ``lsj_size``.
        hflip_prob: probability of a horizontal flip (all presets but ``"none"``).
        min_box_size: objects whose box is narrower or lower than this after
            the transform (in pixels) are dropped.
        seed: makes augmentation reproducible; ``None`` draws fresh entropy.

    Returns:
        A :class:`DetectionTransform`.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown transforms preset {preset!r}; allowed: {', '.join(PRESETS)}")
    sizes = [min_size] if isinstance(min_size, int) else list(min_size)
    if not sizes or min(sizes) <= 0 or max_size <= 0:
        raise ValueError(f"min_size and max_size must be positive, got min_size={min_size}, max_size={max_size}")
    if not 0 < lsj_scale[0] <= lsj_scale[1]:
        raise ValueError(f"lsj_scale must satisfy 0 < low <= high, got {lsj_scale}")
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
    if not train or preset == "none":
        return DetectionTransform([], min_box_size=min_box_size, seed=seed)

    flip = A.HorizontalFlip(p=hflip_prob)
    if preset == "hflip":
        return DetectionTransform([flip], min_box_size=min_box_size, seed=seed)
    if preset == "multiscale":
        return DetectionTransform([_capped_shortest_size(sizes, max_size), flip], min_box_size=min_box_size, seed=seed)
    ops = [
        A.LongestMaxSize(max_size=lsj_size, area_for_downscale="image"),
        A.RandomScale(scale_limit=(lsj_scale[0] - 1.0, lsj_scale[1] - 1.0), area_for_downscale="image", p=1.0),
        A.PadIfNeeded(
            min_height=lsj_size,
            min_width=lsj_size,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=MEAN_PIXEL,
            fill_mask=0,
        ),
        A.RandomCrop(height=lsj_size, width=lsj_size),
        flip,
    ]
    return DetectionTransform(ops, crops=True, min_box_size=min_box_size, seed=seed)
