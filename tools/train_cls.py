"""Pretrain a ResNet-18/34 trunk as an image classifier (ImageFolder / ImageNet layout).

    python tools/train_cls.py                                               # shapes crops demo (CPU)
    python tools/train_cls.py --backbone resnet34 --data-path /data/imagenet   # torchvision's reference recipe
    torchrun --nproc_per_node=8 tools/train_cls.py --config cls_resnet18_imagenet --data-path /data/imagenet
    torchrun --nproc_per_node=8 tools/train_cls.py --config cls_resnet18_imagenet_modern --data-path /data/imagenet
    python tools/train_cls.py --list-configs

DIR/train/<class>/* and DIR/val/<class>/*. The model_final.pth it writes is what
tools/train_det.py --weights-backbone PATH and backbones.load_pretrained take.
"""

from __future__ import annotations

import argparse
import sys

from engine.cli import DEVICES, run_tool
from engine.config import apply_overrides, list_recipes, load_config
from backbones.resnet import BACKBONES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe: a YAML path or a name from configs/ (default: the shapes CPU recipe "
                                    "without --data-path, torchvision's reference ImageNet recipe with it)")
    p.add_argument("--list-configs", action="store_true", help="list the shipped classification recipes and exit")
    p.add_argument("--backbone", choices=list(BACKBONES))
    p.add_argument("--data-path", help="ImageFolder root (DIR/train/<class>/*, DIR/val/<class>/*); omitted: the shapes crops")
    p.add_argument("--train-split", help="training folder under DIR (default train)")
    p.add_argument("--val-split", help="validation folder under DIR (default val)")
    p.add_argument("--output-dir")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-iters", type=int, help="stop after this many iterations (smoke runs)")
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--lr", type=float, help="learning rate for lr_reference_batch images (scaled by the total batch)")
    p.add_argument("--device", choices=list(DEVICES), help="default: the recipe's (auto: cuda when available)")
    p.add_argument("--amp", action="store_true", default=None, help="autocast: fp16 + GradScaler on CUDA, bf16 on CPU")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH", help="resume from PATH or OUTPUT_DIR/checkpoint.pth")
    p.add_argument("--weights", help="initial weights: imagenet, none, or a checkpoint path (fc skipped when class counts differ)")
    p.add_argument("--workers", type=int)
    p.add_argument("--eval-period", type=int, help="epochs between evaluations (0: only at the end)")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_configs:
        for recipe in list_recipes("classification"):
            print(f"{recipe['name']:<34} {recipe['description']}")
        return 0
    return run_tool(_train, check=lambda: _check(args))


def _check(args: argparse.Namespace) -> tuple[dict, argparse.Namespace]:
    from classification import CLASSIFICATION, default_cls_recipe, preflight_cls

    cfg = load_config(args.config or default_cls_recipe(args.data_path), schema=CLASSIFICATION)
    cfg = apply_overrides(
        cfg, args.set, schema=CLASSIFICATION, backbone=args.backbone, data_path=args.data_path,
        train_split=args.train_split, val_split=args.val_split, output_dir=args.output_dir, epochs=args.epochs,
        max_iters=args.max_iters, batch_size=args.batch_size, lr=args.lr, device=args.device, amp=args.amp,
        weights=args.weights, workers=args.workers, eval_period=args.eval_period, seed=args.seed,
    )
    return preflight_cls(cfg, resume=args.resume), args  # every input checked before any work


def _train(checked: tuple[dict, argparse.Namespace]) -> int:
    from classification import train_classifier
    from engine import distributed as dist_utils

    cfg, args = checked
    result = train_classifier(cfg, resume=args.resume, progress=not args.no_progress)
    if dist_utils.is_main_process():
        print(f"finished {result['iteration']} iterations in {result['seconds'] / 60:.1f} min; outputs in {cfg['output_dir']}")
        print("  ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items() if "top" in k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
