"""Where a run's COCO-layout data lives: a user's folder and its splits, or the built-in shapes set made on first use.

Shared by every task that reads the COCO layout (detection, semantic segmentation from instances).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from . import shapes
from .datasets import DataPathError, cache_root, generate_atomically

__all__ = ["evaluation_data", "find_splits", "prepare_data_root", "shapes_cache_dir"]

logger = logging.getLogger(__name__)


def shapes_cache_dir(cfg: dict[str, Any]) -> Path:
    """Where the built-in shapes data set for ``cfg`` is generated (``$RESFPN_CACHE`` or ~/.cache/resfpn).

    Args:
        cfg: a config with the ``shapes_*`` keys.
    """
    base = cache_root()
    name = f"shapes-{cfg['shapes_size']}px-{cfg['shapes_train']}-{cfg['shapes_val']}-seed{cfg['shapes_seed']}"
    return base / name


def _available_splits(root: Path) -> list[str]:
    return sorted(p.name[len("instances_"):-len(".json")] for p in (root / "annotations").glob("instances_*.json"))


def _pick(root: Path, given: str | None, word: str, flag: str, exclude: str | None = None) -> str:
    found = _available_splits(root)
    listed = ", ".join(found) if found else f"none (no {root}/annotations/instances_*.json)"
    if given is not None:
        if given not in found:
            raise DataPathError(f"{flag} {given}: no {root}/annotations/instances_{given}.json; splits found: {listed}")
        split = given
    else:
        # "trainval" holds both words: never guess the training split as the validation one too.
        candidates = [s for s in found if word in s.lower() and s != exclude]
        if len(candidates) != 1:
            raise DataPathError(
                f"cannot tell the {word} split of {root}: splits found: {listed}; name it with {flag} "
                f"(annotations/instances_<split>.json with images in <split>/)"
            )
        split = candidates[0]
    if not (root / split).is_dir():
        raise DataPathError(f"image folder {root / split} not found (annotations/instances_{split}.json names it)")
    return split


def _check_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataPathError(f"data path {root} does not exist (expected ROOT/annotations/instances_<split>.json and ROOT/<split>/)")
    return root


def find_splits(root: str | os.PathLike, train_split: str | None, val_split: str | None) -> tuple[str, str]:
    """Name the training and validation splits of a COCO-layout folder.

    A split given is checked (``annotations/instances_<split>.json`` and ``<split>/``
    must exist); a split not given is found when exactly one annotation file's split
    name contains ``train`` (or ``val``).

    Args:
        root: the data folder.
        train_split: e.g. ``"train2017"``, or ``None`` to find it.
        val_split: e.g. ``"val2017"``, or ``None`` to find it.

    Raises:
        DataPathError: naming the splits found and ``--train-split`` / ``--val-split``.
    """
    root = _check_root(root)
    train = _pick(root, train_split, "train", "--train-split")
    return train, _pick(root, val_split, "val", "--val-split", exclude=train)


def evaluation_data(cfg: dict[str, Any], *, data_path: str | None = None, split: str | None = None) -> tuple[Path, str]:
    """The folder and split to evaluate a model on.

    Args:
        cfg: the training config stored with the model (``DEFAULTS`` when unknown).
        data_path: a data folder to use instead of the training one.
        split: the split to score (default: the config's ``val_split`` for the training
            folder, else the one ``*val*`` split found; ``val`` for shapes).

    Raises:
        DataPathError: the folder or split is missing or ambiguous.
    """
    if data_path is None and cfg["data_path"] is None:
        root, _, val = prepare_data_root(cfg)
        return root, _pick(root, split, "val", "--split") if split else val
    same = data_path is None or (cfg["data_path"] is not None and Path(data_path) == Path(cfg["data_path"]))
    root = _check_root(data_path if data_path is not None else cfg["data_path"])
    return root, _pick(root, split or (cfg["val_split"] if same else None), "val", "--split")


def prepare_data_root(cfg: dict[str, Any], *, is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> tuple[Path, str, str]:
    """Return ``(root, train_split, val_split)``; generates the shapes set once when no data path is set.

    Args:
        cfg: the run's config (``data_path``, ``train_split``, ``val_split``, ``shapes_*``).
        is_main: this process generates the data set (rank 0 under ``torchrun``).
        barrier: waits for every process (so other ranks read a finished data set).
    """
    if cfg["data_path"] is not None:
        root = Path(cfg["data_path"])
        return (root, *find_splits(root, cfg["train_split"], cfg["val_split"]))
    root = shapes_cache_dir(cfg)
    if is_main and not (root / "annotations" / "instances_val.json").is_file():
        logger.info("generating the shapes data set in %s", root)
        generate_atomically(root, lambda tmp: shapes.generate(tmp, num_train=cfg["shapes_train"], num_val=cfg["shapes_val"],
                                                              image_size=cfg["shapes_size"], seed=cfg["shapes_seed"]))
    barrier()
    return root, "train", "val"
