"""The one training runner, in parts, each one job; every task trains through ``train`` here.

============  ==================================================================
``setup``      the run: process group, device, seed, output folder, ``config.yaml``
``loader``     the data a run trains on: epochs of batches, resume's skip, the plan
``solver``     optimizer, warm-up and schedule, AMP, the model on its device (DDP)
``state``      training state, the ``checkpoint.pth`` file (written and read once), resume
``records``    ``metrics.jsonl``, ``batches.jsonl``, TensorBoard, the loss window
``task``       the :class:`Task` contract a task implements
``hooks``      the events (after step, checkpoint, evaluation, end) tasks and users hook into
``loop``       ``train``: set-up, epochs of guarded steps, evaluation, finish
============  ==================================================================

``from engine import runner`` gives every public name of the parts.
"""

from .hooks import Hook, call_hooks
from .loader import EpochBatches, TrainData, plan_iterations, seed_worker
from .loop import (
    build_state,
    eval_due,
    evaluate_run,
    finish,
    guarded_step,
    preflight,
    save_checkpoint,
    train,
    train_epochs,
    train_one_epoch,
)
from .records import RECORD_FILES, MetricsLog, Window, record_step, restart_records
from .setup import NonFiniteLossError, Run, setup_run
from .solver import build_amp, build_optimizer, build_scheduler, warmup_length, wrap_for_training
from .state import STATE_KEYS, TrainState, read_training_state, resume_path, save_training_state
from .task import Task

__all__ = [
    "RECORD_FILES", "STATE_KEYS", "EpochBatches", "Hook", "MetricsLog", "NonFiniteLossError", "Run", "Task", "TrainData", "TrainState",
    "Window", "build_amp", "build_optimizer", "build_scheduler", "build_state", "call_hooks", "eval_due", "evaluate_run", "finish",
    "guarded_step", "plan_iterations", "preflight", "read_training_state", "record_step", "restart_records", "resume_path",
    "save_checkpoint", "save_training_state", "seed_worker", "setup_run", "train", "train_epochs", "train_one_epoch", "warmup_length",
    "wrap_for_training",
]
