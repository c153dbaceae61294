"""Data layer: COCO-format data sets, augmentation presets, batching, synthetic shapes."""

from detection.data import shapes
from detection.data.batching import GroupedBatchSampler, collate_fn, create_aspect_ratio_groups
from detection.data.coco import (
    CocoDetection,
    SkippedImageWarning,
    cat_id_to_label_from_mapping,
    label_to_cat_id_from_mapping,
    read_image_rgb,
)
from detection.data.shapes import SHAPES_CLASSES
from detection.data.transforms import PRESETS, DetectionTransform, build_transforms

__all__ = [
    "PRESETS",
    "SHAPES_CLASSES",
    "CocoDetection",
    "DetectionTransform",
    "GroupedBatchSampler",
    "SkippedImageWarning",
    "build_transforms",
    "cat_id_to_label_from_mapping",
    "collate_fn",
    "create_aspect_ratio_groups",
    "label_to_cat_id_from_mapping",
    "read_image_rgb",
    "shapes",
]
