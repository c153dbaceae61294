"""Semantic segmentation data: COCO-format instances as class maps, the VOC layout, the shapes set, augmentation.

Every data set returns ``(image, mask)``: the image as an ImageNet-normalised float32
CHW tensor (what torchvision's segmentation models take), the mask as an int64 H x W
tensor of labels, ``0..num_classes-1``, with ``255`` (``IGNORE_INDEX``) where no label
counts (losses and metrics skip it).

Layouts:

- **COCO** (``CocoSegmentation``): ``ROOT/annotations/instances_{split}.json`` and
  ``ROOT/{split}/<file_name>``. Category ids map to contiguous labels ``1..K`` in id
  order, 0 is the background. A pixel is its category's label when exactly one
  category covers it (instances of one category are united), ``255`` when two or more
  categories overlap there (torchvision's references mark overlaps so) or a crowd
  region (``iscrowd=1``) covers it.
- **VOC** (``VOCSegmentation``): ``ROOT/JPEGImages/<id>.jpg`` (or ``.jpeg``, ``.png``, ``.bmp``, any case),
  ``ROOT/SegmentationClass/<id>.png`` (palette PNGs whose indices are the labels; VOC's
  255 object borders stay ignored) and ``ROOT/ImageSets/Segmentation/{split}.txt``.
- **shapes**: ``make_shapes`` writes the detection shapes set (COCO layout) and
  ``CocoSegmentation`` reads its semantic view; its objects never overlap, so it has no
  ignored pixels.

Images are used upright (EXIF orientation applied, as ``detection.data.read_image_rgb``
does), except a COCO image whose annotation size is its stored size and not its upright
one: its annotations were drawn on the stored pixels.

Bad input (each case tested): a missing folder, split list or annotation file, or an
annotation without a segmentation, is an error at construction naming the file. VOC ids
whose image or mask file is missing are left out with one warning that counts them
(an error when none is left). At read time an unreadable image, an image whose size
differs from its annotation or mask, a mask that is not a label image, labels outside
``0..num_classes-1`` other than 255, or an undecodable segmentation makes the sample
skipped: ``__getitem__`` returns the next readable one, a warning names the file once,
and ``num_skipped`` counts the skips (shared by DataLoader workers).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image

# albumentations asks PyPI for a newer version at import time unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402

from engine.coco import AnnotationError, load_coco_annotations  # noqa: E402
from engine.augment import SeededCompose  # noqa: E402
from engine.images import IMAGENET_MEAN, IMAGENET_STD, exif_orientation, image_to_tensor, read_image_rgb, upright_size  # noqa: E402
from engine.datasets import generate_atomically  # noqa: E402
from engine.shapes import SHAPES_CLASSES  # noqa: E402
from engine.shapes import generate as generate_shapes  # noqa: E402
from engine.skips import SKIP_REASONS, SkippingDataset  # noqa: E402

__all__ = [
    "BACKGROUND",
    "COCO_VOC_CATEGORIES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPES_SEG_CLASSES",
    "VOC_CLASSES",
    "AnnotationError",
    "CocoSegmentation",
    "SegmentationTransform",
    "VOCSegmentation",
    "build_seg_transforms",
    "coco_semantic_mask",
    "collate_fn",
    "denormalize",
    "make_shapes",
]

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
_LABEL_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")

Transform = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Masks


def _decode(segmentation: Any, height: int, width: int) -> np.ndarray:
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
        mask = _decode(ann["segmentation"], height, width).astype(bool)
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


def _check_labels(mask: np.ndarray, num_classes: int, ignore_index: int) -> str | None:
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if len(bad):
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        return f"label values {shown} are outside 0..{num_classes - 1} (and are not the ignore index {ignore_index})"
    return None


# ---------------------------------------------------------------------------------------------
# Transforms


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """An ImageNet-normalised CHW float image back to uint8 CHW (for drawing).

    Args:
        image: CHW float tensor as the data sets return it.
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device)[:, None, None]
    return ((image * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def _normalized(image: np.ndarray) -> torch.Tensor:
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
        return _normalized(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))

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


# ---------------------------------------------------------------------------------------------
# Data sets


class _SegmentationDataset(SkippingDataset):
    """What both layouts share: skipping unreadable samples, transforms, names."""

    class_names: list[str]
    ignore_index: int
    transforms: Transform

    @property
    def num_classes(self) -> int:
        """Labels the model must output (the background included)."""
        return len(self.class_names)

    def _sample_path(self, index: int) -> Path:
        raise NotImplementedError

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image, mask)`` arrays of sample ``index``; raises ``_BadSample`` for bad input."""
        raise NotImplementedError

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            return self._load(index)
        except _BadSample as exc:
            self._mark_bad(index, str(exc), exc.reason)
            return None

    def _mark_bad(self, index: int, message: str, reason: str = SKIP_REASONS[0]) -> None:
        self._record_bad(index, reason)
        logger.warning("skipping %s: %s (left out from now on)", self._sample_path(index), message)

    @property
    def skipped_files(self) -> list[str]:
        """Samples found unusable so far (each was warned about once)."""
        return [str(self._sample_path(i)) for i, bad in enumerate(self._bad) if bad]

    def read_sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw ``(image H x W x 3 uint8, mask H x W uint8)`` of ``index`` (no transform, no skipping).

        Raises:
            ValueError: the sample is bad input (the message says why).
        """
        try:
            return self._load(index)
        except _BadSample as exc:
            raise ValueError(f"{self._sample_path(index)}: {exc}") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, (image, mask) = self._first_readable(index)
        return self.transforms(image, mask)


