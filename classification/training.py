"""Trunk pretraining: the classification task the shared runner (``engine.runner``) trains.

Modelled on torchvision's ``references/classification`` (``train.py``, ``utils.py``,
``presets.py``): the same recipe knobs (SGD or AdamW, multi-step or warm-up + cosine
schedules, label smoothing, no weight decay on norm and bias, AMP, channels-last, an
exponential moving average of the weights through ``torch.optim.swa_utils.AveragedModel``
with torchvision's decay adjustment, gradient clipping, RandomResizedCrop + flip) and the
same evaluation transform. What is here is only what classification does differently;
the loop, resume, schedule and records are the runner's. The files it writes are the
ones ``backbones.load_pretrained`` and ``--weights-backbone PATH`` read unchanged.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import BatchSampler, DistributedSampler

from backbones.resnet import ResNet, resnet
from backbones.weights import check_weights, load_pretrained
from classification.checkpoint import CLASSIFIER_KEYS, classifier_record, save_classifier
from classification.data import ImageFolder, build_cls_transform, prepare_cls_data_root
from engine.plots import plot_curves
from engine import distributed as dist_utils
from engine import runner
from engine.config import ConfigError
from engine.runner import MetricsLog, Run, TrainData, TrainState

from .config import BACKBONES
from .evaluation import evaluate_classifier, format_accuracy

__all__ = ["ClassificationTask", "ClsData", "TASK", "build_ema", "preflight_cls", "train_classifier"]

logger = logging.getLogger(__name__)


def _datasets(cfg: dict[str, Any], root: Path, *, quiet: bool = False) -> tuple[ImageFolder, ImageFolder]:
    train_tf = build_cls_transform(True, crop_size=cfg["train_crop_size"], crop_scale=cfg["crop_scale"], hflip=cfg["hflip"])
    val_tf = build_cls_transform(False, crop_size=cfg["val_crop_size"], resize_size=cfg["val_resize_size"])
    train_set = ImageFolder(root, cfg["train_split"], transform=train_tf, quiet=quiet)
    val_set = ImageFolder(root, cfg["val_split"], transform=val_tf, classes=train_set.classes, quiet=quiet)
    return train_set, val_set


@dataclass
class ClsData(TrainData):
    """The runner's data for an ImageFolder; full batches only."""

    @property
    def classes(self) -> list[str]:
        """Class names in label order (the training split's folders)."""
        return self.train_set.classes


class _WithLoss(nn.Module):
    """The classifier and its loss as one module: the runner's step calls ``model(images, targets)`` for a loss dict."""

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


class EmaUpdate(runner.Hook):
    """Update the moving average every ``ema_steps`` iterations; during warm-up it restarts from the current weights."""

    def after_step(self, state: TrainState, data: TrainData, run: Run, epoch: int) -> None:
        cfg = run.cfg
        if state.ema is not None and state.iteration % cfg["ema_steps"] == 0:
            state.ema.update_parameters(state.model)
            if epoch < cfg["warmup_epochs"]:
                # torchvision's reference: during warm-up the average restarts from the current weights.
                state.ema.n_averaged.fill_(0)


