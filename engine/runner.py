"""The one training runner: set-up, data loading, state, the epoch loop, resume, evaluation, finish.

Every task (detection, classification, semantic segmentation) trains through ``train``
here; a task is a :class:`Task` that says how to build its data and model, how a batch
reaches the device, how its checkpoints are written and read, and how it is evaluated
and drawn. The loop, iteration-exact resume, the guard against non-finite losses, the
schedule, AMP, DDP, ``metrics.jsonl`` and the order of the last steps (the trained model
on disk before the final evaluation) exist once, here.

Modelled on torchvision's ``references/*/train.py`` + ``engine.py`` and detectron2's
``DefaultTrainer`` hooks, kept to plain functions and one small class to override.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import distributed as dist_utils
from .config import resolve_device, save_config
from .files import atomic_write_text
from .logs import log_to_file

__all__ = [
    "RECORD_FILES",
    "MetricsLog",
    "NonFiniteLossError",
    "Run",
    "Task",
    "TrainData",
    "TrainState",
    "Window",
    "EpochBatches",
    "build_amp",
    "build_optimizer",
    "build_scheduler",
    "build_state",
    "eval_due",
    "evaluate_run",
    "finish",
    "guarded_step",
    "plan_iterations",
    "preflight",
    "record_step",
    "restart_records",
    "save_checkpoint",
    "seed_worker",
    "setup_run",
    "train",
    "train_one_epoch",
    "wrap_for_training",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced non-finite losses too many times in a row."""


# ---------------------------------------------------------------------------------------------
# Set-up


