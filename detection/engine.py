"""Detector training in named steps: set-up, data, state, one epoch, evaluation, finish.

Modelled on torchvision's ``references/detection`` (train.py + engine.py), with what
long runs need on top: iteration-exact resume, a guard against non-finite losses that
names the bad term, checkpoints that survive a kill, the trained model written before
the final evaluation, and curves at the end. ``train`` reads as the table of contents;
each step is a function of its own, tested on its own.
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
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import distributed as dist_utils
from backbones.weights import imagenet_file, normalize_state_dict

from .checkpoint import CheckpointError, atomic_write_text, read_checkpoint, read_training_state, save_detector, save_training_state
from .config import resolve_device, save_config
from .data import CocoDetection, GroupedBatchSampler, build_transforms, collate_fn, create_aspect_ratio_groups
from .data.roots import find_splits, prepare_data_root
from .evaluation import evaluate, format_metrics, format_per_category
from .logs import log_to_file
from .models import BACKBONES, build_detector, count_parameters
from .visualize import draw_detections, plot_curves, save_image

__all__ = [
    "EvaluationError",
    "MetricsLog",
    "NonFiniteLossError",
    "Run",
    "TrainData",
    "TrainState",
    "build_amp",
    "build_data",
    "build_optimizer",
    "build_scheduler",
    "build_state",
    "evaluate_run",
    "finish",
    "preflight",
    "setup_run",
    "train",
    "train_one_epoch",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced non-finite losses too many times in a row."""


class EvaluationError(RuntimeError):
    """An evaluation failed; the message says where the trained model is and what to fix."""


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


def preflight(cfg: dict[str, Any], *, resume: str | Path | bool | None = None) -> dict[str, Any]:
    """Check what a run will read, before it starts: device, data folder and splits, weights, resume file.

    Args:
        cfg: a validated config.
        resume: as for ``train``.

    Returns:
        The config with the data splits found (``train_split`` / ``val_split``).

    Raises:
        ConfigError: the device is not available.
        DataPathError: the data folder or a split is missing or ambiguous.
        WeightsError: the backbone weights or the resume checkpoint cannot be used.
    """
    cfg = dict(cfg)
    resolve_device(cfg["device"])
    if cfg["data_path"] is not None:
        cfg["train_split"], cfg["val_split"] = find_splits(cfg["data_path"], cfg["train_split"], cfg["val_split"])
    weights = cfg["weights_backbone"]
    if weights == "imagenet":
        imagenet_file(BACKBONES[cfg["backbone"]])
    elif weights is not None:
        normalize_state_dict(read_checkpoint(weights))
    if resume:
        path = Path(cfg["output_dir"]) / "checkpoint.pth" if resume is True else Path(resume)
        if not path.is_file():
            raise CheckpointError(f"nothing to resume: no checkpoint at {path}")
        read_training_state(path)
    return cfg


# ---------------------------------------------------------------------------------------------
# Data


class _EpochBatches:
    """The batches of one epoch, minus the ones a resumed run already did."""

    def __init__(self, batch_sampler: GroupedBatchSampler, skip: int, limit: int) -> None:
        self.batch_sampler, self.skip, self.limit = batch_sampler, skip, limit

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.limit:
                break
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(self.limit - self.skip, 0)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class TrainData:
    """Data sets, sampling and the iteration plan of a run.

    Attributes:
        iters_per_epoch: batches per epoch (equal on every rank).
        total_iters: iterations of the whole schedule (``epochs`` x ``iters_per_epoch``).
        stop_at: where this run stops (``max_iters`` cuts the schedule short).
        model_min_size: what the model's own resize uses (see ``build_data``).
    """

    root: Path
    train_set: CocoDetection
    val_set: CocoDetection
    sampler: DistributedSampler
    batch_sampler: GroupedBatchSampler
    iters_per_epoch: int
    total_iters: int
    stop_at: int
    model_min_size: Any

    @property
    def category_mapping(self) -> dict[str, list[Any]]:
        """The training set's ``{"cat_ids", "names"}``, saved with every checkpoint."""
        return self.train_set.category_mapping()

    def epoch_of(self, iteration: int) -> int:
        """The 0-based epoch that iteration number ``iteration`` (1-based) belongs to."""
        return max(iteration - 1, 0) // self.iters_per_epoch

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
        self.sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(seed * 1000 + epoch * 10 + rank)
        return DataLoader(
            self.train_set, batch_sampler=_EpochBatches(self.batch_sampler, skip, self.iters_per_epoch),
            num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory, worker_init_fn=_worker_init,
            generator=generator, persistent_workers=False,
        )