class ClassificationTask(runner.Task):
    """A ResNet-18/34 classifier on an ImageFolder (or the shapes crops)."""

    tool = "tools/train_cls.py"
    model_keys = CLASSIFIER_KEYS + ("model_ema",)
    state_file = "classifier training checkpoint"
    ema_key = True

    def build_data(self, cfg: dict[str, Any], run: Run) -> ClsData:
        root = prepare_cls_data_root(cfg, is_main=run.is_main, barrier=dist_utils.barrier)
        train_set, val_set = _datasets(cfg, root)
        sampler = DistributedSampler(train_set, num_replicas=run.world, rank=run.rank, shuffle=True, seed=int(cfg["seed"]))
        # Full batches only: BatchNorm needs more than one value per channel, and every rank the same count.
        batch_sampler = BatchSampler(sampler, cfg["batch_size"], drop_last=True)
        plan = runner.plan_iterations(batch_sampler, cfg)
        if plan[0] == 0:
            raise ValueError(
                f"{train_set.split_dir} has {len(train_set)} images: fewer than one batch of {cfg['batch_size']} per process "
                f"({run.world} processes); lower batch_size"
            )
        return ClsData(root, train_set, val_set, sampler, batch_sampler, *plan)

    def build_model(self, cfg: dict[str, Any], run: Run, data: ClsData) -> tuple[nn.Module, nn.Module]:
        model: ResNet = resnet(BACKBONES[cfg["backbone"]], num_classes=len(data.classes), zero_init_residual=cfg["zero_init_residual"])
        if cfg["weights"] is not None:
            load_pretrained(model, cfg["weights"])  # logs its report; fc skipped for another class count
        if run.is_main:
            logger.info("%s: %s parameters, %d classes", cfg["backbone"], f"{sum(p.numel() for p in model.parameters()):,}", len(data.classes))
        return model, _WithLoss(model, cfg["label_smoothing"])

    def build_ema(self, model: nn.Module, cfg: dict[str, Any], run: Run) -> AveragedModel | None:
        return build_ema(model, cfg, run.world)

    def hooks(self, cfg: dict[str, Any], run: Run) -> list[runner.Hook]:
        return [EmaUpdate()] if cfg["ema"] else []

    def prepare_batch(self, batch: Any, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = batch
        pin = run.device.type == "cuda"
        memory_format = torch.channels_last if run.cfg["channels_last"] else torch.contiguous_format
        return images.to(run.device, non_blocking=pin, memory_format=memory_format), targets.to(run.device, non_blocking=pin)

    def model_record(self, state: TrainState, data: ClsData, run: Run) -> dict[str, Any]:
        return classifier_record(state.model, run.cfg["backbone"], data.classes, {})

    def evaluate(self, state: TrainState, data: ClsData, run: Run) -> dict[str, float]:
        cfg = run.cfg
        kwargs: dict[str, Any] = dict(device=run.device, batch_size=cfg["batch_size"], workers=cfg["workers"],
                                      amp_dtype=state.amp_dtype if state.amp else None, channels_last=cfg["channels_last"], progress=run.progress)
        result = {f"val/{k}": v for k, v in evaluate_classifier(state.model, data.val_set, **kwargs).items() if k != "images"}
        if state.ema is not None:
            result.update({f"ema/{k}": v for k, v in evaluate_classifier(state.ema.module, data.val_set, **kwargs).items() if k != "images"})
        if run.is_main:
            logger.info("evaluation at iteration %d on %d images: %s", state.iteration, len(data.val_set), format_accuracy(result))
        return result

    def save_final(self, state: TrainState, data: ClsData, run: Run) -> None:
        cfg = run.cfg
        save_classifier(state.model, run.out / "model_final.pth", arch=cfg["backbone"], classes=data.classes, config=cfg, iteration=state.iteration)
        if state.ema is not None:
            save_classifier(state.ema.module, run.out / "model_ema.pth", arch=cfg["backbone"], classes=data.classes, config=cfg, iteration=state.iteration)
        logger.info("wrote %s%s", run.out / "model_final.pth", f" and {run.out / 'model_ema.pth'}" if state.ema is not None else "")

    def draw(self, state: TrainState, data: ClsData, run: Run, metrics: MetricsLog, final: dict[str, float]) -> None:
        (run.out / "metrics.json").write_text(json.dumps(final, indent=2))
        plot_curves(metrics.path, run.out / "curves.png", eval_suffixes=("/top1",), eval_title="validation top-1 (%)")

    def describe(self, state: TrainState, data: ClsData, run: Run) -> str:
        cfg = run.cfg
        text = (f"training a {cfg['backbone']} classifier on {data.root}: {len(data.train_set)} images, {len(data.classes)} classes, "
                f"{len(data.val_set)} validation images, {data.iters_per_epoch} iterations/epoch, {data.stop_at} planned, "
                f"batch {cfg['batch_size']} x {run.world}, lr {state.lr:.4g}")
        missing = data.val_set.missing_classes
        if missing:
            text += f"; {len(missing)} training classes have no validation images: {', '.join(missing[:8])}"
        return text

    def format_metrics(self, metrics: dict[str, float]) -> str:
        return format_accuracy(metrics)


TASK = ClassificationTask()


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
    if cfg["data_path"] is not None:
        train_set, _ = _datasets(cfg, prepare_cls_data_root(cfg), quiet=True)
        world = int(os.environ.get("WORLD_SIZE", 1))
        if len(train_set) < cfg["batch_size"] * world:
            raise ConfigError(
                f"{train_set.split_dir} has {len(train_set)} images, fewer than one batch of {cfg['batch_size']} "
                f"x {world} processes; lower batch_size"
            )
    check_weights(cfg["weights"], BACKBONES[cfg["backbone"]])
    runner.preflight(TASK, cfg, resume=resume)
    return cfg


def train_classifier(
    cfg: dict[str, Any], *, resume: str | Path | bool | None = None, progress: bool = True, hooks: Sequence[runner.Hook] = ()
) -> dict[str, Any]:
    """Train a ResNet classifier as ``cfg`` says (``engine.runner.train`` with the classification task).

    Rank 0 writes to ``cfg["output_dir"]``: ``config.yaml``, ``log.txt``, ``metrics.jsonl``,
    ``checkpoint.pth``, ``model_final.pth`` (and ``model_ema.pth`` with EMA), ``metrics.json``
    and ``curves.png``.

    Args:
        cfg: a validated classification config (``classification.CLASSIFICATION``).
        resume, progress, hooks: as for ``engine.runner.train`` (``hooks``: your own events' hooks).

    Returns:
        ``{"iteration", "metrics" (the last evaluation), "seconds", "classes"}``.
    """
    result = runner.train(TASK, cfg, resume=resume, progress=progress, hooks=hooks)
    return {"iteration": result["iteration"], "metrics": result["metrics"], "seconds": result["seconds"], "classes": result["data"].classes}
