"""The segmentation data sets: COCO-format instances as class maps, the VOC layout, the shapes set; bad samples skipped and named."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


from engine.coco import AnnotationError, load_coco_annotations
from engine.images import exif_orientation, read_image_rgb, upright_size
from engine.datasets import generate_atomically
from engine.shapes import generate as generate_shapes
from engine.skips import SKIP_REASONS, SkippingDataset

from .labels import BACKGROUND, IGNORE_INDEX, LABEL_MODES, VOC_CLASSES, check_labels, coco_semantic_mask
from .transforms import Transform, build_seg_transforms

__all__ = ["CocoSegmentation", "scan_mask_labels", "VOC_IMAGE_SUFFIXES", "VOCSegmentation", "make_shapes"]

logger = logging.getLogger(__name__)

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
                if png.mode not in LABEL_MODES:
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
                if png.mode not in LABEL_MODES:
                    raise _BadSample(f"mask {path.name} is a {png.mode} image; a label mask is a palette (P) or grayscale PNG of class indices",
                                     "mask that is not a label image (RGB, ...)")
                values = np.asarray(png)
        except _BadSample:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _BadSample(f"unreadable mask {path} ({type(exc).__name__}: {exc})", "unreadable mask") from None
        if values.shape != image.shape[:2]:
            raise _BadSample(f"mask {path.name} is {values.shape} but the image is {image.shape[:2]}", "mask whose size differs from its image's")
        problem = check_labels(values, self.num_classes, self.ignore_index)
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
