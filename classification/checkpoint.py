"""Classifier files (``tools/train_cls.py``): plain torchvision-named ResNet state dicts with their class names.

Their ``model`` is a torchvision-named ResNet state dict, so ``backbones.load_pretrained``
and ``--weights-backbone PATH`` take them as they are (``fc`` is skipped when the class
counts differ):

* a **classifier** file (``model_final.pth``, ``model_ema.pth``, ``save_classifier``):
  ``model``, ``arch`` (``resnet18`` / ``resnet34``), ``classes`` (names in label
  order), and optionally ``config`` and ``iteration``;
* a **classifier training state** (``checkpoint.pth``, written by the runner,
  ``engine.runner.state``): the classifier keys plus ``optimizer``, ``scheduler``,
  ``scaler``, ``epoch``, ``iteration``, ``config`` and ``model_ema`` (empty without EMA).

Both are written atomically and read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from functools import partial
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.files import FORMAT_VERSION, CheckpointError, atomic_save, check_keys, read_torch_file, source_name, unwrap
from engine.runner.state import STATE_KEYS, read_training_state

from .config import BACKBONES

__all__ = [
    "CLASSIFIER_KEYS",
    "CLASSIFIER_TRAINING_KEYS",
    "classifier_record",
    "load_classifier",
    "read_classifier_training_state",
    "save_classifier",
]

CLASSIFIER_KEYS = ("model", "arch", "classes")
CLASSIFIER_TRAINING_KEYS = CLASSIFIER_KEYS + STATE_KEYS + ("model_ema",)
TRAINING_STATE_FILE = "classifier training checkpoint (checkpoint.pth from tools/train_cls.py)"


def classifier_record(model: nn.Module, arch: str, classes: list[str], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A classifier file as a dict: ``model`` (torchvision's names), ``arch``, ``classes``, ``format_version`` and ``extra``.

    Args:
        model: the ResNet (possibly wrapped in DDP).
        arch: ``"resnet18"`` or ``"resnet34"``.
        classes: class names in label order.
        extra: more of the file's keys (``config``, ``iteration``).

    Raises:
        ValueError: ``arch`` is not a known backbone.
    """
    if arch not in BACKBONES:
        raise ValueError(f"arch must be one of {list(BACKBONES)}, got {arch!r}")
    state = {k: v.detach().contiguous() for k, v in unwrap(model).state_dict().items()}
    return {"model": state, "arch": arch, "classes": list(classes), "format_version": FORMAT_VERSION, **extra}


def save_classifier(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str,
    classes: list[str],
    config: Mapping[str, Any] | None = None,
    iteration: int | None = None,
) -> Path:
    """Write a classifier file atomically; ``load_pretrained`` and ``--weights-backbone`` read it as it is.

    Args:
        model: a ``backbones.ResNet`` (possibly wrapped in DDP).
        path: destination file.
        arch: ``"resnet18"`` or ``"resnet34"``.
        classes: class names in label order (``len(classes)`` outputs of ``fc``).
        config: the training config, for the record.
        iteration: iterations trained.

    Returns:
        The destination path.
    """
    extra = {k: v for k, v in {"config": None if config is None else dict(config), "iteration": iteration}.items() if v is not None}
    return atomic_save(classifier_record(model, arch, classes, extra), path)


def load_classifier(checkpoint: str | os.PathLike | Mapping[str, Any], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a ResNet classifier from a classifier file or training state.

    Args:
        checkpoint: ``model_final.pth``, ``model_ema.pth`` or ``checkpoint.pth`` from
            ``tools/train_cls.py``, or such a dict already loaded.
        device: where to put the model.

    Returns:
        The model in eval mode, with ``model.classes`` (names in label order),
        ``model.arch`` and ``model.train_config`` (the training config, or ``None``).

    Raises:
        WeightsError: the file is missing.
        FileFormatError: its bytes are not a torch checkpoint.
        CheckpointError: it is readable but not a classifier checkpoint, or its content
            does not rebuild one.
    """
    from backbones.resnet import resnet

    ckpt = read_torch_file(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    ckpt = check_keys(ckpt, CLASSIFIER_KEYS, "classifier checkpoint (from save_classifier or tools/train_cls.py)", checkpoint)
    if not isinstance(ckpt["arch"], str) or ckpt["arch"] not in BACKBONES:
        raise CheckpointError(f"{source_name(checkpoint)}: arch must be one of {list(BACKBONES)}, got {ckpt['arch']!r}")
    try:
        classes = [str(c) for c in ckpt["classes"]]
        model = resnet(BACKBONES[ckpt["arch"]], num_classes=len(classes))
        model.load_state_dict(ckpt["model"], strict=True)
    except Exception as e:  # noqa: BLE001  (whatever the file's content breaks, it does not rebuild the classifier)
        raise CheckpointError(f"{source_name(checkpoint)} does not rebuild a {ckpt['arch']} classifier: {type(e).__name__}: {str(e)[:300]}") from None
    model.classes = classes
    model.arch = ckpt["arch"]
    model.train_config = ckpt.get("config")
    return model.to(device).eval()


#: Read a classification ``checkpoint.pth`` for ``--resume``: ``engine.runner.read_training_state`` with the classifier's keys.
read_classifier_training_state = partial(read_training_state, model_keys=CLASSIFIER_KEYS + ("model_ema",), what=TRAINING_STATE_FILE)
