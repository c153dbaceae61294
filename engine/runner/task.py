"""The Task contract: what a task (detection, classification, segmentation, yours) tells the runner.

The runner calls, in order: ``build_data``, ``build_model`` (and ``build_ema``), then per
batch ``prepare_batch``; ``model_record`` whenever ``checkpoint.pth`` is written (every
``checkpoint_period`` and at each epoch's end); ``evaluate`` on the evaluation schedule;
at the end ``save_final``, ``evaluate`` and ``draw``. ``hooks`` adds the task's own
:class:`~engine.runner.hooks.Hook` s to the run's events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.optim.swa_utils import AveragedModel

from .hooks import Hook
from .loader import TrainData
from .records import MetricsLog
from .setup import Run
from .state import TrainState, read_training_state, save_training_state

__all__ = ["Task"]


class Task:
    """What a task tells the runner. Subclass it and override the methods that raise.

    Attributes:
        tool: the task's training tool, for messages (e.g. ``"tools/train_det.py"``).
        model_keys: the keys of the task's model file (a training state holds them too).
        state_file: what a training state of this task is, for messages.
        ema_key: its training states hold ``model_ema`` (empty without EMA).
    """

    tool: str = "the training tool"
    model_keys: tuple[str, ...] = ("model",)
    state_file: str = "training checkpoint"
    ema_key: bool = False

    def build_data(self, cfg: dict[str, Any], run: Run) -> TrainData:
        """Read (or generate) the data sets and plan the iterations (see ``plan_iterations``)."""
        raise NotImplementedError

    def build_model(self, cfg: dict[str, Any], run: Run, data: TrainData) -> tuple[nn.Module, nn.Module]:
        """``(model, loss_model)``: the model to save and evaluate, and the module a step calls as
        ``loss_model(inputs, targets) -> {name: scalar loss}`` (often the model itself)."""
        raise NotImplementedError

    def build_ema(self, model: nn.Module, cfg: dict[str, Any], run: Run) -> AveragedModel | None:
        """A moving average of ``model``'s weights, or ``None`` (the default)."""
        return None

    def hooks(self, cfg: dict[str, Any], run: Run) -> list[Hook]:
        """The task's own hooks on the run's events (e.g. an EMA update after each step); default none."""
        return []

    def prepare_batch(self, batch: Any, run: Run) -> tuple[Any, Any]:
        """``(inputs, targets)`` of a loader batch, on ``run.device``."""
        raise NotImplementedError

    def batch_ids(self, targets: Any) -> dict[str, Any]:
        """Extra ids of a batch for ``batches.jsonl`` (``log_batches``), e.g. image ids; default none."""
        return {}

    def model_record(self, state: TrainState, data: TrainData, run: Run) -> dict[str, Any]:
        """The task's model file as a dict (state dict and what rebuilds the model): the part of
        ``checkpoint.pth`` that is the task's; the runner adds the optimiser state and the rest."""
        raise NotImplementedError

    def save_checkpoint(self, state: TrainState, data: TrainData, run: Run, path: Path, *, epoch: int) -> None:
        """Write the training state to ``path`` atomically (rank 0 only calls it): ``model_record`` plus the runner's keys."""
        save_training_state(path, state, self.model_record(state, data, run), epoch=epoch, config=run.cfg, ema_key=self.ema_key)

    def read_checkpoint(self, path: Path) -> dict[str, Any]:
        """Read a training state written by ``save_checkpoint``; raise the project's error for anything else."""
        return read_training_state(path, model_keys=self.model_keys, what=f"{self.state_file} (checkpoint.pth from {self.tool})")

    def evaluate(self, state: TrainState, data: TrainData, run: Run) -> dict[str, float]:
        """Evaluate ``state.model`` on the validation set (every rank calls it); log the result on rank 0."""
        raise NotImplementedError

    def save_final(self, state: TrainState, data: TrainData, run: Run) -> None:
        """Write the trained model (``model_final.pth``) on rank 0, before the final evaluation."""
        raise NotImplementedError

    def draw(self, state: TrainState, data: TrainData, run: Run, metrics: MetricsLog, final: dict[str, float]) -> None:
        """Rank 0, at the end: curves, example pictures, ``metrics.json``; default nothing."""

    def describe(self, state: TrainState, data: TrainData, run: Run) -> str:
        """The log line that opens training (what, on what data, the iteration plan)."""
        return (f"training on {data.root}: {len(data.train_set)} images, {data.iters_per_epoch} iterations/epoch, "
                f"{data.stop_at} planned, batch {run.cfg['batch_size']} x {run.world}, lr {state.lr:.4g}")

    def format_metrics(self, metrics: dict[str, float]) -> str:
        """One line of the metrics for the final log line."""
        return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
