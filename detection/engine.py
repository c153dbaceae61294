"""Training loop: optimiser and schedule, AMP, DDP, atomic checkpoints, resume, logging.

Modelled on torchvision's ``references/detection`` (train.py + engine.py) with what
long runs need on top: iteration-exact resume, a guard against non-finite losses that
names the bad term, checkpoints that survive a kill, and curves at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import distributed as dist_utils
from .checkpoint import atomic_save, read_checkpoint
from .config import save_config
from .data import CocoDetection, GroupedBatchSampler, build_transforms, collate_fn, create_aspect_ratio_groups, shapes
from .evaluation import evaluate, format_metrics, format_per_category
from .models import build_detector
from .visualize import draw_detections, plot_curves, save_image

__all__ = [
    "build_optimizer",
    "build_scheduler",
    "prepare_data_root",
    "shapes_cache_dir",
    "train",
    "NonFiniteLossError",
]

log = logging.getLogger("resfpn")


class NonFiniteLossError(FloatingPointError):
    """Training produced non-finite losses too many times in a row."""


def shapes_cache_dir(cfg: dict[str, Any]) -> Path:
    """Where the built-in shapes data set for ``cfg`` is generated (``$RESFPN_CACHE`` or ~/.cache/resfpn)."""
    base = Path(os.environ.get("RESFPN_CACHE", Path.home() / ".cache" / "resfpn"))
    name = f"shapes-{cfg['shapes_size']}px-{cfg['shapes_train']}-{cfg['shapes_val']}-seed{cfg['shapes_seed']}"
    return base / name


def prepare_data_root(cfg: dict[str, Any]) -> tuple[Path, str, str]:
    """Return ``(root, train_split, val_split)``; generates the shapes set once when no data path is set.

    Args:
        cfg: the run's config.
    """
    if cfg["data_path"] is not None:
        root = Path(cfg["data_path"])
        if not root.is_dir():
            raise FileNotFoundError(f"data path {root} does not exist (expected ROOT/annotations/instances_<split>.json and ROOT/<split>/)")
        return root, cfg["train_split"], cfg["val_split"]
    root = shapes_cache_dir(cfg)
    if dist_utils.is_main_process() and not (root / "annotations" / "instances_val.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        # Generate beside the target and rename, so an interrupted run never leaves half a data set.
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
        try:
            log.info("generating the shapes data set in %s", root)
            shapes.generate(tmp, num_train=cfg["shapes_train"], num_val=cfg["shapes_val"], image_size=cfg["shapes_size"], seed=cfg["shapes_seed"])
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    dist_utils.barrier()
    return root, "train", "val"


def build_optimizer(model: nn.Module, cfg: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters.

    Args:
        model: the model.
        cfg: config with ``optimizer``, ``momentum``, ``weight_decay``.
        lr: the already batch-scaled learning rate.
    """
    params = [p for p in model.parameters() if p.requires_grad]
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


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


def _setup_logging(output_dir: Path) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    if dist_utils.is_main_process():
        fh = logging.FileHandler(output_dir / "log.txt")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
    log.propagate = False


def _tensorboard(output_dir: Path) -> Any:
    if not dist_utils.is_main_process():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output_dir / "tensorboard"))


