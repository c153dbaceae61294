"""Every file this project writes for a model, and every key in it: one place to read.

Two kinds of file, both plain tensors and containers (``torch.load(...,
weights_only=True)`` reads them; a checkpoint is data, never code), both written
atomically (a kill at any moment leaves the previous file or the new one):

* a **detector** file (``model_final.pth``, ``save_detector``): ``model`` (the state
  dict), ``build_args`` (what ``build_detector`` needs to rebuild it), and optionally
  ``category_mapping`` (``{"cat_ids", "names"}``), ``config`` and ``iteration``;
* a **training state** (``checkpoint.pth``, ``save_training_state``): the detector keys
  plus ``optimizer``, ``scheduler``, ``scaler``, ``epoch`` and ``iteration``, which is
  what an iteration-exact ``--resume`` needs.

A detector file is also what ``load_detector`` takes, and a training state is a
detector file too, so either rebuilds the model. Which kind a file is, and the keys
each kind must hold, are decided in ``detection.files``; the atomic writers live there
too.

Classification (``tools/train_cls.py``) writes two more kinds, whose ``model`` is a
plain torchvision-named ResNet state dict, so ``backbones.load_pretrained`` and
``--weights-backbone PATH`` take them as they are (``fc`` is skipped when the class
counts differ):

* a **classifier** file (``model_final.pth``, ``model_ema.pth``, ``save_classifier``):
  ``model``, ``arch`` (``resnet18`` / ``resnet34``), ``classes`` (names in label
  order), and optionally ``config`` and ``iteration``;
* a **classifier training state** (``checkpoint.pth``,
  ``save_classifier_training_state``): the classifier keys plus ``optimizer``,
  ``scheduler``, ``scaler``, ``model_ema`` (empty without EMA), ``epoch`` and
  ``iteration``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.weights import FileFormatError, read_checkpoint

from .files import (
    CLASSIFIER_KEYS,
    CLASSIFIER_TRAINING_KEYS,
    DETECTOR_KEYS,
    TRAINING_KEYS,
    atomic_save,
    atomic_write_text,
    read_torch_file,
)
from .models import BACKBONES, rebuild_detector

__all__ = [
    "CLASSIFIER_KEYS",
    "CLASSIFIER_TRAINING_KEYS",
    "DETECTOR_KEYS",
    "FORMAT_VERSION",
    "TRAINING_KEYS",
    "CheckpointError",
    "FileFormatError",
    "atomic_save",
    "atomic_write_text",
    "load_classifier",
    "load_detector",
    "read_checkpoint",
    "read_classifier_training_state",
    "read_training_state",
    "save_classifier",
    "save_classifier_training_state",
    "save_detector",
    "save_training_state",
]

FORMAT_VERSION = 1
OPTIONAL_KEYS = ("category_mapping", "config", "iteration", "format_version")


class CheckpointError(FileFormatError):
    """A checkpoint file that is readable but is not what was asked for (or does not rebuild its model)."""


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _detector_record(model: nn.Module, extra: Mapping[str, Any]) -> dict[str, Any]:
    model = _unwrap(model)
    if not hasattr(model, "build_args"):
        raise ValueError("model has no build_args: build it with detection.build_detector to make it reloadable")
    unknown = sorted(set(extra) - set(TRAINING_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ValueError(f"unknown checkpoint keys {unknown}; a detector file holds {list(DETECTOR_KEYS + OPTIONAL_KEYS)}")
    return {"model": model.state_dict(), "build_args": model.build_args, "format_version": FORMAT_VERSION, **extra}


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
    return atomic_save(_detector_record(model, {k: v for k, v in extra.items() if v is not None}), path)


def _name(source: Any) -> str:
    return "an in-memory checkpoint" if isinstance(source, Mapping) else str(source)


def _check_keys(ckpt: Any, keys: tuple[str, ...], what: str, source: Any) -> Mapping[str, Any]:
    if not isinstance(ckpt, Mapping) or any(k not in ckpt for k in keys):
        found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        missing = [k for k in keys if not isinstance(ckpt, Mapping) or k not in ckpt]
        raise CheckpointError(f"{_name(source)} is not a {what}: it lacks {missing} (found {found})")
    return ckpt


def load_detector(checkpoint: str | os.PathLike | Mapping[str, Any], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a detector from a detector file or training state.

    Args:
        checkpoint: a file written by ``save_detector`` or by ``tools/train_det.py``
            (``model_final.pth`` or ``checkpoint.pth``), or such a dict already loaded.
        device: where to put the model.

    Returns:
        The model in eval mode; ``model.category_mapping`` holds the data set's
        category mapping and ``model.train_config`` the training config when the
        checkpoint has them (else ``None``).

    Raises:
        WeightsError: the file is missing.
        FileFormatError: its bytes are not a torch checkpoint (junk, truncated, an
            exported file, pickled code).
        CheckpointError: it is readable but not a detector checkpoint, or its content
            does not rebuild one.
    """
    ckpt = read_torch_file(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    ckpt = _check_keys(ckpt, DETECTOR_KEYS, "detector checkpoint (from save_detector or tools/train_det.py)", checkpoint)
    try:
        model = rebuild_detector(ckpt["build_args"])
        model.load_state_dict(ckpt["model"], strict=True)
    except Exception as e:  # noqa: BLE001  (whatever the file's content breaks, it does not rebuild a detector)
        raise CheckpointError(f"{_name(checkpoint)} does not rebuild a detector: {type(e).__name__}: {str(e)[:300]}") from None
    model.category_mapping = ckpt.get("category_mapping")
    model.train_config = ckpt.get("config")
    return model.to(device).eval()


def save_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    epoch: int,
    iteration: int,
    config: Mapping[str, Any],
    category_mapping: Mapping[str, Any],
) -> Path:
    """Write everything an iteration-exact resume needs, atomically.

    Args:
        path: destination (``checkpoint.pth``).
        model: the detector (possibly DDP-wrapped).
        optimizer: its optimizer.
        scheduler: the per-iteration LR scheduler.
        scaler: the ``GradScaler`` (its state is empty when disabled).
        epoch: epochs completed.
        iteration: iterations completed.
        config: the run's config.
        category_mapping: the training data's category mapping.

    Returns:
        The destination path.
    """
    state = {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "epoch": int(epoch), "iteration": int(iteration), "config": dict(config), "category_mapping": dict(category_mapping),
    }
    return atomic_save(_detector_record(model, state), path)