def build_data(cfg: dict[str, Any], run: Run) -> TrainData:
    """Read (or generate) the data sets and plan the iterations.

    Args:
        cfg: the run's config.
        run: from ``setup_run``.
    """
    root, train_split, val_split = prepare_data_root(cfg, is_main=run.is_main, barrier=dist_utils.barrier)
    masks = cfg["masks"] if cfg["masks"] is not None else cfg["model"] == "mask_rcnn"
    aug_min = cfg["aug_min_size"] or cfg["min_size"]
    transforms = build_transforms(cfg["augment"], train=True, min_size=aug_min, max_size=cfg["max_size"])
    # torchvision's model transform resizes every image again; for multi-scale training it must
    # sample the same sizes (it evaluates at the last one).
    model_min_size = aug_min if cfg["augment"] == "multiscale" else cfg["min_size"]
    train_set = CocoDetection(root, train_split, transforms=transforms, masks=masks, drop_empty=True)
    val_set = CocoDetection(root, val_split, masks=False)
    if len(train_set) == 0:
        raise ValueError(f"no training images with usable objects in {root}/{train_split}")
    sampler = DistributedSampler(train_set, num_replicas=run.world, rank=run.rank, shuffle=True, seed=int(cfg["seed"]))
    batch_sampler = GroupedBatchSampler(sampler, create_aspect_ratio_groups(train_set.aspect_ratios(), k=3), cfg["batch_size"])
    # Ranks must agree on the iteration count or DDP would wait forever at the end of an epoch.
    iters_per_epoch = dist_utils.all_reduce_min(len(batch_sampler))
    total_iters = iters_per_epoch * cfg["epochs"]
    stop_at = min(total_iters, cfg["max_iters"]) if cfg["max_iters"] else total_iters
    return TrainData(root, train_set, val_set, sampler, batch_sampler, iters_per_epoch, total_iters, stop_at, model_min_size)


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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict[str, Any], iters_per_epoch: int, total_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then multi-step (``lr_steps`` in epochs) or cosine decay; stepped per iteration.

    Args:
        optimizer: the optimizer.
        cfg: config with ``scheduler``, ``lr_steps``, ``lr_gamma``, ``warmup_iters``, ``warmup_factor``.
        iters_per_epoch: iterations in one epoch.
        total_iters: planned iterations of the whole schedule.
    """
    warmup = min(int(cfg["warmup_iters"]), total_iters)
    factor = float(cfg["warmup_factor"])
    milestones = [int(round(e * iters_per_epoch)) for e in cfg["lr_steps"]]
    gamma = float(cfg["lr_gamma"])
    cosine = cfg["scheduler"] == "cosine"

    def lr_at(it: int) -> float:
        scale = 1.0
        if it < warmup:
            alpha = it / warmup
            scale = factor * (1 - alpha) + alpha
        if cosine:
            return scale * 0.5 * (1 + math.cos(math.pi * min(it, total_iters) / max(total_iters, 1)))
        return scale * gamma ** sum(it >= m for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


@dataclass
class TrainState:
    """Everything that changes as training runs, with its own save and load for resume.

    Attributes:
        model: the detector (unwrapped).
        train_model: what the loop calls: ``model``, or its DDP wrapper.
        amp_dtype: the autocast dtype when ``amp`` is on.
        iteration: iterations completed.
    """

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: bool
    amp_dtype: torch.dtype
    lr: float
    iteration: int = 0

    def save(self, path: Path, *, epoch: int, cfg: dict[str, Any], category_mapping: dict[str, Any]) -> None:
        """Write ``checkpoint.pth`` (see ``detection.checkpoint.save_training_state``)."""
        save_training_state(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            epoch=epoch, iteration=self.iteration, config=cfg, category_mapping=category_mapping,
        )

    def load(self, ckpt: dict[str, Any]) -> None:
        """Restore from ``read_training_state``'s dict; continues at its iteration."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty when the run that saved it had no fp16 scaler (CPU, bf16, no --amp)
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])


