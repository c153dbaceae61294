"""The metrics log: ``metrics.jsonl``, ``batches.jsonl``, TensorBoard scalars, the loss window and its log lines."""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .. import distributed as dist_utils
from ..files import atomic_write_text
from .setup import Run

__all__ = ["RECORD_FILES", "MetricsLog", "Window", "record_step", "restart_records"]

logger = logging.getLogger(__name__)

RECORD_FILES = ("metrics.jsonl", "batches.jsonl")


def restart_records(path: Path, resumed_at: int | None) -> None:
    """Make a run's ``*.jsonl`` file hold only this run's history before it appends.

    A fresh run in a used folder must not inherit an earlier run's records (its curves
    would mix both), and a resumed run redoes the iterations after its checkpoint, so
    records past it (written before the interruption) would appear twice.

    Args:
        path: the file (absent: nothing to do).
        resumed_at: the checkpoint's iteration, or ``None`` for a fresh run (file removed).
    """
    if not path.is_file():
        return
    if resumed_at is None:
        path.unlink()
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
        if int(record.get("iter", 0)) <= resumed_at:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line), log lines and TensorBoard scalars, on rank 0.

    Args:
        run: the run (only rank 0 writes).
        resumed_at: the iteration a resumed run starts from (records past it are dropped),
            or ``None`` for a fresh run (an earlier run's ``metrics.jsonl`` and
            ``batches.jsonl`` in the folder are removed).
    """

    def __init__(self, run: Run, *, resumed_at: int | None = None) -> None:
        self.path = run.out / "metrics.jsonl"
        self.enabled = run.is_main
        self.writer = None
        if self.enabled:
            for name in RECORD_FILES:
                restart_records(run.out / name, resumed_at)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.writer = SummaryWriter(str(run.out / "tensorboard"))

    def write(self, record: dict[str, Any], *, prefix: str = "") -> None:
        """Append ``record`` (which has ``iter``) with a ``wall_time`` stamp, and mirror its numbers to TensorBoard."""
        if not self.enabled:
            return
        # Unix time of the record, so runs can be compared on a clock (e.g. at equal training time).
        record = {**record, "wall_time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("iter", "wall_time"):
                    self.writer.add_scalar(f"{prefix}{k}", v, record["iter"])

    def evaluated_at(self, iteration: int) -> bool:
        """Whether the file holds an evaluation record at ``iteration``; rank 0's answer on every rank.

        Args:
            iteration: the iteration the evaluation followed.
        """
        found = None
        if self.enabled:
            found = False
            if self.path.is_file():
                for line in self.path.read_text().splitlines():
                    record = json.loads(line)
                    # Training records always carry the learning rate; evaluation records never do.
                    found = found or (record.get("iter") == iteration and "lr" not in record)
        return bool(dist_utils.broadcast_object(found))

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


class Window:
    """Loss averages and timings over the iterations since the last log line."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)
        self.start = time.perf_counter()
        self.data_time = 0.0

    def add(self, loss: float, terms: dict[str, float]) -> None:
        """Add one step's total loss and its terms."""
        self.values["loss"].append(loss)
        for k, v in terms.items():
            self.values[k].append(v)

    def record(self, iteration: int, epoch: int, lr: float, stop_at: int, images_per_iter: int) -> dict[str, Any]:
        """The ``metrics.jsonl`` record of the window: mean losses, time per iteration, images/s, ETA."""
        elapsed = time.perf_counter() - self.start
        n = max(len(self.values["loss"]), 1)
        record: dict[str, Any] = {"iter": iteration, "epoch": epoch, "lr": lr}
        record.update({k: float(np.mean(v)) for k, v in self.values.items() if v})
        record.update({
            "seconds_per_iter": elapsed / n, "data_seconds_per_iter": self.data_time / n,
            "images_per_s": n * images_per_iter / max(elapsed, 1e-9), "eta_s": (stop_at - iteration) * elapsed / n,
        })
        return record


def record_step(
    terms: dict[str, float] | None,
    window: Window,
    bar: tqdm | None,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    epoch: int,
    stop_at: int,
    run: Run,
    metrics: MetricsLog,
) -> Window:
    """Account for one training step: the loss window, the progress bar, and every
    ``log_period`` iterations a ``metrics.jsonl`` record and a log line.

    Args:
        terms: the step's loss terms (with ``loss``), or ``None`` for a skipped step.
        window: the losses and timings since the last record.
        bar: a progress bar to advance, or ``None``.
        optimizer: for the learning rate.
        iteration: iterations done, this step included.
        epoch: the step's epoch.
        stop_at: the iteration the run stops at.
        run: the run (config, world size, rank).
        metrics: where records go.

    Returns:
        The window to add the next steps to (a new one after a record).
    """
    lr = optimizer.param_groups[0]["lr"]
    if terms is not None:
        window.add(terms.pop("loss"), terms)
    if bar is not None:
        bar.update(1)
        if terms is not None:
            bar.set_postfix(loss=f"{window.values['loss'][-1]:.3f}", lr=f"{lr:.2e}")
    if iteration % run.cfg["log_period"] and iteration != stop_at:
        return window
    record = window.record(iteration, epoch, lr, stop_at, run.cfg["batch_size"] * run.world)
    metrics.write(record, prefix="train/")
    if run.is_main:
        logger.info("iter %d/%d epoch %d %s", iteration, stop_at, epoch, " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
    return Window()
