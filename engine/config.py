"""Recipes for every task: one flat YAML file per recipe, overridden by flags and ``--set``.

A :class:`Schema` lists every key a kind of recipe may hold, with its default and what
its value must be. The keys every task shares (run, optimiser, schedule, AMP, DDP,
checkpoints: :data:`RUN`) are declared and checked here once; a task extends ``RUN``
with its own keys and defaults (``detection.config.DETECTION``,
``classification.config.CLASSIFICATION``). A typo in a file or in ``--set`` is an error
that names the key and the nearest valid ones; a wrong value (``lr: fast``) names the
key, what it must be and what it got, before any data is read.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

__all__ = [
    "BOOL",
    "CONFIG_DIR",
    "NONNEG_INT",
    "NONNEG_NUM",
    "POS_INT",
    "POS_NUM",
    "RUN",
    "SIZES",
    "STR",
    "Check",
    "ConfigError",
    "Schema",
    "apply_overrides",
    "at_least",
    "choice",
    "find_recipe",
    "is_int",
    "is_number",
    "list_recipes",
    "load_config",
    "optional",
    "resolve_device",
    "save_config",
    "shapes_checks",
    "suggest",
    "validate",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A recipe file or override that cannot be used."""


def is_int(v: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


Check = tuple[str, Callable[[Any], bool]]  # (what the value must be, test)


def choice(*allowed: Any) -> Check:
    """A value from ``allowed``."""
    return f"one of {list(allowed)}", lambda v: v in allowed


def optional(spec: Check) -> Check:
    """``spec`` or null."""
    return f"{spec[0]} or null", lambda v: v is None or spec[1](v)


POS_INT = ("a positive integer", lambda v: is_int(v) and v > 0)
NONNEG_INT = ("a non-negative integer", lambda v: is_int(v) and v >= 0)
POS_NUM = ("a positive number", lambda v: is_number(v) and v > 0)
NONNEG_NUM = ("a non-negative number", lambda v: is_number(v) and v >= 0)
BOOL = ("true or false", lambda v: isinstance(v, bool))
STR = ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
SIZES = ("a positive integer or a non-empty list of them", lambda v: POS_INT[1](v) or (isinstance(v, list) and bool(v) and all(POS_INT[1](x) for x in v)))


@dataclass(frozen=True)
class Schema:
    """A kind of recipe: every key with its default, what its value must be, and cross-key checks.

    Args:
        defaults: key -> default value.
        checks: key -> (description, test) for every key of ``defaults``.
        extra: checks that read several keys, raising ``ConfigError`` (run after the per-key ones).
    """

    defaults: dict[str, Any]
    checks: dict[str, Check]
    extra: Callable[[dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        if set(self.defaults) != set(self.checks):
            raise ValueError(f"schema keys differ from defaults: {sorted(set(self.defaults) ^ set(self.checks))}")

    def extend(
        self, defaults: Mapping[str, Any], checks: Mapping[str, Check], extra: Callable[[dict[str, Any]], None] | None = None
    ) -> "Schema":
        """A task's schema: this one's keys plus the task's, whose defaults may override shared ones.

        Args:
            defaults: the task's keys with their defaults, and new defaults for shared keys.
            checks: a check for every new key (a shared key keeps its shared check).
            extra: the task's cross-key checks, run after this schema's.
        """
        new = set(defaults) - set(self.defaults)
        if new != set(checks) - set(self.defaults):
            raise ValueError(f"every new key needs a default and a check: {sorted(new ^ (set(checks) - set(self.defaults)))}")
        base_extra = self.extra

        def both(cfg: dict[str, Any]) -> None:
            if base_extra is not None:
                base_extra(cfg)
            if extra is not None:
                extra(cfg)

        merged_defaults = {**self.defaults, **defaults}
        return Schema(merged_defaults, {**self.checks, **checks}, both if (extra or base_extra) else None)


def at_least(n: int) -> Check:
    """An integer of at least ``n``."""
    return f"an integer >= {n}", lambda v: is_int(v) and v >= n


def shapes_checks(min_size: int) -> dict[str, Check]:
    """The checks of the built-in shapes data's keys (``shapes_train``, ``shapes_val``, ``shapes_size``,
    ``shapes_seed``), shared by every task; each task sets its own defaults.

    Args:
        min_size: the smallest image side the task can use.
    """
    return {"shapes_train": POS_INT, "shapes_val": POS_INT, "shapes_size": at_least(min_size), "shapes_seed": NONNEG_INT}


# The keys every task's training shares. The defaults are torchvision's detection reference's;
# each task sets its own where they differ.
RUN = Schema(
    defaults={
        "data_path": None,  # null: the built-in shapes data set
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
        "scheduler": "multistep",  # multistep | cosine | poly ((1 - t/T)^0.9, torchvision's segmentation reference)
        "lr_steps": [8, 11],  # epochs, for multistep
        "lr_gamma": 0.1,
        "warmup_factor": 0.001,  # lr fraction the warm-up starts from
        "warmup_iters": 0,  # linear warm-up, in iterations ...
        "warmup_epochs": 0,  # ... plus this many (possibly fractional) epochs
        "norm_weight_decay": None,  # null: weight_decay; 0: none on normalisation layers
        "bias_weight_decay": None,  # null: weight_decay; 0: none on biases
        "clip_grad_norm": None,
        "amp": False,
        "amp_dtype": None,  # null: bfloat16 on CPU, float16 on CUDA
        "channels_last": False,
        "sync_bn": True,  # BatchNorm -> SyncBatchNorm under DDP on CUDA
        "max_nonfinite": 5,  # consecutive non-finite losses before the run stops
        # run
        "device": "auto",  # auto (cuda when available, else cpu) | cpu | cuda
        "seed": 42,
        "deterministic": False,
        "eval_period": 1,  # epochs between evaluations; 0: only at the end
        "checkpoint_period": 1000,  # iterations
        "log_period": 20,  # iterations
        "log_batches": False,  # write batches.jsonl: the samples of every iteration
        "output_dir": "outputs/run",
    },
    checks={
        "data_path": optional(STR),
        "batch_size": POS_INT,
        "workers": NONNEG_INT,
        "epochs": POS_INT,
        "max_iters": optional(POS_INT),
        "optimizer": choice("sgd", "adamw"),
        "lr": POS_NUM,
        "lr_reference_batch": POS_INT,
        "momentum": ("a number in [0, 1)", lambda v: is_number(v) and 0 <= v < 1),
        "weight_decay": NONNEG_NUM,
        "scheduler": choice("multistep", "cosine", "poly"),
        "lr_steps": ("a list of epochs (non-negative numbers)", lambda v: isinstance(v, list) and all(NONNEG_NUM[1](x) for x in v)),
        "lr_gamma": POS_NUM,
        "warmup_factor": ("a number in (0, 1]", lambda v: is_number(v) and 0 < v <= 1),
        "warmup_iters": NONNEG_INT,
        "warmup_epochs": NONNEG_NUM,
        "norm_weight_decay": optional(NONNEG_NUM),
        "bias_weight_decay": optional(NONNEG_NUM),
        "clip_grad_norm": optional(POS_NUM),
        "amp": BOOL,
        "amp_dtype": choice(None, "bfloat16", "float16"),
        "channels_last": BOOL,
        "sync_bn": BOOL,
        "max_nonfinite": POS_INT,
        "device": choice("auto", "cpu", "cuda"),
        "seed": NONNEG_INT,
        "deterministic": BOOL,
        "eval_period": NONNEG_INT,
        "checkpoint_period": POS_INT,
        "log_period": POS_INT,
        "log_batches": BOOL,
        "output_dir": STR,
    },
)


def suggest(key: str, valid: Iterable[str]) -> str:
    """`` (did you mean a, b?)`` for the valid names closest to ``key``, or ``""``."""
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


def validate(cfg: dict[str, Any], *, schema: Schema) -> dict[str, Any]:
    """Check every key's name, type and range; return the config (numeric strings made numbers).

    Args:
        cfg: a merged config.
        schema: the kind of recipe.

    Raises:
        ConfigError: naming the first bad key, what it must be and what it got.
    """
    defaults = schema.defaults
    unknown = [k for k in cfg if k not in defaults]
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}{suggest(unknown[0], defaults)}; valid keys: {', '.join(defaults)}")
    missing = [k for k in defaults if k not in cfg]
    if missing:
        raise ConfigError(f"config lacks keys {missing}; start from the schema's defaults or load_config()")
    for key, (what, ok) in schema.checks.items():
        cfg[key] = _coerce(what, cfg[key])
        if not ok(cfg[key]):
            raise ConfigError(f"{key} must be {what}, got {cfg[key]!r}")
    if schema.extra is not None:
        schema.extra(cfg)
    return cfg


# Recipe files by kind: configs/<prefix>*.yaml; detection recipes have no prefix.
RECIPE_PREFIXES = {"classification": "cls_", "segmentation": "seg_"}


def _kind_of(stem: str) -> str:
    return next((kind for kind, prefix in RECIPE_PREFIXES.items() if stem.startswith(prefix)), "detection")


def list_recipes(kind: str | None = "detection") -> list[dict[str, str]]:
    """The shipped recipes: ``[{"name", "path", "description"}]``, description from the first comment line.

    Args:
        kind: ``"detection"``, ``"classification"`` (``cls_*.yaml``), ``"segmentation"``
            (``seg_*.yaml``) or ``None`` for all.
    """
    kinds = ("detection", *RECIPE_PREFIXES)
    if kind is not None and kind not in kinds:
        raise ValueError(f"kind must be one of {list(kinds)} or None, got {kind!r}")
    recipes = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if kind is not None and _kind_of(path.stem) != kind:
            continue
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        recipes.append({"name": path.stem, "path": str(path), "description": first.lstrip("# ").strip()})
    return recipes


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
    raise ConfigError(f"config file not found: {name} (recipes in {CONFIG_DIR}: {', '.join(names)}{suggest(path.stem, names)})")


def load_config(path: str | os.PathLike | None, *, schema: Schema) -> dict[str, Any]:
    """Read a recipe over the schema's defaults.

    Args:
        path: a YAML file of ``key: value`` lines (or a recipe name from ``configs/``),
            or ``None`` for the defaults.
        schema: the kind of recipe.

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
            raise ConfigError(f"{path}: unknown config key {key!r}{suggest(key, defaults)}")
    cfg.update(data)
    try:
        return validate(cfg, schema=schema)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _set(cfg: dict[str, Any], dotted: str, value: Any, item: str, defaults: dict[str, Any]) -> None:
    key, _, sub = dotted.partition(".")
    if key not in defaults:
        raise ConfigError(f"unknown config key {key!r} in --set {item!r}{suggest(key, defaults)}")
    if not sub:
        cfg[key] = value
        return
    if not isinstance(cfg[key], dict):
        raise ConfigError(f"--set {item!r}: {key} is not a mapping, so it has no field {sub!r}; use --set {key}=VALUE")
    cfg[key] = {**cfg[key], sub: value}


def apply_overrides(cfg: dict[str, Any], overrides: Iterable[str] = (), *, schema: Schema, **flags: Any) -> dict[str, Any]:
    """Apply command-line flags (those not ``None``), then ``key=value`` strings.

    Args:
        cfg: the config to update (a copy is returned).
        overrides: ``"key=value"`` strings; values are parsed as YAML
            (``lr=0.01``, ``lr_steps=[8,11]``, ``weights_backbone=null``); a dotted key
            sets one field of a mapping (``model_kwargs.anchor_scale=4``).
        schema: the kind of recipe.
        **flags: keys set directly; ``None`` means "flag not given".

    Returns:
        The updated, validated config.
    """
    cfg = dict(cfg)
    for key, value in flags.items():
        if key not in schema.defaults:
            raise ConfigError(f"unknown config key {key!r}{suggest(key, schema.defaults)}")
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
