"""RoIAlign rows: our CPU RoIAlign (``detection.ops``) beside torchvision's, forward and backward."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from engine.timing import time_interleaved


__all__ = ["random_boxes", "roi_align_cases", "bench_roi_align"]

logger = logging.getLogger(__name__)


def random_boxes(num: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Boxes with log-uniform sides from 8 px to the image size, clipped to the image."""
    size = torch.tensor([width, height], dtype=torch.float32)
    log_min = torch.log(torch.tensor(8.0))
    side = torch.exp(log_min + torch.rand(num, 2, generator=generator) * (torch.log(size) - log_min))
    centre = torch.rand(num, 2, generator=generator) * size
    low = torch.minimum(torch.maximum(centre - side / 2, torch.zeros(2)), size - 1)
    high = torch.minimum(torch.maximum(centre + side / 2, low + 1), size)
    return torch.cat([low, high], dim=1)


def roi_align_cases(channels: int = 256, seed: int = 0) -> list[tuple[str, Callable[..., torch.Tensor], Callable[..., torch.Tensor], tuple, list[torch.Tensor]]]:
    """``(name, torchvision's call, ours, extra args, feature maps)`` at Faster R-CNN R18-FPN shapes.

    Training: 4 images of 256 px, 512 RoIs each; inference at 800x1216: 1000 RoIs; one
    level at each stride, and the 4-level pooler.

    Args:
        channels: feature channels.
        seed: for the features and boxes.
    """
    import torchvision
    from collections import OrderedDict

    from detection.ops import MultiScaleRoIAlign, roi_align

    gen = torch.Generator().manual_seed(seed)
    cases: list[tuple[str, Callable[..., torch.Tensor], Callable[..., torch.Tensor], tuple, list[torch.Tensor]]] = []

    def single(name: str, images: int, height: int, width: int, rois_per_image: int, stride: int) -> None:
        feats = torch.randn(images, channels, height // stride, width // stride, generator=gen)
        boxes = [random_boxes(rois_per_image, height, width, gen) for _ in range(images)]
        cases.append((name, torchvision.ops.roi_align, roi_align, (boxes, 7, 1.0 / stride, 2, False), [feats]))

    def pyramid(name: str, images: int, height: int, width: int, rois_per_image: int) -> None:
        feats = OrderedDict((str(i), torch.randn(images, channels, height // s, width // s, generator=gen)) for i, s in enumerate((4, 8, 16, 32)))
        boxes = [random_boxes(rois_per_image, height, width, gen) for _ in range(images)]
        ref, ours = torchvision.ops.MultiScaleRoIAlign(list(feats), 7, 2), MultiScaleRoIAlign(list(feats), 7, 2)
        shapes = [(height, width)] * images
        cases.append((name, lambda *levels: ref(OrderedDict(zip(feats, levels)), boxes, shapes),
                      lambda *levels: ours(OrderedDict(zip(feats, levels)), boxes, shapes), (), list(feats.values())))

    single("train  4x256x64x64, 2048 RoIs (stride 4)", 4, 256, 256, 512, 4)
    single("infer  1x256x200x304, 1000 RoIs (stride 4)", 1, 800, 1216, 1000, 4)
    single("infer  1x256x100x152, 1000 RoIs (stride 8)", 1, 800, 1216, 1000, 8)
    single("infer  1x256x50x76, 1000 RoIs (stride 16)", 1, 800, 1216, 1000, 16)
    single("infer  1x256x25x38, 1000 RoIs (stride 32)", 1, 800, 1216, 1000, 32)
    pyramid("train  pooler, 4 levels, 4 img 256 px, 2048 RoIs", 4, 256, 256, 512)
    pyramid("infer  pooler, 4 levels, 1 img 800x1216, 1000 RoIs", 1, 800, 1216, 1000)
    return cases


def bench_roi_align(*, channels: int = 256, reps: int = 5, only: str = "") -> list[dict[str, Any]]:
    """Forward and forward + backward of torchvision's RoIAlign and ours, interleaved; medians in ms and the largest differences.

    Args:
        channels: feature channels.
        reps: timed runs per measurement.
        only: run only cases whose name contains this.
    """
    rows = []
    cpu = torch.device("cpu")
    for name, ref_fn, our_fn, call, inputs in roi_align_cases(channels):
        if only not in name:
            continue
        leaves = [t.clone().requires_grad_() for t in inputs]
        upstream = torch.randn_like(ref_fn(*inputs, *call), memory_format=torch.contiguous_format)

        def forward_backward(fn: Callable[..., torch.Tensor]) -> Callable[[], Any]:
            return lambda: torch.autograd.grad(fn(*leaves, *call), leaves, upstream)

        with torch.no_grad():
            fwd = time_interleaved({"ref": lambda: ref_fn(*inputs, *call), "ours": lambda: our_fn(*inputs, *call)}, reps, 1, cpu)
        fb = time_interleaved({"ref": forward_backward(ref_fn), "ours": forward_backward(our_fn)}, reps, 1, cpu)
        out_ref, out_our = ref_fn(*leaves, *call), our_fn(*leaves, *call)
        grad_ref = torch.autograd.grad(out_ref, leaves, upstream)
        grad_our = torch.autograd.grad(out_our, leaves, upstream)
        rows.append({
            "case": name, "ref_fwd_ms": fwd["ref"] * 1e3, "ours_fwd_ms": fwd["ours"] * 1e3,
            "ref_fwd_bwd_ms": fb["ref"] * 1e3, "ours_fwd_bwd_ms": fb["ours"] * 1e3,
            "max_diff_fwd": (out_ref - out_our).abs().max().item(),
            "max_diff_bwd": max((a - b).abs().max().item() for a, b in zip(grad_ref, grad_our)),
        })
    return rows
