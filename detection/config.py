"""Training recipes: one flat YAML file per recipe, overridden by flags and ``--set``.

Every key that may appear is listed in ``DEFAULTS`` with its default and in ``SCHEMA``
with what it must be, so a typo in a file or in ``--set`` is an error that names the
key and the nearest valid ones, and a wrong value (``lr: fast``) is an error that
names the key, what it must be and what it got, before any data is read.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

__all__ = [
    "CONFIG_DIR",
    "DEFAULTS",
    "DETECTION",
    "SCHEMA",
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

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A recipe file or override that cannot be used."""


DEFAULTS: dict[str, Any] = {
    # model
    "model": "faster_rcnn",
    "backbone": "resnet18",
    "weights_backbone": None,  # "imagenet", a checkpoint path, or null
    "trainable_layers": None,  # null: 3 with weights, 5 without
    "norm": None,  # bn | frozen_bn | gn; null: frozen_bn with weights, bn without
    "sync_bn": True,  # BatchNorm -> SyncBatchNorm under DDP on CUDA
    "returned_layers": None,
    "min_size": 800,
    "max_size": 1333,
    "model_kwargs": {},  # build_detector / torchvision model options (e.g. rpn_batch_size_per_image)
    # data
    "data_path": None,  # null: the built-in shapes data set
    "train_split": None,  # null: the one instances_*train*.json in annotations/ ("train" for shapes)
    "val_split": None,  # null: the one instances_*val*.json in annotations/ ("val" for shapes)
    "masks": None,  # null: on for mask_rcnn
    "augment": "hflip",  # none | hflip | multiscale | lsj
    "aug_min_size": None,  # multiscale/lsj: shorter sides sampled (null: from min_size)
    "shapes_train": 1000,
    "shapes_val": 200,
    "shapes_size": 320,
    "shapes_seed": 0,
    "batch_size": 2,  # per process
    "workers": 2,
    # optimisation
    "epochs": 12,
    "max_iters": None,
    "optimizer": "sgd",  # sgd | adamw
    "lr": 0.02,  # for lr_reference_batch images; scaled linearly by the total batch
    "lr_reference_batch": 16,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "scheduler": "multistep",  # multistep | cosine
    "lr_steps": [8, 11],  # epochs, for multistep
    "lr_gamma": 0.1,
    "warmup_iters": 500,
    "warmup_factor": 0.001,
    "clip_grad_norm": None,
    "amp": False,
    "amp_dtype": None,  # null: bfloat16 on CPU, float16 on CUDA
    "channels_last": False,
    "max_nonfinite": 5,  # consecutive non-finite losses before the run stops
    # run
    "device": "auto",  # auto (cuda when available, else cpu) | cpu | cuda
    "seed": 42,
    "deterministic": False,
    "eval_period": 1,  # epochs between evaluations; 0: only at the end
    "checkpoint_period": 1000,  # iterations
    "log_period": 20,  # iterations
    "log_batches": False,  # write batches.jsonl: the image ids of every iteration
    "output_dir": "outputs/run",
    "num_vis": 4,  # validation images drawn at the end
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


Check = tuple[str, Callable[[Any], bool]]  # (what the value must be, test)


def choice(*allowed: Any) -> Check:
    """A value from ``allowed``."""
    return f"one of {list(allowed)}", lambda v: v in allowed


def optional(spec: Check) -> Check:
    """``spec`` or null."""
    return f"{spec[0]} or null", lambda v: v is None or spec[1](v)


POS_INT = ("a positive integer", lambda v: _is_int(v) and v > 0)
NONNEG_INT = ("a non-negative integer", lambda v: _is_int(v) and v >= 0)
POS_NUM = ("a positive number", lambda v: _is_number(v) and v > 0)
NONNEG_NUM = ("a non-negative number", lambda v: _is_number(v) and v >= 0)
BOOL = ("true or false", lambda v: isinstance(v, bool))
STR = ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
SIZES = ("a positive integer or a non-empty list of them", lambda v: POS_INT[1](v) or (isinstance(v, list) and bool(v) and all(POS_INT[1](x) for x in v)))


def _arch_choices() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    from .models import ARCHS, BACKBONES, NORMS

    return tuple(ARCHS), tuple(BACKBONES), tuple(NORMS)


_ARCHS, _BACKBONES, _NORMS = _arch_choices()

SCHEMA: dict[str, Check] = {
    "model": choice(*_ARCHS),
    "backbone": choice(*_BACKBONES),
    "weights_backbone": optional(("'imagenet', 'none' or a checkpoint path", STR[1])),
    "trainable_layers": optional(("an integer in [0, 5]", lambda v: _is_int(v) and 0 <= v <= 5)),
    "norm": choice(None, *_NORMS),
    "sync_bn": BOOL,
    "returned_layers": optional(("a non-empty list of stages from [1, 2, 3, 4]", lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) and 1 <= x <= 4 for x in v))),
    "min_size": SIZES,
    "max_size": POS_INT,
    "model_kwargs": ("a mapping of option names to values", lambda v: isinstance(v, dict)),
    "data_path": optional(STR),
    "train_split": optional(STR),
    "val_split": optional(STR),
    "masks": optional(BOOL),
    "augment": choice("none", "hflip", "multiscale", "lsj"),
    "aug_min_size": optional(SIZES),
    "shapes_train": POS_INT,
    "shapes_val": POS_INT,
    "shapes_size": ("an integer >= 32", lambda v: _is_int(v) and v >= 32),
    "shapes_seed": NONNEG_INT,
    "batch_size": POS_INT,
    "workers": NONNEG_INT,
    "epochs": POS_INT,
    "max_iters": optional(POS_INT),
    "optimizer": choice("sgd", "adamw"),
    "lr": POS_NUM,
    "lr_reference_batch": POS_INT,
    "momentum": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "weight_decay": NONNEG_NUM,
    "scheduler": choice("multistep", "cosine"),
    "lr_steps": ("a list of epochs (non-negative numbers)", lambda v: isinstance(v, list) and all(NONNEG_NUM[1](x) for x in v)),
    "lr_gamma": POS_NUM,
    "warmup_iters": NONNEG_INT,
    "warmup_factor": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    "clip_grad_norm": optional(POS_NUM),
    "amp": BOOL,
    "amp_dtype": choice(None, "bfloat16", "float16"),
    "channels_last": BOOL,
    "max_nonfinite": POS_INT,
    "device": choice("auto", "cpu", "cuda"),
    "seed": NONNEG_INT,
    "deterministic": BOOL,
    "eval_period": NONNEG_INT,
    "checkpoint_period": POS_INT,
    "log_period": POS_INT,
    "log_batches": BOOL,
    "output_dir": STR,
    "num_vis": NONNEG_INT,
}


