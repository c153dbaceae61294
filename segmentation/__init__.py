"""Semantic segmentation on ResNet-18/34: DeepLabV3, FCN and a semantic FPN, their data, metrics and prediction."""

from .checkpoint import load_segmenter, save_segmenter
from .data import (
    IGNORE_INDEX,
    SHAPES_SEG_CLASSES,
    VOC_CLASSES,
    CocoSegmentation,
    VOCSegmentation,
    build_seg_transforms,
    coco_semantic_mask,
    collate_fn,
    make_shapes,
)
from .metrics import ConfusionMatrix
from .models import ARCHS, BACKBONES, OUTPUT_STRIDES, build_segmenter, check_segmenter_options, rebuild_segmenter
from .predict import SegmentationPredictor, SegmentationResult
from .visualize import colorize, draw_segmentation, save_class_map, voc_palette

__all__ = [
    "ARCHS",
    "BACKBONES",
    "IGNORE_INDEX",
    "OUTPUT_STRIDES",
    "SHAPES_SEG_CLASSES",
    "VOC_CLASSES",
    "CocoSegmentation",
    "ConfusionMatrix",
    "SegmentationPredictor",
    "SegmentationResult",
    "VOCSegmentation",
    "build_seg_transforms",
    "build_segmenter",
    "check_segmenter_options",
    "coco_semantic_mask",
    "collate_fn",
    "colorize",
    "draw_segmentation",
    "load_segmenter",
    "make_shapes",
    "rebuild_segmenter",
    "save_class_map",
    "save_segmenter",
    "voc_palette",
]
