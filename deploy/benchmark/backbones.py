"""Trunk + pyramid rows: our ResNet-18/34 FPN beside torchvision's ``resnet_fpn_backbone``, interleaved in one process."""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from backbones import resnet_fpn
from engine.timing import time_interleaved

from ..fast import optimize_for_inference

__all__ = ["randomise_bn", "torchvision_backbone", "bench_backbones"]

logger = logging.getLogger(__name__)


def torchvision_backbone(depth: int) -> nn.Module:
    return resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, trainable_layers=5, norm_layer=nn.BatchNorm2d)


def randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def bench_backbones(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    shapes = [(16, 224, 224), (1, 800, 1216)] if not args.quick else [(4, 224, 224), (1, args.size, args.size * 3 // 2)]
    for depth in args.depths:
        ours = resnet_fpn(depth).eval().to(device)
        randomise_bn(ours)
        tv = torchvision_backbone(depth).eval().to(device)
        tv.load_state_dict(ours.state_dict())
        detector_like = nn.Module()  # optimize_for_inference works on a detector's .backbone
        detector_like.backbone = ours
        fast_fp32 = optimize_for_inference(detector_like).backbone
        low = torch.bfloat16 if device.type == "cpu" else torch.float16
        fast_low = optimize_for_inference(detector_like, dtype=low).backbone
        fast_low_all = optimize_for_inference(detector_like, dtype=low, autocast_pyramid=True).backbone
        fast_low_trunk = optimize_for_inference(detector_like, dtype=low, autocast_pyramid=False).backbone
        for n, h, w in shapes:
            x = torch.rand(n, 3, h, w, device=device)
            fns = {
                "torchvision": lambda m=tv: m(x),
                "ours": lambda m=ours: m(x),
                "ours fast fp32": lambda m=fast_fp32: m(x),
                f"ours fast {str(low).split('.')[-1]}": lambda m=fast_low: m(x),
                f"ours fast {str(low).split('.')[-1]} + pyramid": lambda m=fast_low_all: m(x),
                f"ours fast {str(low).split('.')[-1]}, fp32 pyramid": lambda m=fast_low_trunk: m(x),
            }
            with torch.no_grad():
                t = time_interleaved(fns, args.reps, args.warmup, device)
            for name, sec in t.items():
                rows.append({"group": "trunk+FPN forward", "case": f"R{depth} {n}x{h}x{w}", "candidate": name,
                             "images_per_s": n / sec, "seconds": sec, "ratio": t["torchvision"] / sec})
