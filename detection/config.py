"""Training recipes: one flat YAML file per recipe, overridden by flags and ``--set``.

Every key that may appear is listed in ``DEFAULTS`` with its default, so a typo in a
file or in ``--set`` is an error that names the key and the nearest valid ones,
rather than a setting silently ignored.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

__all__ = ["DEFAULTS", "ConfigError", "load_config", "apply_overrides", "save_config", "validate"]


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
    "model_kwargs": {},  # passed to the torchvision model (e.g. rpn_batch_size_per_image)
    # data
    "data_path": None,  # null: the built-in shapes data set
    "train_split": "train2017",
    "val_split": "val2017",
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
    "device": "cuda",
    "seed": 42,
    "deterministic": False,
    "eval_period": 1,  # epochs between evaluations; 0: only at the end
    "checkpoint_period": 1000,  # iterations
    "log_period": 20,  # iterations
    "output_dir": "outputs/run",
    "num_vis": 4,  # validation images drawn at the end
}


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, DEFAULTS, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check keys and a few values; return the config unchanged.

    Args:
        cfg: a merged config.
    """
    unknown = [k for k in cfg if k not in DEFAULTS]
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}{_suggest(unknown[0])}; valid keys: {', '.join(DEFAULTS)}")
    choices = {
        "optimizer": ("sgd", "adamw"),
        "scheduler": ("multistep", "cosine"),
        "augment": ("none", "hflip", "multiscale", "lsj"),
        "device": ("cpu", "cuda"),
        "amp_dtype": (None, "bfloat16", "float16"),
    }
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {cfg[key]!r}")
    for key in ("batch_size", "epochs", "log_period", "checkpoint_period"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg["max_iters"] is not None and (not isinstance(cfg["max_iters"], int) or cfg["max_iters"] < 1):
        raise ConfigError(f"max_iters must be a positive integer or null, got {cfg['max_iters']!r}")
    if not isinstance(cfg["model_kwargs"], dict):
        raise ConfigError(f"model_kwargs must be a mapping, got {cfg['model_kwargs']!r}")
    return cfg


def load_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a recipe over the defaults.

    Args:
        path: a YAML file of ``key: value`` lines, or ``None`` for the defaults.

    Returns:
        A new dict with every key of ``DEFAULTS``.
    """
    cfg = dict(DEFAULTS)
    if path is None:
        return cfg
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    for key in data:
        if key not in DEFAULTS:
            raise ConfigError(f"{path}: unknown config key {key!r}{_suggest(key)}")
    cfg.update(data)
    return validate(cfg)


def apply_overrides(cfg: dict[str, Any], overrides: Iterable[str] = (), **flags: Any) -> dict[str, Any]:
    """Apply command-line flags (those not ``None``), then ``key=value`` strings.

    Args:
        cfg: the config to update (a copy is returned).
        overrides: ``"key=value"`` strings; values are parsed as YAML
            (``lr=0.01``, ``lr_steps=[8,11]``, ``weights_backbone=null``).
        **flags: keys set directly; ``None`` means "flag not given".

    Returns:
        The updated, validated config.
    """
    cfg = dict(cfg)
    for key, value in flags.items():
        if key not in DEFAULTS:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key)}")
        if value is not None:
            cfg[key] = value
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in DEFAULTS:
            raise ConfigError(f"unknown config key {key!r} in --set {item!r}{_suggest(key)}")
        try:
            cfg[key] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse the value of --set {item!r}: {e}") from None
    return validate(cfg)


def save_config(cfg: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the merged config as YAML (the run's record of what it did)."""
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
