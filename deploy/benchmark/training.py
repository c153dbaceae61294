"""Training rows: one Faster R-CNN iteration, ours beside torchvision's, with and without AMP."""

from __future__ import annotations

import argparse
import logging

import torch

from engine.timing import time_interleaved


from .detectors import detector_pairs

__all__ = ["bench_training"]

logger = logging.getLogger(__name__)


def bench_training(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    n, side = (4, 256) if not args.quick else (2, args.size)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, side, side, generator=g).to(device) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(4, 2, generator=g) * side * 0.6
        wh = torch.rand(4, 2, generator=g) * side * 0.3 + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device), "labels": torch.randint(1, 91, (4,), generator=g).to(device)})
    for depth in args.depths:
        models = detector_pairs("faster_rcnn", depth, (side, side), fixed_work=False)
        models["ours --amp"] = models["ours"]
        opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9) for k, m in models.items()}

        def step(name: str) -> None:
            model = models[name].to(device).train()
            with torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16, enabled=name.endswith("--amp")):
                loss = sum(model(images, targets).values())
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()

        t = time_interleaved({k: (lambda k=k: step(k)) for k in models}, max(args.reps // 2, 2), 1, device)
        for name, sec in t.items():
            rows.append({"group": "training iteration", "case": f"faster_rcnn R{depth} {n}x{side}x{side}", "candidate": name,
                         "images_per_s": n / sec, "seconds": sec, "ratio": t["torchvision"] / sec})
