"""Synthetic *shapes*: a small COCO-layout detection and segmentation data set.

Every image has a textured, noisy background with distractor lines and 1 to 8
filled shapes of random colour, rotation and size, drawn in order so that later
shapes occlude earlier ones. Annotations describe what is *visible*:

- ``segmentation``: polygons traced (``cv2.findContours``) around the visible
  pixels of each object; an object cut in two by an occluder has two polygons.
- ``area``: the pixel count of those polygons as pycocotools rasterises them
  (``pycocotools.mask.area``), so it equals ``COCO.annToMask(ann).sum()``.
- ``bbox``: ``pycocotools.mask.toBbox`` of the same mask (xywh), so the box
  and the mask agree exactly.

Placement rejects a new shape if it would leave an earlier one less than 30 %
visible, under 16 pixels, or with a hole (COCO polygons cannot express holes),
so every visible object is annotated and every annotation is visible.

Sizes are relative to the image: the shapes' circumscribed diameter is drawn
log-uniformly between ``max(12 px, 6 %)`` of the long side and 90 % of the short
side. At 320 px this yields COCO small (< 32^2), medium and large areas.

Output is deterministic: each image's random generator is seeded from
``(seed, split, index)`` and files are written in a fixed order with a fixed
JPEG quality, so one seed gives byte-identical files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pycocotools.mask as mask_utils

__all__ = ["SHAPES_CLASSES", "generate", "render_image", "scene_frames"]

SHAPES_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "ellipse")

JPEG_QUALITY = 90
MIN_VISIBLE_FRACTION = 0.3
MIN_AREA = 16
_SPLIT_CODES = {"train": 0, "val": 1}
_SUBPIXEL_BITS = 4
_CIRCLE_VERTICES = 48


def _unit_polygon(name: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices (V, 2) of a shape inscribed in the unit circle, before rotation."""
    if name in ("circle", "ellipse"):
        t = np.linspace(0.0, 2.0 * np.pi, _CIRCLE_VERTICES, endpoint=False)
        # Elongated enough that an ellipse is never mistaken for a circle.
        minor = 1.0 if name == "circle" else rng.uniform(0.4, 0.65)
        return np.stack([np.cos(t), minor * np.sin(t)], axis=1)
    if name == "star":
        t = np.linspace(0.0, 2.0 * np.pi, 10, endpoint=False)
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    corners = {"triangle": 3, "square": 4, "hexagon": 6}[name]
    t = np.linspace(0.0, 2.0 * np.pi, corners, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour field plus mid-frequency texture and distractor lines (float32 HxWx3)."""
    gh, gw = rng.integers(2, 7, size=2)
    coarse = rng.uniform(0, 255, size=(gh, gw, 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    cell = int(rng.integers(4, 12))
    fine = rng.uniform(-40, 40, size=(max(1, height // cell), max(1, width // cell), 1)).astype(np.float32)
    image += cv2.resize(fine, (width, height), interpolation=cv2.INTER_LINEAR)[..., None]
    for _ in range(int(rng.integers(3, 12))):
        p1 = tuple(int(v) for v in rng.integers(0, [width, height]))
        p2 = tuple(int(v) for v in rng.integers(0, [width, height]))
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        cv2.line(image, p1, p2, colour, thickness=int(rng.integers(1, 4)), lineType=cv2.LINE_AA)
    return image


def _has_hole(mask: np.ndarray) -> bool:
    _, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0, :, 3] != -1).any())


def _place_objects(
    rng: np.random.Generator, height: int, width: int
) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """Sample shapes back to front; returns class indices, full masks and visible masks."""
    long_side, short_side = max(height, width), min(height, width)
    d_min = max(12.0, 0.06 * long_side)
    d_max = max(d_min * 1.5, 0.9 * short_side)
    wanted = int(rng.integers(1, 9))
    classes: list[int] = []
    full: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    full_areas: list[int] = []
    for _ in range(wanted * 6):
        if len(classes) == wanted:
            break
        cls = int(rng.integers(len(SHAPES_CLASSES)))
        radius = 0.5 * float(np.exp(rng.uniform(np.log(d_min), np.log(d_max))))
        angle = rng.uniform(0.0, 2.0 * np.pi)
        centre = rng.uniform([0.25 * radius, 0.25 * radius], [width - 0.25 * radius, height - 0.25 * radius])
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = _unit_polygon(SHAPES_CLASSES[cls], rng) @ rotation.T * radius + centre
        mask = np.zeros((height, width), dtype=np.uint8)
        fixed = np.round(points * (1 << _SUBPIXEL_BITS)).astype(np.int32)
        cv2.fillPoly(mask, [fixed], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
        area = int(cv2.countNonZero(mask))
        if area < MIN_AREA:
            continue
        not_mask = 1 - mask
        updated = []
        for vis, full_area in zip(visible, full_areas):
            new_vis = vis & not_mask
            count = int(cv2.countNonZero(new_vis))
            if count < max(MIN_AREA, MIN_VISIBLE_FRACTION * full_area) or _has_hole(new_vis):
                break
            updated.append(new_vis)
        else:
            classes.append(cls)
            full.append(mask)
            visible = updated + [mask]
            full_areas.append(area)
    return classes, full, visible


def _polygons(visible: np.ndarray) -> list[list[float]]:
    # Traced at twice the resolution, the contour runs a quarter pixel inside the
    # mask's outer edge, so pycocotools rasterises it back to exactly these pixels
    # (tracing at 1x runs through boundary pixel centres and loses ~7 % of area).
    height, width = visible.shape
    doubled = cv2.resize(visible, (2 * width, 2 * height), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [(c.reshape(-1, 2) * 0.5 + 0.25).ravel().tolist() for c in contours if len(c) >= 3]


def render_image(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image and its object annotations.

    Args:
        rng: the image's own random generator.
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        The image (H x W x 3, RGB uint8) and one dict per object with
        ``category_id``, ``segmentation``, ``area`` and ``bbox`` (COCO conventions).
    """
    image = _background(rng, height, width)
    classes, full, visible = _place_objects(rng, height, width)
    for mask in full:
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        # A soft gradient across each shape, so that objects are not flat colour patches.
        gx, gy = (rng.uniform(-30, 30, size=2) / max(height, width)).astype(np.float32)
        x, y, w, h = cv2.boundingRect(mask)
        region = mask[y : y + h, x : x + w].astype(bool)
        shade = gx * np.arange(x, x + w, dtype=np.float32)[None, :] + gy * np.arange(y, y + h, dtype=np.float32)[:, None]
        image[y : y + h, x : x + w][region] = colour + shade[region][:, None]
    sigma = float(rng.uniform(3.0, 12.0))
    image += rng.standard_normal(image.shape, dtype=np.float32) * sigma
    image = np.clip(image, 0, 255).astype(np.uint8)

    objects = []
    for cls, vis in zip(classes, visible):
        polygons = _polygons(vis)
        if not polygons:
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        area = int(mask_utils.area(rle))
        if area < MIN_AREA:
            continue
        objects.append(
            {
                "category_id": cls + 1,
                "segmentation": polygons,
                "area": float(area),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    return image, objects


def scene_frames(height: int, width: int, count: int, *, seed: int = 0, step: int = 3) -> list[np.ndarray]:
    """Frames of a video panning across one shapes scene ``step`` pixels a frame, so every object moves.

    Args:
        height: frame height in pixels.
        width: frame width in pixels.
        count: number of frames.
        seed: the scene's random seed.
        step: pixels the view moves right from one frame to the next.

    Returns:
        ``count`` RGB uint8 arrays of ``height`` x ``width`` x 3.
    """
    scene, _ = render_image(np.random.default_rng(seed), height, width + step * count)
    return [np.ascontiguousarray(scene[:, step * i:step * i + width]) for i in range(count)]

def _image_size(rng: np.random.Generator, image_size: int) -> tuple[int, int]:
    short = int(round(0.75 * image_size))
    return [(image_size, image_size), (short, image_size), (image_size, short)][int(rng.integers(3))]


def _write_split(root: Path, split: str, count: int, image_size: int, seed: int) -> None:
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
        height, width = _image_size(rng, image_size)
        image, objects = render_image(rng, height, width)
        file_name = f"{index:06d}.jpg"
        ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {img_dir / file_name}")
        (img_dir / file_name).write_bytes(encoded.tobytes())
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width, "license": 1})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})

    data = {
        "info": {
            "description": "resfpn synthetic shapes",
            "version": "1.0",
            "seed": seed,
            "image_size": image_size,
        },
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES_CLASSES)],
        "images": images,
        "annotations": annotations,
    }
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    # Written last and atomically: an annotation file means its images are complete.
    tmp = ann_file.with_name(ann_file.name + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, ann_file)


def generate(
    out_dir: str | os.PathLike[str],
    *,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 320,
    seed: int = 0,
) -> Path:
    """Write a synthetic shapes data set in COCO layout.

    Creates ``out_dir/train/*.jpg``, ``out_dir/val/*.jpg`` and
    ``out_dir/annotations/instances_{train,val}.json``. Category ids are
    1..len(SHAPES_CLASSES) in the order of :data:`SHAPES_CLASSES`.

    Args:
        out_dir: folder to write into (created if needed; existing files with
            the same names are overwritten).
        num_train: number of training images.
        num_val: number of validation images.
        image_size: long side of every image in pixels (the short side is the
            same or 3/4 of it, in either orientation).
        seed: one seed gives byte-identical files.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64 pixels, got {image_size}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    root = Path(out_dir)
    _write_split(root, "train", num_train, image_size, seed)
    _write_split(root, "val", num_val, image_size, seed)
    return root
