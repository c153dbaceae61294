"""Which recipe a training run uses, said at its start, and a warning when a GPU recipe meets a CPU.

A recipe made for the CPU says so with ``device: cpu`` in its YAML (the shapes demos, the
``*_cpu`` recipes for one's own data); every other recipe (the schema's defaults included,
torchvision's reference settings) is sized for GPUs: hundreds of pixels per crop, several
loader workers, tens of epochs. Run on a CPU, such a recipe takes minutes an iteration;
``recipe_notice`` names the CPU recipe to use instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .config import find_recipe, resolve_device

__all__ = ["recipe_notice"]


def recipe_notice(recipe: str | os.PathLike | None, cfg: dict[str, Any], *, cpu_recipe: str, defaults: str) -> tuple[str, str | None]:
    """What a training tool prints before it starts: the recipe used, and a warning for a GPU recipe on a CPU.

    Args:
        recipe: the recipe file or name the run was loaded from; ``None`` for the schema's defaults.
        cfg: the run's config after the command line's overrides (``device``, ``crop_size`` /
            ``min_size``, ``batch_size``, ``workers``, ``epochs``).
        cpu_recipe: the shipped CPU recipe for one's own data of this task.
        defaults: what the schema's defaults are, in words (e.g. "torchvision's reference settings").

    Returns:
        ``(line, warning or None)``.
    """
    if recipe is None:
        name, own_device = f"the defaults ({defaults})", "auto"
    else:
        path = find_recipe(recipe)
        name = path.stem if path.parent.name == "configs" else str(path)
        try:
            own_device = (yaml.safe_load(Path(path).read_text()) or {}).get("device", "auto")
        except (OSError, yaml.YAMLError, AttributeError):
            own_device = "auto"
    size = f"crop {cfg['crop_size']}" if "crop_size" in cfg else f"images {cfg.get('min_size')}-{cfg.get('max_size')} px"
    device = resolve_device(cfg.get("device", "auto")) if cfg.get("device", "auto") in ("auto", "cpu") else cfg["device"]
    line = (f"recipe: {name} ({size}, batch {cfg.get('batch_size')}, {cfg.get('workers')} workers, {cfg.get('epochs')} epochs) "
            f"on {device}")
    warning = None
    if device == "cpu" and own_device != "cpu":
        warning = (f"{name} is a GPU recipe and this run is on the CPU ({os.cpu_count()} cores): an iteration may take tens of "
                   f"seconds and its evaluation minutes. For your own data on a CPU use --config {cpu_recipe}")
    return line, warning
