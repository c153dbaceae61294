"""Detection's data: COCO-format data sets, augmentation presets, aspect-ratio grouped batches, data roots."""

from detection.data.batching import GroupedBatchSampler, collate_fn, create_aspect_ratio_groups
from detection.data.coco import CocoDetection, cat_id_to_label_from_mapping, label_to_cat_id_from_mapping
from engine.roots import find_splits, prepare_data_root, shapes_cache_dir
from detection.data.transforms import PRESETS, DetectionTransform, build_transforms
from engine.coco import AnnotationError
from engine.datasets import DataPathError

__all__ = [
    "PRESETS",
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
    "label_to_cat_id_from_mapping",
    "prepare_data_root",
    "shapes_cache_dir",
]
