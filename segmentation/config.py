"""Segmentation recipes: the shared run keys (``engine.config.RUN``) plus the segmenter's and its data's.

The defaults are torchvision's segmentation reference (``references/segmentation``:
``train.py`` and ``presets.py``) on this project's trunks: DeepLabV3 at output stride 8,
SGD lr 0.02 for 32 images (4 per GPU x 8) with momentum 0.9 and weight decay 1e-4, the
poly schedule (power 0.9), 30 epochs, training crops of 480 from images whose short
side is rescaled around 520 (0.5x-2x) plus a flip, evaluation at short side 520, the
auxiliary loss weighted 0.5 when ``aux_loss`` is on. ``configs/seg_*.yaml`` hold the
recipes (the shapes CPU recipe, the VOC and COCO-subset GPU recipes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import (
    BOOL,
    CONFIG_DIR,
    NONNEG_INT,
    NONNEG_NUM,
    POS_INT,
    POS_NUM,
    RUN,
    STR,
    choice,
    ConfigError,
    is_int,
    optional,
    shapes_checks,
)

from .models import ARCHS, BACKBONES, OUTPUT_STRIDES, check_segmenter_options

__all__ = ["CPU_SEG_RECIPE", "DATA_FORMATS", "SEGMENTATION", "SHAPES_SEG_RECIPE", "default_seg_recipe"]

DATA_FORMATS = ("auto", "coco", "voc")
# Options with a key of their own; model_kwargs holds the head options (head_channels, atrous_rates, fpn_channels).
_OWN_KEYS = ("backbone", "num_classes", "weights_backbone", "output_stride", "aux_loss", "trainable_layers", "norm")


def _check_seg(cfg: dict[str, Any]) -> None:
    if isinstance(cfg["weights_backbone"], str) and cfg["weights_backbone"].lower() == "none":
        cfg["weights_backbone"] = None
    for name in cfg["model_kwargs"]:
        if name in _OWN_KEYS:
            raise ConfigError(f"model_kwargs.{name}: {name} is a config key of its own; set it with --set {name}=VALUE")
    try:
        check_segmenter_options(cfg["model"], cfg["model_kwargs"])
    except ValueError as e:
        raise ConfigError(f"model_kwargs: {e}") from None
    if cfg["model"] == "deeplabv3" and cfg["batch_size"] < 2:
        # torchvision's ASPP pooling branch normalises a 1x1 map: BatchNorm needs two values per channel.
        raise ConfigError(f"batch_size must be at least 2 for deeplabv3 (its ASPP pooling has a BatchNorm over a 1x1 map), got {cfg['batch_size']}")
    low, high = cfg["scale_range"]
    if low > high:
        raise ConfigError(f"scale_range must be [low, high] with low <= high, got {cfg['scale_range']}")


SEGMENTATION = RUN.extend(
    defaults={
        # model
        "model": "deeplabv3",  # deeplabv3 | fcn | semantic_fpn
        "backbone": "resnet18",
        "weights_backbone": None,  # "imagenet", a checkpoint path (e.g. from tools/train_cls.py), or null
        "output_stride": None,  # 8 | 16 | 32; null: 8 for deeplabv3 and fcn, 32 for semantic_fpn
        "aux_loss": False,  # torchvision's FCNHead on layer3
        "aux_weight": 0.5,  # torchvision's weight of the auxiliary loss
        "class_weights": None,  # cross-entropy weight per label (e.g. less for a background covering most pixels); null: equal
        "trainable_layers": 5,
        "norm": "bn",
        "model_kwargs": {},  # head options: head_channels, atrous_rates (deeplabv3), fpn_channels (semantic_fpn)
        # data
        "data_format": "auto",  # auto (VOC when JPEGImages/ and SegmentationClass/ exist, else COCO) | coco | voc
        "train_split": None,  # null: "train" for VOC and shapes, the one instances_*train*.json for COCO
        "val_split": None,  # null: "val" for VOC and shapes, the one instances_*val*.json for COCO
        "coco_categories": None,  # null: every category; "voc": torchvision's 20 VOC categories of COCO; or a list of ids
        "class_names": None,  # VOC layout: label names, index = label (null: VOC's 21); COCO names come from its categories
        "base_size": 520,  # short side the random rescale is relative to (null: the image's own)
        "crop_size": 480,
        "scale_range": [0.5, 2.0],
        "hflip_prob": 0.5,
        "val_resize": 520,  # evaluation: short side resized to this (null: as they are)
        "val_batch_size": 1,  # evaluation images loaded together; those of one size run as a batch (none is padded)
        "shapes_train": 1000,
        "shapes_val": 200,
        "shapes_size": 320,
        "shapes_seed": 0,
        "batch_size": 4,  # per process
        "workers": 4,
        # optimisation (shared keys with the reference recipe's values)
        "epochs": 30,
        "lr": 0.02,
        "lr_reference_batch": 32,
        "scheduler": "poly",
        "warmup_iters": 0,
        "warmup_factor": 0.01,
        # run
        "output_dir": "outputs/seg_run",
        "num_vis": 4,  # validation images drawn at the end (ground truth | prediction)
    },
    checks={
        "model": choice(*ARCHS),
        "backbone": choice(*BACKBONES),
        "weights_backbone": optional(("'imagenet', 'none' or a checkpoint path", STR[1])),
        "output_stride": choice(None, *sorted(OUTPUT_STRIDES)),
        "aux_loss": BOOL,
        "aux_weight": NONNEG_NUM,
        "class_weights": optional(("a list of non-negative numbers, one per label, not all 0",
                                   lambda v: isinstance(v, list) and bool(v) and all(NONNEG_NUM[1](x) for x in v) and any(v))),
        "trainable_layers": ("an integer in [0, 5]", lambda v: is_int(v) and 0 <= v <= 5),
        "norm": choice("bn", "frozen_bn", "gn"),
        "model_kwargs": ("a mapping of option names to values", lambda v: isinstance(v, dict)),
        "data_format": choice(*DATA_FORMATS),
        "train_split": optional(STR),
        "val_split": optional(STR),
        "coco_categories": ("null, 'voc' or a non-empty list of distinct COCO category ids",
                            lambda v: v is None or v == "voc" or (isinstance(v, list) and bool(v) and all(POS_INT[1](x) for x in v)
                                                                  and len(set(v)) == len(v))),
        "class_names": optional(("a list of at least 2 label names, background first",
                                 lambda v: isinstance(v, list) and len(v) >= 2 and all(STR[1](x) for x in v))),
        "base_size": optional(POS_INT),
        "crop_size": POS_INT,
        "scale_range": ("[low, high] with 0 < low <= high", lambda v: isinstance(v, list) and len(v) == 2 and all(POS_NUM[1](x) for x in v)),
        "hflip_prob": ("a number in [0, 1]", lambda v: NONNEG_NUM[1](v) and v <= 1),
        "val_resize": optional(POS_INT),
        "val_batch_size": POS_INT,
        **shapes_checks(64),
        "num_vis": NONNEG_INT,
    },
    extra=_check_seg,
)

SHAPES_SEG_RECIPE = "seg_shapes_semantic_fpn_r18"
CPU_SEG_RECIPE = "seg_semantic_fpn_r18_cpu"  # one's own data on a CPU


def default_seg_recipe(data_path: str | None) -> Path | None:
    """The recipe a segmentation run uses when none is named.

    Without a data path: the shapes CPU recipe (``make train-seg``). With one: ``None``,
    i.e. the schema's defaults (torchvision's reference recipe, on the device present).

    Args:
        data_path: the user's data folder, if any.
    """
    return None if data_path is not None else CONFIG_DIR / f"{SHAPES_SEG_RECIPE}.yaml"