def read_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``checkpoint.pth`` for ``--resume`` and check it holds every training key.

    Args:
        path: the training state file.

    Raises:
        WeightsError: the file is missing.
        FileFormatError: its bytes are not a torch checkpoint.
        CheckpointError: it is readable but not a training state (e.g. a
            ``model_final.pth``, which has no optimizer).
    """
    ckpt = read_torch_file(path)
    return dict(_check_keys(ckpt, TRAINING_KEYS, "training checkpoint (checkpoint.pth from tools/train_det.py)", path))


# ---------------------------------------------------------------------------------------------
# Classifiers (tools/train_cls.py)


def _classifier_record(model: nn.Module, arch: str, classes: list[str], extra: Mapping[str, Any]) -> dict[str, Any]:
    if arch not in BACKBONES:
        raise ValueError(f"arch must be one of {list(BACKBONES)}, got {arch!r}")
    state = {k: v.detach().contiguous() for k, v in _unwrap(model).state_dict().items()}
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
    return atomic_save(_classifier_record(model, arch, classes, extra), path)


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
    ckpt = _check_keys(ckpt, CLASSIFIER_KEYS, "classifier checkpoint (from save_classifier or tools/train_cls.py)", checkpoint)
    if not isinstance(ckpt["arch"], str) or ckpt["arch"] not in BACKBONES:
        raise CheckpointError(f"{_name(checkpoint)}: arch must be one of {list(BACKBONES)}, got {ckpt['arch']!r}")
    try:
        classes = [str(c) for c in ckpt["classes"]]
        model = resnet(BACKBONES[ckpt["arch"]], num_classes=len(classes))
        model.load_state_dict(ckpt["model"], strict=True)
    except Exception as e:  # noqa: BLE001  (whatever the file's content breaks, it does not rebuild the classifier)
        raise CheckpointError(f"{_name(checkpoint)} does not rebuild a {ckpt['arch']} classifier: {type(e).__name__}: {str(e)[:300]}") from None
    model.classes = classes
    model.arch = ckpt["arch"]
    model.train_config = ckpt.get("config")
    return model.to(device).eval()


def save_classifier_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    arch: str,
    classes: list[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    model_ema: nn.Module | None,
    epoch: int,
    iteration: int,
    config: Mapping[str, Any],
) -> Path:
    """Write everything an iteration-exact classification resume needs, atomically.

    Args:
        path: destination (``checkpoint.pth``).
        model: the classifier (possibly DDP-wrapped).
        arch: ``"resnet18"`` or ``"resnet34"``.
        classes: class names in label order.
        optimizer: its optimizer.
        scheduler: the per-iteration LR scheduler.
        scaler: the ``GradScaler`` (its state is empty when disabled).
        model_ema: the ``AveragedModel`` of the weights, or ``None``.
        epoch: epochs completed.
        iteration: iterations completed.
        config: the run's config.

    Returns:
        The destination path.
    """
    state = {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "model_ema": model_ema.state_dict() if model_ema is not None else {},
        "epoch": int(epoch), "iteration": int(iteration), "config": dict(config),
    }
    return atomic_save(_classifier_record(model, arch, classes, state), path)


def read_classifier_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a classification ``checkpoint.pth`` for ``--resume`` and check it holds every training key.

    Args:
        path: the training state file.

    Raises:
        WeightsError: the file is missing.
        FileFormatError: its bytes are not a torch checkpoint.
        CheckpointError: it is readable but not a classifier training state.
    """
    ckpt = read_torch_file(path)
    return dict(_check_keys(ckpt, CLASSIFIER_TRAINING_KEYS, "classifier training checkpoint (checkpoint.pth from tools/train_cls.py)", path))

