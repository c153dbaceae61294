"""Events of a training run that a task or a user hooks into, as detectron2's hooks.

A :class:`Hook` overrides the events it needs; the loop calls every hook of the run, in
order, at each event: ``before_train`` (after set-up and any resume), ``after_step`` (every
optimisation step), ``after_checkpoint`` (``checkpoint.pth`` written), ``after_evaluation``
(every evaluation, the final one included) and ``after_train`` (the trained model written,
evaluated and drawn). A task adds its own through ``Task.hooks``; a user passes more to
``train(..., hooks=[...])``::

    class PrintAP(Hook):
        def after_evaluation(self, state, data, run, metrics):
            print(state.iteration, metrics.get("bbox/AP"))

Hooks run on every rank; one that writes files checks ``run.is_main``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .loader import TrainData
from .setup import Run
from .state import TrainState

__all__ = ["Hook", "call_hooks"]


class Hook:
    """Override the events you need; each does nothing by default.

    Every event gets the training state (``state.model``, ``state.optimizer``,
    ``state.iteration``, ...), the task's data and the run (``run.cfg``, ``run.out``,
    ``run.is_main``).
    """

    def before_train(self, state: TrainState, data: TrainData, run: Run) -> None:
        """Before the first step of this process (after a resume has restored ``state``)."""

    def after_step(self, state: TrainState, data: TrainData, run: Run, epoch: int) -> None:
        """After every optimisation step (a skipped non-finite step included); ``state.iteration`` counts it."""

    def after_checkpoint(self, state: TrainState, data: TrainData, run: Run, path: Path) -> None:
        """After ``path`` (``checkpoint.pth``) was written; rank 0 wrote it, every rank is told."""

    def after_evaluation(self, state: TrainState, data: TrainData, run: Run, metrics: dict[str, float]) -> None:
        """After every evaluation, the final one included, with its metrics."""

    def after_train(self, state: TrainState, data: TrainData, run: Run, final: dict[str, float]) -> None:
        """At the very end: the model is written, evaluated (``final``) and drawn."""


def call_hooks(hooks: Sequence[Hook], event: str, *args: Any) -> None:
    """Call ``event`` on every hook, in order.

    Args:
        hooks: the run's hooks.
        event: a ``Hook`` method name.
        args: its arguments.
    """
    for hook in hooks:
        getattr(hook, event)(*args)
