"""Segmenter files: what ``save_segmenter`` writes and ``load_segmenter`` rebuilds.

A **segmenter** file (``model_final.pth``) holds plain tensors and containers
(``torch.load(..., weights_only=True)`` reads it; a checkpoint is data, never code) and
is written atomically (a kill at any moment leaves the previous file or the new one):

* ``model``: the state dict (torchvision's keys for ``deeplabv3`` / ``fcn``);
* ``build_args``: what ``build_segmenter`` needs to rebuild the model (``arch``,
  ``backbone``, ``num_classes``, ``output_stride``, ``aux_loss``, head options, ...);
* ``class_names``: one name per output channel, index = label (``"__background__"``
  first for data with a background);
* ``format_version``, and optionally ``config`` (the training config) and ``iteration``.

A **segmenter training state** (``checkpoint.pth``, written by the runner,
``engine.runner.state``) is a segmenter file plus ``optimizer``, ``scheduler``, ``scaler``,
``epoch``, ``iteration`` and ``config``: what an iteration-exact ``tools/train_seg.py --resume`` needs. Being a
segmenter file too, it is also what ``load_segmenter`` takes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.weights import read_checkpoint
from engine.files import CheckpointError  # the project's error for a readable file of the wrong kind
from engine.files import atomic_save
from engine.runner.state import STATE_KEYS, read_training_state

from .models import ARCHS, rebuild_segmenter

__all__ = [
    "FORMAT_VERSION",
    "SEGMENTER_KEYS",
    "SEGMENTER_TRAINING_KEYS",
    "load_segmenter",
    "read_segmenter_training_state",
    "save_segmenter",
    "segmenter_record",
]

FORMAT_VERSION = 1
SEGMENTER_KEYS = ("model", "build_args", "class_names")
SEGMENTER_TRAINING_KEYS = SEGMENTER_KEYS + STATE_KEYS
TRAINING_STATE_FILE = "segmentation training checkpoint (checkpoint.pth from tools/train_seg.py)"
OPTIONAL_KEYS = ("config", "iteration", "format_version")


def segmenter_record(model: nn.Module, class_names: Sequence[str]) -> dict[str, Any]:
    """A segmenter file as a dict: ``model``, ``build_args``, ``class_names`` and ``format_version``.

    Args:
        model: a model from ``build_segmenter`` (possibly wrapped in DDP).
        class_names: one name per output channel, in label order.

    Raises:
        ValueError: the model has no ``build_args``, or the names do not match its classes.
    """
    model = getattr(model, "module", model)
    build_args = getattr(model, "build_args", None)
    if not isinstance(build_args, Mapping):
        raise ValueError("model has no build_args: build it with segmentation.build_segmenter to make it reloadable")
    names = [str(n) for n in class_names]
    if len(names) != build_args["num_classes"]:
        raise ValueError(f"class_names has {len(names)} names for a model with num_classes={build_args['num_classes']}")
    record: dict[str, Any] = {
        "model": {k: v.detach() for k, v in model.state_dict().items()},
        "build_args": dict(build_args),
        "class_names": names,
        "format_version": FORMAT_VERSION,
    }
    return record


def save_segmenter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str],
    config: Mapping[str, Any] | None = None,
    iteration: int | None = None,
) -> Path:
    """Write a segmenter file atomically.

    Args:
        model: a model from ``build_segmenter`` (possibly wrapped in DDP).
        path: destination file.
        class_names: one name per output channel, in label order.
        config: the training config, for the record.
        iteration: iterations trained.

    Returns:
        The destination path.
    """
    record = segmenter_record(model, class_names)
    if config is not None:
        record["config"] = dict(config)
    if iteration is not None:
        record["iteration"] = int(iteration)
    return atomic_save(record, path)


def read_segmenter_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a segmentation ``checkpoint.pth`` for ``--resume`` (``engine.runner.read_training_state`` with the segmenter's keys).

    Args:
        path: the training state file.

    Raises:
        WeightsError: the file is missing, unreadable or carries code.
        CheckpointError: it is readable but not a segmenter training state (e.g. a
            ``model_final.pth``, which has no optimizer, or a detector's checkpoint).
    """
    ckpt = read_training_state(path, model_keys=SEGMENTER_KEYS, what=TRAINING_STATE_FILE)
    arch = ckpt["build_args"].get("arch") if isinstance(ckpt["build_args"], Mapping) else None
    if arch not in ARCHS:
        raise CheckpointError(f"{path} is not a {TRAINING_STATE_FILE}: its arch is {arch!r}, a segmenter's is one of {list(ARCHS)}")
    return ckpt


def load_segmenter(checkpoint: str | os.PathLike | Mapping[str, Any], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a segmenter from a segmenter file.

    Args:
        checkpoint: a file written by ``save_segmenter``, or such a dict already loaded.
        device: where to put the model.

    Returns:
        The model in eval mode, with ``model.class_names`` and ``model.train_config``
        (the training config, or ``None``).

    Raises:
        WeightsError: the file is missing, unreadable or carries code.
        CheckpointError: it is readable but not a segmenter file (a detector file, a
            classifier, or a state dict that does not fit its ``build_args``).
    """
    ckpt = read_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(ckpt, Mapping) or any(k not in ckpt for k in SEGMENTER_KEYS):
        found = sorted(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        missing = [k for k in SEGMENTER_KEYS if not isinstance(ckpt, Mapping) or k not in ckpt]
        raise CheckpointError(f"{checkpoint} is not a segmenter file (from save_segmenter): it lacks {missing} (found {found})")
    build_args = ckpt["build_args"]
    arch = build_args.get("arch") if isinstance(build_args, Mapping) else None
    if arch not in ARCHS:
        raise CheckpointError(f"{checkpoint} is not a segmenter file: its arch is {arch!r}, a segmenter's is one of {list(ARCHS)}")
    try:
        model = rebuild_segmenter(build_args)
        model.load_state_dict(ckpt["model"], strict=True)
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{checkpoint} does not rebuild a segmenter: {e}") from None
    names = list(ckpt["class_names"])
    if len(names) != build_args["num_classes"]:
        raise CheckpointError(f"{checkpoint}: {len(names)} class names for num_classes={build_args['num_classes']}")
    model.class_names = names
    model.train_config = ckpt.get("config")
    return model.to(device).eval()