def _check_detector(cfg: dict[str, Any]) -> None:
    from .models import check_detector_options

    try:
        check_detector_options(cfg["model"], cfg["model_kwargs"])
    except ValueError as e:
        raise ConfigError(f"model_kwargs: {e}") from None


@dataclass(frozen=True)
class Schema:
    """A kind of recipe: every key with its default, what its value must be, and cross-key checks.

    Args:
        defaults: key -> default value.
        checks: key -> (description, test) for every key of ``defaults``.
        extra: checks that read several keys, raising ``ConfigError``.
    """

    defaults: dict[str, Any]
    checks: dict[str, Check]
    extra: Callable[[dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        if set(self.defaults) != set(self.checks):
            raise ValueError(f"schema keys differ from defaults: {sorted(set(self.defaults) ^ set(self.checks))}")


DETECTION = Schema(DEFAULTS, SCHEMA, _check_detector)


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _coerce(what: str, value: Any) -> Any:
    # PyYAML reads "1e-3" (no dot) as a string: a numeric string is a number where one is wanted.
    if "number" in what and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def validate(cfg: dict[str, Any], *, schema: Schema = DETECTION) -> dict[str, Any]:
    """Check every key's name, type and range; return the config (numeric strings made numbers).

    Args:
        cfg: a merged config.
        schema: the kind of recipe (detection by default).

    Raises:
        ConfigError: naming the first bad key, what it must be and what it got.
    """
    defaults = schema.defaults
    unknown = [k for k in cfg if k not in defaults]
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}{_suggest(unknown[0], defaults)}; valid keys: {', '.join(defaults)}")
    missing = [k for k in defaults if k not in cfg]
    if missing:
        raise ConfigError(f"config lacks keys {missing}; start from the schema's defaults or load_config()")
    if isinstance(cfg.get("weights_backbone"), str) and cfg["weights_backbone"].lower() == "none":
        cfg["weights_backbone"] = None
    for key, (what, ok) in schema.checks.items():
        cfg[key] = _coerce(what, cfg[key])
        if not ok(cfg[key]):
            raise ConfigError(f"{key} must be {what}, got {cfg[key]!r}")
    if schema.extra is not None:
        schema.extra(cfg)
    return cfg


def find_recipe(name: str | os.PathLike) -> Path:
    """A recipe file from a path, or from a name in ``configs/`` (with or without ``.yaml``).

    Args:
        name: ``configs/x.yaml``, ``x.yaml``, ``x`` or any path to a YAML file.

    Raises:
        ConfigError: when nothing matches; the message lists the shipped recipes.
    """
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file() and path.parent in (Path("."), Path("configs")):
            return candidate
    names = [r["name"] for r in list_recipes(None)]
    raise ConfigError(f"config file not found: {name} (recipes in {CONFIG_DIR}: {', '.join(names)}{_suggest(path.stem, names)})")


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


CLASSIFICATION_PREFIX = "cls_"  # configs/cls_*.yaml are classification recipes (tools/train_cls.py)


def list_recipes(kind: str | None = "detection") -> list[dict[str, str]]:
    """The shipped recipes: ``[{"name", "path", "description"}]``, description from the first comment line.

    Args:
        kind: ``"detection"``, ``"classification"`` (``cls_*.yaml``) or ``None`` for all.
    """
    if kind not in ("detection", "classification", None):
        raise ValueError(f"kind must be 'detection', 'classification' or None, got {kind!r}")
    recipes = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if kind is not None and path.stem.startswith(CLASSIFICATION_PREFIX) != (kind == "classification"):
            continue
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        recipes.append({"name": path.stem, "path": str(path), "description": first.lstrip("# ").strip()})
    return recipes


def load_config(path: str | os.PathLike | None = None, *, schema: Schema = DETECTION) -> dict[str, Any]:
    """Read a recipe over the defaults.

    Args:
        path: a YAML file of ``key: value`` lines (or a recipe name from ``configs/``),
            or ``None`` for the defaults.
        schema: the kind of recipe (detection by default).

    Returns:
        A new, validated dict with every key of the schema.
    """
    defaults = schema.defaults
    cfg = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in defaults.items()}
    if path is None:
        return validate(cfg, schema=schema)
    path = find_recipe(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    for key in data:
        if key not in defaults:
            raise ConfigError(f"{path}: unknown config key {key!r}{_suggest(key, defaults)}")
    cfg.update(data)
    try:
        return validate(cfg, schema=schema)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _set(cfg: dict[str, Any], dotted: str, value: Any, item: str, defaults: dict[str, Any]) -> None:
    key, _, sub = dotted.partition(".")
    if key not in defaults:
        raise ConfigError(f"unknown config key {key!r} in --set {item!r}{_suggest(key, defaults)}")
    if not sub:
        cfg[key] = value
        return
    if not isinstance(cfg[key], dict):
        raise ConfigError(f"--set {item!r}: {key} is not a mapping, so it has no field {sub!r}; use --set {key}=VALUE")
    cfg[key] = {**cfg[key], sub: value}


def apply_overrides(cfg: dict[str, Any], overrides: Iterable[str] = (), *, schema: Schema = DETECTION, **flags: Any) -> dict[str, Any]:
    """Apply command-line flags (those not ``None``), then ``key=value`` strings.

    Args:
        cfg: the config to update (a copy is returned).
        overrides: ``"key=value"`` strings; values are parsed as YAML
            (``lr=0.01``, ``lr_steps=[8,11]``, ``weights_backbone=null``); a dotted key
            sets one field of a mapping (``model_kwargs.anchor_scale=4``).
        schema: the kind of recipe (detection by default).
        **flags: keys set directly; ``None`` means "flag not given".

    Returns:
        The updated, validated config.
    """
    cfg = dict(cfg)
    for key, value in flags.items():
        if key not in schema.defaults:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, schema.defaults)}")
        if value is not None:
            cfg[key] = value
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse the value of --set {item!r}: {e}") from None
        _set(cfg, key.strip(), value, item, schema.defaults)
    return validate(cfg, schema=schema)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a CUDA device is present, else ``"cpu"``; others unchanged.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Raises:
        ConfigError: ``"cuda"`` on a machine without a CUDA device.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is cuda but no CUDA device is available; use --device cpu (or device: auto)")
    return device


def save_config(cfg: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the merged config as YAML (the run's record of what it did)."""
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
