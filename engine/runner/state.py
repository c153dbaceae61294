"""Training state and resume: what changes as a run trains, and the ``checkpoint.pth`` that holds it.

The training-state file is written and read here, once for every task. It is the task's
model file (``Task.model_record``: the state dict and what rebuilds the model) plus the
keys an iteration-exact ``--resume`` needs (:data:`STATE_KEYS`, and ``model_ema`` when the
run keeps a moving average). Being a model file too, it rebuilds the model wherever a
``model_final.pth`` does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..files import FORMAT_VERSION, atomic_save, check_keys, read_torch_file

__all__ = ["STATE_KEYS", "TrainState", "read_training_state", "resume_path", "save_training_state"]

#: What a training-state file holds beside the task's model record (``model_ema`` too with EMA).
STATE_KEYS = ("optimizer", "scheduler", "scaler", "epoch", "iteration", "config")


@dataclass
class TrainState:
    """Everything that changes as training runs; ``load`` restores it for an iteration-exact resume.

    Attributes:
        model: the task's model (unwrapped): what is saved and evaluated.
        train_model: what a step calls: the model with its loss, or its DDP wrapper.
        optimizer: the optimizer.
        scheduler: the per-iteration learning-rate schedule.
        scaler: the fp16 gradient scaler (disabled otherwise).
        amp: whether steps run under autocast.
        amp_dtype: the autocast dtype.
        lr: the batch-scaled base learning rate.
        ema: a moving average of the weights, or ``None``.
        iteration: iterations completed.
        last_good: ``(path, iteration)`` of the newest training state a finite step has
            followed (its weights give a finite loss), named when a run has to stop.
        unproven: a training state written or resumed from since then, good once a finite
            step follows it.
        bad_in_a_row: non-finite steps just before now (no checkpoint is written while > 0).
    """

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: bool
    amp_dtype: torch.dtype
    lr: float
    ema: AveragedModel | None = None
    iteration: int = 0
    last_good: tuple[Path, int] | None = None
    unproven: tuple[Path, int] | None = None
    bad_in_a_row: int = 0

    def load(self, ckpt: dict[str, Any]) -> None:
        """Restore from a training checkpoint's dict (``model``, ``optimizer``, ``scheduler``, ``scaler``, ``iteration``).

        The learning rate is this run's (``lr``, from its config and batch), on the restored
        schedule: resuming with a lower ``--lr`` after a divergence lowers it.
        """
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        # Both state dicts carry the saved run's rates; the schedule's position is what resumes.
        self.scheduler.base_lrs = [self.lr for _ in self.scheduler.base_lrs]
        for group, fn in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * fn(self.scheduler.last_epoch)
        if ckpt["scaler"]:  # empty when the run that saved it had no fp16 scaler (CPU, bf16, no --amp)
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if not ckpt.get("model_ema"):
                raise ValueError("the checkpoint was written without EMA (ema: false); resume with ema: false or start afresh")
            self.ema.load_state_dict(ckpt["model_ema"])
        self.iteration = int(ckpt["iteration"])


def save_training_state(
    path: str | os.PathLike, state: TrainState, record: Mapping[str, Any], *, epoch: int, config: Mapping[str, Any], ema_key: bool = False
) -> Path:
    """Write ``record`` (the task's model file) and everything a resume needs to ``path``, atomically.

    Args:
        path: destination (``checkpoint.pth``).
        state: the training state (optimizer, schedule, scaler, EMA, iteration).
        record: the task's model record (``Task.model_record``); it may not hold the state's keys.
        epoch: epochs completed (the epoch in progress for a mid-epoch save).
        config: the run's config.
        ema_key: write ``model_ema`` (empty) even without EMA, as the classifier's files always have.

    Returns:
        The destination path.
    """
    clash = sorted(set(record) & {*STATE_KEYS, "model_ema"} - {"config", "iteration"})
    if clash:
        raise ValueError(f"a model record may not hold the training state's keys {clash}")
    ckpt = {
        "format_version": FORMAT_VERSION, **record,
        "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
        "epoch": int(epoch), "iteration": int(state.iteration), "config": dict(config),
    }
    if state.ema is not None or ema_key:
        ckpt["model_ema"] = state.ema.state_dict() if state.ema is not None else {}
    return atomic_save(ckpt, path)


def read_training_state(path: str | os.PathLike, *, model_keys: tuple[str, ...], what: str) -> dict[str, Any]:
    """Read a ``checkpoint.pth`` for ``--resume`` and check it holds the model's keys and every state key.

    Args:
        path: the training-state file.
        model_keys: the keys of the task's model file (e.g. ``("model", "build_args")``).
        what: the kind of file, for messages (``"detection training checkpoint (checkpoint.pth from tools/train_det.py)"``).

    Raises:
        WeightsError: the file is missing.
        FileFormatError: its bytes are not a torch checkpoint.
        CheckpointError: it is readable but not this kind of training state (e.g. a
            ``model_final.pth``, which has no optimizer, or another task's file).
    """
    # The state's keys first: "lacks ['optimizer', ...]" is what tells a model file from a training state.
    return dict(check_keys(read_torch_file(path), STATE_KEYS + tuple(model_keys), what, path))


def resume_path(cfg: dict[str, Any], resume: str | Path | bool) -> Path:
    """The checkpoint a resume reads: ``output_dir/checkpoint.pth`` for ``True``, else the path given."""
    return Path(cfg["output_dir"]) / "checkpoint.pth" if resume is True else Path(resume)
