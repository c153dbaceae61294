"""Detector files, and every key in them: one place to read.

Two kinds of file, both plain tensors and containers (``torch.load(...,
weights_only=True)`` reads them; a checkpoint is data, never code), both written
atomically (a kill at any moment leaves the previous file or the new one):

* a **detector** file (``model_final.pth``, ``save_detector``): ``model`` (the state
  dict), ``build_args`` (what ``build_detector`` needs to rebuild it), and optionally
  ``category_mapping`` (``{"cat_ids", "names"}``), ``config``, ``iteration`` and, for a
  pruned model, ``channel_plan`` (``{module name: {width attribute: value}}``, the widths
  that differ from the architecture ``build_args`` describe: ``engine.channels``);
* a **training state** (``checkpoint.pth``, written by the runner, ``engine.runner.state``):
  the detector keys with ``category_mapping``, plus the runner's ``optimizer``,
  ``scheduler``, ``scaler``, ``epoch``, ``iteration`` and ``config``, which is what an
  iteration-exact ``--resume`` needs.

A detector file is also what ``load_detector`` takes, and a training state is a
detector file too, so either rebuilds the model. ``deploy.files`` tells the kinds apart
by the keys below; the atomic writers are ``engine.files``'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.weights import read_checkpoint

from engine.channels import apply_channel_plan
from engine.files import FORMAT_VERSION, CheckpointError, atomic_save, check_keys, read_torch_file, source_name, unwrap
from engine.runner.state import STATE_KEYS
from engine.runner.state import read_training_state as runner_read_training_state

from .models import rebuild_detector

__all__ = [
    "DETECTOR_KEYS",
    "TRAINING_KEYS",
    "CheckpointError",
    "check_init_checkpoint",
    "detector_record",
    "load_detector",
    "load_detector_for_training",
    "read_checkpoint",
    "read_training_state",
    "save_detector",
]

# The keys each kind must hold (deploy.files tells the kinds apart by them).
DETECTOR_KEYS = ("model", "build_args")
TRAINING_MODEL_KEYS = DETECTOR_KEYS + ("category_mapping",)  # a training state's model record
TRAINING_KEYS = TRAINING_MODEL_KEYS + STATE_KEYS
TRAINING_STATE_FILE = "training checkpoint (checkpoint.pth from tools/train_det.py)"
OPTIONAL_KEYS = ("category_mapping", "config", "iteration", "format_version", "channel_plan")


def detector_record(model: nn.Module, extra: Mapping[str, Any]) -> dict[str, Any]:
    """A detector file as a dict: ``model``, ``build_args``, ``format_version``, ``channel_plan`` when pruned, and ``extra``.

    Args:
        model: a model from ``build_detector`` (possibly wrapped in DDP).
        extra: more of the file's keys (``category_mapping``, ``config``, ``iteration``).

    Raises:
        ValueError: the model cannot be rebuilt from a file (no ``build_args``), or ``extra`` holds an unknown key.
    """
    model = unwrap(model)
    if not hasattr(model, "build_args"):
        raise ValueError("model has no build_args: build it with detection.build_detector to make it reloadable")
    unknown = sorted(set(extra) - set(TRAINING_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ValueError(f"unknown checkpoint keys {unknown}; a detector file holds {list(DETECTOR_KEYS + OPTIONAL_KEYS)}")
    record = {"model": model.state_dict(), "build_args": model.build_args, "format_version": FORMAT_VERSION, **extra}
    plan = getattr(model, "channel_plan", None)
    if plan:  # a pruned model: the loader narrows the standard architecture to these widths
        record["channel_plan"] = {str(name): {str(k): int(v) for k, v in widths.items()} for name, widths in plan.items()}
    return record


def save_detector(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    category_mapping: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    iteration: int | None = None,
) -> Path:
    """Write a detector file (``model``, ``build_args`` and what is given) atomically.

    Args:
        model: a model from ``build_detector`` (possibly wrapped in DDP).
        path: destination file.
        category_mapping: ``{"cat_ids": [...], "names": [...]}`` of the training data,
            so predictions map back to the data set's own category ids.
        config: the training config, for the record.
        iteration: iterations trained.

    Returns:
        The destination path.
    """
    extra = {"category_mapping": category_mapping, "config": config, "iteration": iteration}
    return atomic_save(detector_record(model, {k: v for k, v in extra.items() if v is not None}), path)


def load_detector(checkpoint: str | os.PathLike | Mapping[str, Any], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a detector from a detector file or training state.

    Args:
        checkpoint: a file written by ``save_detector`` or by ``tools/train_det.py``
            (``model_final.pth`` or ``checkpoint.pth``), or such a dict already loaded.
        device: where to put the model.

    Returns:
        The model in eval mode; ``model.category_mapping`` holds the data set's
        category mapping and ``model.train_config`` the training config when the
        checkpoint has them (else ``None``). A pruned model's checkpoint rebuilds the
        pruned widths (``model.channel_plan``).

    Raises:
        WeightsError: the file is missing.
        FileFormatError: its bytes are not a torch checkpoint (junk, truncated, an
            exported file, pickled code).
        CheckpointError: it is readable but not a detector checkpoint, or its content
            does not rebuild one.
    """
    ckpt = read_torch_file(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    ckpt = check_keys(ckpt, DETECTOR_KEYS, "detector checkpoint (from save_detector or tools/train_det.py)", checkpoint)
    try:
        model = rebuild_detector(ckpt["build_args"])
        if ckpt.get("channel_plan"):
            apply_channel_plan(model, ckpt["channel_plan"])
        model.load_state_dict(ckpt["model"], strict=True)
    except Exception as e:  # noqa: BLE001  (whatever the file's content breaks, it does not rebuild a detector)
        raise CheckpointError(f"{source_name(checkpoint)} does not rebuild a detector: {type(e).__name__}: {str(e)[:300]}") from None
    model.category_mapping = ckpt.get("category_mapping")
    model.train_config = ckpt.get("config")
    return model.to(device).eval()


def check_init_checkpoint(checkpoint: str | os.PathLike, *, arch: str, backbone: str) -> Mapping[str, Any]:
    """Read a detector file a training run starts from (``init_checkpoint``) and check it fits the run.

    Args:
        checkpoint: ``model_final.pth`` / ``checkpoint.pth``, or a pruned file from ``tools/prune.py``.
        arch: the run's ``model``.
        backbone: the run's ``backbone``.

    Returns:
        The checkpoint's content.

    Raises:
        WeightsError: the file is missing.
        FileFormatError: its bytes are not a torch checkpoint.
        CheckpointError: it is not a detector file, or one of another architecture or backbone.
    """
    ckpt = check_keys(read_torch_file(checkpoint), DETECTOR_KEYS, "detector checkpoint (model_final.pth, or a file from tools/prune.py)", checkpoint)
    build_args = ckpt["build_args"]
    found = (build_args.get("arch"), build_args.get("backbone")) if isinstance(build_args, Mapping) else (None, None)
    if "class_names" in ckpt or found[0] is None:
        raise CheckpointError(f"{checkpoint} is not a detector checkpoint (it holds a {found[0] or 'model of another kind'}): "
                              f"init_checkpoint takes model_final.pth from tools/train_det.py or a file from tools/prune.py")
    if found != (arch, backbone):
        raise CheckpointError(f"{checkpoint} holds a {found[0]}/{found[1]} detector but the run trains {arch}/{backbone}: "
                              f"set model and backbone to match it (the architecture comes from the file)")
    return ckpt


def load_detector_for_training(
    checkpoint: str | os.PathLike,
    *,
    arch: str,
    backbone: str,
    num_classes: int,
    min_size: int | list[int] | tuple[int, ...],
    max_size: int,
    trainable_layers: int | None = None,
) -> nn.Module:
    """Rebuild a detector file's model, pruned widths included, to train it further (fine-tuning).

    The architecture and its options (normalisation, widths, heads) come from the file;
    the run's input sizes and, when given, its trainable stages replace the file's.

    Args:
        checkpoint: the detector file (``init_checkpoint``).
        arch: the run's ``model`` (must be the file's).
        backbone: the run's ``backbone`` (must be the file's).
        num_classes: the training data's class count (must be the file's).
        min_size: the run's model ``min_size``.
        max_size: the run's ``max_size``.
        trainable_layers: trunk stages to train, or ``None`` for the file's.

    Returns:
        The model in training mode.

    Raises:
        CheckpointError: as ``check_init_checkpoint``, or a class count other than the data's.
    """
    ckpt = check_init_checkpoint(checkpoint, arch=arch, backbone=backbone)
    build_args = dict(ckpt["build_args"])
    if build_args.get("num_classes") != num_classes:
        raise CheckpointError(f"{checkpoint} predicts num_classes={build_args.get('num_classes')} but the training data has "
                              f"{num_classes} (its categories plus the background): fine-tune it on data with the same categories")
    build_args["min_size"] = list(min_size) if isinstance(min_size, (list, tuple)) else min_size
    build_args["max_size"] = max_size
    if trainable_layers is not None:
        build_args["trainable_layers"] = trainable_layers
    try:
        model = load_detector({**ckpt, "build_args": build_args})
    except CheckpointError as e:
        raise CheckpointError(str(e).replace(source_name(ckpt), str(checkpoint), 1)) from None
    return model.train()


def read_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a detection ``checkpoint.pth`` for ``--resume`` (``engine.runner.read_training_state`` with the detector's keys).

    Args:
        path: the training state file.

    Raises:
        WeightsError: the file is missing.
        FileFormatError: its bytes are not a torch checkpoint.
        CheckpointError: it is readable but not a training state (e.g. a
            ``model_final.pth``, which has no optimizer).
    """
    return runner_read_training_state(path, model_keys=TRAINING_MODEL_KEYS, what=TRAINING_STATE_FILE)
