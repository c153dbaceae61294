"""Trunk pretraining: ResNet-18/34 image classification on an ImageFolder, in the engine's named steps.

Modelled on torchvision's ``references/classification`` (``train.py``, ``utils.py``,
``presets.py``): the same recipe knobs (SGD or AdamW, multi-step or warm-up + cosine
schedules, label smoothing, no weight decay on norm and bias, AMP, channels-last, an
exponential moving average of the weights through ``torch.optim.swa_utils.AveragedModel``
with torchvision's decay adjustment, gradient clipping, RandomResizedCrop + flip) and
the same evaluation transform. Set-up, metrics, optimiser, schedule, the guarded
optimisation step and iteration-exact resume are the detection engine's
(``detection.engine``); what is here is only what classification does differently.
The files it writes are the ones ``backbones.load_pretrained`` and
``--weights-backbone PATH`` read unchanged (``detection.checkpoint``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm import tqdm

from backbones.resnet import ResNet, resnet
from backbones.weights import IMAGENET_WEIGHTS, WeightsError, imagenet_file, load_pretrained, normalize_state_dict, read_checkpoint

from . import distributed as dist_utils
from .checkpoint import (
    CheckpointError,
    load_classifier,
    read_classifier_training_state,
    save_classifier,
    save_classifier_training_state,
)
from .config import (
    BOOL,
    CONFIG_DIR,
    NONNEG_INT,
    NONNEG_NUM,
    POS_INT,
    POS_NUM,
    STR,
    ConfigError,
    Schema,
    choice,
    optional,
    resolve_device,
)
from .data.imagefolder import ImageFolder, build_cls_transform, prepare_cls_data_root
from .engine import (
    MetricsLog,
    Run,
    _EpochBatches,
    _step,
    _Window,
    _worker_init,
    build_amp,
    build_optimizer,
    build_scheduler,
    eval_due,
    record_step,
    setup_run,
)
from .logs import log_to_file
from .models import BACKBONES
from .visualize import plot_curves

__all__ = [
    "CLASSIFICATION",
    "CLS_DEFAULTS",
    "ClsData",
    "ClsTrainState",
    "accuracy",
    "build_cls_data",
    "build_cls_state",
    "build_ema",
    "default_cls_recipe",
    "evaluate_classifier",
    "load_classifier_weights",
    "preflight_cls",
    "train_classifier",
    "train_cls_one_epoch",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Recipe keys. The defaults are torchvision's reference ImageNet recipe for ResNet-18/34:
# SGD, lr 0.1 for 256 images (32 per GPU x 8), momentum 0.9, weight decay 1e-4, 90 epochs,
# x0.1 every 30 epochs, RandomResizedCrop(224) + flip, evaluation at resize 256 / crop 224.

CLS_DEFAULTS: dict[str, Any] = {
    # model
    "backbone": "resnet18",
    "weights": None,  # initial weights: null (random), "imagenet" or a checkpoint path; fc skipped when class counts differ
    "zero_init_residual": False,
    # data
    "data_path": None,  # null: the built-in shapes classification set
    "train_split": "train",
    "val_split": "val",
    "shapes_train": 2000,  # scenes; about 4 crops each
    "shapes_val": 300,
    "shapes_size": 128,
    "shapes_crop_size": 64,
    "shapes_seed": 1,
    "train_crop_size": 224,
    "crop_scale": [0.08, 1.0],  # RandomResizedCrop's area range
    "hflip": True,
    "val_resize_size": 256,
    "val_crop_size": 224,
    "batch_size": 32,  # per process
    "workers": 8,
    # optimisation
    "epochs": 90,
    "max_iters": None,
    "optimizer": "sgd",  # sgd | adamw
    "lr": 0.1,  # for lr_reference_batch images; scaled linearly by the total batch
    "lr_reference_batch": 256,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "norm_weight_decay": None,  # null: weight_decay; 0: none on normalisation layers
    "bias_weight_decay": None,  # null: weight_decay; 0: none on biases
    "scheduler": "multistep",  # multistep | cosine
    "lr_steps": [30, 60],  # epochs, for multistep
    "lr_gamma": 0.1,
    "warmup_epochs": 0,  # linear warm-up, in (possibly fractional) epochs
    "warmup_factor": 0.01,  # lr fraction the warm-up starts from
    "label_smoothing": 0.0,
    "clip_grad_norm": None,
    "amp": False,
    "amp_dtype": None,  # null: bfloat16 on CPU, float16 on CUDA
    "channels_last": False,
    "sync_bn": False,  # BatchNorm -> SyncBatchNorm under DDP on CUDA
    "ema": False,  # evaluate and save an exponential moving average of the weights too
    "ema_steps": 32,  # iterations between EMA updates
    "ema_decay": 0.99998,  # per image at 1 epoch, adjusted as torchvision's reference does
    "max_nonfinite": 5,
    # run
    "device": "auto",
    "seed": 42,
    "deterministic": False,
    "eval_period": 1,  # epochs between evaluations; 0: only at the end
    "checkpoint_period": 1000,  # iterations
    "log_period": 20,  # iterations
    "log_batches": False,  # write batches.jsonl: the sample indices of every iteration
    "output_dir": "outputs/cls_run",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


CLS_CHECKS = {
    "backbone": choice(*BACKBONES),
    "weights": optional(("'imagenet', 'none' or a checkpoint path", STR[1])),
    "zero_init_residual": BOOL,
    "data_path": optional(STR),
    "train_split": STR,
    "val_split": STR,
    "shapes_train": POS_INT,
    "shapes_val": POS_INT,
    "shapes_size": ("an integer >= 64", lambda v: _is_int(v) and v >= 64),
    "shapes_crop_size": ("an integer >= 16", lambda v: _is_int(v) and v >= 16),
    "shapes_seed": NONNEG_INT,
    "train_crop_size": POS_INT,
    "crop_scale": ("[min, max] area fractions with 0 < min <= max <= 1",
                   lambda v: isinstance(v, list) and len(v) == 2 and all(POS_NUM[1](x) for x in v) and v[0] <= v[1] <= 1),
    "hflip": BOOL,
    "val_resize_size": POS_INT,
    "val_crop_size": POS_INT,
    "batch_size": POS_INT,
    "workers": NONNEG_INT,
    "epochs": POS_INT,
    "max_iters": optional(POS_INT),
    "optimizer": choice("sgd", "adamw"),
    "lr": POS_NUM,
    "lr_reference_batch": POS_INT,
    "momentum": ("a number in [0, 1)", lambda v: NONNEG_NUM[1](v) and v < 1),
    "weight_decay": NONNEG_NUM,
    "norm_weight_decay": optional(NONNEG_NUM),
    "bias_weight_decay": optional(NONNEG_NUM),
    "scheduler": choice("multistep", "cosine"),
    "lr_steps": ("a list of epochs (non-negative numbers)", lambda v: isinstance(v, list) and all(NONNEG_NUM[1](x) for x in v)),
    "lr_gamma": POS_NUM,
    "warmup_epochs": NONNEG_NUM,
    "warmup_factor": ("a number in (0, 1]", lambda v: POS_NUM[1](v) and v <= 1),
    "label_smoothing": ("a number in [0, 1)", lambda v: NONNEG_NUM[1](v) and v < 1),
    "clip_grad_norm": optional(POS_NUM),
    "amp": BOOL,
    "amp_dtype": choice(None, "bfloat16", "float16"),
    "channels_last": BOOL,
    "sync_bn": BOOL,
    "ema": BOOL,
    "ema_steps": POS_INT,
    "ema_decay": ("a number in (0, 1)", lambda v: POS_NUM[1](v) and v < 1),
    "max_nonfinite": POS_INT,
    "device": choice("auto", "cpu", "cuda"),
    "seed": NONNEG_INT,
    "deterministic": BOOL,
    "eval_period": NONNEG_INT,
    "checkpoint_period": POS_INT,
    "log_period": POS_INT,
    "log_batches": BOOL,
    "output_dir": STR,
}


def _check_cls(cfg: dict[str, Any]) -> None:
    if isinstance(cfg["weights"], str) and cfg["weights"].lower() == "none":
        cfg["weights"] = None
    if cfg["val_crop_size"] > cfg["val_resize_size"]:
        raise ConfigError(f"val_crop_size ({cfg['val_crop_size']}) must not exceed val_resize_size ({cfg['val_resize_size']})")


CLASSIFICATION = Schema(CLS_DEFAULTS, CLS_CHECKS, _check_cls)

SHAPES_CLS_RECIPE = "cls_shapes_r18"


def default_cls_recipe(data_path: str | None) -> Path | None:
    """The recipe a classification run uses when none is named.

    Without a data path: the shapes CPU recipe. With one: ``None``, i.e. ``CLS_DEFAULTS``
    (torchvision's reference ImageNet recipe, on the device present).

    Args:
        data_path: the user's data folder, if any.
    """
    return None if data_path is not None else CONFIG_DIR / f"{SHAPES_CLS_RECIPE}.yaml"


# ---------------------------------------------------------------------------------------------
# Data


def _datasets(cfg: dict[str, Any], root: Path, *, quiet: bool = False) -> tuple[ImageFolder, ImageFolder]:
    train_tf = build_cls_transform(True, crop_size=cfg["train_crop_size"], crop_scale=cfg["crop_scale"], hflip=cfg["hflip"])
    val_tf = build_cls_transform(False, crop_size=cfg["val_crop_size"], resize_size=cfg["val_resize_size"])
    train_set = ImageFolder(root, cfg["train_split"], transform=train_tf, quiet=quiet)
    val_set = ImageFolder(root, cfg["val_split"], transform=val_tf, classes=train_set.classes, quiet=quiet)
    return train_set, val_set


@dataclass
class ClsData:
    """Data sets, sampling and the iteration plan of a classification run.

    Attributes:
        iters_per_epoch: full batches per epoch (equal on every rank).
        total_iters: iterations of the whole schedule.
        stop_at: where this run stops (``max_iters`` cuts the schedule short).
    """

    root: Path
    train_set: ImageFolder
    val_set: ImageFolder
    sampler: DistributedSampler
    batch_sampler: BatchSampler
    iters_per_epoch: int
    total_iters: int
    stop_at: int

    @property
    def classes(self) -> list[str]:
        """Class names in label order (the training split's folders)."""
        return self.train_set.classes

    def batches(self, epoch: int, skip: int) -> _EpochBatches:
        """The sample indices of ``epoch``'s batches after its first ``skip`` (a function of seed and epoch)."""
        self.sampler.set_epoch(epoch)
        return _EpochBatches(self.batch_sampler, skip, self.iters_per_epoch)  # type: ignore[arg-type]

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
            self.train_set, batch_sampler=self.batches(epoch, skip), num_workers=workers, pin_memory=pin_memory,
            worker_init_fn=_worker_init, generator=generator, persistent_workers=False,
        )


def build_cls_data(cfg: dict[str, Any], run: Run) -> ClsData:
    """Read (or generate) the ImageFolder splits and plan the iterations.

    Args:
        cfg: the run's config.
        run: from ``setup_run``.
    """
    root = prepare_cls_data_root(cfg, is_main=run.is_main, barrier=dist_utils.barrier)
    train_set, val_set = _datasets(cfg, root)
    sampler = DistributedSampler(train_set, num_replicas=run.world, rank=run.rank, shuffle=True, seed=int(cfg["seed"]))
    # Full batches only: BatchNorm needs more than one value per channel, and every rank the same count.
    batch_sampler = BatchSampler(sampler, cfg["batch_size"], drop_last=True)
    iters_per_epoch = dist_utils.all_reduce_min(len(batch_sampler))
    if iters_per_epoch == 0:
        raise ValueError(
            f"{train_set.split_dir} has {len(train_set)} images: fewer than one batch of {cfg['batch_size']} per process "
            f"({run.world} processes); lower batch_size"
        )
    total_iters = iters_per_epoch * cfg["epochs"]
    stop_at = min(total_iters, cfg["max_iters"]) if cfg["max_iters"] else total_iters
    return ClsData(root, train_set, val_set, sampler, batch_sampler, iters_per_epoch, total_iters, stop_at)


# ---------------------------------------------------------------------------------------------
# State


class _WithLoss(nn.Module):
    """The classifier and its loss as one module: the engine's step calls ``model(images, targets)`` for a loss dict."""

    def __init__(self, model: nn.Module, label_smoothing: float) -> None:
        super().__init__()
        self.model = model
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss_cls": self.criterion(self.model(images).float(), targets)}


def build_ema(model: nn.Module, cfg: dict[str, Any], world: int) -> AveragedModel | None:
    """torchvision's EMA of the weights and buffers, or ``None`` when ``cfg["ema"]`` is off.

    The decay is per update and adjusted as in torchvision's reference: with
    ``a = (1 - ema_decay) * world * batch_size * ema_steps / epochs``, each update keeps
    ``1 - min(a, 1)`` of the average.

    Args:
        model: the model to average (unwrapped).
        cfg: config with ``ema``, ``ema_decay``, ``ema_steps``, ``batch_size``, ``epochs``.
        world: number of processes.
    """
    if not cfg["ema"]:
        return None
    alpha = min(1.0, (1.0 - cfg["ema_decay"]) * world * cfg["batch_size"] * cfg["ema_steps"] / cfg["epochs"])
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(1.0 - alpha), use_buffers=True)
    ema.decay = 1.0 - alpha
    return ema


