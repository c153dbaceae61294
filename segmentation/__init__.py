"""Semantic segmentation on ResNet-18/34: DeepLabV3, FCN and a semantic FPN, their data, metrics and prediction.

The task contract every task package shares (``docs/architecture.md``): ``TASK``,
``train`` (``tools/train_seg.py``), ``preflight``, ``evaluate`` (a confusion matrix),
``format_metrics``, ``save_model`` / ``load_model``; the task's own names for them
(``train_segmenter``, ``evaluate_segmenter``, ...) stay.
"""

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
from .evaluation import evaluate_segmenter, format_seg_metrics
from .training import TASK, preflight_seg, train_segmenter
from .visualize import colorize, draw_segmentation, save_class_map, voc_palette

train = train_segmenter
preflight = preflight_seg
evaluate = evaluate_segmenter
format_metrics = format_seg_metrics
save_model = save_segmenter
load_model = load_segmenter

__all__ = [
    "ARCHS",
    "BACKBONES",
    "IGNORE_INDEX",
    "OUTPUT_STRIDES",
    "SHAPES_SEG_CLASSES",
    "TASK",
    "VOC_CLASSES",
    "CocoSegmentation",
    "ConfusionMatrix",
    "VOCSegmentation",
    "build_seg_transforms",
    "build_segmenter",
    "check_segmenter_options",
    "coco_semantic_mask",
    "collate_fn",
    "colorize",
    "draw_segmentation",
    "evaluate",
    "evaluate_segmenter",
    "format_metrics",
    "format_seg_metrics",
    "load_model",
    "load_segmenter",
    "make_shapes",
    "preflight",
    "preflight_seg",
    "rebuild_segmenter",
    "save_class_map",
    "save_model",
    "save_segmenter",
    "train",
    "train_segmenter",
    "voc_palette",
]
