"""Segmenter training: the semantic segmentation task the shared runner (``engine.runner``) trains.

What is segmentation's own is here: class-map data (COCO-format instances, the VOC
layout or the built-in shapes set) with albumentations crops, the segmenter from
``build_segmenter``, its cross-entropy with the ignore index (plus torchvision's
auxiliary loss, weighted 0.5), its checkpoint files, the confusion-matrix evaluation
and the overlays drawn at the end. The loop, resume, schedule, AMP, DDP and records are
the runner's. Modelled on torchvision's ``references/segmentation/train.py``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DistributedSampler

from backbones.weights import check_weights
from engine.roots import evaluation_data, find_splits, prepare_data_root  # COCO splits and the shapes set
from engine import distributed as dist_utils
from engine import runner
from engine.config import ConfigError
from engine.datasets import DataPathError
from engine.files import atomic_write_text
from engine.plots import plot_curves, save_image
from engine.runner import MetricsLog, Run, TrainData, TrainState

from .checkpoint import SEGMENTER_KEYS, read_segmenter_training_state, save_segmenter, segmenter_record
from .data import (
    COCO_VOC_CATEGORIES,
    IGNORE_INDEX,
    VOC_CLASSES,
    CocoSegmentation,
    VOCSegmentation,
    build_seg_transforms,
    collate_fn,
    denormalize,
    scan_mask_labels,
)
from .evaluation import evaluate_segmenter, format_seg_metrics, seg_metrics
from .models import BACKBONES, build_segmenter
from .visualize import draw_segmentation

__all__ = [
    "SegData",
    "SegmentationLoss",
    "SegmentationTask",
    "TASK",
    "build_seg_datasets",
    "evaluation_dataset",
    "preflight_seg",
    "resolve_seg_data",
    "train_segmenter",
]

logger = logging.getLogger(__name__)

_VOC_LAYOUT = "ROOT/JPEGImages/<id>.jpg, ROOT/SegmentationClass/<id>.png, ROOT/ImageSets/Segmentation/<split>.txt"
_COCO_LAYOUT = "ROOT/annotations/instances_<split>.json and ROOT/<split>/"


# ---------------------------------------------------------------------------------------------
# Data


def _is_voc(root: Path) -> bool:
    return (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir()


def resolve_seg_data(cfg: dict[str, Any], *, is_main: bool = True, barrier: Any = lambda: None) -> tuple[Path, str, str, str]:
    """``(root, format, train_split, val_split)`` of a run; generates the shapes set once when no data path is set.

    Args:
        cfg: a segmentation config (``data_path``, ``data_format``, ``train_split``,
            ``val_split``, ``shapes_*``).
        is_main: this process generates the shapes set (rank 0 under ``torchrun``).
        barrier: waits for every process.

    Raises:
        DataPathError: the folder is missing, in neither layout, or a split is missing.
    """
    if cfg["data_path"] is None:
        root, train, val = prepare_data_root(cfg, is_main=is_main, barrier=barrier)
        return root, "coco", train, val
    root = Path(cfg["data_path"])
    if not root.is_dir():
        raise DataPathError(f"data path {root} does not exist (VOC layout: {_VOC_LAYOUT}; COCO layout: {_COCO_LAYOUT})")
    fmt = cfg["data_format"]
    if fmt == "auto":
        fmt = "voc" if _is_voc(root) else "coco" if (root / "annotations").is_dir() else None
        if fmt is None:
            nested = next(iter(sorted(root.glob("VOCdevkit/VOC*"))), None)
            hint = f"; {nested} looks like the folder to pass" if nested is not None else ""
            raise DataPathError(f"data path {root} is in neither layout (VOC: {_VOC_LAYOUT}; COCO: {_COCO_LAYOUT}){hint}")
    if fmt == "coco":
        return (root, fmt, *find_splits(root, cfg["train_split"], cfg["val_split"]))
    splits = root / "ImageSets" / "Segmentation"
    train, val = cfg["train_split"] or "train", cfg["val_split"] or "val"
    for flag, split in (("--train-split", train), ("--val-split", val)):
        if not (splits / f"{split}.txt").is_file():
            lists = sorted(p.stem for p in splits.glob("*.txt"))
            raise DataPathError(f"{flag} {split}: no {splits / f'{split}.txt'} (lists found: {', '.join(lists) or 'none'}; VOC layout: {_VOC_LAYOUT})")
    return root, fmt, train, val


def build_seg_datasets(cfg: dict[str, Any], root: Path, fmt: str, train_split: str, val_split: str, *, seed: int | None = None) -> tuple[Any, Any]:
    """The training set (random rescale, crop and flip) and the validation set (``val_resize`` only).

    Args:
        cfg: a segmentation config.
        root: the data folder.
        fmt: ``"coco"`` or ``"voc"``.
        train_split: the training split.
        val_split: the validation split.
        seed: augmentation seed (each loader worker combines it with its own).
    """
    train_tf = build_seg_transforms(True, crop_size=cfg["crop_size"], scale_range=tuple(cfg["scale_range"]),
                                    base_size=cfg["base_size"], hflip_prob=cfg["hflip_prob"], seed=seed)
    val_tf = build_seg_transforms(False, resize=cfg["val_resize"])
    if fmt == "voc":
        names = cfg["class_names"] or VOC_CLASSES
        return (VOCSegmentation(root, train_split, transforms=train_tf, class_names=names),
                VOCSegmentation(root, val_split, transforms=val_tf, class_names=names))
    if cfg["class_names"] is not None:
        raise ConfigError(f"class_names names the labels of VOC-layout masks; {root} is COCO-format, whose names are its categories "
                          "(pick them with coco_categories)")
    train_set = CocoSegmentation(root, train_split, transforms=train_tf, drop_empty=True, categories=_coco_categories(cfg))
    # The training set's categories decide the labels of both.
    val_set = CocoSegmentation(root, val_split, transforms=val_tf, categories=train_set.cat_ids)
    return train_set, val_set


def _coco_categories(cfg: dict[str, Any]) -> Any:
    return COCO_VOC_CATEGORIES if cfg.get("coco_categories") == "voc" else cfg.get("coco_categories")


def evaluation_dataset(
    trained: dict[str, Any] | None,
    class_names: list[str],
    *,
    data_path: str | None = None,
    data_format: str = "auto",
    split: str | None = None,
    resize: int | None = None,
) -> tuple[Any, str]:
    """The data set a trained segmenter is scored on, with the evaluation transform, and a description.

    Args:
        trained: the training config stored with the model (``None``: unknown; then
            ``data_path`` is needed).
        class_names: the model's labels; the data's must be as many (a warning when
            their names differ).
        data_path: a data folder to use instead of the training one.
        data_format: ``"auto"``, ``"coco"`` or ``"voc"`` for ``data_path``.
        split: the split to score (default: the training config's ``val_split`` on the
            training folder, else ``val`` for VOC and the one ``*val*`` split for COCO).
        resize: short side to resize images (and masks) to; ``None``: as they are.

    Raises:
        ConfigError: no data folder is known.
        DataPathError: the folder or split is missing or in neither layout; the data's
            label count differs from the model's.
    """
    if data_path is None and trained is None:
        raise ConfigError("--data-path is needed: this file does not say what data it was trained on")
    transform = build_seg_transforms(False, resize=resize)
    base = dict(trained) if trained is not None else {"data_path": None, "val_split": None, "data_format": "auto"}
    same_folder = data_path is None or (base.get("data_path") is not None and Path(data_path) == Path(base["data_path"]))
    if data_path is None and base.get("data_path") is None:  # the shapes set, generated again when the cache was emptied
        root, chosen = evaluation_data(base, split=split)
        dataset: Any = CocoSegmentation(root, chosen, transforms=transform)
    else:
        root = Path(data_path if data_path is not None else base["data_path"])
        if not root.is_dir():
            raise DataPathError(f"data path {root} does not exist (VOC layout: {_VOC_LAYOUT}; COCO layout: {_COCO_LAYOUT})")
        fmt = data_format if data_path is not None else base.get("data_format", "auto")
        if fmt == "auto":
            fmt = "voc" if _is_voc(root) else "coco"
        wanted = split or (base.get("val_split") if same_folder else None)
        if fmt == "voc":
            chosen = wanted or "val"
            dataset = VOCSegmentation(root, chosen, transforms=transform, class_names=class_names)
            try:  # a VOC mask says nothing of its label names: the first one tells whether the model's labels fit
                dataset.read_sample(0)
            except ValueError as e:
                raise DataPathError(f"{e}; the model has {len(class_names)} labels ({', '.join(class_names[:8])}"
                                    f"{', ...' if len(class_names) > 8 else ''})") from None
        else:
            root, chosen = evaluation_data({**base, "data_path": str(root), "val_split": wanted}, data_path=str(root), split=wanted)
            dataset = CocoSegmentation(root, chosen, transforms=transform, categories=_coco_categories(base) if same_folder else None)
    if dataset.num_classes != len(class_names):
        raise DataPathError(
            f"{root} ({chosen}) has {dataset.num_classes} labels ({', '.join(dataset.class_names[:8])}{', ...' if dataset.num_classes > 8 else ''}) "
            f"but the model has {len(class_names)} ({', '.join(class_names[:8])}{', ...' if len(class_names) > 8 else ''})"
        )
    if list(dataset.class_names) != list(class_names):
        logger.warning("the data names its labels %s, the model %s: scored by label number", dataset.class_names, class_names)
    return dataset, f"{root} ({chosen})"


@dataclass
class SegData(TrainData):
    """The runner's data for class maps; full batches only (BatchNorm, and deeplabv3's ASPP pooling).

    Attributes:
        data_format: ``"coco"`` or ``"voc"``.
    """

    data_format: str = "coco"

    @property
    def class_names(self) -> list[str]:
        """Name per label, ``"__background__"`` first (the training set's)."""
        return list(self.train_set.class_names)


# ---------------------------------------------------------------------------------------------
# Model and loss


def _cross_entropy(logits: torch.Tensor, masks: torch.Tensor, ignore_index: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    # The (weighted) mean over the counted pixels, as F.cross_entropy's, but 0 and not nan for a batch
    # with none: a crop that fell entirely on ignored pixels must not stop the run as a non-finite loss.
    total = F.cross_entropy(logits.float(), masks, weight=weight, ignore_index=ignore_index, reduction="sum")
    counted = masks != ignore_index
    norm = counted.sum() if weight is None else weight[masks[counted]].sum()
    return total / norm.clamp(min=1e-12) if bool(counted.any()) else total * 0


class SegmentationLoss(nn.Module):
    """A segmenter and its loss as one module: the runner's step calls ``loss_model(images, masks)`` for a loss dict.

    torchvision's criterion: pixel-wise cross-entropy on ``"out"`` plus ``aux_weight``
    times that of ``"aux"`` (when the model has the auxiliary head), ignoring
    ``ignore_index``; with ``class_weights``, the weighted mean of ``F.cross_entropy(weight=...)``.

    Args:
        model: a model from ``build_segmenter``.
        aux_weight: weight of the auxiliary loss (torchvision's 0.5).
        ignore_index: label that adds no loss.
        class_weights: one weight per label (e.g. less for a background that covers
            most pixels), or ``None`` for all equal.
    """

    def __init__(self, model: nn.Module, aux_weight: float = 0.5, ignore_index: int = IGNORE_INDEX,
                 class_weights: list[float] | None = None) -> None:
        super().__init__()
        self.model = model
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weight, persistent=False)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(images)
        losses = {"loss_seg": _cross_entropy(out["out"], masks, self.ignore_index, self.class_weights)}
        if "aux" in out:
            losses["loss_aux"] = self.aux_weight * _cross_entropy(out["aux"], masks, self.ignore_index, self.class_weights)
        return losses


# ---------------------------------------------------------------------------------------------
# The task


class SegmentationTask(runner.Task):
    """DeepLabV3 / FCN / semantic FPN on ResNet-18/34, on COCO-format, VOC or shapes class maps."""

    tool = "tools/train_seg.py"
    model_keys = SEGMENTER_KEYS
    state_file = "segmentation training checkpoint"

    def build_data(self, cfg: dict[str, Any], run: Run) -> SegData:
        root, fmt, train_split, val_split = resolve_seg_data(cfg, is_main=run.is_main, barrier=dist_utils.barrier)
        train_set, val_set = build_seg_datasets(cfg, root, fmt, train_split, val_split, seed=int(cfg["seed"]) * 1000 + run.rank)
        if train_set.class_names != val_set.class_names:
            raise DataPathError(f"the training and validation sets name their labels differently: {train_set.class_names} vs {val_set.class_names}")
        sampler = DistributedSampler(train_set, num_replicas=run.world, rank=run.rank, shuffle=True, seed=int(cfg["seed"]))
        # Full batches only: BatchNorm (and ASPP's pooled branch) needs more than one value per channel.
        batch_sampler = BatchSampler(sampler, cfg["batch_size"], drop_last=True)
        plan = runner.plan_iterations(batch_sampler, cfg)
        if plan[0] == 0:
            raise ConfigError(
                f"{root} ({train_split}) has {len(train_set)} training images: fewer than one batch of {cfg['batch_size']} "
                f"per process ({run.world} processes); lower batch_size"
            )
        return SegData(root, train_set, val_set, sampler, batch_sampler, *plan, collate_fn=collate_fn, data_format=fmt)

    def build_model(self, cfg: dict[str, Any], run: Run, data: SegData) -> tuple[nn.Module, nn.Module]:
        model = build_segmenter(
            cfg["model"], backbone=cfg["backbone"], num_classes=len(data.class_names), weights_backbone=cfg["weights_backbone"],
            output_stride=cfg["output_stride"], aux_loss=cfg["aux_loss"], trainable_layers=cfg["trainable_layers"],
            norm=cfg["norm"], **cfg["model_kwargs"],
        )
        if run.is_main:
            total = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info("%s/%s at output stride %d: %s parameters, %s trainable", cfg["model"], cfg["backbone"],
                        model.build_args["output_stride"], f"{total:,}", f"{trainable:,}")
        weights = cfg["class_weights"]
        if weights is not None and len(weights) != len(data.class_names):
            raise ConfigError(f"class_weights has {len(weights)} weights for {len(data.class_names)} labels ({', '.join(data.class_names[:8])}"
                              f"{', ...' if len(data.class_names) > 8 else ''})")
        return model, SegmentationLoss(model, aux_weight=float(cfg["aux_weight"]), class_weights=weights)

    def prepare_batch(self, batch: Any, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = batch
        pin = run.device.type == "cuda"
        memory_format = torch.channels_last if run.cfg["channels_last"] else torch.contiguous_format
        return images.to(run.device, non_blocking=pin, memory_format=memory_format), masks.to(run.device, non_blocking=pin)

    def model_record(self, state: TrainState, data: SegData, run: Run) -> dict[str, Any]:
        return segmenter_record(state.model, data.class_names)

    def read_checkpoint(self, path: Path) -> dict[str, Any]:
        return read_segmenter_training_state(path)

    def evaluate(self, state: TrainState, data: SegData, run: Run) -> dict[str, float]:
        cfg = run.cfg
        cm = evaluate_segmenter(
            state.model, data.val_set, num_classes=len(data.class_names), device=run.device, batch_size=cfg["val_batch_size"],
            workers=cfg["workers"], amp_dtype=state.amp_dtype if state.amp else None, channels_last=cfg["channels_last"],
            progress=run.progress,
        )
        result = seg_metrics(cm, data.class_names)
        if run.is_main:
            logger.info("evaluation at iteration %d on %d images:\n%s\n%s", state.iteration, cm.images, cm, cm.table(data.class_names))
        return result

    def save_final(self, state: TrainState, data: SegData, run: Run) -> None:
        save_segmenter(state.model, run.out / "model_final.pth", class_names=data.class_names, config=run.cfg, iteration=state.iteration)
        logger.info("wrote %s", run.out / "model_final.pth")

    @torch.no_grad()
    def draw(self, state: TrainState, data: SegData, run: Run, metrics: MetricsLog, final: dict[str, float]) -> None:
        atomic_write_text(run.out / "metrics.json", json.dumps(final, indent=2))
        plot_curves(metrics.path, run.out / "curves.png", eval_suffixes=("/mIoU",), eval_title="validation mIoU (%)")
        state.model.eval()
        names = data.class_names
        for i in range(min(run.cfg["num_vis"], len(data.val_set))):
            image, mask = data.val_set[i]
            prediction = state.model(image[None].to(run.device))["out"].argmax(1)[0].cpu()
            picture = denormalize(image)
            truth, predicted = draw_segmentation(picture, mask, class_names=names), draw_segmentation(picture, prediction, class_names=names)
            gap = torch.full((3, picture.shape[1], 4), 255, dtype=torch.uint8)
            save_image(torch.cat([truth, gap, predicted], dim=2), run.out / "vis" / f"{data.val_set.ids[i]}.png")
        if run.cfg["num_vis"]:
            logger.info("wrote %s/*.png (left: ground truth, right: prediction)", run.out / "vis")

    def describe(self, state: TrainState, data: SegData, run: Run) -> str:
        cfg = run.cfg
        return (f"training {cfg['model']}/{cfg['backbone']} on {data.root} ({data.data_format}): {len(data.train_set)} images, "
                f"{len(data.class_names)} labels, {len(data.val_set)} validation images, {data.iters_per_epoch} iterations/epoch, "
                f"{data.stop_at} planned, batch {cfg['batch_size']} x {run.world}, crop {cfg['crop_size']}, lr {state.lr:.4g}")

    def format_metrics(self, metrics: dict[str, float]) -> str:
        return format_seg_metrics(metrics)


TASK = SegmentationTask()


def check_mask_labels(root: str | Path, split: str, class_names: list[str] | None, *, max_masks: int = 200) -> set[int]:
    """Say before training whether a VOC-layout split's mask labels fit the configured classes.

    Labels that do not fit (a label >= the class count, other than 255) are an error; a set
    that uses far fewer labels than configured (at most half, e.g. 4 labels with VOC's 21
    classes) is a warning naming both numbers: the model would train outputs no pixel has.

    Args:
        root: the VOC-layout folder.
        split: the training split.
        class_names: the configured ``class_names`` (``None``: VOC's 21).
        max_masks: most masks read (spread over the split).

    Returns:
        The labels found.

    Raises:
        ConfigError: a label does not fit the configured classes.
    """
    names = list(class_names or VOC_CLASSES)
    labels, read = scan_mask_labels(root, split, max_masks=max_masks)
    if not labels:
        return labels
    where = "VOC's 21 class names (class_names not set)" if class_names is None else "class_names"
    too_big = sorted(v for v in labels if v >= len(names))
    example = "[" + ",".join(["background", *[f"class{i}" for i in range(1, max(labels) + 1)]][: max(labels) + 1]) + "]"
    if too_big:
        shown = ", ".join(map(str, too_big[:8])) + (", ..." if len(too_big) > 8 else "")
        raise ConfigError(f"{root}: masks of split {split} use label {shown}, which does not fit the {len(names)} configured classes "
                          f"(labels 0..{len(names) - 1} from {where}; 255 is ignored): name every label, background first, "
                          f"e.g. --set 'class_names={example}'")
    used = max(labels) + 1
    if used * 2 <= len(names):
        logger.warning("%s: the %d masks read of split %s use labels up to %d (%d labels) but %d classes are configured (%s): "
                       "the model would train %d outputs that no pixel has; name your labels, e.g. --set 'class_names=%s'",
                       root, read, split, used - 1, used, len(names), where, len(names) - used, example)
    return labels


def preflight_seg(cfg: dict[str, Any], *, resume: str | Path | bool | None = None) -> dict[str, Any]:
    """Check what a segmentation run will read before it starts: device, data layout and splits, weights, resume file.

    Args:
        cfg: a validated segmentation config.
        resume: as for ``train_segmenter``.

    Returns:
        The config with the data format and splits found (unchanged for the shapes set).

    Raises:
        ConfigError: the device is not available.
        DataPathError: the data folder is missing or in neither layout, or a split is missing.
        WeightsError: the backbone weights or the resume checkpoint cannot be used.
        ConfigError: a VOC-layout mask label does not fit the configured classes (a sample of
            masks is read; far fewer labels than classes is a warning, ``check_mask_labels``).
    """
    cfg = dict(cfg)
    if cfg["data_path"] is not None:
        root, cfg["data_format"], cfg["train_split"], cfg["val_split"] = resolve_seg_data(cfg)
        if cfg["data_format"] == "voc":
            check_mask_labels(root, cfg["train_split"], cfg["class_names"])
    check_weights(cfg["weights_backbone"], BACKBONES[cfg["backbone"]])
    runner.preflight(TASK, cfg, resume=resume)
    return cfg


def train_segmenter(
    cfg: dict[str, Any], *, resume: str | Path | bool | None = None, progress: bool = True, hooks: Sequence[runner.Hook] = ()
) -> dict[str, Any]:
    """Train a segmenter as ``cfg`` says (``engine.runner.train`` with the segmentation task).

    Rank 0 writes to ``cfg["output_dir"]``: ``config.yaml``, ``log.txt``, ``metrics.jsonl``,
    ``checkpoint.pth``, ``model_final.pth``, ``metrics.json``, ``curves.png`` and
    ``vis/*.png`` (ground truth and prediction side by side).

    Args:
        cfg: a validated segmentation config (``segmentation.config.SEGMENTATION``).
        resume, progress, hooks: as for ``engine.runner.train`` (``hooks``: your own events' hooks).

    Returns:
        ``{"iteration", "metrics" (the last evaluation), "seconds", "class_names"}``.
    """
    result = runner.train(TASK, cfg, resume=resume, progress=progress, hooks=hooks)
    return {"iteration": result["iteration"], "metrics": result["metrics"], "seconds": result["seconds"],
            "class_names": result["data"].class_names}
