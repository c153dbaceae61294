"""Classification recipes: the shared run keys (``engine.config.RUN``) plus the classifier's and its data's.

The defaults are torchvision's reference ImageNet recipe for ResNet-18/34: SGD, lr 0.1 for
256 images (32 per GPU x 8), momentum 0.9, weight decay 1e-4, 90 epochs, x0.1 every 30
epochs, RandomResizedCrop(224) + flip, evaluation at resize 256 / crop 224.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backbones.resnet import BACKBONES
from engine.config import (
    BOOL,
    CONFIG_DIR,
    NONNEG_NUM,
    POS_INT,
    POS_NUM,
    RUN,
    STR,
    at_least,
    choice,
    ConfigError,
    optional,
    shapes_checks,
)

__all__ = ["BACKBONES", "CLASSIFICATION", "SHAPES_CLS_RECIPE", "default_cls_recipe"]

def _check_cls(cfg: dict[str, Any]) -> None:
    if isinstance(cfg["weights"], str) and cfg["weights"].lower() == "none":
        cfg["weights"] = None
    if cfg["val_crop_size"] > cfg["val_resize_size"]:
        raise ConfigError(f"val_crop_size ({cfg['val_crop_size']}) must not exceed val_resize_size ({cfg['val_resize_size']})")


CLASSIFICATION = RUN.extend(
    defaults={
        # model
        "backbone": "resnet18",
        "weights": None,  # initial weights: null (random), "imagenet" or a checkpoint path; fc skipped when class counts differ
        "zero_init_residual": False,
        # data
        "train_split": "train",
        "val_split": "val",
        "shapes_train": 2000,  # scenes; about 4 crops each
        "shapes_val": 300,
        "shapes_size": 128,
        "shapes_crop_size": 64,
        "shapes_seed": 1,
        "train_crop_size": 224,
        "crop_scale": [0.08, 1.0],  # RandomResizedCrop's area range
        "hflip": True,
        "val_resize_size": 256,
        "val_crop_size": 224,
        "batch_size": 32,  # per process
        "workers": 8,
        # optimisation (shared keys with the reference recipe's values)
        "epochs": 90,
        "lr": 0.1,
        "lr_reference_batch": 256,
        "lr_steps": [30, 60],
        "warmup_factor": 0.01,
        "sync_bn": False,
        "label_smoothing": 0.0,
        "ema": False,  # evaluate and save an exponential moving average of the weights too
        "ema_steps": 32,  # iterations between EMA updates
        "ema_decay": 0.99998,  # per image at 1 epoch, adjusted as torchvision's reference does
        # run
        "output_dir": "outputs/cls_run",
    },
    checks={
        "backbone": choice(*BACKBONES),
        "weights": optional(("'imagenet', 'none' or a checkpoint path", STR[1])),
        "zero_init_residual": BOOL,
        "train_split": STR,
        "val_split": STR,
        **shapes_checks(64),
        "shapes_crop_size": at_least(16),
        "train_crop_size": POS_INT,
        "crop_scale": ("[min, max] area fractions with 0 < min <= max <= 1",
                       lambda v: isinstance(v, list) and len(v) == 2 and all(POS_NUM[1](x) for x in v) and v[0] <= v[1] <= 1),
        "hflip": BOOL,
        "val_resize_size": POS_INT,
        "val_crop_size": POS_INT,
        "label_smoothing": ("a number in [0, 1)", lambda v: NONNEG_NUM[1](v) and v < 1),
        "ema": BOOL,
        "ema_steps": POS_INT,
        "ema_decay": ("a number in (0, 1)", lambda v: POS_NUM[1](v) and v < 1),
    },
    extra=_check_cls,
)

SHAPES_CLS_RECIPE = "cls_shapes_r18"


def default_cls_recipe(data_path: str | None) -> Path | None:
    """The recipe a classification run uses when none is named.

    Without a data path: the shapes CPU recipe. With one: ``None``, i.e. the schema's
    defaults (torchvision's reference ImageNet recipe, on the device present).

    Args:
        data_path: the user's data folder, if any.
    """
    return None if data_path is not None else CONFIG_DIR / f"{SHAPES_CLS_RECIPE}.yaml"
