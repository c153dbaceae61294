"""The solver: optimizer (SGD or AdamW, weight-decay groups), warm-up and schedule, AMP, and the model on its device (DDP)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from .setup import Run

__all__ = ["build_amp", "build_optimizer", "build_scheduler", "warmup_length", "wrap_for_training"]


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
        cfg: config with ``optimizer``, ``momentum``, ``weight_decay``,
            ``norm_weight_decay`` / ``bias_weight_decay`` (``None``: ``weight_decay``),
            the decay of normalisation-layer parameters and of biases (0 in modern recipes).
        lr: the already batch-scaled learning rate.
    """
    norm_wd, bias_wd = cfg["norm_weight_decay"], cfg["bias_weight_decay"]
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


def warmup_length(cfg: dict[str, Any], iters_per_epoch: int) -> int:
    """The warm-up in iterations: ``warmup_iters`` plus ``warmup_epochs`` (possibly fractional) epochs.

    Args:
        cfg: config with ``warmup_iters`` and ``warmup_epochs`` (``engine.config.RUN``).
        iters_per_epoch: iterations in one epoch.
    """
    return int(cfg["warmup_iters"]) + int(round(float(cfg["warmup_epochs"]) * iters_per_epoch))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: dict[str, Any], iters_per_epoch: int, total_iters: int, *, warmup_iters: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then multi-step (``lr_steps`` in epochs), cosine or poly decay; stepped per iteration.

    Poly is torchvision's segmentation schedule: the rate falls as ``(1 - t / T) ** 0.9``
    over the ``T`` iterations of the whole schedule, reaching 0 at the end.

    Args:
        optimizer: the optimizer.
        cfg: config with ``scheduler``, ``lr_steps``, ``lr_gamma``, ``warmup_factor`` (and
            ``warmup_iters`` / ``warmup_epochs`` unless ``warmup_iters`` is given).
        iters_per_epoch: iterations in one epoch.
        total_iters: planned iterations of the whole schedule.
        warmup_iters: warm-up length in iterations (default ``warmup_length(cfg, iters_per_epoch)``).
    """
    warmup = min(warmup_length(cfg, iters_per_epoch) if warmup_iters is None else int(warmup_iters), total_iters)
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