@dataclass
class ClsTrainState:
    """What changes as a classification run trains, with save and load for resume.

    Attributes:
        model: the classifier (unwrapped).
        train_model: what the step calls: the model with its loss, or its DDP wrapper.
        ema: the moving average of the weights, or ``None``.
        iteration: iterations completed.
    """

    model: ResNet
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: bool
    amp_dtype: torch.dtype
    lr: float
    ema: AveragedModel | None = None
    iteration: int = 0

    def save(self, path: Path, *, epoch: int, cfg: dict[str, Any], classes: list[str]) -> None:
        """Write ``checkpoint.pth`` (``detection.checkpoint.save_classifier_training_state``)."""
        save_classifier_training_state(
            path, model=self.model, arch=cfg["backbone"], classes=classes, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, model_ema=self.ema, epoch=epoch, iteration=self.iteration, config=cfg,
        )

    def load(self, ckpt: dict[str, Any]) -> None:
        """Restore from ``read_classifier_training_state``'s dict; continues at its iteration."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if not ckpt["model_ema"]:
                raise CheckpointError("the checkpoint was written without EMA (ema: false); resume with ema: false or start afresh")
            self.ema.load_state_dict(ckpt["model_ema"])
        self.iteration = int(ckpt["iteration"])


def _build_model(cfg: dict[str, Any], num_classes: int) -> ResNet:
    model = resnet(BACKBONES[cfg["backbone"]], num_classes=num_classes, zero_init_residual=cfg["zero_init_residual"])
    if cfg["weights"] is not None:
        load_pretrained(model, cfg["weights"])  # logs its report; fc skipped for another class count
    return model


def build_cls_state(cfg: dict[str, Any], run: Run, data: ClsData) -> ClsTrainState:
    """Build the classifier (on the device, DDP-wrapped under torchrun), optimizer, scheduler, scaler and EMA.

    Args:
        cfg: the run's config.
        run: from ``setup_run``.
        data: from ``build_cls_data``.
    """
    model = _build_model(cfg, len(data.classes))
    if run.is_main:
        total = sum(p.numel() for p in model.parameters())
        logger.info("%s: %s parameters, %d classes", cfg["backbone"], f"{total:,}", len(data.classes))
    model.to(run.device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    train_model: nn.Module = _WithLoss(model, cfg["label_smoothing"])
    if run.world > 1:
        if run.device.type == "cuda" and cfg["sync_bn"]:
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    lr = cfg["lr"] * cfg["batch_size"] * run.world / cfg["lr_reference_batch"]
    optimizer = build_optimizer(model, cfg, lr)
    warmup_iters = int(round(cfg["warmup_epochs"] * data.iters_per_epoch))
    scheduler = build_scheduler(optimizer, {**cfg, "warmup_iters": warmup_iters}, data.iters_per_epoch, data.total_iters)
    amp_dtype, scaler = build_amp(cfg, run.device)
    return ClsTrainState(model, train_model, optimizer, scheduler, scaler, bool(cfg["amp"]), amp_dtype, lr, build_ema(model, cfg, run.world))


# ---------------------------------------------------------------------------------------------
# One epoch


def train_cls_one_epoch(state: ClsTrainState, data: ClsData, epoch: int, run: Run, metrics: MetricsLog, bar: tqdm | None = None) -> None:
    """Train ``epoch`` from where ``state.iteration`` stands to its end or to ``data.stop_at``.

    Logs a window of averages every ``log_period`` iterations, updates the EMA every
    ``ema_steps``, writes ``checkpoint.pth`` every ``checkpoint_period``, and with
    ``log_batches`` records every batch's sample indices in ``batches.jsonl``.

    Args:
        state: model and optimiser state; ``state.iteration`` advances.
        data: from ``build_cls_data``.
        epoch: the epoch to train.
        run: from ``setup_run``.
        metrics: where records go.
        bar: a progress bar to advance, or ``None``.
    """
    cfg = run.cfg
    pin = run.device.type == "cuda"
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    skip = state.iteration - epoch * data.iters_per_epoch
    plan: Iterator[list[int]] | None = iter(list(data.batches(epoch, skip))) if cfg["log_batches"] and run.is_main else None
    loader = data.loader(epoch, skip, seed=int(cfg["seed"]), rank=run.rank, workers=cfg["workers"], pin_memory=pin)
    window, bad_in_a_row = _Window(), 0
    t_data = time.perf_counter()
    for images, targets in loader:
        window.data_time += time.perf_counter() - t_data
        images = images.to(run.device, non_blocking=pin, memory_format=memory_format)
        targets = targets.to(run.device, non_blocking=pin)
        if plan is not None:
            with open(run.out / "batches.jsonl", "a") as f:
                f.write(json.dumps({"iter": state.iteration + 1, "epoch": epoch, "indices": next(plan)}) + "\n")
        terms, bad_in_a_row = _step(state, cfg, images, targets, bad_in_a_row)  # type: ignore[arg-type]
        state.scheduler.step()
        state.iteration += 1
        if state.ema is not None and state.iteration % cfg["ema_steps"] == 0:
            state.ema.update_parameters(state.model)
            if epoch < cfg["warmup_epochs"]:
                # torchvision's reference: during warm-up the average restarts from the current weights.
                state.ema.n_averaged.fill_(0)
        window = record_step(terms, window, bar, state.optimizer, state.iteration, epoch, data.stop_at, run, metrics)
        if state.iteration % cfg["checkpoint_period"] == 0 and run.is_main:
            state.save(run.out / "checkpoint.pth", epoch=epoch, cfg=cfg, classes=data.classes)
        if state.iteration >= data.stop_at:
            break
        t_data = time.perf_counter()
    skipped = data.train_set.num_skipped
    if skipped and run.is_main:
        logger.warning("epoch %d: %d samples fell back to another image because theirs was unreadable (each file is named above)", epoch, skipped)
    data.train_set.reset_skipped()


# ---------------------------------------------------------------------------------------------
# Evaluation


def accuracy(logits: torch.Tensor, targets: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many samples have their label among the ``k`` highest scores, for each ``k``.

    With fewer classes than ``k``, every sample counts (top-k of C <= k classes is all of them).

    Args:
        logits: N x C scores.
        targets: N labels.
        topk: the ``k`` values.

    Returns:
        One count per ``k`` (divide by N for the accuracy).
    """
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred == targets[:, None]
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in topk]


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: ImageFolder,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of ``model`` on ``dataset``.

    Under ``torchrun`` every rank scores every ``world``-th image and the counts are
    summed, so the result is exact (no padded duplicates) and equal to one process's.

    Args:
        model: a classifier whose outputs follow ``dataset.classes``.
        dataset: the split, with the evaluation transform.
        device: where to run.
        batch_size: images per batch.
        workers: loader processes.
        amp_dtype: autocast dtype, or ``None`` for full precision.
        channels_last: feed channels-last batches.
        progress: show a progress bar (rank 0).

    Returns:
        ``{"top1", "top5", "loss", "images"}``.
    """
    device = torch.device(device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    top1 = top5 = count = 0
    loss_sum = 0.0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, targets in tqdm(loader, desc="eval", disable=not progress or rank != 0, dynamic_ncols=True, leave=False):
        images = images.to(device, memory_format=memory_format)
        targets = targets.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images).float()
        loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        c1, c5 = accuracy(logits, targets, (1, 5))
        top1, top5, count = top1 + c1, top5 + c5, count + len(targets)
    model.train(was_training)
    totals = [sum(x) for x in zip(*dist_utils.all_gather_object((top1, top5, count, loss_sum)))]
    n = max(totals[2], 1)
    return {"top1": 100.0 * totals[0] / n, "top5": 100.0 * totals[1] / n, "loss": totals[3] / n, "images": int(totals[2])}


def _evaluate_run(state: ClsTrainState, data: ClsData, run: Run, metrics: MetricsLog) -> dict[str, float]:
    cfg = run.cfg
    kwargs = dict(device=run.device, batch_size=cfg["batch_size"], workers=cfg["workers"],
                  amp_dtype=state.amp_dtype if state.amp else None, channels_last=cfg["channels_last"], progress=run.progress)
    result = {f"val/{k}": v for k, v in evaluate_classifier(state.model, data.val_set, **kwargs).items() if k != "images"}
    if state.ema is not None:
        result.update({f"ema/{k}": v for k, v in evaluate_classifier(state.ema.module, data.val_set, **kwargs).items() if k != "images"})
    if run.is_main:
        metrics.write({"iter": state.iteration, "epoch": max(state.iteration - 1, 0) // data.iters_per_epoch, **result})
        logger.info("evaluation at iteration %d on %d images: %s", state.iteration, len(data.val_set), _format(result))
    return result


def _format(result: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.2f}" if "top" in k else f"{k} {v:.4f}" for k, v in result.items())


# ---------------------------------------------------------------------------------------------
# Set-up checks, weights for evaluation, the whole run


def preflight_cls(cfg: dict[str, Any], *, resume: str | Path | bool | None = None) -> dict[str, Any]:
    """Check what a run will read before it starts: device, data folders and classes, weights, resume file.

    Args:
        cfg: a validated classification config.
        resume: as for ``train_classifier``.

    Raises:
        ConfigError: the device is not available, or the data is less than one batch.
        DataPathError: a folder is missing, a class folder empty, a validation class unknown.
        WeightsError: the initial weights or the resume checkpoint cannot be used.
    """
    resolve_device(cfg["device"])
    if cfg["data_path"] is not None:
        train_set, _ = _datasets(cfg, prepare_cls_data_root(cfg), quiet=True)
        world = int(os.environ.get("WORLD_SIZE", 1))
        if len(train_set) < cfg["batch_size"] * world:
            raise ConfigError(
                f"{train_set.split_dir} has {len(train_set)} images, fewer than one batch of {cfg['batch_size']} "
                f"x {world} processes; lower batch_size"
            )
    if cfg["weights"] == "imagenet":
        imagenet_file(BACKBONES[cfg["backbone"]])
    elif cfg["weights"] is not None:
        normalize_state_dict(read_checkpoint(cfg["weights"]))
    if resume:
        path = Path(cfg["output_dir"]) / "checkpoint.pth" if resume is True else Path(resume)
        if not path.is_file():
            raise CheckpointError(f"nothing to resume: no checkpoint at {path}")
        read_classifier_training_state(path)
    return cfg


def _infer_depth(state: dict[str, torch.Tensor], source: str) -> int:
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("layer3.")}
    for depth, layers in {18: 2, 34: 6}.items():
        if len(blocks) == layers:
            return depth
    raise WeightsError(f"{source} is not a ResNet-18/34 state dict (layer3 has {len(blocks)} blocks; 2 or 6 expected)")


def load_classifier_weights(weights: str, *, backbone: str | None = None, download: bool = True) -> tuple[ResNet, list[str] | None, str]:
    """A classifier to evaluate: torchvision's ImageNet file, a ``train_cls.py`` file, or a plain state dict.

    Args:
        weights: ``"imagenet"`` (torchvision's ``IMAGENET1K_V1`` for ``backbone``), or a
            checkpoint path. Files from ``tools/train_cls.py`` carry their architecture
            and class names; other files give the depth by their keys.
        backbone: ``"resnet18"`` / ``"resnet34"``; required for ``"imagenet"``; for a
            file, a check against what the file holds.
        download: for ``"imagenet"``, fetch the file into the torch hub cache when missing.

    Returns:
        ``(model in eval mode, class names or None, a description)``; with no class
        names the outputs follow the sorted class folders.

    Raises:
        WeightsError: unreadable, unrecognised or mismatched weights.
    """
    if weights == "imagenet":
        if backbone is None:
            raise WeightsError("--weights imagenet needs --backbone resnet18 or resnet34")
        depth = BACKBONES[backbone]
        model = resnet(depth)
        load_pretrained(model, "imagenet", strict=True, download=download)
        return model.eval(), None, f"torchvision ImageNet {backbone} ({IMAGENET_WEIGHTS[depth].file_name})"
    raw = read_checkpoint(weights)
    if isinstance(raw, dict) and {"model", "arch", "classes"} <= set(raw):
        if backbone is not None and backbone != raw["arch"]:
            raise WeightsError(f"{weights} holds a {raw['arch']} classifier, not a {backbone}; drop --backbone or pass --backbone {raw['arch']}")
        model = load_classifier(raw)
        return model, list(raw["classes"]), f"{raw['arch']} classifier {weights}"
    state = normalize_state_dict(raw)
    depth = _infer_depth(state, str(weights))
    if backbone is not None and BACKBONES[backbone] != depth:
        raise WeightsError(f"{weights} holds a resnet{depth} state dict, not a {backbone}")
    if "fc.weight" not in state:
        raise WeightsError(f"{weights} has no classifier (fc.weight): it is a trunk, not a classifier to evaluate")
    model = resnet(depth, num_classes=int(state["fc.weight"].shape[0]))
    load_pretrained(model, state, strict=True)
    return model.eval(), None, f"resnet{depth} state dict {weights}"


def _finish(state: ClsTrainState, data: ClsData, run: Run, metrics: MetricsLog) -> dict[str, float]:
    cfg = run.cfg
    if run.is_main:
        save_classifier(state.model, run.out / "model_final.pth", arch=cfg["backbone"], classes=data.classes, config=cfg, iteration=state.iteration)
        if state.ema is not None:
            save_classifier(state.ema.module, run.out / "model_ema.pth", arch=cfg["backbone"], classes=data.classes, config=cfg, iteration=state.iteration)
        logger.info("wrote %s%s", run.out / "model_final.pth", f" and {run.out / 'model_ema.pth'}" if state.ema is not None else "")
    dist_utils.barrier()
    final = _evaluate_run(state, data, run, metrics)
    if run.is_main:
        (run.out / "metrics.json").write_text(json.dumps(final, indent=2))
        plot_curves(metrics.path, run.out / "curves.png", eval_suffixes=("/top1",), eval_title="validation top-1 (%)")
    return final


def train_classifier(cfg: dict[str, Any], *, resume: str | Path | bool | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a ResNet classifier as ``cfg`` says; evaluate, checkpoint and plot along the way.

    Launched by ``torchrun`` it runs data-parallel; alone, in one process. Rank 0 writes
    to ``cfg["output_dir"]``: ``config.yaml``, ``log.txt``, ``metrics.jsonl``,
    ``checkpoint.pth``, ``model_final.pth`` (and ``model_ema.pth`` with EMA),
    ``metrics.json`` and ``curves.png``.

    Args:
        cfg: a validated classification config (``CLASSIFICATION`` schema).
        resume: ``True`` to resume from ``output_dir/checkpoint.pth``, a path, or ``None``.
        progress: show tqdm bars.

    Returns:
        ``{"iteration", "metrics" (the last evaluation), "seconds", "classes"}``.
    """
    t_start = time.perf_counter()
    run = setup_run(cfg, progress=progress)
    with log_to_file(run.out / "log.txt"):
        if run.is_main and run.requested_device == "auto":
            logger.info("device: %s (auto: %s)", run.cfg["device"], "CUDA is available" if run.cfg["device"] == "cuda" else "no CUDA device")
        data = build_cls_data(run.cfg, run)
        state = build_cls_state(run.cfg, run, data)
        if resume:
            path = run.out / "checkpoint.pth" if resume is True else Path(resume)
            state.load(read_classifier_training_state(path))
            logger.info("resumed from %s at iteration %d", path, state.iteration)
        if run.is_main:
            logger.info("training a %s classifier on %s: %d images, %d classes, %d validation images, %d iterations/epoch, "
                        "%d planned, batch %d x %d, lr %.4g", cfg["backbone"], data.root, len(data.train_set), len(data.classes),
                        len(data.val_set), data.iters_per_epoch, data.stop_at, cfg["batch_size"], run.world, state.lr)
            if data.val_set.missing_classes:
                logger.info("%d training classes have no validation images: %s", len(data.val_set.missing_classes),
                            ", ".join(data.val_set.missing_classes[:8]))
        metrics = MetricsLog(run, resumed_at=state.iteration if resume else None)
        if resume and eval_due(cfg, state.iteration, data.iters_per_epoch, data.stop_at) and not metrics.evaluated_at(state.iteration):
            logger.info("the evaluation after iteration %d did not finish before the run stopped; running it now", state.iteration)
            _evaluate_run(state, data, run, metrics)
        bar = tqdm(total=data.stop_at, initial=state.iteration, desc="train", disable=not progress or not run.is_main, dynamic_ncols=True)
        state.train_model.train()
        for epoch in range(state.iteration // data.iters_per_epoch, cfg["epochs"]):
            if state.iteration >= data.stop_at:
                break
            train_cls_one_epoch(state, data, epoch, run, metrics, bar)
            epoch_done = state.iteration == (epoch + 1) * data.iters_per_epoch
            if run.is_main:
                state.save(run.out / "checkpoint.pth", epoch=epoch + 1 if epoch_done else epoch, cfg=run.cfg, classes=data.classes)
            if eval_due(cfg, state.iteration, data.iters_per_epoch, data.stop_at):
                _evaluate_run(state, data, run, metrics)
        bar.close()
        final = _finish(state, data, run, metrics)
        metrics.close()
        if run.is_main:
            logger.info("done: %d iterations in %.1f s; %s", state.iteration, time.perf_counter() - t_start, _format(final))
    dist_utils.barrier()
    return {"iteration": state.iteration, "metrics": final, "seconds": time.perf_counter() - t_start, "classes": data.classes}
