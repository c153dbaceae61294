"""The loop: a run from set-up to the trained model, one epoch, one guarded step, evaluation and finish.

``train(task, cfg)`` is the only training loop of the project. It reads as a table of
contents: set up the run, build the task's data and state, resume, then epochs of steps
with checkpoints and evaluations, then the finish (the trained model on disk before the
final evaluation, then the pictures). Events go to the run's hooks (``hooks.py``).

Modelled on torchvision's ``references/*/train.py`` + ``engine.py`` and detectron2's
``DefaultTrainer`` hooks, kept to plain functions.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from .. import distributed as dist_utils
from ..config import resolve_device
from ..logs import log_to_file
from .hooks import Hook, call_hooks
from .loader import TrainData
from .records import MetricsLog, Window, record_step
from .setup import NonFiniteLossError, Run, setup_run
from .solver import build_amp, build_optimizer, build_scheduler, wrap_for_training
from .state import TrainState, resume_path
from .task import Task

__all__ = [
    "build_state", "eval_due", "evaluate_run", "finish", "guarded_step", "preflight", "save_checkpoint", "train", "train_epochs",
    "train_one_epoch",
]

logger = logging.getLogger(__name__)


def build_state(task: Task, cfg: dict[str, Any], run: Run, data: TrainData) -> TrainState:
    """The task's model on the device (DDP-wrapped under torchrun), optimizer, schedule, scaler and EMA.

    Args:
        task: the task.
        cfg: the run's config.
        run: from ``setup_run``.
        data: from ``task.build_data``.
    """
    model, loss_model = task.build_model(cfg, run, data)
    train_model = wrap_for_training(model, loss_model, cfg, run)
    lr = cfg["lr"] * cfg["batch_size"] * run.world / cfg["lr_reference_batch"]
    optimizer = build_optimizer(model, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, data.iters_per_epoch, data.total_iters)
    amp_dtype, scaler = build_amp(cfg, run.device)
    return TrainState(model, train_model, optimizer, scheduler, scaler, bool(cfg["amp"]), amp_dtype, lr, task.build_ema(model, cfg, run))


def preflight(task: Task, cfg: dict[str, Any], *, resume: str | Path | bool | None = None) -> None:
    """The runner's share of the checks before any work: the device, and the file a resume reads.

    Args:
        task: the task (reads the resume file).
        cfg: a validated config.
        resume: as for ``train``.

    Raises:
        ConfigError: the device is not available.
        FileNotFoundError: there is no checkpoint to resume from.
        WeightsError: the resume file is not this task's training state.
    """
    resolve_device(cfg["device"])
    if resume:
        path = resume_path(cfg, resume)
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: no checkpoint at {path}")
        task.read_checkpoint(path)



def eval_due(cfg: dict[str, Any], iteration: int, iters_per_epoch: int, stop_at: int) -> bool:
    """Whether an epoch-end evaluation follows ``iteration`` (the run's last one is ``finish``'s).

    Args:
        cfg: the run's config (``eval_period``, in epochs; 0: only at the end).
        iteration: iterations done.
        iters_per_epoch: iterations in one epoch.
        stop_at: the iteration the run stops at.
    """
    epochs_done, at_epoch_end = divmod(iteration, iters_per_epoch)
    return bool(cfg["eval_period"]) and iteration > 0 and at_epoch_end == 0 and epochs_done % cfg["eval_period"] == 0 and iteration < stop_at


def guarded_step(
    state: TrainState, cfg: dict[str, Any], inputs: Any, targets: Any, bad_in_a_row: int, *, device_type: str
) -> tuple[dict[str, float] | None, int]:
    """One optimisation step that skips non-finite losses (all ranks alike) and stops after too many.

    Args:
        state: the training state.
        cfg: config with ``clip_grad_norm`` and ``max_nonfinite``.
        inputs: what the task's loss model takes first.
        targets: what it takes second.
        bad_in_a_row: non-finite steps just before this one.
        device_type: ``"cpu"`` or ``"cuda"``, for autocast.

    Returns:
        ``(loss terms with "loss", bad_in_a_row)``; terms are ``None`` when the step was skipped.

    Raises:
        NonFiniteLossError: ``max_nonfinite`` non-finite losses in a row (names the bad terms).
    """
    with torch.autocast(device_type, dtype=state.amp_dtype, enabled=state.amp):
        loss_dict = state.train_model(inputs, targets)
    loss_dict = {k: v.float() for k, v in loss_dict.items()}
    loss = sum(loss_dict.values())
    # Every rank must take the same decision, or DDP's all-reduce would hang.
    all_finite = dist_utils.all_reduce_min(int(torch.isfinite(loss).item())) == 1
    state.optimizer.zero_grad(set_to_none=True)
    if not all_finite:
        bad = [k for k, v in loss_dict.items() if not torch.isfinite(v)] or ["(another rank's loss)"]
        bad_in_a_row += 1
        logger.warning("non-finite loss at iteration %d in %s; step skipped (%d in a row)", state.iteration, ", ".join(bad), bad_in_a_row)
        if bad_in_a_row >= cfg["max_nonfinite"]:
            raise NonFiniteLossError(
                f"{bad_in_a_row} non-finite losses in a row, last at iteration {state.iteration} in {', '.join(bad)}: "
                "lower the learning rate, add warm-up or gradient clipping (clip_grad_norm)"
            )
        return None, bad_in_a_row
    state.scaler.scale(loss).backward()
    if cfg["clip_grad_norm"]:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), float(cfg["clip_grad_norm"]))
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return {"loss": loss.item(), **{k: v.item() for k, v in loss_dict.items()}}, 0


def train_one_epoch(
    task: Task, state: TrainState, data: TrainData, epoch: int, run: Run, metrics: MetricsLog, bar: tqdm | None = None,
    hooks: Sequence[Hook] = (),
) -> None:
    """Train ``epoch`` from where ``state.iteration`` stands to its end or to ``data.stop_at``.

    Logs a window of averages every ``log_period`` iterations, writes ``checkpoint.pth``
    every ``checkpoint_period``, and with ``log_batches`` records every batch's sample
    indices (and the task's ids) in ``batches.jsonl``.

    Args:
        task: the task.
        state: model and optimiser state; ``state.iteration`` advances.
        data: from ``task.build_data``.
        epoch: the epoch to train.
        run: from ``setup_run``.
        metrics: where records go.
        bar: a progress bar to advance, or ``None``.
        hooks: the run's hooks (``after_step``, ``after_checkpoint``).
    """
    cfg = run.cfg
    skip = state.iteration - epoch * data.iters_per_epoch
    plan = iter(list(data.batches(epoch, skip))) if cfg["log_batches"] and run.is_main else None
    loader = data.loader(epoch, skip, seed=int(cfg["seed"]), rank=run.rank, workers=cfg["workers"], pin_memory=run.device.type == "cuda")
    window = Window()
    t_data = time.perf_counter()
    for batch in loader:
        window.data_time += time.perf_counter() - t_data
        inputs, targets = task.prepare_batch(batch, run)
        if plan is not None:
            with open(run.out / "batches.jsonl", "a") as f:
                f.write(json.dumps({"iter": state.iteration + 1, "epoch": epoch, "indices": next(plan), **task.batch_ids(targets)}) + "\n")
        terms, state.bad_in_a_row = guarded_step(state, cfg, inputs, targets, state.bad_in_a_row, device_type=run.device.type)
        if terms is not None and state.unproven is not None:
            state.last_good, state.unproven = state.unproven, None  # its weights just gave a finite loss
        state.scheduler.step()
        state.iteration += 1
        call_hooks(hooks, "after_step", state, data, run, epoch)
        window = record_step(terms, window, bar, state.optimizer, state.iteration, epoch, data.stop_at, run, metrics)
        if state.iteration % cfg["checkpoint_period"] == 0:
            save_checkpoint(task, state, data, run, epoch=epoch, hooks=hooks)
        if state.iteration >= data.stop_at:
            break
        t_data = time.perf_counter()
    if getattr(data.train_set, "num_skipped", 0):
        # Said once per bad file, with its real reason (engine.skips); samples of files already said fall back silently.
        summary = data.train_set.skip_summary() if run.is_main else None
        if summary:
            logger.warning("epoch %d: %s", epoch, summary)
        data.train_set.reset_skipped()


# ---------------------------------------------------------------------------------------------
# Evaluation and finish


def evaluate_run(task: Task, state: TrainState, data: TrainData, run: Run, metrics: MetricsLog, hooks: Sequence[Hook] = ()) -> dict[str, float]:
    """Evaluate through the task, record the metrics (rank 0) and return to training mode.

    Args:
        task: the task.
        state: the training state.
        data: the task's data.
        run: the run.
        metrics: where the record goes.
        hooks: the run's hooks (``after_evaluation``).
    """
    result = task.evaluate(state, data, run)
    state.model.train()
    if run.is_main:
        metrics.write({"iter": state.iteration, "epoch": data.epoch_of(state.iteration), **result})
    call_hooks(hooks, "after_evaluation", state, data, run, result)
    return result


def finish(task: Task, state: TrainState, data: TrainData, run: Run, metrics: MetricsLog, hooks: Sequence[Hook] = ()) -> dict[str, float]:
    """Write the trained model first, then evaluate, then draw (curves, pictures); arguments as ``evaluate_run``'s.

    Returns:
        The final metrics.
    """
    if run.is_main:
        task.save_final(state, data, run)
    dist_utils.barrier()
    final = evaluate_run(task, state, data, run, metrics, hooks)
    if run.is_main:
        task.draw(state, data, run, metrics, final)
    call_hooks(hooks, "after_train", state, data, run, final)
    return final


def train(
    task: Task, cfg: dict[str, Any], *, resume: str | Path | bool | None = None, progress: bool = True, hooks: Sequence[Hook] = ()
) -> dict[str, Any]:
    """Train ``task`` as ``cfg`` says; evaluate, checkpoint and draw along the way.

    Launched by ``torchrun`` it runs data-parallel (one process per device); alone, in one
    process. Rank 0 writes everything to ``cfg["output_dir"]``: ``config.yaml``,
    ``log.txt``, ``metrics.jsonl``, ``checkpoint.pth`` and what the task writes at the end.

    Args:
        task: what is trained (detection, classification, segmentation).
        cfg: a validated config of the task's schema.
        resume: ``True`` to resume from ``output_dir/checkpoint.pth``, a path to resume
            from that checkpoint, or ``None``/``False`` to start fresh.
        progress: show tqdm bars.
        hooks: the user's hooks on the run's events, called after the task's own (``Task.hooks``).

    Returns:
        ``{"iteration", "metrics" (the last evaluation), "seconds", "data"}``.
    """
    t_start = time.perf_counter()
    run = setup_run(cfg, progress=progress)
    with log_to_file(run.out / "log.txt"):
        if run.is_main and run.requested_device == "auto":
            logger.info("device: %s (auto: %s)", run.cfg["device"], "CUDA is available" if run.cfg["device"] == "cuda" else "no CUDA device")
        data = task.build_data(run.cfg, run)
        state = build_state(task, run.cfg, run, data)
        hooks = [*task.hooks(run.cfg, run), *hooks]
        if resume:
            path = resume_path(run.cfg, resume)
            state.load(task.read_checkpoint(path))
            state.unproven = (path, state.iteration)
            logger.info("resumed from %s at iteration %d (lr %.4g)", path, state.iteration, state.lr)
        if run.is_main:
            logger.info("%s", task.describe(state, data, run))
        metrics = MetricsLog(run, resumed_at=state.iteration if resume else None)
        if resume and eval_due(run.cfg, state.iteration, data.iters_per_epoch, data.stop_at) and not metrics.evaluated_at(state.iteration):
            logger.info("the evaluation after iteration %d did not finish before the run stopped; running it now", state.iteration)
            evaluate_run(task, state, data, run, metrics, hooks)
        call_hooks(hooks, "before_train", state, data, run)
        try:
            train_epochs(task, state, data, run, metrics, hooks)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e}; {_last_good(state)}") from None
        final = finish(task, state, data, run, metrics, hooks)
        metrics.close()
        if run.is_main:
            logger.info("done: %d iterations in %.1f s; %s", state.iteration, time.perf_counter() - t_start, task.format_metrics(final))
    dist_utils.barrier()
    return {"iteration": state.iteration, "metrics": final, "seconds": time.perf_counter() - t_start, "data": data}


def save_checkpoint(task: Task, state: TrainState, data: TrainData, run: Run, *, epoch: int, hooks: Sequence[Hook] = ()) -> None:
    """Write ``checkpoint.pth`` through the task (rank 0) and remember it as the last good state.

    Args:
        task: the task (its file format).
        state: the state to save.
        data: the task's data.
        run: the run.
        epoch: epochs completed (the epoch in progress for a mid-epoch save).
        hooks: the run's hooks (``after_checkpoint``).
    """
    path = run.out / "checkpoint.pth"
    if state.bad_in_a_row:
        # The weights behind non-finite losses must not replace the last state that trained.
        logger.warning("not writing %s at iteration %d: the last %d losses were not finite", path, state.iteration, state.bad_in_a_row)
        return
    if run.is_main:
        task.save_checkpoint(state, data, run, path, epoch=epoch)
    state.unproven = (path, state.iteration)
    call_hooks(hooks, "after_checkpoint", state, data, run, path)


def _last_good(state: TrainState) -> str:
    if state.unproven is not None:
        path, iteration = state.unproven
        return (f"the newest checkpoint, {path} (iteration {iteration}), was written just before the losses stopped being "
                "finite, so its weights may be the diverged ones: resume from it with a much lower --lr, or start afresh")
    if state.last_good is None:
        return "no checkpoint was written before the losses diverged: start afresh with a lower --lr"
    path, iteration = state.last_good
    return f"the last good checkpoint is {path} (iteration {iteration}): resume from it with --resume {path} and a lower --lr"


def train_epochs(task: Task, state: TrainState, data: TrainData, run: Run, metrics: MetricsLog, hooks: Sequence[Hook] = ()) -> None:
    """The epoch loop: train each epoch, checkpoint at its end, evaluate when due (the last evaluation is ``finish``'s).

    Args:
        task: the task.
        state: the training state (resumed or fresh).
        data: the task's data.
        run: the run.
        metrics: where records go.
        hooks: the run's hooks.
    """
    bar = tqdm(total=data.stop_at, initial=state.iteration, desc="train", disable=not run.progress or not run.is_main, dynamic_ncols=True)
    state.train_model.train()
    for epoch in range(state.iteration // data.iters_per_epoch, run.cfg["epochs"]):
        if state.iteration >= data.stop_at:
            break
        train_one_epoch(task, state, data, epoch, run, metrics, bar, hooks)
        epoch_done = state.iteration == (epoch + 1) * data.iters_per_epoch
        save_checkpoint(task, state, data, run, epoch=epoch + 1 if epoch_done else epoch, hooks=hooks)
        if eval_due(run.cfg, state.iteration, data.iters_per_epoch, data.stop_at):
            evaluate_run(task, state, data, run, metrics, hooks)
    bar.close()