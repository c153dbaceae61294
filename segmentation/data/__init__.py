"""Semantic segmentation data: COCO-format instances as class maps, the VOC layout, the shapes set, augmentation.

``labels`` (label lists, COCO instances as a class map, label checks), ``transforms``
(augmentation, normalisation, padded batches), ``datasets`` (the COCO, VOC and shapes sets).

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

from .datasets import VOC_IMAGE_SUFFIXES, CocoSegmentation, VOCSegmentation, make_shapes, scan_mask_labels
from .labels import BACKGROUND, COCO_VOC_CATEGORIES, IGNORE_INDEX, SHAPES_SEG_CLASSES, VOC_CLASSES, check_labels, coco_semantic_mask
from .transforms import SegmentationTransform, build_seg_transforms, collate_fn, denormalize, normalize_image

__all__ = [
    "BACKGROUND", "COCO_VOC_CATEGORIES", "IGNORE_INDEX", "SHAPES_SEG_CLASSES", "VOC_CLASSES", "VOC_IMAGE_SUFFIXES", "CocoSegmentation",
    "SegmentationTransform", "VOCSegmentation", "build_seg_transforms", "check_labels", "coco_semantic_mask", "collate_fn", "denormalize",
    "make_shapes", "normalize_image", "scan_mask_labels",
]
