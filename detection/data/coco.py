"""COCO-format detection data set: validated once at construction, robust to bad images.

Layout: ``ROOT/annotations/instances_{split}.json`` and ``ROOT/{split}/<file_name>``.

Policy for bad input (each case is tested):

- Missing or invalid annotation file, an annotation whose ``category_id`` or
  ``image_id`` is unknown, or a malformed ``bbox``: an error at construction
  that names the file and the offending id.
- A missing ``iscrowd`` means 0 and a missing ``area`` is computed (the mask's
  area when a segmentation exists, else the box's), when the file is read, with
  one warning counting what was filled; the filled object is what evaluation
  scores against, so every COCO evaluator sees the same ground truth.
- Crowd regions (``iscrowd=1``) are left out of training targets (they stay in
  :attr:`CocoDetection.coco`, where COCOeval uses them).
- A box partly outside the image is clipped to it; a box with zero width or
  height after clipping is dropped with its mask and label.
- ``drop_empty=True`` leaves out images with no usable object.
- An unreadable, corrupt or missing image, or one whose decoded size differs
  from the annotation file, is skipped: ``__getitem__`` returns the next
  readable index instead, a logged warning names the file once per run, and :attr:`CocoDetection.num_skipped` counts the skips (shared by
  DataLoader workers).
- Grayscale, RGBA, palette and 16-bit images are converted to RGB uint8.
- EXIF orientation (phone photos): an image is used in the frame its JSON
  ``height``/``width`` describe. Where the tag swaps height and width and the
  image is not square, the size decides: the image is turned upright when
  the JSON holds the upright size, kept as stored when it holds the stored
  size. Where the size cannot tell (square images, flips and 180° turns),
  ``exif_transpose`` decides: ``True`` (default, as annotation tools and
  detectron2 show images) turns them upright, ``False`` keeps stored pixels
  (data sets annotated on the pixels as stored). :attr:`CocoDetection.num_rotated`
  counts the images turned upright and :meth:`CocoDetection.orientation_summary`
  says it in one line; a warning names the option once when an image's size
  contradicts it.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import multiprocessing
import os
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO

from engine.images import as_rgb_array, exif_orientation, image_to_tensor, read_image_rgb, upright_size
from engine.coco import AnnotationError, load_coco_annotations
from engine.skips import SkippingDataset

__all__ = [
    "AnnotationError",
    "CocoDetection",
    "cat_id_to_label_from_mapping",
    "exif_orientation",
    "image_to_tensor",
    "label_to_cat_id_from_mapping",
    "read_image_rgb",
    "upright_size",
]

logger = logging.getLogger(__name__)

BACKGROUND = "__background__"

Transform = Callable[..., Mapping[str, torch.Tensor]]


def label_to_cat_id_from_mapping(mapping: Mapping[str, Any]) -> dict[int, int]:
    """Contiguous label (1..K) -> original category id, from :meth:`CocoDetection.category_mapping`.

    Args:
        mapping: ``{"cat_ids": [...], "names": [...]}`` as saved in a checkpoint.
    """
    return {label: int(cat_id) for label, cat_id in enumerate(mapping["cat_ids"], start=1)}


def cat_id_to_label_from_mapping(mapping: Mapping[str, Any]) -> dict[int, int]:
    """Original category id -> contiguous label (1..K), from :meth:`CocoDetection.category_mapping`.

    Args:
        mapping: ``{"cat_ids": [...], "names": [...]}`` as saved in a checkpoint.
    """
    return {int(cat_id): label for label, cat_id in enumerate(mapping["cat_ids"], start=1)}


class CocoDetection(SkippingDataset):
    """COCO-format detection data set for torchvision detectors.

    Annotations are parsed and validated once, at construction; targets are
    built from the cached per-image arrays, so evaluation ground truth is
    :attr:`coco` itself and never goes through the transforms.

    Attributes:
        root, split, ann_file, img_dir: where the data lives.
        coco: the pycocotools ``COCO`` object (evaluation ground truth).
        ids: COCO image ids in data set order (after ``drop_empty``).
        cat_ids: sorted original category ids; label ``i`` is ``cat_ids[i - 1]``.
        class_names: index = contiguous label; ``class_names[0] == "__background__"``.
        num_classes: K + 1 (background included, as torchvision's R-CNNs count).
        cat_id_to_label, label_to_cat_id: the mapping both ways.
        image_sizes: (height, width) per data set index, from the JSON.

    ``__getitem__`` returns ``(image, target)``: a float32 CHW tensor in
    [0, 1] and a dict with ``boxes`` (float32 N x 4, xyxy pixels), ``labels``
    (int64), ``image_id`` (int64 scalar, the original COCO id), ``area``
    (float32), ``iscrowd`` (int64 zeros) and, with ``masks=True``, ``masks``
    (uint8 N x H x W). Without transforms ``area`` is the annotation's; with
    transforms it is scaled by how much the object's box area changed.

    Skipped images: :attr:`num_skipped` counts skips since the last
    :meth:`reset_skipped` across DataLoader worker processes (call both in the
    main process, e.g. report and reset at the end of every epoch);
    :attr:`skipped_files` lists the files found bad so far. Under DDP each
    rank counts its own skips.

    Args:
        root: data set folder.
        split: split name, e.g. ``"train2017"`` or ``"val"``.
        transforms: callable ``(image, boxes, labels, masks) -> dict`` as
            built by :func:`detection.data.build_transforms`; ``None`` only
            converts the image to a tensor, keeping its size.
        masks: also return instance masks decoded from polygons or RLE.
        drop_empty: leave out images with no usable object (for training).
        exif_transpose: where an image's size cannot tell which frame its
            annotations are in (square images, flips, 180° turns), apply its
            EXIF orientation tag (``True``, annotated as viewers show photos)
            or keep the pixels as stored (``False``, annotated on stored
            pixels). A size that tells wins over this option, with a warning.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        *,
        transforms: Transform | None = None,
        masks: bool = False,
        drop_empty: bool = False,
        exif_transpose: bool = True,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.ann_file = self.root / "annotations" / f"instances_{split}.json"
        self.img_dir = self.root / split
        self.transforms = transforms
        self.masks = masks
        self.drop_empty = drop_empty
        self.exif_transpose = exif_transpose
        self._warned_frame = False

        data = load_coco_annotations(self.ann_file)
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.img_dir} (annotations: {self.ann_file})")
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()

        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids: list[int] = [c["id"] for c in categories]
        self.class_names: list[str] = [BACKGROUND] + [c["name"] for c in categories]
        self.num_classes: int = len(self.class_names)
        self.cat_id_to_label: dict[int, int] = {cat_id: i for i, cat_id in enumerate(self.cat_ids, start=1)}
        self.label_to_cat_id: dict[int, int] = {i: cat_id for cat_id, i in self.cat_id_to_label.items()}

        self._records: list[dict[str, Any]] = []
        self.ids: list[int] = []
        clipped = dropped = 0
        for image_id in sorted(self.coco.imgs):
            record, n_clipped, n_dropped = self._build_record(image_id)
            clipped += n_clipped
            dropped += n_dropped
            if drop_empty and len(record["labels"]) == 0:
                continue
            self.ids.append(image_id)
            self._records.append(record)
        if clipped or dropped:
            logger.info(
                "%s: clipped %d boxes to their image, dropped %d with zero width or height", self.ann_file, clipped, dropped
            )
        self.image_sizes: list[tuple[int, int]] = [
            (int(self.coco.imgs[i]["height"]), int(self.coco.imgs[i]["width"])) for i in self.ids
        ]

        self._init_skips(len(self.ids))
        # Per image, once read: 0 no orientation tag (or not read yet), 1 turned upright, 2 kept as stored.
        self._oriented = multiprocessing.RawArray(ctypes.c_int8, len(self.ids))

    def _build_record(self, image_id: int) -> tuple[dict[str, Any], int, int]:
        info = self.coco.imgs[image_id]
        height, width = float(info["height"]), float(info["width"])
        boxes, labels, areas, anns = [], [], [], []
        clipped = dropped = 0
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            if self.masks and not ann.get("segmentation"):
                raise AnnotationError(f"{self.ann_file}: annotation id {ann['id']} has no segmentation, needed for masks=True")
            x, y, w, h = ann["bbox"]
            box = [min(max(x, 0.0), width), min(max(y, 0.0), height), min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]
            if box[2] <= box[0] or box[3] <= box[1]:
                dropped += 1
                continue
            clipped += box != [x, y, x + w, y + h]
            boxes.append(box)
            labels.append(self.cat_id_to_label[ann["category_id"]])
            areas.append(float(ann.get("area", (box[2] - box[0]) * (box[3] - box[1]))))
            anns.append(ann)
        record = {
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64),
            "areas": np.asarray(areas, dtype=np.float32),
            "anns": anns,
        }
        return record, clipped, dropped

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height per data set index, from the annotation file (no image reads)."""
        return [w / h for h, w in self.image_sizes]

    def category_mapping(self) -> dict[str, list[Any]]:
        """The label <-> category id mapping as plain data, to save in checkpoints.

        Returns:
            ``{"cat_ids": [...], "names": [...]}``; label ``i`` (1-based) is
            ``cat_ids[i - 1]`` named ``names[i - 1]``. Read it back with
            :func:`label_to_cat_id_from_mapping`.
        """
        return {"cat_ids": list(self.cat_ids), "names": list(self.class_names[1:])}

    def image_path(self, index: int) -> Path:
        """File of the image at data set ``index``."""
        return self.img_dir / self.coco.imgs[self.ids[index]]["file_name"]

    @property
    def skipped_files(self) -> list[str]:
        """Files found unusable so far (each was warned about once)."""
        return [str(self.image_path(i)) for i, bad in enumerate(self._bad) if bad]

    def _mark_bad(self, index: int, why: str, detail: str) -> None:
        self._record_bad(index, why)
        logger.warning("skipping image %s: %s", self.image_path(index), detail)

    def _read(self, index: int) -> np.ndarray | None:
        path = self.image_path(index)
        expected = self.image_sizes[index]
        try:
            with Image.open(path) as pil:
                pil.load()
                orientation = exif_orientation(pil)
                stored = (pil.height, pil.width)
                upright = orientation != 1 and self._upright(index, stored, orientation)
                image = as_rgb_array(ImageOps.exif_transpose(pil) if upright else pil)
        # PIL raises many exception types for corrupt files (OSError, SyntaxError,
        # struct.error, ...); any failure to decode means the file is bad input.
        except Exception as exc:  # noqa: BLE001
            why = "missing image file" if isinstance(exc, FileNotFoundError) else "unreadable image"
            self._mark_bad(index, why, f"{type(exc).__name__}: {exc}")
            return None
        if image.shape[:2] != expected:
            tag = ""
            if orientation != 1:
                tag = f" (EXIF orientation {orientation}: {stored} as stored, {upright_size(stored, orientation)} upright)"
            self._mark_bad(index, "image whose size differs from its annotation's",
                           f"decoded size {image.shape[:2]}{tag} differs from (height, width) {expected} in {self.ann_file}")
            return None
        if orientation != 1:
            self._oriented[index] = 1 if upright else 2
        return image

    def _upright(self, index: int, stored: tuple[int, int], orientation: int) -> bool:
        """Whether to apply the orientation tag: the JSON size decides when it can, else ``exif_transpose``."""
        turned = upright_size(stored, orientation)
        expected = self.image_sizes[index]
        if turned == stored or expected not in (turned, stored):
            return self.exif_transpose
        upright = expected == turned
        if upright != self.exif_transpose and not self._warned_frame:
            self._warned_frame = True
            frame, option = ("upright", "true") if upright else ("as stored", "false")
            logger.warning(
                "%s: its (height, width) %s in %s is the image %s, against exif_transpose=%s; used it %s. "
                "Images whose size cannot tell (square ones, flips, 180-degree turns) follow exif_transpose: "
                "set it to %s if the data set was annotated on images %s",
                self.image_path(index), expected, self.ann_file, frame, self.exif_transpose, frame, option, frame,
            )
        return upright

    @property
    def num_rotated(self) -> int:
        """Images turned upright by their EXIF orientation tag so far, across DataLoader workers."""
        return int((np.frombuffer(self._oriented, dtype=np.int8) == 1).sum())

    def orientation_summary(self) -> str | None:
        """One line on the images read so far that carry an EXIF orientation tag; ``None`` when none did."""
        flags = np.frombuffer(self._oriented, dtype=np.int8)
        rotated, kept = int((flags == 1).sum()), int((flags == 2).sum())
        if not rotated and not kept:
            return None
        return (
            f"{self.ann_file}: {rotated} images turned upright by their EXIF orientation tag, {kept} with a tag kept "
            f"as stored (exif_transpose={self.exif_transpose}; a size that tells the frame wins)"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if get_spawning_popen() is None:  # as SkippingDataset does for its counters
            state["_oriented"] = np.frombuffer(self._oriented, dtype=np.int8).copy()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("_oriented"), np.ndarray):
            shared = multiprocessing.RawArray(ctypes.c_int8, len(state["_oriented"]))
            np.frombuffer(shared, dtype=np.int8)[:] = state["_oriented"]
            state["_oriented"] = shared
        super().__setstate__(state)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._sample(*self._first_readable(index))

    def _nothing_readable(self) -> str:
        return f"no readable image in {self.img_dir}: all {len(self.ids)} images of {self.ann_file} failed to load"

    def _sample(self, index: int, image: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self._records[index]
        boxes, labels, areas = record["boxes"], record["labels"], record["areas"]
        masks = None
        if self.masks:
            height, width = self.image_sizes[index]
            masks = np.zeros((len(labels), height, width), dtype=np.uint8)
            for k, ann in enumerate(record["anns"]):
                masks[k] = self.coco.annToMask(ann)

        target: dict[str, torch.Tensor] = {}
        if self.transforms is None:
            image_t = image_to_tensor(image)
            target["boxes"] = torch.from_numpy(boxes.copy())
            target["labels"] = torch.from_numpy(labels.copy())
            target["area"] = torch.from_numpy(areas.copy())
            if masks is not None:
                target["masks"] = torch.from_numpy(masks)
        else:
            out = self.transforms(image, boxes, labels, masks)
            image_t = out["image"]
            keep = out["keep"].numpy()
            target["boxes"] = out["boxes"]
            target["labels"] = out["labels"]
            old = boxes[keep]
            old_area = (old[:, 2] - old[:, 0]) * (old[:, 3] - old[:, 1])
            new = out["boxes"]
            new_area = ((new[:, 2] - new[:, 0]) * (new[:, 3] - new[:, 1])).numpy()
            target["area"] = torch.from_numpy((areas[keep] * new_area / old_area).astype(np.float32))
            if masks is not None:
                target["masks"] = out["masks"]
        target["image_id"] = torch.tensor(self.ids[index], dtype=torch.int64)
        target["iscrowd"] = torch.zeros(len(target["labels"]), dtype=torch.int64)
        return image_t, {k: target[k] for k in ("boxes", "labels", "image_id", "area", "iscrowd", "masks") if k in target}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
            f"classes={self.num_classes - 1}, masks={self.masks}, drop_empty={self.drop_empty}, exif_transpose={self.exif_transpose})"
        )
