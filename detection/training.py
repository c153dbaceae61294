"""Detector training: the detection task the shared runner (``engine.runner``) trains.

What is detection's own is here: COCO data with aspect-ratio grouped batches, the
detector from ``build_detector``, its checkpoint files, COCO evaluation and the
pictures drawn at the end. The loop, resume, schedule, AMP, DDP and records are the
runner's. ``train`` reads as the table of contents of a detection run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from backbones.weights import check_weights
from engine import distributed as dist_utils
from engine import runner
from engine.runner import MetricsLog, Run, TrainData, TrainState

from .checkpoint import (
    TRAINING_MODEL_KEYS,
    CheckpointError,
    check_init_checkpoint,
    detector_record,
    load_detector_for_training,
    read_training_state,
    save_detector,
)
from .data import CocoDetection, GroupedBatchSampler, build_transforms, collate_fn, create_aspect_ratio_groups
from engine.roots import find_splits, prepare_data_root
from .evaluation import evaluate, format_metrics, format_per_category
from .models import BACKBONES, build_detector, count_parameters
from engine.plots import plot_curves, save_image

from .visualize import draw_detections

__all__ = ["DetectionData", "DetectionTask", "EvaluationError", "TASK", "preflight", "train"]

logger = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """An evaluation failed; the message says where the trained model is and what to fix."""


@dataclass
class DetectionData(TrainData):
    """The runner's data plus what the detector's own resize must know.

    Attributes:
        model_min_size: the shorter sides the model's transform uses (multi-scale training
            samples the same sizes as the augmentation).
    """

    model_min_size: Any = None

    @property
    def category_mapping(self) -> dict[str, list[Any]]:
        """The training set's ``{"cat_ids", "names"}``, saved with every checkpoint."""
        return self.train_set.category_mapping()


