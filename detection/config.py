"""Detection recipes: the shared run keys (``engine.config.RUN``) plus the detector's and its data's.

``DETECTION`` is the schema ``tools/train_det.py`` reads; ``load_config``,
``apply_overrides`` and ``validate`` here are ``engine.config``'s with this schema as the
default, so ``load_config("shapes_faster_rcnn_r18_fpn")`` needs no more.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from engine import config as _config
from engine.config import (
    BOOL,
    CONFIG_DIR,
    NONNEG_INT,
    POS_INT,
    RUN,
    SIZES,
    STR,
    choice,
    ConfigError,
    find_recipe,
    is_int,
    list_recipes,
    optional,
    resolve_device,
    save_config,
    Schema,
    shapes_checks,
)

__all__ = [
    "CONFIG_DIR",
    "DEFAULTS",
    "DETECTION",
    "ConfigError",
    "Schema",
    "apply_overrides",
    "default_recipe",
    "find_recipe",
    "list_recipes",
    "load_config",
    "resolve_device",
    "save_config",
    "validate",
]


def _arch_choices() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    from .models import ARCHS, BACKBONES, NORMS

    return tuple(ARCHS), tuple(BACKBONES), tuple(NORMS)


_ARCHS, _BACKBONES, _NORMS = _arch_choices()


def _check_detector(cfg: dict[str, Any]) -> None:
    from .models import check_detector_options

    if isinstance(cfg["weights_backbone"], str) and cfg["weights_backbone"].lower() == "none":
        cfg["weights_backbone"] = None
    try:
        check_detector_options(cfg["model"], cfg["model_kwargs"])
    except ValueError as e:
        raise ConfigError(f"model_kwargs: {e}") from None


DETECTION = RUN.extend(
    defaults={
        # model
        "model": "faster_rcnn",
        "backbone": "resnet18",
        "weights_backbone": None,  # "imagenet", a checkpoint path, or null
        "trainable_layers": None,  # null: 3 with weights, 5 without
        "norm": None,  # bn | frozen_bn | gn; null: frozen_bn with weights, bn without
        "returned_layers": None,
        "min_size": 800,
        "max_size": 1333,
        "model_kwargs": {},  # build_detector / torchvision model options (e.g. rpn_batch_size_per_image)
        "init_checkpoint": None,  # a detector file (e.g. pruned by tools/prune.py) to fine-tune: its architecture and weights
        # data
        "train_split": None,  # null: the one instances_*train*.json in annotations/ ("train" for shapes)
        "val_split": None,  # null: the one instances_*val*.json in annotations/ ("val" for shapes)
        "masks": None,  # null: on for mask_rcnn
        "augment": "hflip",  # none | hflip | multiscale | lsj
        "aug_min_size": None,  # multiscale/lsj: shorter sides sampled (null: from min_size)
        "exif_transpose": True,  # square / flipped photos: apply the EXIF orientation tag (false: annotated on stored pixels)
        "shapes_train": 1000,
        "shapes_val": 200,
        "shapes_size": 320,
        "shapes_seed": 0,
        # optimisation
        "warmup_iters": 500,
        # run
        "output_dir": "outputs/run",
        "num_vis": 4,  # validation images drawn at the end
    },
    checks={
        "model": choice(*_ARCHS),
        "backbone": choice(*_BACKBONES),
        "weights_backbone": optional(("'imagenet', 'none' or a checkpoint path", STR[1])),
        "trainable_layers": optional(("an integer in [0, 5]", lambda v: is_int(v) and 0 <= v <= 5)),
        "norm": choice(None, *_NORMS),
        "returned_layers": optional(("a non-empty list of stages from [1, 2, 3, 4]",
                                     lambda v: isinstance(v, list) and bool(v) and all(is_int(x) and 1 <= x <= 4 for x in v))),
        "min_size": SIZES,
        "max_size": POS_INT,
        "model_kwargs": ("a mapping of option names to values", lambda v: isinstance(v, dict)),
        "init_checkpoint": optional(("a detector checkpoint path", STR[1])),
        "train_split": optional(STR),
        "val_split": optional(STR),
        "masks": optional(BOOL),
        "augment": choice("none", "hflip", "multiscale", "lsj"),
        "aug_min_size": optional(SIZES),
        "exif_transpose": BOOL,
        **shapes_checks(32),
        "num_vis": NONNEG_INT,
    },
    extra=_check_detector,
)
DEFAULTS: dict[str, Any] = DETECTION.defaults


def validate(cfg: dict[str, Any], *, schema: Schema = DETECTION) -> dict[str, Any]:
    """``engine.config.validate`` with the detection schema by default."""
    return _config.validate(cfg, schema=schema)


def load_config(path: str | os.PathLike | None = None, *, schema: Schema = DETECTION) -> dict[str, Any]:
    """``engine.config.load_config`` with the detection schema by default.

    Args:
        path: a YAML file or a recipe name from ``configs/``; ``None``: the defaults.
        schema: the kind of recipe.
    """
    return _config.load_config(path, schema=schema)


def apply_overrides(cfg: dict[str, Any], overrides: Iterable[str] = (), *, schema: Schema = DETECTION, **flags: Any) -> dict[str, Any]:
    """``engine.config.apply_overrides`` with the detection schema by default.

    Args:
        cfg: the config to update (a copy is returned).
        overrides: ``"key=value"`` strings (a dotted key sets one field of a mapping).
        schema: the kind of recipe.
        **flags: keys set directly; ``None`` means "flag not given".
    """
    return _config.apply_overrides(cfg, overrides, schema=schema, **flags)


# The demo each architecture trains on the built-in shapes set when no --config or --data-path is given.
SHAPES_RECIPES = {"mask_rcnn": "shapes_mask_rcnn_r18_fpn"}
SHAPES_RECIPE = "shapes_faster_rcnn_r18_fpn"


def default_recipe(model: str | None, data_path: str | None) -> Path | None:
    """The recipe a run uses when none is named.

    Without a data path: the shapes CPU recipe for ``model`` (Mask R-CNN has its own;
    the others share the Faster R-CNN one, with ``model`` overridden). With a data path:
    ``None``, i.e. ``DEFAULTS`` (the COCO 1x schedule at 800 px, on the device present).

    Args:
        model: the architecture asked for, if any.
        data_path: the user's data folder, if any.
    """
    if data_path is not None:
        return None
    name = SHAPES_RECIPES.get(model or "", SHAPES_RECIPE)
    path = CONFIG_DIR / f"{name}.yaml"
    return path if path.is_file() else CONFIG_DIR / f"{SHAPES_RECIPE}.yaml"