@dataclass
class Run:
    """One process's view of a run: its config, device, rank and output folder."""

    cfg: dict[str, Any]
    device: torch.device
    rank: int
    world: int
    out: Path
    progress: bool = True
    requested_device: str = "auto"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_run(cfg: dict[str, Any], *, progress: bool = True) -> Run:
    """Join the process group, pick the device, seed, create the output folder, save ``config.yaml``.

    Args:
        cfg: a validated config; ``device: auto`` is resolved here and recorded.
        progress: show progress bars (rank 0).
    """
    cfg = dict(cfg)
    requested = cfg["device"]
    cfg["device"] = resolve_device(requested)
    device = dist_utils.init_distributed(cfg["device"])
    rank, world = dist_utils.rank(), dist_utils.world_size()
    _seed_everything(int(cfg["seed"]) + rank)
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(cfg["output_dir"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    dist_utils.barrier()
    return Run(cfg=cfg, device=device, rank=rank, world=world, out=out, progress=progress, requested_device=requested)


# ---------------------------------------------------------------------------------------------
# Data


class EpochBatches:
    """The batches of one epoch, minus the ones a resumed run already did.

    Args:
        batch_sampler: yields lists of sample indices.
        skip: batches already trained in this epoch.
        limit: batches in an epoch (equal on every rank).
    """

    def __init__(self, batch_sampler: Any, skip: int, limit: int) -> None:
        self.batch_sampler, self.skip, self.limit = batch_sampler, skip, limit

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.limit:
                break
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(self.limit - self.skip, 0)


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's generators in a loader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def plan_iterations(batch_sampler: Any, cfg: dict[str, Any]) -> tuple[int, int, int]:
    """``(iters_per_epoch, total_iters, stop_at)`` for a run, equal on every rank.

    Args:
        batch_sampler: this rank's batches of one epoch.
        cfg: config with ``epochs`` and ``max_iters`` (``None``: the whole schedule).
    """
    # Ranks must agree on the iteration count or DDP would wait forever at the end of an epoch.
    iters_per_epoch = dist_utils.all_reduce_min(len(batch_sampler))
    total_iters = iters_per_epoch * cfg["epochs"]
    stop_at = min(total_iters, cfg["max_iters"]) if cfg["max_iters"] else total_iters
    return iters_per_epoch, total_iters, stop_at


@dataclass
class TrainData:
    """A task's data sets, sampling and iteration plan; tasks subclass it to add their own fields.

    Attributes:
        root: the data folder.
        train_set: the training set (``num_skipped`` / ``reset_skipped`` when it skips bad files).
        val_set: the validation set.
        sampler: the distributed sampler under the batches.
        batch_sampler: yields this rank's batches of one epoch.
        iters_per_epoch: batches per epoch (equal on every rank).
        total_iters: iterations of the whole schedule (``epochs`` x ``iters_per_epoch``).
        stop_at: where this run stops (``max_iters`` cuts the schedule short).
        collate_fn: how samples become a batch (``None``: PyTorch's default).
    """

    root: Path
    train_set: Any
    val_set: Any
    sampler: DistributedSampler
    batch_sampler: Any
    iters_per_epoch: int
    total_iters: int
    stop_at: int
    collate_fn: Callable[[list[Any]], Any] | None = None

    def epoch_of(self, iteration: int) -> int:
        """The 0-based epoch that iteration number ``iteration`` (1-based) belongs to."""
        return max(iteration - 1, 0) // self.iters_per_epoch

    def batches(self, epoch: int, skip: int) -> EpochBatches:
        """``epoch``'s batches of sample indices after its first ``skip`` (a function of the seed and epoch)."""
        self.sampler.set_epoch(epoch)
        return EpochBatches(self.batch_sampler, skip, self.iters_per_epoch)

    def loader(self, epoch: int, skip: int, *, seed: int, rank: int, workers: int, pin_memory: bool) -> DataLoader:
        """The loader for ``epoch``, starting after its first ``skip`` batches (for resume).

        Args:
            epoch: the epoch (reseeds the sampler's shuffle).
            skip: batches of this epoch already trained.
            seed: the run's seed (worker augmentation seeds derive from it).
            rank: this process's rank.
            workers: loader processes.
            pin_memory: pin host memory (CUDA).
        """
        generator = torch.Generator().manual_seed(seed * 1000 + epoch * 10 + rank)
        return DataLoader(
            self.train_set, batch_sampler=self.batches(epoch, skip), num_workers=workers, collate_fn=self.collate_fn,
            pin_memory=pin_memory, worker_init_fn=seed_worker, generator=generator, persistent_workers=False,
        )


# ---------------------------------------------------------------------------------------------
# State: model, DDP, optimizer, scheduler, scaler


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def _param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None, bias_weight_decay: float | None) -> list[dict[str, Any]]:
    """Trainable parameters split by weight decay, as torchvision's ``set_weight_decay`` does."""
    decays: dict[float, list[nn.Parameter]] = defaultdict(list)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            wd = weight_decay
            if norm_weight_decay is not None and isinstance(module, _NORM_TYPES):
                wd = norm_weight_decay
            elif bias_weight_decay is not None and name == "bias":
                wd = bias_weight_decay
            decays[wd].append(p)
    return [{"params": params, "weight_decay": wd} for wd, params in decays.items()]


def build_optimizer(model: nn.Module, cfg: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters.

    Args:
        model: the model.
        cfg: config with ``optimizer``, ``momentum``, ``weight_decay``; optionally
            ``norm_weight_decay`` / ``bias_weight_decay`` (``None`` or absent: ``weight_decay``),
            the decay of normalisation-layer parameters and of biases (0 in modern recipes).
        lr: the already batch-scaled learning rate.
    """
    norm_wd, bias_wd = cfg.get("norm_weight_decay"), cfg.get("bias_weight_decay")
    if norm_wd is None and bias_wd is None:
        params: Any = [p for p in model.parameters() if p.requires_grad]
    else:
        params = _param_groups(model, float(cfg["weight_decay"]), norm_wd, bias_wd)
    if cfg["optimizer"] == "sgd":
        cls: Any = torch.optim.SGD
        kwargs: dict[str, Any] = {"momentum": cfg["momentum"], "weight_decay": cfg["weight_decay"]}
    else:
        cls, kwargs = torch.optim.AdamW, {"weight_decay": cfg["weight_decay"]}
    # The fused kernels update every tensor in one pass (13% of a CPU shapes step here);
    # builds or devices without them fall back to the default implementation.
    try:
        return cls(params, lr=lr, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return cls(params, lr=lr, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: dict[str, Any], iters_per_epoch: int, total_iters: int, *, warmup_iters: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then multi-step (``lr_steps`` in epochs), cosine or poly decay; stepped per iteration.

    Poly is torchvision's segmentation schedule: the rate falls as ``(1 - t / T) ** 0.9``
    over the ``T`` iterations of the whole schedule, reaching 0 at the end.

    Args:
        optimizer: the optimizer.
        cfg: config with ``scheduler``, ``lr_steps``, ``lr_gamma``, ``warmup_factor`` (and
            ``warmup_iters`` unless given).
        iters_per_epoch: iterations in one epoch.
        total_iters: planned iterations of the whole schedule.
        warmup_iters: warm-up length in iterations (default ``cfg["warmup_iters"]``).
    """
    warmup = min(int(cfg["warmup_iters"] if warmup_iters is None else warmup_iters), total_iters)
    factor = float(cfg["warmup_factor"])
    milestones = [int(round(e * iters_per_epoch)) for e in cfg["lr_steps"]]
    gamma = float(cfg["lr_gamma"])
    cosine = cfg["scheduler"] == "cosine"
    poly = cfg["scheduler"] == "poly"

    def lr_at(it: int) -> float:
        scale = 1.0
        if it < warmup:
            alpha = it / warmup
            scale = factor * (1 - alpha) + alpha
        if cosine:
            return scale * 0.5 * (1 + math.cos(math.pi * min(it, total_iters) / max(total_iters, 1)))
        if poly:
            return scale * (1 - min(it, total_iters) / max(total_iters, 1)) ** 0.9
        return scale * gamma ** sum(it >= m for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def build_amp(cfg: dict[str, Any], device: torch.device) -> tuple[torch.dtype, torch.amp.GradScaler]:
    """The autocast dtype and the gradient scaler for ``cfg["amp"]`` / ``cfg["amp_dtype"]`` on ``device``.

    Args:
        cfg: config with ``amp`` and ``amp_dtype`` (``None``: float16 on CUDA, bfloat16 on CPU).
        device: the training device.
    """
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg["amp_dtype"] or "")
    if amp_dtype is None:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    # fp16 needs loss scaling against underflow; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler("cuda", enabled=bool(cfg["amp"]) and device.type == "cuda" and amp_dtype == torch.float16)
    return amp_dtype, scaler


def wrap_for_training(model: nn.Module, loss_model: nn.Module, cfg: dict[str, Any], run: Run) -> nn.Module:
    """Move ``model`` to the device (channels-last if asked) and wrap ``loss_model`` for DDP under torchrun.

    Args:
        model: the task's model (``loss_model`` holds it).
        loss_model: what a step calls as ``loss_model(inputs, targets) -> {name: loss}``.
        cfg: config with ``channels_last`` and ``sync_bn``.
        run: the run (device, world size).
    """
    model.to(run.device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    loss_model.to(run.device)
    if run.world > 1:
        if run.device.type == "cuda" and cfg["sync_bn"]:
            loss_model = nn.SyncBatchNorm.convert_sync_batchnorm(loss_model)
        loss_model = nn.parallel.DistributedDataParallel(loss_model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return loss_model


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


# ---------------------------------------------------------------------------------------------
# The task interface


class Task:
    """What a task tells the runner. Subclass it and override the methods that raise.

    The runner calls, in order: ``build_data``, ``build_model`` (and ``build_ema``), then
    per batch ``prepare_batch`` and ``after_step``; ``save_checkpoint`` every
    ``checkpoint_period`` and at each epoch's end; ``evaluate`` on the evaluation schedule;
    at the end ``save_final``, ``evaluate`` and ``draw``.
    """

    #: The checkpoint file a resume reads, for messages (e.g. ``"tools/train_det.py"``).
    tool: str = "the training tool"

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

    def warmup_iters(self, cfg: dict[str, Any], data: TrainData) -> int:
        """Warm-up length in iterations (default ``cfg["warmup_iters"]``)."""
        return int(cfg["warmup_iters"])

    def prepare_batch(self, batch: Any, run: Run) -> tuple[Any, Any]:
        """``(inputs, targets)`` of a loader batch, on ``run.device``."""
        raise NotImplementedError

    def batch_ids(self, targets: Any) -> dict[str, Any]:
        """Extra ids of a batch for ``batches.jsonl`` (``log_batches``), e.g. image ids; default none."""
        return {}

    def after_step(self, state: TrainState, cfg: dict[str, Any], epoch: int) -> None:
        """Called after every optimisation step (e.g. an EMA update); default nothing."""

    def save_checkpoint(self, state: TrainState, data: TrainData, run: Run, path: Path, *, epoch: int) -> None:
        """Write the training state to ``path`` atomically (rank 0 only calls it)."""
        raise NotImplementedError

    def read_checkpoint(self, path: Path) -> dict[str, Any]:
        """Read a training state written by ``save_checkpoint``; raise the project's error for anything else."""
        raise NotImplementedError

    def evaluate(self, state: TrainState, data: TrainData, run: Run) -> dict[str, float]:
        """Evaluate ``state.model`` on the validation set (every rank calls it); log the result on rank 0."""
        raise NotImplementedError

    def save_final(self, state: TrainState, data: TrainData, run: Run) -> None:
        """Write the trained model (``model_final.pth``) on rank 0, before the final evaluation."""
        raise NotImplementedError

    def draw(self, state: TrainState, data: TrainData, run: Run, metrics: "MetricsLog", final: dict[str, float]) -> None:
        """Rank 0, at the end: curves, example pictures, ``metrics.json``; default nothing."""

    def describe(self, state: TrainState, data: TrainData, run: Run) -> str:
        """The log line that opens training (what, on what data, the iteration plan)."""
        return (f"training on {data.root}: {len(data.train_set)} images, {data.iters_per_epoch} iterations/epoch, "
                f"{data.stop_at} planned, batch {run.cfg['batch_size']} x {run.world}, lr {state.lr:.4g}")

    def format_metrics(self, metrics: dict[str, float]) -> str:
        """One line of the metrics for the final log line."""
        return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())


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
    scheduler = build_scheduler(optimizer, cfg, data.iters_per_epoch, data.total_iters, warmup_iters=task.warmup_iters(cfg, data))
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


def resume_path(cfg: dict[str, Any], resume: str | Path | bool) -> Path:
    """The checkpoint a resume reads: ``output_dir/checkpoint.pth`` for ``True``, else the path given."""
    return Path(cfg["output_dir"]) / "checkpoint.pth" if resume is True else Path(resume)


# ---------------------------------------------------------------------------------------------
# Records: metrics.jsonl, batches.jsonl, log lines


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


# ---------------------------------------------------------------------------------------------
# One step, one epoch


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


def train_one_epoch(task: Task, state: TrainState, data: TrainData, epoch: int, run: Run, metrics: MetricsLog, bar: tqdm | None = None) -> None:
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
        task.after_step(state, cfg, epoch)
        window = record_step(terms, window, bar, state.optimizer, state.iteration, epoch, data.stop_at, run, metrics)
        if state.iteration % cfg["checkpoint_period"] == 0:
            save_checkpoint(task, state, data, run, epoch=epoch)
        if state.iteration >= data.stop_at:
            break
        t_data = time.perf_counter()
    skipped = getattr(data.train_set, "num_skipped", 0)
    if skipped and run.is_main:
        logger.warning("epoch %d: %d samples fell back to another image because theirs was unreadable (each file is named above)", epoch, skipped)
    if skipped:
        data.train_set.reset_skipped()


# ---------------------------------------------------------------------------------------------
# Evaluation and finish


def evaluate_run(task: Task, state: TrainState, data: TrainData, run: Run, metrics: MetricsLog) -> dict[str, float]:
    """Evaluate through the task, record the metrics (rank 0) and return to training mode.

    Args:
        task: the task.
        state: the training state.
        data: the task's data.
        run: the run.
        metrics: where the record goes.
    """
    result = task.evaluate(state, data, run)
    state.model.train()
    if run.is_main:
        metrics.write({"iter": state.iteration, "epoch": data.epoch_of(state.iteration), **result})
    return result


def finish(task: Task, state: TrainState, data: TrainData, run: Run, metrics: MetricsLog) -> dict[str, float]:
    """Write the trained model first, then evaluate, then draw (curves, pictures).

    Args:
        task: the task.
        state: the trained state.
        data: the task's data.
        run: the run.
        metrics: where records go.

    Returns:
        The final metrics.
    """
    if run.is_main:
        task.save_final(state, data, run)
    dist_utils.barrier()
    final = evaluate_run(task, state, data, run, metrics)
    if run.is_main:
        task.draw(state, data, run, metrics, final)
    return final


def train(task: Task, cfg: dict[str, Any], *, resume: str | Path | bool | None = None, progress: bool = True) -> dict[str, Any]:
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
            evaluate_run(task, state, data, run, metrics)
        try:
            train_epochs(task, state, data, run, metrics)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e}; {_last_good(state)}") from None
        final = finish(task, state, data, run, metrics)
        metrics.close()
        if run.is_main:
            logger.info("done: %d iterations in %.1f s; %s", state.iteration, time.perf_counter() - t_start, task.format_metrics(final))
    dist_utils.barrier()
    return {"iteration": state.iteration, "metrics": final, "seconds": time.perf_counter() - t_start, "data": data}


def save_checkpoint(task: Task, state: TrainState, data: TrainData, run: Run, *, epoch: int) -> None:
    """Write ``checkpoint.pth`` through the task (rank 0) and remember it as the last good state.

    Args:
        task: the task (its file format).
        state: the state to save.
        data: the task's data.
        run: the run.
        epoch: epochs completed (the epoch in progress for a mid-epoch save).
    """
    path = run.out / "checkpoint.pth"
    if state.bad_in_a_row:
        # The weights behind non-finite losses must not replace the last state that trained.
        logger.warning("not writing %s at iteration %d: the last %d losses were not finite", path, state.iteration, state.bad_in_a_row)
        return
    if run.is_main:
        task.save_checkpoint(state, data, run, path, epoch=epoch)
    state.unproven = (path, state.iteration)


def _last_good(state: TrainState) -> str:
    if state.unproven is not None:
        path, iteration = state.unproven
        return (f"the newest checkpoint, {path} (iteration {iteration}), was written just before the losses stopped being "
                "finite, so its weights may be the diverged ones: resume from it with a much lower --lr, or start afresh")
    if state.last_good is None:
        return "no checkpoint was written before the losses diverged: start afresh with a lower --lr"
    path, iteration = state.last_good
    return f"the last good checkpoint is {path} (iteration {iteration}): resume from it with --resume {path} and a lower --lr"


def train_epochs(task: Task, state: TrainState, data: TrainData, run: Run, metrics: MetricsLog) -> None:
    """The epoch loop: train each epoch, checkpoint at its end, evaluate when due (the last evaluation is ``finish``'s).

    Args:
        task: the task.
        state: the training state (resumed or fresh).
        data: the task's data.
        run: the run.
        metrics: where records go.
    """
    bar = tqdm(total=data.stop_at, initial=state.iteration, desc="train", disable=not run.progress or not run.is_main, dynamic_ncols=True)
    state.train_model.train()
    for epoch in range(state.iteration // data.iters_per_epoch, run.cfg["epochs"]):
        if state.iteration >= data.stop_at:
            break
        train_one_epoch(task, state, data, epoch, run, metrics, bar)
        epoch_done = state.iteration == (epoch + 1) * data.iters_per_epoch
        save_checkpoint(task, state, data, run, epoch=epoch + 1 if epoch_done else epoch)
        if eval_due(run.cfg, state.iteration, data.iters_per_epoch, data.stop_at):
            evaluate_run(task, state, data, run, metrics)
    bar.close()
