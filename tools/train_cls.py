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

from engine.cli import add_train_flags, recipe_table, run_tool, train_overrides, training_summary
from engine.config import apply_overrides, load_config
from backbones.resnet import BACKBONES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=list(BACKBONES))
    add_train_flags(
        p, default_recipe="the shapes CPU recipe without --data-path, torchvision's reference ImageNet recipe with it",
        data="ImageFolder root (DIR/train/<class>/*, DIR/val/<class>/*); omitted: the shapes crops",
        train_split="training folder under DIR (default train)", val_split="validation folder under DIR (default val)",
        weights_flag="--weights", weights="initial weights: imagenet, none, or a checkpoint path (fc skipped when class counts differ)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_configs:
        print(recipe_table("classification"))
        return 0
    return run_tool(_train, check=lambda: _check(args))


def _check(args: argparse.Namespace) -> tuple[dict, argparse.Namespace]:
    from classification import CLASSIFICATION, default_cls_recipe, preflight

    cfg = load_config(args.config or default_cls_recipe(args.data_path), schema=CLASSIFICATION)
    cfg = apply_overrides(cfg, args.set, schema=CLASSIFICATION, **train_overrides(args, "backbone", "weights"))
    return preflight(cfg, resume=args.resume), args  # every input checked before any work


def _train(checked: tuple[dict, argparse.Namespace]) -> int:
    from classification import train

    cfg, args = checked
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    summary = training_summary(result, cfg, "  ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items() if "top" in k))
    if summary:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
