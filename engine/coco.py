"""The COCO instances file every task reads: checked entry by entry, with the keys other tools leave out filled.

``load_coco_annotations`` returns the parsed JSON for ``pycocotools.coco.COCO``; a file that
cannot be used raises ``AnnotationError`` naming the file and the entry.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pycocotools.mask as mask_util

__all__ = ["AnnotationError", "load_coco_annotations"]

logger = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """A COCO annotation file that cannot be used; the message names the file and the entry."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_coco_annotations(ann_file: Path) -> dict[str, Any]:
    """Read and validate a COCO instances file; every error names the file."""
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{ann_file}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise AnnotationError(f"{ann_file}: expected a JSON object at top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{ann_file}: missing or non-list '{key}'")

    cat_ids: set[int] = set()
    for cat in data["categories"]:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
            raise AnnotationError(f"{ann_file}: category {cat!r} needs an integer 'id' and a string 'name'")
        if cat["id"] in cat_ids:
            raise AnnotationError(f"{ann_file}: category id {cat['id']} appears twice")
        cat_ids.add(cat["id"])
    if not cat_ids:
        raise AnnotationError(f"{ann_file}: 'categories' is empty")

    image_ids: set[int] = set()
    for img in data["images"]:
        if not isinstance(img, dict) or not isinstance(img.get("id"), int):
            raise AnnotationError(f"{ann_file}: image entry {img!r} needs an integer 'id'")
        for key in ("file_name", "height", "width"):
            if key not in img:
                raise AnnotationError(f"{ann_file}: image id {img['id']} has no '{key}'")
        if not (isinstance(img["height"], int) and isinstance(img["width"], int) and img["height"] > 0 and img["width"] > 0):
            raise AnnotationError(f"{ann_file}: image id {img['id']} has invalid size {img['height']!r} x {img['width']!r}")
        if img["id"] in image_ids:
            raise AnnotationError(f"{ann_file}: image id {img['id']} appears twice")
        image_ids.add(img["id"])

    known = sorted(cat_ids)
    for ann in data["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        if ann_id is None:
            raise AnnotationError(f"{ann_file}: annotation {ann!r} has no 'id'")
        if ann.get("category_id") not in cat_ids:
            raise AnnotationError(
                f"{ann_file}: annotation id {ann_id} has category_id {ann.get('category_id')!r}, "
                f"which is not in 'categories' (known ids: {known})"
            )
        if ann.get("image_id") not in image_ids:
            raise AnnotationError(f"{ann_file}: annotation id {ann_id} has unknown image_id {ann.get('image_id')!r}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise AnnotationError(f"{ann_file}: annotation id {ann_id} has an invalid bbox {bbox!r} (want [x, y, w, h])")
    _fill_defaults(data, ann_file)
    return data


def _fill_defaults(data: dict[str, Any], ann_file: Path) -> None:
    """Give every annotation the ``iscrowd`` and ``area`` fields COCOeval reads (hand-made files often lack them)."""
    images = {img["id"]: img for img in data["images"]}
    crowd = area = 0
    for ann in data["annotations"]:
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            crowd += 1
        if not _is_number(ann.get("area")):
            segm = ann.get("segmentation")
            if segm:
                img = images[ann["image_id"]]
                rles = mask_util.frPyObjects(segm, img["height"], img["width"]) if isinstance(segm, list) or isinstance(segm.get("counts"), list) else segm
                ann["area"] = float(mask_util.area(mask_util.merge(rles) if isinstance(rles, list) else rles))
            else:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
            area += 1
    if crowd or area:
        logger.warning(
            "%s: filled fields COCO evaluation needs: iscrowd=0 for %d annotations, area (from mask, else box) for %d",
            ann_file, crowd, area,
        )