def _checkpoint_state(model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, epoch: int, iteration: int, cfg: dict, mapping: dict) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "iteration": iteration,
        "config": cfg,
        "build_args": model.build_args,
        "category_mapping": mapping,
    }


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: dict[str, Any], *, resume: str | os.PathLike | bool | None = None, progress: bool = True) -> dict[str, Any]:
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
    device = dist_utils.init_distributed(cfg["device"])
    rank, world = dist_utils.rank(), dist_utils.world_size()
    _seed_everything(int(cfg["seed"]) + rank)
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(cfg["output_dir"])
    if dist_utils.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    dist_utils.barrier()
    _setup_logging(out)

    root, train_split, val_split = prepare_data_root(cfg)
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
    mapping = train_set.category_mapping()

    model = build_detector(
        cfg["model"], backbone=cfg["backbone"], num_classes=train_set.num_classes,
        weights_backbone=None if cfg["weights_backbone"] in (None, "none") else cfg["weights_backbone"],
        trainable_layers=cfg["trainable_layers"], returned_layers=cfg["returned_layers"],
        min_size=model_min_size, max_size=cfg["max_size"], norm=cfg["norm"], **cfg["model_kwargs"],
    )
    model.to(device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    train_model: nn.Module = model
    if world > 1:
        if device.type == "cuda" and cfg["sync_bn"]:
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=int(cfg["seed"]))
    batch_sampler = GroupedBatchSampler(sampler, create_aspect_ratio_groups(train_set.aspect_ratios(), k=3), cfg["batch_size"])
    # Ranks must agree on the iteration count or DDP would wait forever at the end of an epoch.
    iters_per_epoch = dist_utils.all_reduce_min(len(batch_sampler))
    total_iters = iters_per_epoch * cfg["epochs"]
    stop_at = min(total_iters, cfg["max_iters"]) if cfg["max_iters"] else total_iters
    total_batch = cfg["batch_size"] * world
    lr = cfg["lr"] * total_batch / cfg["lr_reference_batch"]
    optimizer = build_optimizer(model, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, iters_per_epoch, total_iters)
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg["amp_dtype"] or "", None)
    if amp_dtype is None:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    use_scaler = bool(cfg["amp"]) and device.type == "cuda" and amp_dtype == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    iteration = 0
    if resume:
        ckpt_path = Path(resume) if not isinstance(resume, bool) else out / "checkpoint.pth"
        ckpt = read_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        iteration = int(ckpt["iteration"])
        log.info("resumed from %s at iteration %d", ckpt_path, iteration)

    metrics_path = out / "metrics.jsonl"
    writer = _tensorboard(out)
    if dist_utils.is_main_process():
        log.info("training %s/%s on %s: %d images, %d classes, %d iterations/epoch, %d planned, batch %d x %d, lr %.4g",
                 cfg["model"], cfg["backbone"], root, len(train_set), train_set.num_classes - 1, iters_per_epoch, stop_at, cfg["batch_size"], world, lr)
    pin = device.type == "cuda"
    last_metrics: dict[str, Any] = {}
    bad_in_a_row = 0
    window: dict[str, list[float]] = defaultdict(list)
    t_window = time.perf_counter()
    data_time = 0.0
    bar = tqdm(total=stop_at, initial=iteration, desc="train", disable=not progress or rank != 0, dynamic_ncols=True)

    def save_checkpoint(epoch: int) -> None:
        if dist_utils.is_main_process():
            atomic_save(_checkpoint_state(model, optimizer, scheduler, scaler, epoch, iteration, cfg, mapping), out / "checkpoint.pth")

    def run_eval(epoch: int) -> None:
        nonlocal last_metrics
        result = evaluate(model, val_set, label_to_cat_id=train_set.label_to_cat_id, device=device, output_dir=out, progress=progress)
        if dist_utils.is_main_process():
            last_metrics = result["metrics"]
            _append_jsonl(metrics_path, {"iter": iteration, "epoch": epoch, **last_metrics})
            for iou_type, text in result["summaries"].items():
                log.info("evaluation at iteration %d (%s):\n%s\n%s", iteration, iou_type, text,
                         format_per_category(result["per_category"][iou_type], iou_type))
            if writer is not None:
                for k, v in last_metrics.items():
                    if v is not None:
                        writer.add_scalar(k, v, iteration)
        model.train()

    start_epoch = iteration // iters_per_epoch if iters_per_epoch else 0
    train_model.train()
    epoch = start_epoch
    for epoch in range(start_epoch, cfg["epochs"]):
        if iteration >= stop_at:
            break
        sampler.set_epoch(epoch)
        skip = iteration - epoch * iters_per_epoch
        generator = torch.Generator().manual_seed(int(cfg["seed"]) * 1000 + epoch * 10 + rank)
        loader = DataLoader(
            train_set, batch_sampler=_EpochBatches(batch_sampler, skip, iters_per_epoch), num_workers=cfg["workers"],
            collate_fn=collate_fn, pin_memory=pin, worker_init_fn=_worker_init, generator=generator,
            persistent_workers=False,
        )
        t_data = time.perf_counter()
        for images, targets in loader:
            data_time += time.perf_counter() - t_data
            images = [img.to(device, non_blocking=pin) for img in images]
            targets = [{k: v.to(device, non_blocking=pin) for k, v in t.items()} for t in targets]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=bool(cfg["amp"])):
                loss_dict = train_model(images, targets)
            loss_dict = {k: v.float() for k, v in loss_dict.items()}
            loss = sum(loss_dict.values())
            finite = torch.isfinite(loss).item()
            # Every rank must take the same decision, or DDP's all-reduce would hang.
            all_finite = dist_utils.all_reduce_min(int(finite)) == 1
            optimizer.zero_grad(set_to_none=True)
            if not all_finite:
                bad = [k for k, v in loss_dict.items() if not torch.isfinite(v)] or ["(another rank's loss)"]
                bad_in_a_row += 1
                warnings.warn(f"non-finite loss at iteration {iteration} in {', '.join(bad)}; step skipped ({bad_in_a_row} in a row)")
                log.warning("non-finite loss at iteration %d in %s; step skipped", iteration, ", ".join(bad))
                if bad_in_a_row >= cfg["max_nonfinite"]:
                    raise NonFiniteLossError(
                        f"{bad_in_a_row} non-finite losses in a row, last at iteration {iteration} in {', '.join(bad)}: "
                        "lower the learning rate, add warm-up or gradient clipping (clip_grad_norm)"
                    )
            else:
                bad_in_a_row = 0
                scaler.scale(loss).backward()
                if cfg["clip_grad_norm"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["clip_grad_norm"]))
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
            iteration += 1
            if all_finite:
                window["loss"].append(loss.item())
                for k, v in loss_dict.items():
                    window[k].append(v.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")

            if iteration % cfg["log_period"] == 0 or iteration == stop_at:
                elapsed = time.perf_counter() - t_window
                n = max(len(window["loss"]), 1)
                record = {"iter": iteration, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
                record.update({k: float(np.mean(v)) for k, v in window.items() if v})
                record.update({
                    "seconds_per_iter": elapsed / n, "data_seconds_per_iter": data_time / n,
                    "images_per_s": n * total_batch / max(elapsed, 1e-9),
                    "eta_s": (stop_at - iteration) * elapsed / n,
                })
                if dist_utils.is_main_process():
                    _append_jsonl(metrics_path, record)
                    log.info("iter %d/%d %s", iteration, stop_at, " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
                    if writer is not None:
                        for k, v in record.items():
                            writer.add_scalar(f"train/{k}", v, iteration)
                window.clear()
                data_time = 0.0
                t_window = time.perf_counter()
            if iteration % cfg["checkpoint_period"] == 0:
                save_checkpoint(epoch)
            if iteration >= stop_at:
                break
            t_data = time.perf_counter()
        skipped = train_set.num_skipped
        if skipped and dist_utils.is_main_process():
            log.warning("epoch %d: %d unreadable images were skipped: %s", epoch, skipped, ", ".join(train_set.skipped_files[:10]))
            warnings.warn(f"epoch {epoch}: {skipped} unreadable training images were skipped (see log.txt)")
        train_set.reset_skipped()
        epoch_done = iteration == (epoch + 1) * iters_per_epoch
        save_checkpoint(epoch + 1 if epoch_done else epoch)
        is_last = iteration >= stop_at
        if cfg["eval_period"] and epoch_done and (epoch + 1) % cfg["eval_period"] == 0 and not is_last:
            run_eval(epoch + 1)
    bar.close()

    run_eval(epoch + 1)
    if dist_utils.is_main_process():
        atomic_save({"model": model.state_dict(), "build_args": model.build_args, "category_mapping": mapping, "config": cfg, "iteration": iteration}, out / "model_final.pth")
        plot_curves(metrics_path, out / "curves.png")
        _draw_examples(model, val_set, train_set.class_names, device, out / "vis", cfg["num_vis"])
        log.info("done: %d iterations in %.1f s; %s", iteration, time.perf_counter() - t_start, format_metrics(last_metrics))
    if writer is not None:
        writer.close()
    dist_utils.barrier()
    return {"iteration": iteration, "metrics": last_metrics, "seconds": time.perf_counter() - t_start}


@torch.no_grad()
def _draw_examples(model: nn.Module, dataset: CocoDetection, class_names: list[str], device: torch.device, out_dir: Path, count: int) -> None:
    model.eval()
    for i in range(min(count, len(dataset))):
        image, target = dataset[i]
        det = model([image.to(device)])[0]
        save_image(draw_detections(image, det, class_names, min_side=384), out_dir / f"{int(target['image_id'])}.png")