class _BadSample(Exception):
    """A sample that cannot be used; the message says why, ``reason`` which kind of problem it is (``SKIP_REASONS``)."""

    def __init__(self, message: str, reason: str = SKIP_REASONS[0]) -> None:
        super().__init__(message)
        self.reason = reason


def _read_image(path: Path, expected: tuple[int, int] | None = None) -> np.ndarray:
    """The image as RGB uint8, upright by its EXIF tag unless ``expected`` (the annotation's size) is the stored frame."""
    try:
        upright = True
        if expected is not None:
            with Image.open(path) as pil:  # the header only: size and EXIF
                orientation, stored = exif_orientation(pil), (pil.height, pil.width)
            upright = orientation == 1 or upright_size(stored, orientation) == expected or stored != expected
        return read_image_rgb(path, exif_transpose=upright)
    # PIL raises many exception types for corrupt files; any failure to decode is bad input.
    except Exception as exc:  # noqa: BLE001
        raise _BadSample(f"unreadable image ({type(exc).__name__}: {exc})", "unreadable image") from None


class CocoSegmentation(_SegmentationDataset):
    """Semantic segmentation from a COCO-format instances file (see the module docstring for the rules).

    Attributes:
        root, split, ann_file, img_dir: where the data lives.
        ids: COCO image ids in data set order (after ``drop_empty``).
        cat_ids: sorted category ids; label ``i`` is ``cat_ids[i - 1]``.
        class_names: index = label; ``class_names[0] == "__background__"``.
        num_classes: K + 1.

    Args:
        root: data set folder.
        split: split name, e.g. ``"train2017"`` or ``"val"``.
        transforms: ``(image, mask) -> (image, mask)`` callable, e.g. from
            :func:`build_seg_transforms`; ``None`` is the evaluation transform (tensors,
            normalised, no resizing).
        drop_empty: leave out images without any non-crowd annotation (for training).
        ignore_index: label of overlaps and crowd regions.
        categories: COCO category ids that get labels ``1..K`` in this order; annotations
            of other categories are dropped, their pixels background (torchvision's
            ``FilterAndRemapCocoCategories``; ``COCO_VOC_CATEGORIES`` is its VOC subset).
            ``None``: every category, in id order.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        *,
        transforms: Transform | None = None,
        drop_empty: bool = False,
        ignore_index: int = IGNORE_INDEX,
        categories: Sequence[int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.ann_file = self.root / "annotations" / f"instances_{split}.json"
        self.img_dir = self.root / split
        self.transforms = transforms if transforms is not None else build_seg_transforms(train=False)
        self.ignore_index = ignore_index
        data = load_coco_annotations(self.ann_file)  # validates ids, names and boxes; errors name the file
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.img_dir} (annotations: {self.ann_file})")
        found = sorted(data["categories"], key=lambda c: c["id"])
        if categories is None:
            chosen = found
        else:
            by_id = {c["id"]: c for c in found}
            unknown = [i for i in categories if i not in by_id]
            if unknown or not categories:
                raise AnnotationError(f"{self.ann_file}: categories {unknown or list(categories)} are not among its category ids {sorted(by_id)}")
            chosen = [by_id[i] for i in categories]
        if len(chosen) >= ignore_index:
            raise AnnotationError(f"{self.ann_file}: {len(chosen)} categories do not fit labels 1..{ignore_index - 1}")
        self.cat_ids: list[int] = [c["id"] for c in chosen]
        self.class_names = [BACKGROUND] + [c["name"] for c in chosen]
        self.cat_id_to_label: dict[int, int] = {cat_id: i for i, cat_id in enumerate(self.cat_ids, start=1)}
        anns_by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            if ann["category_id"] not in self.cat_id_to_label:
                continue  # a category left out by ``categories``: its pixels stay background
            if not ann.get("segmentation"):
                raise AnnotationError(f"{self.ann_file}: annotation id {ann['id']} has no segmentation, which a class map needs")
            anns_by_image.setdefault(ann["image_id"], []).append(ann)
        self._images = sorted(data["images"], key=lambda img: img["id"])
        if drop_empty:
            self._images = [img for img in self._images if any(not a.get("iscrowd", 0) for a in anns_by_image.get(img["id"], []))]
        self.ids: list[int] = [img["id"] for img in self._images]
        self._anns = [anns_by_image.get(i, []) for i in self.ids]
        self._init_skips(len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def category_mapping(self) -> dict[str, list[Any]]:
        """``{"cat_ids": [...], "names": [...]}``: label ``i`` (1-based) is ``cat_ids[i - 1]``."""
        return {"cat_ids": list(self.cat_ids), "names": list(self.class_names[1:])}

    def _sample_path(self, index: int) -> Path:
        return self.img_dir / self._images[index]["file_name"]

    def _nothing_readable(self) -> str:
        return f"no readable image in {self.img_dir}: all {len(self.ids)} images of {self.ann_file} failed to load"

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        info = self._images[index]
        expected = (info["height"], info["width"])
        image = _read_image(self._sample_path(index), expected)
        if image.shape[:2] != expected:
            raise _BadSample(f"decoded size {image.shape[:2]} differs from (height, width) {expected} in {self.ann_file}", "unreadable image")
        try:
            mask = coco_semantic_mask(self._anns[index], *expected, self.cat_id_to_label, ignore_index=self.ignore_index)
        except Exception as exc:  # noqa: BLE001  (pycocotools raises several types for malformed segmentations)
            raise _BadSample(f"a segmentation in {self.ann_file} could not be decoded ({type(exc).__name__}: {exc})") from None
        return image, mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, classes={self.num_classes})"


def scan_mask_labels(
    root: str | os.PathLike[str], split: str, *, max_masks: int = 200, ignore_index: int = IGNORE_INDEX,
) -> tuple[set[int], int]:
    """The labels (other than ``ignore_index``) that a VOC-layout split's masks use, from a bounded sample.

    Up to ``max_masks`` masks spread evenly over the split list are read (palette or
    grayscale PNGs; others are the data set's to report), so the scan takes about a second
    whatever the split's size.

    Args:
        root: the VOC-layout folder.
        split: a list in ``ImageSets/Segmentation``.
        max_masks: most masks read.
        ignore_index: the label that does not count.

    Returns:
        ``(labels found, masks read)``.
    """
    root = Path(root)
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    step = max(1, -(-len(ids) // max(1, max_masks)))
    labels: set[int] = set()
    read = 0
    for image_id in ids[::step][:max_masks]:
        try:
            with Image.open(root / "SegmentationClass" / f"{image_id}.png") as png:
                if png.mode not in _LABEL_MODES:
                    continue
                labels.update(int(v) for v in np.unique(np.asarray(png)))
                read += 1
        except Exception:  # noqa: BLE001  (a missing or unreadable mask: the data set warns about it, naming the file)
            continue
    labels.discard(ignore_index)
    return labels, read


# Image files a VOC-layout folder may hold (any case); VOC itself has .jpg only.
VOC_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _image_files_by_id(folder: Path) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """``({id: image file}, {id: names of other files with that stem})`` of ``folder``, one listing for every id.

    Where one id has several images (``a.jpg`` and ``a.png``), the first suffix of
    ``VOC_IMAGE_SUFFIXES`` wins (then the name, for a stable choice).
    """
    images: dict[str, Path] = {}
    others: dict[str, list[str]] = {}
    rank = {suffix: i for i, suffix in enumerate(VOC_IMAGE_SUFFIXES)}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file():
            continue
        stem, suffix = os.path.splitext(entry.name)
        key = suffix.lower()
        if key not in rank:
            others.setdefault(stem, []).append(entry.name)
        elif stem not in images or rank[key] < rank[images[stem].suffix.lower()]:
            images[stem] = Path(entry.path)
    return images, others


def _why_missing(image_id: str, images: dict[str, Path], others: dict[str, list[str]], mask_dir: Path) -> str:
    if image_id not in images:
        if image_id in others:
            return (f"{image_id}: found {', '.join(others[image_id])}, not an image file read here "
                    f"({', '.join(VOC_IMAGE_SUFFIXES)}, any case)")
        return f"{image_id}: no image"
    return f"{image_id}: no mask {image_id}.png"


class VOCSegmentation(_SegmentationDataset):
    """Semantic segmentation in the Pascal VOC layout (see the module docstring).

    Attributes:
        root, split: where the data lives.
        ids: the image ids of the split that have both files.
        class_names: index = label.
        num_classes: ``len(class_names)``.

    Args:
        root: the folder holding ``JPEGImages/``, ``SegmentationClass/`` and
            ``ImageSets/Segmentation/`` (``VOCdevkit/VOC2012`` for VOC 2012).
        split: a list in ``ImageSets/Segmentation`` (``"train"``, ``"val"``, ``"trainval"``).
        transforms: ``(image, mask) -> (image, mask)``; ``None`` is the evaluation transform.
        class_names: label names, index = label (default VOC's 21); mask values must
            lie below ``len(class_names)`` or equal ``ignore_index``.
        ignore_index: the label that does not count (VOC's object borders are 255).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        *,
        transforms: Transform | None = None,
        class_names: Sequence[str] = VOC_CLASSES,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transforms = transforms if transforms is not None else build_seg_transforms(train=False)
        self.class_names = [str(n) for n in class_names]
        self.ignore_index = ignore_index
        if len(self.class_names) < 2:
            raise ValueError(f"class_names must name at least 2 labels, got {self.class_names}")
        self.image_dir = self.root / "JPEGImages"
        self.mask_dir = self.root / "SegmentationClass"
        self.split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        layout = "ROOT/JPEGImages/<id>.jpg, ROOT/SegmentationClass/<id>.png and ROOT/ImageSets/Segmentation/<split>.txt"
        for path in (self.image_dir, self.mask_dir):
            if not path.is_dir():
                nested = next(iter(sorted(self.root.glob("VOCdevkit/VOC*"))), None) if self.root.is_dir() else None
                hint = f"; {nested} looks like the folder to pass" if nested is not None else ""
                raise FileNotFoundError(f"folder not found: {path} (the VOC layout is {layout}){hint}")
        if not self.split_file.is_file():
            lists = sorted(p.stem for p in self.split_file.parent.glob("*.txt"))
            raise FileNotFoundError(f"split list not found: {self.split_file} (lists found: {', '.join(lists) or 'none'})")
        listed = [line.strip() for line in self.split_file.read_text().splitlines() if line.strip()]
        if not listed:
            raise ValueError(f"{self.split_file} lists no image ids")
        images, others = _image_files_by_id(self.image_dir)
        present = [i for i in listed if i in images and (self.mask_dir / f"{i}.png").is_file()]
        found = set(present)
        missing = [i for i in listed if i not in found]
        if not present:
            raise FileNotFoundError(f"none of the {len(listed)} ids in {self.split_file} has both an image {self.image_dir}/<id>"
                                    f"{{{','.join(VOC_IMAGE_SUFFIXES)}}} and a mask {self.mask_dir}/<id>.png")
        if missing:
            shown = ", ".join(_why_missing(i, images, others, self.mask_dir) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
            logger.warning("%s: left out %d of %d ids whose image or mask file is missing (%s)", self.split_file, len(missing), len(listed), shown)
        self._image_files: dict[str, Path] = {i: images[i] for i in present}
        self.ids: list[str] = present
        self.num_missing = len(missing)
        self._init_skips(len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def _sample_path(self, index: int) -> Path:
        return self._image_files[self.ids[index]]

    def mask_path(self, index: int) -> Path:
        """The label PNG of sample ``index``."""
        return self.mask_dir / f"{self.ids[index]}.png"

    def _nothing_readable(self) -> str:
        return f"no readable sample in {self.root}: all {len(self.ids)} of {self.split_file} failed to load"

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = _read_image(self._sample_path(index))
        path = self.mask_path(index)
        try:
            with Image.open(path) as png:
                png.load()
                if png.mode not in _LABEL_MODES:
                    raise _BadSample(f"mask {path.name} is a {png.mode} image; a label mask is a palette (P) or grayscale PNG of class indices",
                                     "mask that is not a label image (RGB, ...)")
                values = np.asarray(png)
        except _BadSample:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _BadSample(f"unreadable mask {path} ({type(exc).__name__}: {exc})", "unreadable mask") from None
        if values.shape != image.shape[:2]:
            raise _BadSample(f"mask {path.name} is {values.shape} but the image is {image.shape[:2]}", "mask whose size differs from its image's")
        problem = _check_labels(values, self.num_classes, self.ignore_index)
        if problem:
            raise _BadSample(f"mask {path.name}: {problem}", "mask with labels outside the configured classes")
        return image, values.astype(np.uint8)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, classes={self.num_classes})"


def make_shapes(
    root: str | os.PathLike[str],
    *,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 320,
    seed: int = 0,
) -> Path:
    """Write the synthetic shapes set (detection's generator, COCO layout) unless ``root`` holds it already.

    Read its semantic view with ``CocoSegmentation(root, "train")`` / ``"val"``: labels
    1..6 are ``SHAPES_SEG_CLASSES[1:]``, 0 the background.

    Args:
        root: folder of the data set (written atomically: an interrupted run leaves none).
        num_train: training images.
        num_val: validation images.
        image_size: long side in pixels.
        seed: one seed gives byte-identical files.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root)
    if not (root / "annotations" / "instances_val.json").is_file():
        logger.info("generating the shapes data set in %s", root)
        generate_atomically(root, lambda tmp: generate_shapes(tmp, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed))
    return root
