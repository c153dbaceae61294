"""Data layer: COCO-format data sets, augmentation presets, batching, synthetic shapes."""

from detection.data import shapes
from detection.data.batching import GroupedBatchSampler, collate_fn, create_aspect_ratio_groups
from detection.data.coco import (
    AnnotationError,
    CocoDetection,
    cat_id_to_label_from_mapping,
    label_to_cat_id_from_mapping,
    image_to_tensor,
    read_image_rgb,
)
from detection.data.roots import DataPathError, find_splits, prepare_data_root, shapes_cache_dir
from detection.data.shapes import SHAPES_CLASSES
from detection.data.transforms import PRESETS, DetectionTransform, build_transforms

__all__ = [
    "PRESETS",
    "SHAPES_CLASSES",
    "AnnotationError",
    "CocoDetection",
    "DataPathError",
    "DetectionTransform",
    "GroupedBatchSampler",
    "build_transforms",
    "cat_id_to_label_from_mapping",
    "collate_fn",
    "create_aspect_ratio_groups",
    "find_splits",
    "image_to_tensor",
    "label_to_cat_id_from_mapping",
    "prepare_data_root",
    "read_image_rgb",
    "shapes_cache_dir",
    "shapes",
]