class DetectionTask(runner.Task):
    """Faster R-CNN / Mask R-CNN / RetinaNet / FCOS on COCO-layout data (or the shapes set)."""

    tool = "tools/train_det.py"
    model_keys = TRAINING_MODEL_KEYS
    state_file = "training checkpoint"

    def build_data(self, cfg: dict[str, Any], run: Run) -> DetectionData:
        root, train_split, val_split = prepare_data_root(cfg, is_main=run.is_main, barrier=dist_utils.barrier)
        masks = cfg["masks"] if cfg["masks"] is not None else cfg["model"] == "mask_rcnn"
        aug_min = cfg["aug_min_size"] or cfg["min_size"]
        transforms = build_transforms(cfg["augment"], train=True, min_size=aug_min, max_size=cfg["max_size"])
        # torchvision's model transform resizes every image again; for multi-scale training it must
        # sample the same sizes (it evaluates at the last one).
        model_min_size = aug_min if cfg["augment"] == "multiscale" else cfg["min_size"]
        train_set = CocoDetection(root, train_split, transforms=transforms, masks=masks, drop_empty=True, exif_transpose=cfg["exif_transpose"])
        val_set = CocoDetection(root, val_split, masks=False, exif_transpose=cfg["exif_transpose"])
        if len(train_set) == 0:
            raise ValueError(f"no training images with usable objects in {root}/{train_split}")
        sampler = DistributedSampler(train_set, num_replicas=run.world, rank=run.rank, shuffle=True, seed=int(cfg["seed"]))
        batch_sampler = GroupedBatchSampler(sampler, create_aspect_ratio_groups(train_set.aspect_ratios(), k=3), cfg["batch_size"])
        plan = runner.plan_iterations(batch_sampler, cfg)
        return DetectionData(root, train_set, val_set, sampler, batch_sampler, *plan, collate_fn=collate_fn, model_min_size=model_min_size)

    def build_model(self, cfg: dict[str, Any], run: Run, data: DetectionData) -> tuple[nn.Module, nn.Module]:
        if cfg["init_checkpoint"] is not None:
            # Fine-tuning (e.g. a pruned model): the file's architecture, its widths and weights.
            model = load_detector_for_training(
                cfg["init_checkpoint"], arch=cfg["model"], backbone=cfg["backbone"], num_classes=data.train_set.num_classes,
                min_size=data.model_min_size, max_size=cfg["max_size"], trainable_layers=cfg["trainable_layers"],
            )
            if run.is_main:
                plan = getattr(model, "channel_plan", None)
                logger.info("initialised from %s%s", cfg["init_checkpoint"], f" (pruned: {len(plan)} layers narrowed)" if plan else "")
        else:
            model = build_detector(
                cfg["model"], backbone=cfg["backbone"], num_classes=data.train_set.num_classes,
                weights_backbone=cfg["weights_backbone"], trainable_layers=cfg["trainable_layers"],
                returned_layers=cfg["returned_layers"], min_size=data.model_min_size, max_size=cfg["max_size"],
                norm=cfg["norm"], **cfg["model_kwargs"],
            )
        total, trainable = count_parameters(model)
        if run.is_main:
            logger.info("%s/%s: %s parameters, %s trainable", cfg["model"], cfg["backbone"], f"{total:,}", f"{trainable:,}")
        return model, model  # torchvision's detectors return their losses in training mode

    def prepare_batch(self, batch: Any, run: Run) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        images, targets = batch
        pin = run.device.type == "cuda"
        images = [img.to(run.device, non_blocking=pin) for img in images]
        targets = [{k: v.to(run.device, non_blocking=pin) for k, v in t.items()} for t in targets]
        return images, targets

    def batch_ids(self, targets: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        return {"image_ids": [int(t["image_id"]) for t in targets]}

    def model_record(self, state: TrainState, data: DetectionData, run: Run) -> dict[str, Any]:
        return detector_record(state.model, {"category_mapping": data.category_mapping})

    def evaluate(self, state: TrainState, data: DetectionData, run: Run) -> dict[str, float]:
        try:
            result = evaluate(state.model, data.val_set, label_to_cat_id=data.train_set.label_to_cat_id, device=run.device,
                              output_dir=run.out if run.is_main else None, progress=run.progress)
        except Exception as e:  # noqa: BLE001  (whatever failed, the user needs the model's path and the cause)
            saved = run.out / "model_final.pth" if (run.out / "model_final.pth").is_file() else run.out / "checkpoint.pth"
            raise EvaluationError(
                f"evaluation on {data.val_set.ann_file} failed ({type(e).__name__}: {e}); the trained model is saved in {saved}; "
                f"fix the validation data and run: python tools/eval_coco.py --checkpoint {saved}"
            ) from e
        if run.is_main:
            for summary in {data.train_set.orientation_summary(), data.val_set.orientation_summary()} - {None, ""}:
                logger.info("%s", summary)
            for iou_type, text in result["summaries"].items():
                logger.info("evaluation at iteration %d (%s):\n%s\n%s", state.iteration, iou_type, text,
                            format_per_category(result["per_category"][iou_type], iou_type))
        return result["metrics"]

    def save_final(self, state: TrainState, data: DetectionData, run: Run) -> None:
        save_detector(state.model, run.out / "model_final.pth", category_mapping=data.category_mapping, config=run.cfg, iteration=state.iteration)
        logger.info("wrote %s", run.out / "model_final.pth")

    @torch.no_grad()
    def draw(self, state: TrainState, data: DetectionData, run: Run, metrics: MetricsLog, final: dict[str, float]) -> None:
        plot_curves(metrics.path, run.out / "curves.png")
        state.model.eval()
        for i in range(min(run.cfg["num_vis"], len(data.val_set))):
            image, target = data.val_set[i]
            det = state.model([image.to(run.device)])[0]
            save_image(draw_detections(image, det, data.train_set.class_names), run.out / "vis" / f"{int(target['image_id'])}.png")

    def describe(self, state: TrainState, data: DetectionData, run: Run) -> str:
        cfg = run.cfg
        return (f"training {cfg['model']}/{cfg['backbone']} on {data.root}: {len(data.train_set)} images, "
                f"{data.train_set.num_classes - 1} classes, {data.iters_per_epoch} iterations/epoch, {data.stop_at} planned, "
                f"batch {cfg['batch_size']} x {run.world}, lr {state.lr:.4g}")

    def format_metrics(self, metrics: dict[str, float]) -> str:
        return format_metrics(metrics)


TASK = DetectionTask()


def preflight(cfg: dict[str, Any], *, resume: str | Path | bool | None = None) -> dict[str, Any]:
    """Check what a detection run will read, before it starts: device, data splits, weights, resume file.

    Args:
        cfg: a validated config.
        resume: as for ``train``.

    Returns:
        The config with the data splits found (``train_split`` / ``val_split``).

    Raises:
        ConfigError: the device is not available.
        DataPathError: the data folder or a split is missing or ambiguous.
        WeightsError: the backbone weights, the init checkpoint or the resume checkpoint
            cannot be used (a pruned file as backbone weights; a resume file whose widths
            differ from the model the run builds).
    """
    cfg = dict(cfg)
    if cfg["data_path"] is not None:
        cfg["train_split"], cfg["val_split"] = find_splits(cfg["data_path"], cfg["train_split"], cfg["val_split"])
    weights = cfg["weights_backbone"]
    init_plan = None
    if cfg["init_checkpoint"] is not None:  # its weights replace weights_backbone's
        init_plan = check_init_checkpoint(cfg["init_checkpoint"], arch=cfg["model"], backbone=cfg["backbone"]).get("channel_plan") or None
    else:
        check_weights(weights, BACKBONES[cfg["backbone"]])
    runner.preflight(TASK, cfg, resume=resume)
    if resume:
        path = runner.resume_path(cfg, resume)
        resume_plan = read_training_state(path).get("channel_plan") or None
        if resume_plan != init_plan:
            what = "a pruned model" if resume_plan else "an unpruned model"
            built = f"the model of init_checkpoint {cfg['init_checkpoint']}" if cfg["init_checkpoint"] else "the standard architecture"
            raise CheckpointError(f"{path} holds {what} whose widths differ from {built}: resume with the config "
                                  f"(init_checkpoint) the run started with, e.g. --config {Path(cfg['output_dir']) / 'config.yaml'}")
    return cfg


def train(
    cfg: dict[str, Any], *, resume: str | Path | bool | None = None, progress: bool = True, hooks: Sequence[runner.Hook] = ()
) -> dict[str, Any]:
    """Train a detector as ``cfg`` says (``engine.runner.train`` with the detection task).

    Rank 0 writes to ``cfg["output_dir"]``: ``config.yaml``, ``log.txt``, ``metrics.jsonl``,
    ``checkpoint.pth``, ``model_final.pth``, ``metrics.json``, ``curves.png`` and ``vis/*.png``.

    Args:
        cfg: a validated detection config (``detection.config.DETECTION``).
        resume, progress, hooks: as for ``engine.runner.train`` (``hooks``: your own events' hooks).

    Returns:
        ``{"iteration", "metrics" (the last evaluation), "seconds"}``.
    """
    result = runner.train(TASK, cfg, resume=resume, progress=progress, hooks=hooks)
    return {k: result[k] for k in ("iteration", "metrics", "seconds")}
