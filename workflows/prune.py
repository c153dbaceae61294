"""Prune -> fine-tune: a detector file in, a pruned (and fine-tuned) detector file out; what ``tools/prune.py`` does.

A workflow above the tasks: it reads and writes detector files (``detection.checkpoint``),
prunes with ``detection.pruning``'s algorithm, reads calibration images with the detection
data set and fine-tunes with the detection trainer. ``detection.pruning`` itself is the
algorithm on a model in memory; the channel plan a pruned file stores is
``engine.channels``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from detection.checkpoint import load_detector, save_detector
from detection.config import DEFAULTS, DETECTION, ConfigError, apply_overrides
from detection.data import CocoDetection, collate_fn
from detection.models import count_parameters, has_masks
from detection.pruning import MAC_SIZE, PrunedGroup, check_prune_args, count_macs, prune_detector, step_ratios
from detection.training import preflight, train
from engine.files import atomic_write, read_torch_file
from engine.roots import prepare_data_root

__all__ = ["PruneSummary", "calibration_batches", "finetune_config", "iterative_prune", "prune_checkpoint"]

logger = logging.getLogger(__name__)


@dataclass
class PruneSummary:
    """One prune of a checkpoint: what went in, what came out.

    Attributes:
        output: the pruned file.
        params: ``(before, after)`` parameter counts.
        macs: ``(before, after)`` of ``count_macs`` at ``mac_size``.
        mac_size: ``(height, width)`` the MACs are for.
        groups: the groups of coupled channels (``PrunedGroup``).
        rois: the box head's RoI count in ``macs`` (R-CNNs), else ``None``.
    """

    output: Any
    params: tuple[int, int]
    macs: tuple[dict[str, float], dict[str, float]]
    mac_size: tuple[int, int]
    groups: list[PrunedGroup]
    rois: int | None = None


def _training_config(config: Mapping[str, Any] | None, data_path: str | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {**DEFAULTS, **dict(config or {})}
    if data_path is not None:
        cfg.update(data_path=str(data_path), train_split=None, val_split=None)
    return cfg


def calibration_batches(
    config: Mapping[str, Any] | None,
    *,
    data_path: str | None = None,
    images: int = 16,
    batch_size: int = 2,
    masks: bool = False,
) -> list[tuple[list[Tensor], list[dict[str, Tensor]]]]:
    """Training batches for data-aware importance (``"taylor"``): images spread evenly over the training split.

    Args:
        config: the checkpoint's training config (its data; the shapes set when it has no
            ``data_path``).
        data_path: a COCO-layout root to read instead.
        images: how many images (the split's size if smaller).
        batch_size: images per batch.
        masks: read instance masks (Mask R-CNN's loss needs them).

    Raises:
        ValueError: no training data is known, or the split has no usable image.
    """
    if config is None and data_path is None:
        raise ValueError("importance 'taylor' needs training images and the checkpoint records no training data: pass --data-path DIR")
    cfg = _training_config(config, data_path)
    root, split, _ = prepare_data_root(cfg)
    dataset = CocoDetection(root, split, masks=masks, drop_empty=True, exif_transpose=cfg["exif_transpose"])
    if len(dataset) == 0:
        raise ValueError(f"importance 'taylor' needs training images with objects, and {root}/{split} has none")
    n = min(images, len(dataset))
    indices = sorted({int(i * len(dataset) / n) for i in range(n)})
    samples = [dataset[i] for i in indices]
    return [collate_fn(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def prune_checkpoint(
    checkpoint: Any,
    output: Any,
    *,
    ratio: float,
    scope: str = "all",
    importance: str = "l1",
    data_path: str | None = None,
    calib_images: int = 16,
    round_to: int = 1,
    mac_size: tuple[int, int] = MAC_SIZE,
) -> PruneSummary:
    """Prune a detector file and write the pruned one (atomically): ``tools/prune.py`` without fine-tuning.

    The pruned file keeps the source's category mapping and training config (so
    ``eval_coco.py`` finds the data and ``--finetune`` the recipe) and adds its channel plan.

    Args:
        checkpoint: ``model_final.pth`` / ``checkpoint.pth`` (pruned before or not).
        output: the pruned file.
        ratio: as ``prune_detector``.
        scope: as ``prune_detector``.
        importance: as ``prune_detector``; ``"taylor"`` reads ``calib_images`` training images.
        data_path: the training data for ``"taylor"`` (default the checkpoint's).
        calib_images: how many training images ``"taylor"`` scores on.
        round_to: as ``prune_detector``.
        mac_size: the network input the MACs are counted at.

    Raises:
        CheckpointError: the file is not a detector checkpoint (or does not rebuild one).
        ValueError: as ``prune_detector``.
    """
    check_prune_args(ratio=ratio, scope=scope, importance=importance, round_to=round_to)
    model = load_detector(checkpoint)
    batches = None
    if importance == "taylor":
        batches = calibration_batches(model.train_config, data_path=data_path, images=calib_images, masks=has_masks(model))
    before = (count_parameters(model)[0], count_macs(model, mac_size))
    result = prune_detector(model, ratio=ratio, scope=scope, importance=importance, batches=batches, round_to=round_to, inplace=True)
    after = (count_parameters(result.model)[0], count_macs(result.model, mac_size))
    written = save_detector(result.model, output, category_mapping=model.category_mapping, config=model.train_config)
    rois = int(model.rpn._post_nms_top_n["testing"]) if hasattr(model, "rpn") else None
    return PruneSummary(written, (before[0], after[0]), (before[1], after[1]), tuple(mac_size), result.groups, rois)


def finetune_config(
    train_config: Mapping[str, Any] | None,
    *,
    init_checkpoint: Any,
    output_dir: Any,
    epochs: int,
    lr_scale: float = 0.1,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """The fine-tuning run of a pruned model: its original recipe, fewer epochs, a lower learning rate.

    Args:
        train_config: the training config the model was trained with (stored in its checkpoint).
        init_checkpoint: the pruned file to start from.
        output_dir: the fine-tuning run's folder.
        epochs: epochs of fine-tuning.
        lr_scale: the recipe's learning rate times this.
        overrides: ``key=value`` strings applied last (``tools/train_det.py --set``).

    Raises:
        ConfigError: no recipe is recorded, or an override or value is invalid.
    """
    if not train_config:
        raise ConfigError("the checkpoint records no training config, so there is no recipe to fine-tune with: fine-tune with "
                          "tools/train_det.py --config RECIPE --init-checkpoint PRUNED.pth")
    if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not 0 < lr_scale <= 1:
        raise ConfigError(f"the fine-tuning learning-rate scale must be a number in (0, 1], got {lr_scale!r}")
    cfg = {k: v for k, v in dict(train_config).items() if k in DETECTION.defaults}
    cfg = {**DETECTION.defaults, **cfg}
    return apply_overrides(cfg, overrides, init_checkpoint=str(init_checkpoint), output_dir=str(output_dir), epochs=epochs,
                           lr=float(cfg["lr"]) * lr_scale)


def iterative_prune(
    checkpoint: Any,
    output: Any,
    *,
    ratio: float,
    steps: int,
    finetune_epochs: int,
    work_dir: Any,
    scope: str = "all",
    importance: str = "l1",
    data_path: str | None = None,
    calib_images: int = 16,
    round_to: int = 1,
    lr_scale: float = 0.1,
    overrides: Sequence[str] = (),
    mac_size: tuple[int, int] = MAC_SIZE,
    progress: bool = True,
) -> list[PruneSummary]:
    """Prune -> fine-tune, ``steps`` times, each step removing the same fraction of what is left; resumable.

    Step ``k`` writes ``work_dir/step{k}_pruned.pth`` and fine-tunes it with the detection
    trainer into ``work_dir/step{k}/`` (``finetune_config``); the last fine-tuned
    ``model_final.pth`` is copied to ``output``. Run again after an interruption, it skips
    finished steps and resumes a fine-tuning run from its ``checkpoint.pth``.

    Args:
        checkpoint: the trained detector file.
        output: the final pruned, fine-tuned file.
        ratio: overall fraction of each group's channels to remove.
        steps: prune/fine-tune rounds (``step_ratios``).
        finetune_epochs: epochs of each fine-tuning run.
        work_dir: where the steps' files and runs go.
        scope, importance, data_path, calib_images, round_to, mac_size: as ``prune_checkpoint``.
        lr_scale, overrides: as ``finetune_config``.
        progress: progress bars in the fine-tuning runs.

    Returns:
        One ``PruneSummary`` per step pruned in this call.
    """
    work = Path(work_dir)
    summaries = []
    source = Path(checkpoint)
    train_config = read_torch_file(source).get("config")
    for k, step_ratio in enumerate(step_ratios(ratio, steps), start=1):
        pruned, run_dir = work / f"step{k}_pruned.pth", work / f"step{k}"
        final = run_dir / "model_final.pth"
        if not final.is_file():
            if not pruned.is_file():
                logger.info("step %d/%d: pruning %s by %.4g", k, steps, source, step_ratio)
                summaries.append(prune_checkpoint(source, pruned, ratio=step_ratio, scope=scope, importance=importance,
                                                  data_path=data_path, calib_images=calib_images, round_to=round_to, mac_size=mac_size))
            cfg = finetune_config(train_config, init_checkpoint=pruned, output_dir=run_dir, epochs=finetune_epochs,
                                  lr_scale=lr_scale, overrides=overrides)
            resume = (run_dir / "checkpoint.pth").is_file() or None
            logger.info("step %d/%d: fine-tuning %s for %d epochs%s", k, steps, pruned, finetune_epochs, " (resuming)" if resume else "")
            train(preflight(cfg, resume=resume), resume=resume, progress=progress)
        source = final
    atomic_write(output, lambda f: f.write(Path(source).read_bytes()))
    return summaries
