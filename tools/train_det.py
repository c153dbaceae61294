"""Train a detector on a ResNet-18/34 pyramid.

    python tools/train_det.py --backbone resnet18                      # shapes demo (CPU)
    python tools/train_det.py --config configs/faster_rcnn_r18_fpn_1x_coco.yaml --data-path /data/coco
    torchrun --nproc_per_node=8 tools/train_det.py --config ... --data-path /data/coco
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detection.config import ConfigError, apply_overrides, load_config
from detection.evaluation import format_metrics
from detection.data import build_transforms  # noqa: F401  (fail early on a broken install)
from detection.models import ARCHS, BACKBONES

REPO = Path(__file__).resolve().parent.parent
SHAPES_RECIPE = REPO / "configs" / "shapes_faster_rcnn_r18_fpn.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML (default: the shapes CPU recipe without --data-path)")
    p.add_argument("--backbone", choices=list(BACKBONES))
    p.add_argument("--model", choices=list(ARCHS))
    p.add_argument("--data-path", help="COCO-layout root; omitted: the built-in shapes data set")
    p.add_argument("--train-split")
    p.add_argument("--val-split")
    p.add_argument("--output-dir")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-iters", type=int, help="stop after this many iterations (smoke runs)")
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--lr", type=float, help="learning rate for lr_reference_batch images (scaled by the total batch)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--amp", action="store_true", default=None, help="autocast: fp16 + GradScaler on CUDA, bf16 on CPU")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH", help="resume from PATH or OUTPUT_DIR/checkpoint.pth")
    p.add_argument("--weights-backbone", help="imagenet, none, or a checkpoint path")
    p.add_argument("--trainable-layers", type=int)
    p.add_argument("--augment", choices=["none", "hflip", "multiscale", "lsj"])
    p.add_argument("--workers", type=int)
    p.add_argument("--eval-period", type=int, help="epochs between evaluations (0: only at the end)")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = args.config or (SHAPES_RECIPE if args.data_path is None else None)
        cfg = load_config(config)
        cfg = apply_overrides(
            cfg, args.set, backbone=args.backbone, model=args.model, data_path=args.data_path,
            train_split=args.train_split, val_split=args.val_split, output_dir=args.output_dir,
            epochs=args.epochs, max_iters=args.max_iters, batch_size=args.batch_size, lr=args.lr,
            device=args.device, amp=args.amp, weights_backbone=args.weights_backbone, trainable_layers=args.trainable_layers,
            augment=args.augment, workers=args.workers, eval_period=args.eval_period, seed=args.seed,
        )
        if args.weights_backbone == "none":
            cfg["weights_backbone"] = None
        if cfg["data_path"] is not None and not Path(cfg["data_path"]).is_dir():
            raise ConfigError(f"--data-path {cfg['data_path']} does not exist")
        if args.resume is not None:
            resume_from = Path(cfg["output_dir"]) / "checkpoint.pth" if args.resume is True else Path(args.resume)
            if not resume_from.is_file():
                raise ConfigError(f"--resume: no checkpoint at {resume_from}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from detection.engine import train

    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    from detection import distributed as dist_utils

    if dist_utils.is_main_process():
        metrics = result["metrics"]
        print(f"finished {result['iteration']} iterations in {result['seconds'] / 60:.1f} min; outputs in {cfg['output_dir']}")
        if metrics:
            print(format_metrics(metrics))
    dist_utils.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
