"""COCO mAP (bbox, and segm for Mask R-CNN) of a trained model, with pycocotools.

    python tools/eval_coco.py --checkpoint outputs/run/model_final.pth                   # shapes val
    python tools/eval_coco.py --checkpoint model_final.pth --data-path /data/coco --split val2017
    python tools/eval_coco.py --checkpoint model.onnx --runtime onnxruntime             # the deployed file itself
    python tools/eval_coco.py --checkpoint model_final.pth --proposals 300              # fewer RoIs, no retraining
    torchrun --nproc_per_node=8 tools/eval_coco.py --checkpoint ... --data-path /data/coco
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli import DTYPES, USER_ERRORS, add_eval_flags, fail, parse_dtype, run_tool
from detection.evaluation import EVALUATORS
from deploy.files import add_runtime_args
from detection.postprocess import add_test_option_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model_final.pth / checkpoint.pth from train_det.py, or an exported .onnx (TorchScript .pt with --runtime torchscript)")
    add_runtime_args(p)
    add_eval_flags(p, data="COCO-layout root; omitted: the data the model was trained on (shapes: regenerated if needed)",
                   split="split to evaluate (default: the training run's val split, or the one *val* split found)",
                   output_dir="where to write detections_*.json and metrics.json (default: beside the checkpoint)", amp=False)
    p.add_argument("--evaluator", choices=list(EVALUATORS), default="pycocotools")
    p.add_argument("--fast", action="store_true", help="PyTorch: BN folding + channels-last (+ --dtype) inference path")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="with --fast: trunk precision")
    add_test_option_args(p)  # PyTorch checkpoints; an exported file has them baked in
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda _: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
    from engine import distributed as dist_utils
    from detection.config import DEFAULTS
    from detection.data import CocoDetection
    from engine.roots import evaluation_data
    from detection.evaluation import evaluate, format_metrics, format_per_category
    from deploy.files import check_exported_flags
    from deploy.opening import open_model
    from deploy.predictor import Predictor
    from detection.postprocess import parse_test_options, set_test_options

    path = Path(args.checkpoint)
    try:
        if args.batch_size < 1 or args.workers < 0:
            raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
        test_options = parse_test_options(args)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        opened = open_model(path, task="detection", runtime=args.runtime, device=args.device, precision=args.precision)
        if opened.exported:
            check_exported_flags(path, device=args.device, test_options=test_options, use="evaluate")
        device = str(dist_utils.init_distributed("cpu" if opened.exported else str(opened.device)))  # under torchrun: this rank's
        predictor = Predictor(opened.moved_to(device), fast=args.fast, dtype=parse_dtype(args.dtype))
        set_test_options(predictor.model, test_options)
        train_config = getattr(predictor.model, "train_config", None)
        if args.data_path is None and not train_config:
            raise FileNotFoundError(f"{path} does not record its training data: pass --data-path (and --split)")
        cfg = {**DEFAULTS, **(train_config or {})}
        root, split = evaluation_data(cfg, data_path=args.data_path, split=args.split)
        # Ground-truth masks are read by COCOeval from the annotation file, not from the loader.
        dataset = CocoDetection(root, split, masks=False, exif_transpose=cfg.get("exif_transpose", True))
    except (*USER_ERRORS, ValueError, ImportError) as e:
        return fail(e)
    out_dir = Path(args.output_dir) if args.output_dir else path.parent / f"eval_{split}"
    result = evaluate(
        predictor.model, dataset, label_to_cat_id=predictor.label_to_cat_id, device=device, output_dir=out_dir,
        batch_size=args.batch_size, workers=args.workers, evaluator=args.evaluator, progress=not args.no_progress,
    )
    if dist_utils.is_main_process():
        for iou_type, text in result["summaries"].items():
            print(f"\n{iou_type}:\n{text}\n")
            print(format_per_category(result["per_category"][iou_type], iou_type))
        print("\n" + format_metrics(result["metrics"]))
        sec = result["seconds"]
        print(f"inference {sec['inference']:.1f} s ({len(dataset) / max(sec['inference'], 1e-9):.1f} images/s), "
              f"COCOeval {sec['coco_eval']:.2f} s; wrote {out_dir}")
        if test_options:
            print("at test time: " + ", ".join(f"{k}={v}" for k, v in test_options.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
