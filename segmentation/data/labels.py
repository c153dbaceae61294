"""Labels of semantic segmentation: the ignore index, the class lists, COCO instances as a class map, label checks."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util


from engine.shapes import SHAPES_CLASSES

__all__ = ["IGNORE_INDEX", "BACKGROUND", "VOC_CLASSES", "SHAPES_SEG_CLASSES", "COCO_VOC_CATEGORIES", "LABEL_MODES", "decode_segmentation", "coco_semantic_mask", "check_labels"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
BACKGROUND = "__background__"
# torchvision's names for the 21 VOC labels (index = label).
VOC_CLASSES: tuple[str, ...] = (
    BACKGROUND, "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
SHAPES_SEG_CLASSES: tuple[str, ...] = (BACKGROUND, *SHAPES_CLASSES)
# torchvision's references/segmentation CAT_LIST without its 0: the COCO ids of VOC's 20 classes, in VOC's label order.
COCO_VOC_CATEGORIES: tuple[int, ...] = (5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
LABEL_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """One annotation's ``segmentation`` (polygons, RLE or uncompressed RLE) as an H x W uint8 mask."""
    if isinstance(segmentation, list):
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_util.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    mask = mask_util.decode(rle)
    if mask.shape != (height, width):
        raise ValueError(f"segmentation decodes to {mask.shape}, not the image's ({height}, {width})")
    return mask


def coco_semantic_mask(
    annotations: Sequence[Mapping[str, Any]],
    height: int,
    width: int,
    cat_id_to_label: Mapping[int, int],
    *,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Turn one image's COCO instance annotations into a class map.

    Args:
        annotations: the image's annotations (``category_id``, ``segmentation``,
            optional ``iscrowd``).
        height: image height.
        width: image width.
        cat_id_to_label: category id -> label (1..K); 0 is the background.
        ignore_index: label of pixels that must not count.

    Returns:
        H x W uint8: the label of the one category covering a pixel (instances of a
        category are united), ``ignore_index`` where two or more categories overlap or a
        crowd region lies, 0 elsewhere.
    """
    per_label: dict[int, np.ndarray] = {}
    crowd = np.zeros((height, width), dtype=bool)
    for ann in annotations:
        mask = decode_segmentation(ann["segmentation"], height, width).astype(bool)
        if ann.get("iscrowd", 0):
            crowd |= mask
            continue
        label = cat_id_to_label[ann["category_id"]]
        if label in per_label:
            per_label[label] |= mask
        else:
            per_label[label] = mask
    target = np.zeros((height, width), dtype=np.uint8)
    covered = np.zeros((height, width), dtype=np.uint8)
    for label, mask in per_label.items():
        target[mask] = label
        covered += mask
    target[(covered > 1) | crowd] = ignore_index
    return target


def check_labels(mask: np.ndarray, num_classes: int, ignore_index: int) -> str | None:
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if len(bad):
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        return f"label values {shown} are outside 0..{num_classes - 1} (and are not the ignore index {ignore_index})"
    return None
