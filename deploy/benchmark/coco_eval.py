"""COCO evaluation rows: pycocotools beside faster-coco-eval on the same detections."""

from __future__ import annotations

import argparse
import logging

import torch

from detection.evaluation import coco_evaluate
from engine.timing import time_interleaved


__all__ = ["bench_coco_eval"]

logger = logging.getLogger(__name__)


def bench_coco_eval(args: argparse.Namespace, rows: list[dict]) -> None:
    from pycocotools.coco import COCO

    g = torch.Generator().manual_seed(0)
    n_img, n_cat = (500, 20) if not args.quick else (100, 10)
    images, anns, dets = [], [], []
    for i in range(1, n_img + 1):
        images.append({"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"})
        for _ in range(8):
            x, y = (torch.rand(2, generator=g) * 500).tolist()
            w, h = (torch.rand(2, generator=g) * 120 + 4).tolist()
            c = int(torch.randint(1, n_cat + 1, (1,), generator=g))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            for _ in range(3):
                jx, jy = (torch.randn(2, generator=g) * 6).tolist()
                dets.append({"image_id": i, "category_id": c, "bbox": [x + jx, y + jy, w, h], "score": float(torch.rand(1, generator=g))})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in range(1, n_cat + 1)]}
    gt.createIndex()
    evaluators = ["pycocotools"]
    try:
        import faster_coco_eval  # noqa: F401

        evaluators.append("faster")
    except ImportError:
        pass
    t = time_interleaved({e: (lambda e=e: coco_evaluate(gt, dets, "bbox", evaluator=e)) for e in evaluators}, max(args.reps // 2, 2), 0, torch.device("cpu"))
    for name, sec in t.items():
        rows.append({"group": "COCO evaluation", "case": f"{len(dets)} bbox detections on {n_img} images", "candidate": name,
                     "images_per_s": n_img / sec, "seconds": sec, "ratio": t["pycocotools"] / sec})