def build_state(cfg: dict[str, Any], run: Run, data: TrainData) -> TrainState:
    """Build the model (on the device, DDP-wrapped under torchrun), optimizer, scheduler and scaler.

    Args:
        cfg: the run's config.
        run: from ``setup_run``.
        data: from ``build_data`` (class count, iteration plan).
    """
    model = build_detector(
        cfg["model"], backbone=cfg["backbone"], num_classes=data.train_set.num_classes,
        weights_backbone=cfg["weights_backbone"], trainable_layers=cfg["trainable_layers"],
        returned_layers=cfg["returned_layers"], min_size=data.model_min_size, max_size=cfg["max_size"],
        norm=cfg["norm"], **cfg["model_kwargs"],
    )
    total, trainable = count_parameters(model)
    if run.is_main:
        logger.info("%s/%s: %s parameters, %s trainable", cfg["model"], cfg["backbone"], f"{total:,}", f"{trainable:,}")
    model.to(run.device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    train_model: nn.Module = model
    if run.world > 1:
        if run.device.type == "cuda" and cfg["sync_bn"]:
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    lr = cfg["lr"] * cfg["batch_size"] * run.world / cfg["lr_reference_batch"]
    optimizer = build_optimizer(model, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, data.iters_per_epoch, data.total_iters)
    amp_dtype, scaler = build_amp(cfg, run.device)
    return TrainState(model, train_model, optimizer, scheduler, scaler, bool(cfg["amp"]), amp_dtype, lr)


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


# ---------------------------------------------------------------------------------------------
# Logging of metrics


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


class _Window:
    """Loss averages and timings over the iterations since the last log line."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)
        self.start = time.perf_counter()
        self.data_time = 0.0

    def add(self, loss: float, terms: dict[str, float]) -> None:
        self.values["loss"].append(loss)
        for k, v in terms.items():
            self.values[k].append(v)

    def record(self, iteration: int, epoch: int, lr: float, stop_at: int, images_per_iter: int) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start
        n = max(len(self.values["loss"]), 1)
        record: dict[str, Any] = {"iter": iteration, "epoch": epoch, "lr": lr}
        record.update({k: float(np.mean(v)) for k, v in self.values.items() if v})
        record.update({
            "seconds_per_iter": elapsed / n, "data_seconds_per_iter": self.data_time / n,
            "images_per_s": n * images_per_iter / max(elapsed, 1e-9), "eta_s": (stop_at - iteration) * elapsed / n,
        })
        return record


# ---------------------------------------------------------------------------------------------
# One epoch


def _step(state: TrainState, cfg: dict[str, Any], images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], bad_in_a_row: int) -> tuple[dict[str, float] | None, int]:
    """One optimisation step; ``(loss terms, bad_in_a_row)``, terms ``None`` when the step was skipped."""
    device_type = images[0].device.type
    with torch.autocast(device_type, dtype=state.amp_dtype, enabled=state.amp):
        loss_dict = state.train_model(images, targets)
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


def record_step(
    terms: dict[str, float] | None,
    window: _Window,
    bar: tqdm | None,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    epoch: int,
    stop_at: int,
    run: Run,
    metrics: MetricsLog,
) -> _Window:
    """Account for one training step (both trainers): the loss window, the progress bar, and
    every ``log_period`` iterations a ``metrics.jsonl`` record and a log line.

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
    return _Window()


def train_one_epoch(
    state: TrainState, data: TrainData, epoch: int, run: Run, metrics: MetricsLog, bar: tqdm | None = None
) -> None:
    """Train ``epoch`` from where ``state.iteration`` stands to its end or to ``data.stop_at``.

    Logs a window of averages every ``log_period`` iterations, writes ``checkpoint.pth``
    every ``checkpoint_period``, and with ``log_batches`` records every batch's image ids
    in ``batches.jsonl``.

    Args:
        state: model and optimiser state; ``state.iteration`` advances.
        data: from ``build_data``.
        epoch: the epoch to train.
        run: from ``setup_run``.
        metrics: where records go.
        bar: a progress bar to advance, or ``None``.
    """
    cfg = run.cfg
    pin = run.device.type == "cuda"
    skip = state.iteration - epoch * data.iters_per_epoch
    loader = data.loader(epoch, skip, seed=int(cfg["seed"]), rank=run.rank, workers=cfg["workers"], pin_memory=pin)
    window, bad_in_a_row = _Window(), 0
    t_data = time.perf_counter()
    for images, targets in loader:
        window.data_time += time.perf_counter() - t_data
        images = [img.to(run.device, non_blocking=pin) for img in images]
        targets = [{k: v.to(run.device, non_blocking=pin) for k, v in t.items()} for t in targets]
        if cfg["log_batches"] and run.is_main:
            with open(run.out / "batches.jsonl", "a") as f:
                f.write(json.dumps({"iter": state.iteration + 1, "epoch": epoch, "image_ids": [int(t["image_id"]) for t in targets]}) + "\n")
        terms, bad_in_a_row = _step(state, cfg, images, targets, bad_in_a_row)
        state.scheduler.step()
        state.iteration += 1
        window = record_step(terms, window, bar, state.optimizer, state.iteration, epoch, data.stop_at, run, metrics)
        if state.iteration % cfg["checkpoint_period"] == 0 and run.is_main:
            state.save(run.out / "checkpoint.pth", epoch=epoch, cfg=cfg, category_mapping=data.category_mapping)
        if state.iteration >= data.stop_at:
            break
        t_data = time.perf_counter()
    skipped = data.train_set.num_skipped
    if skipped and run.is_main:
        logger.warning("epoch %d: %d samples fell back to another image because theirs was unreadable (each file is named above)", epoch, skipped)
    data.train_set.reset_skipped()


# ---------------------------------------------------------------------------------------------
# Evaluation and finish


def evaluate_run(state: TrainState, data: TrainData, run: Run, metrics: MetricsLog) -> dict[str, Any]:
    """Evaluate on the validation split, log the summaries and record the metrics.

    Raises:
        EvaluationError: evaluation failed; the message names the saved model and the cause.
    """
    try:
        result = evaluate(state.model, data.val_set, label_to_cat_id=data.train_set.label_to_cat_id, device=run.device,
                          output_dir=run.out if run.is_main else None, progress=run.progress)
    except Exception as e:  # noqa: BLE001  (whatever failed, the user needs the model's path and the cause)
        saved = run.out / "model_final.pth" if (run.out / "model_final.pth").is_file() else run.out / "checkpoint.pth"
        raise EvaluationError(
            f"evaluation on {data.val_set.ann_file} failed ({type(e).__name__}: {e}); the trained model is saved in {saved}; "
            f"fix the validation data and run: python tools/eval_coco.py --checkpoint {saved}"
        ) from e
    state.model.train()
    if run.is_main:
        metrics.write({"iter": state.iteration, "epoch": data.epoch_of(state.iteration), **result["metrics"]})
        for iou_type, text in result["summaries"].items():
            logger.info("evaluation at iteration %d (%s):\n%s\n%s", state.iteration, iou_type, text,
                        format_per_category(result["per_category"][iou_type], iou_type))
    return result["metrics"]


@torch.no_grad()
def _draw_examples(model: nn.Module, dataset: CocoDetection, class_names: list[str], device: torch.device, out_dir: Path, count: int) -> None:
    model.eval()
    for i in range(min(count, len(dataset))):
        image, target = dataset[i]
        det = model([image.to(device)])[0]
        save_image(draw_detections(image, det, class_names), out_dir / f"{int(target['image_id'])}.png")


def finish(state: TrainState, data: TrainData, run: Run, metrics: MetricsLog) -> dict[str, Any]:
    """Write ``model_final.pth`` first, then evaluate, plot curves and draw examples.

    Args:
        state: the trained state.
        data: from ``build_data``.
        run: from ``setup_run``.
        metrics: where records go.

    Returns:
        The final metrics.
    """
    if run.is_main:
        save_detector(state.model, run.out / "model_final.pth", category_mapping=data.category_mapping, config=run.cfg, iteration=state.iteration)
        logger.info("wrote %s", run.out / "model_final.pth")
    dist_utils.barrier()
    final = evaluate_run(state, data, run, metrics)
    if run.is_main:
        plot_curves(metrics.path, run.out / "curves.png")
        _draw_examples(state.model, data.val_set, data.train_set.class_names, run.device, run.out / "vis", run.cfg["num_vis"])
    return final


def train(cfg: dict[str, Any], *, resume: str | Path | bool | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a detector as ``cfg`` says; evaluate, checkpoint and draw along the way.

    Launched by ``torchrun`` it runs data-parallel (one process per device); alone it
    runs in one process. Rank 0 writes everything to ``cfg["output_dir"]``:
    ``config.yaml``, ``log.txt``, ``metrics.jsonl``, ``checkpoint.pth``,
    ``model_final.pth``, ``metrics.json``, ``curves.png`` and ``vis/*.png``.

    Args:
        cfg: a validated config (see ``detection.config``).
        resume: ``True`` to resume from ``output_dir/checkpoint.pth``, a path to resume
            from that checkpoint, or ``None``/``False`` to start fresh.
        progress: show tqdm bars.

    Returns:
        ``{"iteration": last iteration, "metrics": last evaluation's metrics,
        "seconds": wall time}``.
    """
    t_start = time.perf_counter()
    run = setup_run(cfg, progress=progress)
    with log_to_file(run.out / "log.txt"):
        if run.is_main and run.requested_device == "auto":
            logger.info("device: %s (auto: %s)", run.cfg["device"], "CUDA is available" if run.cfg["device"] == "cuda" else "no CUDA device")
        data = build_data(run.cfg, run)
        state = build_state(run.cfg, run, data)
        if resume:
            path = run.out / "checkpoint.pth" if resume is True else Path(resume)
            state.load(read_training_state(path))
            logger.info("resumed from %s at iteration %d", path, state.iteration)
        if run.is_main:
            logger.info("training %s/%s on %s: %d images, %d classes, %d iterations/epoch, %d planned, batch %d x %d, lr %.4g",
                        cfg["model"], cfg["backbone"], data.root, len(data.train_set), data.train_set.num_classes - 1,
                        data.iters_per_epoch, data.stop_at, cfg["batch_size"], run.world, state.lr)
        metrics = MetricsLog(run, resumed_at=state.iteration if resume else None)
        if resume and eval_due(cfg, state.iteration, data.iters_per_epoch, data.stop_at) and not metrics.evaluated_at(state.iteration):
            logger.info("the evaluation after iteration %d did not finish before the run stopped; running it now", state.iteration)
            evaluate_run(state, data, run, metrics)
        bar = tqdm(total=data.stop_at, initial=state.iteration, desc="train", disable=not progress or not run.is_main, dynamic_ncols=True)
        state.train_model.train()
        for epoch in range(state.iteration // data.iters_per_epoch, cfg["epochs"]):
            if state.iteration >= data.stop_at:
                break
            train_one_epoch(state, data, epoch, run, metrics, bar)
            epoch_done = state.iteration == (epoch + 1) * data.iters_per_epoch
            if run.is_main:
                state.save(run.out / "checkpoint.pth", epoch=epoch + 1 if epoch_done else epoch, cfg=run.cfg, category_mapping=data.category_mapping)
            # The last epoch is evaluated by finish(), after model_final.pth is safe on disk.
            if eval_due(cfg, state.iteration, data.iters_per_epoch, data.stop_at):
                evaluate_run(state, data, run, metrics)
        bar.close()
        final = finish(state, data, run, metrics)
        metrics.close()
        if run.is_main:
            logger.info("done: %d iterations in %.1f s; %s", state.iteration, time.perf_counter() - t_start, format_metrics(final))
    dist_utils.barrier()
    return {"iteration": state.iteration, "metrics": final, "seconds": time.perf_counter() - t_start}
