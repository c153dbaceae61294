"""COCO mAP (bbox, and segm for Mask R-CNN) of a trained checkpoint, with pycocotools.

    python tools/eval_coco.py --checkpoint outputs/run/model_final.pth                   # shapes val
    python tools/eval_coco.py --checkpoint model_final.pth --data-path /data/coco --split val2017
    torchrun --nproc_per_node=8 tools/eval_coco.py --checkpoint ... --data-path /data/coco
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from backbones.weights import WeightsError
from detection import distributed as dist_utils
from detection.checkpoint import read_checkpoint
from detection.config import DEFAULTS, ConfigError
from detection.data import CocoDetection, label_to_cat_id_from_mapping
from detection.engine import prepare_data_root
from detection.evaluation import EVALUATORS, evaluate, format_metrics, format_per_category
from detection.models import load_detector


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model_final.pth or checkpoint.pth from train_det.py")
    p.add_argument("--data-path", help="COCO-layout root; omitted: the shapes set the checkpoint was trained on")
    p.add_argument("--split", help="split to evaluate (default: the checkpoint's val_split, val for shapes)")
    p.add_argument("--output-dir", help="where to write detections_*.json and metrics.json (default: beside the checkpoint)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--evaluator", choices=list(EVALUATORS), default="pycocotools")
    p.add_argument("--fast", action="store_true", help="BN folding + channels-last (+ --dtype) inference path")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="with --fast: trunk/pyramid precision")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ckpt_path = Path(args.checkpoint)
    if not ckpt_path.is_file():
        print(f"error: checkpoint {ckpt_path} not found", file=sys.stderr)
        return 2
    try:
        device = dist_utils.init_distributed(args.device)
        ckpt = read_checkpoint(ckpt_path)
        model = load_detector(ckpt, device=str(device))
        cfg = dict(DEFAULTS)
        cfg.update(ckpt.get("config") or {})
        if args.data_path is not None:
            cfg["data_path"] = args.data_path
        root, _, default_split = prepare_data_root(cfg)
        split = args.split or default_split
        # Ground-truth masks are read by COCOeval from the annotation file, not from the loader.
        dataset = CocoDetection(root, split, masks=False)
    except (WeightsError, ValueError, FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mapping = model.category_mapping
    label_to_cat_id = label_to_cat_id_from_mapping(mapping) if mapping else None
    if args.fast:
        from detection.fast import optimize_for_inference

        dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
        model = optimize_for_inference(model, dtype=dtype)
    out_dir = Path(args.output_dir) if args.output_dir else ckpt_path.parent / f"eval_{split}"
    result = evaluate(
        model, dataset, label_to_cat_id=label_to_cat_id, device=device, output_dir=out_dir,
        batch_size=args.batch_size, workers=args.workers, evaluator=args.evaluator,
        progress=not args.no_progress,
    )
    if dist_utils.is_main_process():
        for iou_type, text in result["summaries"].items():
            print(f"\n{iou_type}:\n{text}\n")
            print(format_per_category(result["per_category"][iou_type], iou_type))
        print("\n" + format_metrics(result["metrics"]))
        sec = result["seconds"]
        print(f"inference {sec['inference']:.1f} s ({len(dataset) / max(sec['inference'], 1e-9):.1f} images/s), COCOeval {sec['coco_eval']:.2f} s; wrote {out_dir}")
    dist_utils.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
